/*
 * Harness for gelu.cuh: GELU forward and backward against gelu_forward / gelu_backward of
 * ops_cpu.c on fresh random inputs (including large |x| where tanh saturates), then timing at
 * GPT-2 124M's MLP shape (16 x 1024 x 3072).
 *   build/cuda/dev/gelu
 */
#include "harness.h"
#include "gelu.cuh"

static void check(size_t n) {
    char name[128];
    std::vector<float> x = random_bf16_values(n, 3.0f), dout = random_bf16_values(n, 1.0f);
    x[0] = 20.0f; x[n - 1] = -20.0f;
    std::vector<float> out(n), dinp(n, 0.0f);
    gelu_forward(out.data(), x.data(), n);
    gelu_backward(dinp.data(), x.data(), dout.data(), n);
    floatX *d_x = upload_bf16(x), *d_dout = upload_bf16(dout), *d_out = device_alloc_n<floatX>(n), *d_dinp = device_alloc_n<floatX>(n);
    poison(d_out, n * sizeof(floatX)); poison(d_dinp, n * sizeof(floatX));
    gelu_forward(d_out, d_x, n, 0);
    gelu_backward(d_dinp, d_x, d_dout, n, 0);
    snprintf(name, sizeof(name), "gelu_forward n=%zu", n);
    compare(name, download_bf16(d_out, n), out, TOL_BF16);
    snprintf(name, sizeof(name), "gelu_backward n=%zu", n);
    compare(name, download_bf16(d_dinp, n), dinp, TOL_BF16);
    for (void *p : {(void *)d_x, (void *)d_dout, (void *)d_out, (void *)d_dinp}) cudaCheck(cudaFree(p));
}

int main(void) {
    harness_require_device("gelu");
    harness_seed(4);
    check(1); check(1000); check(1 << 20);
    size_t n = (size_t)16 * 1024 * 3072;
    floatX *x = upload_bf16(random_bf16_values(n, 1.0f)), *y = device_alloc_n<floatX>(n), *g = upload_bf16(random_bf16_values(n, 1.0f));
    float fwd = time_ms([&] { gelu_forward(y, x, n, 0); });
    float bwd = time_ms([&] { gelu_backward(y, x, g, n, 0); });
    printf("time gelu n=%zu: forward %.3f ms (%.0f GB/s), backward %.3f ms (%.0f GB/s)\n", n, fwd, 4.0 * n / fwd / 1e6, bwd, 6.0 * n / bwd / 1e6);
    return harness_finish("gelu");
}
