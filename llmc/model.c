/*
 * The model on the CPU (see model.h for the contract): configs and presets, the parameter
 * layout, forward, backward, AdamW, the learning-rate schedule and the FLOP count.
 *
 * The forward and backward are written out layer by layer like llm.c's train_gpt2.c, from the
 * ops in ops_cpu.c and the products in matmul.c:
 *
 *   GPT-2   x = wte[tok] + wpe[t]
 *           per layer: x += attproj(attention(qkv(layernorm1(x))))
 *                      x += fcproj(gelu(fc(layernorm2(x))))
 *           logits = layernorm_f(x) @ wte^T
 *   Llama   x = wte[tok]
 *           per layer: x += o(attention(rope(q, k), v) of qkv(rmsnorm1(x)))
 *                      x += down(silu(gate) * up), (gate | up) = fc(rmsnorm2(x))
 *           logits = rmsnorm_f(x) @ head^T    (head = wte when tied, else lm_head)
 *
 * Every activation the backward needs is kept, per layer, in one buffer (Activations below);
 * the backward's gradients of activations live in a second buffer (ActivationGrads) that is
 * reused from layer to layer, so it holds one layer's worth.
 */
#include <math.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include "model.h"
#include "matmul.h"
#include "ops_cpu.h"
#include "rand.h"
#include "utils.h"

const char *const param_tensor_names[NUM_PARAM_TENSORS] = {
    "wte", "wpe", "ln1w", "ln1b", "qkvw", "qkvb", "attprojw", "attprojb",
    "ln2w", "ln2b", "fcw", "fcb", "fcprojw", "fcprojb", "lnfw", "lnfb", "lm_head",
};

// Tensors that get weight decay: embeddings and matmul weights (2-D per layer), not norms or
// biases, as in llm.c and GPT-2/Llama practice.
static const int param_is_decayed[NUM_PARAM_TENSORS] = {
    [P_WTE] = 1, [P_WPE] = 1, [P_QKVW] = 1, [P_ATTPROJW] = 1, [P_FCW] = 1, [P_FCPROJW] = 1, [P_LMHEAD] = 1,
};

// ---------------------------------------------------------------------------------------------
// configs

// Upper bounds that keep every size product far from overflowing size_t and int row counts,
// and catch garbage read from a corrupt header.
#define MAX_LAYERS 1024
#define MAX_EMBD (1 << 16)
#define MAX_HEADS 1024
#define MAX_VOCAB (1 << 24)
#define MAX_SEQ_LEN (1 << 20)
#define MAX_FFN (1 << 20)

// Exits with "SOURCE: what is wrong" when the config cannot describe a runnable model.
void model_config_validate(const ModelConfig *c, const char *source) {
    const char *src = source ? source : "model config";
    if (c->arch != ARCH_GPT2 && c->arch != ARCH_LLAMA)
        fatal("%s: unknown architecture %d (0 = gpt2, 1 = llama)", src, (int)c->arch);
    if (c->vocab_size <= 0 || c->vocab_size > MAX_VOCAB)
        fatal("%s: vocab_size %d must be in 1..%d", src, c->vocab_size, MAX_VOCAB);
    if (c->padded_vocab_size < c->vocab_size || c->padded_vocab_size > MAX_VOCAB)
        fatal("%s: padded_vocab_size %d must be in vocab_size (%d)..%d", src, c->padded_vocab_size, c->vocab_size, MAX_VOCAB);
    if (c->max_seq_len <= 0 || c->max_seq_len > MAX_SEQ_LEN)
        fatal("%s: max_seq_len %d must be in 1..%d", src, c->max_seq_len, MAX_SEQ_LEN);
    if (c->n_layer <= 0 || c->n_layer > MAX_LAYERS)
        fatal("%s: n_layer %d must be in 1..%d", src, c->n_layer, MAX_LAYERS);
    if (c->n_embd <= 0 || c->n_embd > MAX_EMBD)
        fatal("%s: n_embd %d must be in 1..%d", src, c->n_embd, MAX_EMBD);
    if (c->n_head <= 0 || c->n_head > MAX_HEADS)
        fatal("%s: n_head %d must be in 1..%d", src, c->n_head, MAX_HEADS);
    if (c->n_kv_head <= 0 || c->n_kv_head > c->n_head)
        fatal("%s: n_kv_head %d must be in 1..n_head (%d)", src, c->n_kv_head, c->n_head);
    if (c->n_head % c->n_kv_head != 0)
        fatal("%s: n_head %d is not a multiple of n_kv_head %d (grouped-query attention shares each key/value head among n_head/n_kv_head query heads)",
              src, c->n_head, c->n_kv_head);
    if (c->head_dim <= 0 || c->head_dim > MAX_EMBD)
        fatal("%s: head_dim %d must be in 1..%d", src, c->head_dim, MAX_EMBD);
    if (c->arch == ARCH_LLAMA && c->head_dim % 2 != 0)
        fatal("%s: head_dim %d must be even (RoPE rotates pairs of dimensions)", src, c->head_dim);
    if (c->arch == ARCH_GPT2 && c->n_kv_head != c->n_head)
        fatal("%s: n_kv_head %d must equal n_head %d for gpt2 (multi-head attention)", src, c->n_kv_head, c->n_head);
    if (c->ffn_hidden <= 0 || c->ffn_hidden > MAX_FFN)
        fatal("%s: ffn_hidden %d must be in 1..%d", src, c->ffn_hidden, MAX_FFN);
    if (!(c->norm_eps > 0.0f) || !isfinite(c->norm_eps) || c->norm_eps > 1.0f)
        fatal("%s: norm_eps %g must be in (0, 1]", src, (double)c->norm_eps);
    if (c->arch == ARCH_LLAMA && (!(c->rope_theta > 1.0f) || !isfinite(c->rope_theta)))
        fatal("%s: rope_theta %g must be a finite number > 1", src, (double)c->rope_theta);
    if (c->tied_embeddings != 0 && c->tied_embeddings != 1)
        fatal("%s: tied_embeddings %d must be 0 or 1", src, c->tied_embeddings);
    if (c->qkv_bias != 0 && c->qkv_bias != 1)
        fatal("%s: qkv_bias %d must be 0 or 1", src, c->qkv_bias);
}

