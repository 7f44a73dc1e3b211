"""The norm kernels of the GPU backend (llmc/layernorm.cuh) and the column sums of
llmc/column_reduce.cuh run on the CPU through test/layernorm_emu.cpp (the GPU emulation of
test/gpu_emu.h) against NumPy float64 oracles written from the definitions.

Forward: x = residual + branch, then
LayerNorm  out = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias   (var over C, biased)
RMSNorm    out = x / sqrt(mean(x^2) + eps) * weight.
All three kernels run (a warp per row, a warp per row from registers, a block per row) and the
dispatcher itself: for LayerNorm and RMSNorm, with and without the residual add and the bias,
widths that are and are not multiples of a warp, a vector or a block, up to the kernels' largest
widths, with the threads of each block scheduled forward and in reverse and the blocks of each
launch forward, in reverse and shuffled (gpu_emu.ORDERS).

Backward, with norm = (x - mean) * rstd and dnorm = dout * weight:
dres += rstd * (dnorm - mean_c(dnorm) [LayerNorm] - norm * mean_c(dnorm * norm)),
dweight += sum_n dout * norm, dbias += sum_n dout, colsum += sum_n dres (the updated one),
through the fused kernel, the split fallback and the dispatcher, over row counts that fill and
do not fill the fused kernel's blocks and the column chunks.

With the residual stream in bf16 (the model's default) the forward's sum is rounded to bf16 and
the norm is that of the rounded x; the backward reads the input and the stream's gradient in
bf16 and stores the updated gradient rounded to bf16, whose column sums it adds.

Mutation checks confirm that an oracle with the unbiased variance, or one without the
mean_c(dnorm) term, fails the comparison."""
import re

import numpy as np
import pytest

from conftest import ROOT
from gpu_emu import ORDERS, build_emulator, rewrite_launches, run_program, to_bf16

EPS = 1e-5
SOURCE = (ROOT / "llmc" / "layernorm.cuh").read_text()
MAX_ROWS = int(re.search(r"#define NORM_ROW_KERNEL_MAX_ROWS (\d+)", SOURCE).group(1))
ROW_WIDTH = int(re.search(r"#define NORM_ROW_THREADS (\d+)", SOURCE).group(1)) * \
    int(re.search(r"#define NORM_ROW_MAX_PER_THREAD (\d+)", SOURCE).group(1))
VEC_WIDTH = 32 * int(re.search(r"#define NORM_VEC_MAX_PER_LANE (\d+)", SOURCE).group(1))
BWD_ROWS = int(re.search(r"#define NORM_BWD_ROWS (\d+)", SOURCE).group(1))
WARPS, ROWS, PICKED, REGISTERS = 0, 1, 2, 3
FUSED, SPLIT = 0, 1


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    build = tmp_path_factory.mktemp("layernorm")
    # layernorm.cuh includes column_reduce.cuh: its rewritten copy sits beside the launched header
    (build / "column_reduce.cuh").write_text(rewrite_launches((ROOT / "llmc" / "column_reduce.cuh").read_text(), 3))
    return build_emulator(build, rewrite_launches(SOURCE, 13), "layernorm_emu")


def oracle(res_in, branch, weight, bias, is_layernorm, unbiased=False, bf16_stream=False):
    """out, x (the residual sum, in float32 as the kernels add; rounded to bf16 for a bf16
    stream), mean, rstd in float64."""
    x = res_in if branch is None else (res_in + branch).astype(np.float32)
    if bf16_stream:
        x = to_bf16(x)
    xd = x.astype(np.float64)
    C = x.shape[1]
    mean = xd.mean(axis=1, keepdims=True) if is_layernorm else np.zeros((x.shape[0], 1))
    var = ((xd - mean) ** 2).sum(axis=1, keepdims=True) / (C - 1 if unbiased else C)
    rstd = 1.0 / np.sqrt(var + EPS)
    out = (xd - mean) * rstd * weight
    if bias is not None:
        out = out + bias
    return out, x, mean[:, 0], rstd[:, 0]


