/*
 * AdamW on the GPU over fp32 master weights, with the bf16 copy that the forward reads refreshed
 * in the same pass. Same update as model_adamw_update in model.c (PyTorch semantics), step t:
 *   g = grad * grad_scale
 *   m = beta1 m + (1 - beta1) g,   v = beta2 v + (1 - beta2) g^2
 *   p = p * decay - lr * (m / bc1) / (sqrt(v / bc2) + eps),  decay = 1 - lr * wd on decayed tensors
 * with bc1 = 1 - beta1^t, bc2 = 1 - beta2^t computed on the host in double.
 *
 * Two kernels, one element's arithmetic (adamw_element): the scalar one moves each element with
 * 4-byte accesses; the 4-wide one moves four consecutive elements with 16-byte accesses to the
 * fp32 arrays and one 8-byte store of their bf16 copies, for arrays that start on those bounds
 * (the elements past the last whole group of four go to the scalar kernel). AdamW reads and
 * writes 30 bytes a parameter and nothing else: it runs at the memory's speed, and wider
 * accesses are fewer instructions for the same bytes. adamw_update picks between them; both
 * give the same bits.
 */
#ifndef LLMC_ADAMW_CUH
#define LLMC_ADAMW_CUH
#include "cuda_common.h"
#include "vector_io.cuh"

#define ADAMW_VEC 4

// the update of one element, in place on p, m and v; returns the new parameter. The fused
// multiply-adds are spelled out (fmaf, and __fmul_rn where a product must stay rounded on its
// own), so that the compiler cannot contract the two kernels' copies differently.
__device__ __forceinline__ float adamw_element(float *p, float *m, float *v, float grad, float lr, float beta1,
                                               float beta2, float bias_correction1, float bias_correction2, float eps,
                                               float decay, float grad_scale) {
    float g = __fmul_rn(grad, grad_scale);
    float mi = fmaf(beta1, *m, __fmul_rn(1.0f - beta1, g));
    float vi = fmaf(beta2, *v, __fmul_rn(__fmul_rn(1.0f - beta2, g), g));
    *m = mi;
    *v = vi;
    float m_hat = mi / bias_correction1, v_hat = vi / bias_correction2;
    *p = fmaf(*p, decay, -(__fmul_rn(lr, m_hat) / (sqrtf(v_hat) + eps)));
    return *p;
}

__global__ void adamw_kernel(float *params, floatX *params_bf16, const float *grads, float *m, float *v, size_t n,
                             float lr, float beta1, float beta2, float bias_correction1, float bias_correction2,
                             float eps, float decay, float grad_scale) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float p = adamw_element(&params[i], &m[i], &v[i], grads[i], lr, beta1, beta2, bias_correction1,
                                bias_correction2, eps, decay, grad_scale);
        params_bf16[i] = __float2bfloat16(p);
    }
}

// groups of ADAMW_VEC elements: groups = n / ADAMW_VEC, the arrays on 16 bytes (params_bf16 on 8)
__global__ void adamw_vec4_kernel(float *params, floatX *params_bf16, const float *grads, float *m, float *v,
                                  size_t groups, float lr, float beta1, float beta2, float bias_correction1,
                                  float bias_correction2, float eps, float decay, float grad_scale) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < groups; i += (size_t)gridDim.x * blockDim.x) {
        size_t e = i * ADAMW_VEC;
        float p[ADAMW_VEC], g[ADAMW_VEC], mi[ADAMW_VEC], vi[ADAMW_VEC];
        load_vec<ADAMW_VEC>(p, params + e);
        load_vec<ADAMW_VEC>(g, grads + e);
        load_vec<ADAMW_VEC>(mi, m + e);
        load_vec<ADAMW_VEC>(vi, v + e);
#pragma unroll
        for (int k = 0; k < ADAMW_VEC; k++)
            adamw_element(&p[k], &mi[k], &vi[k], g[k], lr, beta1, beta2, bias_correction1, bias_correction2, eps,
                          decay, grad_scale);
        store_vec<ADAMW_VEC>(params + e, p);
        store_vec<ADAMW_VEC>(m + e, mi);
        store_vec<ADAMW_VEC>(v + e, vi);
        store_vec<ADAMW_VEC>(params_bf16 + e, p);
    }
}

