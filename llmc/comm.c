/*
 * The collectives of comm.h: MPI when built with -DUSE_MPI, a single rank otherwise.
 *
 * MPI counts are int, so buffers are sent in chunks of at most COMM_CHUNK elements; a model of
 * more than 2^31 parameters needs no special case anywhere else.
 */
#include "comm.h"
#include "utils.h"
#include <unistd.h>

#ifdef USE_MPI
#include <mpi.h>
#endif

#define COMM_CHUNK ((size_t)1 << 30)

static int comm_rank_ = 0, comm_world_ = 1, comm_local_rank_ = 0;
static int comm_initialized_ = 0, comm_finalized_ = 0;

int comm_rank(void) { return comm_rank_; }
int comm_world(void) { return comm_world_; }
int comm_local_rank(void) { return comm_local_rank_; }

void comm_shard_range(size_t n, int rank, int world, size_t *lo, size_t *hi) {
    // n * r / W in 128-bit-safe order: n < 2^40 parameters keeps n * W far below 2^64
    *lo = (size_t)((unsigned long long)n * (unsigned long long)rank / (unsigned long long)world);
    *hi = (size_t)((unsigned long long)n * (unsigned long long)(rank + 1) / (unsigned long long)world);
}

// The world size a launcher announces in the environment (Open MPI's mpirun, MPICH's Hydra or
// srun's pmi2 plugin, srun for the tasks of its job step), or 1. The first one set is the
// launcher's: the ranks of an mpirun inside a Slurm allocation also inherit the
// SLURM_STEP_NUM_TASKS of the step that started mpirun's daemons (one task per node).
static int launcher_world_size(void) {
    const char *vars[] = {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_STEP_NUM_TASKS"};
    for (size_t i = 0; i < sizeof vars / sizeof vars[0]; i++) {
        const char *v = getenv(vars[i]);
        if (v && *v) return atoi(v) > 1 ? atoi(v) : 1;
    }
    return 1;
}

#ifdef USE_MPI

static int comm_mpi_ = 0;   // MPI was initialised (this process was started by an MPI launcher)
static char comm_host_[64] = "";   // this machine's name, for messages

static void comm_read_host(void) {
    if (gethostname(comm_host_, sizeof comm_host_ - 1) != 0 || comm_host_[0] == '\0')
        snprintf(comm_host_, sizeof comm_host_, "unknown host");
    comm_host_[sizeof comm_host_ - 1] = '\0';
}

// Whether an MPI launcher started this process with what MPI_Init needs to find its peers:
// Open MPI's mpirun (OMPI_COMM_WORLD_SIZE), MPICH's Hydra (PMI_RANK, PMI_FD, PMI_SIZE), srun
// with a PMI plugin (--mpi=pmix sets PMIX_RANK, --mpi=pmi2 PMI_FD, PMI_RANK and PMI_SIZE).
// A process started directly runs as one rank without initialising MPI at all: no start-up
// cost, and no dependence on MPI's singleton mode working on the machine. srun without a PMI
// plugin (no --mpi=, and none by default on the cluster) leaves only its own variables
// (SLURM_STEP_NUM_TASKS), with which Open MPI's MPI_Init aborts even for one task: comm_init
// decides that case without MPI. (Inside an sbatch script but outside srun,
// SLURM_STEP_NUM_TASKS is unset: that is one process too.)
static int launched_by_mpi(void) {
    const char *vars[] = {"OMPI_COMM_WORLD_SIZE", "PMI_RANK", "PMI_FD", "PMI_SIZE", "PMIX_RANK"};
    for (size_t i = 0; i < sizeof vars / sizeof vars[0]; i++)
        if (getenv(vars[i]) != NULL) return 1;
    return 0;
}

// The tasks of the srun job step that started this process, or 0 outside srun.
static int srun_tasks(void) {
    const char *v = getenv("SLURM_STEP_NUM_TASKS");
    return v && *v ? atoi(v) : 0;
}

// Checks the return code of an MPI call; on failure names the call, the rank and MPI's own
// message, then aborts the whole job so that every rank exits non-zero.
#define mpiCheck(call) mpi_check_((call), #call, __FILE__, __LINE__)
static void mpi_check_(int rc, const char *call, const char *file, int line) {
    if (rc == MPI_SUCCESS) return;
    char msg[MPI_MAX_ERROR_STRING];
    int len = 0;
    if (MPI_Error_string(rc, msg, &len) != MPI_SUCCESS) snprintf(msg, sizeof msg, "error code %d", rc);
    int name_len = (int)strcspn(call, "(");
    fprintf(stderr, "error: %.*s failed on rank %d of %d (%s): %s (%s:%d)\n", name_len, call, comm_rank_,
            comm_world_, comm_host_, msg, file, line);
    fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, 1);
    exit(1);
}

