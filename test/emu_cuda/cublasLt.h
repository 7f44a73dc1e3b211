/*
 * cuBLASLt as llmc/matmul.cuh calls it, emulated on the CPU from the library's documentation
 * (cuBLASLt API reference: cublasLtMatmul, its descriptor attributes, epilogues and matrix
 * layouts), for test/emu_cuda/cuda_runtime.h:
 *
 *   D = epilogue(alpha * op(A) op(B) + beta * C)      column-major; op(X) = X or X^T (TRANSA/B)
 *   DEFAULT        D = x
 *   BIAS           D = x + bias (one value a row of D)
 *   GELU_AUX(_BIAS) aux = x (+ bias), D = gelu(aux)   (aux: EPILOGUE_AUX_POINTER, its LD)
 *   DGELU          D = x * gelu'(aux)
 * with x accumulated in fp32 over k, gelu the tanh approximation, aux and a bf16 D rounded to
 * nearest even. Layouts: CUDA_R_16BF or CUDA_R_32F (rows, cols, ld); C is read as D's type.
 *
 * The heuristic offers three algorithms: 0 and 2 sum over k in ascending order (the same bits),
 * 1 in descending order (other bits: a tuner that keeps only candidates with the first choice's
 * bits must drop it). Each algorithm remembers the alignments the preference allowed, and
 * cublasLtMatmul refuses pointers aligned less (as an algorithm picked for aligned operands may
 * fault on others). Anything else (other types, compute types, epilogues, attributes) is
 * refused with NOT_SUPPORTED.
 */
#ifndef TEST_EMU_CUDA_CUBLASLT_H
#define TEST_EMU_CUDA_CUBLASLT_H
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <vector>
#include "cuda_runtime.h"

enum cublasStatus_t {
    CUBLAS_STATUS_SUCCESS = 0, CUBLAS_STATUS_NOT_INITIALIZED = 1, CUBLAS_STATUS_INVALID_VALUE = 7,
    CUBLAS_STATUS_EXECUTION_FAILED = 13, CUBLAS_STATUS_NOT_SUPPORTED = 15
};
static inline const char *cublasGetStatusString(cublasStatus_t s) {
    switch (s) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    }
    return "unknown status";
}
enum cudaDataType_t { CUDA_R_32F = 0, CUDA_R_16BF = 14 };
enum cublasComputeType_t { CUBLAS_COMPUTE_32F = 68 };
enum cublasOperation_t { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1 };
enum cublasLtEpilogue_t {
    CUBLASLT_EPILOGUE_DEFAULT = 1, CUBLASLT_EPILOGUE_BIAS = 4, CUBLASLT_EPILOGUE_GELU_AUX = 160,
    CUBLASLT_EPILOGUE_GELU_AUX_BIAS = 164, CUBLASLT_EPILOGUE_DGELU = 192
};
enum cublasLtMatmulDescAttributes_t {
    CUBLASLT_MATMUL_DESC_TRANSA, CUBLASLT_MATMUL_DESC_TRANSB, CUBLASLT_MATMUL_DESC_EPILOGUE,
    CUBLASLT_MATMUL_DESC_BIAS_POINTER, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER,
    CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_DATA_TYPE
};
enum cublasLtMatmulPreferenceAttributes_t {
    CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
    CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
    CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES
};

struct EmuLtHandle { int live; };
typedef EmuLtHandle *cublasLtHandle_t;
struct EmuLtDesc {
    cublasOperation_t trans_a, trans_b;
    cublasLtEpilogue_t epilogue;
    const void *bias;
    cudaDataType_t bias_type, aux_type;
    void *aux;
    int64_t aux_ld;
};
typedef EmuLtDesc *cublasLtMatmulDesc_t;
struct EmuLtLayout { cudaDataType_t type; uint64_t rows, cols; int64_t ld; };
typedef EmuLtLayout *cublasLtMatrixLayout_t;
struct EmuLtPref { size_t workspace; uint32_t align[4]; };   // A, B, C, D
typedef EmuLtPref *cublasLtMatmulPreference_t;
struct cublasLtMatmulAlgo_t { uint64_t data[8]; };   // data[0] the algorithm, data[1..4] the alignments it assumes
struct cublasLtMatmulHeuristicResult_t {
    cublasLtMatmulAlgo_t algo;
    size_t workspaceSize;
    cublasStatus_t state;
    float wavesCount;
    int reserved[4];
};
#define EMU_LT_ALGORITHMS 3

