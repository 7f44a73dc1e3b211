/*
 * The model on one GPU (model_cuda.h): the same forward and backward as model.c, layer by
 * layer, from the kernels in llmc/*.cuh and cuBLASLt products.
 *
 *   GPT-2   x = wte[tok] + wpe[t]
 *           per layer: x += attproj(attention(qkv(layernorm1(x))))
 *                      x += fcproj(gelu(fc(layernorm2(x))))
 *           logits = layernorm_f(x) @ wte^T
 *   Llama   x = wte[tok]
 *           per layer: x += o(attention(rope(q, k), v) of qkv(rmsnorm1(x)))
 *                      x += down(silu(gate) * up), (gate | up) = fc(rmsnorm2(x))
 *           logits = rmsnorm_f(x) @ head^T
 *
 * Precision. The residual stream x and its gradient are bf16 (N, C) tensors by default, as
 * everything else the forward keeps (norm outputs, qkv, attention output, MLP activations,
 * logits), fp32 for the per-row statistics (mean, rstd, log-sum-exp): each of the 2L adds into
 * the stream rounds it to bf16, and the norms, which are bound by the memory's bandwidth, move
 * 8 bytes an element instead of 12 (forward) and 16 (backward). CudaModel.residual_bf16 = 0 keeps
 * both in fp32 (the buffers are allocated for fp32, so a model can switch between forwards).
 * Products take bf16 operands and accumulate in fp32; parameter gradients are fp32 and
 * accumulated in place by the products (beta = 1).
 *
 * Fusions. Each residual add is fused with the norm that follows it (layernorm.cuh), or with a
 * bf16 stream made the epilogue of the projection whose output it adds (matmul_forward_add;
 * residual_in_product), the norm then reading the stream alone; the norm
 * backward also sums the residual gradient's columns, the bias gradient of the projection whose
 * output was added there (attproj, fcproj); GPT-2's MLP bias and GELU run in the cuBLASLt
 * epilogue, and the GELU backward in the epilogue of fcproj's input gradient (matmul.cuh;
 * use_gelu_fusion = 0 switches to the separate kernels); the classifier computes loss and logit
 * gradient in one kernel when the token weights are known at forward time
 * (cuda_model_forward_backward); the flash attention forward rotates the queries by RoPE as it
 * loads them and stores them back rotated, after rope_forward_keys has rotated the keys
 * (rope_forward_in_attention), and its backward takes dQ and dK back through RoPE in its epilogue
 * (rope_in_attention), the same bits as rope_forward and rope_backward around it; attention is the
 * tensor-core flash kernel of attention_flash.cuh (head sizes 64 and 128) or the tiled kernel of
 * attention.cuh (other head sizes, or TRAIN_MORA_ATTENTION=simple); both keep only a log-sum-exp
 * per query row instead of the (T, T) probabilities.
 */
#include <math.h>
#include <string.h>
extern "C" {
#include "utils.h"
}
#include "model_cuda.h"
#include "comm.h"
#include "comm_nccl.h"
#include "cuda_common.h"
#include "encoder.cuh"
#include "layernorm.cuh"
#include "rope.cuh"
#include "attention.cuh"
#include "attention_flash.cuh"
#include "gelu.cuh"
#include "swiglu.cuh"
#include "fused_classifier.cuh"
#include "adamw.cuh"
#include "global_norm.cuh"
#include "matmul.cuh"

// Attention kernels: the tensor-core flash kernels (attention_flash.cuh) for the head sizes they
// support, else the simple tiled kernels (attention.cuh). TRAIN_MORA_ATTENTION=simple selects the
// simple kernels for every head size (to compare the two in a full run); =flash is the default.
static int attention_use_flash(int HS) {
    static int choice = -1;   // 1 flash, 0 simple, read once
    if (choice < 0) {
        const char *v = getenv("TRAIN_MORA_ATTENTION");
        if (v == NULL || strcmp(v, "flash") == 0) choice = 1;
        else if (strcmp(v, "simple") == 0) choice = 0;
        else fatal("TRAIN_MORA_ATTENTION=%s: expected flash or simple", v);
    }
    return choice && attention_flash_supports(HS);
}

// Tensors that get weight decay (as model.c: embeddings and matmul weights, not norms or biases).
static int param_is_decayed(int tensor) {
    return tensor == P_WTE || tensor == P_WPE || tensor == P_QKVW || tensor == P_ATTPROJW ||
           tensor == P_FCW || tensor == P_FCPROJW || tensor == P_LMHEAD;
}

// ---------------------------------------------------------------------------------------------
// profiling: CUDA events around every kernel group, resolved after each public call

enum {
    PROF_ENCODER, PROF_NORM_FWD, PROF_MATMUL_FWD, PROF_ROPE, PROF_ATTENTION_FWD, PROF_ACT_FWD,
    PROF_CLASSIFIER, PROF_MATMUL_BWD, PROF_ACT_BWD, PROF_ATTENTION_BWD, PROF_NORM_BWD, PROF_ENCODER_BWD,
    PROF_GRAD_NORM, PROF_ADAMW, PROF_COUNT
};
static const char *const prof_names[PROF_COUNT] = {
    "encoder fwd", "norm+residual fwd", "matmul fwd (cuBLASLt)", "rope fwd+bwd", "attention fwd",
    "gelu/swiglu fwd", "fused classifier", "matmul bwd (cuBLASLt)", "gelu/swiglu bwd", "attention bwd",
    "norm bwd", "encoder bwd", "grad norm", "adamw",
};
#define PROF_MAX_EVENTS 8192
// sums_aside: the norm backwards' partial-sum buffers, written in turn (one may be read by the
// side stream while the main stream writes the other; the main stream's wait for the side stream
// to have read dresidual before each layer norm's backward already keeps it no further behind)
#define NORM_ASIDE_SLOTS 2

// ---------------------------------------------------------------------------------------------
// device state

typedef struct {
    cudaStream_t stream;
    // overlap_weight_grads: the second stream, and events that order it against the first
    // (side_fork: the side stream waits for the first's work so far; the others mark when the
    // side stream has read a buffer the first will overwrite)
    cudaStream_t side;
    cudaEvent_t side_fork, side_read_dres, side_read_dfch, side_read_dqkv, side_done;
    // overlap_update: AdamW queued on update_stream in update groups (update_group_of_layer: 0 the
    // embeddings, then update_layers layers a group, last the final norm and an untied head),
    // update_done[g] recorded after group g; update_pending while the main stream has not yet
    // waited for all of them (update_waited: the groups it has), and zero_pending while a
    // zero_grad's memsets queued behind them (zero_done) wait for the main stream's next gradient
    // write
    cudaStream_t update_stream;   // at the main stream's priority: the forward waits on it
    cudaEvent_t update_fork, zero_done, *update_done;
    int update_groups, update_layers, update_pending, update_waited, zero_pending;
    size_t param_offsets[NUM_PARAM_TENSORS];
    size_t param_sizes[NUM_PARAM_TENSORS];
    float *params;          // fp32 master weights (num_parameters), model.h's layout
    floatX *params_bf16;    // bf16 copy read by the forward
    float *grads;           // fp32 gradients (num_parameters + 1: the last float carries the loss
                            // through the data-parallel all-reduce, one collective for both)
    // zero_grad leaves the gradients of the layers' four weight matrices (grads_written_by_products)
    // unwritten, for the next backward's products to write (= instead of +=: no memset of them,
    // and no read of them in the products); whatever reads the gradients before such a backward
    // zeroes them first (grads_settle)
    int grads_unwritten;
    float *m, *v;           // AdamW moments: num_parameters, or shard_hi - shard_lo when sharded
    int sharded;            // ZeRO-1 (cuda_model_create_sharded): m, v cover [shard_lo, shard_hi)
    size_t shard_lo, shard_hi;
    double *dp_scalar;      // 1 double: a shard's squared gradient norm, summed over the ranks

    // activations (capacity for max_N = max_B * max_T rows; per-layer tensors stacked (L, ...))
    // the residual stream's buffers: fp32 or bf16 elements, as the last forward chose
    // (stream_bf16, from CudaModel.residual_bf16; stream_at), allocated for fp32
    int stream_bf16;
    void *encoded;                         // (N, C)
    floatX *ln1; float *ln1_mean, *ln1_rstd;     // (L, N, C), (L, N)
    floatX *qkv;                           // (L, N, QKV), q and k rotated for Llama
    floatX *atty;                          // (L, N, NH*HS)
    float *att_lse;                        // (L, B, NH, T)
    void *residual2;                       // (L, N, C)
    floatX *ln2; float *ln2_mean, *ln2_rstd;
    floatX *fch;                           // (L, N, FC) pre-activation
    floatX *fch_act;                       // (L, N, F)
    void *residual3;                       // (L, N, C)
    floatX *lnf; float *lnf_mean, *lnf_rstd;     // (N, C), (N)
    floatX *logits;                        // (N, Vp); the gradient after the classifier backward
    float *lse, *losses;                   // (N)
    floatX *proj;                          // (N, C) a projection's output before its residual add
    int *inputs, *targets;                 // (N)
    float *mask, *weights;                 // (N)

    // activation gradients (one layer's worth, reused)
    float *dresidual;                      // (N, C) fp32 gradient of the residual stream (fp32 stream)
    floatX *dresidual_bf16;                // (N, C) its bf16 copy, the products' operand; the gradient
                                           // itself with a bf16 stream
    float *dnorm;                          // (N, C) fp32 gradient at a norm's output
    floatX *dnorm_bf16;                    // (N, C) the same in bf16, for the layers' norms (dnorm_bf16)
    floatX *dqkv;                          // (N, QKV)
    floatX *datty;                         // (N, NH*HS)
    floatX *dfch;                          // (N, FC)
    floatX *dfch_act;                      // (N, F)
    float *att_D;                          // (B, NH, T) attention backward scratch
    float *dhidden;                        // (N, C)
    float *column_scratch;                 // the column sums' and the norm backward's partials
    float *side_scratch;                   // the column sums' partials on the side stream (sums_aside)
    // sums_aside: the norm backwards' partial sums, a ring of NORM_ASIDE_SLOTS buffers of
    // norm_aside_floats each that the side stream reduces; norm_aside_free[s] is recorded there
    // once slot s has been read, for the main stream to wait on before it writes the slot again
    float *norm_aside;
    size_t norm_aside_floats;
    cudaEvent_t norm_aside_free[NORM_ASIDE_SLOTS];
    int norm_aside_next;
    float *norm_partial;                   // GLOBAL_NORM_BLOCKS
    // norm_in_backward: the squared gradient norm's partials, GLOBAL_NORM_PIECE_BLOCKS for each
    // layer and then the rest (the tensors not stacked over the layers), (L + 1) of them;
    // grad_sums_ready while they hold for the gradient as it is
    float *grad_sums;
    int grad_sums_ready;
    float *norm_result;                    // 1
    float *rope_cos_sin;                   // (maxT, HS/2, 2), Llama only

    // every activation buffer, for cuda_model_poison
    void *act_ptrs[64];
    size_t act_bytes[64];
    int act_count;
    void *memory_blocks[64];               // every cudaMalloc, for cuda_model_free
    int memory_count;

    // cuda_model_create_inference: no fp32 master weights, gradients, moments or backward buffers;
    // the per-layer activations hold one layer (layer_slot), which the forward overwrites in turn;
    // with_head 0: neither the head's product nor the classifier, and no logits buffer
    int inference, with_head;

    int logits_hold_gradient;              // the classifier backward ran since the forward
    float *host_mask, *host_weights;       // (max_N)

    cudaEvent_t prof_events[PROF_MAX_EVENTS];
    int prof_group[PROF_MAX_EVENTS / 2];
    int prof_used;
    double prof_ms[PROF_COUNT];
    int prof_open;
    // the flash attention's launch configuration: the tuned one, or the defaults
    // (cuda_model_attention_config); applied before every forward and backward, since the
    // switches are shared by every model in the process
    FlashTuning tuning;
    int tuned;                 // tuning holds a tuning's result
    FlashConfig flash_config;
    int matmul_tune_from;      // the first of matmul.cuh's tuned shapes since this model's creation
} Impl;

