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
#include <string.h>
#include "cuda_common.h"
#include "column_reduce.cuh"
#include "tuning.cuh"

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
#define MATMUL_LT_MAX_STREAMS 8
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

// ---------------------------------------------------------------------------------------------
// Tuning: cuBLASLt's heuristic ranks its algorithms by a model of the card, and its first choice
// is not always the fastest for a shape (wave quantisation of the tiles over the SMs, for one).
// While matmul_tune is set, the first product of each shape runs every candidate the heuristic
// offers (up to MATMUL_LT_MAX_CANDIDATES) on the product's own operands, keeps those whose output
// equals the first choice's bit for bit (fingerprinted; so the choice changes the speed and never
// the numbers, and two runs give the same results whatever each picked), times them, and
// remembers the fastest for the shape. Later products of the shape run it. Not while the stream
// is being captured into a graph. With beta != 0 and the output its own addend (C = D) it is an
// input too: it is saved first and put back before each checked run and before the product itself.
#define MATMUL_TUNE_MAX 128   // shapes tuned per file that includes this header (a rollout engine tunes 5 a row count)
typedef struct {
    // the shape, as matmul_cublaslt_try takes it, and the operands' alignments
    int m, n, k, trans_a, trans_b, d_is_f32, epilogue, has_bias, accumulate;
    uint32_t align_a, align_b, align_c, align_d;   // align_c: the addend's when it is not D (else 0)
    cublasLtMatmulAlgo_t algo;   // the choice
    int chosen;                  // its rank among the heuristic's candidates (0: the first choice)
    int candidates, differed;    // offered; of those, how many gave other bits (or failed to run)
    float ms, default_ms;        // the choice's time and the first choice's, per product
} MatmulTuneEntry;
static int matmul_tune = 0;       // set: products of an untuned shape are tuned first
static int matmul_tune_use = 1;   // 0: run the first choice even for tuned shapes (to compare)
static MatmulTuneEntry matmul_tune_entries[MATMUL_TUNE_MAX];
static int matmul_tune_count = 0;

static inline int matmul_tune_same(const MatmulTuneEntry *e, const MatmulTuneEntry *key) {
    return e->m == key->m && e->n == key->n && e->k == key->k && e->trans_a == key->trans_a &&
           e->trans_b == key->trans_b && e->d_is_f32 == key->d_is_f32 && e->epilogue == key->epilogue &&
           e->has_bias == key->has_bias && e->accumulate == key->accumulate && e->align_a == key->align_a &&
           e->align_b == key->align_b && e->align_c == key->align_c && e->align_d == key->align_d;
}
static inline MatmulTuneEntry *matmul_tune_find(const MatmulTuneEntry *key) {
    for (int i = 0; i < matmul_tune_count; i++)
        if (matmul_tune_same(&matmul_tune_entries[i], key)) return &matmul_tune_entries[i];
    return NULL;
}

// Probe operands for the tuner's check (matmul_tune_product). Its bits compare on the product's
// own operands can miss an algorithm that sums the k terms in another grouping (split-K): in a
// bf16 output the orders' last-bit differences mostly round away, and a small product (a decode
// step's) has too few outputs for one to show by chance, while later operands then give other
// bits. On the probe they cannot hide: op(A)'s column 0 is +2^10 and column k-1 is -2^10, op(B)'s
// rows 0 and k-1 are 2^10, so every output's sum goes through 2^20 and cancels at the end; the
// k-2 small terms in between (pseudo-random bf16 in (-1, 1)) are added near 2^20, where each
// addition rounds to 2^-4, so the result depends on the grouping far above a bf16 ulp.
// Element idx of a stored operand lies in column kk = (idx / kk_div) % kk_mod of the k range;
// k < 3 (or 0, for C and the GELU input) gives small terms everywhere.
__global__ void matmul_probe_fill_kernel(floatX *x, size_t count, size_t kk_div, int kk_mod, int k, float first, float last,
                                         uint32_t seed) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < count; i += (size_t)gridDim.x * blockDim.x) {
        int kk = (int)((i / kk_div) % (size_t)kk_mod);
        uint32_t h = (uint32_t)i * 0x9E3779B1u ^ seed;
        h ^= h >> 16; h *= 0x85EBCA6Bu; h ^= h >> 13; h *= 0xC2B2AE35u; h ^= h >> 16;
        float v = (float)(h >> 8) * (2.0f / 16777216.0f) - 1.0f;
        if (k >= 3 && kk == 0) v = first;
        else if (k >= 3 && kk == k - 1) v = last;
        x[i] = __float2bfloat16(v);
    }
}
static inline void matmul_probe_fill(floatX *x, size_t count, size_t kk_div, int kk_mod, int k, float first, float last,
                                     uint32_t seed, cudaStream_t stream) {
    int blocks = (int)((count + 255) / 256 < 1024 ? (count + 255) / 256 : 1024);
    matmul_probe_fill_kernel<<<blocks, 256, 0, stream>>>(x, count, kk_div, kk_mod, k, first, last, seed);
    cudaCheckLaunch();
}
// Products of at most this many outputs are checked on the probe too; larger ones have enough
// outputs for other orders to show on their own operands (and the probe would take much memory).
#define MATMUL_PROBE_MAX_OUTPUTS ((double)(1 << 22))

