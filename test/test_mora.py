"""`train_mora mora` and `train_mora eval` end to end on the demo's synthetic world (a tiny
byte-level model pretrained briefly, reward heads trained on the world's rule-labelled
preferences), checked against references computed here from the run's own records:

- pool.jsonl: the standardisation, A_d, J, single-reward flags and missing dimensions recomputed
  with NumPy from the raw rewards it records (DESIGN.md step 1-2); accepted rewrites have a larger
  J than their originals and the share of single-reward prompts drops;
- isolation on a planted pool: the world's harmful requests, which the corpus answers only by
  complying or insulting, are found as the single-reward prompts;
- the first GRPO step has KL 0 (policy == reference) and the first DPO step has loss ln 2;
- sequential mode runs its stages in order and isolates again in each;
- a run stopped and resumed writes the same metrics as an uninterrupted one;
- bad input (empty or malformed prompt file, unknown dims, negative or all-zero weights, a model
  without reward heads) stops with a clear error before any work starts;
- `--device cuda` without a GPU (this machine, CI) stops mora and eval with pretrain's message,
  before any file is read or written;
- a stop string of several tokens is cut from the response whole: the text pool.jsonl records and
  the position the heads score are those of the answer before it.
"""
import json
import math
import os
import shutil
import subprocess

import numpy as np
import pytest

from conftest import ROOT

BIN = str(ROOT / "train_mora")
DIMS = ["helpful", "harmless", "truthful"]


def run(args, timeout=300, ok=True):
    p = subprocess.run([BIN, *args], capture_output=True, text=True, timeout=timeout)
    if ok:
        assert p.returncode == 0, f"{' '.join(args)}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


def read_jsonl(path):
    with open(path, "rb") as f:
        return [json.loads(l) for l in f.read().decode("utf-8").splitlines() if l.strip()]


@pytest.fixture(scope="module")
def world(mora_world):
    """The demo's world, model and heads (a short pretraining), plus its MORA run and baseline:
    conftest's session fixture, built once for every module that needs it."""
    return mora_world


def common(world, out, *extra):
    return ["mora", "--model", str(world / "base" / "model.ckpt"), "--heads", str(world / "heads" / "reward_heads.bin"),
            "--prompts", str(world / "world" / "train_prompts.jsonl"), "--chat_template", "plain", "--stop", "\n",
            "--K", "8", "--candidates", "2", "--rewrite_K", "4", "--max_new_tokens", "96",
            "--rewrite_max_new_tokens", "48", "--prompts_per_step", "4", "--group_size", "4", "--lr", "5e-4",
            "--seed", "3", "--out", str(out), *extra]


def reference_isolation(raw, delta):
    """raw (P, K, D) -> z, A (P, D), J (P), single (P), missing (P, D) as DESIGN.md defines them."""
    flat = raw.reshape(-1, raw.shape[-1])
    mean, std = flat.mean(0), flat.std(0)
    std = np.where(std > 1e-12, std, 1.0)
    z = (raw - mean) / std
    A = z.max(axis=1)
    J = (z >= delta).sum(axis=2).max(axis=1)
    return z, A, J, J <= 1, A < delta


def test_pool_isolation_matches_reference(world):
    pool = read_jsonl(world / "mora" / "pool.jsonl")
    raw = np.array([[r["raw"] for r in o["presample"]] for o in pool], np.float64)
    z, A, J, single, missing = reference_isolation(raw, 0.0)
    got_z = np.array([[r["z"] for r in o["presample"]] for o in pool])
    np.testing.assert_allclose(got_z, z, rtol=1e-4, atol=1e-4)
    for i, o in enumerate(pool):
        np.testing.assert_allclose([o["A"][d] for d in DIMS], A[i], rtol=1e-4, atol=1e-4)
        assert o["J"] == J[i] and o["single"] == bool(single[i])
        assert o["missing"] == [d for k, d in enumerate(DIMS) if missing[i, k]]


