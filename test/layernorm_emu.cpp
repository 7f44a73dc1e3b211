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
 * block run in index order or in reverse (the last argument), the blocks in EMU_BLOCKS's order
 * (test/gpu_emu.h).
 *
 *   layernorm_emu IN OUT forward|reverse
 *     IN : int32 op, then by op:
 *       0 forward:  int32 N, C, is_layernorm, fused, has_bias, kernel (0 warps, 1 rows, 2 picked,
 *                   3 registers), bf16_stream; float32 res_in (N, C) (bf16 values when
 *                   bf16_stream); branch (N, C) when fused; weight (C); bias (C) when has_bias;
 *                   branch, weight and bias representable in bf16
 *             OUT: float32 out (N, C) (the bf16 output); res_out (N, C) when fused (bf16 values
 *                  when bf16_stream); mean (N) when is_layernorm; rstd (N)
 *       1 backward: int32 N, C, is_layernorm, path (0 fused, 1 split, 2 picked; 3 to 5 the same with
 *                   dout in bf16), colsum, bf16_copy, bf16_stream (inp and dres in bf16);
 *                   float32 dout (N, C) (bf16 values for paths 3 to 5), inp (N, C), dres (N, C)
 *                   (both bf16 values when bf16_stream), weight (C) (bf16 values),
 *                   mean (N) when is_layernorm, rstd (N), then the starting values of dweight,
 *                   dbias and colsum (C each)
 *             OUT: float32 dres (N, C) (bf16 values when bf16_stream); its bf16 copy (N, C) when
 *                  bf16_copy; dweight (C);
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
// the values as a device array of T (fp32, or bf16 for values bf16 holds)
template <typename T> static T *device_values(const std::vector<float> &x);
template <> float *device_values<float>(const std::vector<float> &x) { return device_floats(x); }
template <> floatX *device_values<floatX>(const std::vector<float> &x) { return device_bf16(x); }
static void write_values(const float *x, size_t n) { write_floats(x, n); }
static void write_values(const floatX *x, size_t n) { write_bf16s(x, n); }
static void read_header(FILE *f, const char *path, int32_t *dims, int n) {
    if (fread(dims, sizeof(int32_t), n, f) != (size_t)n) {
        fprintf(stderr, "error: %s: no header\n", path);
        exit(1);
    }
}

// The forward with the residual stream in TR (fp32 or bf16).
template <typename TR>
static void forward_typed(FILE *f, const char *path, int N, int C, int is_layernorm, int fused, int has_bias, int kernel) {
    size_t NC = (size_t)N * C;
    TR *res_in = device_values<TR>(read_floats(f, NC, path));
    floatX *branch = fused ? device_bf16(read_floats(f, NC, path)) : NULL;
    floatX *weight = device_bf16(read_floats(f, C, path));
    floatX *bias = has_bias ? device_bf16(read_floats(f, C, path)) : NULL;
    TR *res_out = fused ? (TR *)device_alloc(NC * sizeof(TR), 0xff) : NULL;
    floatX *out = (floatX *)device_alloc(NC * 2, 0xff);
    float *mean = is_layernorm ? (float *)device_alloc(N * sizeof(float), 0xff) : NULL;
    float *rstd = (float *)device_alloc(N * sizeof(float), 0xff);

    void (*const kernels[4])(TR *, floatX *, float *, float *, const TR *, const floatX *, const floatX *,
                             const floatX *, int, int, float, int, cudaStream_t) = {
        residual_norm_forward_warps<TR>, residual_norm_forward_rows<TR>, residual_norm_forward<TR>,
        residual_norm_forward_vec<TR>};
    kernels[kernel](res_out, out, mean, rstd, res_in, branch, weight, bias, N, C, 1e-5f, is_layernorm, 0);

    write_values(out, NC);
    if (fused) write_values(res_out, NC);
    if (is_layernorm) write_values(mean, N);
    write_values(rstd, N);
}

