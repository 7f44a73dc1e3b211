/*
 * Shared pieces of the dev/cuda harnesses: random inputs, host <-> device copies in bf16 and
 * fp32, the comparison against the CPU reference (relative L2 error, max abs error, NaN check;
 * one PASS/FAIL line each), and event timing (median of repeated runs after a warm-up).
 *
 * Every harness gives the CPU reference the bf16-rounded values of the GPU's inputs, so the
 * error measures the kernel (fp32 accumulation, bf16 rounding of its outputs), not the rounding
 * of the inputs. Outputs are poisoned with NaN before every GPU run, so an element a kernel
 * leaves unwritten fails the NaN check. A harness exits 1 when any check failed.
 */
#ifndef DEV_CUDA_HARNESS_H
#define DEV_CUDA_HARNESS_H
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <algorithm>
#include <vector>
extern "C" {
#include "utils.h"
#include "rand.h"
#include "ops_cpu.h"
#include "matmul.h"
}
#include "cuda_common.h"

static int harness_failures = 0;
static uint64_t harness_rng = 0;

// Relative L2 error tolerances: outputs stored in bf16 are rounded to 8 bits of mantissa
// (relative 2^-9 per element), fp32 outputs of bf16 products carry the products' rounding.
#define TOL_BF16 1e-2
#define TOL_F32 2e-3

static inline void harness_seed(uint64_t seed) { harness_rng = rng_seed(seed); }

// n values ~ N(0, scale^2), rounded to bf16 so that CPU and GPU see the same numbers.
static inline std::vector<float> random_bf16_values(size_t n, float scale) {
    std::vector<float> x(n);
    for (size_t i = 0; i < n; i++) x[i] = __bfloat162float(__float2bfloat16(scale * random_normal(&harness_rng)));
    return x;
}
static inline std::vector<float> random_f32_values(size_t n, float scale) {
    std::vector<float> x(n);
    for (size_t i = 0; i < n; i++) x[i] = scale * random_normal(&harness_rng);
    return x;
}
static inline std::vector<int> random_tokens(size_t n, int vocab) {
    std::vector<int> x(n);
    for (size_t i = 0; i < n; i++) x[i] = (int)(random_u32(&harness_rng) % (uint32_t)vocab);
    return x;
}

template <typename T> static inline T *device_alloc_n(size_t n) { return (T *)cudaMallocCheck(n * sizeof(T)); }
static inline floatX *upload_bf16(const std::vector<float> &x) {
    std::vector<floatX> h(x.size());
    for (size_t i = 0; i < x.size(); i++) h[i] = __float2bfloat16(x[i]);
    floatX *d = device_alloc_n<floatX>(x.size());
    cudaCheck(cudaMemcpy(d, h.data(), x.size() * sizeof(floatX), cudaMemcpyHostToDevice));
    return d;
}
template <typename T> static inline T *upload(const std::vector<T> &x) {
    T *d = device_alloc_n<T>(x.size());
    cudaCheck(cudaMemcpy(d, x.data(), x.size() * sizeof(T), cudaMemcpyHostToDevice));
    return d;
}
static inline std::vector<float> download_bf16(const floatX *d, size_t n) {
    std::vector<floatX> h(n);
    cudaCheck(cudaDeviceSynchronize());
    cudaCheck(cudaMemcpy(h.data(), d, n * sizeof(floatX), cudaMemcpyDeviceToHost));
    std::vector<float> x(n);
    for (size_t i = 0; i < n; i++) x[i] = __bfloat162float(h[i]);
    return x;
}
static inline std::vector<float> download_f32(const float *d, size_t n) {
    std::vector<float> x(n);
    cudaCheck(cudaDeviceSynchronize());
    cudaCheck(cudaMemcpy(x.data(), d, n * sizeof(float), cudaMemcpyDeviceToHost));
    return x;
}
// NaN in every element (all bits set is NaN in fp32 and bf16)
static inline void poison(void *d, size_t bytes) { cudaCheck(cudaMemset(d, 0xff, bytes)); }

