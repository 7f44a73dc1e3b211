/*
 * Runs the reward heads' kernels of reward_heads.cu (forward, backward, Bradley-Terry loss)
 * through their host entry points on the CPU, beside the CPU heads of llmc/reward_heads.c on the
 * same inputs, so that test/test_reward_heads_emu.py can compare the two on a machine without a
 * GPU (on a GPU, dev/cuda/reward_heads.cu does).
 *
 * reward_heads.cu compiles unchanged as C++ against the emulated CUDA toolkit of test/emu_cuda/
 * (device memory starts as NaN) and the GPU emulation of test/gpu_emu.h, with its launches
 * rewritten into emu_launch calls (test/gpu_emu.py); its static __shared__ array starts as NaN
 * for every block (reward_heads_emu.ld). The blocks' order is EMU_BLOCKS's (test/gpu_emu.h).
 *
 *   reward_heads_emu IN OUT forward|reverse   (the order of the threads in a block)
 *     IN : int32 kind (0 linear, 1 mlp), activation (0 gelu, 1 relu), N, C, H (0 for linear),
 *          M (Bradley-Terry pairs); float32 params (3 P), hidden (N, C); int32 dims (N);
 *          float32 drewards (N), the gradients' starting values (3 P) and dhidden's (N, C),
 *          then chosen (M), rejected (M)
 *     OUT: float32, the kernels' results then the CPU heads':
 *            rewards (N, 3), grads (3 P), dhidden (N, C), grads again from a backward without
 *            dhidden (NULL), loss (1), dchosen (M), drejected (M), loss again without the
 *            gradients (NULL);
 *            rewards (N, 3), grads (3 P), dhidden (N, C), loss (1), dchosen (M), drejected (M)
 *          (the CPU's Bradley-Terry, computed in double, rounded to float32)
 */
#define EMU_PROGRAM "reward_heads_emu"
#define EMU_STATIC_SHARED
#include <cuda_runtime.h>
#include <vector>
#include "reward_heads_launched.cu"   // reward_heads.cu, launches rewritten
#include "emu_io.h"

static void *dev(const void *host, size_t bytes) {
    void *p = NULL;
    if (cudaMalloc(&p, bytes ? bytes : 1) != cudaSuccess) emu_fail("cudaMalloc");
    if (host) cudaMemcpy(p, host, bytes, cudaMemcpyHostToDevice);
    return p;
}
template <typename T> static void append(std::vector<float> &out, const T *x, size_t n) {
    for (size_t i = 0; i < n; i++) out.push_back((float)x[i]);
}
static void append_device(std::vector<float> &out, const float *d, size_t n) {
    std::vector<float> h(n);
    cudaMemcpy(h.data(), d, n * sizeof(float), cudaMemcpyDeviceToHost);
    append(out, h.data(), n);
}

