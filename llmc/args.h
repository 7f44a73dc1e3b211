/*
 * Long-flag parsing for the subcommands: `--name value` or `--name=value`, a table of specs that
 * also prints `--help` with every flag's default and meaning. Wrong input (an unknown flag, a
 * missing value, a value that does not parse) exits non-zero with a message naming the flag.
 */
#ifndef LLMC_ARGS_H
#define LLMC_ARGS_H

typedef enum { ARG_INT, ARG_FLOAT, ARG_STRING, ARG_BOOL } ArgType;

typedef struct {
    const char *name;   // without the leading "--"
    ArgType type;
    void *dest;         // int*, float*, const char**, int* (bool: 0/1; "--flag" alone means 1)
    const char *help;
} ArgSpec;

// Parses argv[first..argc) into the specs' destinations (which hold the defaults on entry).
// `command` names the subcommand in messages; `summary` is printed at the top of --help.
// --help / -h prints the help and exits 0.
void args_parse(int argc, char **argv, int first, const ArgSpec *specs, int n_specs,
                const char *command, const char *summary);

// Whether the last args_parse call was given --NAME (a flag left at its default is not given).
int args_given(const char *name);

// An error in the flags, which every rank meets alike (a value out of range, two flags that
// contradict each other, a flag the model cannot take): said once, by rank 0, whose exit aborts
// the job; the other ranks wait ten seconds before saying it themselves.
void args_fatal(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));

// Validation helpers for after parsing: exit with "flag --NAME: ..." when violated.
// A JSON object {"command": COMMAND, NAME: value, ...} of every flag's value (a run's config.json);
// float flags are written with the fewest digits that give their value back (float_shortest).
struct cJSON *args_to_json(const char *command, const ArgSpec *specs, int n_specs);
void args_require_positive_int(const char *name, int value);
void args_require_nonneg_int(const char *name, int value);
void args_require_range_float(const char *name, float value, float lo, float hi);
void args_require_string(const char *name, const char *value, const char *command);
#endif
