/*
 * bf16 as the engine's code sees it from <cuda_bf16.h>, on the CPU emulation of
 * test/emu_cuda/cuda_runtime.h: __nv_bfloat16 is test/gpu_emu.h's floatX (the 16 bits of the
 * value), converted to and from fp32 with round to nearest even; no arithmetic operators (the
 * engine's kernels compute in fp32).
 */
#ifndef TEST_EMU_CUDA_BF16_H
#define TEST_EMU_CUDA_BF16_H
#include "gpu_emu.h"

typedef floatX __nv_bfloat16;
static inline floatX __float2bfloat16(float x) { return to_bf16(x); }
static inline floatX __float2bfloat16_rn(float x) { return to_bf16(x); }
static inline float __bfloat162float(floatX x) { return to_f32(x); }
static inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) { return __nv_bfloat162{to_bf16(lo), to_bf16(hi)}; }
#endif
