/*
 * Runs the GPU sampler of llmc/sampling.cuh on the CPU through its host entry point
 * sample_rows(): the one-block kernel (radix descent for top-k and top-p, Gumbel-max draw over
 * the set, Philox streams per sequence), the split path (the row cut over several blocks for
 * greedy and plain temperature sampling, the one-block kernel merging their partials) or the
 * reference kernel, so that its candidate sets, draws, log-probabilities and row updates are
 * checked on a machine without a GPU (test/test_sampling_emu.py compares them with a NumPy
 * reference written from the math).
 *
 * The kernels' source is compiled as C++ under the GPU emulation of test/gpu_emu.h. The test's
 * build copies llmc/sampling.cuh with one change: each launch  k<<<grid, block, smem, stream>>>(args);
 * becomes  emu_launch(grid, block, smem, stream, emu_bind(k, args));  as nvcc lowers it to a launch
 * call. The dynamic shared memory (dynamic_smem()) is the emulated block's, NaN-poisoned by
 * gpu_emu.h. Static
 * __shared__ arrays are static locals that test/sampling_emu.ld gathers into the poisoned range.
 * The warp operations the sampler uses (shuffles of ints and 64-bit integers, __shfl_up_sync,
 * __shfl_sync, __ballot_sync) exchange values at a warp-wide barrier as __shfl_xor_sync does.
 * Blocks run one after another in index order, launches in program order.
 *
 * The candidate set is observed through __fmul_rn, which the kernels call exactly once per token
 * of the set (in sample_gumbel_score, with the logit as its first operand): the emulator records
 * those operands per row (block b of a grid of k blocks per row serves row b / k), so the test
 * compares the set's logits with the reference's.
 *
 * Several calls in a row run on the same buffers, as the replays of a captured decode step do:
 * the split path's scratch (NaN-poisoned once, before the first call) and the rows' state, which
 * every call advances when `advance` is set.
 *
 *   sampling_emu IN OUT forward|reverse
 *     IN : int32 n_rows, V, Vp, mode (0 the one-block kernel alone, 1 the reference kernel, 2 with
 *          the split path's scratch), sms (the multiprocessor count the split path is sized for),
 *          calls, advance (1: pass row_token, row_pos, row_slot), dummy_slot;
 *          then for every call: float32 temperature, int32 top_k, float32 top_p;
 *          uint64 row_key (n_rows); int32 row_step, row_token, row_pos, row_slot (n_rows each);
 *          float32 logits (calls, n_rows, Vp)
 *     OUT: int32 blocks per row of the split path (0 in modes 0 and 1); then for every call:
 *          int32 token (n_rows); float32 logprob (n_rows); int32 err (the call's; reset before
 *          each); for every row int32 n_set and float32 logits of the n_set tokens of its set
 *          (in the order of the calls); then int32 row_token, row_pos, row_step (n_rows each)
 *          after the calls
 */
#define EMU_PROGRAM "sampling_emu"
#define EMU_STATIC_SHARED
#include "gpu_emu.h"
#include <limits.h>

// ---------------------------------------------------------------------------------------------
// what cuda_common.h and the CUDA runtime would provide

#define __shared__ static   // one copy for the block's threads; blocks run one after another
#define __align__(n) __attribute__((aligned(n)))
typedef int cudaStream_t;
static inline unsigned char *dynamic_smem() { return smem.data(); }   // the block's dynamic shared memory
static inline int atomicOr(int *address, int value) {   // blocks run one at a time: plain RMW is atomic
    int old = *address;
    *address = old | value;
    return old;
}
template <typename T> static inline T atomicAdd(T *address, T value) {
    T old = *address;
    *address = old + value;
    return old;
}

