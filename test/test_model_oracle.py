"""
The C CPU model against the float64 JAX oracle (test/oracle/model_jax.py).

For small random configs of every family variant (GPT-2; Llama with grouped-query attention,
tied and untied; Llama with NH == NKV; Qwen2-style with q/k/v biases) the test writes random
weights with the safetensors package plus a config.json into a temporary directory, runs
build/tools/model_check on it and asserts that

  * the logits and the masked mean loss match the oracle,
  * every parameter's gradient (saved by the C side under Hugging Face names and shapes)
    matches jax.grad of the oracle loss,
  * the loss mask is honoured (the batch's mask has zeros, and the oracle shows they matter),
  * 10 AdamW steps on the batch give the oracle's loss at every step (weight decay and
    global-norm clipping switched on in some cases).

Error measure: max |c - ref| / max |ref| over a tensor, with a floor on the denominator for
tensors whose true gradient is (near) zero. The oracle itself is cross-checked against an
independent loop-by-loop numpy forward and against central finite differences of its loss.
"""
import functools
import json
import math
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "oracle"))
import model_jax  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_CHECK = os.path.join(ROOT, "build", "tools", "model_check")

B, T = 2, 12
STEPS = 10
TOL = 1e-4

# name -> (config.json contents, options of the AdamW run)
CASES = {
    "gpt2": (
        dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=67, n_positions=16,
             n_ctx=16, n_embd=32, n_layer=2, n_head=4, n_inner=None,
             activation_function="gelu_new", layer_norm_epsilon=1e-5, tie_word_embeddings=True),
        dict(lr=3e-3, wd=0.1, clip_frac=0.5),
    ),
    "llama_gqa_tied": (
        dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=71, hidden_size=32,
             intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=16, rms_norm_eps=1e-5,
             rope_theta=10000.0, tie_word_embeddings=True, attention_bias=False,
             hidden_act="silu"),
        dict(lr=3e-3, wd=0.0, clip_frac=0.0),
    ),
    "llama_untied": (
        dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=64, hidden_size=32,
             intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=16, rms_norm_eps=1e-6,
             rope_theta=100.0, tie_word_embeddings=False, attention_bias=False,
             hidden_act="silu"),
        dict(lr=3e-3, wd=0.1, clip_frac=0.5),
    ),
    "llama_mha": (
        dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=67, hidden_size=32,
             intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=16, rms_norm_eps=1e-5,
             rope_theta=10000.0, tie_word_embeddings=True, attention_bias=False,
             hidden_act="silu"),
        dict(lr=3e-3, wd=0.0, clip_frac=0.0),
    ),
    "qwen2_qkv_bias": (
        dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=59, hidden_size=32,
             intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=16, rms_norm_eps=1e-6,
             rope_theta=1000.0, tie_word_embeddings=True, hidden_act="silu"),
        dict(lr=3e-3, wd=0.0, clip_frac=0.0),
    ),
}


