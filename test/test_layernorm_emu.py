"""The residual + norm forward kernels of the GPU backend (llmc/layernorm.cuh) run on the CPU
through test/layernorm_emu.cpp (the GPU emulation of test/gpu_emu.h) against a NumPy float64
oracle written from the definitions: x = residual + branch, then
LayerNorm  out = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias   (var over C, biased)
RMSNorm    out = x / sqrt(mean(x^2) + eps) * weight.

Both kernels run, a warp per row and a block per row (registers; the one residual_norm_forward
picks below NORM_ROW_KERNEL_MAX_ROWS rows, the decode step's), and the dispatcher itself: for
LayerNorm and RMSNorm, with and without the residual add and the bias, widths that are and are
not multiples of a warp or a block, up to the block kernel's largest width, with the threads of
each block scheduled forward and in reverse. A mutation check confirms that an oracle with the
unbiased variance fails the comparison."""
import re
import subprocess

import numpy as np
import pytest

from conftest import ROOT
from gpu_emu import build_emulator, rewrite_launches, to_bf16

EPS = 1e-5
SOURCE = (ROOT / "llmc" / "layernorm.cuh").read_text()
MAX_ROWS = int(re.search(r"#define NORM_ROW_KERNEL_MAX_ROWS (\d+)", SOURCE).group(1))
ROW_WIDTH = int(re.search(r"#define NORM_ROW_THREADS (\d+)", SOURCE).group(1)) * \
    int(re.search(r"#define NORM_ROW_MAX_PER_THREAD (\d+)", SOURCE).group(1))
WARPS, ROWS, PICKED = 0, 1, 2


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    return build_emulator(tmp_path_factory.mktemp("layernorm"), rewrite_launches(SOURCE, 4), "layernorm_emu")


def oracle(res_in, branch, weight, bias, is_layernorm, unbiased=False):
    """out, x (the residual sum, in float32 as the kernels add), mean, rstd in float64."""
    x = res_in if branch is None else (res_in + branch).astype(np.float32)
    xd = x.astype(np.float64)
    C = x.shape[1]
    mean = xd.mean(axis=1, keepdims=True) if is_layernorm else np.zeros((x.shape[0], 1))
    var = ((xd - mean) ** 2).sum(axis=1, keepdims=True) / (C - 1 if unbiased else C)
    rstd = 1.0 / np.sqrt(var + EPS)
    out = (xd - mean) * rstd * weight
    if bias is not None:
        out = out + bias
    return out, x, mean[:, 0], rstd[:, 0]


def run_emulator(emulator, tmp_path, res_in, branch, weight, bias, is_layernorm, kernel, order="forward"):
    N, C = res_in.shape
    inp, outp = tmp_path / "in.bin", tmp_path / "out.bin"
    with open(inp, "wb") as f:
        np.array([N, C, is_layernorm, branch is not None, bias is not None, kernel], np.int32).tofile(f)
        for a in (res_in, branch, weight, bias):
            if a is not None:
                a.astype(np.float32).tofile(f)
    proc = subprocess.run([str(emulator), str(inp), str(outp), order], capture_output=True, text=True, timeout=600)
    return proc, outp


def read_outputs(outp, N, C, fused, is_layernorm):
    raw = np.fromfile(outp, np.float32)
    sizes = [("out", N * C)] + ([("x", N * C)] if fused else []) + ([("mean", N)] if is_layernorm else []) + [("rstd", N)]
    assert raw.size == sum(n for _, n in sizes)
    got, at = {}, 0
    for name, n in sizes:
        got[name] = raw[at:at + n]
        at += n
    got["out"] = got["out"].reshape(N, C)
    if fused:
        got["x"] = got["x"].reshape(N, C)
    return got


def make_inputs(N, C, fused, has_bias, seed):
    rng = np.random.default_rng(seed)
    res_in = (rng.standard_normal((N, C)) * 2.0 + 0.5).astype(np.float32)   # a mean to subtract
    branch = to_bf16(rng.standard_normal((N, C))) if fused else None
    weight = to_bf16(1.0 + 0.3 * rng.standard_normal(C))
    bias = to_bf16(0.2 * rng.standard_normal(C)) if has_bias else None
    return res_in, branch, weight, bias


