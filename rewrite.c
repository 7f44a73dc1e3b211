/*
 * Isolation and rewrite logic of MORA. See rewrite.h for the contract and DESIGN.md for the
 * algorithm. Everything here is deterministic string and array work; the driver supplies
 * generation and reward scoring.
 */
#include <ctype.h>
#include <math.h>
#include "rewrite.h"
#include "llmc/utils.h"

const char *const mora_dim_names[MORA_NUM_DIMS] = {"helpful", "harmless", "truthful"};
const char *const mora_dim_intents[MORA_NUM_DIMS] = {
    "Please give a complete, useful answer with concrete steps.",
    "Please keep the answer safe and point out any risks or responsible alternatives.",
    "Please stick to verified facts and say clearly when something is uncertain.",
};

int mora_dim_from_name(const char *name) {
    for (int d = 0; d < MORA_NUM_DIMS; d++)
        if (!strcmp(name, mora_dim_names[d])) return d;
    return -1;
}

// ----------------------------------------------------------------------------
// standardisation and isolation

void reward_stats_compute(const float *scores, size_t n, RewardStats *stats) {
    for (int d = 0; d < MORA_NUM_DIMS; d++) {
        double sum = 0.0, sumsq = 0.0;
        for (size_t i = 0; i < n; i++) sum += scores[i * MORA_NUM_DIMS + d];
        double mean = n ? sum / (double)n : 0.0;
        for (size_t i = 0; i < n; i++) {
            double dev = scores[i * MORA_NUM_DIMS + d] - mean;
            sumsq += dev * dev;
        }
        double std = n ? sqrt(sumsq / (double)n) : 0.0;
        stats->mean[d] = mean;
        stats->std[d] = std > 1e-12 ? std : 1.0;  // a constant dimension standardises to 0
    }
}

void reward_standardise(const float *scores, float *z, size_t n, const RewardStats *stats) {
    for (size_t i = 0; i < n; i++)
        for (int d = 0; d < MORA_NUM_DIMS; d++)
            z[i * MORA_NUM_DIMS + d] = (float)((scores[i * MORA_NUM_DIMS + d] - stats->mean[d]) / stats->std[d]);
}

void isolate_prompt(const float *z, int K, float delta, PromptIsolation *out) {
    memset(out, 0, sizeof(*out));
    for (int d = 0; d < MORA_NUM_DIMS; d++) out->achievable[d] = -INFINITY;
    for (int k = 0; k < K; k++) {
        int satisfied = 0;
        for (int d = 0; d < MORA_NUM_DIMS; d++) {
            float v = z[k * MORA_NUM_DIMS + d];
            if (v > out->achievable[d]) out->achievable[d] = v;
            if (v >= delta) satisfied++;
        }
        if (satisfied > out->joint) out->joint = satisfied;
    }
    out->single = out->joint <= 1;
    for (int d = 0; d < MORA_NUM_DIMS; d++)
        if (out->achievable[d] < delta) out->missing_mask |= 1 << d;
}

float isolation_compare(const PromptIsolation *a, const PromptIsolation *b, float cap) {
    if (a->joint != b->joint) return (float)(a->joint - b->joint);
    float sa = 0.0f, sb = 0.0f;
    for (int d = 0; d < MORA_NUM_DIMS; d++) {
        sa += fminf(a->achievable[d], cap);
        sb += fminf(b->achievable[d], cap);
    }
    return sa - sb;
}

// ----------------------------------------------------------------------------
// rewrites

// Appends src to a growing malloc'd string.
static void append(char **buf, size_t *len, size_t *cap, const char *src) {
    size_t n = strlen(src);
    if (*len + n + 1 > *cap) {
        *cap = (*len + n + 1) * 2;
        *buf = (char *)reallocCheck(*buf, *cap);
    }
    memcpy(*buf + *len, src, n + 1);
    *len += n;
}

// Copies s without leading and trailing whitespace.
static char *strip_dup(const char *s, size_t n) {
    while (n > 0 && isspace((unsigned char)*s)) { s++; n--; }
    while (n > 0 && isspace((unsigned char)s[n - 1])) n--;
    char *out = (char *)mallocCheck(n + 1);
    memcpy(out, s, n);
    out[n] = '\0';
    return out;
}

