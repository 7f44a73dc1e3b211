/*
 * The classifier on the GPU: softmax over the first V of the Vp logits of each row, masked
 * cross-entropy, and its gradient, fused into one kernel. CPU reference: classifier_forward /
 * classifier_backward in ops_cpu.c.
 *
 *   lse[n]    = log sum_{v < V} exp(logits[n, v])
 *   losses[n] = lse[n] - logits[n, target[n]] where the mask is not 0, else 0
 *   dlogits[n, v] = weights[n] * (exp(logits[n, v] - lse[n]) - [v == target[n]]) for v < V,
 *                   0 for the padded columns v >= V
 *
 * The logits (N, Vp) are bf16 and the gradient is written over them in place (as llm.c does):
 * the (N, Vp) tensor is the largest activation of the model, and after the loss nothing reads
 * the logits again. One block handles one row; the max and the sum of exponentials come from
 * one read of the row (online softmax: each thread keeps a running max and a sum rescaled when
 * the max grows), and the gradient pass re-reads the row while it is still in L2 (a 50K-vocab
 * bf16 row is 100 KB), so DRAM sees the logits once read and once written.
 */
#ifndef LLMC_FUSED_CLASSIFIER_CUH
#define LLMC_FUSED_CLASSIFIER_CUH
#include <math.h>
#include <stdint.h>
#include "cuda_common.h"

// e^x as 2^(x log2 e): the hardware's base-2 exponential (exp2f) after one multiply, where expf
// spends several more instructions on an exact range reduction. Two exponentials an element are
// most of the kernels' arithmetic, which otherwise keeps them from the memory's bandwidth; the
// result is within a few units in the last place of expf's (the gradient is written in bf16).
__device__ __forceinline__ float classifier_exp(float x) { return exp2f(x * 1.4426950408889634f); }

// Writes dlogits over row (Vp) given its lse; w = the row's weight.
__device__ __forceinline__ void classifier_row_gradient(floatX *row, float row_lse, int target, float w, int V, int Vp) {
    for (int v = threadIdx.x; v < Vp; v += blockDim.x) {
        float d = 0.0f;
        if (v < V && w != 0.0f) {
            float p = classifier_exp(to_float(row[v]) - row_lse);
            d = w * (p - (v == target ? 1.0f : 0.0f));
        }
        row[v] = __float2bfloat16(d);
    }
}

// The row's lse from each thread's running max m and sum s (of exp(x - m)); thread 0 writes it
// and the row's loss. Every thread gets the lse.
__device__ __forceinline__ float classifier_row_lse(float m, float s, float *shared, int n, float *lse, float *losses,
                                                    const int *targets, int active, float target_logit) {
    float row_max = block_max(m, shared);
    float scaled = m == -INFINITY ? 0.0f : s * classifier_exp(m - row_max);
    float row_lse = row_max + logf(block_sum(scaled, shared));
    if (threadIdx.x == 0) {
        lse[n] = row_lse;
        if (targets) losses[n] = active ? row_lse - target_logit : 0.0f;
    }
    return row_lse;
}

// grid N blocks, one row each. targets may be NULL (then only lse is written); mask may be NULL
// (every row counts); weights may be NULL (no gradient: the logits are kept). Where weights is
// given, the caller has set weights[n] = 0 where mask[n] is 0.
__global__ void fused_classifier_kernel(floatX *logits, float *lse, float *losses, const int *targets,
                                        const float *mask, const float *weights, int V, int Vp) {
    __shared__ float shared[32];
    int n = blockIdx.x;
    floatX *row = logits + (size_t)n * Vp;
    int active = targets != NULL && (mask == NULL || mask[n] != 0.0f);
    // the target's logit is read before any thread overwrites the row (the barriers inside the
    // block reductions below order this read before the gradient pass)
    float target_logit = active ? to_float(row[targets[n]]) : 0.0f;

    float m = -INFINITY, s = 0.0f;
    for (int v = threadIdx.x; v < V; v += blockDim.x) {
        float x = to_float(row[v]);
        if (x > m) { s = s * classifier_exp(m - x) + 1.0f; m = x; }
        else s += classifier_exp(x - m);
    }
    float row_lse = classifier_row_lse(m, s, shared, n, lse, losses, targets, active, target_logit);
    if (weights) {
        int target = active ? targets[n] : -1;
        classifier_row_gradient(row, row_lse, target, weights[n], V, Vp);
    }
}

