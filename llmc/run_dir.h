/*
 * Run directories (the conventions of train_mora pretrain, shared with the MORA loop):
 * OUT/config.json, OUT/metrics.jsonl (one line a step, truncated back to the checkpoint's step on
 * resume), native checkpoints OUT/model_stepNNNNNN.ckpt with OUT/latest.txt naming the newest,
 * every file written atomically.
 */
#ifndef LLMC_RUN_DIR_H
#define LLMC_RUN_DIR_H
#include <stdio.h>
#include <cjson/cJSON.h>
#include "model.h"
#include "checkpoint.h"

// FNV-1a over n bytes, continuing from h (RUN_HASH_START for a new one).
#define RUN_HASH_START 1469598103934665603ull
uint64_t run_hash(uint64_t h, const void *p, size_t n);
// Every rank reads its inputs through its own paths, and on several nodes a path may name a file
// of each node's own disk: a rank whose fingerprint of `what` (an input, as the user named it)
// differs from rank 0's stops the job with a message naming it, before any work on mixed data.
// Collective; it returns on no rank before every rank has called it, so that rank 0 writes no
// run files for inputs another rank could not read.
void run_require_same_on_ranks(uint64_t fingerprint, const char *what);
// The fingerprint of a training state as a checkpoint gave it: parameters, AdamW moments, step.
uint64_t run_state_fingerprint(const Model *model, const TrainState *state);

// How to start this command again with as many ranks ("" for one rank, "mpirun -np 4 " or
// "srun -n 4 " by the launcher that started this one), for the hints that say how to continue.
const char *run_launch_prefix(void);

// Creates DIR and its missing parents (mkdir -p); a part of the path that exists and is not a
// directory, one that cannot be created, or a directory the process cannot create a file in, is
// an error naming `flag` and that part.
void run_ensure_dir(const char *path, const char *flag);
int run_file_exists(const char *path);
int run_is_dir(const char *path);
// Writes obj (pretty-printed, newline-terminated) / text to PATH atomically.
void run_write_json(const char *path, const cJSON *obj);
void run_write_text(const char *path, const char *text);
// Parses a JSON file; an unreadable or malformed file is an error naming it. Caller deletes.
cJSON *run_read_json(const char *path);
// OUT/<latest.txt's name>, malloc'd, or NULL when OUT has no latest.txt.
char *run_latest_checkpoint(const char *out);
// Whether OUT holds any native checkpoint (model_step*.ckpt), named in latest.txt or not.
int run_has_checkpoints(const char *out);
// Saves OUT/model_stepNNNNNN.ckpt (with optimizer state) and points latest.txt at it.
void run_save_checkpoint(const Model *model, const TrainState *state, const char *out);
// Keeps the lines of the JSONL file PATH whose integer field `key` is <= last (all lines when the
// field is missing), then returns it opened for appending. A line that is not one whole JSON
// object (the torn last line of a run killed mid-write) is dropped, and the count is printed.
FILE *run_open_jsonl_upto(const char *path, const char *key, int last);
// The number of ranks that wrote the run in OUT: its config.json's "world_size" (1 for a run
// without the field or without config.json; a field that is not a positive integer is an error).
int run_world_size(const char *out);
// For --resume under several ranks: rank 0 reads OUT's world size and every rank compares it
// with comm_world(); a different number is an error on every rank naming both counts. The data
// order (each rank's shard) and any sharded optimizer state depend on the number of ranks, so a
// run continues exactly only with the same number. `flag` names the option in the message.
void run_require_world_size(const char *out, const char *flag);
// A new (not resumed) run must not write into a directory that holds a run already: stops with a
// message naming the file when OUT holds config.json, latest.txt or metrics.jsonl.
void run_require_new(const char *out, const char *command);
// PATH made absolute (malloc'd); a path that does not resolve is kept as it is.
char *run_absolute_path(const char *path);
// Records in a run's config the tokenizer (by absolute path) and chat template of the model the run
// starts from, so that the run's native checkpoints carry them (see checkpoint.h).
void run_record_model_text(cJSON *cfg, const CheckpointInfo *info);
// "1h02m", "3m05s", "12s" ("?" for a negative or absurd value).
void run_format_duration(double seconds, char *buf, size_t n);
#endif
