"""Data parallelism over MPI on the CPU: `mpirun -np 2 ./train_mora pretrain` against one rank.

Which single-rank run is the same computation as two ranks of B sequences? Each rank's loss is
the mean over its own B*T tokens, and the step averages the ranks (gradients all-reduced with
mean), so the step's objective is (L_0 + L_1) / 2, each L_r a mean over B*T tokens. One rank
with --grad_accum 2 computes exactly that: it reads the same two global batches (the loader
interleaves ranks as r, r+R, ... and accumulation as consecutive batches: the same indices) and
weighs each micro-batch's mean loss by 1/2. That equivalence holds in general (also with loss
masks that count different numbers of tokens per micro-batch, and across an epoch wrap). One
rank with --batch_size 2B computes the mean over 2*B*T tokens; in pretraining every position
counts, so that mean is also (L_0 + L_1) / 2, and its rows are the same tokens as the two
ranks' batches (batch k of size B starts at token k*B*T). So both are checked here, on every
step's loss and gradient norm (and the validation loss), to a relative difference below 1e-5:
only the order of floating-point additions differs.

The MPI environment: CI runs as root in a container, so mpirun needs --allow-run-as-root (here
through OMPI_ALLOW_RUN_AS_ROOT) and --oversubscribe (2 ranks may exceed the cores Open MPI
counts); the shared-memory transport only (btl self,vader with pml ob1) keeps Open MPI from
probing network devices and printing warnings about them; single-copy off because containers
often forbid the cross-memory attach it uses; yield when idle because the ranks share 2 cores.
"""
import json
import math
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import time

import numpy as np
import pytest

from conftest import BUILD, ROOT

MPIRUN = shutil.which("mpirun")
BUILT_WITH_MPI = (BUILD / "mpi-on").exists()
needs_mpi = pytest.mark.skipif(
    MPIRUN is None or not BUILT_WITH_MPI,
    reason="needs Open MPI (apt-get install openmpi-bin libopenmpi-dev) and a build with mpicc "
           f"(mpirun found: {MPIRUN is not None}; build/mpi-on present: {BUILT_WITH_MPI})")

MPI_ENV = {
    "OMPI_ALLOW_RUN_AS_ROOT": "1",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "OMPI_MCA_btl": "self,vader",
    "OMPI_MCA_pml": "ob1",
    "OMPI_MCA_btl_vader_single_copy_mechanism": "none",
    "OMPI_MCA_mpi_yield_when_idle": "1",
    "OMPI_MCA_rmaps_base_oversubscribe": "1",
    "OMP_NUM_THREADS": "1",
}


def env():
    e = dict(os.environ)
    e.update(MPI_ENV)
    return e


def run(args, ranks=None, timeout=300):
    cmd = [MPIRUN, "-np", str(ranks), "--oversubscribe", *args] if ranks else list(args)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env(), cwd=ROOT)


def write_shard(path, tokens):
    header = np.zeros(256, dtype=np.int32)
    header[0], header[1], header[2] = 20240520, 1, len(tokens)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype=np.uint16).tobytes())


@pytest.fixture
def data(tmp_path):
    """A learnable stream (period 11) with random tokens mixed in, so batches differ."""
    rng = np.random.default_rng(7)
    base = rng.integers(0, 256, size=11)
    tokens = np.tile(base, 2000)[:20000]
    noise = rng.random(len(tokens)) < 0.2
    tokens[noise] = rng.integers(0, 256, size=noise.sum())
    write_shard(tmp_path / "train_000.bin", tokens)
    write_shard(tmp_path / "val_000.bin", rng.integers(0, 256, size=4000))
    return str(tmp_path / "train_*.bin"), str(tmp_path / "val_*.bin")


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def common(init, data, steps=12):
    train, val = data
    return ["pretrain", "--init", init, "--train_data", train, "--val_data", val, "--seq_len", "16",
            "--steps", str(steps), "--lr", "3e-3", "--warmup", "2", "--val_every", "4", "--val_batches", "3"]


def pretrain(tmp_path, name, args, ranks=None):
    out = str(tmp_path / name)
    p = run([str(ROOT / "train_mora"), *args, "--out", out], ranks=ranks)
    assert p.returncode == 0, p.stdout + p.stderr
    return out, p


def assert_close(a, b, keys, rtol=1e-5):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for k in keys:
            if k in ra or k in rb:
                assert abs(ra[k] - rb[k]) <= rtol * abs(rb[k]), (k, ra, rb)


@needs_mpi
def test_collectives_two_ranks_and_one():
    exe = str(BUILD / "tools" / "comm_check")
    p = run([exe], ranks=2)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "2 rank(s), backend mpi" in p.stdout and "all collectives match" in p.stdout, p.stdout
    assert "FAILED" not in p.stdout
    # started directly: one rank, MPI not initialised
    p = run([exe])
    assert p.returncode == 0, p.stdout + p.stderr
    assert "1 rank(s), backend single" in p.stdout and "all collectives match" in p.stdout, p.stdout


@needs_mpi
def test_mpi_error_names_the_call_and_fails_every_rank():
    exe = str(BUILD / "tools" / "comm_check")
    p = run([exe, "bad_root"], ranks=2, timeout=120)
    assert p.returncode != 0
    assert "error: MPI_Bcast failed on rank" in p.stderr and "MPI_ERR_ROOT" in p.stderr, p.stderr
    assert "returned" not in p.stderr, p.stderr   # no rank carried on past the failed call
    # one rank exiting through fatal() ends the job instead of leaving the other in its barrier
    p = run([exe, "fatal_last"], ranks=2, timeout=120)
    assert p.returncode != 0
    assert f"error: rank 1/2 ({socket.gethostname()}): stops on purpose" in p.stderr, p.stderr
    assert "barrier returned" not in p.stderr, p.stderr


