/*
 * train_mora: one binary for the whole pipeline. This file is the driver: subcommands, their
 * flags, logging and checkpoints. The model lives in llmc/model.c (CPU reference), the
 * checkpoint formats in llmc/checkpoint.c, the token shards in dataloader.h.
 *
 *   ./train_mora pretrain ...    language-model training on token shards (llm.c format)
 *   ./train_mora sft ...         supervised fine-tuning on prompt/response JSONL (the same loop)
 *   ./train_mora generate ...    sample or chat from a checkpoint
 *
 * Every subcommand takes long flags and --help.
 */
#include <math.h>
#include <dirent.h>
#include <unistd.h>
#include <cjson/cJSON.h>

#include "llmc/utils.h"
#include "llmc/args.h"
#include "llmc/rand.h"
#include "llmc/model.h"
#include "llmc/checkpoint.h"
#include "llmc/model_load.h"
#include "llmc/run_dir.h"
#include "llmc/generate.h"
#include "llmc/reward_heads.h"
#include "llmc/chat_template.h"
#include "llmc/comm.h"
#include "llmc/device.h"
#include "llmc/zero.h"
#include "llmc/stop.h"
#include "tokenizer.h"
#include "dataloader.h"
#ifdef USE_CUDA
#include "llmc/model_cuda.h"
#include "llmc/comm_nccl.h"
#include "rollout.h"
#endif
#include "mora.h"

// ----------------------------------------------------------------------------
// small shared pieces

static void print_model_summary(const Model *model, const char *source) {
    const ModelConfig *c = &model->config;
    printf("model: %s (%s) L=%d C=%d heads=%d kv_heads=%d head_dim=%d ffn=%d V=%d maxT=%d %s, %.2fM parameters\n",
           source, c->arch == ARCH_GPT2 ? "gpt2" : "llama", c->n_layer, c->n_embd, c->n_head, c->n_kv_head,
           c->head_dim, c->ffn_hidden, c->vocab_size, c->max_seq_len,
           c->tied_embeddings ? "tied" : "untied", model->num_parameters / 1e6);
}

// ----------------------------------------------------------------------------
// pretrain and sft: one training loop, on token shards or on prompt/response examples

typedef struct {
    const char *init, *train_data, *val_data, *out, *device;
    int batch_size, seq_len, grad_accum, steps, warmup, save_every, val_every, val_batches, seed, resume, log_every;
    int zero;
    float lr, min_lr, weight_decay, grad_clip, beta1, beta2;
    // sft only
    const char *tokenizer, *chat_template;
    int epochs, shuffle, skip_bad;
} TrainArgs;

// OUT/metrics.jsonl with the lines after last_step dropped (a resumed run rewrites them), open for appending.
static FILE *open_metrics_jsonl(const char *out, int last_step) {
    char path[4200];
    snprintf(path, sizeof path, "%s/metrics.jsonl", out);
    return run_open_jsonl_upto(path, "step", last_step);
}

// sft's validation loss: the mean over every counted token of every validation example (not a
// mean of batch means, so batches of few tokens weigh as little as they hold). The batches are
// split over the ranks as in evaluate_loss.
static float evaluate_sft_loss(Model *model, SftLoader *val) {
    const int64_t batches = (val->data->n + val->B - 1) / val->B;
    double sums[2] = {0.0, 0.0};   // the token losses, the tokens
    for (int64_t i = val->rank; i < batches; i += val->world) {
        sft_loader_fill(val, i * val->B);
        // the last batch wraps to the first examples: only the ones past the end are left out
        for (int b = 0; b < val->B; b++)
            if (i * val->B + b >= val->data->n)
                for (int t = 0; t < val->T; t++) val->mask[b * val->T + t] = 0.0f;
        double counted = 0.0;
        for (int k = 0; k < val->B * val->T; k++) counted += val->mask[k];
        model_forward(model, val->inputs, val->targets, val->mask, val->B, val->T);
        sums[0] += (double)model->mean_loss * counted;
        sums[1] += counted;
    }
    comm_all_reduce_sum_double(sums, 2);
    return (float)(sums[0] / sums[1]);
}

// Mean loss over the first `batches` validation batches. The batches are split over the ranks
// (rank r evaluates r, r + W, ...) and the sums added over ranks, so the value is the same
// whatever the number of ranks (up to the order of the additions).
static float evaluate_loss(Model *model, DataLoader *dl, int batches) {
    double sum = 0.0;
    dl->batch_index = 0;
    for (int i = dl->rank; i < batches; i += dl->world) {
        dataloader_next(dl);
        model_forward(model, dl->inputs, dl->targets, NULL, dl->B, dl->T);
        sum += model->mean_loss;
    }
    comm_all_reduce_sum_double(&sum, 1);
    return (float)(sum / batches);
}

// The flags a resumed run may be given anew: how long it goes on (--steps), what it logs, saves
// and validates, and where it computes. --train_data may name the same shards at another path
// (the data moved, or a relative pattern from another directory); --zero lays the AdamW state out
// over the ranks without changing any element's arithmetic. Every other flag is a setting of the
// run: another value would train another run than the one the checkpoint continues.
static const char *const resume_may_change[] = {
    "steps", "save_every", "log_every", "val_every", "val_batches", "val_data", "train_data", "zero", NULL,
};

static int resume_may_change_flag(const char *name) {
    for (int k = 0; resume_may_change[k]; k++)
        if (!strcmp(resume_may_change[k], name)) return 1;
    return 0;
}

// A float flag's value for a message: %g, with more digits when %g would show two different
// values alike.
static void format_float_pair(float given, float run, char *a, char *b, size_t n) {
    snprintf(a, n, "%g", given);
    snprintf(b, n, "%g", run);
    if (!strcmp(a, b)) {
        snprintf(a, n, "%.9g", given);
        snprintf(b, n, "%.9g", run);
    }
}

// --resume: every flag takes the value the run recorded in OUT/config.json, except --out,
// --resume and --device (this launch's), and the flags of resume_may_change when the user gives
// them. A flag the user gives with another value than the run's is an error; one the config does
// not hold (a run written before the flag existed) keeps its value.
static void train_resume_settings(const ArgSpec *specs, int n_specs, const char *out, const char *cmd) {
    char path[4200];
    snprintf(path, sizeof path, "%s/config.json", out);
    if (!run_file_exists(path)) fatal("--resume: %s has no config.json (no %s run to resume)", out, cmd);
    cJSON *cfg = run_read_json(path);
    const cJSON *command = cJSON_GetObjectItemCaseSensitive(cfg, "command");
    if (!cJSON_IsString(command) || strcmp(command->valuestring, cmd))
        fatal("--resume: %s is not the config of %s %s run (its \"command\" is %s%s%s)", path, strcmp(cmd, "sft") ? "a" : "an", cmd,
              cJSON_IsString(command) ? "\"" : "", cJSON_IsString(command) ? command->valuestring : "missing",
              cJSON_IsString(command) ? "\"" : "");
    for (int i = 0; i < n_specs; i++) {
        const ArgSpec *s = &specs[i];
        if (!strcmp(s->name, "out") || !strcmp(s->name, "resume") || !strcmp(s->name, "device")) continue;
        const cJSON *v = cJSON_GetObjectItemCaseSensitive(cfg, s->name);
        if (v == NULL) continue;
        const int given = args_given(s->name);
        if (given && resume_may_change_flag(s->name)) {
            // said once, so that a log shows where the resumed part departs from the run (these
            // flags are strings and integers)
            if (s->type == ARG_STRING && cJSON_IsString(v) && strcmp(*(const char **)s->dest, v->valuestring))
                printf("resume: --%s %s (the run had %s)\n", s->name, *(const char **)s->dest, v->valuestring);
            else if (s->type == ARG_INT && cJSON_IsNumber(v) && *(int *)s->dest != v->valueint)
                printf("resume: --%s %d (the run had %d)\n", s->name, *(int *)s->dest, v->valueint);
            continue;
        }
        if (s->type == ARG_STRING) {
            if (!cJSON_IsString(v)) fatal("%s: field \"%s\" must be a string", path, s->name);
            const char **dest = (const char **)s->dest;
            if (given && strcmp(*dest, v->valuestring))
                args_fatal("flag --%s %s differs from the run's %s (%s): a resumed run keeps its settings",
                      s->name, *dest, v->valuestring, path);
            *dest = xstrdup(v->valuestring);
        } else if (s->type == ARG_FLOAT) {
            if (!cJSON_IsNumber(v)) fatal("%s: field \"%s\" must be a number", path, s->name);
            float *dest = (float *)s->dest, run = (float)v->valuedouble;
            if (given && *dest != run) {
                char a[32], b[32];
                format_float_pair(*dest, run, a, b, sizeof a);
                args_fatal("flag --%s %s differs from the run's %s (%s): a resumed run keeps its settings", s->name, a, b, path);
            }
            *dest = run;
        } else {
            if (!cJSON_IsNumber(v) || v->valuedouble != (double)v->valueint)
                fatal("%s: field \"%s\" must be an integer", path, s->name);
            int *dest = (int *)s->dest;
            if (given && *dest != v->valueint)
                args_fatal("flag --%s %d differs from the run's %d (%s): a resumed run keeps its settings",
                      s->name, *dest, v->valueint, path);
            *dest = v->valueint;
        }
    }
    cJSON_Delete(cfg);
}

