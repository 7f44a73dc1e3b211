/*
 * rollout.cu, the GPU rollout engine, built for the CPU as test/model_cuda_emu.cpp builds the
 * model: its host code and kernels compile unchanged against the emulated CUDA toolkit of
 * test/emu_cuda/ (its decode steps' CUDA graphs captured and replayed there), with the
 * launches rewritten into emu_launch calls. Linked with dev/cuda/rollout_check.cu and the CPU
 * generator, it runs the GPU check's tiny models on a machine without a GPU
 * (test/test_model_cuda_emu.py).
 */
#define EMU_PROGRAM "rollout_emu"
#define ATTENTION_FLASH_EMULATION
#define ATTENTION_FLASH_EMULATED_LAUNCHERS
#define DECODE_MATMUL_EMULATION
#include <cuda_runtime.h>
#include "gpu_emu_flash.h"

// decode_matmul.cuh's PTX, as test/decode_matmul_emu.cpp emulates it
static inline void dm_mma(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1) {
    const uint32_t a[4] = {a0, a1, a2, a3};
    emu_mma(d, a, b0, b1);
}
static inline float dm_load_partial(const float *p) { return *p; }
#include "rollout_launched.cu"
