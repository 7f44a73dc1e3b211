/*
 * Runs the residual + norm forward kernels of llmc/layernorm.cuh on the CPU through their host
 * entry points: residual_norm_forward_warps (a warp per row), residual_norm_forward_rows (a
 * block per row, registers) and residual_norm_forward (which picks one by the row count), so
 * that their indexing and reductions are checked on a machine without a GPU
 * (test/test_layernorm_emu.py compares the results with a NumPy float64 oracle).
 *
 * The kernels' source is compiled as C++ under the GPU emulation of test/gpu_emu.h, with the
 * runtime of test/gpu_emu_runtime.h; the test's build copies llmc/layernorm.cuh with each launch
 * rewritten into an emu_launch call (test/gpu_emu.py). Outputs start as NaN, so an element no
 * thread writes shows up; the threads of a block run in index order or in reverse.
 *
 *   layernorm_emu IN OUT forward|reverse
 *     IN : int32 N, C, is_layernorm, fused, has_bias, kernel (0 warps, 1 rows, 2 picked);
 *          float32 res_in (N, C); branch (N, C) when fused; weight (C); bias (C) when has_bias;
 *          branch, weight and bias representable in bf16
 *     OUT: float32 out (N, C) (the bf16 output); res_out (N, C) when fused; mean (N) when
 *          is_layernorm; rstd (N)
 */
#define EMU_PROGRAM "layernorm_emu"
#define EMU_STATIC_SHARED
#include "gpu_emu_runtime.h"

// the backward's column reduction of cuda_common.h, which these programs do not run
#define COLUMN_CHUNK_ROWS 256
static inline int column_chunks(int N) { return ceil_div(N, COLUMN_CHUNK_ROWS); }
static void column_partials_reduce(float *, const float *, int, int, cudaStream_t) {
    emu_fail("column_partials_reduce is not emulated");
}

#include "layernorm_launched.cuh"   // llmc/layernorm.cuh with its launches rewritten

// ---------------------------------------------------------------------------------------------

int main(int argc, char **argv) {
    FILE *f = emu_open_input(argc, argv, 32 * sizeof(float));   // block_sum's partials
    int32_t dims[6];
    if (fread(dims, sizeof(int32_t), 6, f) != 6) { fprintf(stderr, "error: %s: no header\n", argv[1]); return 1; }
    int N = dims[0], C = dims[1], is_layernorm = dims[2], fused = dims[3], has_bias = dims[4], kernel = dims[5];
    if (N < 1 || C < 1 || kernel < 0 || kernel > 2) {
        fprintf(stderr, "error: %s: bad header N=%d C=%d kernel=%d\n", argv[1], N, C, kernel);
        return 1;
    }
    size_t NC = (size_t)N * C;
    float *res_in = (float *)device_alloc(NC * sizeof(float), 0);
    std::vector<float> x = read_floats(f, NC, argv[1]);
    memcpy(res_in, x.data(), NC * sizeof(float));
    floatX *branch = fused ? device_bf16(read_floats(f, NC, argv[1])) : NULL;
    floatX *weight = device_bf16(read_floats(f, C, argv[1]));
    floatX *bias = has_bias ? device_bf16(read_floats(f, C, argv[1])) : NULL;
    fclose(f);
    float *res_out = fused ? (float *)device_alloc(NC * sizeof(float), 0xff) : NULL;
    floatX *out = (floatX *)device_alloc(NC * 2, 0xff);
    float *mean = is_layernorm ? (float *)device_alloc(N * sizeof(float), 0xff) : NULL;
    float *rstd = (float *)device_alloc(N * sizeof(float), 0xff);

    void (*forward)(float *, floatX *, float *, float *, const float *, const floatX *, const floatX *, const floatX *, int,
                    int, float, int, cudaStream_t) =
        kernel == 0 ? residual_norm_forward_warps : kernel == 1 ? residual_norm_forward_rows : residual_norm_forward;
    forward(res_out, out, mean, rstd, res_in, branch, weight, bias, N, C, 1e-5f, is_layernorm, 0);

    FILE *o = fopen(argv[2], "wb");
    if (!o) { fprintf(stderr, "error: cannot create %s\n", argv[2]); return 1; }
    std::vector<float> y(NC);
    for (size_t i = 0; i < NC; i++) y[i] = to_f32(out[i]);
    bool ok = fwrite(y.data(), sizeof(float), NC, o) == NC;
    if (fused) ok = ok && fwrite(res_out, sizeof(float), NC, o) == NC;
    if (is_layernorm) ok = ok && fwrite(mean, sizeof(float), N, o) == (size_t)N;
    ok = ok && fwrite(rstd, sizeof(float), N, o) == (size_t)N;
    if (fclose(o) != 0 || !ok) {
        fprintf(stderr, "error: cannot write %s\n", argv[2]);
        return 1;
    }
    printf("layernorm_emu N=%d C=%d %s%s kernel %d, threads %s: done\n", N, C, is_layernorm ? "layernorm" : "rmsnorm",
           fused ? " +residual" : "", kernel, argv[3]);
    return 0;
}