def run_emulator(emulator, tmp_path, res_in, branch, weight, bias, is_layernorm, kernel, order="forward", bf16_stream=False):
    N, C = res_in.shape
    inp, outp = tmp_path / "in.bin", tmp_path / "out.bin"
    with open(inp, "wb") as f:
        np.array([0, N, C, is_layernorm, branch is not None, bias is not None, kernel, bf16_stream], np.int32).tofile(f)
        for a in (res_in, branch, weight, bias):
            if a is not None:
                a.astype(np.float32).tofile(f)
    proc = run_program([emulator, inp, outp], order)
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


def make_inputs(N, C, fused, has_bias, seed, bf16_stream=False):
    rng = np.random.default_rng(seed)
    res_in = (rng.standard_normal((N, C)) * 2.0 + 0.5).astype(np.float32)   # a mean to subtract
    if bf16_stream:
        res_in = to_bf16(res_in)
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
    (1, 768, 1, 1, 1),       # one decode row, GPT-2 width (4-wide vectors)
    (5, 576, 0, 1, 0),       # SmolLM2 width, RMSNorm
    (3, 33, 1, 0, 1),        # narrower than a warp's stride, not a multiple of 32 (scalar access)
    (9, 300, 0, 0, 0),       # more rows than a warp-kernel block holds (4-wide)
    (4, 38, 1, 1, 1),        # 2-wide vectors
    (2, VEC_WIDTH, 1, 1, 0), # the register warp kernel's widest row, LayerNorm without bias
]


@pytest.mark.parametrize("kernel", [WARPS, ROWS, PICKED, REGISTERS])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("order", ORDERS)
def test_norm_forward_matches_oracle(emulator, tmp_path, case, kernel, order):
    N, C, is_layernorm, fused, has_bias = case
    res_in, branch, weight, bias = make_inputs(N, C, fused, has_bias, seed=N * 1000 + C)
    proc, outp = run_emulator(emulator, tmp_path, res_in, branch, weight, bias, is_layernorm, kernel, order)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = read_outputs(outp, N, C, fused, is_layernorm)
    check(got, oracle(res_in, branch, weight, bias, is_layernorm), fused, is_layernorm)


