/*
 * Philox4x32-10 (llmc/philox.h, the GPU sampler's random numbers) against the known-answer
 * vectors of Random123 (kat_vectors, "philox4x32 10" lines: counter, key, expected output), and
 * the open-interval uniform map: never 0 or 1, mean 1/2 over many draws.
 */
#include <math.h>
#include <stdio.h>
#include "llmc/philox.h"

int main(void) {
    static const uint32_t kat[3][10] = {
        {0x00000000u, 0x00000000u, 0x00000000u, 0x00000000u, 0x00000000u, 0x00000000u,
         0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u},
        {0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu,
         0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu},
        {0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u, 0xa4093822u, 0x299f31d0u,
         0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u},
    };
    int failures = 0;
    for (int i = 0; i < 3; i++) {
        Philox4x32 c = {{kat[i][0], kat[i][1], kat[i][2], kat[i][3]}};
        Philox4x32 out = philox4x32_10(c, kat[i][4], kat[i][5]);
        int ok = 1;
        for (int j = 0; j < 4; j++) ok &= out.v[j] == kat[i][6 + j];
        printf("%s philox4x32-10 known answer %d: %08x %08x %08x %08x (expected %08x %08x %08x %08x)\n", ok ? "PASS" : "FAIL",
               i, out.v[0], out.v[1], out.v[2], out.v[3], kat[i][6], kat[i][7], kat[i][8], kat[i][9]);
        failures += !ok;
    }
    // uniform map: extremes and the mean over 2^20 draws of the sampling stream
    float lo = philox_uniform_open(0u), hi = philox_uniform_open(0xffffffffu);
    int ends_ok = lo > 0.0f && hi < 1.0f && isfinite(-logf(-logf(lo))) && isfinite(-logf(-logf(hi)));
    printf("%s uniform map: u(0) = %.9g > 0, u(2^32-1) = %.9g < 1, Gumbel finite at both\n", ends_ok ? "PASS" : "FAIL", lo, hi);
    failures += !ends_ok;
    double sum = 0.0;
    const int groups = 1 << 18;
    for (int g = 0; g < groups; g++) {
        Philox4x32 r = philox_sampling_block(0x0123456789abcdefULL, (uint32_t)g, 7u);
        for (int j = 0; j < 4; j++) sum += philox_uniform_open(r.v[j]);
    }
    double mean = sum / (4.0 * groups), sigma = sqrt(1.0 / 12.0 / (4.0 * groups));
    int mean_ok = fabs(mean - 0.5) < 5.0 * sigma;
    printf("%s mean of %d uniforms %.6f (expected 0.5 +- %.6f at 5 sigma)\n", mean_ok ? "PASS" : "FAIL", 4 * groups, mean, 5.0 * sigma);
    failures += !mean_ok;
    printf("%s\n", failures ? "FAIL" : "PASS");
    return failures ? 1 : 0;
}
