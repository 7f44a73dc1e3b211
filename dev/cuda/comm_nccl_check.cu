/*
 * comm_nccl_check: the NCCL collectives of llmc/comm_nccl.h on GPU buffers, each result compared
 * with its closed form (as test/tools/comm_check.c does for the host collectives). One rank per
 * GPU; with one GPU it runs as a single rank (dev/gpu_check.sh), with more under mpirun.
 *
 *   make                      # build/llmc/comm.o (with MPI when mpicc is found)
 *   nvcc -O2 -std=c++17 -Illmc -I. -o build/cuda/comm_nccl_check dev/cuda/comm_nccl_check.cu \
 *        llmc/comm_nccl.cu build/llmc/comm.o build/llmc/utils.o -lnccl $(mpicc --showme:link)
 *   ./build/cuda/comm_nccl_check                 # 1 rank
 *   mpirun -np 8 ./build/cuda/comm_nccl_check    # one node, 8 GPUs
 *
 * Exits non-zero on a mismatch; a failing NCCL/CUDA call names itself and fails every rank.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <vector>
#include <cuda_runtime.h>
#include "comm.h"
#include "comm_nccl.h"

static int failures = 0;

static void check(bool ok, const char *what) {
    double bad = ok ? 0.0 : 1.0;
    comm_all_reduce_sum_double(&bad, 1);   // a failure on any rank fails the check
    if (comm_rank() == 0) printf("%-52s %s\n", what, bad == 0.0 ? "ok" : "FAILED");
    if (bad != 0.0) failures++;
}

static void cuda_ok(cudaError_t e, const char *what) {
    if (e != cudaSuccess) { fprintf(stderr, "error: %s failed: %s\n", what, cudaGetErrorString(e)); exit(1); }
}

int main(int argc, char **argv) {
    comm_init(&argc, &argv);
    if (!comm_nccl_available()) { fprintf(stderr, "error: built without NCCL\n"); return 1; }
    comm_nccl_init();
    const int rank = comm_rank(), W = comm_world();
    if (rank == 0) printf("comm_nccl_check: %d rank(s)\n", W);
    const size_t n = (1 << 20) + 3;   // not a multiple of anything NCCL chunks by
    std::vector<float> host(n);
    float *dev = NULL;
    cuda_ok(cudaMalloc(&dev, n * sizeof(float)), "cudaMalloc");
    cudaStream_t stream;
    cuda_ok(cudaStreamCreate(&stream), "cudaStreamCreate");

    // x_r[i] = (r + 1) * (i % 1024) / 2: exact in float, and so is the sum over ranks
    for (size_t i = 0; i < n; i++) host[i] = (float)(rank + 1) * (float)(i % 1024) * 0.5f;
    cuda_ok(cudaMemcpy(dev, host.data(), n * sizeof(float), cudaMemcpyHostToDevice), "cudaMemcpy");
    comm_nccl_all_reduce_sum(dev, n, stream);
    cuda_ok(cudaMemcpyAsync(host.data(), dev, n * sizeof(float), cudaMemcpyDeviceToHost, stream), "cudaMemcpyAsync");
    cuda_ok(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
    bool ok = true;
    for (size_t i = 0; i < n; i++) ok &= host[i] == (float)((i % 1024) * 0.5 * W * (W + 1) / 2.0);
    check(ok, "all_reduce_sum of (r+1)*(i%1024)/2");

    // the double sum keeps what float would round away: 1 + (r + 1) 2^-40
    {
        double *dd = NULL, hd = 1.0 + (double)(rank + 1) * ldexp(1.0, -40);
        cuda_ok(cudaMalloc(&dd, sizeof(double)), "cudaMalloc");
        cuda_ok(cudaMemcpy(dd, &hd, sizeof(double), cudaMemcpyHostToDevice), "cudaMemcpy");
        comm_nccl_all_reduce_sum_double(dd, 1, stream);
        cuda_ok(cudaMemcpyAsync(&hd, dd, sizeof(double), cudaMemcpyDeviceToHost, stream), "cudaMemcpyAsync");
        cuda_ok(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
        check(hd == (double)W + ldexp(1.0, -40) * W * (W + 1) / 2.0, "all_reduce_sum_double of 1 + (r+1)*2^-40");
        cudaFree(dd);
    }

    for (size_t i = 0; i < n; i++) host[i] = (float)(rank + 1) * (float)(i % 1024);
    cuda_ok(cudaMemcpy(dev, host.data(), n * sizeof(float), cudaMemcpyHostToDevice), "cudaMemcpy");
    comm_nccl_all_reduce_mean(dev, n, stream);
    cuda_ok(cudaMemcpyAsync(host.data(), dev, n * sizeof(float), cudaMemcpyDeviceToHost, stream), "cudaMemcpyAsync");
    cuda_ok(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
    ok = true;
    for (size_t i = 0; i < n; i++) ok &= fabsf(host[i] - (float)((i % 1024) * (W + 1) / 2.0)) <= 1e-6f * (float)(i % 1024 + 1);
    check(ok, "all_reduce_mean of (r+1)*(i%1024)");

    for (size_t i = 0; i < n; i++) host[i] = (float)(rank * 1000 + (int)(i % 997));
    cuda_ok(cudaMemcpy(dev, host.data(), n * sizeof(float), cudaMemcpyHostToDevice), "cudaMemcpy");
    comm_nccl_broadcast(dev, n * sizeof(float), W - 1, stream);
    cuda_ok(cudaMemcpyAsync(host.data(), dev, n * sizeof(float), cudaMemcpyDeviceToHost, stream), "cudaMemcpyAsync");
    cuda_ok(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
    ok = true;
    for (size_t i = 0; i < n; i++) ok &= host[i] == (float)((W - 1) * 1000 + (int)(i % 997));
    check(ok, "broadcast from the last rank");

    size_t lo, hi;
    comm_shard_range(n, rank, W, &lo, &hi);
    for (size_t i = 0; i < n; i++) host[i] = (i >= lo && i < hi) ? (float)(i % 4096) : -1.0f;
    cuda_ok(cudaMemcpy(dev, host.data(), n * sizeof(float), cudaMemcpyHostToDevice), "cudaMemcpy");
    comm_nccl_all_gather_shards(dev, n, stream);
    cuda_ok(cudaMemcpyAsync(host.data(), dev, n * sizeof(float), cudaMemcpyDeviceToHost, stream), "cudaMemcpyAsync");
    cuda_ok(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
    ok = true;
    for (size_t i = 0; i < n; i++) ok &= host[i] == (float)(i % 4096);
    check(ok, "all_gather_shards in place");

    // reduce-scatter (ZeRO-1's gradient reduction): the mean on this rank's shard, and this
    // rank's own values everywhere else
    for (size_t i = 0; i < n; i++) host[i] = (float)(rank + 1) * (float)(i % 1024);
    cuda_ok(cudaMemcpy(dev, host.data(), n * sizeof(float), cudaMemcpyHostToDevice), "cudaMemcpy");
    comm_nccl_reduce_scatter_mean_shards(dev, n, stream);
    cuda_ok(cudaMemcpyAsync(host.data(), dev, n * sizeof(float), cudaMemcpyDeviceToHost, stream), "cudaMemcpyAsync");
    cuda_ok(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
    ok = true;
    for (size_t i = 0; i < n; i++) {
        float want = (i >= lo && i < hi) ? (float)((i % 1024) * (W + 1) / 2.0) : (float)(rank + 1) * (float)(i % 1024);
        ok &= fabsf(host[i] - want) <= 1e-6f * (float)(i % 1024 + 1);
    }
    check(ok, "reduce_scatter_mean_shards in place");

    cuda_ok(cudaFree(dev), "cudaFree");
    cuda_ok(cudaStreamDestroy(stream), "cudaStreamDestroy");
    comm_nccl_finalize();
    if (rank == 0) printf("%s\n", failures ? "comm_nccl_check: FAILED" : "comm_nccl_check: all NCCL collectives match");
    comm_finalize();
    return failures ? 1 : 0;
}
