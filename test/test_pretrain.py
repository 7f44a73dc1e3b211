"""./train_mora pretrain end to end on token shards the test writes in llm.c's format.

Checks: the loss at initialisation is ln(V) for a near-uniform model (the independent value),
training lowers the loss on a learnable sequence, a resumed run reproduces the uninterrupted
run's metrics exactly (also after SIGTERM, SIGINT or SIGUSR1 stopped it with a checkpoint), and
wrong input gives a clear error and a non-zero exit."""
import json
import math
import os
import re
import signal
import subprocess
import time

import numpy as np
import pytest


def write_shard(path, tokens, magic=20240520, version=1, dtype=np.uint16, count=None):
    header = np.zeros(256, dtype=np.int32)
    header[0], header[1] = magic, version
    header[2] = len(tokens) if count is None else count
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype=dtype).tobytes())


def periodic_tokens(n, vocab, period=7, seed=0):
    """A sequence with period `period`: after one period every next token is predictable."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, vocab, size=period)
    return np.tile(base, n // period + 1)[:n]


def run(args, **kw):
    return subprocess.run(args, capture_output=True, text=True, timeout=600, **kw)


def read_metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture
def shards(tmp_path):
    train = tmp_path / "train_000.bin"
    write_shard(train, periodic_tokens(20000, 256))
    return str(tmp_path / "train_*.bin")


@pytest.mark.parametrize("init", ["gpt2:tiny", "llama:tiny"])
def test_pretrain_learns(train_mora_bin, tmp_path, shards, init):
    out = str(tmp_path / "run")
    p = run([train_mora_bin, "pretrain", "--init", init, "--train_data", shards, "--out", out,
             "--batch_size", "4", "--seq_len", "32", "--steps", "30", "--lr", "3e-3", "--warmup", "2"])
    assert p.returncode == 0, p.stderr
    m = read_metrics(out)
    assert [r["step"] for r in m] == list(range(1, 31))
    # small init => logits near zero => loss near ln(V) over the 256-token vocabulary
    assert abs(m[0]["loss"] - math.log(256)) < 0.15, m[0]["loss"]
    assert m[-1]["loss"] < 0.5 * m[0]["loss"], (m[0]["loss"], m[-1]["loss"])
    assert "tok/s" in p.stdout and "eta" in p.stdout
    assert os.path.exists(os.path.join(out, "latest.txt"))
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["init"] == init and cfg["steps"] == 30


def test_resume_equals_uninterrupted(train_mora_bin, tmp_path, shards):
    common = ["--init", "llama:tiny", "--train_data", shards, "--batch_size", "2", "--seq_len", "16",
              "--lr", "1e-3", "--warmup", "2", "--grad_accum", "2"]
    full = str(tmp_path / "full")
    p = run([train_mora_bin, "pretrain", *common, "--out", full, "--steps", "8"])
    assert p.returncode == 0, p.stderr
    # a run stopped after its step-4 checkpoint: train the 8-step schedule with checkpoints every
    # 4 steps, then drop the step-8 checkpoint and point latest.txt back at step 4
    part = str(tmp_path / "part2")
    p = run([train_mora_bin, "pretrain", *common, "--out", part, "--steps", "8", "--save_every", "4"])
    assert p.returncode == 0, p.stderr
    os.remove(os.path.join(part, "model_step000008.ckpt"))
    with open(os.path.join(part, "latest.txt"), "w") as f:
        f.write("model_step000004.ckpt\n")
    # the resume is given only the run directory and the step to train to: every setting (the
    # data, B, T, lr, warmup, grad_accum, ...) is the run's
    p = run([train_mora_bin, "pretrain", "--out", part, "--resume", "--steps", "8"])
    assert p.returncode == 0, p.stderr
    assert "resuming" in p.stdout
    a, b = read_metrics(full), read_metrics(part)
    assert [r["step"] for r in b] == list(range(1, 9))
    for ra, rb in zip(a, b):
        assert ra["loss"] == rb["loss"] and ra["grad_norm"] == rb["grad_norm"], (ra, rb)
    with open(os.path.join(part, "model_step000008.ckpt"), "rb") as f1, \
         open(os.path.join(full, "model_step000008.ckpt"), "rb") as f2:
        assert f1.read() == f2.read()


def wait_for(predicate, what, timeout=120):
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def metrics_lines(out):
    path = os.path.join(out, "metrics.jsonl")
    return sum(1 for _ in open(path)) if os.path.exists(path) else 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
def test_signal_stops_with_a_checkpoint_that_resumes_exactly(train_mora_bin, tmp_path, shards, sig):
    # a constant learning rate after the warmup (--min_lr = --lr), so that the schedule does not
    # depend on --steps and the stopped run can be compared with a run of the steps it reached
    common = ["--init", "llama:tiny", "--train_data", shards, "--batch_size", "2", "--seq_len", "16",
              "--lr", "1e-3", "--min_lr", "1e-3", "--warmup", "2", "--log_every", "1000"]
    part = str(tmp_path / "part")
    with open(tmp_path / "stdout", "w") as so, open(tmp_path / "stderr", "w") as se:
        proc = subprocess.Popen([train_mora_bin, "pretrain", *common, "--out", part, "--steps", "1000000"],
                                stdout=so, stderr=se)
        try:
            wait_for(lambda: metrics_lines(part) >= 3 or proc.poll() is not None, "three steps")
            proc.send_signal(sig)
            rc = proc.wait(timeout=120)
        finally:
            proc.kill()
    out, err = (tmp_path / "stdout").read_text(), (tmp_path / "stderr").read_text()
    name = signal.Signals(sig).name
    assert rc == 128 + sig, (rc, out, err)
    assert f"{name} received: finishing this step" in err, err
    m = re.search(rf"stopped by {name} after step (\d+) of 1000000", out)
    assert m, out
    n = int(m.group(1))
    # the step it stopped after is checkpointed and is the one latest.txt names
    assert open(os.path.join(part, "latest.txt")).read().strip() == f"model_step{n:06d}.ckpt"
    assert [r["step"] for r in read_metrics(part)] == list(range(1, n + 1))
    assert f"continue with: train_mora pretrain --out {part} --resume" in out
    # resumed for three more steps, it is the run that trained n + 3 steps without a stop
    p = run([train_mora_bin, "pretrain", "--out", part, "--resume", "--steps", str(n + 3)])
    assert p.returncode == 0, p.stderr
    full = str(tmp_path / "full")
    p = run([train_mora_bin, "pretrain", *common, "--out", full, "--steps", str(n + 3)])
    assert p.returncode == 0, p.stderr
    a, b = read_metrics(full), read_metrics(part)
    assert [r["step"] for r in b] == list(range(1, n + 4))
    for ra, rb in zip(a, b):
        assert ra["loss"] == rb["loss"] and ra["grad_norm"] == rb["grad_norm"], (ra, rb)
    last = f"model_step{n + 3:06d}.ckpt"
    with open(os.path.join(part, last), "rb") as f1, open(os.path.join(full, last), "rb") as f2:
        assert f1.read() == f2.read()


def native_header(path):
    return np.fromfile(path, dtype=np.int32, count=256)


def test_resume_keeps_the_runs_settings(train_mora_bin, tmp_path, shards):
    out = str(tmp_path / "run")
    p = run([train_mora_bin, "pretrain", "--init", "llama:tiny", "--train_data", shards, "--out", out,
             "--batch_size", "2", "--seq_len", "16", "--lr", "2e-3", "--min_lr", "1e-4", "--warmup", "1",
             "--steps", "3", "--seed", "7"])
    assert p.returncode == 0, p.stderr
    # extended to 6 steps without repeating the flags: the lr of steps 4..6 is the run's schedule
    # (lr 2e-3, min_lr 1e-4, warmup 1) over the new 6 steps
    p = run([train_mora_bin, "pretrain", "--out", out, "--resume", "--steps", "6"])
    assert p.returncode == 0, p.stderr
    m = read_metrics(out)
    assert [r["step"] for r in m] == [1, 2, 3, 4, 5, 6]
    for r in m[3:]:
        s = r["step"] - 1
        want = 1e-4 + 0.5 * (1 + math.cos(math.pi * (s - 1) / (6 - 1))) * (2e-3 - 1e-4)
        assert abs(r["lr"] - want) <= 1e-6 * want, (r, want)
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert (cfg["batch_size"], cfg["seq_len"], cfg["warmup"], cfg["seed"], cfg["init"]) == (2, 16, 1, 7, "llama:tiny")
    assert abs(cfg["lr"] - 2e-3) < 1e-9 and abs(cfg["min_lr"] - 1e-4) < 1e-9
    assert cfg["steps"] == 6 and cfg["train_data"] == shards
    # a setting given with another value is refused, naming the flag and both values
    for extra, message in [
        (["--batch_size", "8"], "flag --batch_size 8 differs from the run's 2"),
        (["--lr", "1e-3"], "flag --lr 0.001 differs from the run's 0.002"),
        (["--warmup", "5"], "flag --warmup 5 differs from the run's 1"),
        (["--init", "llama:tiny"], "--init with --resume"),
    ]:
        p = run([train_mora_bin, "pretrain", "--out", out, "--resume", "--steps", "8", *extra])
        assert p.returncode != 0 and message in p.stderr, (extra, p.stderr)
        assert "--init" in extra or "a resumed run keeps its settings" in p.stderr
    assert read_metrics(out)[-1]["step"] == 6
    # the run's own value, and the flags that may change on resume, are accepted
    p = run([train_mora_bin, "pretrain", "--out", out, "--resume", "--steps", "7", "--batch_size", "2",
             "--log_every", "3", "--save_every", "7"])
    assert p.returncode == 0, p.stderr
    assert json.load(open(os.path.join(out, "config.json")))["log_every"] == 3


def test_resume_needs_a_larger_steps(train_mora_bin, tmp_path, shards):
    out = str(tmp_path / "run")
    p = run([train_mora_bin, "pretrain", "--train_data", shards, "--out", out, "--batch_size", "1",
             "--seq_len", "8", "--steps", "5", "--warmup", "1"])
    assert p.returncode == 0, p.stderr
    p = run([train_mora_bin, "pretrain", "--out", out, "--resume", "--steps", "2"])
    assert p.returncode != 0
    assert f"the run in {out} is at step 5; --steps 2 would not train (give a larger --steps)" in p.stderr, p.stderr
    # without --steps the run's own 5 steps are done already
    p = run([train_mora_bin, "pretrain", "--out", out, "--resume"])
    assert p.returncode != 0 and "--steps 5 would not train" in p.stderr, p.stderr
    assert len(read_metrics(out)) == 5


def test_new_run_into_a_run_directory_is_refused(train_mora_bin, tmp_path, shards):
    out = str(tmp_path / "run")
    args = [train_mora_bin, "pretrain", "--train_data", shards, "--out", out, "--batch_size", "1",
            "--seq_len", "8", "--warmup", "1"]
    assert run(args + ["--steps", "3"]).returncode == 0
    p = run(args + ["--steps", "1"])
    assert p.returncode != 0
    assert f"--out {out} already holds a run" in p.stderr and "--resume to continue a pretrain run" in p.stderr, p.stderr
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]
    assert open(os.path.join(out, "latest.txt")).read().strip() == "model_step000003.ckpt"


def test_resume_of_a_missing_run_creates_nothing(train_mora_bin, tmp_path, shards):
    out = tmp_path / "runs" / "nothere"
    p = run([train_mora_bin, "pretrain", "--train_data", shards, "--out", str(out), "--resume"])
    assert p.returncode != 0 and "no run to resume" in p.stderr, p.stderr
    assert not out.exists() and not out.parent.exists()
    out.mkdir(parents=True)
    p = run([train_mora_bin, "pretrain", "--train_data", shards, "--out", str(out), "--resume"])
    assert p.returncode != 0 and "no config.json" in p.stderr, p.stderr
    assert os.listdir(out) == []


def test_resume_before_the_first_checkpoint_starts_again(train_mora_bin, tmp_path, shards):
    """A run killed before its first checkpoint (SIGKILL, or a rank whose input was bad) left
    config.json and metrics.jsonl: --resume starts it from step 0 with its settings, and ends as
    the run that was never stopped; checkpoints without latest.txt are not silently ignored."""
    common = ["--init", "llama:tiny", "--train_data", shards, "--batch_size", "2", "--seq_len", "16", "--steps", "4"]
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    p = run([train_mora_bin, "pretrain", *common, "--out", full])
    assert p.returncode == 0, p.stderr
    p = run([train_mora_bin, "pretrain", *common, "--out", part, "--save_every", "2"])
    assert p.returncode == 0, p.stderr
    for name in os.listdir(part):
        if name.startswith("model_step") or name == "latest.txt":
            os.remove(os.path.join(part, name))
    p = run([train_mora_bin, "pretrain", "--out", part, "--resume"])
    assert p.returncode == 0, p.stderr
    assert f"--resume {part}: no checkpoint yet, starting from step 0 with --init llama:tiny" in p.stdout, p.stdout
    a, b = read_metrics(full), read_metrics(part)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert [(r["loss"], r["grad_norm"]) for r in a] == [(r["loss"], r["grad_norm"]) for r in b]
    os.remove(os.path.join(part, "latest.txt"))
    p = run([train_mora_bin, "pretrain", "--out", part, "--resume"])
    assert p.returncode != 0 and "no latest.txt naming the newest" in p.stderr, p.stderr


def test_resume_removes_temporary_files_of_a_killed_save(train_mora_bin, tmp_path, shards):
    out = tmp_path / "run"
    p = run([train_mora_bin, "pretrain", "--train_data", shards, "--out", str(out), "--batch_size", "1",
             "--seq_len", "8", "--steps", "2", "--warmup", "1"])
    assert p.returncode == 0, p.stderr
    # what a save killed before its rename leaves, and files that are not a checkpoint's
    for name in ["model_step000003.ckpt.tmp.4242", "model_step000004.ckpt.tmp.17"]:
        (out / name).write_bytes(b"\0" * 1000)
    keep = ["notes.tmp.1", "model_step000003.ckpt.tmp.x", "metrics.jsonl.tmp.5"]
    for name in keep:
        (out / name).write_text("mine")
    p = run([train_mora_bin, "pretrain", "--out", str(out), "--resume", "--steps", "3"])
    assert p.returncode == 0, p.stderr
    assert "removed 2 temporary checkpoint file(s)" in p.stdout, p.stdout
    names = sorted(os.listdir(out))
    assert not any(n.startswith("model_step") and ".tmp." in n and n not in keep for n in names), names
    assert all(n in names for n in keep)
    assert "model_step000003.ckpt" in names


def test_token_outside_the_vocabulary(train_mora_bin, tmp_path, shards):
    tokens = periodic_tokens(2000, 256)
    tokens[37] = 300
    bad = tmp_path / "bad_000.bin"
    write_shard(bad, tokens)
    args = [train_mora_bin, "pretrain", "--init", "gpt2:tiny", "--batch_size", "1", "--seq_len", "8",
            "--steps", "10", "--warmup", "1"]
    p = run(args + ["--train_data", str(bad), "--out", str(tmp_path / "a")])
    assert p.returncode != 0
    assert f"train data shard {bad}: token id 300 at token offset 37 is not below the model's vocabulary size 256" in p.stderr, p.stderr
    # the same shard as validation data
    p = run(args + ["--train_data", shards, "--val_data", str(bad), "--val_every", "1", "--val_batches", "10",
                    "--out", str(tmp_path / "b")])
    assert p.returncode != 0
    assert f"val data shard {bad}: token id 300 at token offset 37" in p.stderr, p.stderr


def test_shard_that_is_a_directory(train_mora_bin, tmp_path):
    d = tmp_path / "train_000.bin"
    d.mkdir()
    p = run([train_mora_bin, "pretrain", "--train_data", str(d), "--out", str(tmp_path / "r"), "--steps", "1"])
    assert p.returncode != 0 and f"{d} is a directory" in p.stderr, p.stderr


def test_learning_rate_flags(train_mora_bin, tmp_path, shards):
    args = [train_mora_bin, "pretrain", "--train_data", shards, "--batch_size", "1", "--seq_len", "8"]
    p = run(args + ["--out", str(tmp_path / "a"), "--steps", "4", "--warmup", "1", "--lr", "1e-3", "--min_lr", "5"])
    assert p.returncode != 0 and "flag --min_lr 5 is above --lr 0.001" in p.stderr, p.stderr
    assert not (tmp_path / "a").exists()
    # a warmup as long as the run: a warning, and the lr never reaches --lr
    p = run(args + ["--out", str(tmp_path / "b"), "--steps", "3", "--warmup", "6", "--lr", "1e-3"])
    assert p.returncode == 0, p.stderr
    warnings = [line for line in p.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "--warmup 6" in warnings[0] and "--steps 3" in warnings[0], p.stderr
    assert max(r["lr"] for r in read_metrics(str(tmp_path / "b"))) == pytest.approx(1e-3 * 3 / 6)
    p = run(args + ["--out", str(tmp_path / "c"), "--steps", "3", "--warmup", "2"])
    assert p.returncode == 0 and "warning" not in p.stderr, p.stderr


def test_val_batches_beyond_the_validation_set(train_mora_bin, tmp_path, shards):
    val = tmp_path / "val.bin"
    write_shard(val, periodic_tokens(50, 256))   # 49 usable tokens: 3 batches of 2x8
    p = run([train_mora_bin, "pretrain", "--train_data", shards, "--val_data", str(val), "--val_every", "1",
             "--val_batches", "5", "--batch_size", "2", "--seq_len", "8", "--steps", "1", "--warmup", "1",
             "--out", str(tmp_path / "r")])
    assert p.returncode == 0, p.stderr
    assert "--val_batches 5 is more than the 3 batches" in p.stderr, p.stderr


def test_init_from_a_checkpoint_starts_a_fresh_optimizer(train_mora_bin, tmp_path, shards):
    """A new run from a native checkpoint (which holds AdamW moments and their step) trains
    exactly as a new run from the same weights in llm.c's format, which has no optimizer state."""
    common = ["--train_data", shards, "--batch_size", "2", "--seq_len", "16", "--lr", "1e-3", "--warmup", "1"]
    first = tmp_path / "first"
    assert run([train_mora_bin, "pretrain", "--init", "gpt2:tiny", *common, "--out", str(first), "--steps", "4"]).returncode == 0
    ckpt = first / "model_step000004.ckpt"
    h = native_header(ckpt)
    assert h[16] & 1 and h[17] == 4   # optimizer state present, 4 AdamW steps
    n = int(h[21])
    # the same weights as an llm.c fp32 checkpoint: gpt2:tiny's config (maxT 64, V 256, L 2,
    # heads 4, C 64, Vp 256); the native parameters are in llm.c's tensor order
    params = np.fromfile(ckpt, dtype=np.float32, offset=1024, count=n)
    header = np.zeros(256, dtype=np.int32)
    header[:8] = [20240326, 3, 64, 256, 2, 4, 64, 256]
    bin_path = tmp_path / "weights.bin"
    with open(bin_path, "wb") as f:
        f.write(header.tobytes())
        f.write(params.tobytes())
    a, b = tmp_path / "from_ckpt", tmp_path / "from_bin"
    p = run([train_mora_bin, "pretrain", "--init", str(ckpt), *common, "--out", str(a), "--steps", "3"])
    assert p.returncode == 0, p.stderr
    assert run([train_mora_bin, "pretrain", "--init", str(bin_path), *common, "--out", str(b), "--steps", "3"]).returncode == 0
    for ra, rb in zip(read_metrics(str(a)), read_metrics(str(b))):
        assert ra["loss"] == rb["loss"] and ra["grad_norm"] == rb["grad_norm"], (ra, rb)
    assert native_header(a / "model_step000003.ckpt")[17] == 3
    with open(a / "model_step000003.ckpt", "rb") as fa, open(b / "model_step000003.ckpt", "rb") as fb:
        assert fa.read()[1024:] == fb.read()[1024:]


