/*
 * Attention for generation on the GPU: rows that each carry one query token of one sequence at
 * one position, against that sequence's bf16 KV cache. CPU reference: the attention loop of
 * model_forward_cached in generate.c (row i attends over its sequence's positions 0..pos[i]).
 *
 * KV cache, one layer: k_cache, v_cache (S, NKV, Tmax, HS) bf16, S sequence slots. A key/value
 * head's positions are contiguous, so a block streams them with 16-byte loads.
 * Rows: qkv (N, QKV) bf16 with q (NH*HS) | k | v per row, q already rotated (RoPE); row_slot (N),
 * row_pos (N). Output: out (N, NH*HS) bf16, softmax(q.k / sqrt(HS)) v over positions 0..pos.
 *
 * rows_kv_write      RoPE on the rows' q and k heads at their own positions (Llama) and the
 *                    write of k and v into the cache at (slot, pos): the step before attention.
 * decode_attention   GQA-aware, split over the cache length. A block takes one row, one key/
 *                    value head and one split of DECODE_SPLIT_LEN positions, and the query heads
 *                    that share that key/value head (HB of them, 1 to 8 by the group's size:
 *                    decode_heads_per_block), so each key and value is read once for the whole
 *                    group. Threads split (position, 8 channels): HS / 8 adjacent lanes hold one
 *                    position's 16 bytes, and every thread keeps 4 or 8 16-byte loads in
 *                    flight, so a split's keys stream in a few memory latencies rather than one
 *                    latency per position. Phase 1: q . k per lane with the query in registers,
 *                    added across the position's lanes by shuffles, into shared memory; phase 2:
 *                    one warp per head takes max and sum of exp; phase 3: p v with the same
 *                    layout, reduced across positions by shuffles and shared memory. With one
 *                    split the block writes the normalised output; with several,
 *                    it writes unnormalised partial outputs with their max and sum, and
 *                    decode_attention_combine merges the splits (the log-sum-exp rescaling of
 *                    FlashDecoding). Splits that start past a row's position exit at once, so
 *                    the grid can be sized for the longest context and stay fixed (CUDA graphs).
 *                    Two other ways to request the keys and values (decode_attention_loads; the
 *                    default loads them as it uses them, UNROLL per thread an iteration): early
 *                    loads request every load of the first iteration before using any; staged
 *                    copies the whole split into shared memory with cp.async at once, so a block
 *                    waits about one memory latency for all its keys and values whatever the
 *                    split's length (its shared memory: keys and values of a split). The same
 *                    bits, for the harnesses to time against the default.
 *                    With a DecodeRowNorm (the engine's folded decode step, RolloutOptions.fold_norms)
 *                    the row's q, k and v are first scaled by the row's RMSNorm factor, computed
 *                    by the block from the row of the residual stream the qkv product read: the
 *                    product ran on the stream itself, the norm's weights folded into its own.
 * reference          one thread per (row, head), a serial loop with an online softmax: the
 *                    plain version the harnesses compare against.
 *
 * A row whose position or slot lies outside the cache sets DECODE_ERR_POSITION in *err and is
 * skipped (its output is left unwritten); the engine checks err after every step.
 */
#ifndef LLMC_DECODE_ATTENTION_CUH
#define LLMC_DECODE_ATTENTION_CUH
#include <math.h>
#include "cuda_common.h"

// Cache positions a block: a row's context of T positions takes ceil(T / 256) blocks for each
// key/value head (merged by decode_attention_combine when more than one), and the block holds its
// split's scores p_s (HB x 256 floats, 8 KiB at 8 heads) and, staged, its keys and values (2 x 256
// x HS bf16: 64 KiB at HS 64, 128 KiB at HS 128) in shared memory.
#define DECODE_SPLIT_LEN 256         // cache positions per block
#define DECODE_MAX_HEADS_PER_BLOCK 8 // query heads of one group per block, at most
#define DECODE_THREADS 128
#define DECODE_WARPS (DECODE_THREADS / 32)
#define DECODE_ERR_POSITION 2
// How the fast kernel requests the keys and values of its split (decode_attention_loads): the
// same values summed in the same order in all three, so the same bits.
#define DECODE_LOADS_DIRECT 0   // UNROLL 16-byte loads per thread a loop iteration, as it uses them
#define DECODE_LOADS_EARLY 1    // the first iteration's loads, and the row's, all requested at once
#define DECODE_LOADS_STAGED 2   // the whole split copied to shared memory at once (cp.async)

// 8 bf16 values from a 16-byte aligned address, as floats (decode_unpack8: from the 16 bytes)
__device__ __forceinline__ void decode_unpack8(float (&out)[8], uint4 raw) {
    const __nv_bfloat162 *pairs = (const __nv_bfloat162 *)&raw;
    #pragma unroll
    for (int i = 0; i < 4; i++) {
        float2 f = __bfloat1622float2(pairs[i]);
        out[2 * i] = f.x;
        out[2 * i + 1] = f.y;
    }
}
__device__ __forceinline__ void decode_load8(float (&out)[8], const floatX *src) { decode_unpack8(out, *(const uint4 *)src); }

