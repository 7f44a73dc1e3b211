/*
 * Harness for encoder.cuh: embedding forward and backward against encoder_forward /
 * encoder_backward of ops_cpu.c on fresh random inputs, with the residual stream in fp32 and in
 * bf16 (the output rounded, the gradient read as bf16), then timing at GPT-2 124M's shape.
 *   build/cuda/dev/encoder
 */
#include "harness.h"
#include "encoder.cuh"

static void check(int B, int T, int C, int Vp, int with_wpe) {
    char name[128];
    size_t N = (size_t)B * T;
    std::vector<float> wte = random_bf16_values((size_t)Vp * C, 1.0f), wpe = random_bf16_values((size_t)T * C, 1.0f);
    std::vector<int> inp = random_tokens(N, Vp);
    inp[0] = inp[N - 1];   // a repeated token, so the scatter adds twice into one row
    std::vector<float> dout = random_f32_values(N * C, 1.0f);
    std::vector<float> ref(N * C), dwte_ref((size_t)Vp * C, 0.0f), dwpe_ref((size_t)T * C, 0.0f);
    encoder_forward(ref.data(), inp.data(), wte.data(), with_wpe ? wpe.data() : NULL, B, T, C);
    encoder_backward(dwte_ref.data(), with_wpe ? dwpe_ref.data() : NULL, dout.data(), inp.data(), B, T, C);

    floatX *d_wte = upload_bf16(wte), *d_wpe = upload_bf16(wpe);
    int *d_inp = upload(inp);
    float *d_out = device_alloc_n<float>(N * C), *d_dout = upload(dout);
    float *d_dwte = upload(std::vector<float>((size_t)Vp * C, 0.0f)), *d_dwpe = upload(std::vector<float>((size_t)T * C, 0.0f));
    poison(d_out, N * C * sizeof(float));
    encoder_forward(d_out, d_inp, d_wte, with_wpe ? d_wpe : NULL, B, T, C, 0);
    snprintf(name, sizeof(name), "encoder_forward B=%d T=%d C=%d wpe=%d", B, T, C, with_wpe);
    compare(name, download_f32(d_out, N * C), ref, TOL_F32);
    encoder_backward(d_dwte, with_wpe ? d_dwpe : NULL, d_dout, d_inp, B, T, C, 0);
    snprintf(name, sizeof(name), "encoder_backward dwte B=%d T=%d C=%d", B, T, C);
    compare(name, download_f32(d_dwte, (size_t)Vp * C), dwte_ref, TOL_F32);
    if (with_wpe) {
        snprintf(name, sizeof(name), "encoder_backward dwpe B=%d T=%d C=%d", B, T, C);
        compare(name, download_f32(d_dwpe, (size_t)T * C), dwpe_ref, TOL_F32);
    }
    // the bf16 stream: the output is the reference rounded to bf16 (one fp32 add on both sides),
    // the backward reads a bf16 gradient (its values bf16's, against the reference on them)
    floatX *d_out16 = device_alloc_n<floatX>(N * C);
    poison(d_out16, N * C * sizeof(floatX));
    encoder_forward(d_out16, d_inp, d_wte, with_wpe ? d_wpe : NULL, B, T, C, 0);
    std::vector<float> ref16(N * C);
    for (size_t i = 0; i < N * C; i++) ref16[i] = __bfloat162float(__float2bfloat16(ref[i]));
    snprintf(name, sizeof(name), "encoder_forward bf16 stream B=%d T=%d C=%d wpe=%d", B, T, C, with_wpe);
    compare_bits(name, download_bf16(d_out16, N * C), ref16);
    std::vector<float> dout16 = random_bf16_values(N * C, 1.0f), dwte16_ref((size_t)Vp * C, 0.0f), dwpe16_ref((size_t)T * C, 0.0f);
    encoder_backward(dwte16_ref.data(), with_wpe ? dwpe16_ref.data() : NULL, dout16.data(), inp.data(), B, T, C);
    floatX *d_dout16 = upload_bf16(dout16);
    cudaCheck(cudaMemset(d_dwte, 0, (size_t)Vp * C * sizeof(float)));
    cudaCheck(cudaMemset(d_dwpe, 0, (size_t)T * C * sizeof(float)));
    encoder_backward(d_dwte, with_wpe ? d_dwpe : NULL, d_dout16, d_inp, B, T, C, 0);
    snprintf(name, sizeof(name), "encoder_backward bf16 stream dwte B=%d T=%d C=%d", B, T, C);
    compare(name, download_f32(d_dwte, (size_t)Vp * C), dwte16_ref, TOL_F32);
    if (with_wpe) {
        snprintf(name, sizeof(name), "encoder_backward bf16 stream dwpe B=%d T=%d C=%d", B, T, C);
        compare(name, download_f32(d_dwpe, (size_t)T * C), dwpe16_ref, TOL_F32);
    }
    cudaCheck(cudaFree(d_out16)); cudaCheck(cudaFree(d_dout16));
    cudaCheck(cudaFree(d_wte)); cudaCheck(cudaFree(d_wpe)); cudaCheck(cudaFree(d_inp)); cudaCheck(cudaFree(d_out));
    cudaCheck(cudaFree(d_dout)); cudaCheck(cudaFree(d_dwte)); cudaCheck(cudaFree(d_dwpe));
}

int main(void) {
    harness_require_device("encoder");
    harness_seed(1);
    check(2, 17, 64, 100, 1);
    check(3, 64, 72, 256, 0);
    check(4, 128, 768, 1000, 1);
    // timing at GPT-2 124M, B=16, T=1024
    int B = 16, T = 1024, C = 768, Vp = 50304;
    size_t N = (size_t)B * T;
    floatX *d_wte = upload_bf16(random_bf16_values((size_t)Vp * C, 1.0f)), *d_wpe = upload_bf16(random_bf16_values((size_t)T * C, 1.0f));
    int *d_inp = upload(random_tokens(N, Vp));
    float *d_out = device_alloc_n<float>(N * C), *d_dwte = device_alloc_n<float>((size_t)Vp * C), *d_dwpe = device_alloc_n<float>((size_t)T * C);
    float fwd = time_ms([&] { encoder_forward(d_out, d_inp, d_wte, d_wpe, B, T, C, 0); });
    float bwd = time_ms([&] { encoder_backward(d_dwte, d_dwpe, d_out, d_inp, B, T, C, 0); });
    floatX *d_out16 = device_alloc_n<floatX>(N * C);
    float fwd16 = time_ms([&] { encoder_forward(d_out16, d_inp, d_wte, d_wpe, B, T, C, 0); });
    float bwd16 = time_ms([&] { encoder_backward(d_dwte, d_dwpe, d_out16, d_inp, B, T, C, 0); });
    printf("time encoder B=%d T=%d C=%d: forward %.3f ms, backward %.3f ms; bf16 stream: forward %.3f ms, backward %.3f ms\n",
           B, T, C, fwd, bwd, fwd16, bwd16);
    return harness_finish("encoder");
}