static Impl *impl_of(CudaModel *model) { return (Impl *)model->impl; }
// What a model made by cuda_model_create_inference cannot do: it has no gradients, moments or
// fp32 weights.
static void require_training(const Impl *d, const char *function) {
    if (d->inference) fatal("%s: the model was created for forwards alone (cuda_model_create_inference)", function);
}

static void prof_begin(CudaModel *model, int group) {
    Impl *d = impl_of(model);
    if (!model->profile) return;
    if (d->prof_used + 2 > PROF_MAX_EVENTS) return;   // full: the rest of this call goes untimed
    d->prof_group[d->prof_used / 2] = group;
    cudaCheck(cudaEventRecord(d->prof_events[d->prof_used], d->stream));
    d->prof_open = 1;
}
static void prof_end(CudaModel *model) {
    Impl *d = impl_of(model);
    if (!model->profile || !d->prof_open) return;
    cudaCheck(cudaEventRecord(d->prof_events[d->prof_used + 1], d->stream));
    d->prof_used += 2;
    d->prof_open = 0;
}
// Waits for the recorded events and adds their times to the totals.
static void prof_resolve(CudaModel *model) {
    Impl *d = impl_of(model);
    if (!model->profile || d->prof_used == 0) return;
    cudaCheck(cudaStreamSynchronize(d->stream));
    for (int i = 0; i < d->prof_used; i += 2) {
        float ms = 0.0f;
        cudaCheck(cudaEventElapsedTime(&ms, d->prof_events[i], d->prof_events[i + 1]));
        d->prof_ms[d->prof_group[i / 2]] += ms;
    }
    d->prof_used = 0;
}

// ---------------------------------------------------------------------------------------------
// devices

extern "C" int cuda_device_count(void) {
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess) {
        cudaGetLastError();   // clear the sticky error so a later check does not see it
        return 0;
    }
    return count;
}

// The device the calling thread uses (cudaGetDevice creates no context).
static int current_device(void) {
    int device = 0;
    cudaCheck(cudaGetDevice(&device));
    return device;
}

extern "C" void cuda_device_describe(char *buf, size_t size) {
    cudaDeviceProp prop;
    cudaCheck(cudaGetDeviceProperties(&prop, current_device()));
    snprintf(buf, size, "%s, %d SMs, %.1f GiB, compute %d.%d", prop.name, prop.multiProcessorCount,
             prop.totalGlobalMem / (1024.0 * 1024.0 * 1024.0), prop.major, prop.minor);
}

// Dense (not sparse) bf16 tensor-core peaks from NVIDIA's datasheets.
extern "C" double cuda_device_bf16_peak_flops(void) {
    cudaDeviceProp prop;
    cudaCheck(cudaGetDeviceProperties(&prop, current_device()));
    const char *name = prop.name;
    if (strstr(name, "H100") && strstr(name, "PCIe")) return 756e12;
    if (strstr(name, "H100") && strstr(name, "NVL")) return 835e12;
    if (strstr(name, "H100") || strstr(name, "H200") || strstr(name, "H800")) return 989.4e12;
    if (strstr(name, "A100")) return 312e12;
    return 0.0;
}

// ---------------------------------------------------------------------------------------------
// create / free

// cudaMalloc for a model being created; when the device has no room, stops with a message that
// names the model's kind and batch shape (cuda_malloc_sized).
static void *model_malloc(const CudaModel *model, const Impl *d, size_t bytes) {
    char what[128];
    snprintf(what, sizeof(what), "a %s model for batches of up to %d x %d tokens", d->inference ? "forward-only" : "training",
             model->max_B, model->max_T);
    return cuda_malloc_sized(bytes, "cuda_model_create", what, model->device_bytes);
}

static void *device_alloc(CudaModel *model, Impl *d, size_t bytes) {
    // 256-byte granularity from cudaMalloc keeps every tensor start aligned for cuBLASLt
    cudaRequire(d->memory_count < 64, "model_cuda: too many device allocations");
    void *p = model_malloc(model, d, bytes);
    d->memory_blocks[d->memory_count++] = p;
    model->device_bytes += bytes;
    return p;
}
// An activation buffer: allocated, and listed for poisoning.
static void *activation_alloc(CudaModel *model, Impl *d, size_t bytes) {
    void *p = device_alloc(model, d, bytes);
    cudaRequire(d->act_count < 64, "model_cuda: too many activation buffers");
    d->act_ptrs[d->act_count] = p;
    d->act_bytes[d->act_count] = bytes;
    d->act_count++;
    return p;
}

static int fc_width(const ModelConfig *c) { return c->arch == ARCH_GPT2 ? c->ffn_hidden : 2 * c->ffn_hidden; }
static int qkv_width(const ModelConfig *c) { return (c->n_head + 2 * c->n_kv_head) * c->head_dim; }

// A switch that is `otherwise` unless the environment variable `name` is 0 or 1; any other value
// stops with a message naming the variable.
static int env_flag(const char *name, int otherwise) {
    const char *v = getenv(name);
    if (v != NULL && strcmp(v, "0") != 0 && strcmp(v, "1") != 0) fatal("%s=%s: expected 0 or 1", name, v);
    return v == NULL ? otherwise : strcmp(v, "1") == 0;
}
// A switch that is on unless the environment variable `name` is 0.
static int env_switch(const char *name) { return env_flag(name, 1); }

