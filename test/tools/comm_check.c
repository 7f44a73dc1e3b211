/*
 * comm_check: runs every collective of llmc/comm.h on the ranks it was started with (mpirun -np N
 * build/tools/comm_check, or directly for one rank) and compares each result with its value in
 * closed form (sums of (r+1)*i/2 over ranks, rank-order concatenations, shard coverage). Prints
 * one line per check on rank 0; exits non-zero on any mismatch. test/test_multirank.py drives it.
 *
 *   comm_check              the checks
 *   comm_check bad_root     a broadcast from a root that is not a rank: MPI must refuse it and
 *                           the job must end with an error naming MPI_Bcast on every rank
 *   comm_check fatal_last   the last rank exits through fatal() while the others wait in a
 *                           barrier: the job must end (non-zero), not hang
 *   comm_check placement    comm_placement_print's report (line and warnings, all to stdout) of
 *                           made-up placements no single machine shows: several nodes, two
 *                           machines of one hostname, many cores; then the report of where this
 *                           run's ranks are (comm_report_placement)
 */
#include "llmc/comm.h"
#include "llmc/utils.h"
#include <math.h>

static int failures = 0;

// A made-up rank: on host (boot id boot), threads OpenMP threads, bound to CPUs [lo, lo + n) of
// online.
static CommPlacement place(const char *host, const char *boot, int threads, int lo, int n, int online) {
    CommPlacement p;
    memset(&p, 0, sizeof p);
    snprintf(p.host, sizeof p.host, "%s", host);
    snprintf(p.boot_id, sizeof p.boot_id, "%s", boot);
    p.threads = threads;
    p.cores = n;
    p.online = online;
    for (int c = lo; c < lo + n; c++) p.mask[c / 8] |= (unsigned char)(1u << (c % 8));
    return p;
}

static void placement_cases(void) {
    CommPlacement r[16];
    // 16 ranks, 8 on each of two 96-core nodes, each bound to a core of its own (srun without
    // --cpus-per-task): 8 of 96 cores in use on each
    printf("case: two nodes, a core per rank\n");
    for (int i = 0; i < 16; i++) r[i] = place(i < 8 ? "gpu1" : "gpu2", i < 8 ? "b1" : "b2", 1, i % 8, 1, 96);
    comm_placement_print(r, 16, stdout, stdout);
    // round robin over two machines that share a hostname (containers), half of each one's 16
    // cores bound (not fewer than half: no warning), rank 3 with more threads than its 8 cores
    printf("case: round robin, one hostname\n");
    for (int i = 0; i < 4; i++) r[i] = place("node", i % 2 ? "b2" : "b1", i == 3 ? 12 : 4 + 4 * (i % 2), 0, 8, 16);
    comm_placement_print(r, 4, stdout, stdout);
    // six nodes, a rank each on all of a node's cores: named are the first three
    printf("case: six nodes\n");
    char host[8];
    for (int i = 0; i < 6; i++) {
        snprintf(host, sizeof host, "n%d", i);
        r[i] = place(host, host, 32, 0, 32, 32);
    }
    comm_placement_print(r, 6, stdout, stdout);
    // two unbound ranks with a thread per core of the node each (OpenMP's default)
    printf("case: unbound, a thread per core each\n");
    for (int i = 0; i < 2; i++) r[i] = place("vm", "b", 4, 0, 4, 4);
    comm_placement_print(r, 2, stdout, stdout);
    // one rank: no report
    printf("case: one rank\n");
    comm_placement_print(r, 1, stdout, stdout);
}