def random_weights(cfg, seed):
    """Random float32 weights under Hugging Face names for cfg. Norm weights and biases are
    randomised too, so a mixed-up or dropped tensor changes the result."""
    rng = np.random.default_rng(seed)
    mat = lambda *shape, std=0.1: (std * rng.standard_normal(shape)).astype(np.float32)
    norm = lambda n: (1.0 + 0.2 * rng.standard_normal(n)).astype(np.float32)
    p = {}
    if cfg["model_type"] == "gpt2":
        V, C, L, maxT = cfg["vocab_size"], cfg["n_embd"], cfg["n_layer"], cfg["n_positions"]
        p["wte.weight"] = mat(V, C, std=0.3)
        p["wpe.weight"] = mat(maxT, C, std=0.1)
        for l in range(L):
            h = f"h.{l}."
            p[h + "ln_1.weight"], p[h + "ln_1.bias"] = norm(C), mat(C, std=0.1)
            p[h + "attn.c_attn.weight"], p[h + "attn.c_attn.bias"] = mat(C, 3 * C, std=0.2), mat(3 * C)
            p[h + "attn.c_proj.weight"], p[h + "attn.c_proj.bias"] = mat(C, C), mat(C)
            p[h + "ln_2.weight"], p[h + "ln_2.bias"] = norm(C), mat(C, std=0.1)
            p[h + "mlp.c_fc.weight"], p[h + "mlp.c_fc.bias"] = mat(C, 4 * C, std=0.2), mat(4 * C)
            p[h + "mlp.c_proj.weight"], p[h + "mlp.c_proj.bias"] = mat(4 * C, C), mat(C)
        p["ln_f.weight"], p["ln_f.bias"] = norm(C), mat(C, std=0.1)
        return p
    V, C, L = cfg["vocab_size"], cfg["hidden_size"], cfg["num_hidden_layers"]
    NH, NKV, F = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["intermediate_size"]
    HS = C // NH
    qkv_bias = cfg["model_type"] == "qwen2" or cfg.get("attention_bias", False)
    p["model.embed_tokens.weight"] = mat(V, C, std=0.3)
    for l in range(L):
        a = f"model.layers.{l}."
        p[a + "input_layernorm.weight"] = norm(C)
        p[a + "self_attn.q_proj.weight"] = mat(NH * HS, C, std=0.2)
        p[a + "self_attn.k_proj.weight"] = mat(NKV * HS, C, std=0.2)
        p[a + "self_attn.v_proj.weight"] = mat(NKV * HS, C, std=0.2)
        if qkv_bias:
            p[a + "self_attn.q_proj.bias"] = mat(NH * HS, std=0.2)
            p[a + "self_attn.k_proj.bias"] = mat(NKV * HS, std=0.2)
            p[a + "self_attn.v_proj.bias"] = mat(NKV * HS, std=0.2)
        p[a + "self_attn.o_proj.weight"] = mat(C, NH * HS)
        p[a + "post_attention_layernorm.weight"] = norm(C)
        p[a + "mlp.gate_proj.weight"] = mat(F, C, std=0.2)
        p[a + "mlp.up_proj.weight"] = mat(F, C, std=0.2)
        p[a + "mlp.down_proj.weight"] = mat(C, F)
    p["model.norm.weight"] = norm(C)
    if not cfg["tie_word_embeddings"]:
        p["lm_head.weight"] = mat(V, C, std=0.3)
    return p


def random_batch(V, seed):
    """inputs, targets (B, T) int32 and a 0/1 float32 mask with zeros in both rows."""
    rng = np.random.default_rng(seed)
    inputs = rng.integers(0, V, size=(B, T)).astype(np.int32)
    targets = rng.integers(0, V, size=(B, T)).astype(np.int32)
    mask = np.ones((B, T), dtype=np.float32)
    mask[0, :3] = 0.0     # a prompt-like prefix
    mask[1, -4:] = 0.0    # padding-like suffix
    mask[1, 5] = 0.0
    return inputs, targets, mask


def write_tokens_file(path, inputs, targets, mask):
    """The model_check batch format: "MCTK", int32 B, int32 T, then int32 inputs (B*T),
    int32 targets (B*T), float32 mask (B*T); little-endian."""
    with open(path, "wb") as f:
        f.write(b"MCTK" + struct.pack("<ii", *inputs.shape))
        f.write(inputs.astype("<i4").tobytes())
        f.write(targets.astype("<i4").tobytes())
        f.write(mask.astype("<f4").tobytes())


def rel_err(c, ref, floor=0.0):
    """max |c - ref| / max(max |ref|, floor)."""
    c, ref = np.asarray(c, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(c - ref)) / max(np.max(np.abs(ref)), floor))


# ----------------------------------------------------------------------------------------------
# an independent numpy forward, loop by loop, to check the oracle itself

