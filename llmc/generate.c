/*
 * CPU generation with a KV cache (see generate.h). The cached forward mirrors model_forward in
 * model.c layer by layer, on rows that each carry their own sequence and position.
 */
#include <math.h>
#include <omp.h>
#include "generate.h"
#include "ops_cpu.h"
#include "matmul.h"
#include "rand.h"
#include "utils.h"

const char *const finish_reason_names[3] = {"length", "eos", "stop"};

// Activations of one cached forward, sized for `rows` rows; grown on demand.
typedef struct {
    int rows;
    float *x, *xn, *mean, *rstd, *qkv, *atty, *tmp, *fch, *fact;
    int att_len;          // positions each thread's score buffer holds
    float *att;           // (threads, att_len)
    float *final_x;       // (rows, C) the rows that want logits, normed
} CachedScratch;

void kv_cache_init(KVCache *cache, const ModelConfig *c, int n_seq, int max_len) {
    memset(cache, 0, sizeof(*cache));
    cache->n_seq = n_seq;
    cache->max_len = max_len;
    cache->kv_dim = c->n_kv_head * c->head_dim;
    size_t n = (size_t)c->n_layer * n_seq * max_len * cache->kv_dim;
    cache->k = (float *)mallocCheck(n * sizeof(float));
    cache->v = (float *)mallocCheck(n * sizeof(float));
    cache->scratch = callocCheck(1, sizeof(CachedScratch));
}

static void scratch_free(CachedScratch *s) {
    free(s->x); free(s->xn); free(s->mean); free(s->rstd); free(s->qkv); free(s->atty);
    free(s->tmp); free(s->fch); free(s->fact); free(s->att); free(s->final_x);
    memset(s, 0, sizeof(*s));
}

void kv_cache_free(KVCache *cache) {
    free(cache->k);
    free(cache->v);
    if (cache->scratch) scratch_free((CachedScratch *)cache->scratch);
    free(cache->scratch);
    memset(cache, 0, sizeof(*cache));
}

static void scratch_reserve(CachedScratch *s, const ModelConfig *c, int rows, int max_len) {
    int threads = omp_get_max_threads();
    if (rows <= s->rows && max_len <= s->att_len) return;
    scratch_free(s);
    int C = c->n_embd, QKV = (c->n_head + 2 * c->n_kv_head) * c->head_dim, AH = c->n_head * c->head_dim;
    int FC = c->arch == ARCH_LLAMA ? 2 * c->ffn_hidden : c->ffn_hidden;
    s->rows = rows;
    s->att_len = max_len;
    s->x = (float *)mallocCheck(sizeof(float) * rows * C);
    s->xn = (float *)mallocCheck(sizeof(float) * rows * C);
    s->mean = (float *)mallocCheck(sizeof(float) * rows);
    s->rstd = (float *)mallocCheck(sizeof(float) * rows);
    s->qkv = (float *)mallocCheck(sizeof(float) * rows * QKV);
    s->atty = (float *)mallocCheck(sizeof(float) * rows * AH);
    s->tmp = (float *)mallocCheck(sizeof(float) * rows * C);
    s->fch = (float *)mallocCheck(sizeof(float) * rows * FC);
    s->fact = (float *)mallocCheck(sizeof(float) * rows * c->ffn_hidden);
    s->att = (float *)mallocCheck(sizeof(float) * threads * max_len);
    s->final_x = (float *)mallocCheck(sizeof(float) * rows * C);
}

// The model's norm (LayerNorm for GPT-2, RMSNorm for Llama) on N rows of C.
static void norm_rows(const Model *m, float *out, float *mean, float *rstd, const float *inp,
                      const float *w, const float *b, int N) {
    const ModelConfig *c = &m->config;
    if (c->arch == ARCH_GPT2) layernorm_forward(out, mean, rstd, inp, w, b, N, c->n_embd, c->norm_eps);
    else rmsnorm_forward(out, rstd, inp, w, N, c->n_embd, c->norm_eps);
}