static void check(int ok, const char *what) {
    // every rank checks; the verdicts are summed so rank 0 reports a failure seen anywhere
    double bad = ok ? 0.0 : 1.0;
    comm_all_reduce_sum_double(&bad, 1);
    if (comm_rank() == 0) printf("%-58s %s\n", what, bad == 0.0 ? "ok" : "FAILED");
    if (bad != 0.0) failures++;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    comm_init(&argc, &argv);
    const int rank = comm_rank(), W = comm_world();
    if (argc > 1 && !strcmp(argv[1], "bad_root")) {
        char byte = 0;
        comm_broadcast(&byte, 1, W);   // ranks are 0 .. W-1
        fprintf(stderr, "rank %d: broadcast from root %d returned\n", rank, W);
        return 0;
    }
    if (argc > 1 && !strcmp(argv[1], "fatal_last")) {
        if (rank == W - 1) fatal("stops on purpose");
        comm_barrier();
        fprintf(stderr, "rank %d: barrier returned without the last rank\n", rank);
        return 0;
    }
    if (argc > 1 && !strcmp(argv[1], "placement")) {
        if (rank == 0) placement_cases();
        if (rank == 0) printf("case: this run\n");
        comm_report_placement();
        comm_finalize();
        return 0;
    }
    if (argc > 1) fatal("comm_check: unknown mode '%s' (expected bad_root, fatal_last or placement)", argv[1]);
    if (rank == 0) printf("comm_check: %d rank(s), backend %s\n", W, comm_backend_name());

    // ranks: gathering each rank's id gives 0 .. W-1 in order
    size_t counts[64], total = 0;
    if (W > 64) fatal("comm_check handles at most 64 ranks");
    int *ids = (int *)comm_all_gather_bytes(&rank, sizeof rank, counts, &total);
    int ok = total == W * sizeof(int);
    for (int r = 0; r < W && ok; r++) ok = ids[r] == r && counts[r] == sizeof(int);
    free(ids);
    check(ok, "all_gather_bytes of the rank ids is 0..W-1");
    check(comm_local_rank() >= 0 && comm_local_rank() < W, "local rank within the world");

    // sums: x_r[i] = (r + 1) * i / 2 is exact in float for these i, and so is its sum over ranks
    const size_t n = 1003;
    float *buf = (float *)mallocCheck(n * sizeof(float));
    for (size_t i = 0; i < n; i++) buf[i] = (float)(rank + 1) * (float)i * 0.5f;
    comm_all_reduce_sum(buf, n);
    ok = 1;
    for (size_t i = 0; i < n; i++) ok &= buf[i] == (float)(i * 0.5 * W * (W + 1) / 2.0);
    check(ok, "all_reduce_sum of (r+1)*i/2 = i/2 * W(W+1)/2");
    for (size_t i = 0; i < n; i++) buf[i] = (float)(rank + 1) * (float)i;
    comm_all_reduce_mean(buf, n);
    ok = 1;
    for (size_t i = 0; i < n; i++) ok &= fabsf(buf[i] - (float)(i * (W + 1) / 2.0)) <= 1e-6f * (float)(i + 1);
    check(ok, "all_reduce_mean of (r+1)*i = i (W+1)/2");
    double d[3] = {1.0, (double)rank, 1e-3 * rank};
    comm_all_reduce_sum_double(d, 3);
    check(d[0] == W && d[1] == W * (W - 1) / 2.0 && fabs(d[2] - 1e-3 * W * (W - 1) / 2.0) < 1e-12,
          "all_reduce_sum_double of 1, r, r/1000");

    // broadcast from the last rank
    char text[32];
    snprintf(text, sizeof text, "from rank %d", rank);
    comm_broadcast(text, sizeof text, W - 1);
    char want[32];
    snprintf(want, sizeof want, "from rank %d", W - 1);
    check(!strcmp(text, want), "broadcast from the last rank");

    // variable-size gather: rank r sends r bytes of value 'a' + r (rank 0 sends nothing)
    char *mine = (char *)mallocCheck(rank + 1);
    memset(mine, 'a' + rank, rank);
    char *all = (char *)comm_all_gather_bytes(mine, rank, counts, &total);
    ok = total == (size_t)W * (W - 1) / 2;
    size_t pos = 0;
    for (int r = 0; r < W && ok; r++) {
        ok = counts[r] == (size_t)r;
        for (int k = 0; k < r && ok; k++) ok = all[pos++] == 'a' + r;
    }
    check(ok, "all_gather_bytes of sizes 0..W-1 in rank order");
    free(all);
    // the same gathered on the last rank alone
    total = 0;
    all = (char *)comm_gather_bytes(mine, rank, W - 1, counts, &total);
    if (rank == W - 1) {
        ok = all != NULL && total == (size_t)W * (W - 1) / 2;
        pos = 0;
        for (int r = 0; r < W && ok; r++) {
            ok = counts[r] == (size_t)r;
            for (int k = 0; k < r && ok; k++) ok = all[pos++] == 'a' + r;
        }
    } else {
        ok = all == NULL && total == 0;
    }
    check(ok, "gather_bytes of sizes 0..W-1 on the last rank, nothing on the others");
    free(all); free(mine);

    // shards: cover [0, n) in order, sizes differ by at most one
    ok = 1;
    size_t expect_lo = 0, smallest = n, largest = 0;
    for (int r = 0; r < W; r++) {
        size_t lo, hi;
        comm_shard_range(n, r, W, &lo, &hi);
        ok &= lo == expect_lo && hi >= lo;
        expect_lo = hi;
        if (hi - lo < smallest) smallest = hi - lo;
        if (hi - lo > largest) largest = hi - lo;
    }
    check(ok && expect_lo == n && largest - smallest <= 1, "shard ranges tile [0, n) evenly");

    // all-gather of shards in place: each rank fills its shard with i, the rest with -1
    size_t lo, hi;
    comm_shard_range(n, rank, W, &lo, &hi);
    for (size_t i = 0; i < n; i++) buf[i] = (i >= lo && i < hi) ? (float)i : -1.0f;
    comm_all_gather_shards(buf, n);
    ok = 1;
    for (size_t i = 0; i < n; i++) ok &= buf[i] == (float)i;
    check(ok, "all_gather_shards in place");

    // gather of shards to rank 0
    float *shard = (float *)mallocCheck((hi - lo + 1) * sizeof(float));
    for (size_t i = lo; i < hi; i++) shard[i - lo] = 2.0f * (float)i;
    float *full = rank == 0 ? (float *)mallocCheck(n * sizeof(float)) : NULL;
    comm_gather_shards(full, shard, n, 0);
    ok = 1;
    if (rank == 0) for (size_t i = 0; i < n; i++) ok &= full[i] == 2.0f * (float)i;
    check(ok, "gather_shards to rank 0");
    free(full); free(shard); free(buf);

    comm_barrier();
    if (rank == 0) printf("%s\n", failures ? "comm_check: FAILED" : "comm_check: all collectives match");
    comm_finalize();
    return failures ? 1 : 0;
}
