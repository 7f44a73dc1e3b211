/*
 * ckpt_tool: the checkpoint library from the command line, for the format tests.
 *
 *   ckpt_tool dequant FILE.gguf OUT.safetensors   every GGUF tensor dequantised as stored (file
 *                                                 element order, no un-permutation), numpy shapes
 *   ckpt_tool meta FILE.gguf                      every metadata key/value and tensor entry, one
 *                                                 JSON object a line
 *   ckpt_tool convert IN native|hf OUT            load any format, save native file or HF dir
 *   ckpt_tool hf_tensors IN OUT.safetensors SCALE writes SCALE * params through
 *                                                 checkpoint_save_hf_tensors (a grads-like buffer)
 *   ckpt_tool info PATH                           the loaded config as key=value lines
 *   ckpt_tool roundtrip IN TMP_PATH               native save (with optimizer state) + load,
 *                                                 checked bit-exact
 */
#include "checkpoint.h"
#include "gguf.h"
#include "safetensors.h"
#include "rand.h"
#include "utils.h"
#include <cjson/cJSON.h>

static void usage(void) {
    fprintf(stderr,
            "usage: ckpt_tool dequant FILE.gguf OUT.safetensors\n"
            "       ckpt_tool meta FILE.gguf\n"
            "       ckpt_tool convert IN native|hf OUT\n"
            "       ckpt_tool hf_tensors IN OUT.safetensors SCALE\n"
            "       ckpt_tool info PATH\n"
            "       ckpt_tool roundtrip IN TMP_PATH\n");
    exit(2);
}

// Every tensor of a GGUF file dequantised to F32, named as in the file, shaped as numpy sees it.
static void cmd_dequant(const char *in, const char *out) {
    GGUFFile *g = gguf_open(in);
    SafetensorsWriteTensor *w = (SafetensorsWriteTensor *)callocCheck(g->n_tensors, sizeof(SafetensorsWriteTensor));
    for (int64_t i = 0; i < g->n_tensors; i++) {
        const GGUFTensorInfo *t = &g->tensors[i];
        float *data = (float *)mallocCheck(t->n_elements * sizeof(float));
        gguf_dequantize(g, t, data);
        w[i].name = t->name;
        w[i].n_dims = t->n_dims;
        for (int d = 0; d < t->n_dims; d++) w[i].shape[d] = (int64_t)t->dims[t->n_dims - 1 - d];
        w[i].data = data;
    }
    safetensors_write(out, w, (int)g->n_tensors, 0);
    for (int64_t i = 0; i < g->n_tensors; i++) free((void *)w[i].data);
    free(w);
    printf("dequantised %lld tensors from %s into %s\n", (long long)g->n_tensors, in, out);
    gguf_close(g);
}

// One array element or scalar at p of type t as a JSON item (integers printed exactly).
static cJSON *json_value(GGUFValueType t, const unsigned char *p) {
    char buf[64];
    switch (t) {
        case GGUF_TYPE_UINT8:  snprintf(buf, sizeof(buf), "%u", p[0]); break;
        case GGUF_TYPE_INT8:   { int8_t v; memcpy(&v, p, 1); snprintf(buf, sizeof(buf), "%d", v); break; }
        case GGUF_TYPE_UINT16: { uint16_t v; memcpy(&v, p, 2); snprintf(buf, sizeof(buf), "%u", v); break; }
        case GGUF_TYPE_INT16:  { int16_t v; memcpy(&v, p, 2); snprintf(buf, sizeof(buf), "%d", v); break; }
        case GGUF_TYPE_UINT32: { uint32_t v; memcpy(&v, p, 4); snprintf(buf, sizeof(buf), "%u", v); break; }
        case GGUF_TYPE_INT32:  { int32_t v; memcpy(&v, p, 4); snprintf(buf, sizeof(buf), "%d", v); break; }
        case GGUF_TYPE_UINT64: { uint64_t v; memcpy(&v, p, 8); snprintf(buf, sizeof(buf), "%llu", (unsigned long long)v); break; }
        case GGUF_TYPE_INT64:  { int64_t v; memcpy(&v, p, 8); snprintf(buf, sizeof(buf), "%lld", (long long)v); break; }
        case GGUF_TYPE_FLOAT32:{ float v; memcpy(&v, p, 4); snprintf(buf, sizeof(buf), "%.9g", v); break; }
        case GGUF_TYPE_FLOAT64:{ double v; memcpy(&v, p, 8); snprintf(buf, sizeof(buf), "%.17g", v); break; }
        case GGUF_TYPE_BOOL:   return cJSON_CreateBool(p[0] != 0);
        default: fatal("ckpt_tool: unexpected value type %d", t);
    }
    return cJSON_CreateRaw(buf);
}

