/*
 * Harness for attention_flash.cuh, the tensor-core (mma.sync bf16) flash attention, on fresh
 * random inputs:
 *   - against the CPU op (attention_forward / attention_backward of ops_cpu.c, fp32 with the full
 *     (T, T) probabilities) and a float64 log-sum-exp: out, lse, dq, dk, dv. At the benchmark
 *     shapes (B = 16, T = 1024) the CPU reference runs on the first and the last batch element
 *     only (the whole batch would take minutes of CPU time), the GPU on the whole batch;
 *   - against the simple CUDA kernels of attention.cuh on the whole batch (every element);
 *   - bitwise repeatability of forward and backward (the backward uses no atomics), and the
 *     backward with two row tiles a warp in the dQ pass, or two key row tiles a warp in the dK/dV
 *     pass, bitwise equal to the one-tile backward, and the backward with RoPE's backward in its
 *     epilogue bitwise equal to the backward followed by rope_backward (rope.cuh), and the forward
 *     rotating its queries by RoPE as it loads them (after rope_forward_keys) bitwise equal to
 *     rope_forward followed by the plain forward (out, lse and qkv afterwards);
 *   - where the device runs the sm_90a code, first the warpgroup product (wgmma) in each form the
 *     kernels use against the CPU, then the warpgroup kernels (the pipelined forward, dQ and dK/dV
 *     passes with one and two warpgroups a block among them) against the mma.sync ones (and how many elements differ
 *     in their bits, which decides whether the tuner may pick them), and their times;
 * for multi-head (GPT-2: 12 heads of 64) and grouped-query (SmolLM2: 9 query heads on 3 kv heads)
 * attention, head sizes 64 and 128, T of 1, T not a multiple of the 64-row tiles, and sharp
 * softmaxes (inputs scaled by 4, scores of standard deviation ~16) that exercise the online
 * rescaling. Every output is poisoned with NaN before each run. Then timings of both kernels at
 * the benchmark shapes.
 *   build/cuda/dev/attention_flash
 */
#include "harness.h"
#include "attention.cuh"
#include "attention_flash.cuh"
#include "rope.cuh"

// float64 log-sum-exp of every query row's scaled scores, (B, NH, T), for batch elements
// [b0, b0 + nb) of qkv (B, T, QKV)
static std::vector<float> reference_lse(const std::vector<float> &qkv, int b0, int nb, int T, int NH, int NKV, int HS) {
    int QKV = (NH + 2 * NKV) * HS;
    std::vector<float> lse((size_t)nb * NH * T);
    double scale = 1.0 / sqrt((double)HS);
    #pragma omp parallel for collapse(2) schedule(dynamic)
    for (int bi = 0; bi < nb; bi++)
        for (int h = 0; h < NH; h++) {
            std::vector<double> scores(T);
            int b = b0 + bi;
            for (int t = 0; t < T; t++) {
                const float *q = &qkv[((size_t)b * T + t) * QKV + (size_t)h * HS];
                double m = -INFINITY, s = 0.0;
                for (int t2 = 0; t2 <= t; t2++) {
                    const float *k = &qkv[((size_t)b * T + t2) * QKV + (size_t)(NH + h / (NH / NKV)) * HS];
                    double dot = 0.0;
                    for (int i = 0; i < HS; i++) dot += (double)q[i] * k[i];
                    scores[t2] = dot * scale;
                    m = fmax(m, scores[t2]);
                }
                for (int t2 = 0; t2 <= t; t2++) s += exp(scores[t2] - m);
                lse[((size_t)bi * NH + h) * T + t] = (float)(m + log(s));
            }
        }
    return lse;
}

// rows [b0 * T, (b0 + nb) * T) of a (B*T, width) tensor, columns [c0, c1)
static std::vector<float> slice(const std::vector<float> &x, int b0, int nb, int T, int width, int c0, int c1) {
    std::vector<float> out;
    out.reserve((size_t)nb * T * (c1 - c0));
    for (size_t row = (size_t)b0 * T; row < (size_t)(b0 + nb) * T; row++)
        for (int c = c0; c < c1; c++) out.push_back(x[row * width + c]);
    return out;
}

// compares dq, dk and dv (the three column ranges of dqkv) separately so a failure says which
static void compare_dqkv(const char *label, const std::vector<float> &got, const std::vector<float> &ref, int b0, int nb,
                         int T, int NH, int NKV, int HS, double tol) {
    int QKV = (NH + 2 * NKV) * HS;
    const char *parts[3] = {"dq", "dk", "dv"};
    int start[3] = {0, NH * HS, (NH + NKV) * HS}, end[3] = {NH * HS, (NH + NKV) * HS, QKV};
    char name[256];
    for (int p = 0; p < 3; p++) {
        snprintf(name, sizeof(name), "%s %s", label, parts[p]);
        compare(name, slice(got, b0, nb, T, QKV, start[p], end[p]), slice(ref, 0, nb, T, QKV, start[p], end[p]), tol);
    }
}

