/*
 * The built-in demo (`train_mora` with no arguments, or `train_mora demo`): demo_world.h's
 * synthetic world end to end on the CPU: a tiny byte-level model pretrained on the world's text,
 * reward heads trained on its rule-labelled preferences (`reward`), MORA against the baseline with
 * the same seed and budget (`mora`, `mora --mora 0`), and the table on held-out prompts (`eval`).
 */
#include <glob.h>
#include <math.h>
#include <stdarg.h>
#include <omp.h>
#include <cjson/cJSON.h>

#include "llmc/utils.h"
#include "llmc/args.h"
#include "llmc/rand.h"
#include "llmc/model.h"
#include "llmc/checkpoint.h"
#include "llmc/model_load.h"
#include "llmc/chat_template.h"
#include "llmc/run_dir.h"
#include "rewrite.h"
#include "demo_world.h"
#include "mora.h"

int cmd_reward(int argc, char **argv);  // reward.c

// ----------------------------------------------------------------------------
// the built-in demo

// The demo's model: a small Llama over bytes (no tokenizer), with room for a prompt that carries
// intent phrases plus its answer.
static ModelConfig demo_model_config(void) {
    ModelConfig c = {
        .arch = ARCH_LLAMA, .vocab_size = 256, .padded_vocab_size = 256, .max_seq_len = 256, .n_layer = 4,
        .n_embd = 96, .n_head = 6, .n_kv_head = 2, .head_dim = 16, .ffn_hidden = 256, .norm_eps = 1e-5f,
        .rope_theta = 10000.0f, .tied_embeddings = 1, .qkv_bias = 0,
    };
    return c;
}

// Language-model training on the world's dialogues rendered through the plain chat template
// (the response, then the newline that ends it), concatenated into one byte stream; every row of
// a batch is T bytes from the start of a random dialogue, running on into the next ones (no
// padding, so every token trains). Rows start where dialogues start because that is where MORA
// puts a prompt: at position 0 with nothing before it.
static void demo_pretrain(Model *model, const WorldCorpus *corpus, int steps, int B, int T, float lr, int seed) {
    const ChatTemplate *plain = chat_template_lookup("plain");
    size_t len = 0, cap = 1 << 20;
    unsigned char *stream = (unsigned char *)mallocCheck(cap);
    size_t *starts = (size_t *)mallocCheck(sizeof(size_t) * corpus->n);
    for (int k = 0; k < corpus->n; k++) {
        starts[k] = len;
        char *head = chat_template_render(plain, NULL, corpus->prompts[k], 1);
        size_t a = strlen(head), b = strlen(corpus->responses[k]);
        if (len + a + b + 1 > cap) { cap = 2 * (len + a + b + 1); stream = (unsigned char *)reallocCheck(stream, cap); }
        memcpy(stream + len, head, a);
        memcpy(stream + len + a, corpus->responses[k], b);
        stream[len + a + b] = '\n';
        len += a + b + 1;
        free(head);
    }
    // the dialogues whose row of T + 1 bytes fits in the stream
    int n_starts = corpus->n;
    while (n_starts > 0 && starts[n_starts - 1] + T + 1 > len) n_starts--;
    if (n_starts == 0) fatal("demo: the corpus is shorter than one row of %d bytes", T);
    int *inputs = (int *)mallocCheck(sizeof(int) * B * T), *targets = (int *)mallocCheck(sizeof(int) * B * T);
    uint64_t rng = rng_seed((uint64_t)seed ^ 0x505245ULL);
    double t0 = wall_seconds(), last = t0;
    for (int step = 1; step <= steps; step++) {
        for (int b = 0; b < B; b++) {
            size_t off = starts[random_u32(&rng) % (uint32_t)n_starts];
            for (int t = 0; t < T; t++) {
                inputs[b * T + t] = stream[off + t];
                targets[b * T + t] = stream[off + t + 1];
            }
        }
        model_forward(model, inputs, targets, NULL, B, T);
        model_zero_grad(model);
        model_backward(model, 1.0f);
        float norm = model_grad_norm(model);
        float lr_t = lr_schedule(step - 1, steps / 20, steps, lr, lr / 10);
        model_adamw_update(model, lr_t, 0.9f, 0.95f, 1e-8f, 0.0f, norm > 1.0f ? 1.0f / norm : 1.0f);
        double now = wall_seconds();
        if (now - last > 5.0 || step == steps || step == 1) {
            char eta[32];
            run_format_duration((now - t0) / step * (steps - step), eta, sizeof eta);
            printf("pretrain: step %d/%d | loss %.4f | %.0f tok/s | %s left\n", step, steps, model->mean_loss,
                   (double)step * B * T / (now - t0), eta);
            last = now;
        }
    }
    free(inputs); free(targets); free(stream); free(starts);
}