static size_t scalar_size(GGUFValueType t) {
    switch (t) {
        case GGUF_TYPE_UINT8: case GGUF_TYPE_INT8: case GGUF_TYPE_BOOL: return 1;
        case GGUF_TYPE_UINT16: case GGUF_TYPE_INT16: return 2;
        case GGUF_TYPE_UINT32: case GGUF_TYPE_INT32: case GGUF_TYPE_FLOAT32: return 4;
        default: return 8;
    }
}

// Prints {"key", "type", "value"} per metadata entry (arrays: "type": "array", "arr_type", list
// value) and {"tensor", "type", "dims", "offset"} per tensor, reading through gguf.h's accessors.
static void cmd_meta(const char *in) {
    GGUFFile *g = gguf_open(in);
    printf("{\"version\": %u, \"data_offset\": %llu}\n", g->version, (unsigned long long)g->data_offset);
    for (int64_t i = 0; i < g->n_kv; i++) {
        const GGUFKV *kv = &g->kv[i];
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "key", kv->key);
        cJSON_AddNumberToObject(o, "type", kv->type);
        if (kv->type == GGUF_TYPE_STRING) {
            cJSON_AddStringToObject(o, "value", gguf_get_str(g, kv->key));
        } else if (kv->type == GGUF_TYPE_ARRAY) {
            cJSON_AddNumberToObject(o, "arr_type", kv->arr_type);
            cJSON *arr = cJSON_AddArrayToObject(o, "value");
            for (uint64_t j = 0; j < kv->arr_len; j++) {
                if (kv->arr_type == GGUF_TYPE_STRING) cJSON_AddItemToArray(arr, cJSON_CreateString(kv->strs[j]));
                else cJSON_AddItemToArray(arr, json_value(kv->arr_type, (const unsigned char *)kv->arr + j * scalar_size(kv->arr_type)));
            }
        } else if (kv->type == GGUF_TYPE_FLOAT32 || kv->type == GGUF_TYPE_FLOAT64) {
            char buf[64];
            snprintf(buf, sizeof(buf), "%.17g", gguf_get_float(g, kv->key, 0));
            cJSON_AddRawToObject(o, "value", buf);
        } else if (kv->type == GGUF_TYPE_UINT64) {
            // beyond int64: printed from the raw value (gguf_get_int rightly refuses it)
            char buf[64];
            snprintf(buf, sizeof(buf), "%llu", (unsigned long long)kv->value.u);
            cJSON_AddRawToObject(o, "value", buf);
        } else {
            char buf[64];
            snprintf(buf, sizeof(buf), "%lld", (long long)gguf_get_int(g, kv->key, 0));
            cJSON_AddRawToObject(o, "value", buf);
        }
        char *text = cJSON_PrintUnformatted(o);
        printf("%s\n", text);
        free(text);
        cJSON_Delete(o);
    }
    for (int64_t i = 0; i < g->n_tensors; i++) {
        const GGUFTensorInfo *t = &g->tensors[i];
        printf("{\"tensor\": \"%s\", \"type\": %d, \"type_name\": \"%s\", \"dims\": [", t->name, t->type, ggml_type_name(t->type));
        for (int d = 0; d < t->n_dims; d++) printf(d ? ", %llu" : "%llu", (unsigned long long)t->dims[d]);
        printf("], \"offset\": %llu}\n", (unsigned long long)t->offset);
    }
    gguf_close(g);
}

static const char *format_name(CheckpointFormat f) {
    switch (f) {
        case CKPT_NATIVE: return "native";
        case CKPT_LLMC_BIN: return "llmc_bin";
        case CKPT_SAFETENSORS: return "safetensors";
        case CKPT_GGUF: return "gguf";
    }
    return "?";
}

static void cmd_info(const char *path) {
    Model model;
    TrainState state;
    CheckpointInfo info;
    checkpoint_load(&model, path, &state, &info);
    const ModelConfig *c = &model.config;
    printf("format=%s\narch=%s\nvocab_size=%d\npadded_vocab_size=%d\nmax_seq_len=%d\nn_layer=%d\n"
           "n_embd=%d\nn_head=%d\nn_kv_head=%d\nhead_dim=%d\nffn_hidden=%d\nnorm_eps=%.9g\n"
           "rope_theta=%.9g\ntied_embeddings=%d\nqkv_bias=%d\nnum_parameters=%zu\nstep=%d\n"
           "has_optimizer=%d\nchat_template=%s\ntokenizer_path=%s\n",
           format_name(info.format), c->arch == ARCH_GPT2 ? "gpt2" : "llama", c->vocab_size,
           c->padded_vocab_size, c->max_seq_len, c->n_layer, c->n_embd, c->n_head, c->n_kv_head,
           c->head_dim, c->ffn_hidden, c->norm_eps, c->rope_theta, c->tied_embeddings, c->qkv_bias,
           model.num_parameters, state.step, state.has_optimizer, info.chat_template, info.tokenizer_path);
    model_free(&model);
}

