/*
 * Harness for layernorm.cuh: the fused residual + LayerNorm/RMSNorm forward and the norm
 * backward against residual_forward, layernorm_* and rmsnorm_* of ops_cpu.c, on fresh random
 * inputs, then timing at GPT-2 124M's shape (N = 16 x 1024 rows, C = 768).
 *   build/cuda/dev/layernorm
 */
#include "harness.h"
#include "layernorm.cuh"

static void check(int N, int C, int is_layernorm, int fused) {
    char name[160];
    const char *kind = is_layernorm ? "layernorm" : "rmsnorm";
    size_t NC = (size_t)N * C;
    std::vector<float> res = random_f32_values(NC, 1.0f), branch = random_bf16_values(NC, 0.5f);
    for (size_t i = 0; i < NC; i++) res[i] += 0.3f;   // a non-zero mean for LayerNorm to remove
    std::vector<float> weight = random_bf16_values(C, 1.0f), bias = random_bf16_values(C, 0.2f);
    std::vector<float> dout = random_f32_values(NC, 1.0f), dres0 = random_f32_values(NC, 0.1f);

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
    // both kernels: a warp per row, and a block per row (the one residual_norm_forward takes
    // for fewer than NORM_ROW_KERNEL_MAX_ROWS rows)
    for (int rows = 0; rows < 2; rows++) {
        const char *how = rows ? " (block per row)" : " (warp per row)";
        poison(d_x, NC * sizeof(float)); poison(d_out, NC * sizeof(floatX)); poison(d_mean, N * sizeof(float)); poison(d_rstd, N * sizeof(float));
        (rows ? residual_norm_forward_rows : residual_norm_forward_warps)(fused ? d_x : NULL, d_out, d_mean, d_rstd, d_res,
                                                                         fused ? d_branch : NULL, d_w, is_layernorm ? d_b : NULL,
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

    // backward from the reference's own x, mean, rstd so that only the backward is measured
    float *d_xin = upload(x), *d_dout = upload(dout), *d_dres = upload(dres0);
    float *d_mean_ref = upload(mean), *d_rstd_ref = upload(rstd);
    float *d_dw = upload(std::vector<float>(C, 0.0f)), *d_db = upload(std::vector<float>(C, 0.0f));
    floatX *d_dres_bf16 = device_alloc_n<floatX>(NC);
    float *scratch = device_alloc_n<float>(2 * (size_t)column_chunks(N) * C);
    poison(d_dres_bf16, NC * sizeof(floatX));
    norm_backward(d_dres, d_dres_bf16, d_dw, is_layernorm ? d_db : NULL, d_dout, d_xin, d_w, is_layernorm ? d_mean_ref : NULL,
                  d_rstd_ref, scratch, N, C, is_layernorm, 0);
    snprintf(name, sizeof(name), "%s_backward N=%d C=%d dinp (+=)", kind, N, C);
    compare(name, download_f32(d_dres, NC), dinp, TOL_F32);
    snprintf(name, sizeof(name), "%s_backward N=%d C=%d dinp bf16 copy", kind, N, C);
    compare(name, download_bf16(d_dres_bf16, NC), dinp, TOL_BF16);
    snprintf(name, sizeof(name), "%s_backward N=%d C=%d dweight", kind, N, C);
    compare(name, download_f32(d_dw, C), dweight, TOL_F32);
    if (is_layernorm) {
        snprintf(name, sizeof(name), "%s_backward N=%d C=%d dbias", kind, N, C);
        compare(name, download_f32(d_db, C), dbias, TOL_F32);
    }
    void *ptrs[] = {d_res, d_x, d_mean, d_rstd, d_branch, d_w, d_b, d_out, d_xin, d_dout, d_dres, d_mean_ref, d_rstd_ref, d_dw, d_db, d_dres_bf16, scratch};
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
        }
    }
    int N = 16 * 1024, C = 768;
    size_t NC = (size_t)N * C;
    float *res = upload(random_f32_values(NC, 1.0f)), *x = device_alloc_n<float>(NC), *mean = device_alloc_n<float>(N), *rstd = device_alloc_n<float>(N);
    floatX *branch = upload_bf16(random_bf16_values(NC, 1.0f)), *w = upload_bf16(random_bf16_values(C, 1.0f)), *b = upload_bf16(random_bf16_values(C, 1.0f));
    floatX *out = device_alloc_n<floatX>(NC), *dres_bf16 = device_alloc_n<floatX>(NC);
    float *dout = upload(random_f32_values(NC, 1.0f)), *dres = upload(random_f32_values(NC, 1.0f));
    float *dw = device_alloc_n<float>(C), *db = device_alloc_n<float>(C), *scratch = device_alloc_n<float>(2 * (size_t)column_chunks(N) * C);
    float fwd = time_ms([&] { residual_norm_forward(x, out, mean, rstd, res, branch, w, b, N, C, 1e-5f, 1, 0); });
    float bwd = time_ms([&] { norm_backward(dres, dres_bf16, dw, db, dout, x, w, mean, rstd, scratch, N, C, 1, 0); });
    double fwd_bytes = NC * (4 + 2 + 4 + 2), bwd_bytes = NC * (4 + 4 + 4 + 4 + 2) + NC * (4 + 4);
    printf("time layernorm N=%d C=%d: residual+norm forward %.3f ms (%.0f GB/s), backward %.3f ms (%.0f GB/s)\n",
           N, C, fwd, fwd_bytes / fwd / 1e6, bwd, bwd_bytes / bwd / 1e6);
    // a decode step's norm: one row per sequence
    for (int rows : {64, 256}) {
        float warps = time_ms([&] { residual_norm_forward_warps(x, out, mean, rstd, res, branch, w, b, rows, C, 1e-5f, 1, 0); });
        float blocks = time_ms([&] { residual_norm_forward_rows(x, out, mean, rstd, res, branch, w, b, rows, C, 1e-5f, 1, 0); });
        printf("time layernorm N=%d C=%d (decode): residual+norm forward, warp per row %.4f ms, block per row %.4f ms\n", rows, C,
               warps, blocks);
    }
    return harness_finish("layernorm");
}
