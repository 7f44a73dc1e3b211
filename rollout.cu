/*
 * GPU rollout engine (rollout.h): batched generation with a bf16 KV cache, sampling on the GPU,
 * per-token log-probs, and the decode step replayed as a CUDA graph.
 *
 *   prefill   the prompts, right-padded to the longest of a chunk, go through the training
 *             kernels (encoder, fused residual + norm, cuBLASLt products, RoPE, the causal
 *             attention of attention_flash.cuh, or attention.cuh for head sizes other than 64 and
 *             128); each layer's keys and values of the real positions are
 *             copied into the cache; the final hidden state of each prompt's last token gives the
 *             logits of the first new token.
 *   decode    one row per running sequence: its last token at its own position. Per layer: norm,
 *             qkv product, GQA-aware split attention over the cache (decode_attention.cuh), which
 *             also rotates q and k (RoPE) and writes the row's key and value at (slot, pos),
 *             projection, MLP; then the logits
 *             (fp32) and the fused sampler (sampling.cuh), which also advances every row's token,
 *             position and step on the device. One step therefore needs nothing from the host
 *             but a launch, and its shape (the number of rows) is fixed while the set of running
 *             sequences does not change: it is captured once as a CUDA graph and replayed.
 *   host      after every step the host reads the sampled tokens and log-probs, calls on_token,
 *             and applies the stop rules exactly as generate.c does (stop ids, stop strings on
 *             the decoded text, max_new_tokens). When sequences finish, the running ones are
 *             compacted to the front and the row count drops to the next bucket size (1, 2, 4,
 *             8, then multiples of 8, 32, 128); the rows past the running ones are padding that
 *             points at a spare cache slot, computes harmlessly and never advances.
 *
 * Precision as the CUDA training model (model_cuda.cu): bf16 weights, activations and KV cache,
 * fp32 residual stream, fp32 accumulation, fp32 logits for sampling.
 *
 * Reference path (options.reference): the prompts go through the decode path as rows (as
 * generate.c's cached forward does), the attention and the sampler are the plain kernels. The
 * harnesses compare both paths.
 */
#include <float.h>
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <algorithm>
#include <vector>
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cublasLt.h>
extern "C" {
#include "utils.h"
#include "rand.h"
}
#include "rollout.h"

// The training backend's headers define kernels that are not templates, with external linkage;
// model_cuda.o has the same definitions, and train_mora links both objects. An anonymous
// namespace gives this file's copies internal linkage (the system headers they include are
// already included above, so only the project's definitions land in the namespace).
namespace {
#include "cuda_common.h"
#include "encoder.cuh"
#include "layernorm.cuh"
#include "rope.cuh"
#include "attention.cuh"
#include "attention_flash.cuh"
#include "gelu.cuh"
#include "swiglu.cuh"
#include "matmul.cuh"
#include "philox.h"
#include "decode_attention.cuh"
#include "decode_matmul.cuh"
#include "sampling.cuh"
}

#define ROLLOUT_PREFILL_ROWS 16384   // rows of the activation buffers (prefill chunks use them all)
#define ROLLOUT_MAX_GRAPHS 64   // captured shapes: rows x steps a launch x sampling kind
#define ROLLOUT_MAX_BLOCKS 64
#define ROLLOUT_PROFILE_EVENTS 1024  // events a profiled decode step records, at most
#define ROLLOUT_BRANCH_MIN_ROWS 4    // rows of a decode step's group, at least (options.branches)
#define ROLLOUT_MAX_ATTENTION_TUNED 128   // decode attention shapes tuned per process (options.attention_loads)
static_assert(ROLLOUT_ATTENTION_LOADS_DIRECT == DECODE_LOADS_DIRECT && ROLLOUT_ATTENTION_LOADS_EARLY == DECODE_LOADS_EARLY &&
              ROLLOUT_ATTENTION_LOADS_STAGED == DECODE_LOADS_STAGED, "rollout.h's attention loads are decode_attention.cuh's");

// The kernel groups of a decode step that options.profile times (prof_mark after each).
enum { PG_START, PG_EMBED, PG_QKV, PG_ATTENTION, PG_ATTPROJ, PG_NORM, PG_FC, PG_ACT, PG_FCPROJ, PG_LOGITS, PG_SAMPLE,
       PG_COUNT };
static const char *const profile_group_names[PG_COUNT] = {
    "", "embedding + first norm", "qkv product", "attention (+ cache write)", "attention projection",
    "residual + norm", "MLP up product", "GELU / SwiGLU", "MLP down product", "logits product", "sampler"};

typedef struct {
    int rows, n_splits;
    int steps;                // decode steps a launch runs
    int sets;                 // the sampling of the calls it serves uses top-k or top-p
    int seen;                 // eager runs of this shape so far (capture on the second)
    cudaGraphExec_t exec;     // NULL until captured
    int prof_n;               // options.profile: events the graph records (0: none) and the
    unsigned char *prof_group;   // group each one ends (PG_*)
} GraphEntry;

// A decode attention shape tuned (options.attention_loads tuned: attention_loads_for), for the
// engines of this process: the shape, the choice (DECODE_LOADS_*) and each variant's time.
typedef struct {
    int NH, NKV, HS, max_len, rows, n_splits, norm;
    int loads;
    float us[3];      // microseconds a call, by DECODE_LOADS_* (0: not timed, its bits differed)
    int differed;     // variants whose output differed from the direct one's
} AttentionTuneEntry;
static AttentionTuneEntry attention_tuned[ROLLOUT_MAX_ATTENTION_TUNED];
static int attention_tuned_count = 0;

// A host copy of slots of the engine's result ring: the block, and where the error word and one
// slot's tokens and log-probs lie (result_slot gives the others).
typedef struct {
    void *block;
    int *err;
    int *token;
    float *logprob;
} StepResult;

// The buffers and the stream that one chain of rows works with: all of the engine's buffers on
// its stream (prefill, and a decode step in one chain), or, with options.branches, one group of a
// decode step's rows: the same buffers from that group's first row on, and the group's stream.
typedef struct {
    cudaStream_t stream;
    float *res_a, *res_b;
    floatX *ln;
    float *ln_mean, *ln_rstd;
    floatX *qkv, *atty, *proj, *fch, *fch_act;
    float *part_o, *part_ml;      // as the step's n_splits lays them out
    float *logits;
    int *row_token, *row_slot, *row_pos, *row_step;
    uint64_t *row_key;
    int *out_token;
    float *out_logprob;
    SampleSplitScratch sample_split;
} RowSet;

struct RolloutEngine {
    ModelConfig config;
    size_t num_parameters;
    size_t param_offsets[NUM_PARAM_TENSORS], param_sizes[NUM_PARAM_TENSORS];
    int max_seqs, max_len;
    int n_slots, dummy_slot;       // cache slots: one per sequence plus the padding rows' slot
    int max_rows;                  // rows of the activation buffers
    RolloutOptions options;
    RolloutStats stats;
    cudaStream_t stream;

    floatX *params;                // bf16 weights, model.h's layout
    float *staging;                // fp32 upload chunk
    size_t staging_floats;
    floatX *k_cache, *v_cache;     // (L, n_slots, NKV, max_len, HS)
    size_t layer_cache_elems;
    float *rope_cos_sin;           // (max_len, HS/2, 2), Llama only

    // activations (max_rows rows)
    float *res_a, *res_b;          // (rows, C) fp32 residual stream, ping-pong
    floatX *ln;                    // (rows, C) norm output; the final norm after the last layer
    float *ln_mean, *ln_rstd;      // (rows)
    floatX *qkv;                   // (rows, QKV)
    floatX *atty;                  // (rows, NH*HS)
    float *att_lse;                // (rows, NH) prefill attention statistics
    floatX *proj;                  // (rows, C)
    floatX *fch;                   // (rows, FC)
    floatX *fch_act;               // (rows, F)
    float *part_o, *part_ml;       // split attention partials (max_seqs, NH, max_splits, HS | 2)
    int max_splits;
    float *dm_partial;             // decode_matmul's K-split partials and tile counters (zeroed once,
    unsigned int *dm_counters;     // reset by every launch), NULL when max_seqs > DM_MAX_M
    int sms;                       // the GPU's multiprocessor count
    floatX *last_hidden;           // (max_seqs, C) gathered final hidden rows
    float *logits;                 // (max_seqs, Vp) fp32
    unsigned char *ref_flags;      // (max_seqs, V) reference sampler scratch
    SampleSplitScratch sample_split;   // the split sampler's partials (max_seqs rows)

    // per-row state: the decode rows (max_seqs), prefill rows (max_rows)
    int *row_token, *row_slot, *row_pos, *row_step;
    uint64_t *row_key;
    int *pf_token, *pf_slot, *pf_pos, *pf_lens, *gather_idx;
    // what the host reads after a graph's steps, in one block so that one copy brings it: a ring
    // of ROLLOUT_MAX_STEPS_PER_GRAPH slots of result_bytes, one per step of a launch, each 16
    // bytes and then each row's sampled token and its log-prob (result_tokens); the first 16
    // bytes of slot 0 hold the error word (DECODE_ERR_*, SAMPLE_ERR_*)
    void *result;
    size_t result_bytes;
    int *err;
    SampleConfig *sample_cfg;

    // pinned host mirrors
    int *h_token, *h_slot, *h_pos, *h_step, *h_pf_token, *h_pf_slot, *h_pf_pos, *h_gather;
    uint64_t *h_key;               // (max_seqs) each sequence's Philox key
    uint64_t *h_row_key;           // (max_seqs) the keys of the decode rows
    int *first_token;              // (max_seqs) host: each sequence's first sampled token
    float *first_logprob;
    SampleConfig *h_cfg;

    GraphEntry graphs[ROLLOUT_MAX_GRAPHS];
    int n_graphs;
    // the host's copies of `result` (pinned, laid out alike): the last launch's steps, and with
    // options.pipeline two steps' on their way (one slot each), each with the event of its copy
    StepResult h_result;
    struct { StepResult r; cudaEvent_t done; } step_out[2];
    int sampling_sets;             // this generate call samples with top-k or top-p (sample())
    // options.branches: the streams of the groups after the first (which uses the engine's
    // stream), made on first use, and the events that fork them from it and join them back
    cudaStream_t branch_stream[ROLLOUT_MAX_BRANCHES];
    cudaEvent_t branch_fork, branch_join[ROLLOUT_MAX_BRANCHES];
    int n_branch_streams;
    // options.fold_norms: per layer the qkv product's weights (QKV, C) and the MLP up product's
    // (2F, C) with the norm before each folded in (fold_weights); allocated on first use, valid
    // until the next weight update
    floatX *folded;
    int folded_valid;
    // options.pdl: whether this GPU runs the kernels' griddep_wait (pdl_supported), and while a
    // decode step is captured, the nodes of the engine's kernels that start with it (pdl_mark)
    int pdl_supported, pdl_capturing, n_pdl_nodes, cap_pdl_nodes;
    // options.attention_loads tuned: set while a decode step runs eagerly (shapes met then are
    // tuned); the probe's positions (max_seqs) and the fingerprint's scratch word
    int tuning_attention;
    int call_positions;            // the positions the current generate call reaches, at most
    int *probe_pos;
    unsigned long long *tune_sum;
    cudaGraphNode_t *pdl_nodes;
    // options.profile: the events a captured step records (created on first use), the groups of
    // the step being captured, the graph the last decode_step replayed (NULL: it ran eagerly), and
    // the last generate's time per group (ms, summed over its profiled steps)
    cudaEvent_t *prof_events;
    int prof_capturing, prof_n;
    unsigned char prof_group[ROLLOUT_PROFILE_EVENTS];
    GraphEntry *last_graph;
    double prof_ms[PG_COUNT];
    int prof_steps;
    int prof_marks[PG_COUNT];      // event nodes that end each group in the last profiled step

    void *blocks[ROLLOUT_MAX_BLOCKS];
    size_t block_bytes[ROLLOUT_MAX_BLOCKS];
    int block_poison[ROLLOUT_MAX_BLOCKS];   // 1: an activation or cache buffer (poisoned in tests)
    int n_blocks;
    void *host_blocks[32];
    int n_host_blocks;
};

// ---------------------------------------------------------------------------------------------
// small kernels of the engine. None has a harness of its own: dev/cuda/rollout_check.cu checks
// them end to end, through the engine's tokens and log-probs against the CPU generator
// (model_forward_cached in generate.c), on a GPU and on the emulation (test_model_cuda_emu.py).

