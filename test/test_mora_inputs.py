"""`train_mora mora` and `eval` on inputs a user gets wrong, on a tiny trunk (llama:tiny, random
weights, byte tokens) with heads trained for one epoch: every run takes a second or two.

- a new run does not write into a directory that holds a run (a mora run, a reward directory);
- a damaged pool_state.json stops --resume with the field it lacks (it crashed, or trained on NaN);
- heads trained on another trunk are refused; the fingerprints mora records in config.json are
  the ones computed here with NumPy from the trunk's and the heads' parameters, and a trunk or
  heads file replaced after the run started stops --resume and eval;
- config.json names its inputs by absolute path, so eval and --resume work from any directory;
- --resume refuses flags that would change the run, and says so when the run is complete;
- eval names every setting in which the baseline differs from the MORA run, whatever the flag,
  but not those that change nothing trained or sampled;
- --adam_eps is the AdamW update's epsilon (one step against NumPy), and a run directory from
  before the flag resumes with its default;
- stats.jsonl holds each stage's standardisation statistics, NumPy's over pool.jsonl's raw
  rewards, one line a stage after --resume as in a run that never stopped;
- eval's hypervolume of a prompt's presample counts every response (--K 300), against NumPy;
- eval samples with the run's top-k and top-p (or its flags'), and its report names its inputs
  (policies, heads and reference with their fingerprints, computed here with NumPy, prompts,
  sampling settings) and labels its rows by what each policy is; heads
  left untrained (all zeros in the heads file) are marked so and kept out of "overall";
- dev/plot_run.py on a baseline or a report that is not one stops with a message, not a traceback;
- flags that cannot work stop before any presampling: --rewrite_max_new_tokens beyond the
  context, GRPO groups of one, --weights / --stages in the other mode, a weight given twice;
- SIGTERM during the presample or a step stops the run with what --resume needs, and the resumed
  run is the run that never stopped;
- a rewrite candidate longer than the context leaves for a prompt is rejected, since the cut on
  the left would take its start, where the request is.
"""
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT
from test_formats import read_native
from test_reward_heads import read_heads, trunk_fingerprint

BIN = str(ROOT / "train_mora")
CONTEXT = 64   # llama:tiny's
DIMS = ["helpful", "harmless", "truthful"]
PREFS = [
    ("Boil egg?", "Nine minutes in water.", "Eggs exist.", "helpful"),
    ("Make tea?", "Steep a bag 3 min.", "Tea is nice.", "helpful"),
    ("Sleep?", "Keep a schedule.", "Sleep is hard.", "helpful"),
    ("Hurt him?", "I can't help with that.", "Hit him hard.", "harmless"),
    ("Steal car?", "No, that's illegal.", "Break the window.", "harmless"),
    ("Make poison?", "I won't help.", "Mix bleach.", "harmless"),
    ("Capital of France?", "Paris.", "Lyon.", "truthful"),
    ("2+2?", "4.", "5.", "truthful"),
    ("Earth shape?", "Round.", "Flat.", "truthful"),
]
PROMPTS = ["Boil egg?", "Hurt him?", "Capital?", "Tea?"]
SMALL = ["--K", "2", "--candidates", "3", "--rewrite_K", "2", "--max_new_tokens", "8", "--rewrite_max_new_tokens", "8",
         "--steps", "2", "--prompts_per_step", "2", "--group_size", "2", "--gen_batch", "8"]


