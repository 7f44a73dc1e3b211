/*
 * The emulation of a GPU under which the test/..._emu.cpp programs run CUDA kernels' source
 * unchanged as C++ on the CPU, from the PTX ISA's definitions, independently of the kernels' own
 * address arithmetic:
 *   - every thread of a block is a user-level context (ucontext) on one OS thread; a block runs
 *     until all its threads have finished; __syncthreads and the warp-wide operations are
 *     barriers of the block or the warp (a barrier that can never be passed is reported);
 *     threads run in index order up to their next barrier, or in reverse order with
 *     threads_in_reverse set, so that a missing barrier shows in one order or the other;
 *   - __shfl_xor_sync exchanges values through a warp-wide barrier, as __any_sync does its votes,
 *     and __syncwarp is one;
 *   - dynamic shared memory (smem) starts as NaN for every block; with EMU_STATIC_SHARED defined,
 *     so does the range emu_shared_begin..emu_shared_end, where the includer's linker script
 *     gathers the kernels' static __shared__ arrays, so a read of an element nothing wrote shows
 *     up in the output.
 * The includer defines EMU_PROGRAM, its name in error messages.
 */
#ifndef TEST_GPU_EMU_H
#define TEST_GPU_EMU_H

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <ucontext.h>
#include <deque>
#include <functional>
#include <vector>

// ---------------------------------------------------------------------------------------------
// what cuda_common.h and the CUDA headers would provide

#define LLMC_CUDA_COMMON_H   // the real cuda_common.h needs the CUDA runtime
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)   // (max threads) or (max threads, min blocks)

static void emu_fail(const char *what) {
    fprintf(stderr, "error: " EMU_PROGRAM ": %s\n", what);
    exit(1);
}

// n float32 values read from f (the emulator's input file `path`); exits when the file is short.
static inline std::vector<float> read_floats(FILE *f, size_t n, const char *path) {
    std::vector<float> x(n);
    if (fread(x.data(), sizeof(float), n, f) != n) {
        fprintf(stderr, "error: %s: file ends before %zu floats were read\n", path, n);
        exit(1);
    }
    return x;
}

struct floatX { uint16_t bits; };   // bf16
static inline float to_f32(floatX x) {
    uint32_t u = (uint32_t)x.bits << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static inline floatX to_bf16(float f) {   // round to nearest even, NaN kept NaN
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return floatX{(uint16_t)((u >> 16) | 0x40)};
    u += 0x7fffu + ((u >> 16) & 1u);
    return floatX{(uint16_t)(u >> 16)};
}
struct float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) uint2 { uint32_t x, y; };
struct alignas(16) uint4 { uint32_t x, y, z, w; };
static inline uint4 make_uint4(uint32_t x, uint32_t y, uint32_t z, uint32_t w) { return uint4{x, y, z, w}; }
struct __nv_bfloat162 { floatX x, y; };
static inline float2 __bfloat1622float2(__nv_bfloat162 v) { return float2{to_f32(v.x), to_f32(v.y)}; }
static inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
// programmatic dependent launch (cuda_common.h): blocks run one after another here, in launch order
static inline void griddep_wait() {}
static inline void griddep_launch_dependents() {}
static inline int min(int a, int b) { return a < b ? a : b; }
struct Dim3 { unsigned x, y, z; };
static Dim3 threadIdx, blockIdx, gridDim, blockDim;

// ---------------------------------------------------------------------------------------------
// the block scheduler: one ucontext per thread

enum { RUNNABLE, AT_WARP_BARRIER, AT_BLOCK_BARRIER, DONE };
struct AsyncCopy { uint32_t dst; int size; unsigned char data[16]; };
struct EmuThread {
    ucontext_t context;
    int state;
    std::deque<std::vector<AsyncCopy>> groups;   // committed cp.async groups
    std::vector<AsyncCopy> pending;              // issued, not yet committed
};
static const size_t STACK_BYTES = 256 * 1024;
static std::vector<EmuThread> threads;
static std::vector<std::vector<char>> stacks;
static ucontext_t scheduler_context;
static int current_thread;
// Runs the runnable threads from the last to the first: a read that is missing a barrier then
// sees what another schedule would not have written yet
static bool threads_in_reverse;
static std::function<void()> kernel_body;
static std::vector<unsigned char> smem;

#ifdef EMU_STATIC_SHARED
extern char emu_shared_begin[], emu_shared_end[];   // set by the includer's linker script
#endif