// 8 floats as bf16 to a 16-byte aligned address
__device__ __forceinline__ void decode_store8(floatX *dst, const float (&x)[8]) {
    uint4 raw;
    __nv_bfloat162 *pairs = (__nv_bfloat162 *)&raw;
    #pragma unroll
    for (int i = 0; i < 4; i++) pairs[i] = __floats2bfloat162_rn(x[2 * i], x[2 * i + 1]);
    *(uint4 *)dst = raw;
}

// RoPE on 8 channels of a head vector held by the CHUNKS = HS / 8 adjacent lanes of one position
// (lane chunk c has channels 8c .. 8c+7): channel i < HS/2 pairs with i + HS/2, which lane
// c ^ (CHUNKS / 2) holds. The arithmetic and the bf16 rounding are rows_kv_write_kernel's. Every
// lane of the warp must call it (shuffles). decode_rope8_table loads the 8 (cos, sin) pairs a lane
// uses at pos, decode_rope8_apply rotates with them.
template <int CHUNKS>
__device__ __forceinline__ void decode_rope8_table(float (&cs)[16], const float *cos_sin, int pos, int c) {
    constexpr int half = CHUNKS * 4;   // HS / 2
    const float *src = cos_sin + ((size_t)pos * half + (c % (CHUNKS / 2)) * 8) * 2;
    #pragma unroll
    for (int e = 0; e < 16; e++) cs[e] = src[e];
}
template <int CHUNKS>
__device__ __forceinline__ void decode_rope8_apply(float (&x)[8], const float (&cs)[16], int c) {
    float other[8];
    #pragma unroll
    for (int e = 0; e < 8; e++) other[e] = __shfl_xor_sync(0xffffffffu, x[e], CHUNKS / 2);
    const bool first = c < CHUNKS / 2;
    #pragma unroll
    for (int e = 0; e < 8; e++) {
        float co = cs[2 * e], si = cs[2 * e + 1];
        float y = first ? x[e] * co - other[e] * si : x[e] * co + other[e] * si;
        x[e] = to_float(__float2bfloat16(y));
    }
}
template <int CHUNKS>
__device__ __forceinline__ void decode_rope8_bf16(float (&x)[8], const float *cos_sin, int pos, int c) {
    float cs[16];
    decode_rope8_table<CHUNKS>(cs, cos_sin, pos, c);
    decode_rope8_apply<CHUNKS>(x, cs, c);
}
// 8 floats rounded to bf16
__device__ __forceinline__ void decode_round8_bf16(float (&x)[8]) {
    #pragma unroll
    for (int e = 0; e < 8; e++) x[e] = to_float(__float2bfloat16(x[e]));
}

// One thread per (row, head hh < NH + 2*NKV, pair i < HS/2) of qkv (N, QKV). q and k heads are
// rotated when cos_sin is not NULL (cos_sin (Tmax, HS/2, 2), as rope.cuh); k and v heads are
// then written to the cache at (row_slot, row_pos). The q heads stay in qkv for the attention.
__global__ void rows_kv_write_kernel(floatX *qkv, floatX *k_cache, floatX *v_cache, const float *cos_sin,
                                     const int *row_slot, const int *row_pos, int N, int NH, int NKV, int HS,
                                     int n_slots, int Tmax, int *err) {
    int half = HS / 2, heads = NH + 2 * NKV;
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)N * heads * half) return;
    int i = (int)(idx % half);
    int hh = (int)((idx / half) % heads);
    int r = (int)(idx / ((size_t)half * heads));
    int slot = row_slot[r], pos = row_pos[r];
    if (slot < 0 || slot >= n_slots || pos < 0 || pos >= Tmax) {
        if (hh == 0 && i == 0) atomicOr(err, DECODE_ERR_POSITION);
        return;
    }
    floatX *x = qkv + (size_t)r * heads * HS + (size_t)hh * HS;
    float x1 = to_float(x[i]), x2 = to_float(x[i + half]);
    if (cos_sin != NULL && hh < NH + NKV) {
        float c = cos_sin[((size_t)pos * half + i) * 2], s = cos_sin[((size_t)pos * half + i) * 2 + 1];
        float y1 = x1 * c - x2 * s, y2 = x2 * c + x1 * s;
        x1 = y1;
        x2 = y2;
    }
    floatX b1 = __float2bfloat16(x1), b2 = __float2bfloat16(x2);
    if (hh < NH) {
        x[i] = b1;
        x[i + half] = b2;
    } else {
        int kvh = hh < NH + NKV ? hh - NH : hh - NH - NKV;
        floatX *cache = hh < NH + NKV ? k_cache : v_cache;
        floatX *dst = cache + (((size_t)slot * NKV + kvh) * Tmax + pos) * HS;
        dst[i] = b1;
        dst[i + half] = b2;
    }
}

