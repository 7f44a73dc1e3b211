"""MORA's policy losses (llmc/policy_loss.c) through the C model against the float64 JAX oracle
(test/oracle/policy_loss_jax.py), which differentiates the objectives written directly:
GRPO advantages, the PPO clipped objective with the k3 KL (loss, per-token weights = -d loss /
d logp, KL, clip fraction, and the parameter gradients after model_backward_weighted) and DPO
(loss and gradients). build/tools/mora_loss_check runs the C side."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import BUILD

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "oracle"))
import policy_loss_jax  # noqa: E402
import model_jax  # noqa: E402

TOOL = str(BUILD / "tools" / "mora_loss_check")
CFG = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=61, hidden_size=32,
           intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
           max_position_embeddings=16, rms_norm_eps=1e-5, rope_theta=10000.0,
           tie_word_embeddings=True, attention_bias=False, hidden_act="silu")
B, T = 6, 12


def random_weights(cfg, seed):
    """Random float32 Llama weights under Hugging Face names (norm weights randomised too)."""
    rng = np.random.default_rng(seed)
    mat = lambda *shape, std=0.2: (std * rng.standard_normal(shape)).astype(np.float32)
    V, C, L = cfg["vocab_size"], cfg["hidden_size"], cfg["num_hidden_layers"]
    NH, NKV, F = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["intermediate_size"]
    HS = C // NH
    p = {"model.embed_tokens.weight": mat(V, C, std=0.5), "model.norm.weight": (1 + mat(C)).astype(np.float32)}
    for l in range(L):
        a = f"model.layers.{l}."
        p[a + "input_layernorm.weight"] = (1 + mat(C)).astype(np.float32)
        p[a + "post_attention_layernorm.weight"] = (1 + mat(C)).astype(np.float32)
        p[a + "self_attn.q_proj.weight"] = mat(NH * HS, C)
        p[a + "self_attn.k_proj.weight"] = mat(NKV * HS, C)
        p[a + "self_attn.v_proj.weight"] = mat(NKV * HS, C)
        p[a + "self_attn.o_proj.weight"] = mat(C, NH * HS)
        p[a + "mlp.gate_proj.weight"] = mat(F, C)
        p[a + "mlp.up_proj.weight"] = mat(F, C)
        p[a + "mlp.down_proj.weight"] = mat(C, F)
    return p


def batch(seed):
    """inputs, targets (B, T) and a response mask: a prompt prefix of varying length, padding at
    the end of some rows."""
    rng = np.random.default_rng(seed)
    V = CFG["vocab_size"]
    inputs = rng.integers(0, V, size=(B, T))
    targets = np.concatenate([inputs[:, 1:], rng.integers(0, V, size=(B, 1))], axis=1)
    mask = np.zeros((B, T), np.float32)
    for b in range(B):
        start, end = 2 + b % 3, T - (b % 2) * 3
        mask[b, start:end] = 1.0
    return inputs, targets, mask


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("mora_loss")
    params = random_weights(CFG, 7)
    save_file(params, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(CFG))
    return d, params


def run_tool(ckpt_dir, case, out):
    out.mkdir(exist_ok=True)
    path = out / "case.json"
    path.write_text(json.dumps(case))
    p = subprocess.run([TOOL, str(ckpt_dir), str(path), str(out)], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr
    return json.loads((out / "results.json").read_text()), load_file(str(out / "grads.safetensors"))


def rel(c, ref):
    c, ref = np.asarray(c, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(c - ref)) / max(np.max(np.abs(ref)), 1e-30))


def test_group_advantages_reference():
    r = np.array([0.3, -1.2, 0.5, 0.5, 2.0, 1.1, -0.4, 0.9])
    adv = policy_loss_jax.group_advantages(r, 2, 1e-6)
    # a pair of different rewards standardises to -1, +1; an equal pair to 0
    np.testing.assert_allclose(adv, [1, -1, 0, 0, 1, -1, -1, 1], atol=1e-5)


@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_ppo_loss_and_gradient_match_oracle(ckpt, tmp_path, beta):
    ckpt_dir, params = ckpt
    inputs, targets, mask = batch(3)
    rng = np.random.default_rng(11)
    logp = np.asarray(policy_loss_jax.token_logprobs(model_jax.logits(params, CFG, inputs), targets))
    # the sampling policy and the reference differ from the current policy, enough that some
    # ratios fall outside the clip range on both sides
    logp_old = logp + rng.normal(0, 0.4, size=logp.shape)
    logp_ref = logp + rng.normal(0, 0.5, size=logp.shape)
    rewards = [0.3, -1.2, 0.5, 0.5, 2.0, 1.1]  # the middle group is tied: advantage 0
    case = dict(mode="ppo", inputs=inputs.tolist(), targets=targets.tolist(), mask=mask.tolist(),
                logp_old=logp_old.tolist(), logp_ref=logp_ref.tolist(), rewards=rewards, G=2,
                clip_eps=0.2, kl_beta=beta, adv_eps=1e-6)
    got, grads = run_tool(ckpt_dir, case, tmp_path)
    # the tool reads logp_old / logp_ref as float32
    ref = policy_loss_jax.ppo(params, CFG, inputs, targets, mask, logp_old.astype(np.float32),
                              logp_ref.astype(np.float32), rewards, 2, 0.2, beta, 1e-6)
    np.testing.assert_allclose(np.array(got["adv"]).ravel(), ref["adv"], rtol=1e-5, atol=1e-6)
    assert abs(got["loss"] - ref["loss"]) < 1e-4 * max(1.0, abs(ref["loss"]))
    assert rel(np.array(got["logp_new"]) * mask, ref["logp"] * mask) < 1e-5
    # weights are -d loss / d logp
    assert rel(got["weights"], -ref["dlogp"] * mask) < 1e-4
    assert 0.0 < ref["clip_frac"] < 1.0 and abs(got["clip_frac"] - ref["clip_frac"]) < 1e-9
    assert abs(got["kl"] - ref["kl"]) < 1e-4 * max(1e-3, ref["kl"]) and ref["kl"] > 0
    for name, g in ref["grads"].items():
        assert rel(grads[name], g) < 2e-4, name


def test_ppo_kl_is_zero_when_policy_is_reference(ckpt, tmp_path):
    ckpt_dir, params = ckpt
    inputs, targets, mask = batch(5)
    logp = np.asarray(policy_loss_jax.token_logprobs(model_jax.logits(params, CFG, inputs), targets))
    got, _ = run_tool(ckpt_dir, dict(mode="ppo", inputs=inputs.tolist(), targets=targets.tolist(),
                                     mask=mask.tolist(), logp_old=logp.tolist(), logp_ref=logp.tolist(),
                                     rewards=[1, 0, 2, 3, 0, 1], G=3, clip_eps=0.2, kl_beta=0.5,
                                     adv_eps=1e-6), tmp_path)
    # the reference here is the oracle's float64 log-prob rounded to float32: k3 is second order
    assert got["kl"] < 1e-9 and got["clip_frac"] == 0.0


@pytest.mark.parametrize("beta", [0.1, 2.0])
def test_dpo_loss_and_gradient_match_oracle(ckpt, tmp_path, beta):
    ckpt_dir, params = ckpt
    inputs, targets, mask = batch(4)
    logp = np.asarray(policy_loss_jax.token_logprobs(model_jax.logits(params, CFG, inputs), targets))
    ref_seq = (logp * mask).sum(axis=1) + np.random.default_rng(2).normal(0, 1.0, size=B)
    got, grads = run_tool(ckpt_dir, dict(mode="dpo", inputs=inputs.tolist(), targets=targets.tolist(),
                                         mask=mask.tolist(), ref_seq=ref_seq.tolist(), beta=beta), tmp_path)
    ref = policy_loss_jax.dpo(params, CFG, inputs, targets, mask, ref_seq, beta)
    assert abs(got["loss"] - ref["loss"]) < 1e-5 * max(1.0, ref["loss"])
    assert rel(got["weights"], -ref["dlogp"] * mask) < 1e-4
    for name, g in ref["grads"].items():
        assert rel(grads[name], g) < 2e-4, name