// RoPE (rotate-half, as rope_forward in ops_cpu.c) on the q and k heads of each row of
// qkv (N, QKV), row i at position pos[i].
static void rope_rows(float *qkv, const int *pos, int N, int NH, int NKV, int HS, float theta) {
    int half = HS / 2, QKV = (NH + 2 * NKV) * HS;
    #pragma omp parallel for schedule(static)
    for (int r = 0; r < N; r++) {
        float *row = qkv + (size_t)r * QKV;
        for (int i = 0; i < half; i++) {
            double angle = (double)pos[r] * pow((double)theta, -2.0 * i / HS);
            float cs = (float)cos(angle), sn = (float)sin(angle);
            for (int h = 0; h < NH + NKV; h++) {
                float *x = row + (size_t)h * HS;
                float x1 = x[i], x2 = x[i + half];
                x[i] = x1 * cs - x2 * sn;
                x[i + half] = x2 * cs + x1 * sn;
            }
        }
    }
}

// Parameter tensor `p` of layer l.
static const float *layer_param(const Model *m, int p, int l) {
    if (m->param_ptrs[p] == NULL) return NULL;
    return m->param_ptrs[p] + (m->param_sizes[p] / m->config.n_layer) * l;
}

void model_forward_cached(Model *model, KVCache *cache, const int *tokens, const int *seq,
                          const int *pos, int N, const int *logit_rows, int n_logit_rows,
                          float *logits_out) {
    const ModelConfig *c = &model->config;
    int C = c->n_embd, NH = c->n_head, NKV = c->n_kv_head, HS = c->head_dim;
    int QKV = (NH + 2 * NKV) * HS, AH = NH * HS, KVD = cache->kv_dim, group = NH / NKV;
    int F = c->ffn_hidden, FC = c->arch == ARCH_LLAMA ? 2 * F : F;
    CachedScratch *s = (CachedScratch *)cache->scratch;
    scratch_reserve(s, c, N, cache->max_len);
    for (int i = 0; i < N; i++) {
        if (tokens[i] < 0 || tokens[i] >= c->padded_vocab_size) fatal("token id %d out of range [0, %d)", tokens[i], c->padded_vocab_size);
        if (seq[i] < 0 || seq[i] >= cache->n_seq || pos[i] < 0 || pos[i] >= cache->max_len)
            fatal("cached forward: row %d (sequence %d, position %d) outside the cache (%d x %d)", i, seq[i], pos[i], cache->n_seq, cache->max_len);
    }

    // embeddings
    const float *wte = model->param_ptrs[P_WTE], *wpe = model->param_ptrs[P_WPE];
    #pragma omp parallel for schedule(static)
    for (int i = 0; i < N; i++) {
        float *x = s->x + (size_t)i * C;
        const float *e = wte + (size_t)tokens[i] * C;
        for (int j = 0; j < C; j++) x[j] = e[j] + (wpe ? wpe[(size_t)pos[i] * C + j] : 0.0f);
    }

    float scale = 1.0f / sqrtf((float)HS);
    for (int l = 0; l < c->n_layer; l++) {
        float *kc = cache->k + (size_t)l * cache->n_seq * cache->max_len * KVD;
        float *vc = cache->v + (size_t)l * cache->n_seq * cache->max_len * KVD;
        norm_rows(model, s->xn, s->mean, s->rstd, s->x, layer_param(model, P_LN1W, l), layer_param(model, P_LN1B, l), N);
        matmul_forward(s->qkv, s->xn, layer_param(model, P_QKVW, l), layer_param(model, P_QKVB, l), N, C, QKV);
        if (c->arch == ARCH_LLAMA) rope_rows(s->qkv, pos, N, NH, NKV, HS, c->rope_theta);
        for (int i = 0; i < N; i++) {
            size_t at = ((size_t)seq[i] * cache->max_len + pos[i]) * KVD;
            memcpy(kc + at, s->qkv + (size_t)i * QKV + AH, sizeof(float) * KVD);
            memcpy(vc + at, s->qkv + (size_t)i * QKV + AH + KVD, sizeof(float) * KVD);
        }
        // attention of each row over its sequence's positions 0..pos
        #pragma omp parallel for collapse(2) schedule(dynamic, 1)
        for (int i = 0; i < N; i++) {
            for (int h = 0; h < NH; h++) {
                float *att = s->att + (size_t)omp_get_thread_num() * cache->max_len;
                const float *q = s->qkv + (size_t)i * QKV + (size_t)h * HS;
                const float *kbase = kc + (size_t)seq[i] * cache->max_len * KVD + (size_t)(h / group) * HS;
                const float *vbase = vc + (size_t)seq[i] * cache->max_len * KVD + (size_t)(h / group) * HS;
                float maxv = -INFINITY;
                for (int t = 0; t <= pos[i]; t++) {
                    const float *k = kbase + (size_t)t * KVD;
                    float dot = 0.0f;
                    for (int j = 0; j < HS; j++) dot += q[j] * k[j];
                    att[t] = dot * scale;
                    if (att[t] > maxv) maxv = att[t];
                }
                double sum = 0.0;
                for (int t = 0; t <= pos[i]; t++) { att[t] = expf(att[t] - maxv); sum += att[t]; }
                float inv = (float)(1.0 / sum);
                float *out = s->atty + (size_t)i * AH + (size_t)h * HS;
                for (int j = 0; j < HS; j++) out[j] = 0.0f;
                for (int t = 0; t <= pos[i]; t++) {
                    const float *v = vbase + (size_t)t * KVD;
                    float a = att[t] * inv;
                    for (int j = 0; j < HS; j++) out[j] += a * v[j];
                }
            }
        }
        matmul_forward(s->tmp, s->atty, layer_param(model, P_ATTPROJW, l), layer_param(model, P_ATTPROJB, l), N, AH, C);
        residual_forward(s->x, s->x, s->tmp, (size_t)N * C);
        norm_rows(model, s->xn, s->mean, s->rstd, s->x, layer_param(model, P_LN2W, l), layer_param(model, P_LN2B, l), N);
        matmul_forward(s->fch, s->xn, layer_param(model, P_FCW, l), layer_param(model, P_FCB, l), N, C, FC);
        if (c->arch == ARCH_LLAMA) swiglu_forward(s->fact, s->fch, N, F);
        else gelu_forward(s->fact, s->fch, (size_t)N * F);
        matmul_forward(s->tmp, s->fact, layer_param(model, P_FCPROJW, l), layer_param(model, P_FCPROJB, l), N, F, C);
        residual_forward(s->x, s->x, s->tmp, (size_t)N * C);
    }
    if (n_logit_rows == 0) return;
    for (int r = 0; r < n_logit_rows; r++) {
        if (logit_rows[r] < 0 || logit_rows[r] >= N) fatal("cached forward: logit row %d out of range", logit_rows[r]);
        memcpy(s->tmp + (size_t)r * C, s->x + (size_t)logit_rows[r] * C, sizeof(float) * C);
    }
    norm_rows(model, s->final_x, s->mean, s->rstd, s->tmp, model->param_ptrs[P_LNFW], model->param_ptrs[P_LNFB], n_logit_rows);
    const float *head = c->tied_embeddings ? wte : model->param_ptrs[P_LMHEAD];
    matmul_forward(logits_out, s->final_x, head, NULL, n_logit_rows, C, c->padded_vocab_size);
}