static inline void rows_kv_write(floatX *qkv, floatX *k_cache, floatX *v_cache, const float *cos_sin, const int *row_slot,
                                 const int *row_pos, int N, int NH, int NKV, int HS, int n_slots, int Tmax, int *err,
                                 cudaStream_t stream) {
    cudaRequire(HS % 2 == 0, "rows_kv_write: head_dim must be even");
    size_t n = (size_t)N * (NH + 2 * NKV) * (HS / 2);
    rows_kv_write_kernel<<<ceil_div((long long)n, 256), 256, 0, stream>>>(qkv, k_cache, v_cache, cos_sin, row_slot, row_pos,
                                                                          N, NH, NKV, HS, n_slots, Tmax, err);
    cudaCheckLaunch();
}

// The rows' RMSNorm, applied inside the attention (decode_attention_kernel): with x (the rows'
// residual stream, (N, C) bf16; NULL: none), row r's q, k and v are multiplied by
// rstd = 1 / sqrt(mean_c x[r, c]^2 + eps), and the key and value it writes to the cache are
// those products rounded to bf16. norm(x) W^T = rstd (x (W diag w)^T) for RMSNorm's
// norm(x) = x rstd w, so a qkv product on x with the norm's weight w folded into its own W gives,
// scaled here, the product on the normed rows.
typedef struct {
    const floatX *x;
    int C;
    float eps;
} DecodeRowNorm;

// Cache positions a block of the staged variant holds in shared memory: a split's, or the whole
// cache's when shorter. Its dynamic shared memory: keys and values of that many positions.
__host__ __device__ inline int decode_stage_positions(int Tmax) { return Tmax < DECODE_SPLIT_LEN ? Tmax : DECODE_SPLIT_LEN; }
static inline size_t decode_stage_bytes(int Tmax, int HS) { return 2 * (size_t)decode_stage_positions(Tmax) * HS * sizeof(floatX); }

// Query heads of one GQA group that a block of decode_attention_kernel takes together: the
// smallest of 1, 2, 4, 8 covering the group (a group larger than 8 takes several blocks).
static inline int decode_heads_per_block(int group) {
    int hb = 1;
    while (hb < group && hb < DECODE_MAX_HEADS_PER_BLOCK) hb *= 2;
    return hb;
}

