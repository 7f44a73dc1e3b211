/*
 * KV-cache decoding gives the logits of full recomputation: for tiny random models of both
 * families (GPT-2; Llama with grouped-query attention), prompts of different lengths are
 * prefilled together in one cached call and then decoded one token per sequence per call; the
 * logits at every position must equal those of model_forward on the whole sequence.
 */
#include <math.h>
#include "llmc/utils.h"
#include "llmc/rand.h"
#include "llmc/model.h"
#include "llmc/generate.h"

static int check_family(const char *preset) {
    ModelConfig c;
    if (!model_config_preset(preset, &c)) fatal("unknown preset %s", preset);
    Model m;
    model_init(&m, &c, preset);
    model_init_random(&m, 3);
    // larger weights than the training init so that attention patterns and logits vary
    for (size_t i = 0; i < m.num_parameters; i++) m.params[i] *= 4.0f;
    int V = c.vocab_size, Vp = c.padded_vocab_size;
    enum { S = 3, T = 20 };
    int prompt_len[S] = {5, 1, 11};
    int tokens[S][T];
    uint64_t rng = rng_seed(11);
    for (int s = 0; s < S; s++)
        for (int t = 0; t < T; t++) tokens[s][t] = (int)(random_u32(&rng) % (uint32_t)V);
    // reference: full forward of each sequence
    float *full = (float *)mallocCheck(sizeof(float) * S * T * Vp);
    model_forward(&m, &tokens[0][0], NULL, NULL, S, T);
    memcpy(full, m.logits, sizeof(float) * S * T * Vp);

    KVCache cache;
    kv_cache_init(&cache, &c, S, T);
    float *logits = (float *)mallocCheck(sizeof(float) * S * T * Vp);
    int rows_tok[S * T], rows_seq[S * T], rows_pos[S * T], logit_rows[S * T];
    int N = 0;
    for (int s = 0; s < S; s++)
        for (int t = 0; t < prompt_len[s]; t++) {
            rows_tok[N] = tokens[s][t]; rows_seq[N] = s; rows_pos[N] = t; logit_rows[N] = N; N++;
        }
    double max_err = 0.0, max_ref = 0.0;
    model_forward_cached(&m, &cache, rows_tok, rows_seq, rows_pos, N, logit_rows, N, logits);
    for (int r = 0; r < N; r++)
        for (int v = 0; v < V; v++) {
            double ref = full[((size_t)rows_seq[r] * T + rows_pos[r]) * Vp + v];
            max_err = fmax(max_err, fabs(logits[(size_t)r * Vp + v] - ref));
            max_ref = fmax(max_ref, fabs(ref));
        }
    // decode: every sequence one position further per call, each at its own position
    int pos[S];
    for (int s = 0; s < S; s++) pos[s] = prompt_len[s];
    for (int step = 0; step < T; step++) {
        int n = 0;
        for (int s = 0; s < S; s++)
            if (pos[s] < T) { rows_tok[n] = tokens[s][pos[s]]; rows_seq[n] = s; rows_pos[n] = pos[s]; logit_rows[n] = n; n++; }
        if (n == 0) break;
        model_forward_cached(&m, &cache, rows_tok, rows_seq, rows_pos, n, logit_rows, n, logits);
        for (int r = 0; r < n; r++) {
            for (int v = 0; v < V; v++) {
                double ref = full[((size_t)rows_seq[r] * T + rows_pos[r]) * Vp + v];
                max_err = fmax(max_err, fabs(logits[(size_t)r * Vp + v] - ref));
                max_ref = fmax(max_ref, fabs(ref));
            }
            pos[rows_seq[r]]++;
        }
    }
    double rel = max_err / max_ref;
    int ok = rel < 1e-5 && max_ref > 1.0;
    printf("%-12s cached vs full logits: max abs err %.3e, max |logit| %.3f, rel %.3e  %s\n",
           preset, max_err, max_ref, rel, ok ? "ok" : "FAIL");
    kv_cache_free(&cache);
    free(full); free(logits);
    model_free(&m);
    return ok;
}

int main(void) {
    int ok = check_family("gpt2:tiny");
    ok &= check_family("llama:tiny");
    return ok ? 0 : 1;
}
