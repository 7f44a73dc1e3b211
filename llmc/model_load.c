/*
 * Presets or checkpoints into a Model (see model_load.h).
 */
#include <string.h>
#include "model_load.h"
#include "run_dir.h"
#include "utils.h"

// The names model_config_preset (model.c) accepts.
const char *const model_preset_names = "gpt2:d12 gpt2:d24 gpt2:d36 gpt2:d48 gpt2:tiny gpt2:tiny64 llama:smollm2-135m llama:tiny llama:tiny64";

// 1 for a known preset, 0 for an existing path; an error naming the flag for anything else. A
// name with a colon that is no file reads as a mistyped preset.
int model_source_check(const char *source, const char *flag, int allow_preset) {
    ModelConfig config;
    if (allow_preset && model_config_preset(source, &config)) return 1;
    if (run_file_exists(source)) return 0;
    if (!allow_preset) fatal("%s %s: no such file or directory", flag, source);
    if (strchr(source, ':') != NULL)
        fatal("%s %s: unknown preset (known: %s) and no such file", flag, source, model_preset_names);
    fatal("%s %s: no such file or directory, and not a preset (known: %s)", flag, source, model_preset_names);
    return 0;
}

// A preset with random weights, or checkpoint_load.
int model_load(Model *model, const char *source, const char *flag, int allow_preset, uint64_t seed,
               TrainState *state, CheckpointInfo *info) {
    if (model_source_check(source, flag, allow_preset)) {
        ModelConfig config;
        model_config_preset(source, &config);
        model_init(model, &config, source);
        model_init_random(model, seed);
        if (state) memset(state, 0, sizeof(*state));
        if (info) memset(info, 0, sizeof(*info));
        return 1;
    }
    checkpoint_load(model, source, state, info);
    return 0;
}