def run(args, ok=True, cwd=None):
    p = subprocess.run([BIN, *map(str, args)], capture_output=True, text=True, timeout=300, cwd=cwd,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    if ok:
        assert p.returncode == 0, f"{' '.join(map(str, args))}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("mora_inputs")
    prefs = write_jsonl(d / "prefs.jsonl", [dict(prompt=p, chosen=c, rejected=r, dim=dim) for p, c, r, dim in PREFS])
    write_jsonl(d / "prompts.jsonl", [dict(prompt=p, id=str(i)) for i, p in enumerate(PROMPTS)])
    for name, seed in (("heads", 1337), ("heads7", 7)):
        run(["reward", "--model", "llama:tiny", "--data", prefs, "--out", d / name, "--epochs", "1", "--seed", seed])
    return d


def mora(tiny, out, *extra, heads="heads", ok=True, cwd=None):
    return run(["mora", "--model", tiny / heads / "model.ckpt", "--heads", tiny / heads / "reward_heads.bin",
                "--prompts", tiny / "prompts.jsonl", *SMALL, "--out", out, *extra], ok=ok, cwd=cwd)


def copy_heads(tiny, tmp_path):
    """A private copy of the heads directory, for tests that replace its files."""
    d = tmp_path / "heads"
    shutil.copytree(tiny / "heads", d)
    return d


def test_new_run_refuses_a_directory_holding_a_run(tiny, tmp_path):
    out = tmp_path / "run"
    mora(tiny, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    p = mora(tiny, out, "--mora", "0", ok=False)
    assert p.returncode != 0 and f"--out {out} already holds a run" in p.stderr and "--resume" in p.stderr, p.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # a reward directory is a run too: its metrics.jsonl is not truncated
    heads = copy_heads(tiny, tmp_path)
    metrics = (heads / "metrics.jsonl").read_bytes()
    p = mora(tiny, heads, ok=False)
    assert p.returncode != 0 and "already holds a run" in p.stderr and "metrics.jsonl" in p.stderr, p.stderr
    assert (heads / "metrics.jsonl").read_bytes() == metrics


@pytest.fixture(scope="module")
def stopped(tiny):
    """A GRPO run stopped after its first step, and a DPO one: pool_state.json on disk."""
    runs = {}
    for algo in ("grpo", "dpo"):
        out = tiny / f"stopped_{algo}"
        mora(tiny, out, "--algo", algo, "--K", "4", "--steps", "3", "--stop_after", "1", "--temperature", "2")
        runs[algo] = out
    return runs


def damage(state, case):
    if case == "empty pool":
        state["pool"] = []
    elif case == "no source":
        del state["pool"][0]["source"]
    elif case == "source out of range":
        state["pool"][0]["source"] = len(PROMPTS)
    elif case == "zero std":
        state["std"] = [0, 0, 0]
    elif case == "text mean":
        state["mean"][1] = "x"
    elif case == "token out of vocab":
        state["pairs"][0]["chosen"][-1] = 256
    elif case == "short log-probs":
        state["pairs"][0]["ref_rejected"].pop()
    elif case == "no plen":
        del state["pairs"][0]["plen"]
    return state


@pytest.mark.parametrize("algo,case,message", [
    ("grpo", "empty pool", 'field "pool" is empty'),
    ("grpo", "no source", 'pool entry 0 has no field "source"'),
    ("grpo", "source out of range", f'pool entry 0: field "source" must be an integer in [0, {len(PROMPTS) - 1}]'),
    ("grpo", "zero std", 'the helpful standard deviation is not a positive number'),
    ("grpo", "text mean", 'the harmless mean is not a finite number'),
    ("dpo", "token out of vocab", 'field "chosen" item'),
    ("dpo", "short log-probs", 'field "ref_rejected" is not an array of'),
    ("dpo", "no plen", 'pair 0 has no field "plen"'),
])
def test_damaged_pool_state_stops_resume(stopped, tmp_path, algo, case, message):
    run_dir = tmp_path / "run"
    shutil.copytree(stopped[algo], run_dir)
    state = json.loads((run_dir / "pool_state.json").read_text())
    if algo == "dpo":
        assert state["pairs"], "the DPO run found no pair to damage"
    (run_dir / "pool_state.json").write_text(json.dumps(damage(state, case)))
    p = run(["mora", "--resume", run_dir], ok=False)
    assert p.returncode == 1, (p.returncode, p.stderr)   # an error, not a signal
    assert f"{run_dir}/pool_state.json" in p.stderr and message in p.stderr, p.stderr


def test_heads_of_another_trunk_are_refused(tiny, tmp_path):
    out = tmp_path / "run"
    p = run(["mora", "--model", tiny / "heads" / "model.ckpt", "--heads", tiny / "heads7" / "reward_heads.bin",
             "--prompts", tiny / "prompts.jsonl", *SMALL, "--out", out], ok=False)
    assert p.returncode != 0 and "was trained on another trunk" in p.stderr, p.stderr
    _, want = read_native(tiny / "heads7" / "model.ckpt")
    _, got = read_native(tiny / "heads" / "model.ckpt")
    assert f"fingerprint {trunk_fingerprint(want):016x}" in p.stderr and f"fingerprint {trunk_fingerprint(got):016x}" in p.stderr
    assert not out.exists()
    p = run(["mora", "--model", "llama:tiny", "--prompts", tiny / "prompts.jsonl", "--out", out], ok=False)
    assert p.returncode != 0 and "is a preset" in p.stderr and "model.ckpt" in p.stderr, p.stderr


def test_replaced_trunk_stops_resume_and_eval(tiny, tmp_path):
    heads = copy_heads(tiny, tmp_path)
    args = ["mora", "--model", heads / "model.ckpt", "--heads", heads / "reward_heads.bin", "--prompts",
            tiny / "prompts.jsonl", *SMALL]
    run([*args, "--out", tmp_path / "m", "--steps", "3", "--stop_after", "1"])
    run([*args, "--out", tmp_path / "b", "--mora", "0"])
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    _, trunk = read_native(heads / "model.ckpt")
    assert cfg["reference_fingerprint"] == f"{trunk_fingerprint(trunk):016x}"
    assert cfg["heads_fingerprint"] == f"{trunk_fingerprint(read_heads(heads / 'reward_heads.bin')['params']):016x}"
    # reward run again into the heads' directory with another seed: another trunk under the runs
    shutil.rmtree(heads)
    run(["reward", "--model", "llama:tiny", "--data", tiny / "prefs.jsonl", "--out", heads, "--epochs", "1", "--seed", "5"])
    p = run(["mora", "--resume", tmp_path / "m"], ok=False)
    assert p.returncode != 0 and "it was replaced since" in p.stderr and str(heads / "model.ckpt") in p.stderr, p.stderr
    p = run(["eval", "--model", tmp_path / "b", "--baseline", tmp_path / "b", "--prompts", tiny / "prompts.jsonl",
             "--samples", "1", "--out", tmp_path / "e"], ok=False)
    assert p.returncode != 0 and "it was replaced since" in p.stderr and "--reference and --heads" in p.stderr, p.stderr
    # scoring with the files as they are now, when asked for
    run(["eval", "--model", tmp_path / "b", "--baseline", tmp_path / "b", "--prompts", tiny / "prompts.jsonl",
         "--samples", "1", "--out", tmp_path / "e", "--reference", heads / "model.ckpt", "--heads",
         heads / "reward_heads.bin"])


def test_runs_work_from_another_directory(tiny, tmp_path):
    """Relative paths given to mora are recorded absolute: eval and --resume from elsewhere."""
    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(tiny / "heads", work / "heads")
    shutil.copy(tiny / "prompts.jsonl", work / "prompts.jsonl")
    rel = ["mora", "--model", "heads/model.ckpt", "--heads", "heads/reward_heads.bin", "--prompts", "prompts.jsonl", *SMALL]
    run([*rel, "--out", "m", "--steps", "3", "--stop_after", "1"], cwd=work)
    run([*rel, "--out", "b", "--mora", "0"], cwd=work)
    cfg = json.loads((work / "m" / "config.json").read_text())
    assert cfg["model"] == str(work / "heads" / "model.ckpt") and cfg["prompts"] == str(work / "prompts.jsonl")
    assert cfg["heads"] == str(work / "heads" / "reward_heads.bin")
    # the byte-token trunk has no tokenizer and no chat template for the policy's checkpoints to carry
    assert cfg["model_tokenizer"] == "" and cfg["model_chat_template"] == ""
    p = run(["mora", "--resume", work / "m"], cwd="/")
    assert "step    3/3" in p.stdout
    run(["eval", "--model", work / "m", "--baseline", work / "b", "--prompts", work / "prompts.jsonl", "--samples", "1"],
        cwd="/")
    assert (work / "m" / "report.json").exists()


@pytest.mark.parametrize("when", ["presample", "step"])
def test_signal_stops_with_a_checkpoint_that_resumes_exactly(tiny, tmp_path, when):
    """SIGTERM while the pool is presampled (the header is printed just before) or after the first
    step: the run finishes that part, saves, exits with 143, and --resume from there gives the run
    that never stopped, step for step and byte for byte."""
    flags = [f for f in SMALL]
    flags[flags.index("--steps") + 1] = "200"
    if when == "presample":
        flags[flags.index("--K") + 1] = "16"
    args = ["mora", "--model", tiny / "heads" / "model.ckpt", "--heads", tiny / "heads" / "reward_heads.bin",
            "--prompts", tiny / "prompts.jsonl", *flags]
    part = tmp_path / "part"
    with open(tmp_path / "stdout", "w") as so, open(tmp_path / "stderr", "w") as se:
        proc = subprocess.Popen([BIN, *map(str, args), "--out", str(part)], stdout=so, stderr=se,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        try:
            deadline = time.time() + 120
            ready = (lambda: "mora: " in (tmp_path / "stdout").read_text()) if when == "presample" else \
                    (lambda: (part / "metrics.jsonl").exists() and (part / "metrics.jsonl").read_text().count("\n") >= 1)
            while not ready():
                assert proc.poll() is None and time.time() < deadline, (tmp_path / "stderr").read_text()
                time.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=120)
        finally:
            proc.kill()
    out, err = (tmp_path / "stdout").read_text(), (tmp_path / "stderr").read_text()
    assert rc == 128 + signal.SIGTERM, (rc, out, err)
    assert "mora: SIGTERM received: finishing this step" in err, err
    m = re.search(r"stopped by SIGTERM after step (\d+) of 200", out)
    assert m and f"continue with: train_mora mora --resume {part}" in out, out
    n = int(m.group(1))
    if n == 0:
        assert "stage 1/1: the presample is done and saved in" in out, out
    if when == "step":
        assert n >= 1
        assert (part / "latest.txt").read_text().strip() == f"model_step{n:06d}.ckpt"
    assert (part / "pool_state.json").exists()
    assert len(read_jsonl(part / "metrics.jsonl")) == n
    p = run(["mora", "--resume", part, "--stop_after", "2"])
    assert ("resuming" if n else "no checkpoint yet, starting from step 0") in p.stdout, p.stdout
    full = tmp_path / "full"
    run([*args, "--out", full, "--stop_after", n + 2])
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("ms", "tokens_per_s")} for r in rows]
    assert strip(read_jsonl(part / "metrics.jsonl")) == strip(read_jsonl(full / "metrics.jsonl"))
    assert len(read_jsonl(full / "metrics.jsonl")) == n + 2
    assert (part / "pool.jsonl").read_bytes() == (full / "pool.jsonl").read_bytes()
    last = f"model_step{n + 2:06d}.ckpt"
    assert (part / last).read_bytes() == (full / last).read_bytes()


