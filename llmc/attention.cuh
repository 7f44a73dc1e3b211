/*
 * Causal self-attention with grouped-query heads on the GPU, forward and backward, tiled in the
 * manner of FlashAttention: the (T, T) score matrix never exists in memory. CPU reference:
 * attention_forward / attention_backward in ops_cpu.c (which does keep the T x T probabilities).
 *
 * Shapes: qkv (B, T, QKV), rows q (NH*HS) | k (NKV*HS) | v (NKV*HS), q and k already rotated for
 * Llama. Query head h reads key/value head h / (NH / NKV). out (B, T, NH*HS). lse (B, NH, T) is
 * the log-sum-exp of each query row's scaled scores, saved by the forward so the backward can
 * recompute every probability p = exp(s - lse) without a softmax pass.
 *
 * The kernels here are the straightforward form of the tiled algorithm: one thread owns one
 * query row (or one key row in the dk/dv pass) with its HS-vector in registers, blocks stage
 * tiles of the other side's rows in shared memory (every thread of a warp reads the same shared
 * word, a broadcast), and all arithmetic is fp32 on the CUDA cores. They are correct for any T,
 * causal boundary and group size; HS must be one of 16, 32, 64, 128 (a template parameter, so the
 * per-thread vectors stay in registers).
 *
 *   forward     for each key tile: s = q.k / sqrt(HS); online softmax (running max m and sum l,
 *               the accumulator rescaled once per tile); out = o / l, lse = m + log l
 *   backward    D = rowsum(dout * out) (one value per query row and head), then
 *               dq[t]  = scale * sum_{t2 <= t} p (dout.v[t2] - D[t]) k[t2]       (per query row)
 *               dk[t2] = scale * sum_{h in group} sum_{t >= t2} p (dout.v[t2] - D[t]) q[t]
 *               dv[t2] = sum_{h in group} sum_{t >= t2} p dout[t]                 (per key row)
 *               Each output row is owned by one thread, so there are no atomics and the result is
 *               the same on every run; dq, dk and dv rows are written, not accumulated.
 */
#ifndef LLMC_ATTENTION_CUH
#define LLMC_ATTENTION_CUH
#include <math.h>
#include "cuda_common.h"

#define ATT_ROWS 64     // query rows (forward, dq) or key rows (dk, dv) per block: one thread each
#define ATT_TILE 32     // rows of the other side staged in shared memory at a time

// Loads rows [row0, row0 + ATT_TILE) of one head (column offset col, HS wide) of qkv into
// tile (ATT_TILE, HS) fp32; rows at or past T are zero. All threads of the block take part.
template <int HS>
__device__ __forceinline__ void attention_load_tile(float *tile, const floatX *qkv, int b, int row0, int T,
                                                    int QKV, int col) {
    for (int idx = threadIdx.x; idx < ATT_TILE * HS; idx += blockDim.x) {
        int j = idx / HS, i = idx % HS, t = row0 + j;
        tile[idx] = t < T ? to_float(qkv[((size_t)b * T + t) * QKV + col + i]) : 0.0f;
    }
}

// dot of a register vector with a shared-memory row (both HS floats; the row 16-byte aligned)
template <int HS>
__device__ __forceinline__ float attention_dot(const float (&x)[HS], const float *row) {
    const float4 *row4 = (const float4 *)row;
    float sum = 0.0f;
    #pragma unroll
    for (int i = 0; i < HS / 4; i++) {
        float4 r = row4[i];
        sum += x[4 * i] * r.x + x[4 * i + 1] * r.y + x[4 * i + 2] * r.z + x[4 * i + 3] * r.w;
    }
    return sum;
}
// acc += a * row
template <int HS>
__device__ __forceinline__ void attention_axpy(float (&acc)[HS], float a, const float *row) {
    const float4 *row4 = (const float4 *)row;
    #pragma unroll
    for (int i = 0; i < HS / 4; i++) {
        float4 r = row4[i];
        acc[4 * i] += a * r.x; acc[4 * i + 1] += a * r.y; acc[4 * i + 2] += a * r.z; acc[4 * i + 3] += a * r.w;
    }
}

