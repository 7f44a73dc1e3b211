/*
 * Harness for rope.cuh: RoPE forward and backward (in place on the q and k parts of qkv)
 * against rope_forward / rope_backward of ops_cpu.c on fresh random inputs, including positions
 * far from 0 where float angles would lose digits.
 *   build/cuda/dev/rope
 */
#include "harness.h"
#include "rope.cuh"

static void check(int B, int T, int NH, int NKV, int HS, float theta) {
    char name[160];
    size_t n = (size_t)B * T * (NH + 2 * NKV) * HS;
    std::vector<float> qkv = random_bf16_values(n, 1.0f), ref_fwd = qkv, ref_bwd = qkv;
    rope_forward(ref_fwd.data(), B, T, NH, NKV, HS, theta);
    rope_backward(ref_bwd.data(), B, T, NH, NKV, HS, theta);
    float *table = rope_table_host(T, HS, theta);
    float *d_table = upload(std::vector<float>(table, table + (size_t)T * HS));
    free(table);
    floatX *d_qkv = upload_bf16(qkv);
    rope_forward(d_qkv, d_table, B, T, NH, NKV, HS, 0);
    snprintf(name, sizeof(name), "rope_forward B=%d T=%d NH=%d NKV=%d HS=%d", B, T, NH, NKV, HS);
    compare(name, download_bf16(d_qkv, n), ref_fwd, TOL_BF16);
    cudaCheck(cudaFree(d_qkv));
    d_qkv = upload_bf16(qkv);
    rope_backward(d_qkv, d_table, B, T, NH, NKV, HS, 0);
    snprintf(name, sizeof(name), "rope_backward B=%d T=%d NH=%d NKV=%d HS=%d", B, T, NH, NKV, HS);
    compare(name, download_bf16(d_qkv, n), ref_bwd, TOL_BF16);
    cudaCheck(cudaFree(d_qkv));
    cudaCheck(cudaFree(d_table));
}

int main(void) {
    harness_require_device("rope");
    harness_seed(3);
    check(2, 5, 4, 2, 16, 10000.0f);
    check(2, 300, 9, 3, 64, 100000.0f);
    check(1, 8192, 4, 1, 128, 500000.0f);
    int B = 16, T = 1024, NH = 9, NKV = 3, HS = 64;
    size_t n = (size_t)B * T * (NH + 2 * NKV) * HS;
    floatX *d_qkv = upload_bf16(random_bf16_values(n, 1.0f));
    float *table = rope_table_host(T, HS, 100000.0f);
    float *d_table = upload(std::vector<float>(table, table + (size_t)T * HS));
    free(table);
    float ms = time_ms([&] { rope_forward(d_qkv, d_table, B, T, NH, NKV, HS, 0); });
    printf("time rope B=%d T=%d NH=%d NKV=%d HS=%d: %.3f ms\n", B, T, NH, NKV, HS, ms);
    return harness_finish("rope");
}
