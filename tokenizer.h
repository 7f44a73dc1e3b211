/*
 * Byte-level BPE tokenizer, token for token what Hugging Face `tokenizers` produces for GPT-2,
 * SmolLM2 and Llama 3 style vocabularies.
 *
 * Encoding runs the same stages as `tokenizers`:
 *   1. added/special tokens (<|endoftext|>, <|im_start|>, ...) are found whole in the input
 *      (leftmost, longest first) and emitted as their ids, never split;
 *   2. the text between them is cut by the vocabulary's pre-tokenizer: a chain of splits that
 *      reproduce the regexes tokenizer.json declares (GPT-2's, Llama 3's, digit splitting), done
 *      by hand-written matchers over Unicode classes L, N and White_Space (no regex library);
 *   3. every piece is BPE-merged over its bytes (byte-level BPE: each byte is a base symbol),
 *      lowest merge rank first, leftmost first among equal ranks.
 * Decoding concatenates the bytes each token stands for, so decode(encode(s)) == s for any byte
 * string; invalid UTF-8 is carried through byte by byte.
 *
 * Loaders: Hugging Face tokenizer.json, the tokenizer stored in a GGUF file
 * (tokenizer.ggml.*), and llm.c's tokenizer .bin (decode only: it has no merges). Unsupported
 * or malformed vocabularies stop with an error naming the file and the field. tokenizer_save_hf
 * writes any of them but the .bin back out as a Hugging Face tokenizer.json.
 */
#ifndef TOKENIZER_H
#define TOKENIZER_H
#include <stddef.h>
#include "gguf.h"

typedef struct Tokenizer Tokenizer;

// Growable list of token ids (encode appends to it).
typedef struct {
    int *ids;
    int n;
    int cap;
} TokenList;

// Loads a tokenizer, choosing the format from the file's first bytes: "GGUF" magic, llm.c's
// .bin magic 20240328, otherwise tokenizer.json. For tokenizer.json, bos/eos are read from a
// tokenizer_config.json next to it when present (else well-known token names are looked up).
Tokenizer *tokenizer_load(const char *path);
// The tokenizer of an already opened GGUF file (tokenizer.ggml.model must be "gpt2").
Tokenizer *tokenizer_from_gguf(const GGUFFile *g);
void tokenizer_free(Tokenizer *t);

// Appends the ids of text[0..len) to out. parse_special = 1 matches added/special tokens in the
// text (what `tokenizers` does); 0 encodes their text as ordinary bytes (for untrusted data).
// No BOS is added: callers prepend tokenizer_bos_id themselves when the model wants one.
void tokenizer_encode_append(const Tokenizer *t, const char *text, size_t len, int parse_special,
                             TokenList *out);
// Convenience: encodes with special-token parsing into a malloc'd array of *n_tokens ids.
int *tokenizer_encode(const Tokenizer *t, const char *text, size_t len, int *n_tokens);
void token_list_free(TokenList *l);

// Bytes the ids stand for, concatenated, as a malloc'd NUL-terminated buffer (*len_out, may be
// NULL, gets the length without the NUL). Ids outside the vocabulary are a fatal error.
char *tokenizer_decode(const Tokenizer *t, const int *ids, int n, size_t *len_out);

int tokenizer_vocab_size(const Tokenizer *t);       // largest id + 1
int tokenizer_bos_id(const Tokenizer *t);           // -1 when the vocabulary has none
int tokenizer_eos_id(const Tokenizer *t);           // -1 when the vocabulary has none
int tokenizer_can_encode(const Tokenizer *t);       // 0 for llm.c .bin (no merges)
// Prints a warning naming `what` (the tokenizer's path or flag) when the tokenizer has fewer than
// 90% of the model's vocab_size ids: a model pads its vocabulary by a few hundred ids at most, so
// a much smaller tokenizer is another model's (a byte tokenizer reads SmolLM2's ids 0..255 as bytes).
void tokenizer_warn_if_small(const Tokenizer *t, int model_vocab_size, const char *what);
// The token as the vocabulary spells it (byte-level form, e.g. "Ġthe"); "" for an id with no
// token (a hole in the vocabulary). id must be in [0, vocab size).
const char *tokenizer_token_text(const Tokenizer *t, int id);
// The bytes the token decodes to (not NUL-terminated; *len gets the count).
const unsigned char *tokenizer_token_bytes(const Tokenizer *t, int id, size_t *len);
// Id of the added/special token whose text is exactly `text`, or -1.
int tokenizer_special_id(const Tokenizer *t, const char *text);
// Id of the vocabulary entry spelled `text` in byte-level form, or -1.
int tokenizer_token_id(const Tokenizer *t, const char *text);
// Writes the tokenizer to `path` as a Hugging Face tokenizer.json that `tokenizers`
// (Tokenizer.from_file) and tokenizer_load both read back to this tokenizer: the same ids for
// every text, the same added tokens (special flag kept), the same decoding. Written: a BPE model
// (vocab without holes, merges in rank order as ["a", "b"] pairs, ignore_merges, unk_token), the
// added tokens (normalized/lstrip/rstrip/single_word false), no normalizer, the pre-tokenizer
// chain as GPT-2 / SmolLM2 / Llama 3 / Qwen2 declare it (Digits and Split steps, then ByteLevel),
// ByteLevel post-processor (adds no tokens) and decoder. bos/eos are not part of tokenizer.json:
// they belong in tokenizer_config.json, which this does not write.
// The file is written to a temporary name and renamed over `path`, so `path` is either the old
// file or the whole new one. Returns 0 when written. Returns -1, writing nothing, when the
// tokenizer has no faithful tokenizer.json form (tokenizer_hf_check says why: an llm.c .bin
// tokenizer, which only decodes; a token that is not valid UTF-8; two ids with one spelling).
// I/O errors are fatal, as everywhere in train_mora.
int tokenizer_save_hf(const Tokenizer *t, const char *path);
// 1 when tokenizer_save_hf can write this tokenizer; else 0 with one line in why[0..why_size)
// (why may be NULL) naming the tokenizer and the reason, for the caller's message.
int tokenizer_hf_check(const Tokenizer *t, char *why, size_t why_size);
// One line describing the pre-tokenizer chain (for logs and tools), e.g. "digits(individual) > gpt2".
const char *tokenizer_describe(const Tokenizer *t);

#endif
