/*
 * Harness for matmul.cuh: the cuBLASLt products of the model against matmul_forward /
 * matmul_backward of matmul.c (and gelu_forward of ops_cpu.c for the fused epilogue) on fresh
 * random bf16 inputs: forward with and without bias, forward with the GELU epilogue (both its
 * output and the saved pre-activation) against the reference variant (product, then the gelu.cuh
 * kernel), and the backward (dinp in fp32 and bf16, dweight accumulated into existing values,
 * dbias from bf16 and from fp32), and the input gradient with the GELU backward in the epilogue
 * (DGELU) against matmul_backward + gelu_backward of the CPU. Shapes include odd sizes (unaligned
 * rows). Then timing of the model's products at GPT-2 124M's shapes, fused GELU (forward and
 * backward) against product + separate kernel, and of the decode step's products (64 and 256
 * rows) under every algorithm cuBLASLt's heuristic offers and, up to 64 rows, as decode_matmul.
 * decode_matmul (decode_matmul.cuh) is also checked against the CPU, with and without bias and GELU,
 * and decode_matmul_swiglu bit for bit against swiglu_forward then decode_matmul (both timed).
 * The algorithm tuning (matmul_tune) is checked bit for bit against cuBLASLt's first choices at
 * the training shapes of both models, and its choices and times printed. The projection with the
 * residual add in its epilogue (matmul_forward_add: out = res + inp W^T + bias, one rounding) is
 * checked against the CPU, tuned bit for bit, and timed against the product and a separate add.
 *   build/cuda/dev/matmul
 */
#include "harness.h"
#include "matmul.cuh"
#include "decode_matmul.cuh"
#include "gelu.cuh"
#include "swiglu.cuh"

