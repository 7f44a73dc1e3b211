/*
 * Preference and prompt JSONL, and text -> token ids (see prefdata.h).
 */
#include <ctype.h>
#include <stdarg.h>
#include <cjson/cJSON.h>

#include "prefdata.h"
#include "rewrite.h"
#include "utils.h"
#include "run_dir.h"

// ---------------------------------------------------------------------------------------------
// reading JSONL line by line

// One bad line: fatal "PATH:LINE: message" (ending with the --skip_bad hint under
// PREFDATA_STOP_HINT), or under PREFDATA_SKIP a warning (the first few) and a count. Returns
// only under PREFDATA_SKIP.
static void bad_line(int bad_lines, int *skipped, const char *path, int line, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));
static void bad_line(int bad_lines, int *skipped, const char *path, int line, const char *fmt, ...) {
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (bad_lines == PREFDATA_STOP_HINT) fatal("%s:%d: %s (use --skip_bad to skip bad lines)", path, line, msg);
    if (bad_lines != PREFDATA_SKIP) fatal("%s:%d: %s", path, line, msg);
    if (*skipped < PREFDATA_MAX_WARNINGS) fprintf(stderr, "warning: %s:%d: %s (skipped)\n", path, line, msg);
    (*skipped)++;
}

static int is_blank(const char *s) {
    for (; *s; s++)
        if (!isspace((unsigned char)*s)) return 0;
    return 1;
}

// One parsed line, as the handlers see it.
typedef struct {
    const cJSON *obj;
    const char *path;
    int line;
    // the top-level members whose text holds a \u0000 escape: cJSON decodes it to a NUL byte,
    // which ends the C string there and would cut the text short without a word
    const cJSON **nul_members;
    int n_nul_members;
} JsonLine;

// The member `name` of the line's object, or NULL; one holding a \u0000 escape is reported
// through bad_line (returns NULL and sets *bad).
static const cJSON *line_member(const JsonLine *jl, const char *name, int bad_lines, int *skipped, int *bad) {
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(jl->obj, name);
    *bad = 0;
    for (int k = 0; item && k < jl->n_nul_members; k++) {
        if (jl->nul_members[k] == item) {
            bad_line(bad_lines, skipped, jl->path, jl->line,
                     "field \"%s\" contains \\u0000, a NUL character, which would cut the text short", name);
            *bad = 1;
            return NULL;
        }
    }
    return item;
}

// The string field `name`, or NULL after reporting a missing/non-string/empty field.
static const char *text_field(const JsonLine *jl, const char *name, int bad_lines, int *skipped) {
    int bad;
    const cJSON *item = line_member(jl, name, bad_lines, skipped, &bad);
    if (bad) return NULL;
    if (item == NULL) { bad_line(bad_lines, skipped, jl->path, jl->line, "missing field \"%s\"", name); return NULL; }
    if (!cJSON_IsString(item)) { bad_line(bad_lines, skipped, jl->path, jl->line, "field \"%s\" is not a string", name); return NULL; }
    if (is_blank(item->valuestring)) { bad_line(bad_lines, skipped, jl->path, jl->line, "field \"%s\" is empty", name); return NULL; }
    return item->valuestring;
}

// Marks (marks[k] = 1) the top-level members k of the valid JSON object text[0..len) whose key
// or value holds a \u0000 escape. Members are counted by the commas at depth 1; strings are
// skipped whole, so a comma or a brace inside one counts for nothing, and "\\u0000" (an escaped
// backslash, then the letters u0000) is no NUL.
static void mark_nul_members(const char *text, size_t len, unsigned char *marks) {
    int depth = 0, member = 0;
    for (size_t i = 0; i < len; i++) {
        char c = text[i];
        if (c == '"') {
            for (i++; i < len && text[i] != '"'; i++) {
                if (text[i] != '\\') continue;
                if (i + 5 < len && text[i + 1] == 'u' && memcmp(text + i + 2, "0000", 4) == 0) marks[member] = 1;
                i++;   // the escaped character
            }
        } else if (c == '{' || c == '[') {
            depth++;
        } else if (c == '}' || c == ']') {
            depth--;
        } else if (c == ',' && depth == 1) {
            member++;
        }
    }
}