// The lane src's value of v for every lane of the warp, through a warp-wide barrier.
static inline uint64_t warp_exchange(uint64_t v, int src) {
    WarpExchange &x = my_warp();
    x.u[lane_id()][0] = (uint32_t)v;
    x.u[lane_id()][1] = (uint32_t)(v >> 32);
    warp_barrier();
    if (src < 0 || src > 31) emu_fail("shuffle from a lane outside the warp");
    uint64_t r = (uint64_t)x.u[src][0] | ((uint64_t)x.u[src][1] << 32);
    warp_barrier();
    return r;
}
static inline void check_full_mask(unsigned mask) {
    if (mask != 0xffffffffu) emu_fail("only full-warp shuffles are emulated");
}
static inline int __shfl_xor_sync(unsigned mask, int v, int offset) {
    check_full_mask(mask);
    return (int)(uint32_t)warp_exchange((uint32_t)v, lane_id() ^ offset);
}
static inline int __shfl_sync(unsigned mask, int v, int src) {
    check_full_mask(mask);
    return (int)(uint32_t)warp_exchange((uint32_t)v, src);
}
static inline unsigned __shfl_sync(unsigned mask, unsigned v, int src) {
    check_full_mask(mask);
    return (unsigned)warp_exchange(v, src);
}
static inline unsigned long long __shfl_sync(unsigned mask, unsigned long long v, int src) {
    check_full_mask(mask);
    return warp_exchange(v, src);
}
// PTX shfl.up: lanes below offset keep their own value
static inline unsigned __shfl_up_sync(unsigned mask, unsigned v, int offset) {
    check_full_mask(mask);
    int l = lane_id();
    return (unsigned)warp_exchange(v, l >= offset ? l - offset : l);
}
static inline unsigned long long __shfl_up_sync(unsigned mask, unsigned long long v, int offset) {
    check_full_mask(mask);
    int l = lane_id();
    return warp_exchange(v, l >= offset ? l - offset : l);
}
// bit l set when lane l's predicate is true
static inline unsigned __ballot_sync(unsigned mask, int predicate) {
    check_full_mask(mask);
    WarpExchange &x = my_warp();
    x.u[lane_id()][0] = predicate != 0;
    warp_barrier();
    unsigned r = 0;
    for (int l = 0; l < 32; l++) r |= x.u[l][0] ? 1u << l : 0u;
    warp_barrier();
    return r;
}
static inline int __ffs(unsigned x) { return x ? __builtin_ctz(x) + 1 : 0; }   // 1-based lowest set bit

// the set's logits per row, recorded by __fmul_rn (see the top of the file)
static std::vector<std::vector<float>> set_values;
static int emu_rows;   // the rows of the current call: a grid has a whole number of blocks per row
static inline float __fmul_rn(float a, float b) {
    if (gridDim.x % emu_rows != 0) emu_fail("a grid that is not a whole number of blocks per row");
    set_values[blockIdx.x / (gridDim.x / emu_rows)].push_back(a);
    volatile float r = a * b;   // rounded, not fused into the following add
    return r;
}
static inline float __fadd_rn(float a, float b) { return a + b; }

#define cudaCheckLaunch() ((void)0)
#define cudaCheck(call) ((void)(call))
#define cudaRequire(cond, what) ((cond) ? (void)0 : emu_fail(what))
// sampling_setup() raises the one-block kernel's dynamic shared memory limit, as the engine has it
// do; a block may take what an H100's may (test/gpu_emu.h holds each launch to it)
enum { cudaDevAttrMaxSharedMemoryPerBlockOptin, cudaFuncAttributeMaxDynamicSharedMemorySize };
static inline int cudaGetDevice(int *d) { *d = 0; return 0; }
static inline int cudaDeviceGetAttribute(int *v, int, int) { *v = (int)emu_shared_optin(); return 0; }
template <typename F> static inline int cudaFuncSetAttribute(F kernel, int, int bytes) {
    emu_set_dynamic_smem_limit(reinterpret_cast<const void *>(kernel), (size_t)bytes);
    return 0;
}

