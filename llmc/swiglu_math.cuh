/*
 * SwiGLU's per-element math in fp32, shared by the SwiGLU kernels (swiglu.cuh) and the decode
 * product that applies it to its input as it loads it (decode_matmul.cuh), so that both compute
 * each element with the same expressions:
 *   out = silu(gate) * up,  silu(g) = g * sigmoid(g)
 *   dgate = dout * up * sig(g) (1 + g (1 - sig(g))),  dup = dout * silu(gate)
 */
#ifndef LLMC_SWIGLU_MATH_CUH
#define LLMC_SWIGLU_MATH_CUH
#include <math.h>

__device__ __forceinline__ float swiglu_sigmoid(float gate) { return 1.0f / (1.0f + expf(-gate)); }
__device__ __forceinline__ float swiglu_out(float gate, float up) {
    float sig = swiglu_sigmoid(gate);
    return gate * sig * up;
}
__device__ __forceinline__ void swiglu_grad(float gate, float up, float g, float *dgate, float *dup) {
    float sig = swiglu_sigmoid(gate);
    *dgate = g * up * sig * (1.0f + gate * (1.0f - sig));
    *dup = g * gate * sig;
}
#endif
