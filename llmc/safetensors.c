/*
 * safetensors reader and writer (see safetensors.h for the layout). The reader validates the
 * header completely before any tensor is touched: every entry has a known dtype, a shape, and a
 * byte range that lies inside the file and matches shape x dtype size.
 */
#include "safetensors.h"
#include "utils.h"
#include <cjson/cJSON.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

// Bytes per element of a safetensors dtype; 0 when the dtype is not one safetensors defines.
static size_t dtype_size(const char *dtype) {
    static const struct { const char *name; size_t size; } table[] = {
        {"F64", 8}, {"F32", 4}, {"F16", 2}, {"BF16", 2}, {"I64", 8}, {"I32", 4}, {"I16", 2},
        {"I8", 1}, {"U64", 8}, {"U32", 4}, {"U16", 2}, {"U8", 1}, {"BOOL", 1}, {"F8_E4M3", 1},
        {"F8_E5M2", 1},
    };
    for (size_t i = 0; i < sizeof(table) / sizeof(table[0]); i++)
        if (strcmp(dtype, table[i].name) == 0) return table[i].size;
    return 0;
}

SafetensorsFile *safetensors_open(const char *path) {
    uint64_t size;
    unsigned char *map = map_file_readonly(path, &size, 8, "safetensors");

    uint64_t header_len;
    memcpy(&header_len, map, 8);
    if (header_len > size - 8)
        fatal("%s: truncated file (header of %llu bytes, file has %llu)", path,
              (unsigned long long)header_len, (unsigned long long)size);
    cJSON *root = cJSON_ParseWithLength((const char *)map + 8, header_len);
    if (root == NULL || !cJSON_IsObject(root)) fatal("%s: safetensors header is not valid JSON", path);

    SafetensorsFile *f = (SafetensorsFile *)callocCheck(1, sizeof(SafetensorsFile));
    f->path = xstrdup(path);
    f->map = map;
    f->file_size = size;
    f->data_offset = 8 + header_len;
    uint64_t data_size = size - f->data_offset;
    int n = cJSON_GetArraySize(root);
    f->tensors = (SafetensorsTensor *)callocCheck(n, sizeof(SafetensorsTensor));
    const cJSON *item;
    cJSON_ArrayForEach(item, root) {
        if (strcmp(item->string, "__metadata__") == 0) continue;
        SafetensorsTensor *t = &f->tensors[f->n_tensors];
        const cJSON *dtype = cJSON_GetObjectItemCaseSensitive(item, "dtype");
        const cJSON *shape = cJSON_GetObjectItemCaseSensitive(item, "shape");
        const cJSON *offs = cJSON_GetObjectItemCaseSensitive(item, "data_offsets");
        if (!cJSON_IsString(dtype) || !cJSON_IsArray(shape) || !cJSON_IsArray(offs) || cJSON_GetArraySize(offs) != 2)
            fatal("%s: tensor %s: header entry needs dtype, shape and data_offsets [begin, end]", path, item->string);
        size_t es = dtype_size(dtype->valuestring);
        if (es == 0) fatal("%s: tensor %s: unknown dtype %s", path, item->string, dtype->valuestring);
        t->name = xstrdup(item->string);
        snprintf(t->dtype, sizeof(t->dtype), "%s", dtype->valuestring);
        t->n_dims = cJSON_GetArraySize(shape);
        if (t->n_dims > SAFETENSORS_MAX_DIMS) fatal("%s: tensor %s has %d dimensions (at most %d)", path, t->name, t->n_dims, SAFETENSORS_MAX_DIMS);
        t->n_elements = 1;
        for (int d = 0; d < t->n_dims; d++) {
            const cJSON *dim = cJSON_GetArrayItem(shape, d);
            if (!cJSON_IsNumber(dim) || dim->valuedouble < 0 || dim->valuedouble > (double)data_size)
                fatal("%s: tensor %s: bad shape entry %d", path, t->name, d);
            t->shape[d] = (int64_t)dim->valuedouble;
            t->n_elements *= (uint64_t)t->shape[d];
            if (t->n_elements > data_size) fatal("%s: tensor %s: shape larger than the file", path, t->name);
        }
        const cJSON *b = cJSON_GetArrayItem(offs, 0), *e = cJSON_GetArrayItem(offs, 1);
        if (!cJSON_IsNumber(b) || !cJSON_IsNumber(e) || b->valuedouble < 0 || e->valuedouble < b->valuedouble)
            fatal("%s: tensor %s: bad data_offsets", path, t->name);
        t->begin = (uint64_t)b->valuedouble;
        t->end = (uint64_t)e->valuedouble;
        if (t->end > data_size)
            fatal("%s: truncated file (tensor %s ends at data byte %llu, the data section has %llu)", path,
                  t->name, (unsigned long long)t->end, (unsigned long long)data_size);
        if (t->end - t->begin != t->n_elements * es)
            fatal("%s: tensor %s: data_offsets span %llu bytes, shape and dtype %s need %llu", path, t->name,
                  (unsigned long long)(t->end - t->begin), t->dtype, (unsigned long long)(t->n_elements * es));
        f->n_tensors++;
    }
    cJSON_Delete(root);
    return f;
}

