/*
 * Generation on the GPU (rollout.cu): the interface of the CPU generator (llmc/generate.h), on a
 * bf16 copy of the model with a bf16 KV cache, for the many rollouts MORA samples.
 *
 * An engine is created once from a CPU Model and reused across calls: it holds the weights, the
 * KV cache for up to max_seqs sequences of up to max_len positions (prompt + new tokens) and the
 * captured CUDA graphs of the decode step. After a policy update, rollout_update_weights copies
 * the new parameters in (same config). rollout_generate takes the same arguments and fills the
 * same GenerateResult as generate():
 *
 *   RolloutEngine *engine = rollout_create(&model, 64, 512);
 *   rollout_generate(engine, prompts, prompt_lens, n, &params, &result);   // n <= 64
 *   ...; generate_result_free(&result);
 *   rollout_update_weights(engine, &model);                               // after an update
 *   rollout_free(engine);
 *
 * or, once, generate_cuda(&model, prompts, prompt_lens, n, &params, &result).
 *
 * Semantics, as generate(): sequence i is prompt i; each step samples one token per running
 * sequence (greedy when temperature is 0, else temperature, top-k, top-p); log-probs are log p
 * at temperature 1 over the whole vocabulary; a sequence stops at a stop id (included, FINISH_EOS),
 * when its decoded text contains a stop string (FINISH_STOP_STRING), or after max_new_tokens
 * (FINISH_LENGTH); on_token is called for every sampled token, sequences in index order within a
 * step. Sequence i draws its random numbers from its own Philox stream keyed by rng_seed(seed + i)
 * and counted by its token index, so its tokens do not depend on the other sequences of the
 * batch. The draws differ from the CPU's xorshift stream: sampled tokens are equal in
 * distribution, greedy tokens equal up to bf16 rounding (near-ties).
 *
 * All functions exit with a message on a CUDA error or bad input. Compiled only when nvcc is
 * found (the Makefile defines USE_CUDA for the C side then).
 */
#ifndef ROLLOUT_H
#define ROLLOUT_H

