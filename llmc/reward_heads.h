/*
 * The three reward heads (helpful, harmless, truthful) that sit on the frozen reference trunk.
 *
 * Each head reads the final hidden state h (C) of the trunk (model->hidden after model_forward,
 * the input of the classifier) at the last token of prompt + response and returns one scalar:
 *
 *   linear  r = w . h + b                                  w (C), b (1)          (the default)
 *   mlp     r = w2 . act(W1 h + b1) + b2                   W1 (H, C), b1 (H), w2 (H), b2 (1)
 *           act = GELU (tanh approximation, as GPT-2) or ReLU
 *
 * One trunk forward pass therefore gives all three rewards, and a batch of responses is scored
 * in one pass: sequences are right-padded and each one's reward is read at its own last
 * position (causal attention keeps the padding out of every earlier position).
 *
 * Parameters: one float buffer, head d (d = DIM_HELPFUL, DIM_HARMLESS, DIM_TRUTHFUL from
 * rewrite.h) at offset d * P, where P = C + 1 (linear) or H*C + 2*H + 1 (mlp), laid out in the
 * order given above (w then b; W1 row-major, b1, w2, b2). grads, m, v share the layout.
 *
 * Training is Bradley-Terry on preference pairs of one dimension each:
 *   loss = -log sigmoid(r_chosen - r_rejected) = softplus(-(r_chosen - r_rejected)).
 * Head arithmetic accumulates in double: the heads are tiny next to the trunk, and it lets the
 * finite-difference check (test/tools/reward_check.c) run on this very code.
 *
 * File (DIR/reward_heads.bin, written atomically), little-endian:
 *   char[8] "MORARWHD", int32 version (2), int32 kind (0 linear, 1 mlp), int32 activation
 *   (0 gelu, 1 relu), int32 C, int32 H (0 for linear), int32 num_dims (3),
 *   the trunk the heads were trained on: int32 arch (0 gpt2, 1 llama, -1 not recorded),
 *   int32 n_layer, int32 vocab_size, int32 0, uint64 fingerprint (0: not recorded),
 *   then float32 params[num_dims * P].
 * Version 1 files (no trunk fields, params right after num_dims) are read too; their trunk is
 * not recorded.
 *
 * The trunk's fingerprint ties the heads to the weights whose hidden states they read: heads on
 * another trunk of the same width would load and score, but garbage. Over the trunk's fp32
 * parameters p_0 .. p_{N-1} (the model's buffer order, as in a native checkpoint), with
 * bits(p) the float's 32 bits and all arithmetic mod 2^64:
 *   s = sum_i bits(p_i) * (0x9E3779B97F4A7C15 * (2i + 1))
 *   fingerprint = mix64(s ^ N), mix64 = splitmix64's finaliser; 1 where that gives 0.
 * Each multiplier is odd, so any change of one parameter changes s; the sum is order-free, so
 * threads may add it up in any order.
 */
#ifndef LLMC_REWARD_HEADS_H
#define LLMC_REWARD_HEADS_H
#include <stddef.h>
#include <stdint.h>
#include "model.h"
#include "rewrite.h"

#define REWARD_HEADS_MAGIC "MORARWHD"
#define REWARD_HEADS_VERSION 2

typedef enum { REWARD_HEAD_LINEAR = 0, REWARD_HEAD_MLP = 1 } RewardHeadKind;
typedef enum { REWARD_ACT_GELU = 0, REWARD_ACT_RELU = 1 } RewardHeadActivation;

// The trunk a set of heads was trained on (arch -1 and fingerprint 0: not recorded).
typedef struct {
    int arch, n_layer, vocab_size;
    uint64_t fingerprint;
} RewardTrunk;

typedef struct {
    RewardHeadKind kind;
    RewardHeadActivation activation;  // mlp only
    int C;                            // trunk hidden size
    int H;                            // mlp hidden width (0 for linear)
    size_t head_size;                 // P: parameters of one head
    size_t num_parameters;            // MORA_NUM_DIMS * P
    float *params;
    float *grads;
    float *m, *v;                     // AdamW moments, allocated on the first update
    int opt_step;
    RewardTrunk trunk;                // written to and read from the file; set by reward_trunk_of
} RewardHeads;

// "linear"/"mlp" and "gelu"/"relu" <-> the enums; the parsers return -1 for an unknown name.
int reward_head_kind_from_name(const char *name);
int reward_head_activation_from_name(const char *name);
const char *reward_head_kind_name(RewardHeadKind kind);
const char *reward_head_activation_name(RewardHeadActivation act);