// x (N, C) fp32 or bf16 (TX) = wte[token] (+ wpe[pos] for GPT-2): one thread per (row, channel).
// CPU reference: the embeddings loop of model_forward_cached (generate.c); encoder_forward in
// ops_cpu.c for the training model.
template <typename TX>
__global__ void embed_rows_kernel(TX *x, const int *token, const int *pos, const floatX *wte, const floatX *wpe,
                                  int N, int C) {
    griddep_wait();   // programmatic launches (cuda_common.h): the inputs are ready past here
    griddep_launch_dependents();
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)N * C) return;
    int r = (int)(idx / C), c = (int)(idx % C);
    float v = to_float(wte[(size_t)token[r] * C + c]);
    if (wpe) v += to_float(wpe[(size_t)pos[r] * C + c]);
    x[idx] = from_float<TX>(v);
}

// dst (rows, C) bf16 = w (rows, C) with column i scaled by norm_w[i]: a product's weights with the
// norm before it folded in (RolloutOptions.fold_norms), each element rounded once.
// CPU reference: none as such; the CPU generator runs the norm and then the product (norm_rows,
// matmul_forward in model_forward_cached), which for RMSNorm is the same map:
// (x rstd * norm_w) W^T = (x rstd) (W diag(norm_w))^T.
__global__ void fold_norm_weights_kernel(floatX *dst, const floatX *w, const floatX *norm_w, size_t rows, int C) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < rows * C; i += (size_t)gridDim.x * blockDim.x)
        dst[i] = __float2bfloat16(to_float(w[i]) * to_float(norm_w[i % C]));
}

// out (n) bf16 = a + b, elementwise (the residual add of fold_norms where cuBLASLt offers no
// epilogue for it). CPU reference: residual_forward in ops_cpu.c.
__global__ void add_bf16_kernel(floatX *out, const floatX *a, const floatX *b, size_t n) {
    griddep_wait();   // programmatic launches (cuda_common.h): the inputs are ready past here
    griddep_launch_dependents();
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = __float2bfloat16(to_float(a[i]) + to_float(b[i]));
}

// out (n, C) = in rows idx[0..n) (bf16 copies): one thread per (row, channel). CPU reference: the
// copy of the logit_rows before the final norm in model_forward_cached (generate.c).
__global__ void gather_rows_kernel(floatX *out, const floatX *in, const int *idx, int n, int C) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)n * C) return;
    int r = (int)(i / C), c = (int)(i % C);
    out[i] = in[(size_t)idx[r] * C + c];
}

// The keys and values of a padded prefill chunk, qkv (nb, Tp, QKV) (k rotated already), into the
// cache for slots slot0 + b, positions t < lens[b]: one thread per (b, t, element of k | v).
// CPU reference: the memcpy of each row's k and v into the cache in model_forward_cached
// (generate.c).
__global__ void prefill_kv_write_kernel(floatX *k_cache, floatX *v_cache, const floatX *qkv, const int *lens, int slot0,
                                        int nb, int Tp, int NH, int NKV, int HS, int Tmax) {
    int KV = NKV * HS, QKV = (NH + 2 * NKV) * HS;
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)nb * Tp * 2 * KV) return;
    int j = (int)(idx % (2 * KV));
    size_t bt = idx / (2 * KV);
    int b = (int)(bt / Tp), t = (int)(bt % Tp);
    if (t >= lens[b]) return;
    int part = j / KV, kvh = (j % KV) / HS, i = j % HS;
    floatX *cache = part == 0 ? k_cache : v_cache;
    cache[(((size_t)(slot0 + b) * NKV + kvh) * Tmax + t) * HS + i] = qkv[bt * QKV + (size_t)NH * HS + j];
}

// ---------------------------------------------------------------------------------------------
// memory

static void *engine_alloc(RolloutEngine *e, size_t bytes, int poison) {
    if (e->n_blocks >= ROLLOUT_MAX_BLOCKS) fatal("rollout: too many device allocations");
    // 256-byte aligned: cuBLASLt and 16-byte loads need it; a device without room stops the
    // program with a message naming the engine's shape (and device_memory_hint's flags)
    size_t had = 0;
    for (int i = 0; i < e->n_blocks; i++) had += e->block_bytes[i];
    char what[128];
    snprintf(what, sizeof what, "the rollout engine for %d sequences of up to %d tokens", e->max_seqs, e->max_len);
    void *p = cuda_malloc_sized(bytes, "rollout_create", what, had);
    e->blocks[e->n_blocks] = p;
    e->block_bytes[e->n_blocks] = bytes;
    e->block_poison[e->n_blocks] = poison;
    e->n_blocks++;
    return p;
}
static void *engine_host_alloc(RolloutEngine *e, size_t bytes) {
    if (e->n_host_blocks >= 32) fatal("rollout: too many pinned host allocations");
    void *p = NULL;
    cudaCheck(cudaMallocHost(&p, bytes ? bytes : 16));
    e->host_blocks[e->n_host_blocks++] = p;
    return p;
}

// Slot i of the result ring (device): the tokens (max_seqs), then the log-probs.
static int *result_tokens(const RolloutEngine *e, int i) {
    return (int *)((char *)e->result + (size_t)i * e->result_bytes + 16);
}
static float *result_logprobs(const RolloutEngine *e, int i) { return (float *)(result_tokens(e, i) + e->max_seqs); }
// Slot i of a host copy r.
static StepResult result_slot(const RolloutEngine *e, const StepResult *r, int i) {
    StepResult v = *r;
    v.token = (int *)((char *)r->block + (size_t)i * e->result_bytes + 16);
    v.logprob = (float *)(v.token + e->max_seqs);
    return v;
}
// A pinned host block for `slots` slots of the result ring, laid out as it is.
static StepResult host_result(RolloutEngine *e, int slots) {
    StepResult r;
    r.block = engine_host_alloc(e, (size_t)slots * e->result_bytes);
    r.err = (int *)r.block;
    return result_slot(e, &r, 0);
}
// Queues the copy of the ring's first `slots` slots into r (one copy: the error word, and each
// slot's tokens and log-probs).
static void copy_result(RolloutEngine *e, const StepResult *r, int slots) {
    cudaCheck(cudaMemcpyAsync(r->block, e->result, (size_t)slots * e->result_bytes, cudaMemcpyDeviceToHost, e->stream));
}

static int fc_width(const ModelConfig *c) { return c->arch == ARCH_GPT2 ? c->ffn_hidden : 2 * c->ffn_hidden; }
static int qkv_width(const ModelConfig *c) { return (c->n_head + 2 * c->n_kv_head) * c->head_dim; }

// Parameter tensor `tensor` (layer l of a stacked one) in the bf16 copy; NULL when unused.
static const floatX *weight(const RolloutEngine *e, int tensor, int l) {
    if (e->param_sizes[tensor] == 0) return NULL;
    size_t per_layer = tensor >= P_LN1W && tensor <= P_FCPROJB ? e->param_sizes[tensor] / e->config.n_layer : 0;
    return e->params + e->param_offsets[tensor] + per_layer * l;
}
static floatX *layer_k(RolloutEngine *e, int l) { return e->k_cache + (size_t)l * e->layer_cache_elems; }
static floatX *layer_v(RolloutEngine *e, int l) { return e->v_cache + (size_t)l * e->layer_cache_elems; }

// The engine's buffers from row row0 on, on `stream`, for a decode step with n_splits attention
// splits (the split partials are laid out by it); row0 0 and the engine's stream: all of them.
static RowSet row_set(const RolloutEngine *e, int row0, int n_splits, cudaStream_t stream) {
    const ModelConfig *c = &e->config;
    size_t r = (size_t)row0, C = c->n_embd, NH = c->n_head, HS = c->head_dim;
    RowSet s;
    s.stream = stream;
    s.res_a = e->res_a + r * C;
    s.res_b = e->res_b + r * C;
    s.ln = e->ln + r * C;
    s.ln_mean = e->ln_mean + r;
    s.ln_rstd = e->ln_rstd + r;
    s.qkv = e->qkv + r * qkv_width(c);
    s.atty = e->atty + r * NH * HS;
    s.proj = e->proj + r * C;
    s.fch = e->fch + r * fc_width(c);
    s.fch_act = e->fch_act + r * c->ffn_hidden;
    s.part_o = e->part_o + r * NH * n_splits * HS;
    s.part_ml = e->part_ml + r * NH * n_splits * 2;
    s.logits = e->logits + r * c->padded_vocab_size;
    s.row_token = e->row_token + r;
    s.row_slot = e->row_slot + r;
    s.row_pos = e->row_pos + r;
    s.row_step = e->row_step + r;
    s.row_key = e->row_key + r;
    s.out_token = result_tokens(e, 0) + r;
    s.out_logprob = result_logprobs(e, 0) + r;
    s.sample_split = e->sample_split;   // SAMPLE_SPLIT_MAX_BLOCKS entries a row at most
    s.sample_split.stats += r * SAMPLE_SPLIT_MAX_BLOCKS;
    s.sample_split.best += r * SAMPLE_SPLIT_MAX_BLOCKS;
    s.sample_split.max_rows -= row0;
    return s;
}

static void graphs_clear(RolloutEngine *e) {
    for (int i = 0; i < e->n_graphs; i++) {
        if (e->graphs[i].exec) cudaCheck(cudaGraphExecDestroy(e->graphs[i].exec));
        free(e->graphs[i].prof_group);
    }
    e->n_graphs = 0;
    e->last_graph = NULL;
}

extern "C" RolloutOptions rollout_default_options(void) {
    RolloutOptions o;
    o.reference = 0;
    o.use_graphs = 1;
    o.poison = 0;
    o.decode_matmul = 0;
    o.pdl = 0;
    o.pipeline = 0;
    o.profile = 0;
    o.branches = 1;
    o.tune_products = 1;
    o.steps_per_graph = 1;
    o.attention_loads = ROLLOUT_ATTENTION_LOADS_TUNED;
    o.fold_norms = 1;
    return o;
}

// RolloutOptions.attention_loads (or a DECODE_LOADS_* choice) in words
static const char *attention_loads_name(int loads) {
    return loads == DECODE_LOADS_EARLY ? "early" : loads == DECODE_LOADS_STAGED ? "staged"
         : loads == DECODE_LOADS_DIRECT ? "direct" : "tuned";
}

// The number after the first `skip` characters of word w of TRAIN_MORA_ROLLOUT=v, in 1..max.
static int env_count(const char *v, const char *w, int skip, int max) {
    char *end = NULL;
    long n = strtol(w + skip, &end, 10);
    if (end == w + skip || *end != '\0' || n < 1 || n > max)
        fatal("TRAIN_MORA_ROLLOUT=%s: '%s' needs a whole number in 1..%d after '%.*s'", v, w, max, skip, w);
    return (int)n;
}

// TRAIN_MORA_ROLLOUT: the variants an engine starts with (RolloutOptions), a comma-separated list
// of decode_matmul, pdl, pipeline, untuned (tune_products 0), direct_loads, early_loads and
// staged_loads (attention_loads 0, 1 and 2), fold_norms and norm_kernels (fold_norms 1 and 0),
// branches=N and steps=N (steps_per_graph),
// for trying them in a whole run (generate, eval, mora); rollout_set_options replaces them. Any
// other word exits with a message.
static void options_from_env(RolloutOptions *o) {
    const char *v = getenv("TRAIN_MORA_ROLLOUT");
    if (v == NULL || v[0] == '\0') return;
    char list[256];
    if (strlen(v) >= sizeof(list)) fatal("TRAIN_MORA_ROLLOUT is longer than %zu characters", sizeof(list) - 1);
    strcpy(list, v);
    for (char *save = NULL, *w = strtok_r(list, ",", &save); w != NULL; w = strtok_r(NULL, ",", &save)) {
        if (strcmp(w, "decode_matmul") == 0) o->decode_matmul = 1;
        else if (strcmp(w, "pdl") == 0) o->pdl = 1;
        else if (strcmp(w, "pipeline") == 0) o->pipeline = 1;
        else if (strcmp(w, "untuned") == 0) o->tune_products = 0;
        else if (strcmp(w, "direct_loads") == 0) o->attention_loads = DECODE_LOADS_DIRECT;
        else if (strcmp(w, "early_loads") == 0) o->attention_loads = DECODE_LOADS_EARLY;
        else if (strcmp(w, "staged_loads") == 0) o->attention_loads = DECODE_LOADS_STAGED;
        else if (strcmp(w, "fold_norms") == 0) o->fold_norms = 1;
        else if (strcmp(w, "norm_kernels") == 0) o->fold_norms = 0;
        else if (strncmp(w, "branches=", 9) == 0) o->branches = env_count(v, w, 9, ROLLOUT_MAX_BRANCHES);
        else if (strncmp(w, "steps=", 6) == 0) o->steps_per_graph = env_count(v, w, 6, ROLLOUT_MAX_STEPS_PER_GRAPH);
        else
            fatal("TRAIN_MORA_ROLLOUT=%s: unknown variant '%s' (expected a comma-separated list of decode_matmul, pdl, pipeline, "
                  "untuned, direct_loads, early_loads, staged_loads, fold_norms, norm_kernels, branches=N, steps=N)", v, w);
    }
    fprintf(stderr, "rollout: TRAIN_MORA_ROLLOUT=%s: decode_matmul %d, pdl %d, pipeline %d, branches %d, tuned products %d, "
            "steps a graph %d, attention loads %s, folded norms %d\n", v, o->decode_matmul, o->pdl, o->pipeline, o->branches,
            o->tune_products, o->steps_per_graph, attention_loads_name(o->attention_loads), o->fold_norms);
}

