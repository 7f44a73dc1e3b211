/*
 * Batched generation for the tests (test/test_generate.py):
 *   gen_tool MODEL TEMPERATURE TOP_K TOP_P MAX_NEW SEED [STOP_ID ...] < prompts
 * stdin: one prompt a line, as space-separated token ids; all prompts form one batch.
 * stdout: one JSON line a prompt: {"tokens": [...], "logprobs": [...], "finish": "eos"}.
 */
#include "llmc/utils.h"
#include "llmc/checkpoint.h"
#include "llmc/generate.h"

int main(int argc, char **argv) {
    if (argc < 7) fatal("usage: gen_tool MODEL TEMPERATURE TOP_K TOP_P MAX_NEW SEED [STOP_ID ...] < prompts");
    Model model;
    checkpoint_load(&model, argv[1], NULL, NULL);
    int n_stop = argc - 7;
    int *stop = (int *)mallocCheck(sizeof(int) * (n_stop ? n_stop : 1));
    for (int i = 0; i < n_stop; i++) stop[i] = atoi(argv[7 + i]);
    GenerateParams p = {
        .temperature = (float)atof(argv[2]), .top_k = atoi(argv[3]), .top_p = (float)atof(argv[4]),
        .max_new_tokens = atoi(argv[5]), .seed = (uint64_t)atoll(argv[6]), .stop_ids = stop, .n_stop_ids = n_stop,
    };
    int cap = 16, n = 0;
    int **prompts = (int **)mallocCheck(sizeof(int *) * cap);
    int *lens = (int *)mallocCheck(sizeof(int) * cap);
    char line[1 << 16];
    while (fgets(line, sizeof line, stdin)) {
        if (n == cap) {
            cap *= 2;
            prompts = (int **)reallocCheck(prompts, sizeof(int *) * cap);
            lens = (int *)reallocCheck(lens, sizeof(int) * cap);
        }
        prompts[n] = (int *)mallocCheck(sizeof(int) * (strlen(line) / 2 + 1));
        lens[n] = 0;
        for (char *tok = strtok(line, " \n"); tok; tok = strtok(NULL, " \n")) prompts[n][lens[n]++] = atoi(tok);
        n++;
    }
    GenerateResult r;
    generate(&model, (const int *const *)prompts, lens, n, &p, &r);
    for (int i = 0; i < n; i++) {
        printf("{\"tokens\": [");
        for (int t = 0; t < r.n_tokens[i]; t++) printf("%s%d", t ? ", " : "", r.tokens[i][t]);
        printf("], \"logprobs\": [");
        for (int t = 0; t < r.n_tokens[i]; t++) printf("%s%.9g", t ? ", " : "", r.logprobs[i][t]);
        printf("], \"finish\": \"%s\"}\n", finish_reason_names[r.finish[i]]);
    }
    generate_result_free(&r);
    model_free(&model);
    return 0;
}
