/*
 * RoPE on the GPU, rotate-half convention (Hugging Face Llama), in place on the q and k parts of
 * qkv (B, T, QKV), rows q (NH*HS) | k (NKV*HS) | v (NKV*HS). CPU reference: rope_forward /
 * rope_backward in ops_cpu.c. For head vector x (HS) at position t and i < HS/2:
 *   x'[i] = x[i] cos - x[i + HS/2] sin,   x'[i + HS/2] = x[i + HS/2] cos + x[i] sin,
 * angle = t * theta^(-2i/HS). The backward is the rotation by -angle (the rotation is orthogonal).
 *
 * The cos/sin table is computed once on the host in double (rope_table_host), as the CPU does,
 * because float angles lose digits at large t.
 */
#ifndef LLMC_ROPE_CUH
#define LLMC_ROPE_CUH
#include <math.h>
#include "cuda_common.h"

// cos_sin (maxT, HS/2, 2) on the host, malloc'd; the caller uploads and frees it.
static inline float *rope_table_host(int maxT, int HS, float theta) {
    int half = HS / 2;
    float *cos_sin = (float *)malloc((size_t)maxT * half * 2 * sizeof(float));
    cudaRequire(cos_sin != NULL, "rope_table_host: out of host memory");
    for (int t = 0; t < maxT; t++) {
        for (int i = 0; i < half; i++) {
            double angle = (double)t * pow((double)theta, -2.0 * i / HS);
            cos_sin[((size_t)t * half + i) * 2] = (float)cos(angle);
            cos_sin[((size_t)t * half + i) * 2 + 1] = (float)sin(angle);
        }
    }
    return cos_sin;
}

// One thread per (row bt, head h < NH + NKV, pair i < HS/2); sign = +1 forward, -1 backward.
__global__ void rope_kernel(floatX *qkv, const float *cos_sin, int N, int T, int NH, int NKV, int HS, float sign) {
    int half = HS / 2, heads = NH + NKV;
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)N * heads * half) return;
    int i = (int)(idx % half);
    int h = (int)((idx / half) % heads);
    int bt = (int)(idx / ((size_t)half * heads));
    int t = bt % T;
    float c = cos_sin[((size_t)t * half + i) * 2], s = sign * cos_sin[((size_t)t * half + i) * 2 + 1];
    floatX *x = qkv + (size_t)bt * (NH + 2 * NKV) * HS + (size_t)h * HS;
    float x1 = to_float(x[i]), x2 = to_float(x[i + half]);
    x[i] = __float2bfloat16(x1 * c - x2 * s);
    x[i + half] = __float2bfloat16(x2 * c + x1 * s);
}

// cos_sin: the device copy of rope_table_host(maxT >= T, HS, theta).
static inline void rope_forward(floatX *qkv, const float *cos_sin, int B, int T, int NH, int NKV, int HS,
                                cudaStream_t stream) {
    cudaRequire(HS % 2 == 0, "rope_forward: head_dim must be even");
    size_t n = (size_t)B * T * (NH + NKV) * (HS / 2);
    rope_kernel<<<ceil_div((long long)n, 256), 256, 0, stream>>>(qkv, cos_sin, B * T, T, NH, NKV, HS, 1.0f);
    cudaCheckLaunch();
}
static inline void rope_backward(floatX *dqkv, const float *cos_sin, int B, int T, int NH, int NKV, int HS,
                                 cudaStream_t stream) {
    cudaRequire(HS % 2 == 0, "rope_backward: head_dim must be even");
    size_t n = (size_t)B * T * (NH + NKV) * (HS / 2);
    rope_kernel<<<ceil_div((long long)n, 256), 256, 0, stream>>>(dqkv, cos_sin, B * T, T, NH, NKV, HS, -1.0f);
    cudaCheckLaunch();
}
#endif
