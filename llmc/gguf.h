/*
 * GGUF reader (versions 2 and 3): the header, the metadata key/values and the tensor table, and
 * dequantisation of F32, F16, BF16, Q8_0, Q4_0, Q4_1 tensors to float. Malformed files exit with
 * a message naming the file and what is wrong (fatal in utils.h).
 */
#ifndef LLMC_GGUF_H
#define LLMC_GGUF_H
#include <stdint.h>
#include <stddef.h>

typedef enum {
    GGUF_TYPE_UINT8 = 0, GGUF_TYPE_INT8 = 1, GGUF_TYPE_UINT16 = 2, GGUF_TYPE_INT16 = 3,
    GGUF_TYPE_UINT32 = 4, GGUF_TYPE_INT32 = 5, GGUF_TYPE_FLOAT32 = 6, GGUF_TYPE_BOOL = 7,
    GGUF_TYPE_STRING = 8, GGUF_TYPE_ARRAY = 9, GGUF_TYPE_UINT64 = 10, GGUF_TYPE_INT64 = 11,
    GGUF_TYPE_FLOAT64 = 12
} GGUFValueType;

// ggml tensor types this reader dequantises (others are rejected by name/number)
enum { GGML_TYPE_F32 = 0, GGML_TYPE_F16 = 1, GGML_TYPE_Q4_0 = 2, GGML_TYPE_Q4_1 = 3,
       GGML_TYPE_Q8_0 = 8, GGML_TYPE_BF16 = 30 };

typedef struct {
    char *key;
    GGUFValueType type;      // GGUF_TYPE_ARRAY for arrays
    GGUFValueType arr_type;  // element type of an array
    uint64_t arr_len;        // element count of an array
    // scalar: value holds it; string: str (NUL-terminated) and str_len;
    // array of strings: strs[i] / str_lens[i]; array of numbers: raw little-endian elements in arr
    union { uint64_t u; int64_t i; double f; } value;
    char *str; uint64_t str_len;
    char **strs; uint64_t *str_lens;
    void *arr;
} GGUFKV;

typedef struct {
    char *name;
    int n_dims;
    uint64_t dims[4];        // GGUF order: dims[0] is the fastest-varying (columns)
    int type;                // GGML_TYPE_*
    uint64_t offset;         // relative to the start of the data section
    uint64_t n_elements;
} GGUFTensorInfo;

typedef struct {
    char *path;
    uint32_t version;
    int64_t n_kv;
    GGUFKV *kv;
    int64_t n_tensors;
    GGUFTensorInfo *tensors;
    uint64_t data_offset;    // file offset of the data section
    uint64_t file_size;
    unsigned char *map;      // the whole file, memory-mapped read-only
} GGUFFile;

GGUFFile *gguf_open(const char *path);
void gguf_close(GGUFFile *g);

const GGUFKV *gguf_find(const GGUFFile *g, const char *key);            // NULL when absent
const char *gguf_get_str(const GGUFFile *g, const char *key);           // NULL when absent
int64_t gguf_get_int(const GGUFFile *g, const char *key, int64_t def);  // any integer/bool type
double gguf_get_float(const GGUFFile *g, const char *key, double def);  // any numeric type
// Array of strings: returns the count (-1 when absent); strings owned by g.
int64_t gguf_get_str_array(const GGUFFile *g, const char *key, char ***strs, uint64_t **lens);
// Array of integers converted to int64 into a malloc'd buffer the caller frees; -1 when absent.
int64_t gguf_get_int_array(const GGUFFile *g, const char *key, int64_t **out);

const GGUFTensorInfo *gguf_find_tensor(const GGUFFile *g, const char *name);  // NULL when absent
// Dequantises a tensor into dst (n_elements floats, in the file's element order).
void gguf_dequantize(const GGUFFile *g, const GGUFTensorInfo *t, float *dst);
const char *ggml_type_name(int type);
#endif
