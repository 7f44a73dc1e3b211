/*
 * The NCCL collectives of comm_nccl.h. Built by nvcc whenever the Makefile finds it; NCCL itself
 * is optional at compile time (__has_include), so a CUDA toolkit without NCCL still builds.
 * Link with -lnccl when COMM_HAVE_NCCL is on.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <cuda_runtime.h>
#include "comm.h"
#include "comm_nccl.h"

// COMM_NO_NCCL builds the functions without NCCL even where nccl.h is found (the CPU emulation of
// the GPU, test/model_cuda_emu.cpp, which has no collectives to run them on).
#if defined(__has_include) && !defined(COMM_NO_NCCL)
#if __has_include(<nccl.h>)
#include <nccl.h>
#define COMM_HAVE_NCCL 1
#endif
#endif

// One line naming the call, the rank and the reason, then exit(1): comm.h's exit handler turns
// that into MPI_Abort, so the other ranks (possibly blocked in a collective) exit non-zero too.
static void comm_nccl_fail(const char *call, const char *message, const char *file, int line) {
    int name_len = (int)strcspn(call, "(");
    fprintf(stderr, "error: %.*s failed on rank %d of %d (%s): %s (%s:%d)\n", name_len, call, comm_rank(),
            comm_world(), comm_host(), message, file, line);
    fflush(stderr);
    exit(1);
}

#define commCudaCheck(call) do { cudaError_t e_ = (call); \
    if (e_ != cudaSuccess) comm_nccl_fail(#call, cudaGetErrorString(e_), __FILE__, __LINE__); } while (0)

// The local rank the launcher announces (Open MPI's mpirun, MPICH's Hydra, srun), else MPI's
// count of the ranks on this node. SLURM_LOCALID counts only inside a job step (srun): an sbatch
// script also sets it, to 0, for the processes an mpirun inside it starts.
static int comm_nccl_local_rank(void) {
    const char *vars[] = {"OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID"};
    for (size_t i = 0; i < sizeof vars / sizeof vars[0]; i++) {
        const char *v = getenv(vars[i]);
        if (v == NULL || *v == '\0') continue;
        if (!strcmp(vars[i], "SLURM_LOCALID") && getenv("SLURM_STEP_NUM_TASKS") == NULL) continue;
        char *end = NULL;
        long r = strtol(v, &end, 10);
        if (*end == '\0' && r >= 0 && r < (1 << 20)) return (int)r;
    }
    return comm_local_rank();
}

int comm_nccl_device(void) {
    int devices = 0;
    commCudaCheck(cudaGetDeviceCount(&devices));
    if (devices < 1) comm_nccl_fail("cudaGetDeviceCount", "no CUDA device is visible to this rank", __FILE__, __LINE__);
    return comm_nccl_local_rank() % devices;
}

// Every rank's (machine, GPU) pair, gathered: two ranks on one GPU would make NCCL fail with a
// generic "invalid usage" (and without NCCL would share its memory and time, which is never what
// a launch of one rank per GPU meant), so they are named here instead, by every rank (all exit
// non-zero).
// The machine is its hostname with its boot id (the same for containers sharing a host,
// different for two hosts even when their containers carry the same hostname); the GPU is its
// PCI address.
typedef struct {
    char host[64], boot_id[64], pci_bus[32];
} RankGpu;

static void comm_nccl_check_distinct_gpus(int device) {
    const int W = comm_world();
    if (W == 1) return;
    RankGpu mine;
    memset(&mine, 0, sizeof mine);
    gethostname(mine.host, sizeof mine.host - 1);
    FILE *f = fopen("/proc/sys/kernel/random/boot_id", "r");
    if (f) {
        if (fgets(mine.boot_id, sizeof mine.boot_id, f) == NULL) mine.boot_id[0] = '\0';
        mine.boot_id[strcspn(mine.boot_id, "\n")] = '\0';
        fclose(f);
    }
    commCudaCheck(cudaDeviceGetPCIBusId(mine.pci_bus, (int)sizeof mine.pci_bus, device));
    RankGpu *all = (RankGpu *)comm_all_gather_bytes(&mine, sizeof mine, NULL, NULL);
    for (int r = 0; r < W; r++)
        for (int s = r + 1; s < W; s++)
            if (!strcmp(all[r].host, all[s].host) && !strcmp(all[r].boot_id, all[s].boot_id) &&
                !strcmp(all[r].pci_bus, all[s].pci_bus)) {
                int devices = 0;
                commCudaCheck(cudaGetDeviceCount(&devices));
                char msg[320];
                snprintf(msg, sizeof msg, "ranks %d and %d both drive GPU %s on host %s: more ranks than GPUs on "
                         "that node (rank %d sees %d GPU(s)); start one rank per GPU", r, s, all[r].pci_bus,
                         all[r].host, comm_rank(), devices);
                free(all);
                comm_nccl_fail("comm_nccl_select_gpu", msg, __FILE__, __LINE__);
            }
    free(all);
}

void comm_nccl_select_gpu(void) {
    static int selected = 0;
    if (selected) return;
    int device = comm_nccl_device();
    comm_nccl_check_distinct_gpus(device);
    // before anything is created on a GPU: otherwise every rank would open a context on GPU 0
    commCudaCheck(cudaSetDevice(device));
    selected = 1;
}

#ifdef COMM_HAVE_NCCL

#define ncclCheck(call) do { ncclResult_t r_ = (call); \
    if (r_ != ncclSuccess) comm_nccl_fail_result(#call, r_, __FILE__, __LINE__); } while (0)

// NCCL's code in words, with its own account of the last error when this NCCL keeps one (2.13+:
// which peer, which transport), so the line says more than "unhandled system error".
static void comm_nccl_fail_result(const char *call, ncclResult_t result, const char *file, int line) {
    char message[640];
#if NCCL_VERSION_CODE >= NCCL_VERSION(2, 13, 0)
    const char *detail = ncclGetLastError(NULL);
    if (detail != NULL && detail[0] != '\0')
        snprintf(message, sizeof message, "%s: %s", ncclGetErrorString(result), detail);
    else
#endif
        snprintf(message, sizeof message, "%s (NCCL_DEBUG=WARN prints NCCL's diagnosis)", ncclGetErrorString(result));
    comm_nccl_fail(call, message, file, line);
}

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
    comm_nccl_select_gpu();
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

void comm_nccl_all_reduce_sum_double(double *dev, size_t n, void *stream) {
    ncclCheck(ncclAllReduce(dev, dev, n, ncclDouble, ncclSum, nccl_comm(), (cudaStream_t)stream));
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

// ncclReduceScatter also needs equal counts: every rank reduces its shard to its owner, in one
// group, which moves the same bytes as a reduce-scatter (each shard once around the ranks).
void comm_nccl_reduce_scatter_mean_shards(float *dev, size_t n, void *stream) {
    int W = comm_world();
    if (W == 1) return;
#if NCCL_VERSION_CODE >= NCCL_VERSION(2, 10, 0)
    const ncclRedOp_t op = ncclAvg;
#else
    const ncclRedOp_t op = ncclSum;
#endif
    ncclCheck(ncclGroupStart());
    for (int r = 0; r < W; r++) {
        size_t lo, hi;
        comm_shard_range(n, r, W, &lo, &hi);
        ncclCheck(ncclReduce(dev + lo, dev + lo, hi - lo, ncclFloat, op, r, nccl_comm(), (cudaStream_t)stream));
    }
    ncclCheck(ncclGroupEnd());
#if NCCL_VERSION_CODE < NCCL_VERSION(2, 10, 0)
    size_t lo, hi;
    comm_shard_range(n, comm_rank(), W, &lo, &hi);
    if (hi > lo) {
        scale_kernel<<<(unsigned)((hi - lo + 255) / 256), 256, 0, (cudaStream_t)stream>>>(dev + lo, hi - lo, 1.0f / (float)W);
        commCudaCheck(cudaGetLastError());
    }
#endif
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
void comm_nccl_all_reduce_sum_double(double *dev, size_t n, void *stream) { comm_nccl_missing("comm_nccl_all_reduce_sum_double"); }
void comm_nccl_all_reduce_mean(float *dev, size_t n, void *stream) { comm_nccl_missing("comm_nccl_all_reduce_mean"); }
void comm_nccl_broadcast(void *dev, size_t bytes, int root, void *stream) { comm_nccl_missing("comm_nccl_broadcast"); }
void comm_nccl_all_gather_shards(float *dev, size_t n, void *stream) { comm_nccl_missing("comm_nccl_all_gather_shards"); }
void comm_nccl_reduce_scatter_mean_shards(float *dev, size_t n, void *stream) { comm_nccl_missing("comm_nccl_reduce_scatter_mean_shards"); }

#endif
