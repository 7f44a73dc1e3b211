/*
 * The CPU reference ops (see ops_cpu.h for the contract and the shapes).
 *
 * Reads top to bottom like llm.c's train_gpt2.c: each op's forward, then its backward. Sums
 * that run over a whole row of C channels, a row of V logits or T positions are accumulated in
 * double, which costs little here and keeps the float engine close to the float64 oracle.
 *
 * Parallelism: forwards split over rows. Backwards that write per-row gradients split over
 * rows; gradients of weights shared by all rows (norm weights, embeddings, keys and values) are
 * computed in a second loop split over the columns (or the key positions) of the weight, each
 * thread summing over the rows in order. No two threads ever write one element, and the
 * summation order does not depend on the thread count.
 */
#include <math.h>
#include <string.h>
#include "ops_cpu.h"
#include "utils.h"

// Math functions at the precision of `real` (float in the engine, double in the FD test).
#ifdef REAL_IS_DOUBLE
#define real_exp exp
#define real_tanh tanh
#define real_sqrt sqrt
#else
#define real_exp expf
#define real_tanh tanhf
#define real_sqrt sqrtf
#endif

// Width of the column blocks that the weight-gradient loops hand to one thread: wide enough to
// stream a row segment, narrow enough for the accumulators to stay in registers / L1.
#define COLUMN_BLOCK 64

// ---------------------------------------------------------------------------------------------
// encoder

// out (B, T, C) = wte[inp[b, t]] + wpe[t]   (wpe may be NULL: Llama has no learned positions)
void encoder_forward(real *out, const int *inp, const real *wte, const real *wpe, int B, int T, int C) {
    #pragma omp parallel for collapse(2)
    for (int b = 0; b < B; b++) {
        for (int t = 0; t < T; t++) {
            real *out_bt = out + ((size_t)b * T + t) * C;
            const real *wte_row = wte + (size_t)inp[b * T + t] * C;
            if (wpe) {
                const real *wpe_row = wpe + (size_t)t * C;
                for (int c = 0; c < C; c++) out_bt[c] = wte_row[c] + wpe_row[c];
            } else {
                memcpy(out_bt, wte_row, (size_t)C * sizeof(real));
            }
        }
    }
}

