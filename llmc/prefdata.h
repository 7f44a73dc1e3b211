/*
 * JSONL data for reward training and the MORA loop, and how its text becomes token ids.
 *
 *   preferences  one object a line: {"prompt": "...", "chosen": "...", "rejected": "...",
 *                "dim": "helpful" | "harmless" | "truthful"}
 *   prompts      one object a line: {"prompt": "...", "id": "..."}; "id" may be a string or a
 *                number and may be left out (the record is then called "FILE:LINE")
 *   examples     (supervised fine-tuning) one object a line: {"prompt": "...", "response": "..."}
 *
 * Other fields are ignored, and so are blank lines. Every bad line (not JSON, not an object, text
 * after the object, a missing or non-string field, an unknown dim, an empty or all-whitespace
 * text, a \u0000 in a field read) is an error "FILE:LINE: what is wrong" with a non-zero exit;
 * under PREFDATA_SKIP the line is skipped instead (the first few are named in warnings) and
 * counted in `skipped`.
 *
 * Text to tokens (TextEncoder): with the checkpoint's tokenizer, the prompt is rendered through
 * the chat template when there is one (as a user turn followed by the assistant header, special
 * tokens parsed) and the response is encoded after it on its own, with special tokens taken as
 * plain text: exactly the tokens a policy produces when it answers that prompt. Models without
 * a tokenizer (the tiny presets) use raw bytes as token ids (tokenizer.h has no byte-level
 * constructor, so the byte encoder lives here); that needs a vocabulary of at least 256.
 * A sequence longer than the context keeps its response whole and loses prompt tokens from the
 * left (counted); a response that alone exceeds the context is a bad line.
 */
#ifndef LLMC_PREFDATA_H
#define LLMC_PREFDATA_H
#include <stddef.h>
#include <stdint.h>
#include "chat_template.h"
#include "tokenizer.h"

// how many bad lines are named in warnings under PREFDATA_SKIP before they are only counted
#define PREFDATA_MAX_WARNINGS 10

// What a bad line does: the bad_lines argument of the loaders and of prefdata_encode.
#define PREFDATA_STOP      0   // stop at it: "FILE:LINE: what is wrong"
#define PREFDATA_SKIP      1   // skip it, warn (the first few) and count it
#define PREFDATA_STOP_HINT 2   // stop, and say that --skip_bad skips bad lines: only for a
                               // command that has that flag

typedef struct {
    char *prompt, *chosen, *rejected;
    int dim;              // DIM_HELPFUL, DIM_HARMLESS, DIM_TRUTHFUL (rewrite.h)
    const char *path;     // the file it came from (owned by PrefData)
    int line;             // 1-based line number in that file
} PrefPair;

typedef struct {
    PrefPair *pairs;
    int n, cap;
    int skipped;          // bad lines skipped (PREFDATA_SKIP)
    char **paths;         // every file read, in order
    int n_paths;
} PrefData;

typedef struct {
    char *prompt;
    char *id;
    const char *path;
    int line;
} PromptRecord;

typedef struct {
    PromptRecord *records;
    int n, cap;
    int skipped;
    char **paths;
    int n_paths;
} PromptData;

// Appends the records of one file; bad_lines is PREFDATA_STOP, PREFDATA_SKIP or
// PREFDATA_STOP_HINT. The file may be a pipe (--data <(cat f)).
void prefdata_load(PrefData *data, const char *path, int bad_lines);
// Loads a comma-separated list of files ("a.jsonl,b.jsonl"); a file with no valid record, or an
// empty list, is an error.
void prefdata_load_list(PrefData *data, const char *comma_list, int bad_lines);
void prefdata_free(PrefData *data);

void promptdata_load(PromptData *data, const char *path, int bad_lines);
void promptdata_free(PromptData *data);
// Supervised fine-tuning examples (`train_mora sft`): a prompt and the response to learn.
typedef struct {
    char *prompt, *response;
    const char *path;
    int line;
} SftExample;

typedef struct {
    SftExample *examples;
    int n, cap;
    int skipped;
    char **paths;
    int n_paths;
} SftData;

// Loads a comma-separated list of example files, as prefdata_load_list.
void sftdata_load_list(SftData *data, const char *comma_list, int bad_lines);
void sftdata_free(SftData *data);

// Fingerprints of what was loaded (every field that the training reads, in order), so that ranks
// can check they read the same data (run_require_same_on_ranks).
uint64_t prefdata_fingerprint(const PrefData *data);
uint64_t promptdata_fingerprint(const PromptData *data);