extern "C" RolloutEngine *rollout_create(const Model *cpu, int max_seqs, int max_len) {
    const ModelConfig *c = &cpu->config;
    if (cpu->params == NULL) fatal("rollout_create: the CPU model is not initialised");
    if (max_seqs < 1 || max_seqs > 65535) fatal("rollout_create: max_seqs %d must be in 1..65535", max_seqs);
    if (max_len < 2) fatal("rollout_create: max_len %d must be at least 2 (a prompt token and a new one)", max_len);
    if (max_len > c->max_seq_len)
        fatal("rollout_create: max_len %d exceeds the model's context of %d tokens", max_len, c->max_seq_len);
    int HS = c->head_dim;
    if (HS != 16 && HS != 32 && HS != 64 && HS != 128)
        fatal("rollout_create: head_dim %d is not supported by the GPU attention kernels (16, 32, 64 or 128)", HS);
    if (c->n_kv_head < 1 || c->n_head % c->n_kv_head != 0)
        fatal("rollout_create: n_head %d is not a multiple of n_kv_head %d", c->n_head, c->n_kv_head);
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess || count <= 0) {
        cudaGetLastError();
        fatal("rollout_create: no CUDA device found");
    }

    RolloutEngine *e = (RolloutEngine *)callocCheck(1, sizeof(RolloutEngine));
    e->config = *c;
    e->num_parameters = cpu->num_parameters;
    e->max_seqs = max_seqs;
    e->max_len = max_len;
    e->n_slots = max_seqs + 1;
    e->dummy_slot = max_seqs;
    e->max_rows = ROLLOUT_PREFILL_ROWS;
    if (e->max_rows < max_seqs) e->max_rows = max_seqs;
    if (e->max_rows < max_len) e->max_rows = max_len;
    e->options = rollout_default_options();
    options_from_env(&e->options);
    cudaCheck(cudaSetDevice(0));
    cudaCheck(cudaStreamCreateWithFlags(&e->stream, cudaStreamNonBlocking));
    matmul_setup();
    sampling_setup();

    size_t offset = 0;
    for (int i = 0; i < NUM_PARAM_TENSORS; i++) {
        e->param_offsets[i] = offset;
        e->param_sizes[i] = cpu->param_sizes[i];
        offset += cpu->param_sizes[i];
    }
    if (offset != cpu->num_parameters) fatal("rollout_create: the CPU model's tensor sizes do not add up to num_parameters");
    e->params = (floatX *)engine_alloc(e, e->num_parameters * sizeof(floatX), 0);
    e->staging_floats = (size_t)16 << 20;
    e->staging = (float *)engine_alloc(e, e->staging_floats * sizeof(float), 0);

    size_t L = c->n_layer, C = c->n_embd, NH = c->n_head, NKV = c->n_kv_head, R = e->max_rows, S = max_seqs;
    size_t QKV = qkv_width(c), FC = fc_width(c), F = c->ffn_hidden, Vp = c->padded_vocab_size;
    e->layer_cache_elems = (size_t)e->n_slots * NKV * max_len * HS;
    e->k_cache = (floatX *)engine_alloc(e, L * e->layer_cache_elems * sizeof(floatX), 1);
    e->v_cache = (floatX *)engine_alloc(e, L * e->layer_cache_elems * sizeof(floatX), 1);
    if (c->arch == ARCH_LLAMA) {
        float *table = rope_table_host(max_len, HS, c->rope_theta);
        size_t bytes = (size_t)max_len * (HS / 2) * 2 * sizeof(float);
        e->rope_cos_sin = (float *)engine_alloc(e, bytes, 0);
        cudaCheck(cudaMemcpy(e->rope_cos_sin, table, bytes, cudaMemcpyHostToDevice));
        free(table);
    }
    e->res_a = (float *)engine_alloc(e, R * C * sizeof(float), 1);
    e->res_b = (float *)engine_alloc(e, R * C * sizeof(float), 1);
    e->ln = (floatX *)engine_alloc(e, R * C * sizeof(floatX), 1);
    e->ln_mean = (float *)engine_alloc(e, R * sizeof(float), 1);
    e->ln_rstd = (float *)engine_alloc(e, R * sizeof(float), 1);
    e->qkv = (floatX *)engine_alloc(e, R * QKV * sizeof(floatX), 1);
    e->atty = (floatX *)engine_alloc(e, R * NH * HS * sizeof(floatX), 1);
    e->att_lse = (float *)engine_alloc(e, R * NH * sizeof(float), 1);
    e->proj = (floatX *)engine_alloc(e, R * C * sizeof(floatX), 1);
    e->fch = (floatX *)engine_alloc(e, R * FC * sizeof(floatX), 1);
    e->fch_act = (floatX *)engine_alloc(e, R * F * sizeof(floatX), 1);
    e->max_splits = decode_attention_splits(max_len);
    // the split partials serve the fast kernel, which only decode rows (<= max_seqs) go through
    // (the reference path's prefill rows use the reference attention, which needs none)
    e->part_o = (float *)engine_alloc(e, S * NH * e->max_splits * HS * sizeof(float), 1);
    e->part_ml = (float *)engine_alloc(e, S * NH * e->max_splits * 2 * sizeof(float), 1);
    {   // decode_matmul's buffers, sized for the largest of the decode step's products
        int device = 0;
        cudaCheck(cudaGetDevice(&device));
        cudaCheck(cudaDeviceGetAttribute(&e->sms, cudaDevAttrMultiProcessorCount, device));
        // programmatic edges need sm_90 and kernels built for it: from the compute_80 PTX of the
        // portable build, griddep_wait compiles to nothing (cuda_common.h)
        cudaFuncAttributes attr;
        cudaCheck(cudaFuncGetAttributes(&attr, embed_rows_kernel<float>));
        e->pdl_supported = attr.ptxVersion >= 90 && attr.binaryVersion >= 90;
        e->pdl_capturing = 0;
        e->n_pdl_nodes = e->cap_pdl_nodes = 0;
        e->pdl_nodes = NULL;
        e->dm_partial = NULL;
        e->dm_counters = NULL;
        if (S <= DM_MAX_M) {
            const size_t shapes[4][2] = {{C, QKV}, {NH * HS, C}, {C, FC}, {F, C}};   // (IC, OC)
            size_t floats = 0, counters = 0;
            for (int i = 0; i < 4; i++) {
                size_t ic = shapes[i][0], oc = shapes[i][1];
                if (ic % DM_CHUNK != 0 || oc % DM_ROWS != 0) continue;
                size_t f = decode_matmul_partial_floats((int)S, (int)ic, (int)oc, e->sms);
                if (f > floats) floats = f;
                if ((size_t)decode_matmul_counters((int)oc) > counters) counters = decode_matmul_counters((int)oc);
            }
            if (counters > 0) {
                e->dm_partial = (float *)engine_alloc(e, floats * sizeof(float), 1);
                e->dm_counters = (unsigned int *)engine_alloc(e, counters * sizeof(unsigned int), 0);
                cudaCheck(cudaMemset(e->dm_counters, 0, counters * sizeof(unsigned int)));
            }
        }
    }
    e->last_hidden = (floatX *)engine_alloc(e, S * C * sizeof(floatX), 1);
    e->logits = (float *)engine_alloc(e, S * Vp * sizeof(float), 1);
    e->ref_flags = NULL;
    e->sample_split.stats = (SampleSplitStats *)engine_alloc(e, S * SAMPLE_SPLIT_MAX_BLOCKS * sizeof(SampleSplitStats), 1);
    e->sample_split.best = (SampleBest *)engine_alloc(e, S * SAMPLE_SPLIT_MAX_BLOCKS * sizeof(SampleBest), 1);
    e->sample_split.max_rows = max_seqs;
    e->sample_split.sms = e->sms;

    e->row_token = (int *)engine_alloc(e, S * sizeof(int), 0);
    e->row_slot = (int *)engine_alloc(e, S * sizeof(int), 0);
    e->row_pos = (int *)engine_alloc(e, S * sizeof(int), 0);
    e->row_step = (int *)engine_alloc(e, S * sizeof(int), 0);
    e->probe_pos = (int *)engine_alloc(e, S * sizeof(int), 0);
    e->tune_sum = (unsigned long long *)engine_alloc(e, sizeof(unsigned long long), 0);
    e->row_key = (uint64_t *)engine_alloc(e, S * sizeof(uint64_t), 0);
    e->pf_token = (int *)engine_alloc(e, R * sizeof(int), 0);
    e->pf_slot = (int *)engine_alloc(e, R * sizeof(int), 0);
    e->pf_pos = (int *)engine_alloc(e, R * sizeof(int), 0);
    e->pf_lens = (int *)engine_alloc(e, S * sizeof(int), 0);
    e->gather_idx = (int *)engine_alloc(e, S * sizeof(int), 0);
    e->result_bytes = 16 + 2 * S * sizeof(int);
    // not poisoned as a whole: poison_buffers poisons the tokens and log-probs, not the error word
    e->result = engine_alloc(e, ROLLOUT_MAX_STEPS_PER_GRAPH * e->result_bytes, 0);
    e->err = (int *)e->result;
    e->sample_cfg = (SampleConfig *)engine_alloc(e, sizeof(SampleConfig), 0);

    e->h_token = (int *)engine_host_alloc(e, S * sizeof(int));
    e->h_slot = (int *)engine_host_alloc(e, S * sizeof(int));
    e->h_pos = (int *)engine_host_alloc(e, S * sizeof(int));
    e->h_step = (int *)engine_host_alloc(e, S * sizeof(int));
    e->h_key = (uint64_t *)engine_host_alloc(e, S * sizeof(uint64_t));
    e->h_row_key = (uint64_t *)engine_host_alloc(e, S * sizeof(uint64_t));
    e->h_result = host_result(e, ROLLOUT_MAX_STEPS_PER_GRAPH);
    for (int k = 0; k < 2; k++) {
        e->step_out[k].r = host_result(e, 1);
        cudaCheck(cudaEventCreateWithFlags(&e->step_out[k].done, cudaEventDisableTiming));
    }
    e->h_pf_token = (int *)engine_host_alloc(e, R * sizeof(int));
    e->h_pf_slot = (int *)engine_host_alloc(e, R * sizeof(int));
    e->h_pf_pos = (int *)engine_host_alloc(e, R * sizeof(int));
    e->h_gather = (int *)engine_host_alloc(e, S * sizeof(int));
    e->h_cfg = (SampleConfig *)engine_host_alloc(e, sizeof(SampleConfig));
    e->first_token = (int *)mallocCheck(S * sizeof(int));
    e->first_logprob = (float *)mallocCheck(S * sizeof(float));

    cudaCheck(cudaMemsetAsync(e->err, 0, sizeof(int), e->stream));
    rollout_update_weights(e, cpu);
    return e;
}

extern "C" void rollout_free(RolloutEngine *e) {
    if (e == NULL) return;
    cudaCheck(cudaStreamSynchronize(e->stream));
    graphs_clear(e);
    for (int i = 0; i < e->n_blocks; i++) cudaCheck(cudaFree(e->blocks[i]));
    if (e->ref_flags) cudaCheck(cudaFree(e->ref_flags));
    for (int i = 0; i < e->n_host_blocks; i++) cudaCheck(cudaFreeHost(e->host_blocks[i]));
    for (int k = 0; k < 2; k++) cudaCheck(cudaEventDestroy(e->step_out[k].done));
    if (e->prof_events)
        for (int i = 0; i < ROLLOUT_PROFILE_EVENTS; i++) cudaCheck(cudaEventDestroy(e->prof_events[i]));
    free(e->prof_events);
    for (int b = 1; b <= e->n_branch_streams; b++) {
        matmul_unregister_stream(e->branch_stream[b]);
        cudaCheck(cudaStreamDestroy(e->branch_stream[b]));
        cudaCheck(cudaEventDestroy(e->branch_join[b]));
    }
    if (e->n_branch_streams > 0) cudaCheck(cudaEventDestroy(e->branch_fork));
    cudaCheck(cudaStreamDestroy(e->stream));
    free(e->first_token);
    free(e->first_logprob);
    free(e->pdl_nodes);
    free(e);
}

