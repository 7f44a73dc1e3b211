/*
 * Token shards in llm.c's format, read as a sequence of (B, T) batches.
 *
 * A shard: a header of 256 int32 (magic 20240520 with version 1 and uint16 tokens, as llm.c
 * writes for GPT-2; magic 20240801 with version 7 and uint32 tokens, as llm.c writes for
 * Llama 3), header[2] = number of tokens, then the tokens. A pattern names the shards
 * ("data/train_*.bin"); they are read in sorted order, each batch takes B*T+1 consecutive tokens
 * (inputs and the targets one to the right) and the next batch starts B*T further on. At the
 * end of the last shard the loader wraps to the first: an epoch. The position is a single batch
 * counter, so a resumed run seeks to it and reads exactly what an uninterrupted run would.
 *
 * Data parallel ranks read interleaved batches: rank r of R takes batches r, r+R, r+2R, ...
 *
 * Every token read is checked against the model's vocabulary: a shard written with another
 * tokenizer stops the run with the shard, the token's position and its id, not an error deep in
 * the model.
 *
 * Fine-tuning examples (SftLoader, for `train_mora sft`): encoded prompt/response sequences
 * (llmc/prefdata.h), one a row of the (B, T) batch, padded on the right. The loss mask counts
 * the positions whose target is a response or end-of-turn token. The examples form a stream
 * over epochs (each epoch a permutation drawn from the seed and the epoch's number, or the file
 * order); batch g holds the stream's items g*B .. g*B+B-1, and the ranks interleave the batches
 * as above, so a batch counter is again the whole position.
 */
#ifndef DATALOADER_H
#define DATALOADER_H

#include <glob.h>
#include <stdint.h>
#include <sys/stat.h>
#include "llmc/utils.h"
#include "llmc/rand.h"
#include "llmc/prefdata.h"

#define SHARD_MAGIC_U16 20240520
#define SHARD_MAGIC_U32 20240801
#define SHARD_HEADER_INTS 256

typedef struct {
    int B, T;
    int rank, world;
    int vocab_size;            // every token must be below it
    const char *what;          // "train data" or "val data", for messages
    int n_shards;
    char **paths;
    int64_t *shard_tokens;     // tokens in each shard
    int *shard_bytes_per_tok;  // 2 or 4
    int64_t *shard_batches;    // batches that fit in each shard
    int64_t total_batches;     // over all shards (one epoch)
    int64_t batch_index;       // next global batch (before rank interleaving)
    int *inputs;               // (B, T)
    int *targets;              // (B, T)
    unsigned char *buf;        // raw tokens of one batch
} DataLoader;

// Reads one shard header; exits with "PATH: ..." on a missing file, bad magic/version, or a
// header that disagrees with the file size.
static inline void shard_read_header(const char *path, int64_t *n_tokens, int *bytes_per_tok) {
    struct stat st;
    // a directory opens for reading on Linux and only fails at the first read
    if (stat(path, &st) == 0 && S_ISDIR(st.st_mode)) fatal("%s is a directory, not a token shard file", path);
    FILE *f = fopen_check(path, "rb");
    int32_t header[SHARD_HEADER_INTS];
    if (fread(header, sizeof(int32_t), SHARD_HEADER_INTS, f) != SHARD_HEADER_INTS)
        fatal("%s: truncated token shard header (need %d bytes)", path, (int)(SHARD_HEADER_INTS * 4));
    if (header[0] == SHARD_MAGIC_U16) {
        if (header[1] != 1) fatal("%s: unsupported token shard version %d (expected 1 for magic %d)", path, header[1], SHARD_MAGIC_U16);
        *bytes_per_tok = 2;
    } else if (header[0] == SHARD_MAGIC_U32) {
        if (header[1] != 7) fatal("%s: unsupported token shard version %d (expected 7 for magic %d)", path, header[1], SHARD_MAGIC_U32);
        *bytes_per_tok = 4;
    } else {
        fatal("%s: not a token shard (magic %d; expected %d or %d, llm.c's format)", path, header[0], SHARD_MAGIC_U16, SHARD_MAGIC_U32);
    }
    if (header[2] < 0) fatal("%s: negative token count %d in header", path, header[2]);
    *n_tokens = header[2];
    if (fseek(f, 0, SEEK_END) != 0) fatal("%s: cannot seek", path);
    long size = ftell(f);
    fclose(f);
    long expected = (long)SHARD_HEADER_INTS * 4 + (long)(*n_tokens) * (*bytes_per_tok);
    if (size < expected) fatal("%s: truncated token shard: header says %lld tokens (%ld bytes), file has %ld bytes", path, (long long)*n_tokens, expected, size);
}