@needs_mpi
@pytest.mark.parametrize("init", ["llama:tiny", "gpt2:tiny"])
def test_two_ranks_equal_one_rank_on_the_global_batch(tmp_path, data, init):
    args = common(init, data)
    accum, _ = pretrain(tmp_path, "accum", [*args, "--batch_size", "1", "--grad_accum", "2"])
    big, _ = pretrain(tmp_path, "big", [*args, "--batch_size", "2"])
    single, _ = pretrain(tmp_path, "single", [*args, "--batch_size", "1"])
    two, p = pretrain(tmp_path, "two", [*args, "--batch_size", "1"], ranks=2)
    assert "ranks: 2 (mpi)" in p.stdout, p.stdout
    # only rank 0 prints: one progress line per step, not two
    assert p.stdout.count("step    12/12") == 1, p.stdout
    ref, m2, mbig = metrics(accum), metrics(two), metrics(big)
    assert_close(m2, ref, ["loss", "grad_norm", "val_loss"])
    assert_close(m2, mbig, ["loss", "grad_norm"])
    # the comparison can tell: one rank on half the batch follows another trajectory
    m1 = metrics(single)
    assert max(abs(a["loss"] - b["loss"]) / b["loss"] for a, b in zip(m1, ref)) > 1e-3
    # gradient clipping was active, so it ran on the averaged gradient
    assert max(r["grad_norm"] for r in ref) > 1.0
    cfg = json.load(open(os.path.join(two, "config.json")))
    assert cfg["world_size"] == 2 and cfg["zero"] == 0


@needs_mpi
@pytest.mark.parametrize("init", ["llama:tiny", "gpt2:tiny"])
def test_zero1_equals_unsharded(tmp_path, data, init):
    args = [*common(init, data, steps=8), "--batch_size", "1", "--save_every", "4"]
    accum, _ = pretrain(tmp_path, "accum", [*args, "--grad_accum", "2"])
    plain, _ = pretrain(tmp_path, "plain", args, ranks=2)
    zero, p = pretrain(tmp_path, "zero", [*args, "--zero", "1"], ranks=2)
    assert "ZeRO-1" in p.stdout, p.stdout
    assert_close(metrics(zero), metrics(accum), ["loss", "grad_norm", "val_loss"])
    # each rank's AdamW update of its shard is the unsharded update of those elements, and the
    # checkpoint gathers the moments: the files are the same bytes
    for step in (4, 8):
        name = f"model_step{step:06d}.ckpt"
        a = pathlib.Path(plain, name).read_bytes()
        b = pathlib.Path(zero, name).read_bytes()
        assert a == b, name


@needs_mpi
def test_resume_needs_the_same_ranks(tmp_path, data):
    args = [*common("llama:tiny", data, steps=8), "--batch_size", "1", "--save_every", "4", "--zero", "1"]
    full, _ = pretrain(tmp_path, "full", args, ranks=2)
    part, _ = pretrain(tmp_path, "part", args, ranks=2)
    os.remove(os.path.join(part, "model_step000008.ckpt"))
    with open(os.path.join(part, "latest.txt"), "w") as f:
        f.write("model_step000004.ckpt\n")
    # a resumed run takes its settings from the run; --init is refused with --resume
    resume = [a for a in args if a not in ("--init", "llama:tiny")]
    assert len(resume) == len(args) - 2
    # one rank cannot take over a two-rank run
    p = run([str(ROOT / "train_mora"), *resume, "--out", part, "--resume"])
    assert p.returncode != 0
    assert "trained with 2 rank(s), this launch has 1" in p.stderr, p.stderr
    # three ranks neither; every rank refuses
    p = run([str(ROOT / "train_mora"), *resume, "--out", part, "--resume"], ranks=3)
    assert p.returncode != 0
    assert "trained with 2 rank(s), this launch has 3" in p.stderr, p.stderr
    # two ranks resume (ZeRO-1 shards rebuilt from the checkpoint's moments) and reproduce the
    # uninterrupted run exactly
    _, p = pretrain(tmp_path, "part", [*resume, "--resume"], ranks=2)
    assert "resuming" in p.stdout
    a, b = metrics(full), metrics(part)
    assert [r["step"] for r in b] == list(range(1, 9))
    for ra, rb in zip(a, b):
        assert ra["loss"] == rb["loss"] and ra["grad_norm"] == rb["grad_norm"], (ra, rb)