def test_non_finite_weights_are_refused(train_mora_bin, tmp_path, shards):
    first = tmp_path / "first"
    p = run([train_mora_bin, "pretrain", "--init", "gpt2:tiny", "--train_data", shards, "--out", str(first),
             "--batch_size", "1", "--seq_len", "8", "--steps", "1", "--warmup", "1"])
    assert p.returncode == 0, p.stderr
    data = bytearray((first / "model_step000001.ckpt").read_bytes())
    # GPT-2's first tensors: wte (256 x 64 floats), then wpe (64 x 64)
    for name, index, value, tensor, element in [("nan.ckpt", 100, np.nan, "wte", 100),
                                                 ("inf.ckpt", 256 * 64 + 5, np.inf, "wpe", 5)]:
        bad = bytearray(data)
        bad[1024 + 4 * index: 1024 + 4 * index + 4] = np.float32(value).tobytes()
        (tmp_path / name).write_bytes(bytes(bad))
        p = run([train_mora_bin, "pretrain", "--init", str(tmp_path / name), "--train_data", shards,
                 "--out", str(tmp_path / ("run_" + name)), "--steps", "1"])
        assert p.returncode != 0
        assert f"{tmp_path / name}: tensor {tensor} has a non-finite weight" in p.stderr, p.stderr
        assert f"at element {element} of" in p.stderr, p.stderr