// Runs the heuristic's candidates (returned of them) for the product described by op and the
// layouts, on its own operands, and records the choice in a new entry (key's shape). d (d_bytes)
// is the output, c the addend (d itself for an accumulation in place), aux the epilogue's GELU
// matrix (NULL without one; aux_out: the epilogue writes it, else reads it; aux_bytes). A
// candidate is kept only where its bits equal the first choice's on the product's operands and,
// for a small product, on probe operands (matmul_probe_fill_kernel). Returns the entry, or NULL
// when nothing could be tuned (no memory for the saved output or the probe, or the table is
// full): the caller then runs the first choice.
static inline MatmulTuneEntry *matmul_tune_product(const MatmulTuneEntry *key, cublasLtMatmulDesc_t op,
                                                   cublasLtMatrixLayout_t layout_a, cublasLtMatrixLayout_t layout_b,
                                                   cublasLtMatrixLayout_t layout_d, const void *a, const void *b,
                                                   const void *c, void *d, size_t d_bytes, void *aux, int aux_out,
                                                   size_t aux_bytes, float beta,
                                                   const cublasLtMatmulHeuristicResult_t *heuristics, int returned,
                                                   cudaStream_t stream) {
    if (matmul_tune_count >= MATMUL_TUNE_MAX) return NULL;
    // a small product (a decode step's: a few microseconds) is timed over more runs, queued
    // behind a hold so that the GPU's time is measured rather than the launches' (tuning.cuh)
    const int small = (double)key->m * key->n * key->k < 1e9;
    const int reps = small ? 20 : 5, hold_us = small ? 1000 : 0;
    const int m = key->m, n = key->n, k = key->k;
    const int in_place = beta != 0.0f && c == d;
    // buffers: the output saved (an accumulation in place), and the probe's operands, output, its
    // addend's initial values and GELU matrix; one allocation
    const int probe = (double)m * n <= MATMUL_PROBE_MAX_OUTPUTS;
    size_t off_saved = 0, off_pa = 0, off_pb = 0, off_pd = 0, off_pc = 0, off_paux = 0, total = 0;
    auto take = [&](size_t bytes) { size_t at = total; total += (bytes + 255) / 256 * 256; return at; };
    if (in_place) off_saved = take(d_bytes);
    if (probe) {
        off_pa = take((size_t)m * k * sizeof(floatX));
        off_pb = take((size_t)k * n * sizeof(floatX));
        off_pd = take(d_bytes);
        if (beta != 0.0f) off_pc = take(d_bytes);
        if (aux) off_paux = take(aux_bytes);
    }
    char *scratch = NULL;
    if (total > 0 && cudaMalloc((void **)&scratch, total) != cudaSuccess) {
        (void)cudaGetLastError();   // out of memory is no error of the run: the first choice runs
        return NULL;
    }
    void *saved = in_place ? scratch + off_saved : NULL;
    floatX *pa = probe ? (floatX *)(scratch + off_pa) : NULL, *pb = probe ? (floatX *)(scratch + off_pb) : NULL;
    void *pd = probe ? scratch + off_pd : NULL, *pc = probe && beta != 0.0f ? scratch + off_pc : NULL;
    floatX *paux = probe && aux ? (floatX *)(scratch + off_paux) : NULL;
    if (saved) cudaCheck(cudaMemcpyAsync(saved, d, d_bytes, cudaMemcpyDeviceToDevice, stream));
    if (probe) {
        // op(A) (m, k) is stored (k, m) when transposed, op(B) (k, n) stored (n, k) when transposed
        if (key->trans_a) matmul_probe_fill(pa, (size_t)m * k, 1, k, k, 1024.0f, -1024.0f, 1u, stream);
        else matmul_probe_fill(pa, (size_t)m * k, (size_t)m, k, k, 1024.0f, -1024.0f, 1u, stream);
        if (key->trans_b) matmul_probe_fill(pb, (size_t)k * n, (size_t)n, k, k, 1024.0f, 1024.0f, 2u, stream);
        else matmul_probe_fill(pb, (size_t)k * n, 1, k, k, 1024.0f, 1024.0f, 2u, stream);
        if (pc) {   // the addend: small values, in D's type
            if (key->d_is_f32) {
                matmul_probe_fill((floatX *)pd, (size_t)m * n, 1, 1, 0, 0.0f, 0.0f, 3u, stream);
                convert_bf16_to_f32((float *)pc, (const floatX *)pd, (size_t)m * n, stream);
            } else {
                matmul_probe_fill((floatX *)pc, (size_t)m * n, 1, 1, 0, 0.0f, 0.0f, 3u, stream);
            }
        }
        if (paux) matmul_probe_fill(paux, aux_bytes / sizeof(floatX), 1, 1, 0, 0.0f, 0.0f, 4u, stream);
    }
    unsigned long long *d_sum = (unsigned long long *)cudaMallocCheck(sizeof(unsigned long long));
    float alpha = 1.0f;
    void *workspace = matmul_workspace_for(stream);
    auto run_on = [&](int i, const void *a_, const void *b_, const void *c_, void *d_) {
        return cublasLtMatmul(matmul_lt_handle, op, &alpha, a_, layout_a, b_, layout_b, &beta, c_, layout_d, d_, layout_d,
                              &heuristics[i].algo, workspace, matmul_lt_workspace_size, stream);
    };
    auto run = [&](int i) { return run_on(i, a, b, c, d); };
    // the candidate's bits on the probe (its output, and the GELU matrix it writes); a candidate
    // that does not run there gets bits no other run has (~0 against a fingerprint of 0 words)
    auto probe_bits = [&](int i) {
        if (aux) cublasCheck(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &paux, sizeof(paux)));
        if (in_place) cudaCheck(cudaMemcpyAsync(pd, pc, d_bytes, cudaMemcpyDeviceToDevice, stream));
        cublasStatus_t status = run_on(i, pa, pb, pc && !in_place ? pc : pd, pd);
        if (aux) cublasCheck(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &aux, sizeof(aux)));
        if (status != CUBLAS_STATUS_SUCCESS) {
            (void)cudaGetLastError();
            return ~0ull;
        }
        unsigned long long bits = tune_fingerprint(d_sum, pd, d_bytes, stream);
        if (paux && aux_out) bits ^= tune_fingerprint(d_sum, paux, aux_bytes, stream) * 0x9E3779B97F4A7C15ull;
        return bits;
    };
    MatmulTuneEntry e = *key;
    e.algo = heuristics[0].algo;
    e.chosen = 0;
    e.candidates = returned;
    e.differed = 0;
    e.ms = e.default_ms = 0.0f;
    unsigned long long reference = 0, probe_reference = 0;
    for (int i = 0; i < returned; i++) {
        if (saved) cudaCheck(cudaMemcpyAsync(d, saved, d_bytes, cudaMemcpyDeviceToDevice, stream));
        cublasStatus_t status = heuristics[i].state == CUBLAS_STATUS_SUCCESS &&
                                heuristics[i].workspaceSize <= matmul_lt_workspace_size ? run(i) : CUBLAS_STATUS_NOT_SUPPORTED;
        if (status != CUBLAS_STATUS_SUCCESS) {   // the first choice must run (as without tuning); others may fail
            cublasCheck(status == CUBLAS_STATUS_NOT_SUPPORTED || i > 0 ? CUBLAS_STATUS_SUCCESS : status);
            (void)cudaGetLastError();
            e.differed++;
            continue;
        }
        unsigned long long bits = tune_fingerprint(d_sum, d, d_bytes, stream);
        if (aux && aux_out) bits ^= tune_fingerprint(d_sum, aux, aux_bytes, stream) * 0x9E3779B97F4A7C15ull;
        unsigned long long pbits = probe ? probe_bits(i) : 0;
        if (i == 0) {
            reference = bits;
            probe_reference = pbits;
        } else if (bits != reference || pbits != probe_reference || pbits == ~0ull) {
            e.differed++;
            continue;
        }
        if (saved) cudaCheck(cudaMemcpyAsync(d, saved, d_bytes, cudaMemcpyDeviceToDevice, stream));
        float ms = tune_time_ms([&] { run(i); }, stream, reps, hold_us);
        if (i == 0) e.ms = e.default_ms = ms;
        else if (ms < e.ms) {
            e.ms = ms;
            e.chosen = i;
            e.algo = heuristics[i].algo;
        }
    }
    if (saved) cudaCheck(cudaMemcpyAsync(d, saved, d_bytes, cudaMemcpyDeviceToDevice, stream));
    cudaCheck(cudaStreamSynchronize(stream));
    if (scratch) cudaCheck(cudaFree(scratch));
    cudaCheck(cudaFree(d_sum));
    matmul_tune_entries[matmul_tune_count] = e;
    return &matmul_tune_entries[matmul_tune_count++];
}

