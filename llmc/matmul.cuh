/*
 * Matrix products on the GPU through cuBLASLt: bf16 operands, fp32 accumulation, with the bias
 * add and GELU fused into the product's epilogue where the model wants them. CPU reference:
 * matmul_forward / matmul_backward in matmul.c (weights (OC, IC) row-major, out = inp @ W^T + b).
 *
 * cuBLASLt is column-major; a row-major (R, C) matrix is a column-major (C, R) one, so each
 * row-major product below is written as the column-major product of the transposes:
 *   forward  out (M, OC)   = inp (M, IC) @ W^T       D (OC, M) = W^T(op T) . inp
 *   dinp     dinp (M, IC)  = dout (M, OC) @ W        D (IC, M) = W . dout
 *   dweight  dW (OC, IC)  += dout^T @ inp            D (IC, OC) += inp . dout^T(op T)
 * Bias gradients are column sums of dout, done by a deterministic two-launch reduction
 * (cuda_common.h) rather than the BGRADB epilogue, so they can be summed in fp32 from any type.
 */
#ifndef LLMC_MATMUL_CUH
#define LLMC_MATMUL_CUH
#include <cublasLt.h>
#include "cuda_common.h"
#include "column_reduce.cuh"

static inline void cublas_check_(cublasStatus_t status, const char *file, int line) {
    if (status != CUBLAS_STATUS_SUCCESS) {
        fprintf(stderr, "error: cuBLAS: status %d (%s) (%s:%d)\n", (int)status, cublasGetStatusString(status), file, line);
        fflush(stderr);
        exit(1);
    }
}
#define cublasCheck(status) cublas_check_((status), __FILE__, __LINE__)

// One cuBLASLt handle and workspace for the process (created on first use). A stream whose
// products may run at the same time as another stream's is registered with
// matmul_register_stream and gets a workspace of its own: two products in flight must not share
// one.
static cublasLtHandle_t matmul_lt_handle = NULL;
static void *matmul_lt_workspace = NULL;
static const size_t matmul_lt_workspace_size = (size_t)32 << 20;   // 32 MiB, as cuBLAS advises for Hopper
#define MATMUL_LT_MAX_STREAMS 4
static cudaStream_t matmul_lt_streams[MATMUL_LT_MAX_STREAMS];
static void *matmul_lt_stream_workspaces[MATMUL_LT_MAX_STREAMS];

static inline void matmul_setup(void) {
    if (matmul_lt_handle) return;
    cublasCheck(cublasLtCreate(&matmul_lt_handle));
    matmul_lt_workspace = cudaMallocCheck(matmul_lt_workspace_size);
}
static inline void matmul_register_stream(cudaStream_t stream) {
    matmul_setup();
    for (int i = 0; i < MATMUL_LT_MAX_STREAMS; i++) {
        if (matmul_lt_stream_workspaces[i] == NULL) {
            matmul_lt_streams[i] = stream;
            matmul_lt_stream_workspaces[i] = cudaMallocCheck(matmul_lt_workspace_size);
            return;
        }
    }
    cudaRequire(0, "matmul_register_stream: more concurrent streams than MATMUL_LT_MAX_STREAMS");
}
// Before the stream is destroyed (its work finished): frees its workspace.
static inline void matmul_unregister_stream(cudaStream_t stream) {
    for (int i = 0; i < MATMUL_LT_MAX_STREAMS; i++) {
        if (matmul_lt_stream_workspaces[i] != NULL && matmul_lt_streams[i] == stream) {
            cudaCheck(cudaFree(matmul_lt_stream_workspaces[i]));
            matmul_lt_stream_workspaces[i] = NULL;
        }
    }
}
static inline void *matmul_workspace_for(cudaStream_t stream) {
    for (int i = 0; i < MATMUL_LT_MAX_STREAMS; i++)
        if (matmul_lt_stream_workspaces[i] != NULL && matmul_lt_streams[i] == stream) return matmul_lt_stream_workspaces[i];
    return matmul_lt_workspace;
}

// Which of cuBLASLt's heuristic candidates a product runs: 0, its first choice, in the engine;
// dev/cuda/matmul.cu sets it to time the others. After each product, matmul_lt_candidates holds
// how many candidates the query returned and matmul_lt_last_algo the algorithm that ran.
#define MATMUL_LT_MAX_CANDIDATES 16
static int matmul_lt_candidate = 0;
static int matmul_lt_candidates = 0;
static cublasLtMatmulAlgo_t matmul_lt_last_algo;

// Largest power of two (<= 256) that divides the address: cuBLASLt picks only algorithms that
// accept this alignment (it assumes 256 bytes unless told).
static inline uint32_t pointer_alignment(const void *p) {
    uintptr_t a = (uintptr_t)p;
    uint32_t align = 256;
    while (align > 1 && (a % align) != 0) align >>= 1;
    return align;
}