static void thread_entry() {
    kernel_body();
    threads[current_thread].state = DONE;   // uc_link returns to the scheduler
}
static void wait_at(int state) {
    threads[current_thread].state = state;
    if (swapcontext(&threads[current_thread].context, &scheduler_context) != 0) emu_fail("swapcontext");
}
static void __syncthreads() { wait_at(AT_BLOCK_BARRIER); }
static void warp_barrier() { wait_at(AT_WARP_BARRIER); }

// A fresh context for thread t that starts in thread_entry (apart from launch's loops: getcontext
// returns twice in the compiler's eyes, which would pin their variables to memory)
static __attribute__((noinline)) void init_thread(int t) {
    EmuThread &th = threads[t];
    th.state = RUNNABLE;
    th.groups.clear();
    th.pending.clear();
    if (getcontext(&th.context) != 0) emu_fail("getcontext");
    th.context.uc_stack.ss_sp = stacks[t].data();
    th.context.uc_stack.ss_size = STACK_BYTES;
    th.context.uc_link = &scheduler_context;
    makecontext(&th.context, thread_entry, 0);
}

// Runs kernel_body as every block of grid with block threads and smem_bytes of shared memory.
static void launch(Dim3 grid, int block, size_t smem_bytes, std::function<void()> body) {
    if (block % 32 != 0) emu_fail("block size must be a multiple of 32");
    kernel_body = body;
    gridDim = grid;
    blockDim = Dim3{(unsigned)block, 1, 1};
    threads = std::vector<EmuThread>(block);
    if (stacks.size() < (size_t)block) stacks.resize(block, std::vector<char>(STACK_BYTES));
    for (unsigned z = 0; z < grid.z; z++)
        for (unsigned y = 0; y < grid.y; y++)
            for (unsigned x = 0; x < grid.x; x++) {
                blockIdx = Dim3{x, y, z};
                smem.assign(smem_bytes, 0xff);   // NaN in bf16 and fp32
#ifdef EMU_STATIC_SHARED
                memset(emu_shared_begin, 0xff, emu_shared_end - emu_shared_begin);
#endif
                for (int t = 0; t < block; t++) init_thread(t);
                for (;;) {
                    for (int i = 0; i < block; i++) {
                        int t = threads_in_reverse ? block - 1 - i : i;
                        if (threads[t].state != RUNNABLE) continue;
                        current_thread = t;
                        threadIdx = Dim3{(unsigned)t, 0, 0};
                        if (swapcontext(&scheduler_context, &threads[t].context) != 0) emu_fail("swapcontext");
                    }
                    int done = 0, at_block = 0;
                    bool released = false;
                    for (int t = 0; t < block; t++) done += threads[t].state == DONE, at_block += threads[t].state == AT_BLOCK_BARRIER;
                    if (done == block) break;
                    for (int w = 0; w < block / 32; w++) {
                        int at_warp = 0;
                        for (int l = 0; l < 32; l++) at_warp += threads[w * 32 + l].state == AT_WARP_BARRIER;
                        if (at_warp == 32) {
                            for (int l = 0; l < 32; l++) threads[w * 32 + l].state = RUNNABLE;
                            released = true;
                        }
                    }
                    if (at_block == block) {
                        for (int t = 0; t < block; t++) threads[t].state = RUNNABLE;
                        released = true;
                    }
                    if (!released) emu_fail("deadlock: threads wait at barriers that cannot be passed");
                }
            }
}

// ---------------------------------------------------------------------------------------------
// warp-wide operations

struct WarpExchange { uint32_t u[32][8]; float f[32][4]; };
static WarpExchange exchange[32];
static inline int lane_id() { return current_thread % 32; }
static inline WarpExchange &my_warp() { return exchange[current_thread / 32]; }

static inline void __syncwarp(unsigned mask = 0xffffffffu) {
    if (mask != 0xffffffffu) emu_fail("only full-warp __syncwarp is emulated");
    warp_barrier();
}

// 1 on every lane when the predicate holds on some lane
static inline int __any_sync(unsigned mask, int predicate) {
    if (mask != 0xffffffffu) emu_fail("only full-warp votes are emulated");
    WarpExchange &x = my_warp();
    x.u[lane_id()][7] = predicate != 0;
    warp_barrier();
    int any = 0;
    for (int l = 0; l < 32; l++) any |= x.u[l][7] != 0;
    warp_barrier();
    return any;
}

static inline float __shfl_xor_sync(unsigned mask, float v, int offset) {
    if (mask != 0xffffffffu) emu_fail("only full-warp shuffles are emulated");
    WarpExchange &x = my_warp();
    x.f[lane_id()][0] = v;
    warp_barrier();
    float r = x.f[lane_id() ^ offset][0];
    warp_barrier();
    return r;
}

#endif