static void forward(FILE *f, const char *path, const char *order) {
    int32_t dims[7];
    read_header(f, path, dims, 7);
    int N = dims[0], C = dims[1], is_layernorm = dims[2], fused = dims[3], has_bias = dims[4], kernel = dims[5];
    int bf16_stream = dims[6];
    if (N < 1 || C < 1 || kernel < 0 || kernel > 3) {
        fprintf(stderr, "error: %s: bad header N=%d C=%d kernel=%d\n", path, N, C, kernel);
        exit(1);
    }
    if (bf16_stream) forward_typed<floatX>(f, path, N, C, is_layernorm, fused, has_bias, kernel);
    else forward_typed<float>(f, path, N, C, is_layernorm, fused, has_bias, kernel);
    printf("layernorm_emu forward N=%d C=%d %s%s kernel %d, %s stream, threads %s: done\n", N, C,
           is_layernorm ? "layernorm" : "rmsnorm", fused ? " +residual" : "", kernel, bf16_stream ? "bf16" : "fp32", order);
}

// The backward with dout in TD and the stream (the input, dres) in TR.
template <typename TD, typename TR>
static void backward_typed(FILE *f, const char *path, int N, int C, int is_layernorm, int path_kind, int colsum,
                           int bf16_copy) {
    size_t NC = (size_t)N * C;
    TD *dout = device_values<TD>(read_floats(f, NC, path));
    TR *inp = device_values<TR>(read_floats(f, NC, path));
    TR *dres = device_values<TR>(read_floats(f, NC, path));
    floatX *weight = device_bf16(read_floats(f, C, path));
    float *mean = is_layernorm ? device_floats(read_floats(f, N, path)) : NULL;
    float *rstd = device_floats(read_floats(f, N, path));
    float *dweight = device_floats(read_floats(f, C, path));
    float *dbias = device_floats(read_floats(f, C, path));
    float *dcol = device_floats(read_floats(f, C, path));
    floatX *dres_bf16 = bf16_copy ? (floatX *)device_alloc(NC * 2, 0xff) : NULL;
    float *scratch = (float *)device_alloc(norm_backward_scratch_floats(N, C) * sizeof(float), 0xff);

    void (*const paths[3])(TR *, floatX *, float *, float *, float *, const TD *, const TR *, const floatX *,
                           const float *, const float *, float *, int, int, int, cudaStream_t) = {
        norm_backward_fused<TD, TR>, norm_backward_split<TD, TR>, norm_backward<TD, TR>};
    paths[path_kind % 3](dres, dres_bf16, dweight, is_layernorm ? dbias : NULL, colsum ? dcol : NULL, dout, inp, weight, mean,
                         rstd, scratch, N, C, is_layernorm, 0);

    write_values(dres, NC);
    if (bf16_copy) write_values(dres_bf16, NC);
    write_values(dweight, C);
    if (is_layernorm) write_values(dbias, C);
    if (colsum) write_values(dcol, C);
}

static void backward(FILE *f, const char *path, const char *order) {
    int32_t dims[7];
    read_header(f, path, dims, 7);
    int N = dims[0], C = dims[1], is_layernorm = dims[2], path_kind = dims[3], colsum = dims[4], bf16_copy = dims[5];
    int bf16_stream = dims[6];
    if (N < 1 || C < 1 || path_kind < 0 || path_kind > 5) {
        fprintf(stderr, "error: %s: bad header N=%d C=%d path=%d\n", path, N, C, path_kind);
        exit(1);
    }
    const int bf16_dout = path_kind >= 3;
    if (bf16_dout && bf16_stream) backward_typed<floatX, floatX>(f, path, N, C, is_layernorm, path_kind, colsum, bf16_copy);
    else if (bf16_dout) backward_typed<floatX, float>(f, path, N, C, is_layernorm, path_kind, colsum, bf16_copy);
    else if (bf16_stream) backward_typed<float, floatX>(f, path, N, C, is_layernorm, path_kind, colsum, bf16_copy);
    else backward_typed<float, float>(f, path, N, C, is_layernorm, path_kind, colsum, bf16_copy);
    printf("layernorm_emu backward N=%d C=%d %s path %d, %s stream, threads %s: done\n", N, C,
           is_layernorm ? "layernorm" : "rmsnorm", path_kind, bf16_stream ? "bf16" : "fp32", order);
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