// grid (n_splits, NKV * head_batches, N), block DECODE_THREADS; see the file comment. HB query
// heads per block (decode_heads_per_block), the last batch of a group possibly partly empty.
// part_o (N, NH, n_splits, HS) fp32 and part_ml (N, NH, n_splits, 2) fp32 are used when
// n_splits > 1.
template <int HS, int HB, int LOADS>
__global__ void __launch_bounds__(DECODE_THREADS)
decode_attention_kernel(floatX *out, float *part_o, float *part_ml, const floatX *qkv, floatX *k_cache,
                        floatX *v_cache, const float *cos_sin, int write_kv, const int *row_slot, const int *row_pos,
                        int NH, int NKV, int n_slots, int Tmax, int n_splits, int *err, DecodeRowNorm row_norm) {
    griddep_wait();   // programmatic launches (cuda_common.h): the inputs are ready past here
    griddep_launch_dependents();
    constexpr int CHUNKS = HS / 8;                       // lanes per position: 8 channels (16 bytes) each
    constexpr int PER_STEP = DECODE_THREADS / CHUNKS;    // positions the block covers per load
    // 16-byte loads in flight per thread: a block of one head (no GQA) has group-times more
    // blocks beside it, so 4 keep the memory busy with more blocks resident (fewer registers);
    // a block of a GQA group keeps 8
    constexpr int UNROLL = HB == 1 ? 4 : 8;
    constexpr int STRIDE = PER_STEP * UNROLL;            // positions per loop iteration
    static_assert(32 % CHUNKS == 0, "a position's lanes must lie in one warp");
    constexpr bool EARLY = LOADS == DECODE_LOADS_EARLY;   // the first iteration's keys and values in registers
    constexpr bool STAGED = LOADS == DECODE_LOADS_STAGED; // the split's keys and values in shared memory
    constexpr bool EARLY_ROW = LOADS != DECODE_LOADS_DIRECT;   // the row's own loads requested at once
    __shared__ float p_s[HB][DECODE_SPLIT_LEN];
    __shared__ float m_s[HB], l_s[HB];
    __shared__ __align__(16) float partial[DECODE_WARPS][HB][HS];
    static_assert(sizeof(float) * (HB * DECODE_SPLIT_LEN + 2 * HB + DECODE_WARPS * HB * HS) <= 48 * 1024,
                  "a block's static shared memory is at most 48 KiB: DECODE_SPLIT_LEN and the heads a block bound p_s");

    int r = blockIdx.z, split = blockIdx.x;
    int group = NH / NKV, head_batches = (group + HB - 1) / HB;
    int kvh = blockIdx.y / head_batches, hb = blockIdx.y % head_batches;
    int h0 = kvh * group + hb * HB;                      // first query head of this block
    int nh = min(HB, group - hb * HB);                    // query heads in this block
    int slot = row_slot[r], pos = row_pos[r];
    if (slot < 0 || slot >= n_slots || pos < 0 || pos >= Tmax) {
        if (threadIdx.x == 0 && split == 0 && blockIdx.y == 0) atomicOr(err, DECODE_ERR_POSITION);
        return;
    }
    if (pos >= n_splits * DECODE_SPLIT_LEN) {   // the grid does not cover this row's context
        if (threadIdx.x == 0 && split == 0 && blockIdx.y == 0) atomicOr(err, DECODE_ERR_POSITION);
        return;
    }
    int t0 = split * DECODE_SPLIT_LEN;
    int n_keys = min(DECODE_SPLIT_LEN, pos + 1 - t0);
    if (n_keys <= 0) return;   // this split lies past the row's last position (block-uniform)
    int QKV = (NH + 2 * NKV) * HS;
    const float scale = rsqrtf((float)HS);
    const floatX *k_base = k_cache + (((size_t)slot * NKV + kvh) * Tmax + t0) * HS;
    const floatX *v_base = v_cache + (((size_t)slot * NKV + kvh) * Tmax + t0) * HS;
    // thread = (position lane jr, channel chunk c); the CHUNKS lanes of a position are adjacent
    const int c = threadIdx.x % CHUNKS, jr = threadIdx.x / CHUNKS;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

    const floatX *row_qkv = qkv + (size_t)r * QKV;
    // write_kv: the key and value at the row's own position come from qkv (rotated, rounded to
    // bf16), and the block of the first head batch whose split holds that position writes them
    // to the cache
    const int own = write_kv && pos - t0 < n_keys ? pos - t0 : -1;   // the row's position in this split
    // STAGED (DECODE_LOADS_STAGED): every key and value of the split this thread will use is
    // copied into shared memory with cp.async, keys and values as two groups, before anything
    // else is requested. A thread reads back only what it copied itself (position lane jr, chunk
    // c), so waiting for its own groups is enough: no barrier. The staging is what registers
    // hold in the other variants, with no limit on how many loads are in flight.
    floatX *k_stage = STAGED ? (floatX *)dynamic_smem() : NULL;          // (positions, HS), two of them
    floatX *v_stage = STAGED ? k_stage + (size_t)decode_stage_positions(Tmax) * HS : NULL;
    if constexpr (STAGED) {
        for (int j = jr; j < n_keys; j += PER_STEP)
            if (j != own) cp_async16(smem_addr(k_stage + (size_t)j * HS + c * 8), k_base + (size_t)j * HS + c * 8, true);
        cp_async_commit();
        for (int j = jr; j < n_keys; j += PER_STEP)
            if (j != own) cp_async16(smem_addr(v_stage + (size_t)j * HS + c * 8), v_base + (size_t)j * HS + c * 8, true);
        cp_async_commit();
    }
    // EARLY (DECODE_LOADS_EARLY): every load of the first iteration is requested here, before
    // any is used: the row's own key and value, RoPE's table, the query heads, and the keys and
    // values of the first STRIDE positions, so that their latencies overlap instead of following
    // one another (the row's key through RoPE, then the queries, then the keys, then the values).
    // STAGED requests the row's loads here too, its keys and values being on their way already.
    // The same values, summed in the same order.
    const uint4 zero4 = make_uint4(0u, 0u, 0u, 0u);
    uint4 q_raw[EARLY_ROW ? HB : 1], k_first[EARLY ? UNROLL : 1], v_first[EARLY ? UNROLL : 1], own_raw[2];
    float cs[16];
    if constexpr (EARLY_ROW) {
        #pragma unroll
        for (int h = 0; h < HB; h++) q_raw[h] = h < nh ? *(const uint4 *)(row_qkv + (size_t)(h0 + h) * HS + c * 8) : zero4;
        if (own >= 0) {
            own_raw[0] = *(const uint4 *)(row_qkv + (size_t)(NH + kvh) * HS + c * 8);
            own_raw[1] = *(const uint4 *)(row_qkv + (size_t)(NH + NKV + kvh) * HS + c * 8);
        }
        if (write_kv && cos_sin) decode_rope8_table<CHUNKS>(cs, cos_sin, pos, c);
    }
    if constexpr (EARLY) {
        #pragma unroll
        for (int u = 0; u < UNROLL; u++) {
            int j = u * PER_STEP + jr;
            bool stored = j < n_keys && j != own;
            k_first[u] = stored ? *(const uint4 *)(k_base + (size_t)j * HS + c * 8) : zero4;
            v_first[u] = stored ? *(const uint4 *)(v_base + (size_t)j * HS + c * 8) : zero4;
        }
    }
    // the row's RMSNorm factor (DecodeRowNorm), the same in every block of the row
    float rstd = 1.0f;
    if (row_norm.x) {   // block-uniform
        __shared__ float norm_red[DECODE_WARPS];
        const floatX *xr = row_norm.x + (size_t)r * row_norm.C;
        float sq = 0.0f;
        for (int i = threadIdx.x; i < row_norm.C; i += DECODE_THREADS) {
            float v = to_float(xr[i]);
            sq += v * v;
        }
        sq = warp_sum(sq);
        if (lane == 0) norm_red[warp] = sq;
        __syncthreads();
        float total = 0.0f;
        #pragma unroll
        for (int w = 0; w < DECODE_WARPS; w++) total += norm_red[w];
        rstd = rsqrtf(total / row_norm.C + row_norm.eps);
    }
    float k_own[8], v_own[8];
    if (own >= 0) {   // block-uniform
        if constexpr (EARLY_ROW) {
            decode_unpack8(k_own, own_raw[0]);
            decode_unpack8(v_own, own_raw[1]);
        } else {
            decode_load8(k_own, row_qkv + (size_t)(NH + kvh) * HS + c * 8);
            decode_load8(v_own, row_qkv + (size_t)(NH + NKV + kvh) * HS + c * 8);
        }
        if (row_norm.x) {   // scaled, and rounded as the cache will hold them
            #pragma unroll
            for (int e = 0; e < 8; e++) { k_own[e] *= rstd; v_own[e] *= rstd; }
            decode_round8_bf16(v_own);
            if (!cos_sin) decode_round8_bf16(k_own);
        }
        if constexpr (EARLY_ROW) {
            if (cos_sin) decode_rope8_apply<CHUNKS>(k_own, cs, c);
        } else {
            if (cos_sin) decode_rope8_bf16<CHUNKS>(k_own, cos_sin, pos, c);
        }
        if (hb == 0 && jr == 0) {
            size_t at = (((size_t)slot * NKV + kvh) * Tmax + pos) * HS + c * 8;
            decode_store8(k_cache + at, k_own);
            decode_store8(v_cache + at, v_own);
        }
    }

    // this thread's 8 channels of every query head (rotated first with write_kv), pre-scaled
    float q[HB][8];
    #pragma unroll
    for (int h = 0; h < HB; h++) {
        if (h < nh) {
            if constexpr (EARLY_ROW) decode_unpack8(q[h], q_raw[h]);
            else decode_load8(q[h], row_qkv + (size_t)(h0 + h) * HS + c * 8);
            if (row_norm.x) {
                #pragma unroll
                for (int e = 0; e < 8; e++) q[h][e] *= rstd;
                if (!(write_kv && cos_sin)) decode_round8_bf16(q[h]);
            }
            if constexpr (EARLY_ROW) {
                if (write_kv && cos_sin) decode_rope8_apply<CHUNKS>(q[h], cs, c);
            } else {
                if (write_kv && cos_sin) decode_rope8_bf16<CHUNKS>(q[h], cos_sin, pos, c);
            }
            #pragma unroll
            for (int e = 0; e < 8; e++) q[h][e] *= scale;
        } else {
            #pragma unroll
            for (int e = 0; e < 8; e++) q[h][e] = 0.0f;
        }
    }

    // phase 1: scores. UNROLL loads of 16 bytes are issued before the first is used, and the
    // loop bound is the same for the whole warp (the shuffles need every lane).
    if constexpr (STAGED) cp_async_wait<1>();   // this thread's keys
    for (int base = 0; base < n_keys; base += STRIDE) {
        float k8[UNROLL][8];
        #pragma unroll
        for (int u = 0; u < UNROLL; u++) {
            int j = base + u * PER_STEP + jr;
            if (EARLY && base == 0 && j != own) decode_unpack8(k8[u], k_first[u]);   // zero past n_keys
            else if (STAGED && j < n_keys && j != own) decode_load8(k8[u], k_stage + (size_t)j * HS + c * 8);
            else if (j < n_keys && j != own) decode_load8(k8[u], k_base + (size_t)j * HS + c * 8);
            else {
                #pragma unroll
                for (int e = 0; e < 8; e++) k8[u][e] = j == own ? k_own[e] : 0.0f;
            }
        }
        #pragma unroll
        for (int u = 0; u < UNROLL; u++) {
            int j = base + u * PER_STEP + jr;
            #pragma unroll
            for (int h = 0; h < HB; h++) {
                float d = 0.0f;
                #pragma unroll
                for (int e = 0; e < 8; e++) d += q[h][e] * k8[u][e];
                #pragma unroll
                for (int off = 1; off < CHUNKS; off <<= 1) d += __shfl_xor_sync(0xffffffffu, d, off);
                if (c == 0 && j < n_keys) p_s[h][j] = d;
            }
        }
    }
    __syncthreads();

    // phase 2: one warp per head: max, then p = exp(s - max) in place and its sum
    for (int h = warp; h < nh; h += DECODE_WARPS) {
        float m = -INFINITY;
        for (int j = lane; j < n_keys; j += 32) m = fmaxf(m, p_s[h][j]);
        m = warp_max(m);
        float l = 0.0f;
        for (int j = lane; j < n_keys; j += 32) {
            float p = expf(p_s[h][j] - m);
            p_s[h][j] = p;
            l += p;
        }
        l = warp_sum(l);
        if (lane == 0) { m_s[h] = m; l_s[h] = l; }
    }
    __syncthreads();

    // phase 3: o[h] = sum_j p[h][j] v[j], the same thread layout and loads in flight as phase 1
    float acc[HB][8];
    #pragma unroll
    for (int h = 0; h < HB; h++)
        #pragma unroll
        for (int e = 0; e < 8; e++) acc[h][e] = 0.0f;
    if constexpr (STAGED) cp_async_wait<0>();   // and its values
    for (int base = 0; base < n_keys; base += STRIDE) {
        float v8[UNROLL][8];
        #pragma unroll
        for (int u = 0; u < UNROLL; u++) {
            int j = base + u * PER_STEP + jr;
            if (EARLY && base == 0 && j != own) decode_unpack8(v8[u], v_first[u]);
            else if (STAGED && j < n_keys && j != own) decode_load8(v8[u], v_stage + (size_t)j * HS + c * 8);
            else if (j < n_keys && j != own) decode_load8(v8[u], v_base + (size_t)j * HS + c * 8);
            else if (j == own) {
                #pragma unroll
                for (int e = 0; e < 8; e++) v8[u][e] = v_own[e];
            }
        }
        #pragma unroll
        for (int u = 0; u < UNROLL; u++) {
            int j = base + u * PER_STEP + jr;
            if (j >= n_keys) continue;
            #pragma unroll
            for (int h = 0; h < HB; h++) {
                float p = h < nh ? p_s[h][j] : 0.0f;
                #pragma unroll
                for (int e = 0; e < 8; e++) acc[h][e] += p * v8[u][e];
            }
        }
    }
    // lanes with the same chunk c in a warp differ by multiples of CHUNKS
    #pragma unroll
    for (int off = CHUNKS; off < 32; off <<= 1)
        #pragma unroll
        for (int h = 0; h < HB; h++)
            #pragma unroll
            for (int e = 0; e < 8; e++) acc[h][e] += __shfl_xor_sync(0xffffffffu, acc[h][e], off);
    if (lane < CHUNKS) {
        #pragma unroll
        for (int h = 0; h < HB; h++)
            #pragma unroll
            for (int e = 0; e < 8; e++) partial[warp][h][c * 8 + e] = acc[h][e];
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < nh * HS; idx += DECODE_THREADS) {
        int h = idx / HS, i = idx % HS;
        float o = 0.0f;
        #pragma unroll
        for (int w = 0; w < DECODE_WARPS; w++) o += partial[w][h][i];
        int head = h0 + h;
        if (n_splits == 1) {
            out[(size_t)r * NH * HS + (size_t)head * HS + i] = __float2bfloat16(o / l_s[h]);
        } else {
            size_t at = ((size_t)r * NH + head) * n_splits + split;
            part_o[at * HS + i] = o;
            if (i == 0) { part_ml[at * 2] = m_s[h]; part_ml[at * 2 + 1] = l_s[h]; }
        }
    }
}

