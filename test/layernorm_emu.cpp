/*
 * Runs the norm kernels of llmc/layernorm.cuh and the column sums of llmc/column_reduce.cuh on
 * the CPU through their host entry points, so that their indexing and reductions are checked on
 * a machine without a GPU (test/test_layernorm_emu.py compares the results with NumPy float64
 * oracles):
 *   - the residual + norm forward: residual_norm_forward_warps (a warp per row),
 *     residual_norm_forward_vec (a warp per row from registers), residual_norm_forward_rows (a
 *     block per row) and residual_norm_forward (which picks one);
 *   - the norm backward: norm_backward_fused (one kernel), norm_backward_split (the fallback for
 *     wide rows) and norm_backward (which picks one), each with the column reductions, with the
 *     output's gradient in fp32 and in bf16;
 *   - column_sums_add over bf16 rows (the bias gradients of the products).
 *
 * The kernels' source is compiled as C++ under the GPU emulation of test/gpu_emu.h, with the
 * runtime of test/gpu_emu_runtime.h; the test's build copies llmc/layernorm.cuh and
 * llmc/column_reduce.cuh with each launch rewritten into an emu_launch call (test/gpu_emu.py).
 * Outputs and scratch start as NaN, so an element no thread writes shows up; the threads of a
 * block run in index order or in reverse.
 *
 *   layernorm_emu IN OUT forward|reverse
 *     IN : int32 op, then by op:
 *       0 forward:  int32 N, C, is_layernorm, fused, has_bias, kernel (0 warps, 1 rows, 2 picked,
 *                   3 registers); float32 res_in (N, C); branch (N, C) when fused; weight (C);
 *                   bias (C) when has_bias; branch, weight and bias representable in bf16
 *             OUT: float32 out (N, C) (the bf16 output); res_out (N, C) when fused; mean (N) when
 *                  is_layernorm; rstd (N)
 *       1 backward: int32 N, C, is_layernorm, path (0 fused, 1 split, 2 picked; 3 to 5 the same with
 *                   dout in bf16), colsum, bf16_copy;
 *                   float32 dout (N, C) (bf16 values for paths 3 to 5), inp (N, C), dres (N, C), weight (C) (bf16 values),
 *                   mean (N) when is_layernorm, rstd (N), then the starting values of dweight,
 *                   dbias and colsum (C each)
 *             OUT: float32 dres (N, C); its bf16 copy (N, C) when bf16_copy; dweight (C);
 *                  dbias (C) when is_layernorm; colsum (C) when colsum
 *       2 column sums of bf16 rows: int32 N, cols; float32 x (N, cols) (bf16 values), out (cols)
 *             OUT: float32 out (cols) after column_sums_add
 */
#define EMU_PROGRAM "layernorm_emu"
#define EMU_STATIC_SHARED
#include "gpu_emu_runtime.h"
#include "layernorm_launched.cuh"   // llmc/layernorm.cuh with its launches rewritten

// ---------------------------------------------------------------------------------------------

static FILE *out_file;
static const char *out_path;
static void write_floats(const float *x, size_t n) {
    if (fwrite(x, sizeof(float), n, out_file) != n) {
        fprintf(stderr, "error: cannot write %s\n", out_path);
        exit(1);
    }
}
static void write_bf16s(const floatX *x, size_t n) {
    std::vector<float> y(n);
    for (size_t i = 0; i < n; i++) y[i] = to_f32(x[i]);
    write_floats(y.data(), n);
}
static float *device_floats(const std::vector<float> &x) {
    float *p = (float *)device_alloc(x.size() * sizeof(float), 0);
    memcpy(p, x.data(), x.size() * sizeof(float));
    return p;
}
static void read_header(FILE *f, const char *path, int32_t *dims, int n) {
    if (fread(dims, sizeof(int32_t), n, f) != (size_t)n) {
        fprintf(stderr, "error: %s: no header\n", path);
        exit(1);
    }
}

static void forward(FILE *f, const char *path, const char *order) {
    int32_t dims[6];
    read_header(f, path, dims, 6);
    int N = dims[0], C = dims[1], is_layernorm = dims[2], fused = dims[3], has_bias = dims[4], kernel = dims[5];
    if (N < 1 || C < 1 || kernel < 0 || kernel > 3) {
        fprintf(stderr, "error: %s: bad header N=%d C=%d kernel=%d\n", path, N, C, kernel);
        exit(1);
    }
    size_t NC = (size_t)N * C;
    float *res_in = device_floats(read_floats(f, NC, path));
    floatX *branch = fused ? device_bf16(read_floats(f, NC, path)) : NULL;
    floatX *weight = device_bf16(read_floats(f, C, path));
    floatX *bias = has_bias ? device_bf16(read_floats(f, C, path)) : NULL;
    float *res_out = fused ? (float *)device_alloc(NC * sizeof(float), 0xff) : NULL;
    floatX *out = (floatX *)device_alloc(NC * 2, 0xff);
    float *mean = is_layernorm ? (float *)device_alloc(N * sizeof(float), 0xff) : NULL;
    float *rstd = (float *)device_alloc(N * sizeof(float), 0xff);

    void (*const kernels[4])(float *, floatX *, float *, float *, const float *, const floatX *, const floatX *,
                             const floatX *, int, int, float, int, cudaStream_t) = {
        residual_norm_forward_warps, residual_norm_forward_rows, residual_norm_forward, residual_norm_forward_vec};
    kernels[kernel](res_out, out, mean, rstd, res_in, branch, weight, bias, N, C, 1e-5f, is_layernorm, 0);

    write_bf16s(out, NC);
    if (fused) write_floats(res_out, NC);
    if (is_layernorm) write_floats(mean, N);
    write_floats(rstd, N);
    printf("layernorm_emu forward N=%d C=%d %s%s kernel %d, threads %s: done\n", N, C, is_layernorm ? "layernorm" : "rmsnorm",
           fused ? " +residual" : "", kernel, order);
}

