/*
 * Harness for layernorm.cuh: the fused residual + LayerNorm/RMSNorm forward (all three kernels:
 * warp per row, warp per row from registers, block per row) and the norm backward (the fused
 * kernel and the split fallback, with the column sums of the residual gradient) against
 * residual_forward, layernorm_* and rmsnorm_* of ops_cpu.c, on fresh random inputs, with the
 * output's gradient read as fp32 and as bf16 (its values bf16's, so one reference serves both),
 * and with the residual stream in fp32 and in bf16 (the model's default: the sum rounded to bf16
 * before the norm, the stream's gradient stored in bf16), then timing at GPT-2 124M's shape
 * (N = 16 x 1024 rows, C = 768) and SmolLM2's width (C = 576), both streams.
 *   build/cuda/dev/layernorm
 */
#include "harness.h"
#include "layernorm.cuh"

// The backward's column sums against the reference: dweight, dbias (LayerNorm) and the column
// sums of the updated dres (to col_tol: a bf16 stream's are sums of rounded values).
static void compare_norm_sums(const char *prefix, const char *how, const float *d_dw, const float *d_db, const float *d_col,
                              const std::vector<float> &dweight, const std::vector<float> &dbias,
                              const std::vector<float> &colsum, int C, int is_layernorm, double col_tol) {
    char name[200];
    snprintf(name, sizeof(name), "%s dweight%s", prefix, how);
    compare(name, download_f32(d_dw, C), dweight, TOL_F32);
    if (is_layernorm) {
        snprintf(name, sizeof(name), "%s dbias%s", prefix, how);
        compare(name, download_f32(d_db, C), dbias, TOL_F32);
    }
    snprintf(name, sizeof(name), "%s column sums of dres%s", prefix, how);
    compare(name, download_f32(d_col, C), colsum, col_tol);
}

