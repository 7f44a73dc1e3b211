/*
 * Common pieces of the CUDA backend: error checking for every CUDA and cuBLAS call, the bf16
 * storage type, warp and block reductions, and small launch helpers.
 *
 * Precision (see model_cuda.cu): weights and activations (the residual stream by default) are
 * stored in bf16 (floatX), every sum is accumulated in fp32, master weights, AdamW moments and
 * parameter gradients are fp32.
 */
#ifndef LLMC_CUDA_COMMON_H
#define LLMC_CUDA_COMMON_H

#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <float.h>
#include <cuda_runtime.h>
#include <cuda_bf16.h>

typedef __nv_bfloat16 floatX;   // storage type of weights and activations

// ---------------------------------------------------------------------------------------------
// error checking: every failure prints the call site and exits 1, like fatal() in utils.h

static inline void cuda_check_(cudaError_t err, const char *file, int line) {
    if (err != cudaSuccess) {
        fprintf(stderr, "error: CUDA: %s (%s:%d)\n", cudaGetErrorString(err), file, line);
        fflush(stderr);
        exit(1);
    }
}
#define cudaCheck(err) cuda_check_((err), __FILE__, __LINE__)
// After a kernel launch: catches bad launch configurations (grid, block, shared memory) at once.
#define cudaCheckLaunch() cuda_check_(cudaGetLastError(), __FILE__, __LINE__)

// A failed precondition of a kernel wrapper (shape, alignment): one line and exit 1.
static inline void cuda_require_(int ok, const char *what, const char *file, int line) {
    if (!ok) {
        fprintf(stderr, "error: CUDA backend: requirement failed: %s (%s:%d)\n", what, file, line);
        fflush(stderr);
        exit(1);
    }
}
#define cudaRequire(cond, what) cuda_require_((cond) ? 1 : 0, (what), __FILE__, __LINE__)

// cudaMalloc, or a message with the refused size and the device's free and total memory (what
// other processes on the GPU hold shows there), and exit(1).
static inline void *cuda_malloc_check_(size_t bytes, const char *file, int line) {
    void *p = NULL;
    cudaError_t err = cudaMalloc(&p, bytes ? bytes : 16);
    if (err != cudaSuccess) {
        cudaGetLastError();   // clear it, so that cudaMemGetInfo answers
        size_t free_bytes = 0, total_bytes = 0;
        if (cudaMemGetInfo(&free_bytes, &total_bytes) != cudaSuccess) free_bytes = total_bytes = 0;
        fprintf(stderr, "error: CUDA: cannot allocate %zu bytes of device memory: %s; %.3g of %.3g GB free on the "
                "device (%s:%d)\n", bytes, cudaGetErrorString(err), free_bytes / 1e9, total_bytes / 1e9, file, line);
        fflush(stderr);
        exit(1);
    }
    return p;
}
#define cudaMallocCheck(bytes) cuda_malloc_check_((bytes), __FILE__, __LINE__)

#ifdef __cplusplus
extern "C" const char *device_memory_hint(void);   // utils.h
#else
const char *device_memory_hint(void);
#endif
// cudaMalloc for the buffers of something a program sizes from its flags (a CUDA model, the
// rollout engine): when the device has no room, stops with a message that says who ran out (who:
// the function, what: "a training model for batches of up to 16 x 1024 tokens"), what it held
// already (had bytes), the refused size, the device's free and total memory, and what sizes it
// (device_memory_hint).
static inline void *cuda_malloc_sized(size_t bytes, const char *who, const char *what, size_t had) {
    void *p = NULL;
    cudaError_t err = cudaMalloc(&p, bytes ? bytes : 16);
    if (err == cudaSuccess) return p;
    cudaGetLastError();   // clear it, so that cudaMemGetInfo answers
    size_t free_bytes = 0, total_bytes = 0;
    if (cudaMemGetInfo(&free_bytes, &total_bytes) != cudaSuccess) free_bytes = total_bytes = 0;
    const char *hint = device_memory_hint();
    fprintf(stderr, "error: %s: the GPU has no room for %s: %.3g GB allocated, %.3g GB more refused (%s), %.3g of "
            "%.3g GB free on the device; smaller batches or shorter sequences take less%s%s\n", who, what, had / 1e9,
            bytes / 1e9, cudaGetErrorString(err), free_bytes / 1e9, total_bytes / 1e9, hint[0] ? ": " : "", hint);
    fflush(stderr);
    exit(1);
}

static inline int ceil_div(long long a, long long b) { return (int)((a + b - 1) / b); }

