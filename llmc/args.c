#include "args.h"
#include "utils.h"
#include "comm.h"
#include <float.h>
#include <math.h>
#include <signal.h>
#include <unistd.h>
#include <cjson/cJSON.h>

// An error in the flags. Every rank parses the same command line and meets the same error: rank
// 0 says it and its exit aborts the job, while the others wait a while before saying it too, so
// that 64 ranks print one line, not 64. (They do say it after the wait: under a launch that gives
// ranks different command lines rank 0 may have no error at all.)
void args_fatal(const char *fmt, ...) {
    if (comm_rank() != 0) {
        // the launcher ends this rank with SIGTERM once rank 0 has aborted: a stop handler
        // (stop.h) installed after the parsing would take it for a request to stop after a step,
        // cut the wait short and have this rank say the error too
        signal(SIGTERM, SIG_DFL);
        signal(SIGINT, SIG_DFL);
        signal(SIGUSR1, SIG_DFL);
        sleep(10);
    }
    char msg[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    fatal("%s", msg);
}

static void print_help(const ArgSpec *specs, int n, const char *command, const char *summary) {
    printf("usage: train_mora %s [flags]\n\n%s\n\nflags:\n", command, summary);
    for (int i = 0; i < n; i++) {
        const ArgSpec *s = &specs[i];
        char def[96];
        switch (s->type) {
            case ARG_INT: snprintf(def, sizeof def, "%d", *(int *)s->dest); break;
            case ARG_FLOAT: snprintf(def, sizeof def, "%g", *(float *)s->dest); break;
            case ARG_BOOL: snprintf(def, sizeof def, "%d", *(int *)s->dest); break;
            case ARG_STRING: {
                const char *v = *(const char **)s->dest;
                snprintf(def, sizeof def, "%s", v && v[0] ? v : "(none)");
                break;
            }
        }
        const char *kind = s->type == ARG_INT ? "N" : s->type == ARG_FLOAT ? "X" : s->type == ARG_BOOL ? "0|1" : "S";
        char left[64];
        snprintf(left, sizeof left, "--%s %s", s->name, kind);
        printf("  %-26s %s [default: %s]\n", left, s->help, def);
    }
    printf("  %-26s %s\n", "--help", "print this help and exit");
}

static void set_value(const ArgSpec *s, const char *value, const char *command) {
    char *end = NULL;
    switch (s->type) {
        case ARG_INT: {
            errno = 0;
            long v = strtol(value, &end, 10);
            if (end == value || *end != '\0')
                args_fatal("flag --%s: expected an integer, got '%s' (see train_mora %s --help)", s->name, value, command);
            if (errno == ERANGE || v < -2147483647L || v > 2147483647L)
                args_fatal("flag --%s: %s is out of range (an integer from -2147483647 to 2147483647)", s->name, value);
            *(int *)s->dest = (int)v;
            break;
        }
        case ARG_FLOAT: {
            errno = 0;
            double v = strtod(value, &end);
            if (end == value || *end != '\0')
                args_fatal("flag --%s: expected a number, got '%s' (see train_mora %s --help)", s->name, value, command);
            if (isnan(v) || (isinf(v) && errno != ERANGE))
                args_fatal("flag --%s: expected a finite number, got '%s'", s->name, value);
            // the flags are floats: a value that is not zero must stay a normal nonzero float
            if (errno == ERANGE || fabs(v) > FLT_MAX || (v != 0.0 && fabs(v) < FLT_MIN))
                args_fatal("flag --%s: %s is out of range (a float's magnitude is 0 or from %g to %g)", s->name, value,
                      (double)FLT_MIN, (double)FLT_MAX);
            *(float *)s->dest = (float)v;
            break;
        }
        case ARG_BOOL:
            if (!strcmp(value, "1") || !strcmp(value, "true")) *(int *)s->dest = 1;
            else if (!strcmp(value, "0") || !strcmp(value, "false")) *(int *)s->dest = 0;
            else args_fatal("flag --%s: expected 0 or 1, got '%s' (see train_mora %s --help)", s->name, value, command);
            break;
        case ARG_STRING:
            *(const char **)s->dest = value;
            break;
    }
}

// the names of the flags the last args_parse call set, for args_given
#define ARGS_MAX_GIVEN 128
static const char *given_names[ARGS_MAX_GIVEN];
static int n_given;

static const ArgSpec *find_spec(const ArgSpec *specs, int n_specs, const char *name, size_t name_len) {
    for (int k = 0; k < n_specs; k++)
        if (strlen(specs[k].name) == name_len && !strncmp(specs[k].name, name, name_len)) return &specs[k];
    return NULL;
}

void args_parse(int argc, char **argv, int first, const ArgSpec *specs, int n_specs,
                const char *command, const char *summary) {
    // --help first, so that it shows the defaults, not the values of the flags before it
    for (int i = first; i < argc; i++)
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            print_help(specs, n_specs, command, summary);
            exit(0);
        }
    n_given = 0;
    for (int i = first; i < argc; i++) {
        const char *a = argv[i];
        if (strncmp(a, "--", 2) != 0)
            args_fatal("unexpected argument '%s': flags are --name value (see train_mora %s --help)", a, command);
        const char *name = a + 2;
        const char *eq = strchr(name, '=');
        size_t name_len = eq ? (size_t)(eq - name) : strlen(name);
        const ArgSpec *spec = find_spec(specs, n_specs, name, name_len);
        if (spec == NULL) args_fatal("unknown flag '%.*s' for train_mora %s (see --help)", (int)(name_len + 2), a, command);
        const char *value;
        if (eq) value = eq + 1;
        else if (spec->type == ARG_BOOL && (i + 1 >= argc || strncmp(argv[i + 1], "--", 2) == 0)) value = "1";
        else {
            if (i + 1 >= argc) args_fatal("flag --%s needs a value (see train_mora %s --help)", spec->name, command);
            // "--out --resume" forgot the value: the next word is one of this command's flags
            const char *next = argv[i + 1];
            if (!strncmp(next, "--", 2)) {
                const char *next_eq = strchr(next + 2, '=');
                size_t next_len = next_eq ? (size_t)(next_eq - next - 2) : strlen(next + 2);
                if (find_spec(specs, n_specs, next + 2, next_len) || !strcmp(next, "--help"))
                    args_fatal("flag --%s needs a value, but the next word is the flag %s (for a value that starts with "
                          "--, write --%s=VALUE)", spec->name, next, spec->name);
            }
            value = argv[++i];
        }
        set_value(spec, value, command);
        int seen = 0;
        for (int k = 0; k < n_given; k++) seen |= given_names[k] == spec->name;
        if (!seen && n_given < ARGS_MAX_GIVEN) given_names[n_given++] = spec->name;
    }
}

