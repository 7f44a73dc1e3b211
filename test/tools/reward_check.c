/*
 * reward_check: the reward heads library from the command line, for test/test_reward_heads.py.
 *
 *   reward_check fd                           finite-difference check, in double, of the heads'
 *                                             backward (linear, mlp gelu, mlp relu) through the
 *                                             Bradley-Terry loss; exits 1 on a mismatch
 *   reward_check init KIND ACT C H SEED OUT   reward_heads_init_random + reward_heads_save
 *   reward_check grad HEADS IN.json OUT.json  loss and gradients on given hidden states
 *   reward_check affine HEADS DIM SCALE SHIFT OUT
 *                                             reward_heads_affine on head DIM, saved to OUT
 *   reward_check save_hf PRESET SEED DIR      a randomly initialised preset as a Hugging Face dir
 *   reward_check score MODEL HEADS IN.json OUT.json
 *                                             scores sequences in one padded batch and one by one
 *   reward_check prompts FILE.jsonl SKIP_BAD OUT.json
 *                                             promptdata_load: {"records": [{prompt, id, line}],
 *                                             "skipped"}
 *
 * grad: IN.json {"hidden": [[C floats] x N], "pairs": [[chosen_row, rejected_row, dim] x K]}.
 *   OUT.json {"rewards": (N, 3) every head on every row, "loss": mean Bradley-Terry loss over
 *   the pairs (pair k uses head dim_k), "grads": the gradient of that loss in the heads' buffer
 *   layout, "dhidden": (N, C) its gradient with respect to the hidden rows}.
 * score: MODEL is a checkpoint path or a preset (random init, seed 0); IN.json {"seqs": [[ids]]}.
 *   OUT.json {"C", "batch_rewards": (B, 3) from one right-padded forward, "single_rewards":
 *   (B, 3) from one forward per sequence, "batch_hidden" / "single_hidden": (B, C) the hidden
 *   states the heads read}.
 * Every output file is written to a temporary file and renamed.
 */
#include <math.h>
#include <cjson/cJSON.h>

#include "utils.h"
#include "rand.h"
#include "model.h"
#include "checkpoint.h"
#include "reward_heads.h"
#include "prefdata.h"

static void usage(void) {
    fprintf(stderr,
            "usage: reward_check fd\n"
            "       reward_check init linear|mlp gelu|relu C H SEED OUT.bin\n"
            "       reward_check grad HEADS.bin IN.json OUT.json\n"
            "       reward_check affine HEADS.bin DIM SCALE SHIFT OUT.bin\n"
            "       reward_check save_hf PRESET SEED DIR\n"
            "       reward_check score MODEL HEADS.bin IN.json OUT.json\n"
            "       reward_check prompts FILE.jsonl 0|1 OUT.json\n");
    exit(2);
}

static void write_json(const char *path, cJSON *obj) {
    char *text = cJSON_PrintUnformatted(obj);
    if (text == NULL) fatal("out of memory formatting %s", path);
    char tmp[4200];
    FILE *f = atomic_open(path, tmp, sizeof tmp);
    fwrite_check(text, 1, strlen(text), f, path);
    atomic_commit(f, tmp, path);
    free(text);
}

static cJSON *float_array(const float *x, size_t n) {
    cJSON *a = cJSON_CreateArray();
    for (size_t i = 0; i < n; i++) cJSON_AddItemToArray(a, cJSON_CreateNumber(x[i]));
    return a;
}

static cJSON *load_json(const char *path) {
    char *text = read_file_all(path, NULL);
    cJSON *obj = cJSON_Parse(text);
    if (obj == NULL) fatal("%s: not valid JSON", path);
    free(text);
    return obj;
}

// ---------------------------------------------------------------------------------------------
// fd

// The mean Bradley-Terry loss over pairs (rows 2k, 2k+1 of hidden, head dims[2k]), in double.
static double pairs_loss(const RewardHeads *heads, const float *hidden, const int *dims, int K) {
    double *rc = (double *)mallocCheck(K * sizeof(double)), *rr = (double *)mallocCheck(K * sizeof(double));
    for (int k = 0; k < K; k++) {
        rc[k] = reward_head_value(heads, dims[2 * k], hidden + (size_t)(2 * k) * heads->C);
        rr[k] = reward_head_value(heads, dims[2 * k], hidden + (size_t)(2 * k + 1) * heads->C);
    }
    double loss = bradley_terry_loss(rc, rr, K, NULL, NULL);
    free(rc);
    free(rr);
    return loss;
}