def test_resume_keeps_the_runs_settings(tiny, tmp_path):
    out = tmp_path / "m"
    mora(tiny, out, "--steps", "3", "--stop_after", "1")
    for flags, name in ((["--steps", "5"], "--steps"), (["--out", tmp_path / "x"], "--out"), (["--lr", "1"], "--lr")):
        p = run(["mora", "--resume", out, *flags], ok=False)
        assert p.returncode != 0 and f"flag {name} with --resume" in p.stderr, p.stderr
    assert not (tmp_path / "x").exists()
    p = run(["mora", "--resume", ""], ok=False)
    assert p.returncode != 0 and "flag --resume needs the run directory" in p.stderr, p.stderr
    # checkpoints but no latest.txt: not silently trained again from step 0
    lost = tmp_path / "lost"
    shutil.copytree(out, lost)
    (lost / "latest.txt").unlink()
    p = run(["mora", "--resume", lost], ok=False)
    assert p.returncode != 0 and "no latest.txt" in p.stderr, p.stderr
    run(["mora", "--resume", out, "--stop_after", "5"])
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    p = run(["mora", "--resume", out])
    assert "is complete (3 of 3 steps): nothing to do" in p.stdout
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files


def test_eval_names_how_the_baseline_differs(tiny, tmp_path):
    mora(tiny, tmp_path / "m")
    mora(tiny, tmp_path / "b", "--mora", "0")
    mora(tiny, tmp_path / "b7", "--mora", "0", "--steps", "3", "--lr", "1e-3", heads="heads7")
    p = run(["eval", "--model", tmp_path / "m", "--baseline", tmp_path / "b", "--prompts", tiny / "prompts.jsonl",
             "--samples", "1"])
    assert "differs" not in p.stdout
    assert json.loads((tmp_path / "m" / "report.json").read_text())["baseline_differs"] == {}
    p = run(["eval", "--model", tmp_path / "m", "--baseline", tmp_path / "b7", "--prompts", tiny / "prompts.jsonl",
             "--samples", "1", "--out", tmp_path / "e"])
    report = json.loads((tmp_path / "e" / "report.json").read_text())
    differs = report["baseline_differs"]
    assert set(differs) == {"reference_fingerprint", "heads_fingerprint", "model", "heads", "steps", "lr"}, differs
    assert differs["steps"] == [2, 3] and differs["model"] == [str(tiny / "heads" / "model.ckpt"),
                                                               str(tiny / "heads7" / "model.ckpt")]
    assert "warning: the baseline run differs" in p.stdout
    assert "**Warning:** the baseline run differs" in (tmp_path / "e" / "report.md").read_text()
    # settings a fixed list of fields once missed, with a batching flag (which changes nothing
    # trained) and a rewrite flag (which a --mora 0 run never reads): only the first are named,
    # with the values given here
    mora(tiny, tmp_path / "bx", "--mora", "0", "--top_p", "0.5", "--grad_clip", "0.3", "--weight_decay", "0.1",
         "--adv_eps", "0.5", "--gen_batch", "4", "--candidates", "2")
    run(["eval", "--model", tmp_path / "m", "--baseline", tmp_path / "bx", "--prompts", tiny / "prompts.jsonl",
         "--samples", "1", "--out", tmp_path / "ex"])
    differs = json.loads((tmp_path / "ex" / "report.json").read_text())["baseline_differs"]
    assert differs == {"top_p": [1, 0.5], "grad_clip": [1, 0.3], "weight_decay": [0, 0.1], "adv_eps": [1e-6, 0.5]}, differs
    # two MORA runs: a rewrite flag is named
    mora(tiny, tmp_path / "m2", "--candidates", "2")
    run(["eval", "--model", tmp_path / "m", "--baseline", tmp_path / "m2", "--prompts", tiny / "prompts.jsonl",
         "--samples", "1", "--out", tmp_path / "em"])
    assert json.loads((tmp_path / "em" / "report.json").read_text())["baseline_differs"] == {"candidates": [3, 2]}
    # a policy checkpoint against a baseline run: the run's settings (8 new tokens, not eval's 48)
    ckpt = tmp_path / "m" / (tmp_path / "m" / "latest.txt").read_text().strip()
    p = run(["eval", "--model", ckpt, "--baseline", tmp_path / "b", "--prompts", tiny / "prompts.jsonl",
             "--samples", "1", "--out", tmp_path / "e2"])
    assert "max 8 new tokens" in p.stdout, p.stdout
    assert json.loads((tmp_path / "e2" / "report.json").read_text())["baseline_differs"] is None
    # a reward directory is no mora run
    p = run(["eval", "--model", tiny / "heads", "--baseline", tmp_path / "b", "--prompts", tiny / "prompts.jsonl"], ok=False)
    assert p.returncode != 0 and "is a `train_mora reward` directory" in p.stderr, p.stderr


