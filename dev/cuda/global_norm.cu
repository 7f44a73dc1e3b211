/*
 * Harness for global_norm.cuh: the L2 norm of a gradient buffer against a double-precision sum
 * on the host, for sizes smaller than one block, not a multiple of anything, and GPT-2 124M's
 * parameter count; checks that two runs give the same bits (the reduction order is fixed).
 *   build/cuda/dev/global_norm
 */
#include "harness.h"
#include "global_norm.cuh"

static void check(size_t n) {
    char name[128];
    std::vector<float> g = random_f32_values(n, 0.01f);
    double sum = 0.0;
    for (size_t i = 0; i < n; i++) sum += (double)g[i] * g[i];
    float ref = (float)sqrt(sum);
    float *d_g = upload(g), *d_partial = device_alloc_n<float>(GLOBAL_NORM_BLOCKS), *d_out = device_alloc_n<float>(1);
    poison(d_out, sizeof(float));
    global_norm(d_out, d_partial, d_g, n, 0);
    float first = download_f32(d_out, 1)[0];
    global_norm(d_out, d_partial, d_g, n, 0);
    float second = download_f32(d_out, 1)[0];
    snprintf(name, sizeof(name), "global_norm n=%zu", n);
    compare(name, &first, &ref, 1, 1e-5);
    int same = memcmp(&first, &second, sizeof(float)) == 0;
    if (!same) harness_failures++;
    printf("%s global_norm n=%zu repeated run gives the same bits (%.9g vs %.9g)\n", same ? "PASS" : "FAIL", n, first, second);
    for (void *p : {(void *)d_g, (void *)d_partial, (void *)d_out}) cudaCheck(cudaFree(p));
}

int main(void) {
    harness_require_device("global_norm");
    harness_seed(9);
    check(1); check(777); check(1000003); check(124475904);
    size_t n = 124475904;
    float *g = upload(random_f32_values(n, 1.0f)), *partial = device_alloc_n<float>(GLOBAL_NORM_BLOCKS), *out = device_alloc_n<float>(1);
    float ms = time_ms([&] { global_norm(out, partial, g, n, 0); });
    printf("time global_norm n=%zu: %.3f ms (%.0f GB/s)\n", n, ms, 4.0 * n / ms / 1e6);
    return harness_finish("global_norm");
}
