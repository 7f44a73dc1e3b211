/*
 * Harness of the rollout engine's decode kernels against CPU references, on fresh random inputs
 * with NaN-poisoned outputs (one PASS/FAIL line per check, exit 1 on any failure):
 *
 *   1. rows_kv_write + decode_attention: RoPE at each row's own position, the KV cache write and
 *      the split attention (fast kernel, 1 and several splits, the reference kernel, the fast
 *      kernel doing the rotation and the cache write itself, write_kv, the fast kernel's
 *      early-loads and staged variants, which must give the default's bits, and the fast kernel applying the
 *      rows' RMSNorm to q, k and v (the folded decode step)) against
 *      a double-precision CPU attention over the bf16 cache, for GPT-2 (NH = NKV), SmolLM2
 *      (group 3), a group of 16 (two head batches per block) and HS 16 / 128, with positions up to
 *      several splits long.
 *   2. the sampler (sampling.cuh): for greedy, temperature, top-k, top-p and both, on rows with
 *      tied logits, the fast kernel's tokens must equal the reference kernel's exactly, and both
 *      must equal a host implementation of the same definition (sorted candidate set, the same
 *      Philox draws) except where two perturbed scores are within rounding (counted, printed);
 *      log-probs against log-softmax in double. The same with the split path's scratch (the row
 *      over several blocks for greedy and plain temperature, the one-block kernel otherwise):
 *      its tokens must equal the one-block and the reference kernel's exactly.
 *   3. sampled frequencies: one row of logits drawn by 16384 rows with their own keys, against
 *      the softmax at the temperature restricted to the top-k/top-p set: a chi-square test at
 *      p = 0.001 (Wilson-Hilferty quantile), and no token outside the set; without and with the
 *      split path's scratch.
 *   4. timings, per call replayed from a CUDA graph as the rollout engine's decode step: the
 *      decode attention for GPT-2 and SmolLM2 at 64 and 256 rows (rows_kv_write + attention
 *      against the attention writing the cache, with the key and value bytes read per second; the
 *      latter also with every call on its own cache, from memory, and in the early-loads and
 *      staged variants;
 *      SmolLM2 also at positions ~72 and below 8, where what is left is the kernel's fixed cost),
 *      and the sampler at V = 50257, 64 and 256 rows (the one-block kernel beside the split path).
 *
 *   build/cuda/dev/rollout_kernels
 */
#include <algorithm>
#include <vector>
#include "harness.h"
#include "rope.cuh"
#include "philox.h"
#include "decode_attention.cuh"
#include "sampling.cuh"

// ---------------------------------------------------------------------------------------------
// 1. attention

static float bf16_round(float x) { return __bfloat162float(__float2bfloat16(x)); }

