/*
 * Matrix products of the CPU reference: every linear layer of the model goes through these two.
 * Weights are stored (OC, IC) row-major as torch.nn.Linear does.
 */
#ifndef LLMC_MATMUL_H
#define LLMC_MATMUL_H
#include "real.h"

// out (M, OC) = inp (M, IC) @ weight (OC, IC)^T + bias (OC); bias may be NULL.
void matmul_forward(real *out, const real *inp, const real *weight, const real *bias,
                    int M, int IC, int OC);

// Backward of matmul_forward, accumulating (+=):
//   dinp (M, IC) += dout (M, OC) @ weight (OC, IC)
//   dweight (OC, IC) += dout^T (OC, M) @ inp (M, IC)
//   dbias (OC) += sum over M of dout
// dinp, dweight, dbias may each be NULL (not needed).
void matmul_backward(real *dinp, real *dweight, real *dbias, const real *dout,
                     const real *inp, const real *weight, int M, int IC, int OC);
#endif
