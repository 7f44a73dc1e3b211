/*
 * The kernels of test/emu_launch_check.cpp, written as the engine's are (CUDA's launch syntax,
 * static __shared__ arrays): test/test_model_cuda_emu.py rewrites them with test/gpu_emu.py as it
 * rewrites the engine's headers, so the check covers the rewriting too.
 */
#ifndef TEST_EMU_LAUNCH_KERNELS_CUH
#define TEST_EMU_LAUNCH_KERNELS_CUH

// Each block's first thread appends the block's linear index (x fastest) to order.
__global__ void record_block(int *order, int *count) {
    if (threadIdx.x == 0) order[(*count)++] = (int)(blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z));
}

// 40 KiB of static shared memory and the launch's dynamic shared memory (dynamic_floats floats),
// all written, then one element of each read into out[0].
#define STATIC_40K_FLOATS 10240
__global__ void static_40k(float *out, int dynamic_floats) {
    __shared__ float big[STATIC_40K_FLOATS];
    float *dynamic = (float *)dynamic_smem();
    for (int i = threadIdx.x; i < STATIC_40K_FLOATS; i += blockDim.x) big[i] = 1.0f;
    for (int i = threadIdx.x; i < dynamic_floats; i += blockDim.x) dynamic[i] = 2.0f;
    __syncthreads();
    if (threadIdx.x == 0) out[0] = big[STATIC_40K_FLOATS - 1] + (dynamic_floats > 0 ? dynamic[dynamic_floats - 1] : 0.0f);
}

// out[i] = in[i + offset] for i < n, by one thread: with offset 1 the last read is one element
// past in's n (the sanitized emulation's check that such a read is reported).
__global__ void copy_shifted(float *out, const float *in, int n, int offset) {
    if (threadIdx.x == 0)
        for (int i = 0; i < n; i++) out[i] = in[i + offset];
}

// out[0..3] = the float4 at in + offset floats: 16-byte aligned only when offset % 4 == 0.
__global__ void load_float4(float *out, const float *in, int offset) {
    if (threadIdx.x != 0) return;
    float4 v = *reinterpret_cast<const float4 *>(in + offset);
    out[0] = v.x, out[1] = v.y, out[2] = v.z, out[3] = v.w;
}

// Every thread writes dynamic shared memory element threadIdx.x + offset of the launch's n floats
// (past the end with offset > 0), then out[0] = element 0.
__global__ void shared_shifted(float *out, int n, int offset) {
    float *dynamic = (float *)dynamic_smem();
    if ((int)threadIdx.x < n) dynamic[threadIdx.x + offset] = 1.0f;
    __syncthreads();
    if (threadIdx.x == 0) out[0] = dynamic[0];
}

static void launch_copy_shifted(float *out, const float *in, int n, int offset) {
    copy_shifted<<<1, 32>>>(out, in, n, offset);
}
static void launch_load_float4(float *out, const float *in, int offset) { load_float4<<<1, 32>>>(out, in, offset); }
static void launch_shared_shifted(float *out, int n, int offset) {
    shared_shifted<<<2, 64, n * sizeof(float)>>>(out, n, offset);
}
static void launch_record_block(dim3 grid, int *order, int *count) { record_block<<<grid, 32>>>(order, count); }
static void launch_static_40k(float *out, size_t dynamic_bytes, cudaStream_t stream) {
    static_40k<<<1, 64, dynamic_bytes, stream>>>(out, (int)(dynamic_bytes / sizeof(float)));
}
#endif