static void check_attention(const char *label, int NH, int NKV, int HS, int N, int Tmax, int llama) {
    int QKV = (NH + 2 * NKV) * HS, S = N + 1;   // one slot per row plus a spare
    std::vector<float> qkv = random_bf16_values((size_t)N * QKV, 1.0f);
    std::vector<float> cache_k = random_bf16_values((size_t)S * NKV * Tmax * HS, 1.0f);
    std::vector<float> cache_v = random_bf16_values((size_t)S * NKV * Tmax * HS, 1.0f);
    std::vector<int> slot(N), pos(N);
    for (int r = 0; r < N; r++) {
        slot[r] = (r * 7 + 3) % S;   // a permutation of rows to slots, the spare slot unused or used
        pos[r] = r == 0 ? 0 : r == 1 ? Tmax - 1 : (int)(random_u32(&harness_rng) % (uint32_t)Tmax);
    }
    // distinct slots: (r * 7 + 3) mod S is a permutation when gcd(7, S) = 1
    std::vector<int> used(S, 0);
    int distinct = 1;
    for (int r = 0; r < N; r++) distinct &= !used[slot[r]]++;
    if (!distinct) for (int r = 0; r < N; r++) slot[r] = r;
    float *cos_sin = llama ? rope_table_host(Tmax, HS, 10000.0f) : NULL;

    // CPU: rotate q and k (then bf16, as the GPU stores them), write k, v, attend in double
    std::vector<float> q_rot((size_t)N * NH * HS), ref((size_t)N * NH * HS);
    std::vector<float> kc = cache_k, vc = cache_v;
    int half = HS / 2;
    for (int r = 0; r < N; r++) {
        const float *row = &qkv[(size_t)r * QKV];
        for (int hh = 0; hh < NH + 2 * NKV; hh++) {
            for (int i = 0; i < half; i++) {
                float x1 = row[hh * HS + i], x2 = row[hh * HS + i + half];
                if (llama && hh < NH + NKV) {
                    float c = cos_sin[((size_t)pos[r] * half + i) * 2], s = cos_sin[((size_t)pos[r] * half + i) * 2 + 1];
                    float y1 = x1 * c - x2 * s, y2 = x2 * c + x1 * s;
                    x1 = y1; x2 = y2;
                }
                x1 = bf16_round(x1); x2 = bf16_round(x2);
                if (hh < NH) { q_rot[((size_t)r * NH + hh) * HS + i] = x1; q_rot[((size_t)r * NH + hh) * HS + i + half] = x2; }
                else {
                    int kvh = hh < NH + NKV ? hh - NH : hh - NH - NKV;
                    std::vector<float> &cache = hh < NH + NKV ? kc : vc;
                    size_t at = (((size_t)slot[r] * NKV + kvh) * Tmax + pos[r]) * HS;
                    cache[at + i] = x1; cache[at + i + half] = x2;
                }
            }
        }
    }
    for (int r = 0; r < N; r++)
        for (int h = 0; h < NH; h++) {
            int kvh = h / (NH / NKV);
            std::vector<double> sc(pos[r] + 1);
            double m = -1e300;
            for (int t = 0; t <= pos[r]; t++) {
                double d = 0.0;
                for (int i = 0; i < HS; i++)
                    d += (double)q_rot[((size_t)r * NH + h) * HS + i] * kc[(((size_t)slot[r] * NKV + kvh) * Tmax + t) * HS + i];
                sc[t] = d / sqrt((double)HS);
                m = std::max(m, sc[t]);
            }
            double l = 0.0;
            for (int t = 0; t <= pos[r]; t++) { sc[t] = exp(sc[t] - m); l += sc[t]; }
            for (int i = 0; i < HS; i++) {
                double o = 0.0;
                for (int t = 0; t <= pos[r]; t++) o += sc[t] * vc[(((size_t)slot[r] * NKV + kvh) * Tmax + t) * HS + i];
                ref[((size_t)r * NH + h) * HS + i] = (float)(o / l);
            }
        }

    int splits_needed = decode_attention_splits(Tmax);
    float *d_cos_sin = NULL;
    if (llama) {
        d_cos_sin = device_alloc_n<float>((size_t)Tmax * half * 2);
        cudaCheck(cudaMemcpy(d_cos_sin, cos_sin, (size_t)Tmax * half * 2 * sizeof(float), cudaMemcpyHostToDevice));
    }
    int *d_slot = upload(slot), *d_pos = upload(pos), *d_err = device_alloc_n<int>(1);
    floatX *d_out = device_alloc_n<floatX>((size_t)N * NH * HS);
    // (reference, n_splits, write_kv, loads): write_kv = 1 leaves out rows_kv_write, the attention
    // rotates and writes the keys and values itself (the decode step's path; the rows' slots
    // differ); loads is the fast kernel's way to request keys and values (decode_attention_loads):
    // the early-loads and staged variants must give variants 0 and 3 bit for bit
    const int n_variants = 10;
    int variants[n_variants][4] = {{0, splits_needed, 0, 0}, {0, splits_needed + 2, 0, 0}, {1, splits_needed, 0, 0},
                                   {0, splits_needed, 1, 0}, {0, splits_needed + 1, 1, 0},
                                   {0, splits_needed, 0, DECODE_LOADS_EARLY}, {0, splits_needed, 1, DECODE_LOADS_EARLY},
                                   {0, splits_needed, 0, DECODE_LOADS_STAGED}, {0, splits_needed, 1, DECODE_LOADS_STAGED},
                                   {0, splits_needed + 1, 1, DECODE_LOADS_STAGED}};
    const char *names[n_variants] = {"fast", "fast, extra empty splits", "reference", "fast, writing the cache",
                                     "fast, writing the cache, extra split", "fast, early loads",
                                     "fast, writing the cache, early loads", "fast, staged",
                                     "fast, writing the cache, staged", "fast, writing the cache, staged, extra split"};
    std::vector<float> outputs[n_variants];
    for (int v = 0; v < n_variants; v++) {
        int reference = variants[v][0], n_splits = variants[v][1], write_kv = variants[v][2];
        decode_attention_loads = variants[v][3];
        floatX *d_qkv = upload_bf16(qkv), *d_k = upload_bf16(cache_k), *d_v = upload_bf16(cache_v);
        float *part_o = device_alloc_n<float>((size_t)N * NH * n_splits * HS), *part_ml = device_alloc_n<float>((size_t)N * NH * n_splits * 2);
        poison(d_out, (size_t)N * NH * HS * sizeof(floatX));
        poison(part_o, (size_t)N * NH * n_splits * HS * sizeof(float));
        poison(part_ml, (size_t)N * NH * n_splits * 2 * sizeof(float));
        cudaCheck(cudaMemset(d_err, 0, sizeof(int)));
        if (write_kv) {
            decode_attention(d_out, part_o, part_ml, d_qkv, d_k, d_v, d_cos_sin, 1, d_slot, d_pos, N, NH, NKV, HS, S, Tmax,
                             n_splits, 0, d_err, 0);
        } else {
            rows_kv_write(d_qkv, d_k, d_v, d_cos_sin, d_slot, d_pos, N, NH, NKV, HS, S, Tmax, d_err, 0);
            decode_attention(d_out, part_o, part_ml, d_qkv, d_k, d_v, NULL, 0, d_slot, d_pos, N, NH, NKV, HS, S, Tmax,
                             n_splits, reference, d_err, 0);
        }
        decode_attention_loads = DECODE_LOADS_DIRECT;
        std::vector<float> got = download_bf16(d_out, (size_t)N * NH * HS);
        outputs[v] = got;
        int err = 0;
        cudaCheck(cudaMemcpy(&err, d_err, sizeof(int), cudaMemcpyDeviceToHost));
        char what[160];
        snprintf(what, sizeof(what), "%s attention %s (%d splits)", label, names[v], n_splits);
        if (err) { printf("FAIL %-44s error flags %d\n", what, err); harness_failures++; }
        compare(what, got, ref, TOL_BF16);
        // the cache write: the k and v rows at (slot, pos) equal the CPU's
        std::vector<float> gk = download_bf16(d_k, kc.size()), gv = download_bf16(d_v, vc.size());
        snprintf(what, sizeof(what), "%s cache k after write (%s)", label, names[v]);
        compare(what, gk, kc, 1e-4);   // the rotation's rounding may differ by a bf16 step (fma)
        snprintf(what, sizeof(what), "%s cache v after write (%s)", label, names[v]);
        compare(what, gv, vc, 1e-4);
        cudaCheck(cudaFree(d_qkv)); cudaCheck(cudaFree(d_k)); cudaCheck(cudaFree(d_v));
        cudaCheck(cudaFree(part_o)); cudaCheck(cudaFree(part_ml));
    }
    {   // the rows' RMSNorm inside the attention (DecodeRowNorm, the folded decode step): qkv given
        // divided by each row's factor (from random rows x of C = 576), the kernel multiplies it
        // back, so the CPU's reference and cache hold within bf16 rounding
        const int C = 576;
        std::vector<float> x = random_bf16_values((size_t)N * C, 2.0f), unscaled(qkv.size());
        for (int r = 0; r < N; r++) {
            double sq = 0.0;
            for (int c = 0; c < C; c++) sq += (double)x[(size_t)r * C + c] * x[(size_t)r * C + c];
            double rstd = 1.0 / sqrt(sq / C + 1e-5);
            for (size_t i = 0; i < (size_t)QKV; i++)
                unscaled[(size_t)r * QKV + i] = __bfloat162float(__float2bfloat16((float)(qkv[(size_t)r * QKV + i] / rstd)));
        }
        floatX *d_qkv = upload_bf16(unscaled), *d_k = upload_bf16(cache_k), *d_v = upload_bf16(cache_v), *d_x = upload_bf16(x);
        float *part_o = device_alloc_n<float>((size_t)N * NH * splits_needed * HS), *part_ml = device_alloc_n<float>((size_t)N * NH * splits_needed * 2);
        poison(d_out, (size_t)N * NH * HS * sizeof(floatX));
        cudaCheck(cudaMemset(d_err, 0, sizeof(int)));
        DecodeRowNorm norm = {d_x, C, 1e-5f};
        decode_attention(d_out, part_o, part_ml, d_qkv, d_k, d_v, d_cos_sin, 1, d_slot, d_pos, N, NH, NKV, HS, S, Tmax,
                         splits_needed, 0, d_err, 0, &norm);
        int err = 0;
        cudaCheck(cudaMemcpy(&err, d_err, sizeof(int), cudaMemcpyDeviceToHost));
        char what[160];
        snprintf(what, sizeof(what), "%s attention with the rows' norm", label);
        if (err) { printf("FAIL %-44s error flags %d\n", what, err); harness_failures++; }
        compare(what, download_bf16(d_out, (size_t)N * NH * HS), ref, TOL_BF16);
        snprintf(what, sizeof(what), "%s cache k after write (rows' norm)", label);
        compare(what, download_bf16(d_k, kc.size()), kc, TOL_BF16);
        snprintf(what, sizeof(what), "%s cache v after write (rows' norm)", label);
        compare(what, download_bf16(d_v, vc.size()), vc, TOL_BF16);
        for (void *p : {(void *)d_qkv, (void *)d_k, (void *)d_v, (void *)d_x, (void *)part_o, (void *)part_ml}) cudaCheck(cudaFree(p));
    }
    char same[160];
    snprintf(same, sizeof(same), "%s attention early loads vs default", label);
    compare_bits(same, outputs[5], outputs[0]);
    snprintf(same, sizeof(same), "%s attention early loads vs default, writing the cache", label);
    compare_bits(same, outputs[6], outputs[3]);
    snprintf(same, sizeof(same), "%s attention staged vs default", label);
    compare_bits(same, outputs[7], outputs[0]);
    snprintf(same, sizeof(same), "%s attention staged vs default, writing the cache", label);
    compare_bits(same, outputs[8], outputs[3]);
    // a row past the splits' reach is flagged, not read out of bounds
    {
        floatX *d_qkv = upload_bf16(qkv), *d_k = upload_bf16(cache_k), *d_v = upload_bf16(cache_v);
        std::vector<int> far(N, Tmax);   // pos == Tmax: outside the cache
        int *d_far = upload(far);
        cudaCheck(cudaMemset(d_err, 0, sizeof(int)));
        rows_kv_write(d_qkv, d_k, d_v, d_cos_sin, d_slot, d_far, N, NH, NKV, HS, S, Tmax, d_err, 0);
        decode_attention(d_out, NULL, NULL, d_qkv, d_k, d_v, NULL, 0, d_slot, d_far, N, NH, NKV, HS, S, Tmax, 1, 0, d_err, 0);
        int err = 0;
        cudaCheck(cudaDeviceSynchronize());
        cudaCheck(cudaMemcpy(&err, d_err, sizeof(int), cudaMemcpyDeviceToHost));
        int ok = (err & DECODE_ERR_POSITION) != 0;
        printf("%s %-44s error flags %d (expected bit %d)\n", ok ? "PASS" : "FAIL", "position outside the cache is flagged", err, DECODE_ERR_POSITION);
        if (!ok) harness_failures++;
        cudaCheck(cudaFree(d_qkv)); cudaCheck(cudaFree(d_k)); cudaCheck(cudaFree(d_v)); cudaCheck(cudaFree(d_far));
    }
    cudaCheck(cudaFree(d_slot)); cudaCheck(cudaFree(d_pos)); cudaCheck(cudaFree(d_err)); cudaCheck(cudaFree(d_out));
    if (d_cos_sin) cudaCheck(cudaFree(d_cos_sin));
    free(cos_sin);
}