// grid (ceil(T / ATT_ROWS), NH, B), block ATT_ROWS threads: thread = query row t of head h.
template <int HS>
__global__ void __launch_bounds__(ATT_ROWS) attention_forward_kernel(floatX *out, float *lse, const floatX *qkv,
                                                                      int T, int NH, int NKV) {
    __shared__ __align__(16) float k_tile[ATT_TILE * HS];
    __shared__ __align__(16) float v_tile[ATT_TILE * HS];
    int b = blockIdx.z, h = blockIdx.y;
    int kvh = h / (NH / NKV), QKV = (NH + 2 * NKV) * HS;
    int t = blockIdx.x * ATT_ROWS + threadIdx.x;
    int valid = t < T;
    const float scale = rsqrtf((float)HS);

    float q[HS], o[HS];
    const floatX *q_row = qkv + ((size_t)b * T + (valid ? t : 0)) * QKV + (size_t)h * HS;
    #pragma unroll
    for (int i = 0; i < HS; i++) { q[i] = valid ? to_float(q_row[i]) * scale : 0.0f; o[i] = 0.0f; }
    float m = -INFINITY, l = 0.0f;

    int last_key = min(T - 1, (int)(blockIdx.x * ATT_ROWS + ATT_ROWS - 1));   // the block's last query
    for (int k0 = 0; k0 <= last_key; k0 += ATT_TILE) {
        __syncthreads();   // the previous tile is no longer read
        attention_load_tile<HS>(k_tile, qkv, b, k0, T, QKV, (NH + kvh) * HS);
        attention_load_tile<HS>(v_tile, qkv, b, k0, T, QKV, (NH + NKV + kvh) * HS);
        __syncthreads();
        if (!valid || k0 > t) continue;
        int count = min(ATT_TILE, t - k0 + 1);   // keys k0 .. k0 + count - 1 are <= t
        float s[ATT_TILE];
        float tile_max = -INFINITY;
        #pragma unroll
        for (int j = 0; j < ATT_TILE; j++) {
            s[j] = j < count ? attention_dot<HS>(q, k_tile + j * HS) : -INFINITY;
            tile_max = fmaxf(tile_max, s[j]);
        }
        float m_new = fmaxf(m, tile_max);          // finite: count >= 1
        float correction = expf(m - m_new);        // 0 on the first tile (m = -inf)
        l *= correction;
        #pragma unroll
        for (int i = 0; i < HS; i++) o[i] *= correction;
        #pragma unroll
        for (int j = 0; j < ATT_TILE; j++) {
            if (j < count) {
                float p = expf(s[j] - m_new);
                l += p;
                attention_axpy<HS>(o, p, v_tile + j * HS);
            }
        }
        m = m_new;
    }
    if (valid) {
        float inv_l = 1.0f / l;
        floatX *out_row = out + ((size_t)b * T + t) * NH * HS + (size_t)h * HS;
        #pragma unroll
        for (int i = 0; i < HS; i++) out_row[i] = __float2bfloat16(o[i] * inv_l);
        lse[((size_t)b * NH + h) * T + t] = m + logf(l);
    }
}

// D (B, NH, T) = sum_i dout * out over each head's HS columns: one thread per (b, t, h).
__global__ void attention_backward_preprocess_kernel(float *D, const floatX *dout, const floatX *out,
                                                     int B, int T, int NH, int HS) {
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)B * T * NH) return;
    int h = (int)(idx % NH);
    size_t bt = idx / NH;
    int b = (int)(bt / T), t = (int)(bt % T);
    const floatX *g = dout + bt * NH * HS + (size_t)h * HS, *y = out + bt * NH * HS + (size_t)h * HS;
    float sum = 0.0f;
    for (int i = 0; i < HS; i++) sum += to_float(g[i]) * to_float(y[i]);
    D[((size_t)b * NH + h) * T + t] = sum;
}

