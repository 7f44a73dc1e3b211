/*
 * The NCCL collectives of comm_nccl.h. Built by nvcc whenever the Makefile finds it; NCCL itself
 * is optional at compile time (__has_include), so a CUDA toolkit without NCCL still builds.
 * Link with -lnccl when COMM_HAVE_NCCL is on.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cuda_runtime.h>
#include "comm.h"
#include "comm_nccl.h"

#if defined(__has_include)
#if __has_include(<nccl.h>)
#include <nccl.h>
#define COMM_HAVE_NCCL 1
#endif
#endif

// One line naming the call, the rank and the reason, then exit(1): comm.h's exit handler turns
// that into MPI_Abort, so the other ranks (possibly blocked in a collective) exit non-zero too.
static void comm_nccl_fail(const char *call, const char *message, const char *file, int line) {
    int name_len = (int)strcspn(call, "(");
    fprintf(stderr, "error: %.*s failed on rank %d of %d: %s (%s:%d)\n", name_len, call, comm_rank(),
            comm_world(), message, file, line);
    fflush(stderr);
    exit(1);
}

#define commCudaCheck(call) do { cudaError_t e_ = (call); \
    if (e_ != cudaSuccess) comm_nccl_fail(#call, cudaGetErrorString(e_), __FILE__, __LINE__); } while (0)

#ifdef COMM_HAVE_NCCL

#define ncclCheck(call) do { ncclResult_t r_ = (call); \
    if (r_ != ncclSuccess) comm_nccl_fail(#call, ncclGetErrorString(r_), __FILE__, __LINE__); } while (0)

static ncclComm_t comm_nccl_ = NULL;

static ncclComm_t nccl_comm(void) {
    if (comm_nccl_ == NULL) {
        fprintf(stderr, "error: NCCL collective before comm_nccl_init (rank %d)\n", comm_rank());
        exit(1);
    }
    return comm_nccl_;
}

int comm_nccl_available(void) { return 1; }

// x (n) *= scale
__global__ void scale_kernel(float *x, size_t n, float scale) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] *= scale;
}

void comm_nccl_init(void) {
    if (comm_nccl_ != NULL) return;
    int devices = 0;
    commCudaCheck(cudaGetDeviceCount(&devices));
    if (devices < 1) comm_nccl_fail("cudaGetDeviceCount", "no CUDA device", __FILE__, __LINE__);
    // one process per GPU: local rank k drives device k (more ranks than GPUs on a node would
    // share devices, which NCCL refuses, so say so plainly)
    if (comm_local_rank() >= devices) {
        char msg[160];
        snprintf(msg, sizeof msg, "local rank %d but only %d GPU(s) on this node: start one rank per GPU",
                 comm_local_rank(), devices);
        comm_nccl_fail("comm_nccl_init", msg, __FILE__, __LINE__);
    }
    commCudaCheck(cudaSetDevice(comm_local_rank()));
    ncclUniqueId id;
    if (comm_rank() == 0) ncclCheck(ncclGetUniqueId(&id));
    comm_broadcast(&id, sizeof id, 0);
    ncclCheck(ncclCommInitRank(&comm_nccl_, comm_world(), id, comm_rank()));
}

void comm_nccl_finalize(void) {
    if (comm_nccl_ == NULL) return;
    ncclCheck(ncclCommDestroy(comm_nccl_));
    comm_nccl_ = NULL;
}

void comm_nccl_all_reduce_sum(float *dev, size_t n, void *stream) {
    ncclCheck(ncclAllReduce(dev, dev, n, ncclFloat, ncclSum, nccl_comm(), (cudaStream_t)stream));
}

void comm_nccl_all_reduce_mean(float *dev, size_t n, void *stream) {
#if NCCL_VERSION_CODE >= NCCL_VERSION(2, 10, 0)
    ncclCheck(ncclAllReduce(dev, dev, n, ncclFloat, ncclAvg, nccl_comm(), (cudaStream_t)stream));
#else
    // NCCL before 2.10 has no average: the sum, then x (1/W) on the GPU
    comm_nccl_all_reduce_sum(dev, n, stream);
    scale_kernel<<<(unsigned)((n + 255) / 256), 256, 0, (cudaStream_t)stream>>>(dev, n, 1.0f / (float)comm_world());
    commCudaCheck(cudaGetLastError());
#endif
}

void comm_nccl_broadcast(void *dev, size_t bytes, int root, void *stream) {
    ncclCheck(ncclBroadcast(dev, dev, bytes, ncclChar, root, nccl_comm(), (cudaStream_t)stream));
}

// Shards differ in size by one element, and ncclAllGather needs equal counts: every rank
// broadcasts its shard instead, in one group so NCCL runs them as one collective.
void comm_nccl_all_gather_shards(float *dev, size_t n, void *stream) {
    int W = comm_world();
    if (W == 1) return;
    ncclCheck(ncclGroupStart());
    for (int r = 0; r < W; r++) {
        size_t lo, hi;
        comm_shard_range(n, r, W, &lo, &hi);
        ncclCheck(ncclBroadcast(dev + lo, dev + lo, hi - lo, ncclFloat, r, nccl_comm(), (cudaStream_t)stream));
    }
    ncclCheck(ncclGroupEnd());
}

#else  // no nccl.h at build time

static void comm_nccl_missing(const char *what) {
    fprintf(stderr, "error: %s: this build has no NCCL (nccl.h was not found when compiling comm_nccl.cu); "
                    "install NCCL and rebuild for multi-GPU runs\n", what);
    exit(1);
}
int comm_nccl_available(void) { return 0; }
void comm_nccl_init(void) { comm_nccl_missing("comm_nccl_init"); }
void comm_nccl_finalize(void) {}
void comm_nccl_all_reduce_sum(float *dev, size_t n, void *stream) { comm_nccl_missing("comm_nccl_all_reduce_sum"); }
void comm_nccl_all_reduce_mean(float *dev, size_t n, void *stream) { comm_nccl_missing("comm_nccl_all_reduce_mean"); }
void comm_nccl_broadcast(void *dev, size_t bytes, int root, void *stream) { comm_nccl_missing("comm_nccl_broadcast"); }
void comm_nccl_all_gather_shards(float *dev, size_t n, void *stream) { comm_nccl_missing("comm_nccl_all_gather_shards"); }

#endif
