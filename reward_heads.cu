/*
 * Reward heads on the GPU: forward, backward and the Bradley-Terry loss, the twins of
 * reward_heads_forward / reward_heads_backward / bradley_terry_loss in llmc/reward_heads.c
 * (the harness dev/cuda/reward_heads.cu checks them against those on random inputs).
 *
 * Shapes: N rows (one per scored sequence), C trunk hidden size, H mlp width, D = 3 heads,
 * P parameters per head. The heads are tiny next to the trunk, so the kernels aim at being
 * plainly right and deterministic rather than at peak speed: one block per (row, head) for the
 * forward, one thread per parameter (summing rows in order) for the backward.
 */
#include <cuda_runtime.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include "reward_heads_cuda.h"

#define RH_THREADS 256

static void rh_cuda_check(cudaError_t err, const char *what, const char *file, int line) {
    if (err != cudaSuccess) {
        fprintf(stderr, "error: CUDA %s failed at %s:%d: %s\n", what, file, line, cudaGetErrorString(err));
        exit(1);
    }
}
#define rhCheck(call) rh_cuda_check((call), #call, __FILE__, __LINE__)
#define rhCheckLaunch(name) rh_cuda_check(cudaGetLastError(), "launch of " name, __FILE__, __LINE__)

__device__ __forceinline__ float rh_gelu(float x) {
    const float k = 0.7978845608028654f;  // sqrt(2/pi)
    return 0.5f * x * (1.0f + tanhf(k * (x + 0.044715f * x * x * x)));
}
__device__ __forceinline__ float rh_gelu_grad(float x) {
    const float k = 0.7978845608028654f;
    float u = k * (x + 0.044715f * x * x * x);
    float t = tanhf(u);
    return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * k * (1.0f + 3.0f * 0.044715f * x * x);
}
__device__ __forceinline__ float rh_act(float x, int act) { return act == REWARD_ACT_GELU ? rh_gelu(x) : fmaxf(x, 0.0f); }
__device__ __forceinline__ float rh_act_grad(float x, int act) { return act == REWARD_ACT_GELU ? rh_gelu_grad(x) : (x > 0.0f ? 1.0f : 0.0f); }

// Sum of v over the block (blockDim.x a multiple of 32, at most 1024); every thread gets it.
__device__ float rh_block_sum(float v) {
    __shared__ float partial[32];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    int warps = blockDim.x / 32;
    float total = lane < warps ? partial[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) total += __shfl_xor_sync(0xffffffff, total, o);
    __syncthreads();
    return total;
}

// Pre-activations of an mlp head: pre (H) = W1 h + b1 for head d (W1 (H, C) at params + d*P).
// linear heads: r = w . h + b. Block (n, d) -> rewards[n, d].
__global__ void reward_heads_forward_kernel(const float *params, const float *hidden, float *rewards,
                                            int C, int H, size_t P, int kind, int act) {
    int n = blockIdx.x, d = blockIdx.y;
    const float *h = hidden + (size_t)n * C;
    const float *p = params + (size_t)d * P;
    float acc = 0.0f;
    if (kind == REWARD_HEAD_LINEAR) {
        for (int c = threadIdx.x; c < C; c += blockDim.x) acc += p[c] * h[c];
        float r = rh_block_sum(acc);
        if (threadIdx.x == 0) rewards[(size_t)n * MORA_NUM_DIMS + d] = r + p[C];
        return;
    }
    const float *W1 = p, *b1 = p + (size_t)H * C, *w2 = b1 + H, *b2 = w2 + H;
    // each thread owns hidden units j = threadIdx.x, threadIdx.x + blockDim.x, ...
    for (int j = threadIdx.x; j < H; j += blockDim.x) {
        const float *row = W1 + (size_t)j * C;
        float a = b1[j];
        for (int c = 0; c < C; c++) a += row[c] * h[c];
        acc += w2[j] * rh_act(a, act);
    }
    float r = rh_block_sum(acc);
    if (threadIdx.x == 0) rewards[(size_t)n * MORA_NUM_DIMS + d] = r + b2[0];
}

// mlp backward, step 1: for each row n (head dims[n]) and unit j:
//   pre = W1_j . h + b1_j, unit = act(pre), dpre = dr * w2_j * act'(pre)
// stored in units (N, H) and dpre (N, H).
__global__ void reward_mlp_units_kernel(const float *params, const float *hidden, const int *dims,
                                        const float *drewards, float *units, float *dpre,
                                        int N, int C, int H, size_t P, int act) {
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)N * H) return;
    int n = (int)(idx / H), j = (int)(idx % H);
    const float *p = params + (size_t)dims[n] * P;
    const float *W1 = p, *b1 = p + (size_t)H * C, *w2 = b1 + H;
    const float *h = hidden + (size_t)n * C, *row = W1 + (size_t)j * C;
    float a = b1[j];
    for (int c = 0; c < C; c++) a += row[c] * h[c];
    units[idx] = rh_act(a, act);
    dpre[idx] = drewards[n] * w2[j] * rh_act_grad(a, act);
}

