/*
 * The CUDA runtime as the engine's host code and kernels see it, emulated on the CPU: with
 * test/emu_cuda/ first on the include path, llmc/cuda_common.h, the kernel headers and
 * llmc/model_cuda.cu compile unchanged as C++ (their <<<...>>> launches rewritten into
 * emu_launch calls by test/gpu_emu.py) and run on the GPU emulation of test/gpu_emu.h:
 *   - device memory is host memory, 256-byte aligned like cudaMalloc's and filled with 0xff
 *     (NaN in bf16 and fp32), so an element nothing wrote shows up; EMU_DEVICE_BYTES=N makes it
 *     an N-byte device (default 80 GiB): a cudaMalloc beyond it fails with
 *     cudaErrorMemoryAllocation, and cudaMemGetInfo reports it;
 *   - streams, three ways (EMU_STREAMS in the environment):
 *       unset or "issue": every launch and copy runs at once, in program order: each stream is
 *       the one CPU thread, events record the wall clock, waits have nothing to wait for;
 *       "lazy": work queues on its stream and runs only when something needs it: a host
 *       synchronisation (a stream, an event, the device, a synchronous copy or set on the
 *       legacy stream, cudaFree), or a stream's wait on an event, which runs the recording
 *       stream up to that record. Each stream so runs as late as the waits the program asked
 *       for allow, and work another stream or the host reads without such a wait is still
 *       queued (device memory NaN, or stale) when it is read: a missing wait shows as a
 *       wrong result. The legacy stream (0) waits for the blocking streams, not for those
 *       created with cudaStreamNonBlocking, as on a GPU; copies between device memory and
 *       pageable host memory behave as CUDA documents (the source read when issued, a copy
 *       to the host complete when the call returns), pinned memory (cudaMallocHost) when the
 *       copy runs;
 *       "shuffle": as lazy, but whenever a stream's work is due, each item run is picked at
 *       random among that stream's next one and the next ones of the other streams that can
 *       run (a GPU runs every stream's issued work while the host waits for one), so the
 *       streams interleave; and each graph launch runs its nodes in a random order that keeps
 *       the graph's dependencies (another order each launch). EMU_SEED=N picks the pseudo-
 *       random sequence (default 1). Work that runs before what it reads without a wait or
 *       edge saying so, or two chains that share a buffer without one, show there, though
 *       not at every occurrence (a missing wait may be met by chance), where lazy is certain
 *       to show a wait missing before a read;
 *   - stream capture: while a stream is captured (and any stream that waited on an event
 *     recorded in it), its launches, copies, sets and external event records become the nodes
 *     of a graph, each depending on the stream's node before it and on the nodes of the events
 *     the stream waited for since, as in CUDA; cudaStreamEndCapture fails unless every other
 *     stream's work was joined back to the capturing stream. cudaGraphLaunch replays the nodes
 *     in the order they were captured, or (shuffle) in a random order (a launch's arguments are
 *     copied when it is issued, test/gpu_emu.h's emu_bind); edges can be made programmatic,
 *     which changes nothing here;
 *   - kernels: dim3 grids and blocks of up to 1024 threads, static __shared__ arrays (one copy:
 *     blocks run one after another), dynamic shared memory, the warp shuffles and votes through
 *     the warp's barrier, atomics as plain read-modify-writes (one OS thread runs everything);
 *   - one device, named "CPU emulation", with an H100's SM count and shared-memory limit.
 * NCCL is not emulated.
 * The includer defines EMU_PROGRAM (its name in error messages) first.
 */
#ifndef TEST_EMU_CUDA_RUNTIME_H
#define TEST_EMU_CUDA_RUNTIME_H
#define EMU_CUDA_TOOLKIT
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <chrono>
#include <algorithm>
#include <deque>
#include <functional>
#include <map>
#include <type_traits>
#include "gpu_emu.h"

#define __shared__ static   // one copy for the block's threads; blocks run one after another
#define __align__(n) __attribute__((aligned(n)))
#define __restrict__ __restrict

struct dim3 {
    unsigned x, y, z;
    dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// ---------------------------------------------------------------------------------------------
// errors

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorMemoryAllocation = 2, cudaErrorNoDevice = 100,
                   cudaErrorInvalidDevice = 101, cudaErrorNotReady = 600 };
static inline const char *cudaGetErrorString(cudaError_t err) {
    switch (err) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorNotReady: return "device not ready";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorNoDevice: return "no CUDA-capable device is detected";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    }
    return "unknown error";
}
static inline cudaError_t cudaGetLastError(void) { return cudaSuccess; }
static inline cudaError_t cudaPeekAtLastError(void) { return cudaSuccess; }

// ---------------------------------------------------------------------------------------------
// device, streams and events

