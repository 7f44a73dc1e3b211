/*
 * `train_mora reward`: trains the three reward heads (llmc/reward_heads.h) with the
 * Bradley-Terry loss on preference JSONL (llmc/prefdata.h).
 *
 *   ./train_mora reward --model PATH|PRESET --data FILE.jsonl[,FILE2.jsonl...] --out DIR
 *
 * The trunk is the frozen reference model: its weights never change here, so the final hidden
 * state at the last token of every prompt + response is computed once, in right-padded batches
 * of similar length, and cached (2 rows per pair: chosen, rejected). Training then touches only
 * the heads: each pair trains the head of its own dimension, minibatches of pairs, AdamW.
 * --device cuda runs those forwards on a CUDA copy of the trunk (bf16 weights and activations,
 * the residual stream in fp32), which is where a large preference set's time goes; the heads
 * train on the CPU either way. Under mpirun or srun the ranks share the forwards (a GPU each
 * under --device cuda) and gather the hidden states; rank 0 trains the heads and writes the
 * files, which are those of one rank.
 * A held-out split (--val_frac of every dimension's pairs, chosen by --seed, but never all of
 * them: a dimension keeps at least one training pair) measures accuracy (the share of pairs
 * with r_chosen > r_rejected) per dimension after every epoch. A dimension without any pair
 * keeps a zero head, which scores every response 0, with a warning; reward_metrics.json lists it
 * under "untrained". A loss that stops being finite (the heads diverged) stops the run.
 *
 * Calibration (--calibrate 1, the default). Bradley-Terry sees only differences of rewards, so it
 * fixes a head up to a shift, and its scale is arbitrary: a raw reward of -0.7 says nothing on
 * its own, and a ratio of two mean rewards (eval's improvement in %) means nothing when a head
 * happens to centre near 0. After training, each head d gets the affine map r -> scale * r + shift
 * folded into its last layer (reward_heads_affine) that sends the mean reward of the rejected
 * responses of dimension d's held-out pairs to 0 and that of the chosen responses to 1 (the
 * training pairs of d when none of d's pairs is held out). A calibrated reward reads on that
 * scale: 0 is a typical rejected response, 1 a typical chosen one. scale = 1 / (chosen mean -
 * rejected mean) is positive, and a positive affine map changes no ranking: accuracy, the order
 * of every pair, and MORA's per-dimension standardised rewards z = (r - mean) / std are the same
 * with or without it. A dimension whose chosen mean is not above its rejected mean (the map would
 * reverse its order), whose means are equal at float precision, or that has no pairs, keeps its
 * head as trained and gets a warning naming it.
 *
 * Writes to DIR, each file atomically:
 *   reward_heads.bin      the heads (format in reward_heads.h)
 *   metrics.jsonl         one line per epoch: losses and accuracy per dimension
 *   reward_metrics.json   the final figures, the data counts, the configuration, and per
 *                         dimension the calibration map (scale, shift) with the means before it;
 *                         the losses are the trained heads' before calibration (the Bradley-Terry
 *                         loss depends on the scale), the accuracies hold for both
 *   model.ckpt            the trunk, when it came from a preset (random init), so that later
 *                         subcommands can load the very trunk the heads were trained on
 * and the last line printed names each of them.
 */
#include <math.h>
#include <cjson/cJSON.h>

#include "llmc/utils.h"
#include "llmc/args.h"
#include "llmc/rand.h"
#include "llmc/model.h"
#include "llmc/checkpoint.h"
#include "llmc/model_load.h"
#include "llmc/run_dir.h"
#include "llmc/reward_heads.h"
#include "llmc/prefdata.h"
#include "llmc/device.h"
#include "llmc/comm.h"
#ifdef USE_CUDA
#include "llmc/model_cuda.h"
#endif

typedef struct {
    const char *model, *data, *out, *head, *head_act, *chat_template, *device;
    int head_hidden, epochs, batch_size, seq_len, fwd_batch, seed, skip_bad, calibrate;
    float val_frac, lr, weight_decay, beta1, beta2, eps;
} RewardArgs;