// A checkpoint save killed between writing its temporary file and the rename leaves
// OUT/model_stepNNNNNN.ckpt.tmp.PID behind, as large as a checkpoint; a resumed run removes them.
static int is_checkpoint_temp_name(const char *name) {
    const char *p = name;
    if (strncmp(p, "model_step", 10)) return 0;
    p += 10;
    if (*p < '0' || *p > '9') return 0;
    while (*p >= '0' && *p <= '9') p++;
    if (strncmp(p, ".ckpt.tmp.", 10)) return 0;
    p += 10;
    if (*p < '0' || *p > '9') return 0;
    while (*p >= '0' && *p <= '9') p++;
    return *p == '\0';
}

static void remove_checkpoint_temps(const char *out) {
    DIR *dir = opendir(out);
    if (dir == NULL) fatal("--out %s: cannot list the directory: %s", out, strerror(errno));
    int removed = 0;
    for (struct dirent *e = readdir(dir); e != NULL; e = readdir(dir)) {
        if (!is_checkpoint_temp_name(e->d_name)) continue;
        char path[4400];
        snprintf(path, sizeof path, "%s/%s", out, e->d_name);
        if (unlink(path) != 0) fatal("cannot remove %s (left by an interrupted checkpoint save): %s", path, strerror(errno));
        removed++;
    }
    closedir(dir);
    if (removed > 0)
        printf("removed %d temporary checkpoint file(s) (model_step*.ckpt.tmp.*) left in %s by an interrupted save\n", removed, out);
}

// What every rank must find behind a shard pattern: the same shards, of the same sizes and with
// the same first tokens (their whole contents would be a pass over the data set).
static uint64_t dataloader_fingerprint(const DataLoader *dl) {
    uint64_t h = run_hash(RUN_HASH_START, &dl->n_shards, sizeof dl->n_shards);
    unsigned char head[4096];
    for (int i = 0; i < dl->n_shards; i++) {
        h = run_hash(h, &dl->shard_tokens[i], sizeof dl->shard_tokens[i]);
        h = run_hash(h, &dl->shard_bytes_per_tok[i], sizeof dl->shard_bytes_per_tok[i]);
        int64_t bytes = dl->shard_tokens[i] * dl->shard_bytes_per_tok[i];
        size_t n = bytes < (int64_t)sizeof head ? (size_t)bytes : sizeof head;
        FILE *f = fopen_check(dl->paths[i], "rb");
        if (fseek(f, (long)SHARD_HEADER_INTS * 4, SEEK_SET) != 0) fatal("%s: cannot seek past the header", dl->paths[i]);
        fread_check(head, 1, n, f, dl->paths[i], "tokens");
        fclose(f);
        h = run_hash(h, head, n);
    }
    return h;
}

