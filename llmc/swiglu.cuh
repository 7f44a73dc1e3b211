/*
 * SwiGLU on the GPU: fc (N, 2F) holds gate in columns [0, F) and up in [F, 2F);
 *   out (N, F) = silu(gate) * up,  silu(g) = g * sigmoid(g)
 *   dgate = dout * up * sig(g) (1 + g (1 - sig(g))),  dup = dout * silu(gate)
 * bf16 storage, fp32 arithmetic. CPU reference: swiglu_forward / swiglu_backward in ops_cpu.c.
 *
 * Two kernels per direction: the 8-wide ones move 8 consecutive columns (16 bytes of bf16) per
 * load and store, for F a multiple of 8 and buffers that start on 16 bytes (every model shape);
 * the scalar ones take one element per thread and are the fallback. Both compute each element
 * with the same fp32 expressions (the swiglu_* device functions), so their outputs are the same
 * bit for bit. swiglu_forward / swiglu_backward pick between them.
 */
#ifndef LLMC_SWIGLU_CUH
#define LLMC_SWIGLU_CUH
#include "cuda_common.h"
#include "vector_io.cuh"
#include "swiglu_math.cuh"   // the per-element math, shared by the scalar and the 8-wide kernels

#define SWIGLU_VEC 8

// One thread per output element (n, j): out[n, j] = silu(fc[n, j]) * fc[n, F + j].
__global__ void swiglu_forward_scalar_kernel(floatX *out, const floatX *fc, int N, int F) {
    griddep_wait();   // programmatic launches (cuda_common.h): the inputs are ready past here
    griddep_launch_dependents();
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)N * F) return;
    size_t n = idx / F, j = idx % F;
    float gate = to_float(fc[n * 2 * F + j]), up = to_float(fc[n * 2 * F + F + j]);
    out[idx] = __float2bfloat16(swiglu_out(gate, up));
}

// One thread per (row n, group of 8 columns j..j+7): the forward with one 16-byte load of gate,
// one of up and one 16-byte store of out. F % 8 == 0, buffers 16-byte aligned, N * F / 8 < 2^31.
__global__ void swiglu_forward_vec8_kernel(floatX *out, const floatX *fc, int N, int F) {
    griddep_wait();   // programmatic launches (cuda_common.h): the inputs are ready past here
    griddep_launch_dependents();
    int groups = F / SWIGLU_VEC;
    int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= N * groups) return;
    int n = idx / groups, j = (idx - n * groups) * SWIGLU_VEC;
    const floatX *fc_row = fc + (size_t)n * 2 * F;
    float gate[SWIGLU_VEC], up[SWIGLU_VEC], o[SWIGLU_VEC];
    load_vec<SWIGLU_VEC>(gate, fc_row + j);
    load_vec<SWIGLU_VEC>(up, fc_row + F + j);
#pragma unroll
    for (int k = 0; k < SWIGLU_VEC; k++) o[k] = swiglu_out(gate[k], up[k]);
    store_vec<SWIGLU_VEC>(out + (size_t)n * F + j, o);
}

// One thread per element (n, j): dfc (N, 2F) written (not accumulated) from dout (N, F) and the
// forward's fc.
__global__ void swiglu_backward_scalar_kernel(floatX *dfc, const floatX *dout, const floatX *fc, int N, int F) {
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)N * F) return;
    size_t n = idx / F, j = idx % F;
    float gate = to_float(fc[n * 2 * F + j]), up = to_float(fc[n * 2 * F + F + j]);
    float dgate, dup;
    swiglu_grad(gate, up, to_float(dout[idx]), &dgate, &dup);
    dfc[n * 2 * F + j] = __float2bfloat16(dgate);
    dfc[n * 2 * F + F + j] = __float2bfloat16(dup);
}

// One thread per (row n, group of 8 columns j..j+7): the backward with 16-byte loads of gate,
// up and dout and 16-byte stores of dgate and dup. Same preconditions as the forward's.
__global__ void swiglu_backward_vec8_kernel(floatX *dfc, const floatX *dout, const floatX *fc, int N, int F) {
    int groups = F / SWIGLU_VEC;
    int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= N * groups) return;
    int n = idx / groups, j = (idx - n * groups) * SWIGLU_VEC;
    const floatX *fc_row = fc + (size_t)n * 2 * F;
    float gate[SWIGLU_VEC], up[SWIGLU_VEC], g[SWIGLU_VEC], dgate[SWIGLU_VEC], dup[SWIGLU_VEC];
    load_vec<SWIGLU_VEC>(gate, fc_row + j);
    load_vec<SWIGLU_VEC>(up, fc_row + F + j);
    load_vec<SWIGLU_VEC>(g, dout + (size_t)n * F + j);
#pragma unroll
    for (int k = 0; k < SWIGLU_VEC; k++) swiglu_grad(gate[k], up[k], g[k], &dgate[k], &dup[k]);
    floatX *dfc_row = dfc + (size_t)n * 2 * F;
    store_vec<SWIGLU_VEC>(dfc_row + j, dgate);
    store_vec<SWIGLU_VEC>(dfc_row + F + j, dup);
}