struct cudaDeviceProp {
    char name[256];
    int multiProcessorCount, major, minor;
    size_t totalGlobalMem, sharedMemPerBlockOptin;
};
// EMU_DEVICES=N: the process sees N devices (default 1), each with its own PCI address; the one
// it selects changes nothing else (a process's memory and streams are the one emulated GPU), so
// several processes, each of which picks one, run as ranks on GPUs of their own
static inline int emu_device_count() {
    const char *v = getenv("EMU_DEVICES");
    if (v == NULL || *v == '\0') return 1;
    char *end = NULL;
    long n = strtol(v, &end, 10);
    if (*end != '\0' || n < 1 || n > 64) {
        fprintf(stderr, "EMU_DEVICES=%s: expected a number of devices from 1 to 64\n", v);
        exit(2);
    }
    return (int)n;
}
inline int emu_current_device = 0;
static inline cudaError_t cudaGetDeviceCount(int *count) { *count = emu_device_count(); return cudaSuccess; }
static inline cudaError_t cudaGetDevice(int *device) { *device = emu_current_device; return cudaSuccess; }
static inline cudaError_t cudaSetDevice(int device) {
    if (device < 0 || device >= emu_device_count()) return cudaErrorInvalidDevice;
    emu_current_device = device;
    return cudaSuccess;
}
static inline cudaError_t cudaDeviceGetPCIBusId(char *pci_bus, int len, int device) {
    if (device < 0 || device >= emu_device_count()) return cudaErrorInvalidDevice;
    snprintf(pci_bus, (size_t)len, "0000:%02X:00.0", 0x18 + device);
    return cudaSuccess;
}
static inline cudaError_t cudaGetDeviceProperties(cudaDeviceProp *prop, int) {
    memset(prop, 0, sizeof(*prop));
    snprintf(prop->name, sizeof(prop->name), "CPU emulation");
    prop->multiProcessorCount = 132;
    prop->major = 9;
    prop->minor = 0;
    prop->totalGlobalMem = (size_t)8 << 30;
    prop->sharedMemPerBlockOptin = emu_shared_optin();
    return cudaSuccess;
}
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin, cudaDevAttrMultiProcessorCount };
static inline cudaError_t cudaDeviceGetAttribute(int *value, cudaDeviceAttr attr, int) {
    *value = attr == cudaDevAttrMultiProcessorCount ? 132 : (int)emu_shared_optin();
    return cudaSuccess;
}

// graphs: the captured nodes (each a closure) with the dependencies the capture gave them, and
// their instantiation
enum cudaGraphNodeType { cudaGraphNodeTypeKernel = 0, cudaGraphNodeTypeMemcpy = 1, cudaGraphNodeTypeMemset = 2,
                         cudaGraphNodeTypeEventRecord = 7 };
struct EmuGraph;
struct EmuGraphNode {
    cudaGraphNodeType type;
    std::function<void()> run;
    EmuGraph *graph;
    int index;                          // in the order of capture (its dependencies come before it)
    std::vector<EmuGraphNode *> deps;   // the nodes it waits for
    std::vector<int> edge;              // each dependency's edge: 0 full, 1 programmatic, -1 removed
};
typedef EmuGraphNode *cudaGraphNode_t;
struct EmuGraph { std::vector<EmuGraphNode *> nodes; };
typedef EmuGraph *cudaGraph_t;
struct EmuGraphExec {
    std::vector<std::function<void()>> steps;
    std::vector<std::vector<int>> deps;   // step i runs after these steps
};
typedef EmuGraphExec *cudaGraphExec_t;

// Streams and events. With EMU_STREAMS=lazy (see the file comment) a stream holds a queue of
// work and of waits on event records; an event counts the records issued and those run.
struct EmuStream;
struct EmuEvent {
    std::chrono::steady_clock::time_point at;
    bool recorded;
    EmuGraph *capture;
    unsigned long issued, done;   // records issued outside a capture, and the last one run
    EmuStream *stream;            // where the last record was issued
    std::vector<EmuGraphNode *> frontier;   // recorded in a capture: the nodes a wait on it waits for
};
typedef EmuEvent *cudaEvent_t;
struct EmuItem {
    std::function<void()> work;   // or, when wait is set: wait until wait->done >= target
    EmuEvent *wait;
    unsigned long target;
    EmuStream *recorder;          // the stream that record was issued on
};
struct EmuStream {
    int priority;
    EmuGraph *capture;
    int nonblocking;              // created with cudaStreamNonBlocking: the legacy stream does not wait for it
    std::deque<EmuItem> queue;    // EMU_STREAMS=lazy: issued, not yet run
    int running;                  // a wait of this stream is being resolved
    std::vector<EmuGraphNode *> frontier;   // in a capture: the nodes its next node depends on
};
typedef EmuStream *cudaStream_t;
// the live streams (a capture ends on each that joined it); inline: one list for every
// translation unit of a program (the model and the rollout engine are two)
inline std::vector<EmuStream *> emu_streams;
#define cudaStreamDefault 0
#define cudaStreamNonBlocking 1

