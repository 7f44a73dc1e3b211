/*
 * Harness for adamw.cuh: three AdamW steps on fp32 master weights against the update written out
 * in double on the host (the formula of model_adamw_update in model.c), with and without weight
 * decay and gradient scaling; checks the fp32 parameters, both moments and the bf16 copy; the
 * 4-wide kernel against the scalar one bit for bit (sizes not a multiple of four included), and
 * the times of both at GPT-2's size.
 *   build/cuda/dev/adamw
 */
#include "harness.h"
#include "adamw.cuh"

static void check(size_t n, float weight_decay, float grad_scale) {
    char name[160];
    float lr = 1e-3f, beta1 = 0.9f, beta2 = 0.95f, eps = 1e-8f;
    std::vector<float> p = random_f32_values(n, 1.0f), m(n, 0.0f), v(n, 0.0f);
    std::vector<double> p_ref(p.begin(), p.end()), m_ref(n, 0.0), v_ref(n, 0.0);
    float *d_p = upload(p), *d_m = upload(m), *d_v = upload(v), *d_g = device_alloc_n<float>(n);
    floatX *d_pb = device_alloc_n<floatX>(n);
    for (int step = 1; step <= 3; step++) {
        std::vector<float> g = random_f32_values(n, 0.1f);
        cudaCheck(cudaMemcpy(d_g, g.data(), n * sizeof(float), cudaMemcpyHostToDevice));
        double bc1 = 1.0 - pow(beta1, step), bc2 = 1.0 - pow(beta2, step);
        for (size_t i = 0; i < n; i++) {
            double gi = (double)g[i] * grad_scale;
            m_ref[i] = beta1 * m_ref[i] + (1.0 - beta1) * gi;
            v_ref[i] = beta2 * v_ref[i] + (1.0 - beta2) * gi * gi;
            p_ref[i] = p_ref[i] * (1.0 - (double)lr * weight_decay) - lr * (m_ref[i] / bc1) / (sqrt(v_ref[i] / bc2) + eps);
        }
        poison(d_pb, n * sizeof(floatX));
        adamw_update(d_p, d_pb, d_g, d_m, d_v, n, lr, beta1, beta2, (float)bc1, (float)bc2, eps, 1.0f - lr * weight_decay, grad_scale, 0);
    }
    std::vector<float> pr(p_ref.begin(), p_ref.end()), mr(m_ref.begin(), m_ref.end()), vr(v_ref.begin(), v_ref.end());
    snprintf(name, sizeof(name), "adamw n=%zu wd=%g scale=%g params", n, weight_decay, grad_scale);
    compare(name, download_f32(d_p, n), pr, 1e-6);
    snprintf(name, sizeof(name), "adamw n=%zu wd=%g scale=%g m", n, weight_decay, grad_scale);
    compare(name, download_f32(d_m, n), mr, 1e-5);
    snprintf(name, sizeof(name), "adamw n=%zu wd=%g scale=%g v", n, weight_decay, grad_scale);
    compare(name, download_f32(d_v, n), vr, 1e-5);
    snprintf(name, sizeof(name), "adamw n=%zu wd=%g scale=%g bf16 copy", n, weight_decay, grad_scale);
    compare(name, download_bf16(d_pb, n), pr, TOL_BF16);
    for (void *q : {(void *)d_p, (void *)d_m, (void *)d_v, (void *)d_g, (void *)d_pb}) cudaCheck(cudaFree(q));
}

// the 4-wide kernel (with the scalar one on the last n % 4) against the scalar kernel alone, two
// steps from the same state: parameters, moments and the bf16 copy bit for bit
static void check_vec4(size_t n) {
    char name[160];
    std::vector<float> p = random_f32_values(n, 1.0f), m = random_f32_values(n, 0.01f), v(n);
    std::vector<float> g1 = random_f32_values(n, 0.1f), g2 = random_f32_values(n, 0.1f);
    for (size_t i = 0; i < n; i++) v[i] = m[i] * m[i] + 1e-6f;
    std::vector<float> out[2][4];
    for (int vec = 0; vec < 2; vec++) {
        float *d_p = upload(p), *d_m = upload(m), *d_v = upload(v), *d_g1 = upload(g1), *d_g2 = upload(g2);
        floatX *d_pb = device_alloc_n<floatX>(n);
        poison(d_pb, n * sizeof(floatX));
        auto run = vec ? adamw_update_vec4 : adamw_update_scalar;
        run(d_p, d_pb, d_g1, d_m, d_v, n, 1e-3f, 0.9f, 0.95f, 0.1f, 0.05f, 1e-8f, 0.9999f, 0.5f, 0);
        run(d_p, d_pb, d_g2, d_m, d_v, n, 1e-3f, 0.9f, 0.95f, 0.19f, 0.0975f, 1e-8f, 0.9999f, 0.5f, 0);
        out[vec][0] = download_f32(d_p, n);
        out[vec][1] = download_f32(d_m, n);
        out[vec][2] = download_f32(d_v, n);
        out[vec][3] = download_bf16(d_pb, n);
        for (void *q : {(void *)d_p, (void *)d_m, (void *)d_v, (void *)d_g1, (void *)d_g2, (void *)d_pb}) cudaCheck(cudaFree(q));
    }
    const char *what[4] = {"params", "m", "v", "bf16 copy"};
    for (int k = 0; k < 4; k++) {
        snprintf(name, sizeof(name), "adamw 4-wide n=%zu %s", n, what[k]);
        compare_bits(name, out[1][k], out[0][k]);
    }
}

int main(void) {
    harness_require_device("adamw");
    harness_seed(8);
    check(1, 0.0f, 1.0f);
    check(1000, 0.1f, 1.0f);
    check(3 << 20, 0.1f, 0.25f);
    check_vec4(3);
    check_vec4(1001);
    check_vec4((3 << 20) + 2);
    size_t n = 124475904;   // GPT-2 124M's parameters
    float *p = upload(random_f32_values(n, 1.0f)), *g = upload(random_f32_values(n, 1.0f));
    float *m = upload(std::vector<float>(n, 0.0f)), *v = upload(std::vector<float>(n, 0.0f));
    floatX *pb = device_alloc_n<floatX>(n);
    // bytes an element: params, m, v read and written (24), the gradient read (4), the bf16 copy written (2)
    for (int vec = 0; vec < 2; vec++) {
        auto run = vec ? adamw_update_vec4 : adamw_update_scalar;
        float ms = time_ms([&] { run(p, pb, g, m, v, n, 1e-4f, 0.9f, 0.95f, 0.5f, 0.5f, 1e-8f, 1.0f, 1.0f, 0); }, 2, 10);
        printf("time adamw %-7s n=%zu: %.3f ms (%.0f GB/s)\n", vec ? "4-wide" : "scalar", n, ms, 30.0 * n / ms / 1e6);
    }
    return harness_finish("adamw");
}
