/*
 * Runs the flash-attention kernels of llmc/attention_flash.cuh on the CPU, so that their
 * fragment layouts, masking, pipelining and softmax arithmetic are checked on a machine without
 * a GPU (test/test_attention_flash_emu.py compares the results with a JAX float64 oracle).
 *
 * The kernels' source is compiled unchanged as C++; what a GPU provides is emulated from the PTX
 * ISA's definitions (threads, barriers and shuffles in test/gpu_emu.h, the rest here),
 * independently of the address arithmetic in the kernels:
 *   - every thread of a block is a user-level context (ucontext) on one OS thread; a block runs
 *     until all its threads have finished; __syncthreads and the warp-wide operations are
 *     barriers of the block or the warp (a barrier that can never be passed is reported);
 *   - ldmatrix.x4 (.trans): lanes 8i..8i+7 give the row addresses of matrix i; lane l receives
 *     row l/4, columns 2(l%4), 2(l%4)+1 of each matrix (of its transpose with .trans); row
 *     addresses must be 16-byte aligned and inside the block's shared memory;
 *   - mma.m16n8k16 bf16 -> fp32: the warp's A (16x16), B (16x8) and C (16x8) are assembled from
 *     all lanes' registers by the PTX fragment layout, D = A B + C in fp32;
 *   - wgmma.m64n64k16 bf16 -> fp32: the block's A (64x16) from its 4 warps' registers or from
 *     shared memory, B (16x64) from shared memory, through matrix descriptors by the PTX ISA's
 *     canonical no-swizzle layouts (K-major or MN-major), D = A B + C as mma does; executed at
 *     the wgmma.wait_group that waits for its group, the latest moment the ISA allows, so that
 *     an accumulator read before that wait, or A registers or B tiles changed before it, give
 *     other values;
 *   - cp.async: the copies of a committed group land only when a cp.async.wait_group lets them
 *     (mode "late": a read before the wait sees stale data), or at once when issued (mode
 *     "early": a prefetch that overwrites a stage still being read corrupts it);
 *   - shared memory starts as NaN, so a read of an element nothing wrote shows up in the output.
 *
 *   attention_flash_emu IN OUT early|late
 *     IN : int32 B, T, NH, NKV, HS, RW, DQ_RW (the row tiles per warp of the forward and of the
 *          backward's dQ pass, each 1 or 2 with HS 64), lpt (the grid order, 0 grouped or 1
 *          lpt, for all three kernels), qreg and kvreg (1: the dQ pass's Q and dO fragments,
 *          the dK/dV pass's K and V fragments held in registers; kvreg 2: the dK/dV pass with
 *          two key row tiles a warp; HS 64), wg (bits 0, 1, 2: the
 *          forward, the dQ pass, the dK/dV pass with warpgroup products; bits 3, 4: the dQ and
 *          dK/dV passes with warpgroup products reading every operand from shared memory; bits
 *          5, 6: the pipelined warpgroup forward with one or two warpgroups a block, at most one
 *          of bits 0, 5, 6; bits 7, 8: the pipelined warpgroup dQ pass likewise, at most one of
 *          bits 1, 3, 7, 8; bits 9, 10: the pipelined warpgroup dK/dV pass likewise, at most one
 *          of bits 2, 4, 9, 10; bits 11, 12: the pipelined forward and dQ pass with their
 *          warpgroups on the query heads of a kv head (flash_heads_per_block's, the group of
 *          heads divisible by 2 or 3), at most one of bits 0, 5, 6, 11 and of 1, 3, 7, 8, 12;
 *          HS 64, one row tile each), eager (1: the forward's softmax
 *          reference is the running max, flash_forward_max_slack 0), rope (1: the backward takes dQ and dK back through RoPE in
 *          its epilogue; 2: rope_backward's rotation on the host after the backward; 0: none;
 *          the table as rope_table_host's, theta 10000), rope_fwd (1: the k heads rotated by
 *          rope_forward's arithmetic on the host, then the forward rotating the q heads as it
 *          loads them and storing them back into qkv; 2: the q and k heads rotated on the host
 *          before the forward; 0: none); then float32 qkv (B, T, QKV), dout (B, T, NH*HS), all
 *          values representable in bf16
 *     OUT: float32 out (B, T, NH*HS), lse (B, NH, T), dqkv (B, T, QKV), qkv (B, T, QKV) as the
 *          forward left it (the backward reads that)
 */