// 1 when some mlp pre-activation changes sign between the two parameter/hidden settings that
// the caller has just evaluated: a central difference across a ReLU kink is not a derivative.
static int relu_kink_between(const RewardHeads *heads, const float *hidden, const int *dims, int K,
                             float *slot, float lo, float hi) {
    if (heads->kind != REWARD_HEAD_MLP || heads->activation != REWARD_ACT_RELU) return 0;
    float saved = *slot;
    int C = heads->C, H = heads->H, crossed = 0;
    for (int n = 0; n < 2 * K && !crossed; n++) {
        const float *p = reward_head_params(heads, dims[n]);
        for (int j = 0; j < H && !crossed; j++) {
            double a[2];
            for (int s = 0; s < 2; s++) {
                *slot = s ? hi : lo;
                double acc = p[(size_t)H * C + j];
                for (int c = 0; c < C; c++) acc += (double)p[(size_t)j * C + c] * hidden[(size_t)n * C + c];
                a[s] = acc;
            }
            crossed = (a[0] > 0) != (a[1] > 0);
        }
    }
    *slot = saved;
    return crossed;
}

// Central differences of the loss with respect to one float slot: the perturbed values are
// rounded to float, so the step actually taken (hi - lo) is used, in double.
static double central_difference(RewardHeads *heads, float *hidden, const int *dims, int K, float *slot,
                                 double step, int *kink) {
    float saved = *slot;
    float hi = (float)(saved + step), lo = (float)(saved - step);
    *kink = relu_kink_between(heads, hidden, dims, K, slot, lo, hi);
    *slot = hi;
    double lp = pairs_loss(heads, hidden, dims, K);
    *slot = lo;
    double lm = pairs_loss(heads, hidden, dims, K);
    *slot = saved;
    return (lp - lm) / ((double)hi - (double)lo);
}

// One configuration: analytic gradients of the loss against central differences on every
// parameter and every hidden entry. Returns the number of mismatches.
static int fd_case(RewardHeadKind kind, RewardHeadActivation act, int C, int H, int K, uint64_t seed) {
    RewardHeads heads;
    reward_heads_init(&heads, kind, act, C, H);
    uint64_t rng = rng_seed(seed);
    // random parameters everywhere (biases too), so no gradient is trivially zero
    for (size_t i = 0; i < heads.num_parameters; i++) heads.params[i] = 0.3f * random_normal(&rng);
    int N = 2 * K;
    float *hidden = (float *)mallocCheck((size_t)N * C * sizeof(float));
    int *dims = (int *)mallocCheck((size_t)N * sizeof(int));
    for (size_t i = 0; i < (size_t)N * C; i++) hidden[i] = random_normal(&rng);
    for (int k = 0; k < K; k++) dims[2 * k] = dims[2 * k + 1] = (int)(random_u32(&rng) % MORA_NUM_DIMS);

    // analytic: Bradley-Terry gradient at the rewards, then the heads' backward
    double *rc = (double *)mallocCheck(K * sizeof(double)), *rr = (double *)mallocCheck(K * sizeof(double));
    double *dc = (double *)mallocCheck(K * sizeof(double)), *dr = (double *)mallocCheck(K * sizeof(double));
    for (int k = 0; k < K; k++) {
        rc[k] = reward_head_value(&heads, dims[2 * k], hidden + (size_t)(2 * k) * C);
        rr[k] = reward_head_value(&heads, dims[2 * k], hidden + (size_t)(2 * k + 1) * C);
    }
    bradley_terry_loss(rc, rr, K, dc, dr);
    float *drewards = (float *)mallocCheck((size_t)N * sizeof(float));
    for (int k = 0; k < K; k++) { drewards[2 * k] = (float)dc[k]; drewards[2 * k + 1] = (float)dr[k]; }
    float *dhidden = (float *)callocCheck((size_t)N * C, sizeof(float));
    reward_heads_zero_grad(&heads);
    reward_heads_backward(&heads, hidden, dims, drewards, N, dhidden);

    const double step = 1e-4;
    int bad = 0, checked = 0, kinks = 0;
    double max_err = 0.0;
    for (int which = 0; which < 2; which++) {
        size_t count = which == 0 ? heads.num_parameters : (size_t)N * C;
        for (size_t i = 0; i < count; i++) {
            float *slot = which == 0 ? &heads.params[i] : &hidden[i];
            double analytic = which == 0 ? heads.grads[i] : dhidden[i];
            int kink;
            double fd = central_difference(&heads, hidden, dims, K, slot, step, &kink);
            if (kink) { kinks++; continue; }
            // the analytic value is stored in float: allow its rounding plus the O(step^2) term;
            // the 1e-4 floor keeps entries near zero from dividing by almost nothing
            double err = fabs(fd - analytic) / (1e-4 + fabs(fd));
            if (err > 1e-4) {
                if (bad < 5) printf("  mismatch %s[%zu]: fd %.10g analytic %.10g\n", which ? "dhidden" : "grads", i, fd, analytic);
                bad++;
            }
            if (err > max_err) max_err = err;
            checked++;
        }
    }
    printf("fd %-6s %-4s C=%d H=%d pairs=%d: %d entries checked, %d skipped at a ReLU kink, max rel err %.2e, %d mismatches\n",
           reward_head_kind_name(kind), kind == REWARD_HEAD_MLP ? reward_head_activation_name(act) : "-", C,
           heads.H, K, checked, kinks, max_err, bad);
    if (checked < 100) { printf("  too few entries checked\n"); bad++; }
    free(rc); free(rr); free(dc); free(dr); free(drewards); free(dhidden); free(hidden); free(dims);
    reward_heads_free(&heads);
    return bad;
}