// Runs at exit. A non-zero status before comm_finalize (fatal() on this rank) aborts the job:
// the other ranks may be blocked in a collective waiting for this one and would never return.
static void comm_exit_handler(int status, void *arg) {
    (void)arg;
    if (!comm_mpi_ || comm_finalized_) return;
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (finalized) return;
    if (status != 0) {
        MPI_Abort(MPI_COMM_WORLD, status);
    } else {
        comm_finalized_ = 1;
        MPI_Finalize();
    }
}

void comm_init(int *argc, char ***argv) {
    if (comm_initialized_) fatal("comm_init called twice");
    comm_initialized_ = 1;
    comm_read_host();
    if (!launched_by_mpi()) {
        // srun without PMI: its tasks could not find each other, and each would train alone
        int tasks = srun_tasks();
        if (tasks > 1)
            fatal("srun started %d tasks but gave them no PMI: add --mpi=pmix (srun --mpi=list shows what this "
                  "cluster has)", tasks);
        return;   // one rank, MPI untouched (started directly, or by srun as its only task)
    }
    int already = 0;
    MPI_Initialized(&already);
    if (!already) {
        int rc = MPI_Init(argc, argv);
        if (rc != MPI_SUCCESS) {
            fprintf(stderr, "error: MPI_Init failed (code %d): is this process started by mpirun or srun with a working MPI?\n", rc);
            exit(1);
        }
    }
    comm_mpi_ = 1;
    on_exit(comm_exit_handler, NULL);
    // errors come back as return codes, so mpiCheck can name the call before aborting
    mpiCheck(MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN));
    mpiCheck(MPI_Comm_rank(MPI_COMM_WORLD, &comm_rank_));
    mpiCheck(MPI_Comm_size(MPI_COMM_WORLD, &comm_world_));
    int launched = launcher_world_size();
    if (comm_world_ == 1 && launched > 1) {
        // under srun the likely cause is a PMI plugin this MPI library does not speak (MPICH's
        // PMI-1 client given PMIx); under mpirun, an mpirun of another MPI installation
        const char *mpi_type = getenv("SLURM_MPI_TYPE");
        if (srun_tasks() > 0 && getenv("OMPI_COMM_WORLD_SIZE") == NULL)
            fatal("the launcher started %d ranks but MPI sees a world of 1: srun's PMI plugin%s%s%s is not one the MPI "
                  "library train_mora was built with (mpicc) can use (srun --mpi=list shows the others; Open MPI "
                  "takes pmix), or the ranks were started by an mpirun of another MPI installation", launched,
                  mpi_type ? " (--mpi=" : "", mpi_type ? mpi_type : "", mpi_type ? ")" : "");
        fatal("the launcher started %d ranks but MPI sees a world of 1: mpirun and the MPI library train_mora was "
              "built with (mpicc) are from different MPI installations", launched);
    }
    // from here on an error says which rank and machine it comes from
    if (comm_world_ > 1) fatal_where_set("rank %d/%d (%s)", comm_rank_, comm_world_, comm_host_);
    MPI_Comm node;
    mpiCheck(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, comm_rank_, MPI_INFO_NULL, &node));
    mpiCheck(MPI_Comm_rank(node, &comm_local_rank_));
    mpiCheck(MPI_Comm_free(&node));
}

void comm_finalize(void) {
    if (!comm_mpi_ || comm_finalized_) return;
    comm_finalized_ = 1;
    mpiCheck(MPI_Finalize());
}

const char *comm_backend_name(void) { return comm_mpi_ ? "mpi" : "single"; }

void comm_barrier(void) {
    if (comm_world_ == 1) return;
    mpiCheck(MPI_Barrier(MPI_COMM_WORLD));
}

void comm_all_reduce_sum(float *buf, size_t n) {
    if (comm_world_ == 1) return;
    for (size_t done = 0; done < n; done += COMM_CHUNK) {
        size_t count = n - done < COMM_CHUNK ? n - done : COMM_CHUNK;
        mpiCheck(MPI_Allreduce(MPI_IN_PLACE, buf + done, (int)count, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD));
    }
}

void comm_all_reduce_sum_double(double *buf, size_t n) {
    if (comm_world_ == 1) return;
    for (size_t done = 0; done < n; done += COMM_CHUNK) {
        size_t count = n - done < COMM_CHUNK ? n - done : COMM_CHUNK;
        mpiCheck(MPI_Allreduce(MPI_IN_PLACE, buf + done, (int)count, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD));
    }
}

// A root that is not a rank is left to MPI to refuse (MPI_ERR_ROOT), through mpiCheck.
int comm_all_reduce_max_int(int v) {
    if (comm_world_ == 1) return v;
    mpiCheck(MPI_Allreduce(MPI_IN_PLACE, &v, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD));
    return v;
}