// Column-major D (m, n) = alpha * op(A) op(B) + beta * D, with optional epilogue:
//   A (m, k), or stored (k, m) when trans_a;  B (k, n), or stored (n, k) when trans_b.
//   d_is_f32: D is fp32 (else bf16). beta 0 overwrites D, 1 accumulates into it.
//   bias (m) bf16 or NULL: added to every column (bf16 D only).
//   gelu_pre (m, n) bf16 or NULL: D = gelu(op(A) op(B) + bias) and gelu_pre gets the
//   pre-activation (the GELU_AUX epilogue; needs m % 8 == 0 and bf16 D); with gelu_backward set,
//   gelu_pre is read instead: D = (op(A) op(B)) * gelu'(gelu_pre) (the DGELU epilogue).
// Returns 0 when cuBLASLt has no algorithm for the product (nothing is launched), else 1.
static inline int matmul_cublaslt_try(void *d, int d_is_f32, const floatX *a, const floatX *b, const floatX *bias,
                                      floatX *gelu_pre, int gelu_backward, int m, int n, int k, int trans_a, int trans_b,
                                      float beta, cudaStream_t stream) {
    matmul_setup();
    cudaRequire(m > 0 && n > 0 && k > 0, "matmul_cublaslt: every dimension must be positive");
    cudaRequire(!(bias || gelu_pre) || !d_is_f32, "matmul_cublaslt: bias/GELU epilogues need a bf16 output");
    cudaRequire(!gelu_pre || m % 8 == 0, "matmul_cublaslt: the GELU epilogue needs m % 8 == 0");
    cudaRequire(!gelu_backward || (gelu_pre && !bias), "matmul_cublaslt: the DGELU epilogue needs the pre-activation and no bias");
    cudaDataType_t d_type = d_is_f32 ? CUDA_R_32F : CUDA_R_16BF;

    cublasLtMatmulDesc_t op;
    cublasCheck(cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    cublasOperation_t op_a = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, op_b = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
    cublasCheck(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &op_a, sizeof(op_a)));
    cublasCheck(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &op_b, sizeof(op_b)));
    cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_DEFAULT;
    if (gelu_backward) epilogue = CUBLASLT_EPILOGUE_DGELU;
    else if (gelu_pre) epilogue = bias ? CUBLASLT_EPILOGUE_GELU_AUX_BIAS : CUBLASLT_EPILOGUE_GELU_AUX;
    else if (bias) epilogue = CUBLASLT_EPILOGUE_BIAS;
    cublasCheck(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue, sizeof(epilogue)));
    if (bias) {
        cudaDataType_t bias_type = CUDA_R_16BF;
        cublasCheck(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bias_type, sizeof(bias_type)));
        cublasCheck(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias)));
    }
    if (gelu_pre) {
        int64_t aux_ld = m;
        cudaDataType_t aux_type = CUDA_R_16BF;
        cublasCheck(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &gelu_pre, sizeof(gelu_pre)));
        cublasCheck(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, &aux_ld, sizeof(aux_ld)));
        cublasCheck(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_DATA_TYPE, &aux_type, sizeof(aux_type)));
    }

    cublasLtMatrixLayout_t layout_a, layout_b, layout_d;
    if (trans_a) cublasCheck(cublasLtMatrixLayoutCreate(&layout_a, CUDA_R_16BF, k, m, k));
    else cublasCheck(cublasLtMatrixLayoutCreate(&layout_a, CUDA_R_16BF, m, k, m));
    if (trans_b) cublasCheck(cublasLtMatrixLayoutCreate(&layout_b, CUDA_R_16BF, n, k, n));
    else cublasCheck(cublasLtMatrixLayoutCreate(&layout_b, CUDA_R_16BF, k, n, k));
    cublasCheck(cublasLtMatrixLayoutCreate(&layout_d, d_type, m, n, m));

    cublasLtMatmulPreference_t pref;
    cublasCheck(cublasLtMatmulPreferenceCreate(&pref));
    cublasCheck(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                     &matmul_lt_workspace_size, sizeof(matmul_lt_workspace_size)));
    uint32_t align_a = pointer_alignment(a), align_b = pointer_alignment(b), align_d = pointer_alignment(d);
    cublasCheck(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &align_a, sizeof(align_a)));
    cublasCheck(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &align_b, sizeof(align_b)));
    cublasCheck(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &align_d, sizeof(align_d)));
    cublasCheck(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &align_d, sizeof(align_d)));

    cublasLtMatmulHeuristicResult_t heuristics[MATMUL_LT_MAX_CANDIDATES];
    int returned = 0, wanted = matmul_lt_candidate < MATMUL_LT_MAX_CANDIDATES ? matmul_lt_candidate + 1 : MATMUL_LT_MAX_CANDIDATES;
    // no algorithm shows as a count of 0 or, for some epilogues, as NOT_SUPPORTED
    cublasStatus_t found = cublasLtMatmulAlgoGetHeuristic(matmul_lt_handle, op, layout_a, layout_b, layout_d, layout_d,
                                                          pref, wanted, heuristics, &returned);
    matmul_lt_candidates = found == CUBLAS_STATUS_SUCCESS ? returned : 0;
    if (found != CUBLAS_STATUS_NOT_SUPPORTED) cublasCheck(found);
    int ok = found == CUBLAS_STATUS_SUCCESS && returned > 0;
    if (ok) {
        const cublasLtMatmulHeuristicResult_t &heuristic = heuristics[matmul_lt_candidate < returned ? matmul_lt_candidate : returned - 1];
        matmul_lt_last_algo = heuristic.algo;
        float alpha = 1.0f;
        cublasCheck(cublasLtMatmul(matmul_lt_handle, op, &alpha, a, layout_a, b, layout_b, &beta, d, layout_d, d, layout_d,
                                   &heuristic.algo, matmul_workspace_for(stream), matmul_lt_workspace_size, stream));
    }
    cublasCheck(cublasLtMatmulPreferenceDestroy(pref));
    cublasCheck(cublasLtMatrixLayoutDestroy(layout_a));
    cublasCheck(cublasLtMatrixLayoutDestroy(layout_b));
    cublasCheck(cublasLtMatrixLayoutDestroy(layout_d));
    cublasCheck(cublasLtMatmulDescDestroy(op));
    return ok;
}
static inline void matmul_cublaslt(void *d, int d_is_f32, const floatX *a, const floatX *b, const floatX *bias,
                                   floatX *gelu_pre, int m, int n, int k, int trans_a, int trans_b, float beta,
                                   cudaStream_t stream) {
    if (!matmul_cublaslt_try(d, d_is_f32, a, b, bias, gelu_pre, 0, m, n, k, trans_a, trans_b, beta, stream)) {
        fprintf(stderr, "error: cuBLASLt has no algorithm for m=%d n=%d k=%d trans_a=%d trans_b=%d d_f32=%d bias=%d gelu=%d "
                        "(alignments A %u B %u D %u bytes)\n",
                m, n, k, trans_a, trans_b, d_is_f32, bias != NULL, gelu_pre != NULL, pointer_alignment(a),
                pointer_alignment(b), pointer_alignment(d));
        exit(1);
    }
}