// Runs body as every block of grid (n_rows blocks) with block threads: what a
// <<<grid, block, smem, stream>>> launch does (launches run in program order).
static void emu_launch(int grid, int block, size_t smem_bytes, cudaStream_t, std::function<void()> body) {
    launch(Dim3{(unsigned)grid, 1, 1}, block, smem_bytes, body, emu_take_bound());
}

#include "sampling_launched.cuh"   // llmc/sampling.cuh with its launches rewritten

// ---------------------------------------------------------------------------------------------

// A device buffer of bytes: 256-byte aligned like cudaMalloc's, every byte set to fill
static void *device_alloc(size_t bytes, int fill) {
    void *p = aligned_alloc(256, (bytes + 255) / 256 * 256 + 256);
    if (!p) emu_fail("out of memory");
    memset(p, fill, bytes);
    return p;
}

static void read_exact(void *dst, size_t bytes, FILE *f, const char *path, const char *what) {
    if (fread(dst, 1, bytes, f) != bytes) {
        fprintf(stderr, "error: %s: file ends before %s\n", path, what);
        exit(1);
    }
}

static void write_exact(const void *src, size_t bytes, FILE *f, const char *path) {
    if (bytes > 0 && fwrite(src, 1, bytes, f) != bytes) {
        fprintf(stderr, "error: cannot write %s\n", path);
        exit(1);
    }
}