// pretrain (sft = 0) and sft (sft = 1): the same loop, flags and run directory; sft reads
// prompt/response examples instead of token shards and counts the loss on the responses alone.
static int cmd_train(int argc, char **argv, int sft) {
    const char *cmd = sft ? "sft" : "pretrain";
    TrainArgs a = {
        .init = "gpt2:tiny", .train_data = "", .val_data = "", .out = "", .device = "cpu",
        .batch_size = 4, .seq_len = 64, .grad_accum = 1, .steps = 100, .warmup = 10, .save_every = 0,
        .val_every = 0, .val_batches = 4, .seed = 1337, .resume = 0, .log_every = 1, .zero = 0,
        .lr = 3e-4f, .min_lr = 0.0f, .weight_decay = 0.1f, .grad_clip = 1.0f, .beta1 = 0.9f, .beta2 = 0.95f,
        .tokenizer = "", .chat_template = "auto", .epochs = 1, .shuffle = 1, .skip_bad = 0,
    };
    if (sft) {
        // fine-tuning defaults: a small learning rate, no warmup or decay of the weights, and a
        // whole epoch over the examples (--steps 0)
        a.init = "";
        a.seq_len = 512;
        a.steps = 0;
        a.warmup = 0;
        a.lr = 2e-5f;
        a.weight_decay = 0.0f;
    }
    ArgSpec all_specs[] = {
        {"init", ARG_STRING, &a.init, "preset (gpt2:d12, gpt2:tiny, llama:smollm2-135m, llama:tiny, ...) or checkpoint (native, llm.c .bin, .safetensors / HF dir, .gguf)"},
        {"train_data", ARG_STRING, &a.train_data, sft ? "examples, JSONL {\"prompt\": ..., \"response\": ...} a line (comma-separated files)"
                                                       : "token shards, llm.c format (glob pattern, quoted)"},
        {"val_data", ARG_STRING, &a.val_data, sft ? "validation examples, JSONL as --train_data: the loss over all their response tokens, "
                                                   "after the last step and every --val_every steps"
                                                 : "validation token shards (glob pattern)"},
        {"out", ARG_STRING, &a.out, "run directory: config.json, metrics.jsonl, checkpoints"},
        {"device", ARG_STRING, &a.device, "cpu, cuda or auto"},
        {"tokenizer", ARG_STRING, &a.tokenizer, "tokenizer.json, GGUF or llm.c tokenizer .bin (default: the model's own; none: bytes are the tokens)"},
        {"chat_template", ARG_STRING, &a.chat_template, "how a prompt becomes the model's input: auto (the model's), none, chatml, smollm2, llama3 or plain"},
        {"batch_size", ARG_INT, &a.batch_size, sft ? "examples per micro-batch (B), one a row" : "sequences per micro-batch (B)"},
        {"seq_len", ARG_INT, &a.seq_len, sft ? "tokens per row (T; the model's context when it is shorter and the flag is not given): a "
                                               "longer example loses prompt tokens from the left" : "tokens per sequence (T)"},
        {"grad_accum", ARG_INT, &a.grad_accum, "micro-batches per optimizer step"},
        {"steps", ARG_INT, &a.steps, sft ? "optimizer steps (0: as many as --epochs takes)" : "optimizer steps"},
        {"epochs", ARG_INT, &a.epochs, "passes over the examples when --steps is 0"},
        {"shuffle", ARG_INT, &a.shuffle, "1: each epoch in an order drawn from --seed; 0: the order of the files"},
        {"skip_bad", ARG_INT, &a.skip_bad, "1: skip bad lines and responses longer than --seq_len with a warning; 0: stop at the first"},
        {"lr", ARG_FLOAT, &a.lr, "peak learning rate"},
        {"min_lr", ARG_FLOAT, &a.min_lr, "learning rate at the end of the cosine decay"},
        {"warmup", ARG_INT, &a.warmup, "linear warmup steps"},
        {"weight_decay", ARG_FLOAT, &a.weight_decay, "AdamW decoupled weight decay (2-D tensors)"},
        {"grad_clip", ARG_FLOAT, &a.grad_clip, "global gradient-norm clip (0: off)"},
        {"beta1", ARG_FLOAT, &a.beta1, "AdamW beta1"},
        {"beta2", ARG_FLOAT, &a.beta2, "AdamW beta2"},
        {"seed", ARG_INT, &a.seed, sft ? "random seed (initialisation of a preset, the examples' order)" : "random seed (initialisation)"},
        {"save_every", ARG_INT, &a.save_every, "checkpoint every N steps (0: only at the end)"},
        {"val_every", ARG_INT, &a.val_every, sft ? "validation loss every N steps (0: after the last step alone)" : "validation loss every N steps (0: off)"},
        {"val_batches", ARG_INT, &a.val_batches, "batches per validation"},
        {"log_every", ARG_INT, &a.log_every, "print a progress line every N steps"},
        {"resume", ARG_BOOL, &a.resume, sft ? "continue the run in --out from its latest checkpoint (same number of ranks) with the "
                                               "run's settings from its config.json; --steps (to extend the run), --save_every, --log_every, "
                                               "--val_every, --val_data, --train_data (the same examples elsewhere), --device and "
                                               "--zero may be given anew, any other flag only with the run's value, --init not at all"
                                             : "continue the run in --out from its latest checkpoint (same number of ranks) with the "
                                               "run's settings from its config.json; --steps (to extend the run), --save_every, --log_every, "
                                               "--val_every, --val_batches, --val_data, --train_data (the same shards elsewhere), --device and "
                                               "--zero may be given anew, any other flag only with the run's value, --init not at all"},
        {"zero", ARG_INT, &a.zero, "ZeRO stage under mpirun: 0 every rank holds all AdamW state; 1 each rank holds and updates 1/ranks of it, then the parameters are all-gathered"},
    };
    // the flags of one command alone
    static const char *const pretrain_only[] = {"val_batches", NULL};
    static const char *const sft_only[] = {"tokenizer", "chat_template", "epochs", "shuffle", "skip_bad", NULL};
    const char *const *other_only = sft ? pretrain_only : sft_only;
    ArgSpec specs[sizeof all_specs / sizeof all_specs[0]];
    int n_specs = 0;
    for (size_t i = 0; i < sizeof all_specs / sizeof all_specs[0]; i++) {
        int skip = 0;
        for (int k = 0; other_only[k]; k++) skip |= !strcmp(all_specs[i].name, other_only[k]);
        if (!skip) specs[n_specs++] = all_specs[i];
    }
    args_parse(argc, argv, 2, specs, n_specs, cmd, sft ?
               "Supervised fine-tuning on prompt/response examples (JSONL), from a checkpoint or a preset. Each\n"
               "example is one row of the batch: its prompt through the chat template (as generate --chat and\n"
               "mora render it), then its response and the end of the assistant's turn, which the loss counts\n"
               "alone (the template's end marker, <|im_end|> for ChatML; without a template the tokenizer's\n"
               "end-of-sequence token). The checkpoints carry the tokenizer and template, so\n"
               "`train_mora generate --model OUT --chat` and `train_mora mora --model OUT` take them as they are.\n"
               "Data parallel under mpirun/srun: each rank reads its own micro-batches (the global batch is\n"
               "ranks x batch_size x grad_accum examples), gradients are averaged over ranks.\n"
               "SIGTERM, SIGINT or SIGUSR1 stops the run after its current step with a checkpoint (exit\n"
               "status 128 + the signal); --resume continues it." :
               "Language-model training on token shards in llm.c's format, from a preset or a checkpoint.\n"
               "Data parallel under mpirun/srun: each rank reads its own micro-batches (the global batch is\n"
               "ranks x batch_size x grad_accum sequences), gradients are averaged over ranks.\n"
               "SIGTERM, SIGINT or SIGUSR1 stops the run after its current step with a checkpoint (exit\n"
               "status 128 + the signal); --resume continues it.");
    const int seq_len_given = args_given("seq_len");
    // SIGTERM, SIGINT, SIGUSR1 from here on: the run stops after its current step (the first, when
    // the signal comes while it starts) with a checkpoint (stop.h)
    stop_signals_install(cmd);
    if (a.resume) {
        if (args_given("init"))
            args_fatal("flag --init with --resume: a resumed run continues from its latest checkpoint in --out; "
                  "drop --init, or start a new run from it in another --out");
        // nothing is created for a run that is not there
        if (!a.out[0]) args_fatal("flag --resume needs --out, the run directory to continue");
        if (!run_is_dir(a.out)) fatal("--resume: --out %s is not a directory (no run to resume)", a.out);
        train_resume_settings(specs, n_specs, a.out, cmd);
    }
    if (sft && !a.resume) args_require_string("init", a.init, cmd);
    args_require_string("train_data", a.train_data, cmd);
    args_require_string("out", a.out, cmd);
    args_require_positive_int("batch_size", a.batch_size);
    args_require_positive_int("seq_len", a.seq_len);
    args_require_positive_int("grad_accum", a.grad_accum);
    if (sft) {
        args_require_nonneg_int("steps", a.steps);
        args_require_positive_int("epochs", a.epochs);
        if (a.shuffle != 0 && a.shuffle != 1) args_fatal("flag --shuffle: expected 0 or 1, got %d", a.shuffle);
        if (a.skip_bad != 0 && a.skip_bad != 1) args_fatal("flag --skip_bad: expected 0 or 1, got %d", a.skip_bad);
    } else {
        args_require_positive_int("steps", a.steps);
    }
    args_require_nonneg_int("warmup", a.warmup);
    args_require_nonneg_int("save_every", a.save_every);
    args_require_nonneg_int("val_every", a.val_every);
    args_require_positive_int("val_batches", a.val_batches);
    args_require_positive_int("log_every", a.log_every);
    args_require_range_float("lr", a.lr, 0.0f, 10.0f);
    args_require_range_float("min_lr", a.min_lr, 0.0f, 10.0f);
    args_require_range_float("weight_decay", a.weight_decay, 0.0f, 10.0f);
    args_require_range_float("grad_clip", a.grad_clip, 0.0f, 1e9f);
    args_require_range_float("beta1", a.beta1, 0.0f, 0.999999f);
    args_require_range_float("beta2", a.beta2, 0.0f, 0.999999f);
    if (a.zero != 0 && a.zero != 1) args_fatal("flag --zero: expected 0 or 1 (ZeRO stage), got %d", a.zero);
    if (a.val_every > 0 && !a.val_data[0])
        args_fatal("flag --val_every %d needs --val_data (the validation %s)", a.val_every, sft ? "examples" : "shards");
    // sft validates after its last step whenever it has --val_data
    if (!sft && a.val_data[0] && a.val_every == 0)
        args_fatal("flag --val_data is given but --val_every is 0 (off): set --val_every N to validate every N steps");
    if (a.min_lr > a.lr)
        args_fatal("flag --min_lr %g is above --lr %g: the cosine decay goes from --lr down to --min_lr", a.min_lr, a.lr);
    const int use_gpu = device_resolve(a.device);
    device_print(use_gpu);
    const int rank = comm_rank(), world = comm_world();
    // GPU data parallel: one rank per GPU, the collectives over NCCL (the CPU's go over MPI)
    const int gpu_nccl = device_data_parallel_init(use_gpu, world, a.zero);

    // rank 0 owns the run directory; the others wait until it exists
    if (rank == 0) {
        run_ensure_dir(a.out, "--out");
        if (a.resume) remove_checkpoint_temps(a.out);
        else run_require_new(a.out, cmd);
    }
    comm_barrier();
    // the data order and the optimizer shards depend on the number of ranks: a resumed run reads
    // on from where the run stopped only with the same number
    if (a.resume) run_require_world_size(a.out, "--resume");
    Model model;
    TrainState state;
    CheckpointInfo info;   // the tokenizer and chat template of the model the run starts from
    memset(&state, 0, sizeof state);
    char *resume_path = a.resume ? run_latest_checkpoint(a.out) : NULL;
    if (a.resume && resume_path == NULL) {
        if (run_has_checkpoints(a.out))
            fatal("--resume: %s has checkpoints (model_step*.ckpt) but no latest.txt naming the newest; write its name "
                  "into %s/latest.txt to resume from it", a.out, a.out);
        // stopped before its first checkpoint (killed, or a rank's input was bad): it starts again
        printf("--resume %s: no checkpoint yet, starting from step 0 with --init %s\n", a.out, a.init);
    }
    if (resume_path) {
        checkpoint_load(&model, resume_path, &state, &info);
        // every rank read the checkpoint through its own path: the same state? (the parameters
        // are broadcast below, the AdamW moments and the step are not)
        if (comm_world() > 1) run_require_same_on_ranks(run_state_fingerprint(&model, &state), resume_path);
        if ((!sft || a.steps > 0) && state.step >= a.steps)
            fatal("the run in %s is at step %d; --steps %d would not train (give a larger --steps)", a.out, state.step, a.steps);
        printf("resuming %s at step %d (settings from %s/config.json)\n", resume_path, state.step, a.out);
        print_model_summary(&model, resume_path);
    } else {
        model_load(&model, a.init, "--init", 1, (uint64_t)a.seed, &state, &info);
        // a loaded checkpoint starts a new run, with an AdamW of its own: moments from zero and
        // the bias correction from its first step (--resume continues a run's optimizer)
        if (state.has_optimizer) printf("note: %s's AdamW state is not used: a new run starts its optimizer afresh\n", a.init);
        free(model.m);
        free(model.v);
        model.m = model.v = NULL;
        model.opt_step = 0;
        state.step = 0;
        state.rng_state = rng_seed((uint64_t)a.seed);
        print_model_summary(&model, a.init);
    }
    free(resume_path);
    if (sft && !seq_len_given && !a.resume && a.seq_len > model.config.max_seq_len) a.seq_len = model.config.max_seq_len;
    if (a.seq_len > model.config.max_seq_len)
        args_fatal("flag --seq_len %d exceeds the model's context length %d", a.seq_len, model.config.max_seq_len);
    // every rank built the model the same way; rank 0's parameters are made the ones everyone
    // starts from, so the ranks cannot drift apart through a file that differs between nodes
    // (on GPUs by NCCL, once the GPU model exists)
    if (!gpu_nccl) comm_broadcast(model.params, model.num_parameters * sizeof(float), 0);
    // ZeRO-1 on the CPU: this rank keeps the AdamW moments of its shard only (a resumed state is
    // cut to it); the GPU model shards its own state (cuda_model_create_sharded)
    AdamWShard shard;
    memset(&shard, 0, sizeof shard);
    if (a.zero == 1 && !use_gpu) adamw_shard_init(&shard, &model, rank, world);
    if (world > 1 || gpu_nccl)
        printf("ranks: %d (%s%s), global batch %d x %d sequences%s\n", world, comm_backend_name(),
               gpu_nccl ? ", GPU collectives over NCCL" : "", world, a.batch_size * a.grad_accum,
               a.zero == 1 ? ", ZeRO-1: AdamW state sharded over the ranks" : "");
    comm_report_placement();

    DataLoader train, val;
    SftLoader sft_train, sft_val;
    TextEncoder enc;
    EncodedSft sft_train_seqs, sft_val_seqs;
    memset(&train, 0, sizeof train);
    memset(&val, 0, sizeof val);
    if (sft) {
        // the tokenizer and template the examples are written with, which the run's checkpoints
        // then carry (info, recorded in config.json)
        if (a.tokenizer[0]) {
            if (!strcmp(a.tokenizer, "none")) info.tokenizer_path[0] = '\0';
            else snprintf(info.tokenizer_path, sizeof info.tokenizer_path, "%s", a.tokenizer);
        }
        text_encoder_init(&enc, info.tokenizer_path, a.chat_template, info.chat_template, model.config.vocab_size);
        snprintf(info.chat_template, sizeof info.chat_template, "%s", enc.chat ? chat_template_name(enc.chat) : "");
        TokenList end = {0};
        text_encode_end_of_turn(&enc, &end);
        if (enc.chat) printf("examples: the prompt through the %s template", chat_template_name(enc.chat));
        else printf("examples: the prompt as it is (no chat template)");
        printf(", then the response and %d end-of-turn token(s)%s\n", end.n,
               end.n ? "" : " (none: the model does not learn where an answer ends)");
        token_list_free(&end);
        const int bad_lines = a.skip_bad ? PREFDATA_SKIP : PREFDATA_STOP_HINT;
        SftData examples;
        memset(&examples, 0, sizeof examples);
        sftdata_load_list(&examples, a.train_data, bad_lines);
        sftdata_encode(&examples, &enc, a.seq_len + 1, bad_lines, &sft_train_seqs);
        if (sft_train_seqs.n == 0) fatal("--train_data %s: no example fits --seq_len %d", a.train_data, a.seq_len);
        printf("train data: %d examples (%lld response tokens)", sft_train_seqs.n, (long long)sft_train_seqs.counted);
        if (examples.skipped + sft_train_seqs.skipped > 0) printf(", %d skipped", examples.skipped + sft_train_seqs.skipped);
        if (sft_train_seqs.truncated > 0) printf(", %d with prompts cut to fit --seq_len %d", sft_train_seqs.truncated, a.seq_len);
        printf("\n");
        sftdata_free(&examples);
        if (a.val_data[0]) {
            memset(&examples, 0, sizeof examples);
            sftdata_load_list(&examples, a.val_data, bad_lines);
            sftdata_encode(&examples, &enc, a.seq_len + 1, bad_lines, &sft_val_seqs);
            if (sft_val_seqs.n == 0) fatal("--val_data %s: no example fits --seq_len %d", a.val_data, a.seq_len);
            printf("val data: %d examples (%lld response tokens)\n", sft_val_seqs.n, (long long)sft_val_seqs.counted);
            sftdata_free(&examples);
            sft_loader_init(&sft_val, &sft_val_seqs, a.batch_size, a.seq_len, rank, world, 0, 0);
        }
        sft_loader_init(&sft_train, &sft_train_seqs, a.batch_size, a.seq_len, rank, world, a.shuffle, (uint64_t)a.seed);
        if (a.steps == 0) {
            // --epochs passes over the examples, the last step's batch filled from the next epoch
            const int64_t per_step = (int64_t)a.batch_size * a.grad_accum * world;
            const int64_t steps = ((int64_t)a.epochs * sft_train_seqs.n + per_step - 1) / per_step;
            if (steps > INT32_MAX) fatal("--epochs %d of %d examples take more than %d steps", a.epochs, sft_train_seqs.n, INT32_MAX);
            a.steps = (int)steps;
            printf("steps: %d (--epochs %d of %d examples, %lld a step)\n", a.steps, a.epochs, sft_train_seqs.n, (long long)per_step);
        }
        if (state.step >= a.steps)
            fatal("the run in %s is at step %d; --steps %d would not train (give a larger --steps)", a.out, state.step, a.steps);
    } else {
        dataloader_init(&train, a.train_data, a.batch_size, a.seq_len, rank, world, model.config.vocab_size, "train data");
        if (a.val_data[0]) {
            dataloader_init(&val, a.val_data, a.batch_size, a.seq_len, rank, world, model.config.vocab_size, "val data");
            if (a.val_batches > val.total_batches && rank == 0)
                fprintf(stderr, "warning: --val_batches %d is more than the %lld batches of %dx%d in --val_data: "
                        "every validation reads some batches more than once\n",
                        a.val_batches, (long long)val.total_batches, a.batch_size, a.seq_len);
        }
        printf("train data: %d shard(s), %lld batches of %dx%d per epoch\n", train.n_shards,
               (long long)train.total_batches, a.batch_size, a.seq_len);
    }
    if (a.warmup >= a.steps && rank == 0)
        fprintf(stderr, "warning: --warmup %d is not below --steps %d: every step is in the warmup, so the learning rate "
                "only climbs (to %g at the last step, --lr %g) and never decays\n",
                a.warmup, a.steps, lr_schedule(a.steps - 1, a.warmup, a.steps, a.lr, a.min_lr), a.lr);
    // every rank read its data through its own paths: the same? (sft: the encoded examples; the
    // shards: their number, sizes and first tokens. A check that every rank could read its inputs,
    // too, before rank 0 writes run files)
    if (world > 1) {
        const char *unit = sft ? "examples" : "shards";
        char what[4200];
        snprintf(what, sizeof what, "--train_data %s (%d %s)", a.train_data, sft ? sft_train_seqs.n : train.n_shards, unit);
        run_require_same_on_ranks(sft ? encoded_sft_fingerprint(&sft_train_seqs) : dataloader_fingerprint(&train), what);
        if (a.val_data[0]) {
            snprintf(what, sizeof what, "--val_data %s (%d %s)", a.val_data, sft ? sft_val_seqs.n : val.n_shards, unit);
            run_require_same_on_ranks(sft ? encoded_sft_fingerprint(&sft_val_seqs) : dataloader_fingerprint(&val), what);
        }
    }

    // the run's configuration, for the record (a resumed run records its settings with what it
    // was given anew: the new --steps, --save_every, ...)
    char path[4200];
    snprintf(path, sizeof path, "%s/config.json", a.out);
    cJSON *cfg = args_to_json(cmd, specs, n_specs);
    run_record_model_text(cfg, &info);
    cJSON_AddNumberToObject(cfg, "parameters", (double)model.num_parameters);
    cJSON_AddNumberToObject(cfg, "world_size", world);
    if (rank == 0) run_write_json(path, cfg);
    cJSON_Delete(cfg);

    FILE *metrics = rank == 0 ? open_metrics_jsonl(a.out, state.step) : NULL;
    double tokens_per_step = (double)a.batch_size * a.seq_len * a.grad_accum * world;   // sft: counted ones
    const double flops_per_step = model_flops_per_step(&model.config, a.batch_size, a.seq_len) * a.grad_accum * world;
    double run_start = wall_seconds(), train_seconds = 0.0;
    int first_step = state.step;
    if (sft) sft_loader_seek_step(&sft_train, state.step, a.grad_accum);
    else dataloader_seek_step(&train, state.step, a.grad_accum);
#ifdef USE_CUDA
    // the GPU trains its own copy (fp32 master weights, bf16 compute); the CPU model receives the
    // parameters and AdamW state back before every checkpoint
    CudaModel *gpu = NULL;
    int attention_reported = 0;   // the flash attention's tuning, printed after the first step
    if (use_gpu) {
        device_memory_hint_set("--batch_size (B) and --seq_len (T)");
        gpu = a.zero == 1 ? cuda_model_create_sharded(&model, a.batch_size, a.seq_len)
                          : cuda_model_create(&model, a.batch_size, a.seq_len);
        if (gpu_nccl) cuda_model_broadcast_params(gpu, 0);
    }
    const int norm_in_backward = gpu ? gpu->norm_in_backward : 0;   // as the environment set it
#endif
    // SIGTERM, SIGINT, SIGUSR1: a checkpoint after the current step, then exit (stop.h)
    stop_signals_install(cmd);
    int stop_sig = 0;
    // this rank's next micro-batch: (B, T) inputs and targets, and sft's loss mask
    const int *inputs, *targets;
    const float *loss_mask = NULL;
#define NEXT_BATCH() do { \
        if (sft) { sft_loader_next(&sft_train); inputs = sft_train.inputs; targets = sft_train.targets; \
                   loss_mask = sft_train.mask; counted += sft_train.counted; } \
        else { dataloader_next(&train); inputs = train.inputs; targets = train.targets; } \
    } while (0)
    for (int step = state.step + 1; step <= a.steps; step++) {
        double t0 = wall_seconds();
        double loss = 0.0, counted = 0.0;
        float norm, scale, lr = lr_schedule(step - 1, a.warmup, a.steps, a.lr, a.min_lr);
#ifdef USE_CUDA
        if (gpu) {
            cuda_model_zero_grad(gpu);
            for (int micro = 0; micro < a.grad_accum; micro++) {
                NEXT_BATCH();
                // the squared gradient sums that grad_norm adds: only the last micro-step's are
                // of the whole gradient, and none are after the ranks' all-reduce
                gpu->norm_in_backward = norm_in_backward && !gpu_nccl && micro == a.grad_accum - 1;
                cuda_model_forward_backward(gpu, inputs, targets, loss_mask, a.batch_size, a.seq_len, 1.0f / a.grad_accum);
                loss += gpu->mean_loss / a.grad_accum;
            }
            if (gpu_nccl) {
                // data parallel, as on the CPU below: the means over the ranks before the clip
                float mean_loss = (float)loss;
                cuda_model_all_reduce_grads(gpu, &mean_loss);
                loss = mean_loss;
            }
            if (sft) comm_all_reduce_sum_double(&counted, 1);
            if (!isfinite(loss)) fatal("step %d: loss is %f; lower --lr or check the data", step, loss);
            norm = cuda_model_grad_norm(gpu);
            scale = (a.grad_clip > 0.0f && norm > a.grad_clip) ? a.grad_clip / norm : 1.0f;
            cuda_model_adamw_update(gpu, lr, a.beta1, a.beta2, 1e-8f, a.weight_decay, scale);
            if (rank == 0 && !attention_reported) printf("attention: %s\nproducts: %s\n", gpu->attention_tuning, gpu->matmul_tuning);
            attention_reported = 1;
            goto step_done;
        }
#endif
        model_zero_grad(&model);
        for (int micro = 0; micro < a.grad_accum; micro++) {
            NEXT_BATCH();
            model_forward(&model, inputs, targets, loss_mask, a.batch_size, a.seq_len);
            model_backward(&model, 1.0f / a.grad_accum);
            loss += model.mean_loss / a.grad_accum;
        }
        // data parallel: the step's gradient and loss are the means over the ranks' micro-batches,
        // exactly what one rank computes with grad_accum x ranks micro-batches (each micro-batch's
        // mean loss weighs 1 / micro-batches), so every rank then clips and updates the same way
        comm_all_reduce_mean(model.grads, model.num_parameters);
        double sums[2] = {loss, counted};
        comm_all_reduce_sum_double(sums, 2);
        loss = sums[0] / world;
        counted = sums[1];
        if (!isfinite(loss)) fatal("step %d: loss is %f; lower --lr or check the data", step, loss);
        norm = model_grad_norm(&model);
        scale = (a.grad_clip > 0.0f && norm > a.grad_clip) ? a.grad_clip / norm : 1.0f;
        if (a.zero == 1) {
            adamw_shard_update(&model, &shard, lr, a.beta1, a.beta2, 1e-8f, a.weight_decay, scale);
        } else {
            model_adamw_update(&model, lr, a.beta1, a.beta2, 1e-8f, a.weight_decay, scale);
        }
#ifdef USE_CUDA
    step_done:
#endif
        state.step = step;
        double dt = wall_seconds() - t0;
        train_seconds += dt;
        if (sft) tokens_per_step = counted;

        float val_loss = -1.0f;
        if (a.val_data[0] && ((a.val_every > 0 && step % a.val_every == 0) || step == a.steps))
        {
#ifdef USE_CUDA
            if (gpu) cuda_model_download(gpu, &model);  // validation reads the current weights
#endif
            val_loss = sft ? evaluate_sft_loss(&model, &sft_val) : evaluate_loss(&model, &val, a.val_batches);
        }

        if (metrics) {
            fprintf(metrics, "{\"step\": %d, \"loss\": %.6f, \"lr\": %.6e, \"grad_norm\": %.6f, \"ms\": %.2f, \"tokens_per_s\": %.1f",
                    step, loss, lr, norm, dt * 1e3, tokens_per_step / dt);
            if (sft) fprintf(metrics, ", \"tokens\": %.0f", counted);
            if (val_loss >= 0) fprintf(metrics, ", \"val_loss\": %.6f", val_loss);
            fprintf(metrics, "}\n");
            fflush(metrics);
        }
        if (step % a.log_every == 0 || step == a.steps || step == first_step + 1) {
            char eta[32];
            run_format_duration(train_seconds / (step - first_step) * (a.steps - step), eta, sizeof eta);
            printf("step %5d/%d | loss %.4f | lr %.2e | norm %.3f | %.0f ms | %.0f tok/s | %.1f GFLOP/s | eta %s",
                   step, a.steps, loss, lr, norm, dt * 1e3, tokens_per_step / dt, flops_per_step / dt / 1e9, eta);
            if (val_loss >= 0) printf(" | val %.4f", val_loss);
            printf("\n");
            fflush(stdout);
        }
        // a signal (stop.h) on any rank: every rank saves this step and stops
        stop_sig = step < a.steps ? stop_signal_agreed() : 0;
        if ((a.save_every > 0 && step % a.save_every == 0) || step == a.steps || stop_sig) {
#ifdef USE_CUDA
            if (gpu) {
                // the GPU's parameters and AdamW state back into the CPU model; under ZeRO-1 every
                // rank holds its shard of the moments, gathered on rank 0
                if (a.zero == 1 || rank == 0) cuda_model_download(gpu, &model);
                if (a.zero == 1) {
                    size_t lo, hi;
                    comm_shard_range(model.num_parameters, rank, world, &lo, &hi);
                    comm_gather_shards(model.m, model.m + lo, model.num_parameters, 0);
                    comm_gather_shards(model.v, model.v + lo, model.num_parameters, 0);
                }
                if (rank == 0) run_save_checkpoint(&model, &state, a.out);
            } else
#endif
            if (a.zero == 1) {
                // the checkpoint holds the whole AdamW state, gathered on rank 0
                adamw_shard_gather(&shard, &model, 0);
                if (rank == 0) run_save_checkpoint(&model, &state, a.out);
                adamw_shard_release(&model);
            } else if (rank == 0) {
                run_save_checkpoint(&model, &state, a.out);
            }
        }
        if (stop_sig) break;
    }
