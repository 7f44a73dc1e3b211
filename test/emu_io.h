/*
 * Reading the input files of the emulated kernel tests: the Python side writes arrays of int32 and
 * float32 one after the other; the C++ side reads them back in the same order.
 */
#ifndef EMU_IO_H
#define EMU_IO_H
#include <stdio.h>
#include <stdlib.h>
#include <vector>

// n values of type T read from f (the emulator's input file `path`); exits when the file is short.
template <typename T> static std::vector<T> read_n(FILE *f, size_t n, const char *path) {
    std::vector<T> x(n);
    if (fread(x.data(), sizeof(T), n, f) != n) {
        fprintf(stderr, "error: %s: file ends before its arrays do\n", path);
        exit(1);
    }
    return x;
}
#endif
