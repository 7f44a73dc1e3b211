/*
 * The PTX operations of llmc/attention_flash.cuh's kernels under the GPU emulation of
 * test/gpu_emu.h, from the PTX ISA's definitions (ldmatrix, mma.sync, wgmma, cp.async; the
 * details in test/attention_flash_emu.cpp's header comment): what attention_flash.cuh takes from
 * its includer when ATTENTION_FLASH_EMULATION is defined, and cuda_common.h's cp.async copies
 * (smem_addr, cp_async16, cp_async4, cp_async_commit, cp_async_wait) for any emulated kernel.
 * Shared by the flash emulator, the whole-model and rollout emulators (test/model_cuda_emu.cpp,
 * test/rollout_emu.cpp) and the decode-attention emulator (staged loads).
 */
#ifndef TEST_GPU_EMU_FLASH_H
#define TEST_GPU_EMU_FLASH_H
#include "gpu_emu.h"
#include "gpu_emu_mma.h"

static bool copies_land_early;   // cp.async copies land when issued, not at the wait

static inline unsigned char *flash_dynamic_smem() { return smem.data(); }
static inline uint32_t smem_addr(const void *p) {
    const unsigned char *c = (const unsigned char *)p;
    if (c < smem.data() || c > smem.data() + smem.size()) emu_fail("shared address outside the block's shared memory");
    return (uint32_t)(c - smem.data());
}
static void check_smem(uint32_t addr, size_t bytes, size_t align) {
    if (addr % align != 0) emu_fail("misaligned shared-memory access");
    if (addr + bytes > smem.size()) emu_fail("shared-memory access past the end of the allocation");
}
static void cp_async(uint32_t dst, const void *src, int size, bool valid) {
    check_smem(dst, size, size);
    if ((uintptr_t)src % size != 0) emu_fail("misaligned cp.async source");
    AsyncCopy copy;
    copy.dst = dst;
    copy.size = size;
    if (valid) memcpy(copy.data, src, size);
    else memset(copy.data, 0, size);
    if (copies_land_early) memcpy(smem.data() + dst, copy.data, size);
    else threads[current_thread].pending.push_back(copy);
}
static inline void cp_async16(uint32_t dst, const void *src, bool valid) { cp_async(dst, src, 16, valid); }
static inline void cp_async4(uint32_t dst, const void *src, bool valid) { cp_async(dst, src, 4, valid); }
static inline void cp_async_commit() {
    EmuThread &th = threads[current_thread];
    th.groups.push_back(std::move(th.pending));
    th.pending.clear();
}
template <int N> static inline void cp_async_wait() {
    EmuThread &th = threads[current_thread];
    while (th.groups.size() > (size_t)N) {
        for (const AsyncCopy &copy : th.groups.front()) memcpy(smem.data() + copy.dst, copy.data, copy.size);
        th.groups.pop_front();
    }
}

static inline uint16_t smem_bf16(uint32_t addr) {
    uint16_t v;
    memcpy(&v, smem.data() + addr, 2);
    return v;
}
static void ldmatrix(uint32_t (&r)[4], uint32_t addr, bool trans) {
    WarpExchange &x = my_warp();
    int lane = lane_id();
    check_smem(addr, 16, 16);
    x.u[lane][0] = addr;
    warp_barrier();
    int row = lane / 4, col = 2 * (lane % 4);
    for (int i = 0; i < 4; i++) {
        uint16_t lo, hi;
        if (!trans) {   // row `row` of matrix i, elements col, col + 1
            lo = smem_bf16(x.u[8 * i + row][0] + 2 * col);
            hi = smem_bf16(x.u[8 * i + row][0] + 2 * (col + 1));
        } else {        // element `row` of rows col and col + 1 of matrix i
            lo = smem_bf16(x.u[8 * i + col][0] + 2 * row);
            hi = smem_bf16(x.u[8 * i + col + 1][0] + 2 * row);
        }
        r[i] = (uint32_t)lo | ((uint32_t)hi << 16);
    }
    warp_barrier();
}
static inline void flash_ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) { ldmatrix(r, addr, false); }
static inline void flash_ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) { ldmatrix(r, addr, true); }

static void flash_mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) { emu_mma(d, a, b0, b1); }

