/*
 * The CPU reference ops of the model: forward and backward of every layer except the linear
 * layers (those are matmul_forward / matmul_backward in matmul.h).
 *
 * Written over `real` (real.h): float in the engine, double in test/test_ops_fd.c, which checks
 * every backward here against central finite differences.
 *
 * Conventions:
 *   - Shapes: B batch, T time, C channels, N = B*T rows, NH query heads, NKV key/value heads,
 *     HS head dim, QKV = (NH + 2*NKV) * HS, F MLP hidden width, V vocab, Vp padded vocab.
 *   - Every tensor is row-major with the last dimension contiguous.
 *   - Every backward ACCUMULATES (+=) into the gradients it writes, as matmul_backward does, so
 *     a tensor read by several ops (a tied embedding, the residual stream) gets the sum of its
 *     gradients. The caller zeroes gradient buffers before a pass. A gradient pointer may be
 *     NULL where the caller does not need it (noted per op). rope_backward is the one exception:
 *     it transforms its buffer in place (see there).
 *   - Every backward is race-free under OpenMP: each output element is written by one thread,
 *     and reductions over rows run in a fixed order, so results do not depend on the number of
 *     threads.
 */
#ifndef LLMC_OPS_CPU_H
#define LLMC_OPS_CPU_H
#include <stddef.h>
#include "real.h"

// ---------------------------------------------------------------------------------------------
// encoder: out (B, T, C) = wte[inp[b, t]] (+ wpe[t] when wpe is not NULL)
// inp (B, T) token ids (the caller has checked them), wte (Vp, C), wpe (maxT, C) or NULL.
void encoder_forward(real *out, const int *inp, const real *wte, const real *wpe, int B, int T, int C);
// dwte (Vp, C) += scatter of dout (B, T, C) by token; dwpe (maxT, C) += sum over b of dout[b, t].
// dwte or dwpe may be NULL.
void encoder_backward(real *dwte, real *dwpe, const real *dout, const int *inp, int B, int T, int C);

// ---------------------------------------------------------------------------------------------
// layernorm over the last axis of inp (N, C):
//   out = (inp - mean) * rstd * weight + bias, rstd = 1 / sqrt(var + eps), var biased.
// Saves mean (N) and rstd (N) for the backward.
void layernorm_forward(real *out, real *mean, real *rstd, const real *inp, const real *weight,
                       const real *bias, int N, int C, real eps);
// dinp (N, C), dweight (C), dbias (C) += gradients given dout (N, C). Any of the three may be NULL.
void layernorm_backward(real *dinp, real *dweight, real *dbias, const real *dout, const real *inp,
                        const real *weight, const real *mean, const real *rstd, int N, int C);

// ---------------------------------------------------------------------------------------------
// rmsnorm over the last axis of inp (N, C): out = inp * rstd * weight, rstd = 1 / sqrt(mean(inp^2) + eps).
// Saves rstd (N).
void rmsnorm_forward(real *out, real *rstd, const real *inp, const real *weight, int N, int C, real eps);
// dinp (N, C), dweight (C) += gradients given dout (N, C). Either may be NULL.
void rmsnorm_backward(real *dinp, real *dweight, const real *dout, const real *inp, const real *weight,
                      const real *rstd, int N, int C);

// ---------------------------------------------------------------------------------------------
// residual: out (n) = a + b (out may alias a or b)
void residual_forward(real *out, const real *a, const real *b, size_t n);
// da (n) += dout, db (n) += dout
void residual_backward(real *da, real *db, const real *dout, size_t n);

// ---------------------------------------------------------------------------------------------
// RoPE, rotate-half convention (Hugging Face Llama), in place on the q and k parts of
// qkv (B, T, QKV) whose rows are q (NH*HS) | k (NKV*HS) | v (NKV*HS); v is untouched.
// For every head vector x (HS) at position t and i < HS/2, with angle = t * theta^(-2i/HS):
//   x'[i]        = x[i] * cos(angle) - x[i + HS/2] * sin(angle)
//   x'[i + HS/2] = x[i + HS/2] * cos(angle) + x[i] * sin(angle)
void rope_forward(real *qkv, int B, int T, int NH, int NKV, int HS, real theta);
// Backward, in place: dqkv (B, T, QKV) holds the gradient with respect to the rotated q and k
// on entry and the gradient with respect to the unrotated ones on return (the rotation is
// orthogonal, so its backward is the rotation by -angle). The v part is untouched.
void rope_backward(real *dqkv, int B, int T, int NH, int NKV, int HS, real theta);

// ---------------------------------------------------------------------------------------------
// causal self-attention with grouped-query heads.
// qkv (B, T, QKV) as above (q and k already rotated for Llama). Query head h reads key/value
// head h / (NH / NKV). Scores scaled by 1/sqrt(HS), softmax over positions t2 <= t.
// out (B, T, NH*HS): head h's output in columns [h*HS, (h+1)*HS).
// att (B, NH, T, T): the probabilities, zero above the diagonal (saved for the backward).
void attention_forward(real *out, real *att, const real *qkv, int B, int T, int NH, int NKV, int HS);
// dqkv (B, T, QKV) += gradient given dout (B, T, NH*HS). datt (B, NH, T, T) is scratch
// (overwritten) that holds the gradient at the pre-softmax scores.
void attention_backward(real *dqkv, real *datt, const real *dout, const real *qkv, const real *att,
                        int B, int T, int NH, int NKV, int HS);

// ---------------------------------------------------------------------------------------------
// GELU, tanh approximation (GPT-2): out = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), n elements
void gelu_forward(real *out, const real *inp, size_t n);
// dinp (n) += gelu'(inp) * dout
void gelu_backward(real *dinp, const real *inp, const real *dout, size_t n);

// ---------------------------------------------------------------------------------------------
// SwiGLU: fc (N, 2F) holds gate in columns [0, F) and up in columns [F, 2F);
//   out (N, F) = silu(gate) * up, silu(g) = g * sigmoid(g)
void swiglu_forward(real *out, const real *fc, int N, int F);
// dfc (N, 2F) += gradient given dout (N, F)
void swiglu_backward(real *dfc, const real *dout, const real *fc, int N, int F);

// ---------------------------------------------------------------------------------------------
// classifier: softmax over the first V of the Vp logits of each row; the padded columns
// V..Vp-1 get no probability.
//   lse (N)    = log sum_{v < V} exp(logits[v])  (for every row; the backward uses it)
//   losses (N) = lse - logits[target] = -log p(target) where mask != 0, else 0
// logits (N, Vp); targets (N) in [0, V) where mask != 0 (the caller checked them); targets may
// be NULL (then only lse is written and losses may be NULL); mask (N) may be NULL (every row).
void classifier_forward(real *losses, real *lse, const real *logits, const int *targets,
                        const real *mask, int N, int V, int Vp);
// Backward of sum_n weights[n] * losses[n]:
//   dlogits[n, v] += weights[n] * (p[n, v] - [v == targets[n]]) for v < V; padded columns get 0.
// Rows with weight 0 are skipped (the caller sets the weight 0 where the mask is 0).
void classifier_backward(real *dlogits, const real *logits, const real *lse, const int *targets,
                         const real *weights, int N, int V, int Vp);

#endif