def rank_pids(out):
    """{rank: pid} of the train_mora processes that write the run in out."""
    pids = {}
    for d in pathlib.Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmdline = (d / "cmdline").read_bytes().split(b"\0")
            environ = (d / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if not cmdline[0].endswith(b"train_mora") or out.encode() not in cmdline:
            continue
        for e in environ:
            if e.startswith(b"OMPI_COMM_WORLD_RANK="):
                pids[int(e.split(b"=")[1])] = int(d.name)
    return pids


@needs_mpi
@pytest.mark.parametrize("target", ["rank 1", "mpirun"])
def test_signal_stops_every_rank_after_the_same_step(tmp_path, data, target):
    """SIGUSR1 to one rank only, or to mpirun (which forwards it to every rank): the ranks agree
    on the step to stop after, rank 0 saves it (ZeRO-1: the moments gathered), and two ranks
    resumed from it train as two ranks that never stopped. --min_lr = --lr keeps the schedule
    independent of --steps, so the run of the steps the stopped run reached is the reference."""
    args = [*common("llama:tiny", data, steps=1000000), "--batch_size", "1", "--zero", "1", "--min_lr", "3e-3",
            "--log_every", "1000"]
    part = str(tmp_path / "part")
    cmd = [MPIRUN, "-np", "2", "--oversubscribe", str(ROOT / "train_mora"), *args, "--out", part]
    with open(tmp_path / "stdout", "w") as so, open(tmp_path / "stderr", "w") as se:
        proc = subprocess.Popen(cmd, stdout=so, stderr=se, env=env(), cwd=ROOT)
        try:
            deadline = time.time() + 120
            pids = {}
            while len(pids) < 2 or not os.path.exists(os.path.join(part, "metrics.jsonl")) or len(metrics(part)) < 3:
                assert proc.poll() is None and time.time() < deadline, "the run did not reach step 3"
                time.sleep(0.05)
                pids = rank_pids(part)
            os.kill(pids[1] if target == "rank 1" else proc.pid, signal.SIGUSR1)
            rc = proc.wait(timeout=120)
        finally:
            proc.kill()
    out, err = (tmp_path / "stdout").read_text(), (tmp_path / "stderr").read_text()
    assert rc == 128 + signal.SIGUSR1, (rc, out, err)
    m = re.search(r"stopped by SIGUSR1 after step (\d+) of 1000000", out)
    assert m and out.count("stopped by SIGUSR1") == 1, out
    n = int(m.group(1))
    assert open(os.path.join(part, "latest.txt")).read().strip() == f"model_step{n:06d}.ckpt"
    assert [r["step"] for r in metrics(part)] == list(range(1, n + 1))
    resume = [a for a in args if a not in ("--init", "llama:tiny")]
    _, p = pretrain(tmp_path, "part", [*resume, "--resume", "--steps", str(n + 2)], ranks=2)
    assert "resuming" in p.stdout
    full, _ = pretrain(tmp_path, "full", [*args, "--steps", str(n + 2)], ranks=2)
    a, b = metrics(full), metrics(part)
    assert [r["step"] for r in b] == list(range(1, n + 3))
    for ra, rb in zip(a, b):
        assert ra["loss"] == rb["loss"] and ra["grad_norm"] == rb["grad_norm"], (ra, rb)
    last = f"model_step{n + 2:06d}.ckpt"
    assert pathlib.Path(part, last).read_bytes() == pathlib.Path(full, last).read_bytes()


@needs_mpi
def test_reward_two_ranks_equal_one_rank(tmp_path):
    """reward under mpirun: the ranks share the frozen trunk's forwards (batch k on rank k mod 2)
    and gather the hidden states, and rank 0 trains the heads: the files are one rank's, byte for
    byte. A row of the CPU forward is the same bits whatever the other rows of its call (more
    than 4 rows here), and every batch holds the sequences it holds on one rank. 60 sequences
    in batches of 7 make 9 batches, the last one short, 5 on rank 0 and 4 on rank 1."""
    from test_reward_cmd import planted, write_jsonl
    data = write_jsonl(tmp_path / "pref.jsonl", planted(10, seed=4))
    outs = {}
    for name, ranks in (("one", None), ("two", 2)):
        outs[name] = tmp_path / name
        p = run([str(ROOT / "train_mora"), "reward", "--model", "llama:tiny", "--data", data, "--fwd_batch", "7",
                 "--epochs", "3", "--head", "mlp", "--head_hidden", "16", "--seed", "2", "--out", str(outs[name])],
                ranks=ranks)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        if ranks:
            assert "60 sequences through the frozen trunk" in p.stdout and "(cached, on 2 ranks, on their CPUs)" in p.stdout, p.stdout
            assert p.stdout.count("placement: 2 ranks on 1 node(s)") == 1, p.stdout
    for f in ("reward_heads.bin", "metrics.jsonl", "model.ckpt"):
        assert (outs["two"] / f).read_bytes() == (outs["one"] / f).read_bytes(), f
    summaries = [json.loads((outs[name] / "reward_metrics.json").read_text()) for name in ("one", "two")]
    for s in summaries:
        del s["seconds"]
        s["model"] = os.path.basename(s["model"])
        s["heads"] = os.path.basename(s["heads"])
    assert summaries[1] == summaries[0]
    assert summaries[0]["train_pairs"] + summaries[0]["val_pairs"] == 30


@needs_mpi
def test_single_rank_commands_refuse_several_ranks(tmp_path):
    """generate and export run on one rank: started as two, they stop, said once (by rank 0); their
    --help still prints (once: only rank 0 writes to stdout) and exits 0."""
    for command in ("generate", "export"):
        p = run([str(ROOT / "train_mora"), command, "--model", "x", "--prompt", "hi"], ranks=2)
        assert p.returncode != 0
        assert p.stderr.count(f"train_mora {command} runs on one rank") == 1, p.stderr
        p = run([str(ROOT / "train_mora"), command, "--help"], ranks=2)
        assert p.returncode == 0, p.stderr
        assert p.stdout.count(f"usage: train_mora {command} [flags]") == 1, p.stdout


def test_zero_flag_is_checked(tmp_path, data):
    p = run([str(ROOT / "train_mora"), *common("llama:tiny", data), "--out", str(tmp_path / "r"), "--zero", "2"])
    assert p.returncode != 0 and "--zero" in p.stderr, p.stderr


# ----------------------------------------------------------------------------------------------
# The MORA loop over two ranks (`mpirun -np 2 ./train_mora mora`) against one rank.
#
# Two ranks split every sampling pass into contiguous halves of the prompts, drawn from the seeds
# one rank uses for those prompts, and gather the samples in the prompts' order; every step's P
# prompts are split P/2 per rank and the ranks' gradients (each weighted by its share of the
# batch) are summed. So one rank with the same --prompts_per_step is the same computation on the
# same global batch, and only the order of floating-point additions may differ.
#
# Where that order can differ at all: the presample and the pool are computed before any update,
# from the same parameters. A row of the CPU forward is the same bits whatever the other rows of
# its call, except that a matrix product of at most 4 rows takes a dot-product path; with
# --gen_batch 4 every decode step of every generate call takes that path and every prefill the
# packed one, however the ranks' shards cut the calls. So the first stage's pool.jsonl and
# pool_state.json must be the same bytes. The gradient is a sum over rows, which two ranks add in
# another order (two halves, then the all-reduce), so from the first update on the parameters
# differ in their last bits: the steps' figures are compared to a relative 1e-5, and the second
# stage's pool (presampled after updates) on its decisions and to 1e-5 on its rewards.
#
# The GRPO loss with one PPO epoch is beta * KL plus -sum_b A_b * ratio_b / B with ratio = 1 up to
# the rounding of log-probs computed twice (by generate and by the training forward): the
# advantages of a group sum to zero, so that part cancels to a residue of about 1e-7 times its
# terms (|A_b| of order 1, the advantages being standardised within each group), and after the
# first update that residue follows the parameters' last bits. So the loss is compared to 1e-5 of
# the scale of its terms, max(|loss|, 1), while its smooth part, the KL, is compared to a relative
# 1e-5 like every other figure (1e-12 absolute where a figure is 0); so is the DPO loss.

DIMS = ["helpful", "harmless", "truthful"]


def mora_cmd(world, out, *extra):
    return [str(ROOT / "train_mora"), "mora", "--model", str(world / "base" / "model.ckpt"),
            "--heads", str(world / "heads" / "reward_heads.bin"),
            "--prompts", str(world / "world" / "train_prompts.jsonl"), "--chat_template", "plain", "--stop", "\n",
            "--K", "4", "--candidates", "2", "--rewrite_K", "4", "--max_new_tokens", "48",
            "--rewrite_max_new_tokens", "48", "--prompts_per_step", "4", "--group_size", "4", "--lr", "5e-4",
            "--gen_batch", "4", "--seed", "3", "--out", str(out), *extra]


def mora_run(world, out, *extra, ranks=None):
    p = run(mora_cmd(world, out, *extra), ranks=ranks, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def read_jsonl(path):
    with open(path, "rb") as f:
        return [json.loads(line) for line in f.read().decode("utf-8").splitlines() if line.strip()]


def close(a, b, rtol=1e-5, scale=0.0):
    return abs(a - b) <= rtol * max(abs(b), scale)


SEQUENTIAL = ("--mode", "sequential", "--stages", "harmless,helpful", "--steps", "1")


@pytest.fixture(scope="module")
def grpo_runs(mora_world, tmp_path_factory):
    """Sequential GRPO with MORA over two stages (isolate and rewrite twice), on 1 and on 2 ranks."""
    d = tmp_path_factory.mktemp("mora_ranks")
    one = d / "one"
    mora_run(mora_world, one, *SEQUENTIAL)
    two = d / "two"
    p = mora_run(mora_world, two, *SEQUENTIAL, ranks=2)
    return one, two, p


@needs_mpi
def test_mora_two_ranks_equal_one_rank(grpo_runs):
    one, two, p = grpo_runs
    assert "ranks: 2 (mpi)" in p.stdout, p.stdout
    assert p.stdout.count("step    2/2") == 1, p.stdout   # only rank 0 prints
    assert json.loads((two / "config.json").read_text())["world_size"] == 2
    m1, m2 = read_jsonl(one / "metrics.jsonl"), read_jsonl(two / "metrics.jsonl")
    assert [(r["step"], r["stage"]) for r in m2] == [(r["step"], r["stage"]) for r in m1] == [(1, 0), (2, 1)]
    for a, b in zip(m2, m1):
        for k in ("reward", "kl", "grad_norm", "response_len", "clip_frac"):
            assert close(a[k], b[k], scale=1e-12), (k, a, b)
        for d in DIMS:
            assert close(a["reward_raw"][d], b["reward_raw"][d], scale=1e-12), (d, a, b)
            assert close(a["reward_z"][d], b["reward_z"][d], scale=1e-12), (d, a, b)
        assert close(a["loss"], b["loss"], scale=1.0), (a, b)
    # the first step runs on the parameters both runs start from: the same floats up to the order
    # of the sums, so its loss agrees far below the scale of its terms
    assert abs(m2[0]["loss"] - m1[0]["loss"]) <= 1e-9, (m2[0], m1[0])
    # the second step runs after an update (the policy moved away from the reference)
    assert m1[1]["kl"] > 0 and m1[1]["reward"] != m1[0]["reward"]

    # the first stage's pool: the same bytes; its decisions include accepted rewrites
    p1, p2 = read_jsonl(one / "pool.jsonl"), read_jsonl(two / "pool.jsonl")
    lines1 = (one / "pool.jsonl").read_bytes().splitlines()
    lines2 = (two / "pool.jsonl").read_bytes().splitlines()
    assert len(lines1) == len(lines2) == len(p1)
    stage0 = [i for i, o in enumerate(p1) if o["stage"] == 0]
    assert [lines2[i] for i in stage0] == [lines1[i] for i in stage0]
    assert any(o["accepted"] is not None for o in p1), "no rewrite accepted: the comparison would miss the rewrite path"
    # the second stage (presampled by the updated policy): the same decisions, rewards to 1e-5
    for a, b in zip(p2, p1):
        for k in ("stage", "id", "prompt", "J", "single", "missing", "accepted", "unexpanded"):
            assert a[k] == b[k], (k, a[k], b[k])
        assert [(c["text"], c["valid"]) for c in a["candidates"]] == [(c["text"], c["valid"]) for c in b["candidates"]]
        for ra, rb in zip(a["presample"], b["presample"]):
            assert ra["response"] == rb["response"]
            assert all(close(x, y, scale=1e-6) for x, y in zip(ra["raw"] + ra["z"], rb["raw"] + rb["z"])), (ra, rb)
    # the statistics and the training pool of the last stage
    s1, s2 = json.loads((one / "pool_state.json").read_text()), json.loads((two / "pool_state.json").read_text())
    assert s1["pool"] == s2["pool"]
    assert all(close(x, y) for x, y in zip(s2["mean"] + s2["std"], s1["mean"] + s1["std"]))


@needs_mpi
def test_mora_two_ranks_differ_from_half_the_batch(mora_world, grpo_runs, tmp_path):
    """The comparison can tell: one rank on half the batch (the prompts one rank of two gets)
    samples other rollouts and reports other rewards."""
    one, two, _ = grpo_runs
    half = tmp_path / "half"
    mora_run(mora_world, half, *SEQUENTIAL, "--prompts_per_step", "2")
    mh, m2 = read_jsonl(half / "metrics.jsonl"), read_jsonl(two / "metrics.jsonl")
    assert max(abs(a["reward"] - b["reward"]) for a, b in zip(mh, m2)) > 1e-3


@needs_mpi
def test_mora_dpo_two_ranks_equal_one_rank(mora_world, tmp_path):
    args = ("--algo", "dpo", "--steps", "2")
    mora_run(mora_world, tmp_path / "one", *args)
    mora_run(mora_world, tmp_path / "two", *args, ranks=2)
    assert (tmp_path / "one" / "pool_state.json").read_bytes() == (tmp_path / "two" / "pool_state.json").read_bytes()
    m1, m2 = read_jsonl(tmp_path / "one" / "metrics.jsonl"), read_jsonl(tmp_path / "two" / "metrics.jsonl")
    assert [r["step"] for r in m2] == [r["step"] for r in m1] == [1, 2]
    for a, b in zip(m2, m1):
        for k in ("loss", "kl", "grad_norm", "dpo_accuracy", "dpo_margin", "response_len"):
            assert close(a[k], b[k], scale=1e-12), (k, a, b)
    # the first step: policy == reference, every pair's margin 0, loss ln 2
    assert abs(m2[0]["loss"] - math.log(2)) < 1e-6 and m2[1]["loss"] != m2[0]["loss"]


@needs_mpi
def test_mora_resume_needs_the_same_ranks(mora_world, grpo_runs, tmp_path):
    _, two, _ = grpo_runs
    part = tmp_path / "part"
    p = mora_run(mora_world, part, *SEQUENTIAL, "--stop_after", "1", ranks=2)
    assert "--stop_after" in p.stdout
    p = run([str(ROOT / "train_mora"), "mora", "--resume", str(part)])
    assert p.returncode != 0
    assert "trained with 2 rank(s), this launch has 1" in p.stderr, p.stderr
    p = run([str(ROOT / "train_mora"), "mora", "--resume", str(part)], ranks=3)
    assert p.returncode != 0
    assert "trained with 2 rank(s), this launch has 3" in p.stderr, p.stderr
    # two ranks continue it exactly as the uninterrupted two-rank run went on
    p = run([str(ROOT / "train_mora"), "mora", "--resume", str(part)], ranks=2, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("ms", "tokens_per_s")} for r in rows]
    assert strip(read_jsonl(part / "metrics.jsonl")) == strip(read_jsonl(two / "metrics.jsonl"))
    assert (part / "pool.jsonl").read_bytes() == (two / "pool.jsonl").read_bytes()
    assert (part / "model_step000002.ckpt").read_bytes() == (two / "model_step000002.ckpt").read_bytes()


@pytest.fixture(scope="module")
def zero_run(mora_world, grpo_runs):
    """The two-rank run of grpo_runs again with --zero 1 (AdamW moments sharded over the ranks)."""
    one, two, _ = grpo_runs
    zero = two.parent / "zero"
    p = mora_run(mora_world, zero, *SEQUENTIAL, "--zero", "1", ranks=2)
    return zero, p


@needs_mpi
def test_mora_zero1_equals_unsharded(grpo_runs, zero_run):
    """ZeRO-1 moves the AdamW moments, not the numbers: each rank's update of its shard is the
    unsharded update of those elements (the same float operations on the same all-reduced
    gradient) and the shards are all-gathered, so the two-rank run is the same bits with and
    without it (metrics, pool and the checkpoints, whose moments are gathered on rank 0), and
    equals one rank to the 1e-5 of the two-rank comparison above."""
    one, two, _ = grpo_runs
    zero, p = zero_run
    assert "ZeRO-1" in p.stdout, p.stdout
    assert json.loads((zero / "config.json").read_text())["zero"] == 1
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("ms", "tokens_per_s")} for r in rows]
    mz, m2, m1 = read_jsonl(zero / "metrics.jsonl"), read_jsonl(two / "metrics.jsonl"), read_jsonl(one / "metrics.jsonl")
    assert strip(mz) == strip(m2)
    assert [(r["step"], r["stage"]) for r in mz] == [(r["step"], r["stage"]) for r in m1]
    for a, b in zip(mz, m1):
        for k in ("reward", "kl", "grad_norm", "response_len", "clip_frac"):
            assert close(a[k], b[k], scale=1e-12), (k, a, b)
        assert close(a["loss"], b["loss"], scale=1.0), (a, b)
    # the second step ran after a sharded update: the comparison covers the update
    assert mz[1]["kl"] > 0
    assert (zero / "pool.jsonl").read_bytes() == (two / "pool.jsonl").read_bytes()
    for step in (1, 2):
        name = f"model_step{step:06d}.ckpt"
        assert (zero / name).read_bytes() == (two / name).read_bytes(), name


