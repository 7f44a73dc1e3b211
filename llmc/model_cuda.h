/*
 * The model on one GPU, behind a small C API that mirrors model.h. A CudaModel is created from
 * a CPU Model (its config and parameters, and its AdamW state when it has one), trains on the
 * GPU, and writes its parameters back into the CPU Model on request.
 *
 * Precision: fp32 master weights, AdamW moments and parameter gradients; bf16 copies of the
 * weights that the forward reads; bf16 activations, the residual stream included (fp32 with
 * residual_bf16 = 0); every sum accumulated in fp32. Results match the fp32 CPU reference within bf16 tolerance.
 *
 * Every function takes and returns host memory (token ids, masks, weights, losses); device
 * memory stays inside. All functions exit with a message on a CUDA error (no return codes).
 * Data parallel (one rank per GPU, ranks as in comm.h): the functions at the end reduce the
 * gradients and the loss over the ranks, broadcast the parameters and shard the AdamW state
 * (ZeRO-1), through NCCL (comm_nccl.h). Programs that link model_cuda.o link comm_nccl.o too.
 *
 * Only compiled when nvcc is found (the Makefile then defines USE_CUDA for the C side):
 *
 *   #ifdef USE_CUDA
 *   if (cuda_device_count() > 0) { CudaModel *g = cuda_model_create(&model, B, T); ... }
 *   #endif
 */
#ifndef LLMC_MODEL_CUDA_H
#define LLMC_MODEL_CUDA_H

#include <stddef.h>
#include <stdio.h>