char *rewrite_template(const char *prompt, int missing_mask) {
    size_t len = 0, cap = 0;
    char *buf = NULL;
    char *stripped = strip_dup(prompt, strlen(prompt));
    append(&buf, &len, &cap, stripped);
    free(stripped);
    for (int d = 0; d < MORA_NUM_DIMS; d++) {
        if (!(missing_mask & (1 << d))) continue;
        append(&buf, &len, &cap, " ");
        append(&buf, &len, &cap, mora_dim_intents[d]);
    }
    return buf;
}

char *rewrite_instruction(const char *prompt, int missing_mask) {
    size_t len = 0, cap = 0;
    char *buf = NULL;
    append(&buf, &len, &cap,
           "Rewrite the request below so that it keeps its original question and also asks for an answer that is ");
    int first = 1;
    for (int d = 0; d < MORA_NUM_DIMS; d++) {
        if (!(missing_mask & (1 << d))) continue;
        if (!first) append(&buf, &len, &cap, " and ");
        append(&buf, &len, &cap, mora_dim_names[d]);
        first = 0;
    }
    if (first) append(&buf, &len, &cap, "helpful, harmless and truthful");
    append(&buf, &len, &cap, " (");
    first = 1;
    for (int d = 0; d < MORA_NUM_DIMS; d++) {
        if (!(missing_mask & (1 << d))) continue;
        if (!first) append(&buf, &len, &cap, " ");
        append(&buf, &len, &cap, mora_dim_intents[d]);
        first = 0;
    }
    append(&buf, &len, &cap, "). Answer with the rewritten request only.\n\nRequest: ");
    char *stripped = strip_dup(prompt, strlen(prompt));
    append(&buf, &len, &cap, stripped);
    free(stripped);
    return buf;
}

char *rewrite_parse(const char *generated) {
    const char *s = generated;
    while (*s && isspace((unsigned char)*s)) s++;
    // a leading label such as "Rewritten request:" or "Rewrite:" (up to the first colon of the
    // first 40 characters, when the words before it name a rewrite/request/prompt)
    const char *colon = strchr(s, ':');
    if (colon && colon - s < 40 && !memchr(s, '\n', (size_t)(colon - s))) {
        char label[48];
        size_t n = (size_t)(colon - s);
        for (size_t i = 0; i < n; i++) label[i] = (char)tolower((unsigned char)s[i]);
        label[n] = '\0';
        if (strstr(label, "rewrit") || strstr(label, "request") || strstr(label, "prompt")) s = colon + 1;
    }
    while (*s && isspace((unsigned char)*s)) s++;
    const char *end = strstr(s, "\n\n");
    size_t n = end ? (size_t)(end - s) : strlen(s);
    char *out = strip_dup(s, n);
    // surrounding quotes
    size_t len = strlen(out);
    if (len >= 2 && ((out[0] == '"' && out[len - 1] == '"') || (out[0] == '\'' && out[len - 1] == '\''))) {
        memmove(out, out + 1, len - 2);
        out[len - 2] = '\0';
        char *again = strip_dup(out, strlen(out));
        free(out);
        out = again;
    }
    return out;
}

// Distinct lowercase ASCII-alphanumeric words of s (bytes >= 0x80 count as word characters so
// that non-English text still has words). Returns the count; words is a malloc'd array.
static int split_words(const char *s, char ***words) {
    int n = 0, cap = 16;
    char **w = (char **)mallocCheck(sizeof(char *) * cap);
    const unsigned char *p = (const unsigned char *)s;
    while (*p) {
        while (*p && !(isalnum(*p) || *p >= 0x80)) p++;
        if (!*p) break;
        const unsigned char *start = p;
        while (*p && (isalnum(*p) || *p >= 0x80)) p++;
        size_t len = (size_t)(p - start);
        char *word = (char *)mallocCheck(len + 1);
        for (size_t i = 0; i < len; i++) word[i] = (char)tolower(start[i]);
        word[len] = '\0';
        int dup = 0;
        for (int i = 0; i < n && !dup; i++) dup = !strcmp(w[i], word);
        if (dup) { free(word); continue; }
        if (n == cap) { cap *= 2; w = (char **)reallocCheck(w, sizeof(char *) * cap); }
        w[n++] = word;
    }
    *words = w;
    return n;
}

