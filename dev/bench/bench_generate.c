/*
 * CPU generation benchmark: SmolLM2-135M-Instruct (or any checkpoint) generating with the KV
 * cache at batch 1 and 16 (by default), sampling at temperature 1, no stop tokens so every
 * sequence runs the full length. Prints prefill and decode tokens/s. Not a test: figures only.
 *
 *   build/bench/bench_generate MODEL [NEW_TOKENS] [PROMPT_TOKENS] [BATCH ...]
 */
#include <omp.h>
#include "llmc/utils.h"
#include "llmc/rand.h"
#include "llmc/checkpoint.h"
#include "llmc/generate.h"

int main(int argc, char **argv) {
    if (argc < 2) fatal("usage: bench_generate MODEL [NEW_TOKENS] [PROMPT_TOKENS] [BATCH ...]");
    int new_tokens = argc > 2 ? atoi(argv[2]) : 64;
    int prompt_tokens = argc > 3 ? atoi(argv[3]) : 32;
    int batches[16] = {1, 16}, n_batches = 2;
    if (argc > 4) {
        n_batches = 0;
        for (int i = 4; i < argc && n_batches < 16; i++) batches[n_batches++] = atoi(argv[i]);
    }
    Model model;
    checkpoint_load(&model, argv[1], NULL, NULL);
    printf("CPU generation, %s, %d OpenMP threads, prompts of %d tokens, %d new tokens each\n",
           argv[1], omp_get_max_threads(), prompt_tokens, new_tokens);
    printf("%6s %12s %14s %14s %12s\n", "batch", "prefill ms", "prefill tok/s", "decode tok/s", "total s");
    for (int bi = 0; bi < n_batches; bi++) {
        int B = batches[bi];
        int **prompts = (int **)mallocCheck(sizeof(int *) * B);
        int *lens = (int *)mallocCheck(sizeof(int) * B);
        uint64_t rng = rng_seed(5);
        for (int b = 0; b < B; b++) {
            lens[b] = prompt_tokens;
            prompts[b] = (int *)mallocCheck(sizeof(int) * prompt_tokens);
            for (int t = 0; t < prompt_tokens; t++) prompts[b][t] = (int)(random_u32(&rng) % (uint32_t)model.config.vocab_size);
        }
        // prefill alone: a one-token generation
        GenerateParams p = {.temperature = 1.0f, .top_p = 1.0f, .max_new_tokens = 1, .seed = 1};
        GenerateResult r;
        double t0 = wall_seconds();
        generate(&model, (const int *const *)prompts, lens, B, &p, &r);
        double prefill = wall_seconds() - t0;
        generate_result_free(&r);
        p.max_new_tokens = new_tokens;
        t0 = wall_seconds();
        generate(&model, (const int *const *)prompts, lens, B, &p, &r);
        double total = wall_seconds() - t0;
        long generated = 0;
        for (int b = 0; b < B; b++) generated += r.n_tokens[b];
        generate_result_free(&r);
        double decode_tps = (generated - B) / (total - prefill);
        printf("%6d %12.0f %14.0f %14.1f %12.2f\n", B, prefill * 1e3, B * prompt_tokens / prefill, decode_tps, total);
        for (int b = 0; b < B; b++) free(prompts[b]);
        free(prompts); free(lens);
    }
    model_free(&model);
    return 0;
}
