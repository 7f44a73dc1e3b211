/*
 * The model: one config-driven decoder-only transformer covering two families.
 *
 *   GPT-2   LayerNorm (weight + bias), learned positions, GELU MLP, multi-head attention,
 *           biases on every linear layer, tied embeddings (or a separate lm_head).
 *   Llama   RMSNorm (weight only), RoPE (rotate-half convention, as Hugging Face), SwiGLU MLP,
 *           grouped-query attention, no biases except optional q/k/v biases (Qwen2),
 *           tied or untied embeddings. Covers SmolLM2, Llama 3, Qwen2.
 *
 * Parameters live in one contiguous float buffer, split into NUM_PARAM_TENSORS tensors in the
 * order of the enum below (a tensor the family does not use has size 0). Every linear layer's
 * weight is stored (out_features, in_features), row-major, as torch.nn.Linear does, and computes
 * out = inp @ W^T + b.
 *
 * Shapes: B batch, T sequence length, C = n_embd, L = n_layer, NH = n_head, NKV = n_kv_head,
 * HS = head_dim, QKV = (NH + 2*NKV) * HS, F = ffn_hidden, V = vocab_size, Vp = padded_vocab_size.
 */
#ifndef LLMC_MODEL_H
#define LLMC_MODEL_H

#include <stddef.h>
#include <stdint.h>

typedef enum { ARCH_GPT2 = 0, ARCH_LLAMA = 1 } ModelArch;

typedef struct {
    ModelArch arch;
    int vocab_size;         // V: real tokens; softmax and loss run over these only
    int padded_vocab_size;  // Vp >= V: rows of wte / lm_head (llm.c pads to a multiple of 128)
    int max_seq_len;        // maxT: rows of wpe (GPT-2); the context limit for both families
    int n_layer;            // L
    int n_embd;             // C
    int n_head;             // NH query heads
    int n_kv_head;          // NKV key/value heads; NH % NKV == 0 (== NH for GPT-2)
    int head_dim;           // HS (usually C / NH)
    int ffn_hidden;         // F: MLP hidden width (4C for GPT-2)
    float norm_eps;         // LayerNorm / RMSNorm epsilon (GPT-2: 1e-5)
    float rope_theta;       // RoPE base (Llama only)
    int tied_embeddings;    // 1: the classifier is wte; 0: a separate lm_head tensor
    int qkv_bias;           // 1: bias on the q/k/v projection (always for GPT-2; Qwen2)
} ModelConfig;

// The parameter tensors, in buffer order. Shapes given for one model; (L, ...) means stacked
// over layers, layer l at offset l * (size / L).
enum {
    P_WTE,       // (Vp, C)       token embedding
    P_WPE,       // (maxT, C)     position embedding             GPT-2 only
    P_LN1W,      // (L, C)        pre-attention norm weight
    P_LN1B,      // (L, C)        pre-attention norm bias        GPT-2 only
    P_QKVW,      // (L, QKV, C)   rows: q (NH*HS) | k (NKV*HS) | v (NKV*HS)
    P_QKVB,      // (L, QKV)                                     qkv_bias only
    P_ATTPROJW,  // (L, C, NH*HS) attention output projection
    P_ATTPROJB,  // (L, C)                                       GPT-2 only
    P_LN2W,      // (L, C)        pre-MLP norm weight
    P_LN2B,      // (L, C)                                       GPT-2 only
    P_FCW,       // (L, F, C) GPT-2; (L, 2F, C) Llama: rows gate (F) then up (F)
    P_FCB,       // (L, F)                                       GPT-2 only
    P_FCPROJW,   // (L, C, F)     MLP down projection
    P_FCPROJB,   // (L, C)                                       GPT-2 only
    P_LNFW,      // (C)           final norm weight
    P_LNFB,      // (C)                                          GPT-2 only
    P_LMHEAD,    // (Vp, C)       classifier                     untied only
    NUM_PARAM_TENSORS
};
extern const char *const param_tensor_names[NUM_PARAM_TENSORS];  // "wte", "wpe", ...

