/*
 * llmc/stats.h against reference values: Student's t quantiles and the regularised incomplete
 * beta function from SciPy (scipy.stats.t.ppf, scipy.special.betainc; the t quantiles are the
 * printed tables' values), covering both sides of the continued fraction's switch and degrees of
 * freedom from 1 to 100000; and a mean with its standard error worked by hand.
 */
#include <math.h>
#include <stdio.h>
#include "llmc/stats.h"

int main(void) {
    static const double quantiles[][3] = {   // df, p, t
        {1, 0.9, 3.0776835371752544},      {1, 0.975, 12.706204736174694},    {1, 0.995, 63.656741162871526},
        {2, 0.9, 1.8856180831641272},      {2, 0.975, 4.302652729749462},     {2, 0.995, 9.924843200918287},
        {3, 0.9, 1.637744353696209},       {3, 0.975, 3.1824463052837078},    {3, 0.995, 5.840909309733355},
        {5, 0.9, 1.4758840488244815},      {5, 0.975, 2.5705818356363146},    {5, 0.995, 4.032142983555228},
        {10, 0.9, 1.372183641110336},      {10, 0.975, 2.228138851986274},    {10, 0.995, 3.16927267261695},
        {23, 0.9, 1.3194602398161621},     {23, 0.975, 2.0686576104190486},   {23, 0.995, 2.807335683769999},
        {100, 0.9, 1.290074761346516},     {100, 0.975, 1.9839715185235518},  {100, 0.995, 2.6258905214380173},
        {1000, 0.9, 1.2823987214609247},   {1000, 0.975, 1.9623390808264083}, {1000, 0.995, 2.580754698065951},
        {100000, 0.9, 1.2815600314493614}, {100000, 0.975, 1.9599877075346095}, {100000, 0.995, 2.575878469908375},
    };
    static const double betas[][4] = {   // x, a, b, I_x(a, b)
        {0.1, 0.5, 0.5, 0.20483276469913345},   {0.9, 0.5, 0.5, 0.7951672353008665},
        {0.3, 2.0, 3.0, 0.34829999999999994},   {0.8, 2.0, 3.0, 0.9728},
        {0.99, 50.0, 0.5, 0.3173043978741973},  {0.5, 11.5, 0.5, 7.74498864229807e-05},
        {0.999, 500.0, 0.5, 0.31731044730971725}, {0.02, 0.5, 7.0, 0.39863362384560364},
    };
    int failures = 0;
    for (size_t i = 0; i < sizeof quantiles / sizeof quantiles[0]; i++) {
        double df = quantiles[i][0], p = quantiles[i][1], want = quantiles[i][2];
        double got = student_t_quantile(p, df), rel = fabs(got - want) / want;
        int ok = rel < 1e-9;
        printf("%s t quantile df %g p %g: %.15g (reference %.15g, rel err %.1e)\n", ok ? "PASS" : "FAIL", df, p, got, want, rel);
        failures += !ok;
    }
    for (size_t i = 0; i < sizeof betas / sizeof betas[0]; i++) {
        double x = betas[i][0], a = betas[i][1], b = betas[i][2], want = betas[i][3];
        double got = incomplete_beta(x, a, b), rel = fabs(got - want) / want;
        int ok = rel < 1e-11;
        printf("%s I_%g(%g, %g): %.15g (reference %.15g, rel err %.1e)\n", ok ? "PASS" : "FAIL", x, a, b, got, want, rel);
        failures += !ok;
    }
    // 1, 2, 3, 4: mean 2.5, sample variance 5/3, standard error sqrt(5/3 / 4)
    const double x[8] = {1, -9, 2, -9, 3, -9, 4, -9};
    double mean, se;
    mean_and_stderr(x, 4, 2, &mean, &se);
    int ok = fabs(mean - 2.5) < 1e-15 && fabs(se - sqrt(5.0 / 12.0)) < 1e-15;
    printf("%s mean and standard error of 1, 2, 3, 4 (stride 2): %.17g %.17g\n", ok ? "PASS" : "FAIL", mean, se);
    failures += !ok;
    mean_and_stderr(x, 1, 2, &mean, &se);
    ok = mean == 1.0 && isnan(se);
    printf("%s one value: mean %g, standard error %g (none)\n", ok ? "PASS" : "FAIL", mean, se);
    failures += !ok;
    printf("%d failure(s)\n", failures);
    return failures != 0;
}
