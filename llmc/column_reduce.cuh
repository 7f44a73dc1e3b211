/*
 * Deterministic column sums (bias and norm-weight gradients) on the GPU.
 *
 * A gradient shared by all N rows (a bias, a norm weight) is a sum over rows. It is computed in
 * two launches with no atomics, so the result is the same on every run: the rows are cut into
 * chunks, one block per (column slab, chunk) writes the chunk's partial sums to
 * partial (chunks, cols), then column_partials_reduce adds the chunk sums, in a fixed order, into
 * the gradient. Kernels that already read every row (the norm backward) write such partials
 * themselves and only call column_partials_reduce.
 *
 * CPU reference: the column sums inside the CPU ops, which sum over rows in one pass: dbias of
 * matmul_backward (matmul.c), dweight and dbias of layernorm_backward and dweight of
 * rmsnorm_backward (ops_cpu.c). No harness of its own: dev/cuda/layernorm.cu and dev/cuda/matmul.cu
 * check these kernels through the gradients they finish, and test/layernorm_emu.cpp runs
 * column_sums on its own against a float64 sum (test_layernorm_emu.py).
 */
#ifndef LLMC_COLUMN_REDUCE_CUH
#define LLMC_COLUMN_REDUCE_CUH
#include "vector_io.cuh"

// Rows a chunk: a block of the first launch (here, or the norm backward's split path) sums 256
// rows of its columns, 32 rows for each of its 8 warps, and the scratch and the second launch
// hold ceil(N / 256) partial rows, 1/256 of the input (64 rows for a training step of 16 x 1024
// tokens, which column_partials_reduce's 16 warps take 4 each).
#define COLUMN_CHUNK_ROWS 256
static inline int column_chunks(int N) { return ceil_div(N, COLUMN_CHUNK_ROWS); }

// out (cols) += sum over k < chunks of partial (chunks, cols). A block of COLUMN_REDUCE_THREADS
// threads takes 32 columns: thread t sums column t % 32 over the chunks k = t / 32 (mod
// COLUMN_REDUCE_GROUPS), then warp 0 adds the groups' sums in group order.
// Up to three sums in one launch: partial (chunks, sections * cols) holds `sections` blocks of
// cols columns side by side in each chunk row, section s summed into out_s (NULL: skipped).
#define COLUMN_REDUCE_THREADS 512
#define COLUMN_REDUCE_GROUPS (COLUMN_REDUCE_THREADS / 32)
__global__ void __launch_bounds__(COLUMN_REDUCE_THREADS)
column_partials_reduce_kernel(float *out0, float *out1, float *out2, const float *partial, int chunks, int cols,
                              int sections) {
    __shared__ float column_group_sums[COLUMN_REDUCE_GROUPS][32];
    int lane = threadIdx.x % 32, group = threadIdx.x / 32;
    int width = sections * cols, j = blockIdx.x * 32 + lane;   // j: column of the (chunks, width) matrix
    int section = j < width ? j / cols : 0;
    float *out = section == 0 ? out0 : section == 1 ? out1 : out2;
    float sum = 0.0f;
    if (j < width && out != NULL)
        for (int k = group; k < chunks; k += COLUMN_REDUCE_GROUPS) sum += partial[(size_t)k * width + j];
    column_group_sums[group][lane] = sum;
    __syncthreads();
    if (group == 0 && j < width && out != NULL) {
        float total = 0.0f;
        for (int g = 0; g < COLUMN_REDUCE_GROUPS; g++) total += column_group_sums[g][lane];
        out[j - section * cols] += total;
    }
}
static inline void column_partials_reduce3(float *out0, float *out1, float *out2, const float *partial, int chunks,
                                           int cols, int sections, cudaStream_t stream) {
    column_partials_reduce_kernel<<<ceil_div((long long)sections * cols, 32), COLUMN_REDUCE_THREADS, 0, stream>>>(
        out0, out1, out2, partial, chunks, cols, sections);
    cudaCheckLaunch();
}
static inline void column_partials_reduce(float *out, const float *partial, int chunks, int cols, cudaStream_t stream) {
    column_partials_reduce3(out, NULL, NULL, partial, chunks, cols, 1, stream);
}

