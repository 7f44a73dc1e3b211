/*
 * GGUF reader. The file is memory-mapped; the header, the metadata key/values and the tensor
 * table are parsed with a cursor that checks every read against the file size, so a truncated or
 * corrupt file ends in a message naming the file and the field, never in a read past the map.
 *
 * Layout (little-endian, versions 2 and 3 are identical on little-endian files):
 *   "GGUF" u32 version, u64 n_tensors, u64 n_kv
 *   n_kv x   { string key, u32 value_type, value }
 *   n_tensors x { string name, u32 n_dims, u64 dims[n_dims], u32 ggml_type, u64 offset }
 *   padding to general.alignment (default 32), then the data section; tensor offsets are
 *   relative to its start.
 * A string is u64 length + bytes (no NUL). An array is u32 element type, u64 count, elements.
 */
#include "gguf.h"
#include "utils.h"
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

// Parsing cursor over the mapped file.
typedef struct {
    const unsigned char *base;
    uint64_t pos, size;
    const char *path;
} Cursor;

// Ensures n more bytes are available at the cursor, else "PATH: truncated file".
static void cursor_need(Cursor *c, uint64_t n, const char *what) {
    if (n > c->size || c->pos > c->size - n)
        fatal("%s: truncated file (reading %s at offset %llu, file has %llu bytes)", c->path, what,
              (unsigned long long)c->pos, (unsigned long long)c->size);
}
static uint32_t read_u32(Cursor *c, const char *what) {
    cursor_need(c, 4, what);
    uint32_t v; memcpy(&v, c->base + c->pos, 4); c->pos += 4;
    return v;
}
static uint64_t read_u64(Cursor *c, const char *what) {
    cursor_need(c, 8, what);
    uint64_t v; memcpy(&v, c->base + c->pos, 8); c->pos += 8;
    return v;
}
// A GGUF string, copied out NUL-terminated; *len_out gets the byte count.
static char *read_string(Cursor *c, const char *what, uint64_t *len_out) {
    uint64_t len = read_u64(c, what);
    if (len > c->size) fatal("%s: absurd string length %llu (reading %s at offset %llu)", c->path,
                             (unsigned long long)len, what, (unsigned long long)(c->pos - 8));
    cursor_need(c, len, what);
    char *s = (char *)mallocCheck(len + 1);
    memcpy(s, c->base + c->pos, len);
    s[len] = '\0';
    c->pos += len;
    if (len_out) *len_out = len;
    return s;
}

// Size in bytes of a scalar value type; 0 for string/array (variable) and unknown types.
static size_t value_type_size(uint32_t t) {
    switch (t) {
        case GGUF_TYPE_UINT8: case GGUF_TYPE_INT8: case GGUF_TYPE_BOOL: return 1;
        case GGUF_TYPE_UINT16: case GGUF_TYPE_INT16: return 2;
        case GGUF_TYPE_UINT32: case GGUF_TYPE_INT32: case GGUF_TYPE_FLOAT32: return 4;
        case GGUF_TYPE_UINT64: case GGUF_TYPE_INT64: case GGUF_TYPE_FLOAT64: return 8;
        default: return 0;
    }
}