@needs_mpi
def test_mora_zero1_resume(mora_world, zero_run, tmp_path):
    """A ZeRO-1 run stopped after its first step and resumed (each rank cuts its shard out of the
    checkpoint's whole moments) goes on exactly as the uninterrupted ZeRO-1 run."""
    zero, _ = zero_run
    part = tmp_path / "part"
    p = mora_run(mora_world, part, *SEQUENTIAL, "--zero", "1", "--stop_after", "1", ranks=2)
    assert "--stop_after" in p.stdout
    p = run([str(ROOT / "train_mora"), "mora", "--resume", str(part)], ranks=2, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "resuming" in p.stdout and "ZeRO-1" in p.stdout, p.stdout
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("ms", "tokens_per_s")} for r in rows]
    assert strip(read_jsonl(part / "metrics.jsonl")) == strip(read_jsonl(zero / "metrics.jsonl"))
    assert (part / "pool.jsonl").read_bytes() == (zero / "pool.jsonl").read_bytes()
    assert (part / "model_step000002.ckpt").read_bytes() == (zero / "model_step000002.ckpt").read_bytes()


def test_mora_zero_flag_is_checked(mora_world, tmp_path):
    out = tmp_path / "r"
    p = run(mora_cmd(mora_world, out, "--zero", "2"), timeout=120)
    assert p.returncode != 0 and "--zero" in p.stderr, p.stderr
    assert not out.exists()


