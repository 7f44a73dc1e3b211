/*
 * Causal self-attention with grouped-query heads on the tensor cores (FlashAttention-2 style),
 * bf16 operands with fp32 accumulation, forward and backward. Same contract as attention.cuh:
 *
 *   qkv  (B, T, QKV) bf16, rows q (NH*HS) | k (NKV*HS) | v (NKV*HS); query head h reads key/value
 *        head h / (NH / NKV). Scores s = q.k / sqrt(HS), softmax over keys t2 <= t.
 *   out  (B, T, NH*HS) bf16; lse (B, NH, T) fp32, the natural log-sum-exp of each query row's
 *        scores (the only softmax statistic kept: no (T, T) matrix exists in memory).
 *   dqkv (B, T, QKV) bf16, every element written; D (B, NH, T) fp32 scratch.
 * HS must be 64 or 128 (attention_flash_supports); attention.cuh covers the other head sizes.
 * CPU reference: attention_forward / attention_backward in ops_cpu.c (which keep the (T, T)
 * probabilities instead of lse; the harness dev/cuda/attention_flash.cu computes lse from them in
 * double).
 *
 * A first reading: attention.cuh computes the same on the CUDA cores, one thread a query row, in
 * a few hundred lines; this file is its tensor-core form, with several variants of each pass.
 * What runs with flash_default_config (the configuration before any tuning) is the mma.sync
 * forward, flash_attention_forward_kernel<HS, 1, 0, 0, ROPE> (one 16-row tile a warp), and the
 * two mma.sync backward passes flash_attention_backward_dq_kernel<HS, 1, 0, 0> and
 * flash_attention_backward_dkv_kernel<HS, 0, 0, 0, 1>, side by side on two streams, grid order
 * grouped. The CUDA model times other configurations on its first forward (attention_flash_tune:
 * at head size 128 only the grid orders and whether the passes run side by side;
 * TRAIN_MORA_FLASH_TUNE=0 keeps the defaults) and keeps the fastest that gives the defaults'
 * bits. The backward's variants are listed at FlashDqVariant and FlashDkvVariant, the
 * forward's at attention_flash_forward_rope.
 *
 * Algorithm (one block = 4 warps; a warp owns 16 rows of the block's 64, so the softmax row
 * statistics never leave the warp):
 * Grid order (flash_forward_lpt, flash_backward_lpt; flash_block). Blocks are dispatched x
 * fastest, and every kernel takes its tiles longest first within the order (the forward's and
 * dQ's last query tiles, dK/dV's first key tiles walk the most tiles):
 *   grouped  grid (T/64, heads, B): a (head, batch) group's tiles one after another, so the
 *            blocks running together share their head's keys and values (or queries) in L2;
 *   lpt      grid (heads, B, T/64): every long block, of every head and batch element, before any
 *            short one, so the last blocks to finish are short (the LPT rule) instead of a long
 *            block that came last in its group; the blocks running together read other heads.
 * The same blocks compute the same values either way; which is faster is the tuner's to find.
 *   forward  grid as above, T/64 query tiles. The block's 64 query rows (or 128, two 16-row tiles a warp:
 *            flash_forward_row_tiles) against key tiles of 64 rows, from
 *            key 0 up to the diagonal: S = Q K^T on the tensor cores, online softmax in base 2
 *            (a row's reference m and sum l of 2^(s - m); m follows the row's running max, moved
 *            only when a tile's max passes it by more than FLASH_MAX_SLACK
 *            (flash_forward_max_slack), and then l and the output accumulator are rescaled by
 *            2^(m_old-m_new): after the first tiles that is rare, and skipped when no row of the
 *            warp moves), O += P V with P rounded to bf16.
 *            out = O / l, lse = (m + log2 l) ln 2.
 *   backward D = rowsum(dout * out) (preprocess), then two passes with no atomics, so the result
 *            is bitwise the same on every run:
 *            dK/dV  grid over (NKV, B, T/64 key tiles): the block's 64 key rows stay in shared memory while it
 *                   walks every query head of its group and every query tile at or after the key
 *                   tile. Per tile, with the key side as the M dimension of the products:
 *                   S^T = K Q^T, P^T = 2^(S^T log2e - lse log2e), dP^T = V dO^T,
 *                   dS^T = P^T (dP^T - D), dV += P^T dO, dK += dS^T Q (scaled by 1/sqrt(HS) at the end).
 *            dQ     grid over (NH, B, T/64 query tiles): the block's 64 query rows (or 128, two 16-row tiles a warp
 *                   taking each key tile in two 32-key steps, bitwise the same dQ:
 *                   flash_dq_row_tiles) against key tiles up to the diagonal: S = Q K^T, P,
 *                   dP = dO V^T, dS = P (dP - D), dQ += dS K.
 *            The dQ pass recomputes S and dP (7 products instead of FlashAttention-2's 5 with
 *            atomic dQ adds): the price of a deterministic backward. The two passes run side by
 *            side on two streams (flash_backward_side_by_side).
 *
 * Tensor-core instruction: mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 (sm_80 and later,
 * so the portable compute_80 build runs it too). Fragment layouts, with lane = 0..31,
 * g = lane / 4 (group) and c = lane % 4 (thread in group); a 32-bit register holds two bf16, the
 * lower column (or k) index in the low half:
 *   A (16 x 16, row major)  a0 = A[g][2c..2c+1]    a1 = A[g+8][2c..2c+1]
 *                           a2 = A[g][2c+8..2c+9]  a3 = A[g+8][2c+8..2c+9]
 *   B (16 x 8, k x n)       b0 = B[2c..2c+1][g]    b1 = B[2c+8..2c+9][g]
 *   C (16 x 8, fp32)        c0, c1 = C[g][2c..2c+1]   c2, c3 = C[g+8][2c..2c+1]
 * An accumulator tile S (16 x 16j) becomes the A operand of the next product without leaving
 * registers: for k-block kb, a0/a1 are the c0c1/c2c3 pairs of S's n-block 2kb and a2/a3 those
 * of n-block 2kb+1 (flash_acc_to_a).
 *
 * Operands come from shared memory through ldmatrix.x4 (four 8 x 8 bf16 matrices; lanes 8i..8i+7
 * give the row addresses of matrix i; register i of a lane receives row lane/4, columns 2(lane%4)
 * and +1 of matrix i, or with .trans its transpose, i.e. column lane/4 of rows 2(lane%4), +1):
 *   A from a row-major (rows, dims) tile          lane row = lane % 16, col = (lane / 16) * 8
 *   B = X^T with X a (n rows, k dims) tile        lane row = lane % 8 + (lane / 16) * 8,
 *     (S = Q K^T: X = K)                            col = ((lane / 8) % 2) * 8,
 *                                                   registers: b0, b1 of n-block 0, b0, b1 of n-block 1
 *   B = X with X a (k rows, n dims) tile, .trans  lane row = lane % 8 + ((lane / 8) % 2) * 8,
 *     (O = P V: X = V)                              col = (lane / 16) * 8, same register order
 * Warpgroup variants (flash_forward_wgmma, flash_dq_wgmma, flash_dkv_wgmma; head size 64, sm_90a):
 * the block's 4 warps are one warpgroup and each product is wgmma.m64n64k16 (flash_wgmma), with
 * A from registers (Q, dO, K, V fragments loaded once, P and dS from the accumulators) and B read
 * by the tensor cores from shared-memory tiles in the no-swizzle core-matrix layout through a
 * matrix descriptor (flash_load_tile_wg): K and V in the forward and the dQ pass, Q and dO in the
 * dK/dV pass. B is no longer read by every warp through ldmatrix, which is what bounds the
 * mma.sync backward by shared-memory bandwidth. Each output element sums the same products in
 * the same order of k; whether the tensor cores round them as mma.sync does decides whether the
 * tuner, which takes only configurations with the defaults' bits, may pick them. These wait for
 * each batch of products before the arithmetic that reads it; the pipelined forward
 * (flash_attention_forward_pipelined_kernel) issues tile j's S = Q K^T and tile j - 1's O += P V
 * together and waits only for S before its softmax, so the exponentials overlap the tensor cores.
 * Shared-memory tiles are row-major with rows of HS + 8 bf16 (16 bytes of padding): the eight
 * 16-byte rows an ldmatrix phase reads then start 4 banks apart and cover all 32 banks, so
 * ldmatrix, the 16-byte cp.async writes and the epilogue's staging are free of bank conflicts.
 *
 * Tiles are loaded with cp.async (16-byte pieces, rows at or past T zero-filled) two stages deep:
 * the next tile streams in while the current one is multiplied. Causal and T-edge masking is done
 * per element on the tiles that cross the diagonal or the end of the sequence; every query row
 * sees key 0, so its running max is finite after the first tile (a fully masked row would still
 * give 0, not NaN: the exponent's reference is 0 while the max is -inf).
 */
#ifndef LLMC_ATTENTION_FLASH_CUH
#define LLMC_ATTENTION_FLASH_CUH
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "cuda_common.h"
#include "rope_math.cuh"

#define FLASH_THREADS 128   // 4 warps
#define FLASH_ROWS 64       // query rows (forward, dQ) or key rows (dK/dV) per block, 16 per warp
#define FLASH_KEYS 64       // key rows per tile in the forward and dQ passes
#define FLASH_PAD 8         // bf16 of padding per shared-memory row (see the header comment)
#define FLASH_LOG2E 1.4426950408889634f
#define FLASH_LN2 0.6931471805599453f
#define FLASH_MAX_SLACK 8.0f  // the forward's softmax reference trails a row's max by at most this (log2)
// The forward's softmax reference trails a row's max by at most this (log2 units; see the
// kernel): FLASH_MAX_SLACK, or 0 for a reference that is the running max itself, rescaled at
// every move (what the kernel did before; the harness and bench_train time both). Not part of
// the tuned configuration: the two give other bits.
static float flash_forward_max_slack = FLASH_MAX_SLACK;

static inline int attention_flash_supports(int HS) { return HS == 64 || HS == 128; }

// ---------------------------------------------------------------------------------------------
// PTX wrappers (sm_80+; the cp.async copies are cuda_common.h's). test/attention_flash_emu.cpp
// defines ATTENTION_FLASH_EMULATION and provides these (and the dynamic shared memory and
// cp.async) from the PTX ISA's definitions, so that the kernels below run on the CPU, lane by
// lane, on a machine without a GPU.

#ifndef ATTENTION_FLASH_EMULATION
// the block's dynamic shared memory
__device__ __forceinline__ unsigned char *flash_dynamic_smem() {
    extern __shared__ __align__(16) unsigned char flash_smem[];
    return flash_smem;
}

__device__ __forceinline__ void flash_ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
__device__ __forceinline__ void flash_ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// d (16 x 8 fp32) += a (16 x 16 bf16) b (16 x 8 bf16), layouts in the header comment
__device__ __forceinline__ void flash_mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// two floats -> one register of two bf16, lo in the low half (the lower column)
__device__ __forceinline__ uint32_t flash_pack_bf16(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t *>(&v);
}

// bf16 <-> fp32, round to nearest even
__device__ __forceinline__ float flash_bf16_to_f32(floatX x) { return __bfloat162float(x); }
__device__ __forceinline__ floatX flash_f32_to_bf16(float x) { return __float2bfloat16(x); }

// 2^x with the special-function unit (relative error about 2^-22; 2^-inf = 0)
__device__ __forceinline__ float flash_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

