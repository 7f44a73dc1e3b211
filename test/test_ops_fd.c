/*
 * Finite-difference check of every backward in llmc/ops_cpu.c (and matmul_backward), compiled
 * with -DREAL_IS_DOUBLE so the ops run in double precision.
 *
 * For an op y = f(x1, x2, ...) the scalar checked is L = sum_i r_i y_i with a fixed random r
 * (the classifier's own scalar is sum_n w_n loss_n). The analytic gradient is the op's backward
 * with dout = r; the reference is the central difference (L(x + h e_j) - L(x - h e_j)) / 2h for
 * every element j of every input and parameter. With h = 1e-5 in double, truncation and rounding
 * errors are ~1e-10 relative, so the test demands
 *     max_j |analytic_j - fd_j| / max_j |fd_j| < 1e-6
 * per tensor, and a gradient that is not identically zero (so a backward that writes nothing
 * fails). Gradient buffers are pre-filled with random values and the fill is subtracted after
 * the backward, which checks that backwards accumulate (+=) as ops_cpu.h promises.
 * A few forwards whose convention the FD check cannot see (RoPE's pairing, the classifier's
 * padded vocabulary, the causal mask) are also checked against direct formulas.
 *
 * Prints one line per op; exits 1 if any check fails.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "real.h"
#include "ops_cpu.h"
#include "matmul.h"
#include "rand.h"
#include "utils.h"

#ifndef REAL_IS_DOUBLE
#error "test_ops_fd.c must be compiled with -DREAL_IS_DOUBLE"
#endif

#define FD_STEP 1e-5
#define FD_TOLERANCE 1e-6

static uint64_t rng_state;
static int failures = 0;

static real *alloc_real(size_t n) { return (real *)callocCheck(n, sizeof(real)); }

static real *random_tensor(size_t n, double scale) {
    real *x = alloc_real(n);
    for (size_t i = 0; i < n; i++) x[i] = scale * random_normal(&rng_state);
    return x;
}

static real *copy_tensor(const real *x, size_t n) {
    real *y = alloc_real(n);
    memcpy(y, x, n * sizeof(real));
    return y;
}

// sum_i r_i y_i
static double dot(const real *r, const real *y, size_t n) {
    double s = 0.0;
    for (size_t i = 0; i < n; i++) s += (double)r[i] * y[i];
    return s;
}

// The scalar L of the op under test, as a function of its inputs' current values.
typedef double (*LossFn)(void);

// Compares analytic (n) with central differences of loss() in every element of x (n).
// Returns the relative error and records a failure.
static double check_tensor(const char *op, const char *name, real *x, const real *analytic, size_t n, LossFn loss) {
    double max_diff = 0.0, max_fd = 0.0;
    for (size_t j = 0; j < n; j++) {
        real saved = x[j];
        x[j] = saved + FD_STEP;
        double plus = loss();
        x[j] = saved - FD_STEP;
        double minus = loss();
        x[j] = saved;
        double fd = (plus - minus) / (2 * FD_STEP);
        double diff = fabs(fd - analytic[j]);
        if (!(diff <= max_diff)) max_diff = diff;   // also catches NaN
        if (fabs(fd) > max_fd) max_fd = fabs(fd);
    }
    double rel = max_fd > 0 ? max_diff / max_fd : INFINITY;
    if (!(rel < FD_TOLERANCE)) {
        failures++;
        printf("  FAIL %s: d%s relative error %.3e (max |fd| %.3e)\n", op, name, rel, max_fd);
    }
    return rel;
}

// A gradient buffer pre-filled with random values (to check that backwards accumulate).
typedef struct { real *grad; real *fill; size_t n; } GradBuffer;

static GradBuffer grad_buffer(size_t n) {
    GradBuffer g = {.grad = random_tensor(n, 1.0), .n = n};
    g.fill = copy_tensor(g.grad, n);
    return g;
}
// Removes the fill, leaving what the backward added.
static real *grad_added(GradBuffer *g) {
    for (size_t i = 0; i < g->n; i++) g->grad[i] -= g->fill[i];
    return g->grad;
}
static void grad_free(GradBuffer *g) { free(g->grad); free(g->fill); }

static void report(const char *op, const char *names, const double *errs, int count) {
    double worst = 0.0;
    for (int i = 0; i < count; i++) if (!(errs[i] <= worst)) worst = errs[i];
    printf("%-34s %-28s max relative error %.2e  %s\n", op, names, worst, worst < FD_TOLERANCE ? "ok" : "FAIL");
}

static void check_forward(const char *op, const char *what, double err, double tol) {
    int ok = err < tol;
    if (!ok) failures++;
    printf("%-34s %-28s max abs error      %.2e  %s\n", op, what, err, ok ? "ok" : "FAIL");
}

// ---------------------------------------------------------------------------------------------
// matmul with bias: out (M, OC) = inp (M, IC) @ weight (OC, IC)^T + bias

static struct { int M, IC, OC; real *inp, *weight, *bias, *out, *r; } mm;
static double matmul_loss(void) {
    matmul_forward(mm.out, mm.inp, mm.weight, mm.bias, mm.M, mm.IC, mm.OC);
    return dot(mm.r, mm.out, (size_t)mm.M * mm.OC);
}
static void test_matmul(int M, int IC, int OC) {
    mm.M = M; mm.IC = IC; mm.OC = OC;
    mm.inp = random_tensor((size_t)M * IC, 1.0);
    mm.weight = random_tensor((size_t)OC * IC, 1.0);
    mm.bias = random_tensor(OC, 1.0);
    mm.out = alloc_real((size_t)M * OC);
    mm.r = random_tensor((size_t)M * OC, 1.0);
    GradBuffer dinp = grad_buffer((size_t)M * IC), dw = grad_buffer((size_t)OC * IC), db = grad_buffer(OC);
    matmul_backward(dinp.grad, dw.grad, db.grad, mm.r, mm.inp, mm.weight, M, IC, OC);
    double errs[3] = {
        check_tensor("matmul", "inp", mm.inp, grad_added(&dinp), dinp.n, matmul_loss),
        check_tensor("matmul", "weight", mm.weight, grad_added(&dw), dw.n, matmul_loss),
        check_tensor("matmul", "bias", mm.bias, grad_added(&db), db.n, matmul_loss),
    };
    char op[64];
    snprintf(op, sizeof op, "matmul+bias M%d IC%d OC%d", M, IC, OC);
    report(op, "inp weight bias", errs, 3);
    grad_free(&dinp); grad_free(&dw); grad_free(&db);
    free(mm.inp); free(mm.weight); free(mm.bias); free(mm.out); free(mm.r);
}

// ---------------------------------------------------------------------------------------------
// encoder

static struct { int B, T, C; int *inp; real *wte, *wpe, *out, *r; } enc;
static double encoder_loss(void) {
    encoder_forward(enc.out, enc.inp, enc.wte, enc.wpe, enc.B, enc.T, enc.C);
    return dot(enc.r, enc.out, (size_t)enc.B * enc.T * enc.C);
}
static void test_encoder(void) {
    int B = 2, T = 5, C = 7, Vp = 6, maxT = 8;
    enc.B = B; enc.T = T; enc.C = C;
    enc.inp = (int *)mallocCheck((size_t)B * T * sizeof(int));
    // token 3 appears several times so its gradient is a sum; token 5 never appears
    int tokens[10] = {3, 0, 3, 1, 2, 4, 3, 3, 0, 1};
    memcpy(enc.inp, tokens, sizeof tokens);
    enc.wte = random_tensor((size_t)Vp * C, 1.0);
    enc.wpe = random_tensor((size_t)maxT * C, 1.0);
    enc.out = alloc_real((size_t)B * T * C);
    enc.r = random_tensor((size_t)B * T * C, 1.0);
    GradBuffer dwte = grad_buffer((size_t)Vp * C), dwpe = grad_buffer((size_t)maxT * C);
    encoder_backward(dwte.grad, dwpe.grad, enc.r, enc.inp, B, T, C);
    double errs[2] = {
        check_tensor("encoder", "wte", enc.wte, grad_added(&dwte), dwte.n, encoder_loss),
        check_tensor("encoder", "wpe", enc.wpe, grad_added(&dwpe), dwpe.n, encoder_loss),
    };
    report("encoder (wte + wpe)", "wte wpe", errs, 2);
    // without positions (Llama)
    GradBuffer dwte2 = grad_buffer((size_t)Vp * C);
    real *wpe = enc.wpe;
    enc.wpe = NULL;
    encoder_backward(dwte2.grad, NULL, enc.r, enc.inp, B, T, C);
    double err = check_tensor("encoder (no wpe)", "wte", enc.wte, grad_added(&dwte2), dwte2.n, encoder_loss);
    report("encoder (wte only)", "wte", &err, 1);
    enc.wpe = wpe;
    grad_free(&dwte); grad_free(&dwpe); grad_free(&dwte2);
    free(enc.inp); free(enc.wte); free(enc.wpe); free(enc.out); free(enc.r);
}

// ---------------------------------------------------------------------------------------------
// layernorm

static struct { int N, C; real eps; real *inp, *weight, *bias, *out, *mean, *rstd, *r; } ln;
static double layernorm_loss(void) {
    layernorm_forward(ln.out, ln.mean, ln.rstd, ln.inp, ln.weight, ln.bias, ln.N, ln.C, ln.eps);
    return dot(ln.r, ln.out, (size_t)ln.N * ln.C);
}
static void test_layernorm(void) {
    // C > COLUMN_BLOCK so the weight gradient spans two column blocks
    int N = 6, C = 70;
    ln.N = N; ln.C = C; ln.eps = 1e-5;
    ln.inp = random_tensor((size_t)N * C, 1.0);
    for (size_t i = 0; i < (size_t)N * C; i++) ln.inp[i] += 0.5;   // non-zero mean
    ln.weight = random_tensor(C, 1.0);
    ln.bias = random_tensor(C, 1.0);
    ln.out = alloc_real((size_t)N * C);
    ln.mean = alloc_real(N);
    ln.rstd = alloc_real(N);
    ln.r = random_tensor((size_t)N * C, 1.0);
    layernorm_loss();
    // forward against the direct formula
    double ferr = 0.0;
    for (int n = 0; n < N; n++) {
        double m = 0, v = 0;
        for (int c = 0; c < C; c++) m += ln.inp[n * C + c];
        m /= C;
        for (int c = 0; c < C; c++) v += (ln.inp[n * C + c] - m) * (ln.inp[n * C + c] - m);
        v /= C;
        for (int c = 0; c < C; c++) {
            double want = (ln.inp[n * C + c] - m) / sqrt(v + 1e-5) * ln.weight[c] + ln.bias[c];
            ferr = fmax(ferr, fabs(want - ln.out[n * C + c]));
        }
    }
    check_forward("layernorm forward", "vs direct formula", ferr, 1e-12);
    GradBuffer dinp = grad_buffer((size_t)N * C), dw = grad_buffer(C), db = grad_buffer(C);
    layernorm_backward(dinp.grad, dw.grad, db.grad, ln.r, ln.inp, ln.weight, ln.mean, ln.rstd, N, C);
    double errs[3] = {
        check_tensor("layernorm", "inp", ln.inp, grad_added(&dinp), dinp.n, layernorm_loss),
        check_tensor("layernorm", "weight", ln.weight, grad_added(&dw), dw.n, layernorm_loss),
        check_tensor("layernorm", "bias", ln.bias, grad_added(&db), db.n, layernorm_loss),
    };
    report("layernorm", "inp weight bias", errs, 3);
    grad_free(&dinp); grad_free(&dw); grad_free(&db);
    free(ln.inp); free(ln.weight); free(ln.bias); free(ln.out); free(ln.mean); free(ln.rstd); free(ln.r);
}

// ---------------------------------------------------------------------------------------------
// rmsnorm

static struct { int N, C; real eps; real *inp, *weight, *out, *rstd, *r; } rms;
static double rmsnorm_loss(void) {
    rmsnorm_forward(rms.out, rms.rstd, rms.inp, rms.weight, rms.N, rms.C, rms.eps);
    return dot(rms.r, rms.out, (size_t)rms.N * rms.C);
}
static void test_rmsnorm(void) {
    int N = 6, C = 70;
    rms.N = N; rms.C = C; rms.eps = 1e-5;
    rms.inp = random_tensor((size_t)N * C, 1.0);
    rms.weight = random_tensor(C, 1.0);
    rms.out = alloc_real((size_t)N * C);
    rms.rstd = alloc_real(N);
    rms.r = random_tensor((size_t)N * C, 1.0);
    rmsnorm_loss();
    double ferr = 0.0;
    for (int n = 0; n < N; n++) {
        double ms = 0;
        for (int c = 0; c < C; c++) ms += rms.inp[n * C + c] * rms.inp[n * C + c];
        ms /= C;
        for (int c = 0; c < C; c++)
            ferr = fmax(ferr, fabs(rms.inp[n * C + c] / sqrt(ms + 1e-5) * rms.weight[c] - rms.out[n * C + c]));
    }
    check_forward("rmsnorm forward", "vs direct formula", ferr, 1e-12);
    GradBuffer dinp = grad_buffer((size_t)N * C), dw = grad_buffer(C);
    rmsnorm_backward(dinp.grad, dw.grad, rms.r, rms.inp, rms.weight, rms.rstd, N, C);
    double errs[2] = {
        check_tensor("rmsnorm", "inp", rms.inp, grad_added(&dinp), dinp.n, rmsnorm_loss),
        check_tensor("rmsnorm", "weight", rms.weight, grad_added(&dw), dw.n, rmsnorm_loss),
    };
    report("rmsnorm", "inp weight", errs, 2);
    grad_free(&dinp); grad_free(&dw);
    free(rms.inp); free(rms.weight); free(rms.out); free(rms.rstd); free(rms.r);
}

// ---------------------------------------------------------------------------------------------
// residual

static struct { size_t n; real *a, *b, *out, *r; } res;
static double residual_loss(void) {
    residual_forward(res.out, res.a, res.b, res.n);
    return dot(res.r, res.out, res.n);
}
static void test_residual(void) {
    size_t n = 37;
    res.n = n;
    res.a = random_tensor(n, 1.0);
    res.b = random_tensor(n, 1.0);
    res.out = alloc_real(n);
    res.r = random_tensor(n, 1.0);
    GradBuffer da = grad_buffer(n), db = grad_buffer(n);
    residual_backward(da.grad, db.grad, res.r, n);
    double errs[2] = {
        check_tensor("residual", "a", res.a, grad_added(&da), n, residual_loss),
        check_tensor("residual", "b", res.b, grad_added(&db), n, residual_loss),
    };
    report("residual", "a b", errs, 2);
    grad_free(&da); grad_free(&db);
    free(res.a); free(res.b); free(res.out); free(res.r);
}

// ---------------------------------------------------------------------------------------------
// RoPE (in place on q and k of qkv)

static struct { int B, T, NH, NKV, HS; real theta; real *qkv, *work, *r; size_t n; } rp;
static double rope_loss(void) {
    memcpy(rp.work, rp.qkv, rp.n * sizeof(real));
    rope_forward(rp.work, rp.B, rp.T, rp.NH, rp.NKV, rp.HS, rp.theta);
    return dot(rp.r, rp.work, rp.n);
}
static void test_rope(void) {
    int B = 2, T = 6, NH = 4, NKV = 2, HS = 8, QKV = (NH + 2 * NKV) * HS;
    rp.B = B; rp.T = T; rp.NH = NH; rp.NKV = NKV; rp.HS = HS; rp.theta = 10000.0;
    rp.n = (size_t)B * T * QKV;
    rp.qkv = random_tensor(rp.n, 1.0);
    rp.work = alloc_real(rp.n);
    rp.r = random_tensor(rp.n, 1.0);
    rope_loss();
    // forward in Hugging Face's words: x * cos(emb) + rotate_half(x) * sin(emb),
    // emb = [angles, angles], rotate_half(x) = [-x2, x1]; v unchanged
    double ferr = 0.0;
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++)
            for (int h = 0; h < NH + 2 * NKV; h++)
                for (int d = 0; d < HS; d++) {
                    const real *x = rp.qkv + ((size_t)(b * T + t) * QKV + h * HS);
                    double want = x[d];
                    if (h < NH + NKV) {
                        int i = d % (HS / 2);
                        double angle = t / pow(10000.0, (2.0 * i) / HS);
                        double rotated = d < HS / 2 ? -x[d + HS / 2] : x[d - HS / 2];
                        want = x[d] * cos(angle) + rotated * sin(angle);
                    }
                    ferr = fmax(ferr, fabs(want - rp.work[(size_t)(b * T + t) * QKV + h * HS + d]));
                }
    check_forward("rope forward", "vs rotate_half formula", ferr, 1e-12);
    // the backward transforms in place: start from r, the gradient at the output
    real *grad = copy_tensor(rp.r, rp.n);
    rope_backward(grad, B, T, NH, NKV, HS, rp.theta);
    double err = check_tensor("rope", "qkv", rp.qkv, grad, rp.n, rope_loss);
    report("rope (NH4 NKV2 HS8)", "qkv", &err, 1);
    free(grad); free(rp.qkv); free(rp.work); free(rp.r);
}

// ---------------------------------------------------------------------------------------------
// attention

static struct { int B, T, NH, NKV, HS; real *qkv, *out, *att, *r; } at;
static double attention_loss(void) {
    attention_forward(at.out, at.att, at.qkv, at.B, at.T, at.NH, at.NKV, at.HS);
    return dot(at.r, at.out, (size_t)at.B * at.T * at.NH * at.HS);
}
static void test_attention(int B, int T, int NH, int NKV, int HS) {
    at.B = B; at.T = T; at.NH = NH; at.NKV = NKV; at.HS = HS;
    int QKV = (NH + 2 * NKV) * HS;
    size_t n_qkv = (size_t)B * T * QKV, n_out = (size_t)B * T * NH * HS, n_att = (size_t)B * NH * T * T;
    at.qkv = random_tensor(n_qkv, 1.0);
    at.out = alloc_real(n_out);
    at.att = alloc_real(n_att);
    at.r = random_tensor(n_out, 1.0);
    attention_loss();
    // forward against a direct softmax(q k^T / sqrt(HS)) v with the causal mask and kv head h/(NH/NKV)
    double ferr = 0.0;
    for (int b = 0; b < B; b++)
        for (int h = 0; h < NH; h++)
            for (int t = 0; t < T; t++) {
                int kvh = h / (NH / NKV);
                double scores[64], mx = -INFINITY, sum = 0;
                for (int t2 = 0; t2 <= t; t2++) {
                    double s = 0;
                    for (int i = 0; i < HS; i++)
                        s += at.qkv[(size_t)(b * T + t) * QKV + h * HS + i] * at.qkv[(size_t)(b * T + t2) * QKV + (NH + kvh) * HS + i];
                    scores[t2] = s / sqrt(HS);
                    mx = fmax(mx, scores[t2]);
                }
                for (int t2 = 0; t2 <= t; t2++) { scores[t2] = exp(scores[t2] - mx); sum += scores[t2]; }
                for (int i = 0; i < HS; i++) {
                    double y = 0;
                    for (int t2 = 0; t2 <= t; t2++)
                        y += scores[t2] / sum * at.qkv[(size_t)(b * T + t2) * QKV + (NH + NKV + kvh) * HS + i];
                    ferr = fmax(ferr, fabs(y - at.out[(size_t)(b * T + t) * NH * HS + h * HS + i]));
                }
            }
    char op[64];
    snprintf(op, sizeof op, "attention B%d T%d NH%d NKV%d HS%d", B, T, NH, NKV, HS);
    check_forward(op, "forward vs direct formula", ferr, 1e-12);
    GradBuffer dqkv = grad_buffer(n_qkv);
    real *datt = alloc_real(n_att);
    attention_backward(dqkv.grad, datt, at.r, at.qkv, at.att, B, T, NH, NKV, HS);
    double err = check_tensor(op, "qkv", at.qkv, grad_added(&dqkv), n_qkv, attention_loss);
    report(op, "qkv", &err, 1);
    grad_free(&dqkv);
    free(datt); free(at.qkv); free(at.out); free(at.att); free(at.r);
}

// ---------------------------------------------------------------------------------------------
// GELU

static struct { size_t n; real *inp, *out, *r; } gl;
static double gelu_loss(void) {
    gelu_forward(gl.out, gl.inp, gl.n);
    return dot(gl.r, gl.out, gl.n);
}
static void test_gelu(void) {
    size_t n = 64;
    gl.n = n;
    gl.inp = random_tensor(n, 3.0);   // wide spread: both tails and the curved middle
    gl.out = alloc_real(n);
    gl.r = random_tensor(n, 1.0);
    gelu_loss();
    double ferr = 0.0;
    for (size_t i = 0; i < n; i++) {
        double x = gl.inp[i];
        double want = 0.5 * x * (1 + tanh(sqrt(2 / M_PI) * (x + 0.044715 * x * x * x)));
        ferr = fmax(ferr, fabs(want - gl.out[i]));
    }
    check_forward("gelu forward", "vs tanh formula", ferr, 1e-12);
    GradBuffer dinp = grad_buffer(n);
    gelu_backward(dinp.grad, gl.inp, gl.r, n);
    double err = check_tensor("gelu", "inp", gl.inp, grad_added(&dinp), n, gelu_loss);
    report("gelu", "inp", &err, 1);
    grad_free(&dinp);
    free(gl.inp); free(gl.out); free(gl.r);
}

// ---------------------------------------------------------------------------------------------
// SwiGLU

static struct { int N, F; real *fc, *out, *r; } sw;
static double swiglu_loss(void) {
    swiglu_forward(sw.out, sw.fc, sw.N, sw.F);
    return dot(sw.r, sw.out, (size_t)sw.N * sw.F);
}
static void test_swiglu(void) {
    int N = 5, F = 9;
    sw.N = N; sw.F = F;
    sw.fc = random_tensor((size_t)N * 2 * F, 2.0);
    sw.out = alloc_real((size_t)N * F);
    sw.r = random_tensor((size_t)N * F, 1.0);
    swiglu_loss();
    double ferr = 0.0;
    for (int n = 0; n < N; n++)
        for (int j = 0; j < F; j++) {
            double g = sw.fc[n * 2 * F + j], u = sw.fc[n * 2 * F + F + j];
            ferr = fmax(ferr, fabs(g / (1 + exp(-g)) * u - sw.out[n * F + j]));
        }
    check_forward("swiglu forward", "vs silu(gate) * up", ferr, 1e-12);
    GradBuffer dfc = grad_buffer((size_t)N * 2 * F);
    swiglu_backward(dfc.grad, sw.r, sw.fc, N, F);
    double err = check_tensor("swiglu", "fc", sw.fc, grad_added(&dfc), dfc.n, swiglu_loss);
    report("swiglu", "fc (gate | up)", &err, 1);
    grad_free(&dfc);
    free(sw.fc); free(sw.out); free(sw.r);
}

// ---------------------------------------------------------------------------------------------
// classifier

static struct { int N, V, Vp; int *targets; real *logits, *mask, *weights, *losses, *lse; } cl;
static double classifier_loss(void) {
    classifier_forward(cl.losses, cl.lse, cl.logits, cl.targets, cl.mask, cl.N, cl.V, cl.Vp);
    return dot(cl.weights, cl.losses, cl.N);
}
static void test_classifier(void) {
    int N = 6, V = 10, Vp = 13;
    cl.N = N; cl.V = V; cl.Vp = Vp;
    cl.logits = random_tensor((size_t)N * Vp, 2.0);
    for (int n = 0; n < N; n++) cl.logits[n * Vp + V] = 50.0;   // a large padded logit must not count
    int targets[6] = {0, 9, 3, 3, 7, 1};
    real mask[6] = {1, 1, 0, 1, 1, 0};
    cl.targets = targets;
    cl.mask = mask;
    cl.weights = alloc_real(N);
    for (int n = 0; n < N; n++) cl.weights[n] = mask[n] * (0.5 + random_f32(&rng_state));
    cl.losses = alloc_real(N);
    cl.lse = alloc_real(N);
    classifier_loss();
    double ferr = 0.0;
    for (int n = 0; n < N; n++) {
        double sum = 0;
        for (int v = 0; v < V; v++) sum += exp(cl.logits[n * Vp + v]);
        double want = mask[n] ? -log(exp(cl.logits[n * Vp + targets[n]]) / sum) : 0.0;
        ferr = fmax(ferr, fabs(want - cl.losses[n]));
    }
    check_forward("classifier forward", "-log p over V, masked", ferr, 1e-12);
    GradBuffer dlogits = grad_buffer((size_t)N * Vp);
    classifier_backward(dlogits.grad, cl.logits, cl.lse, cl.targets, cl.weights, N, V, Vp);
    real *analytic = grad_added(&dlogits);
    double padded = 0.0;
    for (int n = 0; n < N; n++)
        for (int v = V; v < Vp; v++) padded = fmax(padded, fabs(analytic[n * Vp + v]));
    check_forward("classifier backward", "padded columns get 0", padded, 1e-300);
    double err = check_tensor("classifier", "logits", cl.logits, analytic, dlogits.n, classifier_loss);
    report("classifier (mask, V10 Vp13)", "logits", &err, 1);
    grad_free(&dlogits);
    free(cl.logits); free(cl.weights); free(cl.losses); free(cl.lse);
}

int main(void) {
    rng_state = rng_seed(1234);
    printf("finite-difference check of the CPU ops in double (h = %.0e, tolerance %.0e)\n", FD_STEP, FD_TOLERANCE);
    test_matmul(7, 13, 11);
    test_matmul(33, 20, 40);   // more than one micro-tile in both directions
    test_encoder();
    test_layernorm();
    test_rmsnorm();
    test_residual();
    test_rope();
    test_attention(2, 5, 4, 2, 6);   // grouped-query
    test_attention(2, 5, 3, 3, 4);   // multi-head (NH == NKV)
    test_attention(1, 6, 4, 1, 4);   // multi-query
    test_gelu();
    test_swiglu();
    test_classifier();
    if (failures) {
        printf("%d check(s) FAILED\n", failures);
        return 1;
    }
    printf("all checks passed\n");
    return 0;
}
