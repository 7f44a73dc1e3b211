/*
 * Matrix products of the CPU reference (see matmul.h for the contract).
 *
 * All three products of a linear layer are one general product C (M, N) (+)= A (M, K) @ B (K, N)
 * that reads A and B through strides, so that no transposed copy of a whole matrix is made:
 *
 *   forward   out     (M, OC)  = inp (M, IC)    @ weight^T (IC, OC)    A rows contiguous, B = W^T
 *   dinp      dinp    (M, IC) += dout (M, OC)   @ weight (OC, IC)      A rows contiguous, B rows contiguous
 *   dweight   dweight (OC, IC) += dout^T (OC, M) @ inp (M, IC)         A columns contiguous, B rows contiguous
 *
 * The product is computed the GotoBLAS / BLIS way:
 *
 *   - The micro-kernel keeps an MR x NR tile of C (8 x 32 floats = 16 AVX-512 registers) in
 *     local accumulators for a whole KC-long slice of the reduction: per step k it loads NR
 *     values of B, broadcasts MR values of A and does MR*NR fused multiply-adds. It is plain C
 *     over fixed-size arrays; gcc unrolls the constant loops and keeps the tile in registers.
 *     With 16 independent accumulator registers the FMA latency is hidden and the loads are
 *     few compared with the FMAs, so it runs at the machine's FMA peak on data in cache.
 *   - Packing: before the kernel runs, a KC x NC block of B is copied into NR-wide column
 *     panels (k-major: the NR values the kernel loads for one k are contiguous) and an MC x KC
 *     block of A into MR-tall row panels (the MR values it broadcasts for one k are contiguous).
 *     Packing turns every stride pattern above into the same unit-stride streams, zero-pads the
 *     edges so the kernel always runs full tiles, and makes the blocks compact in cache.
 *   - Cache blocking: the packed B block (KC x NC) stays in L2 and is reused by every MR-row
 *     panel of A; one packed A panel (MR x KC) stays in L1 while the kernel sweeps the NR-wide
 *     panels of B. KC bounds the A panel, NC and KC the B block, MC the A block.
 *   - Threads: the output is split along its larger dimension into one contiguous range of
 *     tiles per thread; each thread packs its own blocks. Every element of C is computed by one
 *     thread, summing over k in the same order (KC slices in order, k in order inside a slice)
 *     whatever the number of threads, so the result is bitwise identical for any thread count.
 */
#include "matmul.h"
#include "utils.h"
#include <stddef.h>
#ifdef _OPENMP
#include <omp.h>
#endif

// Micro-tile: MR rows x NR columns of C. NR is two 512-bit vectors of `real` (32 floats), the
// width for which gcc vectorises the kernel's inner loop into whole registers.
#ifndef MR
#define MR 8
#endif
#define NR (128 / (int)sizeof(real))
// Cache blocks (in elements): a KC-long slice of the reduction, MC rows of A, NC columns of B.
// Packed A panel MR*KC = 8 KiB (L1); packed B block KC*NC = 512 KiB (L2). Measured on a 2-core
// Zen 4, KC 192..384, MC 64..256 and NC 256..1024 are all within 3% of each other; MR and the
// blocks can be overridden with -D to tune for another machine.
#ifndef KC
#define KC 256
#endif
#ifndef MC
#define MC 128
#endif
#ifndef NC
#define NC 512
#endif

// Element (i, j) of a strided matrix view: base[i * stride_i + j * stride_j]. One of the two
// strides is 1 in every use (a row-major matrix or its transpose).
typedef struct {
    const real *base;
    ptrdiff_t stride_i, stride_j;
} StridedView;

// Bytes in a cache line, for the software prefetches below. The packing routines read panels
// of a large operand (the classifier weight, dout) that comes from DRAM in short strided
// segments the hardware prefetcher does not pick up in time; each one prefetches what the next
// panel will read while it copies the current one.
#define CACHE_LINE 64
#define LINE_ELEMS (CACHE_LINE / (int)sizeof(real))