static inline cublasStatus_t cublasLtCreate(cublasLtHandle_t *h) { *h = new EmuLtHandle{1}; return CUBLAS_STATUS_SUCCESS; }
static inline cublasStatus_t cublasLtDestroy(cublasLtHandle_t h) { delete h; return CUBLAS_STATUS_SUCCESS; }

static inline cublasStatus_t cublasLtMatmulDescCreate(cublasLtMatmulDesc_t *d, cublasComputeType_t compute, cudaDataType_t scale) {
    if (compute != CUBLAS_COMPUTE_32F || scale != CUDA_R_32F) return CUBLAS_STATUS_NOT_SUPPORTED;
    *d = new EmuLtDesc{CUBLAS_OP_N, CUBLAS_OP_N, CUBLASLT_EPILOGUE_DEFAULT, NULL, CUDA_R_16BF, CUDA_R_16BF, NULL, 0};
    return CUBLAS_STATUS_SUCCESS;
}
static inline cublasStatus_t cublasLtMatmulDescDestroy(cublasLtMatmulDesc_t d) { delete d; return CUBLAS_STATUS_SUCCESS; }
template <typename T> static inline cublasStatus_t emu_lt_get(T *out, const void *buf, size_t size) {
    if (size != sizeof(T)) return CUBLAS_STATUS_INVALID_VALUE;
    memcpy(out, buf, sizeof(T));
    return CUBLAS_STATUS_SUCCESS;
}
static inline cublasStatus_t cublasLtMatmulDescSetAttribute(cublasLtMatmulDesc_t d, cublasLtMatmulDescAttributes_t attr,
                                                            const void *buf, size_t size) {
    switch (attr) {
    case CUBLASLT_MATMUL_DESC_TRANSA: return emu_lt_get(&d->trans_a, buf, size);
    case CUBLASLT_MATMUL_DESC_TRANSB: return emu_lt_get(&d->trans_b, buf, size);
    case CUBLASLT_MATMUL_DESC_EPILOGUE: return emu_lt_get(&d->epilogue, buf, size);
    case CUBLASLT_MATMUL_DESC_BIAS_POINTER: return emu_lt_get(&d->bias, buf, size);
    case CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE: return emu_lt_get(&d->bias_type, buf, size);
    case CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER: return emu_lt_get(&d->aux, buf, size);
    case CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD: return emu_lt_get(&d->aux_ld, buf, size);
    case CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_DATA_TYPE: return emu_lt_get(&d->aux_type, buf, size);
    }
    return CUBLAS_STATUS_NOT_SUPPORTED;
}
static inline cublasStatus_t cublasLtMatrixLayoutCreate(cublasLtMatrixLayout_t *l, cudaDataType_t type, uint64_t rows,
                                                        uint64_t cols, int64_t ld) {
    if (type != CUDA_R_32F && type != CUDA_R_16BF) return CUBLAS_STATUS_NOT_SUPPORTED;
    if (rows == 0 || cols == 0 || ld < (int64_t)rows) return CUBLAS_STATUS_INVALID_VALUE;
    *l = new EmuLtLayout{type, rows, cols, ld};
    return CUBLAS_STATUS_SUCCESS;
}
static inline cublasStatus_t cublasLtMatrixLayoutDestroy(cublasLtMatrixLayout_t l) { delete l; return CUBLAS_STATUS_SUCCESS; }
static inline cublasStatus_t cublasLtMatmulPreferenceCreate(cublasLtMatmulPreference_t *p) {
    *p = new EmuLtPref{0, {256, 256, 256, 256}};
    return CUBLAS_STATUS_SUCCESS;
}
static inline cublasStatus_t cublasLtMatmulPreferenceDestroy(cublasLtMatmulPreference_t p) { delete p; return CUBLAS_STATUS_SUCCESS; }
static inline cublasStatus_t cublasLtMatmulPreferenceSetAttribute(cublasLtMatmulPreference_t p,
                                                                  cublasLtMatmulPreferenceAttributes_t attr, const void *buf,
                                                                  size_t size) {
    switch (attr) {
    case CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES: return emu_lt_get(&p->workspace, buf, size);
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES: return emu_lt_get(&p->align[0], buf, size);
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES: return emu_lt_get(&p->align[1], buf, size);
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES: return emu_lt_get(&p->align[2], buf, size);
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES: return emu_lt_get(&p->align[3], buf, size);
    }
    return CUBLAS_STATUS_NOT_SUPPORTED;
}

