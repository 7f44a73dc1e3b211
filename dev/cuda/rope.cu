/*
 * Harness for rope.cuh: RoPE forward and backward (in place on the q and k parts of qkv)
 * against rope_forward / rope_backward of ops_cpu.c on fresh random inputs, including positions
 * far from 0 where float angles would lose digits, for the scalar kernel, the 8-wide one (head_dim
 * a multiple of 16) and the pick between them, with the 8-wide results also checked bit for bit
 * against the scalar ones; rope_forward_keys (the k heads alone, first_head = NH, which the model
 * runs before the flash forward rotates the q heads itself) against the CPU's rope_forward on the
 * k heads with the q and v heads left as they were, and bit for bit against the k heads of the
 * picked rope_forward; then timing of both at SmolLM2-135M's shape (head_dim 64) and with
 * head_dim 128.
 *   build/cuda/dev/rope
 */
#include "harness.h"
#include "rope.cuh"

typedef void (*RopeKernel)(floatX *, const float *, int, int, int, int, int, float, cudaStream_t);
static void rope_picked(floatX *qkv, const float *cos_sin, int B, int T, int NH, int NKV, int HS, float sign, cudaStream_t stream) {
    if (sign > 0.0f) rope_forward(qkv, cos_sin, B, T, NH, NKV, HS, stream);
    else rope_backward(qkv, cos_sin, B, T, NH, NKV, HS, stream);
}
static const struct { const char *name; RopeKernel run; } KERNELS[] = {
    {"scalar", rope_scalar},
    {"vec8", rope_vec8},
    {"picked", rope_picked},
};

static float *upload_table(int T, int HS, float theta) {
    float *table = rope_table_host(T, HS, theta);
    float *d_table = upload(std::vector<float>(table, table + (size_t)T * HS));
    free(table);
    return d_table;
}

static void check(int B, int T, int NH, int NKV, int HS, float theta) {
    char name[160];
    size_t n = (size_t)B * T * (NH + 2 * NKV) * HS;
    std::vector<float> qkv = random_bf16_values(n, 1.0f), ref_fwd = qkv, ref_bwd = qkv;
    rope_forward(ref_fwd.data(), B, T, NH, NKV, HS, theta);
    rope_backward(ref_bwd.data(), B, T, NH, NKV, HS, theta);
    float *d_table = upload_table(T, HS, theta);
    std::vector<float> scalar_fwd, scalar_bwd, picked_fwd;
    for (const auto &k : KERNELS) {
        floatX *d_qkv = upload_bf16(qkv);
        if (k.run == rope_vec8 && !rope_vectorized(d_qkv, d_table, B, T, NH, NKV, HS)) {
            cudaCheck(cudaFree(d_qkv));
            continue;
        }
        k.run(d_qkv, d_table, B, T, NH, NKV, HS, 1.0f, 0);
        std::vector<float> got_fwd = download_bf16(d_qkv, n);
        cudaCheck(cudaFree(d_qkv));
        d_qkv = upload_bf16(qkv);
        k.run(d_qkv, d_table, B, T, NH, NKV, HS, -1.0f, 0);
        std::vector<float> got_bwd = download_bf16(d_qkv, n);
        cudaCheck(cudaFree(d_qkv));
        snprintf(name, sizeof(name), "rope_forward %s B=%d T=%d NH=%d NKV=%d HS=%d", k.name, B, T, NH, NKV, HS);
        compare(name, got_fwd, ref_fwd, TOL_BF16);
        snprintf(name, sizeof(name), "rope_backward %s B=%d T=%d NH=%d NKV=%d HS=%d", k.name, B, T, NH, NKV, HS);
        compare(name, got_bwd, ref_bwd, TOL_BF16);
        if (k.run == rope_picked) picked_fwd = got_fwd;
        if (k.run == rope_scalar) {
            scalar_fwd = got_fwd;
            scalar_bwd = got_bwd;
        } else {
            snprintf(name, sizeof(name), "rope_forward %s = scalar HS=%d", k.name, HS);
            compare_bits(name, got_fwd, scalar_fwd);
            snprintf(name, sizeof(name), "rope_backward %s = scalar HS=%d", k.name, HS);
            compare_bits(name, got_bwd, scalar_bwd);
        }
    }
    // rope_forward_keys: the k heads rotated, the q and v heads untouched. Expected: qkv with the
    // k heads of each row taken from the CPU's forward (ref_keys), and from the GPU's picked
    // forward (bits_keys)
    size_t row = (size_t)(NH + 2 * NKV) * HS, k0 = (size_t)NH * HS, k1 = (size_t)(NH + NKV) * HS;
    std::vector<float> ref_keys = qkv, bits_keys = qkv;
    for (size_t bt = 0; bt < (size_t)B * T; bt++)
        for (size_t j = bt * row + k0; j < bt * row + k1; j++) {
            ref_keys[j] = ref_fwd[j];
            bits_keys[j] = picked_fwd[j];
        }
    floatX *d_qkv = upload_bf16(qkv);
    rope_forward_keys(d_qkv, d_table, B, T, NH, NKV, HS, 0);
    std::vector<float> got_keys = download_bf16(d_qkv, n);
    cudaCheck(cudaFree(d_qkv));
    snprintf(name, sizeof(name), "rope_forward_keys B=%d T=%d NH=%d NKV=%d HS=%d", B, T, NH, NKV, HS);
    compare(name, got_keys, ref_keys, TOL_BF16);
    snprintf(name, sizeof(name), "rope_forward_keys = rope_forward's k heads, q and v untouched HS=%d", HS);
    compare_bits(name, got_keys, bits_keys);
    cudaCheck(cudaFree(d_table));
}

// bytes moved: the q and k heads read and written in bf16 (the table stays in cache)
static void timing(int B, int T, int NH, int NKV, int HS) {
    size_t n = (size_t)B * T * (NH + 2 * NKV) * HS, rotated = (size_t)B * T * (NH + NKV) * HS;
    floatX *d_qkv = upload_bf16(random_bf16_values(n, 1.0f));
    float *d_table = upload_table(T, HS, 100000.0f);
    for (int k = 0; k < 2; k++) {
        float ms = time_ms([&] { KERNELS[k].run(d_qkv, d_table, B, T, NH, NKV, HS, 1.0f, 0); });
        printf("time rope %-6s B=%d T=%d NH=%d NKV=%d HS=%d: %.3f ms (%.0f GB/s)\n", KERNELS[k].name, B, T, NH, NKV, HS,
               ms, 4.0 * rotated / ms / 1e6);
    }
    cudaCheck(cudaFree(d_qkv));
    cudaCheck(cudaFree(d_table));
}

int main(void) {
    harness_require_device("rope");
    harness_seed(3);
    check(2, 5, 4, 2, 16, 10000.0f);
    check(2, 7, 3, 1, 6, 10000.0f);
    check(2, 300, 9, 3, 64, 100000.0f);
    check(1, 8192, 4, 1, 128, 500000.0f);
    timing(16, 1024, 9, 3, 64);
    timing(16, 1024, 9, 3, 128);
    return harness_finish("rope");
}