@pytest.mark.parametrize("kernel", [WARPS, ROWS, PICKED, REGISTERS])
@pytest.mark.parametrize("case", CASES)
def test_norm_forward_with_bf16_stream_matches_oracle(emulator, tmp_path, case, kernel):
    """The stream in bf16: the stored sum is the float32 sum rounded to bf16, exactly, and the
    output and statistics are those of the rounded sum."""
    N, C, is_layernorm, fused, has_bias = case
    res_in, branch, weight, bias = make_inputs(N, C, fused, has_bias, seed=N * 1000 + C + 1, bf16_stream=True)
    proc, outp = run_emulator(emulator, tmp_path, res_in, branch, weight, bias, is_layernorm, kernel, "reverse",
                              bf16_stream=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = read_outputs(outp, N, C, fused, is_layernorm)
    check(got, oracle(res_in, branch, weight, bias, is_layernorm, bf16_stream=True), fused, is_layernorm)
    if fused:   # the rounding is there: the unrounded sum is not what was stored
        assert not np.array_equal(got["x"], oracle(res_in, branch, weight, bias, is_layernorm)[1])


def test_dispatch_picks_the_block_kernel_for_few_rows_and_the_warp_kernel_otherwise(emulator, tmp_path):
    """residual_norm_forward's output is bit for bit the block kernel's below MAX_ROWS rows and
    for widths the block holds, else the warp kernel's (the two round differently: each sums in
    its own order)."""
    def outputs(N, C, kernel):
        res_in, branch, weight, bias = make_inputs(N, C, True, True, seed=7)
        proc, outp = run_emulator(emulator, tmp_path, res_in, branch, weight, bias, 1, kernel)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return np.fromfile(outp, np.float32)
    for N, C, expected in [(4, 200, ROWS), (MAX_ROWS - 1, 40, ROWS), (MAX_ROWS, 40, REGISTERS), (3, ROW_WIDTH + 1, WARPS)]:
        picked = outputs(N, C, PICKED)
        assert np.array_equal(picked, outputs(N, C, expected)), (N, C)
    # the two kernels do round differently on some input, so the comparison above can tell them apart
    assert not np.array_equal(outputs(4, 200, WARPS), outputs(4, 200, ROWS))


@pytest.mark.parametrize("kernel,width", [(ROWS, ROW_WIDTH), (REGISTERS, VEC_WIDTH)])
def test_register_kernels_refuse_a_row_wider_than_their_registers(emulator, tmp_path, kernel, width):
    res_in, branch, weight, bias = make_inputs(2, width + 1, False, False, seed=3)
    proc, _ = run_emulator(emulator, tmp_path, res_in, branch, weight, bias, 0, kernel)
    assert proc.returncode != 0 and "C too large" in proc.stderr


def test_unbiased_variance_oracle_fails(emulator, tmp_path):
    N, C = 3, 33
    res_in, branch, weight, bias = make_inputs(N, C, True, True, seed=11)
    proc, outp = run_emulator(emulator, tmp_path, res_in, branch, weight, bias, 1, ROWS)
    assert proc.returncode == 0, proc.stderr
    got = read_outputs(outp, N, C, True, True)
    with pytest.raises(AssertionError):
        check(got, oracle(res_in, branch, weight, bias, 1, unbiased=True), True, True)


# ---------------------------------------------------------------------------------------------
# backward


def backward_oracle(dout, inp, dres, weight, mean, rstd, starts, is_layernorm, drop_mean_term=False):
    """dres, dweight, dbias, colsum (float64) after the backward, from the given statistics."""
    d = [a.astype(np.float64) for a in (dout, inp, dres)]
    g, x, r = d
    m = mean.astype(np.float64)[:, None] if is_layernorm else 0.0
    s = rstd.astype(np.float64)[:, None]
    norm = (x - m) * s
    dnorm = g * weight.astype(np.float64)
    dx = dnorm - norm * (dnorm * norm).mean(axis=1, keepdims=True)
    if is_layernorm and not drop_mean_term:
        dx -= dnorm.mean(axis=1, keepdims=True)
    new = r + s * dx
    dweight = starts[0] + (g * norm).sum(axis=0)
    dbias = starts[1] + g.sum(axis=0)
    colsum = starts[2] + new.sum(axis=0)
    return new, dweight, dbias, colsum, (np.abs(g * norm).sum(axis=0), np.abs(g).sum(axis=0), np.abs(new).sum(axis=0))


def run_backward(emulator, tmp_path, N, C, is_layernorm, path, colsum, bf16_copy, seed, order="forward", bf16_dout=False,
                 bf16_stream=False, expect_refusal=False):
    rng = np.random.default_rng(seed)
    inp = (rng.standard_normal((N, C)) * 1.5 + 0.3).astype(np.float32)
    dout = rng.standard_normal((N, C)).astype(np.float32)
    if bf16_dout:   # the kernels read it as bf16: values it holds exactly, so the oracle is the same
        dout = to_bf16(dout)
    dres = (0.1 * rng.standard_normal((N, C))).astype(np.float32)
    if bf16_stream:   # the input and dres read as bf16, likewise
        inp, dres = to_bf16(inp), to_bf16(dres)
    weight = to_bf16(1.0 + 0.3 * rng.standard_normal(C))
    x64 = inp.astype(np.float64)
    mean = x64.mean(axis=1) if is_layernorm else np.zeros(N)
    rstd = 1.0 / np.sqrt(((x64 - mean[:, None]) ** 2).mean(axis=1) + EPS)
    mean, rstd = mean.astype(np.float32), rstd.astype(np.float32)
    starts = [rng.standard_normal(C).astype(np.float32) for _ in range(3)]
    inp_path, out_path = tmp_path / "bwd_in.bin", tmp_path / "bwd_out.bin"
    with open(inp_path, "wb") as f:
        np.array([1, N, C, is_layernorm, path + (3 if bf16_dout else 0), colsum, bf16_copy, bf16_stream], np.int32).tofile(f)
        for a in [dout, inp, dres, weight] + ([mean] if is_layernorm else []) + [rstd] + starts:
            a.astype(np.float32).tofile(f)
    proc = run_program([emulator, inp_path, out_path], order)
    if expect_refusal:
        return proc
    assert proc.returncode == 0, proc.stdout + proc.stderr
    raw = np.fromfile(out_path, np.float32)
    sizes = [("dres", N * C)] + ([("bf16", N * C)] if bf16_copy else []) + [("dweight", C)] + \
        ([("dbias", C)] if is_layernorm else []) + ([("colsum", C)] if colsum else [])
    assert raw.size == sum(n for _, n in sizes)
    got, at = {}, 0
    for name, n in sizes:
        got[name] = raw[at:at + n]
        at += n
    return got, (dout, inp, dres, weight, mean, rstd, starts)


def check_backward(got, inputs, N, C, is_layernorm, colsum, bf16_copy, drop_mean_term=False, bf16_stream=False):
    dout, inp, dres, weight, mean, rstd, starts = inputs
    new, dweight, dbias, col, scales = backward_oracle(dout, inp, dres, weight, mean, rstd, starts, is_layernorm,
                                                       drop_mean_term)
    new = new.reshape(-1)
    # fp32 arithmetic: a few roundings of each term; the sums over N rows within N roundings of
    # the sum of the terms' magnitudes
    if bf16_stream:
        # the updated gradient stored in bf16: within half a bf16 ulp (plus the fp32 arithmetic) of
        # the oracle, and the column sums are those of the stored, rounded values
        assert np.array_equal(to_bf16(got["dres"]), got["dres"]), "dres is not bf16"
        _, e = np.frexp(new)
        assert np.all(np.abs(got["dres"] - new) <= np.ldexp(1.0, e - 9) + 1e-5 * np.abs(new).max()), "dres"
        rounded = got["dres"].astype(np.float64).reshape(N, C)
        col = starts[2] + rounded.sum(axis=0)
        assert not np.array_equal(got["dres"], new.astype(np.float32)), "dres was not rounded"
    else:
        np.testing.assert_allclose(got["dres"], new, rtol=1e-5, atol=1e-5 * np.abs(new).max())
    if bf16_copy:
        _, e = np.frexp(got["dres"])
        assert np.all(np.abs(got["bf16"] - got["dres"]) <= np.ldexp(1.0, e - 9)), "bf16 copy is not dres rounded"
    eps = 4 * N * np.finfo(np.float32).eps
    assert np.all(np.abs(got["dweight"] - dweight) <= eps * scales[0] + 1e-6 * np.abs(starts[0])), "dweight"
    if is_layernorm:
        assert np.all(np.abs(got["dbias"] - dbias) <= eps * scales[1] + 1e-6 * np.abs(starts[1])), "dbias"
    if colsum:
        assert np.all(np.abs(got["colsum"] - col) <= eps * scales[2] + 1e-6 * np.abs(starts[2])), "colsum"


BACKWARD_CASES = [  # N, C, is_layernorm, colsum, bf16_copy
    (1, 768, 1, 1, 1),              # one row: a block with one busy warp
    (BWD_ROWS + 5, 576, 0, 0, 1),   # RMSNorm at SmolLM2's width, a partly filled second block
    (70, 33, 1, 1, 0),              # scalar access, no bf16 copy
    (19 * BWD_ROWS, 64, 1, 1, 1),   # more blocks than the column reduction's groups
    (300, 40, 1, 1, 1),             # the split path's chunks: more rows than one chunk
    (9, 6, 0, 1, 1),                # 2-wide vectors
    (5, 384, 1, 1, 1),              # 4-wide, three pieces a lane (the 4-piece instantiation)
    (3, VEC_WIDTH, 1, 1, 1),        # the fused kernel's widest row
]


@pytest.mark.parametrize("path", [FUSED, SPLIT, PICKED])
@pytest.mark.parametrize("case", BACKWARD_CASES)
@pytest.mark.parametrize("order", ORDERS)
def test_norm_backward_matches_oracle(emulator, tmp_path, case, path, order):
    N, C, is_layernorm, colsum, bf16_copy = case
    got, inputs = run_backward(emulator, tmp_path, N, C, is_layernorm, path, colsum, bf16_copy, seed=N * 7 + C, order=order)
    check_backward(got, inputs, N, C, is_layernorm, colsum, bf16_copy)


@pytest.mark.parametrize("path", [FUSED, SPLIT])
@pytest.mark.parametrize("case", BACKWARD_CASES)
def test_norm_backward_with_bf16_dout_matches_oracle(emulator, tmp_path, case, path):
    """The same backward reading the output's gradient as bf16 (what the model passes for the
    layers' norms), on bf16 values: the fp32 oracle's results."""
    N, C, is_layernorm, colsum, bf16_copy = case
    got, inputs = run_backward(emulator, tmp_path, N, C, is_layernorm, path, colsum, bf16_copy, seed=N * 5 + C,
                               order="reverse", bf16_dout=True)
    check_backward(got, inputs, N, C, is_layernorm, colsum, bf16_copy)


@pytest.mark.parametrize("path", [FUSED, SPLIT])
@pytest.mark.parametrize("bf16_dout", [False, True])
@pytest.mark.parametrize("case", BACKWARD_CASES)
def test_norm_backward_with_bf16_stream_matches_oracle(emulator, tmp_path, case, path, bf16_dout):
    """The stream in bf16 (the model's default): the input and dres read as bf16, the updated dres
    stored rounded to bf16 with no separate copy, its column sums those of the stored values."""
    N, C, is_layernorm, colsum, _ = case
    got, inputs = run_backward(emulator, tmp_path, N, C, is_layernorm, path, colsum, 0, seed=N * 3 + C, order="reverse",
                               bf16_dout=bf16_dout, bf16_stream=True)
    check_backward(got, inputs, N, C, is_layernorm, colsum, 0, bf16_stream=True)


def test_norm_backward_with_bf16_stream_refuses_a_bf16_copy(emulator, tmp_path):
    proc = run_backward(emulator, tmp_path, 4, 64, 1, PICKED, 1, 1, seed=2, bf16_stream=True, expect_refusal=True)
    assert proc.returncode != 0 and "needs no bf16 copy" in proc.stderr


def test_norm_backward_picks_the_split_path_for_wide_rows(emulator, tmp_path):
    """norm_backward takes the fused kernel up to VEC_WIDTH and the split kernels above it: the
    fused kernel refuses the wider row, and the dispatcher's result is the split path's bit for bit."""
    N, C = 5, VEC_WIDTH + 6
    got, inputs = run_backward(emulator, tmp_path, N, C, 1, PICKED, 1, 1, seed=5)
    check_backward(got, inputs, N, C, 1, 1, 1)
    split, _ = run_backward(emulator, tmp_path, N, C, 1, SPLIT, 1, 1, seed=5)
    for k in got:
        assert np.array_equal(got[k], split[k]), k
    inp_path = tmp_path / "bwd_in.bin"
    raw = np.fromfile(inp_path, np.int32)
    raw[4] = FUSED
    raw.tofile(inp_path)
    proc = run_program([emulator, inp_path, tmp_path / "o.bin"], "forward")
    assert proc.returncode != 0 and "C too large" in proc.stderr


def test_backward_oracle_without_the_mean_term_fails(emulator, tmp_path):
    N, C = 40, 96
    got, inputs = run_backward(emulator, tmp_path, N, C, 1, FUSED, 1, 1, seed=13)
    check_backward(got, inputs, N, C, 1, 1, 1)
    with pytest.raises(AssertionError):
        check_backward(got, inputs, N, C, 1, 1, 1, drop_mean_term=True)


@pytest.mark.parametrize("N,cols", [(1, 8), (300, 256 + 8), (513, 100), (7, 13)])
def test_bf16_column_sums_match_oracle(emulator, tmp_path, N, cols):
    """column_sums_add over bf16 rows, 8-wide (cols % 8 == 0) and scalar: out += the column sums."""
    rng = np.random.default_rng(N + cols)
    x = to_bf16(rng.standard_normal((N, cols)))
    start = rng.standard_normal(cols).astype(np.float32)
    inp_path, out_path = tmp_path / "cs_in.bin", tmp_path / "cs_out.bin"
    with open(inp_path, "wb") as f:
        np.array([2, N, cols], np.int32).tofile(f)
        x.astype(np.float32).tofile(f)
        start.tofile(f)
    for order in ORDERS:
        proc = run_program([emulator, inp_path, out_path], order)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        got = np.fromfile(out_path, np.float32)
        want = start.astype(np.float64) + x.astype(np.float64).sum(axis=0)
        bound = 4 * N * np.finfo(np.float32).eps * (np.abs(x).sum(axis=0) + np.abs(start))
        assert got.shape == (cols,) and np.all(np.abs(got - want) <= bound), np.abs(got - want).max()