extern "C" void rollout_set_options(RolloutEngine *e, const RolloutOptions *o) {
    // graphs hold the kernels of the path they were captured on
    if (o->branches < 1 || o->branches > ROLLOUT_MAX_BRANCHES)
        fatal("rollout_set_options: branches must be in 1..%d, got %d", ROLLOUT_MAX_BRANCHES, o->branches);
    if (o->steps_per_graph < 1 || o->steps_per_graph > ROLLOUT_MAX_STEPS_PER_GRAPH)
        fatal("rollout_set_options: steps_per_graph must be in 1..%d, got %d", ROLLOUT_MAX_STEPS_PER_GRAPH, o->steps_per_graph);
    if (o->attention_loads != ROLLOUT_ATTENTION_LOADS_TUNED && o->attention_loads != DECODE_LOADS_DIRECT &&
        o->attention_loads != DECODE_LOADS_EARLY && o->attention_loads != DECODE_LOADS_STAGED)
        fatal("rollout_set_options: attention_loads must be -1 (tuned), 0 (direct), 1 (early) or 2 (staged), got %d",
              o->attention_loads);
    if (o->reference != e->options.reference || o->decode_matmul != e->options.decode_matmul || o->pdl != e->options.pdl ||
        o->profile != e->options.profile || o->branches != e->options.branches || o->tune_products != e->options.tune_products ||
        o->attention_loads != e->options.attention_loads || o->fold_norms != e->options.fold_norms)
        graphs_clear(e);
    e->options = *o;
}

extern "C" void rollout_update_weights(RolloutEngine *e, const Model *cpu) {
    if (memcmp(&cpu->config, &e->config, sizeof(ModelConfig)) != 0 || cpu->num_parameters != e->num_parameters)
        fatal("rollout_update_weights: the model's config differs from the one the engine was created for");
    for (size_t off = 0; off < e->num_parameters; off += e->staging_floats) {
        size_t n = e->num_parameters - off < e->staging_floats ? e->num_parameters - off : e->staging_floats;
        // stream order keeps the next chunk's copy behind this chunk's conversion
        cudaCheck(cudaMemcpyAsync(e->staging, cpu->params + off, n * sizeof(float), cudaMemcpyHostToDevice, e->stream));
        convert_f32_to_bf16(e->params + off, e->staging, n, e->stream);
    }
    e->folded_valid = 0;   // the folded products' weights follow at the next decode step
    cudaCheck(cudaStreamSynchronize(e->stream));
}

extern "C" void rollout_update_weights_device(RolloutEngine *e, const float *device_params, size_t num_parameters) {
    if (num_parameters != e->num_parameters)
        fatal("rollout_update_weights_device: %zu parameters given, the engine's model has %zu", num_parameters, e->num_parameters);
    convert_f32_to_bf16(e->params, device_params, num_parameters, e->stream);
    e->folded_valid = 0;
    cudaCheck(cudaStreamSynchronize(e->stream));
}

extern "C" void rollout_last_stats(const RolloutEngine *e, RolloutStats *stats) { *stats = e->stats; }

extern "C" void rollout_tuning_print(FILE *out) {
    if (matmul_tune_count == 0) fprintf(out, "  cuBLASLt: no decode product shape tuned\n");
    matmul_tune_print(out, 0);
    if (attention_tuned_count == 0) fprintf(out, "  decode attention: no shape tuned\n");
    for (int i = 0; i < attention_tuned_count; i++) {
        const AttentionTuneEntry *a = &attention_tuned[i];
        fprintf(out, "  decode attention NH=%d NKV=%d HS=%d max_len=%d rows=%d splits=%d%s: direct %.2f us, early %.2f, "
                "staged %.2f%s -> %s\n", a->NH, a->NKV, a->HS, a->max_len, a->rows, a->n_splits, a->norm ? " (rows' norm)" : "",
                a->us[0], a->us[1], a->us[2], a->differed ? " (a variant's bits differed: not timed)" : "",
                attention_loads_name(a->loads));
    }
}

extern "C" void rollout_last_logits(const RolloutEngine *e, int row, float *out) {
    if (row < 0 || row >= e->max_seqs) fatal("rollout_last_logits: row %d outside 0..%d", row, e->max_seqs - 1);
    cudaCheck(cudaStreamSynchronize(e->stream));
    cudaCheck(cudaMemcpy(out, e->logits + (size_t)row * e->config.padded_vocab_size, e->config.vocab_size * sizeof(float),
                         cudaMemcpyDeviceToHost));
}

// ---------------------------------------------------------------------------------------------
// programmatic edges (RolloutOptions.pdl)

// While a decode step is being captured with options.pdl: records the node that the stream's
// last launch added. Called right after launches of the engine's own kernels, which begin with
// griddep_wait (cuda_common.h), so the edges into them may be made programmatic (pdl_apply).
static void pdl_mark(RolloutEngine *e) {
    if (!e->pdl_capturing) return;
    cudaStreamCaptureStatus status;
    const cudaGraphNode_t *deps = NULL;
    size_t n = 0;
    cudaCheck(cudaStreamGetCaptureInfo(e->stream, &status, NULL, NULL, &deps, NULL, &n));
    if (status != cudaStreamCaptureStatusActive) return;
    for (size_t i = 0; i < n; i++) {
        if (e->n_pdl_nodes == e->cap_pdl_nodes) {
            e->cap_pdl_nodes = e->cap_pdl_nodes ? 2 * e->cap_pdl_nodes : 256;
            e->pdl_nodes = (cudaGraphNode_t *)reallocCheck(e->pdl_nodes, sizeof(cudaGraphNode_t) * e->cap_pdl_nodes);
        }
        e->pdl_nodes[e->n_pdl_nodes++] = deps[i];
    }
}

// options.profile, while a decode step is captured: an event node that ends kernel group `group`
// (PG_*) of the step, timed against the one before it after each replay (profile_add).
static void prof_mark(RolloutEngine *e, int group) {
    if (!e->prof_capturing || e->prof_n == ROLLOUT_PROFILE_EVENTS) return;
    cudaCheck(cudaEventRecordWithFlags(e->prof_events[e->prof_n], e->stream, cudaEventRecordExternal));
    e->prof_group[e->prof_n++] = (unsigned char)group;
}

// Makes the edges from kernel nodes into the marked nodes of a captured graph programmatic: the
// marked kernel may then be scheduled once every block of the kernel before it has signalled
// (griddep_launch_dependents) or exited, and waits in griddep_wait until that kernel has
// finished and its writes are visible. Edges from other nodes, and into cuBLASLt's kernels
// (never marked), stay full dependencies.
static void pdl_apply(RolloutEngine *e, cudaGraph_t graph) {
    for (int i = 0; i < e->n_pdl_nodes; i++) {
        cudaGraphNode_t node = e->pdl_nodes[i];
        size_t n = 0;
        cudaCheck(cudaGraphNodeGetDependencies(node, NULL, NULL, &n));
        if (n == 0) continue;
        cudaGraphNode_t *deps = (cudaGraphNode_t *)mallocCheck(sizeof(cudaGraphNode_t) * n);
        cudaGraphEdgeData *data = (cudaGraphEdgeData *)mallocCheck(sizeof(cudaGraphEdgeData) * n);
        cudaCheck(cudaGraphNodeGetDependencies(node, deps, data, &n));
        for (size_t k = 0; k < n; k++) {
            cudaGraphNodeType type;
            cudaCheck(cudaGraphNodeGetType(deps[k], &type));
            if (type != cudaGraphNodeTypeKernel || data[k].type != cudaGraphDependencyTypeDefault) continue;
            cudaGraphEdgeData programmatic;
            memset(&programmatic, 0, sizeof(programmatic));
            programmatic.from_port = cudaGraphKernelNodePortProgrammatic;
            programmatic.type = cudaGraphDependencyTypeProgrammatic;
            cudaCheck(cudaGraphRemoveDependencies(graph, &deps[k], &node, &data[k], 1));
            cudaCheck(cudaGraphAddDependencies(graph, &deps[k], &node, &programmatic, 1));
            e->stats.programmatic_edges++;
        }
        free(deps);
        free(data);
    }
}

// ---------------------------------------------------------------------------------------------
// forward pieces

// Whether a product of n rows goes through decode_matmul (see forward_product).
static int use_decode_matmul(const RolloutEngine *e, int decode, const floatX *inp, const floatX *w, int n, int IC, int OC) {
    return decode && e->options.decode_matmul && !e->options.reference && e->dm_counters && n <= e->max_seqs &&
           decode_matmul_supports(n, IC, OC, inp, w);
}

// out (n, OC) = inp (n, IC) @ w^T + b, with GELU when gelu_pre is given (cuBLASLt then also
// writes the pre-activation there; decode_matmul does not, the decode step never reads it):
// decode_matmul for a decode step's rows (`decode`, fast path) when the options ask for it and the
// shape allows.
static void forward_product(RolloutEngine *e, const RowSet *s, int decode, floatX *out, const floatX *inp,
                            const floatX *w, const floatX *b, floatX *gelu_pre, int n, int IC, int OC) {
    if (use_decode_matmul(e, decode, inp, w, n, IC, OC)) {
        decode_matmul(out, e->dm_partial, e->dm_counters, inp, w, b, n, IC, OC, gelu_pre != NULL, e->sms, s->stream);
        pdl_mark(e);
    } else
        matmul_forward(out, inp, w, b, gelu_pre, n, IC, OC, s->stream);
}

// MLP of n rows: proj (n, C) = fcproj(act(fc(ln))); `decode`: the rows are a decode step's.
static void mlp_forward(RolloutEngine *e, const RowSet *s, int l, int n, int decode) {
    const ModelConfig *c = &e->config;
    int C = c->n_embd, F = c->ffn_hidden;
    cudaStream_t st = s->stream;
    if (c->arch == ARCH_GPT2) {
        if (F % 8 == 0) {
            forward_product(e, s, decode, s->fch_act, s->ln, weight(e, P_FCW, l), weight(e, P_FCB, l), s->fch, n, C, F);
            prof_mark(e, PG_FC);
        } else {
            forward_product(e, s, decode, s->fch, s->ln, weight(e, P_FCW, l), weight(e, P_FCB, l), NULL, n, C, F);
            prof_mark(e, PG_FC);
            gelu_forward(s->fch_act, s->fch, (size_t)n * F, st);
            pdl_mark(e);
            prof_mark(e, PG_ACT);
        }
    } else {
        forward_product(e, s, decode, s->fch, s->ln, weight(e, P_FCW, l), NULL, NULL, n, C, 2 * F);
        prof_mark(e, PG_FC);
        if (use_decode_matmul(e, decode, s->fch, weight(e, P_FCPROJW, l), n, F, C)) {
            // SwiGLU formed inside the projection's input loads: one launch, the same bits
            decode_matmul_swiglu(s->proj, e->dm_partial, e->dm_counters, s->fch, weight(e, P_FCPROJW, l),
                                 weight(e, P_FCPROJB, l), n, F, C, e->sms, st);
            pdl_mark(e);
            prof_mark(e, PG_FCPROJ);
            return;
        }
        swiglu_forward(s->fch_act, s->fch, n, F, st);
        pdl_mark(e);
        prof_mark(e, PG_ACT);
    }
    forward_product(e, s, decode, s->proj, s->fch_act, weight(e, P_FCPROJW, l), weight(e, P_FCPROJB, l), NULL, n, F, C);
    prof_mark(e, PG_FCPROJ);
}

// res_out = res_in + proj, ln = the norm that follows layer l's block (`second`: the pre-MLP
// norm of layer l; else the next layer's pre-attention norm, or the final norm after the last).
static void residual_and_norm(RolloutEngine *e, const RowSet *s, float *res_out, const float *res_in, int l, int second,
                              int n) {
    const ModelConfig *c = &e->config;
    int gpt2 = c->arch == ARCH_GPT2;
    const floatX *w, *b;
    if (second) { w = weight(e, P_LN2W, l); b = weight(e, P_LN2B, l); }
    else if (l + 1 < c->n_layer) { w = weight(e, P_LN1W, l + 1); b = weight(e, P_LN1B, l + 1); }
    else { w = weight(e, P_LNFW, 0); b = weight(e, P_LNFB, 0); }
    residual_norm_forward(res_out, s->ln, s->ln_mean, s->ln_rstd, res_in, s->proj, w, b, n, c->n_embd, c->norm_eps, gpt2,
                          s->stream);
    pdl_mark(e);
    prof_mark(e, PG_NORM);
}