def numpy_forward(p, cfg, tokens):
    """Logits (B, T, V) computed one sequence, one position and one head at a time in float64.
    RoPE is applied as a complex rotation of the pairs (x[i], x[i + HS/2]) rather than with
    rotate_half, GQA by an explicit head -> kv-head map, softmax with max-subtraction."""
    p = {k: np.asarray(v, np.float64) for k, v in model_jax.normalise_names(p).items()}
    gpt2 = cfg["model_type"] == "gpt2"
    if gpt2:
        C, NH, L, eps = cfg["n_embd"], cfg["n_head"], cfg["n_layer"], cfg["layer_norm_epsilon"]
        NKV = NH
    else:
        C, NH, L, eps = (cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_hidden_layers"],
                         cfg["rms_norm_eps"])
        NKV = cfg["num_key_value_heads"]
    HS = C // NH
    group = NH // NKV

    def ln(x, w, b):
        mu = sum(x) / len(x)
        sd = math.sqrt(sum((xi - mu) ** 2 for xi in x) / len(x) + eps)
        return np.array([(xi - mu) / sd for xi in x]) * w + b

    def rms(x, w):
        return x / math.sqrt(float(np.dot(x, x)) / len(x) + eps) * w

    def rotate(vec, pos):
        half = HS // 2
        z = vec[:half] + 1j * vec[half:]
        freq = np.array([cfg["rope_theta"] ** (-2.0 * i / HS) for i in range(half)])
        z = z * np.exp(1j * pos * freq)
        return np.concatenate([z.real, z.imag])

    out = []
    for seq in tokens:
        n = len(seq)
        if gpt2:
            xs = [p["wte.weight"][tok] + p["wpe.weight"][t] for t, tok in enumerate(seq)]
        else:
            xs = [p["model.embed_tokens.weight"][tok].copy() for tok in seq]
        for l in range(L):
            qs, ks, vs = [], [], []
            for t in range(n):
                if gpt2:
                    pre = f"h.{l}."
                    h = ln(xs[t], p[pre + "ln_1.weight"], p[pre + "ln_1.bias"])
                    qkv = np.array([np.dot(h, p[pre + "attn.c_attn.weight"][:, j])
                                    for j in range(3 * C)]) + p[pre + "attn.c_attn.bias"]
                    q, k, v = qkv[:C], qkv[C:2 * C], qkv[2 * C:]
                else:
                    pre = f"model.layers.{l}.self_attn."
                    h = rms(xs[t], p[f"model.layers.{l}.input_layernorm.weight"])
                    q = p[pre + "q_proj.weight"] @ h + p.get(pre + "q_proj.bias", 0.0)
                    k = p[pre + "k_proj.weight"] @ h + p.get(pre + "k_proj.bias", 0.0)
                    v = p[pre + "v_proj.weight"] @ h + p.get(pre + "v_proj.bias", 0.0)
                    q = np.concatenate([rotate(q[i * HS:(i + 1) * HS], t) for i in range(NH)])
                    k = np.concatenate([rotate(k[i * HS:(i + 1) * HS], t) for i in range(NKV)])
                qs.append(q), ks.append(k), vs.append(v)
            for t in range(n):
                y = np.zeros(NH * HS)
                for hd in range(NH):
                    kv = hd // group
                    qh = qs[t][hd * HS:(hd + 1) * HS]
                    scores = [float(np.dot(qh, ks[s][kv * HS:(kv + 1) * HS])) / math.sqrt(HS)
                              for s in range(t + 1)]
                    mx = max(scores)
                    w = [math.exp(sc - mx) for sc in scores]
                    z = sum(w)
                    for s in range(t + 1):
                        y[hd * HS:(hd + 1) * HS] += w[s] / z * vs[s][kv * HS:(kv + 1) * HS]
                if gpt2:
                    pre = f"h.{l}."
                    xs[t] = xs[t] + y @ p[pre + "attn.c_proj.weight"] + p[pre + "attn.c_proj.bias"]
                    h = ln(xs[t], p[pre + "ln_2.weight"], p[pre + "ln_2.bias"])
                    a = h @ p[pre + "mlp.c_fc.weight"] + p[pre + "mlp.c_fc.bias"]
                    a = 0.5 * a * (1 + np.tanh(math.sqrt(2 / math.pi) * (a + 0.044715 * a ** 3)))
                    xs[t] = xs[t] + a @ p[pre + "mlp.c_proj.weight"] + p[pre + "mlp.c_proj.bias"]
                else:
                    pre = f"model.layers.{l}."
                    xs[t] = xs[t] + p[pre + "self_attn.o_proj.weight"] @ y
                    h = rms(xs[t], p[pre + "post_attention_layernorm.weight"])
                    g = p[pre + "mlp.gate_proj.weight"] @ h
                    u = p[pre + "mlp.up_proj.weight"] @ h
                    xs[t] = xs[t] + p[pre + "mlp.down_proj.weight"] @ (g / (1 + np.exp(-g)) * u)
        rows = []
        for t in range(n):
            if gpt2:
                h = ln(xs[t], p["ln_f.weight"], p["ln_f.bias"])
                rows.append(p["wte.weight"] @ h)
            else:
                h = rms(xs[t], p["model.norm.weight"])
                rows.append(p.get("lm_head.weight", p["model.embed_tokens.weight"]) @ h)
        out.append(rows)
    return np.array(out)


