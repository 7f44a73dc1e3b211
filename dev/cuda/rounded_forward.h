/*
 * A CPU forward that rounds to bf16 where the GPU rollout engine does: the oracle from which
 * rollout_check takes what bf16 itself moves a sequence's log-probs, so that a tolerance can say
 * "within what the engine's roundings explain" instead of a number picked by hand.
 *
 * Written from the models' math (not from the engine's code): one sequence, teacher-forced, row
 * after row with a key/value cache, plain loops with double sums. Where it rounds:
 *
 *   ROUNDED_NONE      nothing: fp32 parameters, fp32 activations (checked against model_forward).
 *   ROUNDED_ENGINE    the engine's unfolded rows (its prefill and default decode step): the
 *                     weights in bf16; the normed rows, q, k, v (after RoPE), the attention's
 *                     output, the MLP's hidden and activated rows and every projection's output
 *                     rounded to bf16; the residual stream in fp32; logits fp32.
 *   ROUNDED_FOLDED    as ROUNDED_ENGINE for the prompt's rows; the generated rows (from
 *                     prompt_len on) as the folded decode step (RolloutOptions.fold_norms) computes
 *                     them: the residual stream in bf16, each projection added to it before one
 *                     rounding; the pre-attention and pre-MLP norms' weights folded into the
 *                     products' weights (each product rounded to bf16) and the row's RMSNorm factor
 *                     applied to q, k, v and to the gate and up rows after the product.
 *                     Llama models without q/k/v biases only (as the engine's fold).
 *
 * The attention's probabilities stay fp32 in every mode, as in the engine's decode kernel.
 */
#ifndef DEV_CUDA_ROUNDED_FORWARD_H
#define DEV_CUDA_ROUNDED_FORWARD_H
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <vector>
extern "C" {
#include "model.h"
#include "utils.h"
}

enum RoundedMode { ROUNDED_NONE = 0, ROUNDED_ENGINE = 1, ROUNDED_FOLDED = 2 };

// x rounded to the nearest bf16 (ties to even), as a float; NaN stays NaN
static inline float rounded_bf16(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return x;
    u += 0x7fffu + ((u >> 16) & 1u);
    u &= 0xffff0000u;
    float y;
    memcpy(&y, &u, 4);
    return y;
}

struct RoundedForward {
    const ModelConfig *c;
    RoundedMode mode;
    std::vector<float> w;        // the parameters, rounded when mode != ROUNDED_NONE
    std::vector<float> folded;   // per layer: qkv (QKV, C) then fc (2F, C) with the norms' weights in
    size_t off[NUM_PARAM_TENSORS];
    size_t per_layer[NUM_PARAM_TENSORS];   // a stacked tensor's elements per layer (0: not stacked)
    bool has[NUM_PARAM_TENSORS];