// Calls handle(ctx, line) for every non-blank line of PATH that holds one JSON object and
// nothing after it but whitespace; the other lines are reported through bad_line. Lines may
// end in \n or \r\n.
typedef void (*LineHandler)(void *ctx, const JsonLine *jl);
static void for_each_json_line(const char *path, int bad_lines, int *skipped, LineHandler handle, void *ctx) {
    size_t size;
    char *text = read_file_all(path, &size);
    char *p = text, *end = text + size;
    int line = 0;
    while (p < end) {
        line++;
        char *nl = memchr(p, '\n', (size_t)(end - p));
        char *line_end = nl ? nl : end;
        size_t len = (size_t)(line_end - p);
        if (len > 0 && p[len - 1] == '\r') len--;
        p[len] = '\0';
        if (strlen(p) != len) {
            bad_line(bad_lines, skipped, path, line, "line contains a NUL byte");
        } else if (!is_blank(p)) {
            const char *value_end = NULL;
            cJSON *obj = cJSON_ParseWithLengthOpts(p, len, &value_end, 0);
            if (obj == NULL) {
                bad_line(bad_lines, skipped, path, line, "not valid JSON");
            } else if (!is_blank(value_end)) {
                // {"prompt": "a"}{"prompt": "b"} would otherwise be read as its first object alone
                while (isspace((unsigned char)*value_end)) value_end++;
                bad_line(bad_lines, skipped, path, line, "more text after the JSON value: '%.32s' (one JSON object a line)", value_end);
            } else if (!cJSON_IsObject(obj)) {
                bad_line(bad_lines, skipped, path, line, "expected a JSON object");
            } else {
                JsonLine jl = {obj, path, line, NULL, 0};
                if (strstr(p, "\\u0000") != NULL) {
                    unsigned char *marks = (unsigned char *)callocCheck(len, 1);
                    mark_nul_members(p, len, marks);
                    jl.nul_members = (const cJSON **)mallocCheck(len * sizeof(const cJSON *));
                    int k = 0;
                    for (const cJSON *m = obj->child; m; m = m->next, k++)
                        if (marks[k]) jl.nul_members[jl.n_nul_members++] = m;
                    free(marks);
                }
                handle(ctx, &jl);
                free(jl.nul_members);
            }
            cJSON_Delete(obj);
        }
        p = nl ? nl + 1 : end;
    }
    free(text);
}

// Keeps a copy of PATH in the list (records point at it).
static const char *remember_path(char ***paths, int *n_paths, const char *path) {
    *paths = (char **)reallocCheck(*paths, (size_t)(*n_paths + 1) * sizeof(char *));
    (*paths)[*n_paths] = xstrdup(path);
    return (*paths)[(*n_paths)++];
}

// ---------------------------------------------------------------------------------------------
// preferences

typedef struct {
    PrefData *data;
    int bad_lines;
} PrefCtx;

static void handle_pref(void *vctx, const JsonLine *jl) {
    PrefCtx *ctx = (PrefCtx *)vctx;
    PrefData *d = ctx->data;
    const char *path = jl->path;
    int line = jl->line;
    const char *fields[3] = {"prompt", "chosen", "rejected"};
    const char *texts[3];
    for (int k = 0; k < 3; k++) {
        texts[k] = text_field(jl, fields[k], ctx->bad_lines, &d->skipped);
        if (texts[k] == NULL) return;
    }
    int bad;
    const cJSON *dim = line_member(jl, "dim", ctx->bad_lines, &d->skipped, &bad);
    if (bad) return;
    if (dim == NULL) { bad_line(ctx->bad_lines, &d->skipped, path, line, "missing field \"dim\""); return; }
    if (!cJSON_IsString(dim)) { bad_line(ctx->bad_lines, &d->skipped, path, line, "field \"dim\" is not a string"); return; }
    int dim_index = mora_dim_from_name(dim->valuestring);
    if (dim_index < 0) {
        bad_line(ctx->bad_lines, &d->skipped, path, line, "unknown dim \"%.64s\" (expected helpful, harmless or truthful)", dim->valuestring);
        return;
    }
    if (d->n == d->cap) {
        d->cap = d->cap ? 2 * d->cap : 256;
        d->pairs = (PrefPair *)reallocCheck(d->pairs, (size_t)d->cap * sizeof(PrefPair));
    }
    PrefPair *pair = &d->pairs[d->n++];
    pair->prompt = xstrdup(texts[0]);
    pair->chosen = xstrdup(texts[1]);
    pair->rejected = xstrdup(texts[2]);
    pair->dim = dim_index;
    pair->path = d->paths[d->n_paths - 1];
    pair->line = line;
}

