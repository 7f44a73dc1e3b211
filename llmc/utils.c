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
    if (fseek(f, 0, SEEK_END) != 0) fatal("%s: cannot seek", path);
    long size = ftell(f);
    if (size < 0) fatal("%s: cannot tell size", path);
    rewind(f);
    char *buf = (char *)mallocCheck((size_t)size + 1);
    fread_check(buf, 1, (size_t)size, f, path, "contents");
    buf[size] = '\0';
    fclose(f);
    if (size_out) *size_out = (size_t)size;
    return buf;
}

double wall_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
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
