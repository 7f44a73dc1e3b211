/*
 * Products for the decode step on the tensor cores: out (M, OC) bf16 = act(inp (M, IC) bf16 @
 * W (OC, IC)^T + bias), act the identity or GELU (tanh form), for few rows (M <= 64: one row per
 * sequence), fp32 accumulation. Same result as matmul_forward (matmul.cuh) up to the order of the
 * fp32 sums; CPU reference: matmul_forward in matmul.c.
 *
 * A decode step's products are too small for one output tile per SM: GPT-2's attention projection
 * has 768 x 768 weights, 1.2 MB, which the whole GPU reads in well under a microsecond, and a
 * product that puts one tile of 128 outputs on each of 6 SMs waits on their loads instead. Here
 * the weights are cut finely enough that every SM has loads in flight at once:
 *   - a block owns DM_ROWS (16) output features and one of `splits` slices of the K dimension;
 *     its DM_WARPS warps take the slice's 32-wide chunks in turn, so each warp issues one 16-byte
 *     load of each of its two weight rows and of each input row per chunk;
 *   - per chunk a warp does 2 x ceil(M / 8) mma.m16n8k16 products, D^T (16 features x 8 rows)
 *     += W (16 x 16) inp^T (16 x 8);
 *   - the warps' sums are added in warp order in shared memory; with splits > 1 each block writes
 *     its partial (16 x M) to `partial`, and the last block of a feature tile to finish (a counter
 *     per tile) adds the splits' partials in split order, so the result does not depend on which
 *     block finished when. It resets the counter, so the next launch (a CUDA graph replay) finds it 0.
 *
 * The k order inside a product is free as long as A and B agree, so each lane's 16-byte load of 8
 * consecutive k serves as its fragment of two k-steps: lane (g = lane / 4, c = lane % 4) loads
 * k = 8c .. 8c+7 of its row; k-step 0 uses 8c .. 8c+3 as the fragment's logical k = 2c, 2c+1,
 * 2c+8, 2c+9, and k-step 1 uses 8c+4 .. 8c+7 the same way. (Fragment layouts: attention_flash.cuh.)
 *
 * Needs IC % 32 == 0, OC % 16 == 0, M <= 64 and 16-byte aligned inp and weight
 * (decode_matmul_supports); the engine uses matmul_forward otherwise.
 *
 * decode_matmul_swiglu takes the MLP's fc output (M, 2 IC), gate | up, instead of inp, and
 * forms each input element as it loads it: bf16(silu(gate) * up), with swiglu.cuh's expressions
 * (swiglu_math.cuh), so the product is the same bit for bit as swiglu_forward's output through
 * decode_matmul, without that kernel's launch and its round trip through memory.
 */
#ifndef LLMC_DECODE_MATMUL_CUH
#define LLMC_DECODE_MATMUL_CUH
#include <stdint.h>
#include "cuda_common.h"
#include "swiglu_math.cuh"

#define DM_WARPS 4
#define DM_ROWS 16       // output features per block
#define DM_CHUNK 32      // K per warp step: two mma k-steps
#define DM_MAX_M 64
#define DM_PREFETCH 4    // chunks whose weights a warp loads before multiplying
static_assert(DM_ROWS == 16, "a block's features are the mma's 16 rows: g and g + 8 for g < 8");
static_assert(DM_CHUNK == 32, "a warp step: lane c's 16-byte load of k = 8c .. 8c+7, c < 4, two k-steps of 16");
static_assert(DM_MAX_M <= 8 * 8, "the widest instantiation, NT = 8 n-tiles of 8 rows, covers M");

#ifndef DECODE_MATMUL_EMULATION
// d (16 x 8 fp32) += a (16 x 16 bf16) b (16 x 8 bf16): mma.sync m16n8k16, row.col
__device__ __forceinline__ void dm_mma(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                       uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
// a partial another block wrote: read through L2, not this SM's L1
__device__ __forceinline__ float dm_load_partial(const float *p) { return __ldcg(p); }
#endif

// the finished output value: bias added, then GELU (tanh form, as gelu.cuh) when asked
__device__ __forceinline__ float dm_finish(float sum, const floatX *bias, int oc, int gelu) {
    float x = bias ? sum + to_float(bias[oc]) : sum;
    if (!gelu) return x;
    float cube = 0.044715f * x * x * x;
    return 0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + cube)));
}

