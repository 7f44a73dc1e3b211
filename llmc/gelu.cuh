/*
 * GELU (tanh approximation, GPT-2) on the GPU, forward and backward over n elements in bf16 with
 * fp32 arithmetic. CPU reference: gelu_forward / gelu_backward in ops_cpu.c.
 *   gelu(x)  = 0.5 x (1 + tanh(u)),  u = sqrt(2/pi) (x + 0.044715 x^3)
 *   gelu'(x) = 0.5 (1 + tanh(u)) + 0.5 x (1 - tanh(u)^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2)
 * The model normally gets the forward from the cuBLASLt GELU epilogue (matmul.cuh); this kernel
 * is the fallback and the reference for that epilogue.
 *
 * Two kernels per direction: the 8-wide ones move 8 consecutive elements (16 bytes of bf16) per
 * load and store, for n a multiple of 8 and buffers on 16 bytes; the scalar ones are the
 * fallback. Both compute each element with the same fp32 expressions (gelu_value, gelu_grad),
 * so their outputs are the same bit for bit. gelu_forward / gelu_backward pick between them.
 */
#ifndef LLMC_GELU_CUH
#define LLMC_GELU_CUH
#include "cuda_common.h"
#include "vector_io.cuh"

#define GELU_SCALING_FACTOR 0.7978845608028654f   // sqrt(2 / pi)
#define GELU_VEC 8

// the per-element math, shared by the scalar and the 8-wide kernels
__device__ __forceinline__ float gelu_value(float x) {
    float cube = 0.044715f * x * x * x;
    return 0.5f * x * (1.0f + tanhf(GELU_SCALING_FACTOR * (x + cube)));
}
__device__ __forceinline__ float gelu_grad(float x) {
    float u = GELU_SCALING_FACTOR * (x + 0.044715f * x * x * x);
    float th = tanhf(u);
    return 0.5f * (1.0f + th) + 0.5f * x * (1.0f - th * th) * GELU_SCALING_FACTOR * (1.0f + 3.0f * 0.044715f * x * x);
}

// out (n) = gelu(inp), one element per thread and grid-stride step.
__global__ void gelu_forward_scalar_kernel(floatX *out, const floatX *inp, size_t n) {
    griddep_wait();   // programmatic launches (cuda_common.h): the inputs are ready past here
    griddep_launch_dependents();
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        out[i] = __float2bfloat16(gelu_value(to_float(inp[i])));
}

// out (n) = gelu(inp), 8 consecutive elements (one 16-byte load and store) per thread and
// grid-stride step. n % 8 == 0, buffers on 16 bytes.
__global__ void gelu_forward_vec8_kernel(floatX *out, const floatX *inp, size_t n) {
    griddep_wait();   // programmatic launches (cuda_common.h): the inputs are ready past here
    griddep_launch_dependents();
    size_t groups = n / GELU_VEC;
    for (size_t g = (size_t)blockIdx.x * blockDim.x + threadIdx.x; g < groups; g += (size_t)gridDim.x * blockDim.x) {
        float x[GELU_VEC], y[GELU_VEC];
        load_vec<GELU_VEC>(x, inp + g * GELU_VEC);
#pragma unroll
        for (int k = 0; k < GELU_VEC; k++) y[k] = gelu_value(x[k]);
        store_vec<GELU_VEC>(out + g * GELU_VEC, y);
    }
}

// dinp (n) = gelu'(inp) * dout, one element per thread and grid-stride step. Written, not
// accumulated (the model's buffer holds nothing else); dinp may alias dout.
__global__ void gelu_backward_scalar_kernel(floatX *dinp, const floatX *inp, const floatX *dout, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        dinp[i] = __float2bfloat16(gelu_grad(to_float(inp[i])) * to_float(dout[i]));
}

