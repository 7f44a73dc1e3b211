/*
 * Harness for global_norm.cuh: the L2 norm of a gradient buffer against a double-precision sum
 * on the host, for sizes smaller than one block, not a multiple of anything, and GPT-2 124M's
 * parameter count; checks that two runs give the same bits (the reduction order is fixed). The
 * same for the norm of pieces of the buffer (global_norm_pieces into two slots of partials, added
 * by global_norm_finish: how the model sums each layer's gradient in its backward), with pieces
 * on and off 16 bytes; and times both, the pieces as SmolLM2-135M's layers cut them.
 *   build/cuda/dev/global_norm
 */
#include "harness.h"
#include "global_norm.cuh"

static void check(size_t n) {
    char name[128];
    std::vector<float> g = random_f32_values(n, 0.01f);
    double sum = 0.0;
    for (size_t i = 0; i < n; i++) sum += (double)g[i] * g[i];
    float ref = (float)sqrt(sum);
    float *d_g = upload(g), *d_partial = device_alloc_n<float>(GLOBAL_NORM_BLOCKS), *d_out = device_alloc_n<float>(1);
    poison(d_out, sizeof(float));
    global_norm(d_out, d_partial, d_g, n, 0);
    float first = download_f32(d_out, 1)[0];
    global_norm(d_out, d_partial, d_g, n, 0);
    float second = download_f32(d_out, 1)[0];
    snprintf(name, sizeof(name), "global_norm n=%zu", n);
    compare(name, &first, &ref, 1, 1e-5);
    int same = memcmp(&first, &second, sizeof(float)) == 0;
    if (!same) harness_failures++;
    printf("%s global_norm n=%zu repeated run gives the same bits (%.9g vs %.9g)\n", same ? "PASS" : "FAIL", n, first, second);
    for (void *p : {(void *)d_g, (void *)d_partial, (void *)d_out}) cudaCheck(cudaFree(p));
}

// pieces (offset, length) of a buffer of n, the first `first` into the first slot of partials
static void check_pieces(size_t n, const std::vector<std::pair<size_t, size_t>> &pieces, int first) {
    std::vector<float> g = random_f32_values(n, 0.01f);
    float *d_g = upload(g), *d_partial = device_alloc_n<float>(2 * GLOBAL_NORM_PIECE_BLOCKS), *d_out = device_alloc_n<float>(1);
    NormPieces slot[2];
    memset(slot, 0, sizeof(slot));
    double sum = 0.0;
    for (size_t p = 0; p < pieces.size(); p++) {
        NormPieces &s = slot[(int)p < first ? 0 : 1];
        s.ptr[s.count] = d_g + pieces[p].first;
        s.n[s.count++] = pieces[p].second;
        for (size_t i = pieces[p].first; i < pieces[p].first + pieces[p].second; i++) sum += (double)g[i] * g[i];
    }
    float ref = (float)sqrt(sum), got[2];
    for (int run = 0; run < 2; run++) {
        poison(d_out, sizeof(float));
        for (int k = 0; k < 2; k++) global_norm_pieces(d_partial + k * GLOBAL_NORM_PIECE_BLOCKS, &slot[k], 0);
        global_norm_finish(d_out, d_partial, 2 * GLOBAL_NORM_PIECE_BLOCKS, 0);
        got[run] = download_f32(d_out, 1)[0];
    }
    char name[128];
    snprintf(name, sizeof(name), "global_norm_pieces n=%zu, %zu pieces", n, pieces.size());
    compare(name, &got[0], &ref, 1, 1e-5);
    int same = memcmp(&got[0], &got[1], sizeof(float)) == 0;
    if (!same) harness_failures++;
    printf("%s %s repeated run gives the same bits (%.9g vs %.9g)\n", same ? "PASS" : "FAIL", name, got[0], got[1]);
    for (void *p : {(void *)d_g, (void *)d_partial, (void *)d_out}) cudaCheck(cudaFree(p));
}

int main(void) {
    harness_require_device("global_norm");
    harness_seed(9);
    check(1); check(777); check(1000003); check(124475904);
    check_pieces(5000, {{0, 4096}}, 1);
    check_pieces(5000, {{3, 997}, {1001, 1}, {1100, 0}, {1200, 2001}, {4800, 200}}, 2);
    check_pieces(3000000, {{0, 1000000}, {1000001, 999999}, {2000000, 1000000}}, 3);
    size_t n = 124475904;
    float *g = upload(random_f32_values(n, 1.0f)), *partial = device_alloc_n<float>(GLOBAL_NORM_BLOCKS), *out = device_alloc_n<float>(1);
    float ms = time_ms([&] { global_norm(out, partial, g, n, 0); });
    printf("time global_norm n=%zu: %.3f ms (%.0f GB/s)\n", n, ms, 4.0 * n / ms / 1e6);
    // SmolLM2-135M's layers as the backward sums them: each layer's slices of the six stacked
    // tensors (30 layers, C 576, q/k/v rows 960, MLP 1536), the tensors one after another
    const int L = 30;
    const size_t per_layer[6] = {576, 960 * 576, 576 * 576, 576, 2 * 1536 * 576, 576 * 1536};
    size_t total = 0;
    for (size_t t : per_layer) total += t * L;
    float *sums = device_alloc_n<float>((size_t)L * GLOBAL_NORM_PIECE_BLOCKS);
    float layer_ms = time_ms([&] {
        for (int l = 0; l < L; l++) {
            NormPieces pieces;
            memset(&pieces, 0, sizeof(pieces));
            size_t offset = 0;
            for (size_t t : per_layer) {
                pieces.ptr[pieces.count] = g + offset + (size_t)l * t;
                pieces.n[pieces.count++] = t;
                offset += t * L;
            }
            global_norm_pieces(sums + (size_t)l * GLOBAL_NORM_PIECE_BLOCKS, &pieces, 0);
        }
    });
    float whole_ms = time_ms([&] { global_norm(out, partial, g, total, 0); });
    printf("time global_norm_pieces, SmolLM2-135M's %d layers (%zu floats): %.3f ms in all, %.4f ms a layer (%.0f GB/s); "
           "global_norm on the same floats %.3f ms\n", L, total, layer_ms, layer_ms / L, 4.0 * total / layer_ms / 1e6, whole_ms);
    cudaCheck(cudaFree(sums));
    return harness_finish("global_norm");
}