BAD_CASES = [
    (["--train_data", "/nonexistent/x_*.bin"], "no token shards match"),
    (["--init", "gpt2:nope"], "unknown preset"),
    (["--batch_size", "abc"], "--batch_size"),
    (["--batch_size", "0"], "--batch_size"),
    (["--seq_len", "100000"], "--seq_len"),
    (["--bogus", "1"], "--bogus"),
    (["--device", "tpu"], "--device"),
    (["--device", "cuda"], "--device cuda"),  # this machine has no GPU (CI neither)
    (["--lr", "nan"], "flag --lr: expected a finite number, got 'nan'"),
    (["--lr", "3e-4x"], "flag --lr: expected a number, got '3e-4x'"),
    # parsed as numbers, but no float holds them: strtod under- or overflows, or float rounding would
    (["--lr", "1e-400"], "flag --lr: 1e-400 is out of range"),
    (["--lr", "1e-39"], "flag --lr: 1e-39 is out of range"),
    (["--weight_decay", "1e39"], "flag --weight_decay: 1e39 is out of range"),
    (["--steps", "4294967297"], "flag --steps: 4294967297 is out of range"),
    (["--steps", "12x"], "flag --steps: expected an integer, got '12x'"),
    (["--val_every", "2"], "--val_every 2 needs --val_data"),
    (["--val_data", "/nonexistent/v_*.bin"], "--val_every is 0"),
    # a string flag with its value forgotten does not take the next flag as its value
    (["--init", "--steps", "2"], "flag --init needs a value, but the next word is the flag --steps"),
]