// hidden_cache (n_seqs, C): the trunk's final hidden state at the last token of every sequence.
// Sequences are taken in order of length so that a batch pads little; each batch is
// right-padded with token 0 and read at every row's own last position. The forwards run on gpu,
// the trunk's CUDA copy, when it is not NULL (a CUDA build under --device cuda), else on model.
// Under several ranks, batch k (of fwd_batch sequences in that order) runs on rank k mod W, which
// spreads the long batches over the ranks, and the states are then gathered on rank 0 (which
// alone trains the heads; the other ranks' caches hold their own batches only): each batch holds
// the sequences it holds on one rank, so rank 0's cache is one rank's, bit for bit.
static float *compute_hidden_cache(Model *model, void *gpu, const TokenSeqs *seqs, int fwd_batch) {
    int n = seqs->n, C = model->config.n_embd;
    const int rank = comm_rank(), world = comm_world();
    float *cache = (float *)mallocCheck((size_t)n * C * sizeof(float));
    int *order = (int *)mallocCheck((size_t)n * sizeof(int));
    for (int i = 0; i < n; i++) order[i] = i;
    // stable counting sort by length
    int max_len = 0;
    for (int i = 0; i < n; i++) if (seqs->lengths[i] > max_len) max_len = seqs->lengths[i];
    int *count = (int *)callocCheck((size_t)max_len + 2, sizeof(int));
    for (int i = 0; i < n; i++) count[seqs->lengths[i] + 1]++;
    for (int l = 1; l <= max_len + 1; l++) count[l] += count[l - 1];
    for (int i = 0; i < n; i++) order[count[seqs->lengths[i]]++] = i;
    free(count);

    const int n_batches = (n + fwd_batch - 1) / fwd_batch;
    int mine = 0;   // this rank's sequences
    for (int k = rank; k < n_batches; k += world) mine += n - k * fwd_batch < fwd_batch ? n - k * fwd_batch : fwd_batch;
    int *inputs = (int *)mallocCheck((size_t)fwd_batch * (max_len ? max_len : 1) * sizeof(int));
    int *lengths = (int *)mallocCheck((size_t)fwd_batch * sizeof(int));
    float *last = (float *)mallocCheck((size_t)fwd_batch * C * sizeof(float));
    double start = wall_seconds(), last_report = start;
    int done = 0;
    for (int k = rank; k < n_batches; k += world) {
        int first = k * fwd_batch;
        int B = n - first < fwd_batch ? n - first : fwd_batch;
        int T = seqs->lengths[order[first + B - 1]];  // the longest of the batch (sorted)
        for (int b = 0; b < B; b++) {
            int s = order[first + b];
            lengths[b] = seqs->lengths[s];
            memcpy(inputs + (size_t)b * T, token_seqs_get(seqs, s), (size_t)lengths[b] * sizeof(int));
            for (int t = lengths[b]; t < T; t++) inputs[(size_t)b * T + t] = 0;
        }
#ifdef USE_CUDA
        if (gpu) {
            cuda_model_forward((CudaModel *)gpu, inputs, NULL, NULL, B, T);
            cuda_model_copy_hidden_last((CudaModel *)gpu, lengths, last);
        } else
#endif
        {
            (void)gpu;
            model_forward(model, inputs, NULL, NULL, B, T);
            reward_gather_last(last, model->hidden, lengths, B, T, C);
        }
        for (int b = 0; b < B; b++) memcpy(cache + (size_t)order[first + b] * C, last + (size_t)b * C, (size_t)C * sizeof(float));
        done += B;
        double now = wall_seconds();
        if (now - last_report > 10.0) {
            if (world > 1) printf("hidden states: %d / %d sequences of rank 0's share of %d (%.0f seq/s a rank)\n", done, mine, n,
                                  done / (now - start));
            else printf("hidden states: %d / %d sequences (%.0f seq/s)\n", done, n, done / (now - start));
            last_report = now;
        }
    }
    if (world > 1) {
        // every rank's states in the order of its batches, then each rank's put in place
        float *send = (float *)mallocCheck((size_t)(mine ? mine : 1) * C * sizeof(float));
        float *p = send;
        for (int k = rank; k < n_batches; k += world)
            for (int i = k * fwd_batch; i < n && i < (k + 1) * fwd_batch; i++, p += C)
                memcpy(p, cache + (size_t)order[i] * C, (size_t)C * sizeof(float));
        size_t total = 0;
        float *all = (float *)comm_gather_bytes(send, (size_t)mine * C * sizeof(float), 0, NULL, &total);
        if (rank == 0) {
            if (total != (size_t)n * C * sizeof(float))
                fatal("reward: the ranks' hidden states came to %zu bytes, not the %zu of %d sequences", total,
                      (size_t)n * C * sizeof(float), n);
            p = all;
            for (int r = 0; r < world; r++)
                for (int k = r; k < n_batches; k += world)
                    for (int i = k * fwd_batch; i < n && i < (k + 1) * fwd_batch; i++, p += C)
                        memcpy(cache + (size_t)order[i] * C, p, (size_t)C * sizeof(float));
        }
        free(all);
        free(send);
    }
    free(inputs);
    free(lengths);
    free(last);
    free(order);
    return cache;
}

typedef struct {
    double loss;                       // mean Bradley-Terry loss over the pairs
    int n[MORA_NUM_DIMS];              // pairs per dimension
    int correct[MORA_NUM_DIMS];        // pairs with r_chosen > r_rejected
    double loss_sum[MORA_NUM_DIMS];
} SplitEval;

// Loss and accuracy over the pairs idx (n_idx) given every sequence's rewards (n_seqs, D).
static SplitEval evaluate_split(const float *rewards, const int *dims, const int *idx, int n_idx) {
    SplitEval e;
    memset(&e, 0, sizeof e);
    double total = 0.0;
    for (int k = 0; k < n_idx; k++) {
        int i = idx[k], d = dims[i];
        double rc = rewards[(size_t)(2 * i) * MORA_NUM_DIMS + d];
        double rr = rewards[(size_t)(2 * i + 1) * MORA_NUM_DIMS + d];
        double loss = bradley_terry_loss(&rc, &rr, 1, NULL, NULL);
        total += loss;
        e.loss_sum[d] += loss;
        e.n[d]++;
        e.correct[d] += rc > rr;
    }
    e.loss = n_idx ? total / n_idx : 0.0;
    return e;
}