// The decode attention's loads (DECODE_LOADS_*) for a decode step's call on the n rows of s
// (norm: with the rows' norm, the folded step): options.attention_loads, or where it asks for
// tuning, the choice for this shape, made here the first time the shape is met while a step runs
// eagerly (tuning_attention) and not captured. Each variant runs on the step's own rows and
// buffers with every row at the last position the generate call reaches (prompt and new
// tokens; where its contexts differ most), reading the cache only (the
// queries as qkv holds them, no RoPE, no norm: the work the variants do differently is the
// reading), on each layer's cache in turn, so that the keys and values come from memory as in a
// step; a variant whose output (on layer 0) has other bits than the direct one's is not taken.
// The probe leaves its output in the attention's buffers, which the call after it overwrites.
static int attention_loads_for(RolloutEngine *e, const RowSet *s, int n, int n_splits, int norm) {
    if (e->options.attention_loads != ROLLOUT_ATTENTION_LOADS_TUNED) return e->options.attention_loads;
    const ModelConfig *c = &e->config;
    AttentionTuneEntry key = {c->n_head, c->n_kv_head, c->head_dim, e->max_len, n, n_splits, norm, DECODE_LOADS_DIRECT,
                              {0.0f, 0.0f, 0.0f}, 0};
    for (int i = 0; i < attention_tuned_count; i++) {
        const AttentionTuneEntry *a = &attention_tuned[i];
        if (a->NH == key.NH && a->NKV == key.NKV && a->HS == key.HS && a->max_len == key.max_len && a->rows == n &&
            a->n_splits == n_splits && a->norm == norm)
            return a->loads;
    }
    if (!e->tuning_attention || attention_tuned_count == ROLLOUT_MAX_ATTENTION_TUNED) return DECODE_LOADS_DIRECT;
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    cudaCheck(cudaStreamIsCapturing(s->stream, &capture));
    if (capture != cudaStreamCaptureStatusNone) return DECODE_LOADS_DIRECT;
    const int NH = c->n_head, NKV = c->n_kv_head, HS = c->head_dim;
    int last = std::min(std::min(e->max_len, e->call_positions), n_splits * DECODE_SPLIT_LEN) - 1;
    std::vector<int> probe(n, last);
    cudaCheck(cudaMemcpyAsync(e->probe_pos, probe.data(), n * sizeof(int), cudaMemcpyHostToDevice, s->stream));
    cudaCheck(cudaStreamSynchronize(s->stream));   // probe is on this stack
    int call = 0;
    auto run = [&] {
        int l = call++ % c->n_layer;
        decode_attention(s->atty, s->part_o, s->part_ml, s->qkv, layer_k(e, l), layer_v(e, l), NULL, 0, s->row_slot,
                         e->probe_pos, n, NH, NKV, HS, e->n_slots, e->max_len, n_splits, 0, e->err, s->stream);
    };
    const size_t out_bytes = (size_t)n * NH * HS * sizeof(floatX);
    unsigned long long direct_bits = 0;
    float best = 0.0f;
    for (int v = DECODE_LOADS_DIRECT; v <= DECODE_LOADS_STAGED; v++) {
        decode_attention_loads = v;
        call = 0;
        run();
        unsigned long long bits = tune_fingerprint(e->tune_sum, s->atty, out_bytes, s->stream);
        if (v == DECODE_LOADS_DIRECT) direct_bits = bits;
        else if (bits != direct_bits) { key.differed++; continue; }
        float ms = tune_time_ms(run, s->stream, 4 * c->n_layer > 20 ? 4 * c->n_layer : 20, 1000);
        key.us[v] = ms * 1e3f;
        if (v == DECODE_LOADS_DIRECT || ms < 0.99f * best) { best = ms; key.loads = v; }
    }
    attention_tuned[attention_tuned_count++] = key;
    return key.loads;
}

// The cached forward of n rows (token, slot, pos device arrays) through every layer: each layer
// writes the rows' keys and values into the cache, then each row attends over its slot's
// positions 0..pos. Leaves the final-normed rows in s->ln. write_in_attention: the attention
// kernel rotates and writes the rows' keys and values itself (one launch less a layer); only
// when no row reads a position another row writes, as in a decode step (its padding rows share
// the spare slot, all at position 0, and read nothing but their own row). Prompts run as rows
// (the reference path) put several positions of one slot in a call: rows_kv_write fills the
// cache before the attention reads it.
static void forward_rows(RolloutEngine *e, const RowSet *s, int n, const int *token, const int *slot, const int *pos,
                         int n_splits, int write_in_attention) {
    const ModelConfig *c = &e->config;
    cudaRequire(n <= e->max_rows && (e->options.reference || n <= e->max_seqs),
                "rollout: more rows than the activation or split-attention buffers hold");
    int C = c->n_embd, NH = c->n_head, NKV = c->n_kv_head, HS = c->head_dim, QKV = qkv_width(c);
    int gpt2 = c->arch == ARCH_GPT2;
    const int decode = 1;   // rows of a decode step (or the reference path's prefill: forward_product tells)
    cudaStream_t st = s->stream;
    size_t nc = (size_t)n * C;
    embed_rows_kernel<float><<<ceil_div((long long)nc, 256), 256, 0, st>>>(s->res_a, token, pos, weight(e, P_WTE, 0),
                                                                    gpt2 ? weight(e, P_WPE, 0) : NULL, n, C);
    cudaCheckLaunch();
    pdl_mark(e);
    residual_norm_forward(NULL, s->ln, s->ln_mean, s->ln_rstd, s->res_a, NULL, weight(e, P_LN1W, 0), weight(e, P_LN1B, 0), n, C,
                          c->norm_eps, gpt2, st);
    pdl_mark(e);
    prof_mark(e, PG_EMBED);
    float *res = s->res_a, *other = s->res_b;
    for (int l = 0; l < c->n_layer; l++) {
        forward_product(e, s, decode, s->qkv, s->ln, weight(e, P_QKVW, l), weight(e, P_QKVB, l), NULL, n, C, QKV);
        prof_mark(e, PG_QKV);
        const float *cos_sin = gpt2 ? NULL : e->rope_cos_sin;
        if (write_in_attention) {
            decode_attention_loads = attention_loads_for(e, s, n, n_splits, 0);
            decode_attention(s->atty, s->part_o, s->part_ml, s->qkv, layer_k(e, l), layer_v(e, l), cos_sin, 1, slot, pos, n,
                             NH, NKV, HS, e->n_slots, e->max_len, n_splits, 0, e->err, st);
            pdl_mark(e);   // the split combine, when there is one; else the attention
        } else {
            rows_kv_write(s->qkv, layer_k(e, l), layer_v(e, l), cos_sin, slot, pos, n, NH, NKV, HS, e->n_slots, e->max_len,
                          e->err, st);
            decode_attention(s->atty, s->part_o, s->part_ml, s->qkv, layer_k(e, l), layer_v(e, l), NULL, 0, slot, pos, n,
                             NH, NKV, HS, e->n_slots, e->max_len, n_splits, e->options.reference, e->err, st);
        }
        prof_mark(e, PG_ATTENTION);
        forward_product(e, s, decode, s->proj, s->atty, weight(e, P_ATTPROJW, l), weight(e, P_ATTPROJB, l), NULL, n, NH * HS, C);
        prof_mark(e, PG_ATTPROJ);
        residual_and_norm(e, s, other, res, l, 1, n);
        { float *t = res; res = other; other = t; }
        mlp_forward(e, s, l, n, 1);
        residual_and_norm(e, s, other, res, l, 0, n);
        { float *t = res; res = other; other = t; }
    }
}

// Whether decode steps take the folded path (RolloutOptions.fold_norms): RMSNorm models without
// q/k/v biases (a bias would have to be added after the norm's scale), not with the reference
// kernels or decode_matmul.
static int fold_active(const RolloutEngine *e) {
    return e->options.fold_norms && e->config.arch == ARCH_LLAMA && weight(e, P_QKVB, 0) == NULL && !e->options.reference &&
           !e->options.decode_matmul;
}
static size_t fold_layer_elems(const ModelConfig *c) { return ((size_t)qkv_width(c) + 2 * (size_t)c->ffn_hidden) * c->n_embd; }
static const floatX *folded_qkv(const RolloutEngine *e, int l) { return e->folded + l * fold_layer_elems(&e->config); }
static const floatX *folded_fc(const RolloutEngine *e, int l) {
    return folded_qkv(e, l) + (size_t)qkv_width(&e->config) * e->config.n_embd;
}
// The folded products' weights from the current ones, on the engine's stream (stream order puts
// it after the weights' upload and before the steps that read it; not while a graph is captured).
static void fold_weights(RolloutEngine *e) {
    const ModelConfig *c = &e->config;
    size_t C = c->n_embd, QKV = qkv_width(c), FC = 2 * (size_t)c->ffn_hidden;
    if (e->folded == NULL) e->folded = (floatX *)engine_alloc(e, c->n_layer * fold_layer_elems(c) * sizeof(floatX), 0);
    for (int l = 0; l < c->n_layer; l++) {
        fold_norm_weights_kernel<<<1024, 256, 0, e->stream>>>((floatX *)folded_qkv(e, l), weight(e, P_QKVW, l),
                                                              weight(e, P_LN1W, l), QKV, (int)C);
        cudaCheckLaunch();
        fold_norm_weights_kernel<<<1024, 256, 0, e->stream>>>((floatX *)folded_fc(e, l), weight(e, P_FCW, l),
                                                              weight(e, P_LN2W, l), FC, (int)C);
        cudaCheckLaunch();
    }
    e->folded_valid = 1;
}

// out (n, C) bf16 = res + inp (n, IC) @ w^T + b: a projection added to the bf16 stream, in the
// product's epilogue, or (no algorithm for it) the product and then an add.
static void stream_product_add(RolloutEngine *e, const RowSet *s, floatX *out, const floatX *res, const floatX *inp,
                               const floatX *w, const floatX *b, int n, int IC, int C) {
    if (matmul_forward_add(out, res, inp, w, b, n, IC, C, s->stream)) return;
    matmul_forward(s->proj, inp, w, b, NULL, n, IC, C, s->stream);
    add_bf16_kernel<<<ceil_div((long long)n * C, 256), 256, 0, s->stream>>>(out, res, s->proj, (size_t)n * C);
    cudaCheckLaunch();
    pdl_mark(e);
}

// forward_rows for a decode step with options.fold_norms (fold_active): the stream in bf16 in
// the RowSet's residual buffers, per layer the qkv product on the stream with ln1's weights
// folded in, the attention scaling q, k and v by the row's factor, the attention projection
// added to the stream in its epilogue, the MLP up product on the new stream with ln2's weights
// folded in, SwiGLU scaling gate and up by the row's factor, the down projection added in its
// epilogue; after the last layer the final norm, into s->ln.
static void forward_rows_folded(RolloutEngine *e, const RowSet *s, int n, const int *token, const int *slot, const int *pos,
                                int n_splits) {
    const ModelConfig *c = &e->config;
    int C = c->n_embd, NH = c->n_head, NKV = c->n_kv_head, HS = c->head_dim, QKV = qkv_width(c), F = c->ffn_hidden;
    cudaStream_t st = s->stream;
    floatX *x = (floatX *)s->res_a, *x2 = (floatX *)s->res_b;   // bf16 rows in buffers sized for fp32
    embed_rows_kernel<floatX><<<ceil_div((long long)n * C, 256), 256, 0, st>>>(x, token, pos, weight(e, P_WTE, 0), NULL, n, C);
    cudaCheckLaunch();
    pdl_mark(e);
    prof_mark(e, PG_EMBED);
    for (int l = 0; l < c->n_layer; l++) {
        matmul_forward(s->qkv, x, folded_qkv(e, l), NULL, NULL, n, C, QKV, st);
        prof_mark(e, PG_QKV);
        DecodeRowNorm norm = {x, C, c->norm_eps};
        decode_attention_loads = attention_loads_for(e, s, n, n_splits, 1);
        decode_attention(s->atty, s->part_o, s->part_ml, s->qkv, layer_k(e, l), layer_v(e, l), e->rope_cos_sin, 1, slot, pos,
                         n, NH, NKV, HS, e->n_slots, e->max_len, n_splits, 0, e->err, st, &norm);
        pdl_mark(e);
        prof_mark(e, PG_ATTENTION);
        stream_product_add(e, s, x2, x, s->atty, weight(e, P_ATTPROJW, l), weight(e, P_ATTPROJB, l), n, NH * HS, C);
        prof_mark(e, PG_ATTPROJ);
        matmul_forward(s->fch, x2, folded_fc(e, l), NULL, NULL, n, C, 2 * F, st);
        prof_mark(e, PG_FC);
        swiglu_forward_rownorm(s->fch_act, s->fch, x2, n, F, C, c->norm_eps, st);
        pdl_mark(e);
        prof_mark(e, PG_ACT);
        stream_product_add(e, s, x, x2, s->fch_act, weight(e, P_FCPROJW, l), weight(e, P_FCPROJB, l), n, F, C);
        prof_mark(e, PG_FCPROJ);
    }
    residual_norm_forward((floatX *)NULL, s->ln, s->ln_mean, s->ln_rstd, (const floatX *)x, NULL, weight(e, P_LNFW, 0), NULL,
                          n, C, c->norm_eps, 0, st);
    pdl_mark(e);
    prof_mark(e, PG_NORM);
}