#define ATTENTION_FLASH_EMULATION
#define EMU_PROGRAM "attention_flash_emu"
#include "gpu_emu_flash.h"
static inline float __fmul_rn(float a, float b) { return a * b; }   // the product rounded once, as C++'s float *

#include "attention_flash.cuh"

// ---------------------------------------------------------------------------------------------

// the launchers' grids (flash_grid in attention_flash.cuh): lpt (heads, batch, tiles), else
// (tiles, heads, batch)
static Dim3 grid_of(int lpt, int heads, int B, int tiles) {
    return lpt ? Dim3{(unsigned)heads, (unsigned)B, (unsigned)tiles} : Dim3{(unsigned)tiles, (unsigned)heads, (unsigned)B};
}

// wg: bit 0 the forward, bit 1 the dQ pass, bit 2 the dK/dV pass with warpgroup products (head
// size 64, one row tile; the dQ pass with Q and dO, the dK/dV pass with K and V in registers);
// bits 3 and 4 the dQ and dK/dV passes with warpgroup products reading those from shared memory
template <int HS, int RW, int DQ_RW, int QREG, int KVREG>
static void run(floatX *out, float *lse, floatX *dqkv, float *D, floatX *qkv, const floatX *dout, int B, int T,
                int NH, int NKV, int lpt, int wg, const float *rope, const float *rope_fwd) {
    floatX *q_rotated = qkv;   // where the forward stores its rotated queries (rope_fwd only)
    Dim3 grid_kv = grid_of(lpt, NKV, B, (T + FLASH_ROWS - 1) / FLASH_ROWS);
    Dim3 grid_q = grid_of(lpt, NH, B, (T + DQ_RW * FLASH_ROWS - 1) / (DQ_RW * FLASH_ROWS));
    Dim3 grid_fwd = grid_of(lpt, NH, B, (T + RW * FLASH_ROWS - 1) / (RW * FLASH_ROWS));
    constexpr bool wg_ok = HS == 64 && RW == 1 && DQ_RW == 1;
    if constexpr (wg_ok) {
        if (wg & 1)
            launch(grid_fwd, FLASH_THREADS, flash_forward_smem<HS, 1, 1>(),
                   [=] {
                       if (rope_fwd) flash_attention_forward_kernel<HS, 1, 0, 1, 1>(out, lse, qkv, T, NH, NKV, lpt, flash_forward_max_slack,
                                                                                    rope_fwd, q_rotated);
                       else flash_attention_forward_kernel<HS, 1, 0, 1>(out, lse, qkv, T, NH, NKV, lpt, flash_forward_max_slack);
                   });
    }
    const int heads = HS == 64 ? flash_heads_per_block(NH, NKV) : 0;   // bits 11, 12: warpgroups on the heads
    if constexpr (wg_ok) {
        if (wg & 2048) {   // the pipelined forward with its warpgroups on the query heads of a kv head
            Dim3 grid_h = grid_of(lpt, NH / heads, B, (T + FLASH_ROWS - 1) / FLASH_ROWS);
            size_t smem = heads == 3 ? flash_forward_pipelined_smem<3>() : flash_forward_pipelined_smem<2>();
            launch(grid_h, heads * FLASH_THREADS, smem, [=] {
                float slack = flash_forward_max_slack;
                if (heads == 3) flash_attention_forward_pipelined_kernel<3, 0, 1>(out, lse, qkv, T, NH, NKV, lpt, slack);
                else flash_attention_forward_pipelined_kernel<2, 0, 1>(out, lse, qkv, T, NH, NKV, lpt, slack);
            });
        }
        for (int wgs = 1; wgs <= 2; wgs++) {   // the pipelined forward with one (bit 5) or two (bit 6) warpgroups a block
            if (!(wg & (16 << wgs))) continue;
            Dim3 grid_p = grid_of(lpt, NH, B, (T + wgs * FLASH_ROWS - 1) / (wgs * FLASH_ROWS));
            size_t smem = wgs == 1 ? flash_forward_pipelined_smem<1>() : flash_forward_pipelined_smem<2>();
            launch(grid_p, wgs * FLASH_THREADS, smem, [=] {
                float slack = flash_forward_max_slack;
                if (wgs == 1 && rope_fwd) flash_attention_forward_pipelined_kernel<1, 1>(out, lse, qkv, T, NH, NKV, lpt, slack, rope_fwd, q_rotated);
                else if (wgs == 1) flash_attention_forward_pipelined_kernel<1>(out, lse, qkv, T, NH, NKV, lpt, slack);
                else if (rope_fwd) flash_attention_forward_pipelined_kernel<2, 1>(out, lse, qkv, T, NH, NKV, lpt, slack, rope_fwd, q_rotated);
                else flash_attention_forward_pipelined_kernel<2>(out, lse, qkv, T, NH, NKV, lpt, slack);
            });
        }
    }
    if (!wg_ok || !(wg & (1 | 32 | 64 | 2048)))
        launch(grid_fwd, FLASH_THREADS, flash_forward_smem<HS, RW>(),
               [=] {
                   if (rope_fwd) flash_attention_forward_kernel<HS, RW, 0, 0, 1>(out, lse, qkv, T, NH, NKV, lpt, flash_forward_max_slack,
                                                                                rope_fwd, q_rotated);
                   else flash_attention_forward_kernel<HS, RW>(out, lse, qkv, T, NH, NKV, lpt, flash_forward_max_slack);
               });
    size_t threads_pre = (size_t)B * T * NH * (HS / 8);
    launch(Dim3{(unsigned)((threads_pre + 255) / 256), 1, 1}, 256, 0,
           [=] { flash_attention_backward_preprocess_kernel<HS>(D, dout, out, B, T, NH); });
    if constexpr (wg_ok) {
        for (int wgs = 1; wgs <= 2; wgs++) {   // the pipelined dK/dV pass with one (bit 9) or two (bit 10) warpgroups a block
            if (!(wg & (256 << wgs))) continue;
            Dim3 grid_p = grid_of(lpt, NKV, B, (T + wgs * FLASH_ROWS - 1) / (wgs * FLASH_ROWS));
            size_t smem = wgs == 1 ? flash_dkv_pipelined_smem<1>() : flash_dkv_pipelined_smem<2>();
            launch(grid_p, wgs * FLASH_THREADS, smem, [=] {
                if (wgs == 1) flash_attention_backward_dkv_pipelined_kernel<1>(dqkv, dout, qkv, lse, D, T, NH, NKV, lpt, rope);
                else flash_attention_backward_dkv_pipelined_kernel<2>(dqkv, dout, qkv, lse, D, T, NH, NKV, lpt, rope);
            });
        }
        if (wg & 4)
            launch(grid_kv, FLASH_THREADS, flash_dkv_smem<HS, 1>(),
                   [=] { flash_attention_backward_dkv_kernel<HS, 0, 1, 1>(dqkv, dout, qkv, lse, D, T, NH, NKV, lpt, rope); });
        else if (wg & 16)
            launch(grid_kv, FLASH_THREADS, flash_dkv_smem<HS, 2>(),
                   [=] { flash_attention_backward_dkv_kernel<HS, 0, 0, 2>(dqkv, dout, qkv, lse, D, T, NH, NKV, lpt, rope); });
        if (wg & 4096) {   // the pipelined dQ pass with its warpgroups on the query heads of a kv head
            Dim3 grid_h = grid_of(lpt, NH / heads, B, (T + FLASH_ROWS - 1) / FLASH_ROWS);
            size_t smem = heads == 3 ? flash_dq_pipelined_smem<3>() : flash_dq_pipelined_smem<2>();
            launch(grid_h, heads * FLASH_THREADS, smem, [=] {
                if (heads == 3) flash_attention_backward_dq_pipelined_kernel<3, 1>(dqkv, dout, qkv, lse, D, T, NH, NKV, lpt, rope);
                else flash_attention_backward_dq_pipelined_kernel<2, 1>(dqkv, dout, qkv, lse, D, T, NH, NKV, lpt, rope);
            });
        }
        for (int wgs = 1; wgs <= 2; wgs++) {   // the pipelined dQ pass with one (bit 7) or two (bit 8) warpgroups a block
            if (!(wg & (64 << wgs))) continue;
            Dim3 grid_p = grid_of(lpt, NH, B, (T + wgs * FLASH_ROWS - 1) / (wgs * FLASH_ROWS));
            size_t smem = wgs == 1 ? flash_dq_pipelined_smem<1>() : flash_dq_pipelined_smem<2>();
            launch(grid_p, wgs * FLASH_THREADS, smem, [=] {
                if (wgs == 1) flash_attention_backward_dq_pipelined_kernel<1>(dqkv, dout, qkv, lse, D, T, NH, NKV, lpt, rope);
                else flash_attention_backward_dq_pipelined_kernel<2>(dqkv, dout, qkv, lse, D, T, NH, NKV, lpt, rope);
            });
        }
        if (wg & 2)
            launch(grid_q, FLASH_THREADS, flash_dq_smem<HS, 1, 1>(),
                   [=] { flash_attention_backward_dq_kernel<HS, 1, 1, 1>(dqkv, dout, qkv, lse, D, T, NH, NKV, lpt, rope); });
        else if (wg & 8)
            launch(grid_q, FLASH_THREADS, flash_dq_smem<HS, 1, 2>(),
                   [=] { flash_attention_backward_dq_kernel<HS, 1, 0, 2>(dqkv, dout, qkv, lse, D, T, NH, NKV, lpt, rope); });
    }
    if constexpr (KVREG == 2) {   // two key row tiles a warp: blocks of 128 key rows
        Dim3 grid_kv2 = grid_of(lpt, NKV, B, (T + 2 * FLASH_ROWS - 1) / (2 * FLASH_ROWS));
        launch(grid_kv2, FLASH_THREADS, flash_dkv_smem<HS, 0, 2>(),
               [=] { flash_attention_backward_dkv_kernel<HS, 0, 0, 0, 2>(dqkv, dout, qkv, lse, D, T, NH, NKV, lpt, rope); });
    } else if (!wg_ok || !(wg & (4 | 16 | 512 | 1024))) {
        launch(grid_kv, FLASH_THREADS, flash_dkv_smem<HS>(),
               [=] { flash_attention_backward_dkv_kernel<HS, 0, KVREG>(dqkv, dout, qkv, lse, D, T, NH, NKV, lpt, rope); });
    }
    if (!wg_ok || !(wg & (2 | 8 | 128 | 256 | 4096)))
        launch(grid_q, FLASH_THREADS, flash_dq_smem<HS, DQ_RW>(),
               [=] { flash_attention_backward_dq_kernel<HS, DQ_RW, QREG>(dqkv, dout, qkv, lse, D, T, NH, NKV, lpt, rope); });
}