// out (M, OC) bf16 = inp (M, IC) @ weight (OC, IC)^T + bias (OC; may be NULL).
// gelu_pre (M, OC) not NULL: out = gelu(...) and gelu_pre = the pre-activation (fused epilogue).
static inline void matmul_forward(floatX *out, const floatX *inp, const floatX *weight, const floatX *bias,
                                  floatX *gelu_pre, int M, int IC, int OC, cudaStream_t stream) {
    matmul_cublaslt(out, 0, weight, inp, bias, gelu_pre, OC, M, IC, 1, 0, 0.0f, stream);
}

// Backward of matmul_forward given dout (M, OC) bf16:
//   dinp (M, IC)    = dout @ weight        written (not accumulated); fp32 when dinp_is_f32, else bf16
//   dweight (OC, IC) += dout^T @ inp       fp32, accumulated
//   dbias (OC)      += column sums of dbias_source (M, OC) fp32 when given, else of dout
// Any of dinp, dweight, dbias may be NULL. dbias_source lets the caller sum an fp32 copy of
// dout (the residual-stream gradient) instead of its bf16 rounding.
static inline void matmul_backward(void *dinp, int dinp_is_f32, float *dweight, float *dbias, const floatX *dout,
                                   const float *dbias_source, const floatX *inp, const floatX *weight, float *scratch,
                                   int M, int IC, int OC, cudaStream_t stream) {
    if (dinp) matmul_cublaslt(dinp, dinp_is_f32, weight, dout, NULL, NULL, IC, M, OC, 0, 0, 0.0f, stream);
    if (dweight) matmul_cublaslt(dweight, 1, inp, dout, NULL, NULL, IC, OC, M, 0, 1, 1.0f, stream);
    if (dbias) {
        if (dbias_source) column_sums_add<float>(dbias, dbias_source, scratch, M, OC, stream);
        else column_sums_add<floatX>(dbias, dout, scratch, M, OC, stream);
    }
}

// dpre (M, F) bf16 = (dout (M, OC) @ weight (OC, F)) * gelu'(pre (M, F)): the input gradient of a
// product whose input was gelu(pre), with the GELU backward in the product's epilogue (DGELU).
// Returns 0, launching nothing, when cuBLASLt offers no such algorithm: the caller then runs
// matmul_backward and gelu_backward separately.
static inline int matmul_backward_dgelu(floatX *dpre, const floatX *dout, const floatX *weight, const floatX *pre,
                                        int M, int F, int OC, cudaStream_t stream) {
    if (F % 8 != 0) return 0;
    return matmul_cublaslt_try(dpre, 0, weight, dout, NULL, (floatX *)pre, 1, F, M, OC, 0, 0, 0.0f, stream);
}
#endif
