/*
 * Harness for swiglu.cuh: SwiGLU forward and backward against swiglu_forward / swiglu_backward
 * of ops_cpu.c on fresh random inputs, for the scalar kernels, the 8-wide ones (F a multiple of
 * 8) and the pick between them, with the 8-wide results also checked bit for bit against the
 * scalar ones; the decode step's SwiGLU with the rows' RMSNorm folded in (swiglu_forward_rownorm)
 * against the CPU's rmsnorm factor and swiglu_forward on the scaled rows; then timing of both at
 * SmolLM2-135M's MLP shape (16 x 1024, F = 1536), and of the row-norm kernel at 64 rows.
 *   build/cuda/dev/swiglu
 */
#include "harness.h"
#include "swiglu.cuh"

typedef void (*SwigluForward)(floatX *, const floatX *, int, int, cudaStream_t);
typedef void (*SwigluBackward)(floatX *, const floatX *, const floatX *, int, int, cudaStream_t);
static const struct { const char *name; SwigluForward forward; SwigluBackward backward; } KERNELS[] = {
    {"scalar", swiglu_forward_scalar, swiglu_backward_scalar},
    {"vec8", swiglu_forward_vec8, swiglu_backward_vec8},
    {"picked", swiglu_forward, swiglu_backward},
};

static void check(int N, int F) {
    char name[128];
    size_t n = (size_t)N * F;
    std::vector<float> fc = random_bf16_values(2 * n, 2.0f), dout = random_bf16_values(n, 1.0f);
    std::vector<float> out(n), dfc(2 * n, 0.0f);
    swiglu_forward(out.data(), fc.data(), N, F);
    swiglu_backward(dfc.data(), dout.data(), fc.data(), N, F);
    floatX *d_fc = upload_bf16(fc), *d_dout = upload_bf16(dout), *d_out = device_alloc_n<floatX>(n), *d_dfc = device_alloc_n<floatX>(2 * n);
    std::vector<float> scalar_out, scalar_dfc;
    for (const auto &k : KERNELS) {
        if (k.forward == swiglu_forward_vec8 && !swiglu_vectorized(d_dfc, d_dout, d_fc, N, F)) continue;
        poison(d_out, n * sizeof(floatX)); poison(d_dfc, 2 * n * sizeof(floatX));
        k.forward(d_out, d_fc, N, F, 0);
        k.backward(d_dfc, d_dout, d_fc, N, F, 0);
        std::vector<float> got_out = download_bf16(d_out, n), got_dfc = download_bf16(d_dfc, 2 * n);
        snprintf(name, sizeof(name), "swiglu_forward %s N=%d F=%d", k.name, N, F);
        compare(name, got_out, out, TOL_BF16);
        snprintf(name, sizeof(name), "swiglu_backward %s N=%d F=%d", k.name, N, F);
        compare(name, got_dfc, dfc, TOL_BF16);
        if (k.forward == swiglu_forward_scalar) {
            scalar_out = got_out;
            scalar_dfc = got_dfc;
        } else {
            snprintf(name, sizeof(name), "swiglu_forward %s = scalar N=%d F=%d", k.name, N, F);
            compare_bits(name, got_out, scalar_out);
            snprintf(name, sizeof(name), "swiglu_backward %s = scalar N=%d F=%d", k.name, N, F);
            compare_bits(name, got_dfc, scalar_dfc);
        }
    }
    for (void *p : {(void *)d_fc, (void *)d_dout, (void *)d_out, (void *)d_dfc}) cudaCheck(cudaFree(p));
}

// swiglu_forward_rownorm: gate and up of row n scaled by 1 / sqrt(mean(x_n^2) + eps) first
static void check_rownorm(int N, int F, int C) {
    char name[128];
    std::vector<float> fc = random_bf16_values(2 * (size_t)N * F, 2.0f), x = random_bf16_values((size_t)N * C, 3.0f);
    std::vector<float> scaled(fc.size()), out((size_t)N * F);
    for (int r = 0; r < N; r++) {
        double sq = 0.0;
        for (int c = 0; c < C; c++) sq += (double)x[(size_t)r * C + c] * x[(size_t)r * C + c];
        float rstd = (float)(1.0 / sqrt(sq / C + 1e-5));
        for (int j = 0; j < 2 * F; j++) scaled[(size_t)r * 2 * F + j] = fc[(size_t)r * 2 * F + j] * rstd;
    }
    swiglu_forward(out.data(), scaled.data(), N, F);
    floatX *d_fc = upload_bf16(fc), *d_x = upload_bf16(x), *d_out = device_alloc_n<floatX>((size_t)N * F);
    poison(d_out, (size_t)N * F * sizeof(floatX));
    swiglu_forward_rownorm(d_out, d_fc, d_x, N, F, C, 1e-5f, 0);
    snprintf(name, sizeof(name), "swiglu_forward_rownorm N=%d F=%d C=%d", N, F, C);
    compare(name, download_bf16(d_out, (size_t)N * F), out, TOL_BF16);
    for (void *p : {(void *)d_fc, (void *)d_x, (void *)d_out}) cudaCheck(cudaFree(p));
}

int main(void) {
    harness_require_device("swiglu");
    harness_seed(5);
    check(1, 1); check(7, 13); check(3, 24); check(512, 1536);
    check_rownorm(1, 7, 33); check_rownorm(64, 1536, 576);
    {   // the decode step's kernel at 64 rows (SmolLM2), beside the plain one
        floatX *fc = upload_bf16(random_bf16_values(64 * 2 * 1536, 1.0f)), *x = upload_bf16(random_bf16_values(64 * 576, 1.0f));
        floatX *out = device_alloc_n<floatX>(64 * 1536);
        float plain = time_ms([&] { swiglu_forward(out, fc, 64, 1536, 0); });
        float rownorm = time_ms([&] { swiglu_forward_rownorm(out, fc, x, 64, 1536, 576, 1e-5f, 0); });
        printf("time swiglu decode N=64 F=1536: forward %.4f ms, with the rows' norm %.4f ms\n", plain, rownorm);
        for (void *p : {(void *)fc, (void *)x, (void *)out}) cudaCheck(cudaFree(p));
    }
    int N = 16 * 1024, F = 1536;
    size_t n = (size_t)N * F;
    floatX *fc = upload_bf16(random_bf16_values(2 * n, 1.0f)), *out = device_alloc_n<floatX>(n), *dfc = device_alloc_n<floatX>(2 * n);
    // bytes moved: forward reads gate and up and writes out (6n), backward also reads dout and
    // writes dgate and dup (10n)
    for (int k = 0; k < 2; k++) {
        float fwd = time_ms([&] { KERNELS[k].forward(out, fc, N, F, 0); });
        float bwd = time_ms([&] { KERNELS[k].backward(dfc, out, fc, N, F, 0); });
        printf("time swiglu %-6s N=%d F=%d: forward %.3f ms (%.0f GB/s), backward %.3f ms (%.0f GB/s)\n", KERNELS[k].name,
               N, F, fwd, 6.0 * n / fwd / 1e6, bwd, 10.0 * n / bwd / 1e6);
    }
    for (void *p : {(void *)fc, (void *)out, (void *)dfc}) cudaCheck(cudaFree(p));
    return harness_finish("swiglu");
}