#ifdef __cplusplus
extern "C" {
#endif
#include "model.h"

typedef struct CudaModel {
    ModelConfig config;
    size_t num_parameters;
    int max_B, max_T;       // the largest batch shape the activations were allocated for
    size_t device_bytes;    // the device memory the model holds (its allocations, summed)
    int B, T;               // shape of the last forward
    int opt_step;           // AdamW steps taken
    int has_targets;
    float mean_loss;        // as Model.mean_loss (-1 without targets)
    float *token_losses;    // host (max_B * max_T): the last forward's per-token losses
    int use_gelu_fusion;    // 1: GPT-2's MLP GELU comes from the cuBLASLt epilogue (default)
    int profile;            // 1: time every kernel with CUDA events (cuda_model_profile_report)
    // 1 (default): the backward's weight-gradient products run on a second stream beside the
    // chain of input gradients (not while profiling); 0: one stream (TRAIN_MORA_OVERLAP_GRADS=0
    // at creation). Same gradients bit for bit.
    int overlap_weight_grads;
    // 1 (default): cuda_model_adamw_update queues AdamW on the second stream, a layer's tensors at
    // a time in the order the forward reads them, and the next forward waits for each layer's
    // update just before it reads that layer's weights, so the update (memory-bound) runs beside
    // the forward's products instead of before them. Every other call that reads the parameters,
    // gradients or moments waits for the whole update first. Not while profiling, nor with the
    // optimizer sharded (ZeRO-1). 0: AdamW on the main stream (TRAIN_MORA_OVERLAP_UPDATE=0 at
    // creation). Same arithmetic, same bits.
    int overlap_update;
    // 1 (default): with the weight gradients on the second stream (overlap_weight_grads), the
    // backward sums the squares of each layer's gradients there as soon as that layer's are
    // complete, and of the embeddings', the final norm's and an untied head's at its end, so that
    // cuda_model_grad_norm only adds those sums instead of reading the whole gradient after the
    // backward. The sums hold for the gradient as the backward left it: zero_grad and the
    // collectives (all_reduce_grads, sum_grads) drop them, and grad_norm then reads the gradient
    // (as always with ZeRO-1). A caller that accumulates several backwards may set it to 0 for
    // all but the last (their sums would go unread). 0: grad_norm reads the whole gradient
    // (TRAIN_MORA_NORM_IN_BACKWARD=0 at creation). The same norm up to the order of the float sums.
    int norm_in_backward;
    // 1 (default): with the weight gradients on the second stream (overlap_weight_grads), the
    // backward's column sums are finished there, off the main stream's path: each norm
    // backward's (its weight's and a bias's gradient: the norm kernel on the main stream leaves
    // its blocks' partial sums in one of a ring of buffers and the side stream adds them up) and
    // the products' bias gradients (the column sums of the product's output gradient, after its
    // weight gradient there). 0: on the main stream (TRAIN_MORA_SUMS_ASIDE=0 at creation).
    // Same sums, same bits.
    int sums_aside;
    // 1 (default): the gradient at each layer's norm outputs (the input gradient of the qkv and
    // MLP up products, which the norm backward reads) is bf16, as the other activation gradients
    // are: 2 bytes an element less written by the product and 2 less read by the memory-bound
    // norm backward (16 instead of 18). 0: fp32 (TRAIN_MORA_DNORM_BF16=0 at creation). The final
    // norm's (the classifier's) stays fp32.
    int dnorm_bf16;
    // 1 (default): the residual stream and its gradient are bf16, as every other activation:
    // each add into the stream rounds to bf16 (2L times a forward, 2L a backward), and in
    // exchange the memory-bound norm kernels move 8 bytes an element instead of 12 (forward) and
    // 16 (backward), and the stored streams take half the memory. 0: fp32 stream and gradient
    // (TRAIN_MORA_RESIDUAL_BF16=0 at creation). A forward's choice holds for its backward.
    int residual_bf16;
    // 1 (default): with a bf16 stream, the attention and MLP projections add their output to the
    // stream in the product's epilogue (D = stream + x W^T + b, rounded once) and the norm after
    // them reads the stream alone: 4 bytes an element through the norm instead of 8, 2 more
    // through the product. 0: the product writes its output and the norm kernel adds it
    // (TRAIN_MORA_RESIDUAL_IN_PRODUCT=0 at creation).
    int residual_in_product;
    // 1: Llama's flash attention backward takes dQ and dK back through RoPE in its epilogue,
    // before it stores them, instead of rope_backward reading and rewriting them after it; the
    // same arithmetic, the same bits. 0 (default): rope_backward, which measured faster: SmolLM2's
    // attention backward and RoPE 0.379 ms a layer against 0.399 in the epilogue on an H200, the
    // step 47.89 ms against 48.16 and 48.51 against 48.67 on an H100
    // (TRAIN_MORA_ROPE_IN_ATTENTION=1 at creation).
    int rope_in_attention;
    // 1: Llama's flash attention forward rotates the query heads by RoPE as it loads them and
    // stores them back rotated, rope_forward_keys rotating the key heads before it, instead of
    // rope_forward reading and rewriting both; the same arithmetic, the same bits in qkv, out and
    // lse. 0 (default): rope_forward, which measured faster: 0.140 ms a layer against 0.159 on an
    // H200, the step 48.36 ms against 48.67 on an H100
    // (TRAIN_MORA_ROPE_FORWARD_IN_ATTENTION=1 at creation).
    int rope_forward_in_attention;
    // 1 (default): zero_grad leaves the layers' weight matrices' gradients for the next
    // backward's products to write (cuda_model_zero_grad); 0: it zeroes every gradient and every
    // backward adds to them (bench_train times both)
    int grads_first_write;
    // The flash attention's launch configuration is tuned on the first forward, for its shape:
    // the fastest of those whose results equal the defaults' bit for bit (attention_flash_tune in
    // attention_flash.cuh), so the choice never changes the numbers. TRAIN_MORA_FLASH_TUNE=0
    // keeps the defaults. attention_tuning describes the choice and its times once it is made.
    int attention_tuned;
    char attention_tuning[1024];
    // 1 when the tuning had the warpgroup (wgmma) kernels among its candidates
    // (TRAIN_MORA_FLASH_WGMMA=1 on a device with this build's sm_90a code, head size 64)
    int attention_wgmma_tried;
    // 1 (default; TRAIN_MORA_MATMUL_TUNE=0 at creation sets 0): the first forward and backward at
    // the full shape (max_B x max_T) tune the cuBLASLt algorithm of every product shape they run,
    // again only among the candidates whose results equal cuBLASLt's first choice bit for bit
    // (matmul.cuh). matmul_tuning describes the outcome after the first such backward.
    int matmul_tune;
    char matmul_tuning[256];
    void *impl;             // device buffers (model_cuda.cu)
} CudaModel;

// Number of usable CUDA devices (0 without a driver or a GPU; never exits).
int cuda_device_count(void);
// "NVIDIA H100 80GB HBM3, 132 SMs, 79.1 GiB, compute 9.0" for the current device (0 unless
// comm_nccl_init selected this rank's), into buf.
void cuda_device_describe(char *buf, size_t size);
// The card's dense bf16 tensor-core peak in FLOP/s when it is known by name (H100 SXM/PCIe,
// H200, A100), else 0. Used for the benchmark's MFU.
double cuda_device_bf16_peak_flops(void);

// Allocates everything for batches up to max_B x max_T on the current device (device 0 unless
// comm_nccl_init selected this rank's GPU; a device without room for it stops the program with
// a message naming the shape and device_memory_hint's flags, utils.h) and uploads the parameters
// (fp32 master + bf16 copy) and, when the CPU model has them, its AdamW moments and step.
CudaModel *cuda_model_create(const Model *cpu, int max_B, int max_T);
// As cuda_model_create, with the residual stream in fp32 (residual_bf16 0) unless
// TRAIN_MORA_RESIDUAL_BF16 is set: for the forwards whose log-probs and hidden states are read
// as figures rather than trained on, the MORA loop's policy and reference and the reward heads'
// hidden states. The loop's KL and ratios take exponentials of log-prob differences, which
// amplify per-token errors, and the bf16 stream doubled them (dev/cuda/mora_device_check.py's
// DPO KL against the CPU: 8% apart with the fp32 stream, 16% with bf16, on the CPU emulation of
// the GPU); those batches are small, and so is what the fp32 stream costs them.
CudaModel *cuda_model_create_fp32_residual(const Model *cpu, int max_B, int max_T);
// A model for forwards alone, with the residual stream of cuda_model_create_fp32_residual: the
// bf16 weights and one layer's activations (each layer overwrites the last's), without the fp32
// master weights, gradients, AdamW moments and backward buffers of a training model: for
// SmolLM2-135M at 16 x 1024 tokens, 2.3 GB by its allocations against a training model's 13.9
// (9.5 of them the 30 layers' activations; device_bytes holds a model's total). Its forwards give
// the same bits as a training model's. with_head 0 also leaves out the head's product, the
// classifier and the logits (N x padded vocabulary bf16; 0.66 GB in all for that shape):
// forwards without targets, for the hidden states (cuda_model_copy_hidden, _hidden_last).
// The attention is tuned for the forward alone. Everything that needs gradients, moments or the
// fp32 weights (zero_grad, backward, forward_backward, grad_norm, adamw_update, download,
// copy_grads and the collectives) stops with a message naming this function.
CudaModel *cuda_model_create_inference(const Model *cpu, int max_B, int max_T, int with_head);
void cuda_model_free(CudaModel *model);

// After the first forward: 1 runs the flash attention in its tuned configuration (the default),
// 0 in the defaults', 2 in the tuning's fastest choice among the mma.sync kernels alone (its
// choice where the warpgroup kernels were no candidates). Benchmarks compare them; the results
// are the same bit for bit.
void cuda_model_attention_config(CudaModel *model, int tuned);
// After the first forward: runs the flash attention's warpgroup (wgmma) kernels from now on, in
// all three passes, whatever the tuning chose (their results may differ from the defaults' in
// the last bits); cuda_model_attention_config undoes it. variant 1: the backward's passes keep
// their loop-invariant operands (Q and dO, K and V) in registers; 2: they read them from shared
// memory. Returns 0, changing nothing, where they do not apply (head size other than 64, a
// device without this build's sm_90a code, or TRAIN_MORA_FLASH_WGMMA not 1).
int cuda_model_attention_wgmma(CudaModel *model, int variant);
// 1 runs the products in their tuned algorithms (the default), 0 in cuBLASLt's first choices, for
// every CUDA model of the process (the tuned choices are kept per shape, not per model).
void cuda_model_matmul_config(int tuned);
// 1: the flash forward's softmax reference is a row's running max itself, rescaled at every move
// (flash_forward_max_slack 0, as before the reference could trail the max); 0 (default): it
// trails by up to FLASH_MAX_SLACK. For bench_train's comparison; every CUDA model of the process.
void cuda_model_attention_eager_rescale(int eager);
// The product shapes tuned since the model was created, a line each, to out.
void cuda_model_matmul_tuning_print(CudaModel *model, FILE *out);

// As model_forward: inputs (B, T), targets (B, T) or NULL, loss_mask (B, T) or NULL.
// Fills token_losses and mean_loss. B <= max_B, T <= max_T.
void cuda_model_forward(CudaModel *model, const int *inputs, const int *targets, const float *loss_mask, int B, int T);
// Zeroes the gradients. The layers' weight matrices' are left for the next backward's products
// to write rather than add to (neither a memset nor a read of them); anything that reads the
// gradients before that backward (grad_norm, adamw_update, copy_grads, the collectives) zeroes
// them first, so the gradients read as 0 either way.
void cuda_model_zero_grad(CudaModel *model);
// As model_backward_weighted: token_weights (B, T) or NULL, dhidden (B, T, C) or NULL; += grads.
// Needs the last forward's activations (at most one backward per forward: the classifier writes
// its gradient over the logits).
void cuda_model_backward_weighted(CudaModel *model, const float *token_weights, const float *dhidden);
// As model_backward: the gradient of scale * mean_loss.
void cuda_model_backward(CudaModel *model, float scale);
// The training step's forward + backward of scale * mean_loss with the fused classifier (the
// loss and the logits' gradient in one kernel): what pretraining calls. Same results as
// cuda_model_forward followed by cuda_model_backward.
void cuda_model_forward_backward(CudaModel *model, const int *inputs, const int *targets, const float *loss_mask,
                                 int B, int T, float scale);

// The global L2 norm of the gradient (of the mean gradient over the ranks after
// cuda_model_all_reduce_grads; collective with a sharded optimizer).
float cuda_model_grad_norm(CudaModel *model);
// As model_adamw_update (same decay set, same bias correction); refreshes the bf16 weights.
// Collective with a sharded optimizer (the parameters are all-gathered).
void cuda_model_adamw_update(CudaModel *model, float lr, float beta1, float beta2, float eps,
                             float weight_decay, float grad_scale);

// Copies the fp32 master parameters, the AdamW moments (allocating cpu->m / cpu->v when needed;
// only the shard's with a sharded optimizer, see cuda_model_create_sharded) and the step back
// into the CPU model (same config).
void cuda_model_download(CudaModel *model, Model *cpu);
// Copies out, as fp32: the parameter gradients (num_parameters), the last forward's logits
// (B, T, Vp; only before a backward, which overwrites them) and hidden state (B, T, C).
void cuda_model_copy_grads(CudaModel *model, float *dst);
void cuda_model_copy_logits(CudaModel *model, float *dst);
void cuda_model_copy_hidden(CudaModel *model, float *dst);
// dst (B, C) fp32: row b of the last forward's hidden state at position lengths[b] - 1 (each in
// 1..T), what the reward heads read (reward_gather_last on the CPU model's hidden state).
void cuda_model_copy_hidden_last(CudaModel *model, const int *lengths, float *dst);
// Fills every activation and activation-gradient buffer with NaN (tests: a kernel that leaves an
// element unwritten then shows up as NaN in the outputs).
void cuda_model_poison(CudaModel *model);

// ---- data parallel over the ranks of comm.h, through NCCL ----
// comm_nccl_init must have run on every rank before cuda_model_create (it selects the rank's
// GPU). Each call below is collective: every rank calls it, in the same order. A training step:
//   zero_grad, forward_backward (this rank's micro-batches), all_reduce_grads, grad_norm,
//   adamw_update.

// Every rank's parameters (fp32 master weights and their bf16 copy) <- rank root's.
void cuda_model_broadcast_params(CudaModel *model, int root);
// The step's gradient and loss become their means over the ranks, which is what one GPU computes
// on the ranks' micro-batches together (each micro-batch's mean loss weighs the same): *loss is
// this rank's loss on entry, the mean on return. Unsharded: every rank gets the whole mean
// gradient (one NCCL all-reduce carries the gradient and the loss). With a sharded optimizer
// (cuda_model_create_sharded) a rank gets the mean of its shard of the gradient only (a
// reduce-scatter): the rest of its gradient buffer is not the mean and is read by nothing.
void cuda_model_all_reduce_grads(CudaModel *model, float *loss);
// The gradient becomes its sum over the ranks, on every rank (one NCCL all-reduce; unsharded
// models only): for callers whose ranks each scaled their gradient by their share of the batch
// (the MORA loop), so that the sum is the whole batch's gradient.
void cuda_model_sum_grads(CudaModel *model);
// ZeRO-1: as cuda_model_create, but this rank keeps the AdamW moments of its shard of the
// parameter buffer only (comm_shard_range(num_parameters, comm_rank(), comm_world())): the slice
// of the CPU model's moments when it has them (a resumed checkpoint), else zeros. The full
// moments never take GPU memory. cuda_model_all_reduce_grads then reduces only the shard of the
// gradient, cuda_model_grad_norm adds the shards' squared norms over the ranks,
// cuda_model_adamw_update updates this rank's shard (with the weight decay of each tensor it
// cuts, as the unsharded update) and all-gathers the parameters, and cuda_model_download copies
// the shard's moments to the same offsets of cpu->m / cpu->v and leaves the rest as it was:
// comm_gather_shards on the host then assembles the whole state.
CudaModel *cuda_model_create_sharded(const Model *cpu, int max_B, int max_T);

// With model->profile = 1 every kernel launch is timed; this prints milliseconds per kernel
// group summed since the last reset, largest first, and resets.
void cuda_model_profile_report(CudaModel *model, FILE *out, int steps);

#ifdef __cplusplus
}
#endif
#endif
