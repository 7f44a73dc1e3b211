/*
 * The reward heads on the CPU (see reward_heads.h): forward, backward, Bradley-Terry loss,
 * AdamW, batched scoring through the trunk, and the heads file.
 */
#include <math.h>
#include <omp.h>

#include "reward_heads.h"
#include "rand.h"
#include "utils.h"

static const double SQRT_2_OVER_PI = 0.79788456080286535588;

int reward_head_kind_from_name(const char *name) {
    if (!strcmp(name, "linear")) return REWARD_HEAD_LINEAR;
    if (!strcmp(name, "mlp")) return REWARD_HEAD_MLP;
    return -1;
}
int reward_head_activation_from_name(const char *name) {
    if (!strcmp(name, "gelu")) return REWARD_ACT_GELU;
    if (!strcmp(name, "relu")) return REWARD_ACT_RELU;
    return -1;
}
const char *reward_head_kind_name(RewardHeadKind kind) { return kind == REWARD_HEAD_MLP ? "mlp" : "linear"; }
const char *reward_head_activation_name(RewardHeadActivation act) { return act == REWARD_ACT_RELU ? "relu" : "gelu"; }

// Parameters of one head: linear w (C) + b; mlp W1 (H, C) + b1 (H) + w2 (H) + b2.
static size_t head_size_of(RewardHeadKind kind, int C, int H) {
    return kind == REWARD_HEAD_MLP ? (size_t)H * C + 2 * (size_t)H + 1 : (size_t)C + 1;
}

void reward_heads_init(RewardHeads *heads, RewardHeadKind kind, RewardHeadActivation act, int C, int H) {
    if (C <= 0) fatal("reward heads: hidden size C must be positive, got %d", C);
    if (kind == REWARD_HEAD_MLP && H <= 0) fatal("reward heads: mlp hidden width must be positive, got %d", H);
    memset(heads, 0, sizeof(*heads));
    heads->kind = kind;
    heads->activation = act;
    heads->C = C;
    heads->H = kind == REWARD_HEAD_MLP ? H : 0;
    heads->head_size = head_size_of(kind, C, heads->H);
    heads->num_parameters = MORA_NUM_DIMS * heads->head_size;
    heads->params = (float *)callocCheck(heads->num_parameters, sizeof(float));
    heads->grads = (float *)callocCheck(heads->num_parameters, sizeof(float));
}

void reward_heads_init_random(RewardHeads *heads, uint64_t seed) {
    memset(heads->params, 0, heads->num_parameters * sizeof(float));
    if (heads->kind == REWARD_HEAD_LINEAR) return;
    uint64_t rng = rng_seed(seed);
    int C = heads->C, H = heads->H;
    float std1 = 1.0f / sqrtf((float)C), std2 = 1.0f / sqrtf((float)H);
    for (int d = 0; d < MORA_NUM_DIMS; d++) {
        float *p = reward_head_params(heads, d);
        for (size_t i = 0; i < (size_t)H * C; i++) p[i] = std1 * random_normal(&rng);
        float *w2 = p + (size_t)H * C + H;
        for (int j = 0; j < H; j++) w2[j] = std2 * random_normal(&rng);
    }
}

void reward_heads_free(RewardHeads *heads) {
    free(heads->params);
    free(heads->grads);
    free(heads->m);
    free(heads->v);
    memset(heads, 0, sizeof(*heads));
}

float *reward_head_params(const RewardHeads *heads, int dim) {
    return heads->params + (size_t)dim * heads->head_size;
}

// GELU (tanh approximation) and its derivative, in double.
static double gelu(double x) {
    double u = SQRT_2_OVER_PI * (x + 0.044715 * x * x * x);
    return 0.5 * x * (1.0 + tanh(u));
}
static double gelu_grad(double x) {
    double u = SQRT_2_OVER_PI * (x + 0.044715 * x * x * x);
    double t = tanh(u);
    double du = SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * x * x);
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du;
}
static double activation(RewardHeadActivation act, double x) {
    return act == REWARD_ACT_RELU ? (x > 0.0 ? x : 0.0) : gelu(x);
}
static double activation_grad(RewardHeadActivation act, double x) {
    return act == REWARD_ACT_RELU ? (x > 0.0 ? 1.0 : 0.0) : gelu_grad(x);
}

