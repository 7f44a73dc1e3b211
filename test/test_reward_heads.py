"""The reward heads (llmc/reward_heads.c) through build/tools/reward_check.

Independent references:
  - a NumPy float64 implementation of the heads (linear; MLP with tanh-GELU or ReLU), of the
    Bradley-Terry loss and of their gradients, written here from the math;
  - central finite differences in double on the C code itself (reward_check fd);
  - the float64 JAX model (test/oracle/model_jax.py): a linear head whose vector is row v of the
    tied classifier reads logit v, so the heads' rewards must equal the oracle's logits at each
    sequence's last position;
  - the heads file format as documented in reward_heads.h, written and read here with struct.
"""
import json
import math
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from conftest import BUILD

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "oracle"))
import model_jax  # noqa: E402

TOOL = str(BUILD / "tools" / "reward_check")
DIMS = ["helpful", "harmless", "truthful"]


def tool(*args, check=True):
    p = subprocess.run([TOOL, *map(str, args)], capture_output=True, text=True, timeout=600)
    if check:
        assert p.returncode == 0, f"reward_check {args} failed:\n{p.stdout}\n{p.stderr}"
    return p


# ----------------------------------------------------------------------------------------------
# the file format and a NumPy oracle of the heads

def head_size(kind, C, H):
    return C + 1 if kind == "linear" else H * C + 2 * H + 1


def write_heads(path, kind, act, C, H, params, magic=b"MORARWHD", version=1):
    with open(path, "wb") as f:
        f.write(magic)
        f.write(struct.pack("<6i", version, 0 if kind == "linear" else 1, 0 if act == "gelu" else 1,
                            C, H if kind == "mlp" else 0, 3))
        f.write(np.asarray(params, dtype="<f4").tobytes())


def read_heads(path):
    """The heads file by its format (llmc/reward_heads.h): version 1, or 2 with the trunk's record."""
    data = open(path, "rb").read()
    assert data[:8] == b"MORARWHD"
    version, kind, act, C, H, dims = struct.unpack("<6i", data[8:32])
    trunk, offset = None, 32
    if version == 2:
        arch, n_layer, vocab, zero, fingerprint = struct.unpack("<4iQ", data[32:56])
        assert zero == 0
        trunk = dict(arch=arch, n_layer=n_layer, vocab_size=vocab, fingerprint=fingerprint)
        offset = 56
    params = np.frombuffer(data[offset:], dtype="<f4")
    return dict(version=version, kind=["linear", "mlp"][kind], act=["gelu", "relu"][act], C=C, H=H,
                dims=dims, trunk=trunk, params=params)


def trunk_fingerprint(params):
    """The trunk fingerprint of llmc/reward_heads.h, from its definition, over float32 params."""
    bits = np.ascontiguousarray(params, dtype="<f4").view("<u4").astype(np.uint64)
    i = np.arange(bits.size, dtype=np.uint64)
    mult = np.uint64(0x9E3779B97F4A7C15) * (np.uint64(2) * i + np.uint64(1))
    s = int((bits * mult).sum(dtype=np.uint64))
    z = s ^ bits.size
    M = (1 << 64) - 1
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M
    z ^= z >> 31
    return z or 1


def split_head(params, kind, C, H, d):
    """Head d's tensors from the flat buffer (float64)."""
    P = head_size(kind, C, H)
    p = np.asarray(params[d * P:(d + 1) * P], dtype=np.float64)
    if kind == "linear":
        return dict(w=p[:C], b=p[C])
    return dict(W1=p[:H * C].reshape(H, C), b1=p[H * C:H * C + H], w2=p[H * C + H:H * C + 2 * H], b2=p[-1])


def gelu(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def gelu_grad(x):
    u = math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)
    t = np.tanh(u)
    return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * math.sqrt(2 / math.pi) * (1 + 3 * 0.044715 * x * x)


def act_fn(act):
    if act == "gelu":
        return gelu, gelu_grad
    return (lambda x: np.maximum(x, 0.0)), (lambda x: (x > 0).astype(np.float64))


