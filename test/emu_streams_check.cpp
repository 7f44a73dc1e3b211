/*
 * The emulated runtime's streams (test/emu_cuda/cuda_runtime.h) on small programs with and
 * without the waits they need, so that test/test_model_cuda_emu.py knows EMU_STREAMS=lazy and
 * shuffle catch a missing wait before it trusts them with the engine. One line per case: the
 * case's name and what the host read, "ok" (the value the program means in each of 32 tries) or
 * "wrong" (NaN or stale in at least one: EMU_STREAMS=shuffle picks its orders at random).
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
 *   pageable source        cudaMemcpyAsync from a host vector changed right after the call;
 *   older stream no wait   a kernel on stream A reads what a kernel on B (created after A)
 *                          wrote, without a wait, then the device synchronised;
 *   branches               a fork and a join: a kernel on A, one on B that waits for it and
 *                          reads what it wrote, another on A, and one on A after the join
 *                          that reads both;
 *   branch forked early    the same with B forked before A's kernel, which B's kernel reads;
 *   graph branches, graph branch no edge   the last two captured as a graph.
 * With the argument "unjoined": a capture whose second stream's kernel is not joined back, which
 * cudaStreamEndCapture must refuse (the program then exits with a message, not 0).
 */
#define EMU_PROGRAM "emu_streams_check"
#include <cuda_runtime.h>
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <vector>

static void report(const char *name, bool ok) { printf("%s: %s\n", name, ok ? "ok" : "wrong"); }

// one block of one thread: *dst = *src + add
static void add_kernel(cudaStream_t s, float *dst, const float *src, float add) {
    emu_launch(dim3(1), dim3(1), 0, s, [=] { *dst = *src + add; });
}

// Runs a case 32 times: "ok" when the host read the meant value every time.
template <typename Case> static void tries(const char *name, Case run) {
    bool ok = true;
    for (int t = 0; t < 32; t++) {
        ok = run() && ok;
        cudaDeviceSynchronize();
    }
    printf("%s: %s\n", name, ok ? "ok" : "wrong");
}

