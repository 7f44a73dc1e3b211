/*
 * The collectives of comm.h: MPI when built with -DUSE_MPI, a single rank otherwise.
 *
 * MPI counts are int, so buffers are sent in chunks of at most COMM_CHUNK elements; a model of
 * more than 2^31 parameters needs no special case anywhere else.
 */
#define _GNU_SOURCE   // sched_getaffinity and the CPU_* macros of sched.h
#include "comm.h"
#include "utils.h"
#include <sched.h>
#include <unistd.h>
#include <omp.h>

#ifdef USE_MPI
#include <mpi.h>
#endif

// comm.o is also linked into programs built without OpenMP (dev/cuda/comm_nccl_check): there
// the symbol is absent, and such a program runs one thread
#pragma weak omp_get_max_threads

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

int comm_started_by_srun(void) { return srun_tasks() > 0 && getenv("OMPI_COMM_WORLD_SIZE") == NULL; }

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
        if (comm_started_by_srun())
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
const char *comm_host(void) {
    if (comm_host_[0] == '\0') comm_read_host();
    return comm_host_;
}

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

int comm_all_reduce_max_int(int v) {
    if (comm_world_ == 1) return v;
    mpiCheck(MPI_Allreduce(MPI_IN_PLACE, &v, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD));
    return v;
}

// A root that is not a rank is left to MPI to refuse (MPI_ERR_ROOT), through mpiCheck.
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
const char *comm_host(void) {
    static char host[64] = "";
    if (host[0] == '\0' && (gethostname(host, sizeof host - 1) != 0 || host[0] == '\0')) snprintf(host, sizeof host, "unknown host");
    return host;
}
int comm_started_by_srun(void) { return 0; }
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

// ---- where the ranks run ----------------------------------------------------------------------

// This rank's placement: host, OpenMP threads, the CPUs of its affinity mask and the node's
// online CPUs.
static void placement_of_this_rank(CommPlacement *p) {
    memset(p, 0, sizeof *p);
    if (gethostname(p->host, sizeof p->host - 1) != 0 || p->host[0] == '\0') snprintf(p->host, sizeof p->host, "unknown host");
    FILE *f = fopen("/proc/sys/kernel/random/boot_id", "r");
    if (f) {
        if (fgets(p->boot_id, sizeof p->boot_id, f) == NULL) p->boot_id[0] = '\0';
        p->boot_id[strcspn(p->boot_id, "\n")] = '\0';
        fclose(f);
    }
    p->threads = omp_get_max_threads ? omp_get_max_threads() : 1;
    long online = sysconf(_SC_NPROCESSORS_ONLN);
    p->online = online > 0 ? (int)online : 1;
    // a mask as large as the kernel's: sched_getaffinity refuses (EINVAL) one smaller than it
    for (int n = 1024; n <= (1 << 20); n *= 2) {
        cpu_set_t *set = CPU_ALLOC(n);
        if (set == NULL) break;
        size_t size = CPU_ALLOC_SIZE(n);
        CPU_ZERO_S(size, set);
        if (sched_getaffinity(0, size, set) == 0) {
            p->cores = CPU_COUNT_S(size, set);
            for (int c = 0; c < 8 * (int)sizeof p->mask && c < n; c++)
                if (CPU_ISSET_S(c, size, set)) p->mask[c / 8] |= (unsigned char)(1u << (c % 8));
            CPU_FREE(set);
            return;
        }
        CPU_FREE(set);
        if (errno != EINVAL) break;
    }
    // no mask to read: every online CPU
    p->cores = p->online;
    for (int c = 0; c < p->online && c < 8 * (int)sizeof p->mask; c++) p->mask[c / 8] |= (unsigned char)(1u << (c % 8));
}

// Appends printf-style text to buf (size), cut where it is full.
static void appendf(char *buf, size_t size, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void appendf(char *buf, size_t size, const char *fmt, ...) {
    size_t len = strlen(buf);
    if (len + 1 >= size) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf + len, size - len, fmt, ap);
    va_end(ap);
}

// The ranks r (0 <= r < world) with member[r] set, as ranges: "0-3,8,10-11".
static void rank_ranges(const int *member, int world, char *buf, size_t size) {
    buf[0] = '\0';
    for (int r = 0; r < world; r++) {
        if (!member[r]) continue;
        int end = r;
        while (end + 1 < world && member[end + 1]) end++;
        appendf(buf, size, "%s%d", buf[0] ? "," : "", r);
        if (end > r) appendf(buf, size, "-%d", end);
        r = end;
    }
}

// "7" or "1-8": the smallest and largest of v over the ranks.
static void value_range(const CommPlacement *ranks, int world, size_t offset, char *buf, size_t size) {
    int lo = 0, hi = 0;
    for (int r = 0; r < world; r++) {
        int v = *(const int *)((const char *)&ranks[r] + offset);
        if (r == 0 || v < lo) lo = v;
        if (r == 0 || v > hi) hi = v;
    }
    if (lo == hi) snprintf(buf, size, "%d", lo);
    else snprintf(buf, size, "%d-%d", lo, hi);
}

static int same_node(const CommPlacement *a, const CommPlacement *b) {
    return !strcmp(a->host, b->host) && !strcmp(a->boot_id, b->boot_id);
}