void prefdata_load(PrefData *data, const char *path, int bad_lines) {
    remember_path(&data->paths, &data->n_paths, path);
    int before = data->n;
    PrefCtx ctx = {data, bad_lines};
    for_each_json_line(path, bad_lines, &data->skipped, handle_pref, &ctx);
    if (data->n == before) fatal("%s: no valid preference pairs in the file", path);
}

// Calls load(data, path, bad_lines) for every file of a comma-separated list; an empty list is an
// error saying what the files were to hold.
static void load_comma_list(const char *comma_list, const char *what, void (*load)(void *, const char *, int),
                            void *data, int bad_lines) {
    char *list = xstrdup(comma_list);
    int files = 0;
    char *save = NULL;
    for (char *path = strtok_r(list, ",", &save); path; path = strtok_r(NULL, ",", &save)) {
        if (path[0] == '\0') continue;
        load(data, path, bad_lines);
        files++;
    }
    free(list);
    if (files == 0) fatal("no %s files given (expected FILE.jsonl[,FILE2.jsonl...])", what);
}

static void load_prefs(void *data, const char *path, int bad_lines) { prefdata_load((PrefData *)data, path, bad_lines); }

void prefdata_load_list(PrefData *data, const char *comma_list, int bad_lines) {
    load_comma_list(comma_list, "preference", load_prefs, data, bad_lines);
}

void prefdata_free(PrefData *data) {
    for (int i = 0; i < data->n; i++) {
        free(data->pairs[i].prompt);
        free(data->pairs[i].chosen);
        free(data->pairs[i].rejected);
    }
    free(data->pairs);
    for (int i = 0; i < data->n_paths; i++) free(data->paths[i]);
    free(data->paths);
    memset(data, 0, sizeof(*data));
}

// ---------------------------------------------------------------------------------------------
// prompts

typedef struct {
    PromptData *data;
    int bad_lines;
} PromptCtx;

static void handle_prompt(void *vctx, const JsonLine *jl) {
    PromptCtx *ctx = (PromptCtx *)vctx;
    PromptData *d = ctx->data;
    const char *path = jl->path;
    int line = jl->line;
    const char *prompt = text_field(jl, "prompt", ctx->bad_lines, &d->skipped);
    if (prompt == NULL) return;
    char id[64];
    const char *id_text = NULL;
    int bad;
    const cJSON *item = line_member(jl, "id", ctx->bad_lines, &d->skipped, &bad);
    if (bad) return;
    if (item == NULL) {
        snprintf(id, sizeof id, "%d", line);
        id_text = NULL;
    } else if (cJSON_IsString(item)) {
        if (item->valuestring[0] == '\0') { bad_line(ctx->bad_lines, &d->skipped, path, line, "field \"id\" is empty"); return; }
        id_text = item->valuestring;
    } else if (cJSON_IsNumber(item)) {
        if (item->valuedouble == (double)(long long)item->valuedouble) snprintf(id, sizeof id, "%lld", (long long)item->valuedouble);
        else snprintf(id, sizeof id, "%.17g", item->valuedouble);
        id_text = id;
    } else {
        bad_line(ctx->bad_lines, &d->skipped, path, line, "field \"id\" is not a string or a number");
        return;
    }
    if (d->n == d->cap) {
        d->cap = d->cap ? 2 * d->cap : 256;
        d->records = (PromptRecord *)reallocCheck(d->records, (size_t)d->cap * sizeof(PromptRecord));
    }
    PromptRecord *r = &d->records[d->n++];
    r->prompt = xstrdup(prompt);
    r->path = d->paths[d->n_paths - 1];
    r->line = line;
    if (id_text) {
        r->id = xstrdup(id_text);
    } else {
        // no id: the record is named by where it came from
        size_t n = strlen(path) + 32;
        r->id = (char *)mallocCheck(n);
        snprintf(r->id, n, "%s:%d", path, line);
    }
}

void promptdata_load(PromptData *data, const char *path, int bad_lines) {
    remember_path(&data->paths, &data->n_paths, path);
    int before = data->n;
    PromptCtx ctx = {data, bad_lines};
    for_each_json_line(path, bad_lines, &data->skipped, handle_prompt, &ctx);
    if (data->n == before) fatal("%s: no valid prompts in the file", path);
}

// ---------------------------------------------------------------------------------------------
// fine-tuning examples

typedef struct {
    SftData *data;
    int bad_lines;
} SftCtx;