// Warpgroup products (wgmma, sm_90a: compiled only into the sm_90a image; elsewhere the kernels
// that use them are never launched, flash_wgmma_supported). The block's 4 warps are one
// warpgroup; d (64 x 64 fp32, warp w holding rows 16w .. 16w + 15 in the m16n8 C layout of
// n-blocks 0..7) += a (64 x 16 bf16, warp w rows 16w.., the m16n8k16 A layout) b, with b
// (16 x 64) read from shared memory through the descriptor desc (flash_wg_desc): TRANS_B 0
// takes b as K-major (the tile's rows are b's columns), 1 as MN-major (the tile's rows are b's
// rows). Issued between flash_wgmma_fence and flash_wgmma_commit; the accumulators may be read
// only after flash_wgmma_wait (and flash_acc_fence, which keeps the compiler from moving their
// reads before it).
// The kernels load the A fragments they hold in registers (ldmatrix) in the same loop iteration
// as the products that read them. Fragments loaded once and held across iterations, as the
// mma.sync kernels hold them, gave wrong products from the second iteration on, on an H100
// (sm_90a, nvcc 13.0), while the same values read from shared memory (flash_wgmma_ss) or loaded
// afresh agree bit for bit with the mma.sync kernels (the attention_flash harness).
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define FLASH_WGMMA_ASM 1
#endif
__device__ __forceinline__ void flash_wgmma_fence() {
#ifdef FLASH_WGMMA_ASM
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void flash_wgmma_commit() {
#ifdef FLASH_WGMMA_ASM
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
// wgmma.wait_group N: the thread's committed groups but the latest N have completed
template <int N>
__device__ __forceinline__ void flash_wgmma_wait_group() {
#ifdef FLASH_WGMMA_ASM
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}
__device__ __forceinline__ void flash_wgmma_wait() { flash_wgmma_wait_group<0>(); }
// shared memory written by this thread's copies, made visible to the tensor cores' reads (the
// async proxy); before the barrier that precedes the products
__device__ __forceinline__ void flash_fence_proxy_async() {
#ifdef FLASH_WGMMA_ASM
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}
template <int NB>
__device__ __forceinline__ void flash_acc_fence(float (&d)[NB][4]) {
    #pragma unroll
    for (int i = 0; i < NB; i++)
        #pragma unroll
        for (int e = 0; e < 4; e++) asm volatile("" : "+f"(d[i][e])::"memory");
}
// the same for A fragments: their values are in place before the products that read them are
// issued (the compiler would otherwise be free to compute them after)
template <int NB>
__device__ __forceinline__ void flash_frag_fence(uint32_t (&a)[NB][4]) {
    #pragma unroll
    for (int i = 0; i < NB; i++)
        #pragma unroll
        for (int e = 0; e < 4; e++) asm volatile("" : "+r"(a[i][e])::"memory");
}
// The instruction's text up to its A operand, with scale-d (1: d += a b, 0: d = a b), and the
// 32 accumulator operands with constraint c ("+f", or "=f" where they are not read).
#define FLASH_WGMMA_HEAD(scale_d) \
    "{\n.reg .pred p;\nsetp.ne.b32 p, " #scale_d ", 0;\n" \
    "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
    "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
#define FLASH_WGMMA_D(c) \
    c(d[0][0]), c(d[0][1]), c(d[0][2]), c(d[0][3]), c(d[1][0]), c(d[1][1]), c(d[1][2]), c(d[1][3]), \
    c(d[2][0]), c(d[2][1]), c(d[2][2]), c(d[2][3]), c(d[3][0]), c(d[3][1]), c(d[3][2]), c(d[3][3]), \
    c(d[4][0]), c(d[4][1]), c(d[4][2]), c(d[4][3]), c(d[5][0]), c(d[5][1]), c(d[5][2]), c(d[5][3]), \
    c(d[6][0]), c(d[6][1]), c(d[6][2]), c(d[6][3]), c(d[7][0]), c(d[7][1]), c(d[7][2]), c(d[7][3])
// ACC 0: d = a b, the accumulators' earlier values not read (the first k-step of a product)
template <int TRANS_B, int ACC = 1>
__device__ __forceinline__ void flash_wgmma(float (&d)[8][4], const uint32_t (&a)[4], uint64_t desc) {
#ifdef FLASH_WGMMA_ASM
    if constexpr (!ACC)
        asm volatile(FLASH_WGMMA_HEAD(0) "{%32, %33, %34, %35}, %36, p, 1, 1, %37;\n}\n"
                     : FLASH_WGMMA_D("=f") : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "n"(TRANS_B));
    else
        asm volatile(FLASH_WGMMA_HEAD(1) "{%32, %33, %34, %35}, %36, p, 1, 1, %37;\n}\n"
                     : FLASH_WGMMA_D("+f") : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "n"(TRANS_B));
#else
    __trap();
#endif
}
// The same with A (64 x 16) read from shared memory too, through desc_a as a K-major operand
// (the tile's rows are A's rows).
template <int TRANS_B, int ACC = 1>
__device__ __forceinline__ void flash_wgmma_ss(float (&d)[8][4], uint64_t desc_a, uint64_t desc_b) {
#ifdef FLASH_WGMMA_ASM
    if constexpr (!ACC)
        asm volatile(FLASH_WGMMA_HEAD(0) "%32, %33, p, 1, 1, 0, %34;\n}\n"
                     : FLASH_WGMMA_D("=f") : "l"(desc_a), "l"(desc_b), "n"(TRANS_B));
    else
        asm volatile(FLASH_WGMMA_HEAD(1) "%32, %33, p, 1, 1, 0, %34;\n}\n"
                     : FLASH_WGMMA_D("+f") : "l"(desc_a), "l"(desc_b), "n"(TRANS_B));
#else
    __trap();
#endif
}
#endif

// Ends a batch of warpgroup products (issued after flash_wgmma_fence): commits it, waits for it
// and fences the accumulators it wrote (one or two sets).
template <int NB>
__device__ __forceinline__ void flash_wgmma_finish(float (&d)[NB][4]) {
    flash_wgmma_commit();
    flash_wgmma_wait();
    flash_acc_fence(d);
}
template <int NB>
__device__ __forceinline__ void flash_wgmma_finish(float (&d0)[NB][4], float (&d1)[NB][4]) {
    flash_wgmma_finish(d0);
    flash_acc_fence(d1);
}

// The A fragment of k-block kb (16 columns) of a 16 x 16j accumulator tile acc[2j][4], in bf16.
template <int NB>
__device__ __forceinline__ void flash_acc_to_a(uint32_t (&a)[4], const float (&acc)[NB][4], int kb) {
    a[0] = flash_pack_bf16(acc[2 * kb][0], acc[2 * kb][1]);
    a[1] = flash_pack_bf16(acc[2 * kb][2], acc[2 * kb][3]);
    a[2] = flash_pack_bf16(acc[2 * kb + 1][0], acc[2 * kb + 1][1]);
    a[3] = flash_pack_bf16(acc[2 * kb + 1][2], acc[2 * kb + 1][3]);
}

// Shared-memory addresses each lane hands to ldmatrix.x4 (layouts in the header comment), for
// tiles with rows of LDS bf16. Row r0 / column k0 select the 16 x 16 block.
template <int LDS>
__device__ __forceinline__ uint32_t flash_addr_a(const floatX *tile, int r0, int k0, int lane) {
    return smem_addr(tile + (r0 + (lane & 15)) * LDS + k0 + (lane >> 4) * 8);
}
template <int LDS>
__device__ __forceinline__ uint32_t flash_addr_bt(const floatX *tile, int n0, int k0, int lane) {
    return smem_addr(tile + (n0 + (lane & 7) + ((lane >> 4) << 3)) * LDS + k0 + ((lane >> 3) & 1) * 8);
}
template <int LDS>
__device__ __forceinline__ uint32_t flash_addr_b(const floatX *tile, int k0, int n0, int lane) {
    return smem_addr(tile + (k0 + (lane & 7) + ((lane >> 3) & 1) * 8) * LDS + n0 + (lane >> 4) * 8);
}

// cp.async of rows [row0, row0 + ROWS) of batch element b of a (B*T, ld) bf16 matrix, columns
// [col, col + HS), into the shared tile (ROWS, HS + FLASH_PAD). Rows at or past T are zeroed.
// NT: the block's threads (these helpers split the work over all of them).
template <int ROWS, int HS, int NT = FLASH_THREADS>
__device__ __forceinline__ void flash_load_tile(floatX *tile, const floatX *src, int b, int row0, int T, int ld,
                                                int col) {
    constexpr int CHUNKS = HS / 8;   // 16-byte pieces per row
    static_assert((ROWS * CHUNKS) % NT == 0, "tile pieces must split evenly over the block");
    #pragma unroll
    for (int i = 0; i < ROWS * CHUNKS / NT; i++) {
        int idx = threadIdx.x + i * NT;
        int r = idx / CHUNKS, c = idx % CHUNKS, t = row0 + r;
        bool valid = t < T;
        const floatX *g = src + ((size_t)b * T + (valid ? t : 0)) * ld + col + c * 8;
        cp_async16(smem_addr(tile + r * (HS + FLASH_PAD) + c * 8), g, valid);
    }
}
// Tiles the warpgroup products read (flash_wgmma): ROWS x HS bf16 without padding, in the
// no-swizzle core-matrix layout of the PTX ISA (wgmma "canonical layouts"): 8 rows x 16 bytes
// (8 columns) are one core matrix of 128 contiguous bytes; element (r, col) is at byte
//   (r / 8) * HS * 16 + (col / 8) * 128 + (r % 8) * 16 + (col % 8) * 2.
// The same tile is a K-major operand (its rows are the product's N dimension, its columns K:
// core matrices adjacent in K are 128 bytes apart, the leading byte offset, and in N HS * 16,
// the stride byte offset) or an MN-major one (rows K, columns N: the two offsets swap).
// One k-step of 16 takes columns 16s .. 16s + 15 (K-major: 256 bytes on) or rows 16s ..
// 16s + 15 (MN-major: 2 * HS * 16 bytes on).
template <int ROWS, int HS, int NT = FLASH_THREADS>
__device__ __forceinline__ void flash_load_tile_wg(floatX *tile, const floatX *src, int b, int row0, int T, int ld,
                                                   int col) {
    constexpr int CHUNKS = HS / 8, PIECES = ROWS * CHUNKS;
    static_assert(ROWS % 8 == 0, "whole core matrices");
    #pragma unroll
    for (int i = 0; i < (PIECES + NT - 1) / NT; i++) {
        // 8 consecutive threads take the 8 rows of one core matrix: 128 contiguous bytes
        int idx = threadIdx.x + i * NT;
        if (PIECES % NT != 0 && idx >= PIECES) break;   // a block of threads that does not divide the pieces
        int r = (idx & 7) + (idx / (8 * CHUNKS)) * 8, c = (idx >> 3) % CHUNKS, t = row0 + r;
        bool valid = t < T;
        const floatX *g = src + ((size_t)b * T + (valid ? t : 0)) * ld + col + c * 8;
        cp_async16(smem_addr((unsigned char *)tile + (r >> 3) * HS * 16 + c * 128 + (r & 7) * 16), g, valid);
    }
}
// The 64-bit shared-memory matrix descriptor: start address, leading and stride byte offsets
// (each encoded as (x & 0x3FFFF) >> 4), no swizzle, base offset 0.
__device__ __forceinline__ uint64_t flash_wg_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
    return (uint64_t)((addr & 0x3FFFF) >> 4) | ((uint64_t)((lbo & 0x3FFFF) >> 4) << 16) |
           ((uint64_t)((sbo & 0x3FFFF) >> 4) << 32);
}
// k-step s of a tile as a K-major operand (its rows are N) or an MN-major one (its rows are K)
template <int HS>
__device__ __forceinline__ uint64_t flash_wg_desc_k(const floatX *tile, int s) {
    return flash_wg_desc(smem_addr(tile) + s * 256, 128, HS * 16);
}
template <int HS>
__device__ __forceinline__ uint64_t flash_wg_desc_mn(const floatX *tile, int s) {
    return flash_wg_desc(smem_addr(tile) + s * 2 * HS * 16, HS * 16, 128);
}

// d (64 x 64) = A B^T for two tiles in the core-matrix layout whose rows are A's and B's rows and
// whose HS columns are the k dimension (K-major operands, both read through descriptors): HS / 16
// warpgroup products, issued after flash_wgmma_fence and not committed.
template <int HS>
__device__ __forceinline__ void flash_wg_tiles_product(float (&d)[8][4], const floatX *a_tile, const floatX *b_tile) {
    flash_wgmma_ss<0, 0>(d, flash_wg_desc_k<HS>(a_tile, 0), flash_wg_desc_k<HS>(b_tile, 0));
    #pragma unroll
    for (int kk = 1; kk < HS / 16; kk++) flash_wgmma_ss<0>(d, flash_wg_desc_k<HS>(a_tile, kk), flash_wg_desc_k<HS>(b_tile, kk));
}
// d (64 x HS) += A tile: A's 64 x 64 bf16 fragments a (flash_acc_to_a of an accumulator tile),
// the tile's 64 rows the k dimension (an MN-major operand); 4 warpgroup products, issued after
// flash_wgmma_fence and not committed.
template <int HS>
__device__ __forceinline__ void flash_wg_frags_times_tile(float (&d)[8][4], const uint32_t (&a)[4][4], const floatX *tile) {
    #pragma unroll
    for (int kb = 0; kb < 4; kb++) flash_wgmma<1>(d, a[kb], flash_wg_desc_mn<HS>(tile, kb));
}

// d (64 x 64) += p tile: p the warpgroup's 64 x 64 accumulators (the forward's P, the dQ pass's
// dS), rounded to bf16 A fragments, the tile's 64 rows the k dimension (an MN-major operand, head
// size 64 the n dimension); one batch of 4 warpgroup products, waited for.
template <int HS>
__device__ __forceinline__ void flash_wg_acc_times_tile(float (&d)[8][4], const float (&p)[8][4], const floatX *tile) {
    uint32_t a[4][4];
    #pragma unroll
    for (int kb = 0; kb < 4; kb++) flash_acc_to_a<8>(a[kb], p, kb);
    flash_wgmma_fence();
    flash_wg_frags_times_tile<HS>(d, a, tile);
    flash_wgmma_finish(d);
}

// cp.async of ROWS floats row_stats[row0 ...] (one head's lse or D row) into shared; zero past T
template <int ROWS>
__device__ __forceinline__ void flash_load_stats(float *tile, const float *row_stats, int row0, int T) {
    for (int i = threadIdx.x; i < ROWS; i += FLASH_THREADS) {
        int t = row0 + i;
        cp_async4(smem_addr(tile + i), row_stats + (t < T ? t : 0), t < T);
    }
}

// Writes a shared tile (ROWS, HS + FLASH_PAD) to rows [row0, row0 + ROWS) < T of batch element b
// of a (B*T, ld) bf16 matrix, columns [col, col + HS), in coalesced 16-byte stores.
template <int ROWS, int HS, int NT = FLASH_THREADS>
__device__ __forceinline__ void flash_store_tile(floatX *dst, const floatX *tile, int b, int row0, int T, int ld,
                                                 int col) {
    constexpr int CHUNKS = HS / 8, PIECES = ROWS * CHUNKS;
    #pragma unroll
    for (int i = 0; i < (PIECES + NT - 1) / NT; i++) {
        int idx = threadIdx.x + i * NT;
        if (PIECES % NT != 0 && idx >= PIECES) break;
        int r = idx / CHUNKS, c = idx % CHUNKS, t = row0 + r;
        if (t < T)
            *(uint4 *)(dst + ((size_t)b * T + t) * ld + col + c * 8) = *(const uint4 *)(tile + r * (HS + FLASH_PAD) + c * 8);
    }
}

// Stores a warp's 16 x HS fp32 accumulator (times mult) as bf16 into rows [r0, r0 + 16) of a
// shared tile with rows of LDS (4-byte stores; rows 4 banks apart, so conflict-free).
template <int HS, int LDS>
__device__ __forceinline__ void flash_stage_acc(floatX *tile, const float (&acc)[HS / 8][4], int r0, float mult0,
                                                float mult1, int lane) {
    int g = lane >> 2, c = lane & 3;
    #pragma unroll
    for (int nd = 0; nd < HS / 8; nd++) {
        *(uint32_t *)(tile + (r0 + g) * LDS + nd * 8 + 2 * c) = flash_pack_bf16(acc[nd][0] * mult0, acc[nd][1] * mult0);
        *(uint32_t *)(tile + (r0 + g + 8) * LDS + nd * 8 + 2 * c) = flash_pack_bf16(acc[nd][2] * mult1, acc[nd][3] * mult1);
    }
}

// RoPE on a shared tile (ROWS, HS + FLASH_PAD) bf16 in place, row r the head vector at position
// row0 + r rotated by its angle (sign +1: the forward's queries as the flash forward loads them)
// or by minus it (sign -1: the backward's dQ and dK tiles as they are staged for their store),
// with rope_vec8_kernel's expressions (rope_rotate on the bf16 values, the sine times sign, the
// results rounded to bf16), so the tile holds what rope_forward or rope_backward would have made
// of it in memory, bit for bit. cos_sin is rope_table_host's table (at least T positions); rows
// at or past T, which are never stored, are left alone.
template <int ROWS, int HS, int NT = FLASH_THREADS>
__device__ __forceinline__ void flash_rope_tile(floatX *tile, const float *cos_sin, int row0, int T, float sign) {
    constexpr int LDS = HS + FLASH_PAD, HALF = HS / 2, GROUPS = HALF / 8;
    for (int idx = threadIdx.x; idx < ROWS * GROUPS; idx += NT) {
        int r = idx / GROUPS, i = (idx % GROUPS) * 8, t = row0 + r;
        if (t >= T) continue;
        const float *cs = cos_sin + ((size_t)t * HALF + i) * 2;   // (cos, sin) of pairs i .. i + 7
        floatX *x = tile + r * LDS + i;
        #pragma unroll
        for (int k = 0; k < 8; k++) {
            float y1, y2;
            rope_rotate(flash_bf16_to_f32(x[k]), flash_bf16_to_f32(x[k + HALF]), cs[2 * k], sign * cs[2 * k + 1], &y1, &y2);
            x[k] = flash_f32_to_bf16(y1);
            x[k + HALF] = flash_f32_to_bf16(y2);
        }
    }
}

// The block's head (or key/value head), batch element and sequence tile, and the tile count,
// under the launch's grid order (header comment): lpt (head, batch, tile) = (x, y, z), else
// (tile, head, batch) = (x, y, z).
__device__ __forceinline__ void flash_block(int lpt, int &head, int &batch, int &tile, int &tiles) {
    if (lpt) { head = blockIdx.x; batch = blockIdx.y; tile = blockIdx.z; tiles = gridDim.z; }
    else { tile = blockIdx.x; head = blockIdx.y; batch = blockIdx.z; tiles = gridDim.x; }
}

// The online softmax of one 16-row tile's scores s against the key tile from k0 (this thread's
// rows row0 and row1, scores unscaled; diagonal: the tile reaches past the row tile's first row,
// so keys after a query are masked): replaces s by P = 2^(s scale_log2 - m) and gives sum0, sum1,
// this thread's partial sums of its rows' P. m is the reference of a row's exponentials, moved
// only when a tile's max passes it by more than max_slack (flash_forward_max_slack: an exponential
// is at most 2^max_slack); returns whether some row of the warp moved, and then corr0, corr1 (1
// for a row that did not) are the factors the rows' l and O are to be rescaled by
// (flash_rescale), which most tiles after the first skip. Not moving changes nothing but the
// reference (lse = m + log2 l, out = O / l).
__device__ __forceinline__ bool flash_softmax_tile(float (&s)[FLASH_KEYS / 8][4], int k0, bool diagonal, int row0,
                                                   int row1, float scale_log2, float max_slack, float &m0, float &m1,
                                                   float &corr0, float &corr1, float &sum0, float &sum1) {
    const int c = (threadIdx.x % 32) & 3;
    // the scores stay unscaled, the scale to base 2 goes into the exponential's argument below
    float tile_max0 = -INFINITY, tile_max1 = -INFINITY;
    #pragma unroll
    for (int nb = 0; nb < FLASH_KEYS / 8; nb++) {
        #pragma unroll
        for (int e = 0; e < 4; e++) {
            int key = k0 + nb * 8 + 2 * c + (e & 1);
            float x = s[nb][e];
            if (diagonal && key > (e < 2 ? row0 : row1)) x = -INFINITY;
            s[nb][e] = x;
            if (e < 2) tile_max0 = fmaxf(tile_max0, x); else tile_max1 = fmaxf(tile_max1, x);
        }
    }
    // a row's 64 scores are spread over the 4 threads of its group; the max of the scaled
    // scores is the scaled max (the scale is positive and rounding keeps the order)
    tile_max0 = fmaxf(tile_max0, __shfl_xor_sync(0xffffffffu, tile_max0, 1));
    tile_max0 = fmaxf(tile_max0, __shfl_xor_sync(0xffffffffu, tile_max0, 2));
    tile_max1 = fmaxf(tile_max1, __shfl_xor_sync(0xffffffffu, tile_max1, 1));
    tile_max1 = fmaxf(tile_max1, __shfl_xor_sync(0xffffffffu, tile_max1, 2));
    tile_max0 *= scale_log2;
    tile_max1 *= scale_log2;
    const bool move0 = tile_max0 > m0 + max_slack, move1 = tile_max1 > m1 + max_slack;
    const bool moved = __any_sync(0xffffffffu, move0 || move1);
    corr0 = corr1 = 1.0f;
    if (moved) {
        corr0 = move0 ? flash_exp2(m0 - tile_max0) : 1.0f;   // 0 when m was -inf
        corr1 = move1 ? flash_exp2(m1 - tile_max1) : 1.0f;
        if (move0) m0 = tile_max0;
        if (move1) m1 = tile_max1;
    }
    const float ref0 = m0 == -INFINITY ? 0.0f : m0, ref1 = m1 == -INFINITY ? 0.0f : m1;
    sum0 = sum1 = 0.0f;
    #pragma unroll
    for (int nb = 0; nb < FLASH_KEYS / 8; nb++) {
        s[nb][0] = flash_exp2(fmaf(s[nb][0], scale_log2, -ref0));
        s[nb][1] = flash_exp2(fmaf(s[nb][1], scale_log2, -ref0));
        s[nb][2] = flash_exp2(fmaf(s[nb][2], scale_log2, -ref1));
        s[nb][3] = flash_exp2(fmaf(s[nb][3], scale_log2, -ref1));
        sum0 += s[nb][0] + s[nb][1];
        sum1 += s[nb][2] + s[nb][3];
    }
    return moved;
}
// l and O of a thread's two rows times corr0, corr1 (flash_softmax_tile). l stays a per-thread
// partial sum (its group's 4 partials share the same rescaling); the partials are added once at
// the end.
template <int HS>
__device__ __forceinline__ void flash_rescale(float (&o)[HS / 8][4], float &l0, float &l1, float corr0, float corr1) {
    l0 *= corr0;
    l1 *= corr1;
    #pragma unroll
    for (int nd = 0; nd < HS / 8; nd++) {
        o[nd][0] *= corr0; o[nd][1] *= corr0;
        o[nd][2] *= corr1; o[nd][3] *= corr1;
    }
}

// ---------------------------------------------------------------------------------------------
// forward

// RW row tiles of 16 query rows per warp: the block takes 64 * RW query rows. With RW = 2 every
// K and V fragment read from shared memory feeds two products instead of one, and a warp has two
// independent chains of products to interleave; the price is twice the accumulator registers
// (HS = 64 only). flash_forward_row_tiles picks the launch (the harness times both).
// WG = 1 (HS = 64, RW = 1): the products are warpgroup products (flash_wgmma) reading K and V
// from tiles in the core-matrix layout (flash_load_tile_wg), Q from registers as before; every
// output element sums the same products in the same order of k (16 at a time).
template <int HS, int RW, int WG = 0>
constexpr size_t flash_forward_smem() {
    return (size_t)RW * FLASH_ROWS * (HS + FLASH_PAD) * sizeof(floatX) +
           (size_t)4 * FLASH_KEYS * (WG ? HS : HS + FLASH_PAD) * sizeof(floatX);
}

// grid over (NH, B, ceil(T / (64 RW)) tiles) in the order lpt picks (flash_block), block 128. Shared: Q (64 RW, LDS), K and V (64, LDS) x 2 stages.
// Row tile r of warp w holds the block's query rows r * 64 + w * 16 ... + 15, so every warp has
// rows near the diagonal. Query tiles are taken last-first: the tiles near the end of the sequence
// see the most keys, so the long blocks start first and the short ones fill the tail. MINB > 0
// asks the compiler for registers that let MINB blocks share an SM (launch bounds; 0 leaves the
// number to the compiler): the same arithmetic, another register allocation
// (flash_forward_min_blocks).
// ROPE = 1: the block rotates its query rows by RoPE as they arrive (flash_rope_tile with
// rope_cos_sin, rope_table_host's table: the same bits as rope_forward) and stores them rotated
// into q_rotated (the q columns of qkv itself: the block is the only one that reads them), so
// that the backward finds in qkv what rope_forward would have left there; the key heads are
// rotated before the launch (rope_forward_keys), since every block of the group reads them. The
// queries come in a copy group of their own, rotated before the loop over key tiles, so the loop
// is the same code either way.
template <int HS, int RW, int MINB = 0, int WG = 0, int ROPE = 0>
__global__ void __launch_bounds__(FLASH_THREADS, MINB) flash_attention_forward_kernel(floatX *out, float *lse,
                                                                               const floatX *qkv, int T, int NH,
                                                                               int NKV, int lpt, float max_slack,
                                                                               const float *rope_cos_sin = NULL,
                                                                               floatX *q_rotated = NULL) {
    static_assert(!WG || (HS == 64 && RW == 1), "the warpgroup forward takes head size 64, one row tile a warp");
    constexpr int BM = RW * FLASH_ROWS, BN = FLASH_KEYS, LDS = HS + FLASH_PAD;
    constexpr int KVS = WG ? BN * HS : BN * LDS;   // elements of one K or V stage
    floatX *sQ = (floatX *)flash_dynamic_smem();
    floatX *sK = sQ + BM * LDS;       // stage s at sK + s * KVS
    floatX *sV = sK + 2 * KVS;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane >> 2, c = lane & 3;
    int h, b, tile, tiles;
    flash_block(lpt, h, b, tile, tiles);
    const int q0 = (tiles - 1 - tile) * BM;
    const int kvh = h / (NH / NKV), QKV = (NH + 2 * NKV) * HS;
    const float scale_log2 = rsqrtf((float)HS) * FLASH_LOG2E;
    const int n_tiles = min(T - 1, q0 + BM - 1) / BN + 1;   // key tiles up to the block's last query
    int row0[RW], row1[RW];   // this thread's two query rows of each row tile
    #pragma unroll
    for (int r = 0; r < RW; r++) {
        row0[r] = q0 + r * FLASH_ROWS + warp * 16 + g;
        row1[r] = row0[r] + 8;
    }

    // K or V rows [k0, k0 + 64) into stage `stage`, in the layout the products read
    auto load_kv = [&](int stage, int k0) {
        if constexpr (WG) {
            flash_load_tile_wg<BN, HS>(sK + stage * KVS, qkv, b, k0, T, QKV, (NH + kvh) * HS);
            flash_load_tile_wg<BN, HS>(sV + stage * KVS, qkv, b, k0, T, QKV, (NH + NKV + kvh) * HS);
        } else {
            flash_load_tile<BN, HS>(sK + stage * KVS, qkv, b, k0, T, QKV, (NH + kvh) * HS);
            flash_load_tile<BN, HS>(sV + stage * KVS, qkv, b, k0, T, QKV, (NH + NKV + kvh) * HS);
        }
    };
    flash_load_tile<BM, HS>(sQ, qkv, b, q0, T, QKV, h * HS);
    if constexpr (ROPE) {   // the queries through RoPE, and back to qkv rotated
        cp_async_commit();
        load_kv(0, 0);
        cp_async_commit();
        cp_async_wait<1>();   // the queries' group (the first key tile's may still be in flight)
        __syncthreads();
        flash_rope_tile<BM, HS>(sQ, rope_cos_sin, q0, T, 1.0f);
        __syncthreads();
        flash_store_tile<BM, HS>(q_rotated, sQ, b, q0, T, QKV, h * HS);
    } else {
        load_kv(0, 0);
        cp_async_commit();
    }

    uint32_t q_frag[RW][HS / 16][4];
    float o[RW][HS / 8][4];
    float m0[RW], m1[RW], l0[RW], l1[RW];   // running max (base 2) and sum per row
    #pragma unroll
    for (int r = 0; r < RW; r++) {
        #pragma unroll
        for (int nd = 0; nd < HS / 8; nd++) o[r][nd][0] = o[r][nd][1] = o[r][nd][2] = o[r][nd][3] = 0.0f;
        m0[r] = m1[r] = -INFINITY;
        l0[r] = l1[r] = 0.0f;
    }

    for (int j = 0; j < n_tiles; j++) {
        const int stage = j & 1, k0 = j * BN;
        if (j + 1 < n_tiles) load_kv(stage ^ 1, k0 + BN);
        cp_async_commit();          // possibly empty, so the wait below always means "tile j"
        cp_async_wait<1>();
        if constexpr (WG) flash_fence_proxy_async();
        __syncthreads();
        if (WG || j == 0) {   // WG: every tile, see flash_wgmma
            #pragma unroll
            for (int r = 0; r < RW; r++) {
                #pragma unroll
                for (int kk = 0; kk < HS / 16; kk++)
                    flash_ldmatrix_x4(q_frag[r][kk], flash_addr_a<LDS>(sQ, r * FLASH_ROWS + warp * 16, kk * 16, lane));
            }
        }
        const floatX *k_tile = sK + stage * KVS, *v_tile = sV + stage * KVS;
        // a row tile whose rows all come before the tile's first key sees none of it (RW = 2
        // only: the block's first row tile on its last key tile)
        bool live[RW];
        #pragma unroll
        for (int r = 0; r < RW; r++) live[r] = k0 <= q0 + r * FLASH_ROWS + warp * 16 + 15;

        // S (16 rows x 64 keys per row tile) = Q K^T
        float s[RW][BN / 8][4];
        #pragma unroll
        for (int r = 0; r < RW; r++) {
            #pragma unroll
            for (int nb = 0; nb < BN / 8; nb++) s[r][nb][0] = s[r][nb][1] = s[r][nb][2] = s[r][nb][3] = 0.0f;
        }
        if constexpr (WG) {
            flash_wgmma_fence();
            flash_wgmma<0, 0>(s[0], q_frag[0][0], flash_wg_desc_k<HS>(k_tile, 0));
            #pragma unroll
            for (int kk = 1; kk < HS / 16; kk++) flash_wgmma<0>(s[0], q_frag[0][kk], flash_wg_desc_k<HS>(k_tile, kk));
            flash_wgmma_finish(s[0]);
        } else {
            #pragma unroll
            for (int kk = 0; kk < HS / 16; kk++) {
                #pragma unroll
                for (int np = 0; np < BN / 16; np++) {
                    uint32_t kb[4];
                    flash_ldmatrix_x4(kb, flash_addr_bt<LDS>(k_tile, np * 16, kk * 16, lane));
                    #pragma unroll
                    for (int r = 0; r < RW; r++) {
                        if (!live[r]) continue;
                        flash_mma(s[r][2 * np], q_frag[r][kk], kb[0], kb[1]);
                        flash_mma(s[r][2 * np + 1], q_frag[r][kk], kb[2], kb[3]);
                    }
                }
            }
        }

        #pragma unroll
        for (int r = 0; r < RW; r++) {
            if (!live[r]) continue;
            const bool diagonal = k0 + BN - 1 > q0 + r * FLASH_ROWS + warp * 16;
            float corr0, corr1, sum0, sum1;
            if (flash_softmax_tile(s[r], k0, diagonal, row0[r], row1[r], scale_log2, max_slack, m0[r], m1[r], corr0,
                                   corr1, sum0, sum1))
                flash_rescale<HS>(o[r], l0[r], l1[r], corr0, corr1);
            l0[r] += sum0;
            l1[r] += sum1;
        }

        // O += P V, P straight from the S registers
        if constexpr (WG) {
            flash_wg_acc_times_tile<HS>(o[0], s[0], v_tile);
        } else {
            #pragma unroll
            for (int kb = 0; kb < BN / 16; kb++) {
                uint32_t pa[RW][4];
                #pragma unroll
                for (int r = 0; r < RW; r++) flash_acc_to_a<BN / 8>(pa[r], s[r], kb);
                #pragma unroll
                for (int dp = 0; dp < HS / 16; dp++) {
                    uint32_t vb[4];
                    flash_ldmatrix_x4_trans(vb, flash_addr_b<LDS>(v_tile, kb * 16, dp * 16, lane));
                    #pragma unroll
                    for (int r = 0; r < RW; r++) {
                        if (!live[r]) continue;
                        flash_mma(o[r][2 * dp], pa[r], vb[0], vb[1]);
                        flash_mma(o[r][2 * dp + 1], pa[r], vb[2], vb[3]);
                    }
                }
            }
        }
        __syncthreads();   // this stage is refilled by the next iteration's prefetch
    }

    #pragma unroll
    for (int r = 0; r < RW; r++) {
        float sum0 = l0[r], sum1 = l1[r];
        sum0 += __shfl_xor_sync(0xffffffffu, sum0, 1);
        sum0 += __shfl_xor_sync(0xffffffffu, sum0, 2);
        sum1 += __shfl_xor_sync(0xffffffffu, sum1, 1);
        sum1 += __shfl_xor_sync(0xffffffffu, sum1, 2);
        // l >= 1: the row's maximum contributes 2^0
        // O / l staged through sQ (the Q fragments were read at j = 0, before the loop's last barrier)
        flash_stage_acc<HS, LDS>(sQ, o[r], r * FLASH_ROWS + warp * 16, 1.0f / sum0, 1.0f / sum1, lane);
        if (c == 0) {
            float *lse_row = lse + ((size_t)b * NH + h) * T;
            if (row0[r] < T) lse_row[row0[r]] = (m0[r] + log2f(sum0)) * FLASH_LN2;
            if (row1[r] < T) lse_row[row1[r]] = (m1[r] + log2f(sum1)) * FLASH_LN2;
        }
    }
    __syncthreads();
    flash_store_tile<BM, HS>(out, sQ, b, q0, T, NH * HS, h * HS);
}

// The warpgroups a block of the pipelined kernels' HEADS launch, one a query head of a kv head's
// group: 3 where the group divides by 3, else 2 where by 2, else 0 (no HEADS launch).
static inline int flash_heads_per_block(int NH, int NKV) {
    int group = NH / NKV;
    return group % 3 == 0 ? 3 : group % 2 == 0 ? 2 : 0;
}

// The forward on warpgroup products with the softmax overlapping them (flash_forward_wgmma 2, 3
// and 4; head size 64, sm_90a): key tile j's S = Q K^T is issued, then the previous tile's O += P V,
// and the warpgroup waits only for S (wgmma.wait_group 1) before its softmax, so that tile j's
// softmax runs while the tensor cores add tile j - 1's P V (its masking and row maxima: ptxas
// schedules the exponentials after the next wait, in the SASS of nvcc 13.0); the wait for P V
// comes before O is rescaled (a moved reference). O still takes the same operations in the same
// order (O of tiles up to j - 1, times tile j's correction, plus P_j V_j), and every product sums
// the same terms in the same order of k, so the bits are the other kernels'.
// WGS warpgroups a block (1 or 2), each with 64 query rows of the block's 64 WGS: with 2, every
// K and V tile brought from L2 into shared memory feeds two warpgroups (half the traffic per
// product). A warpgroup takes the key tiles up to its own last row; with 2, the first stops one
// tile before the second, whose diagonal tile it would only mask, and takes only the block's
// barriers from then on. HEADS: the WGS warpgroups (2 or 3) take WGS query heads of one kv head's
// group instead, on the same 64 rows (the grid's head index counts groups of WGS heads), so that
// each K and V tile feeds WGS heads (a third of the traffic with SmolLM2's groups of 3); not with
// RoPE in the loads.
// Q is read by the tensor cores from shared memory too (A through a descriptor: no fragments held
// in registers), P's bf16 A fragments are written only after the wait for the product that read
// the previous ones. Shared: Q (64 WGS x 64, core-matrix layout); K (64 x 64) x 2 stages; V x 3
// stages (V of tile j - 1 is read while tile j + 1 streams in). Tile j + 1 is fetched once every
// thread has passed the barrier of iteration j, by which S of tile j - 1 and P V of tile j - 2
// are waited for: their stages are free. ROPE as in flash_attention_forward_kernel: the query
// rows, in the padded layout in the K and V stages before the first key tile comes, are rotated,
// stored back and copied into the core-matrix layout.
template <int WGS>
constexpr size_t flash_forward_pipelined_smem() {
    return (size_t)(WGS * FLASH_ROWS + 5 * FLASH_KEYS) * 64 * sizeof(floatX);
}
template <int WGS, int ROPE = 0, int HEADS = 0>
__global__ void __launch_bounds__(WGS * FLASH_THREADS, WGS == 2 ? 2 : 1) flash_attention_forward_pipelined_kernel(
    floatX *out, float *lse, const floatX *qkv, int T, int NH, int NKV, int lpt, float max_slack,
    const float *rope_cos_sin = NULL, floatX *q_rotated = NULL) {
    constexpr int HS = 64, NT = WGS * FLASH_THREADS, BM = WGS * FLASH_ROWS, BN = FLASH_KEYS, LDS = HS + FLASH_PAD,
                  TILE = BN * HS, ROWS = HEADS ? FLASH_ROWS : BM;   // ROWS: the block's query rows
    static_assert(HEADS ? (WGS == 2 || WGS == 3) && !ROPE : WGS == 1 || WGS == 2,
                  "one or two warpgroups a block on the rows, two or three on the heads (without RoPE)");
    static_assert(BM * LDS <= 5 * TILE, "the padded query rows and the output's staging fit in the K and V stages");
    floatX *sQ = (floatX *)flash_dynamic_smem();   // warpgroup w's 64 rows at sQ + w * 64 * HS
    floatX *sK = sQ + BM * HS;   // stage s at sK + s * TILE, s = j % 2
    floatX *sV = sK + 2 * TILE;  // stage s at sV + s * TILE, s = j % 3
    const int lane = threadIdx.x % 32, wg = threadIdx.x / FLASH_THREADS, warp = threadIdx.x / 32 % 4, g = lane >> 2,
              c = lane & 3;
    int hb, b, tile, tiles;   // HEADS: hb numbers groups of WGS query heads
    flash_block(lpt, hb, b, tile, tiles);
    const int h = HEADS ? hb * WGS + wg : hb;   // the warpgroup's query head
    const int q0 = (tiles - 1 - tile) * ROWS, wq0 = HEADS ? q0 : q0 + wg * FLASH_ROWS;   // the block's and the warpgroup's first row
    const int kvh = h / (NH / NKV), QKV = (NH + 2 * NKV) * HS;   // HEADS: the same for every warpgroup
    const float scale_log2 = rsqrtf((float)HS) * FLASH_LOG2E;
    const int n_tiles = min(T - 1, q0 + ROWS - 1) / BN + 1;         // key tiles up to the block's last query
    const int my_tiles = min(T - 1, wq0 + FLASH_ROWS - 1) / BN + 1;  // and up to the warpgroup's (at least 1)
    const int row0 = wq0 + warp * 16 + g, row1 = row0 + 8;
    const floatX *sQw = sQ + wg * FLASH_ROWS * HS;

    auto load_kv = [&](int j) {
        flash_load_tile_wg<BN, HS, NT>(sK + (j % 2) * TILE, qkv, b, j * BN, T, QKV, (NH + kvh) * HS);
        flash_load_tile_wg<BN, HS, NT>(sV + (j % 3) * TILE, qkv, b, j * BN, T, QKV, (NH + NKV + kvh) * HS);
    };
    if constexpr (ROPE) {
        floatX *sQpad = sK;
        flash_load_tile<BM, HS, NT>(sQpad, qkv, b, q0, T, QKV, h * HS);
        cp_async_commit();
        cp_async_wait<0>();
        __syncthreads();
        flash_rope_tile<BM, HS, NT>(sQpad, rope_cos_sin, q0, T, 1.0f);
        __syncthreads();
        flash_store_tile<BM, HS, NT>(q_rotated, sQpad, b, q0, T, QKV, h * HS);
        constexpr int CHUNKS = HS / 8;
        for (int idx = threadIdx.x; idx < BM * CHUNKS; idx += NT) {   // into the core-matrix layout
            int r = (idx & 7) + (idx / (8 * CHUNKS)) * 8, cc = (idx >> 3) % CHUNKS;
            *(uint4 *)((unsigned char *)sQ + (r >> 3) * HS * 16 + cc * 128 + (r & 7) * 16) =
                *(const uint4 *)(sQpad + r * LDS + cc * 8);
        }
        __syncthreads();   // sQpad read before the first key tile lands on it
    } else if constexpr (HEADS) {
        for (int w = 0; w < WGS; w++) flash_load_tile_wg<FLASH_ROWS, HS, NT>(sQ + w * FLASH_ROWS * HS, qkv, b, q0, T, QKV, (hb * WGS + w) * HS);
    } else {
        flash_load_tile_wg<BM, HS, NT>(sQ, qkv, b, q0, T, QKV, h * HS);
    }
    load_kv(0);
    cp_async_commit();

    float o[HS / 8][4], s[BN / 8][4];
    uint32_t pa[BN / 16][4] = {};   // P of the previous tile, the A operand of its P V
    #pragma unroll
    for (int nd = 0; nd < HS / 8; nd++) o[nd][0] = o[nd][1] = o[nd][2] = o[nd][3] = 0.0f;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f;

    // tile j's copies landed for every thread, after which tile j + 1's are issued
    auto next_tile = [&](int j) {
        cp_async_wait<0>();
        flash_fence_proxy_async();
        __syncthreads();
        if (j + 1 < n_tiles) {
            load_kv(j + 1);
            cp_async_commit();
        }
    };
    // S = Q K^T of tile j issued and committed
    auto issue_s = [&](int j) {
        const floatX *k_tile = sK + (j % 2) * TILE;
        flash_acc_fence(o);
        flash_frag_fence(pa);
        flash_wgmma_fence();
        flash_wg_tiles_product<HS>(s, sQw, k_tile);
        flash_wgmma_commit();
    };
    // O += P V of tile j (P in pa) issued and committed
    auto issue_pv = [&](int j) {
        flash_wg_frags_times_tile<HS>(o, pa, sV + (j % 3) * TILE);
        flash_wgmma_commit();
    };
    // the softmax of tile j's S (waited for), whose corrections of l and O wait for the P V in
    // flight (wait_pv), then P into the A fragments
    auto finish_tile = [&](int j, bool wait_pv) {
        flash_acc_fence(s);
        float corr0, corr1, sum0, sum1;
        const bool moved = flash_softmax_tile(s, j * BN, j * BN + BN - 1 > wq0 + warp * 16, row0, row1, scale_log2,
                                              max_slack, m0, m1, corr0, corr1, sum0, sum1);
        if (wait_pv) {
            flash_acc_fence(s);   // P before the wait in the PTX (ptxas still schedules the exponentials after it)
            flash_wgmma_wait_group<0>();   // P V of tile j - 1: O, and pa free again
            flash_acc_fence(o);
        }
        if (moved) flash_rescale<HS>(o, l0, l1, corr0, corr1);
        l0 += sum0;
        l1 += sum1;
        #pragma unroll
        for (int kb = 0; kb < BN / 16; kb++) flash_acc_to_a<BN / 8>(pa[kb], s, kb);
    };
    next_tile(0);
    issue_s(0);
    flash_wgmma_wait_group<0>();
    finish_tile(0, false);
    for (int j = 1; j < n_tiles; j++) {
        next_tile(j);
        if (j < my_tiles) {
            issue_s(j);
            issue_pv(j - 1);   // in flight during the softmax
            flash_wgmma_wait_group<1>();   // S
            finish_tile(j, true);
        } else if (j == my_tiles) {   // the first of two warpgroups: its last P V
            flash_acc_fence(o);
            flash_frag_fence(pa);
            flash_wgmma_fence();
            issue_pv(j - 1);
            flash_wgmma_wait_group<0>();
            flash_acc_fence(o);
        }
    }
    if (my_tiles == n_tiles) {   // O += P V of the last tile
        flash_acc_fence(o);
        flash_frag_fence(pa);
        flash_wgmma_fence();
        issue_pv(n_tiles - 1);
        flash_wgmma_wait_group<0>();
        flash_acc_fence(o);
    }

    float sum0 = l0, sum1 = l1;
    sum0 += __shfl_xor_sync(0xffffffffu, sum0, 1);
    sum0 += __shfl_xor_sync(0xffffffffu, sum0, 2);
    sum1 += __shfl_xor_sync(0xffffffffu, sum1, 1);
    sum1 += __shfl_xor_sync(0xffffffffu, sum1, 2);
    // O / l staged through the K and V stages, which no product reads any more once every thread is here
    __syncthreads();
    flash_stage_acc<HS, LDS>(sK, o, wg * FLASH_ROWS + warp * 16, 1.0f / sum0, 1.0f / sum1, lane);
    if (c == 0) {
        float *lse_row = lse + ((size_t)b * NH + h) * T;
        if (row0 < T) lse_row[row0] = (m0 + log2f(sum0)) * FLASH_LN2;
        if (row1 < T) lse_row[row1] = (m1 + log2f(sum1)) * FLASH_LN2;
    }
    __syncthreads();
    if constexpr (HEADS) {   // warpgroup w's rows of the staging tile: head hb * WGS + w
        for (int w = 0; w < WGS; w++)
            flash_store_tile<FLASH_ROWS, HS, NT>(out, sK + w * FLASH_ROWS * LDS, b, q0, T, NH * HS, (hb * WGS + w) * HS);
    } else {
        flash_store_tile<BM, HS, NT>(out, sK, b, q0, T, NH * HS, h * HS);
    }
}

// ---------------------------------------------------------------------------------------------
// backward

// D (B, NH, T) = sum over the head's HS columns of dout * out; HS / 8 threads per (b, t, h) row,
// 8 elements (16 bytes) each, added with shuffles inside the row's lanes.
template <int HS>
__global__ void flash_attention_backward_preprocess_kernel(float *D, const floatX *dout, const floatX *out, int B,
                                                           int T, int NH) {
    constexpr int LANES = HS / 8;
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    size_t row = idx / LANES;   // (b * T + t) * NH + h: rows of HS are contiguous in dout and out
    int piece = (int)(idx % LANES);
    bool valid = row < (size_t)B * T * NH;
    float sum = 0.0f;
    if (valid) {
        uint4 gv = *(const uint4 *)(dout + row * HS + piece * 8), ov = *(const uint4 *)(out + row * HS + piece * 8);
        const __nv_bfloat162 *g2 = reinterpret_cast<const __nv_bfloat162 *>(&gv);
        const __nv_bfloat162 *o2 = reinterpret_cast<const __nv_bfloat162 *>(&ov);
        #pragma unroll
        for (int k = 0; k < 4; k++) {
            float2 gf = __bfloat1622float2(g2[k]), of = __bfloat1622float2(o2[k]);
            sum += gf.x * of.x + gf.y * of.y;
        }
    }
    #pragma unroll
    for (int offset = LANES / 2; offset > 0; offset >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    if (valid && piece == 0) {
        int h = (int)(row % NH);
        size_t bt = row / NH;
        D[((size_t)(bt / T) * NH + h) * T + bt % T] = sum;
    }
}

// query rows per iteration of the dK/dV pass: 64, or 32 for HS = 128 or two key row tiles a
// warp (RW = 2) so that the dK and dV accumulators (2 x 64 registers a row tile of HS = 128, or
// 2 x 2 x 32 of two at HS = 64) and the S^T, dP^T tiles fit in a thread's registers
template <int HS, int RW = 1> __host__ __device__ constexpr int flash_dkv_queries() { return HS >= 128 || RW == 2 ? 32 : 64; }
template <int HS, int WG = 0, int RW = 1>
constexpr size_t flash_dkv_smem() {
    return (size_t)2 * RW * FLASH_ROWS * (HS + FLASH_PAD) * sizeof(floatX) +
           (size_t)4 * flash_dkv_queries<HS, RW>() * (WG ? HS : HS + FLASH_PAD) * sizeof(floatX) +
           4 * flash_dkv_queries<HS, RW>() * sizeof(float);
}

// dK, dV: grid over (NKV, B, ceil(T / 64) tiles) in the order lpt picks (flash_block), block 128; the block owns key rows [k0, k0 + 64) of kv head
// kvh (16 per warp) and walks (query head of the group) x (query tile from k0 to T), two stages
// deep. Shared: K, V (64, LDS); Q, dO (BM, LDS) x 2 stages; lse, D (BM) x 2 stages. MINB as in
// the forward (flash_dkv_min_blocks). KVREG: the warp's K and V fragments (the A operands of
// S^T and dP^T, the same for every iteration) are read from shared memory once and kept in 32
// registers, instead of once per iteration: fewer ldmatrix, more registers (flash_dkv_kv_regs).
// WG (HS = 64): the products are warpgroup products (flash_wgmma) reading Q and dO from tiles in
// the core-matrix layout, the same sums in the same order; with WG = 1 (and KVREG = 1) K and V
// come from registers, with WG = 2 (KVREG = 0) from core-matrix tiles in shared memory as well,
// which frees the fragments' 32 registers.
// RW = 2 (HS = 64, mma.sync, K and V from shared memory): two row tiles of 16 keys a warp, as the
// forward's, so the block owns 128 key rows (row tile r of warp w: k0 + r * 64 + w * 16 ...) and
// every Q and dO fragment read from shared memory feeds two products instead of one, the price
// being 32 queries an iteration. Each key row sums the same products in the same order as with
// RW = 1 (the query tiles' 16-query blocks in turn; the second row tile's first 64 queries, which
// RW = 1 never visits, are masked to P = 0 and add exact zeros), so both give bitwise the same
// dK and dV (flash_dkv_row_tiles; the tuner keeps a candidate only if its bits agree).
template <int HS, int MINB = 0, int KVREG = 0, int WG = 0, int RW = 1>
__global__ void __launch_bounds__(FLASH_THREADS, MINB) flash_attention_backward_dkv_kernel(
    floatX *dqkv, const floatX *dout, const floatX *qkv, const float *lse, const float *D, int T, int NH, int NKV,
    int lpt, const float *rope_cos_sin) {
    static_assert(!WG || (HS == 64 && (WG == 1) == (KVREG == 1)),
                  "the warpgroup dK/dV pass takes head size 64, K and V in registers (WG 1) or not (WG 2)");
    static_assert(RW == 1 || (RW == 2 && HS == 64 && !WG && !KVREG),
                  "two key row tiles a warp: head size 64, mma.sync products, K and V from shared memory");
    constexpr int BN = RW * FLASH_ROWS, BM = flash_dkv_queries<HS, RW>(), LDS = HS + FLASH_PAD;
    constexpr int QS = WG ? BM * HS : BM * LDS;   // elements of one Q or dO stage
    floatX *sK = (floatX *)flash_dynamic_smem();
    floatX *sV = sK + BN * LDS;
    floatX *sQ = sV + BN * LDS;        // stage s at sQ + s * QS
    floatX *sG = sQ + 2 * QS;          // dout
    float *sL = (float *)(sG + 2 * QS);   // lse, stage s at sL + s * BM
    float *sD = sL + 2 * BM;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane >> 2, c = lane & 3;
    int kvh, b, tile, tiles;
    flash_block(lpt, kvh, b, tile, tiles);
    const int k0 = tile * BN, group = NH / NKV;
    const int QKV = (NH + 2 * NKV) * HS;
    const float scale = rsqrtf((float)HS), scale_log2 = scale * FLASH_LOG2E;
    const int n_q = (T + BM - 1) / BM - k0 / BM;   // query tiles at or after the key tile
    const int iterations = group * n_q;
    int key0[RW], key1[RW];   // this thread's two key rows of each row tile
    #pragma unroll
    for (int r = 0; r < RW; r++) {
        key0[r] = k0 + r * FLASH_ROWS + warp * 16 + g;
        key1[r] = key0[r] + 8;
    }

    // query head h's Q, dO rows [q0, q0 + BM) and their statistics into stage `stage`, Q and dO
    // in the layout the products read
    auto load_q = [&](int stage, int h, int q0) {
        if constexpr (WG) {
            flash_load_tile_wg<BM, HS>(sQ + stage * QS, qkv, b, q0, T, QKV, h * HS);
            flash_load_tile_wg<BM, HS>(sG + stage * QS, dout, b, q0, T, NH * HS, h * HS);
        } else {
            flash_load_tile<BM, HS>(sQ + stage * QS, qkv, b, q0, T, QKV, h * HS);
            flash_load_tile<BM, HS>(sG + stage * QS, dout, b, q0, T, NH * HS, h * HS);
        }
        flash_load_stats<BM>(sL + stage * BM, lse + ((size_t)b * NH + h) * T, q0, T);
        flash_load_stats<BM>(sD + stage * BM, D + ((size_t)b * NH + h) * T, q0, T);
    };
    if constexpr (WG == 2) {   // in the first BN x HS elements of their (BN, LDS) regions
        flash_load_tile_wg<BN, HS>(sK, qkv, b, k0, T, QKV, (NH + kvh) * HS);
        flash_load_tile_wg<BN, HS>(sV, qkv, b, k0, T, QKV, (NH + NKV + kvh) * HS);
    } else {
        flash_load_tile<BN, HS>(sK, qkv, b, k0, T, QKV, (NH + kvh) * HS);
        flash_load_tile<BN, HS>(sV, qkv, b, k0, T, QKV, (NH + NKV + kvh) * HS);
    }
    load_q(0, kvh * group, k0);
    cp_async_commit();

    float dk_all[RW][HS / 8][4], dv_all[RW][HS / 8][4];
    #pragma unroll
    for (int r = 0; r < RW; r++)
        #pragma unroll
        for (int nd = 0; nd < HS / 8; nd++)
            #pragma unroll
            for (int e = 0; e < 4; e++) dk_all[r][nd][e] = dv_all[r][nd][e] = 0.0f;
    float (&dk)[HS / 8][4] = dk_all[0], (&dv)[HS / 8][4] = dv_all[0];   // the warpgroup paths' (RW = 1)
    uint32_t k_frag[KVREG ? HS / 16 : 1][4], v_frag[KVREG ? HS / 16 : 1][4];   // KVREG

    for (int it = 0; it < iterations; it++) {
        const int stage = it & 1;
        const int q0 = k0 + (it % n_q) * BM;
        if (it + 1 < iterations) load_q(stage ^ 1, kvh * group + (it + 1) / n_q, k0 + ((it + 1) % n_q) * BM);
        cp_async_commit();
        cp_async_wait<1>();
        if constexpr (WG) flash_fence_proxy_async();
        __syncthreads();
        const floatX *q_tile = sQ + stage * QS, *g_tile = sG + stage * QS;
        const float *l_tile = sL + stage * BM, *d_tile = sD + stage * BM;
        if constexpr (KVREG) {
            if (WG || it == 0) {   // K and V came with the first group of copies (WG: every iteration, see flash_wgmma)
                #pragma unroll
                for (int kk = 0; kk < HS / 16; kk++) {
                    flash_ldmatrix_x4(k_frag[kk], flash_addr_a<LDS>(sK, warp * 16, kk * 16, lane));
                    flash_ldmatrix_x4(v_frag[kk], flash_addr_a<LDS>(sV, warp * 16, kk * 16, lane));
                }
            }
        }

        // S^T = K Q^T and dP^T = V dO^T (16 keys x BM queries per warp and row tile)
        float s_all[RW][BM / 8][4], dp_all[RW][BM / 8][4];
        #pragma unroll
        for (int r = 0; r < RW; r++)
            #pragma unroll
            for (int nb = 0; nb < BM / 8; nb++)
                #pragma unroll
                for (int e = 0; e < 4; e++) s_all[r][nb][e] = dp_all[r][nb][e] = 0.0f;
        float (&s)[BM / 8][4] = s_all[0], (&dp)[BM / 8][4] = dp_all[0];   // the warpgroup paths' (RW = 1)
        if constexpr (WG) {
            flash_wgmma_fence();
            if constexpr (WG == 2) {
                flash_wg_tiles_product<HS>(s, sK, q_tile);
                flash_wg_tiles_product<HS>(dp, sV, g_tile);
            } else {
                flash_wgmma<0, 0>(s, k_frag[0], flash_wg_desc_k<HS>(q_tile, 0));
                flash_wgmma<0, 0>(dp, v_frag[0], flash_wg_desc_k<HS>(g_tile, 0));
                #pragma unroll
                for (int kk = 1; kk < HS / 16; kk++) {
                    flash_wgmma<0>(s, k_frag[kk], flash_wg_desc_k<HS>(q_tile, kk));
                    flash_wgmma<0>(dp, v_frag[kk], flash_wg_desc_k<HS>(g_tile, kk));
                }
            }
            flash_wgmma_finish(s, dp);
        } else {
            #pragma unroll
            for (int kk = 0; kk < HS / 16; kk++) {
                uint32_t ka[RW][4], va[RW][4];
                if constexpr (KVREG) {
                    #pragma unroll
                    for (int i = 0; i < 4; i++) { ka[0][i] = k_frag[kk][i]; va[0][i] = v_frag[kk][i]; }
                } else {
                    #pragma unroll
                    for (int r = 0; r < RW; r++) {
                        flash_ldmatrix_x4(ka[r], flash_addr_a<LDS>(sK, r * FLASH_ROWS + warp * 16, kk * 16, lane));
                        flash_ldmatrix_x4(va[r], flash_addr_a<LDS>(sV, r * FLASH_ROWS + warp * 16, kk * 16, lane));
                    }
                }
                #pragma unroll
                for (int np = 0; np < BM / 16; np++) {
                    uint32_t qb[4], gb[4];
                    flash_ldmatrix_x4(qb, flash_addr_bt<LDS>(q_tile, np * 16, kk * 16, lane));
                    #pragma unroll
                    for (int r = 0; r < RW; r++) {
                        flash_mma(s_all[r][2 * np], ka[r], qb[0], qb[1]);
                        flash_mma(s_all[r][2 * np + 1], ka[r], qb[2], qb[3]);
                    }
                    flash_ldmatrix_x4(gb, flash_addr_bt<LDS>(g_tile, np * 16, kk * 16, lane));
                    #pragma unroll
                    for (int r = 0; r < RW; r++) {
                        flash_mma(dp_all[r][2 * np], va[r], gb[0], gb[1]);
                        flash_mma(dp_all[r][2 * np + 1], va[r], gb[2], gb[3]);
                    }
                }
            }
        }

        // P^T = exp(s - lse) (masked: query before the key, or past T), dS^T = P^T (dP^T - D)
        #pragma unroll
        for (int r = 0; r < RW; r++) {
            const bool need_mask = q0 < k0 + (r + 1) * FLASH_ROWS || q0 + BM > T;
            #pragma unroll
            for (int nb = 0; nb < BM / 8; nb++) {
                #pragma unroll
                for (int e = 0; e < 4; e++) {
                    int qi = nb * 8 + 2 * c + (e & 1), query = q0 + qi;
                    float p = flash_exp2(s_all[r][nb][e] * scale_log2 - l_tile[qi] * FLASH_LOG2E);
                    if (need_mask && (query < (e < 2 ? key0[r] : key1[r]) || query >= T)) p = 0.0f;
                    s_all[r][nb][e] = p;
                    dp_all[r][nb][e] = p * (dp_all[r][nb][e] - d_tile[qi]);
                }
            }
        }

        // dV += P^T dO, dK += dS^T Q (the queries are the k dimension)
        if constexpr (WG) {
            uint32_t pa[BM / 16][4], dsa[BM / 16][4];
            #pragma unroll
            for (int kb = 0; kb < BM / 16; kb++) {
                flash_acc_to_a<BM / 8>(pa[kb], s, kb);
                flash_acc_to_a<BM / 8>(dsa[kb], dp, kb);
            }
            flash_wgmma_fence();
            #pragma unroll
            for (int kb = 0; kb < BM / 16; kb++) {
                flash_wgmma<1>(dv, pa[kb], flash_wg_desc_mn<HS>(g_tile, kb));
                flash_wgmma<1>(dk, dsa[kb], flash_wg_desc_mn<HS>(q_tile, kb));
            }
            flash_wgmma_finish(dv, dk);
        } else {
            #pragma unroll
            for (int kb = 0; kb < BM / 16; kb++) {
                uint32_t pa[RW][4], dsa[RW][4];
                #pragma unroll
                for (int r = 0; r < RW; r++) {
                    flash_acc_to_a<BM / 8>(pa[r], s_all[r], kb);
                    flash_acc_to_a<BM / 8>(dsa[r], dp_all[r], kb);
                }
                #pragma unroll
                for (int dd = 0; dd < HS / 16; dd++) {
                    uint32_t gb[4], qb[4];
                    flash_ldmatrix_x4_trans(gb, flash_addr_b<LDS>(g_tile, kb * 16, dd * 16, lane));
                    #pragma unroll
                    for (int r = 0; r < RW; r++) {
                        flash_mma(dv_all[r][2 * dd], pa[r], gb[0], gb[1]);
                        flash_mma(dv_all[r][2 * dd + 1], pa[r], gb[2], gb[3]);
                    }
                    flash_ldmatrix_x4_trans(qb, flash_addr_b<LDS>(q_tile, kb * 16, dd * 16, lane));
                    #pragma unroll
                    for (int r = 0; r < RW; r++) {
                        flash_mma(dk_all[r][2 * dd], dsa[r], qb[0], qb[1]);
                        flash_mma(dk_all[r][2 * dd + 1], dsa[r], qb[2], qb[3]);
                    }
                }
            }
        }
        __syncthreads();   // this stage is refilled by the next iteration's prefetch
    }

    // K and V are no longer read (the loop ended on a barrier): stage dK, dV there, then store
    // (WG 2: their (BN, LDS) regions are as large as in the padded layout)
    #pragma unroll
    for (int r = 0; r < RW; r++) {
        flash_stage_acc<HS, LDS>(sK, dk_all[r], r * FLASH_ROWS + warp * 16, scale, scale, lane);
        flash_stage_acc<HS, LDS>(sV, dv_all[r], r * FLASH_ROWS + warp * 16, 1.0f, 1.0f, lane);
    }
    __syncthreads();
    if (rope_cos_sin) {   // dK back through RoPE (flash_rope_tile)
        flash_rope_tile<BN, HS>(sK, rope_cos_sin, k0, T, -1.0f);
        __syncthreads();
    }
    flash_store_tile<BN, HS>(dqkv, sK, b, k0, T, QKV, (NH + kvh) * HS);
    flash_store_tile<BN, HS>(dqkv, sV, b, k0, T, QKV, (NH + NKV + kvh) * HS);
}

// Row tiles of 16 query rows per warp, as in the forward: with RW = 2 (HS = 64 only) the block
// takes 128 query rows and every K and V fragment read from shared memory feeds two products.
// The dQ accumulators then take 2 x 32 registers; S and dP of both row tiles over the whole key
// tile would take 2 x 2 x 32 more, which spills (255 registers and spill stores at sm_90), so
// RW = 2 takes each key tile in steps of 32 keys (flash_dq_step_keys): the Q and dO fragments
// are then read once per step, the K and V fragments still once per tile. flash_dq_row_tiles
// picks the launch (the harness times both).
template <int RW> __host__ __device__ constexpr int flash_dq_step_keys() { return RW == 2 ? FLASH_KEYS / 2 : FLASH_KEYS; }
template <int HS, int RW, int WG = 0>
constexpr size_t flash_dq_smem() {
    return (size_t)2 * RW * FLASH_ROWS * (HS + FLASH_PAD) * sizeof(floatX) +
           (size_t)4 * FLASH_KEYS * (WG ? HS : HS + FLASH_PAD) * sizeof(floatX);
}

// dQ: grid over (NH, B, ceil(T / (64 RW)) tiles) in the order lpt picks (flash_block), block 128;
// the block owns query rows [q0, q0 + 64 RW) of head h (row tile r of warp w: rows q0 + r * 64 +
// w * 16 ... + 15, as in the forward) and walks the key tiles up to its last query, two stages
// deep, last tiles first as in the forward. Shared: Q, dO (64 RW, LDS); K, V (64, LDS) x 2 stages.
// Per row, dQ sums the same products in the same order for either RW (the key tiles and, inside
// a tile, its 16-key blocks in turn; a skipped row tile has no keys to add), so both launches
// give bitwise the same dQ. QREG (RW = 1): the warp's Q and dO fragments, the same for every key
// tile, are read from shared memory once and kept in 32 registers (flash_dq_q_regs). WG (HS = 64,
// RW = 1): the products are warpgroup products (flash_wgmma) reading K and V from tiles in the
// core-matrix layout, the same sums in the same order; with WG = 1 (and QREG = 1) Q and dO come
// from registers, with WG = 2 (QREG = 0) from core-matrix tiles in shared memory as well, which
// frees the fragments' 32 registers.
template <int HS, int RW, int QREG = 0, int WG = 0>
__global__ void __launch_bounds__(FLASH_THREADS) flash_attention_backward_dq_kernel(
    floatX *dqkv, const floatX *dout, const floatX *qkv, const float *lse, const float *D, int T, int NH, int NKV,
    int lpt, const float *rope_cos_sin) {
    static_assert(!WG || (HS == 64 && RW == 1 && (WG == 1) == (QREG == 1)),
                  "the warpgroup dQ pass takes head size 64, one row tile, Q and dO in registers (WG 1) or not (WG 2)");
    constexpr int BM = RW * FLASH_ROWS, BN = FLASH_KEYS, KS = flash_dq_step_keys<RW>(), LDS = HS + FLASH_PAD;
    constexpr int KVS = WG ? BN * HS : BN * LDS;   // elements of one K or V stage
    floatX *sQ = (floatX *)flash_dynamic_smem();
    floatX *sG = sQ + BM * LDS;
    floatX *sK = sG + BM * LDS;        // stage s at sK + s * KVS
    floatX *sV = sK + 2 * KVS;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane >> 2, c = lane & 3;
    int h, b, tile, tiles;
    flash_block(lpt, h, b, tile, tiles);
    const int q0 = (tiles - 1 - tile) * BM;
    const int kvh = h / (NH / NKV), QKV = (NH + 2 * NKV) * HS;
    const float scale = rsqrtf((float)HS), scale_log2 = scale * FLASH_LOG2E;
    const int n_tiles = min(T - 1, q0 + BM - 1) / BN + 1;

    // K or V rows [k0, k0 + 64) into stage `stage`, in the layout the products read
    auto load_kv = [&](int stage, int k0) {
        if constexpr (WG) {
            flash_load_tile_wg<BN, HS>(sK + stage * KVS, qkv, b, k0, T, QKV, (NH + kvh) * HS);
            flash_load_tile_wg<BN, HS>(sV + stage * KVS, qkv, b, k0, T, QKV, (NH + NKV + kvh) * HS);
        } else {
            flash_load_tile<BN, HS>(sK + stage * KVS, qkv, b, k0, T, QKV, (NH + kvh) * HS);
            flash_load_tile<BN, HS>(sV + stage * KVS, qkv, b, k0, T, QKV, (NH + NKV + kvh) * HS);
        }
    };
    if constexpr (WG == 2) {   // in the first BM x HS elements of their (BM, LDS) regions
        flash_load_tile_wg<BM, HS>(sQ, qkv, b, q0, T, QKV, h * HS);
        flash_load_tile_wg<BM, HS>(sG, dout, b, q0, T, NH * HS, h * HS);
    } else {
        flash_load_tile<BM, HS>(sQ, qkv, b, q0, T, QKV, h * HS);
        flash_load_tile<BM, HS>(sG, dout, b, q0, T, NH * HS, h * HS);
    }
    load_kv(0, 0);
    cp_async_commit();
    // this thread's two query rows of each row tile and their statistics; rows past T read those
    // of row 0: their Q and dO rows are zero, so their dS is 0 and they are not stored
    int row0[RW], row1[RW];
    float lse0[RW], lse1[RW], D0[RW], D1[RW];
    const size_t stat = ((size_t)b * NH + h) * T;
    #pragma unroll
    for (int r = 0; r < RW; r++) {
        row0[r] = q0 + r * FLASH_ROWS + warp * 16 + g;
        row1[r] = row0[r] + 8;
        lse0[r] = lse[stat + (row0[r] < T ? row0[r] : 0)] * FLASH_LOG2E;
        lse1[r] = lse[stat + (row1[r] < T ? row1[r] : 0)] * FLASH_LOG2E;
        D0[r] = D[stat + (row0[r] < T ? row0[r] : 0)];
        D1[r] = D[stat + (row1[r] < T ? row1[r] : 0)];
    }

    float dq[RW][HS / 8][4];
    #pragma unroll
    for (int r = 0; r < RW; r++)
        #pragma unroll
        for (int nd = 0; nd < HS / 8; nd++) dq[r][nd][0] = dq[r][nd][1] = dq[r][nd][2] = dq[r][nd][3] = 0.0f;
    static_assert(!QREG || RW == 1, "register-held Q and dO fragments take one row tile a warp");
    uint32_t q_frag[QREG ? HS / 16 : 1][4], g_frag[QREG ? HS / 16 : 1][4];   // QREG

    for (int j = 0; j < n_tiles; j++) {
        const int stage = j & 1, k0 = j * BN;
        if (j + 1 < n_tiles) load_kv(stage ^ 1, k0 + BN);
        cp_async_commit();
        cp_async_wait<1>();
        if constexpr (WG) flash_fence_proxy_async();
        __syncthreads();
        const floatX *k_tile = sK + stage * KVS, *v_tile = sV + stage * KVS;
        if constexpr (QREG) {
            if (WG || j == 0) {   // Q and dO came with the first group of copies (WG: every tile, see flash_wgmma)
                #pragma unroll
                for (int kk = 0; kk < HS / 16; kk++) {
                    flash_ldmatrix_x4(q_frag[kk], flash_addr_a<LDS>(sQ, warp * 16, kk * 16, lane));
                    flash_ldmatrix_x4(g_frag[kk], flash_addr_a<LDS>(sG, warp * 16, kk * 16, lane));
                }
            }
        }
        // a row tile whose rows all come before the tile's first key sees none of it (RW = 2
        // only: the block's first row tile on its last key tile)
        bool live[RW];
        #pragma unroll
        for (int r = 0; r < RW; r++) live[r] = k0 <= q0 + r * FLASH_ROWS + warp * 16 + 15;

        #pragma unroll
        for (int ks = 0; ks < BN; ks += KS) {   // keys k0 + ks ... + KS - 1
            // S = Q K^T and dP = dO V^T (16 queries x KS keys per row tile)
            float s[RW][KS / 8][4], dp[RW][KS / 8][4];
            #pragma unroll
            for (int r = 0; r < RW; r++)
                #pragma unroll
                for (int nb = 0; nb < KS / 8; nb++)
                    #pragma unroll
                    for (int e = 0; e < 4; e++) s[r][nb][e] = dp[r][nb][e] = 0.0f;
            if constexpr (WG) {
                flash_wgmma_fence();
                if constexpr (WG == 2) {
                    flash_wg_tiles_product<HS>(s[0], sQ, k_tile);
                    flash_wg_tiles_product<HS>(dp[0], sG, v_tile);
                } else {
                    flash_wgmma<0, 0>(s[0], q_frag[0], flash_wg_desc_k<HS>(k_tile, 0));
                    flash_wgmma<0, 0>(dp[0], g_frag[0], flash_wg_desc_k<HS>(v_tile, 0));
                    #pragma unroll
                    for (int kk = 1; kk < HS / 16; kk++) {
                        flash_wgmma<0>(s[0], q_frag[kk], flash_wg_desc_k<HS>(k_tile, kk));
                        flash_wgmma<0>(dp[0], g_frag[kk], flash_wg_desc_k<HS>(v_tile, kk));
                    }
                }
                flash_wgmma_finish(s[0], dp[0]);
            } else {
                #pragma unroll
                for (int kk = 0; kk < HS / 16; kk++) {
                    uint32_t qa[RW][4], ga[RW][4];
                    #pragma unroll
                    for (int r = 0; r < RW; r++) {
                        if (!live[r]) continue;
                        if constexpr (QREG) {
                            #pragma unroll
                            for (int i = 0; i < 4; i++) { qa[r][i] = q_frag[kk][i]; ga[r][i] = g_frag[kk][i]; }
                            continue;
                        }
                        flash_ldmatrix_x4(qa[r], flash_addr_a<LDS>(sQ, r * FLASH_ROWS + warp * 16, kk * 16, lane));
                        flash_ldmatrix_x4(ga[r], flash_addr_a<LDS>(sG, r * FLASH_ROWS + warp * 16, kk * 16, lane));
                    }
                    #pragma unroll
                    for (int np = 0; np < KS / 16; np++) {
                        uint32_t kb[4], vb[4];
                        flash_ldmatrix_x4(kb, flash_addr_bt<LDS>(k_tile, ks + np * 16, kk * 16, lane));
                        #pragma unroll
                        for (int r = 0; r < RW; r++) {
                            if (!live[r]) continue;
                            flash_mma(s[r][2 * np], qa[r], kb[0], kb[1]);
                            flash_mma(s[r][2 * np + 1], qa[r], kb[2], kb[3]);
                        }
                        flash_ldmatrix_x4(vb, flash_addr_bt<LDS>(v_tile, ks + np * 16, kk * 16, lane));
                        #pragma unroll
                        for (int r = 0; r < RW; r++) {
                            if (!live[r]) continue;
                            flash_mma(dp[r][2 * np], ga[r], vb[0], vb[1]);
                            flash_mma(dp[r][2 * np + 1], ga[r], vb[2], vb[3]);
                        }
                    }
                }
            }

            // dS = P (dP - D), P = exp(s - lse), 0 for keys after the query
            #pragma unroll
            for (int r = 0; r < RW; r++) {
                if (!live[r]) continue;
                const bool diagonal = k0 + ks + KS - 1 > q0 + r * FLASH_ROWS + warp * 16;
                #pragma unroll
                for (int nb = 0; nb < KS / 8; nb++) {
                    #pragma unroll
                    for (int e = 0; e < 4; e++) {
                        int key = k0 + ks + nb * 8 + 2 * c + (e & 1);
                        float p = flash_exp2(s[r][nb][e] * scale_log2 - (e < 2 ? lse0[r] : lse1[r]));
                        if (diagonal && key > (e < 2 ? row0[r] : row1[r])) p = 0.0f;
                        s[r][nb][e] = p * (dp[r][nb][e] - (e < 2 ? D0[r] : D1[r]));
                    }
                }
            }

            // dQ += dS K (the keys are the k dimension)
            if constexpr (WG) {
                flash_wg_acc_times_tile<HS>(dq[0], s[0], k_tile);
            } else {
                #pragma unroll
                for (int kb = 0; kb < KS / 16; kb++) {
                    uint32_t dsa[RW][4];
                    #pragma unroll
                    for (int r = 0; r < RW; r++) flash_acc_to_a<KS / 8>(dsa[r], s[r], kb);
                    #pragma unroll
                    for (int dd = 0; dd < HS / 16; dd++) {
                        uint32_t kt[4];
                        flash_ldmatrix_x4_trans(kt, flash_addr_b<LDS>(k_tile, ks + kb * 16, dd * 16, lane));
                        #pragma unroll
                        for (int r = 0; r < RW; r++) {
                            if (!live[r]) continue;
                            flash_mma(dq[r][2 * dd], dsa[r], kt[0], kt[1]);
                            flash_mma(dq[r][2 * dd + 1], dsa[r], kt[2], kt[3]);
                        }
                    }
                }
            }
        }
        __syncthreads();
    }

    // Q is no longer read (the loop ended on a barrier): stage dQ there, then store (WG 2: the
    // (BM, LDS) regions of Q and dO are as large as in the padded layout, so dQ fits in Q's)
    #pragma unroll
    for (int r = 0; r < RW; r++) flash_stage_acc<HS, LDS>(sQ, dq[r], r * FLASH_ROWS + warp * 16, scale, scale, lane);
    __syncthreads();
    if (rope_cos_sin) {   // dQ back through RoPE (flash_rope_tile)
        flash_rope_tile<BM, HS>(sQ, rope_cos_sin, q0, T, -1.0f);
        __syncthreads();
    }
    flash_store_tile<BM, HS>(dqkv, sQ, b, q0, T, QKV, h * HS);
}

// The dQ pass on warpgroup products with the arithmetic overlapping them (flash_dq_wgmma 3, 4
// and 5; head size 64, sm_90a): key tile j's S = Q K^T and dP = dO V^T are issued as two groups
// and P = 2^(S log2e / sqrt(HS) - lse) is formed once S has come, while dP is still on the
// tensor cores. (Leaving dQ += dS K in flight into the next tile, beside its barrier and copies,
// makes ptxas serialize every product of the loop: C7515, an accumulator defined inside the
// pipeline stage; so it is waited for at the end of its tile.) Every product sums the same terms
// in the same order, and P and dS take the same expressions, so dQ has the bits of the other dQ
// kernels. WGS and HEADS as in the pipelined forward: each warpgroup 64 query rows of the block's
// 64 WGS, the K and V tiles shared, the first of two warpgroups stopping one tile earlier; or
// (HEADS) each one query head of a kv head's group on the same rows. Q and dO are read from
// shared memory by the tensor cores. Shared: Q, dO (64 WGS x 64, core-matrix layout); K and V x 2
// stages. dQ is staged for its store (and RoPE's backward) in the K and V stages.
template <int WGS>
constexpr size_t flash_dq_pipelined_smem() {
    return (size_t)(2 * WGS * FLASH_ROWS + 4 * FLASH_KEYS) * 64 * sizeof(floatX);
}
template <int WGS, int HEADS = 0>
__global__ void __launch_bounds__(WGS * FLASH_THREADS, WGS == 2 ? 2 : 1) flash_attention_backward_dq_pipelined_kernel(
    floatX *dqkv, const floatX *dout, const floatX *qkv, const float *lse, const float *D, int T, int NH, int NKV,
    int lpt, const float *rope_cos_sin) {
    constexpr int HS = 64, NT = WGS * FLASH_THREADS, BM = WGS * FLASH_ROWS, BN = FLASH_KEYS, LDS = HS + FLASH_PAD,
                  TILE = BN * HS, ROWS = HEADS ? FLASH_ROWS : BM;
    static_assert(HEADS ? WGS == 2 || WGS == 3 : WGS == 1 || WGS == 2, "one or two warpgroups a block on the rows, two or three on the heads");
    static_assert(BM * LDS <= 4 * TILE, "dQ's staging fits in the K and V stages");
    floatX *sQ = (floatX *)flash_dynamic_smem();   // warpgroup w's 64 rows at sQ + w * 64 * HS, likewise dO
    floatX *sG = sQ + BM * HS;
    floatX *sK = sG + BM * HS;   // stage s at sK + s * TILE, s = j % 2
    floatX *sV = sK + 2 * TILE;  // likewise
    const int lane = threadIdx.x % 32, wg = threadIdx.x / FLASH_THREADS, warp = threadIdx.x / 32 % 4, g = lane >> 2,
              c = lane & 3;
    int hb, b, tile, tiles;   // HEADS: hb numbers groups of WGS query heads
    flash_block(lpt, hb, b, tile, tiles);
    const int h = HEADS ? hb * WGS + wg : hb;   // the warpgroup's query head
    const int q0 = (tiles - 1 - tile) * ROWS, wq0 = HEADS ? q0 : q0 + wg * FLASH_ROWS;
    const int kvh = h / (NH / NKV), QKV = (NH + 2 * NKV) * HS;
    const float scale = rsqrtf((float)HS), scale_log2 = scale * FLASH_LOG2E;
    const int n_tiles = min(T - 1, q0 + ROWS - 1) / BN + 1;
    const int my_tiles = min(T - 1, wq0 + FLASH_ROWS - 1) / BN + 1;
    const floatX *sQw = sQ + wg * FLASH_ROWS * HS, *sGw = sG + wg * FLASH_ROWS * HS;

    auto load_kv = [&](int j) {
        flash_load_tile_wg<BN, HS, NT>(sK + (j % 2) * TILE, qkv, b, j * BN, T, QKV, (NH + kvh) * HS);
        flash_load_tile_wg<BN, HS, NT>(sV + (j % 2) * TILE, qkv, b, j * BN, T, QKV, (NH + NKV + kvh) * HS);
    };
    if constexpr (HEADS) {
        for (int w = 0; w < WGS; w++) {
            flash_load_tile_wg<FLASH_ROWS, HS, NT>(sQ + w * FLASH_ROWS * HS, qkv, b, q0, T, QKV, (hb * WGS + w) * HS);
            flash_load_tile_wg<FLASH_ROWS, HS, NT>(sG + w * FLASH_ROWS * HS, dout, b, q0, T, NH * HS, (hb * WGS + w) * HS);
        }
    } else {
        flash_load_tile_wg<BM, HS, NT>(sQ, qkv, b, q0, T, QKV, h * HS);
        flash_load_tile_wg<BM, HS, NT>(sG, dout, b, q0, T, NH * HS, h * HS);
    }
    load_kv(0);
    cp_async_commit();
    // this thread's two query rows and their statistics; rows past T read those of row 0 (they
    // are not stored)
    const int row0 = wq0 + warp * 16 + g, row1 = row0 + 8;
    const size_t stat = ((size_t)b * NH + h) * T;
    const float lse0 = lse[stat + (row0 < T ? row0 : 0)] * FLASH_LOG2E, lse1 = lse[stat + (row1 < T ? row1 : 0)] * FLASH_LOG2E;
    const float D0 = D[stat + (row0 < T ? row0 : 0)], D1 = D[stat + (row1 < T ? row1 : 0)];

    float dq[HS / 8][4], s[BN / 8][4], dp[BN / 8][4];
    uint32_t dsa[BN / 16][4] = {};   // dS of the tile, the A operand of its dQ product
    #pragma unroll
    for (int nd = 0; nd < HS / 8; nd++) dq[nd][0] = dq[nd][1] = dq[nd][2] = dq[nd][3] = 0.0f;

    for (int j = 0; j < n_tiles; j++) {
        const int k0 = j * BN;
        cp_async_wait<0>();   // tile j (and at j = 0 Q and dO)
        flash_fence_proxy_async();
        __syncthreads();      // every thread's copies landed; the products of tile j - 1 waited for
        if (j + 1 < n_tiles) {
            load_kv(j + 1);
            cp_async_commit();
        }
        if (j >= my_tiles) continue;   // the first of two warpgroups, past its rows' last key tile
        const floatX *k_tile = sK + (j % 2) * TILE, *v_tile = sV + (j % 2) * TILE;
        flash_wgmma_fence();
        flash_wg_tiles_product<HS>(s, sQw, k_tile);
        flash_wgmma_commit();
        flash_wg_tiles_product<HS>(dp, sGw, v_tile);
        flash_wgmma_commit();
        flash_wgmma_wait_group<1>();   // S
        flash_acc_fence(s);
        // P = exp(s - lse), 0 for keys after the query, while dP is on the tensor cores
        const bool diagonal = k0 + BN - 1 > wq0 + warp * 16;
        #pragma unroll
        for (int nb = 0; nb < BN / 8; nb++) {
            #pragma unroll
            for (int e = 0; e < 4; e++) {
                int key = k0 + nb * 8 + 2 * c + (e & 1);
                float p = flash_exp2(s[nb][e] * scale_log2 - (e < 2 ? lse0 : lse1));
                if (diagonal && key > (e < 2 ? row0 : row1)) p = 0.0f;
                s[nb][e] = p;
            }
        }
        flash_acc_fence(s);
        flash_wgmma_wait_group<0>();   // dP
        flash_acc_fence(dp);
        #pragma unroll
        for (int nb = 0; nb < BN / 8; nb++)
            #pragma unroll
            for (int e = 0; e < 4; e++) s[nb][e] = s[nb][e] * (dp[nb][e] - (e < 2 ? D0 : D1));   // dS = P (dP - D)
        #pragma unroll
        for (int kb = 0; kb < BN / 16; kb++) flash_acc_to_a<BN / 8>(dsa[kb], s, kb);
        flash_frag_fence(dsa);
        flash_wgmma_fence();
        flash_wg_frags_times_tile<HS>(dq, dsa, k_tile);   // dQ += dS K (the keys are the k dimension)
        flash_wgmma_commit();
        flash_wgmma_wait_group<0>();
        flash_acc_fence(dq);
    }

    __syncthreads();   // no product reads the K and V stages any more: dQ staged there
    flash_stage_acc<HS, LDS>(sK, dq, wg * FLASH_ROWS + warp * 16, scale, scale, lane);
    __syncthreads();
    if constexpr (HEADS) {   // warpgroup w's rows of the staging tile: head hb * WGS + w, rows q0 ...
        if (rope_cos_sin) {   // dQ back through RoPE (flash_rope_tile)
            for (int w = 0; w < WGS; w++) flash_rope_tile<FLASH_ROWS, HS, NT>(sK + w * FLASH_ROWS * LDS, rope_cos_sin, q0, T, -1.0f);
            __syncthreads();
        }
        for (int w = 0; w < WGS; w++)
            flash_store_tile<FLASH_ROWS, HS, NT>(dqkv, sK + w * FLASH_ROWS * LDS, b, q0, T, QKV, (hb * WGS + w) * HS);
    } else {
        if (rope_cos_sin) {   // dQ back through RoPE (flash_rope_tile)
            flash_rope_tile<BM, HS, NT>(sK, rope_cos_sin, q0, T, -1.0f);
            __syncthreads();
        }
        flash_store_tile<BM, HS, NT>(dqkv, sK, b, q0, T, QKV, h * HS);
    }
}

// The dK/dV pass on warpgroup products with the arithmetic overlapping them (flash_dkv_wgmma 3
// and 4: one or two warpgroups a block; head size 64, sm_90a). Per query tile, S^T = K Q^T and
// dP^T = V dO^T are issued as two groups; once S^T has come, P^T is formed while dP^T is on the
// tensor cores and dV += P^T dO is issued at once; once dP^T has come, dS^T = P^T (dP^T - D) is
// formed while dV's product runs, then dK += dS^T Q; both are waited for within the tile. Every
// product sums the same terms in the same order and P^T, dS^T take the same expressions, so dK
// and dV have the bits of the other dK/dV kernels. WGS warpgroups a block, each with 64 key rows
// of the block's 64 WGS, the Q and dO tiles shared (half the L2 traffic a product with two); the
// second of two warpgroups skips each head's first query tile, which lies wholly before its keys
// (the one-warpgroup kernel's block for those keys starts a tile later). K and V are read by the
// tensor cores from shared memory. Shared: K, V (64 WGS x 64, core-matrix layout); Q, dO (64 x
// 64) x 2 stages; lse, D (64) x 2 stages. dK and dV are staged for their stores in the K and V
// region and in the Q and dO stages.
template <int WGS>
constexpr size_t flash_dkv_pipelined_smem() {
    return (size_t)(2 * WGS * FLASH_ROWS + 4 * 64) * 64 * sizeof(floatX) + 4 * 64 * sizeof(float);
}
template <int WGS>
__global__ void __launch_bounds__(WGS * FLASH_THREADS) flash_attention_backward_dkv_pipelined_kernel(
    floatX *dqkv, const floatX *dout, const floatX *qkv, const float *lse, const float *D, int T, int NH, int NKV,
    int lpt, const float *rope_cos_sin) {
    constexpr int HS = 64, NT = WGS * FLASH_THREADS, BN = WGS * FLASH_ROWS, BM = 64, LDS = HS + FLASH_PAD, QS = BM * HS;
    static_assert(WGS == 1 || WGS == 2, "one or two warpgroups a block");
    static_assert(BN * LDS <= 2 * BN * HS && BN * LDS <= 4 * QS, "dK and dV's staging fits in K, V and the Q, dO stages");
    floatX *sK = (floatX *)flash_dynamic_smem();   // warpgroup w's 64 key rows at sK + w * 64 * HS, likewise V
    floatX *sV = sK + BN * HS;
    floatX *sQ = sV + BN * HS;   // stage s at sQ + s * QS
    floatX *sG = sQ + 2 * QS;    // dout, likewise
    float *sL = (float *)(sG + 2 * QS);   // lse, stage s at sL + s * BM
    float *sD = sL + 2 * BM;
    const int lane = threadIdx.x % 32, wg = threadIdx.x / FLASH_THREADS, warp = threadIdx.x / 32 % 4, g = lane >> 2,
              c = lane & 3;
    int kvh, b, tile, tiles;
    flash_block(lpt, kvh, b, tile, tiles);
    const int k0 = tile * BN, wk0 = k0 + wg * FLASH_ROWS, group = NH / NKV;
    const int QKV = (NH + 2 * NKV) * HS;
    const float scale = rsqrtf((float)HS), scale_log2 = scale * FLASH_LOG2E;
    const int n_q = (T + BM - 1) / BM - k0 / BM;   // query tiles at or after the block's first key
    const int iterations = group * n_q;
    const int key0 = wk0 + warp * 16 + g, key1 = key0 + 8;
    const floatX *sKw = sK + wg * FLASH_ROWS * HS, *sVw = sV + wg * FLASH_ROWS * HS;

    auto load_q = [&](int stage, int h, int q0) {
        flash_load_tile_wg<BM, HS, NT>(sQ + stage * QS, qkv, b, q0, T, QKV, h * HS);
        flash_load_tile_wg<BM, HS, NT>(sG + stage * QS, dout, b, q0, T, NH * HS, h * HS);
        flash_load_stats<BM>(sL + stage * BM, lse + ((size_t)b * NH + h) * T, q0, T);   // threads 0 .. 63
        flash_load_stats<BM>(sD + stage * BM, D + ((size_t)b * NH + h) * T, q0, T);
    };
    flash_load_tile_wg<BN, HS, NT>(sK, qkv, b, k0, T, QKV, (NH + kvh) * HS);
    flash_load_tile_wg<BN, HS, NT>(sV, qkv, b, k0, T, QKV, (NH + NKV + kvh) * HS);
    load_q(0, kvh * group, k0);
    cp_async_commit();

    float dk[HS / 8][4], dv[HS / 8][4], s[BM / 8][4], dp[BM / 8][4];
    uint32_t pa[BM / 16][4], dsa[BM / 16][4];
    #pragma unroll
    for (int nd = 0; nd < HS / 8; nd++)
        #pragma unroll
        for (int e = 0; e < 4; e++) dk[nd][e] = dv[nd][e] = 0.0f;

    for (int it = 0; it < iterations; it++) {
        const int stage = it & 1, q0 = k0 + (it % n_q) * BM;
        cp_async_wait<0>();   // this tile (and at it = 0 K and V)
        flash_fence_proxy_async();
        __syncthreads();      // every thread's copies landed, the previous tile's products waited for
        if (it + 1 < iterations) {
            load_q(stage ^ 1, kvh * group + (it + 1) / n_q, k0 + ((it + 1) % n_q) * BM);
            cp_async_commit();
        }
        if (wg == 1 && it % n_q == 0) continue;   // the second warpgroup: queries wholly before its keys
        const floatX *q_tile = sQ + stage * QS, *g_tile = sG + stage * QS;
        const float *l_tile = sL + stage * BM, *d_tile = sD + stage * BM;
        flash_wgmma_fence();
        flash_wg_tiles_product<HS>(s, sKw, q_tile);
        flash_wgmma_commit();
        flash_wg_tiles_product<HS>(dp, sVw, g_tile);
        flash_wgmma_commit();
        flash_wgmma_wait_group<1>();   // S^T
        flash_acc_fence(s);
        // P^T = exp(s - lse) (masked: query before the key, or past T), while dP^T is on the tensor cores
        const bool need_mask = q0 < wk0 + FLASH_ROWS || q0 + BM > T;
        #pragma unroll
        for (int nb = 0; nb < BM / 8; nb++) {
            #pragma unroll
            for (int e = 0; e < 4; e++) {
                int qi = nb * 8 + 2 * c + (e & 1), query = q0 + qi;
                float p = flash_exp2(s[nb][e] * scale_log2 - l_tile[qi] * FLASH_LOG2E);
                if (need_mask && (query < (e < 2 ? key0 : key1) || query >= T)) p = 0.0f;
                s[nb][e] = p;
            }
        }
        #pragma unroll
        for (int kb = 0; kb < BM / 16; kb++) flash_acc_to_a<BM / 8>(pa[kb], s, kb);
        flash_acc_fence(s);
        flash_frag_fence(pa);
        flash_wgmma_fence();
        flash_wg_frags_times_tile<HS>(dv, pa, g_tile);   // dV += P^T dO (the queries are the k dimension)
        flash_wgmma_commit();
        flash_wgmma_wait_group<1>();   // dP^T
        flash_acc_fence(dp);
        // dS^T = P^T (dP^T - D), while dV's product runs
        #pragma unroll
        for (int nb = 0; nb < BM / 8; nb++)
            #pragma unroll
            for (int e = 0; e < 4; e++) dp[nb][e] = s[nb][e] * (dp[nb][e] - d_tile[nb * 8 + 2 * c + (e & 1)]);
        #pragma unroll
        for (int kb = 0; kb < BM / 16; kb++) flash_acc_to_a<BM / 8>(dsa[kb], dp, kb);
        flash_frag_fence(dsa);
        flash_wgmma_fence();
        flash_wg_frags_times_tile<HS>(dk, dsa, q_tile);   // dK += dS^T Q
        flash_wgmma_commit();
        flash_wgmma_wait_group<0>();
        flash_acc_fence(dv);
        flash_acc_fence(dk);
    }

    // no product reads the tiles any more once every thread is here: dK staged in the K and V
    // region, dV in the Q and dO stages
    __syncthreads();
    flash_stage_acc<HS, LDS>(sK, dk, wg * FLASH_ROWS + warp * 16, scale, scale, lane);
    flash_stage_acc<HS, LDS>(sQ, dv, wg * FLASH_ROWS + warp * 16, 1.0f, 1.0f, lane);
    __syncthreads();
    if (rope_cos_sin) {   // dK back through RoPE (flash_rope_tile)
        flash_rope_tile<BN, HS, NT>(sK, rope_cos_sin, k0, T, -1.0f);
        __syncthreads();
    }
    flash_store_tile<BN, HS, NT>(dqkv, sK, b, k0, T, QKV, (NH + kvh) * HS);
    flash_store_tile<BN, HS, NT>(dqkv, sQ, b, k0, T, QKV, (NH + NKV + kvh) * HS);
}

// ---------------------------------------------------------------------------------------------
// launchers (test/attention_flash_emu.cpp launches the kernels itself; the whole-model emulator,
// test/model_cuda_emu.cpp, runs these with ATTENTION_FLASH_EMULATED_LAUNCHERS)
#if !defined(ATTENTION_FLASH_EMULATION) || defined(ATTENTION_FLASH_EMULATED_LAUNCHERS)
#include "tuning.cuh"

// Raises a kernel's dynamic shared-memory limit once (more than 48 KiB needs the opt-in).
template <typename Kernel>
static inline void flash_allow_smem(Kernel kernel, size_t bytes, bool *done) {
    if (*done) return;
    cudaCheck(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
    *done = true;
}

static inline void attention_flash_check(int B, int T, int NH, int NKV, int HS, const void *p0, const void *p1,
                                         const void *p2, const void *p3) {
    cudaRequire(B >= 1 && B <= 65535, "attention_flash: batch size must be in 1..65535 (grid y or z)");
    cudaRequire(NH <= 65535, "attention_flash: n_head must be at most 65535 (grid y)");
    cudaRequire(NH >= 1 && NKV >= 1 && NH % NKV == 0, "attention_flash: n_head must be a multiple of n_kv_head");
    cudaRequire(T >= 1 && (T + FLASH_ROWS - 1) / FLASH_ROWS <= 65535, "attention_flash: T must be in 1..65535 * 64 (grid z)");
    cudaRequire(attention_flash_supports(HS), "attention_flash: head_dim must be 64 or 128");
    // 16-byte loads and stores of rows: the tensors must start on 16 bytes (rows then do too)
    uintptr_t any_low_bits = (uintptr_t)p0 | (uintptr_t)p1 | (uintptr_t)p2 | (uintptr_t)p3;
    cudaRequire((any_low_bits & 15) == 0, "attention_flash: tensors must be 16-byte aligned");
}

// Row tiles per warp of the forward launch: 1 (64 query rows a block) or 2 (128 rows, head size
// 64 only; head size 128 always takes 1).
static int flash_forward_row_tiles = 1;
// Row tiles per warp of the backward's dQ launch, likewise 1 or 2 (head size 64 only).
static int flash_dq_row_tiles = 1;
// Blocks an SM the compiler is asked to fit (launch bounds; fewer registers a thread, the same
// arithmetic): the one-tile forward at head size 64 with 0 (the compiler's choice: 148 registers
// at sm_90, 3 blocks) or 4 (128 registers, 4 blocks); the dK/dV pass at head size 64 with 0 (185
// registers, 2 blocks) or 3 (168, 3 blocks).
static int flash_forward_min_blocks = 0;
static int flash_dkv_min_blocks = 0;
// Fragments kept in registers across the loop (head size 64): the dK/dV pass's K and V (with the
// compiler's registers, flash_dkv_min_blocks 0), the one-tile dQ pass's Q and dO. 0 or 1.
static int flash_dkv_kv_regs = 0;
static int flash_dq_q_regs = 0;
// Key row tiles a warp in the dK/dV pass (head size 64): 1, or 2 (flash_attention_backward_dkv_kernel).
static int flash_dkv_row_tiles = 1;
// Grid order of the forward's and the backward's launches: 0 grouped, 1 lpt (header comment).
static int flash_forward_lpt = 0;
static int flash_backward_lpt = 0;
// Warpgroup products (wgmma; head size 64, only where flash_wgmma_supported): the forward (0;
// 1; 2 and 3 pipelined, flash_attention_forward_pipelined_kernel, with one or two warpgroups a
// block; 4 pipelined with flash_heads_per_block's warpgroups on the query heads of a kv head),
// the dQ pass and the dK/dV pass (0; 1 with Q and dO, K and V in registers; 2 with them read from
// shared memory too; 3 and 4 pipelined, flash_attention_backward_dq_pipelined_kernel and
// flash_attention_backward_dkv_pipelined_kernel, with one or two warpgroups a block; the dQ pass
// 5 pipelined on the heads, as the forward's 4).
static int flash_forward_wgmma = 0;
static int flash_dq_wgmma = 0;
static int flash_dkv_wgmma = 0;

// sets *ok to 1 in the sm_90a image, where the warpgroup kernels have their products
__global__ void flash_wgmma_probe_kernel(int *ok) {
#ifdef FLASH_WGMMA_ASM
    *ok = 1;
#else
    *ok = 0;
#endif
}
// Whether the tuner tries the warpgroup kernels: 1, 0, or -1 to read TRAIN_MORA_FLASH_WGMMA
// (1 on; unset or 0 off) at the first tuning. Off by default until they have passed their GPU
// harness: a kernel that faulted would end the process, not just lose the tuning.
static int flash_tune_wgmma = -1;
static inline int flash_tune_wgmma_enabled(void) {
    if (flash_tune_wgmma < 0) {
        const char *v = getenv("TRAIN_MORA_FLASH_WGMMA");
        if (v != NULL && strcmp(v, "0") != 0 && strcmp(v, "1") != 0) {
            fprintf(stderr, "error: TRAIN_MORA_FLASH_WGMMA=%s: expected 0 or 1\n", v);
            exit(1);
        }
        flash_tune_wgmma = v != NULL && strcmp(v, "1") == 0;
    }
    return flash_tune_wgmma;
}
// 1 when the current device runs the sm_90a image of these kernels (an H100 or H200 with the
// build's sm_90a code), so the warpgroup kernels may be launched; asked once.
static inline int flash_wgmma_supported(void) {
    static int known = -1;
    if (known < 0) {
        int *d_ok = (int *)cudaMallocCheck(sizeof(int)), ok = 0;
        flash_wgmma_probe_kernel<<<1, 1>>>(d_ok);
        cudaCheckLaunch();
        cudaCheck(cudaMemcpy(&ok, d_ok, sizeof(int), cudaMemcpyDeviceToHost));
        cudaCheck(cudaFree(d_ok));
        known = ok;
    }
    return known;
}
static inline dim3 flash_grid(int lpt, int heads, int B, int tiles) { return lpt ? dim3(heads, B, tiles) : dim3(tiles, heads, B); }

template <int HS, int RW, int MINB, int WG, int ROPE>
static inline void attention_flash_forward_launch_kernel(floatX *out, float *lse, const floatX *qkv, int B, int T,
                                                         int NH, int NKV, const float *rope_cos_sin,
                                                         floatX *q_rotated, cudaStream_t stream) {
    static bool smem_set = false;
    constexpr size_t smem = flash_forward_smem<HS, RW, WG>();
    flash_allow_smem(flash_attention_forward_kernel<HS, RW, MINB, WG, ROPE>, smem, &smem_set);
    dim3 grid = flash_grid(flash_forward_lpt, NH, B, ceil_div(T, RW * FLASH_ROWS));
    flash_attention_forward_kernel<HS, RW, MINB, WG, ROPE><<<grid, FLASH_THREADS, smem, stream>>>(
        out, lse, qkv, T, NH, NKV, flash_forward_lpt, flash_forward_max_slack, rope_cos_sin, q_rotated);
    cudaCheckLaunch();
}
template <int WGS, int ROPE, int HEADS = 0>
static inline void attention_flash_forward_pipelined_launch(floatX *out, float *lse, const floatX *qkv, int B, int T,
                                                            int NH, int NKV, const float *rope_cos_sin,
                                                            floatX *q_rotated, cudaStream_t stream) {
    static bool smem_set = false;
    constexpr size_t smem = flash_forward_pipelined_smem<WGS>();
    flash_allow_smem(flash_attention_forward_pipelined_kernel<WGS, ROPE, HEADS>, smem, &smem_set);
    dim3 grid = HEADS ? flash_grid(flash_forward_lpt, NH / WGS, B, ceil_div(T, FLASH_ROWS))
                      : flash_grid(flash_forward_lpt, NH, B, ceil_div(T, WGS * FLASH_ROWS));
    flash_attention_forward_pipelined_kernel<WGS, ROPE, HEADS><<<grid, WGS * FLASH_THREADS, smem, stream>>>(
        out, lse, qkv, T, NH, NKV, flash_forward_lpt, flash_forward_max_slack, rope_cos_sin, q_rotated);
    cudaCheckLaunch();
}
// WGS warpgroups a block on the rows, or (heads 1) flash_heads_per_block's on the heads of a kv
// group: with RoPE in the loads, or no such group, that launch takes one warpgroup a block (the
// same bits either way)
template <int WGS>
static inline void attention_flash_forward_pipelined(floatX *out, float *lse, const floatX *qkv, int B, int T, int NH,
                                                     int NKV, const float *rope_cos_sin, floatX *q_rotated,
                                                     cudaStream_t stream, int heads = 0) {
    const int per_block = heads && !rope_cos_sin ? flash_heads_per_block(NH, NKV) : 0;
    if (per_block == 3) attention_flash_forward_pipelined_launch<3, 0, 1>(out, lse, qkv, B, T, NH, NKV, NULL, NULL, stream);
    else if (per_block == 2) attention_flash_forward_pipelined_launch<2, 0, 1>(out, lse, qkv, B, T, NH, NKV, NULL, NULL, stream);
    else if (heads) attention_flash_forward_pipelined<1>(out, lse, qkv, B, T, NH, NKV, rope_cos_sin, q_rotated, stream);
    else if (rope_cos_sin)
        attention_flash_forward_pipelined_launch<WGS, 1>(out, lse, qkv, B, T, NH, NKV, rope_cos_sin, q_rotated, stream);
    else
        attention_flash_forward_pipelined_launch<WGS, 0>(out, lse, qkv, B, T, NH, NKV, NULL, NULL, stream);
}
template <int HS, int RW, int MINB, int WG = 0>
static inline void attention_flash_forward_launch(floatX *out, float *lse, const floatX *qkv, int B, int T, int NH,
                                                  int NKV, const float *rope_cos_sin, floatX *q_rotated,
                                                  cudaStream_t stream) {
    if (rope_cos_sin)
        attention_flash_forward_launch_kernel<HS, RW, MINB, WG, 1>(out, lse, qkv, B, T, NH, NKV, rope_cos_sin, q_rotated, stream);
    else
        attention_flash_forward_launch_kernel<HS, RW, MINB, WG, 0>(out, lse, qkv, B, T, NH, NKV, NULL, NULL, stream);
}

// out (B, T, NH*HS) bf16 and lse (B, NH, T) fp32 from qkv (B, T, QKV) bf16, RoPE and the
// attention in one: with rope_cos_sin (the device copy of rope_table_host's table, at least T
// positions) qkv's k heads come rotated already (rope_forward_keys, rope.cuh) and its q heads
// not: each block rotates its query tile as it loads it and stores it back rotated into
// q_rotated (qkv itself), so that out, lse and qkv afterwards are, bit for bit, what
// rope_forward followed by attention_flash_forward gives, with the q heads read and written once
// instead of twice each. rope_cos_sin NULL: attention_flash_forward.
static inline void attention_flash_forward_rope(floatX *out, float *lse, const floatX *qkv, int B, int T, int NH,
                                                int NKV, int HS, const float *rope_cos_sin, floatX *q_rotated,
                                                cudaStream_t stream) {
    attention_flash_check(B, T, NH, NKV, HS, out, qkv, qkv, qkv);
    cudaRequire(!rope_cos_sin || q_rotated == qkv, "attention_flash_forward_rope: the rotated queries go back into qkv");
    if (HS == 64 && flash_forward_wgmma == 4) attention_flash_forward_pipelined<1>(out, lse, qkv, B, T, NH, NKV, rope_cos_sin, q_rotated, stream, 1);
    else if (HS == 64 && flash_forward_wgmma == 3) attention_flash_forward_pipelined<2>(out, lse, qkv, B, T, NH, NKV, rope_cos_sin, q_rotated, stream);
    else if (HS == 64 && flash_forward_wgmma == 2) attention_flash_forward_pipelined<1>(out, lse, qkv, B, T, NH, NKV, rope_cos_sin, q_rotated, stream);
    else if (HS == 64 && flash_forward_wgmma) attention_flash_forward_launch<64, 1, 0, 1>(out, lse, qkv, B, T, NH, NKV, rope_cos_sin, q_rotated, stream);
    else if (HS == 64 && flash_forward_row_tiles == 2) attention_flash_forward_launch<64, 2, 0>(out, lse, qkv, B, T, NH, NKV, rope_cos_sin, q_rotated, stream);
    else if (HS == 64 && flash_forward_min_blocks == 4) attention_flash_forward_launch<64, 1, 4>(out, lse, qkv, B, T, NH, NKV, rope_cos_sin, q_rotated, stream);
    else if (HS == 64) attention_flash_forward_launch<64, 1, 0>(out, lse, qkv, B, T, NH, NKV, rope_cos_sin, q_rotated, stream);
    else attention_flash_forward_launch<128, 1, 0>(out, lse, qkv, B, T, NH, NKV, rope_cos_sin, q_rotated, stream);
}

// out (B, T, NH*HS) bf16 and lse (B, NH, T) fp32 from qkv (B, T, QKV) bf16; as attention_forward.
static inline void attention_flash_forward(floatX *out, float *lse, const floatX *qkv, int B, int T, int NH, int NKV,
                                           int HS, cudaStream_t stream) {
    attention_flash_forward_rope(out, lse, qkv, B, T, NH, NKV, HS, NULL, NULL, stream);
}

// The backward's two passes are independent (each reads qkv, dout, lse and D and writes its own
// columns of dqkv), so they run side by side: dK/dV on a second stream, dQ on the caller's, each
// filling the SMs the other's uneven causal tail leaves idle. The second stream joins back before
// the launcher returns (an event the caller's stream waits on), so to the caller it is one
// stream-ordered operation, also inside a CUDA graph capture. flash_backward_side_by_side = 0
// runs them one after the other on the caller's stream (the harness times both).
static int flash_backward_side_by_side = 1;
static inline cudaStream_t flash_side_stream(cudaEvent_t *fork, cudaEvent_t *join) {
    static cudaStream_t side = NULL;
    static cudaEvent_t fork_event, join_event;
    if (side == NULL) {
        // the highest priority, as a CUDA model's main stream: the dK/dV pass is on the critical
        // path of the backward, beside the dQ pass, not filler
        int least_priority = 0, greatest_priority = 0;
        cudaCheck(cudaDeviceGetStreamPriorityRange(&least_priority, &greatest_priority));
        cudaCheck(cudaStreamCreateWithPriority(&side, cudaStreamNonBlocking, greatest_priority));
        cudaCheck(cudaEventCreateWithFlags(&fork_event, cudaEventDisableTiming));
        cudaCheck(cudaEventCreateWithFlags(&join_event, cudaEventDisableTiming));
    }
    *fork = fork_event;
    *join = join_event;
    return side;
}

template <int HS, int DQ_RW, int DQ_QREG, int DKV_MINB, int DKV_KVREG, int DQ_WG = 0, int DKV_WG = 0, int DKV_RW = 1>
static inline void attention_flash_backward_launch(floatX *dqkv, float *D, const floatX *dout, const floatX *qkv,
                                                   const floatX *out, const float *lse, int B, int T, int NH, int NKV,
                                                   const float *rope_cos_sin, cudaStream_t stream) {
    // DQ_WG 3 and 4: the pipelined dQ pass with one or two warpgroups a block on the rows; 5 and 6
    // with three or two on the heads of a kv group
    constexpr int DQ_HEADS = DQ_WG == 5 ? 3 : DQ_WG == 6 ? 2 : 0, DQ_ON_HEADS = DQ_HEADS != 0;
    constexpr int DQ_PIPE = DQ_HEADS ? DQ_HEADS : DQ_WG >= 3 ? DQ_WG - 2 : 0;
    constexpr int DQ_ROWS = DQ_HEADS ? FLASH_ROWS : DQ_PIPE ? DQ_PIPE * FLASH_ROWS : DQ_RW * FLASH_ROWS;
    static_assert(!DQ_PIPE || (HS == 64 && DQ_RW == 1 && !DQ_QREG), "the pipelined dQ pass: head size 64, one row tile");
    // DKV_WG 3 and 4: the pipelined dK/dV pass with one or two warpgroups a block
    constexpr int DKV_PIPE = DKV_WG >= 3 ? DKV_WG - 2 : 0, DKV_ROWS = DKV_PIPE ? DKV_PIPE * FLASH_ROWS : DKV_RW * FLASH_ROWS;
    static_assert(!DKV_PIPE || (HS == 64 && DKV_RW == 1 && !DKV_KVREG && !DKV_MINB), "the pipelined dK/dV pass: head size 64");
    static bool dkv_set = false, dq_set = false;
    constexpr size_t dkv_smem = DKV_PIPE ? flash_dkv_pipelined_smem<DKV_PIPE ? DKV_PIPE : 1>() : flash_dkv_smem<HS, DKV_WG, DKV_RW>();
    constexpr size_t dq_smem = DQ_PIPE ? flash_dq_pipelined_smem<DQ_PIPE ? DQ_PIPE : 1>() : flash_dq_smem<HS, DQ_RW, DQ_WG>();
    if constexpr (DKV_PIPE) flash_allow_smem(flash_attention_backward_dkv_pipelined_kernel<DKV_PIPE>, dkv_smem, &dkv_set);
    else flash_allow_smem(flash_attention_backward_dkv_kernel<HS, DKV_MINB, DKV_KVREG, DKV_WG, DKV_RW>, dkv_smem, &dkv_set);
    if constexpr (DQ_PIPE) flash_allow_smem(flash_attention_backward_dq_pipelined_kernel<DQ_PIPE, DQ_ON_HEADS>, dq_smem, &dq_set);
    else flash_allow_smem(flash_attention_backward_dq_kernel<HS, DQ_RW, DQ_QREG, DQ_WG>, dq_smem, &dq_set);
    long long threads = (long long)B * T * NH * (HS / 8);
    flash_attention_backward_preprocess_kernel<HS><<<ceil_div(threads, 256), 256, 0, stream>>>(D, dout, out, B, T, NH);
    cudaCheckLaunch();
    const int lpt = flash_backward_lpt;
    dim3 grid_kv = flash_grid(lpt, NKV, B, ceil_div(T, DKV_ROWS)), grid_q = flash_grid(lpt, DQ_HEADS ? NH / DQ_HEADS : NH, B, ceil_div(T, DQ_ROWS));
    cudaStream_t kv_stream = stream;
    cudaEvent_t fork, join;
    if (flash_backward_side_by_side) {
        kv_stream = flash_side_stream(&fork, &join);
        cudaCheck(cudaEventRecord(fork, stream));
        cudaCheck(cudaStreamWaitEvent(kv_stream, fork, 0));
    }
    if constexpr (DKV_PIPE)
        flash_attention_backward_dkv_pipelined_kernel<DKV_PIPE><<<grid_kv, DKV_PIPE * FLASH_THREADS, dkv_smem, kv_stream>>>(
            dqkv, dout, qkv, lse, D, T, NH, NKV, lpt, rope_cos_sin);
    else
        flash_attention_backward_dkv_kernel<HS, DKV_MINB, DKV_KVREG, DKV_WG, DKV_RW><<<grid_kv, FLASH_THREADS, dkv_smem, kv_stream>>>(
            dqkv, dout, qkv, lse, D, T, NH, NKV, lpt, rope_cos_sin);
    cudaCheckLaunch();
    if constexpr (DQ_PIPE)
        flash_attention_backward_dq_pipelined_kernel<DQ_PIPE, DQ_ON_HEADS><<<grid_q, DQ_PIPE * FLASH_THREADS, dq_smem, stream>>>(
            dqkv, dout, qkv, lse, D, T, NH, NKV, lpt, rope_cos_sin);
    else
        flash_attention_backward_dq_kernel<HS, DQ_RW, DQ_QREG, DQ_WG><<<grid_q, FLASH_THREADS, dq_smem, stream>>>(
            dqkv, dout, qkv, lse, D, T, NH, NKV, lpt, rope_cos_sin);
    cudaCheckLaunch();
    if (flash_backward_side_by_side) {
        cudaCheck(cudaEventRecord(join, kv_stream));
        cudaCheck(cudaStreamWaitEvent(stream, join, 0));
    }
}

// The head-size-64 backward's variants, a code for each pass, which attention_flash_backward
// computes from the switches above (flash_dq_*, flash_dkv_*, set by flash_set_config) and turns
// into the template arguments of attention_flash_backward_launch, and so into the kernel that
// runs. Head size 128 has one variant: the mma.sync kernels with the defaults' arguments.
//
// The dQ pass (the switch that selects it in parentheses):
enum FlashDqVariant {
    FLASH_DQ_MMA = 0,           // flash_attention_backward_dq_kernel<64, 1, 0, 0>: mma.sync, one 16-row
                                // tile a warp, the compiler's registers (the default)
    FLASH_DQ_MMA_QREGS = 1,     // <64, 1, 1, 0>: Q and dO fragments kept in registers across the key
                                // loop (flash_dq_q_regs 1)
    FLASH_DQ_MMA_TWO_TILES = 2, // <64, 2, 0, 0>: two row tiles a warp, 128 rows a block
                                // (flash_dq_row_tiles 2)
    FLASH_DQ_WGMMA_REGS = 3,    // <64, 1, 1, 1>: warpgroup products, Q and dO in registers
                                // (flash_dq_wgmma 1)
    FLASH_DQ_WGMMA_SMEM = 4,    // <64, 1, 0, 2>: warpgroup products, Q and dO read from shared
                                // memory too (flash_dq_wgmma 2)
    FLASH_DQ_PIPE_ROWS1 = 5,    // flash_attention_backward_dq_pipelined_kernel<1, 0>: pipelined
                                // warpgroup products, one warpgroup a block (flash_dq_wgmma 3)
    FLASH_DQ_PIPE_ROWS2 = 6,    // flash_attention_backward_dq_pipelined_kernel<2, 0>: two warpgroups
                                // a block on 128 rows (flash_dq_wgmma 4)
    FLASH_DQ_PIPE_HEADS = 7,    // flash_dq_wgmma 5: pipelined on the query heads of a kv head's group;
                                // never launched under this code, it becomes one of the next two
                                // by flash_heads_per_block, or FLASH_DQ_PIPE_ROWS1 where the group
                                // divides by neither 3 nor 2 (the HEADS kernel needs 2 or 3 heads)
    FLASH_DQ_PIPE_HEADS3 = 8,   // flash_attention_backward_dq_pipelined_kernel<3, 1>: three
                                // warpgroups a block, one a query head (groups divisible by 3)
    FLASH_DQ_PIPE_HEADS2 = 9,   // flash_attention_backward_dq_pipelined_kernel<2, 1>: two, likewise
                                // (groups divisible by 2 and not 3)
};
// The dK/dV pass:
enum FlashDkvVariant {
    FLASH_DKV_MMA = 0,            // flash_attention_backward_dkv_kernel<64, 0, 0, 0, 1>: mma.sync,
                                  // the compiler's registers (the default)
    FLASH_DKV_MMA_KVREGS = 1,     // <64, 0, 1, 0, 1>: K and V fragments kept in registers
                                  // (flash_dkv_kv_regs 1)
    FLASH_DKV_MMA_MINB3 = 2,      // <64, 3, 0, 0, 1>: launch bounds asking for three blocks an SM
                                  // (flash_dkv_min_blocks 3)
    FLASH_DKV_WGMMA_REGS = 3,     // <64, 0, 1, 1, 1>: warpgroup products, K and V in registers
                                  // (flash_dkv_wgmma 1)
    FLASH_DKV_WGMMA_SMEM = 4,     // <64, 0, 0, 2, 1>: warpgroup products, K and V read from shared
                                  // memory too (flash_dkv_wgmma 2)
    FLASH_DKV_MMA_TWO_TILES = 5,  // <64, 0, 0, 0, 2>: two key row tiles a warp (flash_dkv_row_tiles 2,
                                  // which takes precedence over every other dK/dV switch)
    FLASH_DKV_PIPE1 = 6,          // flash_attention_backward_dkv_pipelined_kernel<1>: pipelined
                                  // warpgroup products, one warpgroup a block (flash_dkv_wgmma 3)
    FLASH_DKV_PIPE2 = 7,          // flash_attention_backward_dkv_pipelined_kernel<2>: two warpgroups
                                  // a block (flash_dkv_wgmma 4)
};

// The head-size-64 backward with the dQ pass's variant fixed (its template arguments), the dK/dV
// pass's picked by its FlashDkvVariant code.
template <int DQ_RW, int DQ_QREG, int DQ_WG>
static inline void flash_backward_dkv_pick(int dkv, floatX *dqkv, float *D, const floatX *dout, const floatX *qkv,
                                           const floatX *out, const float *lse, int B, int T, int NH, int NKV,
                                           const float *rope_cos_sin, cudaStream_t stream) {
    switch (dkv) {
    case FLASH_DKV_PIPE2: attention_flash_backward_launch<64, DQ_RW, DQ_QREG, 0, 0, DQ_WG, 4>(dqkv, D, dout, qkv, out, lse, B, T, NH, NKV, rope_cos_sin, stream); break;
    case FLASH_DKV_PIPE1: attention_flash_backward_launch<64, DQ_RW, DQ_QREG, 0, 0, DQ_WG, 3>(dqkv, D, dout, qkv, out, lse, B, T, NH, NKV, rope_cos_sin, stream); break;
    case FLASH_DKV_MMA_TWO_TILES: attention_flash_backward_launch<64, DQ_RW, DQ_QREG, 0, 0, DQ_WG, 0, 2>(dqkv, D, dout, qkv, out, lse, B, T, NH, NKV, rope_cos_sin, stream); break;
    case FLASH_DKV_WGMMA_SMEM: attention_flash_backward_launch<64, DQ_RW, DQ_QREG, 0, 0, DQ_WG, 2>(dqkv, D, dout, qkv, out, lse, B, T, NH, NKV, rope_cos_sin, stream); break;
    case FLASH_DKV_WGMMA_REGS: attention_flash_backward_launch<64, DQ_RW, DQ_QREG, 0, 1, DQ_WG, 1>(dqkv, D, dout, qkv, out, lse, B, T, NH, NKV, rope_cos_sin, stream); break;
    case FLASH_DKV_MMA_MINB3: attention_flash_backward_launch<64, DQ_RW, DQ_QREG, 3, 0, DQ_WG, 0>(dqkv, D, dout, qkv, out, lse, B, T, NH, NKV, rope_cos_sin, stream); break;
    case FLASH_DKV_MMA_KVREGS: attention_flash_backward_launch<64, DQ_RW, DQ_QREG, 0, 1, DQ_WG, 0>(dqkv, D, dout, qkv, out, lse, B, T, NH, NKV, rope_cos_sin, stream); break;
    default:   // FLASH_DKV_MMA
        attention_flash_backward_launch<64, DQ_RW, DQ_QREG, 0, 0, DQ_WG, 0>(dqkv, D, dout, qkv, out, lse, B, T, NH, NKV, rope_cos_sin, stream); break;
    }
}

// dqkv (B, T, QKV) bf16 written (every element) given dout (B, T, NH*HS), the forward's qkv, out
// and lse; D (B, NH, T) fp32 is scratch. As attention_backward. With rope_cos_sin (the device
// copy of rope_table_host's table, at least T positions; NULL for none) the q and k parts of
// dqkv are also taken back through RoPE, as rope_backward would take them afterwards, bit for bit.
static inline void attention_flash_backward(floatX *dqkv, float *D, const floatX *dout, const floatX *qkv,
                                            const floatX *out, const float *lse, int B, int T, int NH, int NKV, int HS,
                                            cudaStream_t stream, const float *rope_cos_sin = NULL) {
    attention_flash_check(B, T, NH, NKV, HS, dqkv, dout, qkv, out);
    if (HS == 128) {
        attention_flash_backward_launch<128, 1, 0, 0, 0>(dqkv, D, dout, qkv, out, lse, B, T, NH, NKV, rope_cos_sin, stream);
        return;
    }
    // head size 64: each pass's variant (FlashDqVariant, FlashDkvVariant) from the switches, the
    // first that is set in the order written: flash_dq_wgmma 1..5 give codes 3..7, flash_dkv_wgmma
    // 1 and 2 give 3 and 4, 3 and 4 give 6 and 7
    int dq = flash_dq_wgmma ? FLASH_DQ_WGMMA_REGS - 1 + flash_dq_wgmma
             : flash_dq_row_tiles == 2 ? FLASH_DQ_MMA_TWO_TILES
             : flash_dq_q_regs ? FLASH_DQ_MMA_QREGS : FLASH_DQ_MMA;
    int dkv = flash_dkv_row_tiles == 2 ? FLASH_DKV_MMA_TWO_TILES
              : flash_dkv_wgmma >= 3 ? FLASH_DKV_PIPE1 - 3 + flash_dkv_wgmma
              : flash_dkv_wgmma ? FLASH_DKV_WGMMA_REGS - 1 + flash_dkv_wgmma
              : flash_dkv_min_blocks == 3 ? FLASH_DKV_MMA_MINB3
              : flash_dkv_kv_regs ? FLASH_DKV_MMA_KVREGS : FLASH_DKV_MMA;
    if (dq == FLASH_DQ_PIPE_HEADS) {   // the pipelined dQ pass on the heads of a kv group, where the group allows it
        int per_block = flash_heads_per_block(NH, NKV);
        dq = per_block == 3 ? FLASH_DQ_PIPE_HEADS3 : per_block == 2 ? FLASH_DQ_PIPE_HEADS2 : FLASH_DQ_PIPE_ROWS1;
    }
    // the DQ_WG template argument: 1 and 2 the warpgroup products (registers, shared memory), 3 and
    // 4 pipelined with one or two warpgroups on the rows, 5 and 6 with three or two on the heads
    switch (dq) {
    case FLASH_DQ_PIPE_HEADS2: flash_backward_dkv_pick<1, 0, 6>(dkv, dqkv, D, dout, qkv, out, lse, B, T, NH, NKV, rope_cos_sin, stream); break;
    case FLASH_DQ_PIPE_HEADS3: flash_backward_dkv_pick<1, 0, 5>(dkv, dqkv, D, dout, qkv, out, lse, B, T, NH, NKV, rope_cos_sin, stream); break;
    case FLASH_DQ_PIPE_ROWS2: flash_backward_dkv_pick<1, 0, 4>(dkv, dqkv, D, dout, qkv, out, lse, B, T, NH, NKV, rope_cos_sin, stream); break;
    case FLASH_DQ_PIPE_ROWS1: flash_backward_dkv_pick<1, 0, 3>(dkv, dqkv, D, dout, qkv, out, lse, B, T, NH, NKV, rope_cos_sin, stream); break;
    case FLASH_DQ_WGMMA_SMEM: flash_backward_dkv_pick<1, 0, 2>(dkv, dqkv, D, dout, qkv, out, lse, B, T, NH, NKV, rope_cos_sin, stream); break;
    case FLASH_DQ_WGMMA_REGS: flash_backward_dkv_pick<1, 1, 1>(dkv, dqkv, D, dout, qkv, out, lse, B, T, NH, NKV, rope_cos_sin, stream); break;
    case FLASH_DQ_MMA_TWO_TILES: flash_backward_dkv_pick<2, 0, 0>(dkv, dqkv, D, dout, qkv, out, lse, B, T, NH, NKV, rope_cos_sin, stream); break;
    case FLASH_DQ_MMA_QREGS: flash_backward_dkv_pick<1, 1, 0>(dkv, dqkv, D, dout, qkv, out, lse, B, T, NH, NKV, rope_cos_sin, stream); break;
    default:   // FLASH_DQ_MMA
        flash_backward_dkv_pick<1, 0, 0>(dkv, dqkv, D, dout, qkv, out, lse, B, T, NH, NKV, rope_cos_sin, stream); break;
    }
}

// ---------------------------------------------------------------------------------------------
// tuning: the launch configuration (the switches above) for one shape, by timing

// A launch configuration: the switches above.
typedef struct {
    int forward_row_tiles, forward_min_blocks, forward_lpt;
    int dq_row_tiles, dq_q_regs, dkv_min_blocks, dkv_kv_regs, side_by_side, backward_lpt;
    int forward_wgmma, dq_wgmma, dkv_wgmma;
    int dkv_row_tiles;
} FlashConfig;
// The defaults: the mma.sync kernels with one row tile a warp and the compiler's registers, grid
// order grouped, the backward's two passes side by side.
static const FlashConfig flash_default_config = {
    .forward_row_tiles = 1, .forward_min_blocks = 0, .forward_lpt = 0,
    .dq_row_tiles = 1, .dq_q_regs = 0, .dkv_min_blocks = 0, .dkv_kv_regs = 0, .side_by_side = 1, .backward_lpt = 0,
    .forward_wgmma = 0, .dq_wgmma = 0, .dkv_wgmma = 0,
    .dkv_row_tiles = 1,
};

// What a tuning chose, what it measured, and what the defaults measured in the same run; and the
// fastest choice among the mma.sync kernels alone (no warpgroup kernel in any pass), which is
// `config` itself where the warpgroup kernels took no part (wgmma 0).
typedef struct {
    FlashConfig config;
    float forward_ms, backward_ms;
    float default_forward_ms, default_backward_ms;
    int tried, differed;   // candidates run; of those, how many gave other bits than the defaults
    int wgmma;             // whether the warpgroup kernels were candidates
    FlashConfig mma_config;
    float mma_forward_ms, mma_backward_ms;
} FlashTuning;

// x (n) bf16 = pseudo-random values in [-1, 1), a hash of (seed, i): the same on every run.
__global__ void flash_fill_random_kernel(floatX *x, size_t n, uint32_t seed) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        uint32_t h = (uint32_t)i * 0x9E3779B1u ^ seed * 0x85EBCA77u;
        h ^= h >> 15; h *= 0x2C1B3C6Du; h ^= h >> 12; h *= 0x297A2D39u; h ^= h >> 15;
        x[i] = __float2bfloat16((float)(h >> 8) * (2.0f / 16777216.0f) - 1.0f);
    }
}

static inline void flash_set_config(const FlashConfig *c) {
    flash_forward_row_tiles = c->forward_row_tiles;
    flash_forward_min_blocks = c->forward_min_blocks;
    flash_forward_lpt = c->forward_lpt;
    flash_dq_row_tiles = c->dq_row_tiles;
    flash_dq_q_regs = c->dq_q_regs;
    flash_dkv_min_blocks = c->dkv_min_blocks;
    flash_dkv_kv_regs = c->dkv_kv_regs;
    flash_backward_side_by_side = c->side_by_side;
    flash_backward_lpt = c->backward_lpt;
    flash_forward_wgmma = c->forward_wgmma;
    flash_dq_wgmma = c->dq_wgmma;
    flash_dkv_wgmma = c->dkv_wgmma;
    flash_dkv_row_tiles = c->dkv_row_tiles;
}

// "forward 2 row tiles, lpt grid; backward 1 dQ row tile, dK/dV at 3 blocks an SM, passes side
// by side, grouped grid" into buf
static inline void flash_describe(const FlashConfig *c, char *buf, size_t size) {
    snprintf(buf, size, "forward %s%d row tile%s%s, %s grid; backward %s%d dQ row tile%s%s%s%s%s, passes %s, %s grid",
             c->forward_wgmma == 4 ? "pipelined wgmma, warpgroups on the heads, " : c->forward_wgmma == 3 ? "pipelined wgmma, 2 warpgroups, "
             : c->forward_wgmma == 2 ? "pipelined wgmma, "
             : c->forward_wgmma ? "wgmma, " : "", c->forward_row_tiles, c->forward_row_tiles > 1 ? "s" : "",
             c->forward_min_blocks > 1 ? " at 4 blocks an SM" : "", c->forward_lpt ? "lpt" : "grouped",
             c->dq_wgmma == 5 ? "pipelined wgmma dQ, warpgroups on the heads, " : c->dq_wgmma == 4 ? "pipelined wgmma dQ, 2 warpgroups, "
             : c->dq_wgmma == 3 ? "pipelined wgmma dQ, "
             : c->dq_wgmma == 2 ? "wgmma dQ (Q, dO from shared memory), " : c->dq_wgmma ? "wgmma dQ, " : "",
             c->dq_row_tiles, c->dq_row_tiles > 1 ? "s" : "",
             c->dq_q_regs && !c->dq_wgmma ? " with Q and dO in registers" : "",
             c->dkv_wgmma == 4 ? ", pipelined wgmma dK/dV, 2 warpgroups" : c->dkv_wgmma == 3 ? ", pipelined wgmma dK/dV"
             : c->dkv_wgmma == 2 ? ", wgmma dK/dV (K, V from shared memory)" : c->dkv_wgmma ? ", wgmma dK/dV"
             : c->dkv_min_blocks > 1 ? ", dK/dV at 3 blocks an SM" : "",
             c->dkv_kv_regs && !c->dkv_wgmma ? ", dK/dV with K and V in registers" : "",
             c->dkv_row_tiles > 1 ? ", dK/dV with 2 key row tiles" : "",
             c->side_by_side ? "side by side" : "in turn", c->backward_lpt ? "lpt" : "grouped");
}

// Picks the fastest launch configuration for the shape (B, T, NH, NKV, HS) among those whose
// results equal the defaults' bit for bit on random inputs, so that the choice changes the speed
// and never the numbers (and two runs give the same results whatever each picked): the forward
// (1 row tile a warp, 1 with 4 blocks an SM, 2 row tiles; grouped or lpt grid), then the
// backward (dQ with 1 row tile, 1 with Q and dO in registers, or 2; dK/dV as compiled, with K
// and V in registers, at 3 blocks an SM, or with 2 key row tiles a warp; the two passes side by
// side or in turn; grouped or lpt grid); where the warpgroup kernels take part (head size 64,
// flash_tune_wgmma_enabled), also the warpgroup forward, dQ and dK/dV passes and their
// pipelined kernels with one or two warpgroups a block. Head size 128 has one row tile and the
// compiler's registers.
// Every candidate runs once and its output is fingerprinted against the defaults'; a candidate
// that differs is not timed. Overwrites the buffers it is given (sized for the shape: qkv, out,
// lse, dout, dqkv, D as attention_flash_forward/backward take them), sets the switches to the
// choice and returns it. With dout NULL (a model that runs forwards alone) only the forward is
// tuned: the backward's switches stay the defaults', its times 0. verbose prints every candidate.
static inline FlashTuning attention_flash_tune(floatX *qkv, floatX *out, float *lse, floatX *dout, floatX *dqkv,
                                               float *D, int B, int T, int NH, int NKV, int HS, cudaStream_t stream,
                                               int verbose) {
    const int reps = 10;
    FlashTuning t;
    memset(&t, 0, sizeof(t));
    t.config = flash_default_config;
    size_t n_qkv = (size_t)B * T * (NH + 2 * NKV) * HS, n_out = (size_t)B * T * NH * HS, n_stat = (size_t)B * NH * T;
    flash_fill_random_kernel<<<1024, 256, 0, stream>>>(qkv, n_qkv, 1u);
    cudaCheckLaunch();
    if (dout != NULL) {
        flash_fill_random_kernel<<<1024, 256, 0, stream>>>(dout, n_out, 2u);
        cudaCheckLaunch();
    }
    unsigned long long *d_sum = (unsigned long long *)cudaMallocCheck(sizeof(unsigned long long));
    auto forward = [&] { attention_flash_forward(out, lse, qkv, B, T, NH, NKV, HS, stream); };
    auto backward = [&] { attention_flash_backward(dqkv, D, dout, qkv, out, lse, B, T, NH, NKV, HS, stream); };
    if (verbose) printf("flash attention tuning B=%d T=%d NH=%d NKV=%d HS=%d (ms, mean of %d)\n", B, T, NH, NKV, HS, reps);

    // Runs the candidates of one pass (forward, or backward on the defaults' out and lse), the
    // defaults' first; returns the fastest of those with the defaults' bits, and in *mma_best the
    // fastest of those without a warpgroup kernel (the defaults are one).
    auto tune_pass = [&](bool is_forward, const FlashConfig *cands, int n, float *ms_best, float *ms_default,
                         FlashConfig *mma_best, float *ms_mma) {
        unsigned long long ref = 0;
        FlashConfig best = cands[0];
        *mma_best = cands[0];
        for (int i = 0; i < n; i++) {
            flash_set_config(&cands[i]);
            unsigned long long bits;
            if (is_forward) {
                forward();
                bits = tune_fingerprint(d_sum, out, n_out * sizeof(floatX), stream) ^
                       (tune_fingerprint(d_sum, lse, n_stat * sizeof(float), stream) * 0x9E3779B97F4A7C15ull);
            } else {
                backward();
                bits = tune_fingerprint(d_sum, dqkv, n_qkv * sizeof(floatX), stream);
            }
            if (i == 0) ref = bits;
            t.tried++;
            char what[320];
            flash_describe(&cands[i], what, sizeof(what));
            if (bits != ref) {
                t.differed++;
                if (verbose) printf("  %s: results differ from the defaults, not used\n", what);
                continue;
            }
            float ms = is_forward ? tune_time_ms(forward, stream, reps) : tune_time_ms(backward, stream, reps);
            if (verbose) printf("  %-8s %8.4f  %s\n", is_forward ? "forward" : "backward", ms, what);
            const bool mma = cands[i].forward_wgmma == 0 && cands[i].dq_wgmma == 0 && cands[i].dkv_wgmma == 0;
            if (i == 0) *ms_default = *ms_best = *ms_mma = ms;
            else {
                if (ms < *ms_best) { *ms_best = ms; best = cands[i]; }
                if (mma && ms < *ms_mma) { *ms_mma = ms; *mma_best = cands[i]; }
            }
        }
        return best;
    };

    // warpgroup products where enabled and the device runs the sm_90a image (head size 64)
    const int wg = HS == 64 && flash_tune_wgmma_enabled() && flash_wgmma_supported();
    FlashConfig cands[288];
    int n = 0;
    for (int lpt = 0; lpt < 2; lpt++)
        for (int v = 0; v < (HS == 64 ? 3 + 4 * wg : 1); v++) {   // (row tiles, min blocks): (1, 1), (1, 4), (2, 1); wgmma; pipelined wgmma, 1 or 2 warpgroups, on the heads
            if (v == 6 && !flash_heads_per_block(NH, NKV)) continue;
            FlashConfig c = flash_default_config;
            c.forward_row_tiles = v == 2 ? 2 : 1;
            c.forward_min_blocks = v == 1 ? 4 : 0;
            c.forward_wgmma = v >= 3 ? v - 2 : 0;
            c.forward_lpt = lpt;
            cands[n++] = c;
        }
    t.wgmma = wg;
    FlashConfig f_mma, b_mma;
    FlashConfig f = tune_pass(true, cands, n, &t.forward_ms, &t.default_forward_ms, &f_mma, &t.mma_forward_ms);

    n = 0;
    for (int lpt = 0; lpt < 2 && dout != NULL; lpt++)
        for (int dq = 0; dq < (HS == 64 ? 3 + 5 * wg : 1); dq++) {         // 1 row tile, 1 with Q and dO in registers, 2; wgmma 1, 2, pipelined 1, 2 warpgroups, on the heads
            if (dq == 7 && !flash_heads_per_block(NH, NKV)) continue;
            for (int dkv = 0; dkv < (HS == 64 ? 4 + 4 * wg : 1); dkv++)    // as compiled, K and V in registers, 3 blocks an SM, 2 row tiles; wgmma 1, 2, pipelined 1, 2 warpgroups
                for (int side = 1; side >= 0; side--) {
                    FlashConfig c = flash_default_config;
                    c.dq_row_tiles = dq == 2 ? 2 : 1;
                    c.dq_q_regs = dq == 1 || dq == 3;
                    c.dq_wgmma = dq >= 3 ? dq - 2 : 0;
                    c.dkv_kv_regs = dkv == 1 || dkv == 4;
                    c.dkv_min_blocks = dkv == 2 ? 3 : 0;
                    c.dkv_row_tiles = dkv == 3 ? 2 : 1;
                    c.dkv_wgmma = dkv >= 4 ? dkv - 3 : 0;
                    c.side_by_side = side;
                    c.backward_lpt = lpt;
                    cands[n++] = c;
                }
        }
    FlashConfig b = flash_default_config;
    b_mma = b;
    if (n > 0) {
        flash_set_config(&flash_default_config);
        forward();   // the defaults' out and lse, which every backward candidate reads
        b = tune_pass(false, cands, n, &t.backward_ms, &t.default_backward_ms, &b_mma, &t.mma_backward_ms);
    }

    // a choice: the backward's switches from the backward's pass, the forward's from the forward's
    auto joined = [](FlashConfig backward_choice, const FlashConfig &forward_choice) {
        backward_choice.forward_row_tiles = forward_choice.forward_row_tiles;
        backward_choice.forward_min_blocks = forward_choice.forward_min_blocks;
        backward_choice.forward_lpt = forward_choice.forward_lpt;
        backward_choice.forward_wgmma = forward_choice.forward_wgmma;
        return backward_choice;
    };
    t.config = joined(b, f);
    t.mma_config = joined(b_mma, f_mma);
    flash_set_config(&t.config);
    cudaCheck(cudaFree(d_sum));
    return t;
}
#endif   // launchers
#endif