@pytest.mark.parametrize("extra,message", BAD_CASES)
def test_bad_flags(train_mora_bin, tmp_path, shards, extra, message):
    args = [train_mora_bin, "pretrain", "--train_data", shards, "--out", str(tmp_path / "r"), "--steps", "1"]
    p = run(args + extra)
    assert p.returncode != 0
    assert message in p.stderr, p.stderr


def test_bad_shards(train_mora_bin, tmp_path):
    bad_magic = tmp_path / "m.bin"
    write_shard(bad_magic, np.arange(100), magic=12345)
    truncated = tmp_path / "t.bin"
    write_shard(truncated, np.arange(100), count=5000)
    version = tmp_path / "v.bin"
    write_shard(version, np.arange(100), version=3)
    big_token = tmp_path / "big.bin"
    write_shard(big_token, np.full(1000, 60000))
    cases = [(bad_magic, "not a token shard"), (truncated, "truncated"), (version, "version"),
             (big_token, "token")]
    for path, message in cases:
        p = run([train_mora_bin, "pretrain", "--train_data", str(path), "--out", str(tmp_path / "r"),
                 "--steps", "1", "--batch_size", "1", "--seq_len", "8"])
        assert p.returncode != 0, path
        assert str(path) in p.stderr or message in p.stderr, p.stderr
        assert message in p.stderr, p.stderr