static void handle_sft(void *vctx, const JsonLine *jl) {
    SftCtx *ctx = (SftCtx *)vctx;
    SftData *d = ctx->data;
    const char *prompt = text_field(jl, "prompt", ctx->bad_lines, &d->skipped);
    if (prompt == NULL) return;
    const char *response = text_field(jl, "response", ctx->bad_lines, &d->skipped);
    if (response == NULL) return;
    if (d->n == d->cap) {
        d->cap = d->cap ? 2 * d->cap : 256;
        d->examples = (SftExample *)reallocCheck(d->examples, (size_t)d->cap * sizeof(SftExample));
    }
    SftExample *e = &d->examples[d->n++];
    e->prompt = xstrdup(prompt);
    e->response = xstrdup(response);
    e->path = d->paths[d->n_paths - 1];
    e->line = jl->line;
}

static void load_sft(void *vdata, const char *path, int bad_lines) {
    SftData *data = (SftData *)vdata;
    remember_path(&data->paths, &data->n_paths, path);
    int before = data->n;
    SftCtx ctx = {data, bad_lines};
    for_each_json_line(path, bad_lines, &data->skipped, handle_sft, &ctx);
    if (data->n == before) fatal("%s: no valid examples in the file (one JSON object a line: {\"prompt\": ..., \"response\": ...})", path);
}

void sftdata_load_list(SftData *data, const char *comma_list, int bad_lines) {
    load_comma_list(comma_list, "example", load_sft, data, bad_lines);
}

void sftdata_free(SftData *data) {
    for (int i = 0; i < data->n; i++) {
        free(data->examples[i].prompt);
        free(data->examples[i].response);
    }
    free(data->examples);
    for (int i = 0; i < data->n_paths; i++) free(data->paths[i]);
    free(data->paths);
    memset(data, 0, sizeof(*data));
}

static uint64_t hash_string(uint64_t h, const char *s) {
    return run_hash(h, s ? s : "", s ? strlen(s) + 1 : 1);
}

uint64_t prefdata_fingerprint(const PrefData *data) {
    uint64_t h = run_hash(RUN_HASH_START, &data->n, sizeof data->n);
    for (int i = 0; i < data->n; i++) {
        const PrefPair *p = &data->pairs[i];
        h = hash_string(hash_string(hash_string(h, p->prompt), p->chosen), p->rejected);
        h = run_hash(h, &p->dim, sizeof p->dim);
    }
    return h;
}

uint64_t promptdata_fingerprint(const PromptData *data) {
    uint64_t h = run_hash(RUN_HASH_START, &data->n, sizeof data->n);
    for (int i = 0; i < data->n; i++) h = hash_string(hash_string(h, data->records[i].prompt), data->records[i].id);
    return h;
}

void promptdata_free(PromptData *data) {
    for (int i = 0; i < data->n; i++) {
        free(data->records[i].prompt);
        free(data->records[i].id);
    }
    free(data->records);
    for (int i = 0; i < data->n_paths; i++) free(data->paths[i]);
    free(data->paths);
    memset(data, 0, sizeof(*data));
}

// ---------------------------------------------------------------------------------------------
// text -> tokens

void text_encoder_init(TextEncoder *enc, const char *tokenizer_path, const char *template_name,
                       const char *checkpoint_template, int model_vocab_size) {
    memset(enc, 0, sizeof(*enc));
    enc->vocab_size = model_vocab_size;
    if (tokenizer_path && tokenizer_path[0]) {
        enc->tokenizer = tokenizer_load(tokenizer_path);
        if (!tokenizer_can_encode(enc->tokenizer))
            fatal("%s: this tokenizer can only decode (no merges), so it cannot encode the data", tokenizer_path);
        if (tokenizer_vocab_size(enc->tokenizer) > model_vocab_size)
            fatal("%s: tokenizer has %d tokens but the model's vocabulary has %d", tokenizer_path,
                  tokenizer_vocab_size(enc->tokenizer), model_vocab_size);
        tokenizer_warn_if_small(enc->tokenizer, model_vocab_size, tokenizer_path);
    } else if (model_vocab_size < 256) {
        fatal("the model has no tokenizer and a vocabulary of %d < 256, so bytes cannot be its tokens", model_vocab_size);
    }
    if (!strcmp(template_name, "auto")) {
        if (checkpoint_template && checkpoint_template[0]) enc->chat = chat_template_lookup(checkpoint_template);
    } else if (strcmp(template_name, "none") != 0) {
        enc->chat = chat_template_lookup(template_name);
    }
}

