/*
 * Byte-level BPE tokenizer matching Hugging Face `tokenizers` (see tokenizer.h for the stages).
 *
 * Reading order: UTF-8 and Unicode classes; the pre-tokenizer matchers (one hand-written
 * function per regex a vocabulary can declare); hash maps for the vocabulary and the merge
 * ranks; BPE of one piece; encode and decode; the three loaders.
 *
 * Internally every token is kept twice: its text as the vocabulary spells it (byte-level form,
 * where byte 0x20 is "Ġ") and the raw bytes it stands for. Encoding never builds the byte-level
 * string: the base symbols of a piece are its bytes (byte -> id table), and merges are keyed
 * by the ids of the two symbols, which is the same thing `tokenizers` computes on characters.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cjson/cJSON.h>

#include "tokenizer.h"
#include "utils.h"
#include "gguf.h"
#include "unicode_tables.h"

// ----------------------------------------------------------------------------
// UTF-8 decoding and the character classes of the pre-tokenizer regexes

#define CP_INVALID 0x110000u   // a byte that does not start a valid UTF-8 sequence

// Decodes the code point starting at s[i] (i < n); *len gets its byte length. Malformed,
// overlong, surrogate or truncated sequences give CP_INVALID with length 1, so invalid input is
// walked byte by byte (each such byte then goes through byte-level BPE like any other).
static inline uint32_t utf8_next(const unsigned char *s, size_t n, size_t i, int *len) {
    unsigned char b0 = s[i];
    if (b0 < 0x80) { *len = 1; return b0; }
    int need; uint32_t cp, min;
    if ((b0 & 0xE0) == 0xC0) { need = 1; cp = b0 & 0x1F; min = 0x80; }
    else if ((b0 & 0xF0) == 0xE0) { need = 2; cp = b0 & 0x0F; min = 0x800; }
    else if ((b0 & 0xF8) == 0xF0) { need = 3; cp = b0 & 0x07; min = 0x10000; }
    else { *len = 1; return CP_INVALID; }
    if (i + need >= n) { *len = 1; return CP_INVALID; }   // truncated at the end
    for (int k = 1; k <= need; k++) {
        unsigned char b = s[i + k];
        if ((b & 0xC0) != 0x80) { *len = 1; return CP_INVALID; }
        cp = (cp << 6) | (b & 0x3F);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) { *len = 1; return CP_INVALID; }
    *len = need + 1;
    return cp;
}

enum { CL_OTHER = 0, CL_LETTER = 1, CL_NUMBER = 2, CL_SPACE = 3 };

// The class a regex sees: \p{L}, \p{N}, \s, or anything else ([^\s\p{L}\p{N}]).
static inline int cp_class(uint32_t cp) {
    if (cp < 128) {
        if (unicode_is_letter(cp)) return CL_LETTER;
        if (cp >= '0' && cp <= '9') return CL_NUMBER;
        if (cp == ' ' || (cp >= 9 && cp <= 13)) return CL_SPACE;
        return CL_OTHER;
    }
    if (cp >= CP_INVALID) return CL_OTHER;
    if (unicode_is_letter(cp)) return CL_LETTER;
    if (unicode_is_number(cp)) return CL_NUMBER;
    if (unicode_is_space(cp)) return CL_SPACE;
    return CL_OTHER;
}

static inline int class_at(const unsigned char *s, size_t n, size_t i, int *len) {
    return cp_class(utf8_next(s, n, i, len));
}

// End of the run of characters of class cls starting at i (i itself when s[i] is not cls).
static size_t scan_class(const unsigned char *s, size_t n, size_t i, int cls) {
    while (i < n) {
        int len;
        if (class_at(s, n, i, &len) != cls) break;
        i += len;
    }
    return i;
}

// `\s+(?!\S)|\s+` at i (s[i] is whitespace): the whole whitespace run when it ends the text;
// otherwise the run without its last character (which then prefixes the next word), or the
// single whitespace character when that would leave nothing.
static size_t match_space_tail(const unsigned char *s, size_t n, size_t i) {
    size_t end = scan_class(s, n, i, CL_SPACE);
    if (end == n) return n;
    size_t last = end - 1;                       // start of the run's last character
    while (last > i && (s[last] & 0xC0) == 0x80) last--;
    return last > i ? last : end;
}

// GPT-2's pattern (also Hugging Face's ByteLevel pre-tokenizer with use_regex):
//   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
// Returns the end of the match at i; the alternatives are tried in the pattern's order and the
// first that matches wins (the regex engines' leftmost-first rule). Every character is covered
// by some alternative, so matches tile the text.
static size_t match_gpt2(const unsigned char *s, size_t n, size_t i) {
    if (s[i] == '\'' && i + 1 < n) {
        unsigned char a = s[i + 1];
        if (a == 's' || a == 't' || a == 'm' || a == 'd') return i + 2;
        if (i + 2 < n) {
            unsigned char b = s[i + 2];
            if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return i + 3;
        }
    }
    int len0;
    int k0 = class_at(s, n, i, &len0);
    if (s[i] == ' ' && i + 1 < n) {
        int len1;
        int k1 = class_at(s, n, i + 1, &len1);
        if (k1 != CL_SPACE) return scan_class(s, n, i + 1, k1);   // " word", " 123", " ..."
    }
    if (k0 != CL_SPACE) return scan_class(s, n, i, k0);
    return match_space_tail(s, n, i);
}

// Llama 3's pattern (max_digits 3) and Qwen2's (max_digits 1):
//   (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|
//   \s*[\r\n]+|\s+(?!\S)|\s+
static size_t match_llama3(const unsigned char *s, size_t n, size_t i, int max_digits) {
    if (s[i] == '\'' && i + 1 < n) {
        unsigned char a = s[i + 1] | 0x20;       // ASCII case folding ('S' -> 's')
        if (a == 's' || a == 't' || a == 'm' || a == 'd') return i + 2;
        if (i + 2 < n) {
            unsigned char b = s[i + 2] | 0x20;
            if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return i + 3;
        }
    }
    int len0;
    uint32_t c0 = utf8_next(s, n, i, &len0);
    int k0 = cp_class(c0);
    if (k0 == CL_LETTER) return scan_class(s, n, i, CL_LETTER);
    if (c0 != '\r' && c0 != '\n' && k0 != CL_NUMBER && i + len0 < n) {
        int len1;
        if (class_at(s, n, i + len0, &len1) == CL_LETTER) return scan_class(s, n, i + len0, CL_LETTER);
    }
    if (k0 == CL_NUMBER) {
        size_t j = i;
        for (int count = 0; j < n && count < max_digits; count++) {
            int len;
            if (class_at(s, n, j, &len) != CL_NUMBER) break;
            j += len;
        }
        return j;
    }
    size_t j = i;
    if (c0 == ' ' && i + 1 < n) {
        int len1;
        if (class_at(s, n, i + 1, &len1) == CL_OTHER) j = i + 1;
    }
    int lenj;
    if (class_at(s, n, j, &lenj) == CL_OTHER) {
        size_t end = scan_class(s, n, j, CL_OTHER);
        while (end < n && (s[end] == '\r' || s[end] == '\n')) end++;
        return end;
    }
    // whitespace: \s*[\r\n]+ ends after the run's last newline, when it has one
    size_t end = scan_class(s, n, i, CL_SPACE);
    for (size_t p = end; p > i; p--) {
        if (s[p - 1] == '\r' || s[p - 1] == '\n') return p;
    }
    return match_space_tail(s, n, i);
}

// The regexes a tokenizer.json Split (or llama.cpp's tokenizer.ggml.pre) may name, and the
// matcher that reproduces each.
static const char *const REGEX_GPT2 =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";
static const char *const REGEX_LLAMA3 =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
static const char *const REGEX_QWEN2 =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

// ----------------------------------------------------------------------------
// The tokenizer

enum { STEP_SPLIT_GPT2, STEP_SPLIT_LLAMA3, STEP_DIGITS, STEP_PREFIX_SPACE };
typedef struct {
    int kind;
    int arg;   // STEP_SPLIT_LLAMA3: most digits in one piece; STEP_DIGITS: 1 = each digit alone
} PreStep;
#define MAX_PRE_STEPS 8

// Open-addressing hash set of token ids keyed by a string of each token (its text or bytes).
typedef struct {
    int32_t *slots;   // token id, -1 = empty
    uint32_t mask;
} StrIndex;

// Merge ranks: (left id, right id) -> (rank, merged id).
typedef struct {
    uint64_t *keys;   // ((uint64)left << 32 | right) + 1; 0 = empty
    int32_t *rank;
    int32_t *merged;
    uint32_t mask;
} MergeMap;

struct Tokenizer {
    char *path;
    int n_vocab;
    char **text;                 // [n_vocab] vocabulary spelling ("" for holes)
    unsigned char **bytes;       // [n_vocab] the bytes the token decodes to
    uint32_t *bytes_len;         // [n_vocab]
    StrIndex text_index;         // text -> id
    StrIndex bytes_index;        // bytes -> id (for ignore_merges)
    int byte_to_id[256];         // base symbol of each byte, -1 when the vocabulary lacks it
    MergeMap merges;
    int n_merges;
    int ignore_merges;           // a piece that is itself a token is emitted whole (Llama 3)
    int unk_id;                  // replaces bytes without a base symbol; -1 = drop them
    int bos_id, eos_id;
    int can_encode;
    PreStep steps[MAX_PRE_STEPS];
    int n_steps;
    char describe[256];
    // added/special tokens matched whole: ids sorted by (first byte, length descending)
    int n_added;
    int *added_ids;
    int added_start[257];        // added_ids[added_start[b] .. added_start[b+1]) start with byte b
    unsigned char *special;      // [n_vocab] 1 for added tokens marked special (tokenizer.json
                                 // "special": true, GGUF control tokens); kept for tokenizer_save_hf
};

static uint64_t hash_bytes(const unsigned char *s, size_t n) {
    uint64_t h = 1469598103934665603ull;   // FNV-1a
    for (size_t i = 0; i < n; i++) { h ^= s[i]; h *= 1099511628211ull; }
    return h ^ (h >> 29);
}

static void str_index_init(StrIndex *ix, int n) {
    uint32_t size = 16;
    while (size < (uint32_t)n * 2u) size <<= 1;
    ix->slots = (int32_t *)mallocCheck(size * sizeof(int32_t));
    memset(ix->slots, 0xFF, size * sizeof(int32_t));
    ix->mask = size - 1;
}

// Id whose key (strs[id], lens[id]) equals s[0..n), or -1.
static int str_index_find(const StrIndex *ix, const unsigned char *const *strs, const uint32_t *lens,
                          const unsigned char *s, size_t n) {
    uint32_t h = (uint32_t)hash_bytes(s, n) & ix->mask;
    for (;;) {
        int id = ix->slots[h];
        if (id < 0) return -1;
        if (lens[id] == n && memcmp(strs[id], s, n) == 0) return id;
        h = (h + 1) & ix->mask;
    }
}

// Inserts id under its key; a key already present keeps its first (lowest) id.
static void str_index_add(StrIndex *ix, const unsigned char *const *strs, const uint32_t *lens, int id) {
    uint32_t h = (uint32_t)hash_bytes(strs[id], lens[id]) & ix->mask;
    for (;;) {
        int other = ix->slots[h];
        if (other < 0) { ix->slots[h] = id; return; }
        if (lens[other] == lens[id] && memcmp(strs[other], strs[id], lens[id]) == 0) return;
        h = (h + 1) & ix->mask;
    }
}

static void merge_map_init(MergeMap *m, int n) {
    uint32_t size = 16;
    while (size < (uint32_t)n * 2u) size <<= 1;
    m->keys = (uint64_t *)callocCheck(size, sizeof(uint64_t));
    m->rank = (int32_t *)mallocCheck(size * sizeof(int32_t));
    m->merged = (int32_t *)mallocCheck(size * sizeof(int32_t));
    m->mask = size - 1;
}

static inline uint32_t merge_slot(uint64_t key, uint32_t mask) {
    key ^= key >> 33; key *= 0xff51afd7ed558ccdull; key ^= key >> 33;
    return (uint32_t)key & mask;
}

// Rank and merged id of the pair (left, right); 0 when the pair is not a merge.
static inline int merge_map_find(const MergeMap *m, int left, int right, int *rank, int *merged) {
    uint64_t key = (((uint64_t)(uint32_t)left << 32) | (uint32_t)right) + 1;
    uint32_t h = merge_slot(key, m->mask);
    for (;;) {
        uint64_t k = m->keys[h];
        if (k == 0) return 0;
        if (k == key) { *rank = m->rank[h]; *merged = m->merged[h]; return 1; }
        h = (h + 1) & m->mask;
    }
}

// Adds a merge; a pair listed twice takes the rank of its last listing, as `tokenizers` does
// (its merge map is filled in list order, a later insertion replacing an earlier one).
static void merge_map_add(MergeMap *m, int left, int right, int rank, int merged) {
    uint64_t key = (((uint64_t)(uint32_t)left << 32) | (uint32_t)right) + 1;
    uint32_t h = merge_slot(key, m->mask);
    while (m->keys[h] != 0 && m->keys[h] != key) h = (h + 1) & m->mask;
    m->keys[h] = key; m->rank[h] = rank; m->merged[h] = merged;
}

// ----------------------------------------------------------------------------
// GPT-2's byte <-> unicode mapping: printable bytes stand for themselves, the other 68 bytes
// are shifted to U+0100.. so every byte has a visible character (0x20 -> 'Ġ' U+0120).

static int byte_of_char[324];   // code point -> byte, -1 when not part of the mapping
static int byte_map_ready = 0;

static void build_byte_map(void) {
    if (byte_map_ready) return;
    for (int c = 0; c < 324; c++) byte_of_char[c] = -1;
    int shifted = 0;
    for (int b = 0; b < 256; b++) {
        int printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
        int cp = printable ? b : 256 + shifted++;
        byte_of_char[cp] = b;
    }
    byte_map_ready = 1;
}

// The bytes a vocabulary string stands for: each character mapped back through the byte-level
// table; a string with any character outside the table stands for its own UTF-8 (what the
// ByteLevel decoder of `tokenizers` does with e.g. added tokens containing spaces).
static unsigned char *text_to_bytes(const char *text, size_t text_len, uint32_t *out_len) {
    unsigned char *out = (unsigned char *)mallocCheck(text_len + 1);
    size_t n = 0, i = 0;
    const unsigned char *s = (const unsigned char *)text;
    while (i < text_len) {
        int len;
        uint32_t cp = utf8_next(s, text_len, i, &len);
        if (cp >= 324 || byte_of_char[cp] < 0) {
            memcpy(out, text, text_len);
            *out_len = (uint32_t)text_len;
            return out;
        }
        out[n++] = (unsigned char)byte_of_char[cp];
        i += len;
    }
    *out_len = (uint32_t)n;
    return out;
}

static Tokenizer *tokenizer_alloc(const char *path, int n_vocab) {
    build_byte_map();
    Tokenizer *t = (Tokenizer *)callocCheck(1, sizeof(Tokenizer));
    t->path = xstrdup(path);
    t->n_vocab = n_vocab;
    t->text = (char **)callocCheck(n_vocab, sizeof(char *));
    t->bytes = (unsigned char **)callocCheck(n_vocab, sizeof(unsigned char *));
    t->bytes_len = (uint32_t *)callocCheck(n_vocab, sizeof(uint32_t));
    t->special = (unsigned char *)callocCheck(n_vocab, 1);
    t->unk_id = -1; t->bos_id = -1; t->eos_id = -1;
    for (int b = 0; b < 256; b++) t->byte_to_id[b] = -1;
    return t;
}

// Sets token id's spelling (first definition wins; added tokens are set before the vocabulary).
static void set_token(Tokenizer *t, int id, const char *text, size_t len, const char *what) {
    if (id < 0 || id >= t->n_vocab) fatal("%s: %s: token id %d outside [0, %d)", t->path, what, id, t->n_vocab);
    if (t->text[id] != NULL) return;
    t->text[id] = (char *)mallocCheck(len + 1);
    memcpy(t->text[id], text, len);
    t->text[id][len] = '\0';
    t->bytes[id] = text_to_bytes(t->text[id], len, &t->bytes_len[id]);
}

// After all tokens are set: fills holes, builds the indexes and the byte -> base-symbol table.
static void finish_vocab(Tokenizer *t) {
    for (int id = 0; id < t->n_vocab; id++) {
        if (t->text[id] == NULL) {
            t->text[id] = xstrdup("");
            t->bytes[id] = (unsigned char *)mallocCheck(1);
            t->bytes_len[id] = 0;
        }
    }
    uint32_t *text_len = (uint32_t *)mallocCheck(t->n_vocab * sizeof(uint32_t));
    for (int id = 0; id < t->n_vocab; id++) text_len[id] = (uint32_t)strlen(t->text[id]);
    str_index_init(&t->text_index, t->n_vocab);
    str_index_init(&t->bytes_index, t->n_vocab);
    // ids inserted low to high, so a duplicated spelling resolves to its lowest id
    for (int id = 0; id < t->n_vocab; id++) {
        if (text_len[id] == 0) continue;
        str_index_add(&t->text_index, (const unsigned char *const *)t->text, text_len, id);
        str_index_add(&t->bytes_index, (const unsigned char *const *)t->bytes, t->bytes_len, id);
    }
    free(text_len);
    // base symbols: the token spelled with the single byte-level character of each byte
    for (int c = 0; c < 324; c++) {
        if (byte_of_char[c] < 0) continue;
        char spelled[3] = {0};
        if (c < 0x80) spelled[0] = (char)c;
        else { spelled[0] = (char)(0xC0 | (c >> 6)); spelled[1] = (char)(0x80 | (c & 0x3F)); }
        t->byte_to_id[byte_of_char[c]] = tokenizer_token_id(t, spelled);
    }
}

// Registers the added/special tokens (ids in `ids`), matched whole in the input.
static void set_added_tokens(Tokenizer *t, const int *ids, int n) {
    t->n_added = 0;
    t->added_ids = (int *)mallocCheck((size_t)n * sizeof(int));
    for (int k = 0; k < n; k++) if (t->bytes_len[ids[k]] > 0) t->added_ids[t->n_added++] = ids[k];
    // sort by (first byte, length descending): the first hit at a position is the longest
    for (int a = 1; a < t->n_added; a++) {
        int id = t->added_ids[a], b = a - 1;
        while (b >= 0) {
            int o = t->added_ids[b];
            int later = t->bytes[o][0] > t->bytes[id][0] ||
                        (t->bytes[o][0] == t->bytes[id][0] && t->bytes_len[o] < t->bytes_len[id]);
            if (!later) break;
            t->added_ids[b + 1] = o;
            b--;
        }
        t->added_ids[b + 1] = id;
    }
    // bucket boundaries: added_start[b] = number of added tokens whose first byte is < b
    int k = 0;
    for (int byte = 0; byte < 256; byte++) {
        t->added_start[byte] = k;
        while (k < t->n_added && t->bytes[t->added_ids[k]][0] == byte) k++;
    }
    t->added_start[256] = t->n_added;
}

static void add_step(Tokenizer *t, int kind, int arg) {
    if (t->n_steps == MAX_PRE_STEPS) fatal("%s: pre_tokenizer chain longer than %d steps", t->path, MAX_PRE_STEPS);
    t->steps[t->n_steps].kind = kind;
    t->steps[t->n_steps].arg = arg;
    t->n_steps++;
}

static void build_description(Tokenizer *t) {
    char *d = t->describe;
    size_t cap = sizeof(t->describe), used = 0;
    d[0] = '\0';
    for (int k = 0; k < t->n_steps; k++) {
        const PreStep *st = &t->steps[k];
        const char *name = st->kind == STEP_SPLIT_GPT2 ? "gpt2" :
                           st->kind == STEP_SPLIT_LLAMA3 ? (st->arg == 3 ? "llama3" : "qwen2") :
                           st->kind == STEP_DIGITS ? (st->arg ? "digits(individual)" : "digits") : "prefix_space";
        used += snprintf(d + used, cap - used, "%s%s", k ? " > " : "", name);
        if (used >= cap) break;
    }
    if (t->n_steps == 0) snprintf(d, cap, "none");
}

// ----------------------------------------------------------------------------
// BPE of one pre-tokenized piece

typedef struct { int rank, pos, merged; } MergeCand;

// Scratch buffers for encoding, sized to the longest piece seen.
typedef struct {
    int cap;
    int *sym_id, *prev, *next;
    unsigned char *alive;
    MergeCand *heap;
    int heap_n, heap_cap;
} BpeScratch;

static void scratch_reserve(BpeScratch *sc, int n) {
    if (n <= sc->cap) return;
    int cap = n < 64 ? 64 : n * 2;
    sc->sym_id = (int *)reallocCheck(sc->sym_id, cap * sizeof(int));
    sc->prev = (int *)reallocCheck(sc->prev, cap * sizeof(int));
    sc->next = (int *)reallocCheck(sc->next, cap * sizeof(int));
    sc->alive = (unsigned char *)reallocCheck(sc->alive, cap);
    sc->cap = cap;
}

static inline int cand_less(const MergeCand *a, const MergeCand *b) {
    return a->rank < b->rank || (a->rank == b->rank && a->pos < b->pos);
}

static void heap_push(BpeScratch *sc, MergeCand c) {
    if (sc->heap_n == sc->heap_cap) {
        sc->heap_cap = sc->heap_cap ? sc->heap_cap * 2 : 64;
        sc->heap = (MergeCand *)reallocCheck(sc->heap, sc->heap_cap * sizeof(MergeCand));
    }
    int i = sc->heap_n++;
    while (i > 0) {
        int parent = (i - 1) / 2;
        if (!cand_less(&c, &sc->heap[parent])) break;
        sc->heap[i] = sc->heap[parent];
        i = parent;
    }
    sc->heap[i] = c;
}

static MergeCand heap_pop(BpeScratch *sc) {
    MergeCand top = sc->heap[0];
    MergeCand last = sc->heap[--sc->heap_n];
    int i = 0, n = sc->heap_n;
    for (;;) {
        int child = 2 * i + 1;
        if (child >= n) break;
        if (child + 1 < n && cand_less(&sc->heap[child + 1], &sc->heap[child])) child++;
        if (!cand_less(&sc->heap[child], &last)) break;
        sc->heap[i] = sc->heap[child];
        i = child;
    }
    if (n > 0) sc->heap[i] = last;
    return top;
}

static void token_list_push(TokenList *l, int id) {
    if (l->n == l->cap) {
        l->cap = l->cap ? l->cap * 2 : 256;
        l->ids = (int *)reallocCheck(l->ids, (size_t)l->cap * sizeof(int));
    }
    l->ids[l->n++] = id;
}

static void push_merge_candidate(const Tokenizer *t, BpeScratch *sc, int pos) {
    int right = sc->next[pos];
    if (right < 0) return;
    int rank, merged;
    if (merge_map_find(&t->merges, sc->sym_id[pos], sc->sym_id[right], &rank, &merged)) {
        MergeCand c = { rank, pos, merged };
        heap_push(sc, c);
    }
}

// BPE over the bytes s[0..n): start from one symbol per byte, then repeatedly merge the adjacent
// pair with the lowest rank (leftmost among equal ranks) until no pair is a merge. This is the
// priority-queue algorithm of `tokenizers` (word.rs merge_all): stale queue entries are skipped
// by checking that the pair at the position still merges into the recorded token.
static void bpe_piece(const Tokenizer *t, BpeScratch *sc, const unsigned char *s, size_t n, TokenList *out) {
    if (t->ignore_merges && n > 1) {
        int id = str_index_find(&t->bytes_index, (const unsigned char *const *)t->bytes, t->bytes_len, s, n);
        if (id >= 0) { token_list_push(out, id); return; }
    }
    scratch_reserve(sc, (int)n);
    int m = 0;   // symbols
    for (size_t i = 0; i < n; i++) {
        int id = t->byte_to_id[s[i]];
        if (id < 0) id = t->unk_id;
        if (id < 0) continue;   // no base symbol and no unknown token: the byte is dropped
        sc->sym_id[m] = id;
        m++;
    }
    for (int i = 0; i < m; i++) {
        sc->prev[i] = i - 1;
        sc->next[i] = i + 1 < m ? i + 1 : -1;
        sc->alive[i] = 1;
    }
    sc->heap_n = 0;
    for (int i = 0; i + 1 < m; i++) push_merge_candidate(t, sc, i);
    while (sc->heap_n > 0) {
        MergeCand c = heap_pop(sc);
        if (!sc->alive[c.pos]) continue;
        int right = sc->next[c.pos];
        if (right < 0) continue;
        int rank, merged;
        if (!merge_map_find(&t->merges, sc->sym_id[c.pos], sc->sym_id[right], &rank, &merged) ||
            merged != c.merged) continue;
        sc->sym_id[c.pos] = merged;
        sc->alive[right] = 0;
        sc->next[c.pos] = sc->next[right];
        if (sc->next[right] >= 0) sc->prev[sc->next[right]] = c.pos;
        if (sc->prev[c.pos] >= 0) push_merge_candidate(t, sc, sc->prev[c.pos]);
        push_merge_candidate(t, sc, c.pos);
    }
    for (int i = m > 0 ? 0 : -1; i >= 0; i = sc->next[i]) token_list_push(out, sc->sym_id[i]);
}

// ----------------------------------------------------------------------------
// Encoding

// Runs pre-tokenizer step `step` over s[0..n) and recurses into the following steps with every
// piece; after the last step each piece is BPE-encoded. Empty pieces are dropped.
static void pretokenize(const Tokenizer *t, BpeScratch *sc, int step, const unsigned char *s, size_t n,
                        TokenList *out) {
    if (n == 0) return;
    if (step == t->n_steps) { bpe_piece(t, sc, s, n, out); return; }
    const PreStep *st = &t->steps[step];
    size_t i = 0;
    switch (st->kind) {
    case STEP_PREFIX_SPACE:
        if (s[0] == ' ') { pretokenize(t, sc, step + 1, s, n, out); return; }
        {
            unsigned char *buf = (unsigned char *)mallocCheck(n + 1);
            buf[0] = ' ';
            memcpy(buf + 1, s, n);
            pretokenize(t, sc, step + 1, buf, n + 1, out);
            free(buf);
        }
        return;
    case STEP_SPLIT_GPT2:
        while (i < n) {
            size_t end = match_gpt2(s, n, i);
            pretokenize(t, sc, step + 1, s + i, end - i, out);
            i = end;
        }
        return;
    case STEP_SPLIT_LLAMA3:
        while (i < n) {
            size_t end = match_llama3(s, n, i, st->arg);
            pretokenize(t, sc, step + 1, s + i, end - i, out);
            i = end;
        }
        return;
    case STEP_DIGITS: {
        // numbers (\p{N}) isolated from the text around them: each digit alone, or whole runs
        size_t start = 0;
        while (i < n) {
            int len;
            if (class_at(s, n, i, &len) != CL_NUMBER) { i += len; continue; }
            pretokenize(t, sc, step + 1, s + start, i - start, out);
            size_t end = st->arg ? i + len : scan_class(s, n, i, CL_NUMBER);
            pretokenize(t, sc, step + 1, s + i, end - i, out);
            i = start = end;
        }
        pretokenize(t, sc, step + 1, s + start, n - start, out);
        return;
    }
    }
}

void tokenizer_encode_append(const Tokenizer *t, const char *text, size_t len, int parse_special,
                             TokenList *out) {
    if (!t->can_encode) fatal("%s: this tokenizer has no merges (llm.c .bin); it can only decode", t->path);
    const unsigned char *s = (const unsigned char *)text;
    BpeScratch sc;
    memset(&sc, 0, sizeof(sc));
    size_t start = 0;   // start of the text not yet encoded
    if (parse_special && t->n_added > 0) {
        // leftmost-longest match of the added tokens, like the Aho-Corasick matcher of `tokenizers`
        for (size_t i = 0; i < len; i++) {
            int b = s[i];
            int found = -1;
            for (int k = t->added_start[b]; k < t->added_start[b + 1]; k++) {
                int id = t->added_ids[k];
                uint32_t tl = t->bytes_len[id];
                if (tl <= len - i && memcmp(t->bytes[id], s + i, tl) == 0) { found = id; break; }
            }
            if (found < 0) continue;
            pretokenize(t, &sc, 0, s + start, i - start, out);
            token_list_push(out, found);
            i += t->bytes_len[found] - 1;
            start = i + 1;
        }
    }
    pretokenize(t, &sc, 0, s + start, len - start, out);
    free(sc.sym_id); free(sc.prev); free(sc.next); free(sc.alive); free(sc.heap);
}

int *tokenizer_encode(const Tokenizer *t, const char *text, size_t len, int *n_tokens) {
    TokenList l = {0};
    tokenizer_encode_append(t, text, len, 1, &l);
    *n_tokens = l.n;
    if (l.ids == NULL) l.ids = (int *)mallocCheck(sizeof(int));
    return l.ids;
}

void token_list_free(TokenList *l) {
    free(l->ids);
    l->ids = NULL;
    l->n = l->cap = 0;
}

char *tokenizer_decode(const Tokenizer *t, const int *ids, int n, size_t *len_out) {
    size_t total = 0;
    for (int k = 0; k < n; k++) {
        if (ids[k] < 0 || ids[k] >= t->n_vocab)
            fatal("%s: cannot decode token id %d: vocabulary has %d tokens", t->path, ids[k], t->n_vocab);
        total += t->bytes_len[ids[k]];
    }
    char *out = (char *)mallocCheck(total + 1);
    size_t pos = 0;
    for (int k = 0; k < n; k++) {
        memcpy(out + pos, t->bytes[ids[k]], t->bytes_len[ids[k]]);
        pos += t->bytes_len[ids[k]];
    }
    out[pos] = '\0';
    if (len_out) *len_out = pos;
    return out;
}

// ----------------------------------------------------------------------------
// Accessors

int tokenizer_vocab_size(const Tokenizer *t) { return t->n_vocab; }
int tokenizer_bos_id(const Tokenizer *t) { return t->bos_id; }
int tokenizer_eos_id(const Tokenizer *t) { return t->eos_id; }
int tokenizer_can_encode(const Tokenizer *t) { return t->can_encode; }

void tokenizer_warn_if_small(const Tokenizer *t, int model_vocab_size, const char *what) {
    if ((double)t->n_vocab < 0.9 * model_vocab_size)
        fprintf(stderr, "warning: %s has %d tokens, far fewer than the model's vocabulary of %d: it is probably not "
                "this model's tokenizer\n", what, t->n_vocab, model_vocab_size);
}
const char *tokenizer_describe(const Tokenizer *t) { return t->describe; }

const char *tokenizer_token_text(const Tokenizer *t, int id) {
    if (id < 0 || id >= t->n_vocab) fatal("%s: token id %d outside [0, %d)", t->path, id, t->n_vocab);
    return t->text[id];
}

const unsigned char *tokenizer_token_bytes(const Tokenizer *t, int id, size_t *len) {
    if (id < 0 || id >= t->n_vocab) fatal("%s: token id %d outside [0, %d)", t->path, id, t->n_vocab);
    *len = t->bytes_len[id];
    return t->bytes[id];
}

int tokenizer_special_id(const Tokenizer *t, const char *text) {
    size_t n = strlen(text);
    for (int k = 0; k < t->n_added; k++) {
        int id = t->added_ids[k];
        if (strlen(t->text[id]) == n && memcmp(t->text[id], text, n) == 0) return id;
    }
    return -1;
}

int tokenizer_token_id(const Tokenizer *t, const char *text) {
    if (t->text_index.slots == NULL) return -1;
    // the index hashes the spelling; lengths come from strlen of the stored strings
    size_t n = strlen(text);
    uint32_t h = (uint32_t)hash_bytes((const unsigned char *)text, n) & t->text_index.mask;
    for (;;) {
        int id = t->text_index.slots[h];
        if (id < 0) return -1;
        if (strlen(t->text[id]) == n && memcmp(t->text[id], text, n) == 0) return id;
        h = (h + 1) & t->text_index.mask;
    }
}

void tokenizer_free(Tokenizer *t) {
    if (t == NULL) return;
    for (int id = 0; id < t->n_vocab; id++) { free(t->text[id]); free(t->bytes[id]); }
    free(t->text); free(t->bytes); free(t->bytes_len);
    free(t->text_index.slots); free(t->bytes_index.slots);
    free(t->merges.keys); free(t->merges.rank); free(t->merges.merged);
    free(t->added_ids);
    free(t->special);
    free(t->path);
    free(t);
}

// ----------------------------------------------------------------------------
// Merges, shared by the tokenizer.json and GGUF loaders

// Adds merge number `rank` of the tokens spelled a[0..alen) and b[0..blen).
static void add_merge(Tokenizer *t, int rank, const char *a, size_t alen, const char *b, size_t blen,
                      const char *where) {
    char small[256];
    char *buf = alen + blen + 1 <= sizeof(small) ? small : (char *)mallocCheck(alen + blen + 1);
    memcpy(buf, a, alen); buf[alen] = '\0';
    int left = tokenizer_token_id(t, buf);
    memcpy(buf, b, blen); buf[blen] = '\0';
    int right = tokenizer_token_id(t, buf);
    memcpy(buf, a, alen); memcpy(buf + alen, b, blen); buf[alen + blen] = '\0';
    int merged = tokenizer_token_id(t, buf);
    if (left < 0 || right < 0 || merged < 0)
        fatal("%s: %s: merge \"%.*s %.*s\" uses a token missing from the vocabulary (\"%s\")", t->path, where,
              (int)alen, a, (int)blen, b, left < 0 ? "left" : right < 0 ? "right" : "merged");
    merge_map_add(&t->merges, left, right, rank, merged);
    if (buf != small) free(buf);
}

// One merge written "left right" (split at the single space; byte-level spellings have none).
static void add_merge_line(Tokenizer *t, int rank, const char *line, size_t len, const char *where) {
    const char *space = memchr(line, ' ', len);
    if (space == NULL || space == line || space == line + len - 1 || memchr(space + 1, ' ', len - (space + 1 - line)))
        fatal("%s: %s: merge \"%.*s\" is not two tokens separated by one space", t->path, where, (int)len, line);
    add_merge(t, rank, line, space - line, space + 1, len - (space + 1 - line), where);
}

// bos/eos by well-known names, for vocabularies that do not say which they are.
static void guess_bos_eos(Tokenizer *t) {
    static const char *const eos_names[] = { "<|endoftext|>", "<|end_of_text|>", "</s>", "<|im_end|>" };
    static const char *const bos_names[] = { "<|begin_of_text|>", "<s>", "<|endoftext|>" };
    for (size_t k = 0; t->eos_id < 0 && k < sizeof(eos_names) / sizeof(eos_names[0]); k++)
        t->eos_id = tokenizer_token_id(t, eos_names[k]);
    for (size_t k = 0; t->bos_id < 0 && k < sizeof(bos_names) / sizeof(bos_names[0]); k++)
        t->bos_id = tokenizer_token_id(t, bos_names[k]);
}

// ----------------------------------------------------------------------------
// Hugging Face tokenizer.json

// Appends the steps of one pre_tokenizer object (recursing into Sequence). *byte_level is set
// when a ByteLevel step is seen: only byte-level vocabularies are supported.
static void parse_pre_tokenizer(Tokenizer *t, const cJSON *pre, int *byte_level, const char *where) {
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(pre, "type");
    if (!cJSON_IsString(type)) fatal("%s: %s: missing \"type\"", t->path, where);
    const char *ty = type->valuestring;
    char sub[128];
    if (strcmp(ty, "Sequence") == 0) {
        const cJSON *list = cJSON_GetObjectItemCaseSensitive(pre, "pretokenizers");
        if (!cJSON_IsArray(list)) fatal("%s: %s: Sequence without a \"pretokenizers\" array", t->path, where);
        int k = 0;
        const cJSON *item;
        cJSON_ArrayForEach(item, list) {
            snprintf(sub, sizeof(sub), "%s.pretokenizers[%d]", where, k++);
            parse_pre_tokenizer(t, item, byte_level, sub);
        }
    } else if (strcmp(ty, "ByteLevel") == 0) {
        const cJSON *aps = cJSON_GetObjectItemCaseSensitive(pre, "add_prefix_space");
        const cJSON *use_regex = cJSON_GetObjectItemCaseSensitive(pre, "use_regex");
        if (cJSON_IsTrue(aps)) add_step(t, STEP_PREFIX_SPACE, 0);
        if (use_regex == NULL || cJSON_IsTrue(use_regex)) add_step(t, STEP_SPLIT_GPT2, 0);
        *byte_level = 1;
    } else if (strcmp(ty, "Digits") == 0) {
        add_step(t, STEP_DIGITS, cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(pre, "individual_digits")));
    } else if (strcmp(ty, "Split") == 0) {
        const cJSON *pattern = cJSON_GetObjectItemCaseSensitive(pre, "pattern");
        const cJSON *regex = cJSON_GetObjectItemCaseSensitive(pattern, "Regex");
        const cJSON *behavior = cJSON_GetObjectItemCaseSensitive(pre, "behavior");
        if (!cJSON_IsString(regex))
            fatal("%s: %s: Split supported only with a {\"Regex\": ...} pattern", t->path, where);
        if (!cJSON_IsString(behavior) || strcmp(behavior->valuestring, "Isolated") != 0 ||
            cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(pre, "invert")))
            fatal("%s: %s: Split supported only with behavior \"Isolated\" and invert false", t->path, where);
        const char *re = regex->valuestring;
        if (strcmp(re, REGEX_GPT2) == 0) add_step(t, STEP_SPLIT_GPT2, 0);
        else if (strcmp(re, REGEX_LLAMA3) == 0) add_step(t, STEP_SPLIT_LLAMA3, 3);
        else if (strcmp(re, REGEX_QWEN2) == 0) add_step(t, STEP_SPLIT_LLAMA3, 1);
        else if (strcmp(re, "\\p{N}") == 0) add_step(t, STEP_DIGITS, 1);
        else fatal("%s: %s: unsupported Split regex \"%s\" (supported: GPT-2's, Llama 3's, Qwen2's, \\p{N})",
                   t->path, where, re);
    } else {
        fatal("%s: %s: unsupported pre-tokenizer type \"%s\" (supported: Sequence, ByteLevel, Digits, Split)",
              t->path, where, ty);
    }
}

// Token text of a tokenizer_config.json bos_token/eos_token entry (a string or {"content": s}).
static const char *config_token(const cJSON *cfg, const char *key) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(cfg, key);
    if (cJSON_IsString(v)) return v->valuestring;
    const cJSON *content = cJSON_GetObjectItemCaseSensitive(v, "content");
    return cJSON_IsString(content) ? content->valuestring : NULL;
}

// bos/eos from tokenizer_config.json in the same directory, when there is one.
static void read_sibling_config(Tokenizer *t) {
    const char *slash = strrchr(t->path, '/');
    size_t dir_len = slash ? (size_t)(slash - t->path + 1) : 0;
    char *cfg_path = (char *)mallocCheck(dir_len + 32);
    memcpy(cfg_path, t->path, dir_len);
    strcpy(cfg_path + dir_len, "tokenizer_config.json");
    FILE *f = fopen(cfg_path, "rb");
    if (f == NULL) { free(cfg_path); return; }
    fclose(f);
    size_t size;
    char *buf = read_file_all(cfg_path, &size);
    cJSON *cfg = cJSON_ParseWithLength(buf, size);
    if (cfg == NULL) fatal("%s: not valid JSON", cfg_path);
    const char *bos = config_token(cfg, "bos_token"), *eos = config_token(cfg, "eos_token");
    if (bos) t->bos_id = tokenizer_token_id(t, bos);
    if (eos) t->eos_id = tokenizer_token_id(t, eos);
    if ((bos && t->bos_id < 0) || (eos && t->eos_id < 0))
        fatal("%s: bos_token/eos_token \"%s\" is not in the vocabulary of %s", cfg_path,
              bos && t->bos_id < 0 ? bos : eos, t->path);
    cJSON_Delete(cfg);
    free(buf);
    free(cfg_path);
}

static Tokenizer *tokenizer_from_json(const char *path) {
    size_t size;
    char *buf = read_file_all(path, &size);
    cJSON *root = cJSON_ParseWithLength(buf, size);
    if (root == NULL) {
        const char *at = cJSON_GetErrorPtr();
        long offset = at ? (long)(at - buf) : -1;
        fatal("%s: not a tokenizer.json: invalid JSON near byte %ld", path, offset);
    }
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(root, "model");
    if (!cJSON_IsObject(model)) fatal("%s: missing \"model\" object", path);
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(model, "type");
    if (type != NULL && (!cJSON_IsString(type) || strcmp(type->valuestring, "BPE") != 0))
        fatal("%s: model.type is %s; only BPE is supported", path, cJSON_IsString(type) ? type->valuestring : "not a string");
    const cJSON *vocab = cJSON_GetObjectItemCaseSensitive(model, "vocab");
    const cJSON *merges = cJSON_GetObjectItemCaseSensitive(model, "merges");
    if (!cJSON_IsObject(vocab)) fatal("%s: model.vocab is missing or not an object", path);
    if (!cJSON_IsArray(merges)) fatal("%s: model.merges is missing or not an array", path);
    if (cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(model, "byte_fallback")))
        fatal("%s: model.byte_fallback is not supported (only byte-level BPE)", path);
    const char *affixes[] = { "continuing_subword_prefix", "end_of_word_suffix" };
    for (int k = 0; k < 2; k++) {
        const cJSON *v = cJSON_GetObjectItemCaseSensitive(model, affixes[k]);
        if (cJSON_IsString(v) && v->valuestring[0] != '\0') fatal("%s: model.%s is not supported", path, affixes[k]);
    }
    const cJSON *normalizer = cJSON_GetObjectItemCaseSensitive(root, "normalizer");
    if (normalizer != NULL && !cJSON_IsNull(normalizer)) {
        const cJSON *nt = cJSON_GetObjectItemCaseSensitive(normalizer, "type");
        fatal("%s: normalizer \"%s\" is not supported (only vocabularies without a normalizer)", path,
              cJSON_IsString(nt) ? nt->valuestring : "?");
    }
    const cJSON *added = cJSON_GetObjectItemCaseSensitive(root, "added_tokens");
    if (added != NULL && !cJSON_IsArray(added)) fatal("%s: added_tokens is not an array", path);

    // vocabulary size = largest id + 1 over the vocab and the added tokens
    int max_id = -1;
    const cJSON *item;
    cJSON_ArrayForEach(item, vocab) {
        if (!cJSON_IsNumber(item) || item->valuedouble < 0 || item->valuedouble != (double)item->valueint)
            fatal("%s: model.vocab[\"%s\"]: id is not a non-negative integer", path, item->string);
        if (item->valueint > max_id) max_id = item->valueint;
    }
    int k = 0;
    cJSON_ArrayForEach(item, added) {
        const cJSON *id = cJSON_GetObjectItemCaseSensitive(item, "id");
        const cJSON *content = cJSON_GetObjectItemCaseSensitive(item, "content");
        if (!cJSON_IsNumber(id) || id->valueint < 0 || !cJSON_IsString(content))
            fatal("%s: added_tokens[%d]: needs an integer \"id\" and a string \"content\"", path, k);
        if (id->valueint > max_id) max_id = id->valueint;
        // these flags change where `tokenizers` matches the token; matching them is not implemented,
        // so refuse rather than tokenize differently
        const char *flags[] = { "lstrip", "rstrip", "single_word" };
        for (int f = 0; f < 3; f++)
            if (cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(item, flags[f])))
                fatal("%s: added_tokens[%d] (\"%s\"): %s=true is not supported", path, k, content->valuestring, flags[f]);
        k++;
    }
    if (max_id < 0) fatal("%s: model.vocab is empty", path);
    Tokenizer *t = tokenizer_alloc(path, max_id + 1);

    // added tokens first: their content is what `tokenizers` returns for their ids
    int n_added = cJSON_GetArraySize(added);
    int *added_ids = (int *)mallocCheck((size_t)(n_added + 1) * sizeof(int));
    k = 0;
    cJSON_ArrayForEach(item, added) {
        int id = cJSON_GetObjectItemCaseSensitive(item, "id")->valueint;
        const char *content = cJSON_GetObjectItemCaseSensitive(item, "content")->valuestring;
        set_token(t, id, content, strlen(content), "added_tokens");
        if (cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(item, "special"))) t->special[id] = 1;
        added_ids[k++] = id;
    }
    cJSON_ArrayForEach(item, vocab) set_token(t, item->valueint, item->string, strlen(item->string), "model.vocab");
    finish_vocab(t);
    set_added_tokens(t, added_ids, n_added);
    free(added_ids);

    int n_merges = cJSON_GetArraySize(merges);
    merge_map_init(&t->merges, n_merges);
    k = 0;
    char where[64];
    cJSON_ArrayForEach(item, merges) {
        snprintf(where, sizeof(where), "model.merges[%d]", k);
        if (cJSON_IsString(item)) {
            add_merge_line(t, k, item->valuestring, strlen(item->valuestring), where);
        } else if (cJSON_IsArray(item) && cJSON_GetArraySize(item) == 2 &&
                   cJSON_IsString(cJSON_GetArrayItem(item, 0)) && cJSON_IsString(cJSON_GetArrayItem(item, 1))) {
            const char *a = cJSON_GetArrayItem(item, 0)->valuestring, *b = cJSON_GetArrayItem(item, 1)->valuestring;
            add_merge(t, k, a, strlen(a), b, strlen(b), where);
        } else {
            fatal("%s: %s: a merge must be \"a b\" or [\"a\", \"b\"]", path, where);
        }
        k++;
    }
    t->n_merges = n_merges;
    t->ignore_merges = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(model, "ignore_merges"));
    const cJSON *unk = cJSON_GetObjectItemCaseSensitive(model, "unk_token");
    if (cJSON_IsString(unk)) t->unk_id = tokenizer_token_id(t, unk->valuestring);

    const cJSON *pre = cJSON_GetObjectItemCaseSensitive(root, "pre_tokenizer");
    int byte_level = 0;
    if (pre != NULL && !cJSON_IsNull(pre)) parse_pre_tokenizer(t, pre, &byte_level, "pre_tokenizer");
    if (!byte_level) fatal("%s: pre_tokenizer has no ByteLevel step; only byte-level BPE is supported", path);
    build_description(t);
    t->can_encode = 1;
    read_sibling_config(t);
    guess_bos_eos(t);
    cJSON_Delete(root);
    free(buf);
    return t;
}

// ----------------------------------------------------------------------------
// GGUF (tokenizer.ggml.*)

// llama.cpp's tokenizer.ggml.pre names -> the pre-tokenizer chain `tokenizers` runs for them.
static void gguf_pre_steps(Tokenizer *t, const char *pre) {
    static const char *const digits_then_gpt2[] = { "smollm", "starcoder", "refact", "command-r", "codeshell" };
    if (pre == NULL || strcmp(pre, "default") == 0 || strcmp(pre, "gpt2") == 0 || strcmp(pre, "gpt-2") == 0) {
        add_step(t, STEP_SPLIT_GPT2, 0);
        return;
    }
    for (size_t k = 0; k < sizeof(digits_then_gpt2) / sizeof(digits_then_gpt2[0]); k++) {
        if (strcmp(pre, digits_then_gpt2[k]) == 0) {
            // llama.cpp: {"\p{N}", GPT-2's regex}; tokenizers: Sequence[Digits(individual), ByteLevel]
            add_step(t, STEP_DIGITS, 1);
            add_step(t, STEP_SPLIT_GPT2, 0);
            return;
        }
    }
    if (strcmp(pre, "llama3") == 0 || strcmp(pre, "llama-bpe") == 0 || strcmp(pre, "llama-v3") == 0) {
        add_step(t, STEP_SPLIT_LLAMA3, 3);
        t->ignore_merges = 1;   // Llama 3's tokenizer.json sets model.ignore_merges
        return;
    }
    fatal("%s: tokenizer.ggml.pre \"%s\" is not supported (supported: gpt2, default, smollm, starcoder, "
          "refact, command-r, codeshell, llama3, llama-bpe)", t->path, pre);
}

Tokenizer *tokenizer_from_gguf(const GGUFFile *g) {
    const char *path = g->path ? g->path : "GGUF";
    const char *model = gguf_get_str(g, "tokenizer.ggml.model");
    if (model == NULL) fatal("%s: no tokenizer.ggml.model: the file has no tokenizer", path);
    if (strcmp(model, "gpt2") != 0)
        fatal("%s: tokenizer.ggml.model is \"%s\"; only byte-level BPE (\"gpt2\") is supported", path, model);
    char **tokens; uint64_t *token_lens;
    int64_t n_tokens = gguf_get_str_array(g, "tokenizer.ggml.tokens", &tokens, &token_lens);
    if (n_tokens <= 0) fatal("%s: tokenizer.ggml.tokens is missing or empty", path);
    if (n_tokens > INT32_MAX) fatal("%s: tokenizer.ggml.tokens has %lld entries", path, (long long)n_tokens);
    char **merges; uint64_t *merge_lens;
    int64_t n_merges = gguf_get_str_array(g, "tokenizer.ggml.merges", &merges, &merge_lens);
    if (n_merges < 0) fatal("%s: tokenizer.ggml.merges is missing", path);
    int64_t *types = NULL;
    int64_t n_types = gguf_get_int_array(g, "tokenizer.ggml.token_type", &types);
    if (n_types >= 0 && n_types != n_tokens)
        fatal("%s: tokenizer.ggml.token_type has %lld entries for %lld tokens", path, (long long)n_types, (long long)n_tokens);

    Tokenizer *t = tokenizer_alloc(path, (int)n_tokens);
    for (int id = 0; id < (int)n_tokens; id++) set_token(t, id, tokens[id], token_lens[id], "tokenizer.ggml.tokens");
    finish_vocab(t);
    // control (3) and user-defined (4) tokens are the added tokens matched whole in the text
    int *added_ids = (int *)mallocCheck((size_t)n_tokens * sizeof(int));
    int n_added = 0;
    for (int id = 0; id < (int)n_tokens && types; id++)
        if (types[id] == 3 || types[id] == 4) {
            added_ids[n_added++] = id;
            t->special[id] = types[id] == 3;   // user-defined tokens are added but not special
        }
    set_added_tokens(t, added_ids, n_added);
    free(added_ids);
    free(types);

    merge_map_init(&t->merges, (int)n_merges);
    char where[64];
    for (int64_t k = 0; k < n_merges; k++) {
        snprintf(where, sizeof(where), "tokenizer.ggml.merges[%lld]", (long long)k);
        add_merge_line(t, (int)k, merges[k], merge_lens[k], where);
    }
    t->n_merges = (int)n_merges;
    gguf_pre_steps(t, gguf_get_str(g, "tokenizer.ggml.pre"));
    build_description(t);
    t->can_encode = 1;
    t->bos_id = (int)gguf_get_int(g, "tokenizer.ggml.bos_token_id", -1);
    t->eos_id = (int)gguf_get_int(g, "tokenizer.ggml.eos_token_id", -1);
    if (t->bos_id >= t->n_vocab || t->eos_id >= t->n_vocab)
        fatal("%s: tokenizer.ggml.bos_token_id/eos_token_id outside the vocabulary of %d", path, t->n_vocab);
    guess_bos_eos(t);
    return t;
}

// ----------------------------------------------------------------------------
// llm.c tokenizer .bin: a 256 x uint32 header (magic 20240328, version 1 or 2, vocab size,
// version 2: end-of-text id), then each token as a length byte and its bytes. No merges, so it
// only decodes.

static Tokenizer *tokenizer_from_llmc_bin(const char *path) {
    FILE *f = fopen_check(path, "rb");
    uint32_t header[256];
    fread_check(header, sizeof(uint32_t), 256, f, path, "header");
    if (header[0] != 20240328u) fatal("%s: bad magic %u (expected 20240328)", path, header[0]);
    if (header[1] != 1 && header[1] != 2) fatal("%s: unsupported version %u (expected 1 or 2)", path, header[1]);
    if (header[2] == 0 || header[2] > (1u << 24)) fatal("%s: implausible vocab size %u", path, header[2]);
    Tokenizer *t = tokenizer_alloc(path, (int)header[2]);
    for (int id = 0; id < t->n_vocab; id++) {
        unsigned char len;
        char where[48];
        snprintf(where, sizeof(where), "length of token %d", id);
        fread_check(&len, 1, 1, f, path, where);
        if (len == 0) fatal("%s: token %d has length 0", path, id);
        char buf[256];
        snprintf(where, sizeof(where), "bytes of token %d", id);
        fread_check(buf, 1, len, f, path, where);
        t->text[id] = (char *)mallocCheck(len + 1);
        memcpy(t->text[id], buf, len);
        t->text[id][len] = '\0';
        t->bytes[id] = (unsigned char *)mallocCheck(len);
        memcpy(t->bytes[id], buf, len);
        t->bytes_len[id] = len;
    }
    fclose(f);
    t->eos_id = header[1] == 2 ? (int)header[3] : (t->n_vocab > 50256 ? 50256 : -1);
    if (t->eos_id >= t->n_vocab) fatal("%s: end-of-text id %d outside the vocabulary of %d", path, t->eos_id, t->n_vocab);
    t->can_encode = 0;
    snprintf(t->describe, sizeof(t->describe), "none (llm.c .bin, decode only)");
    return t;
}

// ----------------------------------------------------------------------------

Tokenizer *tokenizer_load(const char *path) {
    FILE *f = fopen_check(path, "rb");
    unsigned char magic[4] = {0};
    size_t got = fread(magic, 1, 4, f);
    fclose(f);
    if (got == 4 && memcmp(magic, "GGUF", 4) == 0) {
        GGUFFile *g = gguf_open(path);
        Tokenizer *t = tokenizer_from_gguf(g);
        gguf_close(g);
        return t;
    }
    uint32_t m = (uint32_t)magic[0] | (uint32_t)magic[1] << 8 | (uint32_t)magic[2] << 16 | (uint32_t)magic[3] << 24;
    if (got == 4 && m == 20240328u) return tokenizer_from_llmc_bin(path);
    return tokenizer_from_json(path);
}

// ----------------------------------------------------------------------------
// Writing a Hugging Face tokenizer.json (tokenizer_save_hf)

// The pre_tokenizer chain is written as the steps in order (Digits, Split) followed by one
// ByteLevel, which absorbs the last steps when they are what ByteLevel itself does: a trailing
// GPT-2 split (use_regex true) and, just before it, the prefix space (add_prefix_space true).
// ByteLevel must come last because it maps bytes to characters that later steps would split
// differently, so a prefix-space step anywhere else has no tokenizer.json form.
typedef struct {
    int n_plain;        // steps[0 .. n_plain) are written as Digits / Split
    int prefix_space;   // ByteLevel add_prefix_space
    int use_regex;      // ByteLevel use_regex
} HfPreLayout;

static void hf_pre_layout(const Tokenizer *t, HfPreLayout *lay) {
    int n = t->n_steps;
    lay->use_regex = n > 0 && t->steps[n - 1].kind == STEP_SPLIT_GPT2;
    if (lay->use_regex) n--;
    lay->prefix_space = n > 0 && t->steps[n - 1].kind == STEP_PREFIX_SPACE;
    if (lay->prefix_space) n--;
    lay->n_plain = n;
}

int tokenizer_hf_check(const Tokenizer *t, char *why, size_t why_size) {
    char scratch[8];
    if (why == NULL || why_size == 0) { why = scratch; why_size = sizeof(scratch); }
    why[0] = '\0';
    if (!t->can_encode) {
        snprintf(why, why_size, "%s: an llm.c .bin tokenizer has no merges and no pre-tokenizer (it only "
                 "decodes), so it has no tokenizer.json form; use the model's tokenizer.json or GGUF instead", t->path);
        return 0;
    }
    HfPreLayout lay;
    hf_pre_layout(t, &lay);
    for (int k = 0; k < lay.n_plain; k++) {
        if (t->steps[k].kind == STEP_PREFIX_SPACE) {
            snprintf(why, why_size, "%s: pre-tokenizer \"%s\" adds the prefix space before another split; "
                     "tokenizer.json can only add it in the final ByteLevel step", t->path, t->describe);
            return 0;
        }
        if (t->steps[k].kind == STEP_SPLIT_LLAMA3 && t->steps[k].arg != 3 && t->steps[k].arg != 1) {
            snprintf(why, why_size, "%s: a Llama 3 style split with up to %d digits has no known regex",
                     t->path, t->steps[k].arg);
            return 0;
        }
    }
    for (int id = 0; id < t->n_vocab; id++) {
        const unsigned char *s = (const unsigned char *)t->text[id];
        size_t n = strlen(t->text[id]);
        if (n == 0) continue;   // a hole: no token to write
        for (size_t i = 0; i < n;) {
            int len;
            if (utf8_next(s, n, i, &len) == CP_INVALID) {
                snprintf(why, why_size, "%s: token %d is not valid UTF-8 (byte %zu), which JSON cannot hold",
                         t->path, id, i);
                return 0;
            }
            i += len;
        }
        // tokenizer.json maps each spelling to one id: a second token with the same spelling
        // would become a hole that decodes to nothing
        int first = tokenizer_token_id(t, t->text[id]);
        if (first != id) {
            snprintf(why, why_size, "%s: tokens %d and %d are both spelled \"%.60s\"; tokenizer.json's vocab "
                     "maps a spelling to one id", t->path, first, id, t->text[id]);
            return 0;
        }
    }
    return 1;
}

// s as a JSON string: quotes, backslashes and control characters escaped, UTF-8 written as is.
static void json_write_string(FILE *f, const char *s) {
    fputc('"', f);
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        unsigned char c = *p;
        if (c == '"' || c == '\\') { fputc('\\', f); fputc(c, f); }
        else if (c == '\n') fputs("\\n", f);
        else if (c == '\r') fputs("\\r", f);
        else if (c == '\t') fputs("\\t", f);
        else if (c < 0x20) fprintf(f, "\\u%04x", c);
        else fputc(c, f);
    }
    fputc('"', f);
}

typedef struct { int rank, left, right; } MergeRec;

static int merge_rec_cmp(const void *a, const void *b) {
    int ra = ((const MergeRec *)a)->rank, rb = ((const MergeRec *)b)->rank;
    return (ra > rb) - (ra < rb);
}

static const char *json_bool(int v) { return v ? "true" : "false"; }

int tokenizer_save_hf(const Tokenizer *t, const char *path) {
    if (!tokenizer_hf_check(t, NULL, 0)) return -1;
    HfPreLayout lay;
    hf_pre_layout(t, &lay);

    // merges in rank order (ranks may have gaps where a pair was listed twice; only order matters)
    MergeRec *merges = (MergeRec *)mallocCheck(((size_t)t->merges.mask + 1) * sizeof(MergeRec));
    size_t n_merges = 0;
    for (uint32_t h = 0; h <= t->merges.mask; h++) {
        uint64_t key = t->merges.keys[h];
        if (key == 0) continue;
        key -= 1;
        merges[n_merges].rank = t->merges.rank[h];
        merges[n_merges].left = (int)(uint32_t)(key >> 32);
        merges[n_merges].right = (int)(uint32_t)key;
        n_merges++;
    }
    qsort(merges, n_merges, sizeof(MergeRec), merge_rec_cmp);
    unsigned char *is_added = (unsigned char *)callocCheck((size_t)t->n_vocab, 1);
    for (int k = 0; k < t->n_added; k++) is_added[t->added_ids[k]] = 1;

    size_t tmp_size = strlen(path) + 32;
    char *tmp = (char *)mallocCheck(tmp_size);
    FILE *f = atomic_open(path, tmp, tmp_size);
    fprintf(f, "{\n  \"version\": \"1.0\",\n  \"truncation\": null,\n  \"padding\": null,\n  \"added_tokens\": [");
    int first = 1;
    for (int id = 0; id < t->n_vocab; id++) {
        if (!is_added[id]) continue;
        fprintf(f, "%s\n    {\"id\": %d, \"content\": ", first ? "" : ",", id);
        json_write_string(f, t->text[id]);
        // matched whole wherever it occurs, never normalized (there is no normalizer)
        fprintf(f, ", \"single_word\": false, \"lstrip\": false, \"rstrip\": false, \"normalized\": false, "
                "\"special\": %s}", json_bool(t->special[id]));
        first = 0;
    }
    fprintf(f, "%s],\n  \"normalizer\": null,\n  \"pre_tokenizer\": ", first ? "" : "\n  ");
    char byte_level[160];
    snprintf(byte_level, sizeof(byte_level),
             "{\"type\": \"ByteLevel\", \"add_prefix_space\": %s, \"trim_offsets\": true, \"use_regex\": %s}",
             json_bool(lay.prefix_space), json_bool(lay.use_regex));
    if (lay.n_plain == 0) {
        fputs(byte_level, f);
    } else {
        fprintf(f, "{\n    \"type\": \"Sequence\",\n    \"pretokenizers\": [");
        for (int k = 0; k < lay.n_plain; k++) {
            const PreStep *st = &t->steps[k];
            fprintf(f, "\n      ");
            if (st->kind == STEP_DIGITS) {
                fprintf(f, "{\"type\": \"Digits\", \"individual_digits\": %s},", json_bool(st->arg));
                continue;
            }
            const char *re = st->kind == STEP_SPLIT_GPT2 ? REGEX_GPT2 : st->arg == 3 ? REGEX_LLAMA3 : REGEX_QWEN2;
            fprintf(f, "{\"type\": \"Split\", \"pattern\": {\"Regex\": ");
            json_write_string(f, re);
            fprintf(f, "}, \"behavior\": \"Isolated\", \"invert\": false},");
        }
        fprintf(f, "\n      %s\n    ]\n  }", byte_level);
    }
    // the ByteLevel post-processor only trims offsets; no token is added (callers add BOS)
    fprintf(f, ",\n  \"post_processor\": %s,\n", byte_level);
    fprintf(f, "  \"decoder\": {\"type\": \"ByteLevel\", \"add_prefix_space\": true, \"trim_offsets\": true, "
            "\"use_regex\": true},\n");
    fprintf(f, "  \"model\": {\n    \"type\": \"BPE\",\n    \"dropout\": null,\n    \"unk_token\": ");
    if (t->unk_id >= 0) json_write_string(f, t->text[t->unk_id]);
    else fputs("null", f);
    fprintf(f, ",\n    \"continuing_subword_prefix\": null,\n    \"end_of_word_suffix\": null,\n"
            "    \"fuse_unk\": false,\n    \"byte_fallback\": false,\n    \"ignore_merges\": %s,\n    \"vocab\": {",
            json_bool(t->ignore_merges));
    first = 1;
    for (int id = 0; id < t->n_vocab; id++) {
        if (t->text[id][0] == '\0') continue;   // hole
        fprintf(f, "%s\n      ", first ? "" : ",");
        json_write_string(f, t->text[id]);
        fprintf(f, ": %d", id);
        first = 0;
    }
    fprintf(f, "\n    },\n    \"merges\": [");
    // pairs as arrays: a spelling may contain a space, which the "a b" string form cannot carry
    for (size_t k = 0; k < n_merges; k++) {
        fprintf(f, "%s\n      [", k ? "," : "");
        json_write_string(f, t->text[merges[k].left]);
        fputs(", ", f);
        json_write_string(f, t->text[merges[k].right]);
        fputc(']', f);
    }
    fprintf(f, "\n    ]\n  }\n}\n");
    atomic_commit(f, tmp, path);
    free(tmp);
    free(is_added);
    free(merges);
    return 0;
}