// Milliseconds per call of fn(stream): 20 calls captured into one CUDA graph (as the decode step
// runs them: no launch gaps from the host), the median replay over 20.
template <typename F>
static float graph_time_ms(F fn) {
    const int calls = 20;
    cudaStream_t capture;
    cudaCheck(cudaStreamCreateWithFlags(&capture, cudaStreamNonBlocking));
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    cudaCheck(cudaStreamBeginCapture(capture, cudaStreamCaptureModeThreadLocal));
    for (int i = 0; i < calls; i++) fn(capture);
    cudaCheck(cudaStreamEndCapture(capture, &graph));
    cudaCheck(cudaGraphInstantiate(&exec, graph, 0));
    float ms = time_ms([&] { cudaCheck(cudaGraphLaunch(exec, 0)); }) / calls;
    cudaCheck(cudaGraphExecDestroy(exec));
    cudaCheck(cudaGraphDestroy(graph));
    cudaCheck(cudaStreamDestroy(capture));
    return ms;
}

// The decode step's attention for N rows at positions near `len` (a benchmark's context), per
// layer: rows_kv_write + the attention (the reference path's order) against the attention that
// writes the cache itself (the decode step's), each replayed from a CUDA graph, with the key and
// value bytes read per call over the time. Those calls all read one cache, which stays in L2;
// the attention is timed once more with each call on a cache of its own (as a decode step's
// layers are), enough of them to overflow L2, so the keys and values come from memory.
static void time_attention(const char *label, int NH, int NKV, int HS, int N, int len, int llama) {
    int QKV = (NH + 2 * NKV) * HS, S = N + 1, Tmax = len + 8;
    std::vector<int> slot(N), pos(N);
    size_t kv_bytes = 0;
    for (int r = 0; r < N; r++) {
        slot[r] = r;
        pos[r] = len - 8 + r % 8;
        kv_bytes += (size_t)(pos[r] + 1) * NKV * HS * 2 * sizeof(floatX);
    }
    float *cos_sin = llama ? rope_table_host(Tmax, HS, 10000.0f) : NULL, *d_cos_sin = NULL;
    if (llama) {
        d_cos_sin = device_alloc_n<float>((size_t)Tmax * HS);
        cudaCheck(cudaMemcpy(d_cos_sin, cos_sin, (size_t)Tmax * HS * sizeof(float), cudaMemcpyHostToDevice));
    }
    floatX *d_qkv = upload_bf16(random_bf16_values((size_t)N * QKV, 1.0f));
    floatX *d_k = upload_bf16(random_bf16_values((size_t)S * NKV * Tmax * HS, 1.0f));
    floatX *d_v = upload_bf16(random_bf16_values((size_t)S * NKV * Tmax * HS, 1.0f));
    int *d_slot = upload(slot), *d_pos = upload(pos), *d_err = device_alloc_n<int>(1);
    floatX *d_out = device_alloc_n<floatX>((size_t)N * NH * HS);
    int n_splits = decode_attention_splits(Tmax);
    float *part_o = device_alloc_n<float>((size_t)N * NH * n_splits * HS), *part_ml = device_alloc_n<float>((size_t)N * NH * n_splits * 2);
    cudaCheck(cudaMemset(d_err, 0, sizeof(int)));
    float ms_two = graph_time_ms([&](cudaStream_t st) {
        rows_kv_write(d_qkv, d_k, d_v, d_cos_sin, d_slot, d_pos, N, NH, NKV, HS, S, Tmax, d_err, st);
        decode_attention(d_out, part_o, part_ml, d_qkv, d_k, d_v, NULL, 0, d_slot, d_pos, N, NH, NKV, HS, S, Tmax, n_splits, 0,
                         d_err, st);
    });
    float ms_one = graph_time_ms([&](cudaStream_t st) {
        decode_attention(d_out, part_o, part_ml, d_qkv, d_k, d_v, d_cos_sin, 1, d_slot, d_pos, N, NH, NKV, HS, S, Tmax,
                         n_splits, 0, d_err, st);
    });
    // caches of their own: enough to hold 160 MB (more than the H100's 50 MB of L2), at most 20
    size_t cache_elems = (size_t)S * NKV * Tmax * HS;
    int n_caches = (int)std::min<size_t>(20, std::max<size_t>(1, (160u << 20) / (2 * cache_elems * sizeof(floatX)) + 1));
    std::vector<floatX *> ks(n_caches, d_k), vs(n_caches, d_v);
    for (int i = 1; i < n_caches; i++) {
        ks[i] = device_alloc_n<floatX>(cache_elems);
        vs[i] = device_alloc_n<floatX>(cache_elems);
        cudaCheck(cudaMemcpy(ks[i], d_k, cache_elems * sizeof(floatX), cudaMemcpyDeviceToDevice));
        cudaCheck(cudaMemcpy(vs[i], d_v, cache_elems * sizeof(floatX), cudaMemcpyDeviceToDevice));
    }
    int call = 0;
    auto cold = [&](cudaStream_t st) {
        int i = call++ % n_caches;
        decode_attention(d_out, part_o, part_ml, d_qkv, ks[i], vs[i], d_cos_sin, 1, d_slot, d_pos, N, NH, NKV, HS, S, Tmax,
                         n_splits, 0, d_err, st);
    };
    float ms_cold = graph_time_ms(cold);
    // the early-loads and staged variants of the same kernel (captured with the switch on), from L2
    // and from memory
    float ms_var[2], ms_var_cold[2];
    for (int k = 0; k < 2; k++) {
        decode_attention_loads = k == 0 ? DECODE_LOADS_EARLY : DECODE_LOADS_STAGED;
        ms_var[k] = graph_time_ms([&](cudaStream_t st) {
            decode_attention(d_out, part_o, part_ml, d_qkv, d_k, d_v, d_cos_sin, 1, d_slot, d_pos, N, NH, NKV, HS, S, Tmax,
                             n_splits, 0, d_err, st);
        });
        ms_var_cold[k] = graph_time_ms(cold);
    }
    decode_attention_loads = DECODE_LOADS_DIRECT;
    for (int i = 1; i < n_caches; i++) { cudaCheck(cudaFree(ks[i])); cudaCheck(cudaFree(vs[i])); }
    printf("%-28s N=%d pos ~%d: rows_kv_write + attention %7.2f us | attention writing the cache %7.2f us "
           "(%.0f GB/s of keys and values); from memory (%d caches) %7.2f us (%.0f GB/s) | early loads %7.2f us, "
           "from memory %7.2f us | staged %7.2f us, from memory %7.2f us (%.0f GB/s)\n", label, N, len, ms_two * 1e3,
           ms_one * 1e3, kv_bytes / (ms_one * 1e-3) / 1e9, n_caches, ms_cold * 1e3, kv_bytes / (ms_cold * 1e-3) / 1e9,
           ms_var[0] * 1e3, ms_var_cold[0] * 1e3, ms_var[1] * 1e3, ms_var_cold[1] * 1e3,
           kv_bytes / (ms_var_cold[1] * 1e-3) / 1e9);
    cudaCheck(cudaFree(d_qkv)); cudaCheck(cudaFree(d_k)); cudaCheck(cudaFree(d_v)); cudaCheck(cudaFree(d_slot));
    cudaCheck(cudaFree(d_pos)); cudaCheck(cudaFree(d_err)); cudaCheck(cudaFree(d_out)); cudaCheck(cudaFree(part_o));
    cudaCheck(cudaFree(part_ml));
    if (d_cos_sin) cudaCheck(cudaFree(d_cos_sin));
    free(cos_sin);
}

