/*
 * The emulation of a GPU under which the test/..._emu.cpp programs run CUDA kernels' source
 * unchanged as C++ on the CPU, from the PTX ISA's definitions, independently of the kernels' own
 * address arithmetic:
 *   - every thread of a block is a user-level context (ucontext) on one OS thread, entered with
 *     swapcontext and switched at its barriers with _setjmp/_longjmp (which, unlike
 *     swapcontext, make no system call to save the signal mask); a block runs
 *     until all its threads have finished; __syncthreads and the warp-wide operations are
 *     barriers of the block or the warp (a barrier that can never be passed is reported);
 *     threads run in index order up to their next barrier, or in reverse order with
 *     threads_in_reverse set, so that a missing barrier shows in one order or the other;
 *   - __shfl_xor_sync exchanges values through a warp-wide barrier, as __any_sync does its votes,
 *     and __syncwarp is one;
 *   - dynamic shared memory (smem) starts as NaN for every block; with EMU_STATIC_SHARED defined,
 *     so does the range emu_shared_begin..emu_shared_end, where the includer's linker script
 *     gathers the kernels' static __shared__ arrays, so a read of an element nothing wrote shows
 *     up in the output;
 *   - a launch's shared memory is held to CUDA's limits a block: 48 KiB of static and dynamic
 *     together, unless the kernel's cudaFuncAttributeMaxDynamicSharedMemorySize was raised (then
 *     the dynamic part up to it, both parts together up to the opt-in limit, 227 KiB on an H100,
 *     or EMU_SMEM_OPTIN bytes to run a program as on a card with less).
 *     test/gpu_emu.py makes each static __shared__ array report its size when a thread reaches
 *     its declaration (emu_static_shared) and names each launch's kernel (emu_bind);
 *   - blocks run one after another, in the order EMU_BLOCKS says: forward (x fastest, as CUDA
 *     numbers them; the default), reverse, or shuffle (another pseudo-random order each launch,
 *     seeded by EMU_SEED), so that blocks of one kernel that depend on each other's order show.
 * The includer defines EMU_PROGRAM, its name in error messages.
 */
#ifndef TEST_GPU_EMU_H
#define TEST_GPU_EMU_H

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <setjmp.h>
#if defined(_FORTIFY_SOURCE) && _FORTIFY_SOURCE > 0
#error "build the GPU emulation with -U_FORTIFY_SOURCE: its longjmp check refuses the jumps between the threads' stacks"
#endif
#include <ucontext.h>
#ifdef __SANITIZE_ADDRESS__
#include <dlfcn.h>
#include <sanitizer/asan_interface.h>   // EMU_SANITIZE=address (test/gpu_emu.py)
#endif
#include <deque>
#include <functional>
#include <tuple>
#include <type_traits>
#include <vector>
#include "emu_io.h"

// ---------------------------------------------------------------------------------------------
// what cuda_common.h and the CUDA headers would provide

#ifndef EMU_CUDA_TOOLKIT
#define LLMC_CUDA_COMMON_H   // the real cuda_common.h needs the CUDA runtime (test/emu_cuda/ emulates it)
#endif
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
static inline std::vector<float> read_floats(FILE *f, size_t n, const char *path) { return read_n<float>(f, n, path); }

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
// programmatic dependent launch (cuda_common.h; which compiles them to nothing off the GPU when
// the emulated toolkit of test/emu_cuda/ lets it in): blocks run one after another here
#ifndef EMU_CUDA_TOOLKIT
static inline void griddep_wait() {}
static inline void griddep_launch_dependents() {}
#endif
static inline int min(int a, int b) { return a < b ? a : b; }
struct Dim3 { unsigned x, y, z; };
static Dim3 threadIdx, blockIdx, gridDim, blockDim;

// ---------------------------------------------------------------------------------------------
// the block scheduler: one ucontext per thread

