/*
 * Global L2 norm of the fp32 gradients on the GPU, deterministic: a fixed grid of
 * GLOBAL_NORM_BLOCKS blocks each sums the squares of a grid-strided share of the elements and
 * writes one partial; a second one-block launch adds the partials in a fixed order (in double).
 * The model can instead sum the squares piece by piece as its backward completes each layer's
 * gradient (global_norm_pieces, model_cuda.cu) and add those partials with the same second launch.
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

// The squared norm of separate pieces of a gradient buffer (the model's layer l: its slices of
// the stacked tensors), as GLOBAL_NORM_PIECE_BLOCKS partials that global_norm_finish_kernel adds
// with any others: the pieces are passed by value, at most GLOBAL_NORM_PIECES of them. Each
// block sums the squares of a grid-strided share of every piece, in the pieces' order, 4
// elements at a time where a piece starts on 16 bytes and has a multiple of 4 elements; the
// mapping depends on the pieces and the grid only, so the partials are the same on every run.
#define GLOBAL_NORM_PIECES 16
#define GLOBAL_NORM_PIECE_BLOCKS 256
typedef struct {
    const float *ptr[GLOBAL_NORM_PIECES];
    size_t n[GLOBAL_NORM_PIECES];
    int count;
} NormPieces;

__global__ void global_norm_pieces_partial_kernel(float *partial, NormPieces pieces) {
    __shared__ float shared[32];
    float sum = 0.0f;
    const size_t first = (size_t)blockIdx.x * blockDim.x + threadIdx.x, stride = (size_t)gridDim.x * blockDim.x;
    for (int p = 0; p < pieces.count; p++) {
        const float *g = pieces.ptr[p];
        const size_t n = pieces.n[p];
        if ((uintptr_t)g % 16 == 0 && n % 4 == 0) {
            const float4 *g4 = (const float4 *)g;
            for (size_t i = first; i < n / 4; i += stride) {
                float4 v = g4[i];
                sum += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
            }
        } else {
            for (size_t i = first; i < n; i += stride) sum += g[i] * g[i];
        }
    }
    sum = block_sum(sum, shared);
    if (threadIdx.x == 0) partial[blockIdx.x] = sum;
}

// partial (GLOBAL_NORM_PIECE_BLOCKS floats) = the pieces' squared norm in partials, on stream.
static inline void global_norm_pieces(float *partial, const NormPieces *pieces, cudaStream_t stream) {
    global_norm_pieces_partial_kernel<<<GLOBAL_NORM_PIECE_BLOCKS, 512, 0, stream>>>(partial, *pieces);
    cudaCheckLaunch();
}

// out (1 float on the device) = the root of the sum of partial's count partials.
static inline void global_norm_finish(float *out, const float *partial, int count, cudaStream_t stream) {
    global_norm_finish_kernel<<<1, 1024, 0, stream>>>(out, NULL, partial, count);
    cudaCheckLaunch();
}

// out (1 float on the device) = ||grads (n)||_2; partial holds GLOBAL_NORM_BLOCKS floats.
static inline void global_norm(float *out, float *partial, const float *grads, size_t n, cudaStream_t stream) {
    global_norm_squared_partial_kernel<<<GLOBAL_NORM_BLOCKS, 512, 0, stream>>>(partial, grads, n);
    cudaCheckLaunch();
    global_norm_finish(out, partial, GLOBAL_NORM_BLOCKS, stream);
}
#endif