#ifdef USE_CUDA
    if (gpu) cuda_model_free(gpu);
#endif
    if (metrics) fclose(metrics);
    adamw_shard_free(&shard);
    if (stop_sig)
        printf("stopped by %s after step %d of %d, %.1f s; its checkpoint is in %s; continue with: %strain_mora %s --out %s --resume\n",
               stop_signal_name(stop_sig), state.step, a.steps, wall_seconds() - run_start, a.out, run_launch_prefix(), cmd, a.out);
    else
        printf("done: %d steps in %.1f s; checkpoint in %s\n", a.steps - first_step, wall_seconds() - run_start, a.out);
#undef NEXT_BATCH
    if (sft) {
        sft_loader_free(&sft_train);
        encoded_sft_free(&sft_train_seqs);
        if (a.val_data[0]) {
            sft_loader_free(&sft_val);
            encoded_sft_free(&sft_val_seqs);
        }
        text_encoder_free(&enc);
    } else {
        dataloader_free(&train);
        if (a.val_data[0]) dataloader_free(&val);
    }
    model_free(&model);
    return stop_sig ? stop_signal_exit_status(stop_sig) : 0;
}


// ----------------------------------------------------------------------------
// generate

// The tokenizer's bytes of a generated token. The model may have more ids than the tokenizer has
// tokens (an embedding padded past the vocabulary, as Qwen2's 151936 rows for 151665 tokens):
// that is fine until the model samples one of those ids, which no text stands for.
typedef struct {
    const Tokenizer *tok;
    const char *tok_name;       // "--tokenizer PATH" or "the tokenizer of --model PATH", for messages
    int model_vocab;
} TokenText;