int main(int argc, char **argv) {
    if (argc != 4 || (strcmp(argv[3], "forward") != 0 && strcmp(argv[3], "reverse") != 0)) {
        fprintf(stderr, "usage: %s IN OUT forward|reverse\n", argv[0]);
        return 1;
    }
    threads_in_reverse = strcmp(argv[3], "reverse") == 0;
    sampling_setup();
    // the one-block kernel's static shared arrays: cnt, mass, red_ms, red_best (the split
    // kernels' are smaller)
    size_t shared_bytes = SAMPLE_BUCKETS * (sizeof(unsigned) + sizeof(unsigned long long)) +
                          SAMPLE_WARPS * (sizeof(SampleMaxSum) + sizeof(SampleBest));
    if ((size_t)(emu_shared_end - emu_shared_begin) < shared_bytes)
        emu_fail("the kernels' __shared__ arrays are not in the poisoned range (sampling_emu.ld)");
    FILE *f = fopen(argv[1], "rb");
    if (!f) { fprintf(stderr, "error: cannot open %s\n", argv[1]); return 1; }
    int32_t dims[8];
    read_exact(dims, sizeof(dims), f, argv[1], "the header");
    int n_rows = dims[0], V = dims[1], Vp = dims[2], mode = dims[3], sms = dims[4], calls = dims[5], advance = dims[6];
    int dummy_slot = dims[7];
    if (n_rows < 1 || V < 1 || Vp < V || mode < 0 || mode > 2 || sms < 1 || calls < 1) {
        fprintf(stderr, "error: %s: bad header n_rows=%d V=%d Vp=%d mode=%d sms=%d calls=%d\n", argv[1], n_rows, V, Vp,
                mode, sms, calls);
        return 1;
    }
    std::vector<SampleConfig> configs(calls);
    for (int c = 0; c < calls; c++) {
        read_exact(&configs[c].temperature, 4, f, argv[1], "a temperature");
        read_exact(&configs[c].top_k, 4, f, argv[1], "a top_k");
        read_exact(&configs[c].top_p, 4, f, argv[1], "a top_p");
        configs[c].unused = 0;
    }
    uint64_t *row_key = (uint64_t *)device_alloc(n_rows * sizeof(uint64_t), 0);
    int *row_step = (int *)device_alloc(n_rows * sizeof(int), 0);
    int *row_token = (int *)device_alloc(n_rows * sizeof(int), 0);
    int *row_pos = (int *)device_alloc(n_rows * sizeof(int), 0);
    int *row_slot = (int *)device_alloc(n_rows * sizeof(int), 0);
    read_exact(row_key, n_rows * sizeof(uint64_t), f, argv[1], "the rows' keys");
    read_exact(row_step, n_rows * sizeof(int), f, argv[1], "the rows' steps");
    read_exact(row_token, n_rows * sizeof(int), f, argv[1], "the rows' tokens");
    read_exact(row_pos, n_rows * sizeof(int), f, argv[1], "the rows' positions");
    read_exact(row_slot, n_rows * sizeof(int), f, argv[1], "the rows' slots");
    std::vector<float *> logits(calls);
    for (int c = 0; c < calls; c++) {
        logits[c] = (float *)device_alloc((size_t)n_rows * Vp * sizeof(float), 0);
        read_exact(logits[c], (size_t)n_rows * Vp * sizeof(float), f, argv[1], "the logits");
    }
    fclose(f);
    SampleConfig *cfg = (SampleConfig *)device_alloc(sizeof(SampleConfig), 0);
    int *out_token = (int *)device_alloc(n_rows * sizeof(int), 0xff);
    float *out_logprob = (float *)device_alloc(n_rows * sizeof(float), 0xff);
    int *err = (int *)device_alloc(sizeof(int), 0);
    unsigned char *flags = (unsigned char *)device_alloc((size_t)n_rows * V, 0xff);
    SampleSplitScratch split;
    split.stats = (SampleSplitStats *)device_alloc((size_t)n_rows * SAMPLE_SPLIT_MAX_BLOCKS * sizeof(SampleSplitStats), 0xff);
    split.best = (SampleBest *)device_alloc((size_t)n_rows * SAMPLE_SPLIT_MAX_BLOCKS * sizeof(SampleBest), 0xff);
    split.max_rows = n_rows;
    split.sms = sms;
    emu_rows = n_rows;

    FILE *o = fopen(argv[2], "wb");
    if (!o) { fprintf(stderr, "error: cannot create %s\n", argv[2]); return 1; }
    int32_t blocks = mode == 2 ? sample_split_blocks(n_rows, V, sms) : 0;
    write_exact(&blocks, sizeof(blocks), o, argv[2]);
    for (int c = 0; c < calls; c++) {
        *cfg = configs[c];
        *err = 0;
        memset(out_token, 0xff, n_rows * sizeof(int));
        memset(out_logprob, 0xff, n_rows * sizeof(float));
        set_values.assign(n_rows, {});
        sample_rows(out_token, out_logprob, logits[c], n_rows, V, Vp, cfg, row_key, row_step, advance ? row_token : NULL,
                    advance ? row_pos : NULL, advance ? row_slot : NULL, dummy_slot, err, mode == 1, flags,
                    mode == 2 ? &split : NULL, 0);
        write_exact(out_token, n_rows * sizeof(int), o, argv[2]);
        write_exact(out_logprob, n_rows * sizeof(float), o, argv[2]);
        write_exact(err, sizeof(int), o, argv[2]);
        for (int r = 0; r < n_rows; r++) {
            int32_t n = (int32_t)set_values[r].size();
            write_exact(&n, sizeof(n), o, argv[2]);
            write_exact(set_values[r].data(), sizeof(float) * n, o, argv[2]);
        }
    }
    write_exact(row_token, n_rows * sizeof(int), o, argv[2]);
    write_exact(row_pos, n_rows * sizeof(int), o, argv[2]);
    write_exact(row_step, n_rows * sizeof(int), o, argv[2]);
    if (fclose(o) != 0) { fprintf(stderr, "error: cannot write %s\n", argv[2]); return 1; }
    const char *names[3] = {"one-block", "reference", "split scratch"};
    printf("sampling_emu n_rows=%d V=%d calls=%d (first T=%g top_k=%d top_p=%g) %s, %d blocks per row, threads %s: done\n",
           n_rows, V, calls, configs[0].temperature, configs[0].top_k, configs[0].top_p, names[mode], blocks, argv[3]);
    return 0;
}