typedef struct {
    ModelConfig config;
    size_t param_sizes[NUM_PARAM_TENSORS];   // elements per tensor (0 when unused)
    size_t num_parameters;
    float *params;                           // all parameters, one buffer
    float *param_ptrs[NUM_PARAM_TENSORS];    // into params; NULL when the size is 0
    float *grads;                            // same layout as params; allocated by model_init
    float *grad_ptrs[NUM_PARAM_TENSORS];
    float *m, *v;                            // AdamW moments; allocated on first update
    int opt_step;                            // AdamW steps taken (bias correction uses it)

    // activations for the batch shape of the last forward (reallocated when B*T grows)
    int B, T;
    void *acts_private;                      // model.c's activation struct

    // results of the last forward
    float *logits;       // (B, T, Vp) raw logits (pointer into the activations)
    float *hidden;       // (B, T, C) final normed hidden state (input of the classifier)
    float *token_losses; // (B, T) -log p(target) per position; 0 where the mask is 0
    float mean_loss;     // mean of token_losses over the masked positions (-1 without targets)
    int has_targets;
} Model;

// Checks that a config can run; on failure exits with "SOURCE: what is wrong" (SOURCE names the
// file or preset the config came from).
void model_config_validate(const ModelConfig *c, const char *source);
// Named presets: "gpt2:d12" (124M), "gpt2:d24", "gpt2:d36", "gpt2:d48", "gpt2:tiny",
// "llama:smollm2-135m", "llama:tiny"; for tests, "gpt2:tiny64" and "llama:tiny64" (head size
// 64, grouped for Llama: 2 query heads on 1 key/value head). Returns 0 when the name is unknown.
int model_config_preset(const char *name, ModelConfig *out);

// Computes the layout and allocates params and grads (zeroed). Validates the config first; a
// failed allocation exits naming source and the parameter count the config asks for.
void model_init(Model *model, const ModelConfig *config, const char *source);
// Validates the config and fills model's config, param_sizes and num_parameters only, allocating
// nothing: for a loader to check a file against the config before model_init allocates.
void model_layout(Model *model, const ModelConfig *config, const char *source);
// GPT-2 style init: N(0, 0.02), residual projections scaled by 1/sqrt(2L), norms 1, biases 0.
void model_init_random(Model *model, uint64_t seed);
void model_free(Model *model);

// Forward pass on inputs (B, T) token ids. targets (B, T) may be NULL (no loss); loss_mask
// (B, T) may be NULL (every position counts). Positions whose mask is 0 get no loss.
// Fills model->logits, model->hidden, model->token_losses, model->mean_loss.
// T <= max_seq_len; token ids are checked against Vp.
void model_forward(Model *model, const int *inputs, const int *targets, const float *loss_mask,
                   int B, int T);

void model_zero_grad(Model *model);
// Backward of loss = sum_bt token_weights[bt] * token_losses[bt]  (+ <dhidden, hidden>),
// accumulated (+=) into model->grads. token_weights (B, T) may be NULL (no loss term);
// dhidden (B, T, C) may be NULL: it is a gradient arriving at the final hidden state from
// something that reads it (the reward heads). Needs the activations of the last forward.
void model_backward_weighted(Model *model, const float *token_weights, const float *dhidden);
// Backward of scale * mean_loss of the last forward (gradient accumulation passes 1/steps).
void model_backward(Model *model, float scale);

// Global L2 norm of the gradients.
float model_grad_norm(const Model *model);
// AdamW with decoupled weight decay on 2-D tensors (embeddings and matmul weights; not norms or
// biases). grad_scale multiplies the gradients first (global-norm clipping passes
// min(1, max_norm / norm)). Increments opt_step.
void model_adamw_update(Model *model, float lr, float beta1, float beta2, float eps,
                        float weight_decay, float grad_scale);

// Linear warmup for warmup_steps, then cosine decay from max_lr to min_lr at total_steps.
float lr_schedule(int step, int warmup_steps, int total_steps, float max_lr, float min_lr);

// FLOPs of one training step (forward + backward) for B x T tokens, for the benchmark's GFLOP/s.
double model_flops_per_step(const ModelConfig *c, int B, int T);

#endif
