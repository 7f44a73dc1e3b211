"""Builds a CUDA kernel header into a CPU program on the GPU emulation of test/gpu_emu.h.

The header's host code launches kernels with k<<<grid, block, smem, stream>>>(args), which C++
cannot compile; each launch is rewritten into emu_launch(grid, block, smem, stream,
emu_bind("k", k, args)), roughly what nvcc turns a launch into: test/gpu_emu.h's emu_bind copies
the arguments, converted to the kernel's parameter types, into the closure the launch runs, and
names the kernel to the launch. Each static __shared__ declaration is followed by
emu_static_shared(&name, sizeof(name)) for every array it declares, so that a launch knows its
static shared memory (CUDA's limits a block, test/gpu_emu.h). The kernels' code is otherwise
compiled unchanged.
"""
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from conftest import ROOT


def shared_names(declaration):
    """The names a static __shared__ declaration (what follows __shared__, up to its ';') declares."""
    declaration = re.sub(r"__align__\(\d+\)", "", declaration)
    names = []
    for i, part in enumerate(declaration.split(",")):   # a declarator's brackets hold no commas here
        m = re.search(r"([A-Za-z_]\w*)\s*(?:\[|$)", part.strip())
        assert m and (i > 0 or m.start() > 0), f"not a __shared__ declaration: {declaration!r}"
        names.append(m.group(1))
    return names


def sanitizer_flags(kinds=None):
    """The compiler's flags for the sanitizers `kinds` names, by default EMU_SANITIZE's (e.g.
    "address,undefined"; none when unset): the emulated programs then stop at the first misaligned
    vector access, read or write past a device buffer (test/emu_cuda/ and test/gpu_emu_runtime.h
    allocate them exactly under AddressSanitizer) or a block's shared memory, or other undefined
    behaviour of the kernels' and host code's C++."""
    kinds = (os.environ.get("EMU_SANITIZE", "") if kinds is None else kinds).strip()
    if not kinds:
        return []
    if not re.fullmatch(r"[a-z-]+(,[a-z-]+)*", kinds):
        raise ValueError(f"EMU_SANITIZE must be sanitizer names separated by commas, not {kinds!r}")
    flags = [f"-fsanitize={kinds}", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g"]
    # no red zones between globals: test/gpu_emu.h fills the static __shared__ arrays' range, which
    # the linker script gathers, as one piece before every block
    return flags + (["--param=asan-globals=0"] if "address" in kinds.split(",") else [])


def rewrite_launches(source, min_launches):
    """source with every <<<...>>> launch rewritten into an emu_launch call, and every static
    __shared__ declaration (one that starts its line) followed by its arrays' emu_static_shared."""
    def launch(m):
        kernel, config, args = m.group(1), m.group(2), m.group(3)
        return f"emu_launch({config}, emu_bind(\"{kernel}\", {kernel}{', ' if args.strip() else ''}{args}));"

    def shared(m):
        registered = " ".join(f"emu_static_shared(&{name}, sizeof({name}));" for name in shared_names(m.group(2)))
        return f"{m.group(1)}__shared__{m.group(2)}; {registered}"

    launched, n = re.subn(r"(\w+(?:<[\w, ]+>)?)<<<(.*?)>>>\((.*?)\);", launch, source, flags=re.S)
    assert n == source.count("<<<") and n >= min_launches and "<<<" not in launched, "a launch was not rewritten"
    return re.sub(r"^(\s*)__shared__([^;]*);", shared, launched, flags=re.M)


def build_emulator(build, launched, name, suffix=".cuh", flags=(), objects=()):
    """Writes `launched` (a rewritten kernel header) as BUILD/X_launched.cuh (or X_launched with
    another suffix), where NAME is X_emu, and compiles test/NAME.cpp with it, extra compiler
    flags, objects and test/NAME.ld into BUILD/NAME; skips when g++ is missing."""
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("g++ not found: the emulator is C++")
    (build / f"{name.removesuffix('_emu')}_launched{suffix}").write_text(launched)
    exe = build / name
    subprocess.run([cxx, "-std=c++17", "-O2", "-U_FORTIFY_SOURCE", "-fno-strict-aliasing", "-fdata-sections", "-Wall", "-Wno-unknown-pragmas",
                    *sanitizer_flags(), *flags, "-I", str(build), "-I", str(ROOT / "llmc"), "-o", str(exe), str(ROOT / "test" / f"{name}.cpp"),
                    *(str(o) for o in objects), "-Wl,-T," + str(ROOT / "test" / f"{name}.ld")], check=True)
    return exe


# The orders a per-kernel test runs its emulator program in (run_program): the threads of a block
# (the program's last argument, forward|reverse: a missing barrier shows in one order or the
# other) and the blocks of each launch (EMU_BLOCKS, test/gpu_emu.h: blocks that depend on which
# of them runs first, a race on a GPU, show in one order or another):
#   forward  threads and blocks in index order
#   reverse  both in reverse order
#   shuffle  threads in index order, each launch's blocks in a pseudo-random order (EMU_SEED)
ORDERS = ("forward", "reverse", "shuffle")


def run_program(args, order="forward", env=None, seed=1, timeout=600):
    """subprocess.run of an emulator program: args (the program, its input and output files) and
    the threads' order word, in the block order of `order` (one of ORDERS; shuffle from seed),
    whatever EMU_BLOCKS and EMU_SEED the caller's environment holds; env defaults to os.environ."""
    threads = "reverse" if order == "reverse" else "forward"
    return subprocess.run([str(a) for a in args] + [threads], capture_output=True, text=True, timeout=timeout,
                          env=block_order_env(order, env, seed))


def block_order_env(blocks, env=None, seed=1):
    """env (default os.environ) with EMU_BLOCKS set to blocks (forward, reverse or shuffle) and
    EMU_SEED to seed, for a program whose last argument is not the threads' order."""
    if blocks not in ORDERS:
        raise ValueError(f"a block order is one of {ORDERS}, not {blocks!r}")
    return dict(os.environ if env is None else env, EMU_BLOCKS=blocks, EMU_SEED=str(seed))


def to_bf16(x):
    """Rounds float32 values to the nearest bfloat16 (ties to even), returned as float32."""
    u = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16 << 16
    return u.astype(np.uint32).view(np.float32)