// Packs rows [m0, m0+mc) x columns [k0, k0+kc) of A (M, K) into ceil(mc/MR) panels, each
// (kc, MR) row-major: dst[p*MR*kc + k*MR + r] = A(m0 + p*MR + r, k0 + k); rows past mc are zero.
static void pack_A(real *dst, StridedView A, int m0, int mc, int k0, int kc) {
    for (int p = 0; p < mc; p += MR) {
        int rows = mc - p < MR ? mc - p : MR;
        const real *src = A.base + (ptrdiff_t)(m0 + p) * A.stride_i + (ptrdiff_t)k0 * A.stride_j;
        if (rows < MR) {
            // last, partial panel: element by element, zero padded
            for (int k = 0; k < kc; k++)
                for (int r = 0; r < MR; r++)
                    dst[k * MR + r] = r < rows ? src[r * A.stride_i + k * A.stride_j] : 0;
        } else if (A.stride_j == 1) {
            // rows of A are contiguous in k (inp, dout): read MR rows side by side
            for (int k = 0; k < kc; k++)
                for (int r = 0; r < MR; r++) dst[k * MR + r] = src[r * A.stride_i + k];
            if (p + 2 * MR <= mc)
                for (int r = 0; r < MR; r++)
                    for (int k = 0; k < kc; k += LINE_ELEMS)
                        __builtin_prefetch(src + (MR + r) * A.stride_i + k);
        } else {
            // columns of A are contiguous (dout^T in dweight): each k is one MR-long copy
            for (int k = 0; k < kc; k++)
                for (int r = 0; r < MR; r++) dst[k * MR + r] = src[k * A.stride_j + r];
            if (p + 2 * MR <= mc)
                for (int k = 0; k < kc; k++) __builtin_prefetch(src + k * A.stride_j + MR);
        }
        dst += (size_t)MR * kc;
    }
}

// Packs rows [k0, k0+kc) x columns [n0, n0+nc) of B (K, N) into ceil(nc/NR) panels, each
// (kc, NR) row-major: dst[p*NR*kc + k*NR + j] = B(k0 + k, n0 + p*NR + j); columns past nc are zero.
static void pack_B(real *dst, StridedView B, int k0, int kc, int n0, int nc) {
    int full = nc / NR * NR;  // columns in full panels
    const real *src = B.base + (ptrdiff_t)k0 * B.stride_i + (ptrdiff_t)n0 * B.stride_j;
    if (B.stride_j == 1) {
        // rows of B are contiguous in n (weight in dinp, inp in dweight): walk each row of the
        // block from left to right, dealing NR-long pieces to the panels, so the reads are long
        // sequential streams
        for (int k = 0; k < kc; k++) {
            const real *s = src + k * B.stride_i;
            if (k + 4 < kc)
                for (int j = 0; j < nc; j += LINE_ELEMS) __builtin_prefetch(s + 4 * B.stride_i + j);
            for (int p = 0; p < full; p += NR)
                for (int j = 0; j < NR; j++) dst[(size_t)p * kc + k * NR + j] = s[p + j];
        }
    } else {
        // B = weight^T (forward): column j of B is row j of the weight, contiguous in k. Transpose
        // one cache line of each of the NR rows at a time, so the source lines and the
        // destination rows being written both stay in L1, and prefetch the rows' next lines.
        for (int p = 0; p < full; p += NR) {
            const real *s = src + p * B.stride_j;
            real *d = dst + (size_t)p * kc;
            for (int kb = 0; kb < kc; kb += LINE_ELEMS) {
                int kend = kb + LINE_ELEMS < kc ? kb + LINE_ELEMS : kc;
                for (int j = 0; j < NR; j++) {
                    const real *row = s + j * B.stride_j;
                    if (kb + 4 * LINE_ELEMS < kc) __builtin_prefetch(row + kb + 4 * LINE_ELEMS);
                    for (int k = kb; k < kend; k++) d[k * NR + j] = row[k];
                }
            }
        }
    }
    if (full < nc) {
        // last, partial panel: element by element, zero padded
        int cols = nc - full;
        real *d = dst + (size_t)full * kc;
        for (int k = 0; k < kc; k++)
            for (int j = 0; j < NR; j++)
                d[k * NR + j] = j < cols ? src[k * B.stride_i + (full + j) * B.stride_j] : 0;
    }
}

