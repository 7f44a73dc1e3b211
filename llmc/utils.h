/*
 * Small helpers used everywhere: checked allocation and file I/O, and fatal errors that say
 * what went wrong and where. Every error path in train_mora ends in `fatal`, which prints one
 * line to stderr and exits with status 1: users see a message, never a crash.
 */
#ifndef LLMC_UTILS_H
#define LLMC_UTILS_H

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <errno.h>

// Where this process stands in a run of several ranks, "rank 1/2 (node07)", for fatal() to say
// which rank and machine an error comes from; empty (the default) on one rank. comm_init sets
// it (llmc/comm.c), so this file knows nothing of MPI. Defined in utils.c; declared weak so that
// a program that includes this header without linking utils.o still links (the address is then
// NULL and fatal() names no rank).
extern char fatal_where[] __attribute__((weak));
// Sets fatal_where from a printf-style format ("" clears it).
void fatal_where_set(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

// printf-style message to stderr prefixed with "error: " (and, on a rank of several, with
// "rank r/W (host): "), then exit(1).
static inline void fatal(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));
static inline void fatal(const char *fmt, ...) {
    // the line is written at once, so that the lines of ranks failing together do not interleave
    char line[8192];
    int n = 0;
    if (fatal_where != NULL && fatal_where[0] != '\0') n = snprintf(line, sizeof line, "error: %s: ", fatal_where);
    else n = snprintf(line, sizeof line, "error: ");
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line + n, sizeof line - (size_t)n - 1, fmt, ap);
    va_end(ap);
    strcat(line, "\n");
    fputs(line, stderr);
    fflush(stderr);
    exit(1);
}

static inline void *malloc_check_(size_t size, const char *file, int line) {
    void *p = malloc(size ? size : 1);
    if (p == NULL) fatal("out of memory allocating %zu bytes (%s:%d)", size, file, line);
    return p;
}
static inline void *calloc_check_(size_t n, size_t size, const char *file, int line) {
    void *p = calloc(n ? n : 1, size ? size : 1);
    if (p == NULL) fatal("out of memory allocating %zu x %zu bytes (%s:%d)", n, size, file, line);
    return p;
}
static inline void *realloc_check_(void *old, size_t size, const char *file, int line) {
    void *p = realloc(old, size ? size : 1);
    if (p == NULL) fatal("out of memory reallocating %zu bytes (%s:%d)", size, file, line);
    return p;
}
// The double with the fewest decimal digits that rounds to f: JSON written from a float flag then
// reads 0.0003, not 0.00030000001424923539 (a non-finite f is returned as it is).
static inline double float_shortest(float f) {
    char buf[32];
    for (int digits = 1; digits <= 9; digits++) {
        snprintf(buf, sizeof buf, "%.*g", digits, (double)f);
        double d = strtod(buf, NULL);
        if ((float)d == f) return d;
    }
    return (double)f;
}

// strdup that stops the program when memory runs out
static inline char *xstrdup(const char *s) {
    size_t n = strlen(s);
    char *d = (char *)malloc_check_(n + 1, __FILE__, __LINE__);
    memcpy(d, s, n + 1);
    return d;
}
#define mallocCheck(size) malloc_check_((size), __FILE__, __LINE__)
#define callocCheck(n, size) calloc_check_((n), (size), __FILE__, __LINE__)
#define reallocCheck(p, size) realloc_check_((p), (size), __FILE__, __LINE__)

// fopen that exits with "cannot open PATH: reason".
static inline FILE *fopen_check(const char *path, const char *mode) {
    FILE *f = fopen(path, mode);
    if (f == NULL) fatal("cannot open %s: %s", path, strerror(errno));
    return f;
}
// fread of exactly n items, else "PATH: truncated file (WHAT)".
static inline void fread_check(void *dst, size_t size, size_t n, FILE *f, const char *path, const char *what) {
    if (n == 0) return;
    if (fread(dst, size, n, f) != n) fatal("%s: truncated file (reading %s)", path, what);
}
static inline void fwrite_check(const void *src, size_t size, size_t n, FILE *f, const char *path) {
    if (n == 0) return;
    if (fwrite(src, size, n, f) != n) fatal("%s: write failed: %s", path, strerror(errno));
}

// Atomic file writes: write to "PATH.tmp.PID", then rename over PATH, so a reader never sees a
// half-written file. atomic_open returns the FILE* and fills tmp_path (size >= strlen(path)+32).
FILE *atomic_open(const char *path, char *tmp_path, size_t tmp_path_size);
void atomic_commit(FILE *f, const char *tmp_path, const char *path);

// Reads a whole file into a NUL-terminated malloc'd buffer; *size_out (may be NULL) gets the size.
// A pipe or FIFO is read to its end; a directory is an error "PATH is a directory, not a file".
char *read_file_all(const char *path, size_t *size_out);

// Maps a whole regular file read-only (*size gets its size); exits with "cannot open PATH: ..."
// or "PATH: not a regular file" on failure, and with "PATH: truncated file (... no WHAT header)"
// when it is shorter than min_size. Release with munmap(map, size).
unsigned char *map_file_readonly(const char *path, uint64_t *size, uint64_t min_size, const char *what);

// Wall-clock seconds (monotonic).
double wall_seconds(void);

// What sizes the program's GPU buffers, in the words of its flags ("--batch_size (B) and
// --seq_len (T)"), for the message with which a CUDA model's or the rollout engine's creation
// stops when the device has no room for it (cuda_malloc_sized in cuda_common.h). NULL or "":
// none named.
void device_memory_hint_set(const char *hint);
const char *device_memory_hint(void);

#endif