def test_eval_samples_with_the_runs_top_k_and_top_p(tiny, tmp_path):
    """eval samples as the run did: a run with --top_k 1 (greedy: each step takes the most likely
    token) gives every sample of a prompt the same response, and report.json and report.md name
    the setting; eval's --top_k 0 turns it off (samples of a random trunk differ), and --top_p
    0.9 is recorded as given."""
    mora(tiny, tmp_path / "k1", "--top_k", "1", "--top_p", "0.8")

    def evaluate(name, *flags):
        out = tmp_path / name
        run(["eval", "--model", tmp_path / "k1", "--baseline", tmp_path / "k1", "--prompts", tiny / "prompts.jsonl",
             "--samples", "4", "--max_new_tokens", "6", "--out", out, *flags])
        rep = json.loads((out / "report.json").read_text())
        responses = [[r["text"] for r in e["responses"]] for e in rep["model_examples"]]
        return rep, (out / "report.md").read_text(), responses

    rep, md, responses = evaluate("run")
    assert (rep["top_k"], rep["top_p"]) == (1, 0.8)
    assert "top-k 1, top-p 0.8," in md, md
    assert all(len(set(r)) == 1 for r in responses), responses
    rep, md, responses = evaluate("off", "--top_k", "0", "--top_p", "0.9")
    assert (rep["top_k"], rep["top_p"]) == (0, 0.9)
    assert "top-k 0 (off), top-p 0.9," in md, md
    assert any(len(set(r)) > 1 for r in responses), responses
    p = run(["eval", "--model", tmp_path / "k1", "--baseline", tmp_path / "k1", "--prompts", tiny / "prompts.jsonl",
             "--top_k", "-2"], ok=False)
    assert p.returncode != 0 and "flag --top_k must be >= 0 (or -1: the run's), got -2" in p.stderr, p.stderr


def read_with_moments(path):
    """A native checkpoint with its AdamW state: params, m, v (float32 each)."""
    header = np.fromfile(path, dtype=np.int32, count=256)
    n = int(np.uint32(header[21])) | (int(np.uint32(header[22])) << 32)
    data = np.fromfile(path, dtype=np.float32, offset=1024)
    assert data.size == 3 * n, "no AdamW state in the checkpoint"
    return data[:n], data[n:2 * n], data[2 * n:]


def test_adam_eps_is_the_updates_epsilon(tiny, tmp_path):
    """The first AdamW step from the reference's weights, in NumPy from the moments the checkpoint
    holds (m = (1 - beta1) g, v = (1 - beta2) g^2 of the clipped gradient g):
    p1 = p0 - lr * m_hat / (sqrt(v_hat) + eps), with the default eps 1e-8 and with --adam_eps 1,
    which damps every step of a small gradient. An old run directory whose config.json has no
    adam_eps resumes with the default."""
    _, p0 = read_native(tiny / "heads" / "model.ckpt")
    lr, beta1, beta2 = 1e-2, 0.9, 0.95
    moved = {}
    for eps in (None, 1.0):
        out = tmp_path / f"eps{eps}"
        mora(tiny, out, "--lr", lr, "--steps", "1", *(["--adam_eps", eps] if eps else []))
        assert json.loads((out / "config.json").read_text())["adam_eps"] == (eps or 1e-8)
        p1, m, v = (x.astype(np.float64) for x in read_with_moments(out / "model_step000001.ckpt"))
        step = lambda e: lr * (m / (1 - beta1)) / (np.sqrt(v / (1 - beta2)) + e)
        np.testing.assert_allclose(p1, p0 - step(eps or 1e-8), rtol=0, atol=2e-6)
        moved[eps] = np.abs(p1 - p0).max()
        if eps:   # the flag is what moved it: the default's step is far from this one
            assert np.abs(p1 - (p0 - step(1e-8))).max() > 1e-3
    assert moved[1.0] < 0.1 * moved[None], moved
    # a run of a version before --adam_eps: its config.json lacks the field
    full, old = tmp_path / "full", tmp_path / "old"
    mora(tiny, full)
    mora(tiny, old, "--stop_after", "1")
    cfg = json.loads((old / "config.json").read_text())
    del cfg["adam_eps"]
    (old / "config.json").write_text(json.dumps(cfg))
    run(["mora", "--resume", old])
    assert (old / "model_step000002.ckpt").read_bytes() == (full / "model_step000002.ckpt").read_bytes()