// One warpgroup product d (64 x 64) = a (64 x 16) b (16 x 64) through the wrappers the warpgroup
// kernels use: A from registers (the m16n8k16 A layout, built here straight from global memory)
// or from a core-matrix tile in shared memory; B from a core-matrix tile as a K-major operand
// (the tile holds b's transpose, 64 x 16) or an MN-major one (the tile holds b, 16 x 64). d is
// stored by the accumulator layout. a, b row-major bf16; bt = b transposed.
template <int TRANS_B, int A_SMEM>
__global__ void wgmma_probe_kernel(float *d, const floatX *a, const floatX *b, const floatX *bt) {
    __shared__ __align__(128) floatX sa[64 * 16], sb[64 * 16];
    const int t = threadIdx.x, warp = t / 32, g = (t % 32) / 4, c = t % 4;
    if (A_SMEM) flash_load_tile_wg<64, 16>(sa, a, 0, 0, 64, 16, 0);
    if (TRANS_B) flash_load_tile_wg<16, 64>(sb, b, 0, 0, 16, 64, 0);
    else flash_load_tile_wg<64, 16>(sb, bt, 0, 0, 64, 16, 0);
    cp_async_commit();
    cp_async_wait<0>();
    flash_fence_proxy_async();
    __syncthreads();
    uint32_t af[4];
    const int r = 16 * warp + g;
    af[0] = flash_pack_bf16(__bfloat162float(a[r * 16 + 2 * c]), __bfloat162float(a[r * 16 + 2 * c + 1]));
    af[1] = flash_pack_bf16(__bfloat162float(a[(r + 8) * 16 + 2 * c]), __bfloat162float(a[(r + 8) * 16 + 2 * c + 1]));
    af[2] = flash_pack_bf16(__bfloat162float(a[r * 16 + 2 * c + 8]), __bfloat162float(a[r * 16 + 2 * c + 9]));
    af[3] = flash_pack_bf16(__bfloat162float(a[(r + 8) * 16 + 2 * c + 8]), __bfloat162float(a[(r + 8) * 16 + 2 * c + 9]));
    uint64_t desc_b = TRANS_B ? flash_wg_desc_mn<64>(sb, 0) : flash_wg_desc_k<16>(sb, 0);
    float acc[8][4];
    flash_wgmma_fence();
    if (A_SMEM) flash_wgmma_ss<TRANS_B, 0>(acc, flash_wg_desc_k<16>(sa, 0), desc_b);
    else flash_wgmma<TRANS_B, 0>(acc, af, desc_b);
    flash_wgmma_commit();
    flash_wgmma_wait();
    flash_acc_fence(acc);
    for (int j = 0; j < 8; j++)
        for (int e = 0; e < 4; e++) d[(r + (e >= 2 ? 8 : 0)) * 64 + 8 * j + 2 * c + (e & 1)] = acc[j][e];
}

// The four forms the warpgroup kernels use (A from registers or shared memory, B K-major or
// MN-major) against the product on the CPU, before any kernel built on them runs: a wrong
// layout or descriptor shows here by name.
static void check_wgmma_primitives(void) {
    std::vector<float> a = random_bf16_values(64 * 16, 1.0f), b = random_bf16_values(16 * 64, 1.0f), bt(64 * 16), ref(64 * 64);
    for (int k = 0; k < 16; k++)
        for (int n = 0; n < 64; n++) bt[n * 16 + k] = b[k * 64 + n];
    for (int m = 0; m < 64; m++)
        for (int n = 0; n < 64; n++) {
            double sum = 0.0;
            for (int k = 0; k < 16; k++) sum += (double)a[m * 16 + k] * b[k * 64 + n];
            ref[m * 64 + n] = (float)sum;
        }
    floatX *d_a = upload_bf16(a), *d_b = upload_bf16(b), *d_bt = upload_bf16(bt);
    float *d_d = device_alloc_n<float>(64 * 64);
    const char *names[4] = {"A registers, B K-major", "A registers, B MN-major", "A shared, B K-major", "A shared, B MN-major"};
    for (int form = 0; form < 4; form++) {
        poison(d_d, 64 * 64 * sizeof(float));
        switch (form) {
        case 0: wgmma_probe_kernel<0, 0><<<1, 128>>>(d_d, d_a, d_b, d_bt); break;
        case 1: wgmma_probe_kernel<1, 0><<<1, 128>>>(d_d, d_a, d_b, d_bt); break;
        case 2: wgmma_probe_kernel<0, 1><<<1, 128>>>(d_d, d_a, d_b, d_bt); break;
        default: wgmma_probe_kernel<1, 1><<<1, 128>>>(d_d, d_a, d_b, d_bt); break;
        }
        cudaCheckLaunch();
        char name[120];
        snprintf(name, sizeof(name), "wgmma m64n64k16 (%s)", names[form]);
        compare(name, download_f32(d_d, 64 * 64), ref, 1e-5);
    }
    for (void *p : {(void *)d_a, (void *)d_b, (void *)d_bt, (void *)d_d}) cudaCheck(cudaFree(p));
}