// `what` ("train data", "val data") names the shards in messages; every token must be below
// vocab_size.
static inline void dataloader_init(DataLoader *dl, const char *pattern, int B, int T, int rank, int world,
                                   int vocab_size, const char *what) {
    memset(dl, 0, sizeof(*dl));
    dl->B = B; dl->T = T; dl->rank = rank; dl->world = world;
    dl->vocab_size = vocab_size;
    dl->what = what;
    glob_t g;
    int rc = glob(pattern, 0, NULL, &g);
    if (rc != 0 || g.gl_pathc == 0) fatal("no token shards match '%s'", pattern);
    dl->n_shards = (int)g.gl_pathc;
    dl->paths = (char **)mallocCheck(sizeof(char *) * dl->n_shards);
    dl->shard_tokens = (int64_t *)mallocCheck(sizeof(int64_t) * dl->n_shards);
    dl->shard_bytes_per_tok = (int *)mallocCheck(sizeof(int) * dl->n_shards);
    dl->shard_batches = (int64_t *)mallocCheck(sizeof(int64_t) * dl->n_shards);
    for (int i = 0; i < dl->n_shards; i++) {
        dl->paths[i] = xstrdup(g.gl_pathv[i]);
        shard_read_header(dl->paths[i], &dl->shard_tokens[i], &dl->shard_bytes_per_tok[i]);
        int64_t usable = dl->shard_tokens[i] - 1;
        dl->shard_batches[i] = usable > 0 ? usable / ((int64_t)B * T) : 0;
        dl->total_batches += dl->shard_batches[i];
    }
    globfree(&g);
    if (dl->total_batches < 1)
        fatal("token shards '%s' hold too few tokens for one batch of B=%d x T=%d (+1)", pattern, B, T);
    dl->inputs = (int *)mallocCheck(sizeof(int) * B * T);
    dl->targets = (int *)mallocCheck(sizeof(int) * B * T);
    dl->buf = (unsigned char *)mallocCheck((size_t)(B * T + 1) * 4);
}

// Positions the loader so that the next batch read is this rank's batch of step `step`
// (all ranks together read `world` batches a step).
static inline void dataloader_seek_step(DataLoader *dl, int64_t step, int grad_accum) {
    dl->batch_index = step * (int64_t)grad_accum * dl->world;
}

// Reads the next batch of this rank into dl->inputs / dl->targets. Returns the global batch
// index it read.
static inline int64_t dataloader_next(DataLoader *dl) {
    int64_t global = dl->batch_index + dl->rank;
    dl->batch_index += dl->world;
    int64_t b = global % dl->total_batches;
    int s = 0;
    while (b >= dl->shard_batches[s]) { b -= dl->shard_batches[s]; s++; }
    int bpt = dl->shard_bytes_per_tok[s];
    int64_t n = (int64_t)dl->B * dl->T + 1;
    FILE *f = fopen_check(dl->paths[s], "rb");
    int64_t first = b * dl->B * dl->T;   // the batch's first token in the shard
    long offset = (long)SHARD_HEADER_INTS * 4 + (long)first * bpt;
    if (fseek(f, offset, SEEK_SET) != 0) fatal("%s: cannot seek to token %lld", dl->paths[s], (long long)first);
    fread_check(dl->buf, (size_t)bpt, (size_t)n, f, dl->paths[s], "tokens");
    fclose(f);
    for (int64_t i = 0; i < n; i++) {
        int64_t tok = bpt == 2 ? (int64_t)((uint16_t *)dl->buf)[i] : (int64_t)((uint32_t *)dl->buf)[i];
        if (tok >= dl->vocab_size)
            fatal("%s shard %s: token id %lld at token offset %lld is not below the model's vocabulary size %d "
                  "(was the shard made with another tokenizer?)", dl->what, dl->paths[s], (long long)tok,
                  (long long)(first + i), dl->vocab_size);
        if (i < n - 1) dl->inputs[i] = (int)tok;
        if (i > 0) dl->targets[i - 1] = (int)tok;
    }
    return global;
}