// EMU_STREAMS: 0 issue (or unset), 1 lazy, 2 shuffle
static inline int emu_streams_mode(void) {
    static int mode = emu_env_word("EMU_STREAMS", "issue", "lazy", "shuffle");
    return mode;
}
static inline int emu_streams_lazy(void) { return emu_streams_mode() >= 1; }
static inline int emu_streams_shuffle(void) { return emu_streams_mode() == 2; }
// EMU_STREAMS=shuffle's choices: a pseudo-random number below n from a stream seeded by
// EMU_SEED (default 1), so that a failing order can be run again
static inline unsigned emu_pick(unsigned n) {
    static uint64_t state = 0;
    return (unsigned)emu_random_below(state, 0x9e3779b97f4a7c15ull, n);
}
static inline void emu_run_front(EmuStream *s);
// One item of stream `must`, or (EMU_STREAMS=shuffle) of a stream picked at random among `must`
// and the others whose next item can run now (work, or a wait already met): as on a GPU, where
// every stream's issued work may run while the host waits for one of them.
static inline void emu_step(EmuStream *must) {
    EmuStream *s = must;
    if (emu_streams_shuffle()) {
        std::vector<EmuStream *> can{must};
        for (EmuStream *o : emu_streams) {
            if (o == must || o->running || o->queue.empty()) continue;
            const EmuItem &front = o->queue.front();
            if (front.wait == NULL || front.wait->done >= front.target) can.push_back(o);
        }
        s = can[emu_pick((unsigned)can.size())];
    }
    emu_run_front(s);
}
// Runs the stream that issued e's record number `target` until that record has run.
static inline void emu_run_until(EmuEvent *e, unsigned long target, EmuStream *recorder) {
    while (e->done < target) {
        if (recorder == NULL || recorder->queue.empty()) emu_fail("an event's record was lost (EMU_STREAMS=lazy)");
        emu_step(recorder);
    }
}
static inline void emu_run_front(EmuStream *s) {
    if (s->running) emu_fail("streams wait on each other in a cycle (EMU_STREAMS=lazy)");
    EmuItem item = std::move(s->queue.front());
    s->queue.pop_front();
    if (item.wait) {
        s->running = 1;
        emu_run_until(item.wait, item.target, item.recorder);
        s->running = 0;
    } else {
        item.work();
    }
}
static inline void emu_drain(EmuStream *s) {
    while (!s->queue.empty()) emu_step(s);
}
// every stream's queue, or only the blocking ones (what the legacy stream waits for): the newest
// streams first, or (EMU_STREAMS=shuffle) one item at a time from a stream picked at random
static inline void emu_drain_all(int blocking_only) {
    if (!emu_streams_shuffle()) {
        for (size_t i = emu_streams.size(); i-- > 0;)
            if (!blocking_only || !emu_streams[i]->nonblocking) emu_drain(emu_streams[i]);
        return;
    }
    for (;;) {
        std::vector<EmuStream *> pending;
        for (EmuStream *s : emu_streams)
            if ((!blocking_only || !s->nonblocking) && !s->queue.empty()) pending.push_back(s);
        if (pending.empty()) return;
        emu_step(pending[emu_pick((unsigned)pending.size())]);
    }
}
static inline cudaError_t cudaDeviceSynchronize(void) {
    emu_drain_all(0);
    return cudaSuccess;
}
static inline cudaError_t cudaStreamCreateWithPriority(cudaStream_t *s, unsigned flags, int priority) {
    *s = new EmuStream{priority, NULL, (flags & cudaStreamNonBlocking) != 0, {}, 0};
    emu_streams.push_back(*s);
    return cudaSuccess;
}
static inline cudaError_t cudaStreamCreateWithFlags(cudaStream_t *s, unsigned flags) { return cudaStreamCreateWithPriority(s, flags, 0); }
static inline cudaError_t cudaStreamCreate(cudaStream_t *s) { return cudaStreamCreateWithPriority(s, 0, 0); }
static inline cudaError_t cudaStreamDestroy(cudaStream_t s) {
    if (s->capture) emu_fail("cudaStreamDestroy on a stream being captured");
    emu_drain(s);   // a GPU finishes the stream's work first
    for (size_t i = 0; i < emu_streams.size(); i++)
        if (emu_streams[i] == s) emu_streams.erase(emu_streams.begin() + i);
    delete s;
    return cudaSuccess;
}
static inline cudaError_t cudaStreamSynchronize(cudaStream_t s) {
    if (s && s->capture) emu_fail("cudaStreamSynchronize on a stream being captured");
    if (s) emu_drain(s);
    else emu_drain_all(1);
    return cudaSuccess;
}
static inline cudaError_t cudaDeviceGetStreamPriorityRange(int *least, int *greatest) {
    *least = 0;
    *greatest = -5;
    return cudaSuccess;
}
// The graph a stream's work goes into, or NULL when it runs at once.
static inline EmuGraph *emu_capturing(cudaStream_t s) { return s ? s->capture : NULL; }
// Appends work to the stream's capture, or to its queue (EMU_STREAMS=lazy), or runs it now (on
// the legacy stream, after the blocking streams' work).
static inline void emu_issue(cudaStream_t s, cudaGraphNodeType type, std::function<void()> work) {
    EmuGraph *g = emu_capturing(s);
    if (g != NULL) {
        EmuGraphNode *node = new EmuGraphNode{type, work, g, (int)g->nodes.size(), s->frontier,
                                              std::vector<int>(s->frontier.size(), 0)};
        g->nodes.push_back(node);
        s->frontier.assign(1, node);
    } else if (emu_streams_lazy() && s != NULL) {
        s->queue.push_back(EmuItem{std::move(work), NULL, 0, NULL});
    } else {
        if (emu_streams_lazy()) emu_drain_all(1);
        work();
    }
}
enum cudaStreamCaptureStatus { cudaStreamCaptureStatusNone = 0, cudaStreamCaptureStatusActive = 1 };
enum cudaStreamCaptureMode { cudaStreamCaptureModeGlobal = 0, cudaStreamCaptureModeThreadLocal = 1, cudaStreamCaptureModeRelaxed = 2 };
static inline cudaError_t cudaStreamIsCapturing(cudaStream_t s, cudaStreamCaptureStatus *status) {
    *status = emu_capturing(s) ? cudaStreamCaptureStatusActive : cudaStreamCaptureStatusNone;
    return cudaSuccess;
}
static inline cudaError_t cudaStreamBeginCapture(cudaStream_t s, cudaStreamCaptureMode) {
    if (s == NULL || s->capture) emu_fail("cudaStreamBeginCapture: the legacy stream, or a stream already captured");
    s->capture = new EmuGraph();
    s->frontier.clear();
    return cudaSuccess;
}
// As CUDA has it, the work of every stream that joined the capture must have been joined back to
// the stream that began it (cudaErrorStreamCaptureUnjoined): every node comes before that stream's
// last nodes.
static inline cudaError_t cudaStreamEndCapture(cudaStream_t s, cudaGraph_t *graph) {
    if (s == NULL || s->capture == NULL) emu_fail("cudaStreamEndCapture on a stream not captured");
    *graph = s->capture;
    std::vector<char> joined((*graph)->nodes.size(), 0);
    std::vector<EmuGraphNode *> todo = s->frontier;
    while (!todo.empty()) {
        EmuGraphNode *node = todo.back();
        todo.pop_back();
        if (joined[node->index]) continue;
        joined[node->index] = 1;
        for (EmuGraphNode *dep : node->deps) todo.push_back(dep);
    }
    for (char j : joined)
        if (!j) emu_fail("cudaStreamEndCapture: work captured on another stream was not joined back to the capturing stream");
    for (EmuStream *other : emu_streams)
        if (other->capture == *graph) {
            other->capture = NULL;
            other->frontier.clear();
        }
    return cudaSuccess;
}
struct cudaGraphEdgeData { unsigned char from_port, to_port, type, reserved[5]; };
#define cudaGraphDependencyTypeDefault 0
#define cudaGraphDependencyTypeProgrammatic 1
#define cudaGraphKernelNodePortDefault 0
#define cudaGraphKernelNodePortProgrammatic 1
// The capture's current dependencies: the nodes the stream's next node will wait for.
static inline cudaError_t cudaStreamGetCaptureInfo(cudaStream_t s, cudaStreamCaptureStatus *status, unsigned long long *id = NULL,
                                                   cudaGraph_t *graph = NULL, const cudaGraphNode_t **deps = NULL,
                                                   const cudaGraphEdgeData **edges = NULL, size_t *n = NULL) {
    EmuGraph *g = emu_capturing(s);
    *status = g ? cudaStreamCaptureStatusActive : cudaStreamCaptureStatusNone;
    if (id) *id = (unsigned long long)(uintptr_t)g;
    if (graph) *graph = g;
    if (edges) *edges = NULL;
    if (deps) *deps = g && !s->frontier.empty() ? s->frontier.data() : NULL;
    if (n) *n = g ? s->frontier.size() : 0;
    return cudaSuccess;
}
static inline cudaError_t cudaGraphNodeGetType(cudaGraphNode_t node, cudaGraphNodeType *type) { *type = node->type; return cudaSuccess; }
static inline cudaError_t cudaGraphNodeGetDependencies(cudaGraphNode_t node, cudaGraphNode_t *deps, cudaGraphEdgeData *edges, size_t *n) {
    size_t count = node->deps.size();
    if (deps && *n >= count) {
        for (size_t i = 0; i < count; i++) {
            deps[i] = node->deps[i];
            if (edges) {
                memset(&edges[i], 0, sizeof(edges[i]));
                if (node->edge[i] == 1) {
                    edges[i].from_port = cudaGraphKernelNodePortProgrammatic;
                    edges[i].type = cudaGraphDependencyTypeProgrammatic;
                }
            }
        }
    }
    *n = count;
    return cudaSuccess;
}
// Only the captured edges can be taken out and put back (as another type): the edge's slot among
// the dependencies of its node.
static inline int *emu_edge(cudaGraph_t g, const cudaGraphNode_t *from, const cudaGraphNode_t *to, size_t n) {
    if (n != 1 || (*to)->graph != g) emu_fail("graph edges: one edge at a time, within the graph");
    for (size_t i = 0; i < (*to)->deps.size(); i++)
        if ((*to)->deps[i] == *from) return &(*to)->edge[i];
    emu_fail("graph edges: only an edge the capture made can be changed");
    return NULL;
}
static inline cudaError_t cudaGraphRemoveDependencies(cudaGraph_t g, const cudaGraphNode_t *from, const cudaGraphNode_t *to,
                                                      const cudaGraphEdgeData *, size_t n) {
    *emu_edge(g, from, to, n) = -1;   // removed: must be added back
    return cudaSuccess;
}
static inline cudaError_t cudaGraphAddDependencies(cudaGraph_t g, const cudaGraphNode_t *from, const cudaGraphNode_t *to,
                                                   const cudaGraphEdgeData *edges, size_t n) {
    int *edge = emu_edge(g, from, to, n);
    if (*edge != -1) emu_fail("graph edges: an edge added twice");
    *edge = edges && edges[0].type == cudaGraphDependencyTypeProgrammatic;
    return cudaSuccess;
}
static inline cudaError_t cudaGraphInstantiate(cudaGraphExec_t *exec, cudaGraph_t g, unsigned long long = 0) {
    *exec = new EmuGraphExec();
    for (EmuGraphNode *node : g->nodes) {
        std::vector<int> deps;
        for (size_t i = 0; i < node->deps.size(); i++) {
            if (node->edge[i] == -1) emu_fail("cudaGraphInstantiate: an edge was removed and not put back");
            deps.push_back(node->deps[i]->index);
        }
        (*exec)->steps.push_back(node->run);
        (*exec)->deps.push_back(deps);
    }
    return cudaSuccess;
}
static inline cudaError_t cudaGraphDestroy(cudaGraph_t g) {
    for (EmuGraphNode *node : g->nodes) delete node;
    delete g;
    return cudaSuccess;
}
static inline cudaError_t cudaGraphExecDestroy(cudaGraphExec_t exec) { delete exec; return cudaSuccess; }
static inline cudaError_t cudaGraphLaunch(cudaGraphExec_t exec, cudaStream_t s) {
    if (emu_capturing(s)) emu_fail("cudaGraphLaunch into a capture is not emulated");
    std::vector<std::function<void()>> steps = exec->steps;   // the graph as launched
    if (!emu_streams_shuffle()) {   // in the order of capture
        emu_issue(s, cudaGraphNodeTypeKernel, [steps] {
            for (auto &step : steps) step();
        });
        return cudaSuccess;
    }
    // EMU_STREAMS=shuffle: at each launch another order that keeps the graph's dependencies, each
    // node picked at random among those whose dependencies have run
    std::vector<std::vector<int>> deps = exec->deps;
    emu_issue(s, cudaGraphNodeTypeKernel, [steps, deps] {
        size_t n = steps.size();
        std::vector<int> waiting(n, 0);
        std::vector<std::vector<int>> after(n);
        std::vector<int> ready;
        for (size_t i = 0; i < n; i++) {
            waiting[i] = (int)deps[i].size();
            for (int d : deps[i]) after[d].push_back((int)i);
            if (waiting[i] == 0) ready.push_back((int)i);
        }
        while (!ready.empty()) {
            unsigned k = emu_pick((unsigned)ready.size());
            int i = ready[k];
            ready[k] = ready.back();
            ready.pop_back();
            steps[i]();
            for (int j : after[i])
                if (--waiting[j] == 0) ready.push_back(j);
        }
    });
    return cudaSuccess;
}

