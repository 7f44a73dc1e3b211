/*
 * LayerNorm (GPT-2) and RMSNorm (Llama) on the GPU, forward fused with the residual add that
 * precedes every norm in the model, and backward. CPU reference: layernorm_* / rmsnorm_* and
 * residual_forward in ops_cpu.c.
 *
 * Layout: the residual stream is fp32 (N, C); the norm output is bf16 (N, C) because it only
 * feeds a matrix product; mean and rstd are fp32 (N). One warp normalises one row, so a row is
 * read from memory once and re-read from L1 for the second and third passes; for few rows (the
 * decode step) one block normalises one row from registers.
 *
 * Fusion: the model computes x = residual + branch and then norm(x) at every block boundary;
 * doing both in one kernel saves writing x and reading it back (the write of x is kept: the
 * backward needs it).
 */
#ifndef LLMC_LAYERNORM_CUH
#define LLMC_LAYERNORM_CUH
#include "cuda_common.h"

// One warp per row n < N:
//   x = res_in[n] (+ branch[n] when branch is not NULL, then also stored to res_out[n])
//   LayerNorm (bias != NULL or is_layernorm): out = (x - mean) * rstd * weight + bias
//   RMSNorm  (is_layernorm == 0):            out = x * rstd * weight
// mean (N) is written for LayerNorm only (may be NULL for RMSNorm); rstd (N) always.
__global__ void residual_norm_forward_kernel(float *res_out, floatX *out, float *mean, float *rstd,
                                             const float *res_in, const floatX *branch,
                                             const floatX *weight, const floatX *bias,
                                             int N, int C, float eps, int is_layernorm) {
    int warps_per_block = blockDim.x / 32;
    int n = blockIdx.x * warps_per_block + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (n >= N) return;
    const float *x_in = res_in + (size_t)n * C;
    const float *x = x_in;
    if (branch) {
        const floatX *br = branch + (size_t)n * C;
        float *x_out = res_out + (size_t)n * C;
        for (int c = lane; c < C; c += 32) x_out[c] = x_in[c] + to_float(br[c]);
        __syncwarp();   // the lanes read each other's writes of x below
        x = x_out;
    }
    float m = 0.0f;
    if (is_layernorm) {
        float sum = 0.0f;
        for (int c = lane; c < C; c += 32) sum += x[c];
        m = warp_sum(sum) / C;
    }
    float sq = 0.0f;
    for (int c = lane; c < C; c += 32) { float d = x[c] - m; sq += d * d; }
    float s = rsqrtf(warp_sum(sq) / C + eps);
    floatX *y = out + (size_t)n * C;
    for (int c = lane; c < C; c += 32) {
        float v = (x[c] - m) * s * to_float(weight[c]);
        if (bias) v += to_float(bias[c]);
        y[c] = __float2bfloat16(v);
    }
    if (lane == 0) {
        if (mean) mean[n] = m;
        rstd[n] = s;
    }
}

// The same with one block of NORM_ROW_THREADS threads per row, each thread holding its (at most
// NORM_ROW_MAX_PER_THREAD) elements of the row in registers: for few rows (decoding: one row per
// sequence), where one warp per row leaves most of the GPU idle and each warp waits on one load
// after another through its three passes.
#define NORM_ROW_THREADS 256
#define NORM_ROW_MAX_PER_THREAD 8
__global__ void __launch_bounds__(NORM_ROW_THREADS)
residual_norm_forward_row_kernel(float *res_out, floatX *out, float *mean, float *rstd, const float *res_in,
                                 const floatX *branch, const floatX *weight, const floatX *bias,
                                 int N, int C, float eps, int is_layernorm) {
    __shared__ float shared[32];
    size_t row = (size_t)blockIdx.x * C;
    float v[NORM_ROW_MAX_PER_THREAD];
    float sum = 0.0f;
#pragma unroll
    for (int k = 0; k < NORM_ROW_MAX_PER_THREAD; k++) {
        int c = threadIdx.x + k * NORM_ROW_THREADS;
        v[k] = 0.0f;
        if (c < C) {
            float x = res_in[row + c];
            if (branch) {
                x += to_float(branch[row + c]);
                res_out[row + c] = x;
            }
            v[k] = x;
            sum += x;
        }
    }
    float m = is_layernorm ? block_sum(sum, shared) / C : 0.0f;
    float sq = 0.0f;
#pragma unroll
    for (int k = 0; k < NORM_ROW_MAX_PER_THREAD; k++) {
        int c = threadIdx.x + k * NORM_ROW_THREADS;
        if (c < C) sq += (v[k] - m) * (v[k] - m);
    }
    float s = rsqrtf(block_sum(sq, shared) / C + eps);
#pragma unroll
    for (int k = 0; k < NORM_ROW_MAX_PER_THREAD; k++) {
        int c = threadIdx.x + k * NORM_ROW_THREADS;
        if (c < C) {
            float y = (v[k] - m) * s * to_float(weight[c]);
            if (bias) y += to_float(bias[c]);
            out[row + c] = __float2bfloat16(y);
        }
    }
    if (threadIdx.x == 0) {
        if (mean) mean[blockIdx.x] = m;
        rstd[blockIdx.x] = s;
    }
}