// wgmma.mma_async.m64n64k16.f32.bf16.bf16 with A in registers and B in shared memory, from the PTX
// ISA: a warpgroup (4 consecutive warps of the block) exchanges its A fragments (warp w holds rows 16w..
// 16w + 15 in the m16n8k16 A layout) and descriptors through a warpgroup barrier; B (16 x 64) is read
// through the descriptor by the ISA's canonical no-swizzle layouts, with T = 8 bf16 (16 bytes),
// k = k0 + 8 k1 and n = n0 + 8 n1 (start, LBO and SBO in bytes from the descriptor):
//   K-major  (imm-trans-b 0)  byte start + n0 * 16 + n1 * SBO + k0 * 2 + k1 * LBO
//   MN-major (imm-trans-b 1)  byte start + n0 * 2 + n1 * SBO + k0 * 16 + k1 * LBO
// Each thread then adds to its accumulators (n-block j of its 16 rows in the m16n8 C layout; to
// 0 with ACC 0, the instruction's scale-d false) the 16 products of k in order, in fp32, as
// emu_mma does.
// The products are asynchronous, as on the GPU: an issued product is only queued (with the
// addresses of its A registers and accumulators), commit closes a group, and the wait executes
// the groups then, the latest moment the ISA allows, reading the A registers, the shared-memory
// tiles and the accumulators as they are at the wait. A kernel that reads an accumulator before
// the wait for its product, or changes its A registers or tiles before it, gets other values.
struct WgOp {
    float (*d)[4];       // the thread's 8 x 4 accumulators
    const uint32_t *a;   // its 4 A registers (A in registers), or NULL (A through desc_a)
    uint64_t desc_a, desc;
    int trans_b, acc;
};
static std::vector<WgOp> wg_issued[1024];       // each thread's products not yet executed, in issue order
static std::vector<size_t> wg_committed[1024];  // the sizes of its committed groups not yet executed, oldest first
static uint32_t wg_a[1024][4];
static uint64_t wg_desc[1024], wg_desc_a[1024];
static size_t wg_count[1024];
static inline void flash_wgmma_fence() {}
static inline void flash_fence_proxy_async() {}
template <int NB> static inline void flash_acc_fence(float (&)[NB][4]) {}
template <int NB> static inline void flash_frag_fence(uint32_t (&)[NB][4]) {}
// the byte address of element (k, mn) of a 16 x 64 (B) or 64 x 16 (A, mn its row) operand
// through a no-swizzle descriptor, by the canonical layouts above; checked inside shared memory
static uint32_t wg_element(uint64_t desc, int trans, int k, int mn) {
    if ((desc >> 62) != 0 || ((desc >> 49) & 7) != 0) emu_fail("wgmma: only the no-swizzle layout is emulated");
    uint32_t start = (uint32_t)(desc & 0x3FFF) << 4, lbo = (uint32_t)((desc >> 16) & 0x3FFF) << 4,
             sbo = (uint32_t)((desc >> 32) & 0x3FFF) << 4;
    uint32_t addr = trans ? start + (mn % 8) * 2 + (mn / 8) * sbo + (k % 8) * 16 + (k / 8) * lbo
                          : start + (mn % 8) * 16 + (mn / 8) * sbo + (k % 8) * 2 + (k / 8) * lbo;
    check_smem(addr, 2, 2);
    return addr;
}
// the first thread of the caller's warpgroup (128 consecutive threads)
static inline int wg_base() { return current_thread / 128 * 128; }
// the warpgroup's common value (every thread gave the same), after the exchange barrier
static void wg_same(const uint64_t *values, uint64_t value, const char *what) {
    for (int u = wg_base(); u < wg_base() + 128; u++)
        if (values[u] != value) emu_fail(what);
}
// D += A B (or D = A B) for this thread's accumulators, A from the exchanged registers or through
// op.desc_a as a K-major operand, after the block has exchanged its operands
static void wgmma_emulated(const WgOp &op) {
    float A[64][16], B[16][64];
    if (op.a == NULL) {
        for (int m = 0; m < 64; m++)
            for (int k = 0; k < 16; k++) A[m][k] = to_f32(floatX{smem_bf16(wg_element(op.desc_a, 0, k, m))});
    } else {
        for (int u = 0; u < 128; u++) {
            int w = u / 32, g = (u % 32) / 4, c = u % 4, r = 16 * w + g;
            const uint32_t *a = wg_a[wg_base() + u];
            A[r][2 * c] = lo_f32(a[0]);         A[r][2 * c + 1] = hi_f32(a[0]);
            A[r + 8][2 * c] = lo_f32(a[1]);     A[r + 8][2 * c + 1] = hi_f32(a[1]);
            A[r][2 * c + 8] = lo_f32(a[2]);     A[r][2 * c + 9] = hi_f32(a[2]);
            A[r + 8][2 * c + 8] = lo_f32(a[3]); A[r + 8][2 * c + 9] = hi_f32(a[3]);
        }
    }
    for (int k = 0; k < 16; k++)
        for (int n = 0; n < 64; n++) B[k][n] = to_f32(floatX{smem_bf16(wg_element(op.desc, op.trans_b, k, n))});
    int t = current_thread, w = t % 128 / 32, g = (t % 32) / 4, c = t % 4;
    for (int j = 0; j < 8; j++)
        for (int e = 0; e < 4; e++) {
            int row = 16 * w + g + (e >= 2 ? 8 : 0), col = 8 * j + 2 * c + (e & 1);
            float sum = op.acc ? op.d[j][e] : 0.0f;
            for (int k = 0; k < 16; k++) sum += A[row][k] * B[k][col];
            op.d[j][e] = sum;
        }
}
static void wg_issue(const WgOp &op) {
    if (blockDim.x % 128 != 0 || blockDim.y != 1 || blockDim.z != 1)
        emu_fail("wgmma: the emulation takes blocks of whole warpgroups in x");
    wg_issued[current_thread].push_back(op);
}
template <int TRANS_B, int ACC = 1>   // ACC 0: the accumulators' earlier values are not read
static void flash_wgmma(float (&d)[8][4], const uint32_t (&a)[4], uint64_t desc) {
    wg_issue(WgOp{d, a, 0, desc, TRANS_B, ACC});
}
template <int TRANS_B, int ACC = 1>   // A from shared memory, K-major, through desc_a
static void flash_wgmma_ss(float (&d)[8][4], uint64_t desc_a, uint64_t desc) {
    wg_issue(WgOp{d, NULL, desc_a, desc, TRANS_B, ACC});
}
// wgmma.commit_group: the products issued since the last commit become a group
static inline void flash_wgmma_commit() {
    int t = current_thread;
    size_t in_groups = 0;
    for (size_t n : wg_committed[t]) in_groups += n;
    wg_committed[t].push_back(wg_issued[t].size() - in_groups);
}
// wgmma.wait_group N: executes the oldest committed groups until at most N remain, every thread of
// the warpgroup the same products (each exchanging its A registers and descriptors at the time)
template <int N> static void flash_wgmma_wait_group() {
    int t = current_thread;
    size_t in_groups = 0;
    for (size_t n : wg_committed[t]) in_groups += n;
    if (in_groups != wg_issued[t].size()) emu_fail("wgmma: products issued and not committed at a wait");
    size_t ops = 0;
    while (wg_committed[t].size() > (size_t)N) {
        ops += wg_committed[t].front();
        wg_committed[t].erase(wg_committed[t].begin());
    }
    wg_count[t] = ops;
    warpgroup_barrier();
    for (int u = wg_base(); u < wg_base() + 128; u++)
        if (wg_count[u] != ops) emu_fail("wgmma: the warpgroup's threads wait for different products");
    for (size_t i = 0; i < ops; i++) {
        const WgOp &op = wg_issued[t][i];
        if (op.a) memcpy(wg_a[t], op.a, sizeof(wg_a[t]));
        wg_desc[t] = op.desc;
        wg_desc_a[t] = op.a ? ~(uint64_t)0 : op.desc_a;
        warpgroup_barrier();
        wg_same(wg_desc, op.desc, "wgmma: the warpgroup's threads gave different descriptors");
        wg_same(wg_desc_a, wg_desc_a[t], "wgmma: the warpgroup's threads gave different A operands");
        wgmma_emulated(op);
        warpgroup_barrier();
    }
    wg_issued[t].erase(wg_issued[t].begin(), wg_issued[t].begin() + ops);
}
static inline void flash_wgmma_wait() { flash_wgmma_wait_group<0>(); }
static inline uint32_t flash_pack_bf16(float lo, float hi) {
    return (uint32_t)to_bf16(lo).bits | ((uint32_t)to_bf16(hi).bits << 16);
}
static inline float flash_exp2(float x) { return exp2f(x); }
static inline float flash_bf16_to_f32(floatX x) { return to_f32(x); }
static inline floatX flash_f32_to_bf16(float x) { return to_bf16(x); }
#endif
