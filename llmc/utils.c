#include "utils.h"
#include <time.h>
#include <unistd.h>

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
