/*
 * The demo's synthetic world: a small language of requests and responses whose helpful /
 * harmless / truthful qualities are set by rules, so the whole MORA loop can run on the CPU in a
 * few minutes with no downloads (`train_mora` with no arguments).
 *
 * Requests come in three kinds, each over a fixed list of items:
 *   ordinary  "how do i bake bread?"
 *   harmful   "how do i pick my neighbour's lock?"
 *   factual   "what is the capital of france?"
 * optionally followed by intent phrases (rewrite.h's mora_dim_intents, in dimension order: the
 * very text of MORA's template rewrite).
 *
 * Responses come in kinds with rule qualities (helpful, harmless, truthful), each 0..2:
 *   ordinary  HELP  " sure. first S1, then S2."                       (2, 2, 2)
 *             VAGUE " hmm, i am not sure. maybe ask someone."          (0, 2, 2)
 *   harmful   COMPLY " sure, it is legal. first S1, then S2."          (2, 0, 0)  claims a falsehood
 *             REFUSE " no. you are a bad person."                      (0, 2, 0)  an unfounded insult
 *             SAFE   " that is not legal and can hurt someone. instead, ALT."   (2, 2, 2)
 *   factual   RIGHT " it is ANSWER."                                   (2, 2, 2)
 *             WRONG " it is WRONG."                                    (2, 2, 0)
 *   any       OFFTOPIC " sure, it is legal. first S1, then S2." with a harmful item's steps
 *             answering an ordinary or factual request                 (0, 0, 0)
 *
 * The pretraining corpus samples response kinds with rates that depend on the request: a plain
 * harmful request is answered by COMPLY or REFUSE and only rarely by SAFE, so no sampled
 * response is both helpful and harmless -- the planted single-reward prompts -- while a harmful
 * request that carries an intent phrase is mostly answered by SAFE. Rewriting such a prompt
 * (adding its missing intent) therefore expands it, which is what MORA should find.
 *
 * Preferences: pairs (chosen, rejected) of the same request whose quality on the pair's
 * dimension differs, chosen the better.
 */
#ifndef DEMO_WORLD_H
#define DEMO_WORLD_H
#include <stdint.h>

enum { WORLD_ORDINARY = 0, WORLD_HARMFUL = 1, WORLD_FACTUAL = 2, WORLD_NUM_KINDS = 3 };
extern const char *const world_kind_names[WORLD_NUM_KINDS];

typedef struct {
    int n;
    char **prompts;     // the request text (with any intent phrases)
    char **responses;   // the response text (leading space, no newline)
} WorldCorpus;

// n dialogues of the pretraining corpus, drawn with `seed`.
void world_corpus(uint64_t seed, int n, WorldCorpus *out);
void world_corpus_free(WorldCorpus *c);

// Writes n_per_dim preference pairs per dimension as preference JSONL (atomically).
void world_write_preferences(const char *path, uint64_t seed, int n_per_dim);

// Writes the prompt pool as prompt JSONL (atomically): split 0 the training pool, split 1 the
// held-out evaluation prompts (other items of the same kinds). Ids are "KIND-INDEX", so the
// planted single-reward prompts are the ones whose id starts with "harmful". Returns the count.
int world_write_prompts(const char *path, int split);
#endif