int main(int argc, char **argv) {
    cudaStream_t a, b, blocking;
    cudaStreamCreateWithFlags(&a, cudaStreamNonBlocking);
    cudaStreamCreateWithFlags(&b, cudaStreamNonBlocking);
    cudaStreamCreate(&blocking);
    cudaEvent_t ev, join;
    cudaEventCreateWithFlags(&ev, cudaEventDisableTiming);
    cudaEventCreateWithFlags(&join, cudaEventDisableTiming);
    float *x, *y, *pinned;
    cudaMalloc(&x, 4 * sizeof(float));
    cudaMalloc(&y, 4 * sizeof(float));
    cudaMallocHost(&pinned, 4 * sizeof(float));
    float one = 1.0f;
    cudaMemcpy(x, &one, sizeof(float), cudaMemcpyHostToDevice);   // x[0] = 1
    if (argc > 1 && strcmp(argv[1], "unjoined") == 0) {
        cudaGraph_t graph;
        cudaStreamBeginCapture(a, cudaStreamCaptureModeGlobal);
        cudaEventRecord(ev, a);
        cudaStreamWaitEvent(b, ev, 0);
        add_kernel(a, y, x, 1.0f);
        add_kernel(b, y + 1, x, 2.0f);   // never joined back to A
        cudaStreamEndCapture(a, &graph);
        printf("unjoined capture: accepted\n");
        return 0;
    }

    for (int wait = 1; wait >= 0; wait--)
        tries(wait ? "cross-stream wait" : "cross-stream no wait", [&] {
            float host = 0.0f;
            cudaMemset(x + 1, 0xff, sizeof(float));                    // x[1] = NaN
            cudaMemset(y, 0xff, 4 * sizeof(float));                    // y = NaN
            add_kernel(a, x + 1, x, 1.0f);                               // x[1] = 2 on A
            cudaEventRecord(ev, a);
            if (wait) cudaStreamWaitEvent(b, ev, 0);
            add_kernel(b, y, x + 1, 1.0f);                               // y[0] = x[1] + 1 on B
            cudaStreamSynchronize(b);
            cudaMemcpyAsync(&host, y, sizeof(float), cudaMemcpyDeviceToHost, b);   // pageable: complete on return
            return host == 3.0f;
        });
    for (int sync = 1; sync >= 0; sync--)
        tries(sync ? "event sync" : "event sync missing", [&] {
            pinned[0] = 0.0f;
            add_kernel(a, x + 2, x, 4.0f);                               // x[2] = 5
            cudaMemcpyAsync(pinned, x + 2, sizeof(float), cudaMemcpyDeviceToHost, a);
            cudaEventRecord(ev, a);
            if (sync) cudaEventSynchronize(ev);
            return pinned[0] == 5.0f;
        });
    for (int nonblocking = 0; nonblocking <= 1; nonblocking++)
        tries(nonblocking ? "legacy copy nonblocking" : "legacy copy", [&] {
            float host = 0.0f;
            cudaMemset(y, 0xff, 4 * sizeof(float));
            add_kernel(nonblocking ? a : blocking, y + 1, x, 6.0f);      // y[1] = 7
            cudaMemcpy(&host, y + 1, sizeof(float), cudaMemcpyDeviceToHost);
            return host == 7.0f;
        });
    {
        cudaGraph_t graph;
        cudaGraphExec_t exec;
        cudaStreamBeginCapture(a, cudaStreamCaptureModeGlobal);
        add_kernel(a, y + 2, x, 9.0f);                                   // y[2] = 10
        cudaStreamEndCapture(a, &graph);
        cudaGraphInstantiate(&exec, graph, 0);
        tries("graph", [&] {
            float host = 0.0f;
            cudaMemset(y, 0xff, 4 * sizeof(float));
            cudaGraphLaunch(exec, a);
            cudaStreamSynchronize(a);
            cudaMemcpy(&host, y + 2, sizeof(float), cudaMemcpyDeviceToHost);
            return host == 10.0f;
        });
        cudaGraphExecDestroy(exec);
        cudaGraphDestroy(graph);
    }
    tries("pageable source", [&] {
        float host = 0.0f;
        std::vector<float> src(1, 11.0f);
        cudaMemcpyAsync(y + 3, src.data(), sizeof(float), cudaMemcpyHostToDevice, a);
        src[0] = -1.0f;   // allowed: a copy from pageable memory has read it
        cudaStreamSynchronize(a);
        cudaMemcpy(&host, y + 3, sizeof(float), cudaMemcpyDeviceToHost);
        return host == 11.0f;
    });
    tries("older stream no wait", [&] {
        float host = 0.0f;
        cudaMemset(y, 0xff, 4 * sizeof(float));
        add_kernel(b, y, x, 2.0f);                                       // y[0] = 3 on B
        add_kernel(a, y + 1, y, 1.0f);                                   // y[1] = y[0] + 1 on A
        cudaDeviceSynchronize();
        cudaMemcpy(&host, y + 1, sizeof(float), cudaMemcpyDeviceToHost);
        return host == 4.0f;
    });
    // a fork and a join of two streams, eagerly
    for (int fork_after = 1; fork_after >= 0; fork_after--)
        tries(fork_after ? "branches" : "branch forked early", [&] {
            cudaMemset(y, 0xff, 4 * sizeof(float));
            float got[4];
            if (!fork_after) {   // B forks before the kernel it reads
                cudaEventRecord(ev, a);
                cudaStreamWaitEvent(b, ev, 0);
            }
            add_kernel(a, y, x, 1.0f);                                   // y[0] = 2 on A
            if (fork_after) {
                cudaEventRecord(ev, a);
                cudaStreamWaitEvent(b, ev, 0);
            }
            add_kernel(b, y + 1, y, 1.0f);                               // y[1] = y[0] + 1 = 3 on B
            add_kernel(a, y + 2, x, 3.0f);                               // y[2] = 4 on A
            cudaEventRecord(join, b);
            cudaStreamWaitEvent(a, join, 0);
            emu_launch(dim3(1), dim3(1), 0, a, [=] { y[3] = y[1] + y[2]; });   // 7 after the join
            cudaStreamSynchronize(a);
            cudaMemcpy(got, y, sizeof(got), cudaMemcpyDeviceToHost);
            return got[0] == 2.0f && got[1] == 3.0f && got[2] == 4.0f && got[3] == 7.0f;
        });
    // the same captured as a graph, launched 32 times
    for (int fork_after = 1; fork_after >= 0; fork_after--) {
        cudaGraph_t graph;
        cudaGraphExec_t exec;
        cudaStreamBeginCapture(a, cudaStreamCaptureModeGlobal);
        if (!fork_after) {
            cudaEventRecord(ev, a);
            cudaStreamWaitEvent(b, ev, 0);
        }
        add_kernel(a, y, x, 1.0f);
        if (fork_after) {
            cudaEventRecord(ev, a);
            cudaStreamWaitEvent(b, ev, 0);
        }
        add_kernel(b, y + 1, y, 1.0f);
        add_kernel(a, y + 2, x, 3.0f);
        cudaEventRecord(join, b);
        cudaStreamWaitEvent(a, join, 0);
        emu_launch(dim3(1), dim3(1), 0, a, [=] { y[3] = y[1] + y[2]; });
        cudaStreamEndCapture(a, &graph);
        cudaGraphInstantiate(&exec, graph, 0);
        tries(fork_after ? "graph branches" : "graph branch no edge", [&] {
            float got[4];
            cudaMemset(y, 0xff, 4 * sizeof(float));
            cudaGraphLaunch(exec, a);
            cudaStreamSynchronize(a);
            cudaMemcpy(got, y, sizeof(got), cudaMemcpyDeviceToHost);
            return got[0] == 2.0f && got[1] == 3.0f && got[2] == 4.0f && got[3] == 7.0f;
        });
        cudaGraphExecDestroy(exec);
        cudaGraphDestroy(graph);
    }
    cudaFree(x);
    cudaFree(y);
    cudaFreeHost(pinned);
    cudaEventDestroy(ev);
    cudaEventDestroy(join);
    cudaStreamDestroy(a);
    cudaStreamDestroy(b);
    cudaStreamDestroy(blocking);
    return 0;
}