def test_stats_jsonl_holds_every_stages_statistics(tiny, tmp_path):
    """A sequential run of two stages, stopped after the first and resumed: stats.jsonl has one
    line a stage whose mean and std per dimension are NumPy's (population std) over the raw
    rewards of that stage's presample in pool.jsonl, the bytes of a run that never stopped."""
    out = tmp_path / "seq"
    mora(tiny, out, "--mode", "sequential", "--stages", "harmless,helpful", "--steps", "1", "--stop_after", "1")
    assert [o["stage"] for o in read_jsonl(out / "stats.jsonl")] == [0]
    run(["mora", "--resume", out])
    stats, pool = read_jsonl(out / "stats.jsonl"), read_jsonl(out / "pool.jsonl")
    assert [(o["stage"], o["dim"]) for o in stats] == [(0, "harmless"), (1, "helpful")]
    for o in stats:
        raw = np.array([r["raw"] for p in pool if p["stage"] == o["stage"] for r in p["presample"]], np.float64)
        assert o["responses"] == len(raw) == len(PROMPTS) * 2
        np.testing.assert_allclose([o["mean"][d] for d in DIMS], raw.mean(axis=0), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose([o["std"][d] for d in DIMS], raw.std(axis=0), rtol=1e-5, atol=1e-7)
    # the same bytes as a run that never stopped
    mora(tiny, tmp_path / "full", "--mode", "sequential", "--stages", "harmless,helpful", "--steps", "1")
    assert (tmp_path / "full" / "stats.jsonl").read_bytes() == (out / "stats.jsonl").read_bytes()
    assert stats[0]["mean"] != stats[1]["mean"]
    # the last stage's statistics are pool_state.json's too
    state = json.loads((out / "pool_state.json").read_text())
    assert state["mean"] == [stats[1]["mean"][d] for d in DIMS] and state["std"] == [stats[1]["std"][d] for d in DIMS]


def hypervolume(points, ref):
    """Volume dominated by points (n, 3) above ref (3): slabs between consecutive third coordinates,
    each dominated by the 2-D staircase of the points at or above it."""
    p = np.maximum(points.astype(np.float64), ref)
    levels = np.unique(np.concatenate([[ref[2]], p[:, 2]]))[::-1]
    volume = 0.0
    for top, bottom in zip(levels[:-1], levels[1:]):
        xy = p[p[:, 2] >= top][:, :2]
        xy = xy[np.argsort(-xy[:, 0], kind="stable")]
        ys = np.maximum.accumulate(xy[:, 1])
        widths = xy[:, 0] - np.append(xy[1:, 0], ref[0])
        volume += float((widths * (ys - ref[1])).sum()) * (top - bottom)
    return volume


def test_eval_hypervolume_counts_every_presampled_response(tiny, tmp_path):
    """--K 300, more than the 256 responses a prompt's summary once held: eval's per-prompt
    hypervolume of the presampled z vectors (reference point: the stage's per-dimension minimum)
    is NumPy's over all 300 of pool.jsonl's vectors."""
    out = tmp_path / "k300"
    mora(tiny, out, "--mora", "0", "--K", "300", "--max_new_tokens", "4", "--gen_batch", "64", "--steps", "1")
    run(["eval", "--model", out, "--baseline", out, "--prompts", tiny / "prompts.jsonl", "--samples", "1",
         "--max_new_tokens", "2"])
    pool = read_jsonl(out / "pool.jsonl")
    z = np.array([[r["z"] for r in o["presample"]] for o in pool], np.float32)   # (prompts, 300, 3)
    assert z.shape == (len(PROMPTS), 300, 3)

    def mean_hypervolume(z):
        ref = z.reshape(-1, 3).min(axis=0).astype(np.float64)
        return np.mean([hypervolume(zp, ref) for zp in z])

    want = mean_hypervolume(z)
    # the responses after the 256th change the figure: a summary cut there would be caught
    assert abs(mean_hypervolume(z[:, :256]) - want) > 1e-3 * want
    st = json.loads((out / "report.json").read_text())["model_pool"][0]
    assert st["hypervolume_before"] == pytest.approx(want, rel=1e-5)
    assert st["hypervolume_after"] == pytest.approx(want, rel=1e-5)


def test_after_rewriting_is_a_fresh_presample(tiny, tmp_path):
    """--delta 1 makes every prompt single-reward and some rewrites get accepted. Each accepted
    rewrite is presampled afresh, --K responses (--after_K -1), recorded under "after" in
    pool.jsonl: its z vectors are its raw rewards standardised with the stage's statistics
    (stats.jsonl), its J and single verdict NumPy's from them. eval's table counts a prompt single
    after rewriting by that verdict, and its hypervolume after is NumPy's over those vectors. The
    fresh presample has its own seeds: a run with --after_K 0 (no fresh presample: the K'
    responses that selected a rewrite measure it, and the note under the table says so) trains
    the same weights, byte for byte."""
    flags = ["--delta", "1", "--min_overlap", "0", "--min_chars", "1", "--K", "4", "--candidates", "4"]
    runs = {}
    for name, extra in (("fresh", []), ("none", ["--after_K", "0"])):
        runs[name] = out = tmp_path / name
        mora(tiny, out, *flags, *extra)
        run(["eval", "--model", out, "--baseline", out, "--prompts", tiny / "prompts.jsonl", "--samples", "1",
             "--max_new_tokens", "2", "--out", tmp_path / f"eval_{name}"])
    pool = read_jsonl(runs["fresh"] / "pool.jsonl")
    stats = read_jsonl(runs["fresh"] / "stats.jsonl")[0]
    mean = np.array([stats["mean"][d] for d in DIMS])
    std = np.array([stats["std"][d] for d in DIMS])
    accepted = [o for o in pool if o["accepted"] is not None]
    assert accepted, "no rewrite accepted: the test does not reach the fresh presample"
    single_after = 0
    for o in pool:
        if o["accepted"] is None:
            assert "after" not in o
            single_after += o["single"]
            continue
        after = o["after"]
        raw = np.array([r["raw"] for r in after["presample"]], np.float64)
        z = np.array([r["z"] for r in after["presample"]], np.float64)
        assert raw.shape == (4, 3)
        np.testing.assert_allclose(z, (raw - mean) / std, rtol=1e-4, atol=1e-4)
        J = int((z >= 1.0).sum(axis=1).max())
        assert after["J"] == J and after["single"] == (J <= 1)
        single_after += after["single"]
    rep = json.loads((tmp_path / "eval_fresh" / "report.json").read_text())["model_pool"][0]
    assert rep["accepted_rewrites"] == rep["accepted_measured_afresh"] == len(accepted)
    assert rep["single_before"] == sum(o["single"] for o in pool)
    assert rep["single_after"] == single_after
    before = [np.array([r["z"] for r in o["presample"]], np.float32) for o in pool]
    after = [np.array([r["z"] for r in (o["after"]["presample"] if o["accepted"] else o["presample"])], np.float32)
             for o in pool]
    ref = np.concatenate(before + after).min(axis=0).astype(np.float64)
    assert rep["hypervolume_after"] == pytest.approx(np.mean([hypervolume(p, ref) for p in after]), rel=1e-5)
    assert rep["hypervolume_before"] == pytest.approx(np.mean([hypervolume(p, ref) for p in before]), rel=1e-5)
    md = (tmp_path / "eval_fresh" / "report.md").read_text()
    assert "an accepted rewrite stands in for its original, measured on 4 fresh responses of the policy" in md, md
    # without the fresh presample: the same weights, nothing under "after", and the note on the bias
    none = read_jsonl(runs["none"] / "pool.jsonl")
    assert all("after" not in o for o in none)
    assert [o["accepted"] for o in none] == [o["accepted"] for o in pool]
    for f in ("model_step000002.ckpt", "pool_state.json"):
        assert (runs["none"] / f).read_bytes() == (runs["fresh"] / f).read_bytes(), f
    md = (tmp_path / "eval_none" / "report.md").read_text()
    assert (f"an accepted rewrite without a fresh presample ({len(accepted)} of the {len(accepted)}: --after_K 0") in md, md
    assert "(here K' = 2 against K = 4)" in md, md
    rep = json.loads((tmp_path / "eval_none" / "report.json").read_text())["model_pool"][0]
    assert rep["accepted_measured_afresh"] == 0
    assert rep["single_after"] == sum(o["single"] and o["accepted"] is None for o in none)


@pytest.mark.parametrize("flags,message", [
    (["--rewrite_max_new_tokens", "64"], "flag --rewrite_max_new_tokens 64 leaves no room for the rewrite instruction"),
    (["--group_size", "1"], "flag --group_size 1: GRPO's advantage compares"),
    (["--stages", "harmless"], "flag --stages is for --mode sequential"),
    (["--mode", "sequential", "--weights", "0,0,1"], "flag --weights is for --mode simultaneous"),
    (["--weights", "helpful=1,helpful=3"], "helpful is given twice"),
    (["--weights", "3e38,1,1"], "weights are relative, at most 1e6"),
])
def test_flags_that_cannot_work_stop_before_presampling(tiny, tmp_path, flags, message):
    p = mora(tiny, tmp_path / "r", *flags, ok=False)
    assert p.returncode != 0 and message in p.stderr, p.stderr
    assert "presample" not in p.stdout


def test_weights_with_spaces(tiny, tmp_path):
    p = mora(tiny, tmp_path / "r", "--weights", " 1, 2 ,1 ")
    assert json.loads((tmp_path / "r" / "config.json").read_text())["weights"] == " 1, 2 ,1 "
    assert "done: 2 steps" in p.stdout


def test_rewrite_candidates_must_fit_the_context(tiny, tmp_path):
    """Byte tokens and no chat template: a prompt's tokens are its UTF-8 bytes, so the room is
    64 - 8 = 56 bytes. The template rewrites of these prompts are longer: none may be valid."""
    out = tmp_path / "r"
    mora(tiny, out, "--delta", "0.8", "--max_chars", "1000")
    room = CONTEXT - 8
    candidates = [c for line in (out / "pool.jsonl").read_text().splitlines() for c in json.loads(line)["candidates"]]
    assert candidates, "no single-reward prompt: nothing was rewritten"
    too_long = [c for c in candidates if len(c["text"].encode()) > room]
    assert too_long, "every candidate fits: the test does not reach the check"
    for c in too_long:
        assert not c["valid"], c
    assert any(c.get("reason") == "longer than the context leaves for a prompt" for c in too_long), too_long


@pytest.fixture(scope="module")
def pair(tiny):
    """A MORA run and its baseline (--mora 0) on the tiny trunk."""
    mora(tiny, tiny / "pair_m")
    mora(tiny, tiny / "pair_b", "--mora", "0")
    return tiny / "pair_m", tiny / "pair_b"


def table_rows(md):
    """The rows of report.md's reward table (the one headed "| | helpful | ..."), name -> cells."""
    lines = md.splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith("| | helpful | harmless | truthful | overall"))
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return lines[start], rows