static void check(int N, int C, int is_layernorm, int fused) {
    char name[160];
    const char *kind = is_layernorm ? "layernorm" : "rmsnorm";
    size_t NC = (size_t)N * C;
    std::vector<float> res = random_f32_values(NC, 1.0f), branch = random_bf16_values(NC, 0.5f);
    for (size_t i = 0; i < NC; i++) res[i] += 0.3f;   // a non-zero mean for LayerNorm to remove
    std::vector<float> weight = random_bf16_values(C, 1.0f), bias = random_bf16_values(C, 0.2f);
    std::vector<float> dout = random_bf16_values(NC, 1.0f), dres0 = random_f32_values(NC, 0.1f);

    // CPU reference: x = res (+ branch), norm(x); backward adds into dres0
    std::vector<float> x(NC), out(NC), mean(N), rstd(N);
    if (fused) residual_forward(x.data(), res.data(), branch.data(), NC); else x = res;
    if (is_layernorm) layernorm_forward(out.data(), mean.data(), rstd.data(), x.data(), weight.data(), bias.data(), N, C, 1e-5f);
    else rmsnorm_forward(out.data(), rstd.data(), x.data(), weight.data(), N, C, 1e-5f);
    std::vector<float> dinp = dres0, dweight(C, 0.0f), dbias(C, 0.0f);
    if (is_layernorm) layernorm_backward(dinp.data(), dweight.data(), dbias.data(), dout.data(), x.data(), weight.data(), mean.data(), rstd.data(), N, C);
    else rmsnorm_backward(dinp.data(), dweight.data(), dout.data(), x.data(), weight.data(), rstd.data(), N, C);

    float *d_res = upload(res), *d_x = device_alloc_n<float>(NC), *d_mean = device_alloc_n<float>(N), *d_rstd = device_alloc_n<float>(N);
    floatX *d_branch = upload_bf16(branch), *d_w = upload_bf16(weight), *d_b = upload_bf16(bias), *d_out = device_alloc_n<floatX>(NC);
    // the three kernels: a warp per row, a warp per row from registers (the one
    // residual_norm_forward takes for many rows), and a block per row (the one it takes for
    // fewer than NORM_ROW_KERNEL_MAX_ROWS rows)
    typedef void (*Forward)(float *, floatX *, float *, float *, const float *, const floatX *, const floatX *, const floatX *,
                            int, int, float, int, cudaStream_t);
    const Forward kernels[3] = {residual_norm_forward_warps<float>, residual_norm_forward_vec<float>, residual_norm_forward_rows<float>};
    const char *const hows[3] = {" (warp per row)", " (warp per row, registers)", " (block per row)"};
    for (int kernel = 0; kernel < 3; kernel++) {
        const char *how = hows[kernel];
        poison(d_x, NC * sizeof(float)); poison(d_out, NC * sizeof(floatX)); poison(d_mean, N * sizeof(float)); poison(d_rstd, N * sizeof(float));
        kernels[kernel](fused ? d_x : NULL, d_out, d_mean, d_rstd, d_res, fused ? d_branch : NULL, d_w, is_layernorm ? d_b : NULL,
                        N, C, 1e-5f, is_layernorm, 0);
        snprintf(name, sizeof(name), "%s_forward%s N=%d C=%d out%s", kind, fused ? " +residual" : "", N, C, how);
        compare(name, download_bf16(d_out, NC), out, TOL_BF16);
        snprintf(name, sizeof(name), "%s_forward%s N=%d C=%d rstd%s", kind, fused ? " +residual" : "", N, C, how);
        compare(name, download_f32(d_rstd, N), rstd, TOL_F32);
        if (is_layernorm) {
            snprintf(name, sizeof(name), "%s_forward%s N=%d C=%d mean%s", kind, fused ? " +residual" : "", N, C, how);
            compare(name, download_f32(d_mean, N), mean, TOL_F32);
        }
        if (fused) {
            snprintf(name, sizeof(name), "%s_forward +residual N=%d C=%d sum%s", kind, N, C, how);
            compare(name, download_f32(d_x, NC), x, TOL_F32);
        }
    }

    // backward from the reference's own x, mean, rstd so that only the backward is measured;
    // the column sums of the updated dres (the preceding projection's bias gradient) from the
    // reference's dinp
    std::vector<float> colsum(C, 0.0f);
    for (int n = 0; n < N; n++)
        for (int c = 0; c < C; c++) colsum[c] += dinp[(size_t)n * C + c];
    float *d_xin = upload(x), *d_dout = upload(dout), *d_dres = device_alloc_n<float>(NC);
    floatX *d_dout_bf16 = upload_bf16(dout);
    float *d_mean_ref = upload(mean), *d_rstd_ref = upload(rstd);
    float *d_dw = device_alloc_n<float>(C), *d_db = device_alloc_n<float>(C), *d_col = device_alloc_n<float>(C);
    floatX *d_dres_bf16 = device_alloc_n<floatX>(NC);
    float *scratch = device_alloc_n<float>(norm_backward_scratch_floats(N, C));
    for (int variant = 0; variant < 4; variant++) {
        const int split = variant & 1, bf16_dout = variant >> 1;
        const char *const hows[4] = {" (fused kernel)", " (split kernels)", " (fused kernel, bf16 dout)", " (split kernels, bf16 dout)"};
        const char *how = hows[variant];
        cudaCheck(cudaMemcpy(d_dres, dres0.data(), NC * sizeof(float), cudaMemcpyHostToDevice));
        for (float *p : {d_dw, d_db, d_col}) cudaCheck(cudaMemset(p, 0, C * sizeof(float)));
        poison(d_dres_bf16, NC * sizeof(floatX));
        float *db = is_layernorm ? d_db : NULL, *dmean = is_layernorm ? d_mean_ref : NULL;
        if (bf16_dout)
            (split ? norm_backward_split<floatX, float> : norm_backward_fused<floatX, float>)(d_dres, d_dres_bf16, d_dw, db, d_col, d_dout_bf16,
                                                                               d_xin, d_w, dmean, d_rstd_ref, scratch, N, C,
                                                                               is_layernorm, 0);
        else
            (split ? norm_backward_split<float, float> : norm_backward_fused<float, float>)(d_dres, d_dres_bf16, d_dw, db, d_col, d_dout, d_xin,
                                                                             d_w, dmean, d_rstd_ref, scratch, N, C, is_layernorm, 0);
        snprintf(name, sizeof(name), "%s_backward N=%d C=%d dinp (+=)%s", kind, N, C, how);
        compare(name, download_f32(d_dres, NC), dinp, TOL_F32);
        snprintf(name, sizeof(name), "%s_backward N=%d C=%d dinp bf16 copy%s", kind, N, C, how);
        compare(name, download_bf16(d_dres_bf16, NC), dinp, TOL_BF16);
        snprintf(name, sizeof(name), "%s_backward N=%d C=%d", kind, N, C);
        compare_norm_sums(name, how, d_dw, d_db, d_col, dweight, dbias, colsum, C, is_layernorm, TOL_F32);
    }
    void *ptrs[] = {d_res, d_x, d_mean, d_rstd, d_branch, d_w, d_b, d_out, d_xin, d_dout, d_dout_bf16, d_dres, d_mean_ref, d_rstd_ref, d_dw, d_db, d_col, d_dres_bf16, scratch};
    for (void *p : ptrs) cudaCheck(cudaFree(p));
}