// ----------------------------------------------------------------------------
// sampling

typedef struct { float p; int id; } ProbIndex;

static int cmp_prob_desc(const void *a, const void *b) {
    float x = ((const ProbIndex *)a)->p, y = ((const ProbIndex *)b)->p;
    if (x != y) return x < y ? 1 : -1;
    return ((const ProbIndex *)a)->id - ((const ProbIndex *)b)->id;
}

int sample_token(const float *logits, int V, float temperature, int top_k, float top_p,
                 uint64_t *rng, float *logprob, float *scratch) {
    int best = 0;
    float maxv = logits[0];
    for (int v = 1; v < V; v++)
        if (logits[v] > maxv) { maxv = logits[v]; best = v; }
    double sum = 0.0;
    for (int v = 0; v < V; v++) sum += exp((double)logits[v] - maxv);
    double lse = maxv + log(sum);
    int chosen = best;
    if (temperature > 0.0f) {
        // probabilities at the temperature, then the top-k / top-p candidate set
        ProbIndex *cand = (ProbIndex *)scratch;  // 2*V floats hold V ProbIndex
        double z = 0.0;
        for (int v = 0; v < V; v++) {
            cand[v].p = (float)exp(((double)logits[v] - maxv) / temperature);
            cand[v].id = v;
            z += cand[v].p;
        }
        int n = V;
        if ((top_k > 0 && top_k < V) || top_p < 1.0f) {
            qsort(cand, (size_t)V, sizeof(ProbIndex), cmp_prob_desc);
            if (top_k > 0 && top_k < n) n = top_k;
            if (top_p < 1.0f) {
                double total = 0.0, cum = 0.0;
                for (int i = 0; i < n; i++) total += cand[i].p;
                int keep = n;
                for (int i = 0; i < n; i++) {
                    cum += cand[i].p;
                    if (cum >= top_p * total) { keep = i + 1; break; }
                }
                n = keep;
            }
            z = 0.0;
            for (int i = 0; i < n; i++) z += cand[i].p;
        }
        double r = (double)random_f32(rng) * z, cum = 0.0;
        chosen = cand[n - 1].id;
        for (int i = 0; i < n; i++) {
            cum += cand[i].p;
            if (r < cum) { chosen = cand[i].id; break; }
        }
    }
    *logprob = (float)((double)logits[chosen] - lse);
    return chosen;
}