// grid-strided launches of at most 8192 blocks of 256 threads. The kernels stride over the whole
// array, so the cap changes which thread takes an element, not the result; 8192 blocks are about
// eight times what a GPU runs at once (an H100: 132 SMs x 8 blocks of 256 threads = 1056), so
// the cap does not idle SMs either. Beyond it (GPT-2 124M's parameters in groups of four: 121K
// blocks uncapped) each thread takes several groups.
static inline int adamw_blocks(size_t threads) {
    size_t blocks = (threads + 255) / 256;
    return (int)(blocks > 8192 ? 8192 : blocks);
}

// the kernels by name (the harness and the emulator test run both), then the pick
static inline void adamw_update_scalar(float *params, floatX *params_bf16, const float *grads, float *m, float *v,
                                       size_t n, float lr, float beta1, float beta2, float bias_correction1,
                                       float bias_correction2, float eps, float decay, float grad_scale,
                                       cudaStream_t stream) {
    if (n == 0) return;
    adamw_kernel<<<adamw_blocks(n), 256, 0, stream>>>(params, params_bf16, grads, m, v, n, lr, beta1, beta2,
                                                      bias_correction1, bias_correction2, eps, decay, grad_scale);
    cudaCheckLaunch();
}
static inline bool adamw_vectorized(const float *params, const floatX *params_bf16, const float *grads, const float *m,
                                    const float *v) {
    return vector_aligned(params, 16) && vector_aligned(grads, 16) && vector_aligned(m, 16) && vector_aligned(v, 16) &&
           vector_aligned(params_bf16, 8);
}
// the whole groups of four with the 4-wide kernel, the rest (fewer than four) with the scalar one
static inline void adamw_update_vec4(float *params, floatX *params_bf16, const float *grads, float *m, float *v,
                                     size_t n, float lr, float beta1, float beta2, float bias_correction1,
                                     float bias_correction2, float eps, float decay, float grad_scale,
                                     cudaStream_t stream) {
    cudaRequire(adamw_vectorized(params, params_bf16, grads, m, v),
                "adamw_vec4: the fp32 arrays must start on 16 bytes and the bf16 copy on 8");
    size_t groups = n / ADAMW_VEC, done = groups * ADAMW_VEC;
    if (groups) {
        adamw_vec4_kernel<<<adamw_blocks(groups), 256, 0, stream>>>(params, params_bf16, grads, m, v, groups, lr, beta1,
                                                                    beta2, bias_correction1, bias_correction2, eps,
                                                                    decay, grad_scale);
        cudaCheckLaunch();
    }
    adamw_update_scalar(params + done, params_bf16 + done, grads + done, m + done, v + done, n - done, lr, beta1, beta2,
                        bias_correction1, bias_correction2, eps, decay, grad_scale, stream);
}

// One tensor of n elements; decay = 1 - lr * weight_decay for decayed tensors, else 1.
static inline void adamw_update(float *params, floatX *params_bf16, const float *grads, float *m, float *v, size_t n,
                                float lr, float beta1, float beta2, float bias_correction1, float bias_correction2,
                                float eps, float decay, float grad_scale, cudaStream_t stream) {
    if (adamw_vectorized(params, params_bf16, grads, m, v))
        adamw_update_vec4(params, params_bf16, grads, m, v, n, lr, beta1, beta2, bias_correction1, bias_correction2,
                          eps, decay, grad_scale, stream);
    else
        adamw_update_scalar(params, params_bf16, grads, m, v, n, lr, beta1, beta2, bias_correction1, bias_correction2,
                            eps, decay, grad_scale, stream);
}
#endif