// One shape: the flash kernels against the CPU op on batch elements cpu_b (all when cpu_all),
// against attention.cuh on every element, and against themselves on a second run.
static void check(int B, int T, int NH, int NKV, int HS, float input_scale, bool cpu_all) {
    char label[160], name[220];
    snprintf(label, sizeof(label), "B=%d T=%d NH=%d NKV=%d HS=%d x%.0f", B, T, NH, NKV, HS, input_scale);
    int QKV = (NH + 2 * NKV) * HS;
    size_t n_qkv = (size_t)B * T * QKV, n_out = (size_t)B * T * NH * HS, n_stat = (size_t)B * NH * T;
    std::vector<float> qkv = random_bf16_values(n_qkv, input_scale), dout = random_bf16_values(n_out, 1.0f);

    floatX *d_qkv = upload_bf16(qkv), *d_dout = upload_bf16(dout);
    floatX *d_out = device_alloc_n<floatX>(n_out), *d_dqkv = device_alloc_n<floatX>(n_qkv);
    floatX *d_out_simple = device_alloc_n<floatX>(n_out), *d_dqkv_simple = device_alloc_n<floatX>(n_qkv);
    float *d_lse = device_alloc_n<float>(n_stat), *d_D = device_alloc_n<float>(n_stat);
    float *d_lse_simple = device_alloc_n<float>(n_stat), *d_D_simple = device_alloc_n<float>(n_stat);

    // flash, twice (the second run must reproduce the first bit for bit)
    std::vector<float> out[2], lse[2], dqkv[2];
    for (int run = 0; run < 2; run++) {
        poison(d_out, n_out * sizeof(floatX)); poison(d_lse, n_stat * sizeof(float));
        poison(d_dqkv, n_qkv * sizeof(floatX)); poison(d_D, n_stat * sizeof(float));
        attention_flash_forward(d_out, d_lse, d_qkv, B, T, NH, NKV, HS, 0);
        out[run] = download_bf16(d_out, n_out);
        lse[run] = download_f32(d_lse, n_stat);
        // the backward reads the flash forward's own out and lse, as in the model
        attention_flash_backward(d_dqkv, d_D, d_dout, d_qkv, d_out, d_lse, B, T, NH, NKV, HS, 0);
        dqkv[run] = download_bf16(d_dqkv, n_qkv);
    }
    snprintf(name, sizeof(name), "flash repeat %s out", label); compare_bits(name, out[0], out[1]);
    snprintf(name, sizeof(name), "flash repeat %s lse", label); compare_bits(name, lse[0], lse[1]);
    snprintf(name, sizeof(name), "flash repeat %s dqkv", label); compare_bits(name, dqkv[0], dqkv[1]);
    if (HS == 64) {   // two row tiles per warp in the dQ pass (each dQ row sums the same products in the
                      // same order) and in the dK/dV pass (each key row likewise, the extra masked
                      // queries adding exact zeros): dqkv must equal the one-tile result bit for bit
        int *switches[2] = {&flash_dq_row_tiles, &flash_dkv_row_tiles};
        const char *names[2] = {"dQ 2 row tiles", "dK/dV 2 key row tiles"};
        for (int k = 0; k < 2; k++) {
            *switches[k] = 2;
            poison(d_dqkv, n_qkv * sizeof(floatX)); poison(d_D, n_stat * sizeof(float));
            attention_flash_backward(d_dqkv, d_D, d_dout, d_qkv, d_out, d_lse, B, T, NH, NKV, HS, 0);
            *switches[k] = 1;
            snprintf(name, sizeof(name), "flash %s %s dqkv", names[k], label);
            compare_bits(name, download_bf16(d_dqkv, n_qkv), dqkv[0]);
        }
    }
    {   // RoPE's backward in the epilogue: the plain backward followed by rope_backward, bit for bit
        float *table = rope_table_host(T, HS, 10000.0f);
        float *d_table = upload(std::vector<float>(table, table + (size_t)T * HS));
        free(table);
        attention_flash_backward(d_dqkv, d_D, d_dout, d_qkv, d_out, d_lse, B, T, NH, NKV, HS, 0);
        rope_backward(d_dqkv, d_table, B, T, NH, NKV, HS, 0);
        std::vector<float> after = download_bf16(d_dqkv, n_qkv);
        poison(d_dqkv, n_qkv * sizeof(floatX)); poison(d_D, n_stat * sizeof(float));
        attention_flash_backward(d_dqkv, d_D, d_dout, d_qkv, d_out, d_lse, B, T, NH, NKV, HS, 0, d_table);
        snprintf(name, sizeof(name), "flash RoPE backward in the epilogue %s dqkv", label);
        compare_bits(name, download_bf16(d_dqkv, n_qkv), after);
        cudaCheck(cudaFree(d_table));
    }
    {   // RoPE's forward in the attention's loads: rope_forward followed by the plain forward, bit
        // for bit (out, lse, and the rotated qkv the backward reads), one and two row tiles a warp
        float *table = rope_table_host(T, HS, 10000.0f);
        float *d_table = upload(std::vector<float>(table, table + (size_t)T * HS));
        free(table);
        floatX *d_rotated = upload_bf16(qkv);
        rope_forward(d_rotated, d_table, B, T, NH, NKV, HS, 0);
        poison(d_out, n_out * sizeof(floatX)); poison(d_lse, n_stat * sizeof(float));
        attention_flash_forward(d_out, d_lse, d_rotated, B, T, NH, NKV, HS, 0);
        std::vector<float> want_out = download_bf16(d_out, n_out), want_lse = download_f32(d_lse, n_stat);
        std::vector<float> want_qkv = download_bf16(d_rotated, n_qkv);
        for (int rw = 1; rw <= (HS == 64 ? 2 : 1); rw++) {
            flash_forward_row_tiles = rw;
            floatX *d_fused = upload_bf16(qkv);
            poison(d_out, n_out * sizeof(floatX)); poison(d_lse, n_stat * sizeof(float));
            rope_forward_keys(d_fused, d_table, B, T, NH, NKV, HS, 0);
            attention_flash_forward_rope(d_out, d_lse, d_fused, B, T, NH, NKV, HS, d_table, d_fused, 0);
            flash_forward_row_tiles = 1;
            snprintf(name, sizeof(name), "flash RoPE forward in the loads rw%d %s out", rw, label);
            compare_bits(name, download_bf16(d_out, n_out), want_out);
            snprintf(name, sizeof(name), "flash RoPE forward in the loads rw%d %s lse", rw, label);
            compare_bits(name, download_f32(d_lse, n_stat), want_lse);
            snprintf(name, sizeof(name), "flash RoPE forward in the loads rw%d %s qkv", rw, label);
            compare_bits(name, download_bf16(d_fused, n_qkv), want_qkv);
            cudaCheck(cudaFree(d_fused));
        }
        for (void *p : {(void *)d_table, (void *)d_rotated}) cudaCheck(cudaFree(p));
    }
    if (HS == 64) {   // the forward with two row tiles per warp against the one-tile forward
        flash_forward_row_tiles = 2;
        poison(d_out, n_out * sizeof(floatX)); poison(d_lse, n_stat * sizeof(float));
        attention_flash_forward(d_out, d_lse, d_qkv, B, T, NH, NKV, HS, 0);
        flash_forward_row_tiles = 1;
        // each query row adds its key tiles in the same order either way: the same bits
        snprintf(name, sizeof(name), "flash forward 2 row tiles %s out", label);
        compare_bits(name, download_bf16(d_out, n_out), out[0]);
        snprintf(name, sizeof(name), "flash forward 2 row tiles %s lse", label);
        compare_bits(name, download_f32(d_lse, n_stat), lse[0]);
    }

    for (int v = 1; v <= 2 && HS == 64 && flash_wgmma_supported(); v++) {   // the warpgroup (wgmma) kernels, all three passes:
                                                                          // the backward's operands in registers (1) or shared memory (2)
        flash_forward_wgmma = 1;
        flash_dq_wgmma = flash_dkv_wgmma = v;
        poison(d_out, n_out * sizeof(floatX)); poison(d_lse, n_stat * sizeof(float));
        poison(d_dqkv, n_qkv * sizeof(floatX)); poison(d_D, n_stat * sizeof(float));
        attention_flash_forward(d_out, d_lse, d_qkv, B, T, NH, NKV, HS, 0);
        std::vector<float> out_wg = download_bf16(d_out, n_out), lse_wg = download_f32(d_lse, n_stat);
        // the backward on the mma.sync forward's out and lse (rerun: it repeats bit for bit), so
        // that dqkv compares the backward alone
        flash_forward_wgmma = 0;
        attention_flash_forward(d_out, d_lse, d_qkv, B, T, NH, NKV, HS, 0);
        poison(d_dqkv, n_qkv * sizeof(floatX)); poison(d_D, n_stat * sizeof(float));
        attention_flash_backward(d_dqkv, d_D, d_dout, d_qkv, d_out, d_lse, B, T, NH, NKV, HS, 0);
        std::vector<float> dqkv_wg = download_bf16(d_dqkv, n_qkv);
        flash_dq_wgmma = flash_dkv_wgmma = 0;
        snprintf(name, sizeof(name), "flash wgmma %d vs mma.sync %s out", v, label); compare(name, out_wg, out[0], TOL_BF16);
        snprintf(name, sizeof(name), "flash wgmma %d vs mma.sync %s lse", v, label); compare(name, lse_wg, lse[0], TOL_F32);
        snprintf(name, sizeof(name), "flash wgmma %d vs mma.sync %s", v, label);
        compare_dqkv(name, dqkv_wg, dqkv[0], 0, B, T, NH, NKV, HS, TOL_BF16);
        // the same sums in the same order: whether the tensor cores round them alike decides
        // whether the tuner may pick them (it takes only bit-equal configurations)
        size_t differ[3] = {0, 0, 0};
        for (size_t i = 0; i < n_out; i++) differ[0] += memcmp(&out_wg[i], &out[0][i], 4) != 0;
        for (size_t i = 0; i < n_stat; i++) differ[1] += memcmp(&lse_wg[i], &lse[0][i], 4) != 0;
        for (size_t i = 0; i < n_qkv; i++) differ[2] += memcmp(&dqkv_wg[i], &dqkv[0][i], 4) != 0;
        printf("info flash wgmma %d vs mma.sync %s: elements with other bits: out %zu of %zu, lse %zu of %zu, dqkv %zu of %zu\n",
               v, label, differ[0], n_out, differ[1], n_stat, differ[2], n_qkv);
    }
    // the pipelined warpgroup forward with one or two warpgroups a block on the rows, then (3) with
    // its warpgroups on the query heads of a kv head where the grouping allows
    for (int wgs = 1; wgs <= 3 && HS == 64 && flash_wgmma_supported(); wgs++) {
        if (wgs == 3 && !flash_heads_per_block(NH, NKV)) break;
        flash_forward_wgmma = 1 + wgs;
        poison(d_out, n_out * sizeof(floatX)); poison(d_lse, n_stat * sizeof(float));
        attention_flash_forward(d_out, d_lse, d_qkv, B, T, NH, NKV, HS, 0);
        flash_forward_wgmma = 0;
        std::vector<float> out_p = download_bf16(d_out, n_out), lse_p = download_f32(d_lse, n_stat);
        const char *how = wgs == 1 ? "1 warpgroup a block" : wgs == 2 ? "2 warpgroups a block" : "warpgroups on the heads";
        snprintf(name, sizeof(name), "flash pipelined wgmma (%s) vs mma.sync %s out", how, label);
        compare(name, out_p, out[0], TOL_BF16);
        snprintf(name, sizeof(name), "flash pipelined wgmma (%s) vs mma.sync %s lse", how, label);
        compare(name, lse_p, lse[0], TOL_F32);
        size_t differ[2] = {0, 0};
        for (size_t i = 0; i < n_out; i++) differ[0] += memcmp(&out_p[i], &out[0][i], 4) != 0;
        for (size_t i = 0; i < n_stat; i++) differ[1] += memcmp(&lse_p[i], &lse[0][i], 4) != 0;
        printf("info flash pipelined wgmma (%s) vs mma.sync %s: elements with other bits: out %zu of %zu, lse %zu of %zu\n",
               how, label, differ[0], n_out, differ[1], n_stat);
    }
    // the pipelined warpgroup dQ and dK/dV passes with one or two warpgroups a block, then (3) the
    // dQ pass with its warpgroups on the query heads of a kv head, the dK/dV pass with two
    for (int wgs = 1; wgs <= 3 && HS == 64 && flash_wgmma_supported(); wgs++) {
        if (wgs == 3 && !flash_heads_per_block(NH, NKV)) break;
        attention_flash_forward(d_out, d_lse, d_qkv, B, T, NH, NKV, HS, 0);   // the mma.sync forward's out and lse
        flash_dq_wgmma = 2 + wgs;
        flash_dkv_wgmma = wgs == 3 ? 4 : 2 + wgs;
        poison(d_dqkv, n_qkv * sizeof(floatX)); poison(d_D, n_stat * sizeof(float));
        attention_flash_backward(d_dqkv, d_D, d_dout, d_qkv, d_out, d_lse, B, T, NH, NKV, HS, 0);
        flash_dq_wgmma = flash_dkv_wgmma = 0;
        std::vector<float> dqkv_p = download_bf16(d_dqkv, n_qkv);
        const char *how = wgs == 1 ? "1 warpgroup a block" : wgs == 2 ? "2 warpgroups a block" : "dQ's warpgroups on the heads";
        snprintf(name, sizeof(name), "flash pipelined wgmma backward (%s) vs mma.sync %s", how, label);
        compare_dqkv(name, dqkv_p, dqkv[0], 0, B, T, NH, NKV, HS, TOL_BF16);
        size_t differ = 0;
        for (size_t i = 0; i < n_qkv; i++) differ += memcmp(&dqkv_p[i], &dqkv[0][i], 4) != 0;
        printf("info flash pipelined wgmma backward (%s) vs mma.sync %s: elements with other bits: dqkv %zu of %zu\n",
               how, label, differ, n_qkv);
    }
    if (HS == 64 && !flash_wgmma_supported()) {
        printf("info flash wgmma %s: not run (the device does not run this build's sm_90a code)\n", label);
    }

    // the simple kernels on the same inputs, every element
    poison(d_out_simple, n_out * sizeof(floatX)); poison(d_lse_simple, n_stat * sizeof(float));
    poison(d_dqkv_simple, n_qkv * sizeof(floatX)); poison(d_D_simple, n_stat * sizeof(float));
    attention_forward(d_out_simple, d_lse_simple, d_qkv, B, T, NH, NKV, HS, 0);
    attention_backward(d_dqkv_simple, d_D_simple, d_dout, d_qkv, d_out_simple, d_lse_simple, B, T, NH, NKV, HS, 0);
    std::vector<float> out_simple = download_bf16(d_out_simple, n_out), lse_simple = download_f32(d_lse_simple, n_stat);
    std::vector<float> dqkv_simple = download_bf16(d_dqkv_simple, n_qkv);
    snprintf(name, sizeof(name), "flash vs simple %s out", label); compare(name, out[0], out_simple, TOL_BF16);
    snprintf(name, sizeof(name), "flash vs simple %s lse", label); compare(name, lse[0], lse_simple, TOL_F32);
    snprintf(name, sizeof(name), "flash vs simple %s", label);
    compare_dqkv(name, dqkv[0], dqkv_simple, 0, B, T, NH, NKV, HS, TOL_BF16);

    // the CPU op on whole batch elements
    std::vector<int> cpu_b;
    if (cpu_all) for (int b = 0; b < B; b++) cpu_b.push_back(b);
    else { cpu_b.push_back(0); if (B > 1) cpu_b.push_back(B - 1); }
    for (int b : cpu_b) {
        std::vector<float> qkv_b = slice(qkv, b, 1, T, QKV, 0, QKV), dout_b = slice(dout, b, 1, T, NH * HS, 0, NH * HS);
        std::vector<float> out_ref((size_t)T * NH * HS), att((size_t)NH * T * T), datt((size_t)NH * T * T);
        std::vector<float> dqkv_ref((size_t)T * QKV, 0.0f);
        attention_forward(out_ref.data(), att.data(), qkv_b.data(), 1, T, NH, NKV, HS);
        attention_backward(dqkv_ref.data(), datt.data(), dout_b.data(), qkv_b.data(), att.data(), 1, T, NH, NKV, HS);
        std::vector<float> lse_ref = reference_lse(qkv, b, 1, T, NH, NKV, HS);
        std::vector<float> lse_b(lse[0].begin() + (size_t)b * NH * T, lse[0].begin() + (size_t)(b + 1) * NH * T);
        snprintf(name, sizeof(name), "flash vs cpu %s b=%d out", label, b);
        compare(name, slice(out[0], b, 1, T, NH * HS, 0, NH * HS), out_ref, TOL_BF16);
        snprintf(name, sizeof(name), "flash vs cpu %s b=%d lse", label, b);
        compare(name, lse_b, lse_ref, TOL_F32);
        snprintf(name, sizeof(name), "flash vs cpu %s b=%d", label, b);
        compare_dqkv(name, dqkv[0], dqkv_ref, b, 1, T, NH, NKV, HS, TOL_BF16);
    }
    for (void *p : {(void *)d_qkv, (void *)d_dout, (void *)d_out, (void *)d_dqkv, (void *)d_out_simple, (void *)d_dqkv_simple,
                    (void *)d_lse, (void *)d_D, (void *)d_lse_simple, (void *)d_D_simple})
        cudaCheck(cudaFree(p));
}