#define cudaEventDefault 0
#define cudaEventDisableTiming 2
#define cudaEventRecordDefault 0
#define cudaEventRecordExternal 1
static inline cudaError_t cudaEventCreate(cudaEvent_t *e) { *e = new EmuEvent{{}, false, NULL, 0, 0, NULL}; return cudaSuccess; }
static inline cudaError_t cudaEventCreateWithFlags(cudaEvent_t *e, unsigned) { return cudaEventCreate(e); }
static inline cudaError_t cudaEventDestroy(cudaEvent_t e) { delete e; return cudaSuccess; }
// Recorded in a captured stream, an event only carries the capture to the streams that wait on
// it; with cudaEventRecordExternal it is a node that records at each replay.
static inline cudaError_t cudaEventRecordWithFlags(cudaEvent_t e, cudaStream_t s = 0, unsigned flags = 0) {
    e->capture = emu_capturing(s);
    if (e->capture && flags != cudaEventRecordExternal) {
        e->frontier = s->frontier;
        return cudaSuccess;
    }
    unsigned long n = e->capture ? 0 : ++e->issued;   // a record in a graph counts nothing for the waits
    if (!e->capture) e->stream = s;
    emu_issue(s, cudaGraphNodeTypeEventRecord, [e, n] {
        e->at = std::chrono::steady_clock::now();
        e->recorded = true;
        if (n > e->done) e->done = n;
    });
    if (e->capture) e->frontier = s->frontier;
    return cudaSuccess;
}
static inline cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s = 0) { return cudaEventRecordWithFlags(e, s, 0); }
static inline cudaError_t cudaEventSynchronize(cudaEvent_t e) {
    emu_run_until(e, e->issued, e->stream);
    return cudaSuccess;
}
// (an event never recorded is complete, as CUDA has it); a stream that waits on an event recorded
// in a capture joins it; otherwise (EMU_STREAMS=lazy) the wait for the event's last record so far
// is queued
static inline cudaError_t cudaStreamWaitEvent(cudaStream_t s, cudaEvent_t e, unsigned = 0) {
    if (e->capture && s) {
        if (s->capture && s->capture != e->capture) emu_fail("cudaStreamWaitEvent: a stream joins two captures");
        if (s->capture == NULL) s->frontier.clear();
        s->capture = e->capture;
        for (EmuGraphNode *node : e->frontier)   // its next node also waits for the event's
            if (std::find(s->frontier.begin(), s->frontier.end(), node) == s->frontier.end()) s->frontier.push_back(node);
        return cudaSuccess;
    }
    if (emu_streams_lazy() && e->done < e->issued) {
        if (s == NULL) emu_run_until(e, e->issued, e->stream);
        else if (!emu_capturing(s)) s->queue.push_back(EmuItem{nullptr, e, e->issued, e->stream});
    }
    return cudaSuccess;
}
static inline cudaError_t cudaEventElapsedTime(float *ms, cudaEvent_t start, cudaEvent_t stop) {
    if (start->done < start->issued || stop->done < stop->issued) return cudaErrorNotReady;
    if (!start->recorded || !stop->recorded) return cudaErrorInvalidValue;
    *ms = std::chrono::duration<float, std::milli>(stop->at - start->at).count();
    return cudaSuccess;
}