// Pre-activation of mlp unit j: a_j = W1[j] . h + b1[j].
static double mlp_preact(const float *p, int C, int H, int j, const float *h) {
    const float *w1 = p + (size_t)j * C;
    double a = p[(size_t)H * C + j];
    for (int c = 0; c < C; c++) a += (double)w1[c] * h[c];
    return a;
}

double reward_head_value(const RewardHeads *heads, int dim, const float *h) {
    const float *p = reward_head_params(heads, dim);
    int C = heads->C;
    if (heads->kind == REWARD_HEAD_LINEAR) {
        double r = p[C];
        for (int c = 0; c < C; c++) r += (double)p[c] * h[c];
        return r;
    }
    int H = heads->H;
    const float *w2 = p + (size_t)H * C + H;
    double r = w2[H];  // b2
    for (int j = 0; j < H; j++) r += (double)w2[j] * activation(heads->activation, mlp_preact(p, C, H, j, h));
    return r;
}

void reward_heads_forward(const RewardHeads *heads, const float *hidden, int N, float *rewards) {
    #pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++)
        for (int d = 0; d < MORA_NUM_DIMS; d++)
            rewards[(size_t)n * MORA_NUM_DIMS + d] = (float)reward_head_value(heads, d, hidden + (size_t)n * heads->C);
}

void reward_heads_backward(RewardHeads *heads, const float *hidden, const int *dims,
                           const float *drewards, int N, float *dhidden) {
    int C = heads->C, H = heads->H;
    if (heads->kind == REWARD_HEAD_LINEAR) {
        // dw[c] += sum_n dr_n h_n[c], db += sum_n dr_n; dh_n += dr_n w. Parallel over c: each
        // thread owns its columns and sums rows in order.
        for (int d = 0; d < MORA_NUM_DIMS; d++) {
            float *g = heads->grads + (size_t)d * heads->head_size;
            #pragma omp parallel for schedule(static)
            for (int c = 0; c < C; c++) {
                double acc = 0.0;
                for (int n = 0; n < N; n++)
                    if (dims[n] == d) acc += (double)drewards[n] * hidden[(size_t)n * C + c];
                g[c] += (float)acc;
            }
            double acc = 0.0;
            for (int n = 0; n < N; n++)
                if (dims[n] == d) acc += drewards[n];
            g[C] += (float)acc;
        }
        if (dhidden) {
            #pragma omp parallel for schedule(static)
            for (int n = 0; n < N; n++) {
                const float *w = reward_head_params(heads, dims[n]);
                for (int c = 0; c < C; c++) dhidden[(size_t)n * C + c] += drewards[n] * w[c];
            }
        }
        return;
    }
    // mlp: with a_j = W1[j].h + b1[j], g_j = act(a_j), r = w2.g + b2, and e_j = dr w2_j act'(a_j):
    //   dW1[j] += e_j h, db1[j] += e_j, dw2[j] += dr g_j, db2 += dr, dh += sum_j e_j W1[j].
    // First every row's e (N, H) and dr * g (N, H), in parallel over rows; then the parameter
    // gradients in parallel over units j (each thread owns its rows of W1 and sums over rows n
    // in order), and dhidden in parallel over rows.
    double *e = (double *)mallocCheck((size_t)N * H * sizeof(double));
    double *drg = (double *)mallocCheck((size_t)N * H * sizeof(double));
    #pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const float *p = reward_head_params(heads, dims[n]);
        const float *w2 = p + (size_t)H * C + H;
        const float *h = hidden + (size_t)n * C;
        for (int j = 0; j < H; j++) {
            double a = mlp_preact(p, C, H, j, h);
            e[(size_t)n * H + j] = drewards[n] * w2[j] * activation_grad(heads->activation, a);
            drg[(size_t)n * H + j] = drewards[n] * activation(heads->activation, a);
        }
    }
    for (int d = 0; d < MORA_NUM_DIMS; d++) {
        float *g = heads->grads + (size_t)d * heads->head_size;
        float *gb1 = g + (size_t)H * C, *gw2 = gb1 + H;
        #pragma omp parallel
        {
            double *row = (double *)mallocCheck((size_t)C * sizeof(double));
            #pragma omp for schedule(static)
            for (int j = 0; j < H; j++) {
                for (int c = 0; c < C; c++) row[c] = 0.0;
                double sum_e = 0.0, sum_g = 0.0;
                for (int n = 0; n < N; n++) {
                    if (dims[n] != d) continue;
                    const float *h = hidden + (size_t)n * C;
                    double ej = e[(size_t)n * H + j];
                    sum_e += ej;
                    sum_g += drg[(size_t)n * H + j];
                    for (int c = 0; c < C; c++) row[c] += ej * h[c];
                }
                float *gw1 = g + (size_t)j * C;
                for (int c = 0; c < C; c++) gw1[c] += (float)row[c];
                gb1[j] += (float)sum_e;
                gw2[j] += (float)sum_g;
            }
            free(row);
        }
        double sum_dr = 0.0;
        for (int n = 0; n < N; n++)
            if (dims[n] == d) sum_dr += drewards[n];
        gw2[H] += (float)sum_dr;
    }
    if (dhidden) {
        #pragma omp parallel
        {
            double *dh = (double *)mallocCheck((size_t)C * sizeof(double));
            #pragma omp for schedule(static)
            for (int n = 0; n < N; n++) {
                const float *p = reward_head_params(heads, dims[n]);
                for (int c = 0; c < C; c++) dh[c] = 0.0;
                for (int j = 0; j < H; j++) {
                    double ej = e[(size_t)n * H + j];
                    const float *w1 = p + (size_t)j * C;
                    for (int c = 0; c < C; c++) dh[c] += ej * w1[c];
                }
                for (int c = 0; c < C; c++) dhidden[(size_t)n * C + c] += (float)dh[c];
            }
            free(dh);
        }
    }
    free(e);
    free(drg);
}

