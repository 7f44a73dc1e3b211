/*
 * RoPE on the GPU, rotate-half convention (Hugging Face Llama), in place on the q and k parts of
 * qkv (B, T, QKV), rows q (NH*HS) | k (NKV*HS) | v (NKV*HS). CPU reference: rope_forward /
 * rope_backward in ops_cpu.c. For head vector x (HS) at position t and i < HS/2:
 *   x'[i] = x[i] cos - x[i + HS/2] sin,   x'[i + HS/2] = x[i + HS/2] cos + x[i] sin,
 * angle = t * theta^(-2i/HS). The backward is the rotation by -angle (the rotation is orthogonal).
 *
 * The cos/sin table is computed once on the host in double (rope_table_host), as the CPU does,
 * because float angles lose digits at large t.
 *
 * Two kernels: the 8-wide one rotates 8 consecutive pairs of a head per thread with 16-byte
 * loads and stores, for head_dim a multiple of 16 (64 and 128) and buffers on 16 bytes; the
 * scalar one, one pair per thread, is the fallback. Both rotate each pair with the same fp32
 * expressions (rope_rotate, rope_math.cuh), so their outputs are the same bit for bit.
 * rope_forward / rope_backward pick between them. The kernels rotate the heads from first_head on
 * (0: q and k; NH: k alone, rope_forward_keys). The model's flash attention does the rest in its
 * own kernels (attention_flash.cuh): its forward rotates the q heads as it loads them (and stores
 * them rotated), its backward takes dQ and dK back through rope_backward's rotation in its
 * epilogue.
 */
#ifndef LLMC_ROPE_CUH
#define LLMC_ROPE_CUH
#include <math.h>
#include "cuda_common.h"
#include "vector_io.cuh"
#include "rope_math.cuh"

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

#define ROPE_VEC 8

// each pair is rotated by rope_rotate (rope_math.cuh), in the scalar and the 8-wide kernels and in
// the flash attention backward's epilogue (attention_flash.cuh)

// One thread per (row bt, head first_head <= h < NH + NKV, pair i < HS/2): rotates the pair
// (x[i], x[i + HS/2]) of the head in place; sign = +1 forward, -1 backward.
__global__ void rope_scalar_kernel(floatX *qkv, const float *cos_sin, int N, int T, int NH, int NKV, int HS,
                                   int first_head, float sign) {
    int half = HS / 2, heads = NH + NKV - first_head;
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)N * heads * half) return;
    int i = (int)(idx % half);
    int h = first_head + (int)((idx / half) % heads);
    int bt = (int)(idx / ((size_t)half * heads));
    int t = bt % T;
    float c = cos_sin[((size_t)t * half + i) * 2], s = sign * cos_sin[((size_t)t * half + i) * 2 + 1];
    floatX *x = qkv + (size_t)bt * (NH + 2 * NKV) * HS + (size_t)h * HS;
    float y1, y2;
    rope_rotate(to_float(x[i]), to_float(x[i + half]), c, s, &y1, &y2);
    x[i] = __float2bfloat16(y1);
    x[i + half] = __float2bfloat16(y2);
}

// One thread per (row bt, head h, group of 8 pairs i..i+7): the same rotation with one 16-byte
// load and store of x[i..i+7], one of x[i+HS/2..i+HS/2+7] and four float4 loads of the pairs'
// (cos, sin). HS % 16 == 0, qkv and cos_sin on 16 bytes, N * heads * HS/16 < 2^31.
__global__ void rope_vec8_kernel(floatX *qkv, const float *cos_sin, int N, int T, int NH, int NKV, int HS,
                                 int first_head, float sign) {
    int half = HS / 2, heads = NH + NKV - first_head, groups = half / ROPE_VEC;
    int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= N * heads * groups) return;
    int head = idx / groups, i = (idx - head * groups) * ROPE_VEC;
    int bt = head / heads, h = first_head + head - bt * heads;
    int t = bt % T;
    const float *table = cos_sin + ((size_t)t * half + i) * 2;   // (cos, sin) of pairs i..i+7
    float cs[2 * ROPE_VEC];
#pragma unroll
    for (int k = 0; k < ROPE_VEC / 2; k++) load_vec<4>(cs + 4 * k, table + 4 * k);
    floatX *x = qkv + (size_t)bt * (NH + 2 * NKV) * HS + (size_t)h * HS;
    float lo[ROPE_VEC], hi[ROPE_VEC];
    load_vec<ROPE_VEC>(lo, x + i);
    load_vec<ROPE_VEC>(hi, x + i + half);