// 8 consecutive input elements k .. k+7 of a row as the mma's bf16 pairs: loaded, or with
// SWIGLU_IN formed from the row's gate (columns k ..) and up (columns IC + k ..) of a (M, 2 IC) fc
template <int SWIGLU_IN>
__device__ __forceinline__ uint4 dm_load_input(const floatX *row, int k, int IC) {
    if (!SWIGLU_IN) return *reinterpret_cast<const uint4 *>(row + k);
    uint4 g = *reinterpret_cast<const uint4 *>(row + k), u = *reinterpret_cast<const uint4 *>(row + IC + k);
    const uint32_t gw[4] = {g.x, g.y, g.z, g.w}, uw[4] = {u.x, u.y, u.z, u.w};
    uint32_t x[4];
#pragma unroll
    for (int i = 0; i < 4; i++) {
        __nv_bfloat162 gp = *reinterpret_cast<const __nv_bfloat162 *>(&gw[i]);
        __nv_bfloat162 up = *reinterpret_cast<const __nv_bfloat162 *>(&uw[i]);
        float2 gf = __bfloat1622float2(gp), uf = __bfloat1622float2(up);
        __nv_bfloat162 o = __floats2bfloat162_rn(swiglu_out(gf.x, uf.x), swiglu_out(gf.y, uf.y));
        x[i] = *reinterpret_cast<const uint32_t *>(&o);
    }
    return make_uint4(x[0], x[1], x[2], x[3]);
}