// The residual stream in bf16: the forward's kernels and the backward's two paths against the CPU
// reference on the bf16 sum (residual and branch in bf16, their fp32 sum rounded to bf16), the
// backward from bf16 inputs and a bf16 starting gradient.
static void check_bf16_stream(int N, int C, int is_layernorm, int fused) {
    char name[160];
    const char *kind = is_layernorm ? "layernorm" : "rmsnorm";
    size_t NC = (size_t)N * C;
    std::vector<float> res = random_bf16_values(NC, 1.0f), branch = random_bf16_values(NC, 0.5f);
    std::vector<float> weight = random_bf16_values(C, 1.0f), bias = random_bf16_values(C, 0.2f);
    std::vector<float> dout = random_bf16_values(NC, 1.0f), dres0 = random_bf16_values(NC, 0.1f);
    std::vector<float> x(NC), out(NC), mean(N), rstd(N);
    for (size_t i = 0; i < NC; i++) x[i] = fused ? __bfloat162float(__float2bfloat16(res[i] + branch[i])) : res[i];
    if (is_layernorm) layernorm_forward(out.data(), mean.data(), rstd.data(), x.data(), weight.data(), bias.data(), N, C, 1e-5f);
    else rmsnorm_forward(out.data(), rstd.data(), x.data(), weight.data(), N, C, 1e-5f);
    std::vector<float> dinp = dres0, dweight(C, 0.0f), dbias(C, 0.0f);
    if (is_layernorm) layernorm_backward(dinp.data(), dweight.data(), dbias.data(), dout.data(), x.data(), weight.data(), mean.data(), rstd.data(), N, C);
    else rmsnorm_backward(dinp.data(), dweight.data(), dout.data(), x.data(), weight.data(), rstd.data(), N, C);
    std::vector<float> colsum(C, 0.0f);
    for (int n = 0; n < N; n++)
        for (int c = 0; c < C; c++) colsum[c] += dinp[(size_t)n * C + c];

    floatX *d_res = upload_bf16(res), *d_x = device_alloc_n<floatX>(NC), *d_branch = upload_bf16(branch);
    floatX *d_w = upload_bf16(weight), *d_b = upload_bf16(bias), *d_out = device_alloc_n<floatX>(NC);
    float *d_mean = device_alloc_n<float>(N), *d_rstd = device_alloc_n<float>(N);
    typedef void (*Forward)(floatX *, floatX *, float *, float *, const floatX *, const floatX *, const floatX *, const floatX *,
                            int, int, float, int, cudaStream_t);
    const Forward kernels[3] = {residual_norm_forward_warps<floatX>, residual_norm_forward_vec<floatX>, residual_norm_forward_rows<floatX>};
    const char *const hows[3] = {" (warp per row)", " (warp per row, registers)", " (block per row)"};
    for (int kernel = 0; kernel < 3; kernel++) {
        poison(d_x, NC * sizeof(floatX)); poison(d_out, NC * sizeof(floatX)); poison(d_mean, N * sizeof(float)); poison(d_rstd, N * sizeof(float));
        kernels[kernel](fused ? d_x : NULL, d_out, d_mean, d_rstd, d_res, fused ? d_branch : NULL, d_w, is_layernorm ? d_b : NULL,
                        N, C, 1e-5f, is_layernorm, 0);
        snprintf(name, sizeof(name), "%s_forward%s bf16 stream N=%d C=%d out%s", kind, fused ? " +residual" : "", N, C, hows[kernel]);
        compare(name, download_bf16(d_out, NC), out, TOL_BF16);
        snprintf(name, sizeof(name), "%s_forward%s bf16 stream N=%d C=%d rstd%s", kind, fused ? " +residual" : "", N, C, hows[kernel]);
        compare(name, download_f32(d_rstd, N), rstd, TOL_F32);
        if (fused) {   // the rounding of the sum is the same on both sides: exact
            snprintf(name, sizeof(name), "%s_forward +residual bf16 stream N=%d C=%d sum%s", kind, N, C, hows[kernel]);
            compare_bits(name, download_bf16(d_x, NC), x);
        }
    }
    floatX *d_xin = upload_bf16(x), *d_dout = upload_bf16(dout), *d_dres = device_alloc_n<floatX>(NC);
    std::vector<floatX> dres0_bf16(NC);
    for (size_t i = 0; i < NC; i++) dres0_bf16[i] = __float2bfloat16(dres0[i]);
    float *d_mean_ref = upload(mean), *d_rstd_ref = upload(rstd);
    float *d_dw = device_alloc_n<float>(C), *d_db = device_alloc_n<float>(C), *d_col = device_alloc_n<float>(C);
    float *scratch = device_alloc_n<float>(norm_backward_scratch_floats(N, C));
    for (int split = 0; split <= 1; split++) {
        const char *how = split ? " (split kernels)" : " (fused kernel)";
        cudaCheck(cudaMemcpy(d_dres, dres0_bf16.data(), NC * sizeof(floatX), cudaMemcpyHostToDevice));
        for (float *p : {d_dw, d_db, d_col}) cudaCheck(cudaMemset(p, 0, C * sizeof(float)));
        float *db = is_layernorm ? d_db : NULL, *dmean = is_layernorm ? d_mean_ref : NULL;
        (split ? norm_backward_split<floatX, floatX> : norm_backward_fused<floatX, floatX>)(
            d_dres, NULL, d_dw, db, d_col, d_dout, d_xin, d_w, dmean, d_rstd_ref, scratch, N, C, is_layernorm, 0);
        snprintf(name, sizeof(name), "%s_backward bf16 stream N=%d C=%d dinp (+=)%s", kind, N, C, how);
        compare(name, download_bf16(d_dres, NC), dinp, TOL_BF16);
        snprintf(name, sizeof(name), "%s_backward bf16 stream N=%d C=%d", kind, N, C);
        compare_norm_sums(name, how, d_dw, d_db, d_col, dweight, dbias, colsum, C, is_layernorm, TOL_BF16);
    }
    void *ptrs[] = {d_res, d_x, d_branch, d_w, d_b, d_out, d_mean, d_rstd, d_xin, d_dout, d_dres, d_mean_ref, d_rstd_ref, d_dw, d_db, d_col, scratch};
    for (void *p : ptrs) cudaCheck(cudaFree(p));
}

