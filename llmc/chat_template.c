/*
 * Chat templates (see chat_template.h). Each template is a small C function that writes what
 * the model's jinja template writes; test/test_tokenizer.py renders the jinja sources with jinja2
 * and compares byte for byte.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "chat_template.h"
#include "utils.h"

// Growable string buffer for rendering.
typedef struct {
    char *s;
    size_t len, cap;
} StrBuf;

static void sb_add(StrBuf *b, const char *text) {
    size_t n = strlen(text);
    if (b->len + n + 1 > b->cap) {
        b->cap = (b->len + n + 1) * 2;
        b->s = (char *)reallocCheck(b->s, b->cap);
    }
    memcpy(b->s + b->len, text, n + 1);
    b->len += n;
}

static void sb_add_n(StrBuf *b, const char *text, size_t n) {
    if (b->len + n + 1 > b->cap) {
        b->cap = (b->len + n + 1) * 2;
        b->s = (char *)reallocCheck(b->s, b->cap);
    }
    memcpy(b->s + b->len, text, n);
    b->len += n;
    b->s[b->len] = '\0';
}

static const char *const SMOLLM2_DEFAULT_SYSTEM =
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face";

// ChatML: every message is "<|im_start|>ROLE\nCONTENT<|im_end|>\n". SmolLM2's template inserts
// its default system prompt when the first message is not a system message; plain ChatML does not.
static void render_chatml_with(StrBuf *b, const ChatMessage *m, int n, int add_generation_prompt,
                               const char *default_system) {
    for (int k = 0; k < n; k++) {
        if (k == 0 && default_system != NULL && strcmp(m[0].role, "system") != 0) {
            sb_add(b, "<|im_start|>system\n");
            sb_add(b, default_system);
            sb_add(b, "<|im_end|>\n");
        }
        sb_add(b, "<|im_start|>");
        sb_add(b, m[k].role);
        sb_add(b, "\n");
        sb_add(b, m[k].content);
        sb_add(b, "<|im_end|>\n");
    }
    if (add_generation_prompt) sb_add(b, "<|im_start|>assistant\n");
}

static void render_chatml(StrBuf *b, const ChatMessage *m, int n, int add_generation_prompt) {
    render_chatml_with(b, m, n, add_generation_prompt, NULL);
}

static void render_smollm2(StrBuf *b, const ChatMessage *m, int n, int add_generation_prompt) {
    render_chatml_with(b, m, n, add_generation_prompt, SMOLLM2_DEFAULT_SYSTEM);
}

// Llama 3's template strips each message (jinja's `| trim`: Python's str.strip(), here the
// ASCII whitespace " \t\n\v\f\r"), and the first message carries <|begin_of_text|>.
static void render_llama3(StrBuf *b, const ChatMessage *m, int n, int add_generation_prompt) {
    for (int k = 0; k < n; k++) {
        if (k == 0) sb_add(b, "<|begin_of_text|>");
        sb_add(b, "<|start_header_id|>");
        sb_add(b, m[k].role);
        sb_add(b, "<|end_header_id|>\n\n");
        const char *s = m[k].content;
        size_t len = strlen(s);
        while (len > 0 && strchr(" \t\n\v\f\r", s[0])) { s++; len--; }
        while (len > 0 && strchr(" \t\n\v\f\r", s[len - 1])) len--;
        sb_add_n(b, s, len);
        sb_add(b, "<|eot_id|>");
    }
    if (add_generation_prompt) sb_add(b, "<|start_header_id|>assistant<|end_header_id|>\n\n");
}

// Anthropic HH transcripts: a system prompt stands alone at the start, each turn is
// "\n\nHuman: ..." or "\n\nAssistant: ...", and the generation prompt is "\n\nAssistant:".
static void render_plain(StrBuf *b, const ChatMessage *m, int n, int add_generation_prompt) {
    for (int k = 0; k < n; k++) {
        if (strcmp(m[k].role, "system") == 0) { sb_add(b, m[k].content); continue; }
        sb_add(b, strcmp(m[k].role, "assistant") == 0 ? "\n\nAssistant: " : "\n\nHuman: ");
        sb_add(b, m[k].content);
    }
    if (add_generation_prompt) sb_add(b, "\n\nAssistant:");
}

struct ChatTemplate {
    const char *name;
    void (*render)(StrBuf *b, const ChatMessage *m, int n, int add_generation_prompt);
    const char *stops[3];
    // texts whose presence in a jinja template identifies this template (all of them; NULL: unused)
    const char *marker, *marker2;
};

static const ChatTemplate TEMPLATES[] = {
    // smollm2 before chatml: its jinja template has ChatML's marker too
    { "smollm2", render_smollm2, { "<|im_end|>", NULL }, "<|im_start|>", "named SmolLM" },
    { "chatml", render_chatml, { "<|im_end|>", NULL }, "<|im_start|>", NULL },
    { "llama3", render_llama3, { "<|eot_id|>", NULL }, "<|start_header_id|>", NULL },
    { "plain", render_plain, { "\n\nHuman:", NULL }, "Human:", NULL },
};
#define N_TEMPLATES ((int)(sizeof(TEMPLATES) / sizeof(TEMPLATES[0])))

const ChatTemplate *chat_template_find(const char *name) {
    for (int k = 0; k < N_TEMPLATES; k++)
        if (strcmp(TEMPLATES[k].name, name) == 0) return &TEMPLATES[k];
    return NULL;
}

const char *chat_template_names(void) { return "chatml, smollm2, llama3, plain"; }

const ChatTemplate *chat_template_lookup(const char *name) {
    const ChatTemplate *t = chat_template_find(name);
    if (t == NULL) fatal("unknown chat template \"%s\" (valid: %s)", name, chat_template_names());
    return t;
}

const char *chat_template_name(const ChatTemplate *t) { return t->name; }

const ChatTemplate *chat_template_guess(const char *jinja_source) {
    if (jinja_source == NULL) return NULL;
    for (int k = 0; k < N_TEMPLATES; k++)
        if (strstr(jinja_source, TEMPLATES[k].marker) != NULL &&
            (TEMPLATES[k].marker2 == NULL || strstr(jinja_source, TEMPLATES[k].marker2) != NULL))
            return &TEMPLATES[k];
    return NULL;
}

char *chat_template_render_messages(const ChatTemplate *t, const ChatMessage *messages, int n_messages,
                                    int add_generation_prompt) {
    for (int k = 0; k < n_messages; k++) {
        const char *r = messages[k].role;
        if (r == NULL || messages[k].content == NULL ||
            (strcmp(r, "system") != 0 && strcmp(r, "user") != 0 && strcmp(r, "assistant") != 0))
            fatal("chat template %s: message %d needs role system/user/assistant and content", t->name, k);
    }
    StrBuf b = { NULL, 0, 0 };
    sb_add(&b, "");
    t->render(&b, messages, n_messages, add_generation_prompt);
    return b.s;
}

char *chat_template_render(const ChatTemplate *t, const char *system, const char *user,
                           int add_generation_prompt) {
    ChatMessage m[2];
    int n = 0;
    if (system != NULL) { m[n].role = "system"; m[n].content = system; n++; }
    m[n].role = "user"; m[n].content = user; n++;
    return chat_template_render_messages(t, m, n, add_generation_prompt);
}

const char *const *chat_template_stop_strings(const ChatTemplate *t) { return t->stops; }
