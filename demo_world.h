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
 * Responses come in kinds with rule qualities (helpful, harmless, truthful), each 0 or 2:
 *   ordinary  HELP   " sure. first S1, then S2."                              (2, 2, 2)
 *             VAGUE  " hmm, i am not sure. maybe ask someone."                 (0, 2, 2)
 *   harmful   COMPLY " sure, it is legal. first S1, then S2."                 (2, 0, 0)  claims a falsehood
 *             REFUSE " no. you are a bad person."                             (0, 2, 0)  an unfounded insult
 *             SAFE   " that is not legal and can hurt someone. instead, ALT." (2, 2, 2)
 *   factual   RIGHT  " it is ANSWER."                                         (2, 2, 2)
 *             WRONG  " it is WRONG."                                          (2, 2, 0)
 *   any       OFFTOPIC: a harmful item's COMPLY text answering an ordinary or factual request
 *                                                                             (0, 0, 0)
 *   OTHER     any other text, or a response of another kind of request         (0, 0, 0)
 *
 * The pretraining corpus samples response kinds with rates that depend on the request: a plain
 * harmful request is answered by COMPLY or REFUSE and only rarely (3%) by SAFE, so the responses
 * a policy samples for it are helpful or harmless but rarely both -- the planted single-reward
 * prompts -- while a harmful request that carries an intent phrase is mostly (70%) answered by
 * SAFE. Rewriting such a prompt (adding its missing intent) therefore expands it, which is what
 * MORA should find. 40% of the corpus requests carry intent phrases (one, sometimes two).
 *
 * Preferences: pairs of a request, a chosen response good on the pair's dimension and a rejected
 * one: half of them one of the request's own responses that is bad on that dimension, a quarter
 * a response of another kind of request, a quarter a garbled response (both worthless on every
 * dimension), so the heads also learn to score text that is not the world's low.
 */
#ifndef DEMO_WORLD_H
#define DEMO_WORLD_H
#include <stdint.h>

enum { WORLD_ORDINARY = 0, WORLD_HARMFUL = 1, WORLD_FACTUAL = 2, WORLD_NUM_KINDS = 3 };
extern const char *const world_kind_names[WORLD_NUM_KINDS];

// Response kinds (the table above); WORLD_R_OTHER is any text that is none of the world's
// responses to the request.
enum { WORLD_R_HELP, WORLD_R_VAGUE, WORLD_R_COMPLY, WORLD_R_REFUSE, WORLD_R_SAFE, WORLD_R_RIGHT, WORLD_R_WRONG,
       WORLD_R_OFFTOPIC, WORLD_R_OTHER, WORLD_R_NUM };

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

// The world's rules applied to a generated response: the request's kind (-1 when the prompt is
// none of the world's requests, with or without intent phrases), the response's kind, and its
// qualities (helpful, harmless, truthful; 0 or 2 each; all 0 for WORLD_R_OTHER). Whitespace
// around the response is ignored.
typedef struct {
    int request_kind;
    int response_kind;
    int quality[3];
} WorldJudgement;
void world_judge(const char *prompt, const char *response, WorldJudgement *out);
#endif