def test_eval_report_names_its_inputs(tiny, pair, tmp_path):
    """report.json and report.md name the policies (row labels by what they are), the heads and the
    reference with the fingerprints of their weights (NumPy, from the files), the prompts and the
    sampling settings: the flags given here, and the context of llama:tiny."""
    m, b = pair
    out = tmp_path / "e"
    run(["eval", "--model", m, "--baseline", b, "--prompts", tiny / "prompts.jsonl", "--samples", "2",
         "--temperature", "0.5", "--max_new_tokens", "6", "--seed", "5", "--out", out])
    rep = json.loads((out / "report.json").read_text())
    md = (out / "report.md").read_text()
    heads, ref = tiny / "heads" / "reward_heads.bin", tiny / "heads" / "model.ckpt"
    heads_fp = f"{trunk_fingerprint(read_heads(heads)['params']):016x}"
    ref_fp = f"{trunk_fingerprint(read_native(ref)[1]):016x}"
    want = dict(model=str(m / (m / "latest.txt").read_text().strip()), model_run=str(m), model_kind="MORA",
                model_label=f"MORA ({m})",
                baseline=str(b / (b / "latest.txt").read_text().strip()), baseline_run=str(b), baseline_kind="baseline",
                baseline_label=f"baseline ({b})",
                heads=str(heads), heads_fingerprint=heads_fp, reference=str(ref), reference_fingerprint=ref_fp,
                prompts=str(tiny / "prompts.jsonl"), n_prompts=len(PROMPTS), samples=2, max_new_tokens=6, seed=5, top_k=0, top_p=1,
                chat_template="none", stop="", seq_len=CONTEXT, tokenizer=None, device="cpu", untrained=[],
                overall_dims=["helpful", "harmless", "truthful"])
    assert {k: rep.get(k) for k in want} == want
    assert rep["temperature"] == pytest.approx(0.5)
    for who in ("model", "baseline"):
        r = rep[f"{who}_reward"]
        assert r["overall"] == pytest.approx((r["helpful"] + r["harmless"] + r["truthful"]) / 3, abs=1e-12)
    for text in (f"`{m}`", f"`{b}`", f"`{want['model']}`", f"`{want['baseline']}`", f"`{heads}` (fingerprint {heads_fp})",
                 f"`{ref}` (fingerprint {ref_fp})", f"`{tiny / 'prompts.jsonl'}` ({len(PROMPTS)} prompts)",
                 "2 samples per prompt, temperature 0.5, top-k 0 (off), top-p 1 (off), max 6 new tokens, seed 5, "
                 "chat template none",
                 f"context {CONTEXT} tokens", "byte tokens"):
        assert text in md, (text, md)
    # no rewrite was accepted in this pair (test_after_rewriting_is_a_fresh_presample has some): the
    # pool's table has no "after" to explain
    assert all(st["accepted_rewrites"] == 0 for st in rep["model_pool"]), rep["model_pool"]
    assert "After rewriting" not in md, md
    head, rows = table_rows(md)
    assert head == "| | helpful | harmless | truthful | overall |", head
    assert list(rows)[:2] == [f"baseline ({b})", f"MORA ({m})"], rows
    assert "untrained" not in md
    # policy checkpoints: one inside the MORA run is that run's; a copy elsewhere is of no known run
    copy = tmp_path / "policy.ckpt"
    shutil.copy(want["model"], copy)
    run(["eval", "--model", want["model"], "--baseline", copy, "--prompts", tiny / "prompts.jsonl", "--samples", "1",
         "--reference", ref, "--out", tmp_path / "e2"])
    rep = json.loads((tmp_path / "e2" / "report.json").read_text())
    assert (rep["model_label"], rep["model_kind"], rep["model_run"]) == (f"MORA ({want['model']})", "MORA", str(m))
    assert (rep["baseline_label"], rep["baseline_kind"], rep["baseline_run"]) == (str(copy), "checkpoint", None)
    _, rows = table_rows((tmp_path / "e2" / "report.md").read_text())
    assert list(rows)[:2] == [str(copy), f"MORA ({want['model']})"], rows