    RoundedForward(const Model *m, RoundedMode md) : c(&m->config), mode(md), w(m->params, m->params + m->num_parameters) {
        if (mode != ROUNDED_NONE)
            for (float &v : w) v = rounded_bf16(v);
        for (int p = 0; p < NUM_PARAM_TENSORS; p++) {
            has[p] = m->param_ptrs[p] != NULL;
            off[p] = has[p] ? (size_t)(m->param_ptrs[p] - m->params) : 0;
            bool stacked = p != P_WTE && p != P_WPE && p != P_LNFW && p != P_LNFB && p != P_LMHEAD;
            per_layer[p] = stacked ? m->param_sizes[p] / m->config.n_layer : 0;
        }
        if (mode == ROUNDED_FOLDED) {
            if (c->arch != ARCH_LLAMA || has[P_QKVB]) fatal("rounded_forward: the folded rows need a Llama model without q/k/v biases");
            size_t C = c->n_embd, QKV = qkv(), FC = 2 * (size_t)c->ffn_hidden;
            folded.resize((size_t)c->n_layer * (QKV + FC) * C);
            for (int l = 0; l < c->n_layer; l++) {
                float *dst = folded.data() + (size_t)l * (QKV + FC) * C;
                fold(dst, param(P_QKVW, l), param(P_LN1W, l), QKV);
                fold(dst + QKV * C, param(P_FCW, l), param(P_LN2W, l), FC);
            }
        }
    }
    size_t qkv() const { return (size_t)(c->n_head + 2 * c->n_kv_head) * c->head_dim; }
    const float *param(int p, int l) const {
        if (!has[p]) return NULL;
        return w.data() + off[p] + per_layer[p] * l;
    }
    // dst (rows, C) = W (rows, C) scaled by the norm weight per column, rounded to bf16 (the
    // engine folds the bf16 weights and rounds each product once)
    void fold(float *dst, const float *W, const float *nw, size_t rows) const {
        size_t C = c->n_embd;
        for (size_t r = 0; r < rows; r++)
            for (size_t k = 0; k < C; k++) dst[r * C + k] = rounded_bf16(W[r * C + k] * nw[k]);
    }
    float round(float x) const { return mode == ROUNDED_NONE ? x : rounded_bf16(x); }
    void round_all(float *x, size_t n) const {
        for (size_t i = 0; i < n; i++) x[i] = round(x[i]);
    }
    // out (rows) = W (rows, K) x (K) + b, double sums
    static void product(float *out, const float *W, const float *x, const float *b, int rows, int K) {
        #pragma omp parallel for schedule(static)
        for (int r = 0; r < rows; r++) {
            double s = b ? b[r] : 0.0;
            const float *wr = W + (size_t)r * K;
            for (int k = 0; k < K; k++) s += (double)wr[k] * x[k];
            out[r] = (float)s;
        }
    }
    // the row's norm factor: RMSNorm's 1/rms, LayerNorm's 1/std (with its mean in *mean)
    float norm_factor(const float *x, float *mean) const {
        int C = c->n_embd;
        double mu = 0.0, s2 = 0.0;
        if (c->arch == ARCH_GPT2) {
            for (int i = 0; i < C; i++) mu += x[i];
            mu /= C;
        }
        for (int i = 0; i < C; i++) s2 += (x[i] - mu) * (x[i] - mu);
        *mean = (float)mu;
        return (float)(1.0 / sqrt(s2 / C + c->norm_eps));
    }
    void norm(float *out, const float *x, const float *nw, const float *nb) const {
        float mean, r = norm_factor(x, &mean);
        for (int i = 0; i < c->n_embd; i++) out[i] = round((x[i] - mean) * r * nw[i] + (nb ? nb[i] : 0.0f));
    }
    void rope(float *head, int pos) const {
        int HS = c->head_dim, half = HS / 2;
        for (int i = 0; i < half; i++) {
            double angle = (double)pos * pow((double)c->rope_theta, -2.0 * i / HS);
            double cs = cos(angle), sn = sin(angle), x1 = head[i], x2 = head[i + half];
            head[i] = (float)(x1 * cs - x2 * sn);
            head[i + half] = (float)(x2 * cs + x1 * sn);
        }
    }

