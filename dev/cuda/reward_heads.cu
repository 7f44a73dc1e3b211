/*
 * Harness for reward_heads.cu: the GPU reward heads against the CPU heads (llmc/reward_heads.c)
 * on fresh random inputs, for the linear head and the mlp head with GELU and ReLU: rewards,
 * parameter gradients and hidden-state gradients, then the Bradley-Terry loss and its gradient.
 * Prints one PASS/FAIL line per check and the time of each kernel; exits non-zero on a failure.
 *
 *   build/cuda/dev/reward_heads
 */
#include <cuda_runtime.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "reward_heads_cuda.h"
#include "llmc/rand.h"

#define check(call) do { cudaError_t e_ = (call); if (e_ != cudaSuccess) { \
    fprintf(stderr, "error: %s failed: %s\n", #call, cudaGetErrorString(e_)); exit(1); } } while (0)

static float *to_device(const float *h, size_t n) {
    float *d;
    check(cudaMalloc(&d, sizeof(float) * (n ? n : 1)));
    check(cudaMemcpy(d, h, sizeof(float) * n, cudaMemcpyHostToDevice));
    return d;
}
static void to_host(float *h, const float *d, size_t n) { check(cudaMemcpy(h, d, sizeof(float) * n, cudaMemcpyDeviceToHost)); }

// max |a - b| / max |b| over n values; PASS when below tol
static int compare(const char *what, const float *got, const float *want, size_t n, double tol) {
    double err = 0.0, ref = 1e-30;
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(got[i])) { err = INFINITY; break; }
        err = fmax(err, fabs((double)got[i] - want[i]));
        ref = fmax(ref, fabs((double)want[i]));
    }
    int ok = err / ref <= tol;
    printf("%-44s max err %.3e  rel %.3e  tol %.0e  %s\n", what, err, err / ref, tol, ok ? "PASS" : "FAIL");
    return ok;
}

static int run_case(RewardHeadKind kind, RewardHeadActivation act, int N, int C, int H) {
    RewardHeads heads;
    reward_heads_init(&heads, kind, act, C, H);
    reward_heads_init_random(&heads, 5);
    uint64_t rng = rng_seed(17);
    for (size_t i = 0; i < heads.num_parameters; i++) heads.params[i] += 0.1f * random_normal(&rng);
    float *hidden = (float *)malloc(sizeof(float) * N * C), *drew = (float *)malloc(sizeof(float) * N);
    int *dims = (int *)malloc(sizeof(int) * N);
    for (int i = 0; i < N * C; i++) hidden[i] = random_normal(&rng);
    for (int n = 0; n < N; n++) { dims[n] = (int)(random_u32(&rng) % MORA_NUM_DIMS); drew[n] = random_normal(&rng); }

    float *rew_cpu = (float *)malloc(sizeof(float) * N * MORA_NUM_DIMS), *rew_gpu = (float *)malloc(sizeof(float) * N * MORA_NUM_DIMS);
    float *dh_cpu = (float *)calloc((size_t)N * C, sizeof(float)), *dh_gpu = (float *)malloc(sizeof(float) * N * C);
    float *g_gpu = (float *)malloc(sizeof(float) * heads.num_parameters);
    reward_heads_forward(&heads, hidden, N, rew_cpu);
    reward_heads_zero_grad(&heads);
    reward_heads_backward(&heads, hidden, dims, drew, N, dh_cpu);

    float *d_params = to_device(heads.params, heads.num_parameters), *d_hidden = to_device(hidden, (size_t)N * C);
    float *d_drew = to_device(drew, N), *d_rew, *d_grads, *d_dh;
    int *d_dims;
    check(cudaMalloc(&d_dims, sizeof(int) * N));
    check(cudaMemcpy(d_dims, dims, sizeof(int) * N, cudaMemcpyHostToDevice));
    check(cudaMalloc(&d_rew, sizeof(float) * N * MORA_NUM_DIMS));
    check(cudaMemset(d_rew, 0xff, sizeof(float) * N * MORA_NUM_DIMS));  // NaN poison: unwritten outputs fail
    check(cudaMalloc(&d_grads, sizeof(float) * heads.num_parameters));
    check(cudaMemset(d_grads, 0, sizeof(float) * heads.num_parameters));
    check(cudaMalloc(&d_dh, sizeof(float) * N * C));
    check(cudaMemset(d_dh, 0, sizeof(float) * N * C));

    cudaEvent_t e0, e1, e2;
    check(cudaEventCreate(&e0)); check(cudaEventCreate(&e1)); check(cudaEventCreate(&e2));
    check(cudaEventRecord(e0));
    reward_heads_forward_cuda(&heads, d_params, d_hidden, N, d_rew);
    check(cudaEventRecord(e1));
    reward_heads_backward_cuda(&heads, d_params, d_hidden, d_dims, d_drew, N, d_grads, d_dh);
    check(cudaEventRecord(e2));
    check(cudaDeviceSynchronize());
    float ms_f, ms_b;
    check(cudaEventElapsedTime(&ms_f, e0, e1));
    check(cudaEventElapsedTime(&ms_b, e1, e2));
    to_host(rew_gpu, d_rew, (size_t)N * MORA_NUM_DIMS);
    to_host(g_gpu, d_grads, heads.num_parameters);
    to_host(dh_gpu, d_dh, (size_t)N * C);

    char name[96];
    const char *kn = kind == REWARD_HEAD_LINEAR ? "linear" : act == REWARD_ACT_GELU ? "mlp-gelu" : "mlp-relu";
    int ok = 1;
    snprintf(name, sizeof name, "%s N=%d C=%d H=%d rewards", kn, N, C, H);
    ok &= compare(name, rew_gpu, rew_cpu, (size_t)N * MORA_NUM_DIMS, 1e-4);
    snprintf(name, sizeof name, "%s parameter gradients", kn);
    ok &= compare(name, g_gpu, heads.grads, heads.num_parameters, 1e-4);
    snprintf(name, sizeof name, "%s hidden gradients", kn);
    ok &= compare(name, dh_gpu, dh_cpu, (size_t)N * C, 1e-4);
    printf("%-44s forward %.3f ms  backward %.3f ms\n", kn, ms_f, ms_b);

    cudaFree(d_params); cudaFree(d_hidden); cudaFree(d_drew); cudaFree(d_dims); cudaFree(d_rew); cudaFree(d_grads); cudaFree(d_dh);
    free(hidden); free(drew); free(dims); free(rew_cpu); free(rew_gpu); free(dh_cpu); free(dh_gpu); free(g_gpu);
    reward_heads_free(&heads);
    return ok;
}