// ----------------------------------------------------------------------------
// generate

void generate(Model *model, const int *const *prompts, const int *prompt_lens, int n_seq,
              const GenerateParams *p, GenerateResult *res) {
    const ModelConfig *c = &model->config;
    int V = c->vocab_size, Vp = c->padded_vocab_size;
    if (n_seq < 1) fatal("generate: no prompts");
    if (p->max_new_tokens < 1) fatal("generate: max_new_tokens must be positive, got %d", p->max_new_tokens);
    int max_prompt = 0;
    long total_rows = 0;
    for (int i = 0; i < n_seq; i++) {
        if (prompt_lens[i] < 1) fatal("generate: prompt %d is empty (no tokens)", i);
        // compared without the sum, which a max_new_tokens near INT_MAX would overflow
        if (p->max_new_tokens > c->max_seq_len - prompt_lens[i])
            fatal("generate: prompt %d has %d tokens; with max_new_tokens %d that exceeds the model's context of %d tokens",
                  i, prompt_lens[i], p->max_new_tokens, c->max_seq_len);
        if (prompt_lens[i] > max_prompt) max_prompt = prompt_lens[i];
        total_rows += prompt_lens[i];
    }
    int max_len = max_prompt + p->max_new_tokens;
    KVCache cache;
    kv_cache_init(&cache, c, n_seq, max_len);

    generate_result_alloc(res, n_seq, p->max_new_tokens);
    uint64_t *rngs = (uint64_t *)mallocCheck(sizeof(uint64_t) * n_seq);
    for (int i = 0; i < n_seq; i++) rngs[i] = rng_seed(p->seed + (uint64_t)i);
    // decoded text of each sequence, for stop strings
    StopText *text = (StopText *)callocCheck((size_t)n_seq, sizeof(StopText));

    // prefill: every prompt token is a row; logits of each prompt's last row
    int *rows_tok = (int *)mallocCheck(sizeof(int) * (total_rows > n_seq ? total_rows : n_seq));
    int *rows_seq = (int *)mallocCheck(sizeof(int) * (total_rows > n_seq ? total_rows : n_seq));
    int *rows_pos = (int *)mallocCheck(sizeof(int) * (total_rows > n_seq ? total_rows : n_seq));
    int *logit_rows = (int *)mallocCheck(sizeof(int) * n_seq);
    int *active = (int *)mallocCheck(sizeof(int) * n_seq);
    float *logits = (float *)mallocCheck(sizeof(float) * (size_t)n_seq * Vp);
    float *sample_scratch = (float *)mallocCheck(sizeof(float) * 2 * (size_t)V);
    int N = 0;
    for (int i = 0; i < n_seq; i++) {
        for (int t = 0; t < prompt_lens[i]; t++) {
            rows_tok[N] = prompts[i][t];
            rows_seq[N] = i;
            rows_pos[N] = t;
            N++;
        }
        logit_rows[i] = N - 1;
        active[i] = i;
    }
    int n_active = n_seq;
    model_forward_cached(model, &cache, rows_tok, rows_seq, rows_pos, N, logit_rows, n_seq, logits);

    while (n_active > 0) {
        // sample one token for each running sequence (logits row r belongs to active[r])
        int still = 0;
        for (int r = 0; r < n_active; r++) {
            int i = active[r];
            float lp;
            int tok = sample_token(logits + (size_t)r * Vp, V, p->temperature, p->top_k, p->top_p, &rngs[i], &lp, sample_scratch);
            res->tokens[i][res->n_tokens[i]] = tok;
            res->logprobs[i][res->n_tokens[i]] = lp;
            res->n_tokens[i]++;
            if (p->on_token) p->on_token(p->ctx, i, tok);
            int finish = generate_stop_check(p, &text[i], tok, res->n_tokens[i]);
            if (finish >= 0) res->finish[i] = finish;
            else active[still++] = i;
        }
        n_active = still;
        if (n_active == 0) break;
        // decode: one row per running sequence, its last sampled token at the next position
        for (int r = 0; r < n_active; r++) {
            int i = active[r];
            rows_tok[r] = res->tokens[i][res->n_tokens[i] - 1];
            rows_seq[r] = i;
            rows_pos[r] = prompt_lens[i] + res->n_tokens[i] - 1;
            logit_rows[r] = r;
        }
        model_forward_cached(model, &cache, rows_tok, rows_seq, rows_pos, n_active, logit_rows, n_active, logits);
    }
    for (int i = 0; i < n_seq; i++) stop_text_free(&text[i]);
    free(text);
    free(rows_tok); free(rows_seq); free(rows_pos); free(logit_rows); free(active);
    free(logits); free(sample_scratch); free(rngs);
    kv_cache_free(&cache);
}

