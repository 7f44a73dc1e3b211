/*
 * What the tuners share (the flash attention's launch configuration, attention_flash.cuh; the
 * cuBLASLt algorithm of each product, matmul.cuh): a fingerprint of a device buffer's bits, so
 * that a candidate is kept only when its output equals the default's bit for bit, and a timer.
 */
#ifndef LLMC_TUNING_CUH
#define LLMC_TUNING_CUH
#include "cuda_common.h"

// *sum += sum over i of words[i] * (2i + 1) mod 2^64: an order-independent fingerprint in which
// any one changed word changes the sum (odd numbers are invertible mod 2^64).
__global__ void tune_fingerprint_kernel(unsigned long long *sum, const uint32_t *words, size_t n) {
    unsigned long long acc = 0;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        acc += (unsigned long long)words[i] * (2ull * i + 1ull);
    for (int offset = 16; offset > 0; offset >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, offset);
    if (threadIdx.x % 32 == 0) atomicAdd(sum, acc);
}

// The fingerprint of bytes (a multiple of 4) at p, after the stream's work so far; d_sum is one
// device word of scratch. Synchronises the stream.
static inline unsigned long long tune_fingerprint(unsigned long long *d_sum, const void *p, size_t bytes,
                                                  cudaStream_t stream) {
    unsigned long long h = 0;
    cudaCheck(cudaMemsetAsync(d_sum, 0, sizeof(h), stream));
    // 264 blocks, two for each of an H100's 132 SMs, striding over the buffer. The sum is the same
    // for any grid (each word's term depends only on its index, and the adds commute mod 2^64), so
    // the grid sets the speed only.
    tune_fingerprint_kernel<<<264, 256, 0, stream>>>(d_sum, (const uint32_t *)p, bytes / 4);
    cudaCheckLaunch();
    cudaCheck(cudaMemcpyAsync(&h, d_sum, sizeof(h), cudaMemcpyDeviceToHost, stream));
    cudaCheck(cudaStreamSynchronize(stream));
    return h;
}

// Holds its stream for about `ns` nanoseconds (the GPU's global timer): what is queued behind it
// then runs back to back.
// (Compiled for the GPU only: on the CPU emulation of test/emu_cuda/ it returns at once.)
__global__ void tune_hold_kernel(unsigned long long ns) {
#ifdef __CUDA_ARCH__
    unsigned long long start, now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
    do {
        __nanosleep(1000);
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    } while (now - start < ns);
#endif
}

// Mean milliseconds of fn() over reps runs after one warm-up run, on stream. hold_us > 0: the
// runs are queued behind a kernel that holds the stream that long, so that they run back to back
// as in a CUDA graph even when each takes less time on the GPU than its launch on the host (a
// decode step's products: a few microseconds each), and the time is the GPU's, not the host's.
template <typename F>
static inline float tune_time_ms(F fn, cudaStream_t stream, int reps, int hold_us = 0) {
    cudaEvent_t start, stop;
    cudaCheck(cudaEventCreate(&start));
    cudaCheck(cudaEventCreate(&stop));
    fn();
    if (hold_us > 0) {
        tune_hold_kernel<<<1, 1, 0, stream>>>(1000ull * (unsigned long long)hold_us);
        cudaCheckLaunch();
    }
    cudaCheck(cudaEventRecord(start, stream));
    for (int i = 0; i < reps; i++) fn();
    cudaCheck(cudaEventRecord(stop, stream));
    cudaCheck(cudaEventSynchronize(stop));
    float ms = 0.0f;
    cudaCheck(cudaEventElapsedTime(&ms, start, stop));
    cudaCheck(cudaEventDestroy(start));
    cudaCheck(cudaEventDestroy(stop));
    return ms / reps;
}
#endif
