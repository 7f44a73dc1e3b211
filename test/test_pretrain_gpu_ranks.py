"""`pretrain --device cuda` and `mora --device cuda` under several ranks: what can be checked
without a GPU.

Data-parallel GPU training (NCCL gradient all-reduce, parameter broadcast, ZeRO-1 over NCCL) runs
only on GPUs, where dev/gpu_check.sh compares it with the plain GPU run (pretrain) and the MORA
loop's NCCL path with its plain GPU run (dev/cuda/mora_device_check.py). Here: such a launch is
accepted up to the device check, so on a machine without a GPU it stops with the no-GPU message
on every rank (not with a refusal of data parallelism), and TRAIN_MORA_NCCL, the switch that sends
a one-rank GPU run through the data-parallel path, is checked and leaves CPU runs unchanged.
"""
import shutil
import subprocess

import pytest

from conftest import ROOT
from test_multirank import metrics, needs_mpi, run, write_shard, env

NO_GPU_MESSAGES = ("--device cuda: no CUDA GPU is visible", "--device cuda: this build of train_mora has no CUDA backend")


def gpu_visible():
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    p = subprocess.run([smi, "-L"], capture_output=True, text=True)
    return p.returncode == 0 and "GPU" in p.stdout


needs_no_gpu = pytest.mark.skipif(gpu_visible(), reason="a GPU is visible: dev/gpu_check.sh checks the GPU runs")


@pytest.fixture
def shard(tmp_path):
    write_shard(tmp_path / "train_000.bin", [(7 * i) % 256 for i in range(4000)])
    return str(tmp_path / "train_*.bin")


def pretrain_args(shard, out, *extra):
    return [str(ROOT / "train_mora"), "pretrain", "--init", "gpt2:tiny", "--train_data", shard, "--seq_len", "16",
            "--steps", "3", "--out", out, *extra]


def assert_stops_at_the_device_check(p):
    assert p.returncode != 0, p.stdout + p.stderr
    assert any(m in p.stderr for m in NO_GPU_MESSAGES), p.stderr
    assert "data-parallel training on GPUs needs" not in p.stderr, p.stderr


@needs_mpi
@needs_no_gpu
def test_two_gpu_ranks_reach_the_device_check(tmp_path, shard):
    p = run(pretrain_args(shard, str(tmp_path / "r"), "--device", "cuda"), ranks=2)
    assert_stops_at_the_device_check(p)
    # every rank stopped there, and none wrote the run directory's files
    assert not (tmp_path / "r" / "config.json").exists()


@needs_mpi
@needs_no_gpu
def test_two_gpu_ranks_with_zero1_reach_the_device_check(tmp_path, shard):
    p = run(pretrain_args(shard, str(tmp_path / "r"), "--device", "cuda", "--zero", "1"), ranks=2)
    assert_stops_at_the_device_check(p)


@needs_no_gpu
def test_one_gpu_rank_with_zero1_reaches_the_device_check(tmp_path, shard):
    p = run(pretrain_args(shard, str(tmp_path / "r"), "--device", "cuda", "--zero", "1"))
    assert_stops_at_the_device_check(p)


def test_train_mora_nccl_value_is_checked(tmp_path, shard):
    e = env()
    e["TRAIN_MORA_NCCL"] = "yes"
    p = subprocess.run(pretrain_args(shard, str(tmp_path / "r")), capture_output=True, text=True, env=e, cwd=ROOT,
                       timeout=120)
    assert p.returncode != 0
    assert "TRAIN_MORA_NCCL=yes" in p.stderr and "expected 0 or 1" in p.stderr, p.stderr


def test_train_mora_nccl_leaves_cpu_runs_unchanged(tmp_path, shard):
    outs = []
    for value in ("0", "1"):
        e = env()
        e["TRAIN_MORA_NCCL"] = value
        out = str(tmp_path / f"nccl{value}")
        p = subprocess.run(pretrain_args(shard, out, "--device", "cpu"), capture_output=True, text=True, env=e,
                           cwd=ROOT, timeout=300)
        assert p.returncode == 0, p.stdout + p.stderr
        assert "NCCL" not in p.stdout, p.stdout
        outs.append(metrics(out))
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in outs[0]] == \
           [(r["step"], r["loss"], r["grad_norm"]) for r in outs[1]]
    assert len(outs[0]) == 3


def mora_args(tmp_path, *extra):
    # the device is settled before the model and prompts are read: these paths are never opened
    return [str(ROOT / "train_mora"), "mora", "--model", str(tmp_path / "no_model.ckpt"), "--prompts",
            str(tmp_path / "no_prompts.jsonl"), "--out", str(tmp_path / "m"), *extra]


@needs_mpi
@needs_no_gpu
def test_two_gpu_ranks_of_mora_reach_the_device_check(tmp_path):
    p = run(mora_args(tmp_path, "--device", "cuda"), ranks=2)
    assert_stops_at_the_device_check(p)
    assert "several ranks" not in p.stderr, p.stderr
    assert not (tmp_path / "m" / "config.json").exists()


def test_train_mora_nccl_value_is_checked_by_mora(tmp_path):
    e = env()
    e["TRAIN_MORA_NCCL"] = "2"
    p = subprocess.run(mora_args(tmp_path, "--device", "cpu"), capture_output=True, text=True, env=e, cwd=ROOT, timeout=120)
    assert p.returncode != 0
    assert "TRAIN_MORA_NCCL=2" in p.stderr and "expected 0 or 1" in p.stderr, p.stderr