// Decodes one scalar of type t at p into kv->value (integers sign- or zero-extended, floats to double).
static void decode_scalar(uint32_t t, const unsigned char *p, GGUFKV *kv) {
    switch (t) {
        case GGUF_TYPE_UINT8:  { uint8_t v = p[0]; kv->value.u = v; break; }
        case GGUF_TYPE_BOOL:   { uint8_t v = p[0]; kv->value.u = v != 0; break; }
        case GGUF_TYPE_INT8:   { int8_t v; memcpy(&v, p, 1); kv->value.i = v; break; }
        case GGUF_TYPE_UINT16: { uint16_t v; memcpy(&v, p, 2); kv->value.u = v; break; }
        case GGUF_TYPE_INT16:  { int16_t v; memcpy(&v, p, 2); kv->value.i = v; break; }
        case GGUF_TYPE_UINT32: { uint32_t v; memcpy(&v, p, 4); kv->value.u = v; break; }
        case GGUF_TYPE_INT32:  { int32_t v; memcpy(&v, p, 4); kv->value.i = v; break; }
        case GGUF_TYPE_UINT64: { uint64_t v; memcpy(&v, p, 8); kv->value.u = v; break; }
        case GGUF_TYPE_INT64:  { int64_t v; memcpy(&v, p, 8); kv->value.i = v; break; }
        case GGUF_TYPE_FLOAT32:{ float v; memcpy(&v, p, 4); kv->value.f = v; break; }
        case GGUF_TYPE_FLOAT64:{ double v; memcpy(&v, p, 8); kv->value.f = v; break; }
        default: break;
    }
}

static const char *value_type_name(uint32_t t) {
    static const char *names[] = {"uint8", "int8", "uint16", "int16", "uint32", "int32", "float32",
                                  "bool", "string", "array", "uint64", "int64", "float64"};
    return t < sizeof(names) / sizeof(names[0]) ? names[t] : "unknown";
}

// Parses one metadata key/value at the cursor into kv.
static void read_kv(Cursor *c, GGUFKV *kv, int64_t index) {
    char what[64];
    snprintf(what, sizeof(what), "metadata key %lld", (long long)index);
    kv->key = read_string(c, what, NULL);
    uint32_t t = read_u32(c, kv->key);
    kv->type = (GGUFValueType)t;
    if (t == GGUF_TYPE_STRING) {
        kv->str = read_string(c, kv->key, &kv->str_len);
    } else if (t == GGUF_TYPE_ARRAY) {
        uint32_t et = read_u32(c, kv->key);
        uint64_t n = read_u64(c, kv->key);
        kv->arr_type = (GGUFValueType)et;
        kv->arr_len = n;
        if (et == GGUF_TYPE_STRING) {
            // each string takes at least its 8-byte length
            if (n > (c->size - c->pos) / 8)
                fatal("%s: metadata %s: absurd array length %llu for the file size", c->path, kv->key,
                      (unsigned long long)n);
            kv->strs = (char **)mallocCheck(n * sizeof(char *));
            kv->str_lens = (uint64_t *)mallocCheck(n * sizeof(uint64_t));
            for (uint64_t i = 0; i < n; i++) kv->strs[i] = read_string(c, kv->key, &kv->str_lens[i]);
        } else {
            size_t es = value_type_size(et);
            if (es == 0)
                fatal("%s: metadata %s: unsupported array element type %u (%s)", c->path, kv->key, et,
                      value_type_name(et));
            if (n > (c->size - c->pos) / es)
                fatal("%s: truncated file (metadata %s: array of %llu %s runs past the end)", c->path,
                      kv->key, (unsigned long long)n, value_type_name(et));
            kv->arr = mallocCheck(n * es);
            memcpy(kv->arr, c->base + c->pos, n * es);
            c->pos += n * es;
        }
    } else {
        size_t s = value_type_size(t);
        if (s == 0) fatal("%s: metadata %s: unknown value type %u", c->path, kv->key, t);
        cursor_need(c, s, kv->key);
        decode_scalar(t, c->base + c->pos, kv);
        c->pos += s;
    }
}

const char *ggml_type_name(int type) {
    switch (type) {
        case 0: return "F32";   case 1: return "F16";   case 2: return "Q4_0";  case 3: return "Q4_1";
        case 6: return "Q5_0";  case 7: return "Q5_1";  case 8: return "Q8_0";  case 9: return "Q8_1";
        case 10: return "Q2_K"; case 11: return "Q3_K"; case 12: return "Q4_K"; case 13: return "Q5_K";
        case 14: return "Q6_K"; case 15: return "Q8_K"; case 16: return "IQ2_XXS"; case 17: return "IQ2_XS";
        case 18: return "IQ3_XXS"; case 19: return "IQ1_S"; case 20: return "IQ4_NL"; case 21: return "IQ3_S";
        case 22: return "IQ2_S"; case 23: return "IQ4_XS"; case 24: return "I8"; case 25: return "I16";
        case 26: return "I32";  case 27: return "I64";  case 28: return "F64";  case 29: return "IQ1_M";
        case 30: return "BF16"; case 34: return "TQ1_0"; case 35: return "TQ2_0"; case 39: return "MXFP4";
        default: return "unknown";
    }
}