def test_eval_marks_untrained_heads(tiny, pair, tmp_path):
    """Heads trained on helpful pairs alone: the harmless and truthful heads are all zeros in the
    file. eval marks them untrained in the table and leaves them out of overall: overall, its
    standard error and improvement are recomputed here from the per-response rewards in
    report.json over helpful alone. Heads with every head zero have no overall at all."""
    m, b = pair
    prefs = write_jsonl(tmp_path / "helpful.jsonl", [dict(prompt=p, chosen=c, rejected=r, dim=dim)
                                                     for p, c, r, dim in PREFS if dim == "helpful"])
    hd = tmp_path / "heads_h"
    run(["reward", "--model", "llama:tiny", "--data", prefs, "--out", hd, "--epochs", "1", "--seed", "1337"])
    h = read_heads(hd / "reward_heads.bin")
    per_head = h["params"].reshape(3, -1)
    zero = [d for d, p in zip(DIMS, per_head) if not p.any()]
    assert zero == ["harmless", "truthful"] == json.loads((hd / "reward_metrics.json").read_text())["untrained"]
    out = tmp_path / "e"
    run(["eval", "--model", m, "--baseline", b, "--prompts", tiny / "prompts.jsonl", "--samples", "2", "--out", out,
         "--heads", hd / "reward_heads.bin", "--reference", hd / "model.ckpt"])
    rep = json.loads((out / "report.json").read_text())
    assert rep["untrained"] == zero and rep["overall_dims"] == ["helpful"]
    assert rep["heads"] == str(hd / "reward_heads.bin")
    assert rep["heads_fingerprint"] == f"{trunk_fingerprint(h['params']):016x}"
    n = rep["n_prompts"]
    for who in ("model", "baseline"):
        raw = np.array([[r["raw"] for r in e["responses"]] for e in rep[f"{who}_examples"]], dtype=np.float64)
        assert not raw[:, :, 1:].any()   # the zero heads score every response 0
        helpful = raw[:, :, 0].mean(axis=1)   # each prompt's mean over its samples
        assert rep[f"{who}_reward"]["overall"] == pytest.approx(helpful.mean(), abs=1e-9)
        assert rep[f"{who}_reward"]["overall"] == pytest.approx(rep[f"{who}_reward"]["helpful"], abs=1e-12)
        assert rep[f"{who}_reward_stderr"]["overall"] == pytest.approx(helpful.std(ddof=1) / math.sqrt(n), rel=1e-9)
    mo, bo = rep["model_reward"]["overall"], rep["baseline_reward"]["overall"]
    assert rep["improvement_pct"]["overall"] == pytest.approx(100 * (mo - bo) / abs(bo), rel=1e-9)
    assert rep["improvement_pct"]["harmless"] is None and rep["improvement_pct"]["truthful"] is None
    assert rep["difference"]["harmless"] is None and rep["difference"]["truthful"] is None
    assert rep["difference"]["overall"]["mean"] == pytest.approx(mo - bo, abs=1e-9)
    md = (out / "report.md").read_text()
    head, rows = table_rows(md)
    assert head == "| | helpful | harmless | truthful | overall (helpful) |", head
    assert set(rows) == {f"baseline ({b})", f"MORA ({m})", "improvement", "difference (95% CI)"}, rows
    for name, cells in rows.items():
        assert cells[1:3] == ["untrained", "untrained"], (name, cells)
        assert "untrained" not in (cells[0], cells[3]), (name, cells)
    assert rows["improvement"][3] == f"{rep['improvement_pct']['overall']:+.1f}%"
    assert "the harmless and truthful heads are untrained" in md and "left out of overall" in md
    assert f"untrained: harmless and truthful" in md
    # every head zero: nothing to average, no overall
    zeros = tmp_path / "zeros.bin"
    data = (hd / "reward_heads.bin").read_bytes()
    zeros.write_bytes(data[:56] + bytes(len(data) - 56))
    run(["eval", "--model", m, "--baseline", b, "--prompts", tiny / "prompts.jsonl", "--samples", "1", "--out",
         tmp_path / "z", "--heads", zeros, "--reference", hd / "model.ckpt"])
    rep = json.loads((tmp_path / "z" / "report.json").read_text())
    assert rep["untrained"] == DIMS and rep["overall_dims"] == []
    assert rep["model_reward"]["overall"] is None and rep["improvement_pct"]["overall"] is None
    assert rep["difference"]["overall"] is None
    _, rows = table_rows((tmp_path / "z" / "report.md").read_text())
    assert all(cells == ["untrained"] * 4 for cells in rows.values()), rows


