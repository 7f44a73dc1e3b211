/*
 * LayerNorm (GPT-2) and RMSNorm (Llama) on the GPU, forward fused with the residual add that
 * precedes every norm in the model, and backward. CPU reference: layernorm_* / rmsnorm_* and
 * residual_forward in ops_cpu.c.
 *
 * Layout: the residual stream (N, C) is fp32 or bf16 (TR, a template parameter: the model picks,
 * model_cuda.cu); the norm output is bf16 (N, C) because it only feeds a matrix product; mean and
 * rstd are fp32 (N). With a bf16 stream the sum x = residual + branch is rounded to bf16 before
 * the norm's statistics, so the output is the norm of exactly the x that is stored (and that the
 * backward reads); the backward's residual gradient is then bf16 as well, rounded once per
 * element after the add, and the column sums add the rounded values.
 *
 * One warp normalises one row, holding the row in registers (read with vector loads) for rows
 * up to NORM_VEC_MAX_WIDTH wide; wider rows take a warp kernel that re-reads the row through L1;
 * for few rows (the decode step) one block normalises one row from registers.
 *
 * The backward is one kernel for rows up to NORM_VEC_MAX_WIDTH wide: a warp per row computes
 * the input gradient and accumulates the weight and bias gradients of its rows in shared memory,
 * so dout and the input are read once (the wider rows' fallback reads them twice, in two kernels).
 * dout, the gradient at the norm's output, may be fp32 or bf16 (the model passes bf16 for the
 * layers' norms: 16 bytes an element through a kernel bound by the memory's bandwidth, not 18).
 *
 * Fusion: the model computes x = residual + branch and then norm(x) at every block boundary;
 * doing both in one kernel saves writing x and reading it back (the write of x is kept: the
 * backward needs it).
 */
#ifndef LLMC_LAYERNORM_CUH
#define LLMC_LAYERNORM_CUH
#include "cuda_common.h"
#include "vector_io.cuh"
#include "column_reduce.cuh"

// One warp per row n < N:
//   x = res_in[n] (+ branch[n] when branch is not NULL, then also stored to res_out[n])
//   LayerNorm (is_layernorm):      out = (x - mean) * rstd * weight (+ bias when bias != NULL)
//   RMSNorm  (is_layernorm == 0):  out = x * rstd * weight (+ bias when bias != NULL)
// (is_layernorm alone decides whether the mean is subtracted; the bias is added whenever given)
// mean (N) is written for LayerNorm only (may be NULL for RMSNorm); rstd (N) always.
template <typename TR>
__global__ void residual_norm_forward_kernel(TR *res_out, floatX *out, float *mean, float *rstd,
                                             const TR *res_in, const floatX *branch,
                                             const floatX *weight, const floatX *bias,
                                             int N, int C, float eps, int is_layernorm) {
    griddep_wait();   // programmatic launches (cuda_common.h): the inputs are ready past here
    griddep_launch_dependents();
    int warps_per_block = blockDim.x / 32;
    int n = blockIdx.x * warps_per_block + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (n >= N) return;
    const TR *x_in = res_in + (size_t)n * C;
    const TR *x = x_in;
    if (branch) {
        const floatX *br = branch + (size_t)n * C;
        TR *x_out = res_out + (size_t)n * C;
        for (int c = lane; c < C; c += 32) x_out[c] = from_float<TR>(to_float(x_in[c]) + to_float(br[c]));
        __syncwarp();   // the lanes read each other's writes of x below
        x = x_out;
    }
    float m = 0.0f;
    if (is_layernorm) {
        float sum = 0.0f;
        for (int c = lane; c < C; c += 32) sum += to_float(x[c]);
        m = warp_sum(sum) / C;
    }
    float sq = 0.0f;
    for (int c = lane; c < C; c += 32) { float d = to_float(x[c]) - m; sq += d * d; }
    float s = rsqrtf(warp_sum(sq) / C + eps);
    floatX *y = out + (size_t)n * C;
    for (int c = lane; c < C; c += 32) {
        float v = (to_float(x[c]) - m) * s * to_float(weight[c]);
        if (bias) v += to_float(bias[c]);
        y[c] = __float2bfloat16(v);
    }
    if (lane == 0) {
        if (mean) mean[n] = m;
        rstd[n] = s;
    }
}