int args_given(const char *name) {
    for (int k = 0; k < n_given; k++)
        if (!strcmp(given_names[k], name)) return 1;
    return 0;
}

void args_require_positive_int(const char *name, int value) {
    if (value <= 0) args_fatal("flag --%s must be positive, got %d", name, value);
}
void args_require_nonneg_int(const char *name, int value) {
    if (value < 0) args_fatal("flag --%s must be >= 0, got %d", name, value);
}
void args_require_range_float(const char *name, float value, float lo, float hi) {
    if (!(value >= lo && value <= hi)) args_fatal("flag --%s must be in [%g, %g], got %g", name, lo, hi, value);
}
void args_require_string(const char *name, const char *value, const char *command) {
    if (value == NULL || value[0] == '\0') args_fatal("flag --%s is required (see train_mora %s --help)", name, command);
}

cJSON *args_to_json(const char *command, const ArgSpec *specs, int n_specs) {
    cJSON *obj = cJSON_CreateObject();
    cJSON_AddStringToObject(obj, "command", command);
    for (int i = 0; i < n_specs; i++) {
        const ArgSpec *s = &specs[i];
        if (s->type == ARG_STRING) cJSON_AddStringToObject(obj, s->name, *(const char **)s->dest);
        else if (s->type == ARG_FLOAT) cJSON_AddNumberToObject(obj, s->name, float_shortest(*(float *)s->dest));
        else cJSON_AddNumberToObject(obj, s->name, *(int *)s->dest);
    }
    return obj;
}
