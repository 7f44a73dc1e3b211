/*
 * Harness for swiglu.cuh: SwiGLU forward and backward against swiglu_forward / swiglu_backward
 * of ops_cpu.c on fresh random inputs, then timing at SmolLM2-135M's MLP shape (16 x 1024, F = 1536).
 *   build/cuda/dev/swiglu
 */
#include "harness.h"
#include "swiglu.cuh"

static void check(int N, int F) {
    char name[128];
    size_t n = (size_t)N * F;
    std::vector<float> fc = random_bf16_values(2 * n, 2.0f), dout = random_bf16_values(n, 1.0f);
    std::vector<float> out(n), dfc(2 * n, 0.0f);
    swiglu_forward(out.data(), fc.data(), N, F);
    swiglu_backward(dfc.data(), dout.data(), fc.data(), N, F);
    floatX *d_fc = upload_bf16(fc), *d_dout = upload_bf16(dout), *d_out = device_alloc_n<floatX>(n), *d_dfc = device_alloc_n<floatX>(2 * n);
    poison(d_out, n * sizeof(floatX)); poison(d_dfc, 2 * n * sizeof(floatX));
    swiglu_forward(d_out, d_fc, N, F, 0);
    swiglu_backward(d_dfc, d_dout, d_fc, N, F, 0);
    snprintf(name, sizeof(name), "swiglu_forward N=%d F=%d", N, F);
    compare(name, download_bf16(d_out, n), out, TOL_BF16);
    snprintf(name, sizeof(name), "swiglu_backward N=%d F=%d", N, F);
    compare(name, download_bf16(d_dfc, 2 * n), dfc, TOL_BF16);
    for (void *p : {(void *)d_fc, (void *)d_dout, (void *)d_out, (void *)d_dfc}) cudaCheck(cudaFree(p));
}

int main(void) {
    harness_require_device("swiglu");
    harness_seed(5);
    check(1, 1); check(7, 13); check(512, 1536);
    int N = 16 * 1024, F = 1536;
    size_t n = (size_t)N * F;
    floatX *fc = upload_bf16(random_bf16_values(2 * n, 1.0f)), *out = device_alloc_n<floatX>(n), *dfc = device_alloc_n<floatX>(2 * n);
    float fwd = time_ms([&] { swiglu_forward(out, fc, N, F, 0); });
    float bwd = time_ms([&] { swiglu_backward(dfc, out, fc, N, F, 0); });
    printf("time swiglu N=%d F=%d: forward %.3f ms (%.0f GB/s), backward %.3f ms (%.0f GB/s)\n", N, F, fwd, 6.0 * n / fwd / 1e6, bwd, 10.0 * n / bwd / 1e6);
    return harness_finish("swiglu");
}
