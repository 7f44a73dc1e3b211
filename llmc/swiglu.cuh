/*
 * SwiGLU on the GPU: fc (N, 2F) holds gate in columns [0, F) and up in [F, 2F);
 *   out (N, F) = silu(gate) * up,  silu(g) = g * sigmoid(g)
 *   dgate = dout * up * sig(g) (1 + g (1 - sig(g))),  dup = dout * silu(gate)
 * bf16 storage, fp32 arithmetic. CPU reference: swiglu_forward / swiglu_backward in ops_cpu.c.
 */
#ifndef LLMC_SWIGLU_CUH
#define LLMC_SWIGLU_CUH
#include "cuda_common.h"

// one thread per output element (n, j)
__global__ void swiglu_forward_kernel(floatX *out, const floatX *fc, int N, int F) {
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)N * F) return;
    size_t n = idx / F, j = idx % F;
    float gate = to_float(fc[n * 2 * F + j]), up = to_float(fc[n * 2 * F + F + j]);
    float sig = 1.0f / (1.0f + expf(-gate));
    out[idx] = __float2bfloat16(gate * sig * up);
}

// dfc (N, 2F) written (not accumulated) from dout (N, F) and the forward's fc.
__global__ void swiglu_backward_kernel(floatX *dfc, const floatX *dout, const floatX *fc, int N, int F) {
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)N * F) return;
    size_t n = idx / F, j = idx % F;
    float gate = to_float(fc[n * 2 * F + j]), up = to_float(fc[n * 2 * F + F + j]);
    float g = to_float(dout[idx]);
    float sig = 1.0f / (1.0f + expf(-gate));
    dfc[n * 2 * F + j] = __float2bfloat16(g * up * sig * (1.0f + gate * (1.0f - sig)));
    dfc[n * 2 * F + F + j] = __float2bfloat16(g * gate * sig);
}

static inline void swiglu_forward(floatX *out, const floatX *fc, int N, int F, cudaStream_t stream) {
    size_t n = (size_t)N * F;
    swiglu_forward_kernel<<<ceil_div((long long)n, 256), 256, 0, stream>>>(out, fc, N, F);
    cudaCheckLaunch();
}
static inline void swiglu_backward(floatX *dfc, const floatX *dout, const floatX *fc, int N, int F, cudaStream_t stream) {
    size_t n = (size_t)N * F;
    swiglu_backward_kernel<<<ceil_div((long long)n, 256), 256, 0, stream>>>(dfc, dout, fc, N, F);
    cudaCheckLaunch();
}
#endif