@pytest.mark.parametrize("name", ["gpt2", "qwen2_qkv_bias", "llama_untied"])
def test_oracle_matches_numpy_forward(name):
    cfg = CASES[name][0]
    params = random_weights(cfg, seed=7)
    inputs, _, _ = random_batch(cfg["vocab_size"], seed=8)
    tokens = inputs[:, :6]
    ref = numpy_forward(params, cfg, tokens)
    got = model_jax.logits(params, cfg, tokens)
    assert got.shape == ref.shape == (B, 6, cfg["vocab_size"])
    err = rel_err(got, ref)
    print(f"{name}: oracle vs numpy logits rel err {err:.2e}")
    assert err < 1e-10


def test_oracle_grads_match_finite_differences():
    """d/de loss(p + e*d) at e=0 by central differences equals <grad, d> for a random d."""
    for name in ["gpt2", "llama_gqa_tied"]:
        cfg = CASES[name][0]
        params = random_weights(cfg, seed=11)
        inputs, targets, mask = random_batch(cfg["vocab_size"], seed=12)
        _, grads = model_jax.loss_and_grads(params, cfg, inputs, targets, mask)
        rng = np.random.default_rng(13)
        direction = {k: rng.standard_normal(v.shape) for k, v in params.items()}
        h = 1e-6
        plus = {k: v.astype(np.float64) + h * direction[k] for k, v in params.items()}
        minus = {k: v.astype(np.float64) - h * direction[k] for k, v in params.items()}
        fd = (model_jax.loss(plus, cfg, inputs, targets, mask) -
              model_jax.loss(minus, cfg, inputs, targets, mask)) / (2 * h)
        analytic = sum(float(np.sum(grads[k] * direction[k])) for k in params)
        print(f"{name}: finite difference {fd:.10f} analytic {analytic:.10f}")
        assert abs(fd - analytic) <= 1e-7 * max(1.0, abs(analytic))


# ----------------------------------------------------------------------------------------------
# the C model against the oracle