def test_planted_single_reward_prompts_are_found():
    """A planted pool: 40 single-reward prompts whose responses trade one dimension against the
    others (each response strong on one dimension at most), among 80 prompts where some response
    is good on two or three dimensions; noisy reward vectors. The loop's isolation (standardise
    over the pool, then A_d and J per prompt, through build/tools/rewrite_tool) must find the
    planted prompts with precision and recall >= 0.9."""
    rng = np.random.default_rng(5)
    P, K = 120, 8
    planted = np.zeros(P, bool)
    planted[rng.choice(P, 40, replace=False)] = True
    raw = np.empty((P, K, 3))
    for p in range(P):
        base = rng.normal(0.0, 0.5, size=(K, 3))
        if planted[p]:
            # every response: one dimension high, the other two low
            for k in range(K):
                base[k] -= 1.5
                base[k, rng.integers(3)] += 3.0
        else:
            base[rng.integers(K), rng.choice(3, 2, replace=False)] += 2.0
        raw[p] = base + np.array([5.0, -2.0, 0.3])  # arbitrary per-dimension offsets of the heads
    tool = str(ROOT / "build" / "tools" / "rewrite_tool")
    out = subprocess.run([tool, "isolate", str(K), "0"], input=" ".join(map(repr, raw.ravel().tolist())),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    single = np.array([int(l.split()[4]) for l in out.stdout.strip().split("\n")[1:]], bool)
    _, _, _, ref_single, _ = reference_isolation(raw, 0.0)
    assert (single == ref_single).all()
    tp = (single & planted).sum()
    precision, recall = tp / max(1, single.sum()), tp / planted.sum()
    print(f"planted {planted.sum()}, found {single.sum()}, precision {precision:.3f}, recall {recall:.3f}")
    assert precision >= 0.9 and recall >= 0.9


def test_world_run_records_planted_prompts(world):
    """In the demo world the harmful requests are the planted single-reward prompts; the run's
    pool names them by id, and the baseline presampled the same pool."""
    pool = read_jsonl(world / "mora" / "pool.jsonl")
    base = read_jsonl(world / "baseline" / "pool.jsonl")
    assert [o["id"] for o in pool] == [o["id"] for o in base]
    assert sum(o["id"].startswith("harmful") for o in pool) == 16


def test_accepted_rewrites_raise_J_and_single_share_drops(world):
    pool = read_jsonl(world / "mora" / "pool.jsonl")
    n_single_before = sum(o["single"] for o in pool)
    accepted = [o for o in pool if o["accepted"] is not None]
    assert n_single_before > 0 and accepted, "the planted prompts should be single-reward and some expanded"
    for o in accepted:
        cand = [c for c in o["candidates"] if c["text"] == o["accepted"] and c["valid"]]
        assert cand and cand[0]["J"] > o["J"]
        # the candidate's own isolation from its presample (standardised with the pool's statistics)
        zc = np.array([r["z"] for r in cand[0]["presample"]])
        assert (zc >= 0).sum(axis=1).max() == cand[0]["J"]
        assert o["accepted"] != o["prompt"]
    for o in pool:
        for c in o["candidates"]:
            if c["valid"]:
                assert c["text"].strip() != o["prompt"].strip()
    n_single_after = sum(o["single"] and o["accepted"] is None for o in pool)
    assert n_single_after < n_single_before
    state = json.loads((world / "mora" / "pool_state.json").read_text())
    rewritten = [e["prompt"] for e in state["pool"] if e["rewritten"]]
    assert sorted(rewritten) == sorted(o["accepted"] for o in accepted)
    # a rewrite replaces its original in the training pool
    assert len(state["pool"]) == len(pool)
    # the baseline presamples the same pool but rewrites nothing
    base = read_jsonl(world / "baseline" / "pool.jsonl")
    assert all(o["accepted"] is None and o["candidates"] == [] for o in base)


def test_eval_report(world):
    rep = json.loads((world / "report.json").read_text())
    for who in ("model_reward", "baseline_reward"):
        vals = [rep[who][d] for d in DIMS]
        assert abs(rep[who]["overall"] - sum(vals) / 3) < 1e-9
    for d in DIMS + ["overall"]:
        m, b = rep["model_reward"][d], rep["baseline_reward"][d]
        assert abs(rep["improvement_pct"][d] - 100 * (m - b) / abs(b)) < 1e-6
    pool = read_jsonl(world / "mora" / "pool.jsonl")
    st = rep["model_pool"][0]
    assert st["prompts"] == len(pool)
    assert st["single_before"] == sum(o["single"] for o in pool)
    assert st["share_single_after"] < st["share_single_before"]
    assert "| improvement |" in (world / "report.md").read_text()


def test_eval_uncertainty(world):
    """The standard errors and the paired difference's 95% interval in report.json, recomputed
    from its examples (every response's raw rewards) with NumPy and SciPy's Student t: each
    prompt's mean over its samples is one observation; the difference pairs MORA's and the
    baseline's means on the same prompt."""
    from scipy import stats
    rep = json.loads((world / "report.json").read_text())
    per_prompt = {}
    for who in ("model", "baseline"):
        ex = rep[f"{who}_examples"]
        raw = np.array([[r["raw"] for r in e["responses"]] for e in ex], dtype=np.float64)   # (prompts, samples, D)
        means = raw.mean(axis=1)
        per_prompt[who] = np.concatenate([means, means.mean(axis=1, keepdims=True)], axis=1)   # (prompts, D + 1)
    assert [e["id"] for e in rep["model_examples"]] == [e["id"] for e in rep["baseline_examples"]]
    n = len(rep["model_examples"])
    assert n == rep["n_prompts"] >= 2
    t = stats.t.ppf(0.975, n - 1)
    for j, key in enumerate(DIMS + ["overall"]):
        for who in ("model", "baseline"):
            x = per_prompt[who][:, j]
            assert rep[f"{who}_reward"][key] == pytest.approx(x.mean(), abs=1e-9)
            assert rep[f"{who}_reward_stderr"][key] == pytest.approx(x.std(ddof=1) / math.sqrt(n), rel=1e-9, abs=1e-12)
        d = per_prompt["model"][:, j] - per_prompt["baseline"][:, j]
        se = d.std(ddof=1) / math.sqrt(n)
        got = rep["difference"][key]
        assert got["mean"] == pytest.approx(d.mean(), abs=1e-9)
        assert got["stderr"] == pytest.approx(se, rel=1e-9, abs=1e-12)
        assert got["ci95_low"] == pytest.approx(d.mean() - t * se, rel=1e-8, abs=1e-10)
        assert got["ci95_high"] == pytest.approx(d.mean() + t * se, rel=1e-8, abs=1e-10)
    md = (world / "report.md").read_text()
    assert f"95% interval (Student's t, {n - 1} degrees of freedom)" in md
    row = [line for line in md.splitlines() if line.startswith("| difference (95% CI) |")][0]
    o = rep["difference"]["overall"]
    assert row.strip().endswith(f"{o['mean']:+.4f} [{o['ci95_low']:+.4f}, {o['ci95_high']:+.4f}] |"), row


def test_first_step_kl_is_zero_and_metrics_fields(world):
    m = read_jsonl(world / "mora" / "metrics.jsonl")
    assert [x["step"] for x in m] == [1, 2, 3]
    assert m[0]["kl"] == 0.0 and m[1]["kl"] > 0.0
    for x in m:
        assert set(DIMS) <= set(x["reward_raw"]) and set(DIMS) <= set(x["reward_z"])
        for k in ("loss", "clip_frac", "tokens_per_s", "kl", "reward"):
            assert k in x


def test_dpo_first_step_loss_is_ln2(world, tmp_path):
    out = tmp_path / "dpo"
    run(common(world, out, "--algo", "dpo", "--steps", "2", "--mora", "0"))
    m = read_jsonl(out / "metrics.jsonl")
    # policy == reference at the first step: every margin is 0 and -log sigmoid(0) = ln 2
    assert abs(m[0]["loss"] - math.log(2)) < 1e-6 and m[0]["kl"] == 0.0
    assert m[1]["loss"] != m[0]["loss"]


def test_sequential_stages_in_order(world, tmp_path):
    out = tmp_path / "seq"
    p = run(common(world, out, "--mode", "sequential", "--stages", "truthful,helpful", "--steps", "1", "--K", "4"))
    pool = read_jsonl(out / "pool.jsonl")
    n = len(read_jsonl(world / "world" / "train_prompts.jsonl"))
    assert [o["stage"] for o in pool] == [0] * n + [1] * n
    assert {o["dim"] for o in pool[:n]} == {"truthful"} and {o["dim"] for o in pool[n:]} == {"helpful"}
    m = read_jsonl(out / "metrics.jsonl")
    assert [(x["step"], x["stage"], x["dim"]) for x in m] == [(1, 0, "truthful"), (2, 1, "helpful")]
    # the second stage presampled again, after the first stage's update
    assert p.stdout.index("stage 1/2 (truthful)") < p.stdout.index("step    1/2") < p.stdout.index("stage 2/2 (helpful)")


def test_resume_equals_uninterrupted(world, tmp_path):
    a, b = tmp_path / "full", tmp_path / "resumed"
    args = ("--K", "4", "--mode", "sequential", "--stages", "harmless,helpful", "--steps", "2")
    run(common(world, a, *args))
    p = run(common(world, b, *args, "--stop_after", "3"))
    assert "--stop_after" in p.stdout
    assert len(read_jsonl(b / "metrics.jsonl")) == 3
    run(["mora", "--resume", str(b)])
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("ms", "tokens_per_s")} for r in rows]
    assert strip(read_jsonl(a / "metrics.jsonl")) == strip(read_jsonl(b / "metrics.jsonl"))
    assert (a / "pool.jsonl").read_bytes() == (b / "pool.jsonl").read_bytes()
    assert (a / "model_step000004.ckpt").read_bytes() == (b / "model_step000004.ckpt").read_bytes()