// Forward and backward times of both implementations. Four input sets are rotated so that the
// timed runs do not read one set out of L2.
static void timing(const char *model, int B, int T, int NH, int NKV, int HS) {
    const int SETS = 4;
    int QKV = (NH + 2 * NKV) * HS;
    size_t n_qkv = (size_t)B * T * QKV, n_out = (size_t)B * T * NH * HS, n_stat = (size_t)B * NH * T;
    floatX *qkv[SETS], *dout[SETS], *out[SETS], *dqkv = device_alloc_n<floatX>(n_qkv);
    float *lse[SETS], *D = device_alloc_n<float>(n_stat);
    for (int i = 0; i < SETS; i++) {
        qkv[i] = upload_bf16(random_bf16_values(n_qkv, 1.0f));
        dout[i] = upload_bf16(random_bf16_values(n_out, 1.0f));
        out[i] = device_alloc_n<floatX>(n_out);
        lse[i] = device_alloc_n<float>(n_stat);
    }
    // causal FLOPs actually needed: 2 products of T*T/2 * HS multiply-adds forward, 5 backward
    double fwd_flops = 4.0 * B * NH * (double)T * T / 2 * HS, bwd_flops = 2.5 * fwd_flops;
    for (int flash = 0; flash < 2; flash++) {
        int i = 0;
        float fwd = time_ms([&] {
            i = (i + 1) % SETS;
            if (flash) attention_flash_forward(out[i], lse[i], qkv[i], B, T, NH, NKV, HS, 0);
            else attention_forward(out[i], lse[i], qkv[i], B, T, NH, NKV, HS, 0);
        }, 3, 20);
        float bwd = time_ms([&] {
            i = (i + 1) % SETS;
            if (flash) attention_flash_backward(dqkv, D, dout[i], qkv[i], out[i], lse[i], B, T, NH, NKV, HS, 0);
            else attention_backward(dqkv, D, dout[i], qkv[i], out[i], lse[i], B, T, NH, NKV, HS, 0);
        }, 3, 20);
        printf("time attention %-6s %-13s B=%d T=%d NH=%d NKV=%d HS=%d: forward %7.3f ms (%6.1f TFLOP/s), "
               "backward %7.3f ms (%6.1f TFLOP/s)\n", flash ? "flash" : "simple", model, B, T, NH, NKV, HS, fwd,
               fwd_flops / fwd / 1e9, bwd, bwd_flops / bwd / 1e9);
        if (flash) {   // RoPE's backward in the epilogue against the backward followed by rope_backward
            float *table = rope_table_host(T, HS, 10000.0f);
            float *d_table = upload(std::vector<float>(table, table + (size_t)T * HS));
            free(table);
            float fused = time_ms([&] {
                i = (i + 1) % SETS;
                attention_flash_backward(dqkv, D, dout[i], qkv[i], out[i], lse[i], B, T, NH, NKV, HS, 0, d_table);
            }, 3, 20);
            float separate = time_ms([&] {
                i = (i + 1) % SETS;
                attention_flash_backward(dqkv, D, dout[i], qkv[i], out[i], lse[i], B, T, NH, NKV, HS, 0);
                rope_backward(dqkv, d_table, B, T, NH, NKV, HS, 0);
            }, 3, 20);
            printf("time attention flash  %-13s backward with RoPE's backward in its epilogue %7.3f ms, followed by rope_backward %7.3f ms\n",
                   model, fused, separate);
            // RoPE's forward: the keys by rope_forward_keys and the queries in the forward's loads,
            // against rope_forward on both before the plain forward (each run rotates its set
            // again: the same work every time)
            float fused_fwd = time_ms([&] {
                i = (i + 1) % SETS;
                rope_forward_keys(qkv[i], d_table, B, T, NH, NKV, HS, 0);
                attention_flash_forward_rope(out[i], lse[i], qkv[i], B, T, NH, NKV, HS, d_table, qkv[i], 0);
            }, 3, 20);
            float separate_fwd = time_ms([&] {
                i = (i + 1) % SETS;
                rope_forward(qkv[i], d_table, B, T, NH, NKV, HS, 0);
                attention_flash_forward(out[i], lse[i], qkv[i], B, T, NH, NKV, HS, 0);
            }, 3, 20);
            printf("time attention flash  %-13s forward with RoPE on the queries in its loads (keys by rope_forward_keys) %7.3f ms, "
                   "after rope_forward %7.3f ms\n", model, fused_fwd, separate_fwd);
            cudaCheck(cudaFree(d_table));
        }
        if (flash) {   // the forward with its softmax reference the running max itself (rescaled at every move)
            flash_forward_max_slack = 0.0f;
            float fwd_eager = time_ms([&] {
                i = (i + 1) % SETS;
                attention_flash_forward(out[i], lse[i], qkv[i], B, T, NH, NKV, HS, 0);
            }, 3, 20);
            flash_forward_max_slack = FLASH_MAX_SLACK;
            printf("time attention flash  %-13s forward with the softmax reference trailing the max by up to %g %7.3f ms "
                   "(%6.1f TFLOP/s), following it %7.3f ms (%6.1f TFLOP/s)\n", model, (double)FLASH_MAX_SLACK, fwd,
                   fwd_flops / fwd / 1e9, fwd_eager, fwd_flops / fwd_eager / 1e9);
        }
        if (flash && HS == 64) {   // the forward with two row tiles per warp (128 query rows a block)
            flash_forward_row_tiles = 2;
            float fwd2 = time_ms([&] {
                i = (i + 1) % SETS;
                attention_flash_forward(out[i], lse[i], qkv[i], B, T, NH, NKV, HS, 0);
            }, 3, 20);
            flash_forward_row_tiles = 1;
            printf("time attention flash  %-13s forward with 1 row tile a warp %7.3f ms (%6.1f TFLOP/s), with 2 %7.3f ms (%6.1f TFLOP/s)\n",
                   model, fwd, fwd_flops / fwd / 1e9, fwd2, fwd_flops / fwd2 / 1e9);
        }
        if (flash && HS == 64 && flash_wgmma_supported()) {   // the warpgroup (wgmma) kernels
            flash_forward_wgmma = 1;
            float fwd_wg = time_ms([&] {
                i = (i + 1) % SETS;
                attention_flash_forward(out[i], lse[i], qkv[i], B, T, NH, NKV, HS, 0);
            }, 3, 20);
            flash_forward_wgmma = 0;
            printf("time attention flash  %-13s wgmma forward %7.3f ms (%6.1f TFLOP/s) against mma.sync %7.3f ms\n", model,
                   fwd_wg, fwd_flops / fwd_wg / 1e9, fwd);
            for (int wgs = 1; wgs <= 3; wgs++) {   // pipelined, one or two warpgroups a block, or on the heads (3)
                if (wgs == 3 && !flash_heads_per_block(NH, NKV)) break;
                const char *how = wgs == 1 ? "1 warpgroup a block" : wgs == 2 ? "2 warpgroups a block" : "warpgroups on the heads";
                flash_forward_wgmma = 1 + wgs;
                float fwd_p = time_ms([&] {
                    i = (i + 1) % SETS;
                    attention_flash_forward(out[i], lse[i], qkv[i], B, T, NH, NKV, HS, 0);
                }, 3, 20);
                flash_forward_wgmma = 0;
                printf("time attention flash  %-13s pipelined wgmma forward, %s, %7.3f ms (%6.1f TFLOP/s) against mma.sync "
                       "%7.3f ms\n", model, how, fwd_p, fwd_flops / fwd_p / 1e9, fwd);
                float bwd_p[3];
                for (int v = 0; v < 3; v++) {   // dQ, dK/dV, both pipelined (on the heads: the dQ pass; dK/dV with 2)
                    flash_dq_wgmma = v != 1 ? 2 + wgs : 0;
                    flash_dkv_wgmma = v != 0 ? (wgs == 3 ? 4 : 2 + wgs) : 0;
                    bwd_p[v] = time_ms([&] {
                        i = (i + 1) % SETS;
                        attention_flash_backward(dqkv, D, dout[i], qkv[i], out[i], lse[i], B, T, NH, NKV, HS, 0);
                    }, 3, 20);
                }
                flash_dq_wgmma = flash_dkv_wgmma = 0;
                printf("time attention flash  %-13s pipelined wgmma backward, %s: dQ %7.3f ms, dK/dV %7.3f ms, both %7.3f ms "
                       "(%6.1f TFLOP/s) against mma.sync %7.3f ms (passes side by side)\n", model, how, bwd_p[0], bwd_p[1],
                       bwd_p[2], bwd_flops / bwd_p[2] / 1e9, bwd);
            }
            for (int w = 1; w <= 2; w++) {   // operands in registers (1) or from shared memory (2)
                float bwd_wg[3];
                for (int v = 0; v < 3; v++) {   // dQ, dK/dV, both with warpgroup products
                    flash_dq_wgmma = v != 1 ? w : 0;
                    flash_dkv_wgmma = v != 0 ? w : 0;
                    flash_dq_q_regs = flash_dq_wgmma == 1;
                    flash_dkv_kv_regs = flash_dkv_wgmma == 1;
                    bwd_wg[v] = time_ms([&] {
                        i = (i + 1) % SETS;
                        attention_flash_backward(dqkv, D, dout[i], qkv[i], out[i], lse[i], B, T, NH, NKV, HS, 0);
                    }, 3, 20);
                }
                flash_dq_wgmma = flash_dkv_wgmma = flash_dq_q_regs = flash_dkv_kv_regs = 0;
                printf("time attention flash  %-13s wgmma %d backward (%s): dQ %7.3f ms, dK/dV %7.3f ms, both %7.3f ms "
                       "(%6.1f TFLOP/s) against mma.sync %7.3f ms (passes side by side)\n", model, w,
                       w == 1 ? "operands in registers" : "operands from shared memory", bwd_wg[0], bwd_wg[1], bwd_wg[2],
                       bwd_flops / bwd_wg[2] / 1e9, bwd);
            }
        }
        if (flash) {   // the flash backward's two passes one after the other, against side by side (above)
            flash_backward_side_by_side = 0;
            float serial = time_ms([&] {
                i = (i + 1) % SETS;
                attention_flash_backward(dqkv, D, dout[i], qkv[i], out[i], lse[i], B, T, NH, NKV, HS, 0);
            }, 3, 20);
            flash_backward_side_by_side = 1;
            printf("time attention flash  %-13s backward passes one after the other %7.3f ms (%6.1f TFLOP/s), side by side %7.3f ms\n",
                   model, serial, bwd_flops / serial / 1e9, bwd);
            if (HS == 64) {   // two row tiles per warp in the dQ pass, then in the dK/dV pass, each both ways (one
                              // after the other shows the pass's own gain, side by side what the model sees)
                auto backward_ms = [&] {
                    return time_ms([&] {
                        i = (i + 1) % SETS;
                        attention_flash_backward(dqkv, D, dout[i], qkv[i], out[i], lse[i], B, T, NH, NKV, HS, 0);
                    }, 3, 20);
                };
                int *switches[2] = {&flash_dq_row_tiles, &flash_dkv_row_tiles};
                const char *passes[2] = {"dQ row tile", "dK/dV key row tile"};
                for (int k = 0; k < 2; k++) {
                    *switches[k] = 2;
                    float bwd2 = backward_ms();
                    flash_backward_side_by_side = 0;
                    float serial2 = backward_ms();
                    flash_backward_side_by_side = 1;
                    *switches[k] = 1;
                    printf("time attention flash  %-13s backward with 1 %s a warp %7.3f ms (%6.1f TFLOP/s), with 2 %7.3f ms (%6.1f TFLOP/s)\n",
                           model, passes[k], bwd, bwd_flops / bwd / 1e9, bwd2, bwd_flops / bwd2 / 1e9);
                    printf("time attention flash  %-13s backward passes one after the other with 1 %s a warp %7.3f ms, with 2 %7.3f ms\n",
                           model, passes[k], serial, serial2);
                }
            }
        }
    }
    // the tuning the CUDA model runs on its first forward: every configuration, checked bit for
    // bit against the defaults (a candidate that differs is reported and not used), and its time
    flash_tune_wgmma = 1;   // the warpgroup kernels take part here (checked above); the models' runs ask TRAIN_MORA_FLASH_WGMMA
    FlashTuning t = attention_flash_tune(qkv[0], out[0], lse[0], dout[0], dqkv, D, B, T, NH, NKV, HS, 0, 1);
    printf("time attention flash  %-13s tuned: forward %.3f ms (defaults %.3f), backward %.3f ms (defaults %.3f)\n", model,
           t.forward_ms, t.default_forward_ms, t.backward_ms, t.default_backward_ms);
    printf("time attention flash  %-13s %d of %d configurations gave other bits than the defaults (not used)\n", model,
           t.differed, t.tried);
    char what[320];
    flash_describe(&t.config, what, sizeof(what));
    printf("time attention flash  %-13s chosen: %s\n", model, what);
    flash_set_config(&flash_default_config);
    for (int i = 0; i < SETS; i++)
        for (void *p : {(void *)qkv[i], (void *)dout[i], (void *)out[i], (void *)lse[i]}) cudaCheck(cudaFree(p));
    cudaCheck(cudaFree(dqkv));
    cudaCheck(cudaFree(D));
}