// res_out = res_in + branch (branch may be NULL: then res_out is not written and the norm reads
// res_in); out = norm(res_out). res_out must not alias res_in when branch is given.
// residual_norm_forward picks the kernel: a block per row below NORM_ROW_KERNEL_MAX_ROWS rows
// (when C fits the block's registers), a warp per row above, where the warps fill the GPU.
#define NORM_ROW_KERNEL_MAX_ROWS 4096
static inline void residual_norm_forward_check(const float *res_out, const float *mean, const float *res_in,
                                               const floatX *branch, int is_layernorm) {
    cudaRequire(!branch || res_out != res_in, "residual_norm_forward: res_out aliases res_in");
    cudaRequire(!is_layernorm || mean != NULL, "residual_norm_forward: LayerNorm needs mean");
}
static inline void residual_norm_forward_warps(float *res_out, floatX *out, float *mean, float *rstd,
                                               const float *res_in, const floatX *branch,
                                               const floatX *weight, const floatX *bias,
                                               int N, int C, float eps, int is_layernorm, cudaStream_t stream) {
    residual_norm_forward_check(res_out, mean, res_in, branch, is_layernorm);
    const int block = 256, rows_per_block = block / 32;
    residual_norm_forward_kernel<<<ceil_div(N, rows_per_block), block, 0, stream>>>(
        res_out, out, mean, rstd, res_in, branch, weight, bias, N, C, eps, is_layernorm);
    cudaCheckLaunch();
}
static inline void residual_norm_forward_rows(float *res_out, floatX *out, float *mean, float *rstd,
                                              const float *res_in, const floatX *branch,
                                              const floatX *weight, const floatX *bias,
                                              int N, int C, float eps, int is_layernorm, cudaStream_t stream) {
    residual_norm_forward_check(res_out, mean, res_in, branch, is_layernorm);
    cudaRequire(C <= NORM_ROW_THREADS * NORM_ROW_MAX_PER_THREAD, "residual_norm_forward_rows: C too large for a block");
    residual_norm_forward_row_kernel<<<N, NORM_ROW_THREADS, 0, stream>>>(
        res_out, out, mean, rstd, res_in, branch, weight, bias, N, C, eps, is_layernorm);
    cudaCheckLaunch();
}
static inline void residual_norm_forward(float *res_out, floatX *out, float *mean, float *rstd,
                                         const float *res_in, const floatX *branch,
                                         const floatX *weight, const floatX *bias,
                                         int N, int C, float eps, int is_layernorm, cudaStream_t stream) {
    if (N < NORM_ROW_KERNEL_MAX_ROWS && C <= NORM_ROW_THREADS * NORM_ROW_MAX_PER_THREAD)
        residual_norm_forward_rows(res_out, out, mean, rstd, res_in, branch, weight, bias, N, C, eps, is_layernorm, stream);
    else
        residual_norm_forward_warps(res_out, out, mean, rstd, res_in, branch, weight, bias, N, C, eps, is_layernorm, stream);
}