static const unsigned char *token_text_bytes(const TokenText *t, int token, size_t *len) {
    int n = tokenizer_vocab_size(t->tok);
    if (token < 0 || token >= n)
        fatal("the model generated token id %d, which %s does not have (%d tokens; the model's vocabulary is %d): "
              "the tokenizer does not belong to this model", token, t->tok_name, n, t->model_vocab);
    return tokenizer_token_bytes(t->tok, token, len);
}

// The streamed answer. A stop token (end of sequence, <|im_end|>) is never printed, and text that
// could be the start of a stop string is held back until a later token shows it is not one; a
// stop string cuts the answer where it begins. What is printed is the answer without its stop.
typedef struct {
    TokenText tt;
    int stream;
    const int *stop_ids;
    int n_stop_ids;
    const char *const *stop_strings;
    int n_stop_strings;
    char *text;             // the generated text so far (stop tokens left out)
    size_t len, cap;
    size_t printed;         // bytes of text on stdout
    int stopped;            // a stop string was met: nothing more is printed
} StreamCtx;

static const unsigned char *stream_decode_token(void *ctx, int token, size_t *len) {
    const StreamCtx *s = (const StreamCtx *)ctx;
    return token_text_bytes(&s->tt, token, len);
}

static void stream_print(StreamCtx *s, size_t upto) {
    if (upto > s->printed) {
        fwrite(s->text + s->printed, 1, upto - s->printed, stdout);
        fflush(stdout);
        s->printed = upto;
    }
}