static void check(int M, int IC, int OC, int with_bias) {
    char name[160];
    std::vector<float> inp = random_bf16_values((size_t)M * IC, 1.0f), w = random_bf16_values((size_t)OC * IC, 0.05f);
    std::vector<float> bias = random_bf16_values(OC, 0.5f), dout = random_bf16_values((size_t)M * OC, 1.0f);
    std::vector<float> out((size_t)M * OC), act((size_t)M * OC);
    matmul_forward(out.data(), inp.data(), w.data(), with_bias ? bias.data() : NULL, M, IC, OC);
    gelu_forward(act.data(), out.data(), out.size());
    std::vector<float> dinp((size_t)M * IC, 0.0f), dw0 = random_f32_values((size_t)OC * IC, 0.1f), dw = dw0, db(OC, 0.0f);
    matmul_backward(dinp.data(), dw.data(), db.data(), dout.data(), inp.data(), w.data(), M, IC, OC);

    floatX *d_inp = upload_bf16(inp), *d_w = upload_bf16(w), *d_bias = upload_bf16(bias), *d_dout = upload_bf16(dout);
    floatX *d_out = device_alloc_n<floatX>((size_t)M * OC), *d_pre = device_alloc_n<floatX>((size_t)M * OC);
    poison(d_out, (size_t)M * OC * sizeof(floatX));
    matmul_forward(d_out, d_inp, d_w, with_bias ? d_bias : NULL, NULL, M, IC, OC, 0);
    snprintf(name, sizeof(name), "matmul_forward M=%d IC=%d OC=%d bias=%d", M, IC, OC, with_bias);
    compare(name, download_bf16(d_out, (size_t)M * OC), out, TOL_BF16);
    if (OC % 8 == 0) {
        poison(d_out, (size_t)M * OC * sizeof(floatX)); poison(d_pre, (size_t)M * OC * sizeof(floatX));
        matmul_forward(d_out, d_inp, d_w, with_bias ? d_bias : NULL, d_pre, M, IC, OC, 0);
        snprintf(name, sizeof(name), "matmul_forward+gelu epilogue M=%d IC=%d OC=%d out", M, IC, OC);
        compare(name, download_bf16(d_out, (size_t)M * OC), act, TOL_BF16);
        snprintf(name, sizeof(name), "matmul_forward+gelu epilogue M=%d IC=%d OC=%d pre", M, IC, OC);
        compare(name, download_bf16(d_pre, (size_t)M * OC), out, TOL_BF16);
    }
    float *d_dinp = device_alloc_n<float>((size_t)M * IC), *d_dw = upload(dw0), *d_db = upload(std::vector<float>(OC, 0.0f));
    float *d_dout_f32 = upload(dout), *d_db2 = upload(std::vector<float>(OC, 0.0f));
    floatX *d_dinp_bf16 = device_alloc_n<floatX>((size_t)M * IC);
    float *scratch = device_alloc_n<float>((size_t)column_chunks(M) * OC);
    poison(d_dinp, (size_t)M * IC * sizeof(float)); poison(d_dinp_bf16, (size_t)M * IC * sizeof(floatX));
    matmul_backward(d_dinp, 1, d_dw, d_db, d_dout, NULL, d_inp, d_w, scratch, M, IC, OC, 0);
    matmul_backward(d_dinp_bf16, 0, NULL, d_db2, d_dout, d_dout_f32, d_inp, d_w, scratch, M, IC, OC, 0);
    snprintf(name, sizeof(name), "matmul_backward M=%d IC=%d OC=%d dinp fp32", M, IC, OC);
    compare(name, download_f32(d_dinp, (size_t)M * IC), dinp, TOL_F32);
    snprintf(name, sizeof(name), "matmul_backward M=%d IC=%d OC=%d dinp bf16", M, IC, OC);
    compare(name, download_bf16(d_dinp_bf16, (size_t)M * IC), dinp, TOL_BF16);
    snprintf(name, sizeof(name), "matmul_backward M=%d IC=%d OC=%d dweight (+=)", M, IC, OC);
    compare(name, download_f32(d_dw, (size_t)OC * IC), dw, TOL_F32);
    snprintf(name, sizeof(name), "matmul_backward M=%d IC=%d OC=%d dbias (bf16 dout)", M, IC, OC);
    compare(name, download_f32(d_db, OC), db, TOL_F32);
    snprintf(name, sizeof(name), "matmul_backward M=%d IC=%d OC=%d dbias (fp32 dout)", M, IC, OC);
    compare(name, download_f32(d_db2, OC), db, TOL_F32);
    if (IC % 8 == 0) {
        // the input is gelu(pre): dpre = (dout @ W) * gelu'(pre), pre a bf16 (M, IC)
        std::vector<float> pre = random_bf16_values((size_t)M * IC, 1.5f), dpre((size_t)M * IC);
        gelu_backward(dpre.data(), pre.data(), dinp.data(), dpre.size());
        floatX *d_pre_in = upload_bf16(pre), *d_dpre = device_alloc_n<floatX>((size_t)M * IC);
        poison(d_dpre, (size_t)M * IC * sizeof(floatX));
        snprintf(name, sizeof(name), "matmul_backward_dgelu M=%d IC=%d OC=%d dpre", M, IC, OC);
        if (matmul_backward_dgelu(d_dpre, d_dout, d_w, d_pre_in, M, IC, OC, 0)) compare(name, download_bf16(d_dpre, (size_t)M * IC), dpre, TOL_BF16);
        else printf("SKIP %s: cuBLASLt offers no DGELU algorithm (the model runs the product and gelu_backward)\n", name);
        cudaCheck(cudaFree(d_pre_in));
        cudaCheck(cudaFree(d_dpre));
    }
    {   // the residual add in the epilogue: out = res + inp W^T (+ bias), res a bf16 stream
        std::vector<float> res = random_bf16_values((size_t)M * OC, 2.0f), sum((size_t)M * OC);
        for (size_t i = 0; i < sum.size(); i++) sum[i] = res[i] + out[i];
        floatX *d_res = upload_bf16(res);
        poison(d_out, (size_t)M * OC * sizeof(floatX));
        snprintf(name, sizeof(name), "matmul_forward_add M=%d IC=%d OC=%d bias=%d", M, IC, OC, with_bias);
        if (matmul_forward_add(d_out, d_res, d_inp, d_w, with_bias ? d_bias : NULL, M, IC, OC, 0)) {
            compare(name, download_bf16(d_out, (size_t)M * OC), sum, TOL_BF16);
            std::vector<float> res_after = download_bf16(d_res, (size_t)M * OC);   // the addend is read, not written
            snprintf(name, sizeof(name), "matmul_forward_add M=%d IC=%d OC=%d addend unchanged", M, IC, OC);
            compare_bits(name, res_after, res);
        } else {
            printf("SKIP %s: cuBLASLt offers no algorithm (the model adds in the norm kernel)\n", name);
        }
        cudaCheck(cudaFree(d_res));
    }
    void *ptrs[] = {d_inp, d_w, d_bias, d_dout, d_out, d_pre, d_dinp, d_dw, d_db, d_dout_f32, d_db2, d_dinp_bf16, scratch};
    for (void *p : ptrs) cudaCheck(cudaFree(p));
}