int main(void) {
    harness_require_device("attention_flash");
    harness_seed(61);
    if (flash_wgmma_supported()) check_wgmma_primitives();
    else printf("info wgmma: not checked (the device does not run this build's sm_90a code)\n");
    // small and awkward: T = 1, T below, at and across the 64-row tiles, grouped heads, HS 128
    check(1, 1, 1, 1, 64, 1.0f, true);
    check(2, 37, 4, 2, 64, 1.0f, true);
    check(1, 64, 2, 2, 64, 1.0f, true);
    check(2, 130, 6, 3, 64, 1.0f, true);
    check(1, 200, 4, 1, 128, 1.0f, true);
    check(2, 97, 2, 2, 128, 1.0f, true);
    check(1, 300, 9, 3, 64, 4.0f, true);
    check(1, 150, 4, 2, 128, 4.0f, true);
    // the benchmark shapes: GPT-2 124M and SmolLM2-135M at B = 16, T = 1024
    check(16, 1024, 12, 12, 64, 1.0f, false);
    check(16, 1024, 9, 3, 64, 1.0f, false);
    check(2, 1024, 8, 2, 128, 1.0f, false);
    timing("gpt2-124M", 16, 1024, 12, 12, 64);
    timing("smollm2-135M", 16, 1024, 9, 3, 64);
    timing("hs128", 16, 1024, 8, 2, 128);
    return harness_finish("attention_flash");
}