// dq: grid (ceil(T / ATT_ROWS), NH, B), thread = query row t of head h; writes dqkv's q part.
template <int HS>
__global__ void __launch_bounds__(ATT_ROWS) attention_backward_dq_kernel(floatX *dqkv, const floatX *dout,
                                                                          const floatX *qkv, const float *lse,
                                                                          const float *D, int T, int NH, int NKV) {
    __shared__ __align__(16) float k_tile[ATT_TILE * HS];
    __shared__ __align__(16) float v_tile[ATT_TILE * HS];
    int b = blockIdx.z, h = blockIdx.y;
    int kvh = h / (NH / NKV), QKV = (NH + 2 * NKV) * HS;
    int t = blockIdx.x * ATT_ROWS + threadIdx.x;
    int valid = t < T;
    const float scale = rsqrtf((float)HS);

    float q[HS], g[HS], dq[HS];
    const floatX *q_row = qkv + ((size_t)b * T + (valid ? t : 0)) * QKV + (size_t)h * HS;
    const floatX *g_row = dout + ((size_t)b * T + (valid ? t : 0)) * NH * HS + (size_t)h * HS;
    #pragma unroll
    for (int i = 0; i < HS; i++) {
        q[i] = valid ? to_float(q_row[i]) * scale : 0.0f;
        g[i] = valid ? to_float(g_row[i]) : 0.0f;
        dq[i] = 0.0f;
    }
    size_t stat = ((size_t)b * NH + h) * T + (valid ? t : 0);
    float row_lse = lse[stat], row_D = D[stat];

    int last_key = min(T - 1, (int)(blockIdx.x * ATT_ROWS + ATT_ROWS - 1));
    for (int k0 = 0; k0 <= last_key; k0 += ATT_TILE) {
        __syncthreads();
        attention_load_tile<HS>(k_tile, qkv, b, k0, T, QKV, (NH + kvh) * HS);
        attention_load_tile<HS>(v_tile, qkv, b, k0, T, QKV, (NH + NKV + kvh) * HS);
        __syncthreads();
        if (!valid || k0 > t) continue;
        int count = min(ATT_TILE, t - k0 + 1);
        for (int j = 0; j < count; j++) {
            float p = expf(attention_dot<HS>(q, k_tile + j * HS) - row_lse);
            float dp = attention_dot<HS>(g, v_tile + j * HS);
            attention_axpy<HS>(dq, p * (dp - row_D), k_tile + j * HS);
        }
    }
    if (valid) {
        floatX *dq_row = dqkv + ((size_t)b * T + t) * QKV + (size_t)h * HS;
        #pragma unroll
        for (int i = 0; i < HS; i++) dq_row[i] = __float2bfloat16(dq[i] * scale);
    }
}

// dk (DV = false) or dv (DV = true): grid (ceil(T / ATT_ROWS), NKV, B), thread = key row t2 of
// key/value head kvh, summing over the query heads of its group and the query rows t >= t2.
// Two launches rather than one because k, v, dk and dv together would not fit in registers.
template <int HS, bool DV>
__global__ void __launch_bounds__(ATT_ROWS) attention_backward_dkv_kernel(floatX *dqkv, const floatX *dout,
                                                                           const floatX *qkv, const float *lse,
                                                                           const float *D, int T, int NH, int NKV) {
    __shared__ __align__(16) float q_tile[ATT_TILE * HS];
    __shared__ __align__(16) float g_tile[ATT_TILE * HS];
    __shared__ float lse_tile[ATT_TILE], D_tile[ATT_TILE];
    int b = blockIdx.z, kvh = blockIdx.y, group = NH / NKV;
    int QKV = (NH + 2 * NKV) * HS;
    int key0 = blockIdx.x * ATT_ROWS;
    int t2 = key0 + threadIdx.x;
    int valid = t2 < T;
    const float scale = rsqrtf((float)HS);

    float k[HS], v[HS], acc[HS];
    const floatX *kv_row = qkv + ((size_t)b * T + (valid ? t2 : 0)) * QKV;
    #pragma unroll
    for (int i = 0; i < HS; i++) {
        k[i] = valid ? to_float(kv_row[(size_t)(NH + kvh) * HS + i]) * scale : 0.0f;
        v[i] = (!DV && valid) ? to_float(kv_row[(size_t)(NH + NKV + kvh) * HS + i]) : 0.0f;
        acc[i] = 0.0f;
    }
    for (int h = kvh * group; h < (kvh + 1) * group; h++) {
        for (int q0 = key0 - key0 % ATT_TILE; q0 < T; q0 += ATT_TILE) {
            __syncthreads();
            attention_load_tile<HS>(q_tile, qkv, b, q0, T, QKV, h * HS);
            attention_load_tile<HS>(g_tile, dout, b, q0, T, NH * HS, h * HS);
            if (threadIdx.x < ATT_TILE) {
                int t = q0 + threadIdx.x;
                lse_tile[threadIdx.x] = t < T ? lse[((size_t)b * NH + h) * T + t] : 0.0f;
                D_tile[threadIdx.x] = t < T ? D[((size_t)b * NH + h) * T + t] : 0.0f;
            }
            __syncthreads();
            if (!valid) continue;
            for (int i = 0; i < ATT_TILE; i++) {
                int t = q0 + i;
                if (t < t2 || t >= T) continue;
                float p = expf(attention_dot<HS>(k, q_tile + i * HS) - lse_tile[i]);
                if (DV) {
                    attention_axpy<HS>(acc, p, g_tile + i * HS);
                } else {
                    float dp = attention_dot<HS>(v, g_tile + i * HS);
                    attention_axpy<HS>(acc, p * (dp - D_tile[i]), q_tile + i * HS);
                }
            }
        }
    }
    if (valid) {
        floatX *dst = dqkv + ((size_t)b * T + t2) * QKV + (size_t)(DV ? NH + NKV + kvh : NH + kvh) * HS;
        #pragma unroll
        for (int i = 0; i < HS; i++) dst[i] = __float2bfloat16(DV ? acc[i] : acc[i] * scale);
    }
}