@needs_mpi
def test_mora_batch_not_divisible_by_ranks(mora_world, tmp_path):
    out = tmp_path / "r"
    p = run(mora_cmd(mora_world, out, "--prompts_per_step", "3"), ranks=2, timeout=120)
    assert p.returncode != 0
    assert "--prompts_per_step 3 is not divisible by the 2 ranks" in p.stderr, p.stderr
    assert not out.exists()


@needs_mpi
def test_eval_two_ranks_equal_one_rank(mora_world, tmp_path):
    reports = []
    for name, ranks in (("one", None), ("two", 2)):
        out = tmp_path / name
        p = run([str(ROOT / "train_mora"), "eval", "--model", str(mora_world / "mora"), "--baseline",
                 str(mora_world / "baseline"), "--prompts", str(mora_world / "world" / "eval_prompts.jsonl"),
                 "--samples", "2", "--gen_batch", "4", "--out", str(out)], ranks=ranks, timeout=600)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        assert p.stdout.count("placement: 2 ranks on 1 node(s)") == (1 if ranks else 0), p.stdout[:3000]
        reports.append(json.loads((out / "report.json").read_text()))
    one, two = reports
    for who in ("model_reward", "baseline_reward"):
        for k in DIMS + ["overall"]:
            assert close(two[who][k], one[who][k]), (who, k, two[who], one[who])
    assert two["model_examples"] == one["model_examples"] and two["model_pool"] == one["model_pool"]


