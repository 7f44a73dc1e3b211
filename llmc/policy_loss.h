/*
 * The policy losses of MORA's update step (DESIGN.md, "The MORA loop", step 5), written as
 * per-token weights for model_backward_weighted.
 *
 * The model's per-token loss is token_loss_bt = -log pi(target_bt), so the gradient of any loss
 * that depends on the policy only through its token log-probs logp_bt reaches the parameters as
 *
 *     d loss / d theta = sum_bt w_bt * d token_loss_bt / d theta,   w_bt = -d loss / d logp_bt,
 *
 * and model_backward_weighted(model, w, NULL) computes exactly that. Every function below
 * returns the loss and fills w.
 *
 * Shapes: B sequences (a batch of P prompts with G responses each is B = P*G, group-major:
 * sequence b belongs to group b / G), T positions. Position (b, t) holds the log-prob of the
 * token at t+1 given the tokens up to t; mask (B, T) is 1 on the positions whose target is a
 * response token (prompt and padding positions are 0).
 *
 * GRPO with the PPO clip and the k3 KL estimator, for the response tokens t of sequence b:
 *
 *     ratio  = exp(logp_new - logp_old)                 (logp_old: the sampling policy's)
 *     k3     = exp(logp_ref - logp_new) - (logp_ref - logp_new) - 1     (>= 0, 0 at equality)
 *     obj_bt = min(ratio * A_b, clip(ratio, 1 - eps, 1 + eps) * A_b) - beta * k3
 *     loss   = -(1/B) sum_b (1/n_b) sum_t obj_bt        n_b = response tokens of sequence b
 *
 * i.e. a mean over a sequence's tokens, then a mean over the sequences (GRPO's averaging: every
 * response counts the same whatever its length).
 *
 * DPO on pairs (chosen c, rejected r) with sequence log-probs (sums over the response tokens):
 *
 *     u    = beta * ((pi_c - ref_c) - (pi_r - ref_r))
 *     loss = (1/N) sum_pairs -log sigmoid(u)
 */
#ifndef LLMC_POLICY_LOSS_H
#define LLMC_POLICY_LOSS_H

// Group-relative advantages: rewards (n_groups, G) -> adv (n_groups, G) with
// adv = (r - mean_g) / (std_g + eps), std the population standard deviation of the group.
// A group whose rewards are all equal gets advantages 0 (no signal, no update).
void group_advantages(const float *rewards, int n_groups, int G, float eps, float *adv);

typedef struct {
    double loss;          // the loss above
    double kl;            // k3 averaged like the loss (mean over a sequence's tokens, then sequences)
    double clip_frac;     // share of response tokens whose policy term is clipped (zero gradient)
    double ratio_mean;    // mean ratio over response tokens
    int n_tokens;         // response tokens
} PPOStats;

// The GRPO/PPO loss above. logp_new, logp_old, logp_ref, mask (B, T); adv (B).
// token_weights (B, T) gets w_bt = -d loss / d logp_new_bt (0 where the mask is 0).
// A sequence with no response token contributes nothing (and does not count in B's mean).
void ppo_loss(const float *logp_new, const float *logp_old, const float *logp_ref, const float *mask,
              const float *adv, int B, int T, float clip_eps, float kl_beta,
              float *token_weights, PPOStats *stats);

typedef struct {
    double loss;          // mean DPO loss
    double accuracy;      // share of pairs with u > 0
    double margin;        // mean u / beta (the implicit reward margin)
} DPOStats;

// The DPO loss above over N pairs. pi_c, pi_r: the policy's sequence log-probs; ref_c, ref_r:
// the reference's. dpi_c, dpi_r (N) get d loss / d pi_c and d loss / d pi_r; every response token
// of the chosen sequence then has token weight -dpi_c (and -dpi_r for the rejected one).
void dpo_loss(const double *pi_c, const double *ref_c, const double *pi_r, const double *ref_r,
              int N, float beta, double *dpi_c, double *dpi_r, DPOStats *stats);

// Sequence log-probs: seq_logp (B) = sum_t mask * logp (logp, mask (B, T)).
void sequence_logprobs(const float *logp, const float *mask, int B, int T, double *seq_logp);

#endif
