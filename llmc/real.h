/*
 * `real` is the scalar type of the CPU reference ops (ops_cpu.c, matmul.c). It is float in the
 * engine. The finite-difference tests compile the same ops with -DREAL_IS_DOUBLE so that the
 * backward of every op is checked against central differences in double precision, on the very
 * code the engine runs.
 */
#ifndef LLMC_REAL_H
#define LLMC_REAL_H
#ifdef REAL_IS_DOUBLE
typedef double real;
#else
typedef float real;
#endif
#endif