// ---------------------------------------------------------------------------------------------
// memory

enum cudaMemcpyKind { cudaMemcpyHostToHost, cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost, cudaMemcpyDeviceToDevice, cudaMemcpyDefault };
// The allocations, start -> bytes: device memory, and pinned host memory (cudaMallocHost), one
// map each for the whole program
inline std::map<uintptr_t, size_t> emu_device_mem, emu_pinned_mem;
static inline bool emu_in(const std::map<uintptr_t, size_t> &m, const void *p) {
    auto it = m.upper_bound((uintptr_t)p);
    if (it == m.begin()) return false;
    --it;
    return (uintptr_t)p < it->first + it->second;
}
// the emulated device's size (EMU_DEVICE_BYTES) and what its allocations take
static inline size_t emu_device_capacity() {
    const char *v = getenv("EMU_DEVICE_BYTES");
    if (v == NULL || *v == '\0') return (size_t)80 << 30;
    char *end = NULL;
    unsigned long long n = strtoull(v, &end, 10);
    if (*end != '\0' || n == 0) {
        fprintf(stderr, "EMU_DEVICE_BYTES=%s: expected a positive number of bytes\n", v);
        exit(2);
    }
    return (size_t)n;
}
static inline size_t emu_device_used() {
    size_t used = 0;
    for (const auto &kv : emu_device_mem) used += kv.second;
    return used;
}
static inline cudaError_t emu_alloc(void **p, size_t bytes, std::map<uintptr_t, size_t> &m) {
    size_t rounded = (bytes + 255) / 256 * 256;
    if (rounded == 0) rounded = 256;
    if (&m == &emu_device_mem && emu_device_used() + rounded > emu_device_capacity()) {
        *p = NULL;
        return cudaErrorMemoryAllocation;
    }
#ifdef __SANITIZE_ADDRESS__
    // exactly the bytes asked for, so that AddressSanitizer reports an access past the end
    rounded = bytes ? bytes : 1;
    if (posix_memalign(p, 256, rounded) != 0) *p = NULL;
#else
    *p = aligned_alloc(256, rounded);
#endif
    if (*p == NULL) return cudaErrorMemoryAllocation;
    memset(*p, 0xff, rounded);
    m[(uintptr_t)*p] = rounded;
    return cudaSuccess;
}
static inline cudaError_t emu_release(void *p, std::map<uintptr_t, size_t> &m) {
    if (p == NULL) return cudaSuccess;
    emu_drain_all(0);   // as cudaFree, which waits for the device
    if (m.erase((uintptr_t)p) != 1) return cudaErrorInvalidValue;
    free(p);
    return cudaSuccess;
}
static inline cudaError_t cudaMalloc(void **p, size_t bytes) { return emu_alloc(p, bytes, emu_device_mem); }
template <typename T> static inline cudaError_t cudaMalloc(T **p, size_t bytes) { return cudaMalloc((void **)p, bytes); }
static inline cudaError_t cudaFree(void *p) { return emu_release(p, emu_device_mem); }
static inline cudaError_t cudaMemGetInfo(size_t *free_bytes, size_t *total_bytes) {
    *total_bytes = emu_device_capacity();
    size_t used = emu_device_used();
    *free_bytes = used < *total_bytes ? *total_bytes - used : 0;
    return cudaSuccess;
}
// pinned host memory: host memory the copies read and write when they run
static inline cudaError_t cudaMallocHost(void **p, size_t bytes) { return emu_alloc(p, bytes, emu_pinned_mem); }
template <typename T> static inline cudaError_t cudaMallocHost(T **p, size_t bytes) { return cudaMallocHost((void **)p, bytes); }
static inline cudaError_t cudaFreeHost(void *p) { return emu_release(p, emu_pinned_mem); }
// pageable host memory: neither device memory nor pinned
static inline bool emu_pageable(const void *p) { return !emu_in(emu_device_mem, p) && !emu_in(emu_pinned_mem, p); }

