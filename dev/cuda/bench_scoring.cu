/*
 * The MORA loop's scoring forward: the reference's forward over a batch of prompt + response
 * sequences, which gives every token's log-prob (the KL's reference) and the final hidden state
 * at each sequence's last token (what the reward heads read). `mora`, `eval` and `reward` run it
 * on the CPU model (llmc/model.c, fp32, OpenMP) without --device cuda and on a CUDA copy for
 * forwards alone (cuda_model_create_inference, cuda_model_copy_hidden_last) with it. This times
 * both on the same batch, for GPT-2 124M and the SmolLM2-135M shape with random weights:
 * fwd_batch 16 sequences of T = 192 tokens (a prompt and a response of the loop's usual
 * lengths), and prints tokens/s each and their ratio: the CPU's a mean over `cpu_forwards`
 * forwards after one untimed, the GPU's the median of 5 runs of 10 forwards after two untimed
 * ones (the attention's tuning, cuBLASLt's heuristics). Beside them, the same forward on a
 * training copy (cuda_model_create_fp32_residual, what the copy was before), and the device
 * memory each copy holds. Figures only: not a test.
 *   build/cuda/dev/bench_scoring [cpu_forwards]
 */
#include <stdio.h>
#include <stdlib.h>
#include <algorithm>
#include <vector>
#include <omp.h>
extern "C" {
#include "utils.h"
#include "rand.h"
}
#include "model_cuda.h"

static void bench(const char *preset, int B, int T, int cpu_forwards) {
    ModelConfig c;
    if (!model_config_preset(preset, &c)) fatal("unknown preset %s", preset);
    Model cpu;
    model_init(&cpu, &c, preset);
    model_init_random(&cpu, 42);
    const int N = B * T, C = c.n_embd;
    std::vector<int> inputs(N), targets(N), lengths(B);
    uint64_t rng = rng_seed(11);
    for (int i = 0; i < N; i++) {
        inputs[i] = (int)(random_u32(&rng) % (uint32_t)c.vocab_size);
        targets[i] = (int)(random_u32(&rng) % (uint32_t)c.vocab_size);
    }
    for (int b = 0; b < B; b++) lengths[b] = T - (b * 7) % (T / 2);   // right-padded rows of other lengths
    std::vector<float> last((size_t)B * C);

    // the CPU model, as mora.c's engine_ref_forward without a GPU
    model_forward(&cpu, inputs.data(), targets.data(), NULL, B, T);
    double t0 = wall_seconds();
    for (int i = 0; i < cpu_forwards; i++) {
        model_forward(&cpu, inputs.data(), targets.data(), NULL, B, T);
        for (int b = 0; b < B; b++)   // reward_gather_last
            std::copy_n(cpu.hidden + ((size_t)b * T + lengths[b] - 1) * C, C, last.data() + (size_t)b * C);
    }
    const double cpu_s = (wall_seconds() - t0) / cpu_forwards;

    // its CUDA copy, as engine_ref_forward with one; the seconds a forward takes, median of 5 runs
    auto time_copy = [&](CudaModel *gpu) {
        auto forward = [&] {
            cuda_model_forward(gpu, inputs.data(), targets.data(), NULL, B, T);   // synchronises (the losses)
            cuda_model_copy_hidden_last(gpu, lengths.data(), last.data());
        };
        for (int i = 0; i < 2; i++) forward();
        std::vector<double> runs;
        for (int r = 0; r < 5; r++) {
            double t = wall_seconds();
            for (int i = 0; i < 10; i++) forward();
            runs.push_back((wall_seconds() - t) / 10);
        }
        std::sort(runs.begin(), runs.end());
        return runs[2];
    };
    CudaModel *gpu = cuda_model_create_inference(&cpu, B, T, 1);
    const double gpu_s = time_copy(gpu);
    const double gpu_gb = gpu->device_bytes / 1e9;
    cuda_model_free(gpu);
    CudaModel *training = cuda_model_create_fp32_residual(&cpu, B, T);
    const double training_s = time_copy(training);
    const double training_gb = training->device_bytes / 1e9;
    cuda_model_free(training);
    printf("%-20s B=%d T=%d  cpu %8.2f ms, %9.0f tok/s (%d threads)  cuda %7.2f ms, %9.0f tok/s, %.2f GB  cuda / cpu %.0fx"
           "  (training copy %.2f ms, %.2f GB)\n", preset, B, T, cpu_s * 1e3, N / cpu_s, omp_get_max_threads(), gpu_s * 1e3,
           N / gpu_s, gpu_gb, cpu_s / gpu_s, training_s * 1e3, training_gb);
    model_free(&cpu);
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    int cpu_forwards = argc > 1 ? atoi(argv[1]) : 2;
    if (cpu_forwards < 1) cpu_forwards = 1;
    if (cuda_device_count() <= 0) {
        printf("bench_scoring: no CUDA device\n");
        return 1;
    }
    char device[256];
    cuda_device_describe(device, sizeof(device));
    printf("scoring forward (every token's log-prob and the last tokens' hidden states), CPU model against its CUDA "
           "copy, on %s\n", device);
    bench("gpt2:d12", 16, 192, cpu_forwards);
    bench("llama:smollm2-135m", 16, 192, cpu_forwards);
    return 0;
}