// cuda_model_create, and with zero1 cuda_model_create_sharded: the moments of this rank's shard
// only are allocated, so the full ones never take GPU memory. With inference,
// cuda_model_create_inference (with_head as there).
static CudaModel *create_model(const Model *cpu, int max_B, int max_T, int zero1, int inference, int with_head) {
    const ModelConfig *c = &cpu->config;
    if (cpu->params == NULL) fatal("cuda_model_create: the CPU model is not initialised");
    if (max_B <= 0 || max_T <= 0) fatal("cuda_model_create: batch shape B=%d T=%d must be positive", max_B, max_T);
    if (max_T > c->max_seq_len) fatal("cuda_model_create: T=%d exceeds the model's max_seq_len %d", max_T, c->max_seq_len);
    if ((size_t)max_B * max_T > (size_t)1 << 30) fatal("cuda_model_create: batch of %d x %d tokens is too large", max_B, max_T);
    int HS = c->head_dim;
    if (HS != 16 && HS != 32 && HS != 64 && HS != 128)
        fatal("cuda_model_create: head_dim %d is not supported by the CUDA attention kernels (16, 32, 64 or 128)", HS);
    if (max_B > 65535) fatal("cuda_model_create: batch size %d exceeds 65535", max_B);
    if (cuda_device_count() <= 0) fatal("cuda_model_create: no CUDA device found");

    CudaModel *model = (CudaModel *)callocCheck(1, sizeof(CudaModel));
    Impl *d = (Impl *)callocCheck(1, sizeof(Impl));
    model->impl = d;
    model->config = *c;
    model->num_parameters = cpu->num_parameters;
    model->max_B = max_B;
    model->max_T = max_T;
    model->opt_step = cpu->opt_step;
    model->mean_loss = -1.0f;
    model->use_gelu_fusion = 1;
    // the side stream for the weight gradients, on unless TRAIN_MORA_OVERLAP_GRADS=0 (bench_train
    // times both: on an H100 it saved 1.5% of a GPT-2 step and cost nothing at the SmolLM2 shape)
    model->overlap_weight_grads = env_switch("TRAIN_MORA_OVERLAP_GRADS");
    model->dnorm_bf16 = env_switch("TRAIN_MORA_DNORM_BF16");
    model->residual_bf16 = env_switch("TRAIN_MORA_RESIDUAL_BF16");
    model->residual_in_product = env_switch("TRAIN_MORA_RESIDUAL_IN_PRODUCT");
    // RoPE inside the flash kernels: off unless set to 1 (the same bits; the kernels beside them
    // were faster on the H100 and H200, see model_cuda.h)
    model->rope_in_attention = env_flag("TRAIN_MORA_ROPE_IN_ATTENTION", 0);
    model->rope_forward_in_attention = env_flag("TRAIN_MORA_ROPE_FORWARD_IN_ATTENTION", 0);
    model->overlap_update = env_switch("TRAIN_MORA_OVERLAP_UPDATE");
    model->norm_in_backward = env_switch("TRAIN_MORA_NORM_IN_BACKWARD");
    model->sums_aside = env_switch("TRAIN_MORA_SUMS_ASIDE");
    model->grads_first_write = 1;
    model->attention_tuned = 0;
    model->attention_tuning[0] = '\0';
    model->attention_wgmma_tried = 0;
    model->matmul_tune = env_switch("TRAIN_MORA_MATMUL_TUNE");
    d->matmul_tune_from = matmul_tune_count;
    snprintf(model->matmul_tuning, sizeof(model->matmul_tuning), "%s",
             model->matmul_tune ? "cuBLASLt: no product shape tuned by this model yet (the first step at the full shape tunes new ones)"
                                : "cuBLASLt's first choices (TRAIN_MORA_MATMUL_TUNE=0)");
    // the current device: 0, or the GPU comm_nccl_init selected for this rank
    // The main stream carries the step's critical path; with overlap_weight_grads the side stream's
    // weight-gradient products only fill the SMs its kernels leave free: the main stream gets the
    // device's highest priority, the side stream its lowest, so the block scheduler serves the
    // main stream's next kernel first instead of letting a large product take the SMs.
    int least_priority = 0, greatest_priority = 0;
    cudaCheck(cudaDeviceGetStreamPriorityRange(&least_priority, &greatest_priority));
    cudaCheck(cudaStreamCreateWithPriority(&d->stream, cudaStreamDefault, greatest_priority));
    cudaCheck(cudaStreamCreateWithPriority(&d->side, cudaStreamNonBlocking, least_priority));
    cudaEvent_t *events[] = {&d->side_fork, &d->side_read_dres, &d->side_read_dfch, &d->side_read_dqkv, &d->side_done};
    for (cudaEvent_t *ev : events) cudaCheck(cudaEventCreateWithFlags(ev, cudaEventDisableTiming));
    // groups of update_layers layers: at most 16 layer groups, so that the host queues few enough
    // launches (one a tensor a group) before the next forward's first kernel
    // (TRAIN_MORA_UPDATE_LAYERS=N sets N; N >= n_layer makes one group of every layer)
    d->update_layers = (c->n_layer + 15) / 16;
    if (d->update_layers < 1) d->update_layers = 1;
    const char *layers = getenv("TRAIN_MORA_UPDATE_LAYERS");
    if (layers != NULL) {
        char *end = NULL;
        long k = strtol(layers, &end, 10);
        if (end == layers || *end != '\0' || k < 1)
            fatal("TRAIN_MORA_UPDATE_LAYERS=%s: expected a whole number of layers, at least 1", layers);
        d->update_layers = k < c->n_layer ? (int)k : c->n_layer;
    }
    d->update_groups = 2 + (c->n_layer + d->update_layers - 1) / d->update_layers;
    d->update_done = (cudaEvent_t *)mallocCheck(d->update_groups * sizeof(cudaEvent_t));
    for (int g = 0; g < d->update_groups; g++) cudaCheck(cudaEventCreateWithFlags(&d->update_done[g], cudaEventDisableTiming));
    cudaCheck(cudaStreamCreateWithPriority(&d->update_stream, cudaStreamNonBlocking, greatest_priority));
    cudaCheck(cudaEventCreateWithFlags(&d->update_fork, cudaEventDisableTiming));
    cudaCheck(cudaEventCreateWithFlags(&d->zero_done, cudaEventDisableTiming));
    matmul_setup();
    // the side stream's products (the weight gradients) need a workspace of their own; a model for
    // forwards alone runs none
    if (!inference) matmul_register_stream(d->side);

    size_t offset = 0;
    for (int i = 0; i < NUM_PARAM_TENSORS; i++) {
        d->param_offsets[i] = offset;
        d->param_sizes[i] = cpu->param_sizes[i];
        offset += cpu->param_sizes[i];
    }
    size_t P = cpu->num_parameters;
    d->inference = inference;
    d->with_head = !inference || with_head;
    d->params_bf16 = (floatX *)device_alloc(model, d, P * sizeof(floatX));
    if (inference) {
        // the bf16 weights alone: the fp32 master passes through a buffer freed at once
        float *staging = (float *)model_malloc(model, d, P * sizeof(float));
        cudaCheck(cudaMemcpy(staging, cpu->params, P * sizeof(float), cudaMemcpyHostToDevice));
        convert_f32_to_bf16(d->params_bf16, staging, P, d->stream);
        cudaCheck(cudaStreamSynchronize(d->stream));
        cudaCheck(cudaFree(staging));
    } else {
        d->params = (float *)device_alloc(model, d, P * sizeof(float));
        d->grads = (float *)device_alloc(model, d, (P + 1) * sizeof(float));
        d->shard_lo = 0;
        d->shard_hi = P;
        if (zero1) comm_shard_range(P, comm_rank(), comm_world(), &d->shard_lo, &d->shard_hi);
        d->sharded = zero1;
        size_t moments = d->shard_hi - d->shard_lo;
        d->m = (float *)device_alloc(model, d, moments * sizeof(float));
        d->v = (float *)device_alloc(model, d, moments * sizeof(float));
        cudaCheck(cudaMemcpy(d->params, cpu->params, P * sizeof(float), cudaMemcpyHostToDevice));
        convert_f32_to_bf16(d->params_bf16, d->params, P, d->stream);
        cudaCheck(cudaMemset(d->grads, 0, (P + 1) * sizeof(float)));
        if (cpu->m) cudaCheck(cudaMemcpy(d->m, cpu->m + d->shard_lo, moments * sizeof(float), cudaMemcpyHostToDevice));
        else cudaCheck(cudaMemset(d->m, 0, moments * sizeof(float)));
        if (cpu->v) cudaCheck(cudaMemcpy(d->v, cpu->v + d->shard_lo, moments * sizeof(float), cudaMemcpyHostToDevice));
        else cudaCheck(cudaMemset(d->v, 0, moments * sizeof(float)));
    }

    // L: the layers the stacked activations hold (one for inference: layer_slot)
    size_t N = (size_t)max_B * max_T, L = inference ? 1 : c->n_layer, C = c->n_embd, NH = c->n_head;
    size_t QKV = qkv_width(c), FC = fc_width(c), F = c->ffn_hidden, Vp = c->padded_vocab_size, AY = NH * HS;
    d->encoded = activation_alloc(model, d, N * C * sizeof(float));
    d->ln1 = (floatX *)activation_alloc(model, d, L * N * C * sizeof(floatX));
    d->ln1_mean = (float *)activation_alloc(model, d, L * N * sizeof(float));
    d->ln1_rstd = (float *)activation_alloc(model, d, L * N * sizeof(float));
    d->qkv = (floatX *)activation_alloc(model, d, L * N * QKV * sizeof(floatX));
    d->atty = (floatX *)activation_alloc(model, d, L * N * AY * sizeof(floatX));
    d->att_lse = (float *)activation_alloc(model, d, L * N * NH * sizeof(float));
    d->residual2 = activation_alloc(model, d, L * N * C * sizeof(float));
    d->ln2 = (floatX *)activation_alloc(model, d, L * N * C * sizeof(floatX));
    d->ln2_mean = (float *)activation_alloc(model, d, L * N * sizeof(float));
    d->ln2_rstd = (float *)activation_alloc(model, d, L * N * sizeof(float));
    d->fch = (floatX *)activation_alloc(model, d, L * N * FC * sizeof(floatX));
    d->fch_act = (floatX *)activation_alloc(model, d, L * N * F * sizeof(floatX));
    d->residual3 = activation_alloc(model, d, L * N * C * sizeof(float));
    d->lnf = (floatX *)activation_alloc(model, d, N * C * sizeof(floatX));
    d->lnf_mean = (float *)activation_alloc(model, d, N * sizeof(float));
    d->lnf_rstd = (float *)activation_alloc(model, d, N * sizeof(float));
    if (d->with_head) {
        d->logits = (floatX *)activation_alloc(model, d, N * Vp * sizeof(floatX));
        d->lse = (float *)activation_alloc(model, d, N * sizeof(float));
        d->losses = (float *)activation_alloc(model, d, N * sizeof(float));
    }
    d->proj = (floatX *)activation_alloc(model, d, N * C * sizeof(floatX));
    d->inputs = (int *)device_alloc(model, d, N * sizeof(int));
    d->targets = (int *)device_alloc(model, d, N * sizeof(int));
    d->mask = (float *)device_alloc(model, d, N * sizeof(float));
    d->weights = (float *)device_alloc(model, d, N * sizeof(float));
    for (int s = 0; s < NORM_ASIDE_SLOTS; s++) cudaCheck(cudaEventCreateWithFlags(&d->norm_aside_free[s], cudaEventDisableTiming));
    d->norm_aside_next = 0;
    d->rope_cos_sin = NULL;
    if (c->arch == ARCH_LLAMA) {
        float *table = rope_table_host(max_T, HS, c->rope_theta);
        size_t bytes = (size_t)max_T * (HS / 2) * 2 * sizeof(float);
        d->rope_cos_sin = (float *)device_alloc(model, d, bytes);
        cudaCheck(cudaMemcpy(d->rope_cos_sin, table, bytes, cudaMemcpyHostToDevice));
        free(table);
    }
    d->host_mask = (float *)mallocCheck(N * sizeof(float));
    d->host_weights = (float *)mallocCheck(N * sizeof(float));
    model->token_losses = (float *)callocCheck(N, sizeof(float));
    for (int i = 0; i < PROF_MAX_EVENTS; i++) cudaCheck(cudaEventCreate(&d->prof_events[i]));
    if (inference) {
        cudaCheck(cudaStreamSynchronize(d->stream));
        return model;
    }
    d->dresidual = (float *)activation_alloc(model, d, N * C * sizeof(float));
    d->dresidual_bf16 = (floatX *)activation_alloc(model, d, N * C * sizeof(floatX));
    d->dnorm = (float *)activation_alloc(model, d, N * C * sizeof(float));
    d->dnorm_bf16 = (floatX *)activation_alloc(model, d, N * C * sizeof(floatX));
    d->dqkv = (floatX *)activation_alloc(model, d, N * QKV * sizeof(floatX));
    d->datty = (floatX *)activation_alloc(model, d, N * AY * sizeof(floatX));
    d->dfch = (floatX *)activation_alloc(model, d, N * FC * sizeof(floatX));
    d->dfch_act = (floatX *)activation_alloc(model, d, N * F * sizeof(floatX));
    d->att_D = (float *)activation_alloc(model, d, N * NH * sizeof(float));
    d->dhidden = (float *)activation_alloc(model, d, N * C * sizeof(float));
    size_t widest = C > QKV ? C : QKV;
    if (FC > widest) widest = FC;
    size_t scratch_floats = (size_t)column_chunks((int)N) * widest, norm_floats = norm_backward_scratch_floats((int)N, C);
    d->column_scratch = (float *)activation_alloc(model, d, (scratch_floats > norm_floats ? scratch_floats : norm_floats) * sizeof(float));
    d->side_scratch = (float *)activation_alloc(model, d, scratch_floats * sizeof(float));
    d->norm_aside_floats = norm_backward_partial_floats((int)N, C, 1, 1);
    d->norm_aside = (float *)activation_alloc(model, d, NORM_ASIDE_SLOTS * d->norm_aside_floats * sizeof(float));
    d->norm_partial = (float *)device_alloc(model, d, GLOBAL_NORM_BLOCKS * sizeof(float));
    d->grad_sums = (float *)device_alloc(model, d, (L + 1) * GLOBAL_NORM_PIECE_BLOCKS * sizeof(float));
    d->norm_result = (float *)device_alloc(model, d, sizeof(float));
    d->dp_scalar = (double *)device_alloc(model, d, sizeof(double));
    cudaCheck(cudaStreamSynchronize(d->stream));
    return model;
}

extern "C" CudaModel *cuda_model_create(const Model *cpu, int max_B, int max_T) {
    return create_model(cpu, max_B, max_T, 0, 0, 0);
}

extern "C" CudaModel *cuda_model_create_sharded(const Model *cpu, int max_B, int max_T) {
    return create_model(cpu, max_B, max_T, 1, 0, 0);
}

// The residual stream in fp32 unless TRAIN_MORA_RESIDUAL_BF16 says otherwise.
static CudaModel *fp32_residual(CudaModel *model) {
    if (getenv("TRAIN_MORA_RESIDUAL_BF16") == NULL) model->residual_bf16 = 0;
    return model;
}

extern "C" CudaModel *cuda_model_create_fp32_residual(const Model *cpu, int max_B, int max_T) {
    return fp32_residual(create_model(cpu, max_B, max_T, 0, 0, 0));
}

extern "C" CudaModel *cuda_model_create_inference(const Model *cpu, int max_B, int max_T, int with_head) {
    return fp32_residual(create_model(cpu, max_B, max_T, 0, 1, with_head));
}

extern "C" void cuda_model_free(CudaModel *model) {
    if (model == NULL) return;
    Impl *d = impl_of(model);
    cudaCheck(cudaStreamSynchronize(d->stream));
    for (int i = 0; i < d->memory_count; i++) cudaCheck(cudaFree(d->memory_blocks[i]));
    for (int i = 0; i < PROF_MAX_EVENTS; i++) cudaCheck(cudaEventDestroy(d->prof_events[i]));
    cudaCheck(cudaStreamSynchronize(d->side));
    cudaCheck(cudaStreamSynchronize(d->update_stream));
    cudaCheck(cudaStreamDestroy(d->update_stream));
    matmul_unregister_stream(d->side);
    cudaEvent_t events[] = {d->side_fork, d->side_read_dres, d->side_read_dfch, d->side_read_dqkv, d->side_done,
                            d->update_fork, d->zero_done};
    for (cudaEvent_t ev : events) cudaCheck(cudaEventDestroy(ev));
    for (int g = 0; g < d->update_groups; g++) cudaCheck(cudaEventDestroy(d->update_done[g]));
    for (int s = 0; s < NORM_ASIDE_SLOTS; s++) cudaCheck(cudaEventDestroy(d->norm_aside_free[s]));
    free(d->update_done);
    cudaCheck(cudaStreamDestroy(d->side));
    cudaCheck(cudaStreamDestroy(d->stream));
    free(d->host_mask);
    free(d->host_weights);
    free(model->token_losses);
    free(d);
    free(model);
}

// ---------------------------------------------------------------------------------------------
// views

// Whether parameter tensor `tensor` is stacked over the layers (model.h's (L, ...) tensors).
static int param_is_stacked(int tensor) { return tensor >= P_LN1W && tensor <= P_FCPROJB; }
// Parameter tensor `tensor` (layer l of a stacked tensor; l = 0 for the others) as bf16 / fp32 /
// its gradient. NULL when the tensor is unused by the config.
static floatX *weight_bf16(CudaModel *model, int tensor, int l) {
    Impl *d = impl_of(model);
    if (d->param_sizes[tensor] == 0) return NULL;
    size_t per_layer = param_is_stacked(tensor) ? d->param_sizes[tensor] / model->config.n_layer : 0;
    return d->params_bf16 + d->param_offsets[tensor] + per_layer * l;
}
static float *weight_grad(CudaModel *model, int tensor, int l) {
    Impl *d = impl_of(model);
    if (d->param_sizes[tensor] == 0) return NULL;
    size_t per_layer = param_is_stacked(tensor) ? d->param_sizes[tensor] / model->config.n_layer : 0;
    return d->grads + d->param_offsets[tensor] + per_layer * l;
}
static int head_tensor(const ModelConfig *c) { return c->tied_embeddings ? P_WTE : P_LMHEAD; }