// logits (n, Vp) fp32 = hidden (n, C) @ head^T
static void logits_forward(RolloutEngine *e, const RowSet *s, const floatX *hidden, int n) {
    const ModelConfig *c = &e->config;
    const floatX *head = weight(e, c->tied_embeddings ? P_WTE : P_LMHEAD, 0);
    matmul_cublaslt(s->logits, 1, head, hidden, NULL, NULL, c->padded_vocab_size, n, c->n_embd, 1, 0, 0.0f, s->stream);
    prof_mark(e, PG_LOGITS);
}

static void sample(RolloutEngine *e, const RowSet *s, int n, int advance) {
    const ModelConfig *c = &e->config;
    sample_rows(s->out_token, s->out_logprob, s->logits, n, c->vocab_size, c->padded_vocab_size, e->sample_cfg, s->row_key,
                s->row_step, advance ? s->row_token : NULL, advance ? s->row_pos : NULL, advance ? s->row_slot : NULL,
                e->dummy_slot, e->err, e->options.reference, e->ref_flags,
                e->sampling_sets ? NULL : &s->sample_split, s->stream);
    pdl_mark(e);   // the merging one-block kernel (the split kernel before it keeps its full edge)
    prof_mark(e, PG_SAMPLE);
}

// The rows of each group when a decode step of `rows` rows runs in several chains
// (options.branches; the last group takes what is left): about rows / branches, a multiple of 8
// from 8 rows on, at least ROLLOUT_BRANCH_MIN_ROWS. `rows` itself means one chain, as with the
// options that need one.
static int branch_rows(const RolloutEngine *e, int rows) {
    const RolloutOptions *o = &e->options;
    if (o->branches <= 1 || o->reference || o->decode_matmul || o->pdl || o->profile) return rows;
    int n = o->branches < ROLLOUT_MAX_BRANCHES ? o->branches : ROLLOUT_MAX_BRANCHES;
    while (n > 1 && rows / n < ROLLOUT_BRANCH_MIN_ROWS) n--;
    int per = ceil_div(rows, n);
    return per >= 8 ? ceil_div(per, 8) * 8 : per;
}

// The streams (and their fork and join events) for n chains, made on first use; the first chain
// runs on the engine's stream. Each stream has its own cuBLASLt workspace.
static void branch_streams(RolloutEngine *e, int n) {
    if (e->n_branch_streams == 0) cudaCheck(cudaEventCreateWithFlags(&e->branch_fork, cudaEventDisableTiming));
    while (e->n_branch_streams < n - 1) {
        int b = ++e->n_branch_streams;
        cudaCheck(cudaStreamCreateWithFlags(&e->branch_stream[b], cudaStreamNonBlocking));
        cudaCheck(cudaEventCreateWithFlags(&e->branch_join[b], cudaEventDisableTiming));
        matmul_register_stream(e->branch_stream[b]);
    }
}

// `steps` decode steps of the n rows from row0 on, on `stream`: per step forward, logits, sample
// (into the result ring's slot of the step) and advance.
static void decode_chain(RolloutEngine *e, int row0, int n, int n_splits, int steps, cudaStream_t stream) {
    RowSet s = row_set(e, row0, n_splits, stream);
    for (int i = 0; i < steps; i++) {
        s.out_token = result_tokens(e, i) + row0;
        s.out_logprob = result_logprobs(e, i) + row0;
        if (fold_active(e)) forward_rows_folded(e, &s, n, s.row_token, s.row_slot, s.row_pos, n_splits);
        else forward_rows(e, &s, n, s.row_token, s.row_slot, s.row_pos, n_splits, !e->options.reference);
        logits_forward(e, &s, s.ln, n);
        sample(e, &s, n, 1);
    }
}

// `steps` decode steps of `rows` rows, all on the device. With several chains (options.branches),
// the groups fork from the engine's stream and join it again after their last step, eagerly or
// inside the graph being captured alike (a group's rows depend on nothing of another group's).
static void decode_step_enqueue(RolloutEngine *e, int rows, int n_splits, int steps) {
    int per = branch_rows(e, rows), n = ceil_div(rows, per);
    if (n == 1) {
        decode_chain(e, 0, rows, n_splits, steps, e->stream);
        return;
    }
    branch_streams(e, n);
    cudaCheck(cudaEventRecord(e->branch_fork, e->stream));
    for (int b = 1; b < n; b++) cudaCheck(cudaStreamWaitEvent(e->branch_stream[b], e->branch_fork, 0));
    for (int b = 0, row0 = 0; b < n; b++, row0 += per)
        decode_chain(e, row0, rows - row0 < per ? rows - row0 : per, n_splits, steps, b == 0 ? e->stream : e->branch_stream[b]);
    for (int b = 1; b < n; b++) {
        cudaCheck(cudaEventRecord(e->branch_join[b], e->branch_stream[b]));
        cudaCheck(cudaStreamWaitEvent(e->stream, e->branch_join[b], 0));
    }
}

// Decode steps run eagerly; with options.tune_products, the products of a shape met for the
// first time are tuned on the way (matmul.cuh: never while a stream is captured), and with
// options.attention_loads tuned, the decode attention's (attention_loads_for).
static void decode_step_eager(RolloutEngine *e, int rows, int n_splits, int steps) {
    matmul_tune = e->options.tune_products && !e->options.reference;
    e->tuning_attention = !e->options.reference;
    decode_step_enqueue(e, rows, n_splits, steps);
    matmul_tune = 0;
    e->tuning_attention = 0;
}

// Runs `steps` decode steps: replays the graph of this shape, captures it on its second use, or
// runs them eagerly (first use, or graphs off). Step i's results go to slot i of the ring.
static void decode_step(RolloutEngine *e, int rows, int n_splits, int steps) {
    e->last_graph = NULL;
    if (fold_active(e) && !e->folded_valid) fold_weights(e);   // before any capture
    if (!e->options.use_graphs) { decode_step_eager(e, rows, n_splits, steps); return; }
    GraphEntry *g = NULL;
    for (int i = 0; i < e->n_graphs; i++)
        if (e->graphs[i].rows == rows && e->graphs[i].n_splits == n_splits && e->graphs[i].sets == e->sampling_sets &&
            e->graphs[i].steps == steps)
            g = &e->graphs[i];
    if (g == NULL) {
        if (e->n_graphs == ROLLOUT_MAX_GRAPHS) graphs_clear(e);
        g = &e->graphs[e->n_graphs++];
        g->rows = rows;
        g->n_splits = n_splits;
        g->steps = steps;
        g->sets = e->sampling_sets;
        g->seen = 0;
        g->exec = NULL;
        g->prof_n = 0;
        g->prof_group = NULL;
    }
    if (g->exec == NULL && g->seen == 0) {
        // the first run of a shape is eager: it loads the kernels' modules and lets cuBLASLt
        // settle outside the capture, and short generations never pay for a capture
        g->seen = 1;
        decode_step_eager(e, rows, n_splits, steps);
        return;
    }
    if (g->exec == NULL) {
        cudaGraph_t graph;
        if (e->options.profile && e->prof_events == NULL) {
            e->prof_events = (cudaEvent_t *)mallocCheck(ROLLOUT_PROFILE_EVENTS * sizeof(cudaEvent_t));
            for (int i = 0; i < ROLLOUT_PROFILE_EVENTS; i++) cudaCheck(cudaEventCreate(&e->prof_events[i]));
        }
        cudaCheck(cudaStreamBeginCapture(e->stream, cudaStreamCaptureModeThreadLocal));
        // the profile's event nodes would stand between the kernels that programmatic edges join
        e->pdl_capturing = e->options.pdl && e->pdl_supported && !e->options.reference && !e->options.profile;
        e->n_pdl_nodes = 0;
        e->prof_capturing = e->options.profile;
        e->prof_n = 0;
        prof_mark(e, PG_START);
        decode_step_enqueue(e, rows, n_splits, steps);
        e->pdl_capturing = 0;
        e->prof_capturing = 0;
        cudaCheck(cudaStreamEndCapture(e->stream, &graph));
        if (e->prof_n > 0) {
            g->prof_group = (unsigned char *)mallocCheck((size_t)e->prof_n);
            memcpy(g->prof_group, e->prof_group, (size_t)e->prof_n);
            g->prof_n = e->prof_n;
        }
        pdl_apply(e, graph);
        cudaCheck(cudaGraphInstantiate(&g->exec, graph, 0));
        cudaCheck(cudaGraphDestroy(graph));
        e->stats.graph_captures++;
    }
    cudaCheck(cudaGraphLaunch(g->exec, e->stream));
    e->stats.graph_launches++;
    e->last_graph = g;
}

// options.profile, after the step decode_step last ran has finished: its groups' times (the
// events of a replayed graph; an eager step records none)
static void profile_add(RolloutEngine *e) {
    const GraphEntry *g = e->last_graph;
    if (!e->options.profile || g == NULL || g->prof_n < 2) return;
    double ms[PG_COUNT] = {0.0};
    for (int i = 1; i < g->prof_n; i++) {
        float t = 0.0f;
        cudaError_t err = cudaEventElapsedTime(&t, e->prof_events[i - 1], e->prof_events[i]);
        if (err != cudaSuccess) {   // a profile is no reason to stop a generation
            fprintf(stderr, "rollout: decode profile: the events give no time (%s); profiling is off\n",
                    cudaGetErrorString(err));
            e->options.profile = 0;
            return;
        }
        ms[g->prof_group[i]] += t;
    }
    for (int k = 0; k < PG_COUNT; k++) e->prof_ms[k] += ms[k];
    e->prof_steps++;
    memset(e->prof_marks, 0, sizeof(e->prof_marks));
    for (int i = 1; i < g->prof_n; i++) e->prof_marks[g->prof_group[i]]++;
}

extern "C" int rollout_profile_print(const RolloutEngine *e, double plain_step_ms, FILE *out) {
    if (e->prof_steps == 0) {
        fprintf(out, "  decode profile: no replayed step was profiled (RolloutOptions.profile, CUDA graphs)\n");
        return 0;
    }
    double total = 0.0;
    int marks = 0;
    for (int k = 1; k < PG_COUNT; k++) {
        total += e->prof_ms[k];
        marks += e->prof_marks[k];
    }
    // each event node costs the step some time of its own: the profiled step against a plain one
    // (plain_step_ms, from a run without the profile) tells how much, which the last column takes
    // off each group for every event node that ends it
    double profiled_step_ms = e->stats.decode_steps > 0 ? 1e3 * e->stats.decode_seconds / e->stats.decode_steps : 0.0;
    double per_event_us = plain_step_ms > 0.0 && marks > 0 ? 1e3 * (profiled_step_ms - plain_step_ms) / marks : 0.0;
    fprintf(out, "  decode step by kernel group (CUDA events inside the captured graph, mean of %d steps, summed over the layers):\n",
            e->prof_steps);
    if (plain_step_ms > 0.0)
        fprintf(out, "  %d event nodes a step: %.3f ms/step profiled against %.3f plain, about %.2f us an event node\n", marks,
                profiled_step_ms, plain_step_ms, per_event_us);
    fprintf(out, "  %-28s %9s %7s %9s %8s %16s\n", "kernel group", "us/step", "share", "launches", "us each",
            plain_step_ms > 0.0 ? "less the events" : "");
    for (int k = 1; k < PG_COUNT; k++) {
        if (e->prof_ms[k] <= 0.0) continue;
        double us = 1e3 * e->prof_ms[k] / e->prof_steps;
        fprintf(out, "  %-28s %9.1f %6.1f%% %9d %8.2f", profile_group_names[k], us, 100.0 * e->prof_ms[k] / total,
                e->prof_marks[k], us / (e->prof_marks[k] > 0 ? e->prof_marks[k] : 1));
        if (plain_step_ms > 0.0) {
            double net = us - e->prof_marks[k] * per_event_us;
            fprintf(out, " %9.1f us/step", net);
        }
        fprintf(out, "\n");
    }
    fprintf(out, "  %-28s %9.1f\n", "sum of kernel groups", 1e3 * total / e->prof_steps);
    return e->prof_steps;
}