// The micro-kernel: C tile (mr, nr) at c with row stride ldc gets the product of a packed A
// panel (kc, MR) and a packed B panel (kc, NR). With overwrite set the tile is replaced by the
// product plus bias (bias indexed by column, may be NULL); otherwise the product is added to it.
// mr <= MR, nr <= NR: only that part of the full MR x NR tile is stored.
static inline void micro_kernel(int kc, const real *restrict a, const real *restrict b,
                                real *restrict c, ptrdiff_t ldc, int mr, int nr,
                                int overwrite, const real *bias) {
    real acc[MR][NR];
    for (int r = 0; r < MR; r++)
        for (int j = 0; j < NR; j++) acc[r][j] = 0;
    for (int k = 0; k < kc; k++) {
        for (int r = 0; r < MR; r++) {
            real ar = a[k * MR + r];
            for (int j = 0; j < NR; j++) acc[r][j] += ar * b[k * NR + j];
        }
    }
    if (mr == MR && nr == NR) {
        if (!overwrite) {
            for (int r = 0; r < MR; r++)
                for (int j = 0; j < NR; j++) c[r * ldc + j] += acc[r][j];
        } else if (bias) {
            for (int r = 0; r < MR; r++)
                for (int j = 0; j < NR; j++) c[r * ldc + j] = acc[r][j] + bias[j];
        } else {
            for (int r = 0; r < MR; r++)
                for (int j = 0; j < NR; j++) c[r * ldc + j] = acc[r][j];
        }
    } else {
        for (int r = 0; r < mr; r++)
            for (int j = 0; j < nr; j++) {
                real base = overwrite ? (bias ? bias[j] : 0) : c[r * ldc + j];
                c[r * ldc + j] = base + acc[r][j];
            }
    }
}

// C (M, N) row-major with row stride ldc: C = A @ B + bias when overwrite (bias (N) may be
// NULL), C += A @ B otherwise. A is (M, K), B is (K, N), both read through strided views.
static void gemm(int M, int N, int K, StridedView A, StridedView B, real *C, ptrdiff_t ldc,
                 int overwrite, const real *bias) {
    if (M <= 0 || N <= 0) return;
    if (K <= 0) {
        // empty reduction: the product is zero
        if (overwrite)
            for (int m = 0; m < M; m++)
                for (int n = 0; n < N; n++) C[m * ldc + n] = bias ? bias[n] : 0;
        return;
    }
    int tiles_m = (M + MR - 1) / MR, tiles_n = (N + NR - 1) / NR;
    // Parallelise over the larger dimension of C: every thread packs all of the operand along
    // the other dimension, so the smaller of A (M x K) and B (K x N) is the one packed twice.
    int split_n = N >= M;
    #pragma omp parallel
    {
        int nthreads = 1, tid = 0;
#ifdef _OPENMP
        nthreads = omp_get_num_threads();
        tid = omp_get_thread_num();
#endif
        // this thread's contiguous range of tiles along the split dimension
        int tiles = split_n ? tiles_n : tiles_m;
        int t0 = (int)((long)tiles * tid / nthreads), t1 = (int)((long)tiles * (tid + 1) / nthreads);
        int m_begin = 0, m_end = M, n_begin = 0, n_end = N;
        if (split_n) { n_begin = t0 * NR; n_end = t1 * NR < N ? t1 * NR : N; }
        else         { m_begin = t0 * MR; m_end = t1 * MR < M ? t1 * MR : M; }
        if (t1 > t0) {
            real *packed_A = aligned_alloc(64, sizeof(real) * MC * KC);
            real *packed_B = aligned_alloc(64, sizeof(real) * KC * NC);
            if (!packed_A || !packed_B) fatal("out of memory allocating matmul packing buffers");
            for (int jc = n_begin; jc < n_end; jc += NC) {
                int nc = n_end - jc < NC ? n_end - jc : NC;
                for (int pc = 0; pc < K; pc += KC) {
                    int kc = K - pc < KC ? K - pc : KC;
                    // the first KC slice initialises C when overwriting, later ones add to it
                    int first = overwrite && pc == 0;
                    pack_B(packed_B, B, pc, kc, jc, nc);
                    for (int ic = m_begin; ic < m_end; ic += MC) {
                        int mc = m_end - ic < MC ? m_end - ic : MC;
                        pack_A(packed_A, A, ic, mc, pc, kc);
                        for (int ir = 0; ir < mc; ir += MR) {
                            const real *a = packed_A + (size_t)ir * kc;
                            for (int jr = 0; jr < nc; jr += NR) {
                                micro_kernel(kc, a, packed_B + (size_t)jr * kc,
                                             C + (ptrdiff_t)(ic + ir) * ldc + jc + jr, ldc,
                                             mc - ir < MR ? mc - ir : MR, nc - jr < NR ? nc - jr : NR,
                                             first, first && bias ? bias + jc + jr : NULL);
                            }
                        }
                    }
                }
            }
            free(packed_A);
            free(packed_B);
        }
    }
}