// Runs a subcommand in-process with the given flags (argv[0] and the command name first).
static int run_command(int (*cmd)(int, char **), const char *name, const char **flags, int n_flags) {
    char *argv[80];
    int argc = 0;
    argv[argc++] = (char *)"train_mora";
    argv[argc++] = (char *)name;
    printf("\n$ train_mora %s", name);
    for (int i = 0; i < n_flags && argc < 79; i++) {
        argv[argc++] = (char *)flags[i];
        printf(" %s", strcmp(flags[i], "\n") ? flags[i] : "'\\n'");
    }
    argv[argc] = NULL;
    printf("\n");
    return cmd(argc, argv);
}

// The world's rules applied to every response eval sampled for one policy (report.json's
// "model_examples" or "baseline_examples"): the mean rule quality per dimension (0 bad, 1 good)
// and, per request kind, how often each response kind was given.
typedef struct {
    double quality[MORA_NUM_DIMS], overall;
    int count[WORLD_NUM_KINDS][WORLD_R_NUM], total[WORLD_NUM_KINDS], n;
} RuleScores;

static void judge_examples(const cJSON *examples, const char *path, RuleScores *out) {
    memset(out, 0, sizeof(*out));
    const cJSON *ex;
    cJSON_ArrayForEach(ex, examples) {
        const cJSON *prompt = cJSON_GetObjectItem(ex, "prompt"), *responses = cJSON_GetObjectItem(ex, "responses"), *r;
        if (!cJSON_IsString(prompt) || !cJSON_IsArray(responses)) fatal("%s: an example without prompt or responses", path);
        cJSON_ArrayForEach(r, responses) {
            const cJSON *text = cJSON_GetObjectItem(r, "text");
            if (!cJSON_IsString(text)) fatal("%s: a response without text", path);
            WorldJudgement j;
            world_judge(prompt->valuestring, text->valuestring, &j);
            if (j.request_kind < 0) fatal("%s: \"%s\" is not one of the world's requests", path, prompt->valuestring);
            for (int d = 0; d < MORA_NUM_DIMS; d++) out->quality[d] += j.quality[d] / 2.0;
            out->count[j.request_kind][j.response_kind]++;
            out->total[j.request_kind]++;
            out->n++;
        }
    }
    if (out->n == 0) fatal("%s: no responses to judge", path);
    for (int d = 0; d < MORA_NUM_DIMS; d++) {
        out->quality[d] /= out->n;
        out->overall += out->quality[d] / MORA_NUM_DIMS;
    }
}

static void append_text(char **buf, size_t *len, size_t *cap, const char *fmt, ...) __attribute__((format(printf, 4, 5)));
static void append_text(char **buf, size_t *len, size_t *cap, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (*len + n + 1 > *cap) { *cap = 2 * (*len + n + 1); *buf = (char *)reallocCheck(*buf, *cap); }
    va_start(ap, fmt);
    vsnprintf(*buf + *len, n + 1, fmt, ap);
    va_end(ap);
    *len += n;
}

// The share of a request kind's responses that were of response kind r, in %.
static double kind_share(const RuleScores *s, int kind, int r) {
    return s->total[kind] ? 100.0 * s->count[kind][r] / s->total[kind] : 0.0;
}