@functools.lru_cache(maxsize=None)
def run_case(name, tmp_root):
    """Writes the case's checkpoint and batch, runs model_check and the oracle; returns both."""
    if not os.path.exists(MODEL_CHECK):
        raise AssertionError(f"{MODEL_CHECK} is not built: run make")
    cfg, opt = CASES[name]
    params = random_weights(cfg, seed=100 + list(CASES).index(name))
    V = cfg["vocab_size"]
    inputs, targets, mask = random_batch(V, seed=3)

    ref_loss, ref_grads = model_jax.loss_and_grads(params, cfg, inputs, targets, mask)
    grad_norm = math.sqrt(sum(float(np.sum(g * g)) for g in ref_grads.values()))
    clip = opt["clip_frac"] * grad_norm
    ref_steps, ref_norms = model_jax.adamw_losses(params, cfg, inputs, targets, mask, STEPS,
                                                  lr=opt["lr"], weight_decay=opt["wd"], clip=clip)

    case_dir = os.path.join(tmp_root, name)
    ckpt = os.path.join(case_dir, "ckpt")
    out = os.path.join(case_dir, "out")
    os.makedirs(ckpt), os.makedirs(out)
    save_file(params, os.path.join(ckpt, "model.safetensors"))
    with open(os.path.join(ckpt, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    tokens_path = os.path.join(case_dir, "batch.bin")
    write_tokens_file(tokens_path, inputs, targets, mask)
    cmd = [MODEL_CHECK, ckpt, tokens_path, out, "--steps", str(STEPS), "--lr", repr(opt["lr"]),
           "--wd", repr(opt["wd"]), "--clip", repr(clip), "--beta1", "0.9", "--beta2", "0.95",
           "--eps", "1e-8"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    c_logits = np.fromfile(os.path.join(out, "logits.bin"), dtype="<f4")
    assert c_logits.size == B * T * V, f"logits.bin holds {c_logits.size} floats, want {B}x{T}x{V}"
    return dict(
        cfg=cfg, params=params, inputs=inputs, targets=targets, mask=mask, clip=clip,
        ref_logits=model_jax.logits(params, cfg, inputs), ref_loss=ref_loss, ref_grads=ref_grads,
        ref_grad_norm=grad_norm, ref_steps=ref_steps, ref_norms=ref_norms,
        c_logits=c_logits.reshape(B, T, V), c_grads=load_file(os.path.join(out, "grads.safetensors")),
        results=results,
    )


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("model_oracle"))


@pytest.mark.parametrize("name", list(CASES))
def test_logits_and_loss(name, tmp_root):
    r = run_case(name, tmp_root)
    err = rel_err(r["c_logits"], r["ref_logits"])
    loss_err = abs(r["results"]["loss"] - r["ref_loss"]) / abs(r["ref_loss"])
    print(f"{name}: logits rel err {err:.2e}, loss C {r['results']['loss']:.7f} "
          f"oracle {r['ref_loss']:.7f} rel err {loss_err:.2e}")
    assert err < TOL
    assert loss_err < TOL
    # the mask must matter for this batch, otherwise the loss check above would not see it
    unmasked = model_jax.loss(r["params"], r["cfg"], r["inputs"], r["targets"], np.ones((B, T)))
    assert abs(unmasked - r["ref_loss"]) > 100 * TOL * abs(r["ref_loss"])


@pytest.mark.parametrize("name", list(CASES))
def test_gradients(name, tmp_root):
    r = run_case(name, tmp_root)
    ref = {k: v for k, v in r["ref_grads"].items()}
    got = model_jax.normalise_names(r["c_grads"])
    V = r["cfg"]["vocab_size"]
    # the C model may pad the vocabulary rows (Vp >= V); those rows must carry no gradient
    for k in ("wte.weight", "model.embed_tokens.weight", "lm_head.weight"):
        if k in got and got[k].shape[0] > V:
            assert np.all(got[k][V:] == 0), f"{k}: padded vocabulary rows have gradient"
            got[k] = got[k][:V]
    assert sorted(got) == sorted(ref), f"tensor names differ: C {sorted(got)} oracle {sorted(ref)}"
    largest = max(float(np.max(np.abs(g))) for g in ref.values())
    floor = 1e-3 * largest
    worst = 0.0
    for k in sorted(ref):
        assert got[k].shape == ref[k].shape, f"{k}: C shape {got[k].shape} oracle {ref[k].shape}"
        err = rel_err(got[k], ref[k], floor)
        worst = max(worst, err)
        assert err < TOL, f"{name} {k}: gradient rel err {err:.2e}"
    norm_err = abs(r["results"]["grad_norm"] - r["ref_grad_norm"]) / r["ref_grad_norm"]
    print(f"{name}: {len(ref)} gradient tensors, worst rel err {worst:.2e}, "
          f"grad norm rel err {norm_err:.2e}")
    assert norm_err < TOL


@pytest.mark.parametrize("name", list(CASES))
def test_adamw_steps(name, tmp_root):
    r = run_case(name, tmp_root)
    c_steps = r["results"]["step_losses"]
    assert len(c_steps) == STEPS
    errs = [abs(c - o) / abs(o) for c, o in zip(c_steps, r["ref_steps"])]
    print(f"{name}: losses C {['%.6f' % x for x in c_steps]}")
    print(f"{name}: oracle    {['%.6f' % x for x in r['ref_steps']]}; worst rel err {max(errs):.2e}")
    assert max(errs) < TOL
    assert r["ref_steps"][-1] < r["ref_steps"][0] - 0.01, "the optimiser made no progress"
    if r["clip"] > 0:
        assert r["ref_norms"][0] > r["clip"], "clipping is not active in this case"
        c_norms = r["results"]["step_grad_norms"]
        norm_errs = [abs(c - o) / o for c, o in zip(c_norms, r["ref_norms"])]
        assert max(norm_errs) < TOL


def test_model_check_rejects_bad_batch_files(tmp_path):
    """A malformed batch file ends in a non-zero exit and a message naming the file and field."""
    assert os.path.exists(MODEL_CHECK), f"{MODEL_CHECK} is not built: run make"
    inputs, targets, mask = random_batch(50, seed=1)
    good = tmp_path / "good.bin"
    write_tokens_file(good, inputs, targets, mask)
    data = good.read_bytes()
    cases = {
        "magic.bin": (b"XXXX" + data[4:], "MCTK"),
        "short.bin": (data[:-4], "needs"),
        "header.bin": (b"MCTK" + struct.pack("<ii", 0, T) + data[12:], "B=0"),
        "nomask.bin": (data[:-B * T * 4] + np.zeros(B * T, "<f4").tobytes(), "mask"),
    }
    for fname, (content, expect) in cases.items():
        path = tmp_path / fname
        path.write_bytes(content)
        proc = subprocess.run([MODEL_CHECK, str(tmp_path), str(path), str(tmp_path)],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode != 0, f"{fname} was accepted"
        assert fname in proc.stderr and expect in proc.stderr, proc.stderr
