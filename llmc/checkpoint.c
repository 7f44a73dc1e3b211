/*
 * Checkpoint formats (see checkpoint.h): native, llm.c .bin, Hugging Face safetensors and GGUF.
 *
 * Every loader reads a config first, lays the model out (model_layout, which validates it),
 * checks the file against that layout (every tensor's presence and shape, no tensor left
 * unused; the file size for llm.c and native files), and only then calls model_init and fills
 * the parameter buffer tensor by tensor. So a wrong file ends in "PATH: missing tensor NAME" or
 * "PATH: tensor NAME has shape [..], expected [..]" rather than in garbage weights or in a
 * failed allocation of what a wrong config asks for.
 *
 * The Hugging Face and GGUF names are produced from one table per family (hf_tensor_table,
 * gguf_tensor_table): a name, the shape the file stores, and where the tensor lives in the
 * params layout. Loading and saving walk the same table, so they cannot disagree on a name.
 */
#include <math.h>
#include "checkpoint.h"
#include "chat_template.h"
#include "gguf.h"
#include "safetensors.h"
#include "utils.h"
#include <cjson/cJSON.h>
#include <sys/stat.h>
#include <unistd.h>

// ----------------------------------------------------------------------------
// layout helpers

// Element offset of each parameter tensor within the params buffer (tensors are contiguous in
// enum order).
static void param_offsets(const Model *model, size_t offsets[NUM_PARAM_TENSORS]) {
    size_t off = 0;
    for (int i = 0; i < NUM_PARAM_TENSORS; i++) { offsets[i] = off; off += model->param_sizes[i]; }
}

// Heads that split the channels: needed wherever the head size is derived as channels / heads
// (GPT-2 always; Llama when the checkpoint does not give head_dim).
static void require_heads_divide(const char *path, const char *embd_name, int n_embd, const char *head_name, int n_head) {
    if (n_head <= 0) fatal("%s: %s %d must be positive", path, head_name, n_head);
    if (n_embd <= 0 || n_embd % n_head != 0)
        fatal("%s: %s %d is not divisible by %s %d: the heads must split the channels evenly", path,
              embd_name, n_embd, head_name, n_head);
}