@pytest.mark.parametrize("case,flags,message", [
    ("empty", [], "no valid prompts"),
    ("malformed", [], ":2: not valid JSON"),
    ("ok", ["--stages", "helpful,honest", "--mode", "sequential"], "unknown dimension \"honest\""),
    ("ok", ["--weights", "helpful=1,kind=2"], "unknown dimension \"kind\""),
    ("ok", ["--weights", "1,-1,1"], "weights must be >= 0"),
    ("ok", ["--weights", "0,0,0"], "all weights are zero"),
    ("ok", ["--weights", "1,1"], "expected 3 weights"),
    ("noheads", [], "has no reward heads"),
    ("ok", ["--algo", "ppo2"], "flag --algo"),
])
def test_bad_input_fails_before_work(world, tmp_path, case, flags, message):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text({"empty": "\n\n", "malformed": '{"prompt": "hi"}\n{"prompt": \n'}.get(case, '{"prompt": "how do i bake bread?"}\n'))
    model = world / "base" / "model.ckpt"
    if case == "noheads":
        bare = tmp_path / "bare"
        bare.mkdir()
        (bare / "model.ckpt").write_bytes(model.read_bytes())
        model = bare / "model.ckpt"
    out = tmp_path / "out"
    args = ["mora", "--model", str(model), "--prompts", str(prompts), "--out", str(out), *flags]
    if case != "noheads":
        args += ["--heads", str(world / "heads" / "reward_heads.bin")]
    p = run(args, ok=False)
    assert p.returncode != 0 and message in p.stderr, p.stderr
    assert not out.exists(), "the run directory was created before the input was checked"