// Partial column sums of x (N, cols) over chunks of COLUMN_CHUNK_ROWS rows: a block of
// COLUMN_SUM_THREADS threads takes a slab of 32 * VEC columns and one chunk; thread t reads VEC
// consecutive columns (one vector access) of the rows t / 32, t / 32 + COLUMN_SUM_GROUPS, ...,
// then warp 0 adds the row groups' sums in order into partial[chunk, slab].
#define COLUMN_SUM_THREADS 256
#define COLUMN_SUM_GROUPS (COLUMN_SUM_THREADS / 32)
template <typename T, int VEC>
__global__ void __launch_bounds__(COLUMN_SUM_THREADS)
column_sums_partial_kernel(float *partial, const T *x, int N, int cols) {
    // a row group's sums of the slab: 32 lanes x VEC columns, sized for the widest VEC, 8 (one
    // 16-byte load of bf16; fp32 takes 4)
    static_assert(VEC >= 1 && VEC <= 8 && VEC * sizeof(T) <= 16, "column_slab_sums holds 8 columns a lane: one 16-byte load at most");
    __shared__ float column_slab_sums[COLUMN_SUM_GROUPS][32 * 8];
    int lane = threadIdx.x % 32, group = threadIdx.x / 32;
    int slabs = (cols + 32 * VEC - 1) / (32 * VEC);
    int slab = blockIdx.x % slabs, chunk = blockIdx.x / slabs;
    int c = (slab * 32 + lane) * VEC;
    int row0 = chunk * COLUMN_CHUNK_ROWS, row1 = min(row0 + COLUMN_CHUNK_ROWS, N);
    float acc[VEC];
#pragma unroll
    for (int i = 0; i < VEC; i++) acc[i] = 0.0f;
    if (c < cols) {
        for (int n = row0 + group; n < row1; n += COLUMN_SUM_GROUPS) {
            float v[VEC];
            load_vec<VEC>(v, x + (size_t)n * cols + c);
#pragma unroll
            for (int i = 0; i < VEC; i++) acc[i] += v[i];
        }
    }
#pragma unroll
    for (int i = 0; i < VEC; i++) column_slab_sums[group][lane * VEC + i] = acc[i];
    __syncthreads();
    if (group == 0 && c < cols) {
#pragma unroll
        for (int i = 0; i < VEC; i++) {
            float total = 0.0f;
            for (int g = 0; g < COLUMN_SUM_GROUPS; g++) total += column_slab_sums[g][lane * VEC + i];
            partial[(size_t)chunk * cols + c + i] = total;
        }
    }
}

// out (cols) += sum over rows of x (N, cols), fp32 or bf16; scratch holds column_chunks(N) * cols
// floats. Rows are read 16 bytes at a time when cols and x allow it.
template <typename T>
static inline void column_sums_add(float *out, const T *x, float *scratch, int N, int cols, cudaStream_t stream) {
    constexpr int WIDE = 16 / sizeof(T);   // 4 fp32 or 8 bf16
    int chunks = column_chunks(N);
    if (cols % WIDE == 0 && vector_aligned(x, 16)) {
        column_sums_partial_kernel<T, WIDE><<<ceil_div(cols, 32 * WIDE) * chunks, COLUMN_SUM_THREADS, 0, stream>>>(scratch, x, N, cols);
    } else {
        column_sums_partial_kernel<T, 1><<<ceil_div(cols, 32) * chunks, COLUMN_SUM_THREADS, 0, stream>>>(scratch, x, N, cols);
    }
    cudaCheckLaunch();
    column_partials_reduce(out, scratch, chunks, cols, stream);
}
#endif