static void stream_on_token(void *ctx, int seq, int token) {
    StreamCtx *s = (StreamCtx *)ctx;
    size_t len;
    const unsigned char *bytes = token_text_bytes(&s->tt, token, &len);
    if (!s->stream || s->stopped) return;
    for (int k = 0; k < s->n_stop_ids; k++)
        if (token == s->stop_ids[k]) return;
    if (s->len + len + 1 > s->cap) {
        s->cap = (s->len + len + 1) * 2;
        s->text = (char *)reallocCheck(s->text, s->cap);
    }
    memcpy(s->text + s->len, bytes, len);
    s->len += len;
    // a stop string starts at or after `printed`: the bytes before were never the start of one
    size_t stop_at = s->len, hold = 0;
    for (int k = 0; k < s->n_stop_strings; k++) {
        const char *stop = s->stop_strings[k];
        size_t sl = strlen(stop);
        if (sl == 0) continue;
        for (size_t i = s->printed; i + sl <= s->len && i < stop_at; i++)
            if (!memcmp(s->text + i, stop, sl)) { stop_at = i; break; }
        // the longest end of the text that this stop string begins with
        for (size_t n = sl - 1 < s->len - s->printed ? sl - 1 : s->len - s->printed; n > hold; n--)
            if (!memcmp(s->text + s->len - n, stop, n)) { hold = n; break; }
    }
    if (stop_at < s->len) {
        stream_print(s, stop_at);
        s->stopped = 1;
    } else {
        stream_print(s, s->len - hold);
    }
}

// The end of generation without a stop string: the text held back was none.
static void stream_finish(StreamCtx *s) {
    if (s->stream && !s->stopped) stream_print(s, s->len);
    free(s->text);
}

// A token's bytes on one line of --logprobs: backslash, tab, newline, carriage return and the
// other control bytes escaped, and bytes that are not valid UTF-8 (a character that byte-level
// BPE split between tokens) as \xNN.
static void print_escaped_token(const unsigned char *b, size_t len) {
    for (size_t i = 0; i < len;) {
        unsigned char c = b[i];
        if (c == '\\') { fputs("\\\\", stdout); i++; continue; }
        if (c == '\n') { fputs("\\n", stdout); i++; continue; }
        if (c == '\t') { fputs("\\t", stdout); i++; continue; }
        if (c == '\r') { fputs("\\r", stdout); i++; continue; }
        if (c < 0x20 || c == 0x7f) { printf("\\x%02x", c); i++; continue; }
        if (c < 0x80) { putchar(c); i++; continue; }
        size_t n = 0;   // the length of the UTF-8 sequence that c starts
        if (c >= 0xc2 && c <= 0xdf) n = 2;
        else if (c >= 0xe0 && c <= 0xef) n = 3;
        else if (c >= 0xf0 && c <= 0xf4) n = 4;
        int valid = n > 0 && i + n <= len;
        for (size_t k = 1; valid && k < n; k++) valid = (b[i + k] & 0xc0) == 0x80;
        if (valid) { fwrite(b + i, 1, n, stdout); i += n; }
        else { printf("\\x%02x", c); i++; }
    }
}