void comm_placement_print(const CommPlacement *ranks, int world, FILE *out, FILE *err) {
    if (world <= 1) return;
    // the nodes, in the order of their first rank; node_of[r] is rank r's
    int *node_of = (int *)mallocCheck(world * sizeof(int)), *first = (int *)mallocCheck(world * sizeof(int));
    int *member = (int *)mallocCheck(world * sizeof(int));
    int n_nodes = 0;
    for (int r = 0; r < world; r++) {
        int k = 0;
        while (k < n_nodes && !same_node(&ranks[first[k]], &ranks[r])) k++;
        if (k == n_nodes) first[n_nodes++] = r;
        node_of[r] = k;
    }
    // the line: the nodes and their ranks (the first 4 nodes named), then what each rank has
    char line[1024], list[256], threads[32], cores[32], online[32];
    snprintf(line, sizeof line, "placement: %d ranks on %d node(s) (", world, n_nodes);
    const int named = n_nodes <= 4 ? n_nodes : 3;
    for (int k = 0; k < named; k++) {
        for (int r = 0; r < world; r++) member[r] = node_of[r] == k;
        rank_ranges(member, world, list, sizeof list);
        appendf(line, sizeof line, "%s%s: rank%s %s", k ? "; " : "", ranks[first[k]].host,
                strpbrk(list, ",-") ? "s" : "", list);
    }
    if (named < n_nodes) appendf(line, sizeof line, "; %d more", n_nodes - named);
    value_range(ranks, world, offsetof(CommPlacement, threads), threads, sizeof threads);
    value_range(ranks, world, offsetof(CommPlacement, cores), cores, sizeof cores);
    value_range(ranks, world, offsetof(CommPlacement, online), online, sizeof online);
    fprintf(out, "%s); per rank %s OpenMP thread(s) on %s core(s) of %s\n", line, threads, cores, online);

    // the cure's N: the online cores of a node shared by its ranks (the fewest over the nodes)
    int share = 0;
    for (int k = 0; k < n_nodes; k++) {
        int on_node = 0;
        for (int r = 0; r < world; r++) on_node += node_of[r] == k;
        int n = ranks[first[k]].online / on_node;
        if (k == 0 || n < share) share = n;
    }
    if (share < 1) share = 1;

    // ranks that run more threads than they have cores: the threads take turns
    int over = -1, n_over = 0, warned = 0;
    for (int r = 0; r < world; r++) {
        member[r] = ranks[r].threads > ranks[r].cores;
        n_over += member[r];
        if (member[r] && over < 0) over = r;
    }
    if (n_over == 1)
        fprintf(err, "warning: rank %d runs more OpenMP threads than the cores it is bound to (%d threads on %d core(s) "
                "of %s): the threads take turns on those cores\n", over, ranks[over].threads, ranks[over].cores,
                ranks[over].host);
    if (n_over > 1) {
        rank_ranges(member, world, list, sizeof list);
        fprintf(err, "warning: ranks %s run more OpenMP threads than the cores they are bound to (rank %d: %d threads "
                "on %d core(s) of %s): the threads take turns on those cores\n", list, over, ranks[over].threads,
                ranks[over].cores, ranks[over].host);
    }
    warned = n_over > 0;
    // nodes whose ranks, each within its cores, run more threads together than the node has
    // (unbound ranks, each with a thread per core of the node: OpenMP's default)
    for (int k = 0; k < n_nodes; k++) {
        int on_node = 0, total = 0, any_over = 0;
        for (int r = 0; r < world; r++) {
            if (node_of[r] != k) continue;
            on_node++;
            total += ranks[r].threads;
            any_over |= member[r];
        }
        if (!any_over && total > ranks[first[k]].online) {
            fprintf(err, "warning: the %d rank(s) on %s run %d OpenMP threads in all on its %d cores: the threads take "
                    "turns on them\n", on_node, ranks[first[k]].host, total, ranks[first[k]].online);
            warned = 1;
        }
    }
    // nodes whose ranks together are bound to fewer than half of its cores: the rest stay idle
    for (int k = 0; k < n_nodes; k++) {
        unsigned char u[sizeof ranks[0].mask] = {0};
        int on_node = 0, widest = 0;
        for (int r = 0; r < world; r++) {
            if (node_of[r] != k) continue;
            on_node++;
            for (size_t b = 0; b < sizeof u; b++) u[b] |= ranks[r].mask[b];
            if (ranks[r].cores > widest) widest = ranks[r].cores;
        }
        int bound = 0;
        for (size_t b = 0; b < sizeof u; b++) bound += __builtin_popcount(u[b]);
        if (bound < widest) bound = widest;   // CPUs past the mask's 1024 counted by the ranks themselves
        const int node_online = ranks[first[k]].online;
        if (2 * bound < node_online) {
            fprintf(err, "warning: the %d rank(s) on %s are bound to %d of its %d cores: the others stay idle\n", on_node,
                    ranks[first[k]].host, bound, node_online);
            warned = 1;
        }
    }
    if (warned)
        fprintf(err, "  to give each rank %d core(s) and as many threads: mpirun --bind-to none -x OMP_NUM_THREADS=%d, "
                "or srun --cpus-per-task=%d with OMP_NUM_THREADS=$SLURM_CPUS_PER_TASK\n", share, share, share);
    free(node_of); free(first); free(member);
}

void comm_report_placement(void) {
    if (comm_world_ == 1) return;
    CommPlacement mine;
    placement_of_this_rank(&mine);
    CommPlacement *all = (CommPlacement *)comm_gather_bytes(&mine, sizeof mine, 0, NULL, NULL);
    if (comm_rank_ == 0) {
        fflush(stdout);
        comm_placement_print(all, comm_world_, stdout, stderr);
        fflush(stdout);
        fflush(stderr);
    }
    free(all);
}