static int is_directory(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}
static int is_file(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

// Formats a shape as "[a, b, c]" into buf.
static const char *shape_str(char *buf, size_t size, int n_dims, const int64_t *shape) {
    size_t at = 0;
    at += snprintf(buf + at, size - at, "[");
    for (int d = 0; d < n_dims && at < size; d++)
        at += snprintf(buf + at, size - at, d ? ", %lld" : "%lld", (long long)shape[d]);
    if (at < size) snprintf(buf + at, size - at, "]");
    return buf;
}

// ----------------------------------------------------------------------------
// the tensor tables

// One named tensor of a file format, mapped into the params layout.
typedef struct {
    char name[96];
    int n_dims;
    int64_t shape[2];   // the shape as the file stores it (numpy order)
    size_t offset;      // element offset into a params-shaped buffer
    int transpose;      // the file stores the transpose of our (out, in) block (GPT-2 Conv1D)
    int permute_heads;  // GGUF llama q/k: rows permuted for interleaved RoPE; value = head count
} TensorEntry;

typedef struct {
    TensorEntry *entries;
    int n, cap;
} TensorTable;

static void table_add(TensorTable *t, const char *name, int n_dims, int64_t d0, int64_t d1, size_t offset,
                      int transpose, int permute_heads) {
    if (t->n == t->cap) {
        t->cap = t->cap ? 2 * t->cap : 64;
        t->entries = (TensorEntry *)reallocCheck(t->entries, t->cap * sizeof(TensorEntry));
    }
    TensorEntry *e = &t->entries[t->n++];
    snprintf(e->name, sizeof(e->name), "%s", name);
    e->n_dims = n_dims;
    e->shape[0] = d0;
    e->shape[1] = n_dims > 1 ? d1 : 1;
    e->offset = offset;
    e->transpose = transpose;
    e->permute_heads = permute_heads;
}

// Hugging Face names and shapes. GPT-2 (GPT2LMHeadModel, names under "transformer."): Conv1D
// weights are stored (in, out), the transpose of ours. Llama/Qwen2 (LlamaForCausalLM): q/k/v
// are separate tensors that stack into our fused qkv rows, gate/up into our fused fc rows.
// Only the first V rows of a padded embedding are Hugging Face's.
static TensorTable hf_tensor_table(const Model *model) {
    const ModelConfig *c = &model->config;
    size_t o[NUM_PARAM_TENSORS];
    param_offsets(model, o);
    int64_t C = c->n_embd, L = c->n_layer, HS = c->head_dim, F = c->ffn_hidden, V = c->vocab_size;
    int64_t NH = c->n_head, NKV = c->n_kv_head, QKV = (NH + 2 * NKV) * HS;
    TensorTable t = {0};
    char n[96];
    if (c->arch == ARCH_GPT2) {
        table_add(&t, "transformer.wte.weight", 2, V, C, o[P_WTE], 0, 0);
        table_add(&t, "transformer.wpe.weight", 2, c->max_seq_len, C, o[P_WPE], 0, 0);
        for (int64_t l = 0; l < L; l++) {
            #define H(suffix) (snprintf(n, sizeof(n), "transformer.h.%lld.%s", (long long)l, suffix), n)
            table_add(&t, H("ln_1.weight"), 1, C, 0, o[P_LN1W] + l * C, 0, 0);
            table_add(&t, H("ln_1.bias"), 1, C, 0, o[P_LN1B] + l * C, 0, 0);
            table_add(&t, H("attn.c_attn.weight"), 2, C, 3 * C, o[P_QKVW] + l * 3 * C * C, 1, 0);
            table_add(&t, H("attn.c_attn.bias"), 1, 3 * C, 0, o[P_QKVB] + l * 3 * C, 0, 0);
            table_add(&t, H("attn.c_proj.weight"), 2, C, C, o[P_ATTPROJW] + l * C * C, 1, 0);
            table_add(&t, H("attn.c_proj.bias"), 1, C, 0, o[P_ATTPROJB] + l * C, 0, 0);
            table_add(&t, H("ln_2.weight"), 1, C, 0, o[P_LN2W] + l * C, 0, 0);
            table_add(&t, H("ln_2.bias"), 1, C, 0, o[P_LN2B] + l * C, 0, 0);
            table_add(&t, H("mlp.c_fc.weight"), 2, C, F, o[P_FCW] + l * F * C, 1, 0);
            table_add(&t, H("mlp.c_fc.bias"), 1, F, 0, o[P_FCB] + l * F, 0, 0);
            table_add(&t, H("mlp.c_proj.weight"), 2, F, C, o[P_FCPROJW] + l * C * F, 1, 0);
            table_add(&t, H("mlp.c_proj.bias"), 1, C, 0, o[P_FCPROJB] + l * C, 0, 0);
            #undef H
        }
        table_add(&t, "transformer.ln_f.weight", 1, C, 0, o[P_LNFW], 0, 0);
        table_add(&t, "transformer.ln_f.bias", 1, C, 0, o[P_LNFB], 0, 0);
        if (!c->tied_embeddings) table_add(&t, "lm_head.weight", 2, V, C, o[P_LMHEAD], 0, 0);
        return t;
    }
    table_add(&t, "model.embed_tokens.weight", 2, V, C, o[P_WTE], 0, 0);
    for (int64_t l = 0; l < L; l++) {
        #define H(suffix) (snprintf(n, sizeof(n), "model.layers.%lld.%s", (long long)l, suffix), n)
        size_t qkvw = o[P_QKVW] + l * QKV * C, qkvb = o[P_QKVB] + l * QKV;
        table_add(&t, H("input_layernorm.weight"), 1, C, 0, o[P_LN1W] + l * C, 0, 0);
        table_add(&t, H("self_attn.q_proj.weight"), 2, NH * HS, C, qkvw, 0, 0);
        table_add(&t, H("self_attn.k_proj.weight"), 2, NKV * HS, C, qkvw + NH * HS * C, 0, 0);
        table_add(&t, H("self_attn.v_proj.weight"), 2, NKV * HS, C, qkvw + (NH + NKV) * HS * C, 0, 0);
        if (c->qkv_bias) {
            table_add(&t, H("self_attn.q_proj.bias"), 1, NH * HS, 0, qkvb, 0, 0);
            table_add(&t, H("self_attn.k_proj.bias"), 1, NKV * HS, 0, qkvb + NH * HS, 0, 0);
            table_add(&t, H("self_attn.v_proj.bias"), 1, NKV * HS, 0, qkvb + (NH + NKV) * HS, 0, 0);
        }
        table_add(&t, H("self_attn.o_proj.weight"), 2, C, NH * HS, o[P_ATTPROJW] + l * C * NH * HS, 0, 0);
        table_add(&t, H("post_attention_layernorm.weight"), 1, C, 0, o[P_LN2W] + l * C, 0, 0);
        table_add(&t, H("mlp.gate_proj.weight"), 2, F, C, o[P_FCW] + l * 2 * F * C, 0, 0);
        table_add(&t, H("mlp.up_proj.weight"), 2, F, C, o[P_FCW] + l * 2 * F * C + F * C, 0, 0);
        table_add(&t, H("mlp.down_proj.weight"), 2, C, F, o[P_FCPROJW] + l * C * F, 0, 0);
        #undef H
    }
    table_add(&t, "model.norm.weight", 1, C, 0, o[P_LNFW], 0, 0);
    if (!c->tied_embeddings) table_add(&t, "lm_head.weight", 2, V, C, o[P_LMHEAD], 0, 0);
    return t;
}

// GGUF names and shapes (numpy order, i.e. GGUF dims reversed). For the llama architecture
// llama.cpp's converter permutes the rows of attn_q / attn_k (and their biases) for its
// interleaved RoPE; permute_heads records the head count to undo that with.
static TensorTable gguf_tensor_table(const Model *model, const char *arch) {
    const ModelConfig *c = &model->config;
    size_t o[NUM_PARAM_TENSORS];
    param_offsets(model, o);
    int64_t C = c->n_embd, L = c->n_layer, HS = c->head_dim, F = c->ffn_hidden, V = c->vocab_size;
    int64_t NH = c->n_head, NKV = c->n_kv_head, QKV = (NH + 2 * NKV) * HS;
    int permute = strcmp(arch, "llama") == 0;
    TensorTable t = {0};
    char n[96];
    table_add(&t, "token_embd.weight", 2, V, C, o[P_WTE], 0, 0);
    if (c->arch == ARCH_GPT2) {
        table_add(&t, "position_embd.weight", 2, c->max_seq_len, C, o[P_WPE], 0, 0);
        for (int64_t l = 0; l < L; l++) {
            #define H(suffix) (snprintf(n, sizeof(n), "blk.%lld.%s", (long long)l, suffix), n)
            table_add(&t, H("attn_norm.weight"), 1, C, 0, o[P_LN1W] + l * C, 0, 0);
            table_add(&t, H("attn_norm.bias"), 1, C, 0, o[P_LN1B] + l * C, 0, 0);
            table_add(&t, H("attn_qkv.weight"), 2, 3 * C, C, o[P_QKVW] + l * 3 * C * C, 0, 0);
            table_add(&t, H("attn_qkv.bias"), 1, 3 * C, 0, o[P_QKVB] + l * 3 * C, 0, 0);
            table_add(&t, H("attn_output.weight"), 2, C, C, o[P_ATTPROJW] + l * C * C, 0, 0);
            table_add(&t, H("attn_output.bias"), 1, C, 0, o[P_ATTPROJB] + l * C, 0, 0);
            table_add(&t, H("ffn_norm.weight"), 1, C, 0, o[P_LN2W] + l * C, 0, 0);
            table_add(&t, H("ffn_norm.bias"), 1, C, 0, o[P_LN2B] + l * C, 0, 0);
            table_add(&t, H("ffn_up.weight"), 2, F, C, o[P_FCW] + l * F * C, 0, 0);
            table_add(&t, H("ffn_up.bias"), 1, F, 0, o[P_FCB] + l * F, 0, 0);
            table_add(&t, H("ffn_down.weight"), 2, C, F, o[P_FCPROJW] + l * C * F, 0, 0);
            table_add(&t, H("ffn_down.bias"), 1, C, 0, o[P_FCPROJB] + l * C, 0, 0);
            #undef H
        }
        table_add(&t, "output_norm.weight", 1, C, 0, o[P_LNFW], 0, 0);
        table_add(&t, "output_norm.bias", 1, C, 0, o[P_LNFB], 0, 0);
    } else {
        for (int64_t l = 0; l < L; l++) {
            #define H(suffix) (snprintf(n, sizeof(n), "blk.%lld.%s", (long long)l, suffix), n)
            size_t qkvw = o[P_QKVW] + l * QKV * C, qkvb = o[P_QKVB] + l * QKV;
            table_add(&t, H("attn_norm.weight"), 1, C, 0, o[P_LN1W] + l * C, 0, 0);
            table_add(&t, H("attn_q.weight"), 2, NH * HS, C, qkvw, 0, permute ? NH : 0);
            table_add(&t, H("attn_k.weight"), 2, NKV * HS, C, qkvw + NH * HS * C, 0, permute ? NKV : 0);
            table_add(&t, H("attn_v.weight"), 2, NKV * HS, C, qkvw + (NH + NKV) * HS * C, 0, 0);
            if (c->qkv_bias) {
                table_add(&t, H("attn_q.bias"), 1, NH * HS, 0, qkvb, 0, permute ? NH : 0);
                table_add(&t, H("attn_k.bias"), 1, NKV * HS, 0, qkvb + NH * HS, 0, permute ? NKV : 0);
                table_add(&t, H("attn_v.bias"), 1, NKV * HS, 0, qkvb + (NH + NKV) * HS, 0, 0);
            }
            table_add(&t, H("attn_output.weight"), 2, C, NH * HS, o[P_ATTPROJW] + l * C * NH * HS, 0, 0);
            table_add(&t, H("ffn_norm.weight"), 1, C, 0, o[P_LN2W] + l * C, 0, 0);
            table_add(&t, H("ffn_gate.weight"), 2, F, C, o[P_FCW] + l * 2 * F * C, 0, 0);
            table_add(&t, H("ffn_up.weight"), 2, F, C, o[P_FCW] + l * 2 * F * C + F * C, 0, 0);
            table_add(&t, H("ffn_down.weight"), 2, C, F, o[P_FCPROJW] + l * C * F, 0, 0);
            #undef H
        }
        table_add(&t, "output_norm.weight", 1, C, 0, o[P_LNFW], 0, 0);
    }
    if (!c->tied_embeddings) table_add(&t, "output.weight", 2, V, C, o[P_LMHEAD], 0, 0);
    return t;
}

// Writes a (rows, cols) tensor stored in src as its transpose into dst: dst[c][r] = src[r][c].
static void transpose_into(float *dst, const float *src, int64_t rows, int64_t cols) {
    #pragma omp parallel for
    for (int64_t r = 0; r < rows; r++)
        for (int64_t c = 0; c < cols; c++) dst[c * rows + r] = src[r * cols + c];
}

// Undoes llama.cpp's permute(w, n_head): the file's row h*HS + 2*i + j holds Hugging Face's row
// h*HS + j*HS/2 + i (i < HS/2, j in {0, 1}), for rows of length cols.
static void unpermute_rows(float *dst, const float *src, int64_t rows, int64_t cols, int64_t n_head) {
    int64_t hs = rows / n_head, half = hs / 2;
    for (int64_t h = 0; h < n_head; h++)
        for (int64_t i = 0; i < half; i++)
            for (int64_t j = 0; j < 2; j++)
                memcpy(dst + (h * hs + j * half + i) * cols, src + (h * hs + 2 * i + j) * cols, cols * sizeof(float));
}

// ----------------------------------------------------------------------------
// native format

#define NATIVE_MAGIC 0x41524F4D   // the bytes "MORA"
#define NATIVE_VERSION 1
#define NATIVE_HEADER_INTS 256
enum {
    H_MAGIC, H_VERSION, H_ARCH, H_VOCAB, H_PADDED_VOCAB, H_MAX_SEQ, H_LAYERS, H_EMBD, H_HEADS,
    H_KV_HEADS, H_HEAD_DIM, H_FFN, H_NORM_EPS, H_ROPE_THETA, H_TIED, H_QKV_BIAS, H_FLAGS,
    H_OPT_STEP, H_STEP, H_RNG_LO, H_RNG_HI, H_NPARAMS_LO, H_NPARAMS_HI
};
#define NATIVE_FLAG_OPTIMIZER 1

// Header: 256 int32 (fields above; floats stored by their bits), then params (fp32), then m and
// v (fp32) when the optimizer flag is set.
void checkpoint_save_native(const Model *model, const TrainState *state, const char *path, int with_optimizer) {
    const ModelConfig *c = &model->config;
    if (with_optimizer && (model->m == NULL || model->v == NULL))
        fatal("%s: cannot save the optimizer state: the model has no AdamW moments yet", path);
    int32_t h[NATIVE_HEADER_INTS] = {0};
    h[H_MAGIC] = NATIVE_MAGIC;
    h[H_VERSION] = NATIVE_VERSION;
    h[H_ARCH] = c->arch;
    h[H_VOCAB] = c->vocab_size;
    h[H_PADDED_VOCAB] = c->padded_vocab_size;
    h[H_MAX_SEQ] = c->max_seq_len;
    h[H_LAYERS] = c->n_layer;
    h[H_EMBD] = c->n_embd;
    h[H_HEADS] = c->n_head;
    h[H_KV_HEADS] = c->n_kv_head;
    h[H_HEAD_DIM] = c->head_dim;
    h[H_FFN] = c->ffn_hidden;
    memcpy(&h[H_NORM_EPS], &c->norm_eps, 4);
    memcpy(&h[H_ROPE_THETA], &c->rope_theta, 4);
    h[H_TIED] = c->tied_embeddings;
    h[H_QKV_BIAS] = c->qkv_bias;
    h[H_FLAGS] = with_optimizer ? NATIVE_FLAG_OPTIMIZER : 0;
    h[H_OPT_STEP] = model->opt_step;
    h[H_STEP] = state ? state->step : 0;
    uint64_t rng = state ? state->rng_state : 0;
    h[H_RNG_LO] = (int32_t)(uint32_t)(rng & 0xffffffffu);
    h[H_RNG_HI] = (int32_t)(uint32_t)(rng >> 32);
    h[H_NPARAMS_LO] = (int32_t)(uint32_t)((uint64_t)model->num_parameters & 0xffffffffu);
    h[H_NPARAMS_HI] = (int32_t)(uint32_t)((uint64_t)model->num_parameters >> 32);

    char tmp_path[4200];
    FILE *f = atomic_open(path, tmp_path, sizeof(tmp_path));
    fwrite_check(h, sizeof(int32_t), NATIVE_HEADER_INTS, f, tmp_path);
    fwrite_check(model->params, sizeof(float), model->num_parameters, f, tmp_path);
    if (with_optimizer) {
        fwrite_check(model->m, sizeof(float), model->num_parameters, f, tmp_path);
        fwrite_check(model->v, sizeof(float), model->num_parameters, f, tmp_path);
    }
    atomic_commit(f, tmp_path, path);
}

static void load_native(Model *model, const char *path, TrainState *state) {
    FILE *f = fopen_check(path, "rb");
    int32_t h[NATIVE_HEADER_INTS];
    fread_check(h, sizeof(int32_t), NATIVE_HEADER_INTS, f, path, "native header");
    if (h[H_VERSION] != NATIVE_VERSION) fatal("%s: native checkpoint version %d is not supported (%d is)", path, h[H_VERSION], NATIVE_VERSION);
    if (h[H_ARCH] != ARCH_GPT2 && h[H_ARCH] != ARCH_LLAMA) fatal("%s: unknown architecture %d in the header", path, h[H_ARCH]);
    ModelConfig c = {0};
    c.arch = (ModelArch)h[H_ARCH];
    c.vocab_size = h[H_VOCAB];
    c.padded_vocab_size = h[H_PADDED_VOCAB];
    c.max_seq_len = h[H_MAX_SEQ];
    c.n_layer = h[H_LAYERS];
    c.n_embd = h[H_EMBD];
    c.n_head = h[H_HEADS];
    c.n_kv_head = h[H_KV_HEADS];
    c.head_dim = h[H_HEAD_DIM];
    c.ffn_hidden = h[H_FFN];
    memcpy(&c.norm_eps, &h[H_NORM_EPS], 4);
    memcpy(&c.rope_theta, &h[H_ROPE_THETA], 4);
    c.tied_embeddings = h[H_TIED];
    c.qkv_bias = h[H_QKV_BIAS];
    // the header's count and the file size are checked against the config before anything is
    // allocated, so a damaged header is named as such rather than as a failed allocation
    Model layout;
    model_layout(&layout, &c, path);
    uint64_t n_params = (uint64_t)(uint32_t)h[H_NPARAMS_LO] | ((uint64_t)(uint32_t)h[H_NPARAMS_HI] << 32);
    if (n_params != layout.num_parameters)
        fatal("%s: header says %llu parameters, its config gives %zu", path, (unsigned long long)n_params, layout.num_parameters);
    int with_opt = (h[H_FLAGS] & NATIVE_FLAG_OPTIMIZER) != 0;
    // the file size must match exactly: a short file is truncated, a long one is not ours
    if (fseek(f, 0, SEEK_END) != 0) fatal("%s: cannot seek", path);
    long size = ftell(f);
    uint64_t expected = NATIVE_HEADER_INTS * 4 + (uint64_t)layout.num_parameters * 4 * (with_opt ? 3 : 1);
    if ((uint64_t)size < expected) fatal("%s: truncated file (%ld bytes, expected %llu)", path, size, (unsigned long long)expected);
    if ((uint64_t)size > expected) fatal("%s: %llu trailing bytes after the checkpoint data", path, (unsigned long long)((uint64_t)size - expected));
    model_init(model, &c, path);
    fseek(f, NATIVE_HEADER_INTS * 4, SEEK_SET);
    fread_check(model->params, sizeof(float), model->num_parameters, f, path, "parameters");
    if (with_opt) {
        if (model->m == NULL) model->m = (float *)mallocCheck(model->num_parameters * sizeof(float));
        if (model->v == NULL) model->v = (float *)mallocCheck(model->num_parameters * sizeof(float));
        fread_check(model->m, sizeof(float), model->num_parameters, f, path, "AdamW m");
        fread_check(model->v, sizeof(float), model->num_parameters, f, path, "AdamW v");
    }
    model->opt_step = h[H_OPT_STEP];
    fclose(f);
    if (state) {
        state->step = h[H_STEP];
        state->rng_state = (uint64_t)(uint32_t)h[H_RNG_LO] | ((uint64_t)(uint32_t)h[H_RNG_HI] << 32);
        state->has_optimizer = with_opt;
    }
}

// ----------------------------------------------------------------------------
// llm.c .bin (GPT-2): 256 int32 header, then the 16 parameter tensors in llm.c order, which is
// our P_ order for GPT-2 (all weights already (out, in)); fp32 (version 3) or bf16 (version 5).

#define LLMC_MAGIC 20240326

static void load_llmc_bin(Model *model, const char *path) {
    FILE *f = fopen_check(path, "rb");
    int32_t h[256];
    fread_check(h, sizeof(int32_t), 256, f, path, "llm.c header");
    int version = h[1];
    if (version != 3 && version != 5)
        fatal("%s: llm.c checkpoint version %d is not supported (3 = fp32, 5 = bf16)", path, version);
    ModelConfig c = {0};
    c.arch = ARCH_GPT2;
    c.max_seq_len = h[2];
    c.vocab_size = h[3];
    c.n_layer = h[4];
    c.n_head = h[5];
    c.n_embd = h[6];
    c.padded_vocab_size = h[7];
    c.n_kv_head = c.n_head;
    require_heads_divide(path, "header[6] (channels)", c.n_embd, "header[5] (heads)", c.n_head);
    c.head_dim = c.n_embd / c.n_head;
    c.ffn_hidden = 4 * c.n_embd;
    c.norm_eps = 1e-5f;
    c.rope_theta = 10000.0f;
    c.tied_embeddings = 1;
    c.qkv_bias = 1;
    // the size must match the header's config exactly, checked before anything is allocated: a
    // short file is truncated; a long one is not what the header says (a version 5 header on
    // fp32 data would otherwise be read as bf16 garbage)
    Model layout;
    model_layout(&layout, &c, path);
    size_t elem = version == 3 ? 4 : 2;
    if (fseek(f, 0, SEEK_END) != 0) fatal("%s: cannot seek", path);
    long size = ftell(f);
    uint64_t expected = 256 * 4 + (uint64_t)layout.num_parameters * elem;
    if ((uint64_t)size < expected) fatal("%s: truncated file (%ld bytes, the header's config needs %llu)", path, size, (unsigned long long)expected);
    if ((uint64_t)size > expected)
        fatal("%s: %llu trailing bytes after the checkpoint data (the file has %ld bytes, the header's config "
              "(version %d, %s) needs %llu)", path, (unsigned long long)((uint64_t)size - expected), size, version,
              version == 3 ? "fp32" : "bf16", (unsigned long long)expected);
    model_init(model, &c, path);
    fseek(f, 256 * 4, SEEK_SET);
    if (version == 3) {
        fread_check(model->params, sizeof(float), model->num_parameters, f, path, "fp32 parameters");
    } else {
        // bf16 is the top half of an fp32: widen by a 16-bit shift
        uint16_t *raw = (uint16_t *)mallocCheck(model->num_parameters * sizeof(uint16_t));
        fread_check(raw, sizeof(uint16_t), model->num_parameters, f, path, "bf16 parameters");
        for (size_t i = 0; i < model->num_parameters; i++) {
            uint32_t bits = (uint32_t)raw[i] << 16;
            memcpy(&model->params[i], &bits, 4);
        }
        free(raw);
    }
    fclose(f);
}

// ----------------------------------------------------------------------------
// Hugging Face safetensors + config.json

static const cJSON *json_get(const cJSON *root, const char *key) {
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(root, key);
    return (item == NULL || cJSON_IsNull(item)) ? NULL : item;
}
// An integer field; required fields exit naming the file and the field.
static int json_int(const cJSON *root, const char *key, int def, int required, const char *path) {
    const cJSON *item = json_get(root, key);
    if (item == NULL) {
        if (required) fatal("%s: missing field \"%s\"", path, key);
        return def;
    }
    if (!cJSON_IsNumber(item) || item->valuedouble != (double)(int)item->valuedouble)
        fatal("%s: field \"%s\" must be an integer", path, key);
    return (int)item->valuedouble;
}
static double json_num(const cJSON *root, const char *key, double def, const char *path) {
    const cJSON *item = json_get(root, key);
    if (item == NULL) return def;
    if (!cJSON_IsNumber(item)) fatal("%s: field \"%s\" must be a number", path, key);
    return item->valuedouble;
}
static int json_bool(const cJSON *root, const char *key, int def, const char *path) {
    const cJSON *item = json_get(root, key);
    if (item == NULL) return def;
    if (!cJSON_IsBool(item)) fatal("%s: field \"%s\" must be true or false", path, key);
    return cJSON_IsTrue(item);
}

// A head count read from config.json, checked before anything divides by it.
static int hf_heads(const cJSON *root, const char *key, int def, int required, const char *path) {
    int n = json_int(root, key, def, required, path);
    if (n <= 0) fatal("%s: field \"%s\" is %d; a head count must be positive", path, key, n);
    return n;
}

// The RoPE base. transformers 4 writes "rope_theta" at the top level and "rope_scaling" for a
// scaled RoPE; transformers 5 writes both into "rope_parameters" ({"rope_theta", "rope_type",
// ...}) and no top-level rope_theta. A rope_type other than "default" (llama3, yarn, linear,
// dynamic, ...) in either object scales the frequencies, and a partial_rotary_factor below 1
// rotates part of each head: neither is implemented here, so both are refused, naming the field.
static float hf_read_rope(const cJSON *root, const char *path) {
    static const char *const objects[2] = {"rope_scaling", "rope_parameters"};
    for (int i = 0; i < 2; i++) {
        const cJSON *o = json_get(root, objects[i]);
        if (o == NULL) continue;
        if (!cJSON_IsObject(o)) fatal("%s: field \"%s\" must be an object", path, objects[i]);
        const char *type_key = json_get(o, "rope_type") ? "rope_type" : "type";
        const cJSON *type = json_get(o, type_key);
        if (type == NULL) {
            const cJSON *child;
            cJSON_ArrayForEach(child, o)
                if (cJSON_IsObject(child))
                    fatal("%s: field \"%s\" holds RoPE parameters per layer type (\"%s\"); this model has one "
                          "plain RoPE for every layer", path, objects[i], child->string);
            if (i == 0 && cJSON_GetArraySize(o) > 0)
                fatal("%s: field \"rope_scaling\" is set without a rope_type; this model implements plain RoPE only", path);
        } else if (!cJSON_IsString(type)) {
            fatal("%s: field \"%s.%s\" must be a string", path, objects[i], type_key);
        } else if (strcmp(type->valuestring, "default") != 0) {
            fatal("%s: field \"%s.%s\" is \"%s\": scaled RoPE is not implemented; this model computes plain RoPE "
                  "(rope_type \"default\") only", path, objects[i], type_key, type->valuestring);
        }
        if (json_num(o, "partial_rotary_factor", 1.0, path) != 1.0)
            fatal("%s: field \"%s.partial_rotary_factor\" is %g: this model rotates whole heads", path, objects[i],
                  json_num(o, "partial_rotary_factor", 1.0, path));
    }
    if (json_num(root, "partial_rotary_factor", 1.0, path) != 1.0)
        fatal("%s: field \"partial_rotary_factor\" is %g: this model rotates whole heads", path,
              json_num(root, "partial_rotary_factor", 1.0, path));
    double theta = json_num(root, "rope_theta", 10000.0, path);
    const cJSON *params = json_get(root, "rope_parameters");
    if (params && json_get(params, "rope_theta")) {
        double inner = json_num(params, "rope_theta", 0.0, path);
        if (json_get(root, "rope_theta") && (float)inner != (float)theta)
            fatal("%s: field \"rope_theta\" (%g) and \"rope_parameters.rope_theta\" (%g) disagree", path, theta, inner);
        theta = inner;
    }
    return (float)theta;
}

// Sliding-window attention: Mistral's "sliding_window" (every layer), Qwen2's "sliding_window"
// when "use_sliding_window" is true (the layers from "max_window_layers" on; transformers 5 lists
// them in "layer_types"). There position t attends to the last W positions only; this model
// attends to the whole prefix, which is the same computation for sequences of up to W tokens.
// So when the window is active and shorter than max_position_embeddings the model's context
// (max_seq_len) becomes W, with a note naming the file and the field. Returns the context.
static int hf_window_context(const cJSON *root, const char *model_type, int n_layer, int max_seq_len, const char *path) {
    int mistral = strcmp(model_type, "mistral") == 0, qwen2 = strcmp(model_type, "qwen2") == 0;
    if (!mistral && !qwen2) return max_seq_len;
    // absent: transformers' default for both, 4096; null: no window
    int absent = cJSON_GetObjectItemCaseSensitive(root, "sliding_window") == NULL;
    int window = json_int(root, "sliding_window", absent ? 4096 : 0, 0, path);
    if (window < 0) fatal("%s: field \"sliding_window\" is %d; it must be positive (or null)", path, window);
    if (window == 0) return max_seq_len;
    const char *field = "sliding_window";
    if (qwen2) {
        if (!json_bool(root, "use_sliding_window", 0, path)) return max_seq_len;
        field = "sliding_window (with use_sliding_window true)";
        const cJSON *types = json_get(root, "layer_types");
        int sliding = 0;
        if (cJSON_IsArray(types)) {
            const cJSON *t;
            cJSON_ArrayForEach(t, types) sliding |= cJSON_IsString(t) && strcmp(t->valuestring, "sliding_attention") == 0;
        } else {
            sliding = json_int(root, "max_window_layers", 28, 0, path) < n_layer;  // transformers' default 28
        }
        if (!sliding) return max_seq_len;
    }
    if (window >= max_seq_len) return max_seq_len;
    fprintf(stderr, "note: %s: %s sets a sliding attention window of %d tokens, shorter than max_position_embeddings "
            "%d; this model attends to the whole prefix, which is exact for up to %d tokens, so its context is %d tokens\n",
            path, field, window, max_seq_len, window, window);
    return window;
}

// The classifier: tie_word_embeddings true, or a lm_head.weight in the checkpoint (untied).
// tie_word_embeddings false without lm_head.weight is an error: transformers would start that
// head from random values. With the field absent and no lm_head.weight the embedding is the
// classifier (older Llama-family exports leave the field out). default_tie is transformers'
// default for the family (GPT-2 true, the Llama family false).
static int hf_tied(const cJSON *root, const SafetensorsSet *set, int default_tie, const char *path) {
    int has_head = safetensors_set_find(set, "lm_head.weight", NULL) != NULL;
    int given = json_get(root, "tie_word_embeddings") != NULL;
    int tie = json_bool(root, "tie_word_embeddings", default_tie, path);
    if (tie) return 1;
    if (has_head) return 0;
    if (given) fatal("%s: tie_word_embeddings is false but the checkpoint has no lm_head.weight (its classifier)", path);
    return 1;
}

// Reads config.json into a ModelConfig (GPT-2 or the Llama family by model_type). set is the
// checkpoint's tensors (for lm_head.weight and biases). Fields that change the computation in
// ways this model does not implement are refused.
static void hf_read_config(const char *config_path, ModelConfig *c, const SafetensorsSet *set) {
    char *text = read_file_all(config_path, NULL);
    cJSON *root = cJSON_Parse(text);
    if (root == NULL || !cJSON_IsObject(root)) fatal("%s: not a valid JSON object", config_path);
    const cJSON *mt = json_get(root, "model_type");
    if (!cJSON_IsString(mt)) fatal("%s: missing field \"model_type\"", config_path);
    const char *model_type = mt->valuestring;
    memset(c, 0, sizeof(*c));
    if (strcmp(model_type, "gpt2") == 0) {
        c->arch = ARCH_GPT2;
        c->n_embd = json_int(root, "n_embd", 0, 1, config_path);
        c->n_layer = json_int(root, "n_layer", 0, 1, config_path);
        c->n_head = hf_heads(root, "n_head", 0, 1, config_path);
        c->vocab_size = json_int(root, "vocab_size", 0, 1, config_path);
        c->max_seq_len = json_int(root, "n_positions", json_int(root, "n_ctx", 0, 0, config_path), 0, config_path);
        if (c->max_seq_len == 0) fatal("%s: missing field \"n_positions\"", config_path);
        c->ffn_hidden = json_int(root, "n_inner", 4 * c->n_embd, 0, config_path);
        c->norm_eps = (float)json_num(root, "layer_norm_epsilon", 1e-5, config_path);
        c->n_kv_head = c->n_head;
        require_heads_divide(config_path, "n_embd", c->n_embd, "n_head", c->n_head);
        c->head_dim = c->n_embd / c->n_head;
        c->rope_theta = 10000.0f;
        c->tied_embeddings = hf_tied(root, set, 1, config_path);
        c->qkv_bias = 1;
        const cJSON *act = json_get(root, "activation_function");
        if (act && (!cJSON_IsString(act) || (strcmp(act->valuestring, "gelu_new") != 0 &&
                                               strcmp(act->valuestring, "gelu_pytorch_tanh") != 0)))
            fatal("%s: activation_function %s is not supported (the model computes tanh GELU, \"gelu_new\")",
                  config_path, cJSON_IsString(act) ? act->valuestring : "?");
    } else if (strcmp(model_type, "llama") == 0 || strcmp(model_type, "qwen2") == 0 ||
               strcmp(model_type, "mistral") == 0) {
        c->arch = ARCH_LLAMA;
        c->n_embd = json_int(root, "hidden_size", 0, 1, config_path);
        c->n_layer = json_int(root, "num_hidden_layers", 0, 1, config_path);
        c->n_head = hf_heads(root, "num_attention_heads", 0, 1, config_path);
        c->n_kv_head = hf_heads(root, "num_key_value_heads", c->n_head, 0, config_path);
        c->ffn_hidden = json_int(root, "intermediate_size", 0, 1, config_path);
        c->vocab_size = json_int(root, "vocab_size", 0, 1, config_path);
        c->max_seq_len = json_int(root, "max_position_embeddings", 2048, 0, config_path);
        c->max_seq_len = hf_window_context(root, model_type, c->n_layer, c->max_seq_len, config_path);
        c->norm_eps = (float)json_num(root, "rms_norm_eps", 1e-6, config_path);
        c->rope_theta = hf_read_rope(root, config_path);
        if (json_get(root, "head_dim") == NULL)
            require_heads_divide(config_path, "hidden_size", c->n_embd, "num_attention_heads", c->n_head);
        c->head_dim = json_int(root, "head_dim", c->n_embd / c->n_head, 0, config_path);
        c->qkv_bias = strcmp(model_type, "qwen2") == 0 || json_bool(root, "attention_bias", 0, config_path);
        if (json_bool(root, "mlp_bias", 0, config_path))
            fatal("%s: mlp_bias is true; this model's SwiGLU MLP has no biases", config_path);
        const cJSON *act = json_get(root, "hidden_act");
        if (act && (!cJSON_IsString(act) || strcmp(act->valuestring, "silu") != 0))
            fatal("%s: hidden_act %s is not supported (silu is)", config_path, cJSON_IsString(act) ? act->valuestring : "?");
        c->tied_embeddings = hf_tied(root, set, 0, config_path);
        if (safetensors_set_find(set, "model.layers.0.self_attn.o_proj.bias", NULL) != NULL)
            fatal("%s: the checkpoint has an o_proj bias, which this model does not have", config_path);
    } else {
        fatal("%s: model_type \"%s\" is not supported (gpt2, llama, qwen2, mistral are)", config_path, model_type);
    }
    c->padded_vocab_size = c->vocab_size;
    cJSON_Delete(root);
    free(text);
}

// The chat template a checkpoint's jinja template text implies (chat_template_guess), else "".
static void chat_template_from_text(const char *text, char *out, size_t size) {
    const ChatTemplate *t = chat_template_guess(text);
    snprintf(out, size, "%s", t ? chat_template_name(t) : "");
}

static int ends_with(const char *s, const char *suffix) {
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && strcmp(s + n - m, suffix) == 0;
}

// Whether the table has a tensor of this name (GPT-2 HF names compared without "transformer."
// when the file leaves the prefix out).
static int table_has(const TensorTable *t, const char *name, int strip_prefix) {
    for (int i = 0; i < t->n; i++) {
        const char *e = t->entries[i].name;
        if (strip_prefix && strncmp(e, "transformer.", 12) == 0) e += 12;
        if (strcmp(e, name) == 0) return 1;
    }
    return 0;
}

// Tensors of a file that the config's model does not use, collected and reported together: a
// config with fewer layers than the file, or a checkpoint of another kind (the score.weight of a
// sequence-classification model), would otherwise lose them without a word.
typedef struct {
    int n;
    char first[320];
} UnusedTensors;

static void unused_add(UnusedTensors *u, const char *name) {
    size_t at = strlen(u->first);
    if (u->n < 3 && at + strlen(name) + 3 < sizeof(u->first))
        snprintf(u->first + at, sizeof(u->first) - at, "%s%s", u->n ? ", " : "", name);
    u->n++;
}

static void unused_report(const UnusedTensors *u, const char *path, const char *config_source) {
    if (u->n == 0) return;
    char more[64] = "";
    if (u->n > 3) snprintf(more, sizeof more, " and %d more", u->n - 3);
    fatal("%s: %d tensor%s not part of the model %s describes: %s%s. Either the config is wrong (layer "
          "count, tied embeddings) or the checkpoint is of another kind (a classification head such as "
          "score.weight); refusing to drop them", path, u->n, u->n == 1 ? " is" : "s are", config_source,
          u->first, more);
}

// Whether a sharded set's index file lists name (a file name without directory) as a shard.
static int index_lists_shard(const char *index, const char *name) {
    char *text = read_file_all(index, NULL);
    cJSON *root = cJSON_Parse(text);
    free(text);
    const cJSON *map = root ? cJSON_GetObjectItemCaseSensitive(root, "weight_map") : NULL;
    int found = 0;
    const cJSON *item;
    if (cJSON_IsObject(map))
        cJSON_ArrayForEach(item, map) found |= cJSON_IsString(item) && strcmp(item->valuestring, name) == 0;
    cJSON_Delete(root);
    return found;
}

// path: a directory, a .safetensors file with config.json beside it, or a sharded set's
// *.safetensors.index.json. One shard of a sharded set is refused (it holds part of the tensors).
static void load_hf(Model *model, const char *path, CheckpointInfo *info) {
    char dir[4096];
    if (is_directory(path)) {
        snprintf(dir, sizeof(dir), "%s", path);
    } else {
        snprintf(dir, sizeof(dir), "%s", path);
        char *slash = strrchr(dir, '/');
        if (slash) *slash = '\0'; else snprintf(dir, sizeof(dir), ".");
        char index[4200];
        snprintf(index, sizeof(index), "%s/model.safetensors.index.json", dir);
        const char *base = strrchr(path, '/') ? strrchr(path, '/') + 1 : path;
        if (!ends_with(path, ".index.json") && is_file(index) && index_lists_shard(index, base))
            fatal("%s is one shard of a sharded checkpoint (%s lists its files): pass the directory %s, or the index file",
                  path, index, dir);
    }
    char config_path[4200], extra[4200];
    snprintf(config_path, sizeof(config_path), "%s/config.json", dir);
    if (!is_file(config_path)) fatal("%s: no config.json beside the weights (looked for %s)", path, config_path);
    SafetensorsSet *set = safetensors_open_set(path);
    ModelConfig c;
    hf_read_config(config_path, &c, set);

    // Every tensor is checked for presence and shape against the config, and every tensor of the
    // files for a use, before the parameters are allocated: a config that does not describe
    // the file is named as such, not as a failed allocation of what it asks for.
    Model layout;
    model_layout(&layout, &c, config_path);
    // GPT-2 files name tensors with or without the "transformer." prefix
    int strip_prefix = c.arch == ARCH_GPT2 && safetensors_set_find(set, "transformer.wte.weight", NULL) == NULL;
    TensorTable table = hf_tensor_table(&layout);
    for (int i = 0; i < table.n; i++) {
        const TensorEntry *e = &table.entries[i];
        const char *name = e->name;
        if (strip_prefix && strncmp(name, "transformer.", 12) == 0) name += 12;
        const SafetensorsFile *file;
        const SafetensorsTensor *t = safetensors_set_find(set, name, &file);
        if (t == NULL) fatal("%s: missing tensor %s", path, name);
        char got[128], want[128];
        if (t->n_dims != e->n_dims || t->shape[0] != e->shape[0] || (e->n_dims == 2 && t->shape[1] != e->shape[1]))
            fatal("%s: tensor %s has shape %s, expected %s", file->path, name,
                  shape_str(got, sizeof(got), t->n_dims, t->shape), shape_str(want, sizeof(want), e->n_dims, e->shape));
    }
    UnusedTensors unused = {0};
    for (int f = 0; f < set->n_files; f++)
        for (int i = 0; i < set->files[f]->n_tensors; i++) {
            const char *name = set->files[f]->tensors[i].name;
            // known buffers that are not parameters: GPT-2's causal masks, Llama's RoPE frequencies;
            // and the copy of the embedding some files keep as lm_head.weight of a tied model
            if (table_has(&table, name, strip_prefix) ||
                (c.arch == ARCH_GPT2 && (ends_with(name, ".attn.bias") || ends_with(name, ".attn.masked_bias"))) ||
                ends_with(name, "rotary_emb.inv_freq") || (c.tied_embeddings && strcmp(name, "lm_head.weight") == 0))
                continue;
            unused_add(&unused, name);
        }
    unused_report(&unused, path, config_path);
    free(table.entries);

    model_init(model, &c, config_path);
    table = hf_tensor_table(model);
    float *scratch = NULL;
    size_t scratch_size = 0;
    for (int i = 0; i < table.n; i++) {
        const TensorEntry *e = &table.entries[i];
        const char *name = e->name;
        if (strip_prefix && strncmp(name, "transformer.", 12) == 0) name += 12;
        const SafetensorsFile *file;
        const SafetensorsTensor *t = safetensors_set_find(set, name, &file);  // present and shaped: checked above
        float *dst = model->params + e->offset;
        if (!e->transpose) { safetensors_read_f32(file, t, dst); continue; }
        if (scratch_size < t->n_elements) {
            scratch_size = t->n_elements;
            scratch = (float *)reallocCheck(scratch, scratch_size * sizeof(float));
        }
        safetensors_read_f32(file, t, scratch);
        transpose_into(dst, scratch, e->shape[0], e->shape[1]);
    }
    free(scratch);
    free(table.entries);
    safetensors_close_set(set);

    if (info) {
        snprintf(extra, sizeof(extra), "%s/tokenizer.json", dir);
        size_t n = strlen(extra);
        if (is_file(extra) && n < sizeof(info->tokenizer_path)) memcpy(info->tokenizer_path, extra, n + 1);
        snprintf(extra, sizeof(extra), "%s/tokenizer_config.json", dir);
        if (is_file(extra)) {
            char *text = read_file_all(extra, NULL);
            cJSON *root = cJSON_Parse(text);
            const cJSON *tpl = root ? json_get(root, "chat_template") : NULL;
            if (cJSON_IsString(tpl)) chat_template_from_text(tpl->valuestring, info->chat_template, sizeof(info->chat_template));
            cJSON_Delete(root);
            free(text);
        }
    }
}

// Builds the tensor list of a params-shaped buffer under Hugging Face names.
static SafetensorsWriteTensor *hf_write_list(const Model *model, const float *buffer, TensorTable *table) {
    *table = hf_tensor_table(model);
    SafetensorsWriteTensor *w = (SafetensorsWriteTensor *)callocCheck(table->n, sizeof(SafetensorsWriteTensor));
    for (int i = 0; i < table->n; i++) {
        const TensorEntry *e = &table->entries[i];
        w[i].name = e->name;
        w[i].n_dims = e->n_dims;
        w[i].shape[0] = e->shape[0];
        w[i].shape[1] = e->shape[1];
        w[i].data = buffer + e->offset;
        w[i].transpose_2d = e->transpose;
    }
    return w;
}

void checkpoint_save_hf_tensors(const Model *model, const float *buffer, const char *path) {
    TensorTable table;
    SafetensorsWriteTensor *w = hf_write_list(model, buffer, &table);
    safetensors_write(path, w, table.n, 0);
    free(w);
    free(table.entries);
}

// Writes DIR/config.json with the fields transformers reads for GPT2LMHeadModel,
// LlamaForCausalLM or (qkv bias) Qwen2ForCausalLM.
static void write_hf_config(const Model *model, const char *path, int bf16) {
    const ModelConfig *c = &model->config;
    cJSON *root = cJSON_CreateObject();
    cJSON *archs = cJSON_AddArrayToObject(root, "architectures");
    if (c->arch == ARCH_GPT2) {
        cJSON_AddItemToArray(archs, cJSON_CreateString("GPT2LMHeadModel"));
        cJSON_AddStringToObject(root, "model_type", "gpt2");
        cJSON_AddNumberToObject(root, "vocab_size", c->vocab_size);
        cJSON_AddNumberToObject(root, "n_positions", c->max_seq_len);
        cJSON_AddNumberToObject(root, "n_ctx", c->max_seq_len);
        cJSON_AddNumberToObject(root, "n_embd", c->n_embd);
        cJSON_AddNumberToObject(root, "n_layer", c->n_layer);
        cJSON_AddNumberToObject(root, "n_head", c->n_head);
        cJSON_AddNumberToObject(root, "n_inner", c->ffn_hidden);
        cJSON_AddStringToObject(root, "activation_function", "gelu_new");
        cJSON_AddNumberToObject(root, "layer_norm_epsilon", float_shortest(c->norm_eps));
        cJSON_AddBoolToObject(root, "tie_word_embeddings", c->tied_embeddings);
    } else {
        int qwen2 = c->qkv_bias;  // Llama's attention_bias would also add an o_proj bias; Qwen2's does not
        cJSON_AddItemToArray(archs, cJSON_CreateString(qwen2 ? "Qwen2ForCausalLM" : "LlamaForCausalLM"));
        cJSON_AddStringToObject(root, "model_type", qwen2 ? "qwen2" : "llama");
        cJSON_AddNumberToObject(root, "vocab_size", c->vocab_size);
        cJSON_AddNumberToObject(root, "hidden_size", c->n_embd);
        cJSON_AddNumberToObject(root, "intermediate_size", c->ffn_hidden);
        cJSON_AddNumberToObject(root, "num_hidden_layers", c->n_layer);
        cJSON_AddNumberToObject(root, "num_attention_heads", c->n_head);
        cJSON_AddNumberToObject(root, "num_key_value_heads", c->n_kv_head);
        cJSON_AddNumberToObject(root, "head_dim", c->head_dim);
        cJSON_AddNumberToObject(root, "max_position_embeddings", c->max_seq_len);
        cJSON_AddNumberToObject(root, "rms_norm_eps", float_shortest(c->norm_eps));
        cJSON_AddNumberToObject(root, "rope_theta", float_shortest(c->rope_theta));
        cJSON_AddStringToObject(root, "hidden_act", "silu");
        if (!qwen2) {
            cJSON_AddBoolToObject(root, "attention_bias", 0);
            cJSON_AddBoolToObject(root, "mlp_bias", 0);
        }
        cJSON_AddNullToObject(root, "rope_scaling");
        cJSON_AddBoolToObject(root, "tie_word_embeddings", c->tied_embeddings);
    }
    cJSON_AddStringToObject(root, "torch_dtype", bf16 ? "bfloat16" : "float32");
    char *text = cJSON_Print(root);
    char tmp_path[4200];
    FILE *f = atomic_open(path, tmp_path, sizeof(tmp_path));
    fwrite_check(text, 1, strlen(text), f, tmp_path);
    fputc('\n', f);
    atomic_commit(f, tmp_path, path);
    free(text);
    cJSON_Delete(root);
}

void checkpoint_save_hf(const Model *model, const char *dir, int bf16) {
    if (!is_directory(dir) && mkdir(dir, 0755) != 0 && errno != EEXIST)
        fatal("cannot create directory %s: %s", dir, strerror(errno));
    char path[4200];
    snprintf(path, sizeof(path), "%s/model.safetensors", dir);
    TensorTable table;
    SafetensorsWriteTensor *w = hf_write_list(model, model->params, &table);
    safetensors_write(path, w, table.n, bf16);
    free(w);
    free(table.entries);
    snprintf(path, sizeof(path), "%s/config.json", dir);
    write_hf_config(model, path, bf16);
}

// ----------------------------------------------------------------------------
// GGUF

// An integer hyperparameter "{arch}.{key}"; required ones exit naming the key.
static int gguf_hparam(const GGUFFile *g, const char *arch, const char *key, int def, int required) {
    char full[128];
    snprintf(full, sizeof(full), "%s.%s", arch, key);
    if (required && gguf_find(g, full) == NULL) fatal("%s: missing metadata %s", g->path, full);
    int64_t v = gguf_get_int(g, full, def);
    if (v < 0 || v > INT32_MAX) fatal("%s: metadata %s = %lld is out of range", g->path, full, (long long)v);
    return (int)v;
}

// Bytes a tensor of a dequantisable type occupies in the file; 0 for other types.
static uint64_t gguf_raw_bytes(const GGUFTensorInfo *t) {
    switch (t->type) {
        case GGML_TYPE_F32: return t->n_elements * 4;
        case GGML_TYPE_F16: case GGML_TYPE_BF16: return t->n_elements * 2;
        case GGML_TYPE_Q8_0: return t->n_elements / 32 * 34;
        case GGML_TYPE_Q4_0: return t->n_elements / 32 * 18;
        case GGML_TYPE_Q4_1: return t->n_elements / 32 * 20;
        default: return 0;
    }
}

static void load_gguf(Model *model, const char *path, CheckpointInfo *info) {
    GGUFFile *g = gguf_open(path);
    const char *arch = gguf_get_str(g, "general.architecture");
    if (arch == NULL) fatal("%s: missing metadata general.architecture", path);
    ModelConfig c = {0};
    char key[128];
    if (strcmp(arch, "llama") == 0 || strcmp(arch, "qwen2") == 0) c.arch = ARCH_LLAMA;
    else if (strcmp(arch, "gpt2") == 0) c.arch = ARCH_GPT2;
    else fatal("%s: general.architecture \"%s\" is not supported (llama, qwen2, gpt2 are)", path, arch);
    c.n_layer = gguf_hparam(g, arch, "block_count", 0, 1);
    c.n_embd = gguf_hparam(g, arch, "embedding_length", 0, 1);
    c.ffn_hidden = gguf_hparam(g, arch, "feed_forward_length", 0, 1);
    // head counts are checked before anything divides by them
    c.n_head = gguf_hparam(g, arch, "attention.head_count", 0, 1);
    if (c.n_head <= 0) fatal("%s: metadata %s.attention.head_count is %d; a head count must be positive", path, arch, c.n_head);
    c.n_kv_head = gguf_hparam(g, arch, "attention.head_count_kv", c.n_head, 0);
    if (c.n_kv_head <= 0) fatal("%s: metadata %s.attention.head_count_kv is %d; a head count must be positive", path, arch, c.n_kv_head);
    c.max_seq_len = gguf_hparam(g, arch, "context_length", 0, 1);
    // a sliding attention window (llama.cpp's ARCH.attention.sliding_window): as for a Hugging Face
    // config (hf_window_context), full attention is exact up to the window, which becomes the context
    snprintf(key, sizeof(key), "%s.attention.sliding_window", arch);
    int64_t window = gguf_get_int(g, key, 0);
    if (window < 0) fatal("%s: metadata %s is %lld; a window must be positive", path, key, (long long)window);
    if (window > 0 && window < c.max_seq_len) {
        fprintf(stderr, "note: %s: %s sets a sliding attention window of %lld tokens, shorter than its context_length %d; "
                "this model attends to the whole prefix, which is exact for up to %lld tokens, so its context is %lld tokens\n",
                path, key, (long long)window, c.max_seq_len, (long long)window, (long long)window);
        c.max_seq_len = (int)window;
    }
    snprintf(key, sizeof(key), "%s.attention.key_length", arch);
    if (c.arch == ARCH_GPT2 || gguf_find(g, key) == NULL)
        require_heads_divide(path, "embedding_length", c.n_embd, "attention.head_count", c.n_head);
    c.head_dim = gguf_hparam(g, arch, "attention.key_length", c.n_embd / c.n_head, 0);
    snprintf(key, sizeof(key), "%s.rope.freq_base", arch);
    c.rope_theta = (float)gguf_get_float(g, key, 10000.0);
    // RoPE variants the model does not implement: partial rotation, scaled frequencies
    snprintf(key, sizeof(key), "%s.rope.dimension_count", arch);
    int64_t rope_dims = gguf_get_int(g, key, c.head_dim);
    if (c.arch == ARCH_LLAMA && rope_dims != c.head_dim)
        fatal("%s: %s = %lld rotates part of each head (head size %d); this model rotates whole heads",
              path, key, (long long)rope_dims, c.head_dim);
    snprintf(key, sizeof(key), "%s.rope.scaling.type", arch);
    const char *scaling = gguf_get_str(g, key);
    if ((scaling && strcmp(scaling, "none") != 0) || gguf_find_tensor(g, "rope_freqs.weight"))
        fatal("%s: scaled RoPE (%s); this model implements plain RoPE only", path,
              scaling ? scaling : "rope_freqs.weight");
    snprintf(key, sizeof(key), "%s.attention.%s", arch, c.arch == ARCH_GPT2 ? "layer_norm_epsilon" : "layer_norm_rms_epsilon");
    c.norm_eps = (float)gguf_get_float(g, key, c.arch == ARCH_GPT2 ? 1e-5 : 1e-6);
    int64_t n_tokens = gguf_get_str_array(g, "tokenizer.ggml.tokens", NULL, NULL);
    if (n_tokens < 0) {
        snprintf(key, sizeof(key), "%s.vocab_size", arch);
        n_tokens = gguf_get_int(g, key, -1);
    }
    if (n_tokens < 0) {
        const GGUFTensorInfo *emb = gguf_find_tensor(g, "token_embd.weight");
        if (emb == NULL) fatal("%s: missing tensor token_embd.weight", path);
        n_tokens = (int64_t)emb->dims[1];
    }
    if (n_tokens <= 0 || n_tokens > INT32_MAX) fatal("%s: vocabulary size %lld is out of range", path, (long long)n_tokens);
    c.vocab_size = c.padded_vocab_size = (int)n_tokens;
    c.qkv_bias = c.arch == ARCH_GPT2 || gguf_find_tensor(g, "blk.0.attn_q.bias") != NULL;
    // no output tensor, or (gpt2 converters) an output tensor that repeats the embedding: tied
    const GGUFTensorInfo *out = gguf_find_tensor(g, "output.weight");
    c.tied_embeddings = out == NULL;
    if (out != NULL && c.arch == ARCH_GPT2) {
        const GGUFTensorInfo *emb = gguf_find_tensor(g, "token_embd.weight");
        uint64_t nbytes = gguf_raw_bytes(emb ? emb : out);
        if (emb && emb->type == out->type && emb->n_elements == out->n_elements && nbytes > 0 &&
            memcmp(g->map + g->data_offset + emb->offset, g->map + g->data_offset + out->offset, nbytes) == 0)
            c.tied_embeddings = 1;
    }
    // every tensor checked (presence, type, shape) and every tensor of the file given a use
    // before the parameters are allocated, as for Hugging Face files
    Model layout;
    model_layout(&layout, &c, path);
    TensorTable table = gguf_tensor_table(&layout, arch);
    for (int i = 0; i < table.n; i++) {
        const TensorEntry *e = &table.entries[i];
        const GGUFTensorInfo *t = gguf_find_tensor(g, e->name);
        if (t == NULL) fatal("%s: missing tensor %s", path, e->name);
        if (gguf_raw_bytes(t) == 0)  // the type is the first problem of such a tensor, not its shape
            fatal("%s: tensor %s has ggml type %d (%s), which is not supported (supported: F32, F16, "
                  "BF16, Q8_0, Q4_0, Q4_1)", path, e->name, t->type, ggml_type_name(t->type));
        // GGUF dims run fastest first: numpy shape is the reverse
        int64_t shape[4];
        for (int d = 0; d < t->n_dims; d++) shape[d] = (int64_t)t->dims[t->n_dims - 1 - d];
        char got[128], want[128];
        if (t->n_dims != e->n_dims || shape[0] != e->shape[0] || (e->n_dims == 2 && shape[1] != e->shape[1]))
            fatal("%s: tensor %s has shape %s, expected %s from the file's metadata (%s.* hyperparameters%s)", path,
                  e->name, shape_str(got, sizeof(got), t->n_dims, shape), shape_str(want, sizeof(want), e->n_dims, e->shape),
                  arch, gguf_find(g, "tokenizer.ggml.tokens") ? "; the vocabulary is the count of tokenizer.ggml.tokens" : "");
    }
    UnusedTensors unused = {0};
    for (int64_t i = 0; i < g->n_tensors; i++) {
        const char *name = g->tensors[i].name;
        // a tied GPT-2's output.weight repeats token_embd (see above)
        if (!table_has(&table, name, 0) && !(c.tied_embeddings && strcmp(name, "output.weight") == 0))
            unused_add(&unused, name);
    }
    unused_report(&unused, path, "its metadata");
    free(table.entries);

    model_init(model, &c, path);
    table = gguf_tensor_table(model, arch);
    float *scratch = NULL;
    size_t scratch_size = 0;
    for (int i = 0; i < table.n; i++) {
        const TensorEntry *e = &table.entries[i];
        const GGUFTensorInfo *t = gguf_find_tensor(g, e->name);  // present, typed and shaped: checked above
        float *dst = model->params + e->offset;
        if (!e->permute_heads) { gguf_dequantize(g, t, dst); continue; }
        if ((e->shape[0] / e->permute_heads) % 2 != 0)
            fatal("%s: tensor %s: head size %lld is odd, RoPE needs it even", path, e->name, (long long)(e->shape[0] / e->permute_heads));
        if (scratch_size < t->n_elements) {
            scratch_size = t->n_elements;
            scratch = (float *)reallocCheck(scratch, scratch_size * sizeof(float));
        }
        gguf_dequantize(g, t, scratch);
        unpermute_rows(dst, scratch, e->shape[0], e->n_dims == 2 ? e->shape[1] : 1, e->permute_heads);
    }
    free(scratch);
    free(table.entries);
    if (info) {
        chat_template_from_text(gguf_get_str(g, "tokenizer.chat_template"), info->chat_template, sizeof(info->chat_template));
        if (n_tokens > 0 && gguf_find(g, "tokenizer.ggml.tokens"))
            snprintf(info->tokenizer_path, sizeof(info->tokenizer_path), "%s", path);
    }
    gguf_close(g);
}

// ----------------------------------------------------------------------------
// format detection

// A NaN or infinite value in a checkpoint (a run that diverged, a damaged file) would only show
// later as NaN losses or garbage text; the tensor is named when the file is loaded.
static void require_finite(const Model *model, const float *buffer, const char *what, const char *path) {
    size_t offset = 0;
    for (int t = 0; t < NUM_PARAM_TENSORS; t++) {
        const float *x = buffer + offset;
        size_t n = model->param_sizes[t];
        for (size_t i = 0; i < n; i++)
            if (!isfinite(x[i]))
                fatal("%s: tensor %s has a non-finite %s (%g at element %zu of %zu): the checkpoint is damaged "
                      "or the run that wrote it diverged", path, param_tensor_names[t], what, x[i], i, n);
        offset += n;
    }
}

// The tokenizer and chat template a native checkpoint's run recorded (see checkpoint.h). A
// config.json that is missing, unreadable or without the fields leaves info empty; a recorded
// tokenizer that is gone is a warning, since --tokenizer can still name one.
static void native_info_from_run(const char *path, CheckpointInfo *info) {
    char cfg_path[4200];
    const char *slash = strrchr(path, '/');
    if (slash) snprintf(cfg_path, sizeof cfg_path, "%.*s/config.json", (int)(slash - path), path);
    else snprintf(cfg_path, sizeof cfg_path, "config.json");
    if (!is_file(cfg_path)) return;
    size_t len;
    char *text = read_file_all(cfg_path, &len);
    cJSON *root = cJSON_Parse(text);
    free(text);
    const cJSON *tok = root ? json_get(root, CKPT_RUN_TOKENIZER_KEY) : NULL;
    const cJSON *tpl = root ? json_get(root, CKPT_RUN_CHAT_TEMPLATE_KEY) : NULL;
    if (cJSON_IsString(tok) && tok->valuestring[0]) {
        if (is_file(tok->valuestring)) snprintf(info->tokenizer_path, sizeof info->tokenizer_path, "%s", tok->valuestring);
        else fprintf(stderr, "warning: %s: the tokenizer its run recorded in %s, %s, is gone\n", path, cfg_path, tok->valuestring);
    }
    if (cJSON_IsString(tpl) && chat_template_find(tpl->valuestring))
        snprintf(info->chat_template, sizeof info->chat_template, "%s", tpl->valuestring);
    cJSON_Delete(root);
}

// A train_mora run directory (pretrain, reward's trunk, mora: checkpoints named by latest.txt,
// the convention of run_dir.h, read here without it so that this file needs no MPI): returns
// DIR/NAME of the newest checkpoint, or NULL when dir is not one. A directory that holds Hugging
// Face weights is a Hugging Face checkpoint whatever else it holds. A run's config.json (it has
// a "command" field) without latest.txt is a run with no checkpoint yet.
static char *run_dir_latest_checkpoint(const char *dir) {
    char path[4200];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    if (is_file(path)) return NULL;
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
    if (is_file(path)) return NULL;
    snprintf(path, sizeof path, "%s/latest.txt", dir);
    if (!is_file(path)) {
        snprintf(path, sizeof path, "%s/config.json", dir);
        if (!is_file(path)) return NULL;
        char *text = read_file_all(path, NULL);
        cJSON *root = cJSON_Parse(text);
        free(text);
        int is_run = root && cJSON_IsString(json_get(root, "command"));
        cJSON_Delete(root);
        if (is_run) fatal("%s is a train_mora run directory with no checkpoint yet (no latest.txt)", dir);
        return NULL;
    }
    char *name = read_file_all(path, NULL);
    name[strcspn(name, "\r\n")] = '\0';
    if (name[0] == '\0') fatal("%s: empty (expected a checkpoint file name)", path);
    char *full = (char *)mallocCheck(strlen(dir) + strlen(name) + 2);
    sprintf(full, "%s/%s", dir, name);
    if (!is_file(full)) fatal("%s names %s, which is not a file", path, full);
    free(name);
    return full;
}

static void load_any(Model *model, const char *path, TrainState *state, CheckpointInfo *info) {
    CheckpointInfo local_info;
    if (info == NULL) info = &local_info;
    memset(info, 0, sizeof(*info));
    if (state) memset(state, 0, sizeof(*state));
    struct stat st;
    if (stat(path, &st) != 0) fatal("cannot open %s: %s", path, strerror(errno));
    if (S_ISDIR(st.st_mode)) {
        char *latest = run_dir_latest_checkpoint(path);
        if (latest) {
            fprintf(stderr, "note: %s is a train_mora run directory: loading its latest checkpoint %s (named by latest.txt)\n",
                    path, latest);
            load_any(model, latest, state, info);  // a file: no further recursion
            free(latest);
            return;
        }
        info->format = CKPT_SAFETENSORS;
        load_hf(model, path, info);
        return;
    }
    FILE *f = fopen_check(path, "rb");
    unsigned char head[9] = {0};
    size_t got = fread(head, 1, sizeof(head), f);
    fclose(f);
    if (got < 4) fatal("%s: truncated file (%zu bytes, too short for any checkpoint format)", path, got);
    int32_t magic;
    memcpy(&magic, head, 4);
    size_t len = strlen(path);
    if (memcmp(head, "GGUF", 4) == 0) {
        info->format = CKPT_GGUF;
        load_gguf(model, path, info);
    } else if (magic == LLMC_MAGIC) {
        info->format = CKPT_LLMC_BIN;
        load_llmc_bin(model, path);
    } else if (magic == NATIVE_MAGIC) {
        info->format = CKPT_NATIVE;
        load_native(model, path, state);
        native_info_from_run(path, info);
    } else if ((got == 9 && head[8] == '{') || (len >= 12 && strcmp(path + len - 12, ".safetensors") == 0) ||
               ends_with(path, ".safetensors.index.json")) {
        info->format = CKPT_SAFETENSORS;
        load_hf(model, path, info);
    } else {
        fatal("%s: unknown checkpoint format (magic bytes %02x %02x %02x %02x: not GGUF, llm.c, "
              "train_mora native or safetensors)", path, head[0], head[1], head[2], head[3]);
    }
}

void checkpoint_load(Model *model, const char *path, TrainState *state, CheckpointInfo *info) {
    load_any(model, path, state, info);
    require_finite(model, model->params, "weight", path);
    if (model->m) require_finite(model, model->m, "AdamW first moment", path);
    if (model->v) require_finite(model, model->v, "AdamW second moment", path);
}