def oracle_rewards(params, kind, act, C, H, hidden):
    """(N, 3) rewards of every head on every row of hidden (N, C)."""
    out = np.zeros((hidden.shape[0], 3))
    f, _ = act_fn(act)
    for d in range(3):
        h = split_head(params, kind, C, H, d)
        if kind == "linear":
            out[:, d] = hidden @ h["w"] + h["b"]
        else:
            out[:, d] = f(hidden @ h["W1"].T + h["b1"]) @ h["w2"] + h["b2"]
    return out


def oracle_bt_grads(params, kind, act, C, H, hidden, pairs):
    """Mean Bradley-Terry loss over pairs (chosen_row, rejected_row, dim) and its gradients
    with respect to the flat parameters and to hidden, by the chain rule in float64."""
    f, fg = act_fn(act)
    P = head_size(kind, C, H)
    grads = np.zeros(3 * P)
    dhidden = np.zeros_like(hidden)
    K = len(pairs)
    loss = 0.0

    def reward_and_backward(d, x, dr):
        h = split_head(params, kind, C, H, d)
        g = grads[d * P:(d + 1) * P]
        if kind == "linear":
            g[:C] += dr * x
            g[C] += dr
            return h["w"] * dr
        a = h["W1"] @ x + h["b1"]
        e = dr * h["w2"] * fg(a)
        g[:H * C] += np.outer(e, x).ravel()
        g[H * C:H * C + H] += e
        g[H * C + H:H * C + 2 * H] += dr * f(a)
        g[-1] += dr
        return h["W1"].T @ e

    rewards = oracle_rewards(params, kind, act, C, H, hidden)
    for ci, ri, d in pairs:
        m = rewards[ci, d] - rewards[ri, d]
        loss += np.logaddexp(0.0, -m) / K
        s = 1.0 / (1.0 + np.exp(m))          # sigmoid(-m)
        dhidden[ci] += reward_and_backward(d, hidden[ci], -s / K)
        dhidden[ri] += reward_and_backward(d, hidden[ri], s / K)
    return loss, grads, dhidden


# ----------------------------------------------------------------------------------------------
# tests

def test_finite_differences_in_double():
    """The C backward of every head kind through the Bradley-Terry loss matches central
    differences computed in double on the same C forward (params and hidden states)."""
    p = tool("fd")
    print(p.stdout)
    assert p.stdout.strip().endswith("OK")
    assert p.stdout.count("0 mismatches") == 3