// Block geometry of the types this reader dequantises: elements per block and bytes per block.
// Returns 0 for other types.
static int ggml_block_layout(int type, uint64_t *block_elems, uint64_t *block_bytes) {
    switch (type) {
        case GGML_TYPE_F32:  *block_elems = 1;  *block_bytes = 4;  return 1;
        case GGML_TYPE_F16:  *block_elems = 1;  *block_bytes = 2;  return 1;
        case GGML_TYPE_BF16: *block_elems = 1;  *block_bytes = 2;  return 1;
        case GGML_TYPE_Q8_0: *block_elems = 32; *block_bytes = 34; return 1;  // fp16 d, 32 x int8
        case GGML_TYPE_Q4_0: *block_elems = 32; *block_bytes = 18; return 1;  // fp16 d, 16 bytes of nibbles
        case GGML_TYPE_Q4_1: *block_elems = 32; *block_bytes = 20; return 1;  // fp16 d, fp16 m, 16 bytes
        default: return 0;
    }
}

// Unsupported-type message shared by gguf_open and gguf_dequantize.
static void fatal_unsupported_type(const char *path, const GGUFTensorInfo *t) {
    fatal("%s: tensor %s has ggml type %d (%s), which is not supported (supported: F32, F16, BF16, "
          "Q8_0, Q4_0, Q4_1)", path, t->name, t->type, ggml_type_name(t->type));
}