static void cmd_convert(const char *in, const char *fmt, const char *out) {
    Model model;
    TrainState state;
    checkpoint_load(&model, in, &state, NULL);
    if (strcmp(fmt, "native") == 0) checkpoint_save_native(&model, &state, out, 0);
    else if (strcmp(fmt, "hf") == 0) checkpoint_save_hf(&model, out, 0);
    else fatal("ckpt_tool convert: unknown output format \"%s\" (native or hf)", fmt);
    printf("converted %s (%zu parameters) to %s %s\n", in, model.num_parameters, fmt, out);
    model_free(&model);
}

static void cmd_hf_tensors(const char *in, const char *out, const char *scale_text) {
    char *end;
    float scale = strtof(scale_text, &end);
    if (*end != '\0') fatal("ckpt_tool hf_tensors: SCALE \"%s\" is not a number", scale_text);
    Model model;
    checkpoint_load(&model, in, NULL, NULL);
    for (size_t i = 0; i < model.num_parameters; i++) model.grads[i] = scale * model.params[i];
    checkpoint_save_hf_tensors(&model, model.grads, out);
    printf("wrote %g * params of %s under Hugging Face names to %s\n", scale, in, out);
    model_free(&model);
}

// Saves a model with AdamW moments, step and RNG state, loads it back and compares every byte.
static int cmd_roundtrip(const char *in, const char *tmp) {
    Model a, b;
    TrainState sa, sb;
    checkpoint_load(&a, in, &sa, NULL);
    size_t n = a.num_parameters;
    uint64_t rng = rng_seed(1234);
    if (a.m == NULL) a.m = (float *)mallocCheck(n * sizeof(float));
    if (a.v == NULL) a.v = (float *)mallocCheck(n * sizeof(float));
    for (size_t i = 0; i < n; i++) { a.m[i] = random_normal(&rng); a.v[i] = random_f32(&rng); }
    a.opt_step = 77;
    sa.step = 12345;
    sa.rng_state = 0xFEEDFACECAFEBEEFULL;
    checkpoint_save_native(&a, &sa, tmp, 1);
    checkpoint_load(&b, tmp, &sb, NULL);
    int ok = 1;
    #define CHECK(cond, what) do { int c_ = (cond); printf("%-40s %s\n", what, c_ ? "ok" : "MISMATCH"); ok &= c_; } while (0)
    CHECK(memcmp(&a.config, &b.config, sizeof(ModelConfig)) == 0, "config");
    CHECK(a.num_parameters == b.num_parameters, "num_parameters");
    CHECK(b.num_parameters == n && memcmp(a.params, b.params, n * sizeof(float)) == 0, "params bit-exact");
    CHECK(b.m && memcmp(a.m, b.m, n * sizeof(float)) == 0, "AdamW m bit-exact");
    CHECK(b.v && memcmp(a.v, b.v, n * sizeof(float)) == 0, "AdamW v bit-exact");
    CHECK(b.opt_step == 77, "opt_step");
    CHECK(sb.step == 12345, "step");
    CHECK(sb.rng_state == 0xFEEDFACECAFEBEEFULL, "rng_state");
    CHECK(sb.has_optimizer == 1, "has_optimizer");
    #undef CHECK
    printf("roundtrip of %s (%zu parameters): %s\n", in, n, ok ? "bit-exact" : "FAILED");
    model_free(&a);
    model_free(&b);
    return ok ? 0 : 1;
}

int main(int argc, char **argv) {
    if (argc < 2) usage();
    const char *cmd = argv[1];
    if (strcmp(cmd, "dequant") == 0 && argc == 4) cmd_dequant(argv[2], argv[3]);
    else if (strcmp(cmd, "meta") == 0 && argc == 3) cmd_meta(argv[2]);
    else if (strcmp(cmd, "convert") == 0 && argc == 5) cmd_convert(argv[2], argv[3], argv[4]);
    else if (strcmp(cmd, "hf_tensors") == 0 && argc == 5) cmd_hf_tensors(argv[2], argv[3], argv[4]);
    else if (strcmp(cmd, "info") == 0 && argc == 3) cmd_info(argv[2]);
    else if (strcmp(cmd, "roundtrip") == 0 && argc == 4) return cmd_roundtrip(argv[2], argv[3]);
    else usage();
    return 0;
}
