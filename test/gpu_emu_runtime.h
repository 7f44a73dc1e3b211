/*
 * The CUDA runtime and cuda_common.h as the emulated kernels of test/gpu_emu.h see them: static
 * __shared__ arrays, dim3 launches run in program order, bf16 conversions, the warp and block
 * reductions as cuda_common.h writes them (over the emulated shuffles and barriers), and device
 * buffers 256-byte aligned like cudaMalloc's. Included after gpu_emu.h, before a kernel header
 * whose launches test/gpu_emu.py rewrote into emu_launch calls.
 */
#ifndef TEST_GPU_EMU_RUNTIME_H
#define TEST_GPU_EMU_RUNTIME_H
#include <float.h>
#include "gpu_emu.h"

#define __shared__ static   // one copy for the block's threads; blocks run one after another
#define __align__(n) __attribute__((aligned(n)))
typedef floatX __nv_bfloat16;
typedef int cudaStream_t;
struct dim3 {
    unsigned x, y, z;
    dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
static inline float to_float(float x) { return x; }
static inline float to_float(floatX x) { return to_f32(x); }
template <typename T> static inline T from_float(float x);
template <> inline float from_float<float>(float x) { return x; }
template <> inline floatX from_float<floatX>(float x) { return to_bf16(x); }
template <typename T> static inline float stored_as(float x) { return to_float(from_float<T>(x)); }
static inline floatX __float2bfloat16(float x) { return to_bf16(x); }
static inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) { return __nv_bfloat162{to_bf16(lo), to_bf16(hi)}; }
static inline int ceil_div(long long a, long long b) { return (int)((a + b - 1) / b); }
// the blocks run one at a time on one OS thread, so a plain read-modify-write is atomic
static inline int atomicOr(int *address, int value) {
    int old = *address;
    *address = old | value;
    return old;
}
// butterfly reductions over the warp's 32 lanes, as cuda_common.h's
static inline float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}
static inline float warp_max(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}
// Sum and max over the whole block, as cuda_common.h's: every thread gets the result
static inline float block_sum(float v, float *shared) {
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    v = warp_sum(v);
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    float total = lane < (int)warps ? shared[lane] : 0.0f;
    total = warp_sum(total);
    __syncthreads();
    return total;
}
static inline float block_max(float v, float *shared) {
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    v = warp_max(v);
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    float m = lane < (int)warps ? shared[lane] : -FLT_MAX;
    m = warp_max(m);
    __syncthreads();
    return m;
}
// the block's dynamic shared memory (the launch's smem bytes), as cuda_common.h's dynamic_smem()
static inline unsigned char *dynamic_smem() { return smem.data(); }
#define cudaCheckLaunch() ((void)0)
#define cudaCheck(call) ((void)(call))
// device queries and kernel attributes: one device, whose blocks may take 227 KiB of shared
// memory (an H100's opt-in limit; EMU_SMEM_OPTIN, test/gpu_emu.h); a kernel's dynamic shared
// memory limit is kept for its launches
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };
static inline int cudaGetDevice(int *device) { *device = 0; return 0; }
static inline int cudaDeviceGetAttribute(int *value, cudaDeviceAttr, int) { *value = (int)emu_shared_optin(); return 0; }
template <typename Kernel> static inline int cudaFuncSetAttribute(Kernel kernel, cudaFuncAttribute, int bytes) {
    if (bytes < 0 || (size_t)bytes > emu_shared_optin()) return 1;
    emu_set_dynamic_smem_limit(reinterpret_cast<const void *>(kernel), (size_t)bytes);
    return 0;
}
// a kernel's attributes: its static __shared__ arrays are the emulation's statics, counted as none
struct cudaFuncAttributes { size_t sharedSizeBytes; };
template <typename Kernel> static inline int cudaFuncGetAttributes(cudaFuncAttributes *attr, Kernel) {
    attr->sharedSizeBytes = 0;
    return 0;
}
#define cudaRequire(cond, what) ((cond) ? (void)0 : emu_fail(what))

// Runs body as every block of grid with block threads: what a <<<grid, block, smem, stream>>>
// launch does (the stream is irrelevant: launches run in program order).
static inline void emu_launch(dim3 grid, int block, size_t smem_bytes, cudaStream_t, std::function<void()> body) {
    launch(Dim3{grid.x, grid.y, grid.z}, block, smem_bytes, body, emu_take_bound());
}
// blocks of more than one dimension are not emulated (the kernels under test use none)
static inline void emu_launch(dim3, dim3, size_t, cudaStream_t, std::function<void()>) {
    emu_fail("a launch with a 2-D or 3-D block is not emulated");
}

// ---------------------------------------------------------------------------------------------

// A device buffer of bytes: 256-byte aligned like cudaMalloc's, every byte set to fill (under
// AddressSanitizer exactly `bytes` long, so that an access past its end is reported)
static inline void *device_alloc(size_t bytes, int fill) {
#ifdef __SANITIZE_ADDRESS__
    void *p = NULL;
    if (posix_memalign(&p, 256, bytes ? bytes : 1) != 0) p = NULL;
#else
    void *p = aligned_alloc(256, (bytes + 255) / 256 * 256 + 256);
#endif
    if (!p) emu_fail("out of memory");
    memset(p, fill, bytes);
    return p;
}

// A bf16 device buffer holding the values x
static inline floatX *device_bf16(const std::vector<float> &x) {
    floatX *p = (floatX *)device_alloc(x.size() * 2, 0);
    for (size_t i = 0; i < x.size(); i++) p[i] = to_bf16(x[i]);
    return p;
}
// The command line of the emulator programs, IN OUT forward|reverse: sets the threads' order,
// checks that the kernels' static __shared__ arrays (shared_bytes) lie in the range the program's
// linker script poisons, and returns IN opened for reading; exits with a message otherwise.
static inline FILE *emu_open_input(int argc, char **argv, size_t shared_bytes) {
    if (argc != 4 || (strcmp(argv[3], "forward") != 0 && strcmp(argv[3], "reverse") != 0)) {
        fprintf(stderr, "usage: %s IN OUT forward|reverse\n", argv[0]);
        exit(1);
    }
    threads_in_reverse = strcmp(argv[3], "reverse") == 0;
    if ((size_t)(emu_shared_end - emu_shared_begin) < shared_bytes)
        emu_fail("the kernels' __shared__ arrays are not in the poisoned range (the program's .ld script)");
    FILE *f = fopen(argv[1], "rb");
    if (!f) {
        fprintf(stderr, "error: cannot open %s\n", argv[1]);
        exit(1);
    }
    return f;
}
#endif