// run<64, RW, ...> for the backward's variants: dQ row tiles, Q and dO in registers (one row
// tile), the dK/dV pass's K and V in registers (kvreg 1) or two key row tiles a warp (kvreg 2)
template <int RW, int KVREG>
static void run64_kv(int DQ_RW, int qreg, floatX *out, float *lse, floatX *dqkv, float *D, floatX *qkv,
                     const floatX *dout, int B, int T, int NH, int NKV, int lpt, int wg, const float *rope,
                     const float *rope_fwd) {
    if (DQ_RW == 2) run<64, RW, 2, 0, KVREG>(out, lse, dqkv, D, qkv, dout, B, T, NH, NKV, lpt, wg, rope, rope_fwd);
    else if (qreg) run<64, RW, 1, 1, KVREG>(out, lse, dqkv, D, qkv, dout, B, T, NH, NKV, lpt, wg, rope, rope_fwd);
    else run<64, RW, 1, 0, KVREG>(out, lse, dqkv, D, qkv, dout, B, T, NH, NKV, lpt, wg, rope, rope_fwd);
}
template <int RW>
static void run64(int DQ_RW, int qreg, int kvreg, floatX *out, float *lse, floatX *dqkv, float *D, floatX *qkv,
                  const floatX *dout, int B, int T, int NH, int NKV, int lpt, int wg, const float *rope,
                  const float *rope_fwd) {
    if (kvreg == 2) run64_kv<RW, 2>(DQ_RW, qreg, out, lse, dqkv, D, qkv, dout, B, T, NH, NKV, lpt, wg, rope, rope_fwd);
    else if (kvreg) run64_kv<RW, 1>(DQ_RW, qreg, out, lse, dqkv, D, qkv, dout, B, T, NH, NKV, lpt, wg, rope, rope_fwd);
    else run64_kv<RW, 0>(DQ_RW, qreg, out, lse, dqkv, D, qkv, dout, B, T, NH, NKV, lpt, wg, rope, rope_fwd);
}

