/*
 * GELU (tanh approximation, GPT-2) on the GPU, forward and backward over n elements in bf16 with
 * fp32 arithmetic. CPU reference: gelu_forward / gelu_backward in ops_cpu.c.
 *   gelu(x)  = 0.5 x (1 + tanh(u)),  u = sqrt(2/pi) (x + 0.044715 x^3)
 *   gelu'(x) = 0.5 (1 + tanh(u)) + 0.5 x (1 - tanh(u)^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2)
 * The model normally gets the forward from the cuBLASLt GELU epilogue (matmul.cuh); this kernel
 * is the fallback and the reference for that epilogue.
 */
#ifndef LLMC_GELU_CUH
#define LLMC_GELU_CUH
#include "cuda_common.h"

#define GELU_SCALING_FACTOR 0.7978845608028654f   // sqrt(2 / pi)

__global__ void gelu_forward_kernel(floatX *out, const floatX *inp, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float x = to_float(inp[i]);
        float cube = 0.044715f * x * x * x;
        out[i] = __float2bfloat16(0.5f * x * (1.0f + tanhf(GELU_SCALING_FACTOR * (x + cube))));
    }
}

// dinp (n) = gelu'(inp) * dout. Written, not accumulated (the model's buffer holds nothing else);
// dinp may alias dout.
__global__ void gelu_backward_kernel(floatX *dinp, const floatX *inp, const floatX *dout, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float x = to_float(inp[i]);
        float u = GELU_SCALING_FACTOR * (x + 0.044715f * x * x * x);
        float th = tanhf(u);
        float local_grad = 0.5f * (1.0f + th) + 0.5f * x * (1.0f - th * th) * GELU_SCALING_FACTOR * (1.0f + 3.0f * 0.044715f * x * x);
        dinp[i] = __float2bfloat16(local_grad * to_float(dout[i]));
    }
}

static inline int elementwise_blocks(size_t n) {
    size_t blocks = (n + 255) / 256;
    return (int)(blocks < 65536 ? (blocks ? blocks : 1) : 65536);
}
static inline void gelu_forward(floatX *out, const floatX *inp, size_t n, cudaStream_t stream) {
    gelu_forward_kernel<<<elementwise_blocks(n), 256, 0, stream>>>(out, inp, n);
    cudaCheckLaunch();
}
static inline void gelu_backward(floatX *dinp, const floatX *inp, const floatX *dout, size_t n, cudaStream_t stream) {
    gelu_backward_kernel<<<elementwise_blocks(n), 256, 0, stream>>>(dinp, inp, dout, n);
    cudaCheckLaunch();
}
#endif