// GPT-2 of n_layer layers, width n_embd, n_head heads, with llm.c's vocabulary padding.
static ModelConfig gpt2_config(int n_layer, int n_embd, int n_head, int V, int Vp, int maxT) {
    ModelConfig c = {0};
    c.arch = ARCH_GPT2;
    c.vocab_size = V;
    c.padded_vocab_size = Vp;
    c.max_seq_len = maxT;
    c.n_layer = n_layer;
    c.n_embd = n_embd;
    c.n_head = n_head;
    c.n_kv_head = n_head;
    c.head_dim = n_embd / n_head;
    c.ffn_hidden = 4 * n_embd;
    c.norm_eps = 1e-5f;
    c.rope_theta = 10000.0f;   // unused by GPT-2; a valid value keeps checkpoints uniform
    c.tied_embeddings = 1;
    c.qkv_bias = 1;
    return c;
}

static ModelConfig llama_config(int V, int maxT, int n_layer, int n_embd, int n_head, int n_kv_head,
                                int head_dim, int ffn_hidden, float norm_eps, float rope_theta, int tied) {
    ModelConfig c = {0};
    c.arch = ARCH_LLAMA;
    c.vocab_size = V;
    c.padded_vocab_size = V;
    c.max_seq_len = maxT;
    c.n_layer = n_layer;
    c.n_embd = n_embd;
    c.n_head = n_head;
    c.n_kv_head = n_kv_head;
    c.head_dim = head_dim;
    c.ffn_hidden = ffn_hidden;
    c.norm_eps = norm_eps;
    c.rope_theta = rope_theta;
    c.tied_embeddings = tied;
    c.qkv_bias = 0;
    return c;
}

// Named presets (model.h). The GPT-2 sizes are llm.c's: d12 is GPT-2 small (124M), d24 medium
// (350M), d36 large (774M), d48 XL (1558M). SmolLM2-135M is HuggingFaceTB/SmolLM2-135M's
// config.json. The tiny ones are for tests and the demo.
int model_config_preset(const char *name, ModelConfig *out) {
    if (name == NULL) return 0;
    if (!strcmp(name, "gpt2:d12")) *out = gpt2_config(12, 768, 12, 50257, 50304, 1024);
    else if (!strcmp(name, "gpt2:d24")) *out = gpt2_config(24, 1024, 16, 50257, 50304, 1024);
    else if (!strcmp(name, "gpt2:d36")) *out = gpt2_config(36, 1280, 20, 50257, 50304, 1024);
    else if (!strcmp(name, "gpt2:d48")) *out = gpt2_config(48, 1600, 25, 50257, 50304, 1024);
    else if (!strcmp(name, "gpt2:tiny")) *out = gpt2_config(2, 64, 4, 256, 256, 64);
    else if (!strcmp(name, "llama:smollm2-135m"))
        *out = llama_config(49152, 8192, 30, 576, 9, 3, 64, 1536, 1e-5f, 100000.0f, 1);
    else if (!strcmp(name, "llama:tiny"))
        *out = llama_config(256, 64, 2, 64, 4, 2, 16, 128, 1e-5f, 10000.0f, 1);
    // head size 64 (the tiny ones above have 16): what the GPU's flash attention takes
    else if (!strcmp(name, "gpt2:tiny64")) *out = gpt2_config(2, 128, 2, 256, 256, 256);
    else if (!strcmp(name, "llama:tiny64"))
        *out = llama_config(256, 256, 2, 128, 2, 1, 64, 256, 1e-5f, 10000.0f, 1);
    else return 0;
    return 1;
}

// ---------------------------------------------------------------------------------------------
// parameters

// Elements of every parameter tensor (model.h's table; 0 for tensors the config does not use).
static void compute_param_sizes(const ModelConfig *c, size_t sizes[NUM_PARAM_TENSORS]) {
    size_t Vp = c->padded_vocab_size, C = c->n_embd, L = c->n_layer, F = c->ffn_hidden;
    size_t HS = c->head_dim, NH = c->n_head, NKV = c->n_kv_head;
    size_t QKV = (NH + 2 * NKV) * HS;
    int gpt2 = c->arch == ARCH_GPT2;
    sizes[P_WTE] = Vp * C;
    sizes[P_WPE] = gpt2 ? (size_t)c->max_seq_len * C : 0;
    sizes[P_LN1W] = L * C;
    sizes[P_LN1B] = gpt2 ? L * C : 0;
    sizes[P_QKVW] = L * QKV * C;
    sizes[P_QKVB] = c->qkv_bias ? L * QKV : 0;
    sizes[P_ATTPROJW] = L * C * NH * HS;
    sizes[P_ATTPROJB] = gpt2 ? L * C : 0;
    sizes[P_LN2W] = L * C;
    sizes[P_LN2B] = gpt2 ? L * C : 0;
    sizes[P_FCW] = L * (gpt2 ? F : 2 * F) * C;
    sizes[P_FCB] = gpt2 ? L * F : 0;
    sizes[P_FCPROJW] = L * C * F;
    sizes[P_FCPROJB] = gpt2 ? L * C : 0;
    sizes[P_LNFW] = C;
    sizes[P_LNFB] = gpt2 ? C : 0;
    sizes[P_LMHEAD] = c->tied_embeddings ? 0 : Vp * C;
}

