/*
 * Runs the classifier kernels of llmc/fused_classifier.cuh on the CPU through their host entry
 * points: the scalar kernels (fused_classifier_scalar, classifier_backward_scalar), the 8-wide
 * ones (fused_classifier_vec8, classifier_backward_vec8), the staged one (fused_classifier_staged,
 * its row copied to shared memory; with the 8-wide backward) and the pick between them
 * (fused_classifier, classifier_backward), so that their indexing, online softmax and gradient
 * are checked on a machine without a GPU (test/test_fused_classifier_emu.py compares the results
 * with a NumPy float64 oracle).
 *
 * The kernels' source is compiled as C++ under the GPU emulation of test/gpu_emu.h with the
 * runtime of test/gpu_emu_runtime.h; the test's build copies llmc/fused_classifier.cuh with each
 * launch rewritten into an emu_launch call (test/gpu_emu.py). lse and losses start as NaN.
 *
 *   fused_classifier_emu IN OUT forward|reverse
 *     IN : int32 N, V, Vp, kernel (0 scalar, 1 8-wide, 2 picked, 3 staged), mode (0 forward without
 *          weights, 1 forward with the gradient, 2 forward then the separate backward), has_mask,
 *          misalign (the logits start 2 bytes past a 256-byte boundary);
 *          float32 logits (N, Vp), representable in bf16; int32 targets (N); float32 mask (N)
 *          when has_mask; float32 weights (N)
 *     OUT: float32 lse (N), losses (N), the logits buffer afterwards (N, Vp)
 */
#define EMU_PROGRAM "fused_classifier_emu"
#define EMU_STATIC_SHARED
#include "gpu_emu_runtime.h"
#include "fused_classifier_launched.cuh"   // llmc/fused_classifier.cuh with its launches rewritten

// ---------------------------------------------------------------------------------------------

int main(int argc, char **argv) {
    FILE *f = emu_open_input(argc, argv, 32 * sizeof(float));   // the block reductions' partials
    int32_t dims[7];
    if (fread(dims, sizeof(int32_t), 7, f) != 7) { fprintf(stderr, "error: %s: no header\n", argv[1]); return 1; }
    int N = dims[0], V = dims[1], Vp = dims[2], kernel = dims[3], mode = dims[4], has_mask = dims[5], misalign = dims[6];
    if (N < 1 || V < 1 || Vp < V || kernel < 0 || kernel > 3 || mode < 0 || mode > 2) {
        fprintf(stderr, "error: %s: bad header N=%d V=%d Vp=%d kernel=%d mode=%d\n", argv[1], N, V, Vp, kernel, mode);
        return 1;
    }
    size_t n = (size_t)N * Vp;
    std::vector<float> x = read_floats(f, n, argv[1]);
    std::vector<int32_t> targets_host(N);
    if (fread(targets_host.data(), sizeof(int32_t), N, f) != (size_t)N) { fprintf(stderr, "error: %s: no targets\n", argv[1]); return 1; }
    std::vector<float> mask_host = has_mask ? read_floats(f, N, argv[1]) : std::vector<float>();
    std::vector<float> weights_host = read_floats(f, N, argv[1]);
    fclose(f);
    floatX *base = (floatX *)device_alloc((n + 8) * 2, 0), *logits = base + (misalign ? 1 : 0);
    for (size_t i = 0; i < n; i++) logits[i] = to_bf16(x[i]);
    int *targets = (int *)device_alloc(N * sizeof(int), 0);
    memcpy(targets, targets_host.data(), N * sizeof(int));
    float *mask = NULL;
    if (has_mask) {
        mask = (float *)device_alloc(N * sizeof(float), 0);
        memcpy(mask, mask_host.data(), N * sizeof(float));
    }
    float *weights = (float *)device_alloc(N * sizeof(float), 0);
    memcpy(weights, weights_host.data(), N * sizeof(float));
    float *lse = (float *)device_alloc(N * sizeof(float), 0xff), *losses = (float *)device_alloc(N * sizeof(float), 0xff);

    auto forward = kernel == 0 ? fused_classifier_scalar : kernel == 1 ? fused_classifier_vec8
                 : kernel == 2 ? fused_classifier : fused_classifier_staged;
    auto backward = kernel == 0 ? classifier_backward_scalar : kernel == 2 ? classifier_backward : classifier_backward_vec8;
    forward(logits, lse, losses, targets, mask, mode == 1 ? weights : NULL, N, V, Vp, 0);
    if (mode == 2) backward(logits, lse, targets, weights, N, V, Vp, 0);

    FILE *o = fopen(argv[2], "wb");
    if (!o) { fprintf(stderr, "error: cannot create %s\n", argv[2]); return 1; }
    std::vector<float> y(n);
    for (size_t i = 0; i < n; i++) y[i] = to_f32(logits[i]);
    bool ok = fwrite(lse, sizeof(float), N, o) == (size_t)N && fwrite(losses, sizeof(float), N, o) == (size_t)N &&
              fwrite(y.data(), sizeof(float), n, o) == n;
    if (fclose(o) != 0 || !ok) {
        fprintf(stderr, "error: cannot write %s\n", argv[2]);
        return 1;
    }
    printf("fused_classifier_emu N=%d V=%d Vp=%d kernel %d mode %d, threads %s: done\n", N, V, Vp, kernel, mode, argv[3]);
    return 0;
}