// The residual add in a projection's epilogue against the product alone (what the model runs
// otherwise, the norm kernel then reading the product's output as well as the stream), and the
// tuning's bits for it: tuned against first choice, bit for bit.
static void timing_add(const char *label, int M, int IC, int OC, int with_bias) {
    char name[200];
    floatX *inp = upload_bf16(random_bf16_values((size_t)M * IC, 1.0f)), *w = upload_bf16(random_bf16_values((size_t)OC * IC, 0.05f));
    floatX *bias = with_bias ? upload_bf16(random_bf16_values(OC, 0.5f)) : NULL, *res = upload_bf16(random_bf16_values((size_t)M * OC, 2.0f));
    floatX *out = device_alloc_n<floatX>((size_t)M * OC);
    matmul_tune = 0;
    matmul_tune_use = 0;
    if (!matmul_forward_add(out, res, inp, w, bias, M, IC, OC, 0)) {
        printf("SKIP time matmul %s + residual: cuBLASLt offers no algorithm\n", label);
    } else {
        std::vector<float> first = download_bf16(out, (size_t)M * OC);
        int from = matmul_tune_count;
        matmul_tune = 1;
        matmul_tune_use = 1;
        poison(out, (size_t)M * OC * sizeof(floatX));
        matmul_forward_add(out, res, inp, w, bias, M, IC, OC, 0);
        matmul_tune = 0;
        snprintf(name, sizeof(name), "tuned %s + residual M=%d IC=%d OC=%d", label, M, IC, OC);
        compare_bits(name, download_bf16(out, (size_t)M * OC), first);
        matmul_tune_print(stdout, from);
        float plain = time_ms([&] { matmul_forward(out, inp, w, bias, NULL, M, IC, OC, 0); });
        float added = time_ms([&] { matmul_forward_add(out, res, inp, w, bias, M, IC, OC, 0); });
        printf("time matmul %-10s M=%d IC=%d OC=%d: product %.4f ms, with the residual add in the epilogue %.4f ms "
               "(the norm after it then moves %.0f MB less)\n", label, M, IC, OC, plain, added, 4.0 * M * OC / 1e6);
    }
    matmul_tune_use = 1;
    for (void *p : {(void *)inp, (void *)w, (void *)bias, (void *)res, (void *)out}) if (p) cudaCheck(cudaFree(p));
}