    // -log p(targets[t] | inputs[0..t]) for t >= first; rows from prompt_len on are the generated
    // ones (ROUNDED_FOLDED). Returns the log-probs of positions first..T-1.
    std::vector<double> logprobs(const std::vector<int> &inputs, const std::vector<int> &targets, int first, int prompt_len) const {
        int T = (int)inputs.size(), C = c->n_embd, NH = c->n_head, NKV = c->n_kv_head, HS = c->head_dim;
        int L = c->n_layer, F = c->ffn_hidden, FC = c->arch == ARCH_LLAMA ? 2 * F : F, AH = NH * HS, KVD = NKV * HS;
        int QKV = (int)qkv(), Vp = c->padded_vocab_size, V = c->vocab_size;
        bool gpt2 = c->arch == ARCH_GPT2;
        std::vector<float> kc((size_t)L * T * KVD), vc((size_t)L * T * KVD);
        std::vector<float> x(C), xn(C), q(QKV), att(T), ay(AH), proj(C), fch(FC), act(F), logits(Vp);
        std::vector<double> out;
        for (int t = 0; t < T; t++) {
            bool fold_row = mode == ROUNDED_FOLDED && t >= prompt_len;
            const float *wte = param(P_WTE, 0), *wpe = param(P_WPE, 0);
            for (int i = 0; i < C; i++) x[i] = wte[(size_t)inputs[t] * C + i] + (wpe ? wpe[(size_t)t * C + i] : 0.0f);
            if (fold_row) round_all(x.data(), C);
            for (int l = 0; l < L; l++) {
                float mean = 0.0f, r = 1.0f;
                if (fold_row) {   // the product on the stream itself; the norm's factor after it
                    r = norm_factor(x.data(), &mean);
                    product(q.data(), folded.data() + (size_t)l * (QKV + 2 * F) * C, x.data(), NULL, QKV, C);
                    round_all(q.data(), QKV);
                    for (int i = 0; i < QKV; i++) q[i] *= r;
                    round_all(q.data() + AH + KVD, KVD);   // v as the cache holds it
                } else {
                    norm(xn.data(), x.data(), param(P_LN1W, l), param(P_LN1B, l));
                    product(q.data(), param(P_QKVW, l), xn.data(), param(P_QKVB, l), QKV, C);
                    round_all(q.data(), QKV);
                }
                if (!gpt2)
                    for (int h = 0; h < NH + NKV; h++) rope(q.data() + (size_t)h * HS, t);
                round_all(q.data(), AH + KVD);   // q and k after RoPE
                float *kl = kc.data() + (size_t)l * T * KVD, *vl = vc.data() + (size_t)l * T * KVD;
                memcpy(kl + (size_t)t * KVD, q.data() + AH, sizeof(float) * KVD);
                memcpy(vl + (size_t)t * KVD, q.data() + AH + KVD, sizeof(float) * KVD);
                for (int h = 0; h < NH; h++) {
                    int kvh = h / (NH / NKV);
                    double m = -INFINITY;
                    for (int s = 0; s <= t; s++) {
                        double d = 0.0;
                        for (int i = 0; i < HS; i++) d += (double)q[(size_t)h * HS + i] * kl[(size_t)s * KVD + kvh * HS + i];
                        att[s] = (float)(d / sqrt((double)HS));
                        m = fmax(m, att[s]);
                    }
                    double sum = 0.0;
                    for (int s = 0; s <= t; s++) { att[s] = (float)exp(att[s] - m); sum += att[s]; }
                    for (int i = 0; i < HS; i++) {
                        double o = 0.0;
                        for (int s = 0; s <= t; s++) o += (double)att[s] * vl[(size_t)s * KVD + kvh * HS + i];
                        ay[(size_t)h * HS + i] = round((float)(o / sum));
                    }
                }
                product(proj.data(), param(P_ATTPROJW, l), ay.data(), param(P_ATTPROJB, l), C, AH);
                if (fold_row) {
                    for (int i = 0; i < C; i++) x[i] = rounded_bf16(x[i] + proj[i]);
                    r = norm_factor(x.data(), &mean);
                    product(fch.data(), folded.data() + (size_t)l * (QKV + 2 * F) * C + (size_t)QKV * C, x.data(), NULL, FC, C);
                    round_all(fch.data(), FC);
                    for (int i = 0; i < FC; i++) fch[i] *= r;
                } else {
                    round_all(proj.data(), C);
                    for (int i = 0; i < C; i++) x[i] += proj[i];
                    norm(xn.data(), x.data(), param(P_LN2W, l), param(P_LN2B, l));
                    product(fch.data(), param(P_FCW, l), xn.data(), param(P_FCB, l), FC, C);
                    round_all(fch.data(), FC);
                }
                for (int i = 0; i < F; i++) {
                    if (gpt2) {
                        float u = fch[i];
                        act[i] = round(0.5f * u * (1.0f + tanhf(0.7978845608028654f * (u + 0.044715f * u * u * u))));
                    } else {
                        float g = fch[i], u = fch[F + i];
                        act[i] = round(g / (1.0f + expf(-g)) * u);
                    }
                }
                product(proj.data(), param(P_FCPROJW, l), act.data(), param(P_FCPROJB, l), C, F);
                if (fold_row) {
                    for (int i = 0; i < C; i++) x[i] = rounded_bf16(x[i] + proj[i]);
                } else {
                    round_all(proj.data(), C);
                    for (int i = 0; i < C; i++) x[i] += proj[i];
                }
            }
            if (t < first) continue;
            norm(xn.data(), x.data(), param(P_LNFW, 0), param(P_LNFB, 0));
            product(logits.data(), param(c->tied_embeddings ? P_WTE : P_LMHEAD, 0), xn.data(), NULL, Vp, C);
            double m = -INFINITY, sum = 0.0;
            for (int v = 0; v < V; v++) m = fmax(m, logits[v]);
            for (int v = 0; v < V; v++) sum += exp(logits[v] - m);
            out.push_back(logits[targets[t]] - m - log(sum));
        }
        return out;
    }
};
#endif