// dwte[inp[b, t]] += dout[b, t]; dwpe[t] += sum_b dout[b, t].
// Several positions may hold the same token, so dwte is split over column blocks: each thread
// owns columns [c0, c0 + COLUMN_BLOCK) of every row and visits the positions in order.
void encoder_backward(real *dwte, real *dwpe, const real *dout, const int *inp, int B, int T, int C) {
    if (dwte) {
        #pragma omp parallel for schedule(static)
        for (int c0 = 0; c0 < C; c0 += COLUMN_BLOCK) {
            int c1 = c0 + COLUMN_BLOCK < C ? c0 + COLUMN_BLOCK : C;
            for (int bt = 0; bt < B * T; bt++) {
                real *dwte_row = dwte + (size_t)inp[bt] * C;
                const real *dout_bt = dout + (size_t)bt * C;
                for (int c = c0; c < c1; c++) dwte_row[c] += dout_bt[c];
            }
        }
    }
    if (dwpe) {
        #pragma omp parallel for schedule(static)
        for (int t = 0; t < T; t++) {
            real *dwpe_row = dwpe + (size_t)t * C;
            for (int b = 0; b < B; b++) {
                const real *dout_bt = dout + ((size_t)b * T + t) * C;
                for (int c = 0; c < C; c++) dwpe_row[c] += dout_bt[c];
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// layernorm

// out (N, C) = (inp - mean) * rstd * weight + bias; mean (N), rstd (N) saved.
void layernorm_forward(real *out, real *mean, real *rstd, const real *inp, const real *weight,
                       const real *bias, int N, int C, real eps) {
    #pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const real *x = inp + (size_t)n * C;
        double sum = 0.0;
        for (int c = 0; c < C; c++) sum += x[c];
        double m = sum / C;
        // variance from the centred values (two passes), not E[x^2] - m^2, which cancels badly
        double sq = 0.0;
        for (int c = 0; c < C; c++) { double d = x[c] - m; sq += d * d; }
        double s = 1.0 / sqrt(sq / C + (double)eps);
        real *y = out + (size_t)n * C;
        for (int c = 0; c < C; c++) y[c] = (real)((x[c] - m) * s) * weight[c] + bias[c];
        mean[n] = (real)m;
        rstd[n] = (real)s;
    }
}

// With norm = (inp - mean) * rstd and dnorm = dout * weight:
//   dinp    += rstd * (dnorm - mean_c(dnorm) - norm * mean_c(dnorm * norm))
//   dweight += sum_n dout * norm,   dbias += sum_n dout
void layernorm_backward(real *dinp, real *dweight, real *dbias, const real *dout, const real *inp,
                        const real *weight, const real *mean, const real *rstd, int N, int C) {
    if (dinp) {
        #pragma omp parallel for schedule(static)
        for (int n = 0; n < N; n++) {
            const real *x = inp + (size_t)n * C, *g = dout + (size_t)n * C;
            double m = mean[n], s = rstd[n];
            double dnorm_mean = 0.0, dnorm_norm_mean = 0.0;
            for (int c = 0; c < C; c++) {
                double norm = (x[c] - m) * s, dnorm = (double)weight[c] * g[c];
                dnorm_mean += dnorm;
                dnorm_norm_mean += dnorm * norm;
            }
            dnorm_mean /= C;
            dnorm_norm_mean /= C;
            real *dx = dinp + (size_t)n * C;
            for (int c = 0; c < C; c++) {
                double norm = (x[c] - m) * s, dnorm = (double)weight[c] * g[c];
                dx[c] += (real)(s * (dnorm - dnorm_mean - norm * dnorm_norm_mean));
            }
        }
    }
    if (dweight || dbias) {
        #pragma omp parallel for schedule(static)
        for (int c0 = 0; c0 < C; c0 += COLUMN_BLOCK) {
            int c1 = c0 + COLUMN_BLOCK < C ? c0 + COLUMN_BLOCK : C;
            double dw[COLUMN_BLOCK] = {0}, db[COLUMN_BLOCK] = {0};
            for (int n = 0; n < N; n++) {
                const real *x = inp + (size_t)n * C, *g = dout + (size_t)n * C;
                double m = mean[n], s = rstd[n];
                for (int c = c0; c < c1; c++) {
                    dw[c - c0] += g[c] * ((x[c] - m) * s);
                    db[c - c0] += g[c];
                }
            }
            for (int c = c0; c < c1; c++) {
                if (dweight) dweight[c] += (real)dw[c - c0];
                if (dbias) dbias[c] += (real)db[c - c0];
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// rmsnorm

// out (N, C) = inp * rstd * weight, rstd = 1 / sqrt(mean(inp^2) + eps); rstd (N) saved.
void rmsnorm_forward(real *out, real *rstd, const real *inp, const real *weight, int N, int C, real eps) {
    #pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const real *x = inp + (size_t)n * C;
        double sq = 0.0;
        for (int c = 0; c < C; c++) sq += (double)x[c] * x[c];
        double s = 1.0 / sqrt(sq / C + (double)eps);
        real *y = out + (size_t)n * C;
        for (int c = 0; c < C; c++) y[c] = (real)(x[c] * s) * weight[c];
        rstd[n] = (real)s;
    }
}

// With dnorm = dout * weight (the gradient at inp * rstd), since d rstd / d inp_j = -rstd^3 inp_j / C:
//   dinp    += rstd * (dnorm - inp * rstd^2 * mean_c(dnorm * inp))
//   dweight += sum_n dout * inp * rstd
void rmsnorm_backward(real *dinp, real *dweight, const real *dout, const real *inp, const real *weight,
                      const real *rstd, int N, int C) {
    if (dinp) {
        #pragma omp parallel for schedule(static)
        for (int n = 0; n < N; n++) {
            const real *x = inp + (size_t)n * C, *g = dout + (size_t)n * C;
            double s = rstd[n];
            double dot = 0.0;
            for (int c = 0; c < C; c++) dot += (double)weight[c] * g[c] * x[c];
            double k = s * s * dot / C;
            real *dx = dinp + (size_t)n * C;
            for (int c = 0; c < C; c++) dx[c] += (real)(s * ((double)weight[c] * g[c] - x[c] * k));
        }
    }
    if (dweight) {
        #pragma omp parallel for schedule(static)
        for (int c0 = 0; c0 < C; c0 += COLUMN_BLOCK) {
            int c1 = c0 + COLUMN_BLOCK < C ? c0 + COLUMN_BLOCK : C;
            double dw[COLUMN_BLOCK] = {0};
            for (int n = 0; n < N; n++) {
                const real *x = inp + (size_t)n * C, *g = dout + (size_t)n * C;
                double s = rstd[n];
                for (int c = c0; c < c1; c++) dw[c - c0] += g[c] * (x[c] * s);
            }
            for (int c = c0; c < c1; c++) dweight[c] += (real)dw[c - c0];
        }
    }
}

// ---------------------------------------------------------------------------------------------
// residual

// out (n) = a + b
void residual_forward(real *out, const real *a, const real *b, size_t n) {
    #pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) out[i] = a[i] + b[i];
}

// da (n) += dout, db (n) += dout
void residual_backward(real *da, real *db, const real *dout, size_t n) {
    #pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) {
        if (da) da[i] += dout[i];
        if (db) db[i] += dout[i];
    }
}

// ---------------------------------------------------------------------------------------------
// RoPE

// cos_sin (T, HS/2, 2): cos and sin of t * theta^(-2i/HS), computed in double as the float64
// oracle does (float angles lose digits at large t).
static real *rope_table(int T, int HS, real theta) {
    int half = HS / 2;
    real *cos_sin = (real *)mallocCheck((size_t)T * half * 2 * sizeof(real));
    #pragma omp parallel for schedule(static)
    for (int t = 0; t < T; t++) {
        for (int i = 0; i < half; i++) {
            double inv_freq = pow((double)theta, -2.0 * i / HS);
            double angle = (double)t * inv_freq;
            cos_sin[((size_t)t * half + i) * 2] = (real)cos(angle);
            cos_sin[((size_t)t * half + i) * 2 + 1] = (real)sin(angle);
        }
    }
    return cos_sin;
}

// Rotates the first NH + NKV head vectors of each row of qkv (B, T, QKV) by +angle (forward)
// or -angle (backward, sign = -1). q's and k's heads are contiguous at the start of the row.
static void rope_rotate(real *qkv, int B, int T, int NH, int NKV, int HS, real theta, real sign) {
    int half = HS / 2, QKV = (NH + 2 * NKV) * HS;
    real *cos_sin = rope_table(T, HS, theta);
    #pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < B; b++) {
        for (int t = 0; t < T; t++) {
            real *row = qkv + ((size_t)b * T + t) * QKV;
            const real *cs = cos_sin + (size_t)t * half * 2;
            for (int h = 0; h < NH + NKV; h++) {
                real *x = row + (size_t)h * HS;
                for (int i = 0; i < half; i++) {
                    real c = cs[2 * i], s = sign * cs[2 * i + 1];
                    real x1 = x[i], x2 = x[i + half];
                    x[i] = x1 * c - x2 * s;
                    x[i + half] = x2 * c + x1 * s;
                }
            }
        }
    }
    free(cos_sin);
}

void rope_forward(real *qkv, int B, int T, int NH, int NKV, int HS, real theta) {
    rope_rotate(qkv, B, T, NH, NKV, HS, theta, (real)1);
}

// The rotation R is orthogonal: the gradient at the unrotated vector is R^T dout = R(-angle) dout.
void rope_backward(real *dqkv, int B, int T, int NH, int NKV, int HS, real theta) {
    rope_rotate(dqkv, B, T, NH, NKV, HS, theta, (real)-1);
}

// ---------------------------------------------------------------------------------------------
// attention

// For each (b, t, h): scores s[t2] = q[b,t,h] . k[b,t2,kvh] / sqrt(HS) for t2 <= t,
// att[b,h,t,:] = softmax(s) (zero for t2 > t), out[b,t,h] = sum_t2 att[t2] * v[b,t2,kvh].
void attention_forward(real *out, real *att, const real *qkv, int B, int T, int NH, int NKV, int HS) {
    int QKV = (NH + 2 * NKV) * HS, group = NH / NKV;
    real scale = (real)(1.0 / sqrt((double)HS));
    #pragma omp parallel for collapse(3) schedule(static)
    for (int b = 0; b < B; b++) {
        for (int t = 0; t < T; t++) {
            for (int h = 0; h < NH; h++) {
                int kvh = h / group;
                const real *q = qkv + ((size_t)b * T + t) * QKV + (size_t)h * HS;
                real *att_row = att + (((size_t)b * NH + h) * T + t) * T;
                real max_score = -INFINITY;
                for (int t2 = 0; t2 <= t; t2++) {
                    const real *k = qkv + ((size_t)b * T + t2) * QKV + (size_t)(NH + kvh) * HS;
                    real dot = 0;
                    for (int i = 0; i < HS; i++) dot += q[i] * k[i];
                    dot *= scale;
                    att_row[t2] = dot;
                    if (dot > max_score) max_score = dot;
                }
                // subtract the max so exp never overflows; the largest term is exp(0) = 1
                double sum = 0.0;
                for (int t2 = 0; t2 <= t; t2++) {
                    real e = real_exp(att_row[t2] - max_score);
                    att_row[t2] = e;
                    sum += e;
                }
                real inv_sum = (real)(1.0 / sum);
                for (int t2 = 0; t2 <= t; t2++) att_row[t2] *= inv_sum;
                for (int t2 = t + 1; t2 < T; t2++) att_row[t2] = 0;

                real *out_bth = out + ((size_t)b * T + t) * NH * HS + (size_t)h * HS;
                for (int i = 0; i < HS; i++) out_bth[i] = 0;
                for (int t2 = 0; t2 <= t; t2++) {
                    const real *v = qkv + ((size_t)b * T + t2) * QKV + (size_t)(NH + NKV + kvh) * HS;
                    real a = att_row[t2];
                    for (int i = 0; i < HS; i++) out_bth[i] += a * v[i];
                }
            }
        }
    }
}

// Two passes so that no two threads write one element:
//   1. over (b, h, t), the query rows: datt[t2] = dout . v[t2] -> through the softmax,
//      dpre[t2] = att[t2] * (datt[t2] - sum_t3 att[t3] datt[t3]) (stored in datt),
//      dq += scale * sum_t2 dpre[t2] k[t2].
//   2. over (b, kvh, t2), the key/value rows: sum over the query heads of the group and the
//      query positions t >= t2 of dk += scale * dpre[t, t2] q[t], dv += att[t, t2] dout[t].
void attention_backward(real *dqkv, real *datt, const real *dout, const real *qkv, const real *att,
                        int B, int T, int NH, int NKV, int HS) {
    int QKV = (NH + 2 * NKV) * HS, group = NH / NKV;
    real scale = (real)(1.0 / sqrt((double)HS));
    #pragma omp parallel for collapse(3) schedule(static)
    for (int b = 0; b < B; b++) {
        for (int h = 0; h < NH; h++) {
            for (int t = 0; t < T; t++) {
                int kvh = h / group;
                const real *att_row = att + (((size_t)b * NH + h) * T + t) * T;
                real *datt_row = datt + (((size_t)b * NH + h) * T + t) * T;
                const real *g = dout + ((size_t)b * T + t) * NH * HS + (size_t)h * HS;
                double weighted = 0.0;
                for (int t2 = 0; t2 <= t; t2++) {
                    const real *v = qkv + ((size_t)b * T + t2) * QKV + (size_t)(NH + NKV + kvh) * HS;
                    real dot = 0;
                    for (int i = 0; i < HS; i++) dot += g[i] * v[i];
                    datt_row[t2] = dot;
                    weighted += (double)att_row[t2] * dot;
                }
                real *dq = dqkv + ((size_t)b * T + t) * QKV + (size_t)h * HS;
                for (int t2 = 0; t2 <= t; t2++) {
                    real dpre = att_row[t2] * (datt_row[t2] - (real)weighted);
                    datt_row[t2] = dpre;
                    const real *k = qkv + ((size_t)b * T + t2) * QKV + (size_t)(NH + kvh) * HS;
                    for (int i = 0; i < HS; i++) dq[i] += scale * dpre * k[i];
                }
                for (int t2 = t + 1; t2 < T; t2++) datt_row[t2] = 0;
            }
        }
    }
    #pragma omp parallel for collapse(3) schedule(static)
    for (int b = 0; b < B; b++) {
        for (int kvh = 0; kvh < NKV; kvh++) {
            for (int t2 = 0; t2 < T; t2++) {
                real *dk = dqkv + ((size_t)b * T + t2) * QKV + (size_t)(NH + kvh) * HS;
                real *dv = dqkv + ((size_t)b * T + t2) * QKV + (size_t)(NH + NKV + kvh) * HS;
                for (int h = kvh * group; h < (kvh + 1) * group; h++) {
                    for (int t = t2; t < T; t++) {
                        size_t idx = (((size_t)b * NH + h) * T + t) * T + t2;
                        real dpre = datt[idx] * scale, a = att[idx];
                        const real *q = qkv + ((size_t)b * T + t) * QKV + (size_t)h * HS;
                        const real *g = dout + ((size_t)b * T + t) * NH * HS + (size_t)h * HS;
                        for (int i = 0; i < HS; i++) {
                            dk[i] += dpre * q[i];
                            dv[i] += a * g[i];
                        }
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// GELU (tanh approximation)

#define GELU_SCALE 0.7978845608028654   // sqrt(2 / pi)

// out (n) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
void gelu_forward(real *out, const real *inp, size_t n) {
    #pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) {
        real x = inp[i];
        real cube = (real)0.044715 * x * x * x;
        out[i] = (real)0.5 * x * (1 + real_tanh((real)GELU_SCALE * (x + cube)));
    }
}

// gelu'(x) = 0.5 (1 + tanh(u)) + 0.5 x (1 - tanh(u)^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2),
// u = sqrt(2/pi) (x + 0.044715 x^3). 1 - tanh^2 is used for sech^2 (cosh overflows for large u).
void gelu_backward(real *dinp, const real *inp, const real *dout, size_t n) {
    #pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) {
        real x = inp[i];
        real u = (real)GELU_SCALE * (x + (real)0.044715 * x * x * x);
        real th = real_tanh(u);
        real local_grad = (real)0.5 * (1 + th) +
                          (real)0.5 * x * (1 - th * th) * (real)GELU_SCALE * (1 + (real)(3 * 0.044715) * x * x);
        dinp[i] += local_grad * dout[i];
    }
}

// ---------------------------------------------------------------------------------------------
// SwiGLU

// out (N, F) = silu(gate) * up; fc (N, 2F) = gate | up
void swiglu_forward(real *out, const real *fc, int N, int F) {
    #pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const real *gate = fc + (size_t)n * 2 * F, *up = gate + F;
        real *y = out + (size_t)n * F;
        for (int j = 0; j < F; j++) {
            real sig = 1 / (1 + real_exp(-gate[j]));
            y[j] = gate[j] * sig * up[j];
        }
    }
}

// dgate += dout * up * silu'(gate), silu'(g) = sig(g) (1 + g (1 - sig(g))); dup += dout * silu(gate)
void swiglu_backward(real *dfc, const real *dout, const real *fc, int N, int F) {
    #pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const real *gate = fc + (size_t)n * 2 * F, *up = gate + F;
        const real *g = dout + (size_t)n * F;
        real *dgate = dfc + (size_t)n * 2 * F, *dup = dgate + F;
        for (int j = 0; j < F; j++) {
            real sig = 1 / (1 + real_exp(-gate[j]));
            dgate[j] += g[j] * up[j] * sig * (1 + gate[j] * (1 - sig));
            dup[j] += g[j] * gate[j] * sig;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// classifier (softmax cross-entropy over the first V of Vp logits)

// lse[n] = log sum_{v<V} exp(logits[n, v]) (max subtracted first); losses[n] = lse - logits[target]
void classifier_forward(real *losses, real *lse, const real *logits, const int *targets,
                        const real *mask, int N, int V, int Vp) {
    #pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const real *row = logits + (size_t)n * Vp;
        real max_logit = -INFINITY;
        for (int v = 0; v < V; v++) if (row[v] > max_logit) max_logit = row[v];
        double sum = 0.0;
        for (int v = 0; v < V; v++) sum += real_exp(row[v] - max_logit);
        double row_lse = (double)max_logit + log(sum);
        lse[n] = (real)row_lse;
        if (targets) {
            int active = mask == NULL || mask[n] != 0;
            losses[n] = active ? (real)(row_lse - row[targets[n]]) : 0;
        }
    }
}

// dlogits[n, v] += w[n] * (exp(logits[n, v] - lse[n]) - [v == target[n]]) for v < V
void classifier_backward(real *dlogits, const real *logits, const real *lse, const int *targets,
                         const real *weights, int N, int V, int Vp) {
    #pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        real w = weights[n];
        if (w == 0) continue;
        const real *row = logits + (size_t)n * Vp;
        real *drow = dlogits + (size_t)n * Vp;
        real row_lse = lse[n];
        for (int v = 0; v < V; v++) drow[v] += w * real_exp(row[v] - row_lse);
        drow[targets[n]] -= w;
    }
}