// grid (NH, N), block HS: merges the splits that hold positions 0..pos of each row and head.
__global__ void decode_attention_combine_kernel(floatX *out, const float *part_o, const float *part_ml,
                                                const int *row_slot, const int *row_pos, int NH, int HS, int n_slots,
                                                int Tmax, int n_splits) {
    griddep_wait();   // programmatic launches (cuda_common.h): the inputs are ready past here
    griddep_launch_dependents();
    int h = blockIdx.x, r = blockIdx.y, i = threadIdx.x;
    int slot = row_slot[r], pos = row_pos[r];
    if (slot < 0 || slot >= n_slots || pos < 0 || pos >= Tmax || pos >= n_splits * DECODE_SPLIT_LEN)
        return;   // flagged by the attention kernel
    int used = pos / DECODE_SPLIT_LEN + 1;
    size_t base = ((size_t)r * NH + h) * n_splits;
    float m = -INFINITY;
    for (int s = 0; s < used; s++) m = fmaxf(m, part_ml[(base + s) * 2]);
    float l = 0.0f, o = 0.0f;
    for (int s = 0; s < used; s++) {
        float w = expf(part_ml[(base + s) * 2] - m);
        l += w * part_ml[(base + s) * 2 + 1];
        o += w * part_o[(base + s) * HS + i];
    }
    out[(size_t)r * NH * HS + (size_t)h * HS + i] = __float2bfloat16(o / l);
}