// dinp (n) = gelu'(inp) * dout, 8 consecutive elements per thread and grid-stride step: 16-byte
// loads of inp and dout, then a 16-byte store of dinp (which may alias dout: each thread reads
// its 8 elements before it writes them). n % 8 == 0, buffers on 16 bytes.
__global__ void gelu_backward_vec8_kernel(floatX *dinp, const floatX *inp, const floatX *dout, size_t n) {
    size_t groups = n / GELU_VEC;
    for (size_t g = (size_t)blockIdx.x * blockDim.x + threadIdx.x; g < groups; g += (size_t)gridDim.x * blockDim.x) {
        float x[GELU_VEC], d[GELU_VEC], y[GELU_VEC];
        load_vec<GELU_VEC>(x, inp + g * GELU_VEC);
        load_vec<GELU_VEC>(d, dout + g * GELU_VEC);
#pragma unroll
        for (int k = 0; k < GELU_VEC; k++) y[k] = gelu_grad(x[k]) * d[k];
        store_vec<GELU_VEC>(dinp + g * GELU_VEC, y);
    }
}

// Blocks of 256 threads for n grid-stride items: one item a thread up to 65536 blocks (16M items),
// past which the kernels' grid-stride loops give each thread several. The cap does not change the
// result, and is far above the blocks a GPU runs at once (an H100 1056 of 256 threads), so it
// does not idle SMs; at least one block, so that n = 0 is still a valid launch.
static inline int elementwise_blocks(size_t n) {
    size_t blocks = (n + 255) / 256;
    return (int)(blocks < 65536 ? (blocks ? blocks : 1) : 65536);
}
// Whether the 8-wide kernels apply: n a multiple of 8 and every buffer on 16 bytes.
static inline int gelu_vectorized(const void *a, const void *b, const void *c, size_t n) {
    return n % GELU_VEC == 0 && (((uintptr_t)a | (uintptr_t)b | (uintptr_t)c) & 15) == 0;
}

// the kernels by name (the harness and the emulator test run both), then the pick
static inline void gelu_forward_scalar(floatX *out, const floatX *inp, size_t n, cudaStream_t stream) {
    gelu_forward_scalar_kernel<<<elementwise_blocks(n), 256, 0, stream>>>(out, inp, n);
    cudaCheckLaunch();
}
static inline void gelu_forward_vec8(floatX *out, const floatX *inp, size_t n, cudaStream_t stream) {
    cudaRequire(gelu_vectorized(out, inp, inp, n), "gelu_forward_vec8: n must be a multiple of 8 and the buffers start on 16 bytes");
    gelu_forward_vec8_kernel<<<elementwise_blocks(n / GELU_VEC), 256, 0, stream>>>(out, inp, n);
    cudaCheckLaunch();
}
static inline void gelu_forward(floatX *out, const floatX *inp, size_t n, cudaStream_t stream) {
    if (gelu_vectorized(out, inp, inp, n)) gelu_forward_vec8(out, inp, n, stream);
    else gelu_forward_scalar(out, inp, n, stream);
}
static inline void gelu_backward_scalar(floatX *dinp, const floatX *inp, const floatX *dout, size_t n, cudaStream_t stream) {
    gelu_backward_scalar_kernel<<<elementwise_blocks(n), 256, 0, stream>>>(dinp, inp, dout, n);
    cudaCheckLaunch();
}
static inline void gelu_backward_vec8(floatX *dinp, const floatX *inp, const floatX *dout, size_t n, cudaStream_t stream) {
    cudaRequire(gelu_vectorized(dinp, inp, dout, n), "gelu_backward_vec8: n must be a multiple of 8 and the buffers start on 16 bytes");
    gelu_backward_vec8_kernel<<<elementwise_blocks(n / GELU_VEC), 256, 0, stream>>>(dinp, inp, dout, n);
    cudaCheckLaunch();
}
static inline void gelu_backward(floatX *dinp, const floatX *inp, const floatX *dout, size_t n, cudaStream_t stream) {
    if (gelu_vectorized(dinp, inp, dout, n)) gelu_backward_vec8(dinp, inp, dout, n, stream);
    else gelu_backward_scalar(dinp, inp, dout, n, stream);
}
#endif