void safetensors_close(SafetensorsFile *f) {
    if (f == NULL) return;
    for (int i = 0; i < f->n_tensors; i++) free(f->tensors[i].name);
    free(f->tensors);
    munmap(f->map, f->file_size);
    free(f->path);
    free(f);
}

const SafetensorsTensor *safetensors_find(const SafetensorsFile *f, const char *name) {
    for (int i = 0; i < f->n_tensors; i++)
        if (strcmp(f->tensors[i].name, name) == 0) return &f->tensors[i];
    return NULL;
}

// Converts an F32, F16 or BF16 tensor to floats (F16 exactly, subnormals included).
void safetensors_read_f32(const SafetensorsFile *f, const SafetensorsTensor *t, float *dst) {
    const unsigned char *src = f->map + f->data_offset + t->begin;
    int64_t n = (int64_t)t->n_elements;
    if (strcmp(t->dtype, "F32") == 0) {
        memcpy(dst, src, n * sizeof(float));
    } else if (strcmp(t->dtype, "BF16") == 0) {
        #pragma omp parallel for
        for (int64_t i = 0; i < n; i++) {
            uint16_t h; memcpy(&h, src + 2 * i, 2);
            uint32_t bits = (uint32_t)h << 16;
            memcpy(&dst[i], &bits, 4);
        }
    } else if (strcmp(t->dtype, "F16") == 0) {
        #pragma omp parallel for
        for (int64_t i = 0; i < n; i++) {
            uint16_t h; memcpy(&h, src + 2 * i, 2);
            uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ff, bits;
            if (exp == 0x1f) bits = sign | 0x7f800000u | (mant << 13);
            else if (exp != 0) bits = sign | ((exp + 112) << 23) | (mant << 13);
            else if (mant == 0) bits = sign;
            else {
                int e = -1;
                do { mant <<= 1; e++; } while ((mant & 0x400) == 0);
                bits = sign | ((uint32_t)(112 - e) << 23) | ((mant & 0x3ff) << 13);
            }
            memcpy(&dst[i], &bits, 4);
        }
    } else {
        fatal("%s: tensor %s has dtype %s (F32, F16 and BF16 are supported)", f->path, t->name, t->dtype);
    }
}

// Joins dir and name into a malloc'd path.
static char *path_join(const char *dir, const char *name) {
    size_t n = strlen(dir) + strlen(name) + 2;
    char *p = (char *)mallocCheck(n);
    snprintf(p, n, "%s/%s", dir, name);
    return p;
}