// Times forward, dinp and dweight of one product at TFLOP/s; with gelu also the fused epilogue
// against the product followed by the gelu.cuh kernel; with dgelu the input gradient with the
// GELU backward in the epilogue against the product followed by gelu_backward.
static void timing(const char *label, int M, int IC, int OC, int gelu, int dgelu) {
    floatX *inp = upload_bf16(random_bf16_values((size_t)M * IC, 1.0f)), *w = upload_bf16(random_bf16_values((size_t)OC * IC, 0.05f));
    floatX *bias = upload_bf16(random_bf16_values(OC, 0.5f)), *out = device_alloc_n<floatX>((size_t)M * OC), *pre = device_alloc_n<floatX>((size_t)M * OC);
    floatX *dout = upload_bf16(random_bf16_values((size_t)M * OC, 1.0f)), *dinp = device_alloc_n<floatX>((size_t)M * IC);
    float *dw = device_alloc_n<float>((size_t)OC * IC);
    double flops = 2.0 * M * IC * OC;
    float fwd = time_ms([&] { matmul_forward(out, inp, w, bias, NULL, M, IC, OC, 0); });
    float bwd_in = time_ms([&] { matmul_backward(dinp, 0, NULL, NULL, dout, NULL, inp, w, NULL, M, IC, OC, 0); });
    float bwd_w = time_ms([&] { matmul_backward(NULL, 0, dw, NULL, dout, NULL, inp, w, NULL, M, IC, OC, 0); });
    printf("time matmul %-10s M=%d IC=%d OC=%d: fwd %.3f ms (%.0f TFLOP/s)  dinp %.3f ms (%.0f)  dweight %.3f ms (%.0f)\n", label, M, IC, OC,
           fwd, flops / fwd / 1e9, bwd_in, flops / bwd_in / 1e9, bwd_w, flops / bwd_w / 1e9);
    if (gelu) {
        float fused = time_ms([&] { matmul_forward(out, inp, w, bias, pre, M, IC, OC, 0); });
        float separate = time_ms([&] { matmul_forward(pre, inp, w, bias, NULL, M, IC, OC, 0); gelu_forward(out, pre, (size_t)M * OC, 0); });
        printf("time matmul %-10s GELU: fused epilogue %.3f ms, product + gelu kernel %.3f ms\n", label, fused, separate);
    }
    if (dgelu) {
        floatX *pre_in = upload_bf16(random_bf16_values((size_t)M * IC, 1.0f)), *dact = device_alloc_n<floatX>((size_t)M * IC);
        if (matmul_backward_dgelu(dinp, dout, w, pre_in, M, IC, OC, 0)) {
            float fused = time_ms([&] { matmul_backward_dgelu(dinp, dout, w, pre_in, M, IC, OC, 0); });
            float separate = time_ms([&] {
                matmul_backward(dact, 0, NULL, NULL, dout, NULL, inp, w, NULL, M, IC, OC, 0);
                gelu_backward(dinp, pre_in, dact, (size_t)M * IC, 0);
            });
            printf("time matmul %-10s GELU backward: DGELU epilogue %.3f ms, product + gelu_backward kernel %.3f ms\n", label, fused, separate);
        }
        cudaCheck(cudaFree(pre_in));
        cudaCheck(cudaFree(dact));
    }
    for (void *p : {(void *)inp, (void *)w, (void *)bias, (void *)out, (void *)pre, (void *)dout, (void *)dinp, (void *)dw}) cudaCheck(cudaFree(p));
}

// The algorithm tuning (matmul_tune): every product of one shape, tuned on its first run, must
// give the bits of cuBLASLt's first choice, on that run and on the next one (the remembered
// choice); the dweight accumulation checks that the tuning puts the accumulated output back
// before the product itself runs. Then the tuned shapes, with their times.
static void check_tuning(const char *label, int M, int IC, int OC, int gelu, int dgelu) {
    char name[200];
    std::vector<float> dw0 = random_f32_values((size_t)OC * IC, 0.1f);
    floatX *inp = upload_bf16(random_bf16_values((size_t)M * IC, 1.0f)), *w = upload_bf16(random_bf16_values((size_t)OC * IC, 0.05f));
    floatX *bias = upload_bf16(random_bf16_values(OC, 0.5f)), *dout = upload_bf16(random_bf16_values((size_t)M * OC, 1.0f));
    floatX *pre_in = upload_bf16(random_bf16_values((size_t)M * IC, 1.0f));
    floatX *out = device_alloc_n<floatX>((size_t)M * OC), *pre = device_alloc_n<floatX>((size_t)M * OC), *dinp = device_alloc_n<floatX>((size_t)M * IC);
    float *dw = device_alloc_n<float>((size_t)OC * IC);
    // the outputs of one round of the shape's products: forward (with the GELU epilogue's two
    // outputs), dinp (or its DGELU form), dweight accumulated onto dw0
    auto round = [&](std::vector<float> *res) {
        poison(out, (size_t)M * OC * sizeof(floatX));
        poison(pre, (size_t)M * OC * sizeof(floatX));
        poison(dinp, (size_t)M * IC * sizeof(floatX));
        cudaCheck(cudaMemcpy(dw, dw0.data(), dw0.size() * sizeof(float), cudaMemcpyHostToDevice));
        matmul_forward(out, inp, w, bias, gelu ? pre : NULL, M, IC, OC, 0);
        if (!dgelu || !matmul_backward_dgelu(dinp, dout, w, pre_in, M, IC, OC, 0))
            matmul_backward(dinp, 0, NULL, NULL, dout, NULL, inp, w, NULL, M, IC, OC, 0);
        matmul_backward(NULL, 0, dw, NULL, dout, NULL, inp, w, NULL, M, IC, OC, 0);
        res[0] = download_bf16(out, (size_t)M * OC);
        res[1] = gelu ? download_bf16(pre, (size_t)M * OC) : std::vector<float>();
        res[2] = download_bf16(dinp, (size_t)M * IC);
        res[3] = download_f32(dw, (size_t)OC * IC);
    };
    const char *what[4] = {"forward", "GELU pre-activation", dgelu ? "dinp (DGELU)" : "dinp", "dweight (+=)"};
    std::vector<float> first[4], tuned[4], again[4];
    int from = matmul_tune_count;
    matmul_tune = 0;
    matmul_tune_use = 0;
    round(first);
    matmul_tune = 1;
    matmul_tune_use = 1;
    round(tuned);
    matmul_tune = 0;
    round(again);
    for (int i = 0; i < 4; i++) {
        if (i == 1 && !gelu) continue;
        snprintf(name, sizeof(name), "tuned %s %s M=%d IC=%d OC=%d, tuning run", label, what[i], M, IC, OC);
        compare_bits(name, tuned[i], first[i]);
        snprintf(name, sizeof(name), "tuned %s %s M=%d IC=%d OC=%d, tuned run", label, what[i], M, IC, OC);
        compare_bits(name, again[i], first[i]);
    }
    printf("cuBLASLt tuning, %s (times per product):\n", label);
    matmul_tune_print(stdout, from);
    for (void *p : {(void *)inp, (void *)w, (void *)bias, (void *)dout, (void *)pre_in, (void *)out, (void *)pre, (void *)dinp, (void *)dw})
        cudaCheck(cudaFree(p));
}