int main(int argc, char **argv) {
    if (argc != 4 || (strcmp(argv[3], "forward") != 0 && strcmp(argv[3], "reverse") != 0)) {
        fprintf(stderr, "usage: %s IN OUT forward|reverse\n", argv[0]);
        return 1;
    }
    threads_in_reverse = strcmp(argv[3], "reverse") == 0;
    if ((size_t)(emu_shared_end - emu_shared_begin) < 32 * sizeof(float))
        emu_fail("rh_block_sum's __shared__ array is not in the poisoned range (reward_heads_emu.ld)");
    FILE *f = fopen(argv[1], "rb");
    if (!f) { fprintf(stderr, "error: cannot open %s\n", argv[1]); return 1; }
    std::vector<int32_t> h = read_n<int32_t>(f, 6, argv[1]);
    const int kind = h[0], act = h[1], N = h[2], C = h[3], H = h[4], M = h[5];
    if (kind < 0 || kind > 1 || act < 0 || act > 1 || N < 1 || C < 1 || (kind == 1 && H < 1) || M < 1) {
        fprintf(stderr, "error: %s: bad header\n", argv[1]);
        return 1;
    }
    RewardHeads heads;
    reward_heads_init(&heads, (RewardHeadKind)kind, (RewardHeadActivation)act, C, H);
    const size_t np = heads.num_parameters, nh = (size_t)N * C;
    std::vector<float> params = read_n<float>(f, np, argv[1]), hidden = read_n<float>(f, nh, argv[1]);
    std::vector<int32_t> dims = read_n<int32_t>(f, N, argv[1]);
    std::vector<float> drew = read_n<float>(f, N, argv[1]), grads0 = read_n<float>(f, np, argv[1]);
    std::vector<float> dhidden0 = read_n<float>(f, nh, argv[1]);
    std::vector<float> chosen = read_n<float>(f, M, argv[1]), rejected = read_n<float>(f, M, argv[1]);
    fclose(f);
    for (int n = 0; n < N; n++)
        if (dims[n] < 0 || dims[n] >= MORA_NUM_DIMS) { fprintf(stderr, "error: %s: bad dim\n", argv[1]); return 1; }
    memcpy(heads.params, params.data(), np * sizeof(float));
    std::vector<float> y;

    // the kernels: outputs that are only written start as NaN (cudaMalloc's fill here)
    float *d_params = (float *)dev(params.data(), np * 4), *d_hidden = (float *)dev(hidden.data(), nh * 4);
    int *d_dims = (int *)dev(dims.data(), (size_t)N * 4);
    float *d_drew = (float *)dev(drew.data(), (size_t)N * 4), *d_rewards = (float *)dev(NULL, (size_t)N * MORA_NUM_DIMS * 4);
    float *d_grads = (float *)dev(grads0.data(), np * 4), *d_dhidden = (float *)dev(dhidden0.data(), nh * 4);
    reward_heads_forward_cuda(&heads, d_params, d_hidden, N, d_rewards);
    reward_heads_backward_cuda(&heads, d_params, d_hidden, d_dims, d_drew, N, d_grads, d_dhidden);
    append_device(y, d_rewards, (size_t)N * MORA_NUM_DIMS);
    append_device(y, d_grads, np);
    append_device(y, d_dhidden, nh);
    cudaMemcpy(d_grads, grads0.data(), np * 4, cudaMemcpyHostToDevice);
    reward_heads_backward_cuda(&heads, d_params, d_hidden, d_dims, d_drew, N, d_grads, NULL);
    append_device(y, d_grads, np);
    float *d_chosen = (float *)dev(chosen.data(), (size_t)M * 4), *d_rejected = (float *)dev(rejected.data(), (size_t)M * 4);
    float *d_loss = (float *)dev(NULL, 4), *d_dc = (float *)dev(NULL, (size_t)M * 4), *d_dr = (float *)dev(NULL, (size_t)M * 4);
    bradley_terry_loss_cuda(d_chosen, d_rejected, M, d_loss, d_dc, d_dr);
    append_device(y, d_loss, 1);
    append_device(y, d_dc, M);
    append_device(y, d_dr, M);
    cudaMemset(d_loss, 0xff, 4);
    bradley_terry_loss_cuda(d_chosen, d_rejected, M, d_loss, NULL, NULL);
    append_device(y, d_loss, 1);

    // the CPU heads on the same inputs
    std::vector<float> rewards((size_t)N * MORA_NUM_DIMS), dhidden = dhidden0;
    reward_heads_forward(&heads, hidden.data(), N, rewards.data());
    memcpy(heads.grads, grads0.data(), np * sizeof(float));
    reward_heads_backward(&heads, hidden.data(), dims.data(), drew.data(), N, dhidden.data());
    append(y, rewards.data(), rewards.size());
    append(y, heads.grads, np);
    append(y, dhidden.data(), nh);
    std::vector<double> c(chosen.begin(), chosen.end()), r(rejected.begin(), rejected.end()), dc(M), dr(M);
    double loss = bradley_terry_loss(c.data(), r.data(), M, dc.data(), dr.data());
    append(y, &loss, 1);
    append(y, dc.data(), M);
    append(y, dr.data(), M);
    reward_heads_free(&heads);

    FILE *o = fopen(argv[2], "wb");
    if (!o) { fprintf(stderr, "error: cannot create %s\n", argv[2]); return 1; }
    bool ok = fwrite(y.data(), sizeof(float), y.size(), o) == y.size();
    if (fclose(o) != 0 || !ok) { fprintf(stderr, "error: cannot write %s\n", argv[2]); return 1; }
    printf("reward_heads_emu kind %d activation %d N %d C %d H %d M %d, threads %s: done\n", kind, act, N, C, H, M, argv[3]);
    return 0;
}