def check(got, ref, fused, is_layernorm):
    """The bf16 output within one bf16 rounding (half an ulp) plus fp32 arithmetic, the statistics
    within fp32 arithmetic; the residual sum exact (one float32 addition on both sides)."""
    out, x, mean, rstd = ref
    _, e = np.frexp(out)
    bound = np.ldexp(1.0, e - 9) + 1e-5 * np.abs(out).max()
    assert np.all(np.abs(got["out"] - out) <= bound), np.abs(got["out"] - out).max()
    if fused:
        assert np.array_equal(got["x"], x)
    if is_layernorm:
        np.testing.assert_allclose(got["mean"], mean, rtol=1e-5, atol=1e-6 * np.abs(x).max())
    np.testing.assert_allclose(got["rstd"], rstd, rtol=1e-5)


CASES = [  # N, C, is_layernorm, fused, has_bias
    (1, 768, 1, 1, 1),       # one decode row, GPT-2 width
    (5, 576, 0, 1, 0),       # SmolLM2 width, RMSNorm
    (3, 33, 1, 0, 1),        # narrower than a warp's stride, not a multiple of 32
    (9, 300, 0, 0, 0),       # more rows than a warp-kernel block holds
    (2, ROW_WIDTH, 1, 1, 0), # the block kernel's widest row, LayerNorm without bias
]


@pytest.mark.parametrize("kernel", [WARPS, ROWS, PICKED])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("order", ["forward", "reverse"])
def test_norm_forward_matches_oracle(emulator, tmp_path, case, kernel, order):
    N, C, is_layernorm, fused, has_bias = case
    res_in, branch, weight, bias = make_inputs(N, C, fused, has_bias, seed=N * 1000 + C)
    proc, outp = run_emulator(emulator, tmp_path, res_in, branch, weight, bias, is_layernorm, kernel, order)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = read_outputs(outp, N, C, fused, is_layernorm)
    check(got, oracle(res_in, branch, weight, bias, is_layernorm), fused, is_layernorm)


def test_dispatch_picks_the_block_kernel_for_few_rows_and_the_warp_kernel_otherwise(emulator, tmp_path):
    """residual_norm_forward's output is bit for bit the block kernel's below MAX_ROWS rows and
    for widths the block holds, else the warp kernel's (the two round differently: each sums in
    its own order)."""
    def outputs(N, C, kernel):
        res_in, branch, weight, bias = make_inputs(N, C, True, True, seed=7)
        proc, outp = run_emulator(emulator, tmp_path, res_in, branch, weight, bias, 1, kernel)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return np.fromfile(outp, np.float32)
    for N, C, expected in [(4, 200, ROWS), (MAX_ROWS - 1, 40, ROWS), (MAX_ROWS, 40, WARPS), (3, ROW_WIDTH + 1, WARPS)]:
        picked = outputs(N, C, PICKED)
        assert np.array_equal(picked, outputs(N, C, expected)), (N, C)
    # the two kernels do round differently on some input, so the comparison above can tell them apart
    assert not np.array_equal(outputs(4, 200, WARPS), outputs(4, 200, ROWS))


def test_block_kernel_refuses_a_row_wider_than_its_registers(emulator, tmp_path):
    res_in, branch, weight, bias = make_inputs(2, ROW_WIDTH + 1, False, False, seed=3)
    proc, _ = run_emulator(emulator, tmp_path, res_in, branch, weight, bias, 0, ROWS)
    assert proc.returncode != 0 and "C too large" in proc.stderr


def test_unbiased_variance_oracle_fails(emulator, tmp_path):
    N, C = 3, 33
    res_in, branch, weight, bias = make_inputs(N, C, True, True, seed=11)
    proc, outp = run_emulator(emulator, tmp_path, res_in, branch, weight, bias, 1, ROWS)
    assert proc.returncode == 0, proc.stderr
    got = read_outputs(outp, N, C, True, True)
    with pytest.raises(AssertionError):
        check(got, oracle(res_in, branch, weight, bias, 1, unbiased=True), True, True)