// ---------------------------------------------------------------------------------------------
// 2. sampler against the host definition

typedef struct { float temperature; int top_k; float top_p; const char *name; } SampleCase;

// The candidate set by the definition in sampling.cuh, on the host: sort by key, top-k prefix,
// then the tokens whose mass before them is below ceil(top_p * total). in_set (V).
static void host_candidate_set(const float *x, int V, const SampleCase &sc, float max_logit, std::vector<char> &in_set) {
    std::vector<int> order(V);
    for (int v = 0; v < V; v++) order[v] = v;
    std::sort(order.begin(), order.end(), [&](int a, int b) { return sample_key(x[a], a) > sample_key(x[b], b); });
    int n = (sc.top_k > 0 && sc.top_k < V) ? sc.top_k : V;
    in_set.assign(V, 0);
    float inv_t = 1.0f / sc.temperature;
    if (sc.top_p < 1.0f) {
        unsigned long long total = 0;
        for (int i = 0; i < n; i++) total += sample_mass(x[order[i]], max_logit, inv_t);
        unsigned long long need = (unsigned long long)ceil((double)sc.top_p * (double)total);
        need = std::max(1ull, std::min(need, total));
        unsigned long long before = 0;
        int keep = 0;
        while (keep < n && before < need) before += sample_mass(x[order[keep++]], max_logit, inv_t);
        n = keep;
    }
    for (int i = 0; i < n; i++) in_set[order[i]] = 1;
}