static int cmd_fd(void) {
    int bad = 0;
    bad += fd_case(REWARD_HEAD_LINEAR, REWARD_ACT_GELU, 24, 0, 12, 1);
    bad += fd_case(REWARD_HEAD_MLP, REWARD_ACT_GELU, 16, 12, 10, 2);
    bad += fd_case(REWARD_HEAD_MLP, REWARD_ACT_RELU, 16, 12, 10, 3);
    printf(bad ? "FAILED\n" : "OK\n");
    return bad ? 1 : 0;
}

// ---------------------------------------------------------------------------------------------
// grad

static int cmd_grad(const char *heads_path, const char *in_path, const char *out_path) {
    RewardHeads heads;
    reward_heads_load(&heads, heads_path, 0);
    int C = heads.C;
    cJSON *in = load_json(in_path);
    cJSON *jh = cJSON_GetObjectItemCaseSensitive(in, "hidden"), *jp = cJSON_GetObjectItemCaseSensitive(in, "pairs");
    if (!cJSON_IsArray(jh) || !cJSON_IsArray(jp)) fatal("%s: expected arrays \"hidden\" and \"pairs\"", in_path);
    int N = cJSON_GetArraySize(jh), K = cJSON_GetArraySize(jp);
    float *hidden = (float *)mallocCheck((size_t)N * C * sizeof(float));
    for (int n = 0; n < N; n++) {
        cJSON *row = cJSON_GetArrayItem(jh, n);
        if (cJSON_GetArraySize(row) != C) fatal("%s: hidden[%d] has %d entries, the heads have C=%d", in_path, n, cJSON_GetArraySize(row), C);
        for (int c = 0; c < C; c++) hidden[(size_t)n * C + c] = (float)cJSON_GetArrayItem(row, c)->valuedouble;
    }
    // rows of the backward: pair k's chosen at 2k, rejected at 2k+1 (a hidden row may serve in
    // several pairs; its gradient is the sum)
    float *rows = (float *)mallocCheck((size_t)2 * K * C * sizeof(float));
    int *row_of = (int *)mallocCheck((size_t)2 * K * sizeof(int)), *dims = (int *)mallocCheck((size_t)2 * K * sizeof(int));
    double *rc = (double *)mallocCheck(K * sizeof(double)), *rr = (double *)mallocCheck(K * sizeof(double));
    double *dc = (double *)mallocCheck(K * sizeof(double)), *dr = (double *)mallocCheck(K * sizeof(double));
    for (int k = 0; k < K; k++) {
        cJSON *p = cJSON_GetArrayItem(jp, k);
        int ci = cJSON_GetArrayItem(p, 0)->valueint, ri = cJSON_GetArrayItem(p, 1)->valueint, d = cJSON_GetArrayItem(p, 2)->valueint;
        if (ci < 0 || ci >= N || ri < 0 || ri >= N || d < 0 || d >= MORA_NUM_DIMS) fatal("%s: pairs[%d] out of range", in_path, k);
        row_of[2 * k] = ci; row_of[2 * k + 1] = ri;
        dims[2 * k] = dims[2 * k + 1] = d;
        memcpy(rows + (size_t)(2 * k) * C, hidden + (size_t)ci * C, C * sizeof(float));
        memcpy(rows + (size_t)(2 * k + 1) * C, hidden + (size_t)ri * C, C * sizeof(float));
        rc[k] = reward_head_value(&heads, d, hidden + (size_t)ci * C);
        rr[k] = reward_head_value(&heads, d, hidden + (size_t)ri * C);
    }
    double loss = bradley_terry_loss(rc, rr, K, dc, dr);
    float *drewards = (float *)mallocCheck((size_t)2 * K * sizeof(float));
    for (int k = 0; k < K; k++) { drewards[2 * k] = (float)dc[k]; drewards[2 * k + 1] = (float)dr[k]; }
    float *drows = (float *)callocCheck((size_t)2 * K * C, sizeof(float));
    reward_heads_zero_grad(&heads);
    reward_heads_backward(&heads, rows, dims, drewards, 2 * K, drows);
    float *dhidden = (float *)callocCheck((size_t)N * C, sizeof(float));
    for (int r = 0; r < 2 * K; r++)
        for (int c = 0; c < C; c++) dhidden[(size_t)row_of[r] * C + c] += drows[(size_t)r * C + c];
    float *rewards = (float *)mallocCheck((size_t)N * MORA_NUM_DIMS * sizeof(float));
    reward_heads_forward(&heads, hidden, N, rewards);

    cJSON *out = cJSON_CreateObject();
    cJSON_AddItemToObject(out, "rewards", float_array(rewards, (size_t)N * MORA_NUM_DIMS));
    cJSON_AddNumberToObject(out, "loss", loss);
    cJSON_AddItemToObject(out, "grads", float_array(heads.grads, heads.num_parameters));
    cJSON_AddItemToObject(out, "dhidden", float_array(dhidden, (size_t)N * C));
    write_json(out_path, out);
    cJSON_Delete(out);
    cJSON_Delete(in);
    free(hidden); free(rows); free(row_of); free(dims); free(rc); free(rr); free(dc); free(dr);
    free(drewards); free(drows); free(dhidden); free(rewards);
    reward_heads_free(&heads);
    return 0;
}