void reward_heads_affine(RewardHeads *heads, int dim, double scale, double shift) {
    if (dim < 0 || dim >= MORA_NUM_DIMS) fatal("reward_heads_affine: dimension %d not in 0..%d", dim, MORA_NUM_DIMS - 1);
    if (!isfinite(scale) || !isfinite(shift)) fatal("reward_heads_affine: scale %g and shift %g must be finite", scale, shift);
    float *p = reward_head_params(heads, dim);
    // the last layer: a weight vector of n_last entries followed by its bias; the reward is
    // (that vector) . (its input) + bias, so scaling both and shifting the bias maps r to
    // scale * r + shift for every input
    int n_last = heads->kind == REWARD_HEAD_LINEAR ? heads->C : heads->H;
    float *w_last = heads->kind == REWARD_HEAD_LINEAR ? p : p + (size_t)heads->H * heads->C + heads->H;
    for (int j = 0; j < n_last; j++) w_last[j] = (float)(scale * w_last[j]);
    w_last[n_last] = (float)(scale * w_last[n_last] + shift);
}

void reward_heads_zero_grad(RewardHeads *heads) {
    memset(heads->grads, 0, heads->num_parameters * sizeof(float));
}

// 1 when parameter i of a head is a weight (decayed), 0 for a bias.
static int head_param_is_weight(const RewardHeads *heads, size_t i) {
    size_t C = heads->C, H = heads->H;
    if (heads->kind == REWARD_HEAD_LINEAR) return i < C;
    if (i < H * C) return 1;                       // W1
    if (i < H * C + H) return 0;                   // b1
    return i < H * C + 2 * H;                      // w2 yes, b2 no
}

void reward_heads_adamw_update(RewardHeads *heads, float lr, float beta1, float beta2, float eps,
                               float weight_decay) {
    if (heads->m == NULL) {
        heads->m = (float *)callocCheck(heads->num_parameters, sizeof(float));
        heads->v = (float *)callocCheck(heads->num_parameters, sizeof(float));
    }
    heads->opt_step++;
    double bc1 = 1.0 - pow(beta1, heads->opt_step), bc2 = 1.0 - pow(beta2, heads->opt_step);
    for (size_t i = 0; i < heads->num_parameters; i++) {
        float g = heads->grads[i];
        float m = beta1 * heads->m[i] + (1.0f - beta1) * g;
        float v = beta2 * heads->v[i] + (1.0f - beta2) * g * g;
        heads->m[i] = m;
        heads->v[i] = v;
        double update = (m / bc1) / (sqrt(v / bc2) + eps);
        float decay = head_param_is_weight(heads, i % heads->head_size) ? weight_decay : 0.0f;
        heads->params[i] -= (float)(lr * (update + decay * heads->params[i]));
    }
}

