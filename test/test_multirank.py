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
import os
import pathlib
import shutil
import subprocess

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
    assert "error: rank 1 stops on purpose" in p.stderr, p.stderr
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
    # one rank cannot take over a two-rank run
    p = run([str(ROOT / "train_mora"), *args, "--out", part, "--resume"])
    assert p.returncode != 0
    assert "trained with 2 rank(s), this launch has 1" in p.stderr, p.stderr
    # three ranks neither; every rank refuses
    p = run([str(ROOT / "train_mora"), *args, "--out", part, "--resume"], ranks=3)
    assert p.returncode != 0
    assert "trained with 2 rank(s), this launch has 3" in p.stderr, p.stderr
    # two ranks resume (ZeRO-1 shards rebuilt from the checkpoint's moments) and reproduce the
    # uninterrupted run exactly
    _, p = pretrain(tmp_path, "part", [*args, "--resume"], ranks=2)
    assert "resuming" in p.stdout
    a, b = metrics(full), metrics(part)
    assert [r["step"] for r in b] == list(range(1, 9))
    for ra, rb in zip(a, b):
        assert ra["loss"] == rb["loss"] and ra["grad_norm"] == rb["grad_norm"], (ra, rb)


@needs_mpi
def test_single_rank_commands_refuse_several_ranks(tmp_path):
    p = run([str(ROOT / "train_mora"), "generate", "--model", "x", "--prompt", "hi"], ranks=2)
    assert p.returncode != 0
    assert "runs on one rank" in p.stderr, p.stderr


def test_zero_flag_is_checked(tmp_path, data):
    p = run([str(ROOT / "train_mora"), *common("llama:tiny", data), "--out", str(tmp_path / "r"), "--zero", "2"])
    assert p.returncode != 0 and "--zero" in p.stderr, p.stderr