static int cmd_generate(int argc, char **argv) {
    const char *model_path = "", *prompt = "", *system = "", *template_name = "", *tokenizer_path = "", *device = "cpu";
    int chat = 0, max_new_tokens = 128, top_k = 0, seed = 1337, show_logprobs = 0;
    float temperature = 0.7f, top_p = 1.0f;
    ArgSpec specs[] = {
        {"model", ARG_STRING, &model_path, "checkpoint: native, llm.c .bin, .safetensors / HF dir, .gguf"},
        {"prompt", ARG_STRING, &prompt, "the prompt text"},
        {"chat", ARG_BOOL, &chat, "format the prompt as a user turn with the chat template"},
        {"template", ARG_STRING, &template_name, "chat template (chatml, smollm2, llama3, plain); default: the checkpoint's"},
        {"system", ARG_STRING, &system, "system prompt for --chat (default: the template's)"},
        {"tokenizer", ARG_STRING, &tokenizer_path, "tokenizer (tokenizer.json, .gguf); default: the checkpoint's"},
        {"temperature", ARG_FLOAT, &temperature, "sampling temperature (0: greedy)"},
        {"top_k", ARG_INT, &top_k, "sample among the k most likely tokens (0: all)"},
        {"top_p", ARG_FLOAT, &top_p, "nucleus sampling mass (1: off)"},
        {"max_new_tokens", ARG_INT, &max_new_tokens, "tokens to generate at most"},
        {"seed", ARG_INT, &seed, "sampling seed"},
        {"logprobs", ARG_BOOL, &show_logprobs, "print every generated token with its log-probability"},
        {"device", ARG_STRING, &device, "cpu, cuda or auto (cuda: the GPU rollout engine, rollout.cu)"},
    };
    args_parse(argc, argv, 2, specs, (int)(sizeof specs / sizeof specs[0]), "generate",
               "Samples a continuation of --prompt (or a chat reply with --chat) and streams it to stdout.");
    args_require_string("model", model_path, "generate");
    if (prompt[0] == '\0') args_fatal("flag --prompt is empty: give the text to continue");
    args_require_positive_int("max_new_tokens", max_new_tokens);
    args_require_nonneg_int("top_k", top_k);
    args_require_range_float("temperature", temperature, 0.0f, 100.0f);
    args_require_range_float("top_p", top_p, 1e-6f, 1.0f);
    if (!chat && args_given("system"))
        args_fatal("flag --system applies only with --chat (it is the system turn of the chat template): add --chat or drop --system");
    if (!chat && args_given("template"))
        args_fatal("flag --template applies only with --chat (the prompt is otherwise continued as it is): add --chat or drop --template");
    const int use_gpu = device_resolve(device);
    // stdout carries the generated text alone (generate > out.txt)
    char device_desc[320];
    device_describe(use_gpu, device_desc, sizeof device_desc);
    fprintf(stderr, "device: %s\n", device_desc);

    Model model;
    CheckpointInfo info;
    checkpoint_load(&model, model_path, NULL, &info);
    const char *tok_path = tokenizer_path[0] ? tokenizer_path : info.tokenizer_path;
    if (tok_path[0] == '\0') fatal("%s has no tokenizer: pass --tokenizer PATH (tokenizer.json or .gguf)", model_path);
    Tokenizer *tok = tokenizer_load(tok_path);
    if (!tokenizer_can_encode(tok)) fatal("%s: this tokenizer can only decode (llm.c .bin); pass --tokenizer tokenizer.json", tok_path);
    char tok_name[8400];
    if (tokenizer_path[0]) snprintf(tok_name, sizeof tok_name, "--tokenizer %s", tokenizer_path);
    else snprintf(tok_name, sizeof tok_name, "the tokenizer %s of --model %s", tok_path, model_path);
    // a tokenizer with more tokens than the model has ids encodes text into ids the model has
    // no embedding for; one with fewer is checked on every generated token (token_text_bytes)
    if (tokenizer_vocab_size(tok) > model.config.vocab_size)
        fatal("%s has %d tokens, more than the vocabulary of %d of the model %s: it is not this model's tokenizer%s",
              tok_name, tokenizer_vocab_size(tok), model.config.vocab_size, model_path,
              tokenizer_path[0] ? "" : " (pass --tokenizer)");
    tokenizer_warn_if_small(tok, model.config.vocab_size, tok_name);

    const ChatTemplate *tmpl = NULL;
    char *text;
    if (chat) {
        const char *name = template_name[0] ? template_name : info.chat_template;
        if (name[0] == '\0') fatal("--chat: %s names no chat template; pass --template (%s)", model_path, chat_template_names());
        tmpl = chat_template_lookup(name);
        text = chat_template_render(tmpl, system[0] ? system : NULL, prompt, 1);
    } else {
        text = xstrdup(prompt);
    }
    int n_prompt;
    int *ids = tokenizer_encode(tok, text, strlen(text), &n_prompt);
    const int context = model.config.max_seq_len;
    if (n_prompt >= context)
        fatal("--prompt is %d tokens, which leaves no room for a new token in the model's context of %d tokens", n_prompt, context);
    // compared without the sum, which --max_new_tokens near INT_MAX would overflow
    if (max_new_tokens > context - n_prompt) {
        if (args_given("max_new_tokens"))
            fatal("--prompt is %d tokens; with --max_new_tokens %d it exceeds the model's context of %d tokens "
                  "(at most %d new tokens fit)", n_prompt, max_new_tokens, context, context - n_prompt);
        fprintf(stderr, "note: the default --max_new_tokens %d does not fit the model's context of %d tokens after the "
                "%d-token prompt: generating at most %d\n", max_new_tokens, context, n_prompt, context - n_prompt);
        max_new_tokens = context - n_prompt;
    }

    // stop at the end-of-sequence token and at the template's end-of-turn markers
    int stop_ids[8], n_stop_ids = 0;
    if (tokenizer_eos_id(tok) >= 0) stop_ids[n_stop_ids++] = tokenizer_eos_id(tok);
    const char *const *stops = tmpl ? chat_template_stop_strings(tmpl) : NULL;
    int n_stops = 0;
    for (; stops && stops[n_stops]; n_stops++) {
        int id = tokenizer_special_id(tok, stops[n_stops]);
        if (id >= 0 && n_stop_ids < 8) stop_ids[n_stop_ids++] = id;
    }
    StreamCtx sctx = {
        .tt = {tok, tok_name, model.config.vocab_size}, .stream = !show_logprobs,
        .stop_ids = stop_ids, .n_stop_ids = n_stop_ids, .stop_strings = stops, .n_stop_strings = n_stops,
    };
    GenerateParams gp = {
        .temperature = temperature, .top_k = top_k, .top_p = top_p, .max_new_tokens = max_new_tokens,
        .seed = (uint64_t)seed, .stop_ids = stop_ids, .n_stop_ids = n_stop_ids,
        .stop_strings = stops, .n_stop_strings = n_stops, .decode_token = stream_decode_token,
        .on_token = stream_on_token, .ctx = &sctx,
    };
    GenerateResult res;
    const int *prompts[1] = {ids};
    double t0 = wall_seconds();
#ifdef USE_CUDA
    if (use_gpu) generate_cuda(&model, prompts, &n_prompt, 1, &gp, &res);
    else
#endif
    generate(&model, prompts, &n_prompt, 1, &gp, &res);
    double dt = wall_seconds() - t0;
    stream_finish(&sctx);
    if (show_logprobs) {
        // one row a token: id, log-probability, the token's bytes escaped onto one line
        for (int i = 0; i < res.n_tokens[0]; i++) {
            size_t len;
            const unsigned char *b = token_text_bytes(&sctx.tt, res.tokens[0][i], &len);
            printf("%d\t%.6f\t", res.tokens[0][i], res.logprobs[0][i]);
            print_escaped_token(b, len);
            printf("\n");
        }
    } else {
        printf("\n");
    }
    fprintf(stderr, "[%d prompt tokens, %d generated (%s), %.1f tok/s]\n", n_prompt, res.n_tokens[0],
            finish_reason_names[res.finish[0]], res.n_tokens[0] / dt);
    generate_result_free(&res);
    free(ids);
    free(text);
    tokenizer_free(tok);
    model_free(&model);
    return 0;
}

// ----------------------------------------------------------------------------
// export: any checkpoint as a Hugging Face model directory

// OUT = DIR/NAME
static void join_path(char *out, size_t n, const char *dir, const char *name) {
    snprintf(out, n, "%s/%s", dir, name);
}

static int file_starts_with_gguf(const char *path) {
    FILE *f = fopen(path, "rb");
    if (f == NULL) return 0;
    char head[4] = {0};
    size_t got = fread(head, 1, 4, f);
    fclose(f);
    return got == 4 && memcmp(head, "GGUF", 4) == 0;
}

