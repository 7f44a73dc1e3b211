/*
 * Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011), the
 * counter-based generator of Random123 and cuRAND: four 32-bit outputs are a pure function of a
 * 128-bit counter and a 64-bit key. The GPU sampler (sampling.cuh) draws the random number of
 * token v of sequence i at decode step s as philox(key = the sequence's seed, counter = (v / 4,
 * s, domain, 0)) lane v % 4, so a sequence's draws do not depend on which other sequences share
 * its batch, on the batch order, or on the thread that computes them.
 *
 * Plain C, usable from host code (the CPU references in the harnesses, test/test_philox.c checks
 * it against Random123's known-answer vectors) and from device code.
 */
#ifndef LLMC_PHILOX_H
#define LLMC_PHILOX_H
#include <stdint.h>

#ifdef __CUDACC__
#define PHILOX_HD __host__ __device__ __forceinline__
#else
#define PHILOX_HD static inline
#endif

#define PHILOX_M0 0xD2511F53u
#define PHILOX_M1 0xCD9E8D57u
#define PHILOX_W0 0x9E3779B9u   // golden ratio
#define PHILOX_W1 0xBB67AE85u   // sqrt(3) - 1

typedef struct { uint32_t v[4]; } Philox4x32;

// One Philox round on counter c with round key (k0, k1).
PHILOX_HD Philox4x32 philox_round(Philox4x32 c, uint32_t k0, uint32_t k1) {
    uint64_t p0 = (uint64_t)PHILOX_M0 * c.v[0], p1 = (uint64_t)PHILOX_M1 * c.v[2];
    uint32_t hi0 = (uint32_t)(p0 >> 32), lo0 = (uint32_t)p0, hi1 = (uint32_t)(p1 >> 32), lo1 = (uint32_t)p1;
    Philox4x32 out;
    out.v[0] = hi1 ^ c.v[1] ^ k0;
    out.v[1] = lo1;
    out.v[2] = hi0 ^ c.v[3] ^ k1;
    out.v[3] = lo0;
    return out;
}

// Philox4x32 with 10 rounds: the key is bumped by the Weyl constants between rounds.
PHILOX_HD Philox4x32 philox4x32_10(Philox4x32 counter, uint32_t key0, uint32_t key1) {
    Philox4x32 c = counter;
    for (int r = 0; r < 10; r++) {
        c = philox_round(c, key0, key1);
        key0 += PHILOX_W0;
        key1 += PHILOX_W1;
    }
    return c;
}

// A uniform in the open interval (0, 1) from 32 random bits: 23 bits and half a step (k + 0.5
// for k < 2^23 is exact in a float; with 24 bits the largest value would round up to 1), so
// neither 0 nor 1 occurs and -log(-log(u)) (the Gumbel variate) is always finite.
PHILOX_HD float philox_uniform_open(uint32_t bits) {
    return ((float)(bits >> 9) + 0.5f) * (1.0f / 8388608.0f);
}

// The counter word that separates the sampler's draws from any other use of the same key.
#define PHILOX_DOMAIN_SAMPLING 0x53414D50u   // "SAMP"

// The four uniforms covering tokens 4*group .. 4*group+3 of the draw at decode step `step` of
// the sequence whose 64-bit key is `key`.
PHILOX_HD Philox4x32 philox_sampling_block(uint64_t key, uint32_t group, uint32_t step) {
    Philox4x32 c;
    c.v[0] = group;
    c.v[1] = step;
    c.v[2] = PHILOX_DOMAIN_SAMPLING;
    c.v[3] = 0u;
    return philox4x32_10(c, (uint32_t)key, (uint32_t)(key >> 32));
}
#endif
