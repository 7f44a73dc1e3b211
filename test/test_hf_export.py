"""Hugging Face export: what `checkpoint_save_hf` writes is read by transformers' own config
classes, and the tensors carry the names and shapes transformers' model classes expect.

transformers is installed without PyTorch (CI has no GPU and no room for it), so the model
classes cannot be instantiated; the names and shapes are checked against the parameter names
those classes define, listed here from their source, and the numbers against the JAX oracle,
which reads the exported files by those names."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import BUILD, ROOT

sys.path.insert(0, str(ROOT / "test" / "oracle"))

CKPT = str(BUILD / "tools" / "ckpt_tool")
transformers = pytest.importorskip("transformers")


def export(train_mora_bin, tmp_path, init):
    """Trains two steps from a preset, then exports the native checkpoint as a HF directory."""
    shard = tmp_path / "train_000.bin"
    header = np.zeros(256, dtype=np.int32)
    header[:3] = [20240520, 1, 4000]
    shard.write_bytes(header.tobytes() + (np.arange(4000) % 200).astype(np.uint16).tobytes())
    run = tmp_path / "run"
    p = subprocess.run([train_mora_bin, "pretrain", "--init", init, "--train_data", str(shard), "--out", str(run),
                        "--steps", "2", "--batch_size", "2", "--seq_len", "16"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    hf = tmp_path / "hf"
    p = subprocess.run([CKPT, "convert", str(run / "model_step000002.ckpt"), "hf", str(hf)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return str(run / "model_step000002.ckpt"), str(hf)


def expected_names(cfg):
    """Parameter names of GPT2LMHeadModel / LlamaForCausalLM state dicts (tied heads omitted,
    as transformers saves them)."""
    L = cfg.num_hidden_layers if hasattr(cfg, "num_hidden_layers") else cfg.n_layer
    if cfg.model_type == "gpt2":
        names = {"wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"}
        for i in range(L):
            for sub in ["ln_1", "ln_2", "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]:
                names |= {f"h.{i}.{sub}.weight", f"h.{i}.{sub}.bias"}
        return names
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    if not cfg.tie_word_embeddings:
        names.add("lm_head.weight")
    for i in range(L):
        p = f"model.layers.{i}."
        names |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
        names |= {p + f"self_attn.{x}_proj.weight" for x in "qkvo"}
        names |= {p + f"mlp.{x}_proj.weight" for x in ["gate", "up", "down"]}
    return names


@pytest.mark.parametrize("init", ["gpt2:tiny", "llama:tiny"])
def test_export_opens_in_transformers(train_mora_bin, tmp_path, init):
    import model_jax

    native, hf = export(train_mora_bin, tmp_path, init)
    cfg = transformers.AutoConfig.from_pretrained(hf)
    raw = json.load(open(os.path.join(hf, "config.json")))
    assert cfg.architectures == raw["architectures"]
    tensors = load_file(os.path.join(hf, "model.safetensors"))
    names = {k[len("transformer."):] if k.startswith("transformer.") else k for k in tensors}
    assert names == expected_names(cfg)
    if cfg.model_type == "gpt2":
        C, L = cfg.n_embd, cfg.n_layer
        assert cfg.__class__.__name__ == "GPT2Config" and cfg.n_head == 4
        shapes = {"wte.weight": (cfg.vocab_size, C), "wpe.weight": (cfg.n_positions, C),
                  "h.0.attn.c_attn.weight": (C, 3 * C), "h.0.mlp.c_fc.weight": (C, 4 * C),
                  "h.0.mlp.c_proj.weight": (4 * C, C)}
    else:
        C, HS = cfg.hidden_size, cfg.hidden_size // cfg.num_attention_heads
        assert cfg.__class__.__name__ in ("LlamaConfig", "Qwen2Config")
        shapes = {"model.embed_tokens.weight": (cfg.vocab_size, C),
                  "model.layers.0.self_attn.q_proj.weight": (cfg.num_attention_heads * HS, C),
                  "model.layers.0.self_attn.k_proj.weight": (cfg.num_key_value_heads * HS, C),
                  "model.layers.0.mlp.gate_proj.weight": (cfg.intermediate_size, C),
                  "model.layers.0.mlp.down_proj.weight": (C, cfg.intermediate_size)}
    for k, shape in shapes.items():
        key = k if k in tensors else "transformer." + k
        assert tensors[key].shape == shape, (k, tensors[key].shape, shape)
    # the exported weights compute what the trained model computes: the oracle's logits from the
    # HF files equal ours from the native checkpoint
    tokens = np.array([[3, 17, 42, 99, 5, 7, 120, 64]], dtype=np.int32)
    want = model_jax.logits(tensors, raw, tokens)
    out = tmp_path / "check"
    out.mkdir()
    batch = tmp_path / "batch.bin"
    B, T = tokens.shape
    with open(batch, "wb") as f:
        f.write(b"MCTK" + np.array([B, T], dtype=np.int32).tobytes() + tokens.tobytes()
                + np.roll(tokens, -1, axis=1).astype(np.int32).tobytes() + np.ones((B, T), np.float32).tobytes())
    p = subprocess.run([str(BUILD / "tools" / "model_check"), native, str(batch), str(out)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    got = np.fromfile(out / "logits.bin", dtype=np.float32).reshape(B, T, -1)[..., : want.shape[-1]]
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