// ---------------------------------------------------------------------------------------------
// text -> tokens

typedef struct {
    Tokenizer *tokenizer;          // NULL: bytes are the token ids
    const ChatTemplate *chat;      // NULL: prompt and response are concatenated as they are
    int vocab_size;                // the model's V: every id must be below it
} TextEncoder;

// tokenizer_path "" selects the byte encoder (model_vocab_size must be >= 256). template_name:
// "auto" takes checkpoint_template (may be ""), "none" uses no template, otherwise a template
// name from chat_template.h (an unknown name is an error).
void text_encoder_init(TextEncoder *enc, const char *tokenizer_path, const char *template_name,
                       const char *checkpoint_template, int model_vocab_size);
void text_encoder_free(TextEncoder *enc);
// Appends the prompt's tokens (through the chat template) / the response's tokens to out.
void text_encode_prompt(const TextEncoder *enc, const char *prompt, TokenList *out);
void text_encode_response(const TextEncoder *enc, const char *response, TokenList *out);

// Token sequences stored back to back: sequence i is tokens[offsets[i] .. offsets[i] + lengths[i]).
typedef struct {
    int n, cap;
    int *lengths;
    size_t *offsets;
    int *tokens;
    size_t n_tokens, tokens_cap;
} TokenSeqs;

void token_seqs_push(TokenSeqs *s, const int *ids, int n);
const int *token_seqs_get(const TokenSeqs *s, int i);
void token_seqs_free(TokenSeqs *s);

// Encoded preference pairs: sequence 2i is pair i's prompt + chosen, 2i+1 prompt + rejected.
typedef struct {
    int n_pairs;
    int *dims;            // (n_pairs)
    int *source;          // (n_pairs) index of the pair in the PrefData it came from
    TokenSeqs seqs;
    int truncated;        // sequences whose prompt lost tokens on the left to fit max_len
    int skipped;          // pairs dropped because a response alone exceeds max_len (PREFDATA_SKIP)
} EncodedPrefs;

// Encodes every pair to fit max_len tokens (rule above). A response longer than max_len is an
// error "FILE:LINE: ..." or, under PREFDATA_SKIP, a skipped pair.
void prefdata_encode(const PrefData *data, const TextEncoder *enc, int max_len, int bad_lines, EncodedPrefs *out);
void encoded_prefs_free(EncodedPrefs *e);

// prompt + response as one sequence of at most max_len tokens into out (cleared first);
// returns 1 when the prompt was truncated, 0 when it fitted, -1 when the response alone has
// more than max_len tokens (out is then left empty).
int text_encode_sequence(const TextEncoder *enc, const char *prompt, const char *response, int max_len, TokenList *out);

// Appends the tokens that end an assistant's turn, which a fine-tuned model learns to write after
// its answer: the chat template's first stop string (one special token when the tokenizer has it,
// as <|im_end|> for chatml and <|eot_id|> for llama3; else its text, as "\n\nHuman:" for plain);
// without a template, the tokenizer's end-of-sequence token; nothing for the byte encoder.
void text_encode_end_of_turn(const TextEncoder *enc, TokenList *out);

// Encoded fine-tuning examples: sequence i is example source[i]'s prompt tokens (the first
// prompt_len[i]) followed by its response and end of turn. A model reads the sequence's first
// n - 1 tokens and learns to predict the response and end of turn.
typedef struct {
    int n;
    int *prompt_len;      // (n)
    int *source;          // (n) index of the example in the SftData it came from
    TokenSeqs seqs;
    int truncated;        // sequences whose prompt lost tokens on the left to fit max_len
    int skipped;          // examples dropped because the response alone does not fit (PREFDATA_SKIP)
    int64_t counted;      // response and end-of-turn tokens over all sequences
} EncodedSft;

// Encodes every example to at most max_len tokens with at least one prompt token: the prompt
// loses tokens from the left; a response whose tokens and end of turn exceed max_len - 1 is a bad
// line ("FILE:LINE: ..."), or under PREFDATA_SKIP a skipped example.
void sftdata_encode(const SftData *data, const TextEncoder *enc, int max_len, int bad_lines, EncodedSft *out);
// Every token of every sequence and where its response starts (what the training reads).
uint64_t encoded_sft_fingerprint(const EncodedSft *e);
void encoded_sft_free(EncodedSft *e);

#endif
