/*
 * Vector loads and stores for the memory-bound kernels: VEC consecutive elements moved as one
 * access of VEC * sizeof(element) bytes (16 bytes at most), converted to and from fp32 registers.
 * The address must be aligned to the access's size; vector_aligned checks a pointer.
 *   fp32: VEC 1, 2, 4      (float, float2, float4)
 *   bf16: VEC 1, 2, 4, 8   (16, 32, 64, 128 bits)
 */
#ifndef LLMC_VECTOR_IO_CUH
#define LLMC_VECTOR_IO_CUH
#include <stdint.h>

template <int VEC> __device__ __forceinline__ void load_vec(float *dst, const float *src) {
    static_assert(VEC == 1 || VEC == 2 || VEC == 4, "fp32 vectors are 1, 2 or 4 wide");
    if constexpr (VEC == 4) {
        float4 v = *reinterpret_cast<const float4 *>(src);
        dst[0] = v.x; dst[1] = v.y; dst[2] = v.z; dst[3] = v.w;
    } else if constexpr (VEC == 2) {
        float2 v = *reinterpret_cast<const float2 *>(src);
        dst[0] = v.x; dst[1] = v.y;
    } else {
        dst[0] = *src;
    }
}
template <int VEC> __device__ __forceinline__ void store_vec(float *dst, const float *src) {
    static_assert(VEC == 1 || VEC == 2 || VEC == 4, "fp32 vectors are 1, 2 or 4 wide");
    if constexpr (VEC == 4) {
        float4 v;
        v.x = src[0]; v.y = src[1]; v.z = src[2]; v.w = src[3];
        *reinterpret_cast<float4 *>(dst) = v;
    } else if constexpr (VEC == 2) {
        float2 v;
        v.x = src[0]; v.y = src[1];
        *reinterpret_cast<float2 *>(dst) = v;
    } else {
        *dst = src[0];
    }
}

// the bf16 vector types by width: 2 -> 32 bits, 4 -> 64 bits, 8 -> 128 bits
template <int VEC> struct Bf16Pack;
template <> struct Bf16Pack<1> { typedef floatX type; };
template <> struct Bf16Pack<2> { typedef uint32_t type; };
template <> struct Bf16Pack<4> { typedef uint2 type; };
template <> struct Bf16Pack<8> { typedef uint4 type; };

template <int VEC> __device__ __forceinline__ void load_vec(float *dst, const floatX *src) {
    typename Bf16Pack<VEC>::type packed = *reinterpret_cast<const typename Bf16Pack<VEC>::type *>(src);
    const floatX *h = reinterpret_cast<const floatX *>(&packed);
#pragma unroll
    for (int i = 0; i < VEC; i++) dst[i] = to_float(h[i]);
}
template <int VEC> __device__ __forceinline__ void store_vec(floatX *dst, const float *src) {
    typename Bf16Pack<VEC>::type packed;
    floatX *h = reinterpret_cast<floatX *>(&packed);
#pragma unroll
    for (int i = 0; i < VEC; i++) h[i] = __float2bfloat16(src[i]);
    *reinterpret_cast<typename Bf16Pack<VEC>::type *>(dst) = packed;
}

// p (may be NULL) is aligned to bytes
static inline bool vector_aligned(const void *p, size_t bytes) { return ((uintptr_t)p % bytes) == 0; }
#endif