// Compares gpu against ref: relative L2 error ||gpu - ref|| / ||ref|| <= tol and no NaN/inf.
// Prints one line: PASS/FAIL, the name, the error, the tolerance, the max abs error and where.
static inline void compare(const char *name, const float *gpu, const float *ref, size_t n, double tol) {
    double diff2 = 0.0, ref2 = 0.0, max_abs = 0.0;
    size_t max_at = 0, bad = 0, first_bad = 0;
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(gpu[i])) { if (bad++ == 0) first_bad = i; continue; }
        double d = (double)gpu[i] - ref[i];
        diff2 += d * d;
        ref2 += (double)ref[i] * ref[i];
        if (fabs(d) > max_abs) { max_abs = fabs(d); max_at = i; }
    }
    double rel = ref2 > 0.0 ? sqrt(diff2 / ref2) : sqrt(diff2);
    int ok = bad == 0 && rel <= tol;
    if (!ok) harness_failures++;
    if (bad)
        printf("FAIL %-44s %zu of %zu elements not finite (first at %zu): unwritten or overflowed\n", name, bad, n, first_bad);
    else
        printf("%s %-44s rel err %.2e (tol %.0e)  max abs err %.2e at %zu (gpu %.5g ref %.5g)\n", ok ? "PASS" : "FAIL", name,
               rel, tol, max_abs, max_at, n ? gpu[max_at] : 0.0, n ? ref[max_at] : 0.0);
}
static inline void compare(const char *name, const std::vector<float> &gpu, const std::vector<float> &ref, double tol) {
    if (gpu.size() != ref.size()) {
        printf("FAIL %-44s size %zu vs reference %zu\n", name, gpu.size(), ref.size());
        harness_failures++;
        return;
    }
    compare(name, gpu.data(), ref.data(), gpu.size(), tol);
}

// Checks that two GPU results are the same bit for bit (two kernels that compute each element
// with the same expressions); one PASS/FAIL line with the count of differing elements.
static inline void compare_bits(const char *name, const std::vector<float> &a, const std::vector<float> &b) {
    size_t differ = 0, first = 0;
    for (size_t i = 0; i < a.size() && i < b.size(); i++)
        if (memcmp(&a[i], &b[i], sizeof(float)) != 0 && differ++ == 0) first = i;
    int ok = a.size() == b.size() && differ == 0;
    if (!ok) harness_failures++;
    if (a.size() != b.size())
        printf("FAIL %-44s size %zu vs %zu\n", name, a.size(), b.size());
    else if (differ)
        printf("FAIL %-44s %zu of %zu elements differ (first at %zu: %.8g vs %.8g)\n", name, differ, a.size(), first,
               a[first], b[first]);
    else
        printf("PASS %-44s bit for bit over %zu elements\n", name, a.size());
}

// Median milliseconds of `reps` runs of fn after `warmup` runs, timed with CUDA events.
template <typename F>
static inline float time_ms(F fn, int warmup = 3, int reps = 20) {
    for (int i = 0; i < warmup; i++) fn();
    cudaCheck(cudaDeviceSynchronize());
    cudaEvent_t start, stop;
    cudaCheck(cudaEventCreate(&start));
    cudaCheck(cudaEventCreate(&stop));
    std::vector<float> times(reps);
    for (int i = 0; i < reps; i++) {
        cudaCheck(cudaEventRecord(start));
        fn();
        cudaCheck(cudaEventRecord(stop));
        cudaCheck(cudaEventSynchronize(stop));
        cudaCheck(cudaEventElapsedTime(&times[i], start, stop));
    }
    cudaCheck(cudaEventDestroy(start));
    cudaCheck(cudaEventDestroy(stop));
    std::sort(times.begin(), times.end());
    return times[reps / 2];
}

// Exits 0 when a device is there, else prints why and exits 1 (the harness cannot check anything).
static inline void harness_require_device(const char *name) {
    // a line at a time, so a harness stopped by gpu_check's time limit shows how far it got
    setvbuf(stdout, NULL, _IOLBF, 0);
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
        printf("FAIL %s: no CUDA device\n", name);
        exit(1);
    }
    cudaDeviceProp prop;
    cudaCheck(cudaGetDeviceProperties(&prop, 0));
    printf("== %s on %s\n", name, prop.name);
}
static inline int harness_finish(const char *name) {
    printf("== %s: %s (%d failed checks)\n", name, harness_failures ? "FAIL" : "PASS", harness_failures);
    return harness_failures ? 1 : 0;
}
#endif