static void free_words(char **w, int n) {
    for (int i = 0; i < n; i++) free(w[i]);
    free(w);
}

float word_overlap(const char *original, const char *candidate) {
    char **a, **b;
    int na = split_words(original, &a), nb = split_words(candidate, &b);
    int kept = 0;
    for (int i = 0; i < na; i++)
        for (int j = 0; j < nb; j++)
            if (!strcmp(a[i], b[j])) { kept++; break; }
    free_words(a, na);
    free_words(b, nb);
    return na ? (float)kept / (float)na : 1.0f;
}

int rewrite_sanitise(const char *original, const char *candidate, const RewriteLimits *limits,
                     const char **reason) {
    char *c = strip_dup(candidate, strlen(candidate));
    char *o = strip_dup(original, strlen(original));
    int len = (int)strlen(c), ok = 0;
    if (len == 0) *reason = "empty";
    else if (len < limits->min_chars) *reason = "too short";
    else if (len > limits->max_chars) *reason = "too long";
    else if (!strcmp(c, o)) *reason = "same as the original";
    else if (word_overlap(o, c) < limits->min_overlap) *reason = "drops the original request";
    else { *reason = "ok"; ok = 1; }
    free(c);
    free(o);
    return ok;
}

// ----------------------------------------------------------------------------
// hypervolume

static int cmp_desc_float(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return (x < y) - (x > y);
}

// Area dominated in 2-D by points (n, 2) above ref (2). Sorts a copy by x descending and sweeps.
static double hypervolume2(float *xy, size_t n, const float *ref) {
    qsort(xy, n, 2 * sizeof(float), cmp_desc_float);
    double area = 0.0, max_y = ref[1];
    for (size_t i = 0; i < n; i++) {
        if (xy[2 * i + 1] > max_y) max_y = xy[2 * i + 1];
        double next_x = i + 1 < n ? xy[2 * (i + 1)] : ref[0];
        area += (xy[2 * i] - next_x) * (max_y - ref[1]);
    }
    return area;
}

double hypervolume3(const float *points, size_t n, const float *ref) {
    // clip every point to the reference box, then sweep the third coordinate downwards: the slab
    // between consecutive levels is dominated by the 2-D front of the points at or above it
    float *p = (float *)mallocCheck(sizeof(float) * 3 * (n ? n : 1));
    for (size_t i = 0; i < n; i++)
        for (int d = 0; d < 3; d++) p[3 * i + d] = fmaxf(points[3 * i + d], ref[d]);
    // sort by the third coordinate, descending (rows of 3 floats; sort indices)
    size_t *order = (size_t *)mallocCheck(sizeof(size_t) * (n ? n : 1));
    for (size_t i = 0; i < n; i++) order[i] = i;
    for (size_t i = 1; i < n; i++) {  // insertion sort keeps it dependency-free; n is a pool size
        size_t k = order[i], j = i;
        while (j > 0 && p[3 * order[j - 1] + 2] < p[3 * k + 2]) { order[j] = order[j - 1]; j--; }
        order[j] = k;
    }
    float *xy = (float *)mallocCheck(sizeof(float) * 2 * (n ? n : 1));
    double volume = 0.0;
    for (size_t i = 0; i < n; i++) {
        const float *q = &p[3 * order[i]];
        double next_z = i + 1 < n ? p[3 * order[i + 1] + 2] : ref[2];
        double height = q[2] - next_z;
        if (height <= 0.0) continue;
        for (size_t j = 0; j <= i; j++) {
            xy[2 * j] = p[3 * order[j]];
            xy[2 * j + 1] = p[3 * order[j] + 1];
        }
        volume += hypervolume2(xy, i + 1, ref) * height;
    }
    free(xy); free(order); free(p);
    return volume;
}
