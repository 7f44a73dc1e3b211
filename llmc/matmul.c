/* Naive reference version; replaced by the cache-blocked one. */
#include "matmul.h"
#include <stddef.h>
void matmul_forward(real *out, const real *inp, const real *weight, const real *bias, int M, int IC, int OC) {
    #pragma omp parallel for
    for (int m = 0; m < M; m++)
        for (int o = 0; o < OC; o++) {
            real s = bias ? bias[o] : 0;
            for (int i = 0; i < IC; i++) s += inp[(size_t)m * IC + i] * weight[(size_t)o * IC + i];
            out[(size_t)m * OC + o] = s;
        }
}
void matmul_backward(real *dinp, real *dweight, real *dbias, const real *dout, const real *inp, const real *weight, int M, int IC, int OC) {
    if (dinp) {
        #pragma omp parallel for
        for (int m = 0; m < M; m++)
            for (int o = 0; o < OC; o++)
                for (int i = 0; i < IC; i++) dinp[(size_t)m * IC + i] += dout[(size_t)m * OC + o] * weight[(size_t)o * IC + i];
    }
    if (dweight || dbias) {
        #pragma omp parallel for
        for (int o = 0; o < OC; o++)
            for (int m = 0; m < M; m++) {
                real d = dout[(size_t)m * OC + o];
                if (dbias) dbias[o] += d;
                if (dweight) for (int i = 0; i < IC; i++) dweight[(size_t)o * IC + i] += d * inp[(size_t)m * IC + i];
            }
    }
}
