/*
 * Deterministic random numbers: xorshift64* with a 64-bit state that checkpoints save, so a
 * resumed run draws the same numbers as an uninterrupted one.
 */
#ifndef LLMC_RAND_H
#define LLMC_RAND_H
#include <stdint.h>
#include <math.h>

static inline uint32_t random_u32(uint64_t *state) {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    return (uint32_t)((*state * 0x2545F4914F6CDD1DULL) >> 32);
}
// uniform in [0, 1)
static inline float random_f32(uint64_t *state) {
    return (float)(random_u32(state) >> 8) / 16777216.0f;
}
// standard normal (Box-Muller)
static inline float random_normal(uint64_t *state) {
    float u1 = random_f32(state), u2 = random_f32(state);
    if (u1 < 1e-12f) u1 = 1e-12f;
    return sqrtf(-2.0f * logf(u1)) * cosf(6.28318530717958647692f * u2);
}
// a non-zero state from any seed (splitmix64)
static inline uint64_t rng_seed(uint64_t seed) {
    uint64_t z = seed + 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    z = z ^ (z >> 31);
    return z ? z : 0x1234567ULL;
}
#endif
