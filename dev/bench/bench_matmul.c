/*
 * Speed of the CPU matrix products (llmc/matmul.c): GFLOP/s of matmul_forward and of the two
 * halves of matmul_backward (dinp, dweight), on the linear layers of GPT-2 124M and SmolLM2-135M
 * at M = B*T = 256 rows. For scale it also measures
 *   - the machine's FMA peak: independent fused multiply-add chains, no memory traffic, on one
 *     thread and on all threads (OMP_NUM_THREADS);
 *   - a naive triple loop (the textbook form, parallel over rows) on one small shape;
 *   - the matmul time of one GPT-2 124M training step (12 layers + the tied classifier).
 * Each figure is the best of several repetitions (the machine is shared, so the best is the
 * least disturbed run). It prints figures only: no timing is asserted.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include "matmul.h"
#include "rand.h"
#include "utils.h"

// The FMA peak: NV independent vectors of 16 lanes, each updated acc = acc * x + y per step,
// so nothing waits on memory or on the latency of one chain. 2 flops per lane per step.
#define PEAK_NV 16
#define PEAK_LANES 16
__attribute__((noinline)) static float fma_chains(long steps, float x, float y) {
    float acc[PEAK_NV][PEAK_LANES];
    for (int v = 0; v < PEAK_NV; v++)
        for (int l = 0; l < PEAK_LANES; l++) acc[v][l] = 1e-3f * (float)(v + l);
    for (long s = 0; s < steps; s++)
        for (int v = 0; v < PEAK_NV; v++)
            for (int l = 0; l < PEAK_LANES; l++) acc[v][l] = acc[v][l] * x + y;
    float sum = 0;
    for (int v = 0; v < PEAK_NV; v++)
        for (int l = 0; l < PEAK_LANES; l++) sum += acc[v][l];
    return sum;
}

// GFLOP/s of fma_chains on nthreads threads, best of 5
static double fma_peak(int nthreads) {
    const long steps = 10000000;
    double best = 0;
    volatile float sink = 0;
    for (int rep = 0; rep < 5; rep++) {
        double t0 = wall_seconds();
        float s = 0;
        #pragma omp parallel num_threads(nthreads) reduction(+ : s)
        s += fma_chains(steps, 0.999999f, 1e-7f);
        double t = wall_seconds() - t0;
        sink += s;
        double gflops = 2.0 * PEAK_NV * PEAK_LANES * steps * nthreads / t / 1e9;
        if (gflops > best) best = gflops;
    }
    return best;
}

// The textbook forward, out (M, OC) = inp (M, IC) @ weight (OC, IC)^T + bias, parallel over rows.
static void naive_forward(real *out, const real *inp, const real *weight, const real *bias,
                          int M, int IC, int OC) {
    #pragma omp parallel for
    for (int m = 0; m < M; m++)
        for (int o = 0; o < OC; o++) {
            real s = bias ? bias[o] : 0;
            for (int i = 0; i < IC; i++) s += inp[(size_t)m * IC + i] * weight[(size_t)o * IC + i];
            out[(size_t)m * OC + o] = s;
        }
}

typedef struct {
    const char *name;
    int IC, OC;
    int count;  // how many of these layers one GPT-2 training step has (0: not counted)
} Layer;

typedef struct {
    real *inp, *weight, *bias, *out, *dout, *dinp, *dweight;
} Buffers;

static real *random_buffer(size_t n, uint64_t *rng) {
    real *x = mallocCheck(n * sizeof(real));
    for (size_t i = 0; i < n; i++) x[i] = (real)(random_f32(rng) - 0.5f);
    return x;
}

enum { OP_FORWARD, OP_DINP, OP_DWEIGHT, OP_NAIVE };

static void run_op(int op, Buffers *b, int M, int IC, int OC) {
    switch (op) {
    case OP_FORWARD: matmul_forward(b->out, b->inp, b->weight, b->bias, M, IC, OC); break;
    case OP_DINP: matmul_backward(b->dinp, NULL, NULL, b->dout, b->inp, b->weight, M, IC, OC); break;
    case OP_DWEIGHT: matmul_backward(NULL, b->dweight, NULL, b->dout, b->inp, b->weight, M, IC, OC); break;
    case OP_NAIVE: naive_forward(b->out, b->inp, b->weight, b->bias, M, IC, OC); break;
    }
}

// best seconds of one op over repetitions that add up to about 0.3 s (at least 3), after a warm-up
static double time_op(int op, Buffers *b, int M, int IC, int OC) {
    run_op(op, b, M, IC, OC);
    double best = 1e30, total = 0;
    for (int rep = 0; rep < 3 || (total < 0.3 && rep < 50); rep++) {
        double t0 = wall_seconds();
        run_op(op, b, M, IC, OC);
        double t = wall_seconds() - t0;
        total += t;
        if (t < best) best = t;
    }
    return best;
}

// times the three products of one layer shape; returns their summed seconds
static double bench_layer(const Layer *l, int M, uint64_t *rng, double peak) {
    size_t n_inp = (size_t)M * l->IC, n_w = (size_t)l->OC * l->IC, n_out = (size_t)M * l->OC;
    Buffers b = {random_buffer(n_inp, rng), random_buffer(n_w, rng), random_buffer(l->OC, rng),
                 random_buffer(n_out, rng), random_buffer(n_out, rng), random_buffer(n_inp, rng),
                 random_buffer(n_w, rng)};
    double flops = 2.0 * M * l->IC * l->OC;
    double t[3];
    for (int op = 0; op < 3; op++) t[op] = time_op(op, &b, M, l->IC, l->OC);
    printf("%-22s %5d %6d %9.1f %9.1f %9.1f   %5.0f%% %9.2f\n", l->name, l->IC, l->OC,
           flops / t[0] / 1e9, flops / t[1] / 1e9, flops / t[2] / 1e9,
           100.0 * 3 * flops / (t[0] + t[1] + t[2]) / 1e9 / peak, 1e3 * (t[0] + t[1] + t[2]));
    free(b.inp); free(b.weight); free(b.bias); free(b.out); free(b.dout); free(b.dinp); free(b.dweight);
    return t[0] + t[1] + t[2];
}

int main(void) {
    int nthreads = 1;
#ifdef _OPENMP
    nthreads = omp_get_max_threads();
#endif
    const int M = 256;  // B*T = 4*64
    uint64_t rng = rng_seed(1337);

    double peak1 = fma_peak(1), peak = fma_peak(nthreads);
    printf("FMA peak: %.1f GFLOP/s on 1 thread, %.1f GFLOP/s on %d threads\n", peak1, peak, nthreads);
    printf("real = %s, M = %d rows, %d threads; GFLOP/s per product, %% of %d-thread peak for all three\n\n",
           sizeof(real) == 4 ? "float" : "double", M, nthreads, nthreads);
    printf("%-22s %5s %6s %9s %9s %9s   %6s %9s\n", "layer", "IC", "OC", "forward", "dinp",
           "dweight", "peak", "ms (3)");

    static const Layer gpt2[] = {
        {"gpt2 qkv", 768, 2304, 12},
        {"gpt2 attproj", 768, 768, 12},
        {"gpt2 fc", 768, 3072, 12},
        {"gpt2 fcproj", 3072, 768, 12},
        {"gpt2 classifier", 768, 50304, 1},
    };
    static const Layer smollm[] = {
        {"smollm2 qkv", 576, 960, 0},
        {"smollm2 attn out", 576, 576, 0},
        {"smollm2 gate+up", 576, 3072, 0},
        {"smollm2 down", 1536, 576, 0},
        {"smollm2 classifier", 576, 49152, 0},
    };
    double step_seconds = 0, step_flops = 0;
    for (size_t i = 0; i < sizeof(gpt2) / sizeof(gpt2[0]); i++) {
        step_seconds += gpt2[i].count * bench_layer(&gpt2[i], M, &rng, peak);
        step_flops += gpt2[i].count * 3 * 2.0 * M * gpt2[i].IC * gpt2[i].OC;
    }
    for (size_t i = 0; i < sizeof(smollm) / sizeof(smollm[0]); i++)
        bench_layer(&smollm[i], M, &rng, peak);

    printf("\nGPT-2 124M training step (B*T = %d): matmuls %.1f GFLOP in %.3f s = %.1f GFLOP/s\n",
           M, step_flops / 1e9, step_seconds, step_flops / step_seconds / 1e9);

    // the naive loop against the blocked forward on one small shape
    {
        int IC = 768, OC = 768;
        size_t n_inp = (size_t)M * IC, n_w = (size_t)OC * IC, n_out = (size_t)M * OC;
        Buffers b = {random_buffer(n_inp, &rng), random_buffer(n_w, &rng), random_buffer(OC, &rng),
                     random_buffer(n_out, &rng), NULL, NULL, NULL};
        double flops = 2.0 * M * IC * OC;
        double t_naive = time_op(OP_NAIVE, &b, M, IC, OC), t_fast = time_op(OP_FORWARD, &b, M, IC, OC);
        printf("forward %dx%dx%d: naive triple loop %.1f GFLOP/s, matmul_forward %.1f GFLOP/s (%.0fx)\n",
               M, IC, OC, flops / t_naive / 1e9, flops / t_fast / 1e9, t_naive / t_fast);
        free(b.inp); free(b.weight); free(b.bias); free(b.out);
    }
    return 0;
}