// grid (OC / 16) * splits: block = tile * splits + split. NT n-tiles of 8 rows cover M. With
// SWIGLU_IN, inp is (M, 2 IC) (decode_matmul_swiglu).
template <int NT, int SWIGLU_IN>
__global__ void __launch_bounds__(DM_WARPS * 32)
decode_matmul_kernel(floatX *out, float *partial, unsigned int *counters, const floatX *inp, const floatX *weight,
                     const floatX *bias, int M, int IC, int OC, int splits, int gelu) {
    // each warp's sums (DM_ROWS features x 8 NT input rows). The + 1 makes the row stride odd: the
    // sum below reads dm_sums[w][r][n] with consecutive threads on consecutive r, which an odd
    // stride puts in 16 different banks; a stride of 8 NT floats would put them in 32 / gcd(8 NT,
    // 32) banks (a single one at NT = 4 and 8).
    __shared__ float dm_sums[DM_WARPS][DM_ROWS][8 * NT + 1];
    __shared__ int dm_last;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane >> 2, c = lane & 3;
    const int tile = blockIdx.x / splits, split = blockIdx.x % splits, oc0 = tile * DM_ROWS;
    const int chunks = IC / DM_CHUNK;
    const int chunk0 = split * chunks / splits, chunk1 = (split + 1) * chunks / splits;

    float acc[NT][4];
#pragma unroll
    for (int t = 0; t < NT; t++) acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.0f;
    const floatX *w_row = weight + (size_t)(oc0 + g) * IC + 8 * c;   // rows g and g + 8 of the tile
    // The warp's weight loads for up to DM_PREFETCH chunks are issued before the first product,
    // so they wait on memory together, not one after another (the inputs, read by every block,
    // come from L2). The chunks are still taken in increasing order, one after another. The
    // first group's weights are requested before griddep_wait: no kernel writes them, so under
    // a programmatic launch (cuda_common.h) they stream in while the previous kernel finishes.
    uint4 wa[DM_PREFETCH], wb[DM_PREFETCH];
    const int first = chunk0 + warp;
#pragma unroll
    for (int p = 0; p < DM_PREFETCH; p++) {
        int q = first + p * DM_WARPS;
        if (q < chunk1) {
            wa[p] = *reinterpret_cast<const uint4 *>(w_row + q * DM_CHUNK);
            wb[p] = *reinterpret_cast<const uint4 *>(w_row + (size_t)8 * IC + q * DM_CHUNK);
        }
    }
    griddep_wait();   // the input (and, for the split sums, the counters and partials) past here
    griddep_launch_dependents();
    for (int q0 = first; q0 < chunk1; q0 += DM_PREFETCH * DM_WARPS) {
        if (q0 != first) {
#pragma unroll
            for (int p = 0; p < DM_PREFETCH; p++) {
                int q = q0 + p * DM_WARPS;
                if (q < chunk1) {
                    wa[p] = *reinterpret_cast<const uint4 *>(w_row + q * DM_CHUNK);
                    wb[p] = *reinterpret_cast<const uint4 *>(w_row + (size_t)8 * IC + q * DM_CHUNK);
                }
            }
        }
#pragma unroll
        for (int p = 0; p < DM_PREFETCH; p++) {
            int q = q0 + p * DM_WARPS;
            if (q >= chunk1) break;   // warp-uniform: the mma needs the whole warp
            uint4 x[NT];
#pragma unroll
            for (int t = 0; t < NT; t++) {
                int n = 8 * t + g;
                x[t] = make_uint4(0u, 0u, 0u, 0u);
                if (n < M) x[t] = dm_load_input<SWIGLU_IN>(inp + (size_t)n * (SWIGLU_IN ? 2 * IC : IC), q * DM_CHUNK + 8 * c, IC);
            }
#pragma unroll
            for (int t = 0; t < NT; t++) {
                dm_mma(acc[t], wa[p].x, wb[p].x, wa[p].y, wb[p].y, x[t].x, x[t].y);   // k = 8c .. 8c+3
                dm_mma(acc[t], wa[p].z, wb[p].z, wa[p].w, wb[p].w, x[t].z, x[t].w);   // k = 8c+4 .. 8c+7
            }
        }
    }
    // acc[t]: D^T[g][8t + 2c .. +1] and D^T[g + 8][8t + 2c .. +1]
#pragma unroll
    for (int t = 0; t < NT; t++) {
        dm_sums[warp][g][8 * t + 2 * c] = acc[t][0];
        dm_sums[warp][g][8 * t + 2 * c + 1] = acc[t][1];
        dm_sums[warp][g + 8][8 * t + 2 * c] = acc[t][2];
        dm_sums[warp][g + 8][8 * t + 2 * c + 1] = acc[t][3];
    }
    __syncthreads();
    // output (n, oc0 + r) for i = n * 16 + r: consecutive threads write consecutive features
    for (int i = threadIdx.x; i < DM_ROWS * M; i += blockDim.x) {
        int n = i / DM_ROWS, r = i % DM_ROWS;
        float sum = 0.0f;
        for (int w = 0; w < DM_WARPS; w++) sum += dm_sums[w][r][n];
        if (splits == 1) out[(size_t)n * OC + oc0 + r] = __float2bfloat16(dm_finish(sum, bias, oc0 + r, gelu));
        else partial[((size_t)split * M + n) * OC + oc0 + r] = sum;
    }
    if (splits == 1) return;
    __threadfence();   // this block's partial is visible before its count
    __syncthreads();
    if (threadIdx.x == 0) dm_last = atomicAdd(&counters[tile], 1u) == (unsigned int)(splits - 1);
    __syncthreads();
    if (!dm_last) return;
    __threadfence();   // and the other blocks' partials before their sum
    for (int i = threadIdx.x; i < DM_ROWS * M; i += blockDim.x) {
        int n = i / DM_ROWS, r = i % DM_ROWS;
        float sum = 0.0f;
        for (int k = 0; k < splits; k++) sum += dm_load_partial(partial + ((size_t)k * M + n) * OC + oc0 + r);
        out[(size_t)n * OC + oc0 + r] = __float2bfloat16(dm_finish(sum, bias, oc0 + r, gelu));
    }
    if (threadIdx.x == 0) counters[tile] = 0;
}