enum { RUNNABLE, AT_WARP_BARRIER, AT_WARPGROUP_BARRIER, AT_BLOCK_BARRIER, DONE };
struct AsyncCopy { uint32_t dst; int size; unsigned char data[16]; };
struct EmuThread {
    ucontext_t context;   // where the thread starts
    jmp_buf resume;       // where it waits at a barrier
    bool started;
    int state;
    std::deque<std::vector<AsyncCopy>> groups;   // committed cp.async groups
    std::vector<AsyncCopy> pending;              // issued, not yet committed
};
static const size_t STACK_BYTES = 256 * 1024;
static std::vector<EmuThread> threads;
static std::vector<std::vector<char>> stacks;
static ucontext_t scheduler_context;
static jmp_buf scheduler_jump;   // the scheduler, while a thread runs
static int current_thread;
// Runs the runnable threads from the last to the first: a read that is missing a barrier then
// sees what another schedule would not have written yet
static bool threads_in_reverse;
static std::function<void()> kernel_body;
static std::vector<unsigned char> smem;

// ---------------------------------------------------------------------------------------------
// shared memory limits a block (see the file comment)

#define EMU_SHARED_DEFAULT (48 * 1024)   // without the kernel's attribute raised
// What a block may take with its kernel's limit raised (cudaDevAttrMaxSharedMemoryPerBlockOptin):
// an H100's 227 KiB, or EMU_SMEM_OPTIN bytes (48 KiB to 227 KiB), to run a program as on a card
// with less
static inline size_t emu_shared_optin() {
    static size_t bytes = 0;
    if (bytes == 0) {
        const char *v = getenv("EMU_SMEM_OPTIN");
        char *end = NULL;
        unsigned long long n = v && *v ? strtoull(v, &end, 10) : 227ull * 1024;
        if (v && *v && (*end != 0 || n < EMU_SHARED_DEFAULT || n > 227 * 1024))
            emu_fail("EMU_SMEM_OPTIN must be a number of bytes from 49152 to 232448");
        bytes = (size_t)n;
    }
    return bytes;
}
// a launch's kernel: its function (NULL for a launch of a lambda), its name in the source, and
// its cudaFuncAttributeMaxDynamicSharedMemorySize when the launch was issued (-1: never set)
struct EmuKernel { const void *fn; const char *name; long long dynamic_limit; };
// cudaFuncAttributeMaxDynamicSharedMemorySize as the program set it, by kernel
static std::vector<std::pair<const void *, size_t>> emu_dynamic_smem_limits;
// the kernel of the last emu_bind, taken by the launch it is an argument of when the launch is
// issued (so that its limit is the one in force then, as on a GPU)
static EmuKernel emu_bound = {NULL, NULL, -1};
static inline EmuKernel emu_take_bound() {
    EmuKernel k = emu_bound;
    emu_bound = EmuKernel{NULL, NULL, -1};
    for (auto &l : emu_dynamic_smem_limits)
        if (k.fn != NULL && l.first == k.fn) k.dynamic_limit = (long long)l.second;
    return k;
}
static inline void emu_set_dynamic_smem_limit(const void *fn, size_t bytes) {
    for (auto &l : emu_dynamic_smem_limits)
        if (l.first == fn) {
            l.second = bytes;
            return;
        }
    emu_dynamic_smem_limits.push_back({fn, bytes});
}
// the static __shared__ arrays the running launch's threads declared (address, bytes)
static std::vector<std::pair<const void *, size_t>> emu_static_arrays;
static inline void emu_static_shared(const void *array, size_t bytes) {
    for (auto &a : emu_static_arrays)
        if (a.first == array) return;
    emu_static_arrays.push_back({array, bytes});
}
// Stops the program where a launch of kernel k with `dynamic` bytes of dynamic shared memory,
// after its blocks declared emu_static_arrays, would not have started on a GPU.
static void emu_check_shared(EmuKernel k, size_t dynamic) {
    size_t statics = 0;
    for (auto &a : emu_static_arrays) statics += a.second;
    const char *name = k.name ? k.name : "a kernel";
    char what[512];
    if (statics + dynamic > emu_shared_optin()) {
        snprintf(what, sizeof(what), "%s: %zu bytes of static and %zu of dynamic shared memory pass the %zu a block may take",
                 name, statics, dynamic, emu_shared_optin());
        emu_fail(what);
    }
    if (k.fn == NULL) return;   // a lambda's launch: no attribute to read
    if (k.dynamic_limit < 0) {   // the kernel's limit never raised
        if (statics + dynamic > EMU_SHARED_DEFAULT) {
            snprintf(what, sizeof(what), "%s: %zu bytes of static and %zu of dynamic shared memory pass the %d a block may "
                     "take unless cudaFuncAttributeMaxDynamicSharedMemorySize is raised", name, statics, dynamic, EMU_SHARED_DEFAULT);
            emu_fail(what);
        }
        return;
    }
    const size_t limit = (size_t)k.dynamic_limit;
    if (dynamic > limit) {
        snprintf(what, sizeof(what), "%s: %zu bytes of dynamic shared memory, its cudaFuncAttributeMaxDynamicSharedMemorySize %zu",
                 name, dynamic, limit);
        emu_fail(what);
    }
    if (limit + statics > emu_shared_optin()) {
        snprintf(what, sizeof(what), "%s: cudaFuncAttributeMaxDynamicSharedMemorySize %zu with %zu bytes of static arrays "
                 "passes the %zu a block may take (setting it fails on a GPU)", name, limit, statics, emu_shared_optin());
        emu_fail(what);
    }
}