// synchronous copies and sets run on the legacy stream: after the blocking streams' work
static inline cudaError_t cudaMemcpy(void *dst, const void *src, size_t bytes, cudaMemcpyKind) {
    if (emu_streams_lazy()) emu_drain_all(1);
    memmove(dst, src, bytes);
    return cudaSuccess;
}
static inline cudaError_t cudaMemset(void *p, int value, size_t bytes) {
    if (emu_streams_lazy()) emu_drain_all(1);
    memset(p, value, bytes);
    return cudaSuccess;
}
// An asynchronous copy from pageable memory reads it when issued; one to pageable memory has
// finished when the call returns (so the stream's earlier work has run too).
static inline cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t bytes, cudaMemcpyKind, cudaStream_t s = 0) {
    if (!emu_streams_lazy() || emu_capturing(s) || s == NULL) {
        emu_issue(s, cudaGraphNodeTypeMemcpy, [=] { memmove(dst, src, bytes); });
        return cudaSuccess;
    }
    if (emu_pageable(src)) {
        std::vector<unsigned char> staged((const unsigned char *)src, (const unsigned char *)src + bytes);
        emu_issue(s, cudaGraphNodeTypeMemcpy, [=] { memcpy(dst, staged.data(), bytes); });
    } else {
        emu_issue(s, cudaGraphNodeTypeMemcpy, [=] { memmove(dst, src, bytes); });
    }
    if (emu_pageable(dst)) emu_drain(s);
    return cudaSuccess;
}
static inline cudaError_t cudaMemsetAsync(void *p, int value, size_t bytes, cudaStream_t s = 0) {
    emu_issue(s, cudaGraphNodeTypeMemset, [=] { memset(p, value, bytes); });
    return cudaSuccess;
}

