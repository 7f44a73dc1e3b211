#include "utils.h"
#include <time.h>
#include <unistd.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>

FILE *atomic_open(const char *path, char *tmp_path, size_t tmp_path_size) {
    int n = snprintf(tmp_path, tmp_path_size, "%s.tmp.%d", path, (int)getpid());
    if (n < 0 || (size_t)n >= tmp_path_size) fatal("path too long: %s", path);
    FILE *f = fopen(tmp_path, "wb");
    if (f == NULL) fatal("cannot write %s: %s", tmp_path, strerror(errno));
    return f;
}

void atomic_commit(FILE *f, const char *tmp_path, const char *path) {
    if (fflush(f) != 0 || ferror(f)) { fclose(f); remove(tmp_path); fatal("%s: write failed: %s", path, strerror(errno)); }
    if (fsync(fileno(f)) != 0 && errno != EINVAL) { fclose(f); remove(tmp_path); fatal("%s: fsync failed: %s", path, strerror(errno)); }
    if (fclose(f) != 0) { remove(tmp_path); fatal("%s: close failed: %s", path, strerror(errno)); }
    if (rename(tmp_path, path) != 0) { remove(tmp_path); fatal("cannot rename %s to %s: %s", tmp_path, path, strerror(errno)); }
}

char *read_file_all(const char *path, size_t *size_out) {
    FILE *f = fopen_check(path, "rb");
    struct stat st;
    if (fstat(fileno(f), &st) != 0) fatal("cannot stat %s: %s", path, strerror(errno));
    // fopen succeeds on a directory on Linux, and its size means nothing
    if (S_ISDIR(st.st_mode)) fatal("%s is a directory, not a file", path);
    // A regular file's size is known: one allocation, with a spare byte so that the read that
    // meets the end of the file needs no growth. A pipe or FIFO (--data <(cat f)) has no size and
    // cannot seek: it is read until its end into a buffer that doubles.
    size_t cap = S_ISREG(st.st_mode) ? (size_t)st.st_size + 2 : 65536;
    char *buf = (char *)mallocCheck(cap);
    size_t size = 0;
    for (;;) {
        if (size + 1 == cap) {
            cap *= 2;
            buf = (char *)reallocCheck(buf, cap);
        }
        size_t got = fread(buf + size, 1, cap - 1 - size, f);
        size += got;
        if (got == 0) {
            if (ferror(f)) fatal("cannot read %s: %s", path, strerror(errno));
            break;
        }
    }
    buf[size] = '\0';
    fclose(f);
    if (size_out) *size_out = size;
    return buf;
}

double wall_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

char fatal_where[128];

void fatal_where_set(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(fatal_where, sizeof fatal_where, fmt, ap);
    va_end(ap);
}

static char device_memory_hint_text[512];

void device_memory_hint_set(const char *hint) {
    snprintf(device_memory_hint_text, sizeof device_memory_hint_text, "%s", hint ? hint : "");
}

const char *device_memory_hint(void) { return device_memory_hint_text; }

unsigned char *map_file_readonly(const char *path, uint64_t *size_out, uint64_t min_size, const char *what) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) fatal("cannot open %s: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) fatal("cannot stat %s: %s", path, strerror(errno));
    if (!S_ISREG(st.st_mode)) fatal("%s: not a regular file", path);
    uint64_t size = (uint64_t)st.st_size;
    if (size < min_size) fatal("%s: truncated file (%llu bytes, no %s header)", path, (unsigned long long)size, what);
    unsigned char *map = (unsigned char *)mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (map == MAP_FAILED) fatal("cannot mmap %s: %s", path, strerror(errno));
    *size_out = size;
    return map;
}