// The K splits for a product: enough blocks for two per SM, at most one per chunk.
static inline int decode_matmul_splits(int IC, int OC, int sms) {
    int tiles = OC / DM_ROWS, chunks = IC / DM_CHUNK;
    int splits = ceil_div(2 * sms, tiles);
    return splits < 1 ? 1 : splits > chunks ? chunks : splits;
}
// Floats of `partial` and counters (unsigned ints, zeroed once by the caller) a product needs.
static inline size_t decode_matmul_partial_floats(int M, int IC, int OC, int sms) {
    return (size_t)decode_matmul_splits(IC, OC, sms) * M * OC;
}
static inline int decode_matmul_counters(int OC) { return OC / DM_ROWS; }
static inline int decode_matmul_supports(int M, int IC, int OC, const void *inp, const void *weight) {
    return M >= 1 && M <= DM_MAX_M && IC % DM_CHUNK == 0 && OC % DM_ROWS == 0 && (((uintptr_t)inp | (uintptr_t)weight) & 15) == 0;
}

template <int SWIGLU_IN>
static inline void decode_matmul_launch(floatX *out, float *partial, unsigned int *counters, const floatX *inp,
                                        const floatX *weight, const floatX *bias, int M, int IC, int OC, int gelu,
                                        int sms, cudaStream_t stream) {
    cudaRequire(decode_matmul_supports(M, IC, OC, inp, weight), "decode_matmul: needs M <= 64, IC % 32 == 0, OC % 16 == 0, 16-byte aligned operands");
    int splits = decode_matmul_splits(IC, OC, sms), blocks = OC / DM_ROWS * splits, nt = ceil_div(M, 8);
    if (nt <= 1)
        decode_matmul_kernel<1, SWIGLU_IN><<<blocks, DM_WARPS * 32, 0, stream>>>(out, partial, counters, inp, weight, bias, M, IC, OC, splits, gelu);
    else if (nt <= 2)
        decode_matmul_kernel<2, SWIGLU_IN><<<blocks, DM_WARPS * 32, 0, stream>>>(out, partial, counters, inp, weight, bias, M, IC, OC, splits, gelu);
    else if (nt <= 4)
        decode_matmul_kernel<4, SWIGLU_IN><<<blocks, DM_WARPS * 32, 0, stream>>>(out, partial, counters, inp, weight, bias, M, IC, OC, splits, gelu);
    else
        decode_matmul_kernel<8, SWIGLU_IN><<<blocks, DM_WARPS * 32, 0, stream>>>(out, partial, counters, inp, weight, bias, M, IC, OC, splits, gelu);
    cudaCheckLaunch();
}

// out (M, OC) = act(inp @ weight^T + bias); bias may be NULL; gelu 0 or 1. partial holds
// decode_matmul_partial_floats, counters decode_matmul_counters zeroed unsigned ints; sms is the
// GPU's multiprocessor count (it sets the K splits).
static inline void decode_matmul(floatX *out, float *partial, unsigned int *counters, const floatX *inp,
                                 const floatX *weight, const floatX *bias, int M, int IC, int OC, int gelu, int sms,
                                 cudaStream_t stream) {
    decode_matmul_launch<0>(out, partial, counters, inp, weight, bias, M, IC, OC, gelu, sms, stream);
}
// out (M, OC) = swiglu(fc) @ weight^T + bias for fc (M, 2 IC), gate | up: as swiglu_forward into
// an (M, IC) buffer and then decode_matmul, bit for bit, in one launch.
static inline void decode_matmul_swiglu(floatX *out, float *partial, unsigned int *counters, const floatX *fc,
                                        const floatX *weight, const floatX *bias, int M, int IC, int OC, int sms,
                                        cudaStream_t stream) {
    decode_matmul_launch<1>(out, partial, counters, fc, weight, bias, M, IC, OC, 0, sms, stream);
}
#endif