// One line per tuned shape from entry `from` on (what chose what, and the times), to out.
static inline void matmul_tune_print(FILE *out, int from) {
    for (int i = from; i < matmul_tune_count; i++) {
        const MatmulTuneEntry *e = &matmul_tune_entries[i];
        fprintf(out, "  cuBLASLt m=%-6d n=%-6d k=%-6d %c%c %s%s%s: candidate %2d of %2d (%2d differed) %8.4f ms, first choice %8.4f ms\n",
                e->m, e->n, e->k, e->trans_a ? 'T' : 'N', e->trans_b ? 'T' : 'N', e->d_is_f32 ? "f32" : "bf16",
                e->epilogue == CUBLASLT_EPILOGUE_DEFAULT ? "" : e->epilogue == CUBLASLT_EPILOGUE_BIAS ? " bias"
                : e->epilogue == CUBLASLT_EPILOGUE_DGELU ? " dgelu" : " gelu",
                !e->accumulate ? "" : e->align_c ? " + residual" : " +=",
                e->chosen, e->candidates, e->differed, e->ms, e->default_ms);
    }
}

// "cuBLASLt tuned 12 product shapes, 4 changed: ..." for the entries from `from` on, into buf.
static inline void matmul_tune_describe(char *buf, size_t size, int from) {
    int changed = 0;
    double ms = 0.0, default_ms = 0.0;
    for (int i = from; i < matmul_tune_count; i++) {
        changed += matmul_tune_entries[i].chosen != 0;
        ms += matmul_tune_entries[i].ms;
        default_ms += matmul_tune_entries[i].default_ms;
    }
    snprintf(buf, size, "cuBLASLt tuned %d product shape%s, %d changed: %.3f ms with the first choices, %.3f ms tuned (one product of each)",
             matmul_tune_count - from, matmul_tune_count - from == 1 ? "" : "s", changed, default_ms, ms);
}