def test_help(train_mora_bin, tmp_path):
    p = run([train_mora_bin, "pretrain", "--help"])
    assert p.returncode == 0 and "--train_data" in p.stdout and "default" in p.stdout
    # the defaults, whatever flags come before --help
    after = run([train_mora_bin, "pretrain", "--steps", "7", "--lr", "0.5", "--help"])
    assert after.returncode == 0 and after.stdout == p.stdout
    # a value may start with -- when written --flag=VALUE
    p = run([train_mora_bin, "pretrain", "--train_data=--no-such-shards", "--out", str(tmp_path / "r")])
    assert p.returncode != 0 and "no token shards match '--no-such-shards'" in p.stderr, p.stderr
    p = run([train_mora_bin, "--help"])
    assert p.returncode == 0 and "pretrain" in p.stdout and "generate" in p.stdout
    # TRAIN_MORA_ROLLOUT's line lists every word rollout.cu's parser takes
    src = open(os.path.join(os.path.dirname(__file__), "..", "rollout.cu")).read()
    parser = src[src.index("static void options_from_env"):]
    parser = parser[: parser.index("\n}\n")]
    words = re.findall(r'strcmp\(w, "(\w+)"\)', parser) + [w + "N" for w in re.findall(r'strncmp\(w, "(\w+=)"', parser)]
    assert len(words) >= 11, words
    rollout_help = p.stdout[p.stdout.index("TRAIN_MORA_ROLLOUT"):]
    for w in words:
        assert w in rollout_help, w
    p = run([train_mora_bin, "frobnicate"])
    assert p.returncode != 0 and "unknown command" in p.stderr