// The warp-per-row forward with the row in registers: lane l holds the VEC-wide pieces starting at
// columns (k * 32 + l) * VEC, k < NORM_VEC_MAX_PER_LANE / VEC, read and written with one vector
// access each, so the row is read from memory once and the mean, variance and output passes run
// from registers. Needs C % VEC == 0, C <= NORM_VEC_MAX_WIDTH and rows aligned to the vectors.
#define NORM_VEC_MAX_PER_LANE 32
#define NORM_VEC_MAX_WIDTH (32 * NORM_VEC_MAX_PER_LANE)
template <int VEC, typename TR>
__global__ void __launch_bounds__(256)
residual_norm_forward_vec_kernel(TR *res_out, floatX *out, float *mean, float *rstd, const TR *res_in,
                                 const floatX *branch, const floatX *weight, const floatX *bias,
                                 int N, int C, float eps, int is_layernorm) {
    griddep_wait();   // programmatic launches (cuda_common.h): the inputs are ready past here
    griddep_launch_dependents();
    constexpr int ITERS = NORM_VEC_MAX_PER_LANE / VEC;
    int n = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (n >= N) return;   // the whole warp: one row per warp
    size_t row = (size_t)n * C;
    float v[ITERS][VEC];
    float sum = 0.0f;
#pragma unroll
    for (int k = 0; k < ITERS; k++) {
        int c = (k * 32 + lane) * VEC;
        if (c < C) {
            load_vec<VEC>(v[k], res_in + row + c);
            if (branch) {
                float b[VEC];
                load_vec<VEC>(b, branch + row + c);
#pragma unroll
                for (int i = 0; i < VEC; i++) v[k][i] = stored_as<TR>(v[k][i] + b[i]);
                store_vec<VEC>(res_out + row + c, v[k]);
            }
#pragma unroll
            for (int i = 0; i < VEC; i++) sum += v[k][i];
        }
    }
    float m = is_layernorm ? warp_sum(sum) / C : 0.0f;
    float sq = 0.0f;
#pragma unroll
    for (int k = 0; k < ITERS; k++) {
        int c = (k * 32 + lane) * VEC;
        if (c < C) {
#pragma unroll
            for (int i = 0; i < VEC; i++) sq += (v[k][i] - m) * (v[k][i] - m);
        }
    }
    float s = rsqrtf(warp_sum(sq) / C + eps);
#pragma unroll
    for (int k = 0; k < ITERS; k++) {
        int c = (k * 32 + lane) * VEC;
        if (c < C) {
            float w[VEC], b[VEC], y[VEC];
            load_vec<VEC>(w, weight + c);
            if (bias) load_vec<VEC>(b, bias + c);
#pragma unroll
            for (int i = 0; i < VEC; i++) y[i] = (v[k][i] - m) * s * w[i] + (bias ? b[i] : 0.0f);
            store_vec<VEC>(out + row + c, y);
        }
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
template <typename TR>
__global__ void __launch_bounds__(NORM_ROW_THREADS)
residual_norm_forward_row_kernel(TR *res_out, floatX *out, float *mean, float *rstd, const TR *res_in,
                                 const floatX *branch, const floatX *weight, const floatX *bias,
                                 int N, int C, float eps, int is_layernorm) {
    griddep_wait();   // programmatic launches (cuda_common.h): the inputs are ready past here
    griddep_launch_dependents();
    __shared__ float shared[32];
    size_t row = (size_t)blockIdx.x * C;
    float v[NORM_ROW_MAX_PER_THREAD];
    float sum = 0.0f;
#pragma unroll
    for (int k = 0; k < NORM_ROW_MAX_PER_THREAD; k++) {
        int c = threadIdx.x + k * NORM_ROW_THREADS;
        v[k] = 0.0f;
        if (c < C) {
            float x = to_float(res_in[row + c]);
            if (branch) {
                x = stored_as<TR>(x + to_float(branch[row + c]));
                res_out[row + c] = from_float<TR>(x);
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
// (when C fits the block's registers); above, the register warp kernel (rows up to
// NORM_VEC_MAX_WIDTH wide, with the widest vector access C and the pointers allow), else the
// plain warp kernel. NORM_ROW_KERNEL_MAX_ROWS separates the two uses rather than marking a
// measured crossover: the decode step has one row a sequence (64 to 256 in bench_rollout), where
// one warp a row made the norm about 40% of a GPT-2 decode step on an H100, and a training step
// has B x T rows (16 x 1024 in bench_train), where the warp kernels were timed and stay.
#define NORM_ROW_KERNEL_MAX_ROWS 4096
// res_out's type follows res_in's (res_out may be NULL)
template <typename T> struct norm_same_type { typedef T type; };
template <typename TR>
static inline void residual_norm_forward_check(const TR *res_out, const float *mean, const TR *res_in,
                                               const floatX *branch, int is_layernorm) {
    cudaRequire(!branch || res_out != res_in, "residual_norm_forward: res_out aliases res_in");
    cudaRequire(!is_layernorm || mean != NULL, "residual_norm_forward: LayerNorm needs mean");
}
template <typename TR>
static inline void residual_norm_forward_warps(typename norm_same_type<TR>::type *res_out, floatX *out, float *mean, float *rstd,
                                               const TR *res_in, const floatX *branch,
                                               const floatX *weight, const floatX *bias,
                                               int N, int C, float eps, int is_layernorm, cudaStream_t stream) {
    residual_norm_forward_check(res_out, mean, res_in, branch, is_layernorm);
    const int block = 256, rows_per_block = block / 32;
    residual_norm_forward_kernel<TR><<<ceil_div(N, rows_per_block), block, 0, stream>>>(
        res_out, out, mean, rstd, res_in, branch, weight, bias, N, C, eps, is_layernorm);
    cudaCheckLaunch();
}
// p (may be NULL) holds rows of C elements of T that vectors of vec elements can read
template <typename T> static inline bool norm_vec_fits(const T *p, int C, int vec) {
    return C % vec == 0 && vector_aligned(p, sizeof(T) * vec);
}
// The vector width (4, 2 or 1 elements) the register kernels can use for rows of C elements at
// the pointers given (NULL for none): every row start must be aligned to its vector.
template <typename... Ptrs> static inline int norm_vector_width(int C, const Ptrs *...ptrs) {
    for (int vec = 4; vec > 1; vec /= 2)
        if ((norm_vec_fits(ptrs, C, vec) && ...)) return vec;
    return 1;
}
template <typename TR>
static inline void residual_norm_forward_vec(typename norm_same_type<TR>::type *res_out, floatX *out, float *mean, float *rstd,
                                             const TR *res_in, const floatX *branch,
                                             const floatX *weight, const floatX *bias,
                                             int N, int C, float eps, int is_layernorm, cudaStream_t stream) {
    residual_norm_forward_check(res_out, mean, res_in, branch, is_layernorm);
    cudaRequire(C <= NORM_VEC_MAX_WIDTH, "residual_norm_forward_vec: C too large for a warp's registers");
    const int block = 256, rows_per_block = block / 32;
    int vec = norm_vector_width(C, res_out, res_in, out, branch, weight, bias);
    if (vec == 4)
        residual_norm_forward_vec_kernel<4, TR><<<ceil_div(N, rows_per_block), block, 0, stream>>>(
            res_out, out, mean, rstd, res_in, branch, weight, bias, N, C, eps, is_layernorm);
    else if (vec == 2)
        residual_norm_forward_vec_kernel<2, TR><<<ceil_div(N, rows_per_block), block, 0, stream>>>(
            res_out, out, mean, rstd, res_in, branch, weight, bias, N, C, eps, is_layernorm);
    else
        residual_norm_forward_vec_kernel<1, TR><<<ceil_div(N, rows_per_block), block, 0, stream>>>(
            res_out, out, mean, rstd, res_in, branch, weight, bias, N, C, eps, is_layernorm);
    cudaCheckLaunch();
}
template <typename TR>
static inline void residual_norm_forward_rows(typename norm_same_type<TR>::type *res_out, floatX *out, float *mean, float *rstd,
                                              const TR *res_in, const floatX *branch,
                                              const floatX *weight, const floatX *bias,
                                              int N, int C, float eps, int is_layernorm, cudaStream_t stream) {
    residual_norm_forward_check(res_out, mean, res_in, branch, is_layernorm);
    cudaRequire(C <= NORM_ROW_THREADS * NORM_ROW_MAX_PER_THREAD, "residual_norm_forward_rows: C too large for a block");
    residual_norm_forward_row_kernel<TR><<<N, NORM_ROW_THREADS, 0, stream>>>(
        res_out, out, mean, rstd, res_in, branch, weight, bias, N, C, eps, is_layernorm);
    cudaCheckLaunch();
}
template <typename TR>
static inline void residual_norm_forward(typename norm_same_type<TR>::type *res_out, floatX *out, float *mean, float *rstd,
                                         const TR *res_in, const floatX *branch,
                                         const floatX *weight, const floatX *bias,
                                         int N, int C, float eps, int is_layernorm, cudaStream_t stream) {
    if (N < NORM_ROW_KERNEL_MAX_ROWS && C <= NORM_ROW_THREADS * NORM_ROW_MAX_PER_THREAD)
        residual_norm_forward_rows(res_out, out, mean, rstd, res_in, branch, weight, bias, N, C, eps, is_layernorm, stream);
    else if (C <= NORM_VEC_MAX_WIDTH)
        residual_norm_forward_vec(res_out, out, mean, rstd, res_in, branch, weight, bias, N, C, eps, is_layernorm, stream);
    else
        residual_norm_forward_warps(res_out, out, mean, rstd, res_in, branch, weight, bias, N, C, eps, is_layernorm, stream);
}

// Backward for dinp, one warp per row. With norm = (x - mean) * rstd (mean = 0 for RMSNorm) and
// dnorm = dout * weight:
//   LayerNorm: dx = rstd * (dnorm - mean_c(dnorm) - norm * mean_c(dnorm * norm))
//   RMSNorm:   dx = rstd * (dnorm - norm * mean_c(dnorm * norm))
// (the RMSNorm form equals ops_cpu.c's rstd * (dnorm - x * rstd^2 * mean_c(dnorm * x))).
// dres (N, C) += dx; dres_bf16 (N, C) gets a bf16 copy of the new dres for the next matrix
// product (may be NULL). dout is fp32 or bf16 (TD), the input and dres fp32 or bf16 (TR), as the
// kernels below.
template <typename TD, typename TR>
__global__ void norm_backward_dinp_kernel(TR *dres, floatX *dres_bf16, const TD *dout, const TR *inp,
                                          const floatX *weight, const float *mean, const float *rstd,
                                          int N, int C, int is_layernorm) {
    int warps_per_block = blockDim.x / 32;
    int n = blockIdx.x * warps_per_block + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (n >= N) return;
    const TR *x = inp + (size_t)n * C;
    const TD *g = dout + (size_t)n * C;
    float m = is_layernorm ? mean[n] : 0.0f, s = rstd[n];
    float dnorm_sum = 0.0f, dnorm_norm_sum = 0.0f;
    for (int c = lane; c < C; c += 32) {
        float norm = (to_float(x[c]) - m) * s, dnorm = to_float(weight[c]) * to_float(g[c]);
        dnorm_sum += dnorm;
        dnorm_norm_sum += dnorm * norm;
    }
    float dnorm_mean = is_layernorm ? warp_sum(dnorm_sum) / C : 0.0f;
    float dnorm_norm_mean = warp_sum(dnorm_norm_sum) / C;
    TR *dx = dres + (size_t)n * C;
    floatX *dx_bf16 = dres_bf16 ? dres_bf16 + (size_t)n * C : NULL;
    for (int c = lane; c < C; c += 32) {
        float norm = (to_float(x[c]) - m) * s, dnorm = to_float(weight[c]) * to_float(g[c]);
        float updated = to_float(dx[c]) + s * (dnorm - dnorm_mean - norm * dnorm_norm_mean);
        dx[c] = from_float<TR>(updated);
        if (dx_bf16) dx_bf16[c] = __float2bfloat16(updated);
    }
}

// Partial sums for dweight and dbias over one chunk of COLUMN_CHUNK_ROWS rows: a block of 256
// threads takes a slab of 32 channels (thread t: channel t % 32, rows t / 32, t / 32 + 8, ...).
//   partial_w[chunk, c] = sum over the chunk's rows of dout * norm,  partial_b[chunk, c] = sum of dout
// partial_b may be NULL (RMSNorm has no bias).
template <typename TD, typename TR>
__global__ void __launch_bounds__(256)
norm_backward_dweight_partial_kernel(float *partial_w, float *partial_b, const TD *dout, const TR *inp,
                                     const float *mean, const float *rstd, int N, int C, int is_layernorm) {
    // [row group][lane]: 8 row groups (the 256 threads' warps, launch_bounds and the launch), 32
    // channels each, and one float of padding. A warp writes, and warp 0 reads, 32 consecutive
    // floats of one row group, which no two lanes share a bank for with or without the padding.
    __shared__ float norm_sw[8][33], norm_sb[8][33];
    int lane = threadIdx.x % 32, group = threadIdx.x / 32;
    int slabs = (C + 31) / 32;
    int c = (blockIdx.x % slabs) * 32 + lane, chunk = blockIdx.x / slabs;
    int row0 = chunk * COLUMN_CHUNK_ROWS;
    int row1 = min(row0 + COLUMN_CHUNK_ROWS, N);
    float acc_w = 0.0f, acc_b = 0.0f;
    if (c < C) {
        for (int n = row0 + group; n < row1; n += 8) {
            float m = is_layernorm ? mean[n] : 0.0f;
            float g = to_float(dout[(size_t)n * C + c]);
            acc_w += g * (to_float(inp[(size_t)n * C + c]) - m) * rstd[n];
            acc_b += g;
        }
    }
    norm_sw[group][lane] = acc_w;
    norm_sb[group][lane] = acc_b;
    __syncthreads();
    if (group == 0 && c < C) {
        float w = 0.0f, b = 0.0f;
        for (int k = 0; k < 8; k++) { w += norm_sw[k][lane]; b += norm_sb[k][lane]; }
        partial_w[(size_t)chunk * C + c] = w;
        if (partial_b) partial_b[(size_t)chunk * C + c] = b;
    }
}

// The whole backward in one kernel, for rows up to NORM_VEC_MAX_WIDTH wide. A block of
// NORM_BWD_WARPS warps takes NORM_BWD_ROWS rows, one warp per row at a time; the warp holds the
// row's input, dout and dres in registers (VEC-wide pieces, as the register forward), computes dx
// as norm_backward_dinp_kernel does (dres += dx, dres_bf16 = bf16(dres)), and adds the row's
//   dout * norm  (dweight),  dout  (dbias, LayerNorm),  the updated dres  (colsum)
// into its own slice of shared memory, one C-wide section for each wanted sum (want_b: a bias
// gradient, want_col: the column sums; the weight's always). At the end the block adds its warps'
// slices in warp order and writes them as row `block` of partial (blocks, sections * C) (the
// wanted sums side by side, in that order) for norm_backward_reduce. colsum is the bias
// gradient of the projection whose output this residual gradient is. An RMSNorm without a
// projection bias before it (Llama) moves and holds a third of the shared memory. Fewer rows a
// block were slower on an H100 (SmolLM2's norm, N = 16384: 0.041 ms at 32 rows, 0.044 at 16,
// 0.049 at 8), though 32 make 512 blocks, under 4 an SM.
// ITERS (at most NORM_VEC_MAX_PER_LANE / VEC) bounds the pieces a lane holds: the launcher takes
// the smallest instantiated bound that covers C, so that narrower rows hold fewer registers.
#define NORM_BWD_WARPS 4
#define NORM_BWD_ROWS 32
static inline int norm_backward_blocks(int N) { return ceil_div(N, NORM_BWD_ROWS); }
static inline size_t norm_backward_smem(int C, int sections) { return (size_t)NORM_BWD_WARPS * sections * C * sizeof(float); }
template <int VEC, int ITERS, typename TD, typename TR>
__global__ void __launch_bounds__(NORM_BWD_WARPS * 32)
norm_backward_fused_kernel(TR *dres, floatX *dres_bf16, float *partial, const TD *dout, const TR *inp,
                           const floatX *weight, const float *mean, const float *rstd, int N, int C, int is_layernorm,
                           int want_b, int want_col) {
    static_assert(VEC * ITERS <= NORM_VEC_MAX_PER_LANE, "a lane holds at most NORM_VEC_MAX_PER_LANE elements");
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int sections = 1 + want_b + want_col;   // the warp's slice: dweight, then dbias and colsum where wanted
    float *acc = (float *)dynamic_smem();
    float *acc_w = acc + (size_t)warp * sections * C, *acc_b = acc_w + C, *acc_col = acc_w + (1 + want_b) * C;
    for (int c = lane; c < sections * C; c += 32) acc_w[c] = 0.0f;
    __syncwarp();
    int row1 = min((int)(blockIdx.x + 1) * NORM_BWD_ROWS, N);
    for (int n = blockIdx.x * NORM_BWD_ROWS + warp; n < row1; n += NORM_BWD_WARPS) {
        size_t row = (size_t)n * C;
        float m = is_layernorm ? mean[n] : 0.0f, s = rstd[n];
        // the row's input, dout and dres are requested together, so a row waits on memory once
        float x[ITERS][VEC], g[ITERS][VEC], d[ITERS][VEC];
        float dnorm_sum = 0.0f, dnorm_norm_sum = 0.0f;
#pragma unroll
        for (int k = 0; k < ITERS; k++) {
            int c = (k * 32 + lane) * VEC;
            if (c < C) {
                load_vec<VEC>(x[k], inp + row + c);
                load_vec<VEC>(g[k], dout + row + c);
                load_vec<VEC>(d[k], dres + row + c);
            }
        }
#pragma unroll
        for (int k = 0; k < ITERS; k++) {
            int c = (k * 32 + lane) * VEC;
            if (c < C) {
                float w[VEC];
                load_vec<VEC>(w, weight + c);
#pragma unroll
                for (int i = 0; i < VEC; i++) {
                    x[k][i] = (x[k][i] - m) * s;   // from here on: norm
                    float dnorm = w[i] * g[k][i];
                    dnorm_sum += dnorm;
                    dnorm_norm_sum += dnorm * x[k][i];
                }
            }
        }
        float dnorm_mean = is_layernorm ? warp_sum(dnorm_sum) / C : 0.0f;
        float dnorm_norm_mean = warp_sum(dnorm_norm_sum) / C;
#pragma unroll
        for (int k = 0; k < ITERS; k++) {
            int c = (k * 32 + lane) * VEC;
            if (c < C) {
                float w[VEC], aw[VEC], ab[VEC] = {}, acol[VEC] = {};   // the unwanted sums are never stored
                load_vec<VEC>(w, weight + c);
                load_vec<VEC>(aw, acc_w + c);
                if (want_b) load_vec<VEC>(ab, acc_b + c);
                if (want_col) load_vec<VEC>(acol, acc_col + c);
#pragma unroll
                for (int i = 0; i < VEC; i++) {
                    float dnorm = w[i] * g[k][i];
                    d[k][i] = stored_as<TR>(d[k][i] + s * (dnorm - dnorm_mean - x[k][i] * dnorm_norm_mean));
                    aw[i] += g[k][i] * x[k][i];
                    ab[i] += g[k][i];
                    acol[i] += d[k][i];
                }
                store_vec<VEC>(acc_w + c, aw);
                if (want_b) store_vec<VEC>(acc_b + c, ab);
                if (want_col) store_vec<VEC>(acc_col + c, acol);
                store_vec<VEC>(dres + row + c, d[k]);
                if (dres_bf16) store_vec<VEC>(dres_bf16 + row + c, d[k]);
            }
        }
    }
    __syncthreads();
    float *partial_row = partial + (size_t)blockIdx.x * sections * C;
    for (int j = threadIdx.x; j < sections * C; j += blockDim.x) {
        float sum = 0.0f;
        for (int k = 0; k < NORM_BWD_WARPS; k++) sum += acc[(size_t)k * sections * C + j];
        partial_row[j] = sum;
    }
}

// Floats of the fused kernel's partial sums for N rows of C with the wanted sums (dweight always).
static inline size_t norm_backward_partial_floats(int N, int C, int want_b, int want_col) {
    return (size_t)norm_backward_blocks(N) * (1 + want_b + want_col) * C;
}
// Floats of scratch norm_backward needs for N rows of C.
static inline size_t norm_backward_scratch_floats(int N, int C) {
    size_t fused = norm_backward_partial_floats(N, C, 1, 1), split = 2 * (size_t)column_chunks(N) * C;
    return fused > split ? fused : split;
}

// The fallback for rows wider than NORM_VEC_MAX_WIDTH: norm_backward_dinp_kernel, then the
// weight (and bias) partial sums re-reading dout and the input, then the column sums of dres.
template <typename TD, typename TR>
static inline void norm_backward_split(TR *dres, floatX *dres_bf16, float *dweight, float *dbias, float *dres_colsum,
                                       const TD *dout, const TR *inp, const floatX *weight,
                                       const float *mean, const float *rstd, float *scratch,
                                       int N, int C, int is_layernorm, cudaStream_t stream) {
    const int block = 256, rows_per_block = block / 32;
    norm_backward_dinp_kernel<TD, TR><<<ceil_div(N, rows_per_block), block, 0, stream>>>(
        dres, dres_bf16, dout, inp, weight, mean, rstd, N, C, is_layernorm);
    cudaCheckLaunch();
    int chunks = column_chunks(N);
    float *partial_w = scratch, *partial_b = dbias ? scratch + (size_t)chunks * C : NULL;
    norm_backward_dweight_partial_kernel<TD, TR><<<ceil_div(C, 32) * chunks, 256, 0, stream>>>(partial_w, partial_b, dout,
                                                                                          inp, mean, rstd, N, C, is_layernorm);
    cudaCheckLaunch();
    column_partials_reduce(dweight, partial_w, chunks, C, stream);
    if (dbias) column_partials_reduce(dbias, partial_b, chunks, C, stream);
    if (dres_colsum) column_sums_add<TR>(dres_colsum, dres, scratch, N, C, stream);
}

// The fused backward in two halves, which may run on two streams (the model queues the second
// on its side stream, off the path to the next product): norm_backward_partials launches the
// kernel, which updates dres (and dres_bf16) and writes the partial sums of the wanted gradients
// (want_b: dbias, want_col: dres_colsum; dweight always) to partial, norm_backward_partial_floats
// of them; norm_backward_reduce then adds them into the gradients, the same sums in the same
// order as norm_backward_fused.
template <typename TD, typename TR>
static inline void norm_backward_partials(TR *dres, floatX *dres_bf16, float *partial, int want_b, int want_col,
                                          const TD *dout, const TR *inp, const floatX *weight,
                                          const float *mean, const float *rstd, int N, int C, int is_layernorm,
                                          cudaStream_t stream) {
    cudaRequire(C <= NORM_VEC_MAX_WIDTH, "norm_backward_partials: C too large for a warp's registers");
    cudaRequire(!is_layernorm || mean != NULL, "norm_backward_partials: LayerNorm needs mean");
    want_b = want_b != 0;
    want_col = want_col != 0;
    int blocks = norm_backward_blocks(N);
    size_t smem = norm_backward_smem(C, 1 + want_b + want_col);
    int vec = norm_vector_width(C, inp, dres, dres_bf16, weight, dout);
    int pieces = ceil_div(C, 32 * vec);   // per lane
    if (vec == 4 && pieces <= 2)
        norm_backward_fused_kernel<4, 2, TD, TR><<<blocks, NORM_BWD_WARPS * 32, smem, stream>>>(
            dres, dres_bf16, partial, dout, inp, weight, mean, rstd, N, C, is_layernorm, want_b, want_col);
    else if (vec == 4 && pieces <= 4)
        norm_backward_fused_kernel<4, 4, TD, TR><<<blocks, NORM_BWD_WARPS * 32, smem, stream>>>(
            dres, dres_bf16, partial, dout, inp, weight, mean, rstd, N, C, is_layernorm, want_b, want_col);
    else if (vec == 4 && pieces <= 6)
        norm_backward_fused_kernel<4, 6, TD, TR><<<blocks, NORM_BWD_WARPS * 32, smem, stream>>>(
            dres, dres_bf16, partial, dout, inp, weight, mean, rstd, N, C, is_layernorm, want_b, want_col);
    else if (vec == 4)
        norm_backward_fused_kernel<4, 8, TD, TR><<<blocks, NORM_BWD_WARPS * 32, smem, stream>>>(
            dres, dres_bf16, partial, dout, inp, weight, mean, rstd, N, C, is_layernorm, want_b, want_col);
    else if (vec == 2)
        norm_backward_fused_kernel<2, 16, TD, TR><<<blocks, NORM_BWD_WARPS * 32, smem, stream>>>(
            dres, dres_bf16, partial, dout, inp, weight, mean, rstd, N, C, is_layernorm, want_b, want_col);
    else
        norm_backward_fused_kernel<1, 32, TD, TR><<<blocks, NORM_BWD_WARPS * 32, smem, stream>>>(
            dres, dres_bf16, partial, dout, inp, weight, mean, rstd, N, C, is_layernorm, want_b, want_col);
    cudaCheckLaunch();
}
// dweight (C) += the partials' first section, dbias and dres_colsum (each may be NULL) the next,
// for the partials norm_backward_partials wrote for N rows of C with want_b = dbias != NULL and
// want_col = dres_colsum != NULL.
static inline void norm_backward_reduce(float *dweight, float *dbias, float *dres_colsum, const float *partial, int N, int C,
                                        cudaStream_t stream) {
    int sections = 1 + (dbias != NULL) + (dres_colsum != NULL);
    column_partials_reduce3(dweight, dbias ? dbias : dres_colsum, dbias ? dres_colsum : NULL, partial, norm_backward_blocks(N),
                            C, sections, stream);
}
template <typename TD, typename TR>
static inline void norm_backward_fused(TR *dres, floatX *dres_bf16, float *dweight, float *dbias, float *dres_colsum,
                                       const TD *dout, const TR *inp, const floatX *weight,
                                       const float *mean, const float *rstd, float *scratch,
                                       int N, int C, int is_layernorm, cudaStream_t stream) {
    norm_backward_partials(dres, dres_bf16, scratch, dbias != NULL, dres_colsum != NULL, dout, inp, weight, mean, rstd, N, C,
                           is_layernorm, stream);
    norm_backward_reduce(dweight, dbias, dres_colsum, scratch, N, C, stream);
}

// Full norm backward: dres (N, C) += dinp (and dres_bf16 = bf16(dres), may be NULL),
// dweight (C) += ..., dbias (C) += ... (LayerNorm only; NULL for RMSNorm), and dres_colsum (C)
// += the column sums of the updated dres (may be NULL): the bias gradient of the projection
// that produced the residual branch this gradient flows into. dout (N, C) fp32 or bf16 (TD) is
// the gradient at the norm's output, inp (N, C) its input, fp32 or bf16 as dres (TR; a bf16 dres
// is itself the products' operand, so dres_bf16 is then NULL). scratch holds
// norm_backward_scratch_floats(N, C).
template <typename TD, typename TR>
static inline void norm_backward(TR *dres, floatX *dres_bf16, float *dweight, float *dbias, float *dres_colsum,
                                 const TD *dout, const TR *inp, const floatX *weight,
                                 const float *mean, const float *rstd, float *scratch,
                                 int N, int C, int is_layernorm, cudaStream_t stream) {
    cudaRequire(!is_layernorm || mean != NULL, "norm_backward: LayerNorm needs mean");
    cudaRequire(sizeof(TR) == sizeof(float) || dres_bf16 == NULL, "norm_backward: a bf16 dres needs no bf16 copy");
    if (C <= NORM_VEC_MAX_WIDTH)
        norm_backward_fused(dres, dres_bf16, dweight, dbias, dres_colsum, dout, inp, weight, mean, rstd, scratch, N, C,
                            is_layernorm, stream);
    else
        norm_backward_split(dres, dres_bf16, dweight, dbias, dres_colsum, dout, inp, weight, mean, rstd, scratch, N, C,
                            is_layernorm, stream);
}
#endif
