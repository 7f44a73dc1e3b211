/*
 * Checkpoints: every format a user brings, and the ones we write.
 *
 *   native       train_mora's own: config, weights, optionally AdamW state, step, RNG state.
 *                Written to a temporary file and renamed; loads back bit-exact.
 *   llm.c .bin   GPT-2 checkpoints, fp32 (version 3) and bf16 (version 5).
 *   safetensors  Hugging Face: a .safetensors file (config.json beside it), or a directory with
 *                config.json and model.safetensors or model.safetensors.index.json (sharded),
 *                or that index file. GPT-2 and Llama/Qwen2 tensor names; F32, F16, BF16.
 *                config.json's RoPE (rope_theta, rope_scaling, transformers 5's rope_parameters),
 *                tied head and sliding window are read as hf_read_config in checkpoint.c says.
 *   GGUF         llama and gpt2 architectures; F32, F16, BF16, Q8_0, Q4_0, Q4_1 dequantised on load;
 *                hyperparameters from the metadata.
 *
 * A run directory (latest.txt naming its newest checkpoint) loads that checkpoint, with a note.
 * Every tensor of a file must have a place in the model its config describes (known buffers
 * such as GPT-2's attn.bias masks aside). Every error names the file and what is wrong, and
 * exits non-zero.
 */
#ifndef LLMC_CHECKPOINT_H
#define LLMC_CHECKPOINT_H
#include <stdint.h>
#include "model.h"

typedef struct {
    int step;              // optimizer steps done (0 for a model that was never trained here)
    uint64_t rng_state;    // the run's RNG state
    int has_optimizer;     // model->m / model->v were loaded
} TrainState;

typedef enum { CKPT_NATIVE, CKPT_LLMC_BIN, CKPT_SAFETENSORS, CKPT_GGUF } CheckpointFormat;

typedef struct {
    CheckpointFormat format;
    char chat_template[64];   // "chatml", "smollm2", "llama3", "plain" when the checkpoint names or implies one, else ""
    char tokenizer_path[4096];// file that holds the tokenizer: tokenizer.json beside a HF model, the .gguf itself, "" if none
} CheckpointInfo;

// A native checkpoint holds weights only; its tokenizer and chat template are those its run
// recorded: the fields CKPT_RUN_TOKENIZER_KEY (a path) and CKPT_RUN_CHAT_TEMPLATE_KEY (a template
// name) of the config.json beside it (run_record_model_text writes them), when there is one.
#define CKPT_RUN_TOKENIZER_KEY "model_tokenizer"
#define CKPT_RUN_CHAT_TEMPLATE_KEY "model_chat_template"

// Detects the format (magic bytes, or a directory) and loads. Calls model_init with the config
// read from the checkpoint. state may be NULL; info may be NULL. A NaN or infinite weight (or
// AdamW moment) is an error naming the file and the tensor.
void checkpoint_load(Model *model, const char *path, TrainState *state, CheckpointInfo *info);

// Native format. with_optimizer: also write model->m, model->v, opt_step.
void checkpoint_save_native(const Model *model, const TrainState *state, const char *path, int with_optimizer);

// Hugging Face directory: DIR/model.safetensors + DIR/config.json (GPT2LMHeadModel or
// LlamaForCausalLM / Qwen2ForCausalLM), written atomically. Opens in transformers. The tensors are
// F32, or with bf16 = 1 BF16 (rounded to nearest even; torch_dtype bfloat16).
void checkpoint_save_hf(const Model *model, const char *dir, int bf16);

// Writes a buffer laid out like model->params (for example model->grads) to a safetensors file
// under the Hugging Face tensor names of model's family, in Hugging Face's shapes.
void checkpoint_save_hf_tensors(const Model *model, const float *buffer, const char *path);
#endif
