/*
 * GRPO/PPO and DPO losses as per-token weights (see policy_loss.h for the formulas). The sums
 * run in double: the losses are averages of many small terms, and the oracle test compares
 * them in float64.
 */
#include <math.h>
#include <stddef.h>
#include "policy_loss.h"

void group_advantages(const float *rewards, int n_groups, int G, float eps, float *adv) {
    for (int g = 0; g < n_groups; g++) {
        const float *r = rewards + (size_t)g * G;
        double mean = 0.0, var = 0.0;
        for (int i = 0; i < G; i++) mean += r[i];
        mean /= G;
        for (int i = 0; i < G; i++) var += (r[i] - mean) * (r[i] - mean);
        double std = sqrt(var / G);
        for (int i = 0; i < G; i++)
            adv[(size_t)g * G + i] = std > 0.0 ? (float)((r[i] - mean) / (std + eps)) : 0.0f;
    }
}

void ppo_loss(const float *logp_new, const float *logp_old, const float *logp_ref, const float *mask,
              const float *adv, int B, int T, float clip_eps, float kl_beta,
              float *token_weights, PPOStats *stats) {
    // sequences with at least one response token: the outer mean runs over these
    int n_seqs = 0;
    for (int b = 0; b < B; b++) {
        int any = 0;
        for (int t = 0; t < T && !any; t++) any = mask[(size_t)b * T + t] != 0.0f;
        n_seqs += any;
    }
    double loss = 0.0, kl = 0.0, ratio_sum = 0.0;
    int clipped = 0, n_tokens = 0;
    for (int b = 0; b < B; b++) {
        const float *m = mask + (size_t)b * T;
        float *w = token_weights + (size_t)b * T;
        int n_b = 0;
        for (int t = 0; t < T; t++) n_b += m[t] != 0.0f;
        if (n_b == 0) {
            for (int t = 0; t < T; t++) w[t] = 0.0f;
            continue;
        }
        double A = adv[b];
        // every token of this sequence carries 1/(n_seqs * n_b) of the loss
        double scale = 1.0 / ((double)n_seqs * n_b);
        for (int t = 0; t < T; t++) {
            size_t i = (size_t)b * T + t;
            if (m[t] == 0.0f) { w[t] = 0.0f; continue; }
            double lnew = logp_new[i], lold = logp_old[i], lref = logp_ref[i];
            double ratio = exp(lnew - lold);
            double clipped_ratio = fmin(fmax(ratio, 1.0 - clip_eps), 1.0 + clip_eps);
            double unclipped_term = ratio * A, clipped_term = clipped_ratio * A;
            // min picks the pessimistic term; the clipped one is constant in logp_new, so when it
            // is strictly smaller the policy term passes no gradient
            int is_clipped = clipped_term < unclipped_term;
            double policy_term = is_clipped ? clipped_term : unclipped_term;
            double dpolicy = is_clipped ? 0.0 : unclipped_term;     // d policy_term / d logp_new
            double diff = lref - lnew;
            double k3 = exp(diff) - diff - 1.0;
            double dk3 = 1.0 - exp(diff);                           // d k3 / d logp_new
            double objective = policy_term - kl_beta * k3;
            double dobjective = dpolicy - kl_beta * dk3;
            loss -= scale * objective;
            kl += scale * k3;
            // loss = -sum scale * objective, so w = -d loss / d logp_new = scale * d objective / d logp_new
            w[t] = (float)(scale * dobjective);
            ratio_sum += ratio;
            clipped += is_clipped;
            n_tokens++;
        }
    }
    if (stats) {
        stats->loss = loss;
        stats->kl = kl;
        stats->clip_frac = n_tokens ? (double)clipped / n_tokens : 0.0;
        stats->ratio_mean = n_tokens ? ratio_sum / n_tokens : 1.0;
        stats->n_tokens = n_tokens;
    }
}

// log sigmoid(u), stably
static double log_sigmoid(double u) {
    return u >= 0.0 ? -log1p(exp(-u)) : u - log1p(exp(u));
}

void dpo_loss(const double *pi_c, const double *ref_c, const double *pi_r, const double *ref_r,
              int N, float beta, double *dpi_c, double *dpi_r, DPOStats *stats) {
    double loss = 0.0, margin = 0.0;
    int correct = 0;
    for (int i = 0; i < N; i++) {
        double delta = (pi_c[i] - ref_c[i]) - (pi_r[i] - ref_r[i]);
        double u = beta * delta;
        loss -= log_sigmoid(u) / N;
        // d(-log sigmoid(u))/du = -sigmoid(-u)
        double sig_neg = exp(log_sigmoid(-u));
        if (dpi_c) dpi_c[i] = -beta * sig_neg / N;
        if (dpi_r) dpi_r[i] = beta * sig_neg / N;
        margin += delta / N;
        correct += u > 0.0;
    }
    if (stats) {
        stats->loss = loss;
        stats->accuracy = N ? (double)correct / N : 0.0;
        stats->margin = margin;
    }
}

void sequence_logprobs(const float *logp, const float *mask, int B, int T, double *seq_logp) {
    for (int b = 0; b < B; b++) {
        double s = 0.0;
        for (int t = 0; t < T; t++)
            if (mask[(size_t)b * T + t] != 0.0f) s += logp[(size_t)b * T + t];
        seq_logp[b] = s;
    }
}
