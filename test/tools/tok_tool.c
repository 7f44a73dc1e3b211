/*
 * tok_tool: the tokenizer and chat templates from the command line, for tests and benchmarks.
 *
 *   tok_tool info VOCAB                  vocab size, bos, eos, pre-tokenizer
 *   tok_tool encode VOCAB < text         ids of the whole of stdin, one line
 *   tok_tool encode-batch VOCAB [--no-special] < lines
 *                                        each stdin line is a text in hex; prints one line of
 *                                        ids per text, and the encode throughput on stderr
 *   tok_tool decode VOCAB < ids          the bytes of whitespace-separated ids
 *   tok_tool decode-batch VOCAB < lines  each line is ids; prints the decoded bytes in hex
 *   tok_tool special VOCAB TEXT          id of the added/special token TEXT (-1 when none)
 *   tok_tool token VOCAB ID              the vocabulary spelling of token ID
 *   tok_tool save-hf VOCAB OUT.json      VOCAB written as a Hugging Face tokenizer.json
 *   tok_tool chat TEMPLATE USER [--system TEXT] [--no-generation-prompt]
 *                                        the rendered conversation
 *   tok_tool stops TEMPLATE              the template's stop strings, one per line
 *   tok_tool guess-template GGUF         the named template matching the GGUF's chat_template
 * VOCAB is a tokenizer.json, a GGUF file or an llm.c tokenizer .bin.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tokenizer.h"
#include "chat_template.h"
#include "utils.h"

static void usage(void) {
    fprintf(stderr,
            "usage: tok_tool info|encode|encode-batch|decode|decode-batch VOCAB\n"
            "       tok_tool special VOCAB TEXT | token VOCAB ID | save-hf VOCAB OUT.json\n"
            "       tok_tool chat TEMPLATE USER [--system TEXT] [--no-generation-prompt]\n"
            "       tok_tool stops TEMPLATE | guess-template GGUF\n"
            "templates: %s\n", chat_template_names());
    exit(2);
}

// Reads all of stdin into a malloc'd buffer.
static char *read_stdin(size_t *len) {
    size_t cap = 1 << 16, n = 0;
    char *buf = (char *)mallocCheck(cap);
    size_t got;
    while ((got = fread(buf + n, 1, cap - n, stdin)) > 0) {
        n += got;
        if (n == cap) { cap *= 2; buf = (char *)reallocCheck(buf, cap); }
    }
    *len = n;
    return buf;
}

static int hex_value(int c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

// Parses whitespace-separated token ids from text into out (errors name the stdin line).
static void parse_ids(const char *text, long line_no, TokenList *out) {
    const char *p = text;
    out->n = 0;
    for (;;) {
        while (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r') p++;
        if (*p == '\0') break;
        char *end;
        long v = strtol(p, &end, 10);
        if (end == p || v < 0 || v > 0x7fffffff) fatal("stdin line %ld: \"%.20s\" is not a token id", line_no, p);
        if (out->n == out->cap) {
            out->cap = out->cap ? out->cap * 2 : 256;
            out->ids = (int *)reallocCheck(out->ids, (size_t)out->cap * sizeof(int));
        }
        out->ids[out->n++] = (int)v;
        p = end;
    }
}

static void print_ids(const TokenList *l) {
    for (int k = 0; k < l->n; k++) printf(k ? " %d" : "%d", l->ids[k]);
    printf("\n");
}

static void check_ids(const Tokenizer *t, const TokenList *l, long line_no) {
    for (int k = 0; k < l->n; k++)
        if (l->ids[k] >= tokenizer_vocab_size(t))
            fatal("stdin line %ld: token id %d outside the vocabulary of %d", line_no, l->ids[k], tokenizer_vocab_size(t));
}

int main(int argc, char **argv) {
    if (argc < 3) usage();
    const char *cmd = argv[1];

    if (strcmp(cmd, "chat") == 0) {
        if (argc < 4) usage();
        const ChatTemplate *tmpl = chat_template_lookup(argv[2]);
        const char *system = NULL;
        int add_generation_prompt = 1;
        for (int k = 4; k < argc; k++) {
            if (strcmp(argv[k], "--system") == 0 && k + 1 < argc) system = argv[++k];
            else if (strcmp(argv[k], "--no-generation-prompt") == 0) add_generation_prompt = 0;
            else fatal("chat: unknown argument \"%s\"", argv[k]);
        }
        char *text = chat_template_render(tmpl, system, argv[3], add_generation_prompt);
        fwrite(text, 1, strlen(text), stdout);
        free(text);
        return 0;
    }
    if (strcmp(cmd, "stops") == 0) {
        const char *const *stops = chat_template_stop_strings(chat_template_lookup(argv[2]));
        for (int k = 0; stops[k]; k++) {
            // newlines written as \n so each stop string is one line
            for (const char *c = stops[k]; *c; c++) { if (*c == '\n') fputs("\\n", stdout); else putchar(*c); }
            putchar('\n');
        }
        return 0;
    }

    if (strcmp(cmd, "guess-template") == 0) {
        GGUFFile *g = gguf_open(argv[2]);
        const ChatTemplate *tmpl = chat_template_guess(gguf_get_str(g, "tokenizer.chat_template"));
        printf("%s\n", tmpl ? chat_template_name(tmpl) : "none");
        gguf_close(g);
        return 0;
    }

    Tokenizer *t = tokenizer_load(argv[2]);
    TokenList ids = {0};
    if (strcmp(cmd, "info") == 0) {
        printf("vocab_size %d\nbos %d\neos %d\npre %s\ncan_encode %d\n", tokenizer_vocab_size(t),
               tokenizer_bos_id(t), tokenizer_eos_id(t), tokenizer_describe(t), tokenizer_can_encode(t));
    } else if (strcmp(cmd, "encode") == 0) {
        size_t len;
        char *text = read_stdin(&len);
        tokenizer_encode_append(t, text, len, 1, &ids);
        print_ids(&ids);
        free(text);
    } else if (strcmp(cmd, "encode-batch") == 0) {
        int parse_special = !(argc > 3 && strcmp(argv[3], "--no-special") == 0);
        char *line = NULL;
        size_t line_cap = 0, bytes_total = 0;
        unsigned char *text = NULL;
        size_t text_cap = 0;
        double seconds = 0;
        long line_no = 0;
        ssize_t got;
        while ((got = getline(&line, &line_cap, stdin)) >= 0) {
            line_no++;
            while (got > 0 && (line[got - 1] == '\n' || line[got - 1] == '\r')) got--;
            if (got % 2) fatal("stdin line %ld: odd number of hex digits", line_no);
            size_t len = (size_t)got / 2;
            if (len + 1 > text_cap) { text_cap = 2 * len + 1; text = (unsigned char *)reallocCheck(text, text_cap); }
            for (size_t k = 0; k < len; k++) {
                int hi = hex_value(line[2 * k]), lo = hex_value(line[2 * k + 1]);
                if (hi < 0 || lo < 0) fatal("stdin line %ld: not hex at column %zu", line_no, 2 * k + 1);
                text[k] = (unsigned char)(hi * 16 + lo);
            }
            ids.n = 0;
            double t0 = wall_seconds();
            tokenizer_encode_append(t, (const char *)text, len, parse_special, &ids);
            seconds += wall_seconds() - t0;
            bytes_total += len;
            print_ids(&ids);
        }
        fprintf(stderr, "encoded %zu bytes in %.4f s: %.2f MB/s\n", bytes_total, seconds,
                seconds > 0 ? bytes_total / seconds / 1e6 : 0.0);
        free(line);
        free(text);
    } else if (strcmp(cmd, "decode") == 0) {
        size_t len;
        char *text = read_stdin(&len);
        text = (char *)reallocCheck(text, len + 1);
        text[len] = '\0';
        parse_ids(text, 1, &ids);
        check_ids(t, &ids, 1);
        size_t out_len;
        char *out = tokenizer_decode(t, ids.ids, ids.n, &out_len);
        fwrite(out, 1, out_len, stdout);
        free(out);
        free(text);
    } else if (strcmp(cmd, "decode-batch") == 0) {
        char *line = NULL;
        size_t line_cap = 0;
        long line_no = 0;
        while (getline(&line, &line_cap, stdin) >= 0) {
            line_no++;
            parse_ids(line, line_no, &ids);
            check_ids(t, &ids, line_no);
            size_t out_len;
            char *out = tokenizer_decode(t, ids.ids, ids.n, &out_len);
            for (size_t k = 0; k < out_len; k++) printf("%02x", (unsigned char)out[k]);
            printf("\n");
            free(out);
        }
        free(line);
    } else if (strcmp(cmd, "special") == 0) {
        if (argc < 4) usage();
        printf("%d\n", tokenizer_special_id(t, argv[3]));
    } else if (strcmp(cmd, "token") == 0) {
        if (argc < 4) usage();
        char *end;
        long id = strtol(argv[3], &end, 10);
        if (*end != '\0' || id < 0 || id >= tokenizer_vocab_size(t))
            fatal("token: \"%s\" is not a token id in [0, %d)", argv[3], tokenizer_vocab_size(t));
        printf("%s\n", tokenizer_token_text(t, (int)id));
    } else if (strcmp(cmd, "save-hf") == 0) {
        if (argc < 4) usage();
        char why[512];
        if (!tokenizer_hf_check(t, why, sizeof(why))) fatal("save-hf: %s", why);
        if (tokenizer_save_hf(t, argv[3]) != 0) fatal("save-hf: %s not written", argv[3]);
    } else {
        usage();
    }
    token_list_free(&ids);
    tokenizer_free(t);
    return 0;
}