// The backward alone, for a forward that ran without weights: dlogits over logits in place.
__global__ void classifier_backward_kernel(floatX *logits, const float *lse, const int *targets,
                                           const float *weights, int V, int Vp) {
    int n = blockIdx.x;
    float w = weights[n];
    classifier_row_gradient(logits + (size_t)n * Vp, lse[n], w != 0.0f ? targets[n] : -1, w, V, Vp);
}

// The same two kernels reading and writing the row 8 bf16 (16 bytes) at a time, for rows that
// start on 16 bytes (Vp a multiple of 8, as the padded vocabularies are): one load instruction
// where the kernels above issue eight 2-byte ones, and one rescale of the running sum per 8
// logits. The pick is classifier_vectorized(); both are checked against the CPU reference.
#define CLASSIFIER_VEC 8

__device__ __forceinline__ void classifier_load8(const floatX *p, float (&x)[CLASSIFIER_VEC]) {
    uint4 packed = *reinterpret_cast<const uint4 *>(p);
    const floatX *h = reinterpret_cast<const floatX *>(&packed);
#pragma unroll
    for (int i = 0; i < CLASSIFIER_VEC; i++) x[i] = to_float(h[i]);
}

// Adds 8 logits x (columns v0 .. v0+7, those < V) into a thread's running max m and sum s of
// exp(x - m): one rescale per 8 logits. Shared by the 8-wide and the staged kernel, so the two
// give the same bits.
__device__ __forceinline__ void classifier_online8(const float (&x)[CLASSIFIER_VEC], int v0, int V, float &m, float &s) {
    float chunk_max = -INFINITY;
#pragma unroll
    for (int i = 0; i < CLASSIFIER_VEC; i++)
        if (v0 + i < V) chunk_max = fmaxf(chunk_max, x[i]);
    float m_new = fmaxf(m, chunk_max), add = 0.0f;
#pragma unroll
    for (int i = 0; i < CLASSIFIER_VEC; i++)
        if (v0 + i < V) add += classifier_exp(x[i] - m_new);
    s = (m == -INFINITY ? 0.0f : s * classifier_exp(m - m_new)) + add;
    m = m_new;
}

// dlogits into row (Vp) from the logits in src: the row itself, or its copy in shared memory
// (the staged kernel); w = the row's weight.
__device__ __forceinline__ void classifier_row_gradient8(floatX *row, const floatX *src, float row_lse, int target, float w,
                                                         int V, int Vp) {
    for (int v0 = threadIdx.x * CLASSIFIER_VEC; v0 < Vp; v0 += blockDim.x * CLASSIFIER_VEC) {
        float x[CLASSIFIER_VEC];
        classifier_load8(src + v0, x);
        uint4 packed;
        floatX *h = reinterpret_cast<floatX *>(&packed);
#pragma unroll
        for (int i = 0; i < CLASSIFIER_VEC; i++) {
            int v = v0 + i;
            float d = 0.0f;
            if (v < V && w != 0.0f) d = w * (classifier_exp(x[i] - row_lse) - (v == target ? 1.0f : 0.0f));
            h[i] = __float2bfloat16(d);
        }
        *reinterpret_cast<uint4 *>(row + v0) = packed;
    }
}

__global__ void fused_classifier8_kernel(floatX *logits, float *lse, float *losses, const int *targets,
                                         const float *mask, const float *weights, int V, int Vp) {
    __shared__ float shared[32];
    int n = blockIdx.x;
    floatX *row = logits + (size_t)n * Vp;
    int active = targets != NULL && (mask == NULL || mask[n] != 0.0f);
    float target_logit = active ? to_float(row[targets[n]]) : 0.0f;   // read before the barriers below

    float m = -INFINITY, s = 0.0f;
    for (int v0 = threadIdx.x * CLASSIFIER_VEC; v0 < V; v0 += blockDim.x * CLASSIFIER_VEC) {
        float x[CLASSIFIER_VEC];
        classifier_load8(row + v0, x);
        classifier_online8(x, v0, V, m, s);
    }
    float row_lse = classifier_row_lse(m, s, shared, n, lse, losses, targets, active, target_logit);
    if (weights) classifier_row_gradient8(row, row, row_lse, active ? targets[n] : -1, weights[n], V, Vp);
}