// Allocates zeroed params and grads for three heads of the given kind. H is ignored for linear.
void reward_heads_init(RewardHeads *heads, RewardHeadKind kind, RewardHeadActivation act, int C, int H);
// Initial weights. linear: all zero (Bradley-Terry is convex in a linear head, and zero gives
// every pair reward 0). mlp: W1 ~ N(0, 1/C), w2 ~ N(0, 1/H), biases 0, so that the hidden
// units start in the active range for unit-scale hidden states.
void reward_heads_init_random(RewardHeads *heads, uint64_t seed);
void reward_heads_free(RewardHeads *heads);
// Pointer to head d's parameters (P floats).
float *reward_head_params(const RewardHeads *heads, int dim);

// The reward of head `dim` for one hidden state h (C), computed in double.
double reward_head_value(const RewardHeads *heads, int dim, const float *h);
// rewards (N, MORA_NUM_DIMS) = every head on every row of hidden (N, C).
void reward_heads_forward(const RewardHeads *heads, const float *hidden, int N, float *rewards);
// Backward of sum_n drewards[n] * r_{dims[n]}(hidden[n]) for hidden (N, C), dims (N), drewards (N):
// accumulates (+=) into heads->grads and, when dhidden (N, C) is not NULL, into dhidden (the
// gradient that model_backward_weighted takes when the trunk is trained through the heads).
// Deterministic: every gradient element is summed over rows in row order by one thread.
void reward_heads_backward(RewardHeads *heads, const float *hidden, const int *dims,
                           const float *drewards, int N, float *dhidden);
// Folds the affine map r -> scale * r + shift into head `dim`'s last layer, so that the head's
// reward on every input becomes scale times the old reward plus shift: linear w *= scale,
// b = scale * b + shift; mlp w2 *= scale, b2 = scale * b2 + shift (W1, b1 unchanged). Computed in
// double, stored in float. The other heads, and the AdamW moments, are left as they are. A
// positive scale keeps every ranking of responses (the calibration of `train_mora reward`).
void reward_heads_affine(RewardHeads *heads, int dim, double scale, double shift);
void reward_heads_zero_grad(RewardHeads *heads);
// AdamW (bias-corrected) on the heads; weight decay on w and W1, w2 only (not the biases).
void reward_heads_adamw_update(RewardHeads *heads, float lr, float beta1, float beta2, float eps,
                               float weight_decay);

// Bradley-Terry over N pairs: returns the mean of -log sigmoid(r_chosen - r_rejected), computed
// stably; dchosen / drejected (N, may be NULL) get the gradient of that mean:
//   d/dr_chosen = -sigmoid(-(r_chosen - r_rejected)) / N,  d/dr_rejected = -d/dr_chosen.
double bradley_terry_loss(const double *r_chosen, const double *r_rejected, int N,
                          double *dchosen, double *drejected);

// hidden_last (B, C) = hidden (B, T, C) at position lengths[b] - 1 of each row b.
void reward_gather_last(float *hidden_last, const float *hidden, const int *lengths, int B, int T, int C);
// Scores B right-padded sequences in one trunk forward pass: inputs (B, T) token ids (padding
// may be any valid id), lengths (B) in 1..T; rewards (B, MORA_NUM_DIMS). hidden_last (B, C) may
// be NULL; otherwise it gets the hidden states the heads read.
void reward_heads_score(const RewardHeads *heads, Model *model, const int *inputs, const int *lengths,
                        int B, int T, float *rewards, float *hidden_last);

// The fingerprint defined above of any float buffer (the trunk's parameters, or the heads').
uint64_t params_fingerprint(const float *params, size_t n);
// The trunk record of model (its fingerprint as defined above).
RewardTrunk reward_trunk_of(const Model *model);
// Stops when heads were trained on a trunk other than model (a different fingerprint), naming
// the heads file, model_desc (how the model was given) and the two trunks; heads whose trunk is
// not recorded (version 1 files) pass with a warning.
void reward_heads_check_trunk(const RewardHeads *heads, const char *heads_path, const Model *model,
                              const char *model_desc);

// Writes the heads file (format above) atomically.
void reward_heads_save(const RewardHeads *heads, const char *path);
// Loads a heads file; a wrong magic/version/kind, a truncated or oversized file, or a hidden
// size different from expected_C (the model's n_embd; pass 0 to accept any) exits with an
// error naming the file and the field.
void reward_heads_load(RewardHeads *heads, const char *path, int expected_C);

// `train_mora reward ...` (reward.c): trains the heads with Bradley-Terry on preference JSONL.
int cmd_reward(int argc, char **argv);

#endif