#pragma unroll
    for (int k = 0; k < ROPE_VEC; k++) rope_rotate(lo[k], hi[k], cs[2 * k], sign * cs[2 * k + 1], &lo[k], &hi[k]);
    store_vec<ROPE_VEC>(x + i, lo);
    store_vec<ROPE_VEC>(x + i + half, hi);
}

// Whether the 8-wide kernel applies: HS/2 a multiple of 8 (head_dim 64 and 128), qkv and the
// table on 16 bytes (then every head and every group's table entries are too), and a thread
// count that fits its 32-bit index.
static inline int rope_vectorized(const floatX *qkv, const float *cos_sin, int B, int T, int NH, int NKV, int HS) {
    return HS % (2 * ROPE_VEC) == 0 && (((uintptr_t)qkv | (uintptr_t)cos_sin) & 15) == 0 &&
           (size_t)B * T * (NH + NKV) * (HS / (2 * ROPE_VEC)) <= 0x7fffffff;
}

// the kernels by name with sign = +1 (forward) or -1 (backward) on the heads from first_head on
// (the harness and the emulator test run both), then the picks. cos_sin: the device copy of
// rope_table_host(maxT >= T, HS, theta).
static inline void rope_scalar_heads(floatX *qkv, const float *cos_sin, int B, int T, int NH, int NKV, int HS,
                                     int first_head, float sign, cudaStream_t stream) {
    cudaRequire(HS % 2 == 0, "rope: head_dim must be even");
    cudaRequire(first_head >= 0 && first_head <= NH + NKV, "rope: first_head out of range");
    size_t n = (size_t)B * T * (NH + NKV - first_head) * (HS / 2);
    if (n == 0) return;
    rope_scalar_kernel<<<ceil_div((long long)n, 256), 256, 0, stream>>>(qkv, cos_sin, B * T, T, NH, NKV, HS, first_head, sign);
    cudaCheckLaunch();
}
static inline void rope_vec8_heads(floatX *qkv, const float *cos_sin, int B, int T, int NH, int NKV, int HS,
                                   int first_head, float sign, cudaStream_t stream) {
    cudaRequire(rope_vectorized(qkv, cos_sin, B, T, NH, NKV, HS), "rope_vec8: head_dim must be a multiple of 16 and qkv and the table start on 16 bytes");
    cudaRequire(first_head >= 0 && first_head <= NH + NKV, "rope: first_head out of range");
    size_t n = (size_t)B * T * (NH + NKV - first_head) * (HS / (2 * ROPE_VEC));
    if (n == 0) return;
    rope_vec8_kernel<<<ceil_div((long long)n, 256), 256, 0, stream>>>(qkv, cos_sin, B * T, T, NH, NKV, HS, first_head, sign);
    cudaCheckLaunch();
}
static inline void rope_scalar(floatX *qkv, const float *cos_sin, int B, int T, int NH, int NKV, int HS, float sign,
                               cudaStream_t stream) {
    rope_scalar_heads(qkv, cos_sin, B, T, NH, NKV, HS, 0, sign, stream);
}
static inline void rope_vec8(floatX *qkv, const float *cos_sin, int B, int T, int NH, int NKV, int HS, float sign,
                             cudaStream_t stream) {
    rope_vec8_heads(qkv, cos_sin, B, T, NH, NKV, HS, 0, sign, stream);
}
static inline void rope_heads(floatX *qkv, const float *cos_sin, int B, int T, int NH, int NKV, int HS, int first_head,
                              float sign, cudaStream_t stream) {
    if (rope_vectorized(qkv, cos_sin, B, T, NH, NKV, HS)) rope_vec8_heads(qkv, cos_sin, B, T, NH, NKV, HS, first_head, sign, stream);
    else rope_scalar_heads(qkv, cos_sin, B, T, NH, NKV, HS, first_head, sign, stream);
}
static inline void rope_forward(floatX *qkv, const float *cos_sin, int B, int T, int NH, int NKV, int HS,
                                cudaStream_t stream) {
    rope_heads(qkv, cos_sin, B, T, NH, NKV, HS, 0, 1.0f, stream);
}
// the forward on the k heads alone (the q heads left as they are, for the flash forward to rotate)
static inline void rope_forward_keys(floatX *qkv, const float *cos_sin, int B, int T, int NH, int NKV, int HS,
                                     cudaStream_t stream) {
    rope_heads(qkv, cos_sin, B, T, NH, NKV, HS, NH, 1.0f, stream);
}
static inline void rope_backward(floatX *dqkv, const float *cos_sin, int B, int T, int NH, int NKV, int HS,
                                 cudaStream_t stream) {
    rope_heads(dqkv, cos_sin, B, T, NH, NKV, HS, 0, -1.0f, stream);
}
#endif
