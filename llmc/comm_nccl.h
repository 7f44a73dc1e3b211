/*
 * Collectives on GPU buffers: NCCL, one communicator over the same ranks as comm.h. The ranks
 * are still launched by mpirun or srun and comm_init still runs first; NCCL's unique id is made
 * on rank 0 and broadcast with comm_broadcast (MPI), so a GPU run needs no other rendezvous.
 * Each rank drives the GPU of its local rank (comm_local_rank): one process per GPU.
 *
 * Compiled by nvcc from comm_nccl.cu. When nccl.h is not available there, the same functions
 * exist and comm_nccl_init stops with a message saying NCCL is missing.
 *
 * Every NCCL or CUDA error prints "error: <call> failed on rank r of W: <message> (file:line)"
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
// After comm_init: selects GPU comm_local_rank() and creates the NCCL communicator.
void comm_nccl_init(void);
void comm_nccl_finalize(void);

// dev (n floats on the GPU) <- elementwise sum / mean over ranks, on every rank.
void comm_nccl_all_reduce_sum(float *dev, size_t n, void *stream);
void comm_nccl_all_reduce_mean(float *dev, size_t n, void *stream);
// dev (bytes on the GPU) on every rank <- dev on rank root.
void comm_nccl_broadcast(void *dev, size_t bytes, int root, void *stream);
// In place, as comm_all_gather_shards: each rank holds its shard (comm_shard_range) of dev (n).
void comm_nccl_all_gather_shards(float *dev, size_t n, void *stream);

#ifdef __cplusplus
}
#endif
#endif