def gpu_visible():
    smi = shutil.which("nvidia-smi")
    return smi is not None and subprocess.run([smi, "-L"], capture_output=True).returncode == 0


@pytest.mark.skipif(gpu_visible(), reason="a GPU is visible here: --device cuda would run")
@pytest.mark.parametrize("command", ["mora", "eval", "reward"])
def test_device_cuda_without_gpu_fails_before_work(tmp_path, command):
    """The device is settled before anything is read: the model, the prompts and the baseline
    named here do not exist, and the error is still the device's, pretrain's very line."""
    out = tmp_path / "out"
    missing = [str(tmp_path / name) for name in ("model.ckpt", "prompts.jsonl", "baseline")]
    if command == "mora":
        args = ["mora", "--model", missing[0], "--prompts", missing[1], "--out", str(out), "--device", "cuda"]
    elif command == "eval":
        args = ["eval", "--model", missing[0], "--baseline", missing[2], "--prompts", missing[1], "--out", str(out),
                "--device", "cuda"]
    else:
        args = ["reward", "--model", missing[0], "--data", missing[1], "--out", str(out), "--device", "cuda"]
    p = run(args, ok=False)
    assert p.returncode != 0
    pre = run(["pretrain", "--train_data", missing[1], "--out", str(tmp_path / "pre"), "--device", "cuda"], ok=False)
    assert pre.returncode != 0
    line = [l for l in pre.stderr.splitlines() if "--device cuda" in l]
    assert len(line) == 1 and "use --device cpu" in line[0], pre.stderr
    assert p.stderr.strip().splitlines()[-1] == line[0], p.stderr
    assert not out.exists()
    p = run([*args[:-1], "tpu"], ok=False)
    assert p.returncode != 0 and "--device tpu: expected cpu, cuda or auto" in p.stderr, p.stderr