void comm_broadcast(void *buf, size_t bytes, int root) {
    if (comm_world_ == 1 && root == 0) return;
    if (!comm_mpi_) fatal("comm_broadcast: root %d is not a rank (world 1)", root);
    for (size_t done = 0; done < bytes; done += COMM_CHUNK) {
        size_t count = bytes - done < COMM_CHUNK ? bytes - done : COMM_CHUNK;
        mpiCheck(MPI_Bcast((char *)buf + done, (int)count, MPI_BYTE, root, MPI_COMM_WORLD));
    }
}

void *comm_all_gather_bytes(const void *send, size_t send_bytes, size_t *recv_bytes, size_t *total_bytes) {
    int W = comm_world_;
    if (W == 1) {
        void *out = mallocCheck(send_bytes);
        if (send_bytes) memcpy(out, send, send_bytes);
        if (recv_bytes) recv_bytes[0] = send_bytes;
        if (total_bytes) *total_bytes = send_bytes;
        return out;
    }
    unsigned long long mine = send_bytes;
    unsigned long long *sizes = (unsigned long long *)mallocCheck(W * sizeof(unsigned long long));
    mpiCheck(MPI_Allgather(&mine, 1, MPI_UNSIGNED_LONG_LONG, sizes, 1, MPI_UNSIGNED_LONG_LONG, MPI_COMM_WORLD));
    size_t total = 0;
    for (int r = 0; r < W; r++) total += sizes[r];
    char *out = (char *)mallocCheck(total);
    if (total <= (size_t)0x7fffffff) {
        int *counts = (int *)mallocCheck(W * sizeof(int)), *displs = (int *)mallocCheck(W * sizeof(int));
        int offset = 0;
        for (int r = 0; r < W; r++) { counts[r] = (int)sizes[r]; displs[r] = offset; offset += counts[r]; }
        mpiCheck(MPI_Allgatherv(send, (int)send_bytes, MPI_BYTE, out, counts, displs, MPI_BYTE, MPI_COMM_WORLD));
        free(counts); free(displs);
    } else {
        // beyond int displacements: every rank broadcasts its part in turn
        size_t offset = 0;
        for (int r = 0; r < W; r++) {
            if (r == comm_rank_ && sizes[r] > 0) memcpy(out + offset, send, sizes[r]);
            comm_broadcast(out + offset, sizes[r], r);
            offset += sizes[r];
        }
    }
    if (recv_bytes) for (int r = 0; r < W; r++) recv_bytes[r] = (size_t)sizes[r];
    if (total_bytes) *total_bytes = total;
    free(sizes);
    return out;
}

void *comm_gather_bytes(const void *send, size_t send_bytes, int root, size_t *recv_bytes, size_t *total_bytes) {
    int W = comm_world_;
    if (root < 0 || root >= W) fatal("comm_gather_bytes: root %d is not a rank (world %d)", root, W);
    if (W == 1) return comm_all_gather_bytes(send, send_bytes, recv_bytes, total_bytes);
    unsigned long long mine = send_bytes;
    unsigned long long *sizes = (unsigned long long *)mallocCheck(W * sizeof(unsigned long long));
    mpiCheck(MPI_Gather(&mine, 1, MPI_UNSIGNED_LONG_LONG, sizes, 1, MPI_UNSIGNED_LONG_LONG, root, MPI_COMM_WORLD));
    char *out = NULL;
    if (comm_rank_ == root) {
        size_t total = 0;
        for (int r = 0; r < W; r++) total += sizes[r];
        out = (char *)mallocCheck(total);
        // each rank's part in turn, in pieces of at most COMM_CHUNK bytes (MPI counts are int);
        // messages between two ranks arrive in the order they were sent
        size_t offset = 0;
        for (int r = 0; r < W; r++) {
            if (r == root) {
                if (sizes[r]) memcpy(out + offset, send, sizes[r]);
            } else {
                for (size_t done = 0; done < sizes[r]; done += COMM_CHUNK) {
                    size_t count = sizes[r] - done < COMM_CHUNK ? sizes[r] - done : COMM_CHUNK;
                    mpiCheck(MPI_Recv(out + offset + done, (int)count, MPI_BYTE, r, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE));
                }
            }
            offset += sizes[r];
        }
        if (recv_bytes) for (int r = 0; r < W; r++) recv_bytes[r] = (size_t)sizes[r];
        if (total_bytes) *total_bytes = total;
    } else {
        for (size_t done = 0; done < send_bytes; done += COMM_CHUNK) {
            size_t count = send_bytes - done < COMM_CHUNK ? send_bytes - done : COMM_CHUNK;
            mpiCheck(MPI_Send((const char *)send + done, (int)count, MPI_BYTE, root, 0, MPI_COMM_WORLD));
        }
    }
    free(sizes);
    return out;
}

