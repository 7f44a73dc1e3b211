/*
 * Runs the decode-attention kernels of llmc/decode_attention.cuh on the CPU, through their host
 * entry point decode_attention() (grid over splits of the cache, head batches of a GQA group and
 * rows; the split combine; the reference kernel), so that their indexing, GQA head mapping,
 * splitting and softmax are checked on a machine without a GPU
 * (test/test_decode_attention_emu.py compares the results with a NumPy float64 oracle).
 *
 * The kernels' source is compiled as C++ under the GPU emulation of test/gpu_emu.h (threads as
 * ucontexts, barriers, __shfl_xor_sync at a warp-wide barrier, so warp_sum and warp_max reduce
 * across the warp as on the GPU). The test's build copies llmc/decode_attention.cuh with one
 * change: each launch  k<<<grid, block, smem, stream>>>(args);  becomes
 * emu_launch(grid, block, smem, stream, emu_bind(k, args));  as nvcc lowers it to a launch call;
 * the text of the kernels and of the host code around the launches is unchanged. __shared__ arrays are static locals, which
 * test/decode_attention_emu.ld gathers into one range that is NaN before every block, so a read
 * of an element nothing wrote shows up in the output. Device buffers are 256-byte aligned like
 * cudaMalloc's, outputs and split partials start as NaN. The threads of a block run in index
 * order (forward) or in reverse, so that a missing __syncthreads shows in one of the two; the
 * blocks in EMU_BLOCKS's order (test/gpu_emu.h).
 *
 *   decode_attention_emu IN OUT forward|reverse   (DECODE_ATTENTION_LOADS=1 or 2 in the
 *                                                 environment: the fast kernel's early-loads or
 *                                                 staged variant, decode_attention_loads; its
 *                                                 cp.async copies as test/gpu_emu_flash.h has
 *                                                 them: landing only when the thread waits)
 *     IN : int32 N, NH, NKV, HS, S, Tmax, n_splits, reference, write_kv, rope, norm_C; int32
 *          row_slot (N), row_pos (N); float32 qkv (N, (NH + 2*NKV)*HS), k_cache, v_cache (S, NKV,
 *          Tmax, HS), all values representable in bf16; when rope, float32 cos_sin (Tmax, HS/2, 2);
 *          when norm_C > 0, float32 x (N, norm_C) in bf16 values: the rows' residual stream, whose
 *          RMSNorm factor (eps 1e-5) the attention applies to q, k and v (DecodeRowNorm)
 *     OUT: float32 out (N, NH*HS); int32 err; float32 k_cache, v_cache after the call
 */
#define EMU_PROGRAM "decode_attention_emu"
#define EMU_STATIC_SHARED

#include "gpu_emu_runtime.h"
#include "gpu_emu_flash.h"   // cp.async
#include "decode_attention_launched.cuh"   // llmc/decode_attention.cuh with its launches rewritten

// ---------------------------------------------------------------------------------------------

