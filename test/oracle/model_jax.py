"""
Independent float64 reference of the two model families train_mora implements, written from the
math and the Hugging Face conventions (transformers' GPT2LMHeadModel, LlamaForCausalLM and
Qwen2ForCausalLM), reading Hugging Face tensor names.

    params  dict: Hugging Face tensor name -> array, as safetensors.numpy.load_file returns it
            (a leading "transformer." on GPT-2 names is accepted and dropped)
    cfg     dict: the fields of the model's config.json

GPT-2 weights use Conv1D, stored (in_features, out_features): y = x @ W + b.
Llama/Qwen2 weights use nn.Linear, stored (out_features, in_features): y = x @ W^T + b.

Functions:
    logits(params, cfg, tokens)                    (B, T, V) logits
    loss(params, cfg, tokens, targets, mask)       masked mean cross-entropy, softmax over V
    loss_and_grads(params, cfg, tokens, targets, mask)
    adamw_losses(params, cfg, tokens, targets, mask, steps, lr, ...)
                                                   the loss before each of `steps` AdamW updates

Shapes: B batch, T sequence length, C hidden size, NH query heads, NKV key/value heads,
HS head dim, V vocab size.
"""
import dataclasses
import functools
import math

import numpy as np
import jax
import jax.numpy as jnp

jax.config.update("jax_enable_x64", True)


@dataclasses.dataclass(frozen=True)
class Spec:
    """The hyperparameters a forward pass needs, read from config.json (hashable, so jit can
    treat it as static)."""
    family: str          # "gpt2" or "llama" (Llama, Mistral-style and Qwen2 share the code)
    n_layer: int
    n_embd: int
    n_head: int
    n_kv_head: int
    head_dim: int
    vocab_size: int
    norm_eps: float
    rope_theta: float


def spec_from_config(cfg):
    """Reads the Hugging Face config.json fields of either family into a Spec."""
    model_type = cfg.get("model_type", "")
    archs = " ".join(cfg.get("architectures", []))
    if model_type == "gpt2" or "GPT2" in archs:
        C, NH = cfg["n_embd"], cfg["n_head"]
        act = cfg.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"oracle implements the tanh GELU only, config asks for {act}")
        return Spec("gpt2", cfg["n_layer"], C, NH, NH, C // NH, cfg["vocab_size"],
                    float(cfg.get("layer_norm_epsilon", 1e-5)), 0.0)
    if model_type in ("llama", "qwen2", "mistral") or "Llama" in archs or "Qwen2" in archs:
        if cfg.get("rope_scaling") not in (None, {}):
            raise ValueError("oracle implements plain RoPE, config has rope_scaling")
        C, NH = cfg["hidden_size"], cfg["num_attention_heads"]
        NKV = cfg.get("num_key_value_heads") or NH
        HS = cfg.get("head_dim") or C // NH
        return Spec("llama", cfg["num_hidden_layers"], C, NH, NKV, HS, cfg["vocab_size"],
                    float(cfg.get("rms_norm_eps", 1e-6)), float(cfg.get("rope_theta", 10000.0)))
    raise ValueError(f"unknown model family: model_type={model_type!r} architectures={archs!r}")


def normalise_names(params):
    """Drops the "transformer." prefix that some GPT-2 checkpoints carry, and the non-parameter
    attention-mask buffers (h.N.attn.bias / masked_bias) of old GPT-2 files."""
    out = {}
    for name, value in params.items():
        if name.startswith("transformer."):
            name = name[len("transformer."):]
        if name.endswith(".attn.bias") or name.endswith(".attn.masked_bias"):
            continue
        out[name] = value
    return out


def to_jax(params):
    """numpy dict -> float64 jax dict (normalised names)."""
    return {k: jnp.asarray(np.asarray(v, dtype=np.float64)) for k, v in normalise_names(params).items()}


# ----------------------------------------------------------------------------------------------
# building blocks

def layer_norm(x, weight, bias, eps):
    """LayerNorm over the last axis: (x - mean) / sqrt(var + eps) * weight + bias, biased var."""
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + eps) * weight + bias


def rms_norm(x, weight, eps):
    """RMSNorm over the last axis (Llama): x / sqrt(mean(x^2) + eps) * weight."""
    return x / jnp.sqrt((x * x).mean(-1, keepdims=True) + eps) * weight