// ---------------------------------------------------------------------------------------------
// the update beside the next forward (overlap_update)

// The update group that holds layer l's tensors (l = n_layer: the final norm's and an untied
// head's, the last group); group 0 holds the embeddings. The forward's order.
static int update_group_of_layer(const Impl *d, const ModelConfig *c, int l) {
    return l >= c->n_layer ? d->update_groups - 1 : 1 + l / d->update_layers;
}
// The main stream waits until the queued update has written group g (and every group before
// it: the groups are queued in order on one stream).
static void update_wait(CudaModel *model, int g) {
    Impl *d = impl_of(model);
    if (!d->update_pending || g < d->update_waited) return;
    cudaCheck(cudaStreamWaitEvent(d->stream, d->update_done[g], 0));
    d->update_waited = g + 1;
    if (d->update_waited >= d->update_groups) d->update_pending = 0;
}
// Before a call other than the forward reads or writes the parameters, gradients or moments: the
// main stream waits for the whole queued update and for zero_grad's memsets queued behind it.
static void update_settle(CudaModel *model) {
    Impl *d = impl_of(model);
    update_wait(model, d->update_groups - 1);
    if (d->zero_pending) {
        cudaCheck(cudaStreamWaitEvent(d->stream, d->zero_done, 0));
        d->zero_pending = 0;
    }
}

// ---------------------------------------------------------------------------------------------
// forward

// The batch checks of model.c's model_forward, with the same messages.
static void check_batch(const ModelConfig *c, const int *inputs, const int *targets, const float *loss_mask, int B, int T,
                        int max_B, int max_T) {
    if (B <= 0 || T <= 0) fatal("cuda_model_forward: batch shape B=%d T=%d must be positive", B, T);
    if (T > c->max_seq_len) fatal("cuda_model_forward: sequence length T=%d exceeds the model's max_seq_len %d", T, c->max_seq_len);
    if (B > max_B || T > max_T || (size_t)B * T > (size_t)max_B * max_T)
        fatal("cuda_model_forward: batch %d x %d exceeds the shape %d x %d the GPU model was created for", B, T, max_B, max_T);
    for (int i = 0; i < B * T; i++) {
        if (inputs[i] < 0 || inputs[i] >= c->padded_vocab_size)
            fatal("cuda_model_forward: input token %d at (b=%d, t=%d) is outside the vocabulary 0..%d",
                  inputs[i], i / T, i % T, c->padded_vocab_size - 1);
        if (loss_mask && !(isfinite(loss_mask[i]) && loss_mask[i] >= 0.0f))
            fatal("cuda_model_forward: loss mask %g at (b=%d, t=%d) must be a finite value >= 0", (double)loss_mask[i], i / T, i % T);
        int counts = loss_mask == NULL || loss_mask[i] != 0.0f;
        if (targets && counts && (targets[i] < 0 || targets[i] >= c->vocab_size))
            fatal("cuda_model_forward: target token %d at (b=%d, t=%d) is outside the vocabulary 0..%d",
                  targets[i], i / T, i % T, c->vocab_size - 1);
    }
}

// CudaModel.attention_tuned: the flash attention's configuration for the first forward's shape,
// tuned on the model's own attention buffers before anything is in them.
static void attention_tune(CudaModel *model, int B, int T) {
    const ModelConfig *c = &model->config;
    Impl *d = impl_of(model);
    model->attention_tuned = 1;
    d->flash_config = flash_default_config;
    flash_set_config(&d->flash_config);
    if (!attention_use_flash(c->head_dim)) {
        snprintf(model->attention_tuning, sizeof(model->attention_tuning), "simple attention kernels, no tuning");
        return;
    }
    const char *v = getenv("TRAIN_MORA_FLASH_TUNE");
    if (v != NULL && strcmp(v, "0") != 0 && strcmp(v, "1") != 0) fatal("TRAIN_MORA_FLASH_TUNE=%s: expected 0 or 1", v);
    if (v != NULL && strcmp(v, "0") == 0) {
        snprintf(model->attention_tuning, sizeof(model->attention_tuning), "flash defaults (TRAIN_MORA_FLASH_TUNE=0)");
        return;
    }
    FlashTuning t = attention_flash_tune(d->qkv, d->atty, d->att_lse, d->datty, d->dqkv, d->att_D, B, T, c->n_head,
                                         c->n_kv_head, c->head_dim, d->stream, 0);
    // what the tuning wrote is no input of anything: NaN over it, as cuda_model_poison would
    // leave it, so an element the forward or backward failed to write still shows
    size_t N = (size_t)B * T, QKV = (size_t)qkv_width(c), AY = (size_t)c->n_head * c->head_dim;
    cudaCheck(cudaMemsetAsync(d->qkv, 0xff, N * QKV * sizeof(floatX), d->stream));
    cudaCheck(cudaMemsetAsync(d->atty, 0xff, N * AY * sizeof(floatX), d->stream));
    cudaCheck(cudaMemsetAsync(d->att_lse, 0xff, N * c->n_head * sizeof(float), d->stream));
    if (!d->inference) {   // an inference model has no backward buffers, and its tuning no backward
        cudaCheck(cudaMemsetAsync(d->datty, 0xff, N * AY * sizeof(floatX), d->stream));
        cudaCheck(cudaMemsetAsync(d->dqkv, 0xff, N * QKV * sizeof(floatX), d->stream));
        cudaCheck(cudaMemsetAsync(d->att_D, 0xff, N * c->n_head * sizeof(float), d->stream));
    }
    d->tuning = t;
    d->tuned = 1;
    model->attention_wgmma_tried = t.wgmma;
    d->flash_config = t.config;
    char what[320];
    flash_describe(&t.config, what, sizeof(what));
    int len = d->inference
        ? snprintf(model->attention_tuning, sizeof(model->attention_tuning),
                   "flash tuned at B=%d T=%d for forwards alone: %s; forward %.3f ms (defaults %.3f); %d of %d candidates "
                   "differed in their bits", B, T, what, t.forward_ms, t.default_forward_ms, t.differed, t.tried)
        : snprintf(model->attention_tuning, sizeof(model->attention_tuning),
                   "flash tuned at B=%d T=%d: %s; forward %.3f ms (defaults %.3f), backward %.3f ms (defaults %.3f); %d "
                   "of %d candidates differed in their bits", B, T, what, t.forward_ms, t.default_forward_ms,
                   t.backward_ms, t.default_backward_ms, t.differed, t.tried);
    if (t.wgmma && len > 0 && (size_t)len < sizeof(model->attention_tuning)) {
        flash_describe(&t.mma_config, what, sizeof(what));
        snprintf(model->attention_tuning + len, sizeof(model->attention_tuning) - len,
                 "; without the warpgroup kernels: %s; forward %.3f ms, backward %.3f ms", what, t.mma_forward_ms,
                 t.mma_backward_ms);
    }
}

// The residual stream: element `offset` of one of its buffers, in the last forward's precision.
static void *stream_at(const Impl *d, void *base, size_t offset) {
    return (char *)base + offset * (d->stream_bf16 ? sizeof(floatX) : sizeof(float));
}
// residual_norm_forward on the stream's buffers (res_out may be NULL, as there).
static void stream_norm_forward(const Impl *d, void *res_out, floatX *out, float *mean, float *rstd, const void *res_in,
                                const floatX *branch, const floatX *weight, const floatX *bias, int N, int C, float eps,
                                int is_layernorm, cudaStream_t st) {
    if (d->stream_bf16)
        residual_norm_forward((floatX *)res_out, out, mean, rstd, (const floatX *)res_in, branch, weight, bias, N, C, eps,
                              is_layernorm, st);
    else
        residual_norm_forward((float *)res_out, out, mean, rstd, (const float *)res_in, branch, weight, bias, N, C, eps,
                              is_layernorm, st);
}
// norm_backward into the stream's gradient from dout (TD: fp32 or bf16) at the norm's output,
// inp the norm's input (a stream buffer): dresidual (fp32) and its bf16 copy dresidual_bf16, or
// with a bf16 stream dresidual_bf16 alone. With `aside` (sums_aside, with the side stream
// in use) the column sums are finished on the side stream from a slot of the norm_aside ring.
template <typename TD>
static void stream_norm_backward(Impl *d, int aside, float *dweight, float *dbias, float *dres_colsum, const TD *dout,
                                 const void *inp, const floatX *weight, const float *mean, const float *rstd, int N, int C,
                                 int is_layernorm) {
    if (aside && C <= NORM_VEC_MAX_WIDTH) {
        int slot = d->norm_aside_next;
        d->norm_aside_next = (slot + 1) % NORM_ASIDE_SLOTS;
        float *partial = d->norm_aside + (size_t)slot * d->norm_aside_floats;
        cudaCheck(cudaStreamWaitEvent(d->stream, d->norm_aside_free[slot], 0));   // the side stream has read the slot
        if (d->stream_bf16)
            norm_backward_partials(d->dresidual_bf16, (floatX *)NULL, partial, dbias != NULL, dres_colsum != NULL, dout,
                                   (const floatX *)inp, weight, mean, rstd, N, C, is_layernorm, d->stream);
        else
            norm_backward_partials(d->dresidual, d->dresidual_bf16, partial, dbias != NULL, dres_colsum != NULL, dout,
                                   (const float *)inp, weight, mean, rstd, N, C, is_layernorm, d->stream);
        cudaCheck(cudaEventRecord(d->side_fork, d->stream));
        cudaCheck(cudaStreamWaitEvent(d->side, d->side_fork, 0));
        norm_backward_reduce(dweight, dbias, dres_colsum, partial, N, C, d->side);
        cudaCheck(cudaEventRecord(d->norm_aside_free[slot], d->side));
        return;
    }
    if (d->stream_bf16)
        norm_backward(d->dresidual_bf16, (floatX *)NULL, dweight, dbias, dres_colsum, dout, (const floatX *)inp, weight, mean,
                      rstd, d->column_scratch, N, C, is_layernorm, d->stream);
    else
        norm_backward(d->dresidual, d->dresidual_bf16, dweight, dbias, dres_colsum, dout, (const float *)inp, weight, mean,
                      rstd, d->column_scratch, N, C, is_layernorm, d->stream);
}

// A projection whose output the residual stream adds, and the norm after it: res_out = res_in +
// inp (N, IC) @ w^T + b, out = norm(res_out). With a bf16 stream and residual_in_product the add
// is the product's epilogue (matmul_forward_add, one rounding) and the norm reads res_out alone;
// otherwise the product writes proj and the norm kernel adds it (also when cuBLASLt offers no
// algorithm for the epilogue's add).
static void projection_add_norm(CudaModel *model, void *res_out, const void *res_in, const floatX *inp, const floatX *w,
                                const floatX *b, int IC, floatX *out, float *mean, float *rstd, const floatX *norm_w,
                                const floatX *norm_b, int N, int C, float eps, int is_layernorm) {
    Impl *d = impl_of(model);
    cudaStream_t st = d->stream;
    prof_begin(model, PROF_MATMUL_FWD);
    int added = d->stream_bf16 && model->residual_in_product &&
                matmul_forward_add((floatX *)res_out, (const floatX *)res_in, inp, w, b, N, IC, C, st);
    if (!added) matmul_forward(d->proj, inp, w, b, NULL, N, IC, C, st);
    prof_end(model);
    prof_begin(model, PROF_NORM_FWD);
    if (added) stream_norm_forward(d, NULL, out, mean, rstd, res_out, NULL, norm_w, norm_b, N, C, eps, is_layernorm, st);
    else stream_norm_forward(d, res_out, out, mean, rstd, res_in, d->proj, norm_w, norm_b, N, C, eps, is_layernorm, st);
    prof_end(model);
}