// grid ceil(N * NH / 64), block 64: thread = (row, head), serial online softmax over 0..pos.
template <int HS>
__global__ void decode_attention_reference_kernel(floatX *out, const floatX *qkv, const floatX *k_cache,
                                                  const floatX *v_cache, const int *row_slot, const int *row_pos,
                                                  int N, int NH, int NKV, int n_slots, int Tmax, int *err) {
    int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= N * NH) return;
    int r = idx / NH, h = idx % NH, kvh = h / (NH / NKV);
    int slot = row_slot[r], pos = row_pos[r];
    if (slot < 0 || slot >= n_slots || pos < 0 || pos >= Tmax) { atomicOr(err, DECODE_ERR_POSITION); return; }
    const floatX *q = qkv + (size_t)r * (NH + 2 * NKV) * HS + (size_t)h * HS;
    const floatX *kb = k_cache + ((size_t)slot * NKV + kvh) * Tmax * HS;
    const floatX *vb = v_cache + ((size_t)slot * NKV + kvh) * Tmax * HS;
    float scale = 1.0f / sqrtf((float)HS);
    float o[HS];
    for (int i = 0; i < HS; i++) o[i] = 0.0f;
    float m = -INFINITY, l = 0.0f;
    for (int t = 0; t <= pos; t++) {
        float s = 0.0f;
        for (int i = 0; i < HS; i++) s += to_float(q[i]) * to_float(kb[(size_t)t * HS + i]);
        s *= scale;
        float m_new = fmaxf(m, s);
        float correction = expf(m - m_new), p = expf(s - m_new);
        l = l * correction + p;
        for (int i = 0; i < HS; i++) o[i] = o[i] * correction + p * to_float(vb[(size_t)t * HS + i]);
        m = m_new;
    }
    for (int i = 0; i < HS; i++) out[(size_t)r * NH * HS + (size_t)h * HS + i] = __float2bfloat16(o[i] / l);
}

