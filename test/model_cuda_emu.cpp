/*
 * llmc/model_cuda.cu, the whole CUDA model, built for the CPU: its host code, its kernels and
 * the kernel headers compile unchanged as C++ against the emulated CUDA toolkit of
 * test/emu_cuda/ (runtime, bf16, cuBLASLt) and the GPU emulation of test/gpu_emu.h (threads,
 * barriers, shuffles) and test/gpu_emu_flash.h (the flash attention's ldmatrix, mma.sync and
 * cp.async), with their <<<...>>> launches rewritten into emu_launch calls (test/gpu_emu.py).
 * Linked with dev/cuda/test_model_gpu.cu and the CPU reference, it runs the GPU test's tiny
 * models on a machine without a GPU (test/test_model_cuda_emu.py): the forward and backward
 * against the fp32 CPU model, every switch of the model both ways, the 20-step loss curves.
 *
 * The NCCL collectives are not emulated: llmc/comm_nccl.cu is built here without NCCL
 * (COMM_NO_NCCL), so its collectives stop with a message while comm_nccl_select_gpu picks each
 * rank's device of the emulated ones (EMU_DEVICES) as on GPUs.
 */
#define EMU_PROGRAM "model_cuda_emu"
#define ATTENTION_FLASH_EMULATION
#define ATTENTION_FLASH_EMULATED_LAUNCHERS
#include <cuda_runtime.h>
#include "gpu_emu_flash.h"
#include "model_cuda_launched.cu"
#define COMM_NO_NCCL
#include "comm_nccl.cu"