// Points ptrs[i] into buffer at tensor i's offset (NULL for empty tensors).
static void point_tensors(float *buffer, const size_t sizes[NUM_PARAM_TENSORS], float *ptrs[NUM_PARAM_TENSORS]) {
    size_t offset = 0;
    for (int i = 0; i < NUM_PARAM_TENSORS; i++) {
        ptrs[i] = sizes[i] ? buffer + offset : NULL;
        offset += sizes[i];
    }
}

void model_layout(Model *model, const ModelConfig *config, const char *source) {
    model_config_validate(config, source);
    memset(model, 0, sizeof(*model));
    model->config = *config;
    compute_param_sizes(config, model->param_sizes);
    size_t total = 0;
    for (int i = 0; i < NUM_PARAM_TENSORS; i++) total += model->param_sizes[i];
    model->num_parameters = total;
    model->mean_loss = -1.0f;
}

// Validates the config, computes the layout, allocates params and grads (zeroed). A config too
// large for the memory is named with its source and what it asks for, not with a source line.
void model_init(Model *model, const ModelConfig *config, const char *source) {
    model_layout(model, config, source);
    size_t total = model->num_parameters;
    model->params = (float *)calloc(total, sizeof(float));
    model->grads = model->params ? (float *)calloc(total, sizeof(float)) : NULL;
    if (model->params == NULL || model->grads == NULL)
        fatal("%s: out of memory: its config (%d layers, %d channels, vocabulary %d) asks for %zu parameters, "
              "%.1f GiB for the weights and their gradients", source ? source : "model config", config->n_layer,
              config->n_embd, config->padded_vocab_size, total, 2.0 * (double)total * sizeof(float) / (1 << 30));
    point_tensors(model->params, model->param_sizes, model->param_ptrs);
    point_tensors(model->grads, model->param_sizes, model->grad_ptrs);
}