static void backward(FILE *f, const char *path, const char *order) {
    int32_t dims[6];
    read_header(f, path, dims, 6);
    int N = dims[0], C = dims[1], is_layernorm = dims[2], path_kind = dims[3], colsum = dims[4], bf16_copy = dims[5];
    if (N < 1 || C < 1 || path_kind < 0 || path_kind > 5) {
        fprintf(stderr, "error: %s: bad header N=%d C=%d path=%d\n", path, N, C, path_kind);
        exit(1);
    }
    size_t NC = (size_t)N * C;
    const int bf16_dout = path_kind >= 3;
    std::vector<float> dout_values = read_floats(f, NC, path);
    float *dout = bf16_dout ? NULL : device_floats(dout_values);
    floatX *dout_bf16 = bf16_dout ? device_bf16(dout_values) : NULL;
    float *inp = device_floats(read_floats(f, NC, path));
    float *dres = device_floats(read_floats(f, NC, path));
    floatX *weight = device_bf16(read_floats(f, C, path));
    float *mean = is_layernorm ? device_floats(read_floats(f, N, path)) : NULL;
    float *rstd = device_floats(read_floats(f, N, path));
    float *dweight = device_floats(read_floats(f, C, path));
    float *dbias = device_floats(read_floats(f, C, path));
    float *dcol = device_floats(read_floats(f, C, path));
    floatX *dres_bf16 = bf16_copy ? (floatX *)device_alloc(NC * 2, 0xff) : NULL;
    float *scratch = (float *)device_alloc(norm_backward_scratch_floats(N, C) * sizeof(float), 0xff);

    void (*const paths[3])(float *, floatX *, float *, float *, float *, const float *, const float *, const floatX *,
                           const float *, const float *, float *, int, int, int, cudaStream_t) = {
        norm_backward_fused<float>, norm_backward_split<float>, norm_backward<float>};
    void (*const paths_bf16[3])(float *, floatX *, float *, float *, float *, const floatX *, const float *, const floatX *,
                                const float *, const float *, float *, int, int, int, cudaStream_t) = {
        norm_backward_fused<floatX>, norm_backward_split<floatX>, norm_backward<floatX>};
    if (bf16_dout)
        paths_bf16[path_kind - 3](dres, dres_bf16, dweight, is_layernorm ? dbias : NULL, colsum ? dcol : NULL, dout_bf16, inp,
                                  weight, mean, rstd, scratch, N, C, is_layernorm, 0);
    else
        paths[path_kind](dres, dres_bf16, dweight, is_layernorm ? dbias : NULL, colsum ? dcol : NULL, dout, inp, weight, mean,
                         rstd, scratch, N, C, is_layernorm, 0);

    write_floats(dres, NC);
    if (bf16_copy) write_bf16s(dres_bf16, NC);
    write_floats(dweight, C);
    if (is_layernorm) write_floats(dbias, C);
    if (colsum) write_floats(dcol, C);
    printf("layernorm_emu backward N=%d C=%d %s path %d, threads %s: done\n", N, C, is_layernorm ? "layernorm" : "rmsnorm",
           path_kind, order);
}

static void column_sums(FILE *f, const char *path, const char *order) {
    int32_t dims[2];
    read_header(f, path, dims, 2);
    int N = dims[0], cols = dims[1];
    if (N < 1 || cols < 1) {
        fprintf(stderr, "error: %s: bad header N=%d cols=%d\n", path, N, cols);
        exit(1);
    }
    floatX *x = device_bf16(read_floats(f, (size_t)N * cols, path));
    float *out = device_floats(read_floats(f, cols, path));
    float *scratch = (float *)device_alloc((size_t)column_chunks(N) * cols * sizeof(float), 0xff);
    column_sums_add<floatX>(out, x, scratch, N, cols, 0);
    write_floats(out, cols);
    printf("layernorm_emu column sums N=%d cols=%d, threads %s: done\n", N, cols, order);
}

int main(int argc, char **argv) {
    FILE *f = emu_open_input(argc, argv, 32 * sizeof(float));   // block_sum's partials
    int32_t op;
    read_header(f, argv[1], &op, 1);
    out_file = fopen(argv[2], "wb");
    out_path = argv[2];
    if (!out_file) { fprintf(stderr, "error: cannot create %s\n", argv[2]); return 1; }
    if (op == 0) forward(f, argv[1], argv[3]);
    else if (op == 1) backward(f, argv[1], argv[3]);
    else if (op == 2) column_sums(f, argv[1], argv[3]);
    else { fprintf(stderr, "error: %s: unknown op %d\n", argv[1], op); return 1; }
    fclose(f);
    if (fclose(out_file) != 0) { fprintf(stderr, "error: cannot write %s\n", argv[2]); return 1; }
    return 0;
}
