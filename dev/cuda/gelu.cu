/*
 * Harness for gelu.cuh: GELU forward and backward against gelu_forward / gelu_backward of
 * ops_cpu.c on fresh random inputs (including large |x| where tanh saturates), for the scalar
 * kernels, the 8-wide ones (n a multiple of 8) and the pick between them, with the 8-wide
 * results also checked bit for bit against the scalar ones and the backward also run in place
 * (dinp aliasing dout, as the model calls it); then timing of both at GPT-2 124M's MLP shape
 * (16 x 1024 x 3072).
 *   build/cuda/dev/gelu
 */
#include "harness.h"
#include "gelu.cuh"

typedef void (*GeluForward)(floatX *, const floatX *, size_t, cudaStream_t);
typedef void (*GeluBackward)(floatX *, const floatX *, const floatX *, size_t, cudaStream_t);
static const struct { const char *name; GeluForward forward; GeluBackward backward; } KERNELS[] = {
    {"scalar", gelu_forward_scalar, gelu_backward_scalar},
    {"vec8", gelu_forward_vec8, gelu_backward_vec8},
    {"picked", gelu_forward, gelu_backward},
};

static void check(size_t n) {
    char name[128];
    std::vector<float> x = random_bf16_values(n, 3.0f), dout = random_bf16_values(n, 1.0f);
    x[0] = 20.0f; x[n - 1] = -20.0f;
    std::vector<float> out(n), dinp(n, 0.0f);
    gelu_forward(out.data(), x.data(), n);
    gelu_backward(dinp.data(), x.data(), dout.data(), n);
    floatX *d_x = upload_bf16(x), *d_dout = upload_bf16(dout), *d_out = device_alloc_n<floatX>(n), *d_dinp = device_alloc_n<floatX>(n);
    std::vector<float> scalar_out, scalar_dinp;
    for (const auto &k : KERNELS) {
        if (k.forward == gelu_forward_vec8 && !gelu_vectorized(d_dinp, d_x, d_dout, n)) continue;
        poison(d_out, n * sizeof(floatX)); poison(d_dinp, n * sizeof(floatX));
        k.forward(d_out, d_x, n, 0);
        k.backward(d_dinp, d_x, d_dout, n, 0);
        std::vector<float> got_out = download_bf16(d_out, n), got_dinp = download_bf16(d_dinp, n);
        snprintf(name, sizeof(name), "gelu_forward %s n=%zu", k.name, n);
        compare(name, got_out, out, TOL_BF16);
        snprintf(name, sizeof(name), "gelu_backward %s n=%zu", k.name, n);
        compare(name, got_dinp, dinp, TOL_BF16);
        // in place: dinp aliasing dout gives the same result
        cudaCheck(cudaMemcpy(d_dinp, d_dout, n * sizeof(floatX), cudaMemcpyDeviceToDevice));
        k.backward(d_dinp, d_x, d_dinp, n, 0);
        snprintf(name, sizeof(name), "gelu_backward %s in place n=%zu", k.name, n);
        compare_bits(name, download_bf16(d_dinp, n), got_dinp);
        if (k.forward == gelu_forward_scalar) {
            scalar_out = got_out;
            scalar_dinp = got_dinp;
        } else {
            snprintf(name, sizeof(name), "gelu_forward %s = scalar n=%zu", k.name, n);
            compare_bits(name, got_out, scalar_out);
            snprintf(name, sizeof(name), "gelu_backward %s = scalar n=%zu", k.name, n);
            compare_bits(name, got_dinp, scalar_dinp);
        }
    }
    for (void *p : {(void *)d_x, (void *)d_dout, (void *)d_out, (void *)d_dinp}) cudaCheck(cudaFree(p));
}

int main(void) {
    harness_require_device("gelu");
    harness_seed(4);
    check(1); check(1000); check(1003); check(1 << 20);
    size_t n = (size_t)16 * 1024 * 3072;
    floatX *x = upload_bf16(random_bf16_values(n, 1.0f)), *y = device_alloc_n<floatX>(n), *g = upload_bf16(random_bf16_values(n, 1.0f));
    // bytes moved: forward reads inp and writes out (4n), backward also reads dout (6n)
    for (int k = 0; k < 2; k++) {
        float fwd = time_ms([&] { KERNELS[k].forward(y, x, n, 0); });
        float bwd = time_ms([&] { KERNELS[k].backward(y, x, g, n, 0); });
        printf("time gelu %-6s n=%zu: forward %.3f ms (%.0f GB/s), backward %.3f ms (%.0f GB/s)\n", KERNELS[k].name, n,
               fwd, 4.0 * n / fwd / 1e6, bwd, 6.0 * n / bwd / 1e6);
    }
    for (void *p : {(void *)x, (void *)y, (void *)g}) cudaCheck(cudaFree(p));
    return harness_finish("gelu");
}