// ---------------------------------------------------------------------------------------------
// score

static void load_model(Model *model, const char *name) {
    ModelConfig config;
    if (model_config_preset(name, &config)) {
        model_init(model, &config, name);
        model_init_random(model, 0);
    } else {
        checkpoint_load(model, name, NULL, NULL);
    }
}

static int cmd_score(const char *model_path, const char *heads_path, const char *in_path, const char *out_path) {
    Model model;
    load_model(&model, model_path);
    int C = model.config.n_embd;
    RewardHeads heads;
    reward_heads_load(&heads, heads_path, C);
    cJSON *in = load_json(in_path);
    cJSON *js = cJSON_GetObjectItemCaseSensitive(in, "seqs");
    if (!cJSON_IsArray(js) || cJSON_GetArraySize(js) == 0) fatal("%s: expected a non-empty array \"seqs\"", in_path);
    int B = cJSON_GetArraySize(js), T = 0;
    int *lengths = (int *)mallocCheck((size_t)B * sizeof(int));
    for (int b = 0; b < B; b++) {
        lengths[b] = cJSON_GetArraySize(cJSON_GetArrayItem(js, b));
        if (lengths[b] < 1) fatal("%s: seqs[%d] is empty", in_path, b);
        if (lengths[b] > T) T = lengths[b];
    }
    // right padding with a token id that appears nowhere else, so a leak would show
    int *inputs = (int *)mallocCheck((size_t)B * T * sizeof(int));
    int pad = model.config.vocab_size - 1;
    for (int b = 0; b < B; b++) {
        cJSON *seq = cJSON_GetArrayItem(js, b);
        for (int t = 0; t < T; t++) inputs[(size_t)b * T + t] = t < lengths[b] ? cJSON_GetArrayItem(seq, t)->valueint : pad;
    }
    float *batch_rewards = (float *)mallocCheck((size_t)B * MORA_NUM_DIMS * sizeof(float));
    float *single_rewards = (float *)mallocCheck((size_t)B * MORA_NUM_DIMS * sizeof(float));
    float *batch_hidden = (float *)mallocCheck((size_t)B * C * sizeof(float));
    float *single_hidden = (float *)mallocCheck((size_t)B * C * sizeof(float));
    reward_heads_score(&heads, &model, inputs, lengths, B, T, batch_rewards, batch_hidden);
    for (int b = 0; b < B; b++)
        reward_heads_score(&heads, &model, inputs + (size_t)b * T, &lengths[b], 1, lengths[b],
                           single_rewards + (size_t)b * MORA_NUM_DIMS, single_hidden + (size_t)b * C);
    cJSON *out = cJSON_CreateObject();
    cJSON_AddNumberToObject(out, "C", C);
    cJSON_AddItemToObject(out, "batch_rewards", float_array(batch_rewards, (size_t)B * MORA_NUM_DIMS));
    cJSON_AddItemToObject(out, "single_rewards", float_array(single_rewards, (size_t)B * MORA_NUM_DIMS));
    cJSON_AddItemToObject(out, "batch_hidden", float_array(batch_hidden, (size_t)B * C));
    cJSON_AddItemToObject(out, "single_hidden", float_array(single_hidden, (size_t)B * C));
    write_json(out_path, out);
    cJSON_Delete(out);
    cJSON_Delete(in);
    free(lengths); free(inputs); free(batch_rewards); free(single_rewards); free(batch_hidden); free(single_hidden);
    reward_heads_free(&heads);
    model_free(&model);
    return 0;
}