// Backward for dinp, one warp per row. With norm = (x - mean) * rstd (mean = 0 for RMSNorm) and
// dnorm = dout * weight:
//   LayerNorm: dx = rstd * (dnorm - mean_c(dnorm) - norm * mean_c(dnorm * norm))
//   RMSNorm:   dx = rstd * (dnorm - norm * mean_c(dnorm * norm))
// (the RMSNorm form equals ops_cpu.c's rstd * (dnorm - x * rstd^2 * mean_c(dnorm * x))).
// dres (N, C) fp32 += dx; dres_bf16 (N, C) gets a bf16 copy of the new dres for the next
// matrix product (may be NULL).
__global__ void norm_backward_dinp_kernel(float *dres, floatX *dres_bf16, const float *dout, const float *inp,
                                          const floatX *weight, const float *mean, const float *rstd,
                                          int N, int C, int is_layernorm) {
    int warps_per_block = blockDim.x / 32;
    int n = blockIdx.x * warps_per_block + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (n >= N) return;
    const float *x = inp + (size_t)n * C, *g = dout + (size_t)n * C;
    float m = is_layernorm ? mean[n] : 0.0f, s = rstd[n];
    float dnorm_sum = 0.0f, dnorm_norm_sum = 0.0f;
    for (int c = lane; c < C; c += 32) {
        float norm = (x[c] - m) * s, dnorm = to_float(weight[c]) * g[c];
        dnorm_sum += dnorm;
        dnorm_norm_sum += dnorm * norm;
    }
    float dnorm_mean = is_layernorm ? warp_sum(dnorm_sum) / C : 0.0f;
    float dnorm_norm_mean = warp_sum(dnorm_norm_sum) / C;
    float *dx = dres + (size_t)n * C;
    floatX *dx_bf16 = dres_bf16 ? dres_bf16 + (size_t)n * C : NULL;
    for (int c = lane; c < C; c += 32) {
        float norm = (x[c] - m) * s, dnorm = to_float(weight[c]) * g[c];
        float updated = dx[c] + s * (dnorm - dnorm_mean - norm * dnorm_norm_mean);
        dx[c] = updated;
        if (dx_bf16) dx_bf16[c] = __float2bfloat16(updated);
    }
}

// Partial sums for dweight and dbias over one chunk of rows: block (32, 8), blockIdx.x a slab of
// 32 channels, blockIdx.y a chunk of COLUMN_CHUNK_ROWS rows.
//   partial_w[chunk, c] = sum over the chunk's rows of dout * norm,  partial_b[chunk, c] = sum of dout
// partial_b may be NULL (RMSNorm has no bias).
__global__ void norm_backward_dweight_partial_kernel(float *partial_w, float *partial_b, const float *dout,
                                                     const float *inp, const float *mean, const float *rstd,
                                                     int N, int C, int is_layernorm) {
    __shared__ float sw[8][33], sb[8][33];
    int c = blockIdx.x * 32 + threadIdx.x;
    int row0 = blockIdx.y * COLUMN_CHUNK_ROWS;
    int row1 = min(row0 + COLUMN_CHUNK_ROWS, N);
    float acc_w = 0.0f, acc_b = 0.0f;
    if (c < C) {
        for (int n = row0 + threadIdx.y; n < row1; n += 8) {
            float m = is_layernorm ? mean[n] : 0.0f;
            float g = dout[(size_t)n * C + c];
            acc_w += g * (inp[(size_t)n * C + c] - m) * rstd[n];
            acc_b += g;
        }
    }
    sw[threadIdx.y][threadIdx.x] = acc_w;
    sb[threadIdx.y][threadIdx.x] = acc_b;
    __syncthreads();
    if (threadIdx.y == 0 && c < C) {
        float w = 0.0f, b = 0.0f;
        for (int k = 0; k < 8; k++) { w += sw[k][threadIdx.x]; b += sb[k][threadIdx.x]; }
        partial_w[(size_t)blockIdx.y * C + c] = w;
        if (partial_b) partial_b[(size_t)blockIdx.y * C + c] = b;
    }
}

// Full norm backward: dres (N, C) += dinp (and dres_bf16 = bf16(dres)), dweight (C) += ...,
// dbias (C) += ... (LayerNorm only; NULL for RMSNorm). dout (N, C) fp32 is the gradient at the
// norm's output, inp (N, C) fp32 its input. scratch holds 2 * column_chunks(N) * C floats.
static inline void norm_backward(float *dres, floatX *dres_bf16, float *dweight, float *dbias,
                                 const float *dout, const float *inp, const floatX *weight,
                                 const float *mean, const float *rstd, float *scratch,
                                 int N, int C, int is_layernorm, cudaStream_t stream) {
    cudaRequire(!is_layernorm || mean != NULL, "norm_backward: LayerNorm needs mean");
    const int block = 256, rows_per_block = block / 32;
    norm_backward_dinp_kernel<<<ceil_div(N, rows_per_block), block, 0, stream>>>(
        dres, dres_bf16, dout, inp, weight, mean, rstd, N, C, is_layernorm);
    cudaCheckLaunch();
    int chunks = column_chunks(N);
    float *partial_w = scratch, *partial_b = dbias ? scratch + (size_t)chunks * C : NULL;
    dim3 grid(ceil_div(C, 32), chunks), threads(32, 8);
    norm_backward_dweight_partial_kernel<<<grid, threads, 0, stream>>>(partial_w, partial_b, dout, inp,
                                                                        mean, rstd, N, C, is_layernorm);
    cudaCheckLaunch();
    column_partials_reduce(dweight, partial_w, chunks, C, stream);
    if (dbias) column_partials_reduce(dbias, partial_b, chunks, C, stream);
}
#endif