// op(X) of a layout: (rows, cols) after the operation
static inline void emu_lt_op_shape(const EmuLtLayout *l, cublasOperation_t op, uint64_t *rows, uint64_t *cols) {
    *rows = op == CUBLAS_OP_N ? l->rows : l->cols;
    *cols = op == CUBLAS_OP_N ? l->cols : l->rows;
}
static inline cublasStatus_t emu_lt_check(const EmuLtDesc *op, const EmuLtLayout *a, const EmuLtLayout *b, const EmuLtLayout *c,
                                          const EmuLtLayout *d) {
    uint64_t am, ak, bk, bn;
    emu_lt_op_shape(a, op->trans_a, &am, &ak);
    emu_lt_op_shape(b, op->trans_b, &bk, &bn);
    if (ak != bk || am != d->rows || bn != d->cols || c->rows != d->rows || c->cols != d->cols) return CUBLAS_STATUS_INVALID_VALUE;
    if (a->type != CUDA_R_16BF || b->type != CUDA_R_16BF || c->type != d->type) return CUBLAS_STATUS_NOT_SUPPORTED;
    switch (op->epilogue) {
    case CUBLASLT_EPILOGUE_DEFAULT: return CUBLAS_STATUS_SUCCESS;
    case CUBLASLT_EPILOGUE_BIAS:
        return d->type == CUDA_R_16BF && op->bias_type == CUDA_R_16BF ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_NOT_SUPPORTED;
    case CUBLASLT_EPILOGUE_GELU_AUX_BIAS:
        if (op->bias_type != CUDA_R_16BF) return CUBLAS_STATUS_NOT_SUPPORTED;
        // fall through
    case CUBLASLT_EPILOGUE_GELU_AUX:
    case CUBLASLT_EPILOGUE_DGELU:
        if (d->type != CUDA_R_16BF || op->aux_type != CUDA_R_16BF) return CUBLAS_STATUS_NOT_SUPPORTED;
        // the auxiliary matrix's leading dimension: at least D's rows, a multiple of 8
        return op->aux_ld >= (int64_t)d->rows && op->aux_ld % 8 == 0 ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_NOT_SUPPORTED;
    }
    return CUBLAS_STATUS_NOT_SUPPORTED;
}

static inline cublasStatus_t cublasLtMatmulAlgoGetHeuristic(cublasLtHandle_t, cublasLtMatmulDesc_t op, cublasLtMatrixLayout_t a,
                                                            cublasLtMatrixLayout_t b, cublasLtMatrixLayout_t c,
                                                            cublasLtMatrixLayout_t d, cublasLtMatmulPreference_t pref,
                                                            int requested, cublasLtMatmulHeuristicResult_t *results,
                                                            int *returned) {
    *returned = 0;
    cublasStatus_t ok = emu_lt_check(op, a, b, c, d);
    if (ok != CUBLAS_STATUS_SUCCESS) return ok;
    for (int i = 0; i < requested && i < EMU_LT_ALGORITHMS; i++) {
        memset(&results[i], 0, sizeof(results[i]));
        results[i].algo.data[0] = (uint64_t)i;
        for (int j = 0; j < 4; j++) results[i].algo.data[1 + j] = pref->align[j];
        results[i].state = CUBLAS_STATUS_SUCCESS;
        results[i].wavesCount = 1.0f;
        (*returned)++;
    }
    return CUBLAS_STATUS_SUCCESS;
}

static inline float emu_lt_load(const void *p, cudaDataType_t type, size_t i) {
    return type == CUDA_R_32F ? ((const float *)p)[i] : to_f32(((const floatX *)p)[i]);
}
static inline uint32_t emu_lt_alignment(const void *p) {
    uint32_t align = 256;
    while (align > 1 && (uintptr_t)p % align != 0) align >>= 1;
    return align;
}
static inline double emu_lt_gelu_tanh(double x) { return tanh(sqrt(2.0 / M_PI) * (x + 0.044715 * x * x * x)); }