static int cmd_prompts(const char *path, int skip_bad, const char *out_path) {
    PromptData data = {0};
    promptdata_load(&data, path, skip_bad);
    cJSON *out = cJSON_CreateObject();
    cJSON *records = cJSON_AddArrayToObject(out, "records");
    for (int i = 0; i < data.n; i++) {
        cJSON *r = cJSON_CreateObject();
        cJSON_AddStringToObject(r, "prompt", data.records[i].prompt);
        cJSON_AddStringToObject(r, "id", data.records[i].id);
        cJSON_AddNumberToObject(r, "line", data.records[i].line);
        cJSON_AddItemToArray(records, r);
    }
    cJSON_AddNumberToObject(out, "skipped", data.skipped);
    write_json(out_path, out);
    cJSON_Delete(out);
    promptdata_free(&data);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2) usage();
    const char *cmd = argv[1];
    if (!strcmp(cmd, "fd") && argc == 2) return cmd_fd();
    if (!strcmp(cmd, "init") && argc == 8) {
        int kind = reward_head_kind_from_name(argv[2]), act = reward_head_activation_from_name(argv[3]);
        if (kind < 0 || act < 0) usage();
        RewardHeads heads;
        reward_heads_init(&heads, (RewardHeadKind)kind, (RewardHeadActivation)act, atoi(argv[4]), atoi(argv[5]));
        reward_heads_init_random(&heads, (uint64_t)strtoull(argv[6], NULL, 10));
        reward_heads_save(&heads, argv[7]);
        reward_heads_free(&heads);
        return 0;
    }
    if (!strcmp(cmd, "grad") && argc == 5) return cmd_grad(argv[2], argv[3], argv[4]);
    if (!strcmp(cmd, "affine") && argc == 7) {
        RewardHeads heads;
        reward_heads_load(&heads, argv[2], 0);
        reward_heads_affine(&heads, atoi(argv[3]), strtod(argv[4], NULL), strtod(argv[5], NULL));
        reward_heads_save(&heads, argv[6]);
        reward_heads_free(&heads);
        return 0;
    }
    if (!strcmp(cmd, "save_hf") && argc == 5) {
        ModelConfig config;
        if (!model_config_preset(argv[2], &config)) fatal("unknown preset %s", argv[2]);
        Model model;
        model_init(&model, &config, argv[2]);
        model_init_random(&model, (uint64_t)strtoull(argv[3], NULL, 10));
        checkpoint_save_hf(&model, argv[4], 0);
        model_free(&model);
        return 0;
    }
    if (!strcmp(cmd, "score") && argc == 6) return cmd_score(argv[2], argv[3], argv[4], argv[5]);
    if (!strcmp(cmd, "prompts") && argc == 5) return cmd_prompts(argv[2], atoi(argv[3]), argv[4]);
    usage();
}