// ---------------------------------------------------------------------------------------------
// the order of a launch's blocks (EMU_BLOCKS: forward, reverse or shuffle; see the file comment)

// The index of the environment variable `name`'s value among the three words (0 when it is unset
// or empty); any other value stops the program with a message.
static inline int emu_env_word(const char *name, const char *w0, const char *w1, const char *w2) {
    const char *v = getenv(name);
    if (v == NULL || *v == 0 || strcmp(v, w0) == 0) return 0;
    if (strcmp(v, w1) == 0) return 1;
    if (strcmp(v, w2) == 0) return 2;
    char what[160];
    snprintf(what, sizeof(what), "%s must be %s, %s or %s", name, w0, w1, w2);
    emu_fail(what);
    return 0;
}
static inline int emu_blocks_mode() {
    static int mode = emu_env_word("EMU_BLOCKS", "forward", "reverse", "shuffle");
    return mode;
}
// A pseudo-random number below n from the sequence `state` (xorshift64), which starts from
// EMU_SEED (default 1) mixed with salt, so that a failing order can be run again: the random
// orders of the blocks here and of the streams in test/emu_cuda/cuda_runtime.h.
static inline uint64_t emu_random_below(uint64_t &state, uint64_t salt, uint64_t n) {
    if (state == 0) {
        const char *v = getenv("EMU_SEED");
        char *end = NULL;
        unsigned long long seed = v ? strtoull(v, &end, 10) : 1ull;
        if (v && (*v == 0 || *end != 0)) emu_fail("EMU_SEED must be a non-negative integer");
        state = salt ^ seed;
        if (state == 0) state = 1;
    }
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return (state >> 11) % n;
}
// EMU_BLOCKS=shuffle's orders
static inline uint64_t emu_block_pick(uint64_t n) {
    static uint64_t state = 0;
    return emu_random_below(state, 0x2545f4914f6cdd1dull, n);
}
// The blocks' linear indices (x fastest) in the order they run
static std::vector<uint64_t> emu_block_order(uint64_t blocks) {
    std::vector<uint64_t> order(blocks);
    for (uint64_t b = 0; b < blocks; b++) order[b] = emu_blocks_mode() == 1 ? blocks - 1 - b : b;
    if (emu_blocks_mode() == 2)
        for (uint64_t b = blocks; b > 1; b--) std::swap(order[b - 1], order[emu_block_pick(b)]);
    return order;
}

