/*
 * Checks matmul_forward and matmul_backward (llmc/matmul.c) against a straightforward
 * double-precision triple loop on random inputs, for shapes that exercise every edge of the
 * blocking: single elements, sizes below one micro-tile, sizes that are not multiples of the
 * tile or cache-block sizes, and a GPT-2 sized layer. Also checks:
 *   - forward overwrites out (it starts filled with NaN) and adds the bias, or no bias if NULL;
 *   - backward accumulates (+=) into dinp, dweight, dbias that start with random values;
 *   - each backward output may be NULL, and then the others are still right;
 *   - the result is bitwise identical with 1 and 2 threads (no scheduling-dependent sums).
 * The error measure is max |got - ref| / max |ref| over the whole output; fp32 products of a
 * few thousand terms stay well under 1e-5 of the output scale.
 * Prints one line per check and exits 1 if any fails.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include "matmul.h"
#include "rand.h"
#include "utils.h"

static const double TOL = 1e-5;
static int failures = 0;

static real *random_array(size_t n, uint64_t *rng) {
    real *x = mallocCheck(n * sizeof(real));
    for (size_t i = 0; i < n; i++) x[i] = (real)(2.0f * random_f32(rng) - 1.0f);
    return x;
}

static real *copy_array(const real *x, size_t n) {
    real *y = mallocCheck(n * sizeof(real));
    memcpy(y, x, n * sizeof(real));
    return y;
}

// max |got - ref| / max |ref|; NaN in got makes it NaN, which fails the `< TOL` check below
static double relative_error(const real *got, const double *ref, size_t n) {
    double max_err = 0, max_ref = 0;
    for (size_t i = 0; i < n; i++) {
        double e = fabs((double)got[i] - ref[i]);
        if (!(e <= max_err)) max_err = e;  // also propagates NaN
        if (fabs(ref[i]) > max_ref) max_ref = fabs(ref[i]);
    }
    return max_err / (max_ref > 0 ? max_ref : 1);
}

static void report(const char *what, int M, int IC, int OC, double err) {
    int ok = err < TOL;
    printf("%-4s M=%4d IC=%4d OC=%5d %-30s rel err %.2e\n", ok ? "ok" : "FAIL", M, IC, OC, what, err);
    if (!ok) failures++;
}

static void report_flag(const char *what, int M, int IC, int OC, int ok) {
    printf("%-4s M=%4d IC=%4d OC=%5d %s\n", ok ? "ok" : "FAIL", M, IC, OC, what);
    if (!ok) failures++;
}

static void check_shape(int M, int IC, int OC, uint64_t *rng) {
    size_t n_inp = (size_t)M * IC, n_w = (size_t)OC * IC, n_out = (size_t)M * OC;
    real *inp = random_array(n_inp, rng), *weight = random_array(n_w, rng);
    real *bias = random_array(OC, rng), *dout = random_array(n_out, rng);
    // starting values of the gradients, to check that backward adds to them
    real *dinp0 = random_array(n_inp, rng), *dweight0 = random_array(n_w, rng);
    real *dbias0 = random_array(OC, rng);

    // double-precision references
    double *ref_out = mallocCheck(n_out * sizeof(double));       // inp @ weight^T (no bias)
    double *ref_out_b = mallocCheck(n_out * sizeof(double));     // ... + bias
    double *ref_dinp = mallocCheck(n_inp * sizeof(double));
    double *ref_dweight = mallocCheck(n_w * sizeof(double));
    double *ref_dbias = mallocCheck(OC * sizeof(double));
    for (int m = 0; m < M; m++)
        for (int o = 0; o < OC; o++) {
            double s = 0;
            for (int i = 0; i < IC; i++) s += (double)inp[(size_t)m * IC + i] * weight[(size_t)o * IC + i];
            ref_out[(size_t)m * OC + o] = s;
            ref_out_b[(size_t)m * OC + o] = s + bias[o];
        }
    for (int m = 0; m < M; m++)
        for (int i = 0; i < IC; i++) {
            double s = 0;
            for (int o = 0; o < OC; o++) s += (double)dout[(size_t)m * OC + o] * weight[(size_t)o * IC + i];
            ref_dinp[(size_t)m * IC + i] = dinp0[(size_t)m * IC + i] + s;
        }
    for (int o = 0; o < OC; o++)
        for (int i = 0; i < IC; i++) {
            double s = 0;
            for (int m = 0; m < M; m++) s += (double)dout[(size_t)m * OC + o] * inp[(size_t)m * IC + i];
            ref_dweight[(size_t)o * IC + i] = dweight0[(size_t)o * IC + i] + s;
        }
    for (int o = 0; o < OC; o++) {
        double s = 0;
        for (int m = 0; m < M; m++) s += dout[(size_t)m * OC + o];
        ref_dbias[o] = dbias0[o] + s;
    }

    // forward, with and without bias; out starts as NaN so any read of it shows up
    real *out = mallocCheck(n_out * sizeof(real));
    for (size_t i = 0; i < n_out; i++) out[i] = (real)NAN;
    matmul_forward(out, inp, weight, bias, M, IC, OC);
    report("forward + bias", M, IC, OC, relative_error(out, ref_out_b, n_out));
    for (size_t i = 0; i < n_out; i++) out[i] = (real)NAN;
    matmul_forward(out, inp, weight, NULL, M, IC, OC);
    report("forward, bias NULL", M, IC, OC, relative_error(out, ref_out, n_out));

    // backward, all outputs, accumulating onto the starting values
    real *dinp = copy_array(dinp0, n_inp), *dweight = copy_array(dweight0, n_w);
    real *dbias = copy_array(dbias0, OC);
    matmul_backward(dinp, dweight, dbias, dout, inp, weight, M, IC, OC);
    report("backward dinp (+=)", M, IC, OC, relative_error(dinp, ref_dinp, n_inp));
    report("backward dweight (+=)", M, IC, OC, relative_error(dweight, ref_dweight, n_w));
    report("backward dbias (+=)", M, IC, OC, relative_error(dbias, ref_dbias, OC));

    // each output alone: the others NULL
    memcpy(dinp, dinp0, n_inp * sizeof(real));
    matmul_backward(dinp, NULL, NULL, dout, inp, weight, M, IC, OC);
    report("backward dinp only", M, IC, OC, relative_error(dinp, ref_dinp, n_inp));
    memcpy(dweight, dweight0, n_w * sizeof(real));
    matmul_backward(NULL, dweight, NULL, dout, inp, weight, M, IC, OC);
    report("backward dweight only", M, IC, OC, relative_error(dweight, ref_dweight, n_w));
    memcpy(dbias, dbias0, OC * sizeof(real));
    matmul_backward(NULL, NULL, dbias, dout, inp, weight, M, IC, OC);
    report("backward dbias only", M, IC, OC, relative_error(dbias, ref_dbias, OC));

#ifdef _OPENMP
    // the same inputs with one thread must give bitwise the same outputs as with two
    int saved_threads = omp_get_max_threads();
    real *out2 = mallocCheck(n_out * sizeof(real));
    real *dinp2 = copy_array(dinp0, n_inp), *dweight2 = copy_array(dweight0, n_w);
    real *dbias2 = copy_array(dbias0, OC);
    omp_set_num_threads(2);
    matmul_forward(out, inp, weight, bias, M, IC, OC);
    memcpy(dinp, dinp0, n_inp * sizeof(real));
    memcpy(dweight, dweight0, n_w * sizeof(real));
    memcpy(dbias, dbias0, OC * sizeof(real));
    matmul_backward(dinp, dweight, dbias, dout, inp, weight, M, IC, OC);
    omp_set_num_threads(1);
    matmul_forward(out2, inp, weight, bias, M, IC, OC);
    matmul_backward(dinp2, dweight2, dbias2, dout, inp, weight, M, IC, OC);
    omp_set_num_threads(saved_threads);
    int same = memcmp(out, out2, n_out * sizeof(real)) == 0 &&
               memcmp(dinp, dinp2, n_inp * sizeof(real)) == 0 &&
               memcmp(dweight, dweight2, n_w * sizeof(real)) == 0 &&
               memcmp(dbias, dbias2, OC * sizeof(real)) == 0;
    report_flag("1 thread == 2 threads, bitwise", M, IC, OC, same);
    free(out2); free(dinp2); free(dweight2); free(dbias2);
#endif

    free(inp); free(weight); free(bias); free(dout);
    free(dinp0); free(dweight0); free(dbias0);
    free(ref_out); free(ref_out_b); free(ref_dinp); free(ref_dweight); free(ref_dbias);
    free(out); free(dinp); free(dweight); free(dbias);
}

int main(void) {
    uint64_t rng = rng_seed(42);
    // (M, IC, OC)
    static const int shapes[][3] = {
        {1, 1, 1},
        {7, 13, 5},
        {33, 65, 129},
        {3, 300, 2},       // reduction longer than one cache block, tiny output
        {130, 520, 37},    // M over one row block, IC over two reduction blocks, odd OC
        {41, 37, 1100},    // OC over two column blocks, nothing a multiple of a tile
        {600, 17, 45},     // dweight reduction (M) over two blocks, odd IC
        {256, 768, 2304},  // GPT-2 124M qkv layer at B*T = 256
    };
    for (size_t s = 0; s < sizeof(shapes) / sizeof(shapes[0]); s++)
        check_shape(shapes[s][0], shapes[s][1], shapes[s][2], &rng);
    if (failures) {
        printf("%d check(s) failed\n", failures);
        return 1;
    }
    printf("all matmul checks passed\n");
    return 0;
}