int main(int argc, char **argv) {
    // the shared arrays of decode_attention_kernel<HS, HB> for HS 64, 128 and HB 1, 2, 4, 8:
    // p_s, m_s, l_s, partial
    size_t shared_bytes = 0;
    for (int hs : {64, 128})
        for (int hb = 1; hb <= DECODE_MAX_HEADS_PER_BLOCK; hb *= 2)
            shared_bytes += sizeof(float) * hb * (DECODE_SPLIT_LEN + 2 + DECODE_WARPS * hs);
    FILE *f = emu_open_input(argc, argv, shared_bytes);
    const char *loads = getenv("DECODE_ATTENTION_LOADS");
    decode_attention_loads = DECODE_LOADS_DIRECT;
    if (loads != NULL && loads[0] != '\0') {
        if ((loads[0] < '0' || loads[0] > '2') || loads[1] != '\0') {
            fprintf(stderr, "error: DECODE_ATTENTION_LOADS=%s: expected 0, 1 or 2\n", loads);
            return 1;
        }
        decode_attention_loads = loads[0] - '0';
    }
    int32_t dims[11];
    if (fread(dims, sizeof(int32_t), 11, f) != 11) { fprintf(stderr, "error: %s: no header\n", argv[1]); return 1; }
    int norm_C = dims[10];
    int N = dims[0], NH = dims[1], NKV = dims[2], HS = dims[3], S = dims[4], Tmax = dims[5], n_splits = dims[6];
    int reference = dims[7], write_kv = dims[8], rope = dims[9];
    if (N < 1 || NH < 1 || NKV < 1 || NH % NKV != 0 || (HS != 64 && HS != 128) || S < 1 || Tmax < 1 || n_splits < 1) {
        fprintf(stderr, "error: %s: bad shape N=%d NH=%d NKV=%d HS=%d S=%d Tmax=%d n_splits=%d\n", argv[1], N, NH, NKV,
                HS, S, Tmax, n_splits);
        return 1;
    }
    std::vector<int32_t> slot_pos(2 * (size_t)N);
    if (fread(slot_pos.data(), sizeof(int32_t), slot_pos.size(), f) != slot_pos.size()) {
        fprintf(stderr, "error: %s: file ends before the rows' slots and positions\n", argv[1]);
        return 1;
    }
    size_t QKV = (size_t)(NH + 2 * NKV) * HS, n_cache = (size_t)S * NKV * Tmax * HS, n_out = (size_t)N * NH * HS;
    floatX *qkv = device_bf16(read_floats(f, (size_t)N * QKV, argv[1]));
    floatX *k_cache = device_bf16(read_floats(f, n_cache, argv[1]));
    floatX *v_cache = device_bf16(read_floats(f, n_cache, argv[1]));
    float *cos_sin = NULL;
    if (rope) {
        std::vector<float> table = read_floats(f, (size_t)Tmax * HS, argv[1]);
        cos_sin = (float *)device_alloc(table.size() * sizeof(float), 0);
        memcpy(cos_sin, table.data(), table.size() * sizeof(float));
    }
    DecodeRowNorm row_norm = {NULL, norm_C, 1e-5f};
    if (norm_C > 0) row_norm.x = device_bf16(read_floats(f, (size_t)N * norm_C, argv[1]));
    fclose(f);
    int *row_slot = (int *)device_alloc(N * sizeof(int), 0), *row_pos = (int *)device_alloc(N * sizeof(int), 0);
    memcpy(row_slot, slot_pos.data(), N * sizeof(int));
    memcpy(row_pos, slot_pos.data() + N, N * sizeof(int));
    floatX *out = (floatX *)device_alloc(n_out * 2, 0xff);
    float *part_o = (float *)device_alloc(n_out * n_splits * sizeof(float), 0xff);
    float *part_ml = (float *)device_alloc((size_t)N * NH * n_splits * 2 * sizeof(float), 0xff);
    int *err = (int *)device_alloc(sizeof(int), 0);

    decode_attention(out, part_o, part_ml, qkv, k_cache, v_cache, cos_sin, write_kv, row_slot, row_pos, N, NH, NKV, HS, S,
                     Tmax, n_splits, reference, err, 0, norm_C > 0 ? &row_norm : NULL);

    FILE *o = fopen(argv[2], "wb");
    if (!o) { fprintf(stderr, "error: cannot create %s\n", argv[2]); return 1; }
    std::vector<float> x(n_out);
    for (size_t i = 0; i < n_out; i++) x[i] = to_f32(out[i]);
    std::vector<float> kc(n_cache), vc(n_cache);
    for (size_t i = 0; i < n_cache; i++) kc[i] = to_f32(k_cache[i]), vc[i] = to_f32(v_cache[i]);
    if (fwrite(x.data(), sizeof(float), n_out, o) != n_out || fwrite(err, sizeof(int), 1, o) != 1 ||
        fwrite(kc.data(), sizeof(float), n_cache, o) != n_cache || fwrite(vc.data(), sizeof(float), n_cache, o) != n_cache ||
        fclose(o) != 0) {
        fprintf(stderr, "error: cannot write %s\n", argv[2]);
        return 1;
    }
    printf("decode_attention_emu N=%d NH=%d NKV=%d HS=%d Tmax=%d n_splits=%d %s%s%s, threads %s: done\n", N, NH, NKV,
           HS, Tmax, n_splits, reference ? "reference" : "split", write_kv ? ", writing the cache" : "",
           rope ? ", RoPE" : "", argv[3]);
    return 0;
}
