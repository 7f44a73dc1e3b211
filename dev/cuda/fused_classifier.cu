/*
 * Harness for fused_classifier.cuh: log-sum-exp, masked per-token losses and the logits'
 * gradient (written over the logits) against classifier_forward / classifier_backward of
 * ops_cpu.c, with padded vocabularies (V < Vp: the padded columns must get gradient 0), masked
 * rows (loss 0, gradient 0) and the separate backward kernel; the scalar, 8-wide and staged (row
 * in shared memory) kernels, the staged one also bit for bit against the 8-wide one. Then timing
 * at GPT-2's vocabulary (B*T = 16384 rows, Vp = 50304).
 *   build/cuda/dev/fused_classifier
 */
#include "harness.h"
#include "fused_classifier.cuh"

static const char *kind_names[3] = {"", " (x8)", " (staged)"};

// kind: 0 scalar, 1 8-wide, 2 staged (its forward; the 8-wide separate backward)
static void check(int N, int V, int Vp, int fused, int kind) {
    int vec = kind >= 1;
    char name[160];
    size_t n = (size_t)N * Vp;
    std::vector<float> logits = random_bf16_values(n, 3.0f);
    std::vector<int> targets = random_tokens(N, V);
    std::vector<float> mask(N), weights(N);
    for (int i = 0; i < N; i++) {
        mask[i] = i % 5 == 3 ? 0.0f : 1.0f;
        weights[i] = mask[i] != 0.0f ? 0.5f + (float)(i % 3) : 0.0f;
        if (mask[i] == 0.0f) targets[i] = -7;   // ignored where the mask is 0
    }
    std::vector<float> losses(N), lse(N), dlogits(n, 0.0f);
    classifier_forward(losses.data(), lse.data(), logits.data(), targets.data(), mask.data(), N, V, Vp);
    classifier_backward(dlogits.data(), logits.data(), lse.data(), targets.data(), weights.data(), N, V, Vp);

    floatX *d_logits = upload_bf16(logits);
    int *d_targets = upload(targets);
    float *d_mask = upload(mask), *d_weights = upload(weights), *d_losses = device_alloc_n<float>(N), *d_lse = device_alloc_n<float>(N);
    poison(d_losses, N * sizeof(float)); poison(d_lse, N * sizeof(float));
    auto forward = kind == 2 ? fused_classifier_staged : vec ? fused_classifier_vec8 : fused_classifier_scalar;
    auto backward = vec ? classifier_backward_vec8 : classifier_backward_scalar;
    if (fused) {
        forward(d_logits, d_lse, d_losses, d_targets, d_mask, d_weights, N, V, Vp, 0);
    } else {
        forward(d_logits, d_lse, d_losses, d_targets, d_mask, NULL, N, V, Vp, 0);
        snprintf(name, sizeof(name), "classifier%s forward keeps the logits N=%d V=%d Vp=%d", kind_names[kind], N, V, Vp);
        compare(name, download_bf16(d_logits, n), logits, 0.0);
        backward(d_logits, d_lse, d_targets, d_weights, N, V, Vp, 0);
    }
    char how[64];
    snprintf(how, sizeof(how), "%s%s", fused ? "fused" : "separate", kind_names[kind]);
    snprintf(name, sizeof(name), "classifier %s N=%d V=%d Vp=%d lse", how, N, V, Vp);
    compare(name, download_f32(d_lse, N), lse, TOL_F32);
    snprintf(name, sizeof(name), "classifier %s N=%d V=%d Vp=%d losses", how, N, V, Vp);
    compare(name, download_f32(d_losses, N), losses, TOL_F32);
    snprintf(name, sizeof(name), "classifier %s N=%d V=%d Vp=%d dlogits", how, N, V, Vp);
    compare(name, download_bf16(d_logits, n), dlogits, TOL_BF16);
    if (kind == 2 && fused) {   // the staged kernel's arithmetic is the 8-wide one's: the same bits
        std::vector<float> staged_grad = download_bf16(d_logits, n), staged_lse = download_f32(d_lse, N);
        floatX *fresh = upload_bf16(logits);
        fused_classifier_vec8(fresh, d_lse, d_losses, d_targets, d_mask, d_weights, N, V, Vp, 0);
        snprintf(name, sizeof(name), "classifier staged vs x8 N=%d V=%d Vp=%d dlogits", N, V, Vp);
        compare_bits(name, staged_grad, download_bf16(fresh, n));
        snprintf(name, sizeof(name), "classifier staged vs x8 N=%d V=%d Vp=%d lse", N, V, Vp);
        compare_bits(name, staged_lse, download_f32(d_lse, N));
        cudaCheck(cudaFree(fresh));
    }
    for (void *p : {(void *)d_logits, (void *)d_targets, (void *)d_mask, (void *)d_weights, (void *)d_losses, (void *)d_lse}) cudaCheck(cudaFree(p));
}

int main(void) {
    harness_require_device("fused_classifier");
    harness_seed(7);
    for (int fused = 0; fused <= 1; fused++) {
        for (int kind = 0; kind <= 2; kind++) {   // the 8-wide and staged kernels need Vp a multiple of 8
            if (kind == 0) check(3, 1, 1, fused, kind);
            check(10, 100, 128, fused, kind);
            check(33, 5000, 5000, fused, kind);
            check(7, 4093, 4096, fused, kind);
            check(64, 50257, 50304, fused, kind);
        }
    }
    int N = 16 * 1024, V = 50257, Vp = 50304;
    size_t n = (size_t)N * Vp;
    floatX *logits = upload_bf16(random_bf16_values(n, 1.0f));
    int *targets = upload(random_tokens(N, V));
    float *weights = upload(std::vector<float>(N, 1.0f / N)), *losses = device_alloc_n<float>(N), *lse = device_alloc_n<float>(N);
    // the timed runs overwrite the logits with gradients: the next run reads those, which costs the same
    for (int kind = 0; kind <= 2; kind++) {
        auto forward = kind == 2 ? fused_classifier_staged : kind == 1 ? fused_classifier_vec8 : fused_classifier_scalar;
        float ms = time_ms([&] { forward(logits, lse, losses, targets, NULL, weights, N, V, Vp, 0); }, 2, 10);
        printf("time fused classifier%s N=%d Vp=%d: %.3f ms (%.0f GB/s counting one read and one write of the logits)\n",
               kind_names[kind], N, Vp, ms, 4.0 * n / ms / 1e6);
    }
    return harness_finish("fused_classifier");
}