// Where layer l's activations sit in the stacked buffers: layer l, or for an inference model
// the one layer they hold, which each layer overwrites (nothing reads a layer's activations
// after the next layer's have been written: the norm of layer l + 1's input is written at the
// end of layer l, after layer l's products have read its own).
static size_t layer_slot(const Impl *d, int l) { return d->inference ? 0 : (size_t)l; }

// The forward of model.h; when weights_host is given (B*T, already zero where the mask is 0)
// the classifier also writes the logits' gradient for those weights (fused).
static void forward_impl(CudaModel *model, const int *inputs, const int *targets, const float *loss_mask, int B, int T,
                         const float *weights_host) {
    const ModelConfig *c = &model->config;
    Impl *d = impl_of(model);
    check_batch(c, inputs, targets, loss_mask, B, T, model->max_B, model->max_T);
    if (!d->with_head && (targets != NULL || weights_host != NULL))
        fatal("cuda_model_forward: the model was created without its head (cuda_model_create_inference): no targets");
    cudaStream_t st = d->stream;
    model->B = B;
    model->T = T;
    int N = B * T, C = c->n_embd, NH = c->n_head, NKV = c->n_kv_head, HS = c->head_dim, L = c->n_layer;
    int QKV = qkv_width(c), F = c->ffn_hidden, FC = fc_width(c), V = c->vocab_size, Vp = c->padded_vocab_size;
    int gpt2 = c->arch == ARCH_GPT2;
    float eps = c->norm_eps;
    size_t NC = (size_t)N * C;
    if (!model->attention_tuned) attention_tune(model, B, T);
    matmul_tune = model->matmul_tune && B * T == model->max_B * model->max_T;
    int tuned_before = matmul_tune_count;
    flash_set_config(&d->flash_config);

    for (int i = 0; i < N; i++) d->host_mask[i] = loss_mask ? loss_mask[i] : 1.0f;
    cudaCheck(cudaMemcpyAsync(d->inputs, inputs, (size_t)N * sizeof(int), cudaMemcpyHostToDevice, st));
    if (targets) cudaCheck(cudaMemcpyAsync(d->targets, targets, (size_t)N * sizeof(int), cudaMemcpyHostToDevice, st));
    cudaCheck(cudaMemcpyAsync(d->mask, d->host_mask, (size_t)N * sizeof(float), cudaMemcpyHostToDevice, st));
    if (weights_host) cudaCheck(cudaMemcpyAsync(d->weights, weights_host, (size_t)N * sizeof(float), cudaMemcpyHostToDevice, st));

    d->stream_bf16 = model->residual_bf16;
    // the queued update: the embeddings and the first layer (its norm follows the encoder) now,
    // each later layer's as the layer before it starts (that layer's last norm is the next one's)
    update_wait(model, update_group_of_layer(d, c, 0));
    prof_begin(model, PROF_ENCODER);
    const floatX *wpe = gpt2 ? weight_bf16(model, P_WPE, 0) : NULL;
    if (d->stream_bf16) encoder_forward((floatX *)d->encoded, d->inputs, weight_bf16(model, P_WTE, 0), wpe, B, T, C, st);
    else encoder_forward((float *)d->encoded, d->inputs, weight_bf16(model, P_WTE, 0), wpe, B, T, C, st);
    prof_end(model);
    prof_begin(model, PROF_NORM_FWD);
    stream_norm_forward(d, NULL, d->ln1, d->ln1_mean, d->ln1_rstd, d->encoded, NULL, weight_bf16(model, P_LN1W, 0),
                        weight_bf16(model, P_LN1B, 0), N, C, eps, gpt2, st);
    prof_end(model);
    for (int l = 0; l < L; l++) {
        update_wait(model, update_group_of_layer(d, c, l + 1));   // the next layer's, or the final norm's and the head's
        const size_t k = layer_slot(d, l), next = layer_slot(d, l + 1);
        const void *residual = l == 0 ? d->encoded : stream_at(d, d->residual3, layer_slot(d, l - 1) * NC);
        floatX *ln1 = d->ln1 + k * NC, *ln2 = d->ln2 + k * NC;
        floatX *qkv = d->qkv + k * N * QKV, *atty = d->atty + k * N * NH * HS;
        float *att_lse = d->att_lse + k * N * NH;
        void *residual2 = stream_at(d, d->residual2, k * NC), *residual3 = stream_at(d, d->residual3, k * NC);
        floatX *fch = d->fch + k * N * FC, *fch_act = d->fch_act + k * N * F;

        // attention block (ln1 of this layer was written by the previous layer's fused norm)
        prof_begin(model, PROF_MATMUL_FWD);
        matmul_forward(qkv, ln1, weight_bf16(model, P_QKVW, l), weight_bf16(model, P_QKVB, l), NULL, N, C, QKV, st);
        prof_end(model);
        // Llama: RoPE in the flash forward (the keys by rope_forward_keys before it, timed as RoPE)
        const int rope_in_forward = !gpt2 && attention_use_flash(HS) && model->rope_forward_in_attention;
        if (!gpt2) {
            prof_begin(model, PROF_ROPE);
            if (rope_in_forward) rope_forward_keys(qkv, d->rope_cos_sin, B, T, NH, NKV, HS, st);
            else rope_forward(qkv, d->rope_cos_sin, B, T, NH, NKV, HS, st);
            prof_end(model);
        }
        prof_begin(model, PROF_ATTENTION_FWD);
        if (rope_in_forward) attention_flash_forward_rope(atty, att_lse, qkv, B, T, NH, NKV, HS, d->rope_cos_sin, qkv, st);
        else if (attention_use_flash(HS)) attention_flash_forward(atty, att_lse, qkv, B, T, NH, NKV, HS, st);
        else attention_forward(atty, att_lse, qkv, B, T, NH, NKV, HS, st);
        prof_end(model);
        projection_add_norm(model, residual2, residual, atty, weight_bf16(model, P_ATTPROJW, l), weight_bf16(model, P_ATTPROJB, l),
                            NH * HS, ln2, d->ln2_mean + k * N, d->ln2_rstd + k * N, weight_bf16(model, P_LN2W, l),
                            weight_bf16(model, P_LN2B, l), N, C, eps, gpt2);

        // MLP block
        if (gpt2 && model->use_gelu_fusion && F % 8 == 0) {
            prof_begin(model, PROF_MATMUL_FWD);
            matmul_forward(fch_act, ln2, weight_bf16(model, P_FCW, l), weight_bf16(model, P_FCB, l), fch, N, C, F, st);
            prof_end(model);
        } else {
            prof_begin(model, PROF_MATMUL_FWD);
            matmul_forward(fch, ln2, weight_bf16(model, P_FCW, l), weight_bf16(model, P_FCB, l), NULL, N, C, FC, st);
            prof_end(model);
            prof_begin(model, PROF_ACT_FWD);
            if (gpt2) gelu_forward(fch_act, fch, (size_t)N * F, st);
            else swiglu_forward(fch_act, fch, N, F, st);
            prof_end(model);
        }
        // residual3 = residual2 + fcproj(...), normed by the next layer's ln1 or by the final norm
        const floatX *fcprojw = weight_bf16(model, P_FCPROJW, l), *fcprojb = weight_bf16(model, P_FCPROJB, l);
        if (l + 1 < L)
            projection_add_norm(model, residual3, residual2, fch_act, fcprojw, fcprojb, F, d->ln1 + next * NC,
                                d->ln1_mean + next * N, d->ln1_rstd + next * N,
                                weight_bf16(model, P_LN1W, l + 1), weight_bf16(model, P_LN1B, l + 1), N, C, eps, gpt2);
        else
            projection_add_norm(model, residual3, residual2, fch_act, fcprojw, fcprojb, F, d->lnf, d->lnf_mean, d->lnf_rstd,
                                weight_bf16(model, P_LNFW, 0), weight_bf16(model, P_LNFB, 0), N, C, eps, gpt2);
    }
    update_wait(model, d->update_groups - 1);
    if (d->with_head) {
        prof_begin(model, PROF_MATMUL_FWD);
        matmul_forward(d->logits, d->lnf, weight_bf16(model, head_tensor(c), 0), NULL, NULL, N, C, Vp, st);
        prof_end(model);
        prof_begin(model, PROF_CLASSIFIER);
        fused_classifier(d->logits, d->lse, d->losses, targets ? d->targets : NULL, d->mask,
                         weights_host ? d->weights : NULL, N, V, Vp, st);
        prof_end(model);
    }
    d->logits_hold_gradient = weights_host != NULL;
    matmul_tune = 0;
    if (matmul_tune_count != tuned_before) matmul_tune_describe(model->matmul_tuning, sizeof(model->matmul_tuning), d->matmul_tune_from);

    model->has_targets = targets != NULL;
    if (targets) {
        cudaCheck(cudaMemcpyAsync(model->token_losses, d->losses, (size_t)N * sizeof(float), cudaMemcpyDeviceToHost, st));
        cudaCheck(cudaStreamSynchronize(st));
        double weighted = 0.0, count = 0.0;
        for (int i = 0; i < N; i++) {
            weighted += (double)d->host_mask[i] * model->token_losses[i];
            count += d->host_mask[i];
        }
        model->mean_loss = count > 0.0 ? (float)(weighted / count) : 0.0f;
    } else {
        memset(model->token_losses, 0, (size_t)N * sizeof(float));
        model->mean_loss = -1.0f;
    }
}

extern "C" int cuda_model_attention_wgmma(CudaModel *model, int variant) {
    Impl *d = impl_of(model);
    if (!model->attention_tuned) fatal("cuda_model_attention_wgmma: the attention is tuned on the first forward");
    if (variant != 1 && variant != 2) fatal("cuda_model_attention_wgmma: variant %d is not 1 or 2", variant);
    const ModelConfig *c = &model->config;
    if (!attention_use_flash(c->head_dim) || c->head_dim != 64 || !flash_tune_wgmma_enabled() || !flash_wgmma_supported())
        return 0;
    FlashConfig f = d->tuned ? d->tuning.config : flash_default_config;   // its grid orders and stream use
    f.forward_wgmma = 1;
    f.dq_wgmma = f.dkv_wgmma = variant;
    f.forward_row_tiles = f.dq_row_tiles = 1;
    f.forward_min_blocks = f.dkv_min_blocks = 0;
    f.dq_q_regs = f.dkv_kv_regs = variant == 1;
    f.dkv_row_tiles = 1;
    d->flash_config = f;
    return 1;
}

extern "C" void cuda_model_matmul_config(int tuned) { matmul_tune_use = tuned != 0; }
extern "C" void cuda_model_attention_eager_rescale(int eager) { flash_forward_max_slack = eager ? 0.0f : FLASH_MAX_SLACK; }
extern "C" void cuda_model_matmul_tuning_print(CudaModel *model, FILE *out) { matmul_tune_print(out, impl_of(model)->matmul_tune_from); }

extern "C" void cuda_model_attention_config(CudaModel *model, int tuned) {
    Impl *d = impl_of(model);
    if (!model->attention_tuned) fatal("cuda_model_attention_config: the attention is tuned on the first forward");
    if (tuned < 0 || tuned > 2) fatal("cuda_model_attention_config: %d is not 0, 1 or 2", tuned);
    if (!d->tuned || tuned == 0) d->flash_config = flash_default_config;   // no tuning: the defaults
    else d->flash_config = tuned == 1 ? d->tuning.config : d->tuning.mma_config;
}