// Host draw: Gumbel-max over the set with the same Philox bits, scores x / T + G; *margin gets the
// gap between the best and the second-best perturbed score (a mismatch with the GPU within
// rounding shows there).
static int host_draw(const float *x, int V, const SampleCase &sc, const std::vector<char> &in_set,
                     uint64_t key, int step, float *margin) {
    float inv_t = 1.0f / sc.temperature;
    float best = -INFINITY, second = -INFINITY;
    int best_v = -1;
    for (int v = 0; v < V; v++) {
        if (!in_set[v]) continue;
        Philox4x32 bits = philox_sampling_block(key, (uint32_t)(v / 4), (uint32_t)step);
        float u = philox_uniform_open(bits.v[v % 4]);
        float score = x[v] * inv_t + -logf(-logf(u));
        if (score > best) { second = best; best = score; best_v = v; }
        else if (score > second) second = score;
    }
    *margin = best - second;
    return best_v;
}

// The split path's scratch for up to max_rows rows, sized for this GPU's multiprocessors.
static SampleSplitScratch split_scratch_alloc(int max_rows) {
    SampleSplitScratch sp;
    int device = 0;
    cudaCheck(cudaGetDevice(&device));
    cudaCheck(cudaDeviceGetAttribute(&sp.sms, cudaDevAttrMultiProcessorCount, device));
    sp.stats = device_alloc_n<SampleSplitStats>((size_t)max_rows * SAMPLE_SPLIT_MAX_BLOCKS);
    sp.best = device_alloc_n<SampleBest>((size_t)max_rows * SAMPLE_SPLIT_MAX_BLOCKS);
    sp.max_rows = max_rows;
    // NaN partials: a partial read before it is written shows in the result
    poison(sp.stats, (size_t)max_rows * SAMPLE_SPLIT_MAX_BLOCKS * sizeof(SampleSplitStats));
    poison(sp.best, (size_t)max_rows * SAMPLE_SPLIT_MAX_BLOCKS * sizeof(SampleBest));
    return sp;
}
static void split_scratch_free(SampleSplitScratch *sp) {
    cudaCheck(cudaFree(sp->stats));
    cudaCheck(cudaFree(sp->best));
}