void text_encoder_free(TextEncoder *enc) {
    if (enc->tokenizer) tokenizer_free(enc->tokenizer);
    memset(enc, 0, sizeof(*enc));
}

static void token_list_append(TokenList *l, int id) {
    if (l->n == l->cap) {
        l->cap = l->cap ? 2 * l->cap : 64;
        l->ids = (int *)reallocCheck(l->ids, (size_t)l->cap * sizeof(int));
    }
    l->ids[l->n++] = id;
}

// text with the tokenizer (parse_special as given) or as bytes
static void encode_text(const TextEncoder *enc, const char *text, int parse_special, TokenList *out) {
    if (enc->tokenizer) {
        tokenizer_encode_append(enc->tokenizer, text, strlen(text), parse_special, out);
        return;
    }
    for (const unsigned char *s = (const unsigned char *)text; *s; s++) token_list_append(out, *s);
}

void text_encode_prompt(const TextEncoder *enc, const char *prompt, TokenList *out) {
    if (enc->chat == NULL) { encode_text(enc, prompt, 0, out); return; }
    // the template's markers are special tokens; a prompt that spells one out gets it parsed
    // too, as Hugging Face's apply_chat_template + tokenize does
    char *rendered = chat_template_render(enc->chat, NULL, prompt, 1);
    encode_text(enc, rendered, 1, out);
    free(rendered);
}

void text_encode_response(const TextEncoder *enc, const char *response, TokenList *out) {
    encode_text(enc, response, 0, out);
}

int text_encode_sequence(const TextEncoder *enc, const char *prompt, const char *response, int max_len, TokenList *out) {
    TokenList p = {0}, r = {0};
    out->n = 0;
    text_encode_prompt(enc, prompt, &p);
    text_encode_response(enc, response, &r);
    int status;
    if (r.n > max_len) {
        status = -1;
    } else {
        int keep = p.n + r.n > max_len ? max_len - r.n : p.n;  // prompt tokens kept, from the right
        status = keep < p.n;
        for (int i = p.n - keep; i < p.n; i++) token_list_append(out, p.ids[i]);
        for (int i = 0; i < r.n; i++) token_list_append(out, r.ids[i]);
    }
    token_list_free(&p);
    token_list_free(&r);
    return status;
}

void text_encode_end_of_turn(const TextEncoder *enc, TokenList *out) {
    if (enc->chat) {
        const char *end = chat_template_stop_strings(enc->chat)[0];
        int id = enc->tokenizer ? tokenizer_special_id(enc->tokenizer, end) : -1;
        if (id >= 0) token_list_append(out, id);
        else encode_text(enc, end, 0, out);
        return;
    }
    if (enc->tokenizer && tokenizer_eos_id(enc->tokenizer) >= 0) token_list_append(out, tokenizer_eos_id(enc->tokenizer));
}

// ---------------------------------------------------------------------------------------------
// token sequences

void token_seqs_push(TokenSeqs *s, const int *ids, int n) {
    if (s->n == s->cap) {
        s->cap = s->cap ? 2 * s->cap : 256;
        s->lengths = (int *)reallocCheck(s->lengths, (size_t)s->cap * sizeof(int));
        s->offsets = (size_t *)reallocCheck(s->offsets, (size_t)s->cap * sizeof(size_t));
    }
    if (s->n_tokens + n > s->tokens_cap) {
        s->tokens_cap = 2 * (s->n_tokens + n) + 1024;
        s->tokens = (int *)reallocCheck(s->tokens, s->tokens_cap * sizeof(int));
    }
    memcpy(s->tokens + s->n_tokens, ids, (size_t)n * sizeof(int));
    s->offsets[s->n] = s->n_tokens;
    s->lengths[s->n] = n;
    s->n_tokens += n;
    s->n++;
}

const int *token_seqs_get(const TokenSeqs *s, int i) { return s->tokens + s->offsets[i]; }

void token_seqs_free(TokenSeqs *s) {
    free(s->lengths);
    free(s->offsets);
    free(s->tokens);
    memset(s, 0, sizeof(*s));
}