// Reads the device error word; exits naming what went wrong.
static void report_device_errors(int err, const char *phase) {
    if (err == 0) return;
    fatal("rollout_generate: %s: %s%s%s", phase,
          (err & SAMPLE_ERR_NONFINITE_LOGITS) ? "non-finite logits (NaN or inf in the model's output) " : "",
          (err & DECODE_ERR_POSITION) ? "a row's position or slot lies outside the KV cache " : "",
          (err & SAMPLE_ERR_REFERENCE_VOCAB) ? "the reference sampler's top-p needs a vocabulary of at most 16384 tokens" : "");
}
// Copies the first `slots` slots of the result ring to the host and waits for them; exits on a
// device error.
static void fetch_result(RolloutEngine *e, int slots, const char *phase) {
    copy_result(e, &e->h_result, slots);
    cudaCheck(cudaStreamSynchronize(e->stream));
    report_device_errors(*e->h_result.err, phase);
}

// ---------------------------------------------------------------------------------------------
// prefill

// Samples the first token of sequences seq0 .. seq0 + nb - 1 from the final hidden rows listed
// in e->h_gather[0..nb) (indices into e->ln); results into e->first_token / first_logprob.
static void prefill_sample(RolloutEngine *e, int seq0, int nb) {
    const ModelConfig *c = &e->config;
    for (int b = 0; b < nb; b++) e->h_step[b] = 0;
    cudaStream_t st = e->stream;
    cudaCheck(cudaMemcpyAsync(e->gather_idx, e->h_gather, nb * sizeof(int), cudaMemcpyHostToDevice, st));
    cudaCheck(cudaMemcpyAsync(e->row_key, e->h_key + seq0, nb * sizeof(uint64_t), cudaMemcpyHostToDevice, st));
    cudaCheck(cudaMemcpyAsync(e->row_step, e->h_step, nb * sizeof(int), cudaMemcpyHostToDevice, st));
    size_t n = (size_t)nb * c->n_embd;
    gather_rows_kernel<<<ceil_div((long long)n, 256), 256, 0, st>>>(e->last_hidden, e->ln, e->gather_idx, nb, c->n_embd);
    cudaCheckLaunch();
    RowSet all = row_set(e, 0, 1, st);
    logits_forward(e, &all, e->last_hidden, nb);
    sample(e, &all, nb, 0);
    fetch_result(e, 1, "prefill");   // synchronises: the host buffers are reused at once
    for (int b = 0; b < nb; b++) {
        e->first_token[seq0 + b] = e->h_result.token[b];
        e->first_logprob[seq0 + b] = e->h_result.logprob[b];
    }
}

// Prompts seq0 .. seq0 + nb - 1, right-padded to Tp, through the training kernels.
static void prefill_padded_chunk(RolloutEngine *e, const int *const *prompts, const int *lens, int seq0, int nb, int Tp) {
    const ModelConfig *c = &e->config;
    int C = c->n_embd, NH = c->n_head, NKV = c->n_kv_head, HS = c->head_dim, QKV = qkv_width(c);
    int gpt2 = c->arch == ARCH_GPT2, N = nb * Tp;
    cudaStream_t st = e->stream;
    for (int b = 0; b < nb; b++) {
        const int *p = prompts[seq0 + b];
        int len = lens[seq0 + b];
        for (int t = 0; t < Tp; t++) e->h_pf_token[b * Tp + t] = p[t < len ? t : len - 1];   // padding repeats the last token
        e->h_pf_pos[b] = len;   // staging for the lengths
        e->h_gather[b] = b * Tp + len - 1;
    }
    cudaCheck(cudaMemcpyAsync(e->pf_token, e->h_pf_token, (size_t)N * sizeof(int), cudaMemcpyHostToDevice, st));
    cudaCheck(cudaMemcpyAsync(e->pf_lens, e->h_pf_pos, nb * sizeof(int), cudaMemcpyHostToDevice, st));
    encoder_forward(e->res_a, e->pf_token, weight(e, P_WTE, 0), gpt2 ? weight(e, P_WPE, 0) : NULL, nb, Tp, C, st);
    residual_norm_forward(NULL, e->ln, e->ln_mean, e->ln_rstd, e->res_a, NULL, weight(e, P_LN1W, 0), weight(e, P_LN1B, 0), N, C,
                          c->norm_eps, gpt2, st);
    RowSet all = row_set(e, 0, 1, st);
    float *res = e->res_a, *other = e->res_b;
    size_t kv_elems = (size_t)N * 2 * NKV * HS;
    for (int l = 0; l < c->n_layer; l++) {
        matmul_forward(e->qkv, e->ln, weight(e, P_QKVW, l), weight(e, P_QKVB, l), NULL, N, C, QKV, st);
        // the training kernels' attention: flash for the head sizes it has (a profile of the
        // simple kernel's prefill at B=64, 64 tokens put it at 263 us a layer on an H100); with
        // it a Llama's queries are rotated as the flash forward loads them (the same bits as
        // rope_forward before it), the keys before it, as the training forward does
        if (attention_flash_supports(HS)) {
            if (!gpt2) rope_forward_keys(e->qkv, e->rope_cos_sin, nb, Tp, NH, NKV, HS, st);
            attention_flash_forward_rope(e->atty, e->att_lse, e->qkv, nb, Tp, NH, NKV, HS, gpt2 ? NULL : e->rope_cos_sin,
                                         e->qkv, st);
        } else {
            if (!gpt2) rope_forward(e->qkv, e->rope_cos_sin, nb, Tp, NH, NKV, HS, st);
            attention_forward(e->atty, e->att_lse, e->qkv, nb, Tp, NH, NKV, HS, st);
        }
        prefill_kv_write_kernel<<<ceil_div((long long)kv_elems, 256), 256, 0, st>>>(layer_k(e, l), layer_v(e, l), e->qkv, e->pf_lens,
                                                                                   seq0, nb, Tp, NH, NKV, HS, e->max_len);
        cudaCheckLaunch();
        matmul_forward(e->proj, e->atty, weight(e, P_ATTPROJW, l), weight(e, P_ATTPROJB, l), NULL, N, NH * HS, C, st);
        residual_and_norm(e, &all, other, res, l, 1, N);
        { float *t = res; res = other; other = t; }
        mlp_forward(e, &all, l, N, 0);
        residual_and_norm(e, &all, other, res, l, 0, N);
        { float *t = res; res = other; other = t; }
    }
    prefill_sample(e, seq0, nb);
}

// Prompts as rows through the decode path (reference), in order, in chunks of max_rows rows;
// the first token of a sequence is sampled in the chunk that holds its last prompt token (the
// sequences ending in one chunk are consecutive).
static void prefill_rows(RolloutEngine *e, const int *const *prompts, const int *lens, int n_seq, int n_splits) {
    int seq = 0, t = 0;
    cudaStream_t st = e->stream;
    while (seq < n_seq) {
        int n = 0, nb = 0, first_ending = -1;
        while (seq < n_seq && n < e->max_rows) {
            e->h_pf_token[n] = prompts[seq][t];
            e->h_pf_slot[n] = seq;
            e->h_pf_pos[n] = t;
            n++;
            if (++t == lens[seq]) {
                if (first_ending < 0) first_ending = seq;
                e->h_gather[nb++] = n - 1;
                seq++;
                t = 0;
            }
        }
        cudaCheck(cudaMemcpyAsync(e->pf_token, e->h_pf_token, (size_t)n * sizeof(int), cudaMemcpyHostToDevice, st));
        cudaCheck(cudaMemcpyAsync(e->pf_slot, e->h_pf_slot, (size_t)n * sizeof(int), cudaMemcpyHostToDevice, st));
        cudaCheck(cudaMemcpyAsync(e->pf_pos, e->h_pf_pos, (size_t)n * sizeof(int), cudaMemcpyHostToDevice, st));
        RowSet all = row_set(e, 0, n_splits, st);
        forward_rows(e, &all, n, e->pf_token, e->pf_slot, e->pf_pos, n_splits, 0);
        if (nb > 0) prefill_sample(e, first_ending, nb);
        else fetch_result(e, 1, "prefill");   // synchronises: the pinned row buffers are refilled next
    }
}

// Prompts in chunks of whole sequences with (sequences x longest prompt) <= max_rows, through
// the training kernels.
static void prefill_padded(RolloutEngine *e, const int *const *prompts, const int *lens, int n_seq) {
    int seq0 = 0;
    while (seq0 < n_seq) {
        int nb = 0, Tp = 0;
        while (seq0 + nb < n_seq) {
            int len = lens[seq0 + nb], tp = len > Tp ? len : Tp;
            if (nb > 0 && (long long)(nb + 1) * tp > e->max_rows) break;
            Tp = tp;
            nb++;
        }
        prefill_padded_chunk(e, prompts, lens, seq0, nb, Tp);
        seq0 += nb;
    }
}

// ---------------------------------------------------------------------------------------------
// generate

// Row count for n running sequences: 1, 2, 4, 8, then multiples of 8 up to 64, of 32 up to
// 512, of 128 beyond; at most max_seqs. Few distinct shapes, so few graphs to capture.
static int row_bucket(int n, int max_seqs) {
    int b;
    if (n <= 8) { b = 1; while (b < n) b <<= 1; }
    else if (n <= 64) b = (n + 7) / 8 * 8;
    else if (n <= 512) b = (n + 31) / 32 * 32;
    else b = (n + 127) / 128 * 128;
    return b < max_seqs ? b : max_seqs;
}

// Appends token `tok` with its log-prob to sequence i, streams it, and applies the stop rules.
static int accept_token(const GenerateParams *p, GenerateResult *res, StopText *text, int i, int tok, float logprob) {
    res->tokens[i][res->n_tokens[i]] = tok;
    res->logprobs[i][res->n_tokens[i]] = logprob;
    res->n_tokens[i]++;
    if (p->on_token) p->on_token(p->ctx, i, tok);
    // the stop rules of generate.c (generate.h), shared
    int finish = generate_stop_check(p, &text[i], tok, res->n_tokens[i]);
    if (finish < 0) return 0;
    res->finish[i] = finish;
    return 1;
}

static void poison_buffers(RolloutEngine *e) {
    // all bits set is a NaN both as fp32 and as bf16
    for (int i = 0; i < e->n_blocks; i++)
        if (e->block_poison[i]) cudaCheck(cudaMemsetAsync(e->blocks[i], 0xff, e->block_bytes[i], e->stream));
    // the result ring's tokens and log-probs, not its error word
    for (int i = 0; i < ROLLOUT_MAX_STEPS_PER_GRAPH; i++)
        cudaCheck(cudaMemsetAsync(result_tokens(e, i), 0xff, (size_t)e->max_seqs * (sizeof(int) + sizeof(float)), e->stream));
}

// The decode rows for the running sequences active[0..n_active): them first, in order, then
// padding rows on the spare slot up to the row bucket; uploads their state. Returns the rows.
static int upload_rows(RolloutEngine *e, const GenerateResult *res, const int *active, int n_active,
                       const int *prompt_lens) {
    cudaStream_t st = e->stream;
    int rows = row_bucket(n_active, e->max_seqs);
    for (int r = 0; r < rows; r++) {
        if (r < n_active) {
            int i = active[r], n = res->n_tokens[i];
            e->h_token[r] = res->tokens[i][n - 1];
            e->h_slot[r] = i;
            e->h_pos[r] = prompt_lens[i] + n - 1;
            e->h_step[r] = n;
            e->h_row_key[r] = e->h_key[i];
        } else {
            e->h_token[r] = 0;
            e->h_slot[r] = e->dummy_slot;
            e->h_pos[r] = 0;
            e->h_step[r] = 0;
            e->h_row_key[r] = 0;
        }
    }
    cudaCheck(cudaMemcpyAsync(e->row_token, e->h_token, rows * sizeof(int), cudaMemcpyHostToDevice, st));
    cudaCheck(cudaMemcpyAsync(e->row_slot, e->h_slot, rows * sizeof(int), cudaMemcpyHostToDevice, st));
    cudaCheck(cudaMemcpyAsync(e->row_pos, e->h_pos, rows * sizeof(int), cudaMemcpyHostToDevice, st));
    cudaCheck(cudaMemcpyAsync(e->row_step, e->h_step, rows * sizeof(int), cudaMemcpyHostToDevice, st));
    cudaCheck(cudaMemcpyAsync(e->row_key, e->h_row_key, rows * sizeof(uint64_t), cudaMemcpyHostToDevice, st));
    return rows;
}

