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
#include "cuda_common.h"

// Writes dlogits over row (Vp) given its lse; w = the row's weight.
__device__ __forceinline__ void classifier_row_gradient(floatX *row, float row_lse, int target, float w, int V, int Vp) {
    for (int v = threadIdx.x; v < Vp; v += blockDim.x) {
        float d = 0.0f;
        if (v < V && w != 0.0f) {
            float p = expf(to_float(row[v]) - row_lse);
            d = w * (p - (v == target ? 1.0f : 0.0f));
        }
        row[v] = __float2bfloat16(d);
    }
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
        if (x > m) { s = s * expf(m - x) + 1.0f; m = x; }
        else s += expf(x - m);
    }
    float row_max = block_max(m, shared);
    float scaled = m == -INFINITY ? 0.0f : s * expf(m - row_max);
    float row_sum = block_sum(scaled, shared);
    float row_lse = row_max + logf(row_sum);
    if (threadIdx.x == 0) {
        lse[n] = row_lse;
        if (targets) losses[n] = active ? row_lse - target_logit : 0.0f;
    }
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

#define CLASSIFIER_BLOCK 512

static inline void fused_classifier(floatX *logits, float *lse, float *losses, const int *targets,
                                    const float *mask, const float *weights, int N, int V, int Vp,
                                    cudaStream_t stream) {
    cudaRequire(V >= 1 && V <= Vp, "fused_classifier: need 1 <= V <= Vp");
    cudaRequire(weights == NULL || targets != NULL, "fused_classifier: a gradient needs targets");
    fused_classifier_kernel<<<N, CLASSIFIER_BLOCK, 0, stream>>>(logits, lse, losses, targets, mask, weights, V, Vp);
    cudaCheckLaunch();
}
static inline void classifier_backward(floatX *logits, const float *lse, const int *targets, const float *weights,
                                       int N, int V, int Vp, cudaStream_t stream) {
    classifier_backward_kernel<<<N, CLASSIFIER_BLOCK, 0, stream>>>(logits, lse, targets, weights, V, Vp);
    cudaCheckLaunch();
}
#endif