// D = epilogue(alpha op(A) op(B) + beta C), the header comment's arithmetic
static inline void emu_lt_product(const EmuLtDesc *op, const void *A, const EmuLtLayout *a, const void *B, const EmuLtLayout *b,
                                  float alpha, float beta, const void *C, const EmuLtLayout *c, void *D, const EmuLtLayout *d,
                                  bool descending) {
    const uint64_t M = d->rows, N = d->cols;
    uint64_t am, K;
    emu_lt_op_shape(a, op->trans_a, &am, &K);
    std::vector<float> out(M * N);
    for (uint64_t j = 0; j < N; j++)
        for (uint64_t i = 0; i < M; i++) {
            float acc = 0.0f;
            for (uint64_t s = 0; s < K; s++) {
                uint64_t kk = descending ? K - 1 - s : s;
                // op(A)(i, kk), op(B)(kk, j) in the column-major storage
                size_t ia = op->trans_a == CUBLAS_OP_N ? i + kk * a->ld : kk + i * a->ld;
                size_t ib = op->trans_b == CUBLAS_OP_N ? kk + j * b->ld : j + kk * b->ld;
                acc += to_f32(((const floatX *)A)[ia]) * to_f32(((const floatX *)B)[ib]);
            }
            float x = alpha * acc;
            if (beta != 0.0f) x += beta * emu_lt_load(C, c->type, i + j * c->ld);
            out[i + j * M] = x;
        }
    for (uint64_t j = 0; j < N; j++)
        for (uint64_t i = 0; i < M; i++) {
            float x = out[i + j * M];
            size_t aux_at = i + j * (size_t)op->aux_ld;
            switch (op->epilogue) {
            case CUBLASLT_EPILOGUE_DEFAULT: break;
            case CUBLASLT_EPILOGUE_BIAS: x += to_f32(((const floatX *)op->bias)[i]); break;
            case CUBLASLT_EPILOGUE_GELU_AUX_BIAS:
            case CUBLASLT_EPILOGUE_GELU_AUX:
                if (op->epilogue == CUBLASLT_EPILOGUE_GELU_AUX_BIAS) x += to_f32(((const floatX *)op->bias)[i]);
                ((floatX *)op->aux)[aux_at] = to_bf16(x);
                x = (float)(0.5 * x * (1.0 + emu_lt_gelu_tanh(x)));
                break;
            case CUBLASLT_EPILOGUE_DGELU: {
                double p = to_f32(((const floatX *)op->aux)[aux_at]), t = emu_lt_gelu_tanh(p);
                double grad = 0.5 * (1.0 + t) + 0.5 * p * (1.0 - t * t) * sqrt(2.0 / M_PI) * (1.0 + 3.0 * 0.044715 * p * p);
                x = (float)(x * grad);
                break;
            }
            }
            size_t at = i + j * d->ld;
            if (d->type == CUDA_R_32F) ((float *)D)[at] = x;
            else ((floatX *)D)[at] = to_bf16(x);
        }
}

static inline cublasStatus_t cublasLtMatmul(cublasLtHandle_t handle, cublasLtMatmulDesc_t op, const void *alpha_p, const void *A,
                                            cublasLtMatrixLayout_t a, const void *B, cublasLtMatrixLayout_t b, const void *beta_p,
                                            const void *C, cublasLtMatrixLayout_t c, void *D, cublasLtMatrixLayout_t d,
                                            const cublasLtMatmulAlgo_t *algo, void *, size_t workspace_bytes, cudaStream_t stream) {
    if (handle == NULL || handle->live != 1) return CUBLAS_STATUS_NOT_INITIALIZED;
    cublasStatus_t ok = emu_lt_check(op, a, b, c, d);
    if (ok != CUBLAS_STATUS_SUCCESS) return ok;
    if (algo == NULL || algo->data[0] >= EMU_LT_ALGORITHMS) return CUBLAS_STATUS_INVALID_VALUE;
    const void *pointers[4] = {A, B, C, D};
    for (int j = 0; j < 4; j++)
        if (emu_lt_alignment(pointers[j]) < algo->data[1 + j])
            emu_fail("cublasLtMatmul: an operand is aligned less than the algorithm's preference assumed");
    (void)workspace_bytes;
    // the product runs now, or at each replay of the stream's capture: with copies of the
    // descriptors, which the caller may destroy once this returns
    emu_issue(stream, cudaGraphNodeTypeKernel, [=, op = *op, a = *a, b = *b, c = *c, d = *d,
                                                alpha = *(const float *)alpha_p, beta = *(const float *)beta_p,
                                                descending = algo->data[0] == 1] {
        emu_lt_product(&op, A, &a, B, &b, alpha, beta, C, &c, D, &d, descending);
    });
    return CUBLAS_STATUS_SUCCESS;
}
#endif
