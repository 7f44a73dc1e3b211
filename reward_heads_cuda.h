/*
 * The reward heads on the GPU (reward_heads.cu): the same forward and backward as the CPU heads
 * in llmc/reward_heads.c, with the parameters in fp32 on the device. Pointers named d_* are
 * device pointers. Layout of params/grads: as llmc/reward_heads.h (head d at offset d * P).
 *
 * Nothing in train_mora calls these yet: ./train_mora does not link reward_heads.o (Makefile),
 * and `train_mora reward --device cuda` runs the trunk's forwards on the GPU but trains the heads
 * on the CPU (reward.c). They are checked against the CPU heads by dev/cuda/reward_heads.cu on a
 * GPU and, without one, by test/test_reward_heads_emu.py (emulated).
 */
#ifndef REWARD_HEADS_CUDA_H
#define REWARD_HEADS_CUDA_H
#ifdef __cplusplus
extern "C" {
#endif
#include "llmc/reward_heads.h"

// rewards (N, MORA_NUM_DIMS) = every head on every row of hidden (N, C). Uses the heads'
// kind/activation/C/H from `heads` (host struct) and the device parameters d_params.
void reward_heads_forward_cuda(const RewardHeads *heads, const float *d_params, const float *d_hidden,
                               int N, float *d_rewards);
// Backward of sum_n drewards[n] * r_{dims[n]}(hidden[n]): d_grads += parameter gradients,
// d_dhidden (N, C) += hidden gradients when not NULL. Deterministic (no atomics): each gradient
// element is summed over rows in row order by one thread.
void reward_heads_backward_cuda(const RewardHeads *heads, const float *d_params, const float *d_hidden,
                                const int *d_dims, const float *d_drewards, int N, float *d_grads,
                                float *d_dhidden);
// Bradley-Terry over N pairs: d_loss (1) = mean softplus(-(r_c - r_r)); d_dchosen, d_drejected
// (N) = its gradient.
void bradley_terry_loss_cuda(const float *d_chosen, const float *d_rejected, int N, float *d_loss,
                             float *d_dchosen, float *d_drejected);

#ifdef __cplusplus
}
#endif
#endif