#ifdef EMU_STATIC_SHARED
extern char emu_shared_begin[], emu_shared_end[];   // set by the includer's linker script
#endif

// The jump between the scheduler's and the threads' stacks. Under AddressSanitizer, libc's own
// _longjmp rather than the sanitizer's, which before every jump asks the kernel for the signal
// stack (a system call at every barrier, a third of a sanitized run) in order to clear the
// stack below the target of the frames the jump abandons; these jumps abandon none that would
// matter: a thread's frames stay live at its barriers and are returned through when it resumes,
// and its last jump leaves only thread_entry's frame.
#ifdef __SANITIZE_ADDRESS__
[[noreturn]] static void emu_longjmp(jmp_buf env, int value) {
    typedef void (*Jump)(struct __jmp_buf_tag *, int);
    static Jump libc_jump = NULL;
    if (libc_jump == NULL) {
        void *libc = dlopen("libc.so.6", RTLD_NOW | RTLD_NOLOAD);
        libc_jump = libc ? (Jump)dlsym(libc, "_longjmp") : NULL;
        if (libc_jump == NULL) emu_fail("libc's _longjmp not found");
    }
    libc_jump(env, value);
    __builtin_unreachable();
}
#else
#define emu_longjmp _longjmp
#endif

static void thread_entry() {
    kernel_body();
    threads[current_thread].state = DONE;
    emu_longjmp(scheduler_jump, 1);   // back to run_thread (the context's uc_link is never taken)
}
static void wait_at(int state) {
    threads[current_thread].state = state;
    if (_setjmp(threads[current_thread].resume) == 0) emu_longjmp(scheduler_jump, 1);
}
// Runs thread t until it waits at a barrier or finishes.
static __attribute__((noinline)) void run_thread(int t) {
    current_thread = t;
    if (_setjmp(scheduler_jump) != 0) return;
    EmuThread &th = threads[t];
    if (th.started) emu_longjmp(th.resume, 1);
    th.started = true;
    if (swapcontext(&scheduler_context, &th.context) != 0) emu_fail("swapcontext");
}
static void __syncthreads() { wait_at(AT_BLOCK_BARRIER); }
static void warp_barrier() { wait_at(AT_WARP_BARRIER); }
// the 128 threads of the caller's warpgroup (4 consecutive warps; the emulated wgmma's operand
// exchange), passed when all of them are at it
static void warpgroup_barrier() { wait_at(AT_WARPGROUP_BARRIER); }

// A fresh context for thread t that starts in thread_entry (apart from launch's loops: getcontext
// returns twice in the compiler's eyes, which would pin their variables to memory)
static __attribute__((noinline)) void init_thread(int t) {
    EmuThread &th = threads[t];
    th.state = RUNNABLE;
    th.started = false;
    th.groups.clear();
    th.pending.clear();
    if (getcontext(&th.context) != 0) emu_fail("getcontext");
    th.context.uc_stack.ss_sp = stacks[t].data();
    th.context.uc_stack.ss_size = STACK_BYTES;
    th.context.uc_link = &scheduler_context;
    makecontext(&th.context, thread_entry, 0);
}