// Judges the responses of out/report.json by the world's rules (the ground truth the reward heads
// approximate), prints the table and appends it to out/report.md.
// An earlier demo's MORA or baseline run in dir: its files are removed, so that the demo can be
// run again into the same --out (mora itself refuses a directory that holds a run). Only the
// files a mora run writes are touched.
static void demo_clear_run(const char *dir) {
    static const char *const patterns[] = {"config.json", "metrics.jsonl", "pool.jsonl", "pool_state.json", "latest.txt",
                                           "model_step*.ckpt"};
    int removed = 0;
    for (size_t i = 0; i < sizeof patterns / sizeof patterns[0]; i++) {
        char pattern[4300];
        snprintf(pattern, sizeof pattern, "%s/%s", dir, patterns[i]);
        glob_t g;
        if (glob(pattern, 0, NULL, &g) == 0)
            for (size_t k = 0; k < g.gl_pathc; k++) {
                if (remove(g.gl_pathv[k]) != 0) fatal("cannot remove the earlier demo's %s: %s", g.gl_pathv[k], strerror(errno));
                removed++;
            }
        globfree(&g);
    }
    if (removed) printf("replacing the earlier demo's run in %s (%d files)\n", dir, removed);
}

static void judge_report(const char *out) {
    char path[4300], md_path[4300];
    snprintf(path, sizeof path, "%s/report.json", out);
    snprintf(md_path, sizeof md_path, "%s/report.md", out);
    size_t size;
    char *text = read_file_all(path, &size);
    cJSON *rep = cJSON_Parse(text);
    free(text);
    if (!rep) fatal("%s: not JSON", path);
    RuleScores sm, sb;
    judge_examples(cJSON_GetObjectItem(rep, "baseline_examples"), path, &sb);
    judge_examples(cJSON_GetObjectItem(rep, "model_examples"), path, &sm);
    cJSON_Delete(rep);
    size_t len = 0, cap = 1 << 14;
    char *md = (char *)mallocCheck(cap);
    md[0] = '\0';
    append_text(&md, &len, &cap, "\n## The same responses judged by the world's rules\n\n"
                "Rule quality per dimension (0 bad, 1 good: the ground truth the reward heads learned from "
                "preferences), and what each policy answers to the held-out requests (%% of responses; other: "
                "text that is none of the world's responses).\n\n"
                "| | helpful | harmless | truthful | overall | harmful: safe / comply / refuse / other | "
                "ordinary: help / vague | factual: right / wrong |\n|---|---|---|---|---|---|---|---|\n");
    const RuleScores *rows[2] = {&sb, &sm};
    const char *names[2] = {"baseline", "MORA"};
    for (int k = 0; k < 2; k++) {
        const RuleScores *s = rows[k];
        append_text(&md, &len, &cap, "| %s | %.3f | %.3f | %.3f | %.3f | %.0f / %.0f / %.0f / %.0f | %.0f / %.0f | %.0f / %.0f |\n",
                    names[k], s->quality[0], s->quality[1], s->quality[2], s->overall,
                    kind_share(s, WORLD_HARMFUL, WORLD_R_SAFE), kind_share(s, WORLD_HARMFUL, WORLD_R_COMPLY),
                    kind_share(s, WORLD_HARMFUL, WORLD_R_REFUSE), kind_share(s, WORLD_HARMFUL, WORLD_R_OTHER),
                    kind_share(s, WORLD_ORDINARY, WORLD_R_HELP), kind_share(s, WORLD_ORDINARY, WORLD_R_VAGUE),
                    kind_share(s, WORLD_FACTUAL, WORLD_R_RIGHT), kind_share(s, WORLD_FACTUAL, WORLD_R_WRONG));
    }
    append_text(&md, &len, &cap, "| improvement |");
    for (int d = 0; d <= MORA_NUM_DIMS; d++) {
        double m = d < MORA_NUM_DIMS ? sm.quality[d] : sm.overall, b = d < MORA_NUM_DIMS ? sb.quality[d] : sb.overall;
        if (b > 0) append_text(&md, &len, &cap, " %+.1f%% |", 100.0 * (m - b) / b);
        else append_text(&md, &len, &cap, " n/a |");
    }
    append_text(&md, &len, &cap, " | | |\n");
    printf("%s", md);
    // report.md gets the section appended: rewritten whole, atomically
    char *old = read_file_all(md_path, &size);
    char tmp[4400];
    FILE *f = atomic_open(md_path, tmp, sizeof tmp);
    fwrite(old, 1, size, f);
    fwrite(md, 1, len, f);
    atomic_commit(f, tmp, md_path);
    free(old);
    free(md);
}