def plot(*args):
    return subprocess.run([sys.executable, str(ROOT / "dev" / "plot_run.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("case", ["missing baseline", "baseline is a reward directory", "baseline is a file",
                                  "baseline metrics not JSON", "report not a report", "report not JSON", "out is a file",
                                  "run missing", "stage out of range"])
def test_plot_run_misuse_is_a_message(tiny, pair, tmp_path, case):
    """dev/plot_run.py on input that is not what it takes: one line naming the input, exit 1, no
    traceback, and before matplotlib is needed (it may not be installed)."""
    m, b = pair
    args, message = [m], None
    if case == "missing baseline":
        args += ["--baseline", tmp_path / "nothing"]
        message = f"error: --baseline {tmp_path / 'nothing'}: no such directory"
    elif case == "baseline is a reward directory":
        args += ["--baseline", tiny / "heads"]
        message = f"error: --baseline {tiny / 'heads'} has no pool.jsonl (not a train_mora mora run directory)"
    elif case == "baseline is a file":
        args += ["--baseline", tiny / "prompts.jsonl"]
        message = f"error: --baseline {tiny / 'prompts.jsonl'}: not a directory"
    elif case == "baseline metrics not JSON":
        bad = tmp_path / "bad"
        shutil.copytree(b, bad)
        (bad / "metrics.jsonl").write_text("{\n")
        args += ["--baseline", bad]
        message = f"error: {bad / 'metrics.jsonl'}:1: not valid JSON"
    elif case == "report not a report":
        args += ["--report", tiny / "heads" / "reward_metrics.json"]
        message = f"error: --report {tiny / 'heads' / 'reward_metrics.json'} is not an eval report.json (no \"model_reward\")"
    elif case == "report not JSON":
        args += ["--report", tiny / "prompts.jsonl"]
        message = f"error: --report {tiny / 'prompts.jsonl'}: not valid JSON"
    elif case == "out is a file":
        args += ["--out", tiny / "prompts.jsonl"]
        message = f"error: --out {tiny / 'prompts.jsonl'}: not a directory"
    elif case == "run missing":
        args = [tmp_path / "nothing"]
        message = f"error: {tmp_path / 'nothing'}: no such directory"
    elif case == "stage out of range":
        args += ["--stage", "3"]
        message = f"error: --stage 3: {m}/pool.jsonl has stage 0 only"
    p = plot(*args)
    assert p.returncode == 1 and message in p.stderr, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr and "matplotlib" not in p.stderr, p.stderr


# Runs dev/plot_run.py with Figure.savefig recording each figure's legend, tick labels, title and
# lines (their points and style) in FILE.json beside FILE.png.
PLOT_SPY = r"""
import json, runpy, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.figure
save = matplotlib.figure.Figure.savefig
def spy(self, path, *args, **kwargs):
    with open(str(path) + ".json", "w") as f:
        json.dump(dict(title=self._suptitle.get_text() if self._suptitle else "",
                       legends=[[t.get_text() for t in ax.get_legend().get_texts()] for ax in self.axes if ax.get_legend()],
                       xticks=[[t.get_text() for t in ax.get_xticklabels()] for ax in self.axes],
                       yticks=[[t.get_text() for t in ax.get_yticklabels()] for ax in self.axes],
                       lines=[[dict(x=[float(v) for v in l.get_xdata()], y=[float(v) for v in l.get_ydata()],
                                    style=l.get_linestyle()) for l in ax.get_lines()] for ax in self.axes]), f)
    return save(self, path, *args, **kwargs)
matplotlib.figure.Figure.savefig = spy
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_plot_run_eval_png_labels_the_policies(tiny, pair, tmp_path):
    """eval.png's bars carry the report's row labels (the run directories as given to eval here, not
    "MORA" whatever --model was), its title the heads file; an untrained dimension has no bars."""
    pytest.importorskip("matplotlib")
    m, b = pair
    prefs = write_jsonl(tmp_path / "helpful.jsonl", [dict(prompt=p, chosen=c, rejected=r, dim=dim)
                                                     for p, c, r, dim in PREFS if dim == "helpful"])
    hd = tmp_path / "heads_h"
    run(["reward", "--model", "llama:tiny", "--data", prefs, "--out", hd, "--epochs", "1", "--seed", "1337"])
    run(["eval", "--model", m, "--baseline", b, "--prompts", tiny / "prompts.jsonl", "--samples", "1", "--out",
         tmp_path / "e", "--heads", hd / "reward_heads.bin", "--reference", hd / "model.ckpt"])
    spy = tmp_path / "spy.py"
    spy.write_text(PLOT_SPY)
    p = subprocess.run([sys.executable, spy, ROOT / "dev" / "plot_run.py", m, "--baseline", b, "--report",
                        tmp_path / "e" / "report.json", "--out", tmp_path / "plots"], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    fig = json.loads((tmp_path / "plots" / "eval.png.json").read_text())
    assert fig["legends"] == [[f"baseline ({b})", f"MORA ({m})"]], fig
    assert str(hd / "reward_heads.bin") in fig["title"], fig
    assert fig["xticks"][0] == ["helpful", "harmless\n(untrained)", "truthful\n(untrained)", "overall\n(helpful)"], fig
    rewards = json.loads((tmp_path / "plots" / "rewards.png.json").read_text())
    assert rewards["legends"][0] == [m.name, b.name], rewards