// Parameter gradients, one thread per parameter element of all D heads; rows summed in order.
// linear: dw[d][c] = sum_{n: dims[n]=d} dr[n] h[n][c]; db[d] = sum dr[n].
// mlp:    dW1[d][j][c] = sum dpre[n][j] h[n][c]; db1 = sum dpre[n][j];
//         dw2[d][j] = sum dr[n] units[n][j]; db2 = sum dr[n].
__global__ void reward_heads_param_grad_kernel(const float *hidden, const int *dims, const float *drewards,
                                               const float *units, const float *dpre, float *grads,
                                               int N, int C, int H, size_t P, int kind) {
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)MORA_NUM_DIMS * P) return;
    int d = (int)(idx / P);
    size_t i = idx % P;
    float acc = 0.0f;
    if (kind == REWARD_HEAD_LINEAR) {
        for (int n = 0; n < N; n++) {
            if (dims[n] != d) continue;
            acc += i < (size_t)C ? drewards[n] * hidden[(size_t)n * C + i] : drewards[n];
        }
    } else {
        size_t w1 = (size_t)H * C;
        for (int n = 0; n < N; n++) {
            if (dims[n] != d) continue;
            if (i < w1) acc += dpre[(size_t)n * H + i / C] * hidden[(size_t)n * C + i % C];
            else if (i < w1 + H) acc += dpre[(size_t)n * H + (i - w1)];
            else if (i < w1 + 2 * (size_t)H) acc += drewards[n] * units[(size_t)n * H + (i - w1 - H)];
            else acc += drewards[n];
        }
    }
    grads[idx] += acc;
}

// dhidden[n][c] += dr[n] * w_{dims[n]}[c] (linear) or sum_j dpre[n][j] W1_{dims[n]}[j][c] (mlp).
__global__ void reward_heads_dhidden_kernel(const float *params, const int *dims, const float *drewards,
                                            const float *dpre, float *dhidden, int N, int C, int H,
                                            size_t P, int kind) {
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)N * C) return;
    int n = (int)(idx / C), c = (int)(idx % C);
    const float *p = params + (size_t)dims[n] * P;
    float acc = 0.0f;
    if (kind == REWARD_HEAD_LINEAR) acc = drewards[n] * p[c];
    else for (int j = 0; j < H; j++) acc += dpre[(size_t)n * H + j] * p[(size_t)j * C + c];
    dhidden[idx] += acc;
}

// One block: loss = mean softplus(-(c - r)), dchosen = -sigmoid(-(c - r)) / N, drejected = -dchosen.
__global__ void bradley_terry_kernel(const float *chosen, const float *rejected, int N, float *loss,
                                     float *dchosen, float *drejected) {
    float acc = 0.0f;
    for (int i = threadIdx.x; i < N; i += blockDim.x) {
        float margin = chosen[i] - rejected[i];
        // softplus(-m) = max(-m, 0) + log1p(exp(-|m|)), stable for any margin
        acc += fmaxf(-margin, 0.0f) + log1pf(expf(-fabsf(margin)));
        float s = 1.0f / (1.0f + expf(margin));  // sigmoid(-m)
        if (dchosen) dchosen[i] = -s / N;
        if (drejected) drejected[i] = s / N;
    }
    float total = rh_block_sum(acc);
    if (threadIdx.x == 0) loss[0] = total / N;
}

extern "C" void reward_heads_forward_cuda(const RewardHeads *heads, const float *d_params, const float *d_hidden,
                                          int N, float *d_rewards) {
    if (N <= 0) return;
    dim3 grid((unsigned)N, MORA_NUM_DIMS);
    reward_heads_forward_kernel<<<grid, RH_THREADS>>>(d_params, d_hidden, d_rewards, heads->C, heads->H,
                                                      heads->head_size, heads->kind, heads->activation);
    rhCheckLaunch("reward_heads_forward_kernel");
}

extern "C" void reward_heads_backward_cuda(const RewardHeads *heads, const float *d_params, const float *d_hidden,
                                           const int *d_dims, const float *d_drewards, int N, float *d_grads,
                                           float *d_dhidden) {
    if (N <= 0) return;
    int C = heads->C, H = heads->H;
    size_t P = heads->head_size;
    float *units = NULL, *dpre = NULL;
    if (heads->kind == REWARD_HEAD_MLP) {
        rhCheck(cudaMalloc(&units, sizeof(float) * (size_t)N * H));
        rhCheck(cudaMalloc(&dpre, sizeof(float) * (size_t)N * H));
        size_t n = (size_t)N * H;
        reward_mlp_units_kernel<<<(unsigned)((n + RH_THREADS - 1) / RH_THREADS), RH_THREADS>>>(
            d_params, d_hidden, d_dims, d_drewards, units, dpre, N, C, H, P, heads->activation);
        rhCheckLaunch("reward_mlp_units_kernel");
    }
    size_t np = (size_t)MORA_NUM_DIMS * P;
    reward_heads_param_grad_kernel<<<(unsigned)((np + RH_THREADS - 1) / RH_THREADS), RH_THREADS>>>(
        d_hidden, d_dims, d_drewards, units, dpre, d_grads, N, C, H, P, heads->kind);
    rhCheckLaunch("reward_heads_param_grad_kernel");
    if (d_dhidden) {
        size_t nh = (size_t)N * C;
        reward_heads_dhidden_kernel<<<(unsigned)((nh + RH_THREADS - 1) / RH_THREADS), RH_THREADS>>>(
            d_params, d_dims, d_drewards, dpre, d_dhidden, N, C, H, P, heads->kind);
        rhCheckLaunch("reward_heads_dhidden_kernel");
    }
    if (units) { rhCheck(cudaFree(units)); rhCheck(cudaFree(dpre)); }
}

extern "C" void bradley_terry_loss_cuda(const float *d_chosen, const float *d_rejected, int N, float *d_loss,
                                        float *d_dchosen, float *d_drejected) {
    if (N <= 0) return;
    bradley_terry_kernel<<<1, 1024>>>(d_chosen, d_rejected, N, d_loss, d_dchosen, d_drejected);
    rhCheckLaunch("bradley_terry_kernel");
}