static int multiprocessors(void) {
    int device = 0, sms = 0;
    cudaCheck(cudaGetDevice(&device));
    cudaCheck(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    return sms;
}

// decode_matmul (decode_matmul.cuh) against the CPU's matmul_forward (+ gelu_forward), with and
// without bias and GELU, run twice (the tile counters must be back at 0 for the second run).
static void check_decode(int M, int IC, int OC) {
    char name[160];
    int sms = multiprocessors();
    std::vector<float> inp = random_bf16_values((size_t)M * IC, 1.0f), w = random_bf16_values((size_t)OC * IC, 0.05f);
    std::vector<float> bias = random_bf16_values(OC, 0.5f), out((size_t)M * OC), act((size_t)M * OC);
    floatX *d_inp = upload_bf16(inp), *d_w = upload_bf16(w), *d_bias = upload_bf16(bias), *d_out = device_alloc_n<floatX>((size_t)M * OC);
    float *partial = device_alloc_n<float>(decode_matmul_partial_floats(M, IC, OC, sms));
    unsigned int *counters = device_alloc_n<unsigned int>(decode_matmul_counters(OC));
    cudaCheck(cudaMemset(counters, 0, decode_matmul_counters(OC) * sizeof(unsigned int)));
    for (int variant = 0; variant < 4; variant++) {
        int with_bias = variant & 1, gelu = variant >> 1;
        matmul_forward(out.data(), inp.data(), w.data(), with_bias ? bias.data() : NULL, M, IC, OC);
        if (gelu) gelu_forward(act.data(), out.data(), out.size());
        for (int run = 0; run < 2; run++) {
            poison(d_out, (size_t)M * OC * sizeof(floatX));
            decode_matmul(d_out, partial, counters, d_inp, d_w, with_bias ? d_bias : NULL, M, IC, OC, gelu, sms, 0);
            snprintf(name, sizeof(name), "decode_matmul M=%d IC=%d OC=%d bias=%d gelu=%d splits=%d run %d", M, IC, OC, with_bias,
                     gelu, decode_matmul_splits(IC, OC, sms), run + 1);
            compare(name, download_bf16(d_out, (size_t)M * OC), gelu ? act : out, TOL_BF16);
        }
    }
    for (void *p : {(void *)d_inp, (void *)d_w, (void *)d_bias, (void *)d_out, (void *)partial, (void *)counters}) cudaCheck(cudaFree(p));
}

// decode_matmul_swiglu (the MLP's SwiGLU formed in the projection's input loads) against
// swiglu_forward then decode_matmul: the same bits, and both timed.
static void check_decode_swiglu(int M, int F, int OC) {
    char name[160];
    int sms = multiprocessors();
    floatX *fc = upload_bf16(random_bf16_values((size_t)M * 2 * F, 2.0f)), *w = upload_bf16(random_bf16_values((size_t)OC * F, 0.05f));
    floatX *act = device_alloc_n<floatX>((size_t)M * F), *two = device_alloc_n<floatX>((size_t)M * OC), *one = device_alloc_n<floatX>((size_t)M * OC);
    float *partial = device_alloc_n<float>(decode_matmul_partial_floats(M, F, OC, sms));
    unsigned int *counters = device_alloc_n<unsigned int>(decode_matmul_counters(OC));
    cudaCheck(cudaMemset(counters, 0, decode_matmul_counters(OC) * sizeof(unsigned int)));
    poison(two, (size_t)M * OC * sizeof(floatX));
    poison(one, (size_t)M * OC * sizeof(floatX));
    auto two_step = [&] {
        swiglu_forward(act, fc, M, F, 0);
        decode_matmul(two, partial, counters, act, w, NULL, M, F, OC, 0, sms, 0);
    };
    auto fused = [&] { decode_matmul_swiglu(one, partial, counters, fc, w, NULL, M, F, OC, sms, 0); };
    two_step();
    fused();
    snprintf(name, sizeof(name), "decode_matmul_swiglu M=%d F=%d OC=%d", M, F, OC);
    compare_bits(name, download_bf16(one, (size_t)M * OC), download_bf16(two, (size_t)M * OC));
    float ms_two = time_ms(two_step), ms_one = time_ms(fused);
    printf("time decode SwiGLU + projection M=%d F=%d OC=%d: swiglu_forward then decode_matmul %.4f ms, "
           "decode_matmul_swiglu %.4f ms\n", M, F, OC, ms_two, ms_one);
    for (void *p : {(void *)fc, (void *)w, (void *)act, (void *)two, (void *)one, (void *)partial, (void *)counters}) cudaCheck(cudaFree(p));
}

// The decode step's products (M = one row per sequence): every candidate algorithm cuBLASLt's
// heuristic offers, timed, with its split-K factor and tile; the engine runs candidate 0.
static void decode_candidates(const char *label, int M, int IC, int OC, int with_bias, int gelu) {
    floatX *inp = upload_bf16(random_bf16_values((size_t)M * IC, 1.0f)), *w = upload_bf16(random_bf16_values((size_t)OC * IC, 0.05f));
    floatX *bias = upload_bf16(random_bf16_values(OC, 0.5f)), *out = device_alloc_n<floatX>((size_t)M * OC), *pre = device_alloc_n<floatX>((size_t)M * OC);
    double bytes = 2.0 * ((double)OC * IC + (double)M * IC + (double)M * OC);
    float first = 0.0f, best = 1e30f;
    int best_at = 0, count = 1;
    for (int i = 0; i < count && i < MATMUL_LT_MAX_CANDIDATES; i++) {
        matmul_lt_candidate = i;
        matmul_forward(out, inp, w, with_bias ? bias : NULL, gelu ? pre : NULL, M, IC, OC, 0);
        count = matmul_lt_candidates;
        if (i >= count) break;
        float ms = time_ms([&] { matmul_forward(out, inp, w, with_bias ? bias : NULL, gelu ? pre : NULL, M, IC, OC, 0); });
        int split = 0, tile = 0;
        size_t written = 0;
        cublasLtMatmulAlgoConfigGetAttribute(&matmul_lt_last_algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &split, sizeof(split), &written);
        cublasLtMatmulAlgoConfigGetAttribute(&matmul_lt_last_algo, CUBLASLT_ALGO_CONFIG_TILE_ID, &tile, sizeof(tile), &written);
        printf("time matmul decode %-8s M=%d IC=%d OC=%d candidate %2d: %.4f ms (%4.0f GB/s)  split-K %d  tile id %d\n", label, M,
               IC, OC, i, ms, bytes / ms / 1e6, split, tile);
        if (i == 0) first = ms;
        if (ms < best) best = ms, best_at = i;
    }
    matmul_lt_candidate = 0;
    printf("time matmul decode %-8s M=%d: cuBLASLt's first choice %.4f ms, fastest candidate %d %.4f ms", label, M, first, best_at, best);
    if (decode_matmul_supports(M, IC, OC, inp, w)) {   // the tensor-core decode product of decode_matmul.cuh
        int sms = multiprocessors();
        float *partial = device_alloc_n<float>(decode_matmul_partial_floats(M, IC, OC, sms));
        unsigned int *counters = device_alloc_n<unsigned int>(decode_matmul_counters(OC));
        cudaCheck(cudaMemset(counters, 0, decode_matmul_counters(OC) * sizeof(unsigned int)));
        float ms = time_ms([&] { decode_matmul(out, partial, counters, inp, w, with_bias ? bias : NULL, M, IC, OC, gelu, sms, 0); });
        printf(", decode_matmul (%d splits) %.4f ms (%4.0f GB/s)", decode_matmul_splits(IC, OC, sms), ms, bytes / ms / 1e6);
        cudaCheck(cudaFree(partial));
        cudaCheck(cudaFree(counters));
    }
    printf("\n");
    for (void *p : {(void *)inp, (void *)w, (void *)bias, (void *)out, (void *)pre}) cudaCheck(cudaFree(p));
}

int main(void) {
    harness_require_device("matmul");
    harness_seed(10);
    check(1, 1, 1, 1);
    check(5, 7, 3, 1);
    check(33, 64, 40, 0);
    check(300, 768, 2304, 1);
    check(256, 576, 3072, 0);
    check(128, 768, 50304, 0);
    check(256, 3072, 768, 1);   // GPT-2's fcproj: the DGELU epilogue at the model's width
    check_decode(1, 768, 2304);
    check_decode(37, 576, 960);
    check_decode(64, 3072, 768);
    check_decode_swiglu(64, 1536, 576);   // SmolLM2-135M's MLP projection at 64 rows
    check_decode_swiglu(5, 64, 32);
    int M = 16 * 1024;
    timing("qkv", M, 768, 2304, 0, 0);
    timing("attproj", M, 768, 768, 0, 0);
    timing("fc", M, 768, 3072, 1, 0);
    timing("fcproj", M, 3072, 768, 0, 1);
    timing("lm_head", M, 768, 50304, 0, 0);
    // a quarter of the training rows (the lm_head an eighth): the check downloads every output
    // three times; bench_train lists the tuning at the training shapes
    check_tuning("qkv", M / 4, 768, 2304, 0, 0);
    check_tuning("attproj", M / 4, 768, 768, 0, 0);
    check_tuning("fc", M / 4, 768, 3072, 1, 0);
    check_tuning("fcproj", M / 4, 3072, 768, 0, 1);
    check_tuning("lm_head", M / 8, 768, 50304, 0, 0);
    check_tuning("s-qkv", M / 4, 576, 960, 0, 0);
    check_tuning("s-fc", M / 4, 576, 3072, 0, 0);
    check_tuning("s-down", M / 4, 1536, 576, 0, 0);
    check_tuning("odd", 300, 40, 72, 0, 0);   // rows of 80 bytes: other alignments, other candidates
    timing_add("attproj", M, 768, 768, 1);
    timing_add("fcproj", M, 3072, 768, 1);
    timing_add("s-o", M, 576, 576, 0);
    timing_add("s-down", M, 1536, 576, 0);
    for (int rows : {64, 256}) {   // GPT-2 124M and SmolLM2-135M decode products
        decode_candidates("qkv", rows, 768, 2304, 1, 0);
        decode_candidates("attproj", rows, 768, 768, 1, 0);
        decode_candidates("fc+gelu", rows, 768, 3072, 1, 1);
        decode_candidates("fcproj", rows, 3072, 768, 1, 0);
        decode_candidates("s-qkv", rows, 576, 960, 0, 0);
        decode_candidates("s-o", rows, 576, 576, 0, 0);
        decode_candidates("s-fc", rows, 576, 3072, 0, 0);
        decode_candidates("s-down", rows, 1536, 576, 0, 0);
    }
    return harness_finish("matmul");
}