def gelu_tanh(x):
    """GELU, tanh approximation (GPT-2's gelu_new)."""
    return 0.5 * x * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def causal_attention(q, k, v):
    """q (B, NH, T, HS), k/v (B, NKV, T, HS) -> (B, T, NH*HS). Query head h reads key/value head
    h // (NH/NKV), as Hugging Face's repeat_kv does. Scores scaled by 1/sqrt(HS)."""
    B, NH, T, HS = q.shape
    n_rep = NH // k.shape[1]
    k = jnp.repeat(k, n_rep, axis=1)
    v = jnp.repeat(v, n_rep, axis=1)
    scores = jnp.einsum("bhtd,bhsd->bhts", q, k) / math.sqrt(HS)
    causal = jnp.tril(jnp.ones((T, T), dtype=bool))
    scores = jnp.where(causal, scores, -jnp.inf)
    att = jax.nn.softmax(scores, axis=-1)
    y = jnp.einsum("bhts,bhsd->bhtd", att, v)
    return y.transpose(0, 2, 1, 3).reshape(B, T, NH * HS)


def rope(x, theta):
    """Rotary embedding, rotate-half convention (Hugging Face Llama) on x (B, H, T, HS) at
    positions 0..T-1: x * cos + rotate_half(x) * sin, where frequency i (< HS/2) drives both
    dimension i and dimension i + HS/2."""
    T, HS = x.shape[2], x.shape[3]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, HS, 2, dtype=jnp.float64) / HS))   # (HS/2,)
    angles = jnp.arange(T, dtype=jnp.float64)[:, None] * inv_freq[None, :]        # (T, HS/2)
    emb = jnp.concatenate([angles, angles], axis=-1)                              # (T, HS)
    x1, x2 = x[..., : HS // 2], x[..., HS // 2:]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x * jnp.cos(emb) + rotated * jnp.sin(emb)


# ----------------------------------------------------------------------------------------------
# the two families

def gpt2_logits(p, s, tokens):
    """GPT2LMHeadModel: tokens (B, T) -> logits (B, T, V). Classifier: lm_head.weight when the
    checkpoint has one (tie_word_embeddings false), else the tied wte."""
    B, T = tokens.shape
    C, NH, HS = s.n_embd, s.n_head, s.head_dim
    x = p["wte.weight"][tokens] + p["wpe.weight"][:T][None]
    for l in range(s.n_layer):
        pre = f"h.{l}."
        h = layer_norm(x, p[pre + "ln_1.weight"], p[pre + "ln_1.bias"], s.norm_eps)
        qkv = h @ p[pre + "attn.c_attn.weight"] + p[pre + "attn.c_attn.bias"]   # (B, T, 3C)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        heads = lambda t: t.reshape(B, T, NH, HS).transpose(0, 2, 1, 3)
        y = causal_attention(heads(q), heads(k), heads(v))
        x = x + y @ p[pre + "attn.c_proj.weight"] + p[pre + "attn.c_proj.bias"]
        h = layer_norm(x, p[pre + "ln_2.weight"], p[pre + "ln_2.bias"], s.norm_eps)
        h = gelu_tanh(h @ p[pre + "mlp.c_fc.weight"] + p[pre + "mlp.c_fc.bias"])
        x = x + h @ p[pre + "mlp.c_proj.weight"] + p[pre + "mlp.c_proj.bias"]
    x = layer_norm(x, p["ln_f.weight"], p["ln_f.bias"], s.norm_eps)
    head = p["lm_head.weight"] if "lm_head.weight" in p else p["wte.weight"]
    return x @ head.T


def llama_logits(p, s, tokens):
    """LlamaForCausalLM / Qwen2ForCausalLM: tokens (B, T) -> logits (B, T, V). q/k/v biases
    are used when the checkpoint has them; lm_head.weight when present, else tied."""
    B, T = tokens.shape
    NH, NKV, HS = s.n_head, s.n_kv_head, s.head_dim

    def linear(h, name):
        y = h @ p[name + ".weight"].T
        if name + ".bias" in p:
            y = y + p[name + ".bias"]
        return y

    x = p["model.embed_tokens.weight"][tokens]
    for l in range(s.n_layer):
        pre = f"model.layers.{l}."
        h = rms_norm(x, p[pre + "input_layernorm.weight"], s.norm_eps)
        q = linear(h, pre + "self_attn.q_proj").reshape(B, T, NH, HS).transpose(0, 2, 1, 3)
        k = linear(h, pre + "self_attn.k_proj").reshape(B, T, NKV, HS).transpose(0, 2, 1, 3)
        v = linear(h, pre + "self_attn.v_proj").reshape(B, T, NKV, HS).transpose(0, 2, 1, 3)
        y = causal_attention(rope(q, s.rope_theta), rope(k, s.rope_theta), v)
        x = x + linear(y, pre + "self_attn.o_proj")
        h = rms_norm(x, p[pre + "post_attention_layernorm.weight"], s.norm_eps)
        gate = linear(h, pre + "mlp.gate_proj")
        x = x + linear(jax.nn.silu(gate) * linear(h, pre + "mlp.up_proj"), pre + "mlp.down_proj")
    x = rms_norm(x, p["model.norm.weight"], s.norm_eps)
    head = p["lm_head.weight"] if "lm_head.weight" in p else p["model.embed_tokens.weight"]
    return x @ head.T


def _logits(p, s, tokens):
    out = gpt2_logits(p, s, tokens) if s.family == "gpt2" else llama_logits(p, s, tokens)
    return out[..., : s.vocab_size]


def _loss(p, s, tokens, targets, mask):
    """Masked mean cross-entropy: sum_bt mask * (logsumexp(logits) - logit[target]) / sum mask,
    softmax over the first V logits."""
    lg = _logits(p, s, tokens)
    token_loss = jax.nn.logsumexp(lg, axis=-1) - jnp.take_along_axis(lg, targets[..., None], -1)[..., 0]
    return (token_loss * mask).sum() / mask.sum()


_logits_jit = jax.jit(_logits, static_argnums=1)
_loss_jit = jax.jit(_loss, static_argnums=1)
_value_and_grad_jit = jax.jit(jax.value_and_grad(_loss), static_argnums=1)


def _inputs(tokens, targets=None, mask=None):
    out = [jnp.asarray(np.asarray(tokens, dtype=np.int32))]
    if targets is not None:
        out.append(jnp.asarray(np.asarray(targets, dtype=np.int32)))
        out.append(jnp.asarray(np.asarray(mask, dtype=np.float64)))
    return out


def logits(params, cfg, tokens):
    """(B, T) token ids -> (B, T, V) float64 numpy logits."""
    return np.asarray(_logits_jit(to_jax(params), spec_from_config(cfg), *_inputs(tokens)))


def loss(params, cfg, tokens, targets, mask):
    """Masked mean cross-entropy of the next-token targets (float)."""
    return float(_loss_jit(to_jax(params), spec_from_config(cfg), *_inputs(tokens, targets, mask)))


def loss_and_grads(params, cfg, tokens, targets, mask):
    """(loss, dict name -> float64 numpy gradient in the parameter's own shape)."""
    value, grads = _value_and_grad_jit(to_jax(params), spec_from_config(cfg),
                                       *_inputs(tokens, targets, mask))
    return float(value), {k: np.asarray(g) for k, g in grads.items()}


def is_decayed(name, value):
    """Weight decay goes to 2-D tensors only: embeddings and matmul weights, not norms or biases."""
    return np.ndim(value) == 2


def adamw_losses(params, cfg, tokens, targets, mask, steps, lr, beta1=0.9, beta2=0.95, eps=1e-8,
                 weight_decay=0.0, clip=0.0):
    """Runs `steps` AdamW updates on one fixed batch and returns (losses, grad_norms): the loss
    and the global gradient L2 norm computed before each update.

    PyTorch AdamW semantics at constant lr, step t = 1, 2, ...:
        g = grad * min(1, clip / ||grad||)           (only when clip > 0)
        m = beta1 m + (1 - beta1) g ;  v = beta2 v + (1 - beta2) g^2
        p -= lr * (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps) + lr * wd * p   (wd on 2-D only)
    The decay term uses the parameter before this step's Adam update, as torch does (it scales p
    by 1 - lr*wd first)."""
    s = spec_from_config(cfg)
    p = to_jax(params)
    batch = _inputs(tokens, targets, mask)
    m = {k: jnp.zeros_like(v) for k, v in p.items()}
    v = {k: jnp.zeros_like(x) for k, x in p.items()}
    losses, norms = [], []
    for t in range(1, steps + 1):
        value, g = _value_and_grad_jit(p, s, *batch)
        norm = float(jnp.sqrt(sum((x * x).sum() for x in g.values())))
        losses.append(float(value))
        norms.append(norm)
        scale = min(1.0, clip / norm) if clip > 0 and norm > 0 else 1.0
        p, m, v = _adamw_step(p, g, m, v, t, scale, lr, beta1, beta2, eps, weight_decay)
    return losses, norms


@jax.jit
def _adamw_step(p, g, m, v, t, scale, lr, beta1, beta2, eps, weight_decay):
    """One AdamW update of every tensor (see adamw_losses); returns the new (p, m, v)."""
    new_p, new_m, new_v = {}, {}, {}
    for k in p:
        gk = g[k] * scale
        new_m[k] = beta1 * m[k] + (1 - beta1) * gk
        new_v[k] = beta2 * v[k] + (1 - beta2) * gk * gk
        mhat = new_m[k] / (1 - beta1 ** t)
        vhat = new_v[k] / (1 - beta2 ** t)
        wd = weight_decay if is_decayed(k, p[k]) else 0.0
        new_p[k] = p[k] * (1 - lr * wd) - lr * mhat / (jnp.sqrt(vhat) + eps)
    return new_p, new_m, new_v
