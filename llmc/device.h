/*
 * Where a command computes: the --device flag (cpu, cuda, auto) of the commands that can run on
 * a GPU. CUDA is asked only in a build with the CUDA backend (USE_CUDA, defined by the Makefile
 * when nvcc is found); without it, cuda is refused with a message and auto means the CPU.
 */
#ifndef LLMC_DEVICE_H
#define LLMC_DEVICE_H
#include <stddef.h>

// 1 for a CUDA GPU, 0 for the CPU. cuda needs a CUDA build and a visible GPU, else it exits with
// an error saying which is missing; auto takes the GPU when there is one; any other word is an
// error naming the flag.
int device_resolve(const char *device);
// "cuda (NVIDIA H100 80GB HBM3, 132 SMs, ...)" or "cpu (8 OpenMP threads)", into buf.
void device_describe(int use_gpu, char *buf, size_t size);
// The line "device: <device_describe>" on stdout: pretrain and generate say where they compute.
void device_print(int use_gpu);
// GPU data parallel, decided before anything is created on a GPU: 1 when this GPU run takes the
// NCCL path (several ranks, --zero 1, or TRAIN_MORA_NCCL=1, which sends one rank through it: every
// collective is then the identity, and dev/gpu_check.sh compares it with the plain run). Then the
// build must have NCCL (else an error naming the reason) and the communicator is initialised, which
// selects this rank's GPU. TRAIN_MORA_NCCL is read on every run, so a wrong value is always an
// error; CPU runs ignore it (their collectives are MPI's).
int device_data_parallel_init(int use_gpu, int world, int zero);
// One GPU per rank without collectives between them (eval: each rank samples and scores its shard
// of the prompts and MPI gathers the results): when use_gpu, before anything is created on a GPU,
// selects this rank's GPU (local rank mod the GPUs it sees) and stops with a message naming the
// ranks when two of them would share one. Needs no NCCL.
void device_select_rank_gpu(int use_gpu);
#endif
