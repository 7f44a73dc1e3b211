/*
 * AdamW on the GPU over fp32 master weights, with the bf16 copy that the forward reads refreshed
 * in the same pass. Same update as model_adamw_update in model.c (PyTorch semantics), step t:
 *   g = grad * grad_scale
 *   m = beta1 m + (1 - beta1) g,   v = beta2 v + (1 - beta2) g^2
 *   p = p * decay - lr * (m / bc1) / (sqrt(v / bc2) + eps),  decay = 1 - lr * wd on decayed tensors
 * with bc1 = 1 - beta1^t, bc2 = 1 - beta2^t computed on the host in double.
 */
#ifndef LLMC_ADAMW_CUH
#define LLMC_ADAMW_CUH
#include "cuda_common.h"

__global__ void adamw_kernel(float *params, floatX *params_bf16, const float *grads, float *m, float *v, size_t n,
                             float lr, float beta1, float beta2, float bias_correction1, float bias_correction2,
                             float eps, float decay, float grad_scale) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float g = grads[i] * grad_scale;
        float mi = beta1 * m[i] + (1.0f - beta1) * g;
        float vi = beta2 * v[i] + (1.0f - beta2) * g * g;
        m[i] = mi;
        v[i] = vi;
        float m_hat = mi / bias_correction1, v_hat = vi / bias_correction2;
        float p = params[i] * decay - lr * m_hat / (sqrtf(v_hat) + eps);
        params[i] = p;
        params_bf16[i] = __float2bfloat16(p);
    }
}

// One tensor of n elements; decay = 1 - lr * weight_decay for decayed tensors, else 1.
static inline void adamw_update(float *params, floatX *params_bf16, const float *grads, float *m, float *v, size_t n,
                                float lr, float beta1, float beta2, float bias_correction1, float bias_correction2,
                                float eps, float decay, float grad_scale, cudaStream_t stream) {
    if (n == 0) return;
    size_t blocks = (n + 255) / 256;
    if (blocks > 8192) blocks = 8192;
    adamw_kernel<<<(int)blocks, 256, 0, stream>>>(params, params_bf16, grads, m, v, n, lr, beta1, beta2,
                                                  bias_correction1, bias_correction2, eps, decay, grad_scale);
    cudaCheckLaunch();
}
#endif