// {"helpful": acc or null, ...}
static cJSON *accuracy_json(const SplitEval *e) {
    cJSON *o = cJSON_CreateObject();
    for (int d = 0; d < MORA_NUM_DIMS; d++) {
        if (e->n[d] > 0) cJSON_AddNumberToObject(o, mora_dim_names[d], (double)e->correct[d] / e->n[d]);
        else cJSON_AddNullToObject(o, mora_dim_names[d]);
    }
    return o;
}

static cJSON *counts_json(const int *n) {
    cJSON *o = cJSON_CreateObject();
    for (int d = 0; d < MORA_NUM_DIMS; d++) cJSON_AddNumberToObject(o, mora_dim_names[d], n[d]);
    return o;
}

static void print_accuracy(const char *label, const SplitEval *e) {
    printf(" | %s acc", label);
    for (int d = 0; d < MORA_NUM_DIMS; d++) {
        if (e->n[d] > 0) printf(" %s %.3f", mora_dim_names[d], (double)e->correct[d] / e->n[d]);
        else printf(" %s -", mora_dim_names[d]);
    }
}

// The calibration of one head (see the top of this file).
typedef struct {
    const char *split;                  // "val" or "train": the pairs the means are taken over; NULL: none
    int pairs;                          // pairs of the dimension in that split
    double chosen_mean, rejected_mean;  // mean reward of the chosen / rejected responses, before the map
    int applied;                        // 1 when the map was folded into the head
    double scale, shift;                // the map r -> scale * r + shift (1, 0 when not applied)
} HeadCalibration;

// Calibrates every head: with the mean rewards m_c (chosen) and m_r (rejected) of dimension d's
// held-out pairs (its training pairs when it has no held-out pair), folds r -> (r - m_r) / (m_c - m_r)
// into head d, which sends m_r to 0 and m_c to 1. The means are computed in double from the cached
// hidden states (n_pairs pairs: rows 2i chosen, 2i+1 rejected). Fills cal[d]; prints the map, or a
// warning naming the dimension when the head is left as trained (a dimension without pairs gets
// none here: its untrained head was named when training began).
static void calibrate_heads(RewardHeads *heads, const float *hidden, const int *dims, const int *val_idx, int n_val,
                            const int *train_idx, int n_train, HeadCalibration *cal) {
    int C = heads->C;
    for (int d = 0; d < MORA_NUM_DIMS; d++) {
        HeadCalibration *c = &cal[d];
        memset(c, 0, sizeof *c);
        c->scale = 1.0;
        int n_d_val = 0;
        for (int k = 0; k < n_val; k++) n_d_val += dims[val_idx[k]] == d;
        const int *idx = n_d_val > 0 ? val_idx : train_idx;
        int n_idx = n_d_val > 0 ? n_val : n_train;
        double sum_chosen = 0.0, sum_rejected = 0.0;
        for (int k = 0; k < n_idx; k++) {
            int i = idx[k];
            if (dims[i] != d) continue;
            sum_chosen += reward_head_value(heads, d, hidden + (size_t)(2 * i) * C);
            sum_rejected += reward_head_value(heads, d, hidden + (size_t)(2 * i + 1) * C);
            c->pairs++;
        }
        if (c->pairs == 0) continue;   // no pairs at all: its zero head was named in a warning already
        c->split = n_d_val > 0 ? "val" : "train";
        c->chosen_mean = sum_chosen / c->pairs;
        c->rejected_mean = sum_rejected / c->pairs;
        double gap = c->chosen_mean - c->rejected_mean;
        if (!(gap > 0.0)) {
            fprintf(stderr, "warning: --calibrate: dimension %s: mean reward of the chosen responses %.6g <= that of the "
                    "rejected ones %.6g on %d %s pairs (no increasing map sends them to 1 and 0); its head is left uncalibrated\n",
                    mora_dim_names[d], c->chosen_mean, c->rejected_mean, c->pairs, c->split);
            continue;
        }
        // the heads hold float parameters: a gap below float resolution of the means is rounding, not a signal
        if (gap <= 1e-6 * fmax(fabs(c->chosen_mean), fabs(c->rejected_mean))) {
            fprintf(stderr, "warning: --calibrate: dimension %s: mean rewards of the chosen (%.9g) and rejected (%.9g) "
                    "responses are equal at float precision; its head is left uncalibrated\n",
                    mora_dim_names[d], c->chosen_mean, c->rejected_mean);
            continue;
        }
        c->scale = 1.0 / gap;
        c->shift = -c->rejected_mean / gap;
        reward_heads_affine(heads, d, c->scale, c->shift);
        c->applied = 1;
        printf("calibration %-8s scale %.6g shift %.6g (r -> scale * r + shift; %d %s pairs: chosen mean %.6g -> 1, rejected mean %.6g -> 0)\n",
               mora_dim_names[d], c->scale, c->shift, c->pairs, c->split, c->chosen_mean, c->rejected_mean);
    }
}

