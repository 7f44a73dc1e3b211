/*
 * The statistics of eval's report (mora.c): the mean and its standard error, and the quantiles of
 * Student's t distribution for confidence intervals. Header-only; test/test_stats.c checks the
 * quantiles and the incomplete beta function against reference values.
 */
#ifndef LLMC_STATS_H
#define LLMC_STATS_H

#include <math.h>
#include <stddef.h>

// The regularised incomplete beta function I_x(a, b), by its continued fraction (modified
// Lentz), on the side where it converges fast (x < (a + 1) / (a + b + 2), else 1 - I_{1-x}(b, a)).
static inline double incomplete_beta_cf(double x, double a, double b) {
    const double tiny = 1e-300;
    double c = 1.0, d = 1.0 - (a + b) * x / (a + 1.0);
    if (fabs(d) < tiny) d = tiny;
    d = 1.0 / d;
    double h = d;
    for (int m = 1; m <= 300; m++) {
        double m2 = 2.0 * m;
        double num = m * (b - m) * x / ((a + m2 - 1.0) * (a + m2));
        d = 1.0 + num * d; if (fabs(d) < tiny) d = tiny;
        c = 1.0 + num / c; if (fabs(c) < tiny) c = tiny;
        d = 1.0 / d;
        h *= d * c;
        num = -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1.0));
        d = 1.0 + num * d; if (fabs(d) < tiny) d = tiny;
        c = 1.0 + num / c; if (fabs(c) < tiny) c = tiny;
        d = 1.0 / d;
        double step = d * c;
        h *= step;
        if (fabs(step - 1.0) < 1e-15) break;
    }
    return h;
}

static inline double incomplete_beta(double x, double a, double b) {
    if (x <= 0.0) return 0.0;
    if (x >= 1.0) return 1.0;
    double front = exp(lgamma(a + b) - lgamma(a) - lgamma(b) + a * log(x) + b * log1p(-x));
    if (x < (a + 1.0) / (a + b + 2.0)) return front * incomplete_beta_cf(x, a, b) / a;
    return 1.0 - front * incomplete_beta_cf(1.0 - x, b, a) / b;
}

// The quantile t of Student's t distribution with df degrees of freedom where its distribution
// function is p (0.5 < p < 1), by bisection on F(t) = 1 - I_{df/(df+t^2)}(df/2, 1/2) / 2.
static inline double student_t_quantile(double p, double df) {
    double lo = 0.0, hi = 1.0;
    while (1.0 - 0.5 * incomplete_beta(df / (df + hi * hi), 0.5 * df, 0.5) < p && hi < 1e12) hi *= 2.0;
    for (int i = 0; i < 200 && hi - lo > 1e-12 * hi; i++) {
        double mid = 0.5 * (lo + hi);
        if (1.0 - 0.5 * incomplete_beta(df / (df + mid * mid), 0.5 * df, 0.5) < p) lo = mid;
        else hi = mid;
    }
    return 0.5 * (lo + hi);
}

// The mean of x[i * stride] over n values and its standard error, sd (n - 1 in the divisor) /
// sqrt(n); NAN for the standard error when n < 2.
static inline void mean_and_stderr(const double *x, int n, int stride, double *mean, double *stderr_) {
    double m = 0.0;
    for (int i = 0; i < n; i++) m += x[(size_t)i * stride];
    m = n > 0 ? m / n : NAN;
    double ss = 0.0;
    for (int i = 0; i < n; i++) ss += (x[(size_t)i * stride] - m) * (x[(size_t)i * stride] - m);
    *mean = m;
    *stderr_ = n > 1 ? sqrt(ss / (n - 1) / n) : NAN;
}

#endif