# ----------------------------------------------------------------------------------------------
# Inputs that differ between the ranks. Every rank reads its inputs through its own paths, and
# on several nodes a relative path or a node-local disk gives each rank its own file. A wrapper
# starts rank r in its own directory node<r>, so the same relative path names another file on
# each rank: the run stops with a message naming the input and the rank, before rank 0 writes
# any file of the run, instead of training on mixed data or crashing.

def per_rank(tmp_path, files):
    """node0/, node1/ with files[r] = {name: bytes}; returns the wrapper that starts rank r in node<r>."""
    for r, content in enumerate(files):
        d = tmp_path / f"node{r}"
        d.mkdir()
        for name, data in content.items():
            (d / name).write_bytes(data)
    wrap = tmp_path / "wrap.sh"
    wrap.write_text(f'#!/bin/sh\ncd "{tmp_path}/node$OMPI_COMM_WORLD_RANK" && exec "{ROOT / "train_mora"}" "$@"\n')
    wrap.chmod(0o755)
    return str(wrap)


def shard_bytes(tokens):
    header = np.zeros(256, dtype=np.int32)
    header[0], header[1], header[2] = 20240520, 1, len(tokens)
    return header.tobytes() + np.asarray(tokens, dtype=np.uint16).tobytes()


def run_files(out):
    return sorted(p.name for p in out.iterdir()) if out.exists() else []


