/*
 * MORA's isolation and rewrite logic (DESIGN.md, "The MORA loop", steps 1-3), independent of
 * the model: given reward vectors it standardises them, finds single-reward prompts and their
 * missing dimensions, builds rewrite instructions and template rewrites, sanitises generated
 * candidates and picks the best. The driver supplies generation and scoring.
 *
 * Shapes: D = MORA_NUM_DIMS reward dimensions; a prompt's presample is K responses, each with a
 * reward vector, stored (K, D).
 */
#ifndef REWRITE_H
#define REWRITE_H
#include <stddef.h>

#define MORA_NUM_DIMS 3
enum { DIM_HELPFUL = 0, DIM_HARMLESS = 1, DIM_TRUTHFUL = 2 };
extern const char *const mora_dim_names[MORA_NUM_DIMS];    // "helpful", "harmless", "truthful"
extern const char *const mora_dim_intents[MORA_NUM_DIMS];  // the intent phrase each adds
int mora_dim_from_name(const char *name);                  // -1 when unknown

// Per-dimension mean and standard deviation over a pool of reward vectors.
typedef struct { double mean[MORA_NUM_DIMS], std[MORA_NUM_DIMS]; } RewardStats;

// scores (n, D) -> stats (population std; a dimension with zero spread gets std 1).
void reward_stats_compute(const float *scores, size_t n, RewardStats *stats);
// z (n, D) = (scores - mean) / std; z may alias scores.
void reward_standardise(const float *scores, float *z, size_t n, const RewardStats *stats);

typedef struct {
    float achievable[MORA_NUM_DIMS];  // A_d = max_k z[k][d]
    int joint;                        // J = max_k |{d : z[k][d] >= delta}|
    int single;                       // J <= 1
    int missing_mask;                 // bit d set when A_d < delta
} PromptIsolation;

// Isolates one prompt from its presample z (K, D).
void isolate_prompt(const float *z, int K, float delta, PromptIsolation *out);

// Candidate order: larger J first, then larger sum_d min(A_d, cap). Returns >0 when a is better.
float isolation_compare(const PromptIsolation *a, const PromptIsolation *b, float cap);

// The deterministic template rewrite: the prompt followed by the intent phrase of each missing
// dimension. malloc'd.
char *rewrite_template(const char *prompt, int missing_mask);
// The instruction given to the model to rewrite a prompt so that it carries the missing
// intents; the model's answer is parsed by rewrite_parse. malloc'd.
char *rewrite_instruction(const char *prompt, int missing_mask);
// Extracts the rewritten prompt from generated text: drops a leading label ("Rewritten
// prompt:"), surrounding quotes and whitespace, and anything after the first blank line.
// malloc'd; may be empty.
char *rewrite_parse(const char *generated);

typedef struct {
    int min_chars, max_chars;   // length bounds of a candidate, in bytes (strlen) after trimming
    float min_overlap;          // share of the original's words the candidate must keep
} RewriteLimits;

// Checks a candidate against its original. Returns 1 when acceptable; otherwise 0 and *reason
// (static string) says why: "empty", "too short", "too long", "same as the original",
// "drops the original request".
int rewrite_sanitise(const char *original, const char *candidate, const RewriteLimits *limits,
                     const char **reason);
// Share of the distinct lowercase words of `original` that appear in `candidate` (0..1).
float word_overlap(const char *original, const char *candidate);

// Hypervolume dominated by n points (n, D=3) above the reference point ref (D), for the
// "presampled reward vectors before and after" figure. Points not above ref in every
// dimension contribute only their part above it.
double hypervolume3(const float *points, size_t n, const float *ref);
#endif