void prefdata_encode(const PrefData *data, const TextEncoder *enc, int max_len, int bad_lines, EncodedPrefs *out) {
    memset(out, 0, sizeof(*out));
    out->dims = (int *)mallocCheck((size_t)(data->n ? data->n : 1) * sizeof(int));
    out->source = (int *)mallocCheck((size_t)(data->n ? data->n : 1) * sizeof(int));
    TokenList chosen = {0}, rejected = {0};
    for (int i = 0; i < data->n; i++) {
        const PrefPair *pair = &data->pairs[i];
        int sc = text_encode_sequence(enc, pair->prompt, pair->chosen, max_len, &chosen);
        int sr = text_encode_sequence(enc, pair->prompt, pair->rejected, max_len, &rejected);
        if (sc < 0 || sr < 0) {
            const char *field = sc < 0 ? "chosen" : "rejected";
            TokenList r = {0};
            text_encode_response(enc, sc < 0 ? pair->chosen : pair->rejected, &r);
            bad_line(bad_lines, &out->skipped, pair->path, pair->line,
                     "field \"%s\" is %d tokens, longer than the context of %d tokens", field, r.n, max_len);
            token_list_free(&r);
            continue;
        }
        for (int k = 0; k < chosen.n; k++)
            if (chosen.ids[k] >= enc->vocab_size) fatal("%s:%d: token id %d is outside the model's vocabulary of %d", pair->path, pair->line, chosen.ids[k], enc->vocab_size);
        for (int k = 0; k < rejected.n; k++)
            if (rejected.ids[k] >= enc->vocab_size) fatal("%s:%d: token id %d is outside the model's vocabulary of %d", pair->path, pair->line, rejected.ids[k], enc->vocab_size);
        out->truncated += sc + sr;
        token_seqs_push(&out->seqs, chosen.ids, chosen.n);
        token_seqs_push(&out->seqs, rejected.ids, rejected.n);
        out->dims[out->n_pairs] = pair->dim;
        out->source[out->n_pairs] = i;
        out->n_pairs++;
    }
    token_list_free(&chosen);
    token_list_free(&rejected);
}

void encoded_prefs_free(EncodedPrefs *e) {
    free(e->dims);
    free(e->source);
    token_seqs_free(&e->seqs);
    memset(e, 0, sizeof(*e));
}

void sftdata_encode(const SftData *data, const TextEncoder *enc, int max_len, int bad_lines, EncodedSft *out) {
    memset(out, 0, sizeof(*out));
    out->prompt_len = (int *)mallocCheck((size_t)(data->n ? data->n : 1) * sizeof(int));
    out->source = (int *)mallocCheck((size_t)(data->n ? data->n : 1) * sizeof(int));
    TokenList prompt = {0}, answer = {0}, seq = {0};
    for (int i = 0; i < data->n; i++) {
        const SftExample *e = &data->examples[i];
        prompt.n = answer.n = seq.n = 0;
        text_encode_prompt(enc, e->prompt, &prompt);
        text_encode_response(enc, e->response, &answer);
        text_encode_end_of_turn(enc, &answer);
        // at least one prompt token: the first response token is predicted from it
        if (answer.n > max_len - 1) {
            bad_line(bad_lines, &out->skipped, e->path, e->line,
                     "field \"response\" is %d tokens with its end of turn, longer than the %d positions of a "
                     "sequence (--seq_len)", answer.n, max_len - 1);
            continue;
        }
        int keep = prompt.n + answer.n > max_len ? max_len - answer.n : prompt.n;
        out->truncated += keep < prompt.n;
        for (int k = prompt.n - keep; k < prompt.n; k++) token_list_append(&seq, prompt.ids[k]);
        for (int k = 0; k < answer.n; k++) token_list_append(&seq, answer.ids[k]);
        for (int k = 0; k < seq.n; k++)
            if (seq.ids[k] >= enc->vocab_size)
                fatal("%s:%d: token id %d is outside the model's vocabulary of %d", e->path, e->line, seq.ids[k], enc->vocab_size);
        token_seqs_push(&out->seqs, seq.ids, seq.n);
        out->prompt_len[out->n] = keep;
        out->source[out->n] = i;
        out->counted += answer.n;
        out->n++;
    }
    token_list_free(&prompt);
    token_list_free(&answer);
    token_list_free(&seq);
}

uint64_t encoded_sft_fingerprint(const EncodedSft *e) {
    uint64_t h = run_hash(RUN_HASH_START, &e->n, sizeof e->n);
    h = run_hash(h, e->prompt_len, (size_t)e->n * sizeof(int));
    h = run_hash(h, e->seqs.lengths, (size_t)e->n * sizeof(int));
    return run_hash(h, e->seqs.tokens, e->seqs.n_tokens * sizeof(int));
}

void encoded_sft_free(EncodedSft *e) {
    free(e->prompt_len);
    free(e->source);
    token_seqs_free(&e->seqs);
    memset(e, 0, sizeof(*e));
}