// Few rows (one decode step per running sequence): the packed kernel would compute a full
// MR-row tile for each row and copy every weight block into its panel first. Reading each weight
// row once and dotting it with the few input rows is what bounds this case (memory traffic), so
// it runs as dot products, parallel over output columns.
#define MATMUL_FEW_ROWS 4
static void matmul_forward_few_rows(real *out, const real *inp, const real *weight, const real *bias,
                                    int M, int IC, int OC) {
    #pragma omp parallel for schedule(static)
    for (int o = 0; o < OC; o++) {
        const real *w = weight + (size_t)o * IC;
        for (int m = 0; m < M; m++) {
            const real *x = inp + (size_t)m * IC;
            real sum = 0;
            #pragma omp simd reduction(+ : sum)
            for (int i = 0; i < IC; i++) sum += x[i] * w[i];
            out[(size_t)m * OC + o] = sum + (bias ? bias[o] : 0);
        }
    }
}

// out (M, OC) = inp (M, IC) @ weight (OC, IC)^T + bias (OC)
void matmul_forward(real *out, const real *inp, const real *weight, const real *bias,
                    int M, int IC, int OC) {
    if (M <= MATMUL_FEW_ROWS && IC > 0) {
        matmul_forward_few_rows(out, inp, weight, bias, M, IC, OC);
        return;
    }
    StridedView A = {inp, IC, 1};     // A(m, i) = inp[m, i]
    StridedView B = {weight, 1, IC};  // B(i, o) = weight[o, i]
    gemm(M, OC, IC, A, B, out, OC, 1, bias);
}

// dinp (M, IC) += dout (M, OC) @ weight (OC, IC); dweight (OC, IC) += dout^T @ inp (M, IC);
// dbias (OC) += column sums of dout. Each output may be NULL.
void matmul_backward(real *dinp, real *dweight, real *dbias, const real *dout,
                     const real *inp, const real *weight, int M, int IC, int OC) {
    if (dinp) {
        StridedView A = {dout, OC, 1};    // A(m, o) = dout[m, o]
        StridedView B = {weight, IC, 1};  // B(o, i) = weight[o, i]
        gemm(M, IC, OC, A, B, dinp, IC, 0, NULL);
    }
    if (dweight) {
        StridedView A = {dout, 1, OC};    // A(o, m) = dout[m, o]
        StridedView B = {inp, IC, 1};     // B(m, i) = inp[m, i]
        gemm(OC, IC, M, A, B, dweight, IC, 0, NULL);
    }
    if (dbias) {
        // Column sums, a block of NR columns at a time so the rows of dout are read in
        // contiguous pieces and the sums vectorise. Each column is summed over m in order by
        // one thread, so the result does not depend on the thread count.
        int blocks = (OC + NR - 1) / NR;
        #pragma omp parallel for schedule(static)
        for (int blk = 0; blk < blocks; blk++) {
            int o0 = blk * NR, cols = OC - o0 < NR ? OC - o0 : NR;
            real sum[NR];
            for (int j = 0; j < NR; j++) sum[j] = 0;
            for (int m = 0; m < M; m++) {
                const real *row = dout + (size_t)m * OC + o0;
                if (cols == NR)
                    for (int j = 0; j < NR; j++) sum[j] += row[j];
                else
                    for (int j = 0; j < cols; j++) sum[j] += row[j];
            }
            for (int j = 0; j < cols; j++) dbias[o0 + j] += sum[j];
        }
    }
}