int main(void) {
    harness_require_device("layernorm");
    harness_seed(2);
    for (int is_layernorm = 0; is_layernorm <= 1; is_layernorm++) {
        for (int fused = 0; fused <= 1; fused++) {
            check(7, 33, is_layernorm, fused);
            check(300, 576, is_layernorm, fused);
            check(1000, 768, is_layernorm, fused);
            check_bf16_stream(7, 33, is_layernorm, fused);
            check_bf16_stream(1000, 768, is_layernorm, fused);
        }
    }
    for (int C : {768, 576}) {
        int N = 16 * 1024, is_layernorm = C == 768;
        const char *kind = is_layernorm ? "layernorm" : "rmsnorm";
        size_t NC = (size_t)N * C;
        float *res = upload(random_f32_values(NC, 1.0f)), *x = device_alloc_n<float>(NC), *mean = device_alloc_n<float>(N), *rstd = device_alloc_n<float>(N);
        floatX *branch = upload_bf16(random_bf16_values(NC, 1.0f)), *w = upload_bf16(random_bf16_values(C, 1.0f));
        floatX *b = is_layernorm ? upload_bf16(random_bf16_values(C, 1.0f)) : NULL;
        floatX *out = device_alloc_n<floatX>(NC), *dres_bf16 = device_alloc_n<floatX>(NC);
        float *dout = upload(random_f32_values(NC, 1.0f)), *dres = upload(random_f32_values(NC, 1.0f));
        floatX *dout_bf16 = upload_bf16(random_bf16_values(NC, 1.0f));
        float *dw = device_alloc_n<float>(C), *db = device_alloc_n<float>(C), *col = device_alloc_n<float>(C);
        float *scratch = device_alloc_n<float>(norm_backward_scratch_floats(N, C));
        residual_norm_forward(x, out, mean, rstd, res, branch, w, b, N, C, 1e-5f, is_layernorm, 0);
        float fwd_warps = time_ms([&] { residual_norm_forward_warps(x, out, mean, rstd, res, branch, w, b, N, C, 1e-5f, is_layernorm, 0); });
        float fwd_vec = time_ms([&] { residual_norm_forward_vec(x, out, mean, rstd, res, branch, w, b, N, C, 1e-5f, is_layernorm, 0); });
        float *db_or_null = is_layernorm ? db : NULL, *mean_or_null = is_layernorm ? mean : NULL;
        float bwd_split = time_ms([&] { norm_backward_split(dres, dres_bf16, dw, db_or_null, col, dout, x, w, mean_or_null, rstd, scratch, N, C, is_layernorm, 0); });
        float bwd_fused = time_ms([&] { norm_backward_fused(dres, dres_bf16, dw, db_or_null, col, dout, x, w, mean_or_null, rstd, scratch, N, C, is_layernorm, 0); });
        float bwd_fused16 = time_ms([&] { norm_backward_fused(dres, dres_bf16, dw, db_or_null, col, dout_bf16, x, w, mean_or_null, rstd, scratch, N, C, is_layernorm, 0); });
        // the bf16 stream (the model's default): residual, sum and the stream's gradient in bf16
        floatX *res16 = upload_bf16(random_bf16_values(NC, 1.0f)), *x16 = device_alloc_n<floatX>(NC);
        floatX *dres16 = upload_bf16(random_bf16_values(NC, 1.0f));
        float fwd_vec16 = time_ms([&] { residual_norm_forward_vec(x16, out, mean, rstd, res16, branch, w, b, N, C, 1e-5f, is_layernorm, 0); });
        // the sums the model asks for: GPT-2's norms the column sums (a projection bias before them), SmolLM2's none
        float *col_or_null = is_layernorm ? col : NULL;
        float bwd_fused_stream16 = time_ms([&] { norm_backward_fused(dres16, (floatX *)NULL, dw, db_or_null, col_or_null, dout_bf16, x16, w, mean_or_null, rstd, scratch, N, C, is_layernorm, 0); });
        // the same without its reduction of the partial sums, which the model queues on its
        // second stream (sums_aside): what that takes off the main stream's path
        float bwd_partials_stream16 = time_ms([&] { norm_backward_partials(dres16, (floatX *)NULL, scratch, is_layernorm, is_layernorm, dout_bf16, x16, w, mean_or_null, rstd, N, C, is_layernorm, 0); });
        // bytes each must move: forward reads res (fp32) and branch, writes the sum and the output;
        // backward reads dout, the input and dres, writes dres and its bf16 copy
        double fwd_bytes = NC * (4 + 2 + 4 + 2), bwd_bytes = NC * (4 + 4 + 4 + 4 + 2);
        printf("time %s N=%d C=%d: residual+norm forward: warp per row %.3f ms (%.0f GB/s), registers %.3f ms (%.0f GB/s)\n",
               kind, N, C, fwd_warps, fwd_bytes / fwd_warps / 1e6, fwd_vec, fwd_bytes / fwd_vec / 1e6);
        printf("time %s N=%d C=%d: backward with the dres column sums: split kernels %.3f ms (%.0f GB/s), fused kernel %.3f ms (%.0f GB/s), "
               "fused with bf16 dout %.3f ms (%.0f GB/s)\n",
               kind, N, C, bwd_split, bwd_bytes / bwd_split / 1e6, bwd_fused, bwd_bytes / bwd_fused / 1e6, bwd_fused16,
               (bwd_bytes - 2.0 * NC) / bwd_fused16 / 1e6);
        // bf16 stream: forward reads res and branch, writes the sum and the output (8 bytes); the
        // backward reads dout, the input and dres, writes dres (8 bytes)
        printf("time %s N=%d C=%d: bf16 stream: residual+norm forward (registers) %.3f ms (%.0f GB/s; fp32 stream %.3f ms), "
               "fused backward with bf16 dout and the model's sums %.3f ms (%.0f GB/s; fp32 stream, all sums %.3f ms)\n",
               kind, N, C, fwd_vec16, 8.0 * NC / fwd_vec16 / 1e6, fwd_vec, bwd_fused_stream16, 8.0 * NC / bwd_fused_stream16 / 1e6,
               bwd_fused16);
        printf("time %s N=%d C=%d: bf16 stream: the fused backward's kernel alone (its partial sums reduced elsewhere) %.3f ms "
               "(%.0f GB/s): %.4f ms less on the main stream\n",
               kind, N, C, bwd_partials_stream16, 8.0 * NC / bwd_partials_stream16 / 1e6, bwd_fused_stream16 - bwd_partials_stream16);
        for (void *p : {(void *)res16, (void *)x16, (void *)dres16}) cudaCheck(cudaFree(p));
        // a decode step's norm: one row per sequence
        for (int rows : {64, 256}) {
            float warps = time_ms([&] { residual_norm_forward_warps(x, out, mean, rstd, res, branch, w, b, rows, C, 1e-5f, is_layernorm, 0); });
            float vec = time_ms([&] { residual_norm_forward_vec(x, out, mean, rstd, res, branch, w, b, rows, C, 1e-5f, is_layernorm, 0); });
            float blocks = time_ms([&] { residual_norm_forward_rows(x, out, mean, rstd, res, branch, w, b, rows, C, 1e-5f, is_layernorm, 0); });
            printf("time %s N=%d C=%d (decode): residual+norm forward, warp per row %.4f ms, registers %.4f ms, block per row %.4f ms\n",
                   kind, rows, C, warps, vec, blocks);
        }
        void *ptrs[] = {res, x, mean, rstd, branch, w, b, out, dres_bf16, dout, dout_bf16, dres, dw, db, col, scratch};
        for (void *p : ptrs) if (p) cudaCheck(cudaFree(p));
    }
    return harness_finish("layernorm");
}