// Runs kernel_body as every block of grid (in the order of EMU_BLOCKS) with block threads (warps
// are 32 consecutive threads, the last one possibly partial) and smem_bytes of dynamic shared
// memory; then checks the launch's shared memory against the limits of kernel k.
static void launch_blocks(Dim3 grid, Dim3 block, size_t smem_bytes, std::function<void()> body,
                          EmuKernel k = EmuKernel{NULL, NULL, -1}) {
    const int n = (int)(block.x * block.y * block.z);
    if (n < 1 || n > 1024) emu_fail("a block must have 1 to 1024 threads");
    kernel_body = body;
    gridDim = grid;
    blockDim = block;
    threads = std::vector<EmuThread>(n);
    if (stacks.size() < (size_t)n) stacks.resize(n, std::vector<char>(STACK_BYTES));
    emu_static_arrays.clear();
    for (uint64_t b : emu_block_order((uint64_t)grid.x * grid.y * grid.z)) {
        blockIdx = Dim3{(unsigned)(b % grid.x), (unsigned)(b / grid.x % grid.y), (unsigned)(b / grid.x / grid.y)};
#ifdef __SANITIZE_ADDRESS__
        if (smem.capacity() > 0) __asan_unpoison_memory_region(smem.data(), smem.capacity());
#endif
        smem.assign(smem_bytes, 0xff);   // NaN in bf16 and fp32
#ifdef __SANITIZE_ADDRESS__
        // the capacity past the block's bytes (left by a larger launch before) is out of bounds
        if (smem.capacity() > smem_bytes) __asan_poison_memory_region(smem.data() + smem_bytes, smem.capacity() - smem_bytes);
#endif
#ifdef EMU_STATIC_SHARED
        memset(emu_shared_begin, 0xff, emu_shared_end - emu_shared_begin);
#endif
        for (int t = 0; t < n; t++) init_thread(t);
        for (;;) {
            for (int i = 0; i < n; i++) {
                int t = threads_in_reverse ? n - 1 - i : i;
                if (threads[t].state != RUNNABLE) continue;
                threadIdx = Dim3{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
                run_thread(t);
            }
            int done = 0, at_block = 0;
            bool released = false;
            for (int t = 0; t < n; t++) done += threads[t].state == DONE, at_block += threads[t].state == AT_BLOCK_BARRIER;
            if (done == n) break;
            // each warp (32 consecutive threads) and warpgroup (128) whose threads all wait at its barrier
            for (int size : {32, 128}) {
                const int state = size == 32 ? AT_WARP_BARRIER : AT_WARPGROUP_BARRIER;
                for (int first = 0; first < n; first += size) {
                    int members = n - first < size ? n - first : size, at = 0;
                    for (int i = 0; i < members; i++) at += threads[first + i].state == state;
                    if (at == members) {
                        for (int i = 0; i < members; i++) threads[first + i].state = RUNNABLE;
                        released = true;
                    }
                }
            }
            if (at_block == n) {
                for (int t = 0; t < n; t++) threads[t].state = RUNNABLE;
                released = true;
            }
            if (!released) emu_fail("deadlock: threads wait at barriers that cannot be passed");
        }
    }
    emu_check_shared(k, smem_bytes);
}
// The kernels under the per-kernel emulators take whole warps in one dimension.
static void launch(Dim3 grid, int block, size_t smem_bytes, std::function<void()> body, EmuKernel k = EmuKernel{NULL, NULL, -1}) {
    if (block % 32 != 0) emu_fail("block size must be a multiple of 32");
    launch_blocks(grid, Dim3{(unsigned)block, 1, 1}, smem_bytes, body, k);
}

// A launch's kernel and arguments as the closure the block scheduler runs: the arguments
// converted to the kernel's parameter types and copied now, as a launch evaluates them when it
// is issued (a launch captured into a CUDA graph keeps the values it had then). The kernel and
// its name are left in emu_bound for the launch to take.
// test/gpu_emu.py rewrites  k<<<grid, block, smem, stream>>>(args);  into
// emu_launch(grid, block, smem, stream, emu_bind("k", k, args));
template <typename... P, typename... A>
static std::function<void()> emu_bind(const char *name, void (*kernel)(P...), A &&...args) {
    static_assert(sizeof...(P) == sizeof...(A), "a launch passes as many arguments as the kernel has parameters");
    emu_bound = EmuKernel{reinterpret_cast<const void *>(kernel), name, -1};
    return [kernel, values = std::tuple<typename std::decay<P>::type...>((P)(args)...)]() { std::apply(kernel, values); };
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