static inline void attention_check_shape(int B, int T, int NH, int NKV, int HS) {
    cudaRequire(B >= 1 && B <= 65535, "attention: batch size must be in 1..65535 (grid z)");
    cudaRequire(NH >= 1 && NH <= 65535 && NKV >= 1 && NH % NKV == 0, "attention: n_head must be a multiple of n_kv_head");
    cudaRequire(HS == 16 || HS == 32 || HS == 64 || HS == 128, "attention: head_dim must be 16, 32, 64 or 128 on the GPU");
    cudaRequire(T >= 1, "attention: T must be positive");
}

// out (B, T, NH*HS) bf16 and lse (B, NH, T) fp32 from qkv (B, T, QKV) bf16.
static inline void attention_forward(floatX *out, float *lse, const floatX *qkv, int B, int T, int NH, int NKV, int HS,
                                     cudaStream_t stream) {
    attention_check_shape(B, T, NH, NKV, HS);
    dim3 grid(ceil_div(T, ATT_ROWS), NH, B);
    switch (HS) {
    case 16: attention_forward_kernel<16><<<grid, ATT_ROWS, 0, stream>>>(out, lse, qkv, T, NH, NKV); break;
    case 32: attention_forward_kernel<32><<<grid, ATT_ROWS, 0, stream>>>(out, lse, qkv, T, NH, NKV); break;
    case 64: attention_forward_kernel<64><<<grid, ATT_ROWS, 0, stream>>>(out, lse, qkv, T, NH, NKV); break;
    case 128: attention_forward_kernel<128><<<grid, ATT_ROWS, 0, stream>>>(out, lse, qkv, T, NH, NKV); break;
    }
    cudaCheckLaunch();
}

template <int HS>
static inline void attention_backward_launch(floatX *dqkv, const floatX *dout, const floatX *qkv, const float *lse,
                                             const float *D, int B, int T, int NH, int NKV, cudaStream_t stream) {
    dim3 grid_q(ceil_div(T, ATT_ROWS), NH, B), grid_kv(ceil_div(T, ATT_ROWS), NKV, B);
    attention_backward_dq_kernel<HS><<<grid_q, ATT_ROWS, 0, stream>>>(dqkv, dout, qkv, lse, D, T, NH, NKV);
    cudaCheckLaunch();
    attention_backward_dkv_kernel<HS, false><<<grid_kv, ATT_ROWS, 0, stream>>>(dqkv, dout, qkv, lse, D, T, NH, NKV);
    cudaCheckLaunch();
    attention_backward_dkv_kernel<HS, true><<<grid_kv, ATT_ROWS, 0, stream>>>(dqkv, dout, qkv, lse, D, T, NH, NKV);
    cudaCheckLaunch();
}

// dqkv (B, T, QKV) bf16 written (every element) given dout (B, T, NH*HS), the forward's qkv,
// out and lse. D (B, NH, T) fp32 is scratch.
static inline void attention_backward(floatX *dqkv, float *D, const floatX *dout, const floatX *qkv, const floatX *out,
                                      const float *lse, int B, int T, int NH, int NKV, int HS, cudaStream_t stream) {
    attention_check_shape(B, T, NH, NKV, HS);
    size_t rows = (size_t)B * T * NH;
    attention_backward_preprocess_kernel<<<ceil_div((long long)rows, 256), 256, 0, stream>>>(D, dout, out, B, T, NH, HS);
    cudaCheckLaunch();
    switch (HS) {
    case 16: attention_backward_launch<16>(dqkv, dout, qkv, lse, D, B, T, NH, NKV, stream); break;
    case 32: attention_backward_launch<32>(dqkv, dout, qkv, lse, D, B, T, NH, NKV, stream); break;
    case 64: attention_backward_launch<64>(dqkv, dout, qkv, lse, D, B, T, NH, NKV, stream); break;
    case 128: attention_backward_launch<128>(dqkv, dout, qkv, lse, D, B, T, NH, NKV, stream); break;
    }
}
#endif