static void check_sampler(int V, int rows) {
    int Vp = (V + 127) / 128 * 128;
    std::vector<float> logits((size_t)rows * Vp, 0.0f);
    for (int r = 0; r < rows; r++) {
        float scale = 1.0f + 3.0f * random_f32(&harness_rng);
        for (int v = 0; v < V; v++) logits[(size_t)r * Vp + v] = scale * random_normal(&harness_rng);
        // ties: copies of the row's largest values elsewhere, so order by id matters
        int top = 0;
        for (int v = 1; v < V; v++) if (logits[(size_t)r * Vp + v] > logits[(size_t)r * Vp + top]) top = v;
        for (int k = 0; k < 3; k++) logits[(size_t)r * Vp + (top * 31 + 17 * k + 5) % V] = logits[(size_t)r * Vp + top];
        for (int v = V; v < Vp; v++) logits[(size_t)r * Vp + v] = 1e4f;   // padding columns must be ignored
    }
    std::vector<uint64_t> keys(rows);
    std::vector<int> steps(rows);
    for (int r = 0; r < rows; r++) { keys[r] = rng_seed(500 + r); steps[r] = r % 5; }
    SampleCase cases[] = {
        {0.0f, 0, 1.0f, "greedy"}, {1.0f, 0, 1.0f, "T=1"}, {0.7f, 40, 1.0f, "T=0.7 top-k 40"},
        {1.0f, 0, 0.9f, "T=1 top-p 0.9"}, {1.3f, 200, 0.8f, "T=1.3 top-k 200 top-p 0.8"}, {1.0f, 1, 1.0f, "top-k 1"},
        {0.5f, 0, 0.05f, "T=0.5 top-p 0.05"},
    };
    float *d_logits = upload(logits);
    uint64_t *d_keys = upload(keys);
    int *d_err = device_alloc_n<int>(1), *d_tok = device_alloc_n<int>(rows);
    float *d_lp = device_alloc_n<float>(rows);
    SampleConfig *d_cfg = device_alloc_n<SampleConfig>(1);
    unsigned char *d_flags = device_alloc_n<unsigned char>((size_t)rows * V);
    SampleSplitScratch split = split_scratch_alloc(rows);
    int split_blocks = sample_split_blocks(rows, V, split.sms);
    for (const SampleCase &sc : cases) {
        SampleConfig cfg = {sc.temperature, sc.top_k, sc.top_p, 0};
        cudaCheck(cudaMemcpy(d_cfg, &cfg, sizeof(cfg), cudaMemcpyHostToDevice));
        // variants: 0 the one-block kernel, 1 the reference kernel, 2 with the split path's scratch
        std::vector<int> tok[3];
        std::vector<float> lp[3];
        for (int variant = 0; variant < 3; variant++) {
            int reference = variant == 1;
            // the reference kernel's O(V^2) set is for small vocabularies
            if (reference && V > SAMPLE_REFERENCE_MAX_V && sc.temperature > 0.0f && (sc.top_k > 0 || sc.top_p < 1.0f)) continue;
            int *d_steps = upload(steps);
            poison(d_tok, rows * sizeof(int));
            poison(d_lp, rows * sizeof(float));
            cudaCheck(cudaMemset(d_err, 0, sizeof(int)));
            sample_rows(d_tok, d_lp, d_logits, rows, V, Vp, d_cfg, d_keys, d_steps, NULL, NULL, NULL, -1, d_err, reference, d_flags,
                        variant == 2 ? &split : NULL, 0);
            cudaCheck(cudaDeviceSynchronize());
            tok[variant].resize(rows);
            lp[variant] = download_f32(d_lp, rows);
            cudaCheck(cudaMemcpy(tok[variant].data(), d_tok, rows * sizeof(int), cudaMemcpyDeviceToHost));
            int err = 0;
            cudaCheck(cudaMemcpy(&err, d_err, sizeof(int), cudaMemcpyDeviceToHost));
            if (err) { printf("FAIL sampler V=%d %s: error flags %d\n", V, sc.name, err); harness_failures++; }
            cudaCheck(cudaFree(d_steps));
        }
        // against the host definition
        int mismatches = 0, explained = 0;
        float worst_margin = 0.0f;
        std::vector<float> ref_lp(rows), got_lp(rows), split_ref_lp(rows), split_lp(rows);
        for (int r = 0; r < rows; r++) {
            const float *x = &logits[(size_t)r * Vp];
            float m = x[0];
            int arg = 0;
            for (int v = 1; v < V; v++) if (x[v] > m) { m = x[v]; arg = v; }
            double sum = 0.0;
            for (int v = 0; v < V; v++) sum += exp((double)x[v] - m);
            int want;
            float margin = INFINITY;
            if (sc.temperature == 0.0f) want = arg;
            else {
                std::vector<char> in_set;
                host_candidate_set(x, V, sc, m, in_set);
                want = host_draw(x, V, sc, in_set, keys[r], steps[r], &margin);
            }
            int got = tok[0][r], got_split = tok[2][r];
            if (got_split >= 0 && got_split < V) {   // else it differs from the one-block kernel's (checked below)
                split_ref_lp[r] = (float)(x[got_split] - (m + log(sum)));
                split_lp[r] = lp[2][r];
            }
            if (got < 0 || got >= V) { mismatches++; continue; }
            ref_lp[r] = (float)(x[got] - (m + log(sum)));
            got_lp[r] = lp[0][r];
            if (got != want) {
                mismatches++;
                if (margin < 1e-4f) { explained++; worst_margin = std::max(worst_margin, margin); }
            }
        }
        int ok = mismatches == explained && mismatches <= rows / 50;
        if (!ok) harness_failures++;
        printf("%s sampler V=%-6d %-26s fast vs host definition: %d of %d tokens differ (%d at score gaps < 1e-4, largest %.2e)\n",
               ok ? "PASS" : "FAIL", V, sc.name, mismatches, rows, explained, worst_margin);
        char what[160];
        snprintf(what, sizeof(what), "sampler V=%d %s log-probs", V, sc.name);
        compare(what, got_lp, ref_lp, 1e-5);
        if (!tok[1].empty()) {
            int differ = 0;
            for (int r = 0; r < rows; r++) differ += tok[0][r] != tok[1][r];
            int ok2 = differ == 0;
            if (!ok2) harness_failures++;
            printf("%s sampler V=%-6d %-26s fast vs reference kernel: %d of %d tokens differ (must be 0)\n", ok2 ? "PASS" : "FAIL",
                   V, sc.name, differ, rows);
        }
        // the split path (split_blocks blocks per row where the config is its own)
        for (int other = 0; other < 2; other++) {
            if (tok[other].empty()) continue;
            int differ = 0;
            for (int r = 0; r < rows; r++) differ += tok[2][r] != tok[other][r];
            int ok3 = differ == 0;
            if (!ok3) harness_failures++;
            printf("%s sampler V=%-6d %-26s split scratch (%d blocks per row) vs %s kernel: %d of %d tokens differ (must be 0)\n",
                   ok3 ? "PASS" : "FAIL", V, sc.name, split_blocks, other ? "reference" : "one-block", differ, rows);
        }
        snprintf(what, sizeof(what), "sampler V=%d %s log-probs, split scratch", V, sc.name);
        compare(what, split_lp, split_ref_lp, 1e-5);
    }
    cudaCheck(cudaFree(d_logits)); cudaCheck(cudaFree(d_keys)); cudaCheck(cudaFree(d_err)); cudaCheck(cudaFree(d_tok));
    cudaCheck(cudaFree(d_lp)); cudaCheck(cudaFree(d_cfg)); cudaCheck(cudaFree(d_flags));
    split_scratch_free(&split);
}