// ---------------------------------------------------------------------------------------------
// conversions between the storage type and fp32

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(floatX x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ floatX from_float<floatX>(float x) { return __float2bfloat16(x); }
// x as it reads back after a store in T (bf16: rounded to nearest even; fp32: unchanged)
template <typename T> __device__ __forceinline__ float stored_as(float x) { return to_float(from_float<T>(x)); }

// ---------------------------------------------------------------------------------------------
// reductions

__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

// Sum over the whole block (blockDim.x a multiple of 32, at most 1024); every thread gets the
// result. `shared` holds 32 floats. Ends with a barrier so `shared` can be reused at once.
__device__ __forceinline__ float block_sum(float v, float *shared) {
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    v = warp_sum(v);
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    float total = lane < warps ? shared[lane] : 0.0f;
    total = warp_sum(total);
    __syncthreads();
    return total;
}
__device__ __forceinline__ float block_max(float v, float *shared) {
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    v = warp_max(v);
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    float m = lane < warps ? shared[lane] : -FLT_MAX;
    m = warp_max(m);
    __syncthreads();
    return m;
}

// Programmatic dependent launch (sm_90 and later). Where a CUDA graph's edge into a kernel is
// programmatic (rollout.cu's decode step), the kernel may start before the kernel it depends on
// has finished: griddep_wait() blocks until that kernel has completed and its writes are
// visible, so a kernel on such an edge calls it before it reads what the earlier kernel wrote or
// writes what it reads (work that touches neither, such as loading weights, may come first).
// griddep_launch_dependents() lets the kernels that depend on this one start early. Both do
// nothing when the launch has no programmatic dependency, and on older GPUs.
__device__ __forceinline__ void griddep_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void griddep_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// The block's dynamic shared memory (the launch's third argument), 16-byte aligned. (On the
// CPU emulation of test/emu_cuda/, which runs these sources as C++, the emulator provides it.)
#ifndef EMU_CUDA_TOOLKIT
__device__ __forceinline__ unsigned char *dynamic_smem() {
    extern __shared__ __align__(16) unsigned char block_dynamic_smem[];
    return block_dynamic_smem;
}

// Asynchronous copies global -> shared (cp.async, sm_80 and later): a thread's copies land once
// it waits for their group (cp_async_commit closes a group), and only that thread may rely on
// them then (others after a barrier). The emulations provide these from the PTX ISA's
// definitions (test/gpu_emu_flash.h).
__device__ __forceinline__ uint32_t smem_addr(const void *p) { return (uint32_t)__cvta_generic_to_shared(p); }
// 16 bytes global -> shared; when !valid nothing is read and the 16 bytes are zeroed
__device__ __forceinline__ void cp_async16(uint32_t dst, const void *src, bool valid) {
    int bytes = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes) : "memory");
}
// 4 bytes global -> shared, zero-filled when !valid
__device__ __forceinline__ void cp_async4(uint32_t dst, const void *src, bool valid) {
    int bytes = valid ? 4 : 0;
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// waits until at most N of this thread's committed groups are still in flight
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }
#endif

// ---------------------------------------------------------------------------------------------
// fill kernels (poisoning outputs in the tests, zeroing typed buffers)

template <typename T>
__global__ void fill_kernel(T *out, float value, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        out[i] = from_float<T>(value);
}
// The fill and convert launches below take at most 4096 blocks of 256 threads: their kernels
// stride over the whole buffer, so the cap changes only how many elements a thread takes, and
// 4096 blocks are about four times what an H100 runs at once (132 SMs x 8 blocks of 256).
template <typename T>
static inline void fill_device(T *out, float value, size_t n, cudaStream_t stream = 0) {
    if (n == 0) return;
    int blocks = (int)((n + 255) / 256 < 4096 ? (n + 255) / 256 : 4096);
    fill_kernel<<<blocks, 256, 0, stream>>>(out, value, n);
    cudaCheckLaunch();
}

// fp32 <-> bf16 copies of whole buffers
__global__ void convert_f32_to_bf16_kernel(floatX *out, const float *in, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        out[i] = __float2bfloat16(in[i]);
}
__global__ void convert_bf16_to_f32_kernel(float *out, const floatX *in, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        out[i] = __bfloat162float(in[i]);
}
static inline void convert_f32_to_bf16(floatX *out, const float *in, size_t n, cudaStream_t stream = 0) {
    if (n == 0) return;
    int blocks = (int)((n + 255) / 256 < 4096 ? (n + 255) / 256 : 4096);
    convert_f32_to_bf16_kernel<<<blocks, 256, 0, stream>>>(out, in, n);
    cudaCheckLaunch();
}
static inline void convert_bf16_to_f32(float *out, const floatX *in, size_t n, cudaStream_t stream = 0) {
    if (n == 0) return;
    int blocks = (int)((n + 255) / 256 < 4096 ? (n + 255) / 256 : 4096);
    convert_bf16_to_f32_kernel<<<blocks, 256, 0, stream>>>(out, in, n);
    cudaCheckLaunch();
}

#endif
