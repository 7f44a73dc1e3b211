/*
 * Global L2 norm of the fp32 gradients on the GPU, deterministic: a fixed grid of
 * GLOBAL_NORM_BLOCKS blocks each sums the squares of a grid-strided share of the elements and
 * writes one partial; a second one-block launch adds the partials in a fixed order (in double).
 * CPU reference: model_grad_norm in model.c. Clipping is applied by AdamW's grad_scale.
 */
#ifndef LLMC_GLOBAL_NORM_CUH
#define LLMC_GLOBAL_NORM_CUH
#include "cuda_common.h"

#define GLOBAL_NORM_BLOCKS 1024

__global__ void global_norm_squared_partial_kernel(float *partial, const float *grads, size_t n) {
    __shared__ float shared[32];
    float sum = 0.0f;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float g = grads[i];
        sum += g * g;
    }
    sum = block_sum(sum, shared);
    if (threadIdx.x == 0) partial[blockIdx.x] = sum;
}

// out[0] = sqrt(sum of the partials), rounded once to float; or, when squared is given, the sum
// itself in double (one rank's squared norm, which data-parallel ranks add in double before the
// root, so that one rank's norm is the same float as the plain path's); one block of 32 * 32
// threads, summing in double.
__global__ void global_norm_finish_kernel(float *out, double *squared, const float *partial, int count) {
    __shared__ double shared[1024];
    double sum = 0.0;
    for (int i = threadIdx.x; i < count; i += blockDim.x) sum += partial[i];
    shared[threadIdx.x] = sum;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
        if (threadIdx.x < stride) shared[threadIdx.x] += shared[threadIdx.x + stride];
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        if (squared) squared[0] = shared[0];
        else out[0] = (float)sqrt(shared[0]);
    }
}

// out (1 float on the device) = ||grads (n)||_2; partial holds GLOBAL_NORM_BLOCKS floats.
static inline void global_norm(float *out, float *partial, const float *grads, size_t n, cudaStream_t stream) {
    global_norm_squared_partial_kernel<<<GLOBAL_NORM_BLOCKS, 512, 0, stream>>>(partial, grads, n);
    cudaCheckLaunch();
    global_norm_finish_kernel<<<1, 1024, 0, stream>>>(out, NULL, partial, GLOBAL_NORM_BLOCKS);
    cudaCheckLaunch();
}
#endif