// {"helpful": {"applied", "split", "pairs", "scale", "shift", "chosen_mean_before", "rejected_mean_before"}, ...};
// split and the means are null for a dimension without pairs.
static cJSON *calibration_json(const HeadCalibration *cal) {
    cJSON *o = cJSON_CreateObject();
    for (int d = 0; d < MORA_NUM_DIMS; d++) {
        const HeadCalibration *c = &cal[d];
        cJSON *e = cJSON_CreateObject();
        cJSON_AddBoolToObject(e, "applied", c->applied);
        if (c->split) cJSON_AddStringToObject(e, "split", c->split);
        else cJSON_AddNullToObject(e, "split");
        cJSON_AddNumberToObject(e, "pairs", c->pairs);
        cJSON_AddNumberToObject(e, "scale", c->scale);
        cJSON_AddNumberToObject(e, "shift", c->shift);
        if (c->split) {
            cJSON_AddNumberToObject(e, "chosen_mean_before", c->chosen_mean);
            cJSON_AddNumberToObject(e, "rejected_mean_before", c->rejected_mean);
        } else {
            cJSON_AddNullToObject(e, "chosen_mean_before");
            cJSON_AddNullToObject(e, "rejected_mean_before");
        }
        cJSON_AddItemToObject(o, mora_dim_names[d], e);
    }
    return o;
}

// Fisher-Yates shuffle of a[0..n) with the run's RNG.
static void shuffle_ints(int *a, int n, uint64_t *rng) {
    for (int i = n - 1; i > 0; i--) {
        int j = (int)(random_u32(rng) % (uint32_t)(i + 1));
        int t = a[i]; a[i] = a[j]; a[j] = t;
    }
}