static int run_bradley_terry(int N) {
    uint64_t rng = rng_seed(23);
    double *c = (double *)malloc(sizeof(double) * N), *r = (double *)malloc(sizeof(double) * N);
    double *dc = (double *)malloc(sizeof(double) * N), *dr = (double *)malloc(sizeof(double) * N);
    float *cf = (float *)malloc(sizeof(float) * N), *rf = (float *)malloc(sizeof(float) * N);
    for (int i = 0; i < N; i++) {
        cf[i] = 3.0f * random_normal(&rng); rf[i] = 3.0f * random_normal(&rng);
        if (i == 0) { cf[i] = 200.0f; rf[i] = -200.0f; }  // extreme margins stay finite
        if (i == 1) { cf[i] = -200.0f; rf[i] = 200.0f; }
        c[i] = cf[i]; r[i] = rf[i];
    }
    double loss = bradley_terry_loss(c, r, N, dc, dr);
    float *d_c = to_device(cf, N), *d_r = to_device(rf, N), *d_loss, *d_dc, *d_dr;
    check(cudaMalloc(&d_loss, sizeof(float)));
    check(cudaMalloc(&d_dc, sizeof(float) * N));
    check(cudaMalloc(&d_dr, sizeof(float) * N));
    bradley_terry_loss_cuda(d_c, d_r, N, d_loss, d_dc, d_dr);
    check(cudaDeviceSynchronize());
    float loss_gpu, *dcg = (float *)malloc(sizeof(float) * N), *drg = (float *)malloc(sizeof(float) * N);
    float *dcw = (float *)malloc(sizeof(float) * N), *drw = (float *)malloc(sizeof(float) * N);
    to_host(&loss_gpu, d_loss, 1); to_host(dcg, d_dc, N); to_host(drg, d_dr, N);
    for (int i = 0; i < N; i++) { dcw[i] = (float)dc[i]; drw[i] = (float)dr[i]; }
    float lw = (float)loss;
    int ok = compare("bradley-terry loss", &loss_gpu, &lw, 1, 1e-5);
    ok &= compare("bradley-terry d chosen", dcg, dcw, N, 1e-5);
    ok &= compare("bradley-terry d rejected", drg, drw, N, 1e-5);
    cudaFree(d_c); cudaFree(d_r); cudaFree(d_loss); cudaFree(d_dc); cudaFree(d_dr);
    free(c); free(r); free(dc); free(dr); free(cf); free(rf); free(dcg); free(drg); free(dcw); free(drw);
    return ok;
}

int main(void) {
    int ok = 1;
    ok &= run_case(REWARD_HEAD_LINEAR, REWARD_ACT_GELU, 37, 576, 0);
    ok &= run_case(REWARD_HEAD_MLP, REWARD_ACT_GELU, 37, 576, 64);
    ok &= run_case(REWARD_HEAD_MLP, REWARD_ACT_RELU, 5, 768, 33);
    ok &= run_case(REWARD_HEAD_LINEAR, REWARD_ACT_GELU, 1024, 768, 0);
    ok &= run_bradley_terry(1000);
    printf("reward heads: %s\n", ok ? "PASS" : "FAIL");
    return ok ? 0 : 1;
}
