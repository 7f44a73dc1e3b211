/*
 * Harness for attention.cuh: the tiled causal attention (forward: output and log-sum-exp;
 * backward: dq, dk, dv) against attention_forward / attention_backward of ops_cpu.c, which keep
 * the full (T, T) probabilities, on fresh random inputs. Shapes cover multi-head (GPT-2) and
 * grouped-query (SmolLM2: 9 query heads on 3 key/value heads) attention, every supported head
 * size, T of 1, T not a multiple of the tiles, and T = 1024. Then timing at both benchmark
 * shapes (B = 16, T = 1024).
 *   build/cuda/dev/attention
 */
#include "harness.h"
#include "attention.cuh"

static void check(int B, int T, int NH, int NKV, int HS) {
    char name[160];
    int QKV = (NH + 2 * NKV) * HS;
    size_t n_qkv = (size_t)B * T * QKV, n_out = (size_t)B * T * NH * HS, n_att = (size_t)B * NH * T * T;
    std::vector<float> qkv = random_bf16_values(n_qkv, 1.0f), dout = random_bf16_values(n_out, 1.0f);
    std::vector<float> out(n_out), att(n_att), datt(n_att), dqkv(n_qkv, 0.0f);
    attention_forward(out.data(), att.data(), qkv.data(), B, T, NH, NKV, HS);
    attention_backward(dqkv.data(), datt.data(), dout.data(), qkv.data(), att.data(), B, T, NH, NKV, HS);
    // the reference log-sum-exp, in double from the reference's own scores
    std::vector<float> lse((size_t)B * NH * T);
    double scale = 1.0 / sqrt((double)HS);
    for (int b = 0; b < B; b++)
        for (int h = 0; h < NH; h++)
            for (int t = 0; t < T; t++) {
                const float *q = &qkv[((size_t)b * T + t) * QKV + (size_t)h * HS];
                double m = -INFINITY, s = 0.0;
                std::vector<double> scores(t + 1);
                for (int t2 = 0; t2 <= t; t2++) {
                    const float *k = &qkv[((size_t)b * T + t2) * QKV + (size_t)(NH + h / (NH / NKV)) * HS];
                    double dot = 0.0;
                    for (int i = 0; i < HS; i++) dot += (double)q[i] * k[i];
                    scores[t2] = dot * scale;
                    m = fmax(m, scores[t2]);
                }
                for (int t2 = 0; t2 <= t; t2++) s += exp(scores[t2] - m);
                lse[((size_t)b * NH + h) * T + t] = (float)(m + log(s));
            }

    floatX *d_qkv = upload_bf16(qkv), *d_dout = upload_bf16(dout), *d_out = device_alloc_n<floatX>(n_out), *d_dqkv = device_alloc_n<floatX>(n_qkv);
    float *d_lse = device_alloc_n<float>((size_t)B * NH * T), *d_D = device_alloc_n<float>((size_t)B * NH * T);
    poison(d_out, n_out * sizeof(floatX)); poison(d_lse, (size_t)B * NH * T * sizeof(float));
    poison(d_dqkv, n_qkv * sizeof(floatX)); poison(d_D, (size_t)B * NH * T * sizeof(float));
    attention_forward(d_out, d_lse, d_qkv, B, T, NH, NKV, HS, 0);
    snprintf(name, sizeof(name), "attention_forward B=%d T=%d NH=%d NKV=%d HS=%d out", B, T, NH, NKV, HS);
    compare(name, download_bf16(d_out, n_out), out, TOL_BF16);
    snprintf(name, sizeof(name), "attention_forward B=%d T=%d NH=%d NKV=%d HS=%d lse", B, T, NH, NKV, HS);
    compare(name, download_f32(d_lse, (size_t)B * NH * T), lse, TOL_F32);
    // the backward reads the GPU's own out (as in the model); its rounding is part of the error
    attention_backward(d_dqkv, d_D, d_dout, d_qkv, d_out, d_lse, B, T, NH, NKV, HS, 0);
    std::vector<float> got = download_bf16(d_dqkv, n_qkv);
    // compare q, k and v parts separately so a failure says which
    const char *parts[3] = {"dq", "dk", "dv"};
    int part_start[3] = {0, NH * HS, (NH + NKV) * HS}, part_end[3] = {NH * HS, (NH + NKV) * HS, QKV};
    for (int p = 0; p < 3; p++) {
        std::vector<float> g, r;
        for (size_t row = 0; row < (size_t)B * T; row++)
            for (int c = part_start[p]; c < part_end[p]; c++) { g.push_back(got[row * QKV + c]); r.push_back(dqkv[row * QKV + c]); }
        snprintf(name, sizeof(name), "attention_backward B=%d T=%d NH=%d NKV=%d HS=%d %s", B, T, NH, NKV, HS, parts[p]);
        compare(name, g, r, TOL_BF16);
    }
    for (void *p : {(void *)d_qkv, (void *)d_dout, (void *)d_out, (void *)d_dqkv, (void *)d_lse, (void *)d_D}) cudaCheck(cudaFree(p));
}

static void timing(const char *label, int B, int T, int NH, int NKV, int HS) {
    int QKV = (NH + 2 * NKV) * HS;
    size_t n_qkv = (size_t)B * T * QKV, n_out = (size_t)B * T * NH * HS;
    floatX *qkv = upload_bf16(random_bf16_values(n_qkv, 1.0f)), *dout = upload_bf16(random_bf16_values(n_out, 1.0f));
    floatX *out = device_alloc_n<floatX>(n_out), *dqkv = device_alloc_n<floatX>(n_qkv);
    float *lse = device_alloc_n<float>((size_t)B * NH * T), *D = device_alloc_n<float>((size_t)B * NH * T);
    float fwd = time_ms([&] { attention_forward(out, lse, qkv, B, T, NH, NKV, HS, 0); }, 2, 5);
    float bwd = time_ms([&] { attention_backward(dqkv, D, dout, qkv, out, lse, B, T, NH, NKV, HS, 0); }, 2, 5);
    // causal FLOPs actually needed: 2 products of T*T/2 * HS multiply-adds forward, 5 backward
    double fwd_flops = 4.0 * B * NH * (double)T * T / 2 * HS, bwd_flops = 2.5 * fwd_flops;
    printf("time attention %s B=%d T=%d NH=%d NKV=%d HS=%d: forward %.3f ms (%.1f TFLOP/s), backward %.3f ms (%.1f TFLOP/s)\n",
           label, B, T, NH, NKV, HS, fwd, fwd_flops / fwd / 1e9, bwd, bwd_flops / bwd / 1e9);
    for (void *p : {(void *)qkv, (void *)dout, (void *)out, (void *)dqkv, (void *)lse, (void *)D}) cudaCheck(cudaFree(p));
}

int main(void) {
    harness_require_device("attention");
    harness_seed(6);
    check(1, 1, 1, 1, 16);
    check(2, 37, 4, 4, 16);
    check(2, 70, 4, 2, 32);
    check(1, 129, 12, 12, 64);
    check(2, 100, 9, 3, 64);
    check(1, 65, 8, 2, 128);
    check(1, 1024, 2, 1, 64);
    timing("gpt2-124M", 16, 1024, 12, 12, 64);
    timing("smollm2-135M", 16, 1024, 9, 3, 64);
    return harness_finish("attention");
}