// Accepts the tokens of one decode step for the running sequences active[0..n) (row r is
// active[r]), compacting active to those still running; returns their count.
static int accept_step(const GenerateParams *p, GenerateResult *res, StopText *text, int *active, int n,
                       const int *token, const float *logprob) {
    int still = 0;
    for (int r = 0; r < n; r++) {
        int i = active[r];
        if (!accept_token(p, res, text, i, token[r], logprob[r])) active[still++] = i;
    }
    return still;
}

// Decode steps for one launch (options.steps_per_graph): at most as many as the running
// sequences active[0..n) all have tokens left to generate, so that no row's position passes
// its sequence's last one.
static int launch_steps(const RolloutEngine *e, const GenerateParams *p, const GenerateResult *res, const int *active,
                        int n) {
    int steps = e->options.profile ? 1 : e->options.steps_per_graph;
    for (int r = 0; r < n; r++) {
        int left = p->max_new_tokens - res->n_tokens[active[r]];
        if (left < steps) steps = left;
    }
    return steps < 1 ? 1 : steps;
}

// Decode steps one launch after another: launch the steps, wait for their tokens, accept them
// step by step, and so on. Row r of a launch is sequence active[r] as it was at the launch
// (row_seq); a sequence that stops at one of its steps takes no token of the later ones.
static void decode_in_turn(RolloutEngine *e, const GenerateParams *p, GenerateResult *res, StopText *text, int *active,
                           int n_active, const int *prompt_lens, int n_splits) {
    int rows = 0, rebuild = 1;
    int *row_seq = (int *)mallocCheck(sizeof(int) * (n_active > 0 ? n_active : 1));
    while (n_active > 0) {
        if (rebuild) {
            rows = upload_rows(e, res, active, n_active, prompt_lens);
            rebuild = 0;
        }
        int steps = launch_steps(e, p, res, active, n_active);
        decode_step(e, rows, n_splits, steps);
        fetch_result(e, steps, "decode");   // synchronises
        profile_add(e);
        e->stats.decode_steps += steps;
        memcpy(row_seq, active, sizeof(int) * n_active);
        int still = n_active;
        for (int i = 0; i < steps && still > 0; i++) {
            StepResult slot = result_slot(e, &e->h_result, i);
            for (int r = 0; r < n_active; r++) {
                if (row_seq[r] < 0) continue;
                if (accept_token(p, res, text, row_seq[r], slot.token[r], slot.logprob[r])) {
                    row_seq[r] = -1;
                    still--;
                }
            }
        }
        if (still != n_active) {
            rebuild = 1;
            int kept = 0;
            for (int r = 0; r < n_active; r++)
                if (row_seq[r] >= 0) active[kept++] = row_seq[r];
            n_active = kept;
        }
    }
    free(row_seq);
}

// Queues one decode step of `rows` rows and the copy of its results (and the error word) into
// step_out[k], then the event that marks it done.
static void launch_step(RolloutEngine *e, int rows, int n_splits, int k) {
    decode_step(e, rows, n_splits, 1);
    copy_result(e, &e->step_out[k].r, 1);
    cudaCheck(cudaEventRecord(e->step_out[k].done, e->stream));
}

// Decode steps with the host's work hidden (options.pipeline): while the host waits for step
// t's tokens and applies the stop rules, step t + 1 is already queued on the same rows (the
// device advanced them itself), so the GPU does not idle between steps. Step t + 1 is queued
// only while some row can still go on after step t (max_new_tokens is known ahead). When a
// sequence stops at step t, step t + 1 is waited for as well: its tokens count for the
// sequences still running, the stopped sequence's row computed a token nobody takes (its slot
// is its own), and the rows are rebuilt before the next step. The tokens are those of
// decode_in_turn up to the products' rounding, which may depend on the row count (cuBLASLt's
// choice per shape), so a near-tie may go the other way.
static void decode_pipelined(RolloutEngine *e, const GenerateParams *p, GenerateResult *res, StopText *text, int *active,
                             int n_active, const int *prompt_lens, int n_splits) {
    if (n_active == 0) return;
    unsigned char *running = (unsigned char *)callocCheck((size_t)res->n_seq, 1);   // by sequence
    int rows = upload_rows(e, res, active, n_active, prompt_lens), cur = 0;
    launch_step(e, rows, n_splits, cur);
    for (;;) {
        // queue the next step unless every running sequence reaches max_new_tokens with this one
        int next = 0;
        for (int r = 0; r < n_active && !next; r++) next = res->n_tokens[active[r]] + 1 < p->max_new_tokens;
        if (next) launch_step(e, rows, n_splits, cur ^ 1);
        cudaCheck(cudaEventSynchronize(e->step_out[cur].done));
        report_device_errors(*e->step_out[cur].r.err, "decode");
        e->stats.decode_steps++;
        int still = accept_step(p, res, text, active, n_active, e->step_out[cur].r.token, e->step_out[cur].r.logprob);
        if (still == n_active) {   // nobody stopped: the queued step is the next one to take
            if (!next) break;       // (cannot happen: a step is queued while some sequence goes on)
            cur ^= 1;
            continue;
        }
        if (next) {
            // the queued step ran the old rows: row r is sequence h_slot[r] (as uploaded); take
            // its tokens for the sequences still running, in the old order
            cudaCheck(cudaEventSynchronize(e->step_out[cur ^ 1].done));
            report_device_errors(*e->step_out[cur ^ 1].r.err, "decode");
            e->stats.decode_steps++;
            for (int r = 0; r < still; r++) running[active[r]] = 1;
            const int *tok = e->step_out[cur ^ 1].r.token;
            const float *lp = e->step_out[cur ^ 1].r.logprob;
            int kept = 0;
            for (int r = 0; r < n_active; r++) {
                int i = e->h_slot[r];
                if (!running[i]) continue;   // stopped at the step before: this token is dropped
                running[i] = 0;
                if (!accept_token(p, res, text, i, tok[r], lp[r])) active[kept++] = i;
            }
            still = kept;
        }
        n_active = still;
        if (n_active == 0) break;
        rows = upload_rows(e, res, active, n_active, prompt_lens);
        cur = 0;
        launch_step(e, rows, n_splits, cur);
    }
    free(running);
}

extern "C" void rollout_generate(RolloutEngine *e, const int *const *prompts, const int *prompt_lens, int n_seq,
                                 const GenerateParams *p, GenerateResult *res) {
    const ModelConfig *c = &e->config;
    if (n_seq < 1) fatal("rollout_generate: no prompts");
    if (n_seq > e->max_seqs) fatal("rollout_generate: %d prompts exceed the engine's max_seqs %d", n_seq, e->max_seqs);
    if (p->max_new_tokens < 1) fatal("rollout_generate: max_new_tokens must be positive, got %d", p->max_new_tokens);
    if (!(p->temperature >= 0.0f) || !isfinite(p->temperature))
        fatal("rollout_generate: temperature must be a finite value >= 0, got %g", (double)p->temperature);
    if (p->top_k < 0) fatal("rollout_generate: top_k must be >= 0, got %d", p->top_k);
    if (!(p->top_p > 0.0f && p->top_p <= 1.0f)) fatal("rollout_generate: top_p must be in (0, 1], got %g", (double)p->top_p);
    if (p->n_stop_ids > 0 && p->stop_ids == NULL) fatal("rollout_generate: n_stop_ids is %d but stop_ids is NULL", p->n_stop_ids);
    if (p->n_stop_strings > 0 && p->stop_strings == NULL)
        fatal("rollout_generate: n_stop_strings is %d but stop_strings is NULL", p->n_stop_strings);
    int max_prompt = 0;
    for (int i = 0; i < n_seq; i++) {
        if (prompt_lens[i] < 1) fatal("rollout_generate: prompt %d is empty (no tokens)", i);
        if (prompt_lens[i] + p->max_new_tokens > c->max_seq_len)
            fatal("rollout_generate: prompt %d has %d tokens; with max_new_tokens %d that exceeds the model's context of %d tokens",
                  i, prompt_lens[i], p->max_new_tokens, c->max_seq_len);
        if (prompt_lens[i] + p->max_new_tokens > e->max_len)
            fatal("rollout_generate: prompt %d has %d tokens; with max_new_tokens %d that exceeds the engine's max_len of %d",
                  i, prompt_lens[i], p->max_new_tokens, e->max_len);
        for (int t = 0; t < prompt_lens[i]; t++)
            if (prompts[i][t] < 0 || prompts[i][t] >= c->padded_vocab_size)
                fatal("rollout_generate: prompt %d token %d is %d, outside the vocabulary 0..%d", i, t, prompts[i][t],
                      c->padded_vocab_size - 1);
        if (prompt_lens[i] > max_prompt) max_prompt = prompt_lens[i];
    }
    int reference = e->options.reference;
    int sampling_sets = p->temperature > 0.0f && ((p->top_k > 0 && p->top_k < c->vocab_size) || p->top_p < 1.0f);
    // with top-k or top-p the one-block sampler does everything; without, the split kernel runs
    // (sampling.cuh), and a captured step holds one or the other
    e->sampling_sets = sampling_sets;
    if (reference && sampling_sets && c->vocab_size > SAMPLE_REFERENCE_MAX_V)
        fatal("rollout_generate: the reference sampler handles top-k/top-p for vocabularies up to %d tokens, not %d",
              SAMPLE_REFERENCE_MAX_V, c->vocab_size);
    if (reference && e->ref_flags == NULL)
        e->ref_flags = (unsigned char *)cudaMallocCheck((size_t)e->max_seqs * c->vocab_size);
    int n_splits = decode_attention_splits(max_prompt + p->max_new_tokens);
    e->call_positions = max_prompt + p->max_new_tokens;
    matmul_tune_use = e->options.tune_products;   // (this file's products only: matmul.cuh is static)
    cudaStream_t st = e->stream;
    memset(&e->stats, 0, sizeof(e->stats));
    memset(e->prof_ms, 0, sizeof(e->prof_ms));
    memset(e->prof_marks, 0, sizeof(e->prof_marks));
    e->prof_steps = 0;

    generate_result_alloc(res, n_seq, p->max_new_tokens);
    StopText *text = (StopText *)callocCheck((size_t)n_seq, sizeof(StopText));
    int *active = (int *)mallocCheck(sizeof(int) * n_seq);

    e->h_cfg->temperature = p->temperature;
    e->h_cfg->top_k = p->top_k;
    e->h_cfg->top_p = p->top_p;
    e->h_cfg->unused = 0;
    cudaCheck(cudaMemcpyAsync(e->sample_cfg, e->h_cfg, sizeof(SampleConfig), cudaMemcpyHostToDevice, st));
    for (int i = 0; i < n_seq; i++) e->h_key[i] = rng_seed(p->seed + (uint64_t)i);
    cudaCheck(cudaMemsetAsync(e->err, 0, sizeof(int), st));
    if (e->options.poison) poison_buffers(e);

    // prefill: the first token of every sequence
    double t0 = wall_seconds();
    if (reference) prefill_rows(e, prompts, prompt_lens, n_seq, n_splits);
    else prefill_padded(e, prompts, prompt_lens, n_seq);
    int n_active = 0;
    for (int i = 0; i < n_seq; i++)
        if (!accept_token(p, res, text, i, e->first_token[i], e->first_logprob[i])) active[n_active++] = i;
    double t1 = wall_seconds();
    e->stats.prefill_seconds = t1 - t0;

    // decode
    if (e->options.pipeline && !reference && !e->options.profile)
        decode_pipelined(e, p, res, text, active, n_active, prompt_lens, n_splits);
    else decode_in_turn(e, p, res, text, active, n_active, prompt_lens, n_splits);
    e->stats.decode_seconds = wall_seconds() - t1;
    for (int i = 0; i < n_seq; i++) e->stats.generated_tokens += res->n_tokens[i];
    for (int i = 0; i < n_seq; i++) stop_text_free(&text[i]);
    free(text);
    free(active);
}

extern "C" void generate_cuda(Model *model, const int *const *prompts, const int *prompt_lens, int n_seq,
                              const GenerateParams *params, GenerateResult *result) {
    if (n_seq < 1) fatal("generate_cuda: no prompts");
    int max_prompt = 0;
    for (int i = 0; i < n_seq; i++)
        if (prompt_lens[i] > max_prompt) max_prompt = prompt_lens[i];
    long max_len = (long)max_prompt + (params->max_new_tokens > 0 ? params->max_new_tokens : 1);
    if (max_len > model->config.max_seq_len)
        fatal("generate_cuda: the longest prompt (%d tokens) with max_new_tokens %d exceeds the model's context of %d tokens",
              max_prompt, params->max_new_tokens, model->config.max_seq_len);
    if (max_len < 2) max_len = 2;
    RolloutEngine *engine = rollout_create(model, n_seq, (int)max_len);
    rollout_generate(engine, prompts, prompt_lens, n_seq, params, result);
    rollout_free(engine);
}
