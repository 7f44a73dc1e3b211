/*
 * The emulated launches' block order and shared memory limits (test/gpu_emu.h), on the kernels of
 * test/emu_launch_kernels.cuh, so that test/test_model_cuda_emu.py knows what EMU_BLOCKS and the
 * limits do before it trusts them with the engine. One case a run (the first argument):
 *   order           launches a 4 x 3 x 2 grid whose blocks record the order they ran in and prints
 *                   it ("order: i0 i1 ..."): EMU_BLOCKS decides it;
 *   static40+dyn8   40 KiB of static and 8 KiB of dynamic shared memory: 48 KiB, which a block
 *                   may take without raising the kernel's limit; prints "ok";
 *   static40+dyn16  40 + 16 KiB without the limit raised: refused (a message, a non-zero exit);
 *   raised          the same with cudaFuncAttributeMaxDynamicSharedMemorySize set to 16 KiB: "ok";
 *   raised-short    the limit set to 8 KiB and 16 KiB asked for: refused;
 *   past-optin      the limit set to 190 KiB and 190 KiB asked for: with the 40 KiB of static
 *                   arrays, more than a block may ever take: refused;
 *   raised-late     40 + 16 KiB launched, then the limit raised to 16 KiB before the launch has
 *                   run (with EMU_STREAMS=lazy it runs at the stream's synchronisation after):
 *                   refused, as a GPU refuses the launch when it is issued.
 * static_40k runs on a non-blocking stream of its own.
 * Accesses a GPU would fault on or read garbage from, reported when the program is built with
 * -fsanitize=address,undefined (EMU_SANITIZE; without it they run unnoticed); each case has a
 * twin that stays in bounds and prints "ok":
 *   past-end / in-bounds              a kernel reads one float past a 63-float device buffer;
 *   misaligned / aligned              a kernel loads a float4 from 4 bytes (16) past a buffer's start;
 *   shared-past-end / shared-in-bounds  a kernel writes one float past its dynamic shared memory.
 * The program's own includer of the kernels, emu_launch_kernels_launched.cuh, is the rewritten
 * header the test writes.
 */
#define EMU_PROGRAM "emu_launch_check"
#include <cuda_runtime.h>
#include <stdio.h>
#include <string.h>
#include "emu_launch_kernels_launched.cuh"

static int raise_limit(int limit) {
    if (cudaFuncSetAttribute(static_40k, cudaFuncAttributeMaxDynamicSharedMemorySize, limit) == cudaSuccess) return 0;
    fprintf(stderr, "emu_launch_check: the attribute was refused\n");
    return 1;
}
// static_40k with dynamic_bytes; its limit raised to `limit` before the launch (>= 0) or after it
static int run_static_40k(size_t dynamic_bytes, int limit, bool raise_after = false) {
    if (limit >= 0 && !raise_after && raise_limit(limit)) return 1;
    float *out, host = 0.0f;
    cudaMalloc((void **)&out, sizeof(float));
    cudaStream_t stream;
    cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
    launch_static_40k(out, dynamic_bytes, stream);
    if (limit >= 0 && raise_after && raise_limit(limit)) return 1;
    cudaStreamSynchronize(stream);
    cudaMemcpy(&host, out, sizeof(float), cudaMemcpyDeviceToHost);
    if (host != (dynamic_bytes > 0 ? 3.0f : 1.0f)) {
        fprintf(stderr, "emu_launch_check: static_40k wrote %g\n", host);
        return 1;
    }
    printf("ok\n");
    return 0;
}

int main(int argc, char **argv) {
    const char *c = argc == 2 ? argv[1] : "";
    if (strcmp(c, "order") == 0) {
        const int blocks = 24;
        int *order, *count, host[blocks];
        cudaMalloc((void **)&order, blocks * sizeof(int));
        cudaMalloc((void **)&count, sizeof(int));
        cudaMemset(count, 0, sizeof(int));
        launch_record_block(dim3(4, 3, 2), order, count);
        cudaMemcpy(host, order, sizeof(host), cudaMemcpyDeviceToHost);
        printf("order:");
        for (int b = 0; b < blocks; b++) printf(" %d", host[b]);
        printf("\n");
        return 0;
    }
    if (strcmp(c, "past-end") == 0 || strcmp(c, "in-bounds") == 0) {
        const int n = 63;
        float host[n], *in, *out;
        for (int i = 0; i < n; i++) host[i] = (float)i;
        cudaMalloc((void **)&in, n * sizeof(float));
        cudaMalloc((void **)&out, n * sizeof(float));
        cudaMemcpy(in, host, sizeof(host), cudaMemcpyHostToDevice);
        int offset = strcmp(c, "past-end") == 0;
        launch_copy_shifted(out, in, n - 1 + offset, offset);
        cudaMemcpy(host, out, (n - 1) * sizeof(float), cudaMemcpyDeviceToHost);
        for (int i = 0; i < n - 1; i++)
            if (host[i] != (float)(i + offset)) return fprintf(stderr, "emu_launch_check: copy_shifted wrote %g\n", host[i]), 1;
        printf("ok\n");
        return 0;
    }
    if (strcmp(c, "misaligned") == 0 || strcmp(c, "aligned") == 0) {
        float host[8] = {0, 1, 2, 3, 4, 5, 6, 7}, *in, *out;
        cudaMalloc((void **)&in, sizeof(host));
        cudaMalloc((void **)&out, 4 * sizeof(float));
        cudaMemcpy(in, host, sizeof(host), cudaMemcpyHostToDevice);
        int offset = strcmp(c, "misaligned") == 0 ? 1 : 4;
        launch_load_float4(out, in, offset);
        cudaMemcpy(host, out, 4 * sizeof(float), cudaMemcpyDeviceToHost);
        for (int i = 0; i < 4; i++)
            if (host[i] != (float)(i + offset)) return fprintf(stderr, "emu_launch_check: load_float4 wrote %g\n", host[i]), 1;
        printf("ok\n");
        return 0;
    }
    if (strcmp(c, "shared-past-end") == 0 || strcmp(c, "shared-in-bounds") == 0) {
        float *out, host = 0.0f;
        cudaMalloc((void **)&out, sizeof(float));
        int offset = strcmp(c, "shared-past-end") == 0;
        launch_shared_shifted(out, 64, offset);
        cudaMemcpy(&host, out, sizeof(float), cudaMemcpyDeviceToHost);
        if (offset == 0 && host != 1.0f) return fprintf(stderr, "emu_launch_check: shared_shifted wrote %g\n", host), 1;
        printf("ok\n");
        return 0;
    }
    if (strcmp(c, "static40+dyn8") == 0) return run_static_40k(8 * 1024, -1);
    if (strcmp(c, "static40+dyn16") == 0) return run_static_40k(16 * 1024, -1);
    if (strcmp(c, "raised") == 0) return run_static_40k(16 * 1024, 16 * 1024);
    if (strcmp(c, "raised-short") == 0) return run_static_40k(16 * 1024, 8 * 1024);
    if (strcmp(c, "past-optin") == 0) return run_static_40k(190 * 1024, 190 * 1024);
    if (strcmp(c, "raised-late") == 0) return run_static_40k(16 * 1024, 16 * 1024, true);
    fprintf(stderr, "usage: emu_launch_check order|static40+dyn8|static40+dyn16|raised|raised-short|past-optin|raised-late|"
                    "past-end|in-bounds|misaligned|aligned|shared-past-end|shared-in-bounds\n");
    return 2;
}