double bradley_terry_loss(const double *r_chosen, const double *r_rejected, int N,
                          double *dchosen, double *drejected) {
    if (N <= 0) return 0.0;
    double sum = 0.0;
    for (int n = 0; n < N; n++) {
        double margin = r_chosen[n] - r_rejected[n];
        // -log sigmoid(m) = softplus(-m) = max(-m, 0) + log1p(exp(-|m|))
        sum += fmax(-margin, 0.0) + log1p(exp(-fabs(margin)));
        // sigmoid(-m), stable for either sign of m
        double s = margin >= 0 ? exp(-margin) / (1.0 + exp(-margin)) : 1.0 / (1.0 + exp(margin));
        if (dchosen) dchosen[n] = -s / N;
        if (drejected) drejected[n] = s / N;
    }
    return sum / N;
}

void reward_gather_last(float *hidden_last, const float *hidden, const int *lengths, int B, int T, int C) {
    for (int b = 0; b < B; b++) {
        if (lengths[b] < 1 || lengths[b] > T) fatal("reward_gather_last: length %d of row %d not in 1..%d", lengths[b], b, T);
        memcpy(hidden_last + (size_t)b * C, hidden + ((size_t)b * T + lengths[b] - 1) * C, (size_t)C * sizeof(float));
    }
}

void reward_heads_score(const RewardHeads *heads, Model *model, const int *inputs, const int *lengths,
                        int B, int T, float *rewards, float *hidden_last) {
    int C = model->config.n_embd;
    if (C != heads->C) fatal("reward heads have C=%d but the model has n_embd=%d", heads->C, C);
    model_forward(model, inputs, NULL, NULL, B, T);
    float *last = hidden_last ? hidden_last : (float *)mallocCheck((size_t)B * C * sizeof(float));
    reward_gather_last(last, model->hidden, lengths, B, T, C);
    reward_heads_forward(heads, last, B, rewards);
    if (last != hidden_last) free(last);
}

// ---------------------------------------------------------------------------------------------
// the heads file

static uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

uint64_t params_fingerprint(const float *params, size_t n) {
    const uint32_t *bits = (const uint32_t *)params;
    uint64_t s = 0;
#pragma omp parallel for reduction(+ : s) schedule(static)
    for (long i = 0; i < (long)n; i++) s += (uint64_t)bits[i] * (0x9E3779B97F4A7C15ULL * (2 * (uint64_t)i + 1));
    uint64_t f = mix64(s ^ (uint64_t)n);
    return f ? f : 1;
}

RewardTrunk reward_trunk_of(const Model *model) {
    RewardTrunk t = {(int)model->config.arch, model->config.n_layer, model->config.vocab_size,
                     params_fingerprint(model->params, model->num_parameters)};
    return t;
}

static void trunk_describe(const RewardTrunk *t, int C, char *out, size_t size) {
    snprintf(out, size, "%s L=%d C=%d V=%d, fingerprint %016llx", t->arch == ARCH_GPT2 ? "gpt2" : "llama", t->n_layer, C,
             t->vocab_size, (unsigned long long)t->fingerprint);
}

void reward_heads_check_trunk(const RewardHeads *heads, const char *heads_path, const Model *model,
                              const char *model_desc) {
    if (heads->trunk.fingerprint == 0) {
        printf("warning: %s does not record the trunk it was trained on (an older heads file): make sure %s is that trunk\n",
               heads_path, model_desc);
        return;
    }
    RewardTrunk t = reward_trunk_of(model);
    if (t.fingerprint == heads->trunk.fingerprint) return;
    char want[160], got[160];
    trunk_describe(&heads->trunk, heads->C, want, sizeof want);
    trunk_describe(&t, model->config.n_embd, got, sizeof got);
    fatal("%s was trained on another trunk than %s: the heads read the hidden states of (%s), this model is (%s); "
          "use the model the heads were trained on (`train_mora reward` saves it as model.ckpt beside the heads)",
          heads_path, model_desc, want, got);
}