// Whether the 8-wide kernels apply: F a multiple of 8, every buffer on 16 bytes (then every row
// is too), and a thread count that fits their 32-bit index.
static inline int swiglu_vectorized(const void *a, const void *b, const void *c, int N, int F) {
    return F % SWIGLU_VEC == 0 && (((uintptr_t)a | (uintptr_t)b | (uintptr_t)c) & 15) == 0 &&
           (size_t)N * (F / SWIGLU_VEC) <= 0x7fffffff;
}

// the kernels by name (the harness and the emulator test run both), then the pick
static inline void swiglu_forward_scalar(floatX *out, const floatX *fc, int N, int F, cudaStream_t stream) {
    size_t n = (size_t)N * F;
    if (n == 0) return;
    swiglu_forward_scalar_kernel<<<ceil_div((long long)n, 256), 256, 0, stream>>>(out, fc, N, F);
    cudaCheckLaunch();
}
static inline void swiglu_forward_vec8(floatX *out, const floatX *fc, int N, int F, cudaStream_t stream) {
    cudaRequire(swiglu_vectorized(out, fc, fc, N, F), "swiglu_forward_vec8: F must be a multiple of 8 and the buffers start on 16 bytes");
    size_t n = (size_t)N * (F / SWIGLU_VEC);
    if (n == 0) return;
    swiglu_forward_vec8_kernel<<<ceil_div((long long)n, 256), 256, 0, stream>>>(out, fc, N, F);
    cudaCheckLaunch();
}
static inline void swiglu_forward(floatX *out, const floatX *fc, int N, int F, cudaStream_t stream) {
    if (swiglu_vectorized(out, fc, fc, N, F)) swiglu_forward_vec8(out, fc, N, F, stream);
    else swiglu_forward_scalar(out, fc, N, F, stream);
}
static inline void swiglu_backward_scalar(floatX *dfc, const floatX *dout, const floatX *fc, int N, int F, cudaStream_t stream) {
    size_t n = (size_t)N * F;
    if (n == 0) return;
    swiglu_backward_scalar_kernel<<<ceil_div((long long)n, 256), 256, 0, stream>>>(dfc, dout, fc, N, F);
    cudaCheckLaunch();
}
static inline void swiglu_backward_vec8(floatX *dfc, const floatX *dout, const floatX *fc, int N, int F, cudaStream_t stream) {
    cudaRequire(swiglu_vectorized(dfc, dout, fc, N, F), "swiglu_backward_vec8: F must be a multiple of 8 and the buffers start on 16 bytes");
    size_t n = (size_t)N * (F / SWIGLU_VEC);
    if (n == 0) return;
    swiglu_backward_vec8_kernel<<<ceil_div((long long)n, 256), 256, 0, stream>>>(dfc, dout, fc, N, F);
    cudaCheckLaunch();
}
static inline void swiglu_backward(floatX *dfc, const floatX *dout, const floatX *fc, int N, int F, cudaStream_t stream) {
    if (swiglu_vectorized(dfc, dout, fc, N, F)) swiglu_backward_vec8(dfc, dout, fc, N, F, stream);
    else swiglu_backward_scalar(dfc, dout, fc, N, F, stream);
}
// The decode step's SwiGLU with the rows' RMSNorm folded in (the rollout engine's fold_norms:
// the MLP's fc product ran on the residual stream x (N, C) with the norm's weight w folded into
// its own, so its gate and up are the normed rows' divided by the row's factor rstd): one block
// per row n, rstd = 1 / sqrt(mean_c x[n, c]^2 + eps), out[n, j] = silu(rstd gate) * (rstd up),
// the same per-element math (swiglu_out) as the kernels above.
#define SWIGLU_NORM_THREADS 256
__global__ void __launch_bounds__(SWIGLU_NORM_THREADS)
swiglu_forward_rownorm_kernel(floatX *out, const floatX *fc, const floatX *x, int F, int C, float eps) {
    griddep_wait();   // programmatic launches (cuda_common.h): the inputs are ready past here
    griddep_launch_dependents();
    __shared__ float swiglu_norm_partials[32];
    int n = blockIdx.x;
    const floatX *xr = x + (size_t)n * C;
    float sq = 0.0f;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        float v = to_float(xr[c]);
        sq += v * v;
    }
    float rstd = rsqrtf(block_sum(sq, swiglu_norm_partials) / C + eps);
    const floatX *row = fc + (size_t)n * 2 * F;
    for (int j = threadIdx.x; j < F; j += blockDim.x)
        out[(size_t)n * F + j] = __float2bfloat16(swiglu_out(rstd * to_float(row[j]), rstd * to_float(row[F + j])));
}
static inline void swiglu_forward_rownorm(floatX *out, const floatX *fc, const floatX *x, int N, int F, int C, float eps,
                                          cudaStream_t stream) {
    cudaRequire(N >= 1 && F >= 1 && C >= 1, "swiglu_forward_rownorm: N, F and C must be positive");
    swiglu_forward_rownorm_kernel<<<N, SWIGLU_NORM_THREADS, 0, stream>>>(out, fc, x, F, C, eps);
    cudaCheckLaunch();
}
#endif