int cmd_reward(int argc, char **argv) {
    RewardArgs a = {
        .model = "", .data = "", .out = "", .head = "linear", .head_act = "gelu", .chat_template = "auto",
        .device = "cpu", .head_hidden = 256, .epochs = 20, .batch_size = 32, .seq_len = 0, .fwd_batch = 16,
        .seed = 1337, .skip_bad = 0, .calibrate = 1, .val_frac = 0.1f, .lr = 1e-3f, .weight_decay = 0.0f, .beta1 = 0.9f,
        .beta2 = 0.999f, .eps = 1e-8f,
    };
    ArgSpec specs[] = {
        {"model", ARG_STRING, &a.model, "trunk: checkpoint (native, llm.c .bin, HF dir/safetensors, GGUF) or preset (llama:tiny, gpt2:tiny, ...)"},
        {"data", ARG_STRING, &a.data, "preference JSONL, comma-separated files: {prompt, chosen, rejected, dim}"},
        {"out", ARG_STRING, &a.out, "run directory: reward_heads.bin, metrics.jsonl, reward_metrics.json"},
        {"head", ARG_STRING, &a.head, "head kind: linear (vector + bias) or mlp (C -> H -> 1)"},
        {"head_hidden", ARG_INT, &a.head_hidden, "H: hidden width of the mlp head"},
        {"head_act", ARG_STRING, &a.head_act, "activation of the mlp head: gelu or relu"},
        {"val_frac", ARG_FLOAT, &a.val_frac, "share of every dimension's pairs held out for validation (all but one at most)"},
        {"epochs", ARG_INT, &a.epochs, "passes over the training pairs"},
        {"batch_size", ARG_INT, &a.batch_size, "pairs per AdamW step"},
        {"lr", ARG_FLOAT, &a.lr, "AdamW learning rate (constant)"},
        {"weight_decay", ARG_FLOAT, &a.weight_decay, "AdamW decoupled weight decay on head weights (not biases)"},
        {"beta1", ARG_FLOAT, &a.beta1, "AdamW beta1"},
        {"beta2", ARG_FLOAT, &a.beta2, "AdamW beta2"},
        {"eps", ARG_FLOAT, &a.eps, "AdamW epsilon, in (0, 1]: keeps the update finite where a gradient's second moment is 0"},
        {"seq_len", ARG_INT, &a.seq_len, "context in tokens (0: the model's max_seq_len); longer prompts are cut on the left"},
        {"fwd_batch", ARG_INT, &a.fwd_batch, "sequences per trunk forward pass when caching hidden states"},
        {"chat_template", ARG_STRING, &a.chat_template, "auto (the checkpoint's, if any), none, or a template name"},
        {"calibrate", ARG_BOOL, &a.calibrate, "after training, map each head's rewards so that its dimension's held-out rejected mean is 0 and chosen mean 1"},
        {"skip_bad", ARG_BOOL, &a.skip_bad, "skip bad data lines (and count them) instead of stopping"},
        {"seed", ARG_INT, &a.seed, "seed of the split, the shuffles, the head init and a preset trunk's init"},
        {"device", ARG_STRING, &a.device, "cpu, cuda or auto (cuda: the trunk's forwards for the hidden states on a CUDA model, one GPU per rank under mpirun; the heads train on the CPU)"},
    };
    args_parse(argc, argv, 2, specs, (int)(sizeof specs / sizeof specs[0]), "reward",
               "Trains the helpful / harmless / truthful reward heads on the frozen trunk with the\n"
               "Bradley-Terry loss -log sigmoid(r_chosen - r_rejected) on preference JSONL, then\n"
               "calibrates each head (--calibrate 1): held-out rejected mean 0, chosen mean 1.");
    args_require_string("model", a.model, "reward");
    args_require_string("data", a.data, "reward");
    args_require_string("out", a.out, "reward");
    int kind = reward_head_kind_from_name(a.head);
    if (kind < 0) args_fatal("flag --head: expected linear or mlp, got '%s'", a.head);
    int act = reward_head_activation_from_name(a.head_act);
    if (act < 0) args_fatal("flag --head_act: expected gelu or relu, got '%s'", a.head_act);
    if (kind == REWARD_HEAD_MLP) args_require_positive_int("head_hidden", a.head_hidden);
    args_require_range_float("val_frac", a.val_frac, 0.0f, 0.9f);
    args_require_positive_int("epochs", a.epochs);
    args_require_positive_int("batch_size", a.batch_size);
    args_require_positive_int("fwd_batch", a.fwd_batch);
    args_require_nonneg_int("seq_len", a.seq_len);
    args_require_range_float("lr", a.lr, 0.0f, 10.0f);
    args_require_range_float("weight_decay", a.weight_decay, 0.0f, 10.0f);
    args_require_range_float("beta1", a.beta1, 0.0f, 0.999999f);
    args_require_range_float("beta2", a.beta2, 0.0f, 0.999999f);
    // the update is m / (sqrt(v) + eps): with eps 0 a parameter whose gradient is 0 gets 0 / 0
    if (!(a.eps > 0.0f && a.eps <= 1.0f)) args_fatal("flag --eps must be in (0, 1], got %g (AdamW's epsilon)", a.eps);
    const int use_gpu = device_resolve(a.device);
    // under mpirun/srun the ranks share the trunk's forwards (one GPU per rank under --device
    // cuda); rank 0 then trains the heads and writes the files
    device_select_rank_gpu(use_gpu);
    comm_report_placement();
    double run_start = wall_seconds();

    // the data first: a bad line should stop the run before a large model is loaded
    const int bad_lines = a.skip_bad ? PREFDATA_SKIP : PREFDATA_STOP_HINT;
    PrefData data = {0};
    prefdata_load_list(&data, a.data, bad_lines);
    // every rank read the files through its own paths: the same pairs?
    char what[4200];
    snprintf(what, sizeof what, "--data %s", a.data);
    run_require_same_on_ranks(prefdata_fingerprint(&data), what);
    printf("data: %d preference pairs from %d file(s)", data.n, data.n_paths);
    if (a.skip_bad) printf(", %d bad line(s) skipped", data.skipped);
    printf("\n");
    // rank 0 writes the files: an --out it cannot use stops the run before the trunk's forwards
    if (comm_rank() == 0) run_ensure_dir(a.out, "--out");

    Model model;
    CheckpointInfo info;
    // the trunk: a preset (random init from --seed) or a checkpoint
    int from_preset = model_load(&model, a.model, "--model", 1, (uint64_t)a.seed, NULL, &info);
    snprintf(what, sizeof what, "--model %s", a.model);
    if (comm_world() > 1) run_require_same_on_ranks(params_fingerprint(model.params, model.num_parameters), what);
    const ModelConfig *mc = &model.config;
    int max_len = a.seq_len > 0 ? a.seq_len : mc->max_seq_len;
    if (max_len > mc->max_seq_len) args_fatal("flag --seq_len %d exceeds the model's context of %d", max_len, mc->max_seq_len);
    char where[320];
    device_describe(use_gpu, where, sizeof where);
    printf("trunk: %s (%s) L=%d C=%d V=%d maxT=%d, frozen; context %d tokens; device %s\n", a.model,
           mc->arch == ARCH_GPT2 ? "gpt2" : "llama", mc->n_layer, mc->n_embd, mc->vocab_size, mc->max_seq_len, max_len,
           where);

    TextEncoder enc;
    text_encoder_init(&enc, info.tokenizer_path, a.chat_template, info.chat_template, mc->vocab_size);
    printf("text: %s, chat template %s\n", enc.tokenizer ? info.tokenizer_path : "raw bytes as token ids",
           enc.chat ? chat_template_name(enc.chat) : "none");

    EncodedPrefs enc_pairs;
    prefdata_encode(&data, &enc, max_len, bad_lines, &enc_pairs);
    int n_pairs = enc_pairs.n_pairs;
    if (n_pairs == 0) fatal("--data %s: no pair fits the context of %d tokens", a.data, max_len);
    printf("tokens: %d pairs, %zu tokens; %d prompt(s) truncated on the left to fit %d tokens; %d pair(s) skipped (response too long)\n",
           n_pairs, enc_pairs.seqs.n_tokens, enc_pairs.truncated, max_len, enc_pairs.skipped);

    // held-out split, per dimension so every dimension is measured: the pairs of dimension d are
    // shuffled with the seed and the first round(val_frac * n_d) held out, at most n_d - 1 so that
    // every head with pairs trains on one at least (one held out entirely would stay untrained)
    uint64_t rng = rng_seed((uint64_t)a.seed ^ 0x5245574152440000ULL);
    int *train_idx = (int *)mallocCheck((size_t)n_pairs * sizeof(int));
    int *val_idx = (int *)mallocCheck((size_t)n_pairs * sizeof(int));
    int n_train = 0, n_val = 0;
    int pairs_per_dim[MORA_NUM_DIMS], capped[MORA_NUM_DIMS];
    int *by_dim = (int *)mallocCheck((size_t)n_pairs * sizeof(int));
    for (int d = 0; d < MORA_NUM_DIMS; d++) {
        int n_d = 0;
        for (int i = 0; i < n_pairs; i++) if (enc_pairs.dims[i] == d) by_dim[n_d++] = i;
        shuffle_ints(by_dim, n_d, &rng);
        int v = (int)floor(a.val_frac * n_d + 0.5);
        capped[d] = n_d > 0 && v > n_d - 1;
        if (capped[d]) v = n_d - 1;
        pairs_per_dim[d] = n_d;
        for (int k = 0; k < n_d; k++) {
            if (k < v) val_idx[n_val++] = by_dim[k];
            else train_idx[n_train++] = by_dim[k];
        }
    }
    free(by_dim);

    // The trunk is frozen, so its hidden states do not change during training: compute them once
    // (under --device cuda on the trunk's CUDA copy for forwards alone, without the head, sized
    // for the longest sequence, its residual stream in fp32; the hidden states themselves come
    // out of it in bf16).
    double t0 = wall_seconds();
    void *gpu = NULL;
#ifdef USE_CUDA
    if (use_gpu) {
        int longest = 1;
        for (int i = 0; i < enc_pairs.seqs.n; i++)
            if (enc_pairs.seqs.lengths[i] > longest) longest = enc_pairs.seqs.lengths[i];
        device_memory_hint_set("--fwd_batch (B); T is the longest preference sequence, at most --seq_len");
        gpu = cuda_model_create_inference(&model, a.fwd_batch, longest, 0);
    }
#endif
    float *hidden = compute_hidden_cache(&model, gpu, &enc_pairs.seqs, a.fwd_batch);
#ifdef USE_CUDA
    cuda_model_free((CudaModel *)gpu);
#endif
    int C = mc->n_embd;
    if (comm_world() > 1)
        printf("hidden states: %d sequences through the frozen trunk in %.1f s (cached, on %d ranks, %s)\n", enc_pairs.seqs.n,
               wall_seconds() - t0, comm_world(), use_gpu ? "a GPU each" : "on their CPUs");
    else
        printf("hidden states: %d sequences through the frozen trunk in %.1f s (cached, %s)\n", enc_pairs.seqs.n,
               wall_seconds() - t0, use_gpu ? "on the GPU" : "on the CPU");
    if (comm_rank() != 0) {
        // the heads' training is small next to the forwards: rank 0 alone trains them and writes
        free(hidden);
        free(train_idx); free(val_idx);
        encoded_prefs_free(&enc_pairs);
        text_encoder_free(&enc);
        model_free(&model);
        prefdata_free(&data);
        return 0;
    }

    RewardHeads heads;
    reward_heads_init(&heads, (RewardHeadKind)kind, (RewardHeadActivation)act, C, a.head_hidden);
    reward_heads_init_random(&heads, (uint64_t)a.seed);
    for (int d = 0; d < MORA_NUM_DIMS; d++) {
        if (capped[d])
            printf("%s: --val_frac %g would hold out all %d of its pair(s); %d held out, the rest train\n",
                   mora_dim_names[d], a.val_frac, pairs_per_dim[d], pairs_per_dim[d] - 1);
        if (pairs_per_dim[d] > 0) continue;
        // no pair ever moves this head: zero (a linear head starts so, an mlp one at random), so
        // that it says nothing rather than something random
        memset(reward_head_params(&heads, d), 0, heads.head_size * sizeof(float));
        fprintf(stderr, "warning: no %s pairs: the %s head stays untrained (zero) and scores every response 0\n",
                mora_dim_names[d], mora_dim_names[d]);
    }
    printf("heads: %s", reward_head_kind_name(heads.kind));
    if (heads.kind == REWARD_HEAD_MLP) printf(" (C=%d -> H=%d -> 1, %s)", C, heads.H, reward_head_activation_name(heads.activation));
    printf(", %zu parameters per head; %d train / %d val pairs\n", heads.head_size, n_train, n_val);

    char metrics_path[4200], heads_path[4200], summary_path[4200], trunk_path[4200];
    snprintf(metrics_path, sizeof metrics_path, "%s/metrics.jsonl", a.out);
    snprintf(heads_path, sizeof heads_path, "%s/reward_heads.bin", a.out);
    snprintf(summary_path, sizeof summary_path, "%s/reward_metrics.json", a.out);
    snprintf(trunk_path, sizeof trunk_path, "%s/model.ckpt", a.out);

    int M = a.batch_size;
    float *batch_hidden = (float *)mallocCheck((size_t)2 * M * C * sizeof(float));
    int *batch_dims = (int *)mallocCheck((size_t)2 * M * sizeof(int));
    float *batch_drewards = (float *)mallocCheck((size_t)2 * M * sizeof(float));
    double *rc = (double *)mallocCheck((size_t)M * sizeof(double)), *rr = (double *)mallocCheck((size_t)M * sizeof(double));
    double *dc = (double *)mallocCheck((size_t)M * sizeof(double)), *dr = (double *)mallocCheck((size_t)M * sizeof(double));
    float *rewards = (float *)mallocCheck((size_t)enc_pairs.seqs.n * MORA_NUM_DIMS * sizeof(float));
    char *metrics_text = (char *)mallocCheck(1);
    metrics_text[0] = '\0';
    size_t metrics_len = 0;
    SplitEval train_eval = {0}, val_eval = {0};
    int steps = 0;

    for (int epoch = 1; epoch <= a.epochs; epoch++) {
        double epoch_start = wall_seconds();
        shuffle_ints(train_idx, n_train, &rng);
        for (int first = 0; first < n_train; first += M) {
            int m = n_train - first < M ? n_train - first : M;
            // rows 2k and 2k+1 of the minibatch: pair k's chosen and rejected hidden states
            for (int k = 0; k < m; k++) {
                int i = train_idx[first + k], d = enc_pairs.dims[i];
                memcpy(batch_hidden + (size_t)(2 * k) * C, hidden + (size_t)(2 * i) * C, (size_t)C * sizeof(float));
                memcpy(batch_hidden + (size_t)(2 * k + 1) * C, hidden + (size_t)(2 * i + 1) * C, (size_t)C * sizeof(float));
                batch_dims[2 * k] = batch_dims[2 * k + 1] = d;
                rc[k] = reward_head_value(&heads, d, batch_hidden + (size_t)(2 * k) * C);
                rr[k] = reward_head_value(&heads, d, batch_hidden + (size_t)(2 * k + 1) * C);
            }
            bradley_terry_loss(rc, rr, m, dc, dr);
            for (int k = 0; k < m; k++) {
                batch_drewards[2 * k] = (float)dc[k];
                batch_drewards[2 * k + 1] = (float)dr[k];
            }
            reward_heads_zero_grad(&heads);
            reward_heads_backward(&heads, batch_hidden, batch_dims, batch_drewards, 2 * m, NULL);
            reward_heads_adamw_update(&heads, a.lr, a.beta1, a.beta2, a.eps, a.weight_decay);
            steps++;
        }
        reward_heads_forward(&heads, hidden, enc_pairs.seqs.n, rewards);
        train_eval = evaluate_split(rewards, enc_pairs.dims, train_idx, n_train);
        val_eval = evaluate_split(rewards, enc_pairs.dims, val_idx, n_val);

        printf("epoch %3d/%d | step %6d | train loss %.4f", epoch, a.epochs, steps, train_eval.loss);
        if (n_val) printf(" | val loss %.4f", val_eval.loss);
        else printf(" | no held-out pairs");
        print_accuracy("train", &train_eval);
        if (n_val) print_accuracy("val", &val_eval);
        printf(" | %.2f s\n", wall_seconds() - epoch_start);
        if (!isfinite(train_eval.loss) || (n_val && !isfinite(val_eval.loss)))
            fatal("reward: epoch %d: the %s loss is %g: the heads diverged; try a lower --lr (now %g)%s", epoch,
                  isfinite(train_eval.loss) ? "val" : "train", isfinite(train_eval.loss) ? val_eval.loss : train_eval.loss,
                  a.lr, a.weight_decay > 0.0f ? " or --weight_decay" : "");

        cJSON *line = cJSON_CreateObject();
        cJSON_AddNumberToObject(line, "epoch", epoch);
        cJSON_AddNumberToObject(line, "step", steps);
        cJSON_AddNumberToObject(line, "train_loss", train_eval.loss);
        if (n_val) cJSON_AddNumberToObject(line, "val_loss", val_eval.loss);
        else cJSON_AddNullToObject(line, "val_loss");
        cJSON_AddItemToObject(line, "train_accuracy", accuracy_json(&train_eval));
        cJSON_AddItemToObject(line, "val_accuracy", accuracy_json(&val_eval));
        char *text = cJSON_PrintUnformatted(line);
        if (text == NULL) fatal("out of memory formatting %s", metrics_path);
        size_t n = strlen(text);
        metrics_text = (char *)reallocCheck(metrics_text, metrics_len + n + 2);
        memcpy(metrics_text + metrics_len, text, n);
        metrics_len += n;
        metrics_text[metrics_len++] = '\n';
        metrics_text[metrics_len] = '\0';
        free(text);
        cJSON_Delete(line);
        run_write_text(metrics_path, metrics_text);
    }

    HeadCalibration calibration[MORA_NUM_DIMS];
    if (a.calibrate) calibrate_heads(&heads, hidden, enc_pairs.dims, val_idx, n_val, train_idx, n_train, calibration);
    heads.trunk = reward_trunk_of(&model);  // ties the heads to this trunk's weights
    reward_heads_save(&heads, heads_path);
    if (from_preset) {
        TrainState state = {0};
        checkpoint_save_native(&model, &state, trunk_path, 0);
    }

    cJSON *summary = cJSON_CreateObject();
    cJSON_AddStringToObject(summary, "model", from_preset ? trunk_path : a.model);
    cJSON_AddStringToObject(summary, "model_source", a.model);
    char fingerprint[32];
    snprintf(fingerprint, sizeof fingerprint, "%016llx", (unsigned long long)heads.trunk.fingerprint);
    cJSON_AddStringToObject(summary, "trunk_fingerprint", fingerprint);
    cJSON_AddStringToObject(summary, "heads", heads_path);
    cJSON_AddStringToObject(summary, "head", reward_head_kind_name(heads.kind));
    cJSON_AddNumberToObject(summary, "head_hidden", heads.H);
    cJSON_AddStringToObject(summary, "head_act", reward_head_activation_name(heads.activation));
    cJSON_AddStringToObject(summary, "data", a.data);
    cJSON_AddStringToObject(summary, "chat_template", enc.chat ? chat_template_name(enc.chat) : "none");
    cJSON_AddStringToObject(summary, "text_encoding", enc.tokenizer ? "tokenizer" : "bytes");
    cJSON_AddNumberToObject(summary, "seed", a.seed);
    cJSON_AddNumberToObject(summary, "epochs", a.epochs);
    cJSON_AddNumberToObject(summary, "steps", steps);
    cJSON_AddNumberToObject(summary, "val_frac", float_shortest(a.val_frac));
    cJSON_AddNumberToObject(summary, "context", max_len);
    cJSON_AddNumberToObject(summary, "train_pairs", n_train);
    cJSON_AddNumberToObject(summary, "val_pairs", n_val);
    cJSON_AddItemToObject(summary, "train_pairs_per_dim", counts_json(train_eval.n));
    cJSON_AddItemToObject(summary, "val_pairs_per_dim", counts_json(val_eval.n));
    cJSON *untrained = cJSON_CreateArray();
    for (int d = 0; d < MORA_NUM_DIMS; d++)
        if (pairs_per_dim[d] == 0) cJSON_AddItemToArray(untrained, cJSON_CreateString(mora_dim_names[d]));
    cJSON_AddItemToObject(summary, "untrained", untrained);
    cJSON_AddNumberToObject(summary, "train_loss", train_eval.loss);
    if (n_val) cJSON_AddNumberToObject(summary, "val_loss", val_eval.loss);
    else cJSON_AddNullToObject(summary, "val_loss");
    cJSON_AddItemToObject(summary, "train_accuracy", accuracy_json(&train_eval));
    cJSON_AddItemToObject(summary, "val_accuracy", accuracy_json(&val_eval));
    cJSON_AddBoolToObject(summary, "calibrate", a.calibrate);
    if (a.calibrate) cJSON_AddItemToObject(summary, "calibration", calibration_json(calibration));
    else cJSON_AddNullToObject(summary, "calibration");
    cJSON_AddNumberToObject(summary, "truncated_prompts", enc_pairs.truncated);
    cJSON_AddNumberToObject(summary, "skipped_lines", data.skipped);
    cJSON_AddNumberToObject(summary, "skipped_too_long", enc_pairs.skipped);
    cJSON_AddNumberToObject(summary, "seconds", wall_seconds() - run_start);
    run_write_json(summary_path, summary);
    cJSON_Delete(summary);

    if (a.skip_bad) printf("skipped %d bad line(s) and %d pair(s) too long for the context\n", data.skipped, enc_pairs.skipped);
    printf("done: %d epochs, %d steps in %.1f s; wrote %s, %s, %s", a.epochs, steps, wall_seconds() - run_start, heads_path,
           metrics_path, summary_path);
    if (from_preset) printf(", %s (the trunk the heads were trained on)\n", trunk_path);
    else printf(" (the trunk is %s)\n", a.model);

    free(metrics_text);
    free(batch_hidden); free(batch_dims); free(batch_drewards);
    free(rc); free(rr); free(dc); free(dr);
    free(rewards);
    free(hidden);
    free(train_idx); free(val_idx);
    reward_heads_free(&heads);
    encoded_prefs_free(&enc_pairs);
    text_encoder_free(&enc);
    model_free(&model);
    prefdata_free(&data);
    return 0;
}
