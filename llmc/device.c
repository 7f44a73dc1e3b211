/*
 * The --device flag (see device.h).
 */
#include <stdio.h>
#include <string.h>
#include <omp.h>
#include "device.h"
#include "utils.h"
#include <stdlib.h>
#ifdef USE_CUDA
#include "model_cuda.h"
#include "comm_nccl.h"
#endif

// The same words and messages as pretrain's --device.
int device_resolve(const char *device) {
    if (strcmp(device, "cpu") && strcmp(device, "cuda") && strcmp(device, "auto"))
        fatal("--device %s: expected cpu, cuda or auto", device);
    int gpus = 0;
#ifdef USE_CUDA
    if (strcmp(device, "cpu")) gpus = cuda_device_count();
#endif
    if (!strcmp(device, "cuda") && gpus == 0) {
#ifdef USE_CUDA
        fatal("--device cuda: no CUDA GPU is visible (driver missing or no device); use --device cpu");
#else
        fatal("--device cuda: this build of train_mora has no CUDA backend (nvcc was not found at build time); use --device cpu");
#endif
    }
    return gpus > 0;
}

void device_describe(int use_gpu, char *buf, size_t size) {
#ifdef USE_CUDA
    if (use_gpu) {
        char desc[256];
        cuda_device_describe(desc, sizeof desc);
        snprintf(buf, size, "cuda (%s)", desc);
        return;
    }
#endif
    snprintf(buf, size, "cpu (%d OpenMP threads)", omp_get_max_threads());
}

void device_print(int use_gpu) {
    char desc[320];
    device_describe(use_gpu, desc, sizeof desc);
    printf("device: %s\n", desc);
}

int device_data_parallel_init(int use_gpu, int world, int zero) {
    const char *v = getenv("TRAIN_MORA_NCCL");
    int forced = !(v == NULL || v[0] == '\0' || !strcmp(v, "0"));
    if (forced && strcmp(v, "1")) fatal("TRAIN_MORA_NCCL=%s: expected 0 or 1", v);
    int nccl = use_gpu && (world > 1 || zero == 1 || forced);
#ifdef USE_CUDA
    if (nccl) {
        if (!comm_nccl_available())
            fatal("--device cuda with %s: this build has no NCCL (nccl.h was not found when llmc/comm_nccl.cu was "
                  "compiled); install NCCL and rebuild, or run on one GPU with one rank and --zero 0",
                  world > 1 ? "several ranks" : zero == 1 ? "--zero 1" : "TRAIN_MORA_NCCL=1");
        comm_nccl_init();
    }
#endif
    return nccl;
}

void device_select_rank_gpu(int use_gpu) {
#ifdef USE_CUDA
    if (use_gpu) comm_nccl_select_gpu();
#else
    (void)use_gpu;
#endif
}