static int file_exists(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

// Opens the shards an index file's "weight_map" names (files in dir), each once, in order of
// first mention.
static void open_index(SafetensorsSet *s, const char *dir, const char *index) {
    char *text = read_file_all(index, NULL);
    cJSON *root = cJSON_Parse(text);
    if (root == NULL) fatal("%s: not valid JSON", index);
    const cJSON *map = cJSON_GetObjectItemCaseSensitive(root, "weight_map");
    if (!cJSON_IsObject(map)) fatal("%s: no \"weight_map\" object", index);
    int cap = cJSON_GetArraySize(map);
    char **names = (char **)callocCheck(cap ? cap : 1, sizeof(char *));
    const cJSON *item;
    cJSON_ArrayForEach(item, map) {
        if (!cJSON_IsString(item)) fatal("%s: weight_map[%s] is not a file name", index, item->string);
        if (strchr(item->valuestring, '/') != NULL || strcmp(item->valuestring, "..") == 0)
            fatal("%s: weight_map[%s] = %s is not a file in the directory", index, item->string, item->valuestring);
        int seen = 0;
        for (int i = 0; i < s->n_files; i++) if (strcmp(names[i], item->valuestring) == 0) seen = 1;
        if (!seen) names[s->n_files++] = item->valuestring;
    }
    s->files = (SafetensorsFile **)callocCheck(s->n_files ? s->n_files : 1, sizeof(SafetensorsFile *));
    for (int i = 0; i < s->n_files; i++) {
        char *shard = path_join(dir, names[i]);
        s->files[i] = safetensors_open(shard);
        free(shard);
    }
    free(names);
    cJSON_Delete(root);
    free(text);
}

SafetensorsSet *safetensors_open_set(const char *path) {
    SafetensorsSet *s = (SafetensorsSet *)callocCheck(1, sizeof(SafetensorsSet));
    struct stat st;
    if (stat(path, &st) != 0) fatal("cannot open %s: %s", path, strerror(errno));
    size_t len = strlen(path);
    if (!S_ISDIR(st.st_mode) && len >= 11 && strcmp(path + len - 11, ".index.json") == 0) {
        // the index file itself: its shards lie beside it
        char *dir = xstrdup(path);
        char *slash = strrchr(dir, '/');
        if (slash) *slash = '\0'; else { free(dir); dir = xstrdup("."); }
        open_index(s, dir, path);
        free(dir);
        return s;
    }
    if (!S_ISDIR(st.st_mode)) {
        s->n_files = 1;
        s->files = (SafetensorsFile **)mallocCheck(sizeof(SafetensorsFile *));
        s->files[0] = safetensors_open(path);
        return s;
    }
    char *single = path_join(path, "model.safetensors");
    char *index = path_join(path, "model.safetensors.index.json");
    if (file_exists(single)) {
        s->n_files = 1;
        s->files = (SafetensorsFile **)mallocCheck(sizeof(SafetensorsFile *));
        s->files[0] = safetensors_open(single);
    } else if (file_exists(index)) {
        open_index(s, path, index);
    } else {
        fatal("%s: directory has neither model.safetensors nor model.safetensors.index.json", path);
    }
    free(single);
    free(index);
    return s;
}

void safetensors_close_set(SafetensorsSet *s) {
    if (s == NULL) return;
    for (int i = 0; i < s->n_files; i++) safetensors_close(s->files[i]);
    free(s->files);
    free(s);
}

const SafetensorsTensor *safetensors_set_find(const SafetensorsSet *s, const char *name, const SafetensorsFile **file) {
    for (int i = 0; i < s->n_files; i++) {
        const SafetensorsTensor *t = safetensors_find(s->files[i], name);
        if (t) { if (file) *file = s->files[i]; return t; }
    }
    return NULL;
}

// Writes the header (padded with spaces to a multiple of 8, as the reference writer does) and
// then each tensor's floats, transposing those marked transpose_2d.
// The bfloat16 nearest to x (ties to even), as its bits; a NaN stays a (quiet) NaN.
static uint16_t bf16_bits_of(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

// Appends n floats to fp, as they are or as bfloat16.
static void write_values(FILE *fp, const float *x, size_t n, int bf16, const char *tmp_path) {
    if (!bf16) { fwrite_check(x, sizeof(float), n, fp, tmp_path); return; }
    uint16_t chunk[4096];
    for (size_t i = 0; i < n; i += 4096) {
        size_t m = n - i < 4096 ? n - i : 4096;
        for (size_t k = 0; k < m; k++) chunk[k] = bf16_bits_of(x[i + k]);
        fwrite_check(chunk, sizeof(uint16_t), m, fp, tmp_path);
    }
}

void safetensors_write(const char *path, const SafetensorsWriteTensor *tensors, int n, int bf16) {
    const uint64_t elem = bf16 ? 2 : 4;
    cJSON *root = cJSON_CreateObject();
    cJSON *meta = cJSON_AddObjectToObject(root, "__metadata__");
    cJSON_AddStringToObject(meta, "format", "pt");
    uint64_t offset = 0;
    for (int i = 0; i < n; i++) {
        const SafetensorsWriteTensor *t = &tensors[i];
        uint64_t numel = 1;
        cJSON *entry = cJSON_AddObjectToObject(root, t->name);
        cJSON_AddStringToObject(entry, "dtype", bf16 ? "BF16" : "F32");
        cJSON *shape = cJSON_AddArrayToObject(entry, "shape");
        for (int d = 0; d < t->n_dims; d++) {
            cJSON_AddItemToArray(shape, cJSON_CreateNumber((double)t->shape[d]));
            numel *= (uint64_t)t->shape[d];
        }
        cJSON *offs = cJSON_AddArrayToObject(entry, "data_offsets");
        cJSON_AddItemToArray(offs, cJSON_CreateNumber((double)offset));
        cJSON_AddItemToArray(offs, cJSON_CreateNumber((double)(offset + numel * elem)));
        offset += numel * elem;
        if (t->transpose_2d && t->n_dims != 2) fatal("safetensors_write: %s: transpose needs 2 dims", t->name);
    }
    char *header = cJSON_PrintUnformatted(root);
    if (header == NULL) fatal("%s: cannot build the safetensors header", path);
    size_t len = strlen(header);
    size_t padded = (len + 7) / 8 * 8;

    char tmp_path[4200];
    FILE *fp = atomic_open(path, tmp_path, sizeof(tmp_path));
    uint64_t header_len = padded;
    fwrite_check(&header_len, 8, 1, fp, tmp_path);
    fwrite_check(header, 1, len, fp, tmp_path);
    for (size_t i = len; i < padded; i++) fputc(' ', fp);
    for (int i = 0; i < n; i++) {
        const SafetensorsWriteTensor *t = &tensors[i];
        uint64_t numel = 1;
        for (int d = 0; d < t->n_dims; d++) numel *= (uint64_t)t->shape[d];
        if (!t->transpose_2d) { write_values(fp, t->data, numel, bf16, tmp_path); continue; }
        // data is (cols, rows): output row r is column r of the source
        int64_t rows = t->shape[0], cols = t->shape[1];
        float *row = (float *)mallocCheck((size_t)cols * sizeof(float));
        for (int64_t r = 0; r < rows; r++) {
            for (int64_t c = 0; c < cols; c++) row[c] = t->data[c * rows + r];
            write_values(fp, row, (size_t)cols, bf16, tmp_path);
        }
        free(row);
    }
    atomic_commit(fp, tmp_path, path);
    free(header);
    cJSON_Delete(root);
}
