/*
 * Command-line access to rewrite.c for the tests (test/test_rewrite.py), reading stdin:
 *   rewrite_tool isolate K DELTA   lines of n*K*D raw scores -> stats line, then per prompt:
 *                                  "A0 A1 A2 J single missing_mask"
 *   rewrite_tool hypervolume       "n r0 r1 r2" then n lines of 3 floats -> the hypervolume
 *   rewrite_tool sanitise MIN MAX OVERLAP   pairs of lines (original, candidate) -> "ok|reason overlap"
 *   rewrite_tool template MASK     one prompt a line -> its template rewrite
 *   rewrite_tool parse             the whole of stdin -> parsed rewrite
 */
#include "rewrite.h"
#include "llmc/utils.h"

static char *read_stdin(void) {
    size_t cap = 4096, len = 0;
    char *buf = (char *)mallocCheck(cap);
    size_t n;
    while ((n = fread(buf + len, 1, cap - len - 1, stdin)) > 0) {
        len += n;
        if (cap - len - 1 == 0) { cap *= 2; buf = (char *)reallocCheck(buf, cap); }
    }
    buf[len] = '\0';
    return buf;
}

int main(int argc, char **argv) {
    if (argc < 2) fatal("usage: rewrite_tool isolate|hypervolume|sanitise|template|parse ...");
    if (!strcmp(argv[1], "isolate") && argc == 4) {
        int K = atoi(argv[2]);
        float delta = (float)atof(argv[3]);
        size_t cap = 1024, n = 0;
        float *s = (float *)mallocCheck(sizeof(float) * cap);
        float v;
        while (scanf("%f", &v) == 1) {
            if (n == cap) { cap *= 2; s = (float *)reallocCheck(s, sizeof(float) * cap); }
            s[n++] = v;
        }
        if (n % (size_t)(K * MORA_NUM_DIMS)) fatal("isolate: %zu scores is not a multiple of K*D", n);
        size_t rows = n / MORA_NUM_DIMS, prompts = rows / K;
        RewardStats st;
        reward_stats_compute(s, rows, &st);
        printf("%.9g %.9g %.9g %.9g %.9g %.9g\n", st.mean[0], st.mean[1], st.mean[2], st.std[0], st.std[1], st.std[2]);
        reward_standardise(s, s, rows, &st);
        for (size_t p = 0; p < prompts; p++) {
            PromptIsolation iso;
            isolate_prompt(s + p * K * MORA_NUM_DIMS, K, delta, &iso);
            printf("%.9g %.9g %.9g %d %d %d\n", iso.achievable[0], iso.achievable[1], iso.achievable[2],
                   iso.joint, iso.single, iso.missing_mask);
        }
        return 0;
    }
    if (!strcmp(argv[1], "hypervolume")) {
        size_t n;
        float ref[3];
        if (scanf("%zu %f %f %f", &n, &ref[0], &ref[1], &ref[2]) != 4) fatal("hypervolume: bad header");
        float *p = (float *)mallocCheck(sizeof(float) * 3 * (n ? n : 1));
        for (size_t i = 0; i < 3 * n; i++)
            if (scanf("%f", &p[i]) != 1) fatal("hypervolume: bad point %zu", i / 3);
        printf("%.12g\n", hypervolume3(p, n, ref));
        return 0;
    }
    if (!strcmp(argv[1], "sanitise") && argc == 5) {
        RewriteLimits lim = {atoi(argv[2]), atoi(argv[3]), (float)atof(argv[4])};
        char *text = read_stdin();
        char *save = NULL;
        char *orig = strtok_r(text, "\n", &save);
        while (orig) {
            char *cand = strtok_r(NULL, "\n", &save);
            if (!cand) fatal("sanitise: odd number of lines");
            if (!strcmp(cand, "<EMPTY>")) cand = (char *)"";
            const char *reason;
            rewrite_sanitise(orig, cand, &lim, &reason);
            printf("%s|%.6f\n", reason, word_overlap(orig, cand));
            orig = strtok_r(NULL, "\n", &save);
        }
        return 0;
    }
    if (!strcmp(argv[1], "template") && argc == 3) {
        char line[8192];
        while (fgets(line, sizeof line, stdin)) {
            line[strcspn(line, "\n")] = '\0';
            char *t = rewrite_template(line, atoi(argv[2]));
            printf("%s\n", t);
            free(t);
        }
        return 0;
    }
    if (!strcmp(argv[1], "parse")) {
        char *text = read_stdin();
        char *p = rewrite_parse(text);
        printf("%s", p);
        return 0;
    }
    fatal("rewrite_tool: unknown or malformed command '%s'", argv[1]);
}