// Column-major D (m, n) = alpha * op(A) op(B) + beta * C, with optional epilogue:
//   A (m, k), or stored (k, m) when trans_a;  B (k, n), or stored (n, k) when trans_b.
//   d_is_f32: D is fp32 (else bf16). beta 0 overwrites D, 1 adds C: D itself (accumulates into
//   it) unless c is given, a matrix like D (the residual stream a projection adds to).
//   bias (m) bf16 or NULL: added to every column (bf16 D only).
//   gelu_pre (m, n) bf16 or NULL: D = gelu(op(A) op(B) + bias) and gelu_pre gets the
//   pre-activation (the GELU_AUX epilogue; needs m % 8 == 0 and bf16 D); with gelu_backward set,
//   gelu_pre is read instead: D = (op(A) op(B)) * gelu'(gelu_pre) (the DGELU epilogue).
// Returns 0 when cuBLASLt has no algorithm for the product (nothing is launched), else 1.
static inline int matmul_cublaslt_try(void *d, int d_is_f32, const floatX *a, const floatX *b, const floatX *bias,
                                      floatX *gelu_pre, int gelu_backward, int m, int n, int k, int trans_a, int trans_b,
                                      float beta, cudaStream_t stream, const void *c = NULL) {
    matmul_setup();
    if (c == NULL) c = d;
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
    uint32_t align_c = pointer_alignment(c);
    cublasCheck(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &align_a, sizeof(align_a)));
    cublasCheck(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &align_b, sizeof(align_b)));
    cublasCheck(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &align_c, sizeof(align_c)));
    cublasCheck(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &align_d, sizeof(align_d)));

    MatmulTuneEntry key;
    memset(&key, 0, sizeof(key));
    key.m = m; key.n = n; key.k = k; key.trans_a = trans_a; key.trans_b = trans_b; key.d_is_f32 = d_is_f32;
    key.epilogue = (int)epilogue; key.has_bias = bias != NULL; key.accumulate = beta != 0.0f;
    key.align_a = align_a; key.align_b = align_b; key.align_c = c == d ? 0 : align_c; key.align_d = align_d;
    const MatmulTuneEntry *tuned = matmul_lt_candidate == 0 ? matmul_tune_find(&key) : NULL;
    int tune_now = 0;
    if (!tuned && matmul_tune && matmul_lt_candidate == 0 && matmul_tune_count < MATMUL_TUNE_MAX) {
        cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
        cudaCheck(cudaStreamIsCapturing(stream, &capture));
        tune_now = capture == cudaStreamCaptureStatusNone;
    }

    int ok = 1;
    const cublasLtMatmulAlgo_t *algo = NULL;
    cublasLtMatmulHeuristicResult_t heuristics[MATMUL_LT_MAX_CANDIDATES];
    if (tuned) {   // the heuristic already had its say for this shape
        matmul_lt_candidates = tuned->candidates;
        algo = matmul_tune_use ? &tuned->algo : NULL;
    }
    if (!algo) {
        int returned = 0, wanted = tune_now ? MATMUL_LT_MAX_CANDIDATES
                                 : matmul_lt_candidate < MATMUL_LT_MAX_CANDIDATES ? matmul_lt_candidate + 1 : MATMUL_LT_MAX_CANDIDATES;
        // no algorithm shows as a count of 0 or, for some epilogues, as NOT_SUPPORTED
        cublasStatus_t found = cublasLtMatmulAlgoGetHeuristic(matmul_lt_handle, op, layout_a, layout_b, layout_d, layout_d,
                                                              pref, wanted, heuristics, &returned);
        matmul_lt_candidates = found == CUBLAS_STATUS_SUCCESS ? returned : 0;
        if (found != CUBLAS_STATUS_NOT_SUPPORTED) cublasCheck(found);
        ok = found == CUBLAS_STATUS_SUCCESS && returned > 0;
        if (ok) {
            algo = &heuristics[matmul_lt_candidate < returned ? matmul_lt_candidate : returned - 1].algo;
            if (tune_now) {
                size_t d_bytes = (size_t)m * n * (d_is_f32 ? sizeof(float) : sizeof(floatX));
                size_t aux_bytes = gelu_pre ? (size_t)m * n * sizeof(floatX) : 0;
                const MatmulTuneEntry *e = matmul_tune_product(&key, op, layout_a, layout_b, layout_d, a, b, c, d, d_bytes,
                                                               gelu_pre, !gelu_backward, aux_bytes, beta, heuristics, returned,
                                                               stream);
                if (e && matmul_tune_use) algo = &e->algo;
            }
        }
    }
    if (ok) {
        matmul_lt_last_algo = *algo;
        float alpha = 1.0f;
        cublasCheck(cublasLtMatmul(matmul_lt_handle, op, &alpha, a, layout_a, b, layout_b, &beta, c, layout_d, d, layout_d,
                                   algo, matmul_workspace_for(stream), matmul_lt_workspace_size, stream));
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

// out (M, OC) bf16 = res (M, OC) bf16 + inp (M, IC) @ weight (OC, IC)^T + bias (OC; may be NULL),
// rounded once: a projection whose output is added to a bf16 residual stream, the add in the
// product's epilogue (out must not alias res). Returns 0, launching nothing, when cuBLASLt offers
// no algorithm for it: the caller then runs matmul_forward and adds separately.
static inline int matmul_forward_add(floatX *out, const floatX *res, const floatX *inp, const floatX *weight,
                                     const floatX *bias, int M, int IC, int OC, cudaStream_t stream) {
    cudaRequire(out != res, "matmul_forward_add: out aliases res");
    return matmul_cublaslt_try(out, 0, weight, inp, bias, NULL, 0, OC, M, IC, 1, 0, 1.0f, stream, res);
}

// Backward of matmul_forward given dout (M, OC) bf16:
//   dinp (M, IC)    = dout @ weight        written (not accumulated); fp32 when dinp_is_f32, else bf16
//   dweight (OC, IC) += dout^T @ inp       fp32, accumulated (written, = instead of +=, when
//                                          dweight_accumulate is 0)
//   dbias (OC)      += column sums of dbias_source (M, OC) fp32 when given, else of dout
// Any of dinp, dweight, dbias may be NULL. dbias_source lets the caller sum an fp32 copy of
// dout (the residual-stream gradient) instead of its bf16 rounding.
static inline void matmul_backward(void *dinp, int dinp_is_f32, float *dweight, float *dbias, const floatX *dout,
                                   const float *dbias_source, const floatX *inp, const floatX *weight, float *scratch,
                                   int M, int IC, int OC, cudaStream_t stream, int dweight_accumulate = 1) {
    if (dinp) matmul_cublaslt(dinp, dinp_is_f32, weight, dout, NULL, NULL, IC, M, OC, 0, 0, 0.0f, stream);
    if (dweight) matmul_cublaslt(dweight, 1, inp, dout, NULL, NULL, IC, OC, M, 0, 1, dweight_accumulate ? 1.0f : 0.0f, stream);
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