// Number of splits for contexts up to max_positions.
static inline int decode_attention_splits(int max_positions) { return ceil_div(max_positions, DECODE_SPLIT_LEN); }

// How the fast kernel requests its keys and values (DECODE_LOADS_*; the same results, bit for
// bit, in all three): DIRECT by default. rollout_kernels and bench_rollout time them.
static int decode_attention_loads = DECODE_LOADS_DIRECT;

// Whether a block of the staged variant (head size HS, HB heads) fits in the device's shared
// memory for a cache of Tmax positions: its keys and values and the kernel's own arrays.
template <int HS, int HB>
static inline int decode_staged_fits(int Tmax) {
    static int optin = -1;
    static size_t own = 0;   // the kernel's static __shared__ arrays
    if (optin < 0) {
        int device = 0;
        cudaCheck(cudaGetDevice(&device));
        cudaCheck(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
        cudaFuncAttributes attr;
        cudaCheck(cudaFuncGetAttributes(&attr, decode_attention_kernel<HS, HB, DECODE_LOADS_STAGED>));
        own = attr.sharedSizeBytes;
    }
    return decode_stage_bytes(Tmax, HS) + own <= (size_t)optin;
}

// The fast kernel with decode_attention_loads' variant; the staged one where it fits (else the
// direct one: the same bits), its shared-memory limit raised on first use (before a graph's
// capture, in the engine: its first steps run eagerly).
template <int HS, int HB>
static inline void decode_attention_fast_launch(dim3 grid, floatX *out, float *part_o, float *part_ml, const floatX *qkv,
                                                floatX *k_cache, floatX *v_cache, const float *cos_sin, int write_kv,
                                                const int *row_slot, const int *row_pos, int NH, int NKV, int n_slots,
                                                int Tmax, int n_splits, int *err, DecodeRowNorm row_norm, cudaStream_t stream) {
    int loads = decode_attention_loads;
    if (loads == DECODE_LOADS_STAGED && !decode_staged_fits<HS, HB>(Tmax)) loads = DECODE_LOADS_DIRECT;
    if (loads == DECODE_LOADS_EARLY) {
        decode_attention_kernel<HS, HB, DECODE_LOADS_EARLY><<<grid, DECODE_THREADS, 0, stream>>>(out, part_o, part_ml, qkv, k_cache, v_cache, cos_sin, write_kv, row_slot, row_pos, NH, NKV, n_slots, Tmax, n_splits, err, row_norm);
    } else if (loads == DECODE_LOADS_STAGED) {
        size_t bytes = decode_stage_bytes(Tmax, HS);
        // without the attribute a block may take 48 KiB less its static arrays: raise it always
        static size_t allowed = 0;
        if (bytes > allowed) {
            cudaCheck(cudaFuncSetAttribute(decode_attention_kernel<HS, HB, DECODE_LOADS_STAGED>,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
            allowed = bytes;
        }
        decode_attention_kernel<HS, HB, DECODE_LOADS_STAGED><<<grid, DECODE_THREADS, bytes, stream>>>(out, part_o, part_ml, qkv, k_cache, v_cache, cos_sin, write_kv, row_slot, row_pos, NH, NKV, n_slots, Tmax, n_splits, err, row_norm);
    } else {
        decode_attention_kernel<HS, HB, DECODE_LOADS_DIRECT><<<grid, DECODE_THREADS, 0, stream>>>(out, part_o, part_ml, qkv, k_cache, v_cache, cos_sin, write_kv, row_slot, row_pos, NH, NKV, n_slots, Tmax, n_splits, err, row_norm);
    }
}

template <int HS>
static inline void decode_attention_launch(floatX *out, float *part_o, float *part_ml, const floatX *qkv,
                                           floatX *k_cache, floatX *v_cache, const float *cos_sin, int write_kv,
                                           const int *row_slot, const int *row_pos, int N, int NH, int NKV,
                                           int n_slots, int Tmax, int n_splits, int reference, int *err,
                                           DecodeRowNorm row_norm, cudaStream_t stream) {
    if (reference) {
        decode_attention_reference_kernel<HS><<<ceil_div((long long)N * NH, 64), 64, 0, stream>>>(
            out, qkv, k_cache, v_cache, row_slot, row_pos, N, NH, NKV, n_slots, Tmax, err);
        cudaCheckLaunch();
        return;
    }
    int group = NH / NKV, hb = decode_heads_per_block(group);
    dim3 grid(n_splits, NKV * ceil_div(group, hb), N);
    switch (hb) {
    case 1: decode_attention_fast_launch<HS, 1>(grid, out, part_o, part_ml, qkv, k_cache, v_cache, cos_sin, write_kv, row_slot, row_pos, NH, NKV, n_slots, Tmax, n_splits, err, row_norm, stream); break;
    case 2: decode_attention_fast_launch<HS, 2>(grid, out, part_o, part_ml, qkv, k_cache, v_cache, cos_sin, write_kv, row_slot, row_pos, NH, NKV, n_slots, Tmax, n_splits, err, row_norm, stream); break;
    case 4: decode_attention_fast_launch<HS, 4>(grid, out, part_o, part_ml, qkv, k_cache, v_cache, cos_sin, write_kv, row_slot, row_pos, NH, NKV, n_slots, Tmax, n_splits, err, row_norm, stream); break;
    default: decode_attention_fast_launch<HS, 8>(grid, out, part_o, part_ml, qkv, k_cache, v_cache, cos_sin, write_kv, row_slot, row_pos, NH, NKV, n_slots, Tmax, n_splits, err, row_norm, stream); break;
    }
    cudaCheckLaunch();
    if (n_splits > 1) {
        decode_attention_combine_kernel<<<dim3(NH, N), HS, 0, stream>>>(out, part_o, part_ml, row_slot, row_pos, NH, HS,
                                                                        n_slots, Tmax, n_splits);
        cudaCheckLaunch();
    }
}

// out (N, NH*HS) bf16 for the rows of qkv (N, QKV) against one layer's cache (see the file
// comment). n_splits must cover the rows: n_splits * DECODE_SPLIT_LEN >= every row's pos + 1
// (a row beyond sets DECODE_ERR_POSITION);
// part_o / part_ml hold N * NH * n_splits * HS and N * NH * n_splits * 2 floats when n_splits > 1.
// write_kv = 0: the cache already holds every row's key and value (rows_kv_write ran), q is
// rotated. write_kv = 1: rows_kv_write's work is done here: q and the row's own key are rotated
// with cos_sin (NULL: no RoPE), and the key and value at (slot, pos) are written to the cache;
// the rows' slots must then differ (a row must not read a position another row of the same call
// writes), as in a decode step. The reference kernel needs write_kv = 0. row_norm (the fast kernel
// with write_kv only; NULL: none): the rows' RMSNorm, applied to q, k and v (DecodeRowNorm).
static inline void decode_attention(floatX *out, float *part_o, float *part_ml, const floatX *qkv, floatX *k_cache,
                                    floatX *v_cache, const float *cos_sin, int write_kv, const int *row_slot,
                                    const int *row_pos, int N, int NH, int NKV, int HS, int n_slots, int Tmax,
                                    int n_splits, int reference, int *err, cudaStream_t stream,
                                    const DecodeRowNorm *row_norm = NULL) {
    DecodeRowNorm norm = {NULL, 0, 0.0f};
    if (row_norm) norm = *row_norm;
    cudaRequire(norm.x == NULL || (write_kv && !reference && norm.C >= 1),
                "decode_attention: the rows' norm needs the fast kernel writing the cache");
    cudaRequire(N >= 1 && N <= 65535, "decode_attention: rows must be in 1..65535 (grid z)");
    cudaRequire(NKV >= 1 && NH % NKV == 0, "decode_attention: n_head must be a multiple of n_kv_head");
    cudaRequire(n_splits >= 1 && n_splits <= 65535, "decode_attention: n_splits must be in 1..65535");
    cudaRequire(n_splits == 1 || (part_o != NULL && part_ml != NULL), "decode_attention: several splits need partial buffers");
    cudaRequire(!(reference && write_kv), "decode_attention: the reference kernel reads a written cache (write_kv = 0)");
    cudaRequire((((uintptr_t)qkv | (uintptr_t)k_cache | (uintptr_t)v_cache) & 15) == 0,
                "decode_attention: qkv and the KV cache must be 16-byte aligned (16-byte loads)");
    switch (HS) {
    case 16: decode_attention_launch<16>(out, part_o, part_ml, qkv, k_cache, v_cache, cos_sin, write_kv, row_slot, row_pos, N, NH, NKV, n_slots, Tmax, n_splits, reference, err, norm, stream); break;
    case 32: decode_attention_launch<32>(out, part_o, part_ml, qkv, k_cache, v_cache, cos_sin, write_kv, row_slot, row_pos, N, NH, NKV, n_slots, Tmax, n_splits, reference, err, norm, stream); break;
    case 64: decode_attention_launch<64>(out, part_o, part_ml, qkv, k_cache, v_cache, cos_sin, write_kv, row_slot, row_pos, N, NH, NKV, n_slots, Tmax, n_splits, reference, err, norm, stream); break;
    case 128: decode_attention_launch<128>(out, part_o, part_ml, qkv, k_cache, v_cache, cos_sin, write_kv, row_slot, row_pos, N, NH, NKV, n_slots, Tmax, n_splits, reference, err, norm, stream); break;
    default: cudaRequire(0, "decode_attention: head_dim must be 16, 32, 64 or 128");
    }
}
#endif
