"""Runs every C test program (build/test_*, built from test/test_*.c by `make`).

Each program checks its results against an independent reference (finite differences in double
precision, or a straightforward double-precision loop) and exits non-zero on a mismatch."""
import subprocess

import pytest

from conftest import BUILD, ROOT

C_TESTS = sorted(p.stem for p in (ROOT / "test").glob("test_*.c"))


@pytest.mark.parametrize("name", C_TESTS)
def test_c_program(name):
    exe = BUILD / name
    assert exe.exists(), f"{exe} is not built: run make"
    proc = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600)
    print(proc.stdout)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout}\n{proc.stderr}"