static inline void dataloader_free(DataLoader *dl) {
    for (int i = 0; i < dl->n_shards; i++) free(dl->paths[i]);
    free(dl->paths); free(dl->shard_tokens); free(dl->shard_bytes_per_tok); free(dl->shard_batches);
    free(dl->inputs); free(dl->targets); free(dl->buf);
    memset(dl, 0, sizeof(*dl));
}

typedef struct {
    const EncodedSft *data;
    int B, T;
    int rank, world;
    int shuffle;               // 0: every epoch in the order of the files
    uint64_t seed;
    int64_t batch_index;       // next global batch (before rank interleaving)
    int *inputs;               // (B, T)
    int *targets;              // (B, T)
    float *mask;               // (B, T) 1 where the target is a response or end-of-turn token
    int counted;               // positions the last batch counts
    int64_t perm_epoch;        // the epoch `perm` belongs to (-1: none yet)
    int *perm;                 // (n) the examples in that epoch's order
} SftLoader;

static inline void sft_loader_init(SftLoader *l, const EncodedSft *data, int B, int T, int rank, int world,
                                   int shuffle, uint64_t seed) {
    memset(l, 0, sizeof(*l));
    l->data = data;
    l->B = B; l->T = T; l->rank = rank; l->world = world;
    l->shuffle = shuffle;
    l->seed = seed;
    l->inputs = (int *)mallocCheck(sizeof(int) * B * T);
    l->targets = (int *)mallocCheck(sizeof(int) * B * T);
    l->mask = (float *)mallocCheck(sizeof(float) * B * T);
    l->perm = (int *)mallocCheck(sizeof(int) * data->n);
    l->perm_epoch = -1;
}

// The example at position pos of the stream (pos / n is its epoch).
static inline int sft_loader_example(SftLoader *l, int64_t pos) {
    const int n = l->data->n;
    const int64_t epoch = pos / n;
    if (!l->shuffle) return (int)(pos % n);
    if (epoch != l->perm_epoch) {
        // Fisher-Yates from a generator of the seed and the epoch alone, so that any batch can be
        // read first (a resumed run seeks to its step)
        uint64_t rng = rng_seed(l->seed ^ rng_seed((uint64_t)epoch + 1));
        for (int i = 0; i < n; i++) l->perm[i] = i;
        for (int i = n - 1; i > 0; i--) {
            int j = (int)(((uint64_t)random_u32(&rng) * (uint64_t)(i + 1)) >> 32);
            int t = l->perm[i]; l->perm[i] = l->perm[j]; l->perm[j] = t;
        }
        l->perm_epoch = epoch;
    }
    return l->perm[pos % n];
}

static inline void sft_loader_seek_step(SftLoader *l, int64_t step, int grad_accum) {
    l->batch_index = step * (int64_t)grad_accum * l->world;
}

// Fills the batch with the examples first .. first + B - 1 of the stream.
static inline void sft_loader_fill(SftLoader *l, int64_t first) {
    const int B = l->B, T = l->T;
    l->counted = 0;
    for (int b = 0; b < B; b++) {
        int e = sft_loader_example(l, first + b);
        const int *seq = token_seqs_get(&l->data->seqs, e);
        int n = l->data->seqs.lengths[e], prompt = l->data->prompt_len[e];
        for (int t = 0; t < T; t++) {
            int i = b * T + t;
            int real = t + 1 < n;   // position t reads seq[t] and predicts seq[t + 1]
            l->inputs[i] = t < n ? seq[t] : 0;
            l->targets[i] = real ? seq[t + 1] : 0;
            l->mask[i] = real && t + 1 >= prompt ? 1.0f : 0.0f;
            l->counted += real && t + 1 >= prompt;
        }
    }
}

// Reads this rank's next batch (as dataloader_next).
static inline void sft_loader_next(SftLoader *l) {
    int64_t global = l->batch_index + l->rank;
    l->batch_index += l->world;
    sft_loader_fill(l, global * l->B);
}

static inline void sft_loader_free(SftLoader *l) {
    free(l->inputs); free(l->targets); free(l->mask); free(l->perm);
    memset(l, 0, sizeof(*l));
}
#endif
