/*
 * safetensors: the Hugging Face tensor file. Layout: u64 little-endian N, then N bytes of JSON
 * header {"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...,
 * "__metadata__": {...}}, then the data section (offsets relative to its start).
 *
 * The reader memory-maps a file, checks every tensor's byte range against the file size, and
 * converts F32, F16 and BF16 tensors to float. A "model set" is what a Hugging Face checkpoint
 * is: one file, or a directory holding model.safetensors or model.safetensors.index.json with
 * its shards. The writer writes F32 or BF16 tensors, header padded to 8 bytes, atomically.
 */
#ifndef LLMC_SAFETENSORS_H
#define LLMC_SAFETENSORS_H
#include <stdint.h>
#include <stddef.h>

#define SAFETENSORS_MAX_DIMS 8

typedef struct {
    char *name;
    char dtype[16];               // "F32", "F16", "BF16", ... as written in the header
    int n_dims;
    int64_t shape[SAFETENSORS_MAX_DIMS];
    uint64_t n_elements;
    uint64_t begin, end;          // byte range within the data section
} SafetensorsTensor;

typedef struct {
    char *path;
    unsigned char *map;           // the whole file, memory-mapped read-only
    uint64_t file_size;
    uint64_t data_offset;         // 8 + header length
    int n_tensors;
    SafetensorsTensor *tensors;
} SafetensorsFile;

SafetensorsFile *safetensors_open(const char *path);
void safetensors_close(SafetensorsFile *f);
const SafetensorsTensor *safetensors_find(const SafetensorsFile *f, const char *name);  // NULL when absent
// Converts tensor t (F32, F16 or BF16) to n_elements floats in dst; other dtypes exit naming the tensor.
void safetensors_read_f32(const SafetensorsFile *f, const SafetensorsTensor *t, float *dst);

// A checkpoint's tensors across one or several files.
typedef struct {
    int n_files;
    SafetensorsFile **files;
} SafetensorsSet;

// path: a .safetensors file, a directory with model.safetensors or model.safetensors.index.json
// (whose "weight_map" names the shards), or such an index file (NAME.index.json) itself.
SafetensorsSet *safetensors_open_set(const char *path);
void safetensors_close_set(SafetensorsSet *s);
// Finds a tensor in any file of the set; *file gets the file that holds it. NULL when absent.
const SafetensorsTensor *safetensors_set_find(const SafetensorsSet *s, const char *name, const SafetensorsFile **file);

// One tensor to write. data holds n_elements floats in row-major order of shape; with
// transpose_2d (n_dims == 2 only) data holds the transpose instead, shape[1] rows of shape[0],
// and the writer transposes it on the way out.
typedef struct {
    const char *name;
    int n_dims;
    int64_t shape[SAFETENSORS_MAX_DIMS];
    const float *data;
    int transpose_2d;
} SafetensorsWriteTensor;

// Writes the tensors to path (temporary file + rename), with {"format": "pt"} metadata: as F32,
// or with bf16 = 1 as BF16 (each float rounded to the nearest bfloat16, ties to even).
void safetensors_write(const char *path, const SafetensorsWriteTensor *tensors, int n, int bf16);
#endif