// RoPE's table as rope_table_host builds it (theta 10000): (T, HS/2) pairs of (cos, sin)
static std::vector<float> rope_table(int T, int HS) {
    std::vector<float> cs((size_t)T * HS);
    for (int t = 0; t < T; t++)
        for (int i = 0; i < HS / 2; i++) {
            double angle = (double)t * pow(10000.0, -2.0 * i / HS);
            cs[((size_t)t * (HS / 2) + i) * 2] = (float)cos(angle);
            cs[((size_t)t * (HS / 2) + i) * 2 + 1] = (float)sin(angle);
        }
    return cs;
}

// RoPE's rotation of the heads from first_head on of x (B, T, QKV) on the host, with the kernels'
// expressions (rope_rotate, the sine times sign, bf16 in and out): rope_forward's (first_head 0,
// sign +1), rope_forward_keys' (first_head NH) and rope_backward's (first_head 0, sign -1)
static void rope_host(floatX *x_all, const float *cs, int B, int T, int NH, int NKV, int HS, int first_head, float sign) {
    int half = HS / 2, QKV = (NH + 2 * NKV) * HS;
    for (int bt = 0; bt < B * T; bt++)
        for (int h = first_head; h < NH + NKV; h++)
            for (int i = 0; i < half; i++) {
                const float *pair = cs + ((size_t)(bt % T) * half + i) * 2;
                floatX *x = x_all + (size_t)bt * QKV + (size_t)h * HS;
                float y1, y2;
                rope_rotate(to_f32(x[i]), to_f32(x[i + half]), pair[0], sign * pair[1], &y1, &y2);
                x[i] = to_bf16(y1);
                x[i + half] = to_bf16(y2);
            }
}

