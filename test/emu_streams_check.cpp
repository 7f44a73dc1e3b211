/*
 * The emulated runtime's streams (test/emu_cuda/cuda_runtime.h) on small programs with and
 * without the waits they need, so that test/test_model_cuda_emu.py knows EMU_STREAMS=lazy catches
 * a missing wait before it trusts it with the engine. One line per case: the case's name and
 * what the host read, "ok" (the value the program means) or "wrong" (NaN or stale).
 *
 *   cross-stream wait      a kernel on stream B reads what a kernel on stream A wrote, after
 *                          B waits on an event A recorded;
 *   cross-stream no wait   the same without the wait;
 *   event sync             the host reads pinned memory a stream's copy filled, after
 *                          cudaEventSynchronize on an event recorded after the copy;
 *   event sync missing     the same without it;
 *   legacy copy            cudaMemcpy (the legacy stream) reads what a kernel on a blocking
 *                          stream wrote (the legacy stream waits for it);
 *   legacy copy nonblocking the same with a cudaStreamNonBlocking stream (it does not);
 *   graph                  a captured kernel, launched as a graph, then the stream synchronised;
 *   pageable source        cudaMemcpyAsync from a host vector changed right after the call.
 */
#define EMU_PROGRAM "emu_streams_check"
#include <cuda_runtime.h>
#include <math.h>
#include <stdio.h>
#include <vector>

static void report(const char *name, bool ok) { printf("%s: %s\n", name, ok ? "ok" : "wrong"); }

// one block of one thread: *dst = *src + add
static void add_kernel(cudaStream_t s, float *dst, const float *src, float add) {
    emu_launch(dim3(1), dim3(1), 0, s, [=] { *dst = *src + add; });
}

int main() {
    cudaStream_t a, b, blocking;
    cudaStreamCreateWithFlags(&a, cudaStreamNonBlocking);
    cudaStreamCreateWithFlags(&b, cudaStreamNonBlocking);
    cudaStreamCreate(&blocking);
    cudaEvent_t ev;
    cudaEventCreateWithFlags(&ev, cudaEventDisableTiming);
    float *x, *y, *pinned;
    cudaMalloc(&x, 4 * sizeof(float));
    cudaMalloc(&y, 4 * sizeof(float));
    cudaMallocHost(&pinned, 4 * sizeof(float));
    float one = 1.0f, host = 0.0f;

    for (int wait = 1; wait >= 0; wait--) {
        cudaMemcpy(x, &one, sizeof(float), cudaMemcpyHostToDevice);   // x[0] = 1
        cudaMemset(x + 1, 0xff, sizeof(float));                        // x[1] = NaN
        cudaMemset(y, 0xff, 4 * sizeof(float));                        // y = NaN
        add_kernel(a, x + 1, x, 1.0f);                                   // x[1] = 2 on A
        cudaEventRecord(ev, a);
        if (wait) cudaStreamWaitEvent(b, ev, 0);
        add_kernel(b, y, x + 1, 1.0f);                                   // y[0] = x[1] + 1 on B
        cudaStreamSynchronize(b);
        cudaMemcpyAsync(&host, y, sizeof(float), cudaMemcpyDeviceToHost, b);   // pageable: complete on return
        report(wait ? "cross-stream wait" : "cross-stream no wait", host == 3.0f);
        cudaDeviceSynchronize();
    }
    for (int sync = 1; sync >= 0; sync--) {
        pinned[0] = 0.0f;
        add_kernel(a, x + 2, x, 4.0f);                                   // x[2] = 5
        cudaMemcpyAsync(pinned, x + 2, sizeof(float), cudaMemcpyDeviceToHost, a);
        cudaEventRecord(ev, a);
        if (sync) cudaEventSynchronize(ev);
        report(sync ? "event sync" : "event sync missing", pinned[0] == 5.0f);
        cudaDeviceSynchronize();
    }
    for (int nonblocking = 0; nonblocking <= 1; nonblocking++) {
        cudaStream_t s = nonblocking ? a : blocking;
        cudaMemset(y, 0xff, 4 * sizeof(float));
        add_kernel(s, y + 1, x, 6.0f);                                   // y[1] = 7
        cudaMemcpy(&host, y + 1, sizeof(float), cudaMemcpyDeviceToHost);
        report(nonblocking ? "legacy copy nonblocking" : "legacy copy", host == 7.0f);
        cudaDeviceSynchronize();
    }
    {
        cudaGraph_t graph;
        cudaGraphExec_t exec;
        cudaStreamBeginCapture(a, cudaStreamCaptureModeGlobal);
        add_kernel(a, y + 2, x, 9.0f);                                   // y[2] = 10
        cudaStreamEndCapture(a, &graph);
        cudaGraphInstantiate(&exec, graph, 0);
        cudaMemset(y, 0xff, 4 * sizeof(float));
        cudaGraphLaunch(exec, a);
        cudaStreamSynchronize(a);
        cudaMemcpy(&host, y + 2, sizeof(float), cudaMemcpyDeviceToHost);
        report("graph", host == 10.0f);
        cudaGraphExecDestroy(exec);
        cudaGraphDestroy(graph);
    }
    {
        std::vector<float> src(1, 11.0f);
        cudaMemcpyAsync(y + 3, src.data(), sizeof(float), cudaMemcpyHostToDevice, a);
        src[0] = -1.0f;   // allowed: a copy from pageable memory has read it
        cudaStreamSynchronize(a);
        cudaMemcpy(&host, y + 3, sizeof(float), cudaMemcpyDeviceToHost);
        report("pageable source", host == 11.0f);
    }
    cudaFree(x);
    cudaFree(y);
    cudaFreeHost(pinned);
    cudaEventDestroy(ev);
    cudaStreamDestroy(a);
    cudaStreamDestroy(b);
    cudaStreamDestroy(blocking);
    return 0;
}