extern "C" void cuda_model_forward(CudaModel *model, const int *inputs, const int *targets, const float *loss_mask, int B, int T) {
    forward_impl(model, inputs, targets, loss_mask, B, T, NULL);
    prof_resolve(model);
}

// ---------------------------------------------------------------------------------------------
// backward

// The tensors whose gradients only the products of a backward write: the layers' weight
// matrices (the head's gets the encoder's adds too when tied, and no product when a backward
// has no logits' gradient, so it is zeroed as the rest).
static int grads_written_by_products(int tensor) {
    return tensor == P_QKVW || tensor == P_ATTPROJW || tensor == P_FCW || tensor == P_FCPROJW;
}
// Zeroes the gradients of the tensors that the products write (products 1) or of the others
// (0), one memset per run of adjacent ones.
static void grads_zero(CudaModel *model, int products, cudaStream_t stream) {
    Impl *d = impl_of(model);
    size_t begin = 0, end = 0;   // the run being gathered
    for (int t = 0; t < NUM_PARAM_TENSORS; t++) {
        if (grads_written_by_products(t) != products || d->param_sizes[t] == 0) continue;
        if (d->param_offsets[t] != end) {   // not adjacent: zero the run so far, start another
            if (end > begin) cudaCheck(cudaMemsetAsync(d->grads + begin, 0, (end - begin) * sizeof(float), stream));
            begin = d->param_offsets[t];
        }
        end = d->param_offsets[t] + d->param_sizes[t];
    }
    if (end > begin) cudaCheck(cudaMemsetAsync(d->grads + begin, 0, (end - begin) * sizeof(float), stream));
}
// Before the gradients are read: the queued update done, and what zero_grad left for a backward
// that has not come zeroed.
static void grads_settle(CudaModel *model) {
    Impl *d = impl_of(model);
    update_settle(model);
    if (!d->grads_unwritten) return;
    grads_zero(model, 1, d->stream);
    d->grads_unwritten = 0;
}
// With an update queued (overlap_update) the memsets queue behind it on its stream, which the
// update still reads the gradients on, and the next backward waits for them (zero_pending).
extern "C" void cuda_model_zero_grad(CudaModel *model) {
    Impl *d = impl_of(model);
    require_training(d, "cuda_model_zero_grad");
    int behind = d->update_pending || d->zero_pending;
    cudaStream_t st = behind ? d->update_stream : d->stream;
    grads_zero(model, 0, st);
    if (!model->grads_first_write) grads_zero(model, 1, st);
    d->grads_unwritten = model->grads_first_write;
    d->grad_sums_ready = 0;
    if (behind) {
        cudaCheck(cudaEventRecord(d->zero_done, d->update_stream));
        d->zero_pending = 1;
    }
}

// dst (n) += src (n), fp32
__global__ void add_inplace_kernel(float *dst, const float *src, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) dst[i] += src[i];
}

// The weight gradients' products on the side stream (overlap_weight_grads): side_product queues
// dweight += dout^T @ inp there after everything the main stream has queued so far, and
// side_mark records `read` once the side stream has read its inputs, for the main stream to wait
// on (main_wait) before it overwrites them. The products are the same calls as on the main
// stream (same algorithms; the side stream has its own cuBLASLt workspace), so the gradients are
// the same bit for bit.
static void side_product(Impl *d, float *dweight, const floatX *dout, const floatX *inp, int M, int IC, int OC,
                         int accumulate) {
    cudaCheck(cudaEventRecord(d->side_fork, d->stream));
    cudaCheck(cudaStreamWaitEvent(d->side, d->side_fork, 0));
    matmul_backward(NULL, 0, dweight, NULL, dout, NULL, inp, NULL, NULL, M, IC, OC, d->side, accumulate);
}
static void side_mark(Impl *d, cudaEvent_t read) { cudaCheck(cudaEventRecord(read, d->side)); }
static void main_wait(Impl *d, cudaEvent_t read) { cudaCheck(cudaStreamWaitEvent(d->stream, read, 0)); }

// One product's backward: dinp (and dbias) on the main stream, dweight there too or, with
// overlap, on the side stream (then `read` marks when it has read dout), and with sums_aside
// dbias there as well, after dweight. dinp_is_f32 etc. as matmul_backward; accumulate 0 writes
// dweight instead of adding to it.
static void product_backward(CudaModel *model, int overlap, cudaEvent_t read, void *dinp, int dinp_is_f32, float *dweight,
                             float *dbias, const floatX *dout, const float *dbias_source, const floatX *inp,
                             const floatX *weight, int M, int IC, int OC, int accumulate = 1) {
    Impl *d = impl_of(model);
    if (!overlap) {
        matmul_backward(dinp, dinp_is_f32, dweight, dbias, dout, dbias_source, inp, weight, d->column_scratch, M, IC, OC, d->stream,
                        accumulate);
        return;
    }
    side_product(d, dweight, dout, inp, M, IC, OC, accumulate);
    const int bias_aside = dbias != NULL && model->sums_aside;
    if (bias_aside)   // the side stream's own scratch: its column sums run one after another
        matmul_backward(NULL, 0, NULL, dbias, dout, dbias_source, inp, NULL, d->side_scratch, M, IC, OC, d->side);
    side_mark(d, read);
    matmul_backward(dinp, dinp_is_f32, NULL, bias_aside ? NULL : dbias, dout, dbias_source, inp, weight, d->column_scratch, M, IC,
                    OC, d->stream);
}

// A layer's norm backward from the gradient at its output, which the product that read the norm's
// output left in dnorm_bf16 or dnorm (layer_dnorm): dresidual += the input gradient, and the
// weight, bias and preceding projection's bias gradients.
static void *layer_dnorm(CudaModel *model) {
    Impl *d = impl_of(model);
    return model->dnorm_bf16 ? (void *)d->dnorm_bf16 : (void *)d->dnorm;
}
static void layer_norm_backward(CudaModel *model, int aside, float *dweight, float *dbias, float *dres_colsum, const void *inp,
                                const floatX *weight, const float *mean, const float *rstd, int N, int C, int gpt2) {
    Impl *d = impl_of(model);
    if (model->dnorm_bf16)
        stream_norm_backward(d, aside, dweight, dbias, dres_colsum, (const floatX *)d->dnorm_bf16, inp, weight, mean, rstd, N,
                             C, gpt2);
    else
        stream_norm_backward(d, aside, dweight, dbias, dres_colsum, (const float *)d->dnorm, inp, weight, mean, rstd, N, C,
                             gpt2);
}

// norm_in_backward: grad_sums' partials for layer l (its slices of the stacked tensors; l = L:
// the tensors not stacked) queued on `stream`, once their gradients are complete there.
static void queue_grad_sums(CudaModel *model, int l, cudaStream_t stream) {
    Impl *d = impl_of(model);
    const int L = model->config.n_layer;
    NormPieces pieces;
    memset(&pieces, 0, sizeof(pieces));
    for (int t = 0; t < NUM_PARAM_TENSORS; t++) {
        if (d->param_sizes[t] == 0 || param_is_stacked(t) != (l < L)) continue;
        if (pieces.count == GLOBAL_NORM_PIECES) fatal("queue_grad_sums: more than %d tensors in a piece list", GLOBAL_NORM_PIECES);
        pieces.ptr[pieces.count] = weight_grad(model, t, l < L ? l : 0);
        pieces.n[pieces.count] = param_is_stacked(t) ? d->param_sizes[t] / L : d->param_sizes[t];
        pieces.count++;
    }
    global_norm_pieces(d->grad_sums + (size_t)l * GLOBAL_NORM_PIECE_BLOCKS, &pieces, stream);
}