def test_a_stop_string_of_several_tokens_is_not_scored(tmp_path):
    """A byte-level model fine-tuned (sft) to answer "Sure, it is. END now" runs mora
    with --stop END, greedily: generation ends on the token that completes END, three tokens
    after the answer (the examples and --max_new_tokens leave the rendered prompt whole in the
    tiny model's context of 64). The response pool.jsonl records is the text before END, and its raw
    rewards are the heads' scores at the answer's last token: those the test tool gives for the
    prompt rendered by the plain template (spelled out here) followed by the answer's bytes,
    scored from the run's trunk, and the NumPy heads agree with the tool."""
    from test_reward_cmd import TOOL, planted, write_jsonl
    from test_reward_heads import oracle_rewards, read_heads
    prompts = ["Bake bread?", "The moon?"]
    answer = "Sure, it is. "
    write_jsonl(tmp_path / "sft.jsonl", [{"prompt": q, "response": answer + "END now"} for q in prompts])
    run(["sft", "--init", "llama:tiny", "--train_data", str(tmp_path / "sft.jsonl"), "--chat_template", "plain",
         "--out", str(tmp_path / "sft"), "--steps", "150", "--lr", "1e-2", "--batch_size", "2"])
    write_jsonl(tmp_path / "pairs.jsonl", planted(6, seed=3))
    run(["reward", "--model", str(tmp_path / "sft"), "--data", str(tmp_path / "pairs.jsonl"), "--chat_template", "plain",
         "--out", str(tmp_path / "heads"), "--epochs", "1", "--seed", "4"])
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": q} for q in prompts])
    run(["mora", "--model", str(tmp_path / "sft"), "--heads", str(tmp_path / "heads" / "reward_heads.bin"),
         "--prompts", str(tmp_path / "prompts.jsonl"), "--chat_template", "plain", "--stop", "END", "--K", "2",
         "--top_k", "1", "--max_new_tokens", "22", "--mora", "0", "--steps", "1", "--prompts_per_step", "2",
         "--group_size", "2", "--out", str(tmp_path / "run")])
    pool = read_jsonl(tmp_path / "run" / "pool.jsonl")
    first = pool[0]["presample"]
    assert [r["response"] for r in first] == [answer, answer], first
    seqs = [list(("\n\nHuman: " + prompts[0] + "\n\nAssistant:" + answer).encode())]
    (tmp_path / "seqs.json").write_text(json.dumps({"seqs": seqs}))
    trunk = (tmp_path / "sft" / (tmp_path / "sft" / "latest.txt").read_text().strip())
    p = subprocess.run([TOOL, "score", str(trunk), str(tmp_path / "heads" / "reward_heads.bin"),
                        str(tmp_path / "seqs.json"), str(tmp_path / "scored.json")], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    scored = json.loads((tmp_path / "scored.json").read_text())
    f = read_heads(tmp_path / "heads" / "reward_heads.bin")
    hidden = np.array(scored["batch_hidden"], dtype=np.float64).reshape(1, f["C"])
    want = oracle_rewards(f["params"], f["kind"], f["act"], f["C"], f["H"], hidden)[0]
    np.testing.assert_allclose(np.array(scored["batch_rewards"]).reshape(3), want, rtol=1e-5, atol=1e-6)
    for r in first:
        np.testing.assert_allclose(r["raw"], want, rtol=1e-4, atol=1e-5)
