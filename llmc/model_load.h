/*
 * Where a model comes from: a named preset (random weights from a seed) or a checkpoint in any
 * format checkpoint_load reads. One loader for every subcommand that takes a model (pretrain's
 * --init, reward's --model, the MORA loop's --model and eval's policies), so that each says the
 * same thing about a name that is neither.
 */
#ifndef LLMC_MODEL_LOAD_H
#define LLMC_MODEL_LOAD_H
#include <stdint.h>
#include "model.h"
#include "checkpoint.h"

// The preset names model_config_preset knows, space-separated, for error messages.
extern const char *const model_preset_names;

// Checks that `source` is a preset (when allow_preset) or an existing file or directory, without
// loading anything, so that a command can refuse a bad name before any work. Exits with an error
// naming `flag` otherwise. Returns 1 for a preset, 0 for a path.
int model_source_check(const char *source, const char *flag, int allow_preset);

// Loads `source` into model (model_init is called here): a preset (when allow_preset) initialised
// with model_init_random(seed), else a checkpoint. state and info may be NULL; for a preset they
// are zeroed. The checks and messages of model_source_check come first. Returns 1 for a preset.
int model_load(Model *model, const char *source, const char *flag, int allow_preset, uint64_t seed,
               TrainState *state, CheckpointInfo *info);
#endif
