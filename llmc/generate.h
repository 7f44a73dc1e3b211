/*
 * Generation on the CPU: batched prefill + decode with a KV cache, sampling, log-probs.
 *
 * The cached forward processes a set of rows, each one token of one sequence at one position.
 * Prefill passes all the prompt's tokens as rows; decode passes one row per running sequence.
 * Rows write their keys and values into the cache first, then each row attends over its own
 * sequence's positions 0..pos, so prompts of different lengths and sequences at different
 * positions share one call (and one matrix product per layer).
 */
#ifndef LLMC_GENERATE_H
#define LLMC_GENERATE_H
#include <stdint.h>
#include "model.h"

typedef struct {
    int n_seq, max_len;     // sequences and positions the cache holds
    int kv_dim;             // NKV * HS
    float *k, *v;           // (L, n_seq, max_len, NKV*HS)
    void *scratch;          // activations of the last call, reused between calls
} KVCache;

void kv_cache_init(KVCache *cache, const ModelConfig *config, int n_seq, int max_len);
void kv_cache_free(KVCache *cache);

// Forward of N rows: row i is token tokens[i] of sequence seq[i] at position pos[i] (positions
// of a sequence below pos[i] must be in the cache already or earlier rows of this call).
// logits_out (n_logit_rows, Vp) receives the logits of the rows listed in logit_rows.
void model_forward_cached(Model *model, KVCache *cache, const int *tokens, const int *seq,
                          const int *pos, int N, const int *logit_rows, int n_logit_rows,
                          float *logits_out);

enum { FINISH_LENGTH = 0, FINISH_EOS = 1, FINISH_STOP_STRING = 2 };
extern const char *const finish_reason_names[3];  // "length", "eos", "stop"

typedef struct {
    float temperature;        // 0: greedy (argmax)
    int top_k;                // keep the k most likely tokens (0: all)
    float top_p;              // keep the smallest set with probability >= top_p (1: all)
    int max_new_tokens;
    uint64_t seed;            // sequence i samples from its own stream rng_seed(seed + i)
    const int *stop_ids;      // tokens that end a sequence (end-of-sequence, <|im_end|>, ...)
    int n_stop_ids;
    // stop strings are matched on the decoded text of the generated tokens; decode_token gives
    // the bytes of one token (NULL: no stop strings)
    const char *const *stop_strings;
    int n_stop_strings;
    const unsigned char *(*decode_token)(void *ctx, int token, size_t *len);
    // called after every sampled token of every sequence (streaming); may be NULL
    void (*on_token)(void *ctx, int seq, int token);
    void *ctx;
} GenerateParams;

typedef struct {
    int n_seq;
    int *n_tokens;       // generated tokens per sequence (a stop token is included)
    int **tokens;        // the generated tokens
    float **logprobs;    // log p(token) under the model's softmax at temperature 1, untruncated
    int *finish;         // FINISH_*
} GenerateResult;

// The decoded text of one sequence's generated tokens, grown token by token: what stop strings
// are matched on. Zero-initialise; free with stop_text_free.
typedef struct {
    char *text;
    size_t len, cap;
} StopText;
void stop_text_free(StopText *text);

// The stop rules of generate() for token `tok`, the n_generated-th token of a sequence (already
// counted): a stop id ends it (FINISH_EOS); else, when p has stop strings and decode_token, the
// token's bytes are appended to `text` and a stop string in the text ends it (FINISH_STOP_STRING);
// else max_new_tokens reached ends it (FINISH_LENGTH). Returns that finish reason, or -1 while
// the sequence goes on. Shared by the CPU generator and the GPU rollout engine (rollout.cu), so
// both stop on the same tokens.
int generate_stop_check(const GenerateParams *p, StopText *text, int tok, int n_generated);

// Generates from n_seq prompts (prompt i: prompt_lens[i] >= 1 tokens). Every prompt plus
// max_new_tokens must fit the model's context (checked with a clear error).
void generate(Model *model, const int *const *prompts, const int *prompt_lens, int n_seq,
              const GenerateParams *params, GenerateResult *result);
void generate_result_free(GenerateResult *result);
// A result for n_seq sequences of up to max_new_tokens tokens, no token yet (what generate and
// the GPU rollout engine fill).
void generate_result_alloc(GenerateResult *result, int n_seq, int max_new_tokens);

// Picks a token from logits (V of them used) as generate does: greedy when temperature is 0,
// else temperature, top-k, top-p and a draw from rng. Returns the token; *logprob gets
// log p(token) at temperature 1. scratch holds 2*V floats.
int sample_token(const float *logits, int V, float temperature, int top_k, float top_p,
                 uint64_t *rng, float *logprob, float *scratch);
#endif
