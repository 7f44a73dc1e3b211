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
// ISA: the block (one warpgroup of 4 warps) exchanges its A fragments (warp w holds rows 16w..
// 16w + 15 in the m16n8k16 A layout) and descriptors through a block barrier; B (16 x 64) is read
// through the descriptor by the ISA's canonical no-swizzle layouts, with T = 8 bf16 (16 bytes),
// k = k0 + 8 k1 and n = n0 + 8 n1 (start, LBO and SBO in bytes from the descriptor):
//   K-major  (imm-trans-b 0)  byte start + n0 * 16 + n1 * SBO + k0 * 2 + k1 * LBO
//   MN-major (imm-trans-b 1)  byte start + n0 * 2 + n1 * SBO + k0 * 16 + k1 * LBO
// Each thread then adds to its accumulators (n-block j of its 16 rows in the m16n8 C layout; to
// 0 with ACC 0, the instruction's scale-d false) the 16 products of k in order, in fp32, as
// emu_mma does. Computed at the issue: the kernels
// wait for each batch before reading the accumulators or refilling the tiles.
static uint32_t wg_a[128][4];
static uint64_t wg_desc[128];
static inline void flash_wgmma_fence() {}
static inline void flash_wgmma_commit() {}
static inline void flash_wgmma_wait() {}
static inline void flash_fence_proxy_async() {}
template <int NB> static inline void flash_acc_fence(float (&)[NB][4]) {}
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
// the warpgroup's common descriptor (every thread gave the same), after the exchange barrier
static void wg_same(const uint64_t *descs, uint64_t desc) {
    for (int u = 0; u < 128; u++)
        if (descs[u] != desc) emu_fail("wgmma: the warpgroup's threads gave different descriptors");
}
static uint64_t wg_desc_a[128];
// D += A B for this thread's accumulators (A from the exchanged registers, or with a_from_smem
// through desc_a as a K-major operand), after the block has exchanged its operands
template <int TRANS_B, int ACC>
static void wgmma_emulated(float (&d)[8][4], bool a_from_smem, uint64_t desc_a, uint64_t desc) {
    float A[64][16], B[16][64];
    if (a_from_smem) {
        for (int m = 0; m < 64; m++)
            for (int k = 0; k < 16; k++) A[m][k] = to_f32(floatX{smem_bf16(wg_element(desc_a, 0, k, m))});
    } else {
        for (int u = 0; u < 128; u++) {
            int w = u / 32, g = (u % 32) / 4, c = u % 4, r = 16 * w + g;
            A[r][2 * c] = lo_f32(wg_a[u][0]);         A[r][2 * c + 1] = hi_f32(wg_a[u][0]);
            A[r + 8][2 * c] = lo_f32(wg_a[u][1]);     A[r + 8][2 * c + 1] = hi_f32(wg_a[u][1]);
            A[r][2 * c + 8] = lo_f32(wg_a[u][2]);     A[r][2 * c + 9] = hi_f32(wg_a[u][2]);
            A[r + 8][2 * c + 8] = lo_f32(wg_a[u][3]); A[r + 8][2 * c + 9] = hi_f32(wg_a[u][3]);
        }
    }
    for (int k = 0; k < 16; k++)
        for (int n = 0; n < 64; n++) B[k][n] = to_f32(floatX{smem_bf16(wg_element(desc, TRANS_B, k, n))});
    int t = current_thread, w = t / 32, g = (t % 32) / 4, c = t % 4;
    for (int j = 0; j < 8; j++)
        for (int e = 0; e < 4; e++) {
            int row = 16 * w + g + (e >= 2 ? 8 : 0), col = 8 * j + 2 * c + (e & 1);
            float sum = ACC ? d[j][e] : 0.0f;
            for (int k = 0; k < 16; k++) sum += A[row][k] * B[k][col];
            d[j][e] = sum;
        }
}
template <int TRANS_B, int ACC = 1>   // ACC 0: the accumulators' earlier values are not read
static void flash_wgmma(float (&d)[8][4], const uint32_t (&a)[4], uint64_t desc) {
    if (blockDim.x != 128) emu_fail("wgmma: the emulation takes blocks of one warpgroup");
    for (int i = 0; i < 4; i++) wg_a[current_thread][i] = a[i];
    wg_desc[current_thread] = desc;
    __syncthreads();
    wg_same(wg_desc, desc);
    wgmma_emulated<TRANS_B, ACC>(d, false, 0, desc);
    __syncthreads();
}
template <int TRANS_B, int ACC = 1>   // A from shared memory, K-major, through desc_a
static void flash_wgmma_ss(float (&d)[8][4], uint64_t desc_a, uint64_t desc) {
    if (blockDim.x != 128) emu_fail("wgmma: the emulation takes blocks of one warpgroup");
    wg_desc_a[current_thread] = desc_a;
    wg_desc[current_thread] = desc;
    __syncthreads();
    wg_same(wg_desc_a, desc_a);
    wg_same(wg_desc, desc);
    wgmma_emulated<TRANS_B, ACC>(d, true, desc_a, desc);
    __syncthreads();
}
static inline uint32_t flash_pack_bf16(float lo, float hi) {
    return (uint32_t)to_bf16(lo).bits | ((uint32_t)to_bf16(hi).bits << 16);
}
static inline float flash_exp2(float x) { return exp2f(x); }
static inline float flash_bf16_to_f32(floatX x) { return to_f32(x); }
static inline floatX flash_f32_to_bf16(float x) { return to_bf16(x); }
#endif