// GPT-2 / llm.c init: matmul weights and embeddings N(0, 0.02); the two projections that write
// into the residual stream (attproj, fcproj) N(0, 0.02 / sqrt(2L)) so the stream's variance
// does not grow with depth; norm weights 1; biases 0. The padded vocabulary rows of the
// embedding / head stay 0 (no token ever reads them). One RNG stream in buffer order, so a
// seed always gives the same model.
void model_init_random(Model *model, uint64_t seed) {
    const ModelConfig *c = &model->config;
    uint64_t state = rng_seed(seed);
    float residual_std = 0.02f / sqrtf(2.0f * c->n_layer);
    memset(model->params, 0, model->num_parameters * sizeof(float));
    for (int i = 0; i < NUM_PARAM_TENSORS; i++) {
        float *p = model->param_ptrs[i];
        size_t n = model->param_sizes[i];
        if (n == 0) continue;
        switch (i) {
        case P_LN1W: case P_LN2W: case P_LNFW:
            for (size_t j = 0; j < n; j++) p[j] = 1.0f;
            break;
        case P_LN1B: case P_LN2B: case P_LNFB: case P_QKVB: case P_ATTPROJB: case P_FCB: case P_FCPROJB:
            break;
        case P_WTE: case P_LMHEAD:
            for (size_t j = 0; j < (size_t)c->vocab_size * c->n_embd; j++) p[j] = 0.02f * random_normal(&state);
            break;
        case P_ATTPROJW: case P_FCPROJW:
            for (size_t j = 0; j < n; j++) p[j] = residual_std * random_normal(&state);
            break;
        default:  // P_WPE, P_QKVW, P_FCW
            for (size_t j = 0; j < n; j++) p[j] = 0.02f * random_normal(&state);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// activations

// What the forward keeps for the backward, for one batch shape (B, T). Per-layer tensors are
// stacked (L, ...). N = B*T rows; FC = F (GPT-2) or 2F (Llama: gate | up).
typedef struct {
    float *encoded;     // (N, C)        embedding output, the first layer's input
    float *ln1;         // (L, N, C)     pre-attention norm output
    float *ln1_mean;    // (L, N)        LayerNorm mean (GPT-2; unused for Llama)
    float *ln1_rstd;    // (L, N)
    float *qkv;         // (L, N, QKV)   q | k | v, q and k after RoPE for Llama
    float *att;         // (L, B, NH, T, T) attention probabilities
    float *atty;        // (L, N, NH*HS) attention output, before the projection
    float *residual2;   // (L, N, C)     stream after the attention block
    float *ln2;         // (L, N, C)
    float *ln2_mean;    // (L, N)
    float *ln2_rstd;    // (L, N)
    float *fch;         // (L, N, FC)    MLP up projection (pre-activation)
    float *fch_act;     // (L, N, F)     gelu(fch) or silu(gate) * up
    float *residual3;   // (L, N, C)     stream after the MLP block, the next layer's input
    float *lnf;         // (N, C)        final norm output = model->hidden
    float *lnf_mean;    // (N)
    float *lnf_rstd;    // (N)
    float *logits;      // (N, Vp)
    float *lse;         // (N)           log-sum-exp over the first V logits
    float *losses;      // (N)           -log p(target), 0 where the mask is 0
    float *proj;        // (N, C)        scratch: a projection's output before the residual add
    float *mask;        // (N)           the forward's loss mask (1 where none was given)
    float *weights;     // (N)           model_backward's per-token weights
    int *inputs;        // (N)
    int *targets;       // (N)
} Activations;

// Gradients of activations for the backward, one layer's worth, reused from layer to layer.
typedef struct {
    float *dresidual;   // (N, C)        gradient of the residual stream at the current point
    float *dnorm;       // (N, C)        gradient at a norm's output (ln1, ln2 or lnf)
    float *dqkv;        // (N, QKV)
    float *datt;        // (B, NH, T, T) gradient at the pre-softmax scores (scratch)
    float *datty;       // (N, NH*HS)
    float *dfch;        // (N, FC)
    float *dfch_act;    // (N, F)
    float *dlogits;     // (N, Vp)
    float *weights;     // (N)           the loss weights, zero where the mask is 0
} ActivationGrads;

typedef struct {
    Activations acts;
    float *acts_memory;
    size_t acts_capacity;       // floats allocated in acts_memory
    ActivationGrads grads;
    float *grads_memory;
    size_t grads_capacity;
    int *int_memory;            // inputs and targets
    size_t int_capacity;
} ActivationStore;

// Lays out consecutive tensors of the given sizes in memory (memory may be NULL to only count);
// returns the total number of floats.
static size_t carve(float *memory, float **ptrs[], const size_t *sizes, int count) {
    size_t offset = 0;
    for (int i = 0; i < count; i++) {
        if (memory) *ptrs[i] = memory + offset;
        offset += sizes[i];
    }
    return offset;
}

// Points the activations at memory for shape (B, T); returns the floats needed.
static size_t layout_activations(Activations *a, float *memory, const ModelConfig *c, int B, int T) {
    size_t N = (size_t)B * T, L = c->n_layer, C = c->n_embd, NH = c->n_head, HS = c->head_dim;
    size_t QKV = (size_t)(c->n_head + 2 * c->n_kv_head) * HS;
    size_t F = c->ffn_hidden, FC = c->arch == ARCH_GPT2 ? F : 2 * F, Vp = c->padded_vocab_size;
    float **ptrs[] = {&a->encoded, &a->ln1, &a->ln1_mean, &a->ln1_rstd, &a->qkv, &a->att, &a->atty,
                      &a->residual2, &a->ln2, &a->ln2_mean, &a->ln2_rstd, &a->fch, &a->fch_act,
                      &a->residual3, &a->lnf, &a->lnf_mean, &a->lnf_rstd, &a->logits, &a->lse,
                      &a->losses, &a->proj, &a->mask, &a->weights};
    size_t sizes[] = {N * C, L * N * C, L * N, L * N, L * N * QKV, L * B * NH * T * T, L * N * NH * HS,
                      L * N * C, L * N * C, L * N, L * N, L * N * FC, L * N * F,
                      L * N * C, N * C, N, N, N * Vp, N,
                      N, N * C, N, N};
    return carve(memory, ptrs, sizes, (int)(sizeof(sizes) / sizeof(sizes[0])));
}

static size_t layout_activation_grads(ActivationGrads *g, float *memory, const ModelConfig *c, int B, int T) {
    size_t N = (size_t)B * T, C = c->n_embd, NH = c->n_head, HS = c->head_dim;
    size_t QKV = (size_t)(c->n_head + 2 * c->n_kv_head) * HS;
    size_t F = c->ffn_hidden, FC = c->arch == ARCH_GPT2 ? F : 2 * F, Vp = c->padded_vocab_size;
    float **ptrs[] = {&g->dresidual, &g->dnorm, &g->dqkv, &g->datt, &g->datty, &g->dfch, &g->dfch_act,
                      &g->dlogits, &g->weights};
    size_t sizes[] = {N * C, N * C, N * QKV, B * NH * T * T, N * NH * HS, N * FC, N * F, N * Vp, N};
    return carve(memory, ptrs, sizes, (int)(sizeof(sizes) / sizeof(sizes[0])));
}

// Allocates one of the CPU model's B x T buffers. When memory runs out, the message says how
// much the shape asked for and which flags shrink it, not only the allocator's byte count.
static float *alloc_for_shape(size_t count, const char *what, int B, int T) {
    float *p = (float *)malloc(count ? count * sizeof(float) : 1);
    if (p == NULL)
        fatal("out of memory: the CPU model's %s for B=%d x T=%d tokens need %.2f GiB; "
              "a smaller batch or sequence length needs less (pretrain, reward: --batch_size, --seq_len; "
              "mora: --fwd_batch, --seq_len)",
              what, B, T, (double)count * sizeof(float) / (1024.0 * 1024.0 * 1024.0));
    return p;
}

// Makes the activation buffer fit (B, T): grows it when this shape needs more than is
// allocated (a larger B*T, or a larger B*T*T for the attention probabilities), then points the
// tensors into it. The gradient buffer is re-laid out lazily by the backward.
static ActivationStore *prepare_activations(Model *model, int B, int T) {
    ActivationStore *s = (ActivationStore *)model->acts_private;
    if (s == NULL) {
        s = (ActivationStore *)callocCheck(1, sizeof(ActivationStore));
        model->acts_private = s;
    }
    size_t need = layout_activations(&s->acts, NULL, &model->config, B, T);
    if (need > s->acts_capacity) {
        free(s->acts_memory);
        s->acts_memory = alloc_for_shape(need, "activations", B, T);
        s->acts_capacity = need;
    }
    layout_activations(&s->acts, s->acts_memory, &model->config, B, T);
    size_t need_ints = 2 * (size_t)B * T;
    if (need_ints > s->int_capacity) {
        free(s->int_memory);
        s->int_memory = (int *)mallocCheck(need_ints * sizeof(int));
        s->int_capacity = need_ints;
    }
    s->acts.inputs = s->int_memory;
    s->acts.targets = s->int_memory + (size_t)B * T;
    return s;
}

static void free_activations(Model *model) {
    ActivationStore *s = (ActivationStore *)model->acts_private;
    if (s == NULL) return;
    free(s->acts_memory);
    free(s->grads_memory);
    free(s->int_memory);
    free(s);
    model->acts_private = NULL;
}

void model_free(Model *model) {
    free(model->params);
    free(model->grads);
    free(model->m);
    free(model->v);
    free_activations(model);
    memset(model, 0, sizeof(*model));
}

// ---------------------------------------------------------------------------------------------
// forward

// Per-layer views into the stacked parameters (or, given grad_ptrs, their gradients) and the
// activations of layer l.
typedef struct {
    float *ln1w, *ln1b, *qkvw, *qkvb, *attprojw, *attprojb, *ln2w, *ln2b, *fcw, *fcb, *fcprojw, *fcprojb;
    float *ln1, *ln1_mean, *ln1_rstd, *qkv, *att, *atty, *residual2, *ln2, *ln2_mean, *ln2_rstd;
    float *fch, *fch_act, *residual3;
    const float *residual;   // the layer's input: encoded for l = 0, else residual3 of l - 1
} LayerView;

// A stacked tensor's slice for layer l (NULL stays NULL: the tensor is unused).
static float *layer_slice(float *base, size_t total, int L, int l) {
    return base ? base + (total / L) * l : NULL;
}

static LayerView layer_view(const Model *model, float *const ptrs[NUM_PARAM_TENSORS], const Activations *a, int l) {
    const ModelConfig *c = &model->config;
    const size_t *sz = model->param_sizes;
    int L = c->n_layer;
    size_t N = (size_t)model->B * model->T, C = c->n_embd, NH = c->n_head, HS = c->head_dim;
    size_t QKV = (size_t)(c->n_head + 2 * c->n_kv_head) * HS;
    size_t F = c->ffn_hidden, FC = c->arch == ARCH_GPT2 ? F : 2 * F;
    LayerView v;
    v.ln1w = layer_slice(ptrs[P_LN1W], sz[P_LN1W], L, l);
    v.ln1b = layer_slice(ptrs[P_LN1B], sz[P_LN1B], L, l);
    v.qkvw = layer_slice(ptrs[P_QKVW], sz[P_QKVW], L, l);
    v.qkvb = layer_slice(ptrs[P_QKVB], sz[P_QKVB], L, l);
    v.attprojw = layer_slice(ptrs[P_ATTPROJW], sz[P_ATTPROJW], L, l);
    v.attprojb = layer_slice(ptrs[P_ATTPROJB], sz[P_ATTPROJB], L, l);
    v.ln2w = layer_slice(ptrs[P_LN2W], sz[P_LN2W], L, l);
    v.ln2b = layer_slice(ptrs[P_LN2B], sz[P_LN2B], L, l);
    v.fcw = layer_slice(ptrs[P_FCW], sz[P_FCW], L, l);
    v.fcb = layer_slice(ptrs[P_FCB], sz[P_FCB], L, l);
    v.fcprojw = layer_slice(ptrs[P_FCPROJW], sz[P_FCPROJW], L, l);
    v.fcprojb = layer_slice(ptrs[P_FCPROJB], sz[P_FCPROJB], L, l);
    v.ln1 = a->ln1 + l * N * C;
    v.ln1_mean = a->ln1_mean + l * N;
    v.ln1_rstd = a->ln1_rstd + l * N;
    v.qkv = a->qkv + l * N * QKV;
    v.att = a->att + l * (size_t)model->B * NH * model->T * model->T;
    v.atty = a->atty + l * N * NH * HS;
    v.residual2 = a->residual2 + l * N * C;
    v.ln2 = a->ln2 + l * N * C;
    v.ln2_mean = a->ln2_mean + l * N;
    v.ln2_rstd = a->ln2_rstd + l * N;
    v.fch = a->fch + l * N * FC;
    v.fch_act = a->fch_act + l * N * F;
    v.residual3 = a->residual3 + l * N * C;
    v.residual = l == 0 ? a->encoded : a->residual3 + (l - 1) * N * C;
    return v;
}

// The family's norm: LayerNorm (weight, bias; saves mean and rstd) for GPT-2, RMSNorm (weight;
// saves rstd) for Llama.
static void norm_forward(const ModelConfig *c, float *out, float *mean, float *rstd, const float *inp,
                         const float *weight, const float *bias, int N) {
    if (c->arch == ARCH_GPT2) layernorm_forward(out, mean, rstd, inp, weight, bias, N, c->n_embd, c->norm_eps);
    else rmsnorm_forward(out, rstd, inp, weight, N, c->n_embd, c->norm_eps);
}

static void norm_backward(const ModelConfig *c, float *dinp, float *dweight, float *dbias, const float *dout,
                          const float *inp, const float *weight, const float *mean, const float *rstd, int N) {
    if (c->arch == ARCH_GPT2) layernorm_backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd, N, c->n_embd);
    else rmsnorm_backward(dinp, dweight, dout, inp, weight, rstd, N, c->n_embd);
}

// The classifier weight: lm_head when untied, else the token embedding.
static int head_tensor(const ModelConfig *c) { return c->tied_embeddings ? P_WTE : P_LMHEAD; }

// Checks the batch: shape, token ids, targets where they count, the mask's values.
static void check_batch(const ModelConfig *c, const int *inputs, const int *targets, const float *loss_mask, int B, int T) {
    if (B <= 0 || T <= 0) fatal("model_forward: batch shape B=%d T=%d must be positive", B, T);
    if (T > c->max_seq_len) fatal("model_forward: sequence length T=%d exceeds the model's max_seq_len %d", T, c->max_seq_len);
    if ((size_t)B * T > (size_t)1 << 30) fatal("model_forward: batch of %d x %d tokens is too large", B, T);
    for (int i = 0; i < B * T; i++) {
        if (inputs[i] < 0 || inputs[i] >= c->padded_vocab_size)
            fatal("model_forward: input token %d at (b=%d, t=%d) is outside the vocabulary 0..%d",
                  inputs[i], i / T, i % T, c->padded_vocab_size - 1);
        if (loss_mask && !(isfinite(loss_mask[i]) && loss_mask[i] >= 0.0f))
            fatal("model_forward: loss mask %g at (b=%d, t=%d) must be a finite value >= 0", (double)loss_mask[i], i / T, i % T);
        int counts = loss_mask == NULL || loss_mask[i] != 0.0f;
        if (targets && counts && (targets[i] < 0 || targets[i] >= c->vocab_size))
            fatal("model_forward: target token %d at (b=%d, t=%d) is outside the vocabulary 0..%d",
                  targets[i], i / T, i % T, c->vocab_size - 1);
    }
}

// Forward pass (model.h). The loss of position bt is counted with weight mask[bt]:
// mean_loss = sum_bt mask[bt] * loss[bt] / sum_bt mask[bt] (a 0/1 mask makes it the mean over
// the masked positions; 0 when the mask selects nothing).
void model_forward(Model *model, const int *inputs, const int *targets, const float *loss_mask, int B, int T) {
    const ModelConfig *c = &model->config;
    if (model->params == NULL) fatal("model_forward: the model is not initialised (call model_init first)");
    check_batch(c, inputs, targets, loss_mask, B, T);
    ActivationStore *s = prepare_activations(model, B, T);
    Activations *a = &s->acts;
    model->B = B;
    model->T = T;
    int N = B * T, C = c->n_embd, NH = c->n_head, NKV = c->n_kv_head, HS = c->head_dim;
    int QKV = (NH + 2 * NKV) * HS, F = c->ffn_hidden, FC = c->arch == ARCH_GPT2 ? F : 2 * F;
    int V = c->vocab_size, Vp = c->padded_vocab_size;
    int gpt2 = c->arch == ARCH_GPT2;

    memcpy(a->inputs, inputs, (size_t)N * sizeof(int));
    if (targets) memcpy(a->targets, targets, (size_t)N * sizeof(int));
    for (int i = 0; i < N; i++) a->mask[i] = loss_mask ? loss_mask[i] : 1.0f;

    encoder_forward(a->encoded, inputs, model->param_ptrs[P_WTE], gpt2 ? model->param_ptrs[P_WPE] : NULL, B, T, C);
    for (int l = 0; l < c->n_layer; l++) {
        LayerView v = layer_view(model, model->param_ptrs, a, l);
        // attention block
        norm_forward(c, v.ln1, v.ln1_mean, v.ln1_rstd, v.residual, v.ln1w, v.ln1b, N);
        matmul_forward(v.qkv, v.ln1, v.qkvw, v.qkvb, N, C, QKV);
        if (!gpt2) rope_forward(v.qkv, B, T, NH, NKV, HS, c->rope_theta);
        attention_forward(v.atty, v.att, v.qkv, B, T, NH, NKV, HS);
        matmul_forward(a->proj, v.atty, v.attprojw, v.attprojb, N, NH * HS, C);
        residual_forward(v.residual2, v.residual, a->proj, (size_t)N * C);
        // MLP block
        norm_forward(c, v.ln2, v.ln2_mean, v.ln2_rstd, v.residual2, v.ln2w, v.ln2b, N);
        matmul_forward(v.fch, v.ln2, v.fcw, v.fcb, N, C, FC);
        if (gpt2) gelu_forward(v.fch_act, v.fch, (size_t)N * F);
        else swiglu_forward(v.fch_act, v.fch, N, F);
        matmul_forward(a->proj, v.fch_act, v.fcprojw, v.fcprojb, N, F, C);
        residual_forward(v.residual3, v.residual2, a->proj, (size_t)N * C);
    }
    const float *last = a->residual3 + (size_t)(c->n_layer - 1) * N * C;
    norm_forward(c, a->lnf, a->lnf_mean, a->lnf_rstd, last, model->param_ptrs[P_LNFW], model->param_ptrs[P_LNFB], N);
    matmul_forward(a->logits, a->lnf, model->param_ptrs[head_tensor(c)], NULL, N, C, Vp);

    model->logits = a->logits;
    model->hidden = a->lnf;
    model->token_losses = a->losses;
    model->has_targets = targets != NULL;
    if (targets) {
        classifier_forward(a->losses, a->lse, a->logits, a->targets, a->mask, N, V, Vp);
        double weighted = 0.0, count = 0.0;
        for (int i = 0; i < N; i++) {
            weighted += (double)a->mask[i] * a->losses[i];
            count += a->mask[i];
        }
        model->mean_loss = count > 0.0 ? (float)(weighted / count) : 0.0f;
    } else {
        memset(a->losses, 0, (size_t)N * sizeof(float));
        model->mean_loss = -1.0f;
    }
}

// ---------------------------------------------------------------------------------------------
// backward

void model_zero_grad(Model *model) {
    memset(model->grads, 0, model->num_parameters * sizeof(float));
}

// Backward of sum_bt token_weights[bt] * token_losses[bt] + <dhidden, hidden>, accumulated into
// model->grads. Walks the forward in reverse; dresidual carries the gradient of the residual
// stream down the layers, each block adding its branch's gradient to it (the residual add
// passes the gradient through unchanged).
void model_backward_weighted(Model *model, const float *token_weights, const float *dhidden) {
    const ModelConfig *c = &model->config;
    ActivationStore *s = (ActivationStore *)model->acts_private;
    if (s == NULL || model->B <= 0) fatal("model_backward: no forward pass to differentiate (call model_forward first)");
    if (token_weights && !model->has_targets)
        fatal("model_backward: the last forward had no targets, so there is no loss to differentiate");
    if (token_weights == NULL && dhidden == NULL) return;   // nothing reaches the parameters
    int B = model->B, T = model->T;
    int N = B * T, C = c->n_embd, NH = c->n_head, NKV = c->n_kv_head, HS = c->head_dim;
    int QKV = (NH + 2 * NKV) * HS, F = c->ffn_hidden, FC = c->arch == ARCH_GPT2 ? F : 2 * F;
    int V = c->vocab_size, Vp = c->padded_vocab_size;
    int gpt2 = c->arch == ARCH_GPT2;
    Activations *a = &s->acts;

    size_t need = layout_activation_grads(&s->grads, NULL, c, B, T);
    if (need > s->grads_capacity) {
        free(s->grads_memory);
        s->grads_memory = alloc_for_shape(need, "activation gradients", B, T);
        s->grads_capacity = need;
    }
    ActivationGrads *g = &s->grads;
    layout_activation_grads(g, s->grads_memory, c, B, T);
    size_t NC = (size_t)N * C;

    // classifier and head: dnorm = gradient at the final norm's output (= model->hidden)
    memset(g->dnorm, 0, NC * sizeof(float));
    int head = head_tensor(c);
    if (token_weights) {
        // a position whose mask is 0 has loss 0 whatever its logits, so its weight is dropped
        for (int i = 0; i < N; i++) g->weights[i] = a->mask[i] != 0.0f ? token_weights[i] : 0.0f;
        memset(g->dlogits, 0, (size_t)N * Vp * sizeof(float));
        classifier_backward(g->dlogits, a->logits, a->lse, a->targets, g->weights, N, V, Vp);
        matmul_backward(g->dnorm, model->grad_ptrs[head], NULL, g->dlogits, a->lnf, model->param_ptrs[head], N, C, Vp);
    }
    if (dhidden) {
        for (size_t i = 0; i < NC; i++) g->dnorm[i] += dhidden[i];
    }
    memset(g->dresidual, 0, NC * sizeof(float));
    const float *last = a->residual3 + (size_t)(c->n_layer - 1) * NC;
    norm_backward(c, g->dresidual, model->grad_ptrs[P_LNFW], model->grad_ptrs[P_LNFB], g->dnorm,
                  last, model->param_ptrs[P_LNFW], a->lnf_mean, a->lnf_rstd, N);

    for (int l = c->n_layer - 1; l >= 0; l--) {
        LayerView v = layer_view(model, model->param_ptrs, a, l);
        LayerView dv = layer_view(model, model->grad_ptrs, a, l);   // only its parameter views are used
        // MLP block: residual3 = residual2 + fcproj(act(fc(norm2(residual2))))
        memset(g->dfch_act, 0, (size_t)N * F * sizeof(float));
        matmul_backward(g->dfch_act, dv.fcprojw, dv.fcprojb, g->dresidual, v.fch_act, v.fcprojw, N, F, C);
        memset(g->dfch, 0, (size_t)N * FC * sizeof(float));
        if (gpt2) gelu_backward(g->dfch, v.fch, g->dfch_act, (size_t)N * F);
        else swiglu_backward(g->dfch, g->dfch_act, v.fch, N, F);
        memset(g->dnorm, 0, NC * sizeof(float));
        matmul_backward(g->dnorm, dv.fcw, dv.fcb, g->dfch, v.ln2, v.fcw, N, C, FC);
        norm_backward(c, g->dresidual, dv.ln2w, dv.ln2b, g->dnorm, v.residual2, v.ln2w,
                      v.ln2_mean, v.ln2_rstd, N);
        // attention block: residual2 = residual + attproj(attention(qkv(norm1(residual))))
        memset(g->datty, 0, (size_t)N * NH * HS * sizeof(float));
        matmul_backward(g->datty, dv.attprojw, dv.attprojb, g->dresidual, v.atty, v.attprojw, N, NH * HS, C);
        memset(g->dqkv, 0, (size_t)N * QKV * sizeof(float));
        attention_backward(g->dqkv, g->datt, g->datty, v.qkv, v.att, B, T, NH, NKV, HS);
        if (!gpt2) rope_backward(g->dqkv, B, T, NH, NKV, HS, c->rope_theta);
        memset(g->dnorm, 0, NC * sizeof(float));
        matmul_backward(g->dnorm, dv.qkvw, dv.qkvb, g->dqkv, v.ln1, v.qkvw, N, C, QKV);
        norm_backward(c, g->dresidual, dv.ln1w, dv.ln1b, g->dnorm, v.residual, v.ln1w,
                      v.ln1_mean, v.ln1_rstd, N);
    }
    // dresidual is now the gradient at the embedding output; for tied models this adds to the
    // classifier's gradient already in grads[P_WTE]
    encoder_backward(model->grad_ptrs[P_WTE], gpt2 ? model->grad_ptrs[P_WPE] : NULL, g->dresidual, a->inputs, B, T, C);
}

// scale * mean_loss = sum_bt (scale * mask[bt] / sum(mask)) * token_losses[bt]
void model_backward(Model *model, float scale) {
    ActivationStore *s = (ActivationStore *)model->acts_private;
    if (s == NULL || model->B <= 0) fatal("model_backward: no forward pass to differentiate (call model_forward first)");
    if (!model->has_targets) fatal("model_backward: the last forward had no targets, so there is no loss to differentiate");
    Activations *a = &s->acts;
    int N = model->B * model->T;
    double count = 0.0;
    for (int i = 0; i < N; i++) count += a->mask[i];
    for (int i = 0; i < N; i++) a->weights[i] = count > 0.0 ? (float)(scale * a->mask[i] / count) : 0.0f;
    model_backward_weighted(model, a->weights, NULL);
}

// ---------------------------------------------------------------------------------------------
// optimizer

// Global L2 norm of the gradients. The sum of squares is taken in fixed chunks in double and
// the chunk sums added in order, so the result does not depend on the number of threads.
float model_grad_norm(const Model *model) {
    const size_t chunk = (size_t)1 << 16;
    size_t n = model->num_parameters, n_chunks = (n + chunk - 1) / chunk;
    double *partial = (double *)mallocCheck((n_chunks ? n_chunks : 1) * sizeof(double));
    const float *grads = model->grads;
    #pragma omp parallel for schedule(static)
    for (size_t k = 0; k < n_chunks; k++) {
        size_t end = (k + 1) * chunk < n ? (k + 1) * chunk : n;
        double sum = 0.0;
        for (size_t i = k * chunk; i < end; i++) sum += (double)grads[i] * grads[i];
        partial[k] = sum;
    }
    double total = 0.0;
    for (size_t k = 0; k < n_chunks; k++) total += partial[k];
    free(partial);
    return (float)sqrt(total);
}

// AdamW (PyTorch semantics), step t = opt_step after the increment, g = grad * grad_scale:
//   m = beta1 m + (1 - beta1) g,   v = beta2 v + (1 - beta2) g^2
//   p = p (1 - lr wd) - lr (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)
// with wd = weight_decay on the decayed tensors (param_is_decayed) and 0 elsewhere.
void model_adamw_update(Model *model, float lr, float beta1, float beta2, float eps,
                        float weight_decay, float grad_scale) {
    size_t n = model->num_parameters;
    if (model->m == NULL) model->m = (float *)callocCheck(n, sizeof(float));
    if (model->v == NULL) model->v = (float *)callocCheck(n, sizeof(float));
    model->opt_step++;
    int t = model->opt_step;
    float bias_correction1 = (float)(1.0 - pow((double)beta1, t));
    float bias_correction2 = (float)(1.0 - pow((double)beta2, t));
    size_t offset = 0;
    for (int tensor = 0; tensor < NUM_PARAM_TENSORS; tensor++) {
        size_t size = model->param_sizes[tensor];
        float decay = param_is_decayed[tensor] ? 1.0f - lr * weight_decay : 1.0f;
        float *p = model->params + offset, *grad = model->grads + offset;
        float *m = model->m + offset, *v = model->v + offset;
        #pragma omp parallel for schedule(static)
        for (size_t i = 0; i < size; i++) {
            float gi = grad[i] * grad_scale;
            float mi = beta1 * m[i] + (1.0f - beta1) * gi;
            float vi = beta2 * v[i] + (1.0f - beta2) * gi * gi;
            m[i] = mi;
            v[i] = vi;
            float m_hat = mi / bias_correction1, v_hat = vi / bias_correction2;
            p[i] = p[i] * decay - lr * m_hat / (sqrtf(v_hat) + eps);
        }
        offset += size;
    }
}

// Step 0-based. Warmup: max_lr * (step + 1) / warmup_steps for step < warmup_steps (llm.c's, so
// the first step does not run at lr 0). Then cosine from max_lr (at step = warmup_steps) to
// min_lr (at step = total_steps); min_lr from there on.
float lr_schedule(int step, int warmup_steps, int total_steps, float max_lr, float min_lr) {
    if (step < warmup_steps) return max_lr * (float)(step + 1) / (float)warmup_steps;
    if (step >= total_steps || total_steps <= warmup_steps) return min_lr;
    double ratio = (double)(step - warmup_steps) / (double)(total_steps - warmup_steps);
    double coeff = 0.5 * (1.0 + cos(M_PI * ratio));
    return (float)(min_lr + coeff * (max_lr - min_lr));
}

// FLOPs of one training step on B x T tokens (forward + backward):
//   6 * P_matmul * B*T + 12 * L * NH * HS * T * B*T
// P_matmul = the weights that go through matrix products (per layer QKV*C + C*NH*HS + FC*C + C*F,
// plus the Vp*C classifier): 2 FLOPs per weight per token forward, 4 backward. The attention
// term counts q.k and att.v over the full T x T (2 * 2 * NH*HS*T per token per layer forward,
// twice that backward), as PaLM and llm.c do, although the causal mask skips half of it.
double model_flops_per_step(const ModelConfig *c, int B, int T) {
    double C = c->n_embd, L = c->n_layer, NH = c->n_head, HS = c->head_dim, F = c->ffn_hidden;
    double QKV = (c->n_head + 2.0 * c->n_kv_head) * HS, FC = c->arch == ARCH_GPT2 ? F : 2.0 * F;
    double matmul_params = L * (QKV * C + C * NH * HS + FC * C + C * F) + (double)c->padded_vocab_size * C;
    double tokens = (double)B * T;
    return 6.0 * matmul_params * tokens + 12.0 * L * NH * HS * T * tokens;
}