// ---------------------------------------------------------------------------------------------
// 3. frequencies

// Upper p-quantile of chi-square with k degrees of freedom (Wilson-Hilferty), z the normal quantile.
static double chi2_quantile(int k, double z) {
    double a = 2.0 / (9.0 * k);
    double c = 1.0 - a + z * sqrt(a);
    return k * c * c * c;
}

static void check_frequencies(void) {
    const int V = 64, Vp = 128, rows = 16384;
    std::vector<float> row(Vp, -1e4f);   // padding columns would be drawn if read
    for (int v = 0; v < V; v++) row[v] = 1.5f * random_normal(&harness_rng);
    std::vector<float> logits((size_t)rows * Vp);
    for (int r = 0; r < rows; r++) std::copy(row.begin(), row.end(), logits.begin() + (size_t)r * Vp);
    std::vector<uint64_t> keys(rows);
    for (int r = 0; r < rows; r++) keys[r] = rng_seed(90000 + r);
    std::vector<int> steps(rows, 3);
    float *d_logits = upload(logits);
    uint64_t *d_keys = upload(keys);
    int *d_steps = upload(steps), *d_err = device_alloc_n<int>(1), *d_tok = device_alloc_n<int>(rows);
    float *d_lp = device_alloc_n<float>(rows);
    SampleConfig *d_cfg = device_alloc_n<SampleConfig>(1);
    SampleCase cases[] = {{1.0f, 0, 1.0f, "T=1"}, {0.6f, 0, 1.0f, "T=0.6"}, {1.0f, 10, 1.0f, "T=1 top-k 10"},
                          {1.2f, 0, 0.7f, "T=1.2 top-p 0.7"}, {0.8f, 20, 0.9f, "T=0.8 top-k 20 top-p 0.9"}};
    float m = *std::max_element(row.begin(), row.begin() + V);
    SampleSplitScratch split = split_scratch_alloc(rows);
    for (int with_split = 0; with_split < 2; with_split++) {
        for (const SampleCase &sc : cases) {
            SampleConfig cfg = {sc.temperature, sc.top_k, sc.top_p, 0};
            cudaCheck(cudaMemcpy(d_cfg, &cfg, sizeof(cfg), cudaMemcpyHostToDevice));
            cudaCheck(cudaMemset(d_err, 0, sizeof(int)));
            poison(d_tok, rows * sizeof(int));
            sample_rows(d_tok, d_lp, d_logits, rows, V, Vp, d_cfg, d_keys, d_steps, NULL, NULL, NULL, -1, d_err, 0, NULL,
                        with_split ? &split : NULL, 0);
            std::vector<int> tok(rows);
            cudaCheck(cudaDeviceSynchronize());
            cudaCheck(cudaMemcpy(tok.data(), d_tok, rows * sizeof(int), cudaMemcpyDeviceToHost));
            std::vector<char> in_set;
            host_candidate_set(row.data(), V, sc, m, in_set);
            std::vector<double> p(V, 0.0);
            double z = 0.0;
            for (int v = 0; v < V; v++) if (in_set[v]) { p[v] = exp(((double)row[v] - m) / sc.temperature); z += p[v]; }
            std::vector<long> count(V, 0);
            int outside = 0;
            for (int r = 0; r < rows; r++) {
                if (tok[r] < 0 || tok[r] >= V || !in_set[tok[r]]) { outside++; continue; }
                count[tok[r]]++;
            }
            // bins with expected count >= 5; the rest of the set pooled into one bin
            double chi2 = 0.0, pooled_e = 0.0, pooled_o = 0.0;
            int bins = 0;
            for (int v = 0; v < V; v++) {
                if (!in_set[v]) continue;
                double e = rows * p[v] / z;
                if (e >= 5.0) { chi2 += (count[v] - e) * (count[v] - e) / e; bins++; }
                else { pooled_e += e; pooled_o += count[v]; }
            }
            if (pooled_e >= 5.0) { chi2 += (pooled_o - pooled_e) * (pooled_o - pooled_e) / pooled_e; bins++; }
            int dof = bins - 1;
            double crit = dof > 0 ? chi2_quantile(dof, 3.0902) : 0.0;   // z of the upper 0.001 tail
            int ok = outside == 0 && (dof <= 0 || chi2 <= crit);
            if (!ok) harness_failures++;
            printf("%s frequencies %-26s %s chi2 %.1f on %d dof (critical %.1f at p=0.001), %d draws outside the set of %d tokens\n",
                   ok ? "PASS" : "FAIL", sc.name, with_split ? "split scratch" : "one-block    ", chi2, dof, crit, outside,
                   (int)std::count(in_set.begin(), in_set.end(), 1));
        }
    }
    cudaCheck(cudaFree(d_logits)); cudaCheck(cudaFree(d_keys)); cudaCheck(cudaFree(d_steps)); cudaCheck(cudaFree(d_err));
    cudaCheck(cudaFree(d_tok)); cudaCheck(cudaFree(d_lp)); cudaCheck(cudaFree(d_cfg));
    split_scratch_free(&split);
}