void comm_all_gather_shards(float *buf, size_t n) {
    int W = comm_world_;
    if (W == 1) return;
    if (n <= (size_t)0x7fffffff) {
        int *counts = (int *)mallocCheck(W * sizeof(int)), *displs = (int *)mallocCheck(W * sizeof(int));
        for (int r = 0; r < W; r++) {
            size_t lo, hi;
            comm_shard_range(n, r, W, &lo, &hi);
            counts[r] = (int)(hi - lo);
            displs[r] = (int)lo;
        }
        mpiCheck(MPI_Allgatherv(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, buf, counts, displs, MPI_FLOAT, MPI_COMM_WORLD));
        free(counts); free(displs);
        return;
    }
    for (int r = 0; r < W; r++) {
        size_t lo, hi;
        comm_shard_range(n, r, W, &lo, &hi);
        comm_broadcast(buf + lo, (hi - lo) * sizeof(float), r);
    }
}

void comm_gather_shards(float *full, const float *shard, size_t n, int root) {
    int W = comm_world_, me = comm_rank_;
    if (root < 0 || root >= W) fatal("comm_gather_shards: root %d is not a rank (world %d)", root, W);
    size_t my_lo, my_hi;
    comm_shard_range(n, me, W, &my_lo, &my_hi);
    if (me == root && full + my_lo != shard) memcpy(full + my_lo, shard, (my_hi - my_lo) * sizeof(float));
    // point to point, one shard at a time, in chunks: memory on root is only `full`
    for (int r = 0; r < W; r++) {
        if (r == root) continue;
        size_t lo, hi;
        comm_shard_range(n, r, W, &lo, &hi);
        for (size_t done = 0; done < hi - lo; done += COMM_CHUNK) {
            size_t count = hi - lo - done < COMM_CHUNK ? hi - lo - done : COMM_CHUNK;
            if (me == root)
                mpiCheck(MPI_Recv(full + lo + done, (int)count, MPI_FLOAT, r, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE));
            else if (me == r)
                mpiCheck(MPI_Send(shard + done, (int)count, MPI_FLOAT, root, 0, MPI_COMM_WORLD));
        }
    }
}

#else  // single rank

void comm_init(int *argc, char ***argv) {
    (void)argc; (void)argv;
    if (comm_initialized_) fatal("comm_init called twice");
    int launched = launcher_world_size();
    if (launched > 1)
        fatal("this train_mora was built without MPI, but the launcher started %d ranks: every one would "
              "train alone and write the same files. Rebuild with mpicc on the PATH (make), "
              "or run a single process", launched);
    comm_initialized_ = 1;
}

void comm_finalize(void) { comm_finalized_ = 1; }
const char *comm_backend_name(void) { return "single"; }
void comm_barrier(void) {}
void comm_all_reduce_sum(float *buf, size_t n) { (void)buf; (void)n; }
void comm_all_reduce_sum_double(double *buf, size_t n) { (void)buf; (void)n; }
int comm_all_reduce_max_int(int v) { return v; }

void comm_broadcast(void *buf, size_t bytes, int root) {
    (void)buf; (void)bytes;
    if (root != 0) fatal("comm_broadcast: root %d is not a rank (world 1)", root);
}

void *comm_all_gather_bytes(const void *send, size_t send_bytes, size_t *recv_bytes, size_t *total_bytes) {
    void *out = mallocCheck(send_bytes);
    if (send_bytes) memcpy(out, send, send_bytes);
    if (recv_bytes) recv_bytes[0] = send_bytes;
    if (total_bytes) *total_bytes = send_bytes;
    return out;
}

void *comm_gather_bytes(const void *send, size_t send_bytes, int root, size_t *recv_bytes, size_t *total_bytes) {
    if (root != 0) fatal("comm_gather_bytes: root %d is not a rank (world 1)", root);
    return comm_all_gather_bytes(send, send_bytes, recv_bytes, total_bytes);
}

void comm_all_gather_shards(float *buf, size_t n) { (void)buf; (void)n; }

void comm_gather_shards(float *full, const float *shard, size_t n, int root) {
    if (root != 0) fatal("comm_gather_shards: root %d is not a rank (world 1)", root);
    if (full != shard) memcpy(full, shard, n * sizeof(float));
}

#endif

void comm_all_reduce_mean(float *buf, size_t n) {
    if (comm_world_ == 1) return;
    comm_all_reduce_sum(buf, n);
    const float inv_world = 1.0f / (float)comm_world_;
    for (size_t i = 0; i < n; i++) buf[i] *= inv_world;
}
