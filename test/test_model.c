/*
 * Checks of the model API (llmc/model.h) that the JAX oracle test does not cover:
 *
 *   - parameter counts of the presets against published figures: llm.c's GPT-2 124M with the
 *     vocabulary padded to 50304 (124,475,904) and Hugging Face's SmolLM2-135M (134,515,008);
 *   - at random init the loss is close to ln(V) (the logits are near zero);
 *   - the gradients of the three backward entry points against the directional derivative of
 *     the forward (central differences along the normalised gradient):
 *       model_backward(scale)                   d(scale * mean_loss)
 *       model_backward_weighted(w, NULL)         d(sum_bt w_bt token_losses_bt), w arbitrary
 *       model_backward_weighted(NULL, dhidden)   d<dhidden, hidden>
 *   - a masked position's target does not change the loss, and mean_loss is the mask-weighted mean;
 *   - forwards at other batch shapes (larger and smaller B*T and B*T*T) reuse or regrow the
 *     activations and give bit-identical results when the first shape comes back;
 *   - forward and backward give bit-identical logits and gradients with 1 and 3 threads (every
 *     parallel loop owns its outputs and sums in a fixed order: no race, no thread-count effect);
 *   - AdamW on a fixed batch lowers the loss a lot (the model can fit one batch);
 *   - lr_schedule's warmup, cosine and floor;
 *   - bad inputs (token id >= Vp, T > max_seq_len, bad configs) exit with status 1.
 * Runs on gpt2:tiny and llama:tiny. Prints one line per check; exits 1 on any failure.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>
#include <omp.h>
#include "model.h"
#include "rand.h"
#include "utils.h"

static int failures = 0;

static void check(int ok, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void check(int ok, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    printf("%s ", ok ? "ok  " : "FAIL");
    vprintf(fmt, ap);
    printf("\n");
    va_end(ap);
    if (!ok) failures++;
}

// A fixed random batch: B x T tokens in [0, V), next-token targets, a mask with some zeros.
typedef struct { int B, T; int *inputs, *targets; float *mask; } Batch;

static Batch make_batch(int B, int T, int V, uint64_t seed) {
    uint64_t state = rng_seed(seed);
    Batch b = {B, T, mallocCheck(sizeof(int) * B * T), mallocCheck(sizeof(int) * B * T), mallocCheck(sizeof(float) * B * T)};
    for (int i = 0; i < B * T; i++) {
        b.inputs[i] = (int)(random_u32(&state) % V);
        b.targets[i] = (int)(random_u32(&state) % V);
        b.mask[i] = (i % 5 == 2) ? 0.0f : 1.0f;
    }
    return b;
}
static void free_batch(Batch *b) { free(b->inputs); free(b->targets); free(b->mask); }

// Directional derivative of f at the parameters along the unit vector grad/|grad|, by central
// differences with step h; compared with |grad| (what the analytic gradient predicts).
typedef double (*ObjectiveFn)(Model *model, const Batch *b, const float *extra);

static double directional_fd(Model *model, const Batch *b, const float *extra, ObjectiveFn f, double h, double *grad_norm) {
    size_t n = model->num_parameters;
    double norm = model_grad_norm(model);
    float *saved = mallocCheck(n * sizeof(float));
    float *direction = mallocCheck(n * sizeof(float));
    memcpy(saved, model->params, n * sizeof(float));
    for (size_t i = 0; i < n; i++) direction[i] = (float)(model->grads[i] / norm);
    for (size_t i = 0; i < n; i++) model->params[i] = saved[i] + (float)h * direction[i];
    double plus = f(model, b, extra);
    for (size_t i = 0; i < n; i++) model->params[i] = saved[i] - (float)h * direction[i];
    double minus = f(model, b, extra);
    memcpy(model->params, saved, n * sizeof(float));
    free(saved);
    free(direction);
    *grad_norm = norm;
    return (plus - minus) / (2 * h);
}

static double objective_mean_loss(Model *model, const Batch *b, const float *extra) {
    model_forward(model, b->inputs, b->targets, b->mask, b->B, b->T);
    return 0.5 * model->mean_loss;   // scale 0.5, as passed to model_backward below
}
static double objective_weighted(Model *model, const Batch *b, const float *weights) {
    model_forward(model, b->inputs, b->targets, b->mask, b->B, b->T);
    double s = 0.0;
    for (int i = 0; i < b->B * b->T; i++) s += (double)weights[i] * model->token_losses[i];
    return s;
}
static double objective_hidden(Model *model, const Batch *b, const float *dhidden) {
    model_forward(model, b->inputs, NULL, NULL, b->B, b->T);
    double s = 0.0;
    for (size_t i = 0; i < (size_t)b->B * b->T * model->config.n_embd; i++) s += (double)dhidden[i] * model->hidden[i];
    return s;
}

// Runs fn in a child process and reports whether it exited with status 1 (fatal's exit).
static int exits_with_error(void (*fn)(void)) {
    fflush(stdout);
    pid_t pid = fork();
    if (pid < 0) fatal("fork failed");
    if (pid == 0) {
        freopen("/dev/null", "w", stderr);
        fn();
        _exit(0);
    }
    int status;
    waitpid(pid, &status, 0);
    return WIFEXITED(status) && WEXITSTATUS(status) == 1;
}

static Model error_model;
static void forward_bad_token(void) {
    int inputs[4] = {1, 2, error_model.config.padded_vocab_size, 3};
    model_forward(&error_model, inputs, NULL, NULL, 1, 4);
}
static void forward_too_long(void) {
    int T = error_model.config.max_seq_len + 1;
    int *inputs = calloc(T, sizeof(int));
    model_forward(&error_model, inputs, NULL, NULL, 1, T);
}
static void forward_bad_target(void) {
    int inputs[2] = {1, 2}, targets[2] = {3, -1};
    model_forward(&error_model, inputs, targets, NULL, 1, 2);
}
static void init_bad_gqa(void) {
    ModelConfig c;
    model_config_preset("llama:tiny", &c);
    c.n_kv_head = 3;   // 4 query heads cannot share 3 key/value heads
    Model m;
    model_init(&m, &c, "test");
}
static void init_bad_vocab(void) {
    ModelConfig c;
    model_config_preset("gpt2:tiny", &c);
    c.padded_vocab_size = c.vocab_size - 1;
    Model m;
    model_init(&m, &c, "test");
}

static void test_family(const char *preset) {
    printf("== %s\n", preset);
    ModelConfig config;
    if (!model_config_preset(preset, &config)) fatal("unknown preset %s", preset);
    Model model;
    model_init(&model, &config, preset);
    model_init_random(&model, 42);
    int V = config.vocab_size, B = 3, T = 16;
    Batch batch = make_batch(B, T, V, 7);

    // loss at init
    model_forward(&model, batch.inputs, batch.targets, batch.mask, B, T);
    double init_loss = model.mean_loss;
    check(fabs(init_loss - log(V)) < 0.05, "%s: loss at init %.4f, ln(V) = %.4f", preset, init_loss, log(V));

    // mean_loss = mask-weighted mean of token_losses; masked positions have loss 0 and their
    // targets do not matter
    double sum = 0.0, count = 0.0;
    int masked_zero = 1;
    for (int i = 0; i < B * T; i++) {
        sum += batch.mask[i] * model.token_losses[i];
        count += batch.mask[i];
        if (batch.mask[i] == 0.0f && model.token_losses[i] != 0.0f) masked_zero = 0;
    }
    check(fabs(sum / count - model.mean_loss) < 1e-5 && masked_zero, "%s: mean_loss is the masked mean, masked positions 0", preset);
    int saved_target = batch.targets[2];
    batch.targets[2] = (saved_target + 1) % V;   // position 2 is masked
    model_forward(&model, batch.inputs, batch.targets, batch.mask, B, T);
    check(model.mean_loss == (float)init_loss, "%s: a masked target does not change the loss", preset);
    batch.targets[2] = saved_target;

    // gradients of the three backward entry points against directional differences
    double gnorm, fd;
    model_forward(&model, batch.inputs, batch.targets, batch.mask, B, T);
    model_zero_grad(&model);
    model_backward(&model, 0.5f);
    fd = directional_fd(&model, &batch, NULL, objective_mean_loss, 1e-3, &gnorm);
    check(fabs(fd - gnorm) < 1e-3 * gnorm, "%s: model_backward(0.5): |grad| %.6f, directional difference %.6f", preset, gnorm, fd);

    uint64_t state = rng_seed(99);
    float *weights = mallocCheck(sizeof(float) * B * T);
    for (int i = 0; i < B * T; i++) weights[i] = random_f32(&state) - 0.3f;
    model_forward(&model, batch.inputs, batch.targets, batch.mask, B, T);
    model_zero_grad(&model);
    model_backward_weighted(&model, weights, NULL);
    fd = directional_fd(&model, &batch, weights, objective_weighted, 1e-3, &gnorm);
    check(fabs(fd - gnorm) < 1e-3 * gnorm, "%s: model_backward_weighted(w): |grad| %.6f, directional difference %.6f", preset, gnorm, fd);

    size_t NC = (size_t)B * T * config.n_embd;
    float *dhidden = mallocCheck(sizeof(float) * NC);
    for (size_t i = 0; i < NC; i++) dhidden[i] = random_normal(&state) * 0.1f;
    model_forward(&model, batch.inputs, NULL, NULL, B, T);
    check(model.mean_loss == -1.0f && !model.has_targets, "%s: forward without targets: mean_loss -1", preset);
    model_zero_grad(&model);
    model_backward_weighted(&model, NULL, dhidden);
    fd = directional_fd(&model, &batch, dhidden, objective_hidden, 1e-3, &gnorm);
    check(fabs(fd - gnorm) < 1e-3 * gnorm, "%s: model_backward_weighted(dhidden): |grad| %.6f, directional difference %.6f", preset, gnorm, fd);

    // other shapes, then the first one again: identical results
    model_forward(&model, batch.inputs, batch.targets, batch.mask, B, T);
    float *ref_logits = mallocCheck(sizeof(float) * B * T * config.padded_vocab_size);
    memcpy(ref_logits, model.logits, sizeof(float) * B * T * config.padded_vocab_size);
    float ref_loss = model.mean_loss;
    Batch wide = make_batch(1, config.max_seq_len, V, 11);    // B*T*T grows
    model_forward(&model, wide.inputs, wide.targets, NULL, 1, config.max_seq_len);
    Batch tall = make_batch(8, 8, V, 12);                     // B*T grows
    model_forward(&model, tall.inputs, tall.targets, tall.mask, 8, 8);
    model_forward(&model, batch.inputs, batch.targets, batch.mask, B, T);
    check(model.mean_loss == ref_loss && memcmp(ref_logits, model.logits, sizeof(float) * B * T * config.padded_vocab_size) == 0,
          "%s: forward after other batch shapes is bit-identical", preset);
    // the causal mask: position t's logits do not depend on tokens after t
    int *changed = mallocCheck(sizeof(int) * B * T);
    memcpy(changed, batch.inputs, sizeof(int) * B * T);
    changed[T - 1] = (changed[T - 1] + 1) % V;
    model_forward(&model, changed, batch.targets, batch.mask, B, T);
    check(memcmp(ref_logits, model.logits, sizeof(float) * (T - 1) * config.padded_vocab_size) == 0 &&
          memcmp(ref_logits + (size_t)(T - 1) * config.padded_vocab_size, model.logits + (size_t)(T - 1) * config.padded_vocab_size,
                 sizeof(float) * config.padded_vocab_size) != 0,
          "%s: changing the last token changes only the last position's logits", preset);

    // 1 thread and 3 threads: identical logits and gradients
    size_t n_logits = (size_t)B * T * config.padded_vocab_size;
    float *logits_by_threads[2], *grads_by_threads[2];
    int thread_counts[2] = {1, 3}, saved_threads = omp_get_max_threads();
    for (int k = 0; k < 2; k++) {
        omp_set_num_threads(thread_counts[k]);
        model_forward(&model, batch.inputs, batch.targets, batch.mask, B, T);
        model_zero_grad(&model);
        model_backward(&model, 1.0f);
        model_backward_weighted(&model, NULL, dhidden);
        logits_by_threads[k] = mallocCheck(n_logits * sizeof(float));
        grads_by_threads[k] = mallocCheck(model.num_parameters * sizeof(float));
        memcpy(logits_by_threads[k], model.logits, n_logits * sizeof(float));
        memcpy(grads_by_threads[k], model.grads, model.num_parameters * sizeof(float));
    }
    omp_set_num_threads(saved_threads);
    check(memcmp(logits_by_threads[0], logits_by_threads[1], n_logits * sizeof(float)) == 0 &&
          memcmp(grads_by_threads[0], grads_by_threads[1], model.num_parameters * sizeof(float)) == 0,
          "%s: logits and gradients bit-identical with 1 and 3 threads", preset);
    for (int k = 0; k < 2; k++) { free(logits_by_threads[k]); free(grads_by_threads[k]); }

    // AdamW fits one batch
    float first = 0.0f, last = 0.0f;
    for (int step = 0; step < 30; step++) {
        model_forward(&model, batch.inputs, batch.targets, batch.mask, B, T);
        if (step == 0) first = model.mean_loss;
        last = model.mean_loss;
        model_zero_grad(&model);
        model_backward(&model, 1.0f);
        float norm = model_grad_norm(&model);
        model_adamw_update(&model, 1e-2f, 0.9f, 0.95f, 1e-8f, 0.1f, norm > 1.0f ? 1.0f / norm : 1.0f);
    }
    check(last < 0.5f * first && model.opt_step == 30, "%s: 30 AdamW steps on one batch: loss %.4f -> %.4f", preset, first, last);

    free(weights); free(dhidden); free(ref_logits); free(changed);
    free_batch(&batch); free_batch(&wide); free_batch(&tall);
    model_free(&model);
}

int main(void) {
    ModelConfig c;
    Model model;
    model_config_preset("gpt2:d12", &c);
    model_init(&model, &c, "gpt2:d12");
    check(model.num_parameters == 124475904, "gpt2:d12 has %zu parameters (llm.c: 124475904)", model.num_parameters);
    model_free(&model);
    model_config_preset("llama:smollm2-135m", &c);
    model_init(&model, &c, "llama:smollm2-135m");
    check(model.num_parameters == 134515008, "llama:smollm2-135m has %zu parameters (Hugging Face: 134515008)", model.num_parameters);
    model_free(&model);
    check(!model_config_preset("gpt2:nope", &c), "unknown preset names are refused");

    test_family("gpt2:tiny");
    test_family("llama:tiny");

    // lr_schedule: warmup (step + 1) / warmup, cosine to min_lr at total_steps, then min_lr
    check(fabsf(lr_schedule(0, 10, 110, 1.0f, 0.1f) - 0.1f) < 1e-6f &&
          fabsf(lr_schedule(9, 10, 110, 1.0f, 0.1f) - 1.0f) < 1e-6f &&
          fabsf(lr_schedule(10, 10, 110, 1.0f, 0.1f) - 1.0f) < 1e-6f &&
          fabsf(lr_schedule(60, 10, 110, 1.0f, 0.1f) - 0.55f) < 1e-6f &&
          fabsf(lr_schedule(110, 10, 110, 1.0f, 0.1f) - 0.1f) < 1e-6f &&
          fabsf(lr_schedule(500, 10, 110, 1.0f, 0.1f) - 0.1f) < 1e-6f,
          "lr_schedule: warmup, cosine midpoint, floor");

    model_config_preset("gpt2:tiny", &c);
    model_init(&error_model, &c, "gpt2:tiny");
    check(exits_with_error(forward_bad_token), "token id >= Vp exits with status 1");
    check(exits_with_error(forward_too_long), "T > max_seq_len exits with status 1");
    check(exits_with_error(forward_bad_target), "negative target exits with status 1");
    check(exits_with_error(init_bad_gqa), "n_head not a multiple of n_kv_head exits with status 1");
    check(exits_with_error(init_bad_vocab), "padded_vocab_size < vocab_size exits with status 1");
    model_free(&error_model);

    if (failures) {
        printf("%d check(s) FAILED\n", failures);
        return 1;
    }
    printf("all checks passed\n");
    return 0;
}