GGUFFile *gguf_open(const char *path) {
    uint64_t size;
    unsigned char *map = map_file_readonly(path, &size, 4, "GGUF");

    GGUFFile *g = (GGUFFile *)callocCheck(1, sizeof(GGUFFile));
    g->path = xstrdup(path);
    g->map = map;
    g->file_size = size;
    Cursor c = {map, 0, size, path};
    if (memcmp(map, "GGUF", 4) != 0)
        fatal("%s: bad magic %02x %02x %02x %02x, expected \"GGUF\"", path, map[0], map[1], map[2], map[3]);
    c.pos = 4;
    g->version = read_u32(&c, "version");
    if (g->version != 2 && g->version != 3)
        fatal("%s: GGUF version %u is not supported (2 and 3 are)", path, g->version);
    uint64_t n_tensors = read_u64(&c, "tensor count");
    uint64_t n_kv = read_u64(&c, "metadata count");
    // counts beyond 2^32 are corruption; smaller ones that cannot fit (a key/value takes at least
    // 8 + 4 + 1 bytes, a tensor entry 8 + 4 + 8 + 4 + 8) mean the file was cut short
    if (n_kv > UINT32_MAX) fatal("%s: absurd metadata count %llu", path, (unsigned long long)n_kv);
    if (n_tensors > UINT32_MAX) fatal("%s: absurd tensor count %llu", path, (unsigned long long)n_tensors);
    if (n_kv > (size - c.pos) / 13 || n_tensors > (size - c.pos) / 32)
        fatal("%s: truncated file (the header announces %llu metadata entries and %llu tensors; only %llu "
              "bytes follow)", path, (unsigned long long)n_kv, (unsigned long long)n_tensors,
              (unsigned long long)(size - c.pos));
    g->n_kv = (int64_t)n_kv;
    g->n_tensors = (int64_t)n_tensors;
    g->kv = (GGUFKV *)callocCheck(n_kv, sizeof(GGUFKV));
    for (uint64_t i = 0; i < n_kv; i++) read_kv(&c, &g->kv[i], (int64_t)i);

    g->tensors = (GGUFTensorInfo *)callocCheck(n_tensors, sizeof(GGUFTensorInfo));
    for (uint64_t i = 0; i < n_tensors; i++) {
        GGUFTensorInfo *t = &g->tensors[i];
        char what[64];
        snprintf(what, sizeof(what), "tensor info %llu", (unsigned long long)i);
        t->name = read_string(&c, what, NULL);
        uint32_t n_dims = read_u32(&c, t->name);
        if (n_dims < 1 || n_dims > 4) fatal("%s: tensor %s has %u dimensions (1 to 4 supported)", path, t->name, n_dims);
        t->n_dims = (int)n_dims;
        t->n_elements = 1;
        for (int d = 0; d < 4; d++) t->dims[d] = 1;
        for (uint32_t d = 0; d < n_dims; d++) {
            t->dims[d] = read_u64(&c, t->name);
            if (t->dims[d] == 0 || t->dims[d] > size * 2 || t->n_elements > (size * 2) / t->dims[d])
                fatal("%s: tensor %s: absurd dimension %llu", path, t->name, (unsigned long long)t->dims[d]);
            t->n_elements *= t->dims[d];
        }
        t->type = (int)read_u32(&c, t->name);
        t->offset = read_u64(&c, t->name);
    }

    int64_t alignment = gguf_get_int(g, "general.alignment", 32);
    if (alignment <= 0 || (alignment & (alignment - 1)) != 0)
        fatal("%s: general.alignment %lld is not a power of two", path, (long long)alignment);
    g->data_offset = (c.pos + (uint64_t)alignment - 1) / (uint64_t)alignment * (uint64_t)alignment;
    if (g->data_offset > size && n_tensors > 0)
        fatal("%s: truncated file (data section at %llu, file has %llu bytes)", path,
              (unsigned long long)g->data_offset, (unsigned long long)size);

    // every tensor of a known type must lie inside the file; others are rejected when dequantised
    for (uint64_t i = 0; i < n_tensors; i++) {
        GGUFTensorInfo *t = &g->tensors[i];
        uint64_t be, bb;
        if (t->offset % (uint64_t)alignment != 0)
            fatal("%s: tensor %s: offset %llu is not a multiple of the alignment %lld", path, t->name,
                  (unsigned long long)t->offset, (long long)alignment);
        if (!ggml_block_layout(t->type, &be, &bb)) continue;
        if (t->dims[0] % be != 0)
            fatal("%s: tensor %s: row length %llu is not a multiple of the %s block size %llu", path,
                  t->name, (unsigned long long)t->dims[0], ggml_type_name(t->type), (unsigned long long)be);
        uint64_t nbytes = t->n_elements / be * bb;
        if (t->offset > size || g->data_offset > size - t->offset || nbytes > size - g->data_offset - t->offset)
            fatal("%s: truncated file (tensor %s: %llu bytes at data offset %llu run past the end of the "
                  "%llu-byte file)", path, t->name, (unsigned long long)nbytes,
                  (unsigned long long)t->offset, (unsigned long long)size);
    }
    return g;
}

void gguf_close(GGUFFile *g) {
    if (g == NULL) return;
    for (int64_t i = 0; i < g->n_kv; i++) {
        GGUFKV *kv = &g->kv[i];
        free(kv->key);
        free(kv->str);
        if (kv->strs) for (uint64_t j = 0; j < kv->arr_len; j++) free(kv->strs[j]);
        free(kv->strs);
        free(kv->str_lens);
        free(kv->arr);
    }
    free(g->kv);
    for (int64_t i = 0; i < g->n_tensors; i++) free(g->tensors[i].name);
    free(g->tensors);
    munmap(g->map, g->file_size);
    free(g->path);
    free(g);
}

const GGUFKV *gguf_find(const GGUFFile *g, const char *key) {
    for (int64_t i = 0; i < g->n_kv; i++)
        if (strcmp(g->kv[i].key, key) == 0) return &g->kv[i];
    return NULL;
}