@needs_mpi
@pytest.mark.parametrize("case", ["other tokens", "other size", "missing"])
def test_pretrain_shards_that_differ_between_ranks(tmp_path, case):
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 256, size=4000)
    other = {"other tokens": tokens[::-1], "other size": tokens[:3000]}.get(case)
    files = [{"train_000.bin": shard_bytes(tokens)},
             {} if case == "missing" else {"train_000.bin": shard_bytes(other)}]
    wrap = per_rank(tmp_path, files)
    out = tmp_path / "run"
    args = [wrap, "pretrain", "--init", "llama:tiny", "--train_data", "train_*.bin", "--seq_len", "16",
            "--batch_size", "2", "--steps", "3", "--out", str(out)]
    p = run(args, ranks=2, timeout=120)
    assert p.returncode != 0
    if case == "missing":
        assert "no token shards match 'train_*.bin'" in p.stderr, p.stderr
    else:
        assert re.search(r"error: rank 1/2 \([^)]*\): " + re.escape("--train_data train_*.bin (1 shards)") + " is not what rank 0 read", p.stderr), p.stderr
    # rank 0 wrote nothing of the run: once the data is right, the same command starts it
    assert not any(n in run_files(out) for n in ("config.json", "metrics.jsonl", "latest.txt")), run_files(out)
    (tmp_path / "node1" / "train_000.bin").write_bytes(shard_bytes(tokens))
    p = run(args, ranks=2, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "step     3/3" in p.stdout


@needs_mpi
def test_pretrain_resume_from_another_checkpoint_on_a_rank(tmp_path, data):
    """Rank 1 resumes from a copy of the run whose checkpoint is another step's (a stale copy on
    its node): the AdamW moments and the step are not broadcast, so the checkpoint is checked."""
    train, _ = data
    args = ["pretrain", "--init", "llama:tiny", "--train_data", train, "--seq_len", "16", "--batch_size", "1",
            "--save_every", "2"]
    wrap = per_rank(tmp_path, [{}, {}])
    run0, run1 = tmp_path / "node0" / "run", tmp_path / "node1" / "run"
    p = run([str(ROOT / "train_mora"), *args, "--steps", "4", "--out", str(run0)], ranks=2)
    assert p.returncode == 0, p.stdout + p.stderr
    shutil.copytree(run0, run1)
    (run1 / "latest.txt").write_text("model_step000002.ckpt\n")
    p = run([wrap, "pretrain", "--out", "run", "--resume", "--steps", "6"], ranks=2, timeout=120)
    assert p.returncode != 0
    assert re.search(r"error: rank 1/2 \([^)]*\): " + re.escape("run/model_step000002.ckpt") + " is not what rank 0 read", p.stderr), p.stderr


@needs_mpi
def test_mora_and_eval_prompts_that_differ_between_ranks(mora_world, tmp_path):
    prompts = (mora_world / "world" / "train_prompts.jsonl").read_bytes()
    lines = prompts.splitlines(keepends=True)
    wrap = per_rank(tmp_path, [{"prompts.jsonl": prompts}, {"prompts.jsonl": b"".join(lines[:-2])}])
    cmd = mora_cmd(mora_world, tmp_path / "m")
    cmd[0] = wrap
    cmd[cmd.index("--prompts") + 1] = "prompts.jsonl"
    p = run(cmd, ranks=2, timeout=300)
    assert p.returncode != 0
    assert re.search(r"error: rank 1/2 \([^)]*\): " + re.escape("--prompts prompts.jsonl") + " is not what rank 0 read", p.stderr), p.stderr
    assert run_files(tmp_path / "m") == []
    p = run([wrap, "eval", "--model", str(mora_world / "mora"), "--baseline", str(mora_world / "baseline"),
             "--prompts", "prompts.jsonl", "--samples", "1", "--out", str(tmp_path / "e")], ranks=2, timeout=300)
    assert p.returncode != 0
    assert re.search(r"error: rank 1/2 \([^)]*\): " + re.escape("--prompts prompts.jsonl") + " is not what rank 0 read", p.stderr), p.stderr
    assert not (tmp_path / "e" / "report.json").exists()


@needs_mpi
def test_reward_data_that_differs_between_ranks(tmp_path):
    """The same number of pairs, chosen and rejected swapped on rank 1: heads trained on that mix
    would be written without a word."""
    from test_reward_cmd import planted
    rows = planted(6, seed=4)
    swapped = [dict(r, chosen=r["rejected"], rejected=r["chosen"]) for r in rows]
    enc = lambda rs: "".join(json.dumps(r) + "\n" for r in rs).encode()
    wrap = per_rank(tmp_path, [{"pref.jsonl": enc(rows)}, {"pref.jsonl": enc(swapped)}])
    out = tmp_path / "heads"
    p = run([wrap, "reward", "--model", "llama:tiny", "--data", "pref.jsonl", "--epochs", "1", "--out", str(out)],
            ranks=2, timeout=120)
    assert p.returncode != 0
    assert re.search(r"error: rank 1/2 \([^)]*\): " + re.escape("--data pref.jsonl") + " is not what rank 0 read", p.stderr), p.stderr
    assert not (out / "reward_heads.bin").exists()


# The launch itself: srun without a PMI plugin, errors that name their rank, where the ranks run.

def launch_env(**extra):
    """The tests' environment without any launcher's variables (pytest may itself run under srun
    or mpirun), plus extra."""
    launcher = ("SLURM_", "PMI_", "PMIX_", "OMPI_COMM_WORLD", "MPI_LOCALRANKID")
    e = {k: v for k, v in env().items() if not k.startswith(launcher)}
    e.update(extra)
    return e


def srun_env(tasks):
    """What srun without --mpi (and no MpiDefault) gives a task: Slurm's variables, no PMI's."""
    return launch_env(SLURM_JOB_ID="4242", SLURM_STEP_ID="0", SLURM_STEP_NUM_TASKS=str(tasks), SLURM_NTASKS=str(tasks),
                      SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0", SLURM_NODELIST=socket.gethostname())


def test_srun_without_pmi(tmp_path, data):
    """srun without --mpi=pmix gives its tasks no PMI, and Open MPI's MPI_Init then aborts with a
    message about its own build, even for one task. One task is one rank, MPI untouched; several
    are refused before MPI is touched, with the cure, and nothing is written."""
    args = [str(ROOT / "train_mora"), *common("llama:tiny", data, steps=2), "--batch_size", "1"]
    one = tmp_path / "one"
    p = subprocess.run([*args, "--out", str(one)], capture_output=True, text=True, timeout=120, env=srun_env(1), cwd=ROOT)
    assert p.returncode == 0, p.stdout + p.stderr
    assert [r["step"] for r in metrics(one)] == [1, 2]
    assert "ranks:" not in p.stdout and "placement:" not in p.stdout, p.stdout
    two = tmp_path / "two"
    p = subprocess.run([*args, "--out", str(two)], capture_output=True, text=True, timeout=120, env=srun_env(2), cwd=ROOT)
    assert p.returncode != 0
    if BUILT_WITH_MPI:
        assert p.stderr == ("error: srun started 2 tasks but gave them no PMI: add --mpi=pmix "
                            "(srun --mpi=list shows what this cluster has)\n"), p.stderr
    else:
        assert "built without MPI, but the launcher started 2 ranks" in p.stderr, p.stderr
    assert p.stdout == "" and not two.exists()


@needs_mpi
def test_errors_name_the_rank_and_host(tmp_path):
    """Under mpirun an error says which rank of how many, on which machine; one rank's does not."""
    missing = str(tmp_path / "missing_*.bin")
    args = [str(ROOT / "train_mora"), "pretrain", "--init", "llama:tiny", "--train_data", missing, "--seq_len", "16",
            "--batch_size", "1", "--steps", "1"]
    p = run([*args, "--out", str(tmp_path / "two")], ranks=2, timeout=120)
    assert p.returncode != 0
    errors = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    host = re.escape(socket.gethostname())
    assert errors and all(re.match(rf"error: rank [01]/2 \({host}\): .*missing_\*\.bin", e) for e in errors), p.stderr
    p = run([*args, "--out", str(tmp_path / "one")], timeout=120)
    assert p.returncode != 0
    errors = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: no token shards match") and "missing_*.bin" in errors[0], p.stderr


def placement_run(tmp_path, data, name, bind, threads):
    """A two-rank pretrain of two steps under mpirun --bind-to bind with OMP_NUM_THREADS=threads;
    returns its placement line (exactly one) and its stderr."""
    cmd = [MPIRUN, "-np", "2", "--oversubscribe", "--bind-to", bind, str(ROOT / "train_mora"),
           *common("llama:tiny", data, steps=2), "--batch_size", "1", "--out", str(tmp_path / name)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=launch_env(OMP_NUM_THREADS=str(threads)),
                       cwd=ROOT)
    assert p.returncode == 0, p.stdout + p.stderr
    lines = [line for line in p.stdout.splitlines() if line.startswith("placement:")]
    assert len(lines) == 1, p.stdout
    return lines[0], p.stderr


@needs_mpi
def test_placement_is_reported_once(tmp_path, data):
    """Two unbound ranks inherit this process's affinity mask: rank 0 reports the mask's cores,
    the node's online cores and the threads OMP_NUM_THREADS gives each rank."""
    cores, online, host = len(os.sched_getaffinity(0)), os.cpu_count(), socket.gethostname()
    line, err = placement_run(tmp_path, data, "one_thread", "none", 1)
    assert line == f"placement: 2 ranks on 1 node(s) ({host}: ranks 0-1); per rank 1 OpenMP thread(s) on {cores} core(s) of {online}"
    assert "more OpenMP threads than the cores" not in err, err
    if 2 * cores >= online and online >= 2:   # neither half the node idle nor more threads than it has
        assert "stay idle" not in err and "in all on its" not in err, err


@needs_mpi
def test_placement_warns_of_more_threads_than_cores(tmp_path, data):
    """More OpenMP threads than the cores of a rank's mask: a warning, with the launch that cures it."""
    cores, host = len(os.sched_getaffinity(0)), socket.gethostname()
    line, err = placement_run(tmp_path, data, "unbound", "none", cores + 1)
    assert line.endswith(f"per rank {cores + 1} OpenMP thread(s) on {cores} core(s) of {os.cpu_count()}"), line
    assert (f"warning: ranks 0-1 run more OpenMP threads than the cores they are bound to (rank 0: {cores + 1} threads "
            f"on {cores} core(s) of {host})") in err, err
    assert "mpirun --bind-to none -x OMP_NUM_THREADS=" in err and "srun --cpus-per-task=" in err, err
    # Open MPI's own binding: each rank on a core of its own, of fewer CPUs than the threads
    if cores >= 2:
        line, err = placement_run(tmp_path, data, "bound", "core", cores + 1)
        m = re.fullmatch(rf"placement: 2 ranks on 1 node\(s\) \({re.escape(host)}: ranks 0-1\); per rank {cores + 1} "
                         rf"OpenMP thread\(s\) on (\d+) core\(s\) of {os.cpu_count()}", line)
        assert m and int(m.group(1)) <= cores, line
        assert "warning: ranks 0-1 run more OpenMP threads than the cores they are bound to" in err, err


@needs_mpi
def test_placement_reported_by_mora(grpo_runs):
    _, _, p = grpo_runs
    assert p.stdout.count("placement: 2 ranks on 1 node(s)") == 1, p.stdout[:3000]


def test_placement_report_of_made_up_placements():
    """comm_placement_print on placements one machine cannot show: nodes named with their ranks,
    ranges where ranks differ, a warning for a rank with more threads than cores, for a node whose
    ranks are bound to fewer than half its cores (exactly half is not) and for a node whose
    unbound ranks run more threads in all than it has cores; nothing for one rank."""
    p = subprocess.run([str(BUILD / "tools" / "comm_check"), "placement"], capture_output=True, text=True, timeout=60,
                       env=launch_env(), cwd=ROOT)
    assert p.returncode == 0, p.stdout + p.stderr
    cure = ("  to give each rank {n} core(s) and as many threads: mpirun --bind-to none -x OMP_NUM_THREADS={n}, "
            "or srun --cpus-per-task={n} with OMP_NUM_THREADS=$SLURM_CPUS_PER_TASK")
    assert p.stdout.splitlines() == [
        "case: two nodes, a core per rank",
        "placement: 16 ranks on 2 node(s) (gpu1: ranks 0-7; gpu2: ranks 8-15); per rank 1 OpenMP thread(s) on 1 core(s) of 96",
        "warning: the 8 rank(s) on gpu1 are bound to 8 of its 96 cores: the others stay idle",
        "warning: the 8 rank(s) on gpu2 are bound to 8 of its 96 cores: the others stay idle",
        cure.format(n=12),
        "case: round robin, one hostname",
        "placement: 4 ranks on 2 node(s) (node: ranks 0,2; node: ranks 1,3); per rank 4-12 OpenMP thread(s) on 8 core(s) of 16",
        "warning: rank 3 runs more OpenMP threads than the cores it is bound to (12 threads on 8 core(s) of node): "
        "the threads take turns on those cores",
        cure.format(n=8),
        "case: six nodes",
        "placement: 6 ranks on 6 node(s) (n0: rank 0; n1: rank 1; n2: rank 2; 3 more); per rank 32 OpenMP thread(s) on 32 core(s) of 32",
        "case: unbound, a thread per core each",
        "placement: 2 ranks on 1 node(s) (vm: ranks 0-1); per rank 4 OpenMP thread(s) on 4 core(s) of 4",
        "warning: the 2 rank(s) on vm run 8 OpenMP threads in all on its 4 cores: the threads take turns on them",
        cure.format(n=2),
        "case: one rank",
        "case: this run",
    ], p.stdout


@needs_mpi
def test_a_flag_error_is_said_once(tmp_path, data):
    """Every rank parses the same command line: rank 0 alone reports the error, not once per rank."""
    p = run([str(ROOT / "train_mora"), *common("llama:tiny", data), "--out", str(tmp_path / "r"), "--bogus", "1"],
            ranks=2, timeout=120)
    assert p.returncode != 0
    assert p.stderr.count("unknown flag '--bogus' for train_mora pretrain") == 1, p.stderr
    assert re.search(r"error: rank 0/2 \([^)]*\): unknown flag '--bogus'", p.stderr), p.stderr
    p = run([str(ROOT / "train_mora"), *common("llama:tiny", data), "--out", str(tmp_path / "r"), "--steps", "x"],
            ranks=2, timeout=120)
    assert p.returncode != 0 and p.stderr.count("flag --steps: expected an integer, got 'x'") == 1, p.stderr
    # a command's own check of its flags after parsing, which every rank makes alike
    p = run([str(ROOT / "train_mora"), *common("llama:tiny", data), "--out", str(tmp_path / "r"), "--lr", "1e-4",
             "--min_lr", "1e-3"], ranks=2, timeout=120)
    assert p.returncode != 0 and p.stderr.count("flag --min_lr 0.001 is above --lr 0.0001") == 1, p.stderr