// ---------------------------------------------------------------------------------------------
// 4. sampler timings

// Microseconds per sample_rows call of the one-block kernel alone and with the split path's
// scratch, for rows rows of V random logits: a CUDA graph of `calls` calls (as the decode step
// replays them: launch gaps included, host launch costs not) timed by time_ms.
static void time_sampler(int rows, int V) {
    const int calls = 20;
    int Vp = (V + 127) / 128 * 128;
    std::vector<float> logits = random_f32_values((size_t)rows * Vp, 3.0f);
    std::vector<uint64_t> keys(rows);
    std::vector<int> steps(rows);
    for (int r = 0; r < rows; r++) { keys[r] = rng_seed(7000 + r); steps[r] = r; }
    float *d_logits = upload(logits);
    uint64_t *d_keys = upload(keys);
    int *d_steps = upload(steps), *d_err = device_alloc_n<int>(1), *d_tok = device_alloc_n<int>(rows);
    float *d_lp = device_alloc_n<float>(rows);
    SampleConfig *d_cfg = device_alloc_n<SampleConfig>(1);
    SampleSplitScratch split = split_scratch_alloc(rows);
    cudaStream_t capture;
    cudaCheck(cudaStreamCreateWithFlags(&capture, cudaStreamNonBlocking));
    SampleCase cases[] = {{0.0f, 0, 1.0f, "greedy"}, {1.0f, 0, 1.0f, "T=1"}, {1.0f, 50, 1.0f, "T=1 top-k 50"}};
    for (const SampleCase &sc : cases) {
        SampleConfig cfg = {sc.temperature, sc.top_k, sc.top_p, 0};
        cudaCheck(cudaMemcpy(d_cfg, &cfg, sizeof(cfg), cudaMemcpyHostToDevice));
        cudaCheck(cudaMemset(d_err, 0, sizeof(int)));
        float us[2];
        for (int with_split = 0; with_split < 2; with_split++) {
            cudaGraph_t graph;
            cudaGraphExec_t exec;
            cudaCheck(cudaStreamBeginCapture(capture, cudaStreamCaptureModeThreadLocal));
            for (int i = 0; i < calls; i++)
                sample_rows(d_tok, d_lp, d_logits, rows, V, Vp, d_cfg, d_keys, d_steps, NULL, NULL, NULL, -1, d_err, 0, NULL,
                            with_split ? &split : NULL, capture);
            cudaCheck(cudaStreamEndCapture(capture, &graph));
            cudaCheck(cudaGraphInstantiate(&exec, graph, 0));
            us[with_split] = 1000.0f * time_ms([&] { cudaCheck(cudaGraphLaunch(exec, 0)); }) / calls;
            cudaCheck(cudaGraphExecDestroy(exec));
            cudaCheck(cudaGraphDestroy(graph));
        }
        int err = 0;
        cudaCheck(cudaMemcpy(&err, d_err, sizeof(int), cudaMemcpyDeviceToHost));
        if (err) { printf("FAIL sampler timing rows=%d %s: error flags %d\n", rows, sc.name, err); harness_failures++; }
        const char *path = sample_split_config(sc.temperature, sc.top_k, sc.top_p, V) ? "split path" : "one-block path";
        printf("     sampler time rows=%-4d V=%d %-14s one-block %7.1f us | with split scratch (%s, %d blocks per row) %7.1f us\n",
               rows, V, sc.name, us[0], path, sample_split_blocks(rows, V, split.sms), us[1]);
    }
    cudaCheck(cudaStreamDestroy(capture));
    cudaCheck(cudaFree(d_logits)); cudaCheck(cudaFree(d_keys)); cudaCheck(cudaFree(d_steps)); cudaCheck(cudaFree(d_err));
    cudaCheck(cudaFree(d_tok)); cudaCheck(cudaFree(d_lp)); cudaCheck(cudaFree(d_cfg));
    split_scratch_free(&split);
}

int main(void) {
    harness_require_device("rollout_kernels");
    harness_seed(2024);
    sampling_setup();
    printf("-- decode attention (RoPE + cache write + split attention) against the CPU in double\n");
    check_attention("gpt2 NH=12 HS=64", 12, 12, 64, 6, 300, 0);
    check_attention("smollm2 NH=9 NKV=3 HS=64", 9, 3, 64, 8, 700, 1);
    check_attention("group 16 NH=32 NKV=2 HS=128", 32, 2, 128, 3, 520, 1);
    check_attention("tiny NH=4 NKV=2 HS=16", 4, 2, 16, 5, 40, 1);
    printf("-- decode attention timings (per layer and call, from a CUDA graph)\n");
    time_attention("gpt2 NH=12 HS=64", 12, 12, 64, 64, 192, 0);
    time_attention("smollm2 NH=9 NKV=3 HS=64", 9, 3, 64, 64, 192, 1);
    time_attention("smollm2 NH=9 NKV=3 HS=64", 9, 3, 64, 64, 72, 1);
    time_attention("smollm2 NH=9 NKV=3 HS=64, first", 9, 3, 64, 64, 8, 1);
    time_attention("gpt2 NH=12 HS=64", 12, 12, 64, 256, 192, 0);
    time_attention("gpt2 NH=12 HS=64, long", 12, 12, 64, 64, 1000, 0);
    printf("-- sampler against the host definition (same Philox draws)\n");
    check_sampler(1000, 96);
    check_sampler(9001, 64);
    check_sampler(50257, 24);
    printf("-- sampled frequencies against the softmax\n");
    check_frequencies();
    printf("-- sampler timings (per call, from a CUDA graph)\n");
    time_sampler(64, 50257);
    time_sampler(256, 50257);
    return harness_finish("rollout_kernels");
}