// ---------------------------------------------------------------------------------------------
// launches (k<<<grid, block, smem, stream>>>(args) as test/gpu_emu.py rewrites it)

enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };
template <typename Kernel> static inline cudaError_t cudaFuncSetAttribute(Kernel kernel, cudaFuncAttribute, int bytes) {
    if (bytes < 0 || (size_t)bytes > emu_shared_optin()) return cudaErrorInvalidValue;
    emu_set_dynamic_smem_limit(reinterpret_cast<const void *>(kernel), (size_t)bytes);   // held to at each launch
    return cudaSuccess;
}
// what a kernel's attributes say: built for sm_90 (so the engine takes its sm_90 paths)
struct cudaFuncAttributes { int maxThreadsPerBlock, numRegs, ptxVersion, binaryVersion; size_t sharedSizeBytes; };
template <typename Kernel> static inline cudaError_t cudaFuncGetAttributes(cudaFuncAttributes *attr, Kernel) {
    *attr = cudaFuncAttributes{1024, 32, 90, 90, 0};
    return cudaSuccess;
}
static inline void emu_launch(dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t s, std::function<void()> body) {
    const EmuKernel kernel = emu_take_bound();   // the kernel of this launch's emu_bind (none for a lambda)
    if (smem_bytes > emu_shared_optin()) emu_fail("a launch asks for more dynamic shared memory than a block may have");
    if ((size_t)block.x * block.y * block.z > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535)
        emu_fail("a launch's grid or block is outside CUDA's limits");
    emu_issue(s, cudaGraphNodeTypeKernel, [=] {
        launch_blocks(Dim3{grid.x, grid.y, grid.z}, Dim3{block.x, block.y, block.z}, smem_bytes, body, kernel);
    });
}
static inline void emu_launch(dim3 grid, dim3 block, size_t smem_bytes, std::function<void()> body) {
    emu_launch(grid, block, smem_bytes, (cudaStream_t)0, body);
}
static inline void emu_launch(dim3 grid, dim3 block, std::function<void()> body) { emu_launch(grid, block, 0, (cudaStream_t)0, body); }
// the block's dynamic shared memory (cuda_common.h's dynamic_smem on a GPU)
static inline unsigned char *dynamic_smem() { return smem.data(); }