__global__ void classifier_backward8_kernel(floatX *logits, const float *lse, const int *targets,
                                            const float *weights, int V, int Vp) {
    int n = blockIdx.x;
    float w = weights[n];
    classifier_row_gradient8(logits + (size_t)n * Vp, logits + (size_t)n * Vp, lse[n], w != 0.0f ? targets[n] : -1, w, V, Vp);
}

// The fused forward and gradient with the row staged in shared memory: the first pass copies
// the row there (CLASSIFIER_STAGE_LOADS 16-byte loads in flight per thread) while it takes the
// max and the sum of exponentials, and the gradient pass reads the copy, so DRAM sees the logits
// read exactly once and written once. The kernels above count on the row still being in L2 for
// their second pass, which holds for part of the rows only: four blocks an SM keep about 53 MB
// of rows in flight at GPT-2's vocabulary, more than an H100's 50 MB of L2. Same arithmetic as
// fused_classifier8_kernel, so the same results bit for bit. Dynamic shared memory: the row,
// Vp * 2 bytes (at most CLASSIFIER_STAGE_MAX_BYTES: two blocks an SM on an H100).
#define CLASSIFIER_STAGE_LOADS 4
#define CLASSIFIER_STAGE_MAX_BYTES (112 * 1024)
__global__ void fused_classifier_staged_kernel(floatX *logits, float *lse, float *losses, const int *targets,
                                               const float *mask, const float *weights, int V, int Vp) {
    __shared__ float shared[32];
    floatX *staged = (floatX *)dynamic_smem();
    int n = blockIdx.x;
    floatX *row = logits + (size_t)n * Vp;
    int active = targets != NULL && (mask == NULL || mask[n] != 0.0f);
    float target_logit = active ? to_float(row[targets[n]]) : 0.0f;

    float m = -INFINITY, s = 0.0f;
    const int stride = blockDim.x * CLASSIFIER_VEC;
    for (int base = threadIdx.x * CLASSIFIER_VEC; base < Vp; base += CLASSIFIER_STAGE_LOADS * stride) {
        uint4 packed[CLASSIFIER_STAGE_LOADS];
#pragma unroll
        for (int u = 0; u < CLASSIFIER_STAGE_LOADS; u++) {
            int v0 = base + u * stride;
            if (v0 < Vp) packed[u] = *reinterpret_cast<const uint4 *>(row + v0);
        }
#pragma unroll
        for (int u = 0; u < CLASSIFIER_STAGE_LOADS; u++) {
            int v0 = base + u * stride;
            if (v0 >= Vp) break;
            *reinterpret_cast<uint4 *>(staged + v0) = packed[u];
            float x[CLASSIFIER_VEC];
            const floatX *h = reinterpret_cast<const floatX *>(&packed[u]);
#pragma unroll
            for (int i = 0; i < CLASSIFIER_VEC; i++) x[i] = to_float(h[i]);
            classifier_online8(x, v0, V, m, s);
        }
    }
    // the reductions' barriers also make the whole staged row visible to every thread
    float row_lse = classifier_row_lse(m, s, shared, n, lse, losses, targets, active, target_logit);
    if (weights) classifier_row_gradient8(row, staged, row_lse, active ? targets[n] : -1, weights[n], V, Vp);
}

// Threads a block (one block a row): four blocks fill an H100 SM's 2048 threads, the four rows in
// flight that the header's L2 argument counts, and a 50304-wide GPT-2 row takes 12 or 13 8-wide
// loads a thread. block_sum and block_max keep one partial a warp in shared[32].
#define CLASSIFIER_BLOCK 512
static_assert(CLASSIFIER_BLOCK % 32 == 0 && CLASSIFIER_BLOCK / 32 <= 32,
              "whole warps, at most 32 of them: block_sum/block_max hold one partial a warp in shared[32]");