int main(int argc, char **argv) {
    if (argc != 4 || (strcmp(argv[3], "early") != 0 && strcmp(argv[3], "late") != 0)) {
        fprintf(stderr, "usage: %s IN OUT early|late\n", argv[0]);
        return 1;
    }
    copies_land_early = strcmp(argv[3], "early") == 0;
    FILE *f = fopen(argv[1], "rb");
    if (!f) { fprintf(stderr, "error: cannot open %s\n", argv[1]); return 1; }
    int32_t dims[14];
    if (fread(dims, sizeof(int32_t), 14, f) != 14) { fprintf(stderr, "error: %s: no header\n", argv[1]); return 1; }
    int rope_mode = dims[12], rope_fwd_mode = dims[13];
    int B = dims[0], T = dims[1], NH = dims[2], NKV = dims[3], HS = dims[4], RW = dims[5], DQ_RW = dims[6], lpt = dims[7];
    int qreg = dims[8], kvreg = dims[9], wg = dims[10];
    if (dims[11]) flash_forward_max_slack = 0.0f;
    if (B < 1 || T < 1 || NH < 1 || NKV < 1 || NH % NKV != 0 || !attention_flash_supports(HS) || RW < 1 || RW > 2 ||
        (RW == 2 && HS != 64) || DQ_RW < 1 || DQ_RW > 2 || (DQ_RW == 2 && HS != 64) ||
        ((qreg || kvreg) && HS != 64) || kvreg < 0 || kvreg > 2 || (kvreg == 2 && (wg & (4 | 16 | 512 | 1024))) || (qreg && DQ_RW != 1) || wg < 0 || wg > 8191 ||
        __builtin_popcount(wg & (1 | 32 | 64 | 2048)) > 1 || __builtin_popcount(wg & (2 | 8 | 128 | 256 | 4096)) > 1 ||
        ((wg & (2048 | 4096)) && (HS != 64 || flash_heads_per_block(NH, NKV) == 0)) ||
        __builtin_popcount(wg & (4 | 16 | 512 | 1024)) > 1 ||
        (wg && (HS != 64 || RW != 1 || DQ_RW != 1)) || rope_mode < 0 || rope_mode > 2 ||
        rope_fwd_mode < 0 || rope_fwd_mode > 2) {
        fprintf(stderr, "error: %s: bad shape B=%d T=%d NH=%d NKV=%d HS=%d row tiles %d, dQ %d\n", argv[1], B, T, NH,
                NKV, HS, RW, DQ_RW);
        return 1;
    }
    int QKV = (NH + 2 * NKV) * HS;
    size_t n_qkv = (size_t)B * T * QKV, n_out = (size_t)B * T * NH * HS, n_stat = (size_t)B * NH * T;
    std::vector<float> qkv_f = read_floats(f, n_qkv, argv[1]), dout_f = read_floats(f, n_out, argv[1]);
    fclose(f);
    // device buffers: 16-byte aligned like cudaMalloc's, outputs poisoned with NaN
    auto alloc = [](size_t bytes, int fill) {
        void *p = aligned_alloc(256, (bytes + 255) / 256 * 256);
        if (!p) emu_fail("out of memory");
        memset(p, fill, bytes);
        return p;
    };
    floatX *qkv = (floatX *)alloc(n_qkv * 2, 0), *dout = (floatX *)alloc(n_out * 2, 0);
    for (size_t i = 0; i < n_qkv; i++) qkv[i] = to_bf16(qkv_f[i]);
    for (size_t i = 0; i < n_out; i++) dout[i] = to_bf16(dout_f[i]);
    floatX *out = (floatX *)alloc(n_out * 2, 0xff), *dqkv = (floatX *)alloc(n_qkv * 2, 0xff);
    float *lse = (float *)alloc(n_stat * 4, 0xff), *D = (float *)alloc(n_stat * 4, 0xff);
    std::vector<float> table = rope_table(T, HS);
    const float *rope = rope_mode == 1 ? table.data() : NULL, *rope_fwd = rope_fwd_mode == 1 ? table.data() : NULL;
    if (rope_fwd_mode) rope_host(qkv, table.data(), B, T, NH, NKV, HS, rope_fwd_mode == 1 ? NH : 0, 1.0f);
    if (HS == 64 && RW == 2) run64<2>(DQ_RW, qreg, kvreg, out, lse, dqkv, D, qkv, dout, B, T, NH, NKV, lpt, wg, rope, rope_fwd);
    else if (HS == 64) run64<1>(DQ_RW, qreg, kvreg, out, lse, dqkv, D, qkv, dout, B, T, NH, NKV, lpt, wg, rope, rope_fwd);
    else run<128, 1, 1, 0, 0>(out, lse, dqkv, D, qkv, dout, B, T, NH, NKV, lpt, wg, rope, rope_fwd);
    if (rope_mode == 2) rope_host(dqkv, table.data(), B, T, NH, NKV, HS, 0, -1.0f);

    FILE *o = fopen(argv[2], "wb");
    if (!o) { fprintf(stderr, "error: cannot create %s\n", argv[2]); return 1; }
    std::vector<float> x;
    for (size_t i = 0; i < n_out; i++) x.push_back(to_f32(out[i]));
    x.insert(x.end(), lse, lse + n_stat);
    for (size_t i = 0; i < n_qkv; i++) x.push_back(to_f32(dqkv[i]));
    for (size_t i = 0; i < n_qkv; i++) x.push_back(to_f32(qkv[i]));
    if (fwrite(x.data(), sizeof(float), x.size(), o) != x.size() || fclose(o) != 0) {
        fprintf(stderr, "error: cannot write %s\n", argv[2]);
        return 1;
    }
    printf("attention_flash_emu B=%d T=%d NH=%d NKV=%d HS=%d row tiles %d, dQ %d, %s grid, copies %s: done\n", B, T, NH,
           NKV, HS, RW, DQ_RW, lpt ? "lpt" : "grouped", argv[3]);
    return 0;
}
