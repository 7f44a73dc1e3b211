/*
 * mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 under the GPU emulation of test/gpu_emu.h,
 * from the PTX ISA's fragment layouts (lane = 0..31, g = lane / 4, c = lane % 4; a register holds
 * two bf16, the lower k or column index in the low half):
 *   A (16 x 16)  a0 = A[g][2c..2c+1]  a1 = A[g+8][2c..2c+1]  a2 = A[g][2c+8..2c+9]  a3 = A[g+8][2c+8..2c+9]
 *   B (16 x 8)   b0 = B[2c..2c+1][g]  b1 = B[2c+8..2c+9][g]
 *   C (16 x 8)   c0, c1 = C[g][2c..2c+1]  c2, c3 = C[g+8][2c..2c+1]
 * The warp's lanes exchange their fragments and accumulators through a warp barrier; each
 * accumulator element then becomes c + the 16 products, added in fp32, k in order.
 */
#ifndef TEST_GPU_EMU_MMA_H
#define TEST_GPU_EMU_MMA_H
#include "gpu_emu.h"

static inline float lo_f32(uint32_t v) { return to_f32(floatX{(uint16_t)(v & 0xffff)}); }
static inline float hi_f32(uint32_t v) { return to_f32(floatX{(uint16_t)(v >> 16)}); }
// The warp's product is computed once, by the first lane to run after the exchange, for all 32
// lanes: the same arithmetic for each element as if its lane computed it.
static float emu_mma_d[32][32][4];   // [warp][lane][element]
static int emu_mma_ran[32];          // lanes of the warp past the exchange
static void emu_mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    WarpExchange &x = my_warp();
    int lane = lane_id(), warp = current_thread / 32;
    for (int i = 0; i < 4; i++) x.u[lane][i] = a[i];
    x.u[lane][4] = b0;
    x.u[lane][5] = b1;
    for (int e = 0; e < 4; e++) x.f[lane][e] = d[e];
    warp_barrier();
    if (emu_mma_ran[warp]++ == 0) {
        float A[16][16], B[16][8];
        for (int l = 0; l < 32; l++) {
            int g = l / 4, t = l % 4;
            A[g][2 * t] = lo_f32(x.u[l][0]);         A[g][2 * t + 1] = hi_f32(x.u[l][0]);
            A[g + 8][2 * t] = lo_f32(x.u[l][1]);     A[g + 8][2 * t + 1] = hi_f32(x.u[l][1]);
            A[g][2 * t + 8] = lo_f32(x.u[l][2]);     A[g][2 * t + 9] = hi_f32(x.u[l][2]);
            A[g + 8][2 * t + 8] = lo_f32(x.u[l][3]); A[g + 8][2 * t + 9] = hi_f32(x.u[l][3]);
            B[2 * t][g] = lo_f32(x.u[l][4]);         B[2 * t + 1][g] = hi_f32(x.u[l][4]);
            B[2 * t + 8][g] = lo_f32(x.u[l][5]);     B[2 * t + 9][g] = hi_f32(x.u[l][5]);
        }
        for (int l = 0; l < 32; l++) {
            int g = l / 4, t = l % 4;
            int rows[4] = {g, g, g + 8, g + 8}, cols[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
            for (int e = 0; e < 4; e++) {
                float sum = x.f[l][e];
                for (int k = 0; k < 16; k++) sum += A[rows[e]][k] * B[k][cols[e]];
                emu_mma_d[warp][l][e] = sum;
            }
        }
    }
    if (emu_mma_ran[warp] == 32) emu_mma_ran[warp] = 0;
    for (int e = 0; e < 4; e++) d[e] = emu_mma_d[warp][lane][e];
    warp_barrier();
}
#endif
