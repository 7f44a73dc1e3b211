/*
 * Runs the GPU sampler of llmc/sampling.cuh on the CPU through its host entry point
 * sample_rows() (the fast kernel: radix descent for top-k and top-p, Gumbel-max draw over the
 * set, Philox streams per sequence; or the reference kernel), so that its candidate sets, draws
 * and log-probabilities are checked on a machine without a GPU (test/test_sampling_emu.py
 * compares them with a NumPy reference written from the math).
 *
 * The kernels' source is compiled as C++ under the GPU emulation of test/gpu_emu.h. The test's
 * build copies llmc/sampling.cuh with two changes: each launch  k<<<grid, block, smem, stream>>>(args);
 * becomes  emu_launch(grid, block, smem, stream, [=] { k(args); });  as nvcc lowers it to a launch
 * call, and the declaration of the dynamic shared array  extern __shared__ ... sample_smem[];
 * becomes a pointer to the block's dynamic shared memory (NaN-poisoned by gpu_emu.h). Static
 * __shared__ arrays are static locals that test/sampling_emu.ld gathers into the poisoned range.
 * The warp operations the sampler uses (shuffles of ints and 64-bit integers, __shfl_up_sync,
 * __shfl_sync, __ballot_sync) exchange values at a warp-wide barrier as __shfl_xor_sync does.
 *
 * The candidate set is observed through __fmul_rn, which the kernels call exactly once per token
 * of the set (in sample_gumbel_score, with x - max as its first operand): the emulator records
 * those operands per row, so the test compares the set's logits with the reference's.
 *
 *   sampling_emu IN OUT forward|reverse
 *     IN : int32 n_rows, V, Vp, reference; float32 temperature; int32 top_k; float32 top_p;
 *          uint64 row_key (n_rows); int32 row_step (n_rows); float32 logits (n_rows, Vp)
 *     OUT: int32 token (n_rows); float32 logprob (n_rows); int32 err; then for every row: int32
 *          n_set and float32 x - max of the n_set tokens of its set (in the order of the calls)
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

// the set's x - max per row, recorded by __fmul_rn (see the top of the file)
static std::vector<std::vector<float>> set_values;
static inline float __fmul_rn(float a, float b) {
    set_values[blockIdx.x].push_back(a);
    volatile float r = a * b;   // rounded, not fused into the following add
    return r;
}
static inline float __fadd_rn(float a, float b) { return a + b; }

#define cudaCheckLaunch() ((void)0)
#define cudaCheck(call) ((void)(call))
#define cudaRequire(cond, what) ((cond) ? (void)0 : emu_fail(what))
// sampling_setup() is compiled, not called: the emulated block has all the shared memory it asks for
enum { cudaDevAttrMaxSharedMemoryPerBlockOptin, cudaFuncAttributeMaxDynamicSharedMemorySize };
static inline int cudaGetDevice(int *d) { *d = 0; return 0; }
static inline int cudaDeviceGetAttribute(int *v, int, int) { *v = 1 << 30; return 0; }
template <typename F> static inline int cudaFuncSetAttribute(F, int, int) { return 0; }

// Runs body as every block of grid (n_rows blocks) with block threads: what a
// <<<grid, block, smem, stream>>> launch does (launches run in program order).
static void emu_launch(int grid, int block, size_t smem_bytes, cudaStream_t, std::function<void()> body) {
    launch(Dim3{(unsigned)grid, 1, 1}, block, smem_bytes, body);
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

int main(int argc, char **argv) {
    if (argc != 4 || (strcmp(argv[3], "forward") != 0 && strcmp(argv[3], "reverse") != 0)) {
        fprintf(stderr, "usage: %s IN OUT forward|reverse\n", argv[0]);
        return 1;
    }
    threads_in_reverse = strcmp(argv[3], "reverse") == 0;
    // the fast kernel's static shared arrays: cnt, mass, red_ms, red_best
    size_t shared_bytes = SAMPLE_BUCKETS * (sizeof(unsigned) + sizeof(unsigned long long)) +
                          SAMPLE_WARPS * (sizeof(SampleMaxSum) + sizeof(SampleBest));
    if ((size_t)(emu_shared_end - emu_shared_begin) < shared_bytes)
        emu_fail("the kernels' __shared__ arrays are not in the poisoned range (sampling_emu.ld)");
    FILE *f = fopen(argv[1], "rb");
    if (!f) { fprintf(stderr, "error: cannot open %s\n", argv[1]); return 1; }
    int32_t dims[4];
    read_exact(dims, sizeof(dims), f, argv[1], "the header");
    int n_rows = dims[0], V = dims[1], Vp = dims[2], reference = dims[3];
    if (n_rows < 1 || V < 1 || Vp < V) {
        fprintf(stderr, "error: %s: bad shape n_rows=%d V=%d Vp=%d\n", argv[1], n_rows, V, Vp);
        return 1;
    }
    SampleConfig *cfg = (SampleConfig *)device_alloc(sizeof(SampleConfig), 0);
    read_exact(&cfg->temperature, 4, f, argv[1], "the temperature");
    read_exact(&cfg->top_k, 4, f, argv[1], "top_k");
    read_exact(&cfg->top_p, 4, f, argv[1], "top_p");
    uint64_t *row_key = (uint64_t *)device_alloc(n_rows * sizeof(uint64_t), 0);
    int *row_step = (int *)device_alloc(n_rows * sizeof(int), 0);
    float *logits = (float *)device_alloc((size_t)n_rows * Vp * sizeof(float), 0);
    read_exact(row_key, n_rows * sizeof(uint64_t), f, argv[1], "the rows' keys");
    read_exact(row_step, n_rows * sizeof(int), f, argv[1], "the rows' steps");
    read_exact(logits, (size_t)n_rows * Vp * sizeof(float), f, argv[1], "the logits");
    fclose(f);
    int *out_token = (int *)device_alloc(n_rows * sizeof(int), 0xff);
    float *out_logprob = (float *)device_alloc(n_rows * sizeof(float), 0xff);
    int *err = (int *)device_alloc(sizeof(int), 0);
    unsigned char *flags = (unsigned char *)device_alloc((size_t)n_rows * V, 0xff);
    set_values.assign(n_rows, {});

    sample_rows(out_token, out_logprob, logits, n_rows, V, Vp, cfg, row_key, row_step, NULL, NULL, NULL, -1, err,
                reference, flags, 0);

    FILE *o = fopen(argv[2], "wb");
    if (!o) { fprintf(stderr, "error: cannot create %s\n", argv[2]); return 1; }
    bool ok = fwrite(out_token, sizeof(int), n_rows, o) == (size_t)n_rows &&
              fwrite(out_logprob, sizeof(float), n_rows, o) == (size_t)n_rows && fwrite(err, sizeof(int), 1, o) == 1;
    for (int r = 0; r < n_rows && ok; r++) {
        int32_t n = (int32_t)set_values[r].size();
        ok = fwrite(&n, sizeof(n), 1, o) == 1 && fwrite(set_values[r].data(), sizeof(float), n, o) == (size_t)n;
    }
    if (fclose(o) != 0 || !ok) { fprintf(stderr, "error: cannot write %s\n", argv[2]); return 1; }
    printf("sampling_emu n_rows=%d V=%d T=%g top_k=%d top_p=%g %s, threads %s: done\n", n_rows, V, cfg->temperature,
           cfg->top_k, cfg->top_p, reference ? "reference" : "fast", argv[3]);
    return 0;
}