const char *gguf_get_str(const GGUFFile *g, const char *key) {
    const GGUFKV *kv = gguf_find(g, key);
    if (kv == NULL) return NULL;
    if (kv->type != GGUF_TYPE_STRING) fatal("%s: metadata %s is a %s, expected a string", g->path, key, value_type_name(kv->type));
    return kv->str;
}

static int is_integer_type(uint32_t t) {
    return t == GGUF_TYPE_UINT8 || t == GGUF_TYPE_INT8 || t == GGUF_TYPE_UINT16 || t == GGUF_TYPE_INT16 ||
           t == GGUF_TYPE_UINT32 || t == GGUF_TYPE_INT32 || t == GGUF_TYPE_UINT64 || t == GGUF_TYPE_INT64 ||
           t == GGUF_TYPE_BOOL;
}
static int is_signed_type(uint32_t t) {
    return t == GGUF_TYPE_INT8 || t == GGUF_TYPE_INT16 || t == GGUF_TYPE_INT32 || t == GGUF_TYPE_INT64;
}

int64_t gguf_get_int(const GGUFFile *g, const char *key, int64_t def) {
    const GGUFKV *kv = gguf_find(g, key);
    if (kv == NULL) return def;
    if (!is_integer_type(kv->type)) fatal("%s: metadata %s is a %s, expected an integer", g->path, key, value_type_name(kv->type));
    if (!is_signed_type(kv->type) && kv->value.u > (uint64_t)INT64_MAX)
        fatal("%s: metadata %s = %llu is out of range", g->path, key, (unsigned long long)kv->value.u);
    return is_signed_type(kv->type) ? kv->value.i : (int64_t)kv->value.u;
}

double gguf_get_float(const GGUFFile *g, const char *key, double def) {
    const GGUFKV *kv = gguf_find(g, key);
    if (kv == NULL) return def;
    if (kv->type == GGUF_TYPE_FLOAT32 || kv->type == GGUF_TYPE_FLOAT64) return kv->value.f;
    if (is_integer_type(kv->type)) return is_signed_type(kv->type) ? (double)kv->value.i : (double)kv->value.u;
    fatal("%s: metadata %s is a %s, expected a number", g->path, key, value_type_name(kv->type));
}

int64_t gguf_get_str_array(const GGUFFile *g, const char *key, char ***strs, uint64_t **lens) {
    const GGUFKV *kv = gguf_find(g, key);
    if (kv == NULL) return -1;
    if (kv->type != GGUF_TYPE_ARRAY || kv->arr_type != GGUF_TYPE_STRING)
        fatal("%s: metadata %s is not an array of strings", g->path, key);
    if (strs) *strs = kv->strs;
    if (lens) *lens = kv->str_lens;
    return (int64_t)kv->arr_len;
}

int64_t gguf_get_int_array(const GGUFFile *g, const char *key, int64_t **out) {
    const GGUFKV *kv = gguf_find(g, key);
    if (kv == NULL) return -1;
    if (kv->type != GGUF_TYPE_ARRAY || !is_integer_type(kv->arr_type))
        fatal("%s: metadata %s is not an array of integers", g->path, key);
    size_t es = value_type_size(kv->arr_type);
    int64_t *dst = (int64_t *)mallocCheck(kv->arr_len * sizeof(int64_t));
    for (uint64_t i = 0; i < kv->arr_len; i++) {
        GGUFKV tmp = {0};
        decode_scalar(kv->arr_type, (const unsigned char *)kv->arr + i * es, &tmp);
        dst[i] = is_signed_type(kv->arr_type) ? tmp.value.i : (int64_t)tmp.value.u;
    }
    *out = dst;
    return (int64_t)kv->arr_len;
}

const GGUFTensorInfo *gguf_find_tensor(const GGUFFile *g, const char *name) {
    for (int64_t i = 0; i < g->n_tensors; i++)
        if (strcmp(g->tensors[i].name, name) == 0) return &g->tensors[i];
    return NULL;
}

