/*
 * model_check: runs the C CPU model on one batch and writes what test/test_model_oracle.py
 * compares against the float64 JAX oracle (test/oracle/model_jax.py).
 *
 *   model_check CKPT TOKENS_FILE OUT_DIR [--steps N] [--lr LR] [--wd WD] [--clip MAXNORM]
 *                                        [--beta1 B1] [--beta2 B2] [--eps EPS]
 *
 * CKPT is anything checkpoint_load reads (a Hugging Face directory in the test).
 * TOKENS_FILE, little-endian:
 *     char[4] "MCTK", int32 B, int32 T,
 *     int32 inputs[B*T], int32 targets[B*T], float32 mask[B*T]      (row-major (B, T))
 * Outputs, each written to a temporary file and renamed:
 *     OUT_DIR/logits.bin          float32 (B, T, V) raw logits of the first forward (V, not Vp)
 *     OUT_DIR/grads.safetensors   gradients of the masked mean loss, Hugging Face names/shapes
 *     OUT_DIR/results.json        {"B", "T", "V", "loss", "grad_norm",
 *                                  "step_losses": [N], "step_grad_norms": [N]}
 * Then N AdamW steps at constant lr on the same batch; step_losses[i] is the loss before
 * update i+1 (so step_losses[0] is the initial loss). With --clip > 0 the gradients are scaled
 * by min(1, clip / ||g||) before each update.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <cjson/cJSON.h>

#include "utils.h"
#include "model.h"
#include "checkpoint.h"

typedef struct {
    int B, T;
    int *inputs;   // (B, T)
    int *targets;  // (B, T)
    float *mask;   // (B, T)
} Batch;

// Reads a TOKENS_FILE (format above); every malformed field exits with the file and the field.
static Batch read_batch(const char *path) {
    size_t size;
    char *buf = read_file_all(path, &size);
    if (size < 12 || memcmp(buf, "MCTK", 4) != 0) fatal("%s: not a model_check batch file (magic \"MCTK\" missing)", path);
    int32_t header[2];
    memcpy(header, buf + 4, sizeof(header));
    Batch b = {.B = header[0], .T = header[1]};
    if (b.B <= 0 || b.T <= 0 || b.B > (1 << 20) || b.T > (1 << 20))
        fatal("%s: header field B=%d T=%d: both must be in 1..%d", path, b.B, b.T, 1 << 20);
    size_t n = (size_t)b.B * b.T;
    size_t want = 12 + n * (2 * sizeof(int32_t) + sizeof(float));
    if (size != want) fatal("%s: size %zu bytes, but B=%d T=%d needs %zu", path, size, b.B, b.T, want);
    b.inputs = (int *)mallocCheck(n * sizeof(int));
    b.targets = (int *)mallocCheck(n * sizeof(int));
    b.mask = (float *)mallocCheck(n * sizeof(float));
    memcpy(b.inputs, buf + 12, n * sizeof(int32_t));
    memcpy(b.targets, buf + 12 + n * sizeof(int32_t), n * sizeof(int32_t));
    memcpy(b.mask, buf + 12 + 2 * n * sizeof(int32_t), n * sizeof(float));
    double mask_sum = 0.0;
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(b.mask[i]) || b.mask[i] < 0.0f) fatal("%s: mask[%zu] = %g is not a finite value >= 0", path, i, b.mask[i]);
        mask_sum += b.mask[i];
    }
    if (mask_sum <= 0.0) fatal("%s: the mask selects no position, the mean loss is undefined", path);
    free(buf);
    return b;
}

// Checks every token id against the model's vocabulary, so a bad batch is reported by field.
static void check_batch_tokens(const Batch *b, const Model *model, const char *path) {
    int V = model->config.vocab_size;
    for (int i = 0; i < b->B * b->T; i++) {
        if (b->inputs[i] < 0 || b->inputs[i] >= V) fatal("%s: inputs[%d] = %d is outside the vocabulary 0..%d", path, i, b->inputs[i], V - 1);
        if (b->targets[i] < 0 || b->targets[i] >= V) fatal("%s: targets[%d] = %d is outside the vocabulary 0..%d", path, i, b->targets[i], V - 1);
    }
    if (b->T > model->config.max_seq_len) fatal("%s: T = %d exceeds the model's max_seq_len %d", path, b->T, model->config.max_seq_len);
}

// Parses a float flag value; exits naming the flag when it is not a finite number.
static float parse_float_flag(const char *flag, const char *value) {
    char *end;
    double x = strtod(value, &end);
    if (end == value || *end != '\0' || !isfinite(x)) fatal("flag %s: '%s' is not a number", flag, value);
    return (float)x;
}

// Writes the (B, T, V) slice of the model's (B, T, Vp) logits as raw float32.
static void write_logits(const Model *model, const char *path) {
    int B = model->B, T = model->T, V = model->config.vocab_size, Vp = model->config.padded_vocab_size;
    char tmp[4096 + 64];
    FILE *f = atomic_open(path, tmp, sizeof(tmp));
    for (int bt = 0; bt < B * T; bt++) fwrite_check(model->logits + (size_t)bt * Vp, sizeof(float), V, f, tmp);
    atomic_commit(f, tmp, path);
}

// Global-norm clipping factor min(1, clip / norm); 1 when clip <= 0 (no clipping).
static float clip_scale(float norm, float clip) {
    return (clip > 0.0f && norm > clip) ? clip / norm : 1.0f;
}

int main(int argc, char **argv) {
    const char *usage = "usage: model_check CKPT TOKENS_FILE OUT_DIR [--steps N] [--lr LR] [--wd WD] [--clip MAXNORM] [--beta1 B1] [--beta2 B2] [--eps EPS]";
    if (argc < 4) fatal("%s", usage);
    const char *ckpt_path = argv[1], *tokens_path = argv[2], *out_dir = argv[3];
    int steps = 0;
    float lr = 1e-3f, weight_decay = 0.0f, clip = 0.0f, beta1 = 0.9f, beta2 = 0.95f, eps = 1e-8f;
    for (int i = 4; i < argc; i += 2) {
        const char *flag = argv[i];
        if (i + 1 >= argc) fatal("flag %s needs a value (%s)", flag, usage);
        const char *value = argv[i + 1];
        if (!strcmp(flag, "--steps")) {
            char *end;
            long n = strtol(value, &end, 10);
            if (end == value || *end != '\0' || n < 0 || n > 1000000) fatal("flag --steps: '%s' is not a count in 0..1000000", value);
            steps = (int)n;
        } else if (!strcmp(flag, "--lr")) lr = parse_float_flag(flag, value);
        else if (!strcmp(flag, "--wd")) weight_decay = parse_float_flag(flag, value);
        else if (!strcmp(flag, "--clip")) clip = parse_float_flag(flag, value);
        else if (!strcmp(flag, "--beta1")) beta1 = parse_float_flag(flag, value);
        else if (!strcmp(flag, "--beta2")) beta2 = parse_float_flag(flag, value);
        else if (!strcmp(flag, "--eps")) eps = parse_float_flag(flag, value);
        else fatal("unknown flag '%s' (%s)", flag, usage);
    }
    if (!(beta1 >= 0.0f && beta1 < 1.0f) || !(beta2 >= 0.0f && beta2 < 1.0f)) fatal("flags --beta1/--beta2 must be in [0, 1)");
    if (!(eps > 0.0f) || !(lr >= 0.0f) || !(weight_decay >= 0.0f) || !(clip >= 0.0f)) fatal("flags --eps must be > 0 and --lr/--wd/--clip >= 0");
    struct stat st;
    if (stat(out_dir, &st) != 0 || !S_ISDIR(st.st_mode)) fatal("OUT_DIR %s is not an existing directory", out_dir);

    Batch batch = read_batch(tokens_path);
    Model model;
    checkpoint_load(&model, ckpt_path, NULL, NULL);
    check_batch_tokens(&batch, &model, tokens_path);
    int B = batch.B, T = batch.T;
    char path[4096];

    // forward, logits, loss and gradients of the masked mean loss
    model_forward(&model, batch.inputs, batch.targets, batch.mask, B, T);
    snprintf(path, sizeof(path), "%s/logits.bin", out_dir);
    write_logits(&model, path);
    float loss = model.mean_loss;
    model_zero_grad(&model);
    model_backward(&model, 1.0f);
    float grad_norm = model_grad_norm(&model);
    snprintf(path, sizeof(path), "%s/grads.safetensors", out_dir);
    checkpoint_save_hf_tensors(&model, model.grads, path);
    printf("model_check: B=%d T=%d V=%d loss %.7f grad norm %.7f\n", B, T, model.config.vocab_size, loss, grad_norm);

    // AdamW on the same batch at constant lr
    cJSON *step_losses = cJSON_CreateArray(), *step_norms = cJSON_CreateArray();
    for (int step = 0; step < steps; step++) {
        model_zero_grad(&model);
        model_forward(&model, batch.inputs, batch.targets, batch.mask, B, T);
        model_backward(&model, 1.0f);
        float norm = model_grad_norm(&model);
        model_adamw_update(&model, lr, beta1, beta2, eps, weight_decay, clip_scale(norm, clip));
        cJSON_AddItemToArray(step_losses, cJSON_CreateNumber(model.mean_loss));
        cJSON_AddItemToArray(step_norms, cJSON_CreateNumber(norm));
        printf("step %2d: loss %.7f grad norm %.7f\n", step + 1, model.mean_loss, norm);
    }

    cJSON *root = cJSON_CreateObject();
    cJSON_AddNumberToObject(root, "B", B);
    cJSON_AddNumberToObject(root, "T", T);
    cJSON_AddNumberToObject(root, "V", model.config.vocab_size);
    cJSON_AddNumberToObject(root, "loss", loss);
    cJSON_AddNumberToObject(root, "grad_norm", grad_norm);
    cJSON_AddItemToObject(root, "step_losses", step_losses);
    cJSON_AddItemToObject(root, "step_grad_norms", step_norms);
    char *text = cJSON_Print(root);
    if (text == NULL) fatal("out of memory printing results.json");
    snprintf(path, sizeof(path), "%s/results.json", out_dir);
    char tmp[4096 + 64];
    FILE *f = atomic_open(path, tmp, sizeof(tmp));
    fwrite_check(text, 1, strlen(text), f, tmp);
    fwrite_check("\n", 1, 1, f, tmp);
    atomic_commit(f, tmp, path);

    free(text);
    cJSON_Delete(root);
    free(batch.inputs);
    free(batch.targets);
    free(batch.mask);
    model_free(&model);
    return 0;
}
