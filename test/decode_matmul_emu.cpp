/*
 * Runs the decode-step product of llmc/decode_matmul.cuh on the CPU through its host entry point
 * decode_matmul, so that its fragment layout (one 16-byte load as two k-steps), its K splits and
 * the last block's sum of the splits' partials are checked on a machine without a GPU
 * (test/test_decode_matmul_emu.py compares the result with a NumPy float64 oracle).
 *
 * The kernel's source is compiled as C++ under the GPU emulation of test/gpu_emu.h (mma.sync from
 * test/gpu_emu_mma.h); the test's build copies llmc/decode_matmul.cuh with each launch rewritten
 * into an emu_launch call (test/gpu_emu.py). The output and the partials start as NaN, so an
 * element no thread writes shows up; the blocks run one after another, in the order EMU_BLOCKS
 * says (test/gpu_emu.h; the test runs forward, reverse and shuffle), so the block of a tile that
 * sums the splits is whichever of them comes last in that order, as the tile counter decides.
 *
 *   decode_matmul_emu IN OUT forward|reverse   (the threads' order in a block)
 *     IN : int32 M, IC, OC, has_bias, gelu, sms (the multiprocessor count the K splits are sized
 *          for), swiglu; float32 inp (M, IC), or with swiglu the fc output (M, 2 IC) (gate | up),
 *          weight (OC, IC), bias (OC) when has_bias, all representable in bf16
 *     OUT: float32 out (M, OC) (the bf16 output), then the tile counters after the launch (OC / 16);
 *          with swiglu (decode_matmul_swiglu) then also the output of decode_matmul on the
 *          SwiGLU activations (M, OC) and those activations (M, IC), bf16(silu(gate) * up) as
 *          swiglu.cuh computes them (swiglu_math.cuh)
 */
#define DECODE_MATMUL_EMULATION
#define EMU_PROGRAM "decode_matmul_emu"
#define EMU_STATIC_SHARED
#include "gpu_emu_runtime.h"
#include "gpu_emu_mma.h"

static inline void dm_mma(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1) {
    const uint32_t a[4] = {a0, a1, a2, a3};
    emu_mma(d, a, b0, b1);
}
static inline float dm_load_partial(const float *p) { return *p; }
// the blocks run one at a time on one OS thread: a plain read-modify-write is atomic, and every
// write is visible to the next block
static inline unsigned int atomicAdd(unsigned int *address, unsigned int value) {
    unsigned int old = *address;
    *address = old + value;
    return old;
}
static inline void __threadfence() {}

#include "decode_matmul_launched.cuh"   // llmc/decode_matmul.cuh with its launches rewritten

int main(int argc, char **argv) {
    FILE *f = emu_open_input(argc, argv, sizeof(float) * DM_WARPS * DM_ROWS * (8 * 8 + 1));
    int32_t dims[7];
    if (fread(dims, sizeof(int32_t), 7, f) != 7) { fprintf(stderr, "error: %s: no header\n", argv[1]); return 1; }
    int M = dims[0], IC = dims[1], OC = dims[2], has_bias = dims[3], gelu = dims[4], sms = dims[5], swiglu = dims[6];
    if (M < 1 || IC < 1 || OC < 1 || sms < 1) {
        fprintf(stderr, "error: %s: bad header M=%d IC=%d OC=%d sms=%d\n", argv[1], M, IC, OC, sms);
        return 1;
    }
    floatX *inp = device_bf16(read_floats(f, (size_t)M * IC * (swiglu ? 2 : 1), argv[1]));
    floatX *weight = device_bf16(read_floats(f, (size_t)OC * IC, argv[1]));
    floatX *bias = has_bias ? device_bf16(read_floats(f, OC, argv[1])) : NULL;
    fclose(f);
    floatX *out = (floatX *)device_alloc((size_t)M * OC * 2, 0xff);
    float *partial = (float *)device_alloc(decode_matmul_partial_floats(M, IC, OC, sms) * sizeof(float), 0xff);
    int tiles = OC % DM_ROWS == 0 ? decode_matmul_counters(OC) : 1;
    unsigned int *counters = (unsigned int *)device_alloc(tiles * sizeof(unsigned int), 0);
    std::vector<float> act, plain;
    if (swiglu) {
        decode_matmul_swiglu(out, partial, counters, inp, weight, bias, M, IC, OC, sms, 0);
        // the two-step path: the activations as swiglu.cuh rounds them, then the plain product
        floatX *a = (floatX *)device_alloc((size_t)M * IC * 2, 0xff), *o = (floatX *)device_alloc((size_t)M * OC * 2, 0xff);
        for (int n = 0; n < M; n++)
            for (int k = 0; k < IC; k++) {
                const floatX *row = inp + (size_t)n * 2 * IC;
                a[(size_t)n * IC + k] = to_bf16(swiglu_out(to_f32(row[k]), to_f32(row[IC + k])));
                act.push_back(to_f32(a[(size_t)n * IC + k]));
            }
        decode_matmul(o, partial, counters, a, weight, bias, M, IC, OC, 0, sms, 0);
        for (size_t i = 0; i < (size_t)M * OC; i++) plain.push_back(to_f32(o[i]));
    } else {
        decode_matmul(out, partial, counters, inp, weight, bias, M, IC, OC, gelu, sms, 0);
    }

    FILE *o = fopen(argv[2], "wb");
    if (!o) { fprintf(stderr, "error: cannot create %s\n", argv[2]); return 1; }
    std::vector<float> y((size_t)M * OC);
    for (size_t i = 0; i < y.size(); i++) y[i] = to_f32(out[i]);
    for (int t = 0; t < tiles; t++) y.push_back((float)counters[t]);
    y.insert(y.end(), plain.begin(), plain.end());
    y.insert(y.end(), act.begin(), act.end());
    if (fwrite(y.data(), sizeof(float), y.size(), o) != y.size() || fclose(o) != 0) {
        fprintf(stderr, "error: cannot write %s\n", argv[2]);
        return 1;
    }
    printf("decode_matmul_emu M=%d IC=%d OC=%d bias=%d gelu=%d swiglu=%d splits=%d, threads %s: done\n", M, IC, OC,
           has_bias, gelu, swiglu, decode_matmul_splits(IC, OC, sms), argv[3]);
    return 0;
}