// Everything after the classifier's gradient: the logits' gradient (when have_dlogits) and
// dhidden_host (when given) flow down to the parameter gradients.
//
// With overlap_weight_grads the weight-gradient products run on the side stream, each after the
// main stream has produced its dout, and the main stream waits for the side stream to have read
// a buffer before it overwrites it: dresidual_bf16 (fcproj, attproj: rewritten by the next norm
// backward), dfch (fc: by the next layer's MLP backward), dqkv (qkv: by the next layer's attention
// backward). The classifier's dweight reads the logits' gradient and lnf, which nothing
// overwrites; for tied embeddings it adds into dwte, as the encoder backward does, so the main
// stream waits for the whole side stream before that. With norm_in_backward the side stream also
// sums the squares of each layer's gradients once the main stream has written that layer's last
// (its norms' and biases', at the end of the layer's backward), and the main stream those of
// the rest after the encoder backward (queue_grad_sums). With sums_aside it finishes the column
// sums as well: each norm backward's partials (stream_norm_backward) and the products' bias
// gradients (product_backward), so that the main stream goes from kernel to kernel of the chain.
static void backward_from_logits(CudaModel *model, int have_dlogits, const float *dhidden_host) {
    const ModelConfig *c = &model->config;
    Impl *d = impl_of(model);
    cudaStream_t st = d->stream;
    int B = model->B, T = model->T;
    int N = B * T, C = c->n_embd, NH = c->n_head, NKV = c->n_kv_head, HS = c->head_dim, L = c->n_layer;
    int QKV = qkv_width(c), F = c->ffn_hidden, FC = fc_width(c), Vp = c->padded_vocab_size;
    int gpt2 = c->arch == ARCH_GPT2;
    size_t NC = (size_t)N * C;
    int head = head_tensor(c);
    update_settle(model);   // zero_grad's memsets behind a queued update are done
    int ov = model->overlap_weight_grads && !model->profile;
    const int sums = ov && model->norm_in_backward && !d->sharded;
    const int aside = ov && model->sums_aside;
    d->grad_sums_ready = 0;
    // the layers' weight matrices' gradients: written by their products when zero_grad left them
    // unwritten (grads_unwritten), else added to
    const int acc = !d->grads_unwritten;
    flash_set_config(&d->flash_config);
    matmul_tune = model->matmul_tune && N == model->max_B * model->max_T;
    int tuned_before = matmul_tune_count;

    // classifier: dnorm = dlogits @ head (written), dhead += dlogits^T @ lnf
    prof_begin(model, PROF_MATMUL_BWD);
    if (have_dlogits)
        product_backward(model, ov, d->side_done, d->dnorm, 1, weight_grad(model, head, 0), NULL, d->logits, NULL, d->lnf,
                         weight_bf16(model, head, 0), N, C, Vp);
    else
        cudaCheck(cudaMemsetAsync(d->dnorm, 0, NC * sizeof(float), st));
    prof_end(model);
    if (dhidden_host) {
        cudaCheck(cudaMemcpyAsync(d->dhidden, dhidden_host, NC * sizeof(float), cudaMemcpyHostToDevice, st));
        add_inplace_kernel<<<elementwise_blocks(NC), 256, 0, st>>>(d->dnorm, d->dhidden, NC);
        cudaCheckLaunch();
    }
    if (d->stream_bf16) cudaCheck(cudaMemsetAsync(d->dresidual_bf16, 0, NC * sizeof(floatX), st));
    else cudaCheck(cudaMemsetAsync(d->dresidual, 0, NC * sizeof(float), st));
    prof_begin(model, PROF_NORM_BWD);
    // the residual gradient's column sums are the last fcproj's bias gradient
    stream_norm_backward(d, aside, weight_grad(model, P_LNFW, 0), weight_grad(model, P_LNFB, 0), weight_grad(model, P_FCPROJB, L - 1),
                         (const float *)d->dnorm, stream_at(d, d->residual3, (size_t)(L - 1) * NC), weight_bf16(model, P_LNFW, 0),
                         gpt2 ? d->lnf_mean : NULL, d->lnf_rstd, N, C, gpt2);
    prof_end(model);

    for (int l = L - 1; l >= 0; l--) {
        const void *residual = l == 0 ? d->encoded : stream_at(d, d->residual3, (size_t)(l - 1) * NC);
        floatX *ln1 = d->ln1 + l * NC, *ln2 = d->ln2 + l * NC;
        floatX *qkv = d->qkv + (size_t)l * N * QKV, *atty = d->atty + (size_t)l * N * NH * HS;
        float *att_lse = d->att_lse + (size_t)l * N * NH;
        const void *residual2 = stream_at(d, d->residual2, l * NC);
        floatX *fch = d->fch + (size_t)l * N * FC, *fch_act = d->fch_act + (size_t)l * N * F;

        // MLP block: residual3 = residual2 + fcproj(act(fc(norm2(residual2)))). fcproj's bias
        // gradient came with the norm backward above (the column sums of dresidual).
        prof_begin(model, PROF_MATMUL_BWD);
        if (ov) main_wait(d, d->side_read_dfch);   // the side stream has read the last layer's dfch
        int fused_dgelu = gpt2 && model->use_gelu_fusion &&
                          matmul_backward_dgelu(d->dfch, d->dresidual_bf16, weight_bf16(model, P_FCPROJW, l), fch, N, F, C, st);
        product_backward(model, ov, d->side_read_dres, fused_dgelu ? NULL : d->dfch_act, 0, weight_grad(model, P_FCPROJW, l),
                         NULL, d->dresidual_bf16, NULL, fch_act, weight_bf16(model, P_FCPROJW, l), N, F, C, acc);
        prof_end(model);
        if (!fused_dgelu) {
            prof_begin(model, PROF_ACT_BWD);
            if (gpt2) gelu_backward(d->dfch, fch, d->dfch_act, (size_t)N * F, st);
            else swiglu_backward(d->dfch, d->dfch_act, fch, N, F, st);
            prof_end(model);
        }
        prof_begin(model, PROF_MATMUL_BWD);
        product_backward(model, ov, d->side_read_dfch, layer_dnorm(model), !model->dnorm_bf16, weight_grad(model, P_FCW, l),
                         weight_grad(model, P_FCB, l), d->dfch, NULL, ln2, weight_bf16(model, P_FCW, l), N, C, FC, acc);
        prof_end(model);
        prof_begin(model, PROF_NORM_BWD);
        if (ov) main_wait(d, d->side_read_dres);   // fcproj's dweight has read dresidual_bf16
        layer_norm_backward(model, aside, weight_grad(model, P_LN2W, l), weight_grad(model, P_LN2B, l), weight_grad(model, P_ATTPROJB, l),
                            residual2, weight_bf16(model, P_LN2W, l), gpt2 ? d->ln2_mean + (size_t)l * N : NULL,
                            d->ln2_rstd + (size_t)l * N, N, C, gpt2);
        prof_end(model);

        // attention block: residual2 = residual + attproj(attention(qkv(norm1(residual))))
        prof_begin(model, PROF_MATMUL_BWD);
        // (attproj's bias gradient came with the norm backward above)
        product_backward(model, ov, d->side_read_dres, d->datty, 0, weight_grad(model, P_ATTPROJW, l), NULL, d->dresidual_bf16,
                         NULL, atty, weight_bf16(model, P_ATTPROJW, l), N, NH * HS, C, acc);
        prof_end(model);
        prof_begin(model, PROF_ATTENTION_BWD);
        if (ov) main_wait(d, d->side_read_dqkv);   // the side stream has read the last layer's dqkv
        // Llama: the flash backward takes dQ and dK back through RoPE in its epilogue (the same bits)
        const int rope_in_attention = !gpt2 && attention_use_flash(HS) && model->rope_in_attention;
        if (attention_use_flash(HS))
            attention_flash_backward(d->dqkv, d->att_D, d->datty, qkv, atty, att_lse, B, T, NH, NKV, HS, st,
                                     rope_in_attention ? d->rope_cos_sin : NULL);
        else attention_backward(d->dqkv, d->att_D, d->datty, qkv, atty, att_lse, B, T, NH, NKV, HS, st);
        prof_end(model);
        if (!gpt2 && !rope_in_attention) {
            prof_begin(model, PROF_ROPE);
            rope_backward(d->dqkv, d->rope_cos_sin, B, T, NH, NKV, HS, st);
            prof_end(model);
        }
        prof_begin(model, PROF_MATMUL_BWD);
        product_backward(model, ov, d->side_read_dqkv, layer_dnorm(model), !model->dnorm_bf16, weight_grad(model, P_QKVW, l),
                         weight_grad(model, P_QKVB, l), d->dqkv, NULL, ln1, weight_bf16(model, P_QKVW, l), N, C, QKV, acc);
        prof_end(model);
        prof_begin(model, PROF_NORM_BWD);
        if (ov) main_wait(d, d->side_read_dres);   // attproj's dweight has read dresidual_bf16
        layer_norm_backward(model, aside, weight_grad(model, P_LN1W, l), weight_grad(model, P_LN1B, l),
                            l > 0 ? weight_grad(model, P_FCPROJB, l - 1) : NULL, residual, weight_bf16(model, P_LN1W, l),
                            gpt2 ? d->ln1_mean + (size_t)l * N : NULL, d->ln1_rstd + (size_t)l * N, N, C, gpt2);
        prof_end(model);
        if (sums) {   // layer l's gradients are complete: its products' on the side stream, the rest here
            cudaCheck(cudaEventRecord(d->side_fork, st));
            cudaCheck(cudaStreamWaitEvent(d->side, d->side_fork, 0));
            queue_grad_sums(model, l, d->side);
        }
    }
    if (ov) {   // every weight gradient is complete before anything reads or adds to them
        side_mark(d, d->side_done);
        main_wait(d, d->side_done);
    }
    // the gradient at the embedding output; for tied models it adds to the classifier's dwte
    prof_begin(model, PROF_ENCODER_BWD);
    float *dwpe = gpt2 ? weight_grad(model, P_WPE, 0) : NULL;
    if (d->stream_bf16) encoder_backward(weight_grad(model, P_WTE, 0), dwpe, (const floatX *)d->dresidual_bf16, d->inputs, B, T, C, st);
    else encoder_backward(weight_grad(model, P_WTE, 0), dwpe, (const float *)d->dresidual, d->inputs, B, T, C, st);
    prof_end(model);
    if (sums) {
        queue_grad_sums(model, L, st);
        d->grad_sums_ready = 1;
    }
    d->grads_unwritten = 0;
    matmul_tune = 0;
    if (matmul_tune_count != tuned_before) matmul_tune_describe(model->matmul_tuning, sizeof(model->matmul_tuning), d->matmul_tune_from);
}

// Backward of sum_bt token_weights[bt] * token_losses[bt] (+ <dhidden, hidden>), into the grads.
extern "C" void cuda_model_backward_weighted(CudaModel *model, const float *token_weights, const float *dhidden) {
    const ModelConfig *c = &model->config;
    Impl *d = impl_of(model);
    require_training(d, "cuda_model_backward_weighted");
    if (model->B <= 0) fatal("cuda_model_backward: no forward pass to differentiate (call cuda_model_forward first)");
    if (token_weights && !model->has_targets)
        fatal("cuda_model_backward: the last forward had no targets, so there is no loss to differentiate");
    if (d->logits_hold_gradient)
        fatal("cuda_model_backward: the logits of the last forward were already turned into their gradient; run a forward first");
    if (token_weights == NULL && dhidden == NULL) return;
    int N = model->B * model->T;
    if (token_weights) {
        // a position whose mask is 0 has loss 0 whatever its logits, so its weight is dropped
        for (int i = 0; i < N; i++) d->host_weights[i] = d->host_mask[i] != 0.0f ? token_weights[i] : 0.0f;
        cudaCheck(cudaMemcpyAsync(d->weights, d->host_weights, (size_t)N * sizeof(float), cudaMemcpyHostToDevice, d->stream));
        prof_begin(model, PROF_CLASSIFIER);
        classifier_backward(d->logits, d->lse, d->targets, d->weights, N, c->vocab_size, c->padded_vocab_size, d->stream);
        prof_end(model);
        d->logits_hold_gradient = 1;
    }
    backward_from_logits(model, token_weights != NULL, dhidden);
    cudaCheck(cudaStreamSynchronize(d->stream));   // the host buffers may be reused at once
    prof_resolve(model);
}

// weights = scale * mask / sum(mask), as model_backward
static void mean_loss_weights(CudaModel *model, float *weights, const float *mask, int N, float scale) {
    double count = 0.0;
    for (int i = 0; i < N; i++) count += mask[i];
    for (int i = 0; i < N; i++) weights[i] = count > 0.0 ? (float)(scale * mask[i] / count) : 0.0f;
}

extern "C" void cuda_model_backward(CudaModel *model, float scale) {
    Impl *d = impl_of(model);
    require_training(d, "cuda_model_backward");
    if (model->B <= 0) fatal("cuda_model_backward: no forward pass to differentiate (call cuda_model_forward first)");
    if (!model->has_targets) fatal("cuda_model_backward: the last forward had no targets, so there is no loss to differentiate");
    int N = model->B * model->T;
    float *weights = (float *)mallocCheck((size_t)N * sizeof(float));
    mean_loss_weights(model, weights, d->host_mask, N, scale);
    cuda_model_backward_weighted(model, weights, NULL);
    free(weights);
}

extern "C" void cuda_model_forward_backward(CudaModel *model, const int *inputs, const int *targets, const float *loss_mask,
                                            int B, int T, float scale) {
    Impl *d = impl_of(model);
    require_training(d, "cuda_model_forward_backward");
    if (targets == NULL) fatal("cuda_model_forward_backward: training needs targets");
    int N = B * T;
    if (B <= 0 || T <= 0 || (size_t)N > (size_t)model->max_B * model->max_T)
        fatal("cuda_model_forward_backward: batch %d x %d exceeds the shape %d x %d the GPU model was created for",
              B, T, model->max_B, model->max_T);
    for (int i = 0; i < N; i++) d->host_mask[i] = loss_mask ? loss_mask[i] : 1.0f;
    mean_loss_weights(model, d->host_weights, d->host_mask, N, scale);
    forward_impl(model, inputs, targets, loss_mask, B, T, d->host_weights);
    backward_from_logits(model, 1, NULL);
    prof_resolve(model);
}

// ---------------------------------------------------------------------------------------------
// optimizer

extern "C" float cuda_model_grad_norm(CudaModel *model) {
    Impl *d = impl_of(model);
    require_training(d, "cuda_model_grad_norm");
    grads_settle(model);
    if (d->sharded) {
        // each rank holds the mean gradient on its shard only: the norm is the root of the sum
        // over ranks of the shards' squared norms
        prof_begin(model, PROF_GRAD_NORM);
        global_norm_squared_partial_kernel<<<GLOBAL_NORM_BLOCKS, 512, 0, d->stream>>>(
            d->norm_partial, d->grads + d->shard_lo, d->shard_hi - d->shard_lo);
        cudaCheckLaunch();
        global_norm_finish_kernel<<<1, 1024, 0, d->stream>>>(NULL, d->dp_scalar, d->norm_partial, GLOBAL_NORM_BLOCKS);
        cudaCheckLaunch();
        prof_end(model);
        comm_nccl_all_reduce_sum_double(d->dp_scalar, 1, d->stream);
        double squared = 0.0;
        cudaCheck(cudaMemcpyAsync(&squared, d->dp_scalar, sizeof(double), cudaMemcpyDeviceToHost, d->stream));
        cudaCheck(cudaStreamSynchronize(d->stream));
        prof_resolve(model);
        return (float)sqrt(squared);
    }
    prof_begin(model, PROF_GRAD_NORM);
    if (d->grad_sums_ready)   // the backward's sums (norm_in_backward): add them
        global_norm_finish(d->norm_result, d->grad_sums, (model->config.n_layer + 1) * GLOBAL_NORM_PIECE_BLOCKS, d->stream);
    else
        global_norm(d->norm_result, d->norm_partial, d->grads, model->num_parameters, d->stream);
    prof_end(model);
    float norm = 0.0f;
    cudaCheck(cudaMemcpyAsync(&norm, d->norm_result, sizeof(float), cudaMemcpyDeviceToHost, d->stream));
    cudaCheck(cudaStreamSynchronize(d->stream));
    prof_resolve(model);
    return norm;
}