#ifdef __cplusplus
extern "C" {
#endif
#include <stdio.h>
#include "llmc/model.h"
#include "llmc/generate.h"

typedef struct RolloutEngine RolloutEngine;

typedef struct {
    // 1: the plain kernels: prefill as rows through the decode path, one thread per (row, head)
    // attention, the O(V^2) reference sampler (V <= 16384 when top-k or top-p is on). For the
    // harnesses; tokens equal the fast path's up to rounding.
    int reference;
    // 1 (default): capture each decode step shape as a CUDA graph and replay it
    int use_graphs;
    // 1: fill every activation buffer and the KV cache with NaN before each generate (tests: an
    // element a kernel leaves unwritten then turns the outputs NaN)
    int poison;
    // 1: a decode step of at most 64 sequences runs its products through decode_matmul.cuh (K
    // split over the SMs) instead of cuBLASLt; 0 (default): cuBLASLt for every product
    int decode_matmul;
    // 1: in a captured decode step, the edges into the engine's own kernels (not cuBLASLt's) are
    // programmatic (sm_90): such a kernel may be scheduled while the one before it finishes, waits
    // at griddep_wait (cuda_common.h) for its inputs, and decode_matmul loads its first weights
    // before that wait. 0 (default): every kernel starts after the one before it has finished.
    int pdl;
    // 1: the next decode step is queued before the host takes the tokens of the last one, so the
    // GPU does not wait for the host between steps (a sequence that stops makes the host wait
    // for both and rebuild the rows); the tokens are the same up to rounding that may depend on
    // the row count. 0 (default): one step, then its tokens, then the next.
    int pipeline;
    // 1: a captured decode step also records CUDA events between its kernel groups (event nodes
    // inside the graph, so the times are those of the replayed graph, not of separate launches),
    // and rollout_profile_print reports each group's time per step over the replayed steps of
    // the last rollout_generate. The steps then run one after another (no pipeline). 0 (default).
    int profile;
    // 1 (default): a decode step's rows are one chain of kernels. 2 to ROLLOUT_MAX_BRANCHES: the
    // rows are cut into that many groups (multiples of 8 rows, at least 4 rows each; fewer groups
    // when the rows are fewer), each a chain of its own on a stream of its own, forked and joined
    // inside the captured graph, so that the chains run side by side: a decode step is a long
    // chain of small kernels that each wait on their launch and their first loads, and one
    // chain's kernels can use the SMs another's leave idle. The tokens are those of one chain up
    // to the products' rounding, which may depend on the row count (cuBLASLt's choice per shape).
    // Ignored (one chain) with reference, decode_matmul, pdl or profile.
    int branches;
    // 1 (default): the first decode step of each shape, which runs eagerly (outside any graph),
    // tries cuBLASLt's candidate algorithms for each of its products on the product's own
    // operands and keeps the fastest of those that give the first choice's bits (matmul.cuh's
    // tuning); that step and every later one (graphs included) use it. 0: cuBLASLt's first choice.
    int tune_products;
    // 1 (default): a graph launch runs one decode step, after which the host takes its tokens.
    // 2 to ROLLOUT_MAX_STEPS_PER_GRAPH: a graph holds that many steps (fewer when a running
    // sequence has fewer tokens left to generate), each writing its tokens to a slot of its own,
    // and after the launch the host takes them step by step: fewer launches and fewer waits for
    // the host. A sequence that stops inside a launch has its row compute the launch's later
    // steps, whose tokens are dropped; the rows are rebuilt after the launch. While no sequence
    // stops, the same tokens and log-probs as one step a launch, bit for bit; after a stop the
    // rows shrink a few steps later, and a step at another row count may round its products
    // otherwise (cuBLASLt's choice per shape). Ignored (1) with pipeline or profile.
    int steps_per_graph;
    // How the decode attention requests the keys and values of the cache (decode_attention.cuh's
    // DECODE_LOADS_*, the same bits in all three): 0 as it uses them; 1 every load of its first
    // iteration before using any (more registers); 2 a block's whole split copied into shared
    // memory at once (cp.async; 0 runs where the device's shared memory is short).
    // ROLLOUT_ATTENTION_LOADS_TUNED (-1, default): the first decode step of each shape, which runs
    // eagerly, times the three on the layers' caches in turn (from memory, as a step reads them),
    // every row at the last position the generate call reaches, reading only, and keeps the fastest
    // of those whose output has 0's bits there (as tune_products does for the products); that
    // step and every later one (graphs included) use it. rollout_tuning_print lists the choices.
    int attention_loads;
    // 1: a decode step of a Llama model without q/k/v biases keeps its residual stream in bf16 and
    // runs no norm kernel inside its layers: the qkv and MLP up products run on the stream itself
    // with the norms' weights folded into their own (the engine keeps those products, W diag w,
    // refreshed after each weight update), the attention and the SwiGLU kernel scale their inputs
    // by the row's RMSNorm factor (norm(x) W^T = rstd x (W diag w)^T), and the attention and MLP
    // projections add their output to the stream in their cuBLASLt epilogue. Two launches a layer
    // fewer (a step is a chain of small launches); the tokens are those of the plain step up to
    // rounding (the stream in bf16, the folded weights rounded). Ignored with reference or
    // decode_matmul. 1 (default: SmolLM2-135M's step at B=64 took 0.993 ms against the norm
    // kernels' 1.101 on an H200); 0 runs the norm kernels.
    int fold_norms;
} RolloutOptions;

#define ROLLOUT_MAX_BRANCHES 4
// RolloutOptions.attention_loads
#define ROLLOUT_ATTENTION_LOADS_TUNED (-1)
#define ROLLOUT_ATTENTION_LOADS_DIRECT 0
#define ROLLOUT_ATTENTION_LOADS_EARLY 1
#define ROLLOUT_ATTENTION_LOADS_STAGED 2
#define ROLLOUT_MAX_STEPS_PER_GRAPH 8

// Timings and counts of the last rollout_generate (host wall clock around GPU-synchronised work).
typedef struct {
    double prefill_seconds;    // prompts through the model up to the first sampled token
    double decode_seconds;     // every later step
    int decode_steps;
    long generated_tokens;     // sum of the result's n_tokens
    int graph_launches;        // decode steps replayed from a captured graph
    int graph_captures;
    int programmatic_edges;    // edges the captures made programmatic (RolloutOptions.pdl)
} RolloutStats;

RolloutOptions rollout_default_options(void);

// Uploads the model (bf16) and allocates the KV cache for max_seqs sequences of max_len
// positions (prompt + generated; at most the model's max_seq_len) on device 0.
RolloutEngine *rollout_create(const Model *cpu, int max_seqs, int max_len);
void rollout_free(RolloutEngine *engine);
void rollout_set_options(RolloutEngine *engine, const RolloutOptions *options);

// Copies the CPU model's parameters into the engine (the config must be the engine's).
void rollout_update_weights(RolloutEngine *engine, const Model *cpu);
// The same from fp32 parameters already on the device, laid out as Model.params (for example a
// CUDA training model's master weights): no trip through the host.
void rollout_update_weights_device(RolloutEngine *engine, const float *device_params, size_t num_parameters);

// As generate() (generate.h) for n_seq <= max_seqs prompts; every prompt plus max_new_tokens must
// fit in max_len. result is allocated here; free it with generate_result_free.
void rollout_generate(RolloutEngine *engine, const int *const *prompts, const int *prompt_lens, int n_seq,
                      const GenerateParams *params, GenerateResult *result);
void rollout_last_stats(const RolloutEngine *engine, RolloutStats *stats);
// With RolloutOptions.profile: the last rollout_generate's replayed decode steps, time per kernel
// group (summed over the layers) per step, as a table on out. Each event node adds time of its
// own (a few microseconds on an H100); given the step time of the same generation without the
// profile (plain_step_ms, ms per decode step; 0 when unknown) the table also lists each group
// with that share taken off. Returns the number of steps profiled (0: a line says so).
int rollout_profile_print(const RolloutEngine *engine, double plain_step_ms, FILE *out);
// The product shapes the rollout engines of this process have tuned (RolloutOptions.tune_products),
// one line each: the shape, the candidates, the choice, and its time against the first choice's;
// then the decode attention's shapes (RolloutOptions.attention_loads tuned): each variant's time
// and the choice.
void rollout_tuning_print(FILE *out);
// The fp32 logits (vocab_size floats) that the sampler last read for one row of its batch: the
// last prefill chunk's, or the last decode step's. For tests of the sampler against the softmax
// of exactly what it sampled from.
void rollout_last_logits(const RolloutEngine *engine, int row, float *out);

// One call: an engine sized for this request, generate, free.
void generate_cuda(Model *model, const int *const *prompts, const int *prompt_lens, int n_seq,
                   const GenerateParams *params, GenerateResult *result);

#ifdef __cplusplus
}
#endif
#endif