// IEEE half (binary16) to float, exact for every value including subnormals, inf and NaN.
static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f;
    uint32_t mant = h & 0x3ff;
    uint32_t bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (mant << 13);           // inf / NaN
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (mant << 13);   // normal: rebias 15 -> 127
    } else if (mant == 0) {
        bits = sign;                                        // signed zero
    } else {
        // subnormal half: normalise the mantissa into a float's normal range
        int e = -1;
        do { mant <<= 1; e++; } while ((mant & 0x400) == 0);
        bits = sign | ((uint32_t)(112 - e) << 23) | ((mant & 0x3ff) << 13);
    }
    float f; memcpy(&f, &bits, 4);
    return f;
}
static inline float bf16_to_float(uint16_t b) {
    uint32_t bits = (uint32_t)b << 16;
    float f; memcpy(&f, &bits, 4);
    return f;
}
static inline uint16_t load_u16(const unsigned char *p) { uint16_t v; memcpy(&v, p, 2); return v; }

// Dequantises t (n_elements values) into dst, in the file's element order. Within a block of 32
// values: Q8_0 x = d * q (q int8); Q4_0 x = (q - 8) * d; Q4_1 x = q * d + m, where the nibble q of
// element j < 16 is the low half of byte j and that of element j + 16 its high half.
// Contraction to fma is off here so the values equal ggml's (and the gguf package's) float math.
__attribute__((optimize("fp-contract=off")))
void gguf_dequantize(const GGUFFile *g, const GGUFTensorInfo *t, float *dst) {
    uint64_t be, bb;
    if (!ggml_block_layout(t->type, &be, &bb)) fatal_unsupported_type(g->path, t);
    const unsigned char *src = g->map + g->data_offset + t->offset;
    int64_t n_blocks = (int64_t)(t->n_elements / be);
    switch (t->type) {
        case GGML_TYPE_F32:
            memcpy(dst, src, t->n_elements * sizeof(float));
            break;
        case GGML_TYPE_F16:
            #pragma omp parallel for
            for (int64_t i = 0; i < n_blocks; i++) dst[i] = half_to_float(load_u16(src + 2 * i));
            break;
        case GGML_TYPE_BF16:
            #pragma omp parallel for
            for (int64_t i = 0; i < n_blocks; i++) dst[i] = bf16_to_float(load_u16(src + 2 * i));
            break;
        case GGML_TYPE_Q8_0:
            #pragma omp parallel for
            for (int64_t b = 0; b < n_blocks; b++) {
                const unsigned char *blk = src + b * 34;
                float d = half_to_float(load_u16(blk));
                for (int j = 0; j < 32; j++) dst[b * 32 + j] = d * (float)(int8_t)blk[2 + j];
            }
            break;
        case GGML_TYPE_Q4_0:
            #pragma omp parallel for
            for (int64_t b = 0; b < n_blocks; b++) {
                const unsigned char *blk = src + b * 18;
                float d = half_to_float(load_u16(blk));
                for (int j = 0; j < 16; j++) {
                    dst[b * 32 + j] = d * (float)((int)(blk[2 + j] & 0x0f) - 8);
                    dst[b * 32 + j + 16] = d * (float)((int)(blk[2 + j] >> 4) - 8);
                }
            }
            break;
        case GGML_TYPE_Q4_1:
            #pragma omp parallel for
            for (int64_t b = 0; b < n_blocks; b++) {
                const unsigned char *blk = src + b * 20;
                float d = half_to_float(load_u16(blk));
                float m = half_to_float(load_u16(blk + 2));
                for (int j = 0; j < 16; j++) {
                    float lo = d * (float)(blk[4 + j] & 0x0f);
                    float hi = d * (float)(blk[4 + j] >> 4);
                    dst[b * 32 + j] = lo + m;
                    dst[b * 32 + j + 16] = hi + m;
                }
            }
            break;
    }
}