extern "C" void cuda_model_adamw_update(CudaModel *model, float lr, float beta1, float beta2, float eps,
                                        float weight_decay, float grad_scale) {
    Impl *d = impl_of(model);
    require_training(d, "cuda_model_adamw_update");
    model->opt_step++;
    int t = model->opt_step;
    float bias_correction1 = (float)(1.0 - pow((double)beta1, t));
    float bias_correction2 = (float)(1.0 - pow((double)beta2, t));
    grads_settle(model);
    const ModelConfig *c = &model->config;
    if (model->overlap_update && !model->profile && !d->sharded) {
        // queued on the update stream after everything queued so far, group by group in the
        // forward's order, each group's end marked for the forward to wait on (update_wait)
        cudaCheck(cudaEventRecord(d->update_fork, d->stream));
        cudaCheck(cudaStreamWaitEvent(d->update_stream, d->update_fork, 0));
        const int L = c->n_layer, last = d->update_groups - 1;
        for (int g = 0; g <= last; g++) {
            for (int tensor = 0; tensor < NUM_PARAM_TENSORS; tensor++) {
                if (d->param_sizes[tensor] == 0) continue;
                size_t lo = d->param_offsets[tensor], n = d->param_sizes[tensor];
                if (param_is_stacked(tensor)) {   // the group's layers, adjacent
                    if (g == 0 || g == last) continue;
                    int l0 = (g - 1) * d->update_layers, l1 = l0 + d->update_layers < L ? l0 + d->update_layers : L;
                    size_t per_layer = n / L;
                    lo += (size_t)l0 * per_layer;
                    n = (size_t)(l1 - l0) * per_layer;
                } else if ((tensor == P_WTE || tensor == P_WPE ? 0 : last) != g) {
                    continue;
                }
                float decay = param_is_decayed(tensor) ? 1.0f - lr * weight_decay : 1.0f;
                adamw_update(d->params + lo, d->params_bf16 + lo, d->grads + lo, d->m + lo, d->v + lo, n, lr, beta1, beta2,
                             bias_correction1, bias_correction2, eps, decay, grad_scale, d->update_stream);
            }
            cudaCheck(cudaEventRecord(d->update_done[g], d->update_stream));
        }
        d->update_pending = 1;
        d->update_waited = 0;
        return;
    }
    prof_begin(model, PROF_ADAMW);
    // each tensor's part inside [shard_lo, shard_hi) (all of it when unsharded), with the weight
    // decay of its tensor: a shard boundary inside a tensor changes nothing in the arithmetic
    for (int tensor = 0; tensor < NUM_PARAM_TENSORS; tensor++) {
        size_t begin = d->param_offsets[tensor], end = begin + d->param_sizes[tensor];
        size_t lo = begin > d->shard_lo ? begin : d->shard_lo, hi = end < d->shard_hi ? end : d->shard_hi;
        if (hi <= lo) continue;
        float decay = param_is_decayed(tensor) ? 1.0f - lr * weight_decay : 1.0f;
        size_t moment = lo - d->shard_lo;   // m and v start at shard_lo
        adamw_update(d->params + lo, d->params_bf16 + lo, d->grads + lo, d->m + moment, d->v + moment, hi - lo,
                     lr, beta1, beta2, bias_correction1, bias_correction2, eps, decay, grad_scale, d->stream);
    }
    prof_end(model);
    if (d->sharded) {
        // every rank updated its shard: gather the fp32 masters, then refresh the bf16 copy of
        // the shards the other ranks updated
        comm_nccl_all_gather_shards(d->params, model->num_parameters, d->stream);
        convert_f32_to_bf16(d->params_bf16, d->params, model->num_parameters, d->stream);
    }
    prof_resolve(model);
}

// ---------------------------------------------------------------------------------------------
// copies to the host

extern "C" void cuda_model_download(CudaModel *model, Model *cpu) {
    Impl *d = impl_of(model);
    require_training(d, "cuda_model_download");
    if (cpu->num_parameters != model->num_parameters || memcmp(cpu->param_sizes, d->param_sizes, sizeof(d->param_sizes)) != 0)
        fatal("cuda_model_download: the CPU model's layout differs from the GPU model's");
    size_t bytes = model->num_parameters * sizeof(float);
    size_t moment_bytes = (d->shard_hi - d->shard_lo) * sizeof(float);
    update_settle(model);
    cudaCheck(cudaStreamSynchronize(d->stream));
    cudaCheck(cudaMemcpy(cpu->params, d->params, bytes, cudaMemcpyDeviceToHost));
    if (cpu->m == NULL) cpu->m = (float *)callocCheck(model->num_parameters, sizeof(float));
    if (cpu->v == NULL) cpu->v = (float *)callocCheck(model->num_parameters, sizeof(float));
    cudaCheck(cudaMemcpy(cpu->m + d->shard_lo, d->m, moment_bytes, cudaMemcpyDeviceToHost));
    cudaCheck(cudaMemcpy(cpu->v + d->shard_lo, d->v, moment_bytes, cudaMemcpyDeviceToHost));
    cpu->opt_step = model->opt_step;
}

extern "C" void cuda_model_copy_grads(CudaModel *model, float *dst) {
    Impl *d = impl_of(model);
    require_training(d, "cuda_model_copy_grads");
    grads_settle(model);
    cudaCheck(cudaStreamSynchronize(d->stream));
    cudaCheck(cudaMemcpy(dst, d->grads, model->num_parameters * sizeof(float), cudaMemcpyDeviceToHost));
}

// n bf16 device values to fp32 host values, through a temporary device buffer.
static void copy_bf16_to_host(Impl *d, float *dst, const floatX *src, size_t n) {
    float *tmp = (float *)cudaMallocCheck(n * sizeof(float));
    convert_bf16_to_f32(tmp, src, n, d->stream);
    cudaCheck(cudaStreamSynchronize(d->stream));
    cudaCheck(cudaMemcpy(dst, tmp, n * sizeof(float), cudaMemcpyDeviceToHost));
    cudaCheck(cudaFree(tmp));
}

extern "C" void cuda_model_copy_logits(CudaModel *model, float *dst) {
    Impl *d = impl_of(model);
    if (!d->with_head) fatal("cuda_model_copy_logits: the model was created without its head (cuda_model_create_inference)");
    if (d->logits_hold_gradient) fatal("cuda_model_copy_logits: a backward has overwritten the logits with their gradient");
    copy_bf16_to_host(d, dst, d->logits, (size_t)model->B * model->T * model->config.padded_vocab_size);
}

extern "C" void cuda_model_copy_hidden(CudaModel *model, float *dst) {
    copy_bf16_to_host(impl_of(model), dst, impl_of(model)->lnf, (size_t)model->B * model->T * model->config.n_embd);
}

extern "C" void cuda_model_copy_hidden_last(CudaModel *model, const int *lengths, float *dst) {
    Impl *d = impl_of(model);
    const int B = model->B, T = model->T, C = model->config.n_embd;
    for (int b = 0; b < B; b++)
        if (lengths[b] < 1 || lengths[b] > T)
            fatal("cuda_model_copy_hidden_last: length %d of row %d not in 1..%d", lengths[b], b, T);
    // the rows' bf16 vectors side by side in a host buffer, then widened: a bf16 is the top half
    // of the float with the same value
    uint16_t *rows = (uint16_t *)mallocCheck((size_t)B * C * sizeof(uint16_t));
    for (int b = 0; b < B; b++)
        cudaCheck(cudaMemcpyAsync(rows + (size_t)b * C, d->lnf + ((size_t)b * T + lengths[b] - 1) * C,
                                  (size_t)C * sizeof(floatX), cudaMemcpyDeviceToHost, d->stream));
    cudaCheck(cudaStreamSynchronize(d->stream));
    for (size_t i = 0; i < (size_t)B * C; i++) {
        uint32_t bits = (uint32_t)rows[i] << 16;
        memcpy(dst + i, &bits, sizeof(float));
    }
    free(rows);
}

extern "C" void cuda_model_poison(CudaModel *model) {
    Impl *d = impl_of(model);
    // all bits set is a NaN both as fp32 and as bf16
    for (int i = 0; i < d->act_count; i++) cudaCheck(cudaMemsetAsync(d->act_ptrs[i], 0xff, d->act_bytes[i], d->stream));
    cudaCheck(cudaStreamSynchronize(d->stream));
}

extern "C" void cuda_model_profile_report(CudaModel *model, FILE *out, int steps) {
    Impl *d = impl_of(model);
    prof_resolve(model);
    int order[PROF_COUNT];
    double total = 0.0;
    for (int i = 0; i < PROF_COUNT; i++) { order[i] = i; total += d->prof_ms[i]; }
    for (int i = 0; i < PROF_COUNT; i++)
        for (int j = i + 1; j < PROF_COUNT; j++)
            if (d->prof_ms[order[j]] > d->prof_ms[order[i]]) { int tmp = order[i]; order[i] = order[j]; order[j] = tmp; }
    if (steps < 1) steps = 1;
    fprintf(out, "  %-24s %10s %7s\n", "kernel group", "ms/step", "share");
    for (int i = 0; i < PROF_COUNT; i++) {
        int g = order[i];
        if (d->prof_ms[g] <= 0.0) continue;
        fprintf(out, "  %-24s %10.3f %6.1f%%\n", prof_names[g], d->prof_ms[g] / steps, 100.0 * d->prof_ms[g] / total);
    }
    fprintf(out, "  %-24s %10.3f\n", "sum of kernel groups", total / steps);
    for (int i = 0; i < PROF_COUNT; i++) d->prof_ms[i] = 0.0;
}

// ---------------------------------------------------------------------------------------------
// data parallel (NCCL)

extern "C" void cuda_model_broadcast_params(CudaModel *model, int root) {
    Impl *d = impl_of(model);
    require_training(d, "cuda_model_broadcast_params");
    update_settle(model);
    comm_nccl_broadcast(d->params, model->num_parameters * sizeof(float), root, d->stream);
    convert_f32_to_bf16(d->params_bf16, d->params, model->num_parameters, d->stream);
    cudaCheck(cudaStreamSynchronize(d->stream));
}

extern "C" void cuda_model_sum_grads(CudaModel *model) {
    Impl *d = impl_of(model);
    require_training(d, "cuda_model_sum_grads");
    if (d->sharded) fatal("cuda_model_sum_grads: the model's optimizer is sharded (use cuda_model_all_reduce_grads)");
    grads_settle(model);
    d->grad_sums_ready = 0;
    comm_nccl_all_reduce_sum(d->grads, model->num_parameters, d->stream);
}

extern "C" void cuda_model_all_reduce_grads(CudaModel *model, float *loss) {
    Impl *d = impl_of(model);
    require_training(d, "cuda_model_all_reduce_grads");
    size_t P = model->num_parameters;
    grads_settle(model);
    d->grad_sums_ready = 0;
    // the loss rides in the float after the gradient (grads holds num_parameters + 1)
    cudaCheck(cudaMemcpyAsync(d->grads + P, loss, sizeof(float), cudaMemcpyHostToDevice, d->stream));
    if (d->sharded) {
        comm_nccl_reduce_scatter_mean_shards(d->grads, P, d->stream);
        comm_nccl_all_reduce_mean(d->grads + P, 1, d->stream);
    } else {
        comm_nccl_all_reduce_mean(d->grads, P + 1, d->stream);
    }
    cudaCheck(cudaMemcpyAsync(loss, d->grads + P, sizeof(float), cudaMemcpyDeviceToHost, d->stream));
    cudaCheck(cudaStreamSynchronize(d->stream));
}