static int cmd_export(int argc, char **argv) {
    const char *model_path = "", *out = "", *tokenizer_path = "", *dtype = "float32";
    ArgSpec specs[] = {
        {"model", ARG_STRING, &model_path, "checkpoint: native (or its run directory), llm.c .bin, .safetensors / HF dir, .gguf"},
        {"dtype", ARG_STRING, &dtype, "the weights' type: float32, or bfloat16 (half the size; rounded to nearest even)"},
        {"out", ARG_STRING, &out, "the directory to write: model.safetensors, config.json, tokenizer.json, tokenizer_config.json"},
        {"tokenizer", ARG_STRING, &tokenizer_path, "tokenizer to write with it (tokenizer.json, .gguf); default: the checkpoint's"},
    };
    args_parse(argc, argv, 2, specs, (int)(sizeof specs / sizeof specs[0]), "export",
               "Writes a checkpoint as a Hugging Face model directory (safetensors, config.json) with its\n"
               "tokenizer (tokenizer.json, converted from a GGUF's) and chat template (tokenizer_config.json),\n"
               "for transformers and for train_mora itself.");
    args_require_string("model", model_path, "export");
    args_require_string("out", out, "export");
    int bf16 = !strcmp(dtype, "bfloat16") || !strcmp(dtype, "bf16");
    if (!bf16 && strcmp(dtype, "float32") && strcmp(dtype, "f32"))
        args_fatal("flag --dtype: expected float32 or bfloat16, got '%s'", dtype);
    const char *written[] = {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"};
    char path[4400];
    for (int i = 0; i < 4; i++) {
        join_path(path, sizeof path, out, written[i]);
        if (run_file_exists(path))
            fatal("--out %s holds %s already: export writes a new directory (remove it, or choose another --out)", out, written[i]);
    }

    Model model;
    CheckpointInfo info;
    checkpoint_load(&model, model_path, NULL, &info);
    const char *tok_path = tokenizer_path[0] ? tokenizer_path : info.tokenizer_path;
    Tokenizer *tok = NULL;
    if (tok_path[0]) {
        tok = tokenizer_load(tok_path);
        if (!tokenizer_can_encode(tok))
            fatal("%s is llm.c's tokenizer .bin, which can only decode: it cannot be written as tokenizer.json "
                  "(pass --tokenizer tokenizer.json or .gguf)", tok_path);
        if (tokenizer_vocab_size(tok) > model.config.vocab_size)
            fatal("%s has %d tokens, more than the vocabulary of %d of the model %s: it is not this model's tokenizer",
                  tok_path, tokenizer_vocab_size(tok), model.config.vocab_size, model_path);
        tokenizer_warn_if_small(tok, model.config.vocab_size, tok_path);
        char why[600];
        if (file_starts_with_gguf(tok_path) && !tokenizer_hf_check(tok, why, sizeof why)) fatal("%s", why);
    }
    run_ensure_dir(out, "--out");
    checkpoint_save_hf(&model, out, bf16);

    // the tokenizer: a tokenizer.json is copied with the tokenizer_config.json beside it; a GGUF's
    // tokenizer is converted, and its jinja chat template goes into tokenizer_config.json
    char tok_note[4400] = "none (generate on it needs --tokenizer)", tpl_note[256] = "none";
    cJSON *tok_config = NULL;
    if (tok) {
        join_path(path, sizeof path, out, "tokenizer.json");
        if (file_starts_with_gguf(tok_path)) {
            if (tokenizer_save_hf(tok, path) != 0) fatal("%s: its tokenizer cannot be written as tokenizer.json", tok_path);   // checked above
            snprintf(tok_note, sizeof tok_note, "converted from %s", tok_path);
            GGUFFile *g = gguf_open(tok_path);
            tok_config = cJSON_CreateObject();
            const char *jinja = gguf_get_str(g, "tokenizer.chat_template");
            if (jinja) cJSON_AddStringToObject(tok_config, "chat_template", jinja);
            gguf_close(g);
        } else {
            size_t len;
            char *text = read_file_all(tok_path, &len);
            run_write_text(path, text);
            free(text);
            snprintf(tok_note, sizeof tok_note, "copied from %s", tok_path);
            char beside[4400];
            snprintf(beside, sizeof beside, "%s", tok_path);
            char *slash = strrchr(beside, '/');
            if (slash) snprintf(slash + 1, sizeof beside - (size_t)(slash + 1 - beside), "tokenizer_config.json");
            else snprintf(beside, sizeof beside, "tokenizer_config.json");
            tok_config = run_file_exists(beside) ? run_read_json(beside) : cJSON_CreateObject();
        }
        // what transformers needs to build the tokenizer, where the source did not say it
        if (!cJSON_GetObjectItemCaseSensitive(tok_config, "tokenizer_class"))
            cJSON_AddStringToObject(tok_config, "tokenizer_class", "PreTrainedTokenizerFast");
        const char *special[2] = {"bos_token", "eos_token"};
        int ids[2] = {tokenizer_bos_id(tok), tokenizer_eos_id(tok)};
        for (int i = 0; i < 2; i++) {
            if (ids[i] < 0 || cJSON_GetObjectItemCaseSensitive(tok_config, special[i])) continue;
            size_t n;
            const unsigned char *b = tokenizer_token_bytes(tok, ids[i], &n);
            char *text = (char *)mallocCheck(n + 1);
            memcpy(text, b, n);
            text[n] = '\0';
            cJSON_AddStringToObject(tok_config, special[i], text);
            free(text);
        }
        if (!cJSON_GetObjectItemCaseSensitive(tok_config, "model_max_length"))
            cJSON_AddNumberToObject(tok_config, "model_max_length", model.config.max_seq_len);
        const cJSON *jinja = cJSON_GetObjectItemCaseSensitive(tok_config, "chat_template");
        const ChatTemplate *guess = cJSON_IsString(jinja) ? chat_template_guess(jinja->valuestring) : NULL;
        if (cJSON_IsString(jinja))
            snprintf(tpl_note, sizeof tpl_note, "%s", guess ? chat_template_name(guess) : "the source's (not one train_mora renders)");
        if (info.chat_template[0] && (!guess || strcmp(chat_template_name(guess), info.chat_template) != 0))
            fprintf(stderr, "warning: %s was trained with the chat template %s; the tokenizer's chat template written "
                    "with it is %s\n", model_path, info.chat_template, tpl_note);
        join_path(path, sizeof path, out, "tokenizer_config.json");
        run_write_json(path, tok_config);
        cJSON_Delete(tok_config);

        // config.json: the special ids transformers' generate stops at
        join_path(path, sizeof path, out, "config.json");
        cJSON *cfg = run_read_json(path);
        if (ids[0] >= 0) cJSON_AddNumberToObject(cfg, "bos_token_id", ids[0]);
        if (ids[1] >= 0) cJSON_AddNumberToObject(cfg, "eos_token_id", ids[1]);
        run_write_json(path, cfg);
        cJSON_Delete(cfg);
        tokenizer_free(tok);
    }
    printf("exported %s (%s, %.2fM parameters) to %s\n", model_path,
           model.config.arch == ARCH_GPT2 ? "gpt2" : model.config.qkv_bias ? "qwen2" : "llama",
           model.num_parameters / 1e6, out);
    printf("  model.safetensors (%s) and config.json\n  tokenizer: %s\n  chat template: %s\n", bf16 ? "bfloat16" : "float32",
           tok_note, tpl_note);
    model_free(&model);
    return 0;
}

// ----------------------------------------------------------------------------

static void usage(FILE *out) {
    fprintf(out,
        "train_mora: transformer training in C, aligned to several preferences at once (MORA).\n\n"
        "usage: train_mora <command> [flags]     (train_mora <command> --help for its flags)\n\n"
        "commands:\n"
        "  pretrain   language-model training on token shards (llm.c format)\n"
        "  sft        supervised fine-tuning on prompt/response JSONL, the loss on the responses\n"
        "  generate   sample or chat from a checkpoint\n"
        "  reward     train the helpful/harmless/truthful reward heads on preference JSONL\n"
        "  mora       MORA: presample, isolate, rewrite, update (GRPO or DPO); --mora 0 the baseline\n"
        "  eval       the comparison table of a MORA run against its baseline on held-out prompts\n"
        "  export     write a checkpoint as a Hugging Face model directory, with its tokenizer\n"
        "  demo       the built-in demo (also what `train_mora` with no arguments runs)\n\n"
        "environment (runs with --device cuda; each takes 0 or 1 unless shown otherwise, and an unknown value stops\n"
        "the run with a message):\n"
        "  TRAIN_MORA_NCCL=1              the data-parallel NCCL path with one rank (without MPI)\n"
        "  TRAIN_MORA_ATTENTION=simple    the simple attention kernels instead of the flash ones (=flash)\n"
        "  TRAIN_MORA_FLASH_TUNE=0        the flash attention's default launch configuration, untuned\n"
        "  TRAIN_MORA_FLASH_WGMMA=1       the tuning also tries the Hopper warpgroup (wgmma) attention kernels\n"
        "  TRAIN_MORA_MATMUL_TUNE=0       cuBLASLt's first-choice algorithms, untuned\n"
        "  TRAIN_MORA_OVERLAP_GRADS=0     the weight gradients' products on the main stream, not a second one\n"
        "  TRAIN_MORA_ROLLOUT=LIST        generation variants, a comma-separated list of any of decode_matmul, pdl,\n"
        "                                 pipeline, untuned, direct_loads, early_loads, staged_loads, fold_norms,\n"
        "                                 norm_kernels, branches=N, steps=N\n");
}

// Ranks: under mpirun/srun every rank runs main. comm_init registers MPI_Finalize for a normal
// exit and MPI_Abort for a non-zero one, so every return below ends the collectives properly
// and an error on one rank stops all of them. Only rank 0 prints to stdout; errors (stderr)
// come from whichever rank meets them.
int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    comm_init(&argc, &argv);
    if (comm_rank() != 0 && freopen("/dev/null", "w", stdout) == NULL)
        fatal("cannot silence stdout: %s", strerror(errno));
    if (argc < 2) {
        // the demo trains several models and writes their files one after the other: one process
        if (comm_world() > 1) args_fatal("train_mora with no arguments runs the demo, on one rank; launch it with a single process");
        return cmd_demo(argc, argv);
    }
    if (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") || !strcmp(argv[1], "help")) {
        usage(stdout);
        return 0;
    }
    const char *cmd = argv[1];
    // the commands that split their work over ranks; the others would only repeat it on every
    // rank and write the same files
    int asks_help = 0;   // --help prints and exits on every rank alike (rank 0's output alone shows)
    for (int i = 2; i < argc; i++) asks_help |= !strcmp(argv[i], "--help") || !strcmp(argv[i], "-h");
    if (comm_world() > 1 && !asks_help && strcmp(cmd, "pretrain") && strcmp(cmd, "sft") && strcmp(cmd, "mora") &&
        strcmp(cmd, "eval") && strcmp(cmd, "reward"))
        args_fatal("train_mora %s runs on one rank; under mpirun/srun only pretrain, sft, reward, mora and eval are data parallel (launch %s with a single process)", cmd, cmd);
    if (!strcmp(cmd, "pretrain")) return cmd_train(argc, argv, 0);
    if (!strcmp(cmd, "sft")) return cmd_train(argc, argv, 1);
    if (!strcmp(cmd, "generate")) return cmd_generate(argc, argv);
    if (!strcmp(cmd, "reward")) return cmd_reward(argc, argv);
    if (!strcmp(cmd, "mora")) return cmd_mora(argc, argv);
    if (!strcmp(cmd, "eval")) return cmd_eval(argc, argv);
    if (!strcmp(cmd, "demo")) return cmd_demo(argc, argv);
    if (!strcmp(cmd, "export")) return cmd_export(argc, argv);
    fprintf(stderr, "error: unknown command '%s'\n\n", cmd);
    usage(stderr);
    return 1;
}
