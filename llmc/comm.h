/*
 * Collectives for data parallelism: one interface over the ranks of a run, whatever carries it.
 *
 *   MPI      when built with -DUSE_MPI (the Makefile does so when it finds mpicc): the ranks are
 *            the processes that mpirun or srun started, MPI_COMM_WORLD is the group. srun must
 *            give them a PMI (--mpi=pmix): without one a single task is one rank without MPI,
 *            and several are refused before MPI_Init, which would abort.
 *   no MPI   one rank; every collective is the identity. A binary built this way refuses to
 *            run when a launcher says it started several ranks, rather than have every process
 *            train alone and write the same files.
 *
 * Buffers here are host memory. GPU buffers go through NCCL (comm_nccl.h), whose communicator
 * is set up with the unique id broadcast by comm_broadcast, so the launch is the same.
 *
 * Every collective must be called by all ranks in the same order with matching sizes. A failed
 * MPI call prints "error: MPI_Xxx failed on rank r of W (host): <MPI's message> (file:line)"
 * and aborts the whole job (MPI_Abort), so every rank exits non-zero. A rank that exits through
 * fatal() (bad input, a missing file; its message begins "error: rank r/W (host): " once
 * comm_init has found several ranks) takes the job down the same way: comm_init registers an
 * exit handler that calls MPI_Abort when a rank exits with a non-zero status before
 * comm_finalize, so no rank is left waiting forever in a collective for a peer that is gone.
 *
 * Data-parallel sizes: n elements, world W ranks. Shards (ZeRO-1) are contiguous: rank r owns
 * [offsets[r], offsets[r+1]) with offsets[r] = floor(n * r / W).
 */
#ifndef LLMC_COMM_H
#define LLMC_COMM_H

#include <stddef.h>
#include <stdio.h>

#ifdef __cplusplus
extern "C" {   // comm_nccl.cu calls these from C++
#endif

// Starts the collective layer (MPI_Init under MPI) and reads rank and world size. Call once,
// first thing in main, before any other function here; argc/argv may be NULL.
void comm_init(int *argc, char ***argv);
// Ends it (MPI_Finalize). Call once on every rank on the normal way out of main.
void comm_finalize(void);

int comm_rank(void);        // this process's rank, 0 .. world-1
int comm_world(void);       // number of ranks
int comm_local_rank(void);  // rank among the processes on this node (picks the GPU)
// "mpi" or "single": what carries the collectives in this build.
const char *comm_backend_name(void);
// This machine's name (gethostname), for messages that say where a rank runs.
const char *comm_host(void);
// Whether srun started the ranks (rather than an mpirun, which may itself run inside a Slurm step).
int comm_started_by_srun(void);

// Where the ranks run, said once: every rank calls it (a collective); rank 0 prints one line to
// stdout, "placement: 2 ranks on 1 node(s) (vm: ranks 0-1); per rank 1 OpenMP thread(s) on 1
// core(s) of 2" (ranges where ranks differ), and warnings to stderr when a rank runs more
// OpenMP threads than the cores of its affinity mask, when the ranks of a node run more threads
// in all than it has cores, or when they are bound together to fewer than half of its online
// cores (mpirun binds each rank to one core by default for up to 2 ranks, srun gives a task one
// CPU without --cpus-per-task), with the launch that cures it. Prints nothing on one rank.
// "Cores" are the logical CPUs the kernel counts (sched_getaffinity, _SC_NPROCESSORS_ONLN).
void comm_report_placement(void);

// One rank's placement, as comm_report_placement gathers it from every rank.
typedef struct {
    char host[64];              // gethostname
    char boot_id[40];           // the kernel's boot id: two machines that share a hostname differ in it
    int threads;                // omp_get_max_threads()
    int cores;                  // CPUs in the rank's affinity mask
    int online;                 // the node's online CPUs
    unsigned char mask[128];    // the affinity mask's CPUs 0..1023, one bit each (the node's union)
} CommPlacement;
// The report of comm_report_placement for the placements of world ranks: the line to out, the
// warnings to err. Apart so that placements one machine cannot show (several nodes, a node of
// many cores) are checked too (test/tools/comm_check placement).
void comm_placement_print(const CommPlacement *ranks, int world, FILE *out, FILE *err);

// Waits until every rank has called it.
void comm_barrier(void);

// buf (n) <- elementwise sum over ranks of buf (n), on every rank.
void comm_all_reduce_sum(float *buf, size_t n);
// buf (n) <- elementwise mean over ranks: the sum, then times 1/W (exact for W a power of two).
void comm_all_reduce_mean(float *buf, size_t n);
// Sums in double, for statistics gathered over ranks (sums of rewards, counts).
void comm_all_reduce_sum_double(double *buf, size_t n);

// The largest of the ranks' v, on every rank.
int comm_all_reduce_max_int(int v);

// buf (bytes) on every rank <- buf on rank root.
void comm_broadcast(void *buf, size_t bytes, int root);

// Variable-size all-gather: every rank contributes send (send_bytes, may differ per rank and be
// 0); returns a malloc'd buffer holding all contributions concatenated in rank order, and fills
// recv_bytes (W entries, may be NULL) with each rank's size and *total_bytes (may be NULL).
void *comm_all_gather_bytes(const void *send, size_t send_bytes, size_t *recv_bytes, size_t *total_bytes);
// The same gathered on rank root alone: root gets the buffer (and recv_bytes, *total_bytes),
// every other rank NULL (recv_bytes and *total_bytes untouched). What only one rank reads need not
// be copied to every rank's memory.
void *comm_gather_bytes(const void *send, size_t send_bytes, int root, size_t *recv_bytes, size_t *total_bytes);

// The contiguous shard of n elements that rank r of W owns: [*lo, *hi).
void comm_shard_range(size_t n, int rank, int world, size_t *lo, size_t *hi);
// In-place all-gather of a sharded buffer: on entry each rank holds its own shard of buf (n)
// (comm_shard_range); on return every rank holds every shard.
void comm_all_gather_shards(float *buf, size_t n);
// Gather of shards to rank root: shard (hi - lo elements of this rank's range) is written into
// full (n) on root at its offset; full is only read on root (may be NULL elsewhere).
void comm_gather_shards(float *full, const float *shard, size_t n, int root);

#ifdef __cplusplus
}
#endif
#endif
