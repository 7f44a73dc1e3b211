/*
 * The rotation of one RoPE pair in fp32, shared by the RoPE kernels (rope.cuh) and the flash
 * attention backward, which rotates dQ and dK back in its epilogue (attention_flash.cuh): both
 * use these expressions, so they give the same bits.
 */
#ifndef LLMC_ROPE_MATH_CUH
#define LLMC_ROPE_MATH_CUH

// the rotation of one pair (x1, x2) = (x[i], x[i + HS/2]) by the angle with cosine c and sine s:
// y1 = x1 c - x2 s, y2 = x2 c + x1 s, with the fused multiply-adds spelled out so that the
// compiler cannot contract two kernels' copies differently
__device__ __forceinline__ void rope_rotate(float x1, float x2, float c, float s, float *y1, float *y2) {
    *y1 = fmaf(x1, c, -__fmul_rn(x2, s));
    *y2 = fmaf(x2, c, __fmul_rn(x1, s));
}
#endif