void stop_text_free(StopText *t) {
    free(t->text);
    memset(t, 0, sizeof(*t));
}

// The stop rules (generate.h): stop ids, then stop strings on the decoded text, then the length.
int generate_stop_check(const GenerateParams *p, StopText *text, int tok, int n_generated) {
    for (int k = 0; k < p->n_stop_ids; k++)
        if (tok == p->stop_ids[k]) return FINISH_EOS;
    if (p->n_stop_strings > 0 && p->decode_token) {
        size_t len;
        const unsigned char *bytes = p->decode_token(p->ctx, tok, &len);
        if (text->len + len + 1 > text->cap) {
            text->cap = (text->len + len + 1) * 2;
            text->text = (char *)reallocCheck(text->text, text->cap);
        }
        memcpy(text->text + text->len, bytes, len);
        text->len += len;
        text->text[text->len] = '\0';
        for (int k = 0; k < p->n_stop_strings; k++) {
            size_t sl = strlen(p->stop_strings[k]);
            // only the tail can hold a new match: the stop string may straddle tokens
            size_t from = text->len > sl + len ? text->len - sl - len : 0;
            if (sl > 0 && strstr(text->text + from, p->stop_strings[k])) return FINISH_STOP_STRING;
        }
    }
    if (n_generated >= p->max_new_tokens) return FINISH_LENGTH;
    return -1;
}

void generate_result_alloc(GenerateResult *r, int n_seq, int max_new_tokens) {
    r->n_seq = n_seq;
    r->n_tokens = (int *)callocCheck((size_t)n_seq, sizeof(int));
    r->tokens = (int **)mallocCheck(sizeof(int *) * n_seq);
    r->logprobs = (float **)mallocCheck(sizeof(float *) * n_seq);
    r->finish = (int *)callocCheck((size_t)n_seq, sizeof(int));
    for (int i = 0; i < n_seq; i++) {
        r->tokens[i] = (int *)mallocCheck(sizeof(int) * max_new_tokens);
        r->logprobs[i] = (float *)mallocCheck(sizeof(float) * max_new_tokens);
    }
}

void generate_result_free(GenerateResult *r) {
    for (int i = 0; i < r->n_seq; i++) { free(r->tokens[i]); free(r->logprobs[i]); }
    free(r->tokens); free(r->logprobs); free(r->n_tokens); free(r->finish);
    memset(r, 0, sizeof(*r));
}