static inline int classifier_vectorized(const floatX *logits, int Vp) {
    return Vp % CLASSIFIER_VEC == 0 && ((uintptr_t)logits & 15) == 0;
}
static inline void fused_classifier_check(int V, int Vp, const float *weights, const int *targets) {
    cudaRequire(V >= 1 && V <= Vp, "fused_classifier: need 1 <= V <= Vp");
    cudaRequire(weights == NULL || targets != NULL, "fused_classifier: a gradient needs targets");
}
// the kernels by name (the harness and the emulator test run both), then the pick
static inline void fused_classifier_scalar(floatX *logits, float *lse, float *losses, const int *targets,
                                           const float *mask, const float *weights, int N, int V, int Vp,
                                           cudaStream_t stream) {
    fused_classifier_check(V, Vp, weights, targets);
    fused_classifier_kernel<<<N, CLASSIFIER_BLOCK, 0, stream>>>(logits, lse, losses, targets, mask, weights, V, Vp);
    cudaCheckLaunch();
}
static inline void fused_classifier_vec8(floatX *logits, float *lse, float *losses, const int *targets,
                                         const float *mask, const float *weights, int N, int V, int Vp,
                                         cudaStream_t stream) {
    fused_classifier_check(V, Vp, weights, targets);
    cudaRequire(classifier_vectorized(logits, Vp), "fused_classifier_vec8: rows must start on 16 bytes (Vp a multiple of 8)");
    fused_classifier8_kernel<<<N, CLASSIFIER_BLOCK, 0, stream>>>(logits, lse, losses, targets, mask, weights, V, Vp);
    cudaCheckLaunch();
}
// The staged kernel's shared memory for rows of Vp, or 0 when it cannot take them (rows not on
// 16 bytes, or wider than CLASSIFIER_STAGE_MAX_BYTES or than the device allows a block).
static inline size_t classifier_staged_bytes(const floatX *logits, int Vp) {
    static int optin = -1;
    if (optin < 0) {
        int device = 0;
        cudaCheck(cudaGetDevice(&device));
        cudaCheck(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    }
    size_t bytes = (size_t)Vp * sizeof(floatX);
    if (!classifier_vectorized(logits, Vp) || bytes > CLASSIFIER_STAGE_MAX_BYTES || bytes > (size_t)optin) return 0;
    return bytes;
}
static inline void fused_classifier_staged(floatX *logits, float *lse, float *losses, const int *targets,
                                           const float *mask, const float *weights, int N, int V, int Vp,
                                           cudaStream_t stream) {
    fused_classifier_check(V, Vp, weights, targets);
    size_t bytes = classifier_staged_bytes(logits, Vp);
    cudaRequire(bytes > 0, "fused_classifier_staged: rows must start on 16 bytes and fit in a block's shared memory");
    static size_t allowed = 0;
    if (bytes > allowed) {
        cudaCheck(cudaFuncSetAttribute(fused_classifier_staged_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
        allowed = bytes;
    }
    fused_classifier_staged_kernel<<<N, CLASSIFIER_BLOCK, bytes, stream>>>(logits, lse, losses, targets, mask, weights, V, Vp);
    cudaCheckLaunch();
}
// The pick: with a gradient to write, the staged kernel where the row fits in shared memory;
// else the 8-wide kernel where rows start on 16 bytes; else the scalar one.
static inline void fused_classifier(floatX *logits, float *lse, float *losses, const int *targets,
                                    const float *mask, const float *weights, int N, int V, int Vp,
                                    cudaStream_t stream) {
    if (weights && classifier_staged_bytes(logits, Vp) > 0)
        fused_classifier_staged(logits, lse, losses, targets, mask, weights, N, V, Vp, stream);
    else if (classifier_vectorized(logits, Vp)) fused_classifier_vec8(logits, lse, losses, targets, mask, weights, N, V, Vp, stream);
    else fused_classifier_scalar(logits, lse, losses, targets, mask, weights, N, V, Vp, stream);
}
static inline void classifier_backward_scalar(floatX *logits, const float *lse, const int *targets, const float *weights,
                                              int N, int V, int Vp, cudaStream_t stream) {
    classifier_backward_kernel<<<N, CLASSIFIER_BLOCK, 0, stream>>>(logits, lse, targets, weights, V, Vp);
    cudaCheckLaunch();
}
static inline void classifier_backward_vec8(floatX *logits, const float *lse, const int *targets, const float *weights,
                                            int N, int V, int Vp, cudaStream_t stream) {
    cudaRequire(classifier_vectorized(logits, Vp), "classifier_backward_vec8: rows must start on 16 bytes (Vp a multiple of 8)");
    classifier_backward8_kernel<<<N, CLASSIFIER_BLOCK, 0, stream>>>(logits, lse, targets, weights, V, Vp);
    cudaCheckLaunch();
}
static inline void classifier_backward(floatX *logits, const float *lse, const int *targets, const float *weights,
                                       int N, int V, int Vp, cudaStream_t stream) {
    if (classifier_vectorized(logits, Vp)) classifier_backward_vec8(logits, lse, targets, weights, N, V, Vp, stream);
    else classifier_backward_scalar(logits, lse, targets, weights, N, V, Vp, stream);
}
#endif