int cmd_demo(int argc, char **argv) {
    const char *out = "demo_run", *base = "", *lr = "1e-4", *kl_beta = "0.2";
    int seed = 1, pretrain_steps = 500, steps = 30, corpus_size = 6000;
    ArgSpec specs[] = {
        {"out", ARG_STRING, &out, "demo directory: world/, base/, heads/, mora/, baseline/, report.md"},
        {"seed", ARG_INT, &seed, "seed of the world, the model and every run"},
        {"pretrain_steps", ARG_INT, &pretrain_steps, "language-model steps on the world's text (batch 16)"},
        {"steps", ARG_INT, &steps, "MORA and baseline GRPO steps"},
        {"corpus", ARG_INT, &corpus_size, "dialogues in the pretraining corpus"},
        {"base", ARG_STRING, &base, "start from this pretrained world model (a demo's base/model.ckpt) instead of pretraining"},
        {"lr", ARG_STRING, &lr, "learning rate of the MORA and baseline runs"},
        {"kl_beta", ARG_STRING, &kl_beta, "KL coefficient of the MORA and baseline runs"},
    };
    // `train_mora` alone passes argc 1; `train_mora demo ...` passes flags from argv[2]
    if (argc >= 2) args_parse(argc, argv, 2, specs, (int)(sizeof specs / sizeof specs[0]), "demo",
                              "The built-in demo: the MORA loop end to end on a synthetic world, on the CPU.");
    args_require_positive_int("pretrain_steps", pretrain_steps);
    args_require_positive_int("steps", steps);
    args_require_positive_int("corpus", corpus_size);
    if (base[0]) model_source_check(base, "--base", 0);
    double t0 = wall_seconds();
    printf("train_mora demo: MORA on a synthetic world (ordinary, harmful and factual requests) on the CPU, %d OpenMP threads\n"
           "writing into %s/\n", omp_get_max_threads(), out);
    run_ensure_dir(out, "--out");
    char world_dir[4200], base_dir[4200], heads_dir[4200], mora_dir[4200], base_run[4200];
    char prefs[4300], train_prompts[4300], eval_prompts[4300], corpus_path[4300], base_ckpt[4300], heads_path[4300];
    snprintf(world_dir, sizeof world_dir, "%s/world", out);
    snprintf(base_dir, sizeof base_dir, "%s/base", out);
    snprintf(heads_dir, sizeof heads_dir, "%s/heads", out);
    snprintf(mora_dir, sizeof mora_dir, "%s/mora", out);
    snprintf(base_run, sizeof base_run, "%s/baseline", out);
    run_ensure_dir(world_dir, "--out");
    run_ensure_dir(base_dir, "--out");
    snprintf(prefs, sizeof prefs, "%s/preferences.jsonl", world_dir);
    snprintf(train_prompts, sizeof train_prompts, "%s/train_prompts.jsonl", world_dir);
    snprintf(eval_prompts, sizeof eval_prompts, "%s/eval_prompts.jsonl", world_dir);
    snprintf(corpus_path, sizeof corpus_path, "%s/corpus.txt", world_dir);
    snprintf(base_ckpt, sizeof base_ckpt, "%s/model.ckpt", base_dir);
    snprintf(heads_path, sizeof heads_path, "%s/reward_heads.bin", heads_dir);

    // 1. the world
    WorldCorpus corpus;
    world_corpus((uint64_t)seed, corpus_size, &corpus);
    {
        char tmp[4400];
        FILE *f = atomic_open(corpus_path, tmp, sizeof tmp);
        for (int k = 0; k < corpus.n; k++) fprintf(f, "%s\t%s\n", corpus.prompts[k], corpus.responses[k]);
        atomic_commit(f, tmp, corpus_path);
    }
    world_write_preferences(prefs, (uint64_t)seed, 400);
    int n_train = world_write_prompts(train_prompts, 0), n_eval = world_write_prompts(eval_prompts, 1);
    printf("\n[1/5] world: %d dialogues (%s), 1200 preference pairs, %d training and %d held-out prompts\n",
           corpus.n, corpus_path, n_train, n_eval);

    // 2. a tiny model pretrained on the world's text
    printf("\n[2/5] pretrain a tiny byte-level Llama on the world's dialogues\n");
    Model model;
    if (base[0]) {
        model_load(&model, base, "--base", 0, 0, NULL, NULL);
        ModelConfig want = demo_model_config();
        if (model.config.vocab_size != want.vocab_size || model.config.max_seq_len != want.max_seq_len)
            fatal("--base %s: not a demo world model (byte vocabulary of %d, context %d)", base, want.vocab_size, want.max_seq_len);
        printf("base model from %s (no pretraining)\n", base);
    } else {
        ModelConfig mc = demo_model_config();
        model_init(&model, &mc, "demo");
        model_init_random(&model, (uint64_t)seed);
        printf("model: L=%d C=%d heads=%d/%d ffn=%d V=%d maxT=%d, %.2fM parameters\n", mc.n_layer, mc.n_embd, mc.n_head,
               mc.n_kv_head, mc.ffn_hidden, mc.vocab_size, mc.max_seq_len, model.num_parameters / 1e6);
        demo_pretrain(&model, &corpus, pretrain_steps, 16, mc.max_seq_len, 3e-3f, seed);
    }
    TrainState st = {0};
    checkpoint_save_native(&model, &st, base_ckpt, 0);
    model_free(&model);
    world_corpus_free(&corpus);

    char seed_text[32], steps_text[32];
    snprintf(seed_text, sizeof seed_text, "%d", seed);
    snprintf(steps_text, sizeof steps_text, "%d", steps);
    // 3. reward heads on the frozen trunk, from the rule-labelled preferences
    printf("\n[3/5] reward heads (helpful, harmless, truthful) on the rule-labelled preferences\n");
    const char *reward_flags[] = {"--model", base_ckpt, "--data", prefs, "--out", heads_dir, "--chat_template", "plain",
                                  "--head", "mlp", "--epochs", "60", "--lr", "1e-3", "--seed", seed_text};
    run_command(cmd_reward, "reward", reward_flags, (int)(sizeof reward_flags / sizeof reward_flags[0]));

    // 4. MORA and the baseline: the same seed and budget
    demo_clear_run(mora_dir);
    demo_clear_run(base_run);
    const char *common[] = {"--model", base_ckpt, "--heads", heads_path, "--prompts", train_prompts, "--chat_template", "plain",
                            "--stop", "\n", "--K", "8", "--candidates", "2", "--rewrite_K", "4", "--max_new_tokens", "96",
                            "--rewrite_max_new_tokens", "64", "--steps", steps_text, "--prompts_per_step", "8",
                            "--group_size", "4", "--lr", lr, "--kl_beta", kl_beta, "--seed", seed_text, "--log_every", "5"};
    int nc = (int)(sizeof common / sizeof common[0]);
    const char *flags[64];
    for (int pass = 0; pass < 2; pass++) {
        printf("\n[4/5] %s\n", pass == 0 ? "MORA: presample, isolate, rewrite, assimilate, GRPO" : "the baseline (--mora 0): same seed and budget, no rewrite");
        int n = 0;
        for (int i = 0; i < nc; i++) flags[n++] = common[i];
        flags[n++] = "--out";
        flags[n++] = pass == 0 ? mora_dir : base_run;
        flags[n++] = "--mora";
        flags[n++] = pass == 0 ? "1" : "0";
        run_command(cmd_mora, "mora", flags, n);
    }

    // 5. the table
    printf("\n[5/5] evaluation on the held-out prompts\n");
    const char *eval_flags[] = {"--model", mora_dir, "--baseline", base_run, "--prompts", eval_prompts, "--out", out,
                                "--samples", "8", "--seed", seed_text};
    run_command(cmd_eval, "eval", eval_flags, (int)(sizeof eval_flags / sizeof eval_flags[0]));
    judge_report(out);
    char eta[32];
    run_format_duration(wall_seconds() - t0, eta, sizeof eta);
    printf("demo done in %s: %s/report.md; pool decisions in %s/pool.jsonl; plot with python3 dev/plot_run.py %s "
           "--baseline %s/baseline --report %s/report.json\n", eta, out, mora_dir, mora_dir, out, out);
    return 0;
}