void reward_heads_save(const RewardHeads *heads, const char *path) {
    char tmp[4200];
    FILE *f = atomic_open(path, tmp, sizeof tmp);
    const RewardTrunk *t = &heads->trunk;
    int32_t header[10] = {REWARD_HEADS_VERSION, (int32_t)heads->kind, (int32_t)heads->activation, heads->C, heads->H,
                          MORA_NUM_DIMS, t->fingerprint ? t->arch : -1, t->n_layer, t->vocab_size, 0};
    fwrite_check(REWARD_HEADS_MAGIC, 1, 8, f, path);
    fwrite_check(header, sizeof(int32_t), 10, f, path);
    fwrite_check(&t->fingerprint, sizeof(uint64_t), 1, f, path);
    fwrite_check(heads->params, sizeof(float), heads->num_parameters, f, path);
    atomic_commit(f, tmp, path);
}

void reward_heads_load(RewardHeads *heads, const char *path, int expected_C) {
    size_t size;
    char *buf = read_file_all(path, &size);
    if (size < 8 + 6 * sizeof(int32_t) || memcmp(buf, REWARD_HEADS_MAGIC, 8) != 0)
        fatal("%s: not a reward heads file (magic \"%s\" missing)", path, REWARD_HEADS_MAGIC);
    int32_t h[6];
    memcpy(h, buf + 8, sizeof h);
    int version = h[0], kind = h[1], act = h[2], C = h[3], H = h[4], dims = h[5];
    if (version != 1 && version != REWARD_HEADS_VERSION)
        fatal("%s: field version = %d, this build reads versions 1 and %d", path, version, REWARD_HEADS_VERSION);
    const size_t header_bytes = version == 1 ? 8 + 6 * sizeof(int32_t) : 8 + 10 * sizeof(int32_t) + sizeof(uint64_t);
    if (size < header_bytes) fatal("%s: size %zu bytes, shorter than a version %d header", path, size, version);
    RewardTrunk trunk = {-1, 0, 0, 0};
    if (version >= 2) {
        int32_t t[4];
        memcpy(t, buf + 8 + 6 * sizeof(int32_t), sizeof t);
        memcpy(&trunk.fingerprint, buf + 8 + 10 * sizeof(int32_t), sizeof(uint64_t));
        trunk.arch = t[0];
        trunk.n_layer = t[1];
        trunk.vocab_size = t[2];
        if (trunk.fingerprint != 0 && trunk.arch != ARCH_GPT2 && trunk.arch != ARCH_LLAMA)
            fatal("%s: field trunk arch = %d (expected 0 gpt2 or 1 llama)", path, trunk.arch);
    }
    if (kind != REWARD_HEAD_LINEAR && kind != REWARD_HEAD_MLP) fatal("%s: field kind = %d (expected 0 linear or 1 mlp)", path, kind);
    if (act != REWARD_ACT_GELU && act != REWARD_ACT_RELU) fatal("%s: field activation = %d (expected 0 gelu or 1 relu)", path, act);
    if (dims != MORA_NUM_DIMS) fatal("%s: field num_dims = %d (expected %d: helpful, harmless, truthful)", path, dims, MORA_NUM_DIMS);
    if (C <= 0 || C > (1 << 20)) fatal("%s: field C = %d is not a valid hidden size", path, C);
    if (kind == REWARD_HEAD_MLP && (H <= 0 || H > (1 << 20))) fatal("%s: field H = %d is not a valid mlp width", path, H);
    if (kind == REWARD_HEAD_LINEAR && H != 0) fatal("%s: field H = %d, but a linear head has H = 0", path, H);
    if (expected_C > 0 && C != expected_C)
        fatal("%s: the heads were trained on a trunk with hidden size C=%d, but this model has n_embd=%d", path, C, expected_C);
    size_t want = header_bytes + MORA_NUM_DIMS * head_size_of((RewardHeadKind)kind, C, H) * sizeof(float);
    if (size != want) fatal("%s: size %zu bytes, but kind=%s C=%d H=%d needs %zu", path, size,
                            reward_head_kind_name((RewardHeadKind)kind), C, H, want);
    reward_heads_init(heads, (RewardHeadKind)kind, (RewardHeadActivation)act, C, H);
    heads->trunk = trunk;
    memcpy(heads->params, buf + header_bytes, heads->num_parameters * sizeof(float));
    for (size_t i = 0; i < heads->num_parameters; i++)
        if (!isfinite(heads->params[i])) fatal("%s: parameter %zu is not finite", path, i);
    free(buf);
}
