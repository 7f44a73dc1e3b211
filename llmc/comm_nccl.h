/*
 * Collectives on GPU buffers: NCCL, one communicator over the same ranks as comm.h. The ranks
 * are still launched by mpirun or srun and comm_init still runs first; NCCL's unique id is made
 * on rank 0 and broadcast with comm_broadcast (MPI), so a GPU run needs no other rendezvous. A
 * single rank needs no exchange at all, so one process without MPI can use these too (the GPU
 * check runs the data-parallel code path that way on a one-GPU machine).
 *
 * One process per GPU: a rank drives GPU (local rank mod visible GPUs), the local rank being the
 * launcher's (OMPI_COMM_WORLD_LOCAL_RANK, SLURM_LOCALID, MPI_LOCALRANKID) or else MPI's count of
 * the ranks on this node. The modulo serves launchers that show each process only its own GPU
 * (srun --gpus-per-task=1 sets CUDA_VISIBLE_DEVICES per task: every rank sees one GPU, index
 * 0). Two ranks that end up on the same GPU of one node (more ranks than GPUs) are refused with
 * a message naming them, on every rank.
 *
 * Compiled by nvcc from comm_nccl.cu. When nccl.h is not available there, the same functions
 * exist and comm_nccl_init stops with a message saying NCCL is missing; comm_nccl_select_gpu
 * works either way.
 *
 * Every NCCL or CUDA error prints "error: <call> failed on rank r of W (host): <message> (file:line)"
 * and exits non-zero; under MPI that exit aborts the job (comm.h), so every rank exits non-zero.
 * Streams are cudaStream_t passed as void* so that C code can call this header.
 */
#ifndef LLMC_COMM_NCCL_H
#define LLMC_COMM_NCCL_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

// 1 when this build has NCCL.
int comm_nccl_available(void);
// The GPU this rank drives (local rank mod visible GPUs, see above); exits with a message when no
// GPU is visible. Does not touch the device.
int comm_nccl_device(void);
// After comm_init, before anything else touches the GPU: checks that no two ranks share a GPU and
// selects this rank's (cudaSetDevice(comm_nccl_device())). Needs no NCCL: ranks that each use
// their GPU alone (eval's sharded sampling) call it in place of comm_nccl_init. Called by every
// rank; a second call does nothing.
void comm_nccl_select_gpu(void);
// comm_nccl_select_gpu, then the NCCL communicator. Called by every rank; a second call does
// nothing.
void comm_nccl_init(void);
void comm_nccl_finalize(void);

// dev (n floats on the GPU) <- elementwise sum / mean over ranks, on every rank.
void comm_nccl_all_reduce_sum(float *dev, size_t n, void *stream);
void comm_nccl_all_reduce_mean(float *dev, size_t n, void *stream);
// the same sum in double (the squared gradient norm of ZeRO-1 shards)
void comm_nccl_all_reduce_sum_double(double *dev, size_t n, void *stream);
// dev (bytes on the GPU) on every rank <- dev on rank root.
void comm_nccl_broadcast(void *dev, size_t bytes, int root, void *stream);
// In place, as comm_all_gather_shards: each rank holds its shard (comm_shard_range) of dev (n).
void comm_nccl_all_gather_shards(float *dev, size_t n, void *stream);
// In place, its reverse (ZeRO-1's gradient reduction): rank r's shard of dev (n) <- the
// elementwise mean over ranks of that shard. Outside its own shard a rank's dev keeps its values.
void comm_nccl_reduce_scatter_mean_shards(float *dev, size_t n, void *stream);

#ifdef __cplusplus
}
#endif
#endif