// ---------------------------------------------------------------------------------------------
// device functions beyond test/gpu_emu.h's

static inline void __trap() { emu_fail("a kernel trapped (__trap)"); }
static inline void __threadfence() {}
static inline void __nanosleep(unsigned) {}
static inline float __fmul_rn(float a, float b) { return a * b; }   // rounded once, as C++'s float *
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline unsigned __float_as_uint(float x) { unsigned u; memcpy(&u, &x, 4); return u; }
static inline float __uint_as_float(unsigned u) { float x; memcpy(&x, &u, 4); return x; }
static inline int __ffs(unsigned x) { return x ? __builtin_ctz(x) + 1 : 0; }
template <typename T> static inline T __ldcg(const T *p) { return *p; }
template <typename T> static inline T __ldg(const T *p) { return *p; }

// the blocks run one at a time on one OS thread, so a plain read-modify-write is atomic
template <typename T> static inline T atomicAdd(T *address, T value) {
    T old = *address;
    *address = old + value;
    return old;
}
template <typename T> static inline T atomicOr(T *address, T value) {
    T old = *address;
    *address = old | value;
    return old;
}
template <typename T> static inline T atomicMax(T *address, T value) {
    T old = *address;
    if (value > old) *address = value;
    return old;
}

// Shuffles of any value of up to 8 bytes through the warp's barrier.
static uint64_t emu_shuffle_slots[32][32];
template <typename T> static inline T emu_shuffle(T v, int source_lane, bool keep_own) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffles move values of up to 8 bytes");
    uint64_t *slots = emu_shuffle_slots[current_thread / 32];
    int lane = lane_id();
    memcpy(&slots[lane], &v, sizeof(T));
    warp_barrier();
    T r = v;
    if (!keep_own) memcpy(&r, &slots[source_lane & 31], sizeof(T));
    warp_barrier();
    return r;
}
template <typename T> static inline T __shfl_xor_sync(unsigned mask, T v, int offset) {
    if (mask != 0xffffffffu) emu_fail("only full-warp shuffles are emulated");
    return emu_shuffle(v, lane_id() ^ offset, false);
}
template <typename T> static inline T __shfl_sync(unsigned mask, T v, int src) {
    if (mask != 0xffffffffu) emu_fail("only full-warp shuffles are emulated");
    return emu_shuffle(v, src, false);
}
template <typename T> static inline T __shfl_up_sync(unsigned mask, T v, unsigned delta) {
    if (mask != 0xffffffffu) emu_fail("only full-warp shuffles are emulated");
    int lane = lane_id();
    return emu_shuffle(v, lane - (int)delta, lane < (int)delta);
}
template <typename T> static inline T __shfl_down_sync(unsigned mask, T v, unsigned delta) {
    if (mask != 0xffffffffu) emu_fail("only full-warp shuffles are emulated");
    int lane = lane_id();
    return emu_shuffle(v, lane + (int)delta, lane + (int)delta > 31);
}
static inline unsigned __ballot_sync(unsigned mask, int predicate) {
    if (mask != 0xffffffffu) emu_fail("only full-warp votes are emulated");
    uint64_t *slots = emu_shuffle_slots[current_thread / 32];
    slots[lane_id()] = predicate != 0;
    warp_barrier();
    unsigned bits = 0;
    for (int l = 0; l < 32; l++) bits |= (unsigned)(slots[l] != 0) << l;
    warp_barrier();
    return bits;
}

#include "cuda_bf16.h"
#endif
