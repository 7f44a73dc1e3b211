"""Builds a CUDA kernel header into a CPU program on the GPU emulation of test/gpu_emu.h.

The header's host code launches kernels with k<<<grid, block, smem, stream>>>(args), which C++
cannot compile; each launch is rewritten into emu_launch(grid, block, smem, stream,
[=] { k(args); }), roughly what nvcc turns a launch into. The kernels themselves are compiled
unchanged.
"""
import re
import shutil
import subprocess

import numpy as np
import pytest

from conftest import ROOT


def rewrite_launches(source, min_launches):
    """source with every <<<...>>> launch rewritten into an emu_launch call."""
    launched, n = re.subn(r"(\w+(?:<[\w, ]+>)?)<<<(.*?)>>>\((.*?)\);", r"emu_launch(\2, [=] { \1(\3); });", source,
                          flags=re.S)
    assert n == source.count("<<<") and n >= min_launches and "<<<" not in launched, "a launch was not rewritten"
    return launched


def build_emulator(build, launched, name):
    """Writes `launched` (a rewritten kernel header) as BUILD/X_launched.cuh, where NAME is
    X_emu, and compiles test/NAME.cpp with it and test/NAME.ld into BUILD/NAME; skips when g++
    is missing."""
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("g++ not found: the emulator is C++")
    (build / f"{name.removesuffix('_emu')}_launched.cuh").write_text(launched)
    exe = build / name
    subprocess.run([cxx, "-std=c++17", "-O2", "-fno-strict-aliasing", "-fdata-sections", "-Wall", "-Wno-unknown-pragmas",
                    "-I", str(build), "-I", str(ROOT / "llmc"), "-o", str(exe), str(ROOT / "test" / f"{name}.cpp"),
                    "-Wl,-T," + str(ROOT / "test" / f"{name}.ld")], check=True)
    return exe


def to_bf16(x):
    """Rounds float32 values to the nearest bfloat16 (ties to even), returned as float32."""
    u = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16 << 16
    return u.astype(np.uint32).view(np.float32)
