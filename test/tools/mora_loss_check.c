/*
 * mora_loss_check: runs the policy losses of llmc/policy_loss.h through the C model on one case
 * and writes what test/test_mora_loss.py compares against the JAX oracle
 * (test/oracle/policy_loss_jax.py, which differentiates the objectives written directly).
 *
 *   mora_loss_check CKPT CASE.json OUT_DIR
 *
 * CKPT: anything checkpoint_load reads (a Hugging Face directory in the test).
 * CASE.json:
 *   {"mode": "ppo", "inputs": [[B][T]], "targets": [[B][T]], "mask": [[B][T]],
 *    "logp_old": [[B][T]], "logp_ref": [[B][T]], "rewards": [B], "G": int,
 *    "clip_eps": x, "kl_beta": x, "adv_eps": x}
 *   {"mode": "dpo", "inputs", "targets", "mask" (rows 2i chosen, 2i+1 rejected),
 *    "ref_seq": [B] (the reference's sequence log-probs), "beta": x}
 * Outputs (OUT_DIR, written atomically):
 *   results.json       {"loss", "logp_new" [[B][T]], "weights" [[B][T]], and for ppo "adv" [B],
 *                       "kl", "clip_frac"; for dpo "accuracy", "margin"}
 *   grads.safetensors  d loss / d parameters through model_backward_weighted, HF names/shapes
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cjson/cJSON.h>

#include "utils.h"
#include "model.h"
#include "checkpoint.h"
#include "policy_loss.h"

// Reads field `name` of the case as a (B, T) matrix (ints when as_int) into a malloc'd array.
static void *read_matrix(const cJSON *c, const char *name, int B, int T, int as_int, const char *path) {
    const cJSON *rows = cJSON_GetObjectItemCaseSensitive(c, name);
    if (!cJSON_IsArray(rows) || cJSON_GetArraySize(rows) != B) fatal("%s: field \"%s\" must be a list of %d rows", path, name, B);
    void *out = mallocCheck((size_t)B * T * 4);
    for (int b = 0; b < B; b++) {
        const cJSON *row = cJSON_GetArrayItem(rows, b);
        if (!cJSON_IsArray(row) || cJSON_GetArraySize(row) != T) fatal("%s: field \"%s\" row %d must have %d numbers", path, name, b, T);
        for (int t = 0; t < T; t++) {
            const cJSON *v = cJSON_GetArrayItem(row, t);
            if (!cJSON_IsNumber(v)) fatal("%s: field \"%s\"[%d][%d] is not a number", path, name, b, t);
            if (as_int) ((int *)out)[(size_t)b * T + t] = v->valueint;
            else ((float *)out)[(size_t)b * T + t] = (float)v->valuedouble;
        }
    }
    return out;
}

static double read_number(const cJSON *c, const char *name, const char *path) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(c, name);
    if (!cJSON_IsNumber(v)) fatal("%s: field \"%s\" must be a number", path, name);
    return v->valuedouble;
}

static cJSON *matrix_json(const float *x, int B, int T) {
    cJSON *rows = cJSON_CreateArray();
    for (int b = 0; b < B; b++) {
        cJSON *row = cJSON_CreateArray();
        for (int t = 0; t < T; t++) cJSON_AddItemToArray(row, cJSON_CreateNumber(x[(size_t)b * T + t]));
        cJSON_AddItemToArray(rows, row);
    }
    return rows;
}

int main(int argc, char **argv) {
    if (argc != 4) fatal("usage: mora_loss_check CKPT CASE.json OUT_DIR");
    const char *case_path = argv[2], *out_dir = argv[3];
    char *text = read_file_all(case_path, NULL);
    cJSON *c = cJSON_Parse(text);
    if (!cJSON_IsObject(c)) fatal("%s: not a JSON object", case_path);
    const cJSON *mode = cJSON_GetObjectItemCaseSensitive(c, "mode");
    if (!cJSON_IsString(mode)) fatal("%s: field \"mode\" must be \"ppo\" or \"dpo\"", case_path);
    const cJSON *rows = cJSON_GetObjectItemCaseSensitive(c, "inputs");
    if (!cJSON_IsArray(rows) || cJSON_GetArraySize(rows) < 1) fatal("%s: field \"inputs\" must be a non-empty list", case_path);
    int B = cJSON_GetArraySize(rows);
    int T = cJSON_GetArraySize(cJSON_GetArrayItem(rows, 0));
    int *inputs = (int *)read_matrix(c, "inputs", B, T, 1, case_path);
    int *targets = (int *)read_matrix(c, "targets", B, T, 1, case_path);
    float *mask = (float *)read_matrix(c, "mask", B, T, 0, case_path);

    Model model;
    checkpoint_load(&model, argv[1], NULL, NULL);
    model_forward(&model, inputs, targets, mask, B, T);
    size_t n = (size_t)B * T;
    float *logp_new = (float *)mallocCheck(n * sizeof(float));
    float *weights = (float *)mallocCheck(n * sizeof(float));
    for (size_t i = 0; i < n; i++) logp_new[i] = mask[i] != 0.0f ? -model.token_losses[i] : 0.0f;

    cJSON *res = cJSON_CreateObject();
    if (!strcmp(mode->valuestring, "ppo")) {
        float *logp_old = (float *)read_matrix(c, "logp_old", B, T, 0, case_path);
        float *logp_ref = (float *)read_matrix(c, "logp_ref", B, T, 0, case_path);
        int G = (int)read_number(c, "G", case_path);
        if (G < 1 || B % G != 0) fatal("%s: field \"G\" = %d must divide B = %d", case_path, G, B);
        const cJSON *r = cJSON_GetObjectItemCaseSensitive(c, "rewards");
        if (!cJSON_IsArray(r) || cJSON_GetArraySize(r) != B) fatal("%s: field \"rewards\" must have %d numbers", case_path, B);
        float *rewards = (float *)mallocCheck((size_t)B * sizeof(float)), *adv = (float *)mallocCheck((size_t)B * sizeof(float));
        for (int b = 0; b < B; b++) rewards[b] = (float)cJSON_GetArrayItem(r, b)->valuedouble;
        group_advantages(rewards, B / G, G, (float)read_number(c, "adv_eps", case_path), adv);
        PPOStats st;
        ppo_loss(logp_new, logp_old, logp_ref, mask, adv, B, T, (float)read_number(c, "clip_eps", case_path),
                 (float)read_number(c, "kl_beta", case_path), weights, &st);
        cJSON_AddNumberToObject(res, "loss", st.loss);
        cJSON_AddNumberToObject(res, "kl", st.kl);
        cJSON_AddNumberToObject(res, "clip_frac", st.clip_frac);
        cJSON_AddItemToObject(res, "adv", matrix_json(adv, 1, B));
        free(logp_old); free(logp_ref); free(rewards); free(adv);
    } else if (!strcmp(mode->valuestring, "dpo")) {
        if (B % 2 != 0) fatal("%s: dpo needs an even number of rows (chosen, rejected), got %d", case_path, B);
        const cJSON *r = cJSON_GetObjectItemCaseSensitive(c, "ref_seq");
        if (!cJSON_IsArray(r) || cJSON_GetArraySize(r) != B) fatal("%s: field \"ref_seq\" must have %d numbers", case_path, B);
        int N = B / 2;
        double *seq = (double *)mallocCheck((size_t)B * sizeof(double));
        double *pc = (double *)mallocCheck(N * sizeof(double)), *pr = (double *)mallocCheck(N * sizeof(double));
        double *rc = (double *)mallocCheck(N * sizeof(double)), *rr = (double *)mallocCheck(N * sizeof(double));
        double *dc = (double *)mallocCheck(N * sizeof(double)), *dr = (double *)mallocCheck(N * sizeof(double));
        sequence_logprobs(logp_new, mask, B, T, seq);
        for (int i = 0; i < N; i++) {
            pc[i] = seq[2 * i]; pr[i] = seq[2 * i + 1];
            rc[i] = cJSON_GetArrayItem(r, 2 * i)->valuedouble;
            rr[i] = cJSON_GetArrayItem(r, 2 * i + 1)->valuedouble;
        }
        DPOStats st;
        dpo_loss(pc, rc, pr, rr, N, (float)read_number(c, "beta", case_path), dc, dr, &st);
        // each response token of a sequence gets minus the gradient of its sequence log-prob
        for (int b = 0; b < B; b++)
            for (int t = 0; t < T; t++)
                weights[(size_t)b * T + t] = mask[(size_t)b * T + t] != 0.0f ? (float)-(b % 2 == 0 ? dc[b / 2] : dr[b / 2]) : 0.0f;
        cJSON_AddNumberToObject(res, "loss", st.loss);
        cJSON_AddNumberToObject(res, "accuracy", st.accuracy);
        cJSON_AddNumberToObject(res, "margin", st.margin);
        free(seq); free(pc); free(pr); free(rc); free(rr); free(dc); free(dr);
    } else {
        fatal("%s: field \"mode\" must be \"ppo\" or \"dpo\", got \"%s\"", case_path, mode->valuestring);
    }
    model_zero_grad(&model);
    model_backward_weighted(&model, weights, NULL);
    cJSON_AddItemToObject(res, "logp_new", matrix_json(logp_new, B, T));
    cJSON_AddItemToObject(res, "weights", matrix_json(weights, B, T));

    char path[4200], tmp[4300];
    snprintf(path, sizeof path, "%s/grads.safetensors", out_dir);
    checkpoint_save_hf_tensors(&model, model.grads, path);
    snprintf(path, sizeof path, "%s/results.json", out_dir);
    char *out = cJSON_Print(res);
    FILE *f = atomic_open(path, tmp, sizeof tmp);
    fwrite_check(out, 1, strlen(out), f, path);
    atomic_commit(f, tmp, path);
    printf("mora_loss_check: %s B=%d T=%d loss %.6f\n", mode->valuestring, B, T, cJSON_GetObjectItem(res, "loss")->valuedouble);
    free(out);
    cJSON_Delete(res);
    cJSON_Delete(c);
    free(text); free(inputs); free(targets); free(mask); free(logp_new); free(weights);
    model_free(&model);
    return 0;
}