@pytest.mark.parametrize("kind,act", [("linear", "gelu"), ("mlp", "gelu"), ("mlp", "relu")])
def test_forward_backward_against_numpy(tmp_path, kind, act):
    rng = np.random.default_rng(3)
    C, H, N = 20, 9, 14
    params = rng.normal(0, 0.4, 3 * head_size(kind, C, H)).astype(np.float32)
    hidden = rng.normal(0, 1.0, (N, C)).astype(np.float32)
    # rows reused across pairs and dimensions, some pairs strongly mis-ranked
    pairs = [(int(rng.integers(N)), int(rng.integers(N)), int(rng.integers(3))) for _ in range(25)]
    write_heads(tmp_path / "heads.bin", kind, act, C, H, params)
    (tmp_path / "in.json").write_text(json.dumps({"hidden": hidden.tolist(), "pairs": pairs}))
    tool("grad", tmp_path / "heads.bin", tmp_path / "in.json", tmp_path / "out.json")
    out = json.loads((tmp_path / "out.json").read_text())

    h64 = hidden.astype(np.float64)
    want_r = oracle_rewards(params, kind, act, C, H, h64)
    np.testing.assert_allclose(np.array(out["rewards"]).reshape(N, 3), want_r, rtol=1e-5, atol=1e-5)
    loss, grads, dhidden = oracle_bt_grads(params, kind, act, C, H, h64, pairs)
    assert abs(out["loss"] - loss) < 1e-6 * max(1.0, loss)
    np.testing.assert_allclose(np.array(out["grads"]), grads, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.array(out["dhidden"]).reshape(N, C), dhidden, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind,act", [("linear", "gelu"), ("mlp", "gelu"), ("mlp", "relu")])
def test_affine_fold_against_numpy(tmp_path, kind, act):
    """reward_heads_affine(heads, d, scale, shift) folds r -> scale * r + shift into head d: the
    NumPy heads on the new parameters give scale times the NumPy rewards of the old ones plus
    shift on head d, and the old rewards on the other heads; the C forward agrees; only head d's
    last layer (w and b, or w2 and b2) changed."""
    rng = np.random.default_rng(8)
    C, H, N = 20, 9, 30
    P = head_size(kind, C, H)
    params = rng.normal(0, 0.4, 3 * P).astype(np.float32)
    hidden = rng.normal(0, 1.0, (N, C)).astype(np.float32)
    write_heads(tmp_path / "heads.bin", kind, act, C, H, params)
    before = oracle_rewards(params, kind, act, C, H, hidden.astype(np.float64))
    (tmp_path / "in.json").write_text(json.dumps({"hidden": hidden.tolist(), "pairs": [[0, 1, 0]]}))
    for d, scale, shift in ((0, 2.5, -0.75), (1, 0.125, 3.0), (2, -1.7, 0.4)):
        out = tmp_path / f"affine{d}.bin"
        tool("affine", tmp_path / "heads.bin", d, repr(scale), repr(shift), out)
        f = read_heads(out)
        assert (f["kind"], f["act"], f["C"], f["H"]) == (kind, act, C, H if kind == "mlp" else 0)
        after = oracle_rewards(f["params"], kind, act, C, H, hidden.astype(np.float64))
        want = before.copy()
        want[:, d] = scale * before[:, d] + shift
        np.testing.assert_allclose(after, want, rtol=1e-5, atol=1e-5 * (1 + abs(shift)))
        # the C forward on the folded heads (the grad tool reports every head on every row)
        tool("grad", out, tmp_path / "in.json", tmp_path / "out.json")
        c_rewards = np.array(json.loads((tmp_path / "out.json").read_text())["rewards"]).reshape(N, 3)
        np.testing.assert_allclose(c_rewards, want, rtol=1e-5, atol=1e-5 * (1 + abs(shift)))
        # the parameters that changed: head d's last layer (all of a linear head; w2, b2 of an
        # mlp), nothing else
        first_last = d * P if kind == "linear" else d * P + H * C + H
        assert np.flatnonzero(f["params"] != params).tolist() == list(range(first_last, (d + 1) * P))
        assert np.abs(before[:, d] - after[:, d]).max() > 0.1     # the map did something


def test_bradley_terry_extreme_margins(tmp_path):
    """Huge margins must not overflow: loss ~ -m for m << 0 and ~ 0 for m >> 0 (softplus)."""
    C = 2
    params = np.zeros(3 * (C + 1), dtype=np.float32)
    params[0] = 100.0                       # helpful: r = 100 * x0
    write_heads(tmp_path / "heads.bin", "linear", "gelu", C, 0, params)
    hidden = [[10.0, 0.0], [-10.0, 0.0]]    # rewards 1000 and -1000
    (tmp_path / "in.json").write_text(json.dumps({"hidden": hidden, "pairs": [[1, 0, 0], [0, 1, 0]]}))
    tool("grad", tmp_path / "heads.bin", tmp_path / "in.json", tmp_path / "out.json")
    out = json.loads((tmp_path / "out.json").read_text())
    assert math.isfinite(out["loss"]) and abs(out["loss"] - 1000.0) < 1e-3   # (2000 + 0) / 2
    assert all(math.isfinite(g) for g in out["grads"])
    # d loss / d w0 = sum_k dr * x: pair 1 (margin -2000) -> -1/2 * (-10) + 1/2 * 10 = 10
    assert abs(out["grads"][0] - 10.0) < 1e-4


@pytest.mark.parametrize("kind,act,H", [("linear", "gelu", 0), ("mlp", "relu", 48)])
def test_saved_file_matches_documented_format(tmp_path, kind, act, H):
    C = 40
    tool("init", kind, act, C, H, 7, tmp_path / "h.bin")
    f = read_heads(tmp_path / "h.bin")
    assert (f["version"], f["kind"], f["act"], f["C"], f["H"], f["dims"]) == (2, kind, act, C, H, 3)
    # heads made without a trunk (this tool's random ones) record none
    assert f["trunk"] == dict(arch=-1, n_layer=0, vocab_size=0, fingerprint=0)
    assert f["params"].size == 3 * head_size(kind, C, H)
    assert not os.path.exists(str(tmp_path / "h.bin") + ".tmp")
    if kind == "linear":
        assert np.all(f["params"] == 0)     # documented zero init
    else:
        W1 = np.concatenate([split_head(f["params"], kind, C, H, d)["W1"].ravel() for d in range(3)])
        assert abs(W1.std() * math.sqrt(C) - 1.0) < 0.1   # N(0, 1/C), 5760 draws
        assert all(split_head(f["params"], kind, C, H, d)["b2"] == 0 for d in range(3))


def test_loader_errors(tmp_path):
    C = 8
    params = np.zeros(3 * (C + 1), dtype=np.float32)
    cases = {
        "magic": (dict(magic=b"NOTHEADS"), "magic"),
        "version": (dict(version=9), "version"),
    }
    (tmp_path / "in.json").write_text(json.dumps({"hidden": [[0.0] * C], "pairs": [[0, 0, 0]]}))
    for name, (kw, word) in cases.items():
        path = tmp_path / f"{name}.bin"
        write_heads(path, "linear", "gelu", C, 0, params, **kw)
        p = tool("grad", path, tmp_path / "in.json", tmp_path / "o.json", check=False)
        assert p.returncode != 0 and str(path) in p.stderr and word in p.stderr, p.stderr
    # truncated: one float missing
    path = tmp_path / "short.bin"
    write_heads(path, "linear", "gelu", C, 0, params[:-1])
    p = tool("grad", path, tmp_path / "in.json", tmp_path / "o.json", check=False)
    assert p.returncode != 0 and "short.bin" in p.stderr and "needs" in p.stderr, p.stderr
    # hidden size different from the model's (llama:tiny has C = 64)
    path = tmp_path / "c32.bin"
    write_heads(path, "linear", "gelu", 32, 0, np.zeros(3 * 33, dtype=np.float32))
    (tmp_path / "seqs.json").write_text(json.dumps({"seqs": [[1, 2, 3]]}))
    p = tool("score", "llama:tiny", path, tmp_path / "seqs.json", tmp_path / "o.json", check=False)
    assert p.returncode != 0 and "c32.bin" in p.stderr and "C=32" in p.stderr and "64" in p.stderr, p.stderr


def random_seqs(rng, V, lengths):
    # ids below V - 1: the tool pads with V - 1, so padding is distinguishable from content
    return [rng.integers(0, V - 1, size=n).tolist() for n in lengths]


@pytest.mark.parametrize("preset", ["llama:tiny", "gpt2:tiny"])
def test_batch_scoring_equals_single_and_oracle(tmp_path, preset):
    """A right-padded batch gives every sequence the rewards it gets alone (padding does not
    leak), every head reads the hidden state at the sequence's own last position, and the
    rewards are the NumPy heads applied to those hidden states."""
    rng = np.random.default_rng(11)
    C, H = 64, 16
    params = rng.normal(0, 0.3, 3 * head_size("mlp", C, H)).astype(np.float32)
    write_heads(tmp_path / "heads.bin", "mlp", "gelu", C, H, params)
    lengths = [5, 17, 1, 40, 23, 64]
    (tmp_path / "seqs.json").write_text(json.dumps({"seqs": random_seqs(rng, 256, lengths)}))
    tool("score", preset, tmp_path / "heads.bin", tmp_path / "seqs.json", tmp_path / "out.json")
    out = json.loads((tmp_path / "out.json").read_text())
    B = len(lengths)
    bh, sh = np.array(out["batch_hidden"]).reshape(B, C), np.array(out["single_hidden"]).reshape(B, C)
    np.testing.assert_allclose(bh, sh, rtol=1e-5, atol=1e-5)
    br, sr = np.array(out["batch_rewards"]).reshape(B, 3), np.array(out["single_rewards"]).reshape(B, 3)
    np.testing.assert_allclose(br, sr, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(br, oracle_rewards(params, "mlp", "gelu", C, H, bh), rtol=1e-5, atol=1e-5)
    assert np.abs(bh).max() > 0.1 and np.unique(br[:, 0]).size == B   # not trivially equal


@pytest.mark.parametrize("preset", ["llama:tiny", "gpt2:tiny"])
def test_rewards_match_jax_oracle_logits(tmp_path, preset):
    """Linear heads set to rows v_d of the tied classifier plus a bias give reward
    logits[b, len_b - 1, v_d] + b_d of the float64 JAX model: an independent check of the trunk's
    hidden state, of the last-position gather under padding, and of the head."""
    import safetensors.numpy

    hf = tmp_path / "hf"
    tool("save_hf", preset, 5, hf)
    cfg = json.loads((hf / "config.json").read_text())
    params = safetensors.numpy.load_file(str(hf / "model.safetensors"))
    names = [n for n in params if n.endswith("lm_head.weight")] or \
            [n for n in params if n.endswith("wte.weight") or n.endswith("embed_tokens.weight")]
    W = params[names[0]].astype(np.float64)
    V, C = W.shape
    rows, bias = [3, 77, 200], [0.5, -1.25, 0.0]
    heads = np.concatenate([np.append(W[v], b) for v, b in zip(rows, bias)]).astype(np.float32)
    write_heads(tmp_path / "heads.bin", "linear", "gelu", C, 0, heads)

    rng = np.random.default_rng(2)
    lengths = [9, 3, 30, 16]
    seqs = random_seqs(rng, V, lengths)
    (tmp_path / "seqs.json").write_text(json.dumps({"seqs": seqs}))
    tool("score", hf, tmp_path / "heads.bin", tmp_path / "seqs.json", tmp_path / "out.json")
    out = json.loads((tmp_path / "out.json").read_text())
    got = np.array(out["batch_rewards"]).reshape(len(seqs), 3)
    for b, seq in enumerate(seqs):
        logits = np.asarray(model_jax.logits(params, cfg, np.array([seq])))[0]
        want = [logits[len(seq) - 1, v] + bb for v, bb in zip(rows, bias)]
        np.testing.assert_allclose(got[b], want, rtol=1e-4, atol=1e-4)


def test_smollm2_batch_equals_single(tmp_path, smollm2_gguf):
    """On the real SmolLM2-135M trunk a padded batch scores each response as it scores alone."""
    rng = np.random.default_rng(4)
    C = 576
    params = rng.normal(0, 0.05, 3 * (C + 1)).astype(np.float32)
    write_heads(tmp_path / "heads.bin", "linear", "gelu", C, 0, params)
    lengths = [12, 4, 25]
    (tmp_path / "seqs.json").write_text(json.dumps({"seqs": random_seqs(rng, 49152, lengths)}))
    tool("score", smollm2_gguf, tmp_path / "heads.bin", tmp_path / "seqs.json", tmp_path / "out.json")
    out = json.loads((tmp_path / "out.json").read_text())
    B = len(lengths)
    br, sr = np.array(out["batch_rewards"]).reshape(B, 3), np.array(out["single_rewards"]).reshape(B, 3)
    bh = np.array(out["batch_hidden"]).reshape(B, C)
    np.testing.assert_allclose(br, sr, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(br, oracle_rewards(params, "linear", "gelu", C, 0, bh), rtol=1e-4, atol=1e-4)