def test_lr_schedule_warmup_cosine(train_mora_bin, tmp_path, shards):
    """The logged learning rate follows linear warmup then cosine decay to min_lr."""
    out = str(tmp_path / "run")
    steps, warmup, lr, min_lr = 12, 3, 1e-3, 1e-4
    p = run([train_mora_bin, "pretrain", "--init", "gpt2:tiny", "--train_data", shards, "--out", out,
             "--batch_size", "1", "--seq_len", "8", "--steps", str(steps), "--warmup", str(warmup),
             "--lr", str(lr), "--min_lr", str(min_lr)])
    assert p.returncode == 0, p.stderr
    for r in read_metrics(out):
        s = r["step"] - 1  # the schedule of step s (0-based) is used for the update of step s+1
        if s < warmup:
            want = lr * (s + 1) / warmup
        else:
            want = min_lr + 0.5 * (1 + math.cos(math.pi * (s - warmup) / (steps - warmup))) * (lr - min_lr)
        assert abs(r["lr"] - want) <= 1e-6 * lr, (r, want)


def test_grad_accum_equals_larger_batch(train_mora_bin, tmp_path, shards):
    """Two micro-batches of B=2 read the same tokens as one batch of B=4 and, with equal token
    counts, the mean of their mean losses is the mean loss: the runs agree to rounding."""
    common = ["--init", "llama:tiny", "--train_data", shards, "--seq_len", "16", "--steps", "6",
              "--lr", "2e-3", "--warmup", "1"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert run([train_mora_bin, "pretrain", *common, "--out", a, "--batch_size", "4"]).returncode == 0
    assert run([train_mora_bin, "pretrain", *common, "--out", b, "--batch_size", "2", "--grad_accum", "2"]).returncode == 0
    for ra, rb in zip(read_metrics(a), read_metrics(b)):
        assert abs(ra["loss"] - rb["loss"]) <= 1e-5 * ra["loss"], (ra, rb)
        assert abs(ra["grad_norm"] - rb["grad_norm"]) <= 1e-4 * ra["grad_norm"], (ra, rb)


def test_init_from_checkpoints(train_mora_bin, tmp_path, shards, smollm2_gguf):
    """--init takes any checkpoint: our own native file, and the real SmolLM2 GGUF."""
    first = str(tmp_path / "first")
    common = ["--train_data", shards, "--batch_size", "1", "--seq_len", "16", "--lr", "1e-4", "--warmup", "1"]
    assert run([train_mora_bin, "pretrain", "--init", "llama:tiny", *common, "--out", first, "--steps", "3"]).returncode == 0
    ckpt = os.path.join(first, "model_step000003.ckpt")
    second = str(tmp_path / "second")
    p = run([train_mora_bin, "pretrain", "--init", ckpt, *common, "--out", second, "--steps", "2"])
    assert p.returncode == 0, p.stderr
    # the loaded weights continue where the first run stopped: its first loss is below the
    # fresh model's first loss on the same batch
    assert read_metrics(second)[0]["loss"] < read_metrics(first)[0]["loss"]
    smol = str(tmp_path / "smol")
    p = run([train_mora_bin, "pretrain", "--init", smollm2_gguf, *common, "--out", smol, "--steps", "2"])
    assert p.returncode == 0, p.stderr
    assert "134.52M parameters" in p.stdout and "llama" in p.stdout
    # the run records the tokenizer and chat template of the model it started from, and its native
    # checkpoints (weights only) carry them: generate needs no --tokenizer or --template, and
    # renders and encodes exactly as with them given
    cfg = json.load(open(os.path.join(smol, "config.json")))
    assert cfg["model_tokenizer"] == os.path.realpath(smollm2_gguf) and cfg["model_chat_template"] == "smollm2"
    ckpt = os.path.join(smol, "model_step000002.ckpt")
    ask = ["--chat", "--prompt", "What is the capital of France?", "--max_new_tokens", "4", "--temperature", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    alone = run([train_mora_bin, "generate", "--model", ckpt, *ask], env=env)
    given = run([train_mora_bin, "generate", "--model", ckpt, "--tokenizer", smollm2_gguf, "--template", "smollm2", *ask], env=env)
    assert alone.returncode == 0 and given.returncode == 0, alone.stderr + given.stderr
    assert alone.stdout == given.stdout and "prompt tokens" in alone.stderr
    # the first run, from a preset, has neither
    cfg = json.load(open(os.path.join(first, "config.json")))
    assert cfg["model_tokenizer"] == "" and cfg["model_chat_template"] == ""
    p = run([train_mora_bin, "generate", "--model", ckpt.replace(smol, first).replace("000002", "000003"), "--prompt", "a"])
    assert p.returncode != 0 and "has no tokenizer: pass --tokenizer" in p.stderr, p.stderr


def test_out_of_memory_names_the_shape_and_its_flags(train_mora_bin, tmp_path):
    """A shape whose CPU activations cannot be allocated stops with the size it asked for and the
    flags that shrink it. The model is a small Llama of 64 heads with a context of 2^20 tokens, so
    B=1 x T=2^20 needs B*heads*T*T*4 = 2^48 bytes for the attention probabilities alone: more than a
    process's address space, whatever the machine's overcommit setting."""
    from safetensors.numpy import save_file
    T, C, NH, F, V = 1 << 20, 128, 64, 8, 256
    rng = np.random.default_rng(0)
    w = lambda *shape: (0.02 * rng.standard_normal(shape)).astype(np.float32)
    tensors = {"model.embed_tokens.weight": w(V, C), "model.norm.weight": np.ones(C, np.float32),
               "model.layers.0.input_layernorm.weight": np.ones(C, np.float32),
               "model.layers.0.post_attention_layernorm.weight": np.ones(C, np.float32),
               "model.layers.0.mlp.gate_proj.weight": w(F, C), "model.layers.0.mlp.up_proj.weight": w(F, C),
               "model.layers.0.mlp.down_proj.weight": w(C, F)}
    for name in "qkvo":
        tensors[f"model.layers.0.self_attn.{name}_proj.weight"] = w(C, C)
    model = tmp_path / "long"
    model.mkdir()
    save_file(tensors, str(model / "model.safetensors"))
    (model / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": C, "num_hidden_layers": 1,
        "num_attention_heads": NH, "num_key_value_heads": NH, "intermediate_size": F, "vocab_size": V,
        "max_position_embeddings": T, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True}))
    write_shard(tmp_path / "train_000.bin", np.arange(T + 1) % V)
    p = run([train_mora_bin, "pretrain", "--init", str(model), "--train_data", str(tmp_path / "train_*.bin"),
             "--out", str(tmp_path / "r"), "--batch_size", "1", "--seq_len", str(T), "--steps", "1"])
    assert p.returncode != 0
    m = re.search(r"error: out of memory: the CPU model's activations for B=1 x T=1048576 tokens need "
                  r"([0-9.]+) GiB; a smaller batch or sequence length needs less \(pretrain, reward: "
                  r"--batch_size, --seq_len; mora: --fwd_batch, --seq_len\)", p.stderr)
    assert m, p.stderr
    # at least the attention probabilities: B * heads * T * T floats
    assert float(m.group(1)) >= 1 * NH * T * T * 4 / 2**30


def test_config_records_float_flags_as_typed(train_mora_bin, tmp_path, shards):
    """config.json holds the float flags with the digits they were typed with (the shortest
    decimal that gives the float back), not the float's binary expansion 0.00030000001424923539."""
    out = str(tmp_path / "r")
    p = run([train_mora_bin, "pretrain", "--init", "llama:tiny", "--train_data", shards, "--out", out, "--steps", "1",
             "--batch_size", "1", "--seq_len", "8", "--lr", "3e-4", "--beta2", "0.95", "--weight_decay", "0.1"])
    assert p.returncode == 0, p.stderr
    text = open(os.path.join(out, "config.json")).read()
    cfg = json.loads(text)
    assert (cfg["lr"], cfg["beta2"], cfg["weight_decay"], cfg["beta1"]) == (3e-4, 0.95, 0.1, 0.9)
    assert "0.00030000001" not in text and "0.9499999" not in text
    # and the float32 each stands for is the flag's
    assert all(np.float32(cfg[k]) == np.float32(v) for k, v in (("lr", "3e-4"), ("beta2", "0.95")))
