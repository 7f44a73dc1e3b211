"""The elementwise kernels of the GPU backend (llmc/swiglu.cuh, llmc/rope.cuh, llmc/gelu.cuh,
llmc/adamw.cuh) and the gradient norm's (llmc/global_norm.cuh) run
on the CPU through test/elementwise_emu.cpp (the GPU emulation of test/gpu_emu.h) against a NumPy
float64 oracle written from the definitions:
  SwiGLU  out = silu(gate) up,  dgate = dout up sig (1 + gate (1 - sig)),  dup = dout silu(gate)
  RoPE    rotate-half: (x[i], x[i + HS/2]) rotated by the angle t theta^(-2i/HS) (computed in
          float64 and rounded to float32, as rope_table_host does), by minus it in the backward;
          the v part untouched
  GELU    0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3), and its derivative times dout.
Each output is checked within one bf16 rounding (half an ulp) plus fp32 arithmetic on the terms
it is made of; output buffers start as NaN so an element no thread wrote fails.

The scalar kernels, the 8-wide ones (16-byte loads and stores) and the pick between them run, on
shapes that take the 8-wide path and shapes that need the fallback (F not a multiple of 8, head_dim
not a multiple of 16, n not a multiple of 8, buffers 2 bytes off 16), with the threads of each
block scheduled forward and in reverse and the blocks of each launch forward, in reverse and
shuffled (gpu_emu.ORDERS). The 8-wide kernels compute each element as the scalar ones
do, so their outputs are checked to be the same bit for bit; the pick is checked by the number of
threads its launch started. A mutation check confirms that a RoPE backward oracle rotating the
wrong way fails the comparison."""
import re

import numpy as np
import pytest

from conftest import ROOT
from gpu_emu import ORDERS, build_emulator, rewrite_launches, run_program, to_bf16

(SWIGLU_FORWARD, SWIGLU_BACKWARD, ROPE_FORWARD, ROPE_BACKWARD, GELU_FORWARD, GELU_BACKWARD, SWIGLU_ROWNORM,
 ROPE_FORWARD_KEYS, ADAMW, GLOBAL_NORM) = range(10)
SCALAR, VEC8, PICKED = 0, 1, 2
HEADERS = ("swiglu.cuh", "rope.cuh", "gelu.cuh", "adamw.cuh", "global_norm.cuh")
SLACK = 2.0 ** -22   # fp32 arithmetic (a few roundings), relative to the size of the terms an output is made of


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    source = "\n".join((ROOT / "llmc" / h).read_text() for h in HEADERS)
    return build_emulator(tmp_path_factory.mktemp("elementwise"), rewrite_launches(source, 10), "elementwise_emu")


def run_emulator(emulator, tmp_path, op, kernel, dims, arrays, misalign=0, order="forward", theta=None):
    """The output (float32) and the number of threads launched, or (None, stderr) on failure."""
    inp, outp = tmp_path / "in.bin", tmp_path / "out.bin"
    with open(inp, "wb") as f:
        np.array([op, kernel, misalign] + list(dims) + [0] * (5 - len(dims)), np.int32).tofile(f)
        if theta is not None:
            np.array([theta], np.float32).tofile(f)
        for a in arrays:
            np.asarray(a, np.float32).tofile(f)
    proc = run_program([emulator, inp, outp], order)
    if proc.returncode != 0:
        return None, proc.stdout + proc.stderr
    threads = int(re.search(r"^threads (\d+)$", proc.stdout, re.M).group(1))
    return np.fromfile(outp, np.float32), threads


def assert_close(got, ref, scale):
    """got within half a bf16 ulp of ref plus SLACK times scale (the terms' size), per element."""
    assert got.shape == ref.shape and not np.isnan(got).any(), "NaN: an element was not written"
    _, e = np.frexp(ref)
    bound = np.ldexp(1.0, e - 9) + SLACK * scale
    bad = np.abs(got - ref) > bound
    assert not bad.any(), (np.argwhere(bad)[:5], got[bad][:5], ref[bad][:5])


def bf16_normal(rng, shape, scale):
    return to_bf16(rng.standard_normal(shape) * scale)


# ---------------------------------------------------------------------------------------------
# SwiGLU

def swiglu_inputs(N, F, seed):
    rng = np.random.default_rng(seed)
    return bf16_normal(rng, (N, 2 * F), 2.0), bf16_normal(rng, (N, F), 1.0)


def swiglu_oracle(fc, dout):
    F = fc.shape[1] // 2
    gate, up, g = fc[:, :F].astype(np.float64), fc[:, F:].astype(np.float64), dout.astype(np.float64)
    sig = 1.0 / (1.0 + np.exp(-gate))
    out = gate * sig * up
    dgate = g * up * sig * (1.0 + gate * (1.0 - sig))
    dup = g * gate * sig
    dgate_scale = np.abs(g * up * sig) * (1.0 + np.abs(gate))
    return out, np.concatenate([dgate, dup], axis=1), np.concatenate([dgate_scale, np.abs(dup)], axis=1)


def run_swiglu(emulator, tmp_path, fc, dout, kernel, backward, misalign=0, order="forward"):
    N, F = dout.shape
    if backward:
        return run_emulator(emulator, tmp_path, SWIGLU_BACKWARD, kernel, (N, F), (fc, dout), misalign, order)
    return run_emulator(emulator, tmp_path, SWIGLU_FORWARD, kernel, (N, F), (fc,), misalign, order)


SWIGLU_SHAPES = [(3, 24), (37, 64), (2, 1536), (5, 20), (4, 7)]   # the last two only for the scalar kernel


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("shape,kernel", [(s, k) for s in SWIGLU_SHAPES for k in (SCALAR, VEC8, PICKED)
                                          if k != VEC8 or s[1] % 8 == 0])
def test_swiglu_matches_oracle(emulator, tmp_path, shape, kernel, order):
    N, F = shape
    fc, dout = swiglu_inputs(N, F, seed=N * 100 + F)
    out_ref, dfc_ref, dfc_scale = swiglu_oracle(fc, dout)
    out, _ = run_swiglu(emulator, tmp_path, fc, dout, kernel, False, order=order)
    assert out is not None
    assert_close(out.reshape(N, F), out_ref, np.abs(out_ref))
    dfc, _ = run_swiglu(emulator, tmp_path, fc, dout, kernel, True, order=order)
    assert dfc is not None
    assert_close(dfc.reshape(N, 2 * F), dfc_ref, dfc_scale)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("N,F,C", [(1, 1536, 576), (5, 24, 300), (3, 7, 33)])
def test_swiglu_with_the_rows_norm_matches_oracle(emulator, tmp_path, N, F, C, order):
    """swiglu_forward_rownorm (the rollout engine's folded decode step): gate and up of row n
    scaled by its RMSNorm factor 1 / sqrt(mean(x_n^2) + 1e-5) before SwiGLU, rows of x of very
    different sizes; the unscaled SwiGLU fails the comparison."""
    rng = np.random.default_rng(N * 7 + F)
    fc = bf16_normal(rng, (N, 2 * F), 2.0)
    x = to_bf16(rng.standard_normal((N, C)) * (4.0 ** np.arange(N))[:, None] * 0.3)
    got, _ = run_emulator(emulator, tmp_path, SWIGLU_ROWNORM, 0, (N, F, C), (fc, x), order=order)
    assert got is not None, _
    rstd = 1.0 / np.sqrt((x.astype(np.float64) ** 2).mean(axis=1) + 1e-5)
    scaled = fc.astype(np.float64) * rstd[:, None]
    gate, up = scaled[:, :F], scaled[:, F:]
    ref = gate / (1.0 + np.exp(-gate)) * up
    assert_close(got.reshape(N, F), ref, 4 * np.abs(ref) + 1e-30)
    plain = swiglu_oracle(fc, np.zeros((N, F), np.float32))[0]
    assert not np.allclose(got.reshape(N, F), plain, rtol=1e-2)


# ---------------------------------------------------------------------------------------------
# RoPE

def rope_inputs(B, T, NH, NKV, HS, seed):
    rng = np.random.default_rng(seed)
    return bf16_normal(rng, (B, T, (NH + 2 * NKV) * HS), 1.0)


def rope_oracle(qkv, NH, NKV, HS, theta, backward, wrong_direction=False):
    """qkv after the rotation, and the size of the terms of each element."""
    B, T, _ = qkv.shape
    half = HS // 2
    inv_freq = np.float64(np.float32(theta)) ** (-2.0 * np.arange(half) / HS)
    angle = np.arange(T, dtype=np.float64)[:, None] * inv_freq[None, :]          # (T, half)
    c = np.cos(angle).astype(np.float32).astype(np.float64)[None, :, None, :]    # the float32 table
    s = np.sin(angle).astype(np.float32).astype(np.float64)[None, :, None, :]
    if backward != wrong_direction:
        s = -s
    out = qkv.astype(np.float64)
    scale = np.abs(out).copy()
    heads = out[:, :, :(NH + NKV) * HS].reshape(B, T, NH + NKV, HS)
    x1, x2 = heads[..., :half].copy(), heads[..., half:].copy()
    rotated = np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)
    terms = np.abs(np.concatenate([x1 * c, x2 * c], axis=-1)) + np.abs(np.concatenate([x2 * s, x1 * s], axis=-1))
    out[:, :, :(NH + NKV) * HS] = rotated.reshape(B, T, -1)
    scale[:, :, :(NH + NKV) * HS] = terms.reshape(B, T, -1)
    return out, scale


def run_rope(emulator, tmp_path, qkv, dims, theta, kernel, backward, misalign=0, order="forward", keys_only=False):
    op = ROPE_FORWARD_KEYS if keys_only else ROPE_BACKWARD if backward else ROPE_FORWARD
    return run_emulator(emulator, tmp_path, op, kernel, dims, (qkv,), misalign, order, theta=theta)


ROPE_SHAPES = [  # B, T, NH, NKV, HS, theta
    (2, 5, 4, 2, 16, 10000.0),      # the smallest head the 8-wide kernel takes
    (1, 9, 3, 1, 64, 100000.0),     # SmolLM2's head_dim
    (1, 3, 2, 2, 128, 500000.0),    # Llama's head_dim
    (1, 700, 1, 1, 32, 10000.0),    # positions far from 0
    (2, 7, 3, 1, 6, 10000.0),       # scalar only: HS/2 odd
    (1, 4, 2, 1, 20, 10000.0),      # scalar only: HS/2 even, not a multiple of 8
]


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("backward", [False, True])
@pytest.mark.parametrize("shape,kernel", [(s, k) for s in ROPE_SHAPES for k in (SCALAR, VEC8, PICKED)
                                          if k != VEC8 or s[4] % 16 == 0])
def test_rope_matches_oracle(emulator, tmp_path, shape, kernel, backward, order):
    B, T, NH, NKV, HS, theta = shape
    qkv = rope_inputs(B, T, NH, NKV, HS, seed=T * 1000 + HS)
    got, _ = run_rope(emulator, tmp_path, qkv, (B, T, NH, NKV, HS), theta, kernel, backward, order=order)
    assert got is not None
    got = got.reshape(qkv.shape)
    ref, scale = rope_oracle(qkv, NH, NKV, HS, theta, backward)
    assert_close(got, ref, scale)
    assert np.array_equal(got[:, :, (NH + NKV) * HS:], qkv[:, :, (NH + NKV) * HS:])   # v untouched


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("shape,kernel", [(s, k) for s in ROPE_SHAPES for k in (SCALAR, VEC8, PICKED)
                                          if k != VEC8 or s[4] % 16 == 0])
def test_rope_forward_on_the_keys_alone(emulator, tmp_path, shape, kernel, order):
    """rope_forward_keys (the model's forward when its flash attention rotates the queries):
    the k heads rotated as the oracle's forward rotates them and bit for bit as rope_forward
    leaves them, the q and v heads untouched."""
    B, T, NH, NKV, HS, theta = shape
    qkv = rope_inputs(B, T, NH, NKV, HS, seed=T * 1000 + HS + 1)
    got, _ = run_rope(emulator, tmp_path, qkv, (B, T, NH, NKV, HS), theta, kernel, False, order=order, keys_only=True)
    assert got is not None, _
    got = got.reshape(qkv.shape)
    ref, scale = rope_oracle(qkv, NH, NKV, HS, theta, False)
    k = slice(NH * HS, (NH + NKV) * HS)
    assert_close(got[:, :, k], ref[:, :, k], scale[:, :, k])
    assert np.array_equal(got[:, :, :NH * HS], qkv[:, :, :NH * HS])                 # q untouched
    assert np.array_equal(got[:, :, (NH + NKV) * HS:], qkv[:, :, (NH + NKV) * HS:])   # v untouched
    both, _ = run_rope(emulator, tmp_path, qkv, (B, T, NH, NKV, HS), theta, kernel, False, order=order)
    assert np.array_equal(got[:, :, k].view(np.uint32), both.reshape(qkv.shape)[:, :, k].view(np.uint32))


def test_rope_oracle_rotating_the_wrong_way_fails(emulator, tmp_path):
    B, T, NH, NKV, HS, theta = 2, 5, 4, 2, 16, 10000.0
    qkv = rope_inputs(B, T, NH, NKV, HS, seed=1)
    got, _ = run_rope(emulator, tmp_path, qkv, (B, T, NH, NKV, HS), theta, VEC8, True)
    ref, scale = rope_oracle(qkv, NH, NKV, HS, theta, True)
    assert_close(got.reshape(qkv.shape), ref, scale)
    wrong, scale = rope_oracle(qkv, NH, NKV, HS, theta, True, wrong_direction=True)
    with pytest.raises(AssertionError):
        assert_close(got.reshape(qkv.shape), wrong, scale)


# ---------------------------------------------------------------------------------------------
# GELU

GELU_K, GELU_A = np.sqrt(2.0 / np.pi), 0.044715


def gelu_inputs(n, seed):
    rng = np.random.default_rng(seed)
    x, dout = bf16_normal(rng, n, 3.0), bf16_normal(rng, n, 1.0)
    x[0], x[-1] = 20.0, -20.0   # tanh saturated
    return x, dout


def gelu_oracle(x, dout):
    """out, dinp and the size of their terms."""
    x, g = x.astype(np.float64), dout.astype(np.float64)
    u = GELU_K * (x + GELU_A * x ** 3)
    th = np.tanh(u)
    out = 0.5 * x * (1.0 + th)
    slope = 0.5 * x * GELU_K * (1.0 + 3.0 * GELU_A * x ** 2)
    dinp = (0.5 * (1.0 + th) + slope * (1.0 - th * th)) * g
    amplify = 1.0 + np.abs(u) * (1.0 - th * th)   # how an error in u carries into tanh(u)
    return out, dinp, np.abs(x) * amplify, np.abs(g) * (1.0 + np.abs(slope) * amplify)


def run_gelu(emulator, tmp_path, x, dout, kernel, backward, in_place=0, misalign=0, order="forward"):
    if backward:
        return run_emulator(emulator, tmp_path, GELU_BACKWARD, kernel, (len(x), in_place), (x, dout), misalign, order)
    return run_emulator(emulator, tmp_path, GELU_FORWARD, kernel, (len(x),), (x,), misalign, order)


GELU_SIZES = [8, 1000, 3 * 256 * 8 + 16, 1003, 1]   # the last two only for the scalar kernel


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("n,kernel", [(n, k) for n in GELU_SIZES for k in (SCALAR, VEC8, PICKED) if k != VEC8 or n % 8 == 0])
def test_gelu_matches_oracle(emulator, tmp_path, n, kernel, order):
    x, dout = gelu_inputs(n, seed=n)
    out_ref, dinp_ref, out_scale, dinp_scale = gelu_oracle(x, dout)
    out, _ = run_gelu(emulator, tmp_path, x, dout, kernel, False, order=order)
    assert out is not None
    assert_close(out, out_ref, out_scale)
    dinp, _ = run_gelu(emulator, tmp_path, x, dout, kernel, True, order=order)
    assert dinp is not None
    assert_close(dinp, dinp_ref, dinp_scale)
    in_place, _ = run_gelu(emulator, tmp_path, x, dout, kernel, True, in_place=1, order=order)
    assert np.array_equal(in_place, dinp)   # dinp aliasing dout, as the model calls it


# ---------------------------------------------------------------------------------------------
# the 8-wide kernels against the scalar ones, and the pick

def cases(op):
    """(run, the 8-wide shape, a shape the 8-wide kernel does not take) per op, each run(kernel,
    shape, misalign) -> (output, threads)."""
    def swiglu(backward):
        def run(emulator, tmp_path, kernel, shape, misalign=0):
            fc, dout = swiglu_inputs(*shape, seed=3)
            return run_swiglu(emulator, tmp_path, fc, dout, kernel, backward, misalign)
        return run, (64, 64), (64, 60)

    def rope(backward):
        def run(emulator, tmp_path, kernel, shape, misalign=0):
            return run_rope(emulator, tmp_path, rope_inputs(*shape, seed=3), shape, 10000.0, kernel, backward, misalign)
        return run, (2, 16, 3, 1, 64), (2, 16, 3, 1, 62)

    def gelu(backward):
        def run(emulator, tmp_path, kernel, shape, misalign=0):
            x, dout = gelu_inputs(shape[0], seed=3)
            return run_gelu(emulator, tmp_path, x, dout, kernel, backward, misalign=misalign)
        return run, (8192,), (8190,)
    return {SWIGLU_FORWARD: swiglu(False), SWIGLU_BACKWARD: swiglu(True), ROPE_FORWARD: rope(False),
            ROPE_BACKWARD: rope(True), GELU_FORWARD: gelu(False), GELU_BACKWARD: gelu(True)}[op]


OPS = [SWIGLU_FORWARD, SWIGLU_BACKWARD, ROPE_FORWARD, ROPE_BACKWARD, GELU_FORWARD, GELU_BACKWARD]


@pytest.mark.parametrize("op", OPS)
def test_8_wide_kernel_equals_scalar_bit_for_bit(emulator, tmp_path, op):
    run, aligned, _ = cases(op)
    scalar, _ = run(emulator, tmp_path, SCALAR, aligned)
    vec8, _ = run(emulator, tmp_path, VEC8, aligned)
    assert scalar is not None and vec8 is not None
    assert np.array_equal(scalar.view(np.uint32), vec8.view(np.uint32))


@pytest.mark.parametrize("op", OPS)
def test_pick_takes_the_8_wide_kernel_only_where_it_applies(emulator, tmp_path, op):
    """The pick launches as many threads as the 8-wide kernel for the 8-wide shape on aligned
    buffers, else as many as the scalar kernel (8 times more at these shapes), with the scalar
    kernel's result."""
    run, aligned, other = cases(op)
    threads = {k: run(emulator, tmp_path, k, aligned)[1] for k in (SCALAR, VEC8)}
    assert threads[SCALAR] >= 4 * threads[VEC8]
    assert run(emulator, tmp_path, PICKED, aligned)[1] == threads[VEC8]
    for shape, misalign in ((other, 0), (aligned, 1)):
        picked, picked_threads = run(emulator, tmp_path, PICKED, shape, misalign)
        scalar, scalar_threads = run(emulator, tmp_path, SCALAR, shape, misalign)
        assert picked is not None and picked_threads == scalar_threads
        assert np.array_equal(picked.view(np.uint32), scalar.view(np.uint32))


@pytest.mark.parametrize("op", OPS)
def test_8_wide_kernel_refuses_what_it_cannot_take(emulator, tmp_path, op):
    run, aligned, other = cases(op)
    for shape, misalign in ((other, 0), (aligned, 1)):
        out, err = run(emulator, tmp_path, VEC8, shape, misalign)
        assert out is None and "16 bytes" in err, err


# ---------------------------------------------------------------------------------------------
# AdamW

ADAMW_HYPER = (1e-3, 0.9, 0.95, 0.1, 0.0975, 1e-8, 1.0 - 1e-3 * 0.1, 0.5)   # lr, b1, b2, bc1, bc2, eps, decay, scale


def adamw_inputs(n, seed):
    rng = np.random.default_rng(seed)
    p = rng.standard_normal(n).astype(np.float32)
    g = (rng.standard_normal(n) * 0.1).astype(np.float32)
    m = (rng.standard_normal(n) * 0.01).astype(np.float32)
    v = (m.astype(np.float64) ** 2 + rng.random(n) * 1e-4).astype(np.float32)
    return p, g, m, v


def run_adamw(emulator, tmp_path, n, kernel, misalign=0, order="forward", seed=5):
    p, g, m, v = adamw_inputs(n, seed)
    out, threads = run_emulator(emulator, tmp_path, ADAMW, kernel, (n,), (np.array(ADAMW_HYPER, np.float32), p, g, m, v),
                                misalign, order)
    return (out if out is None else out.reshape(4, n)), threads


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("n,kernel", [(n, k) for n in (1, 3, 8, 1001, 4096) for k in (SCALAR, VEC8, PICKED)])
def test_adamw_matches_oracle(emulator, tmp_path, n, kernel, order):
    """One AdamW step (the model's update, PyTorch semantics) against float64: parameters and
    moments within a few fp32 roundings, the bf16 copy the parameter rounded once; the 4-wide
    kernel (VEC8's slot) with the scalar one on the last n % 4 elements."""
    got, _ = run_adamw(emulator, tmp_path, n, kernel, order=order)
    assert got is not None, _
    lr, b1, b2, bc1, bc2, eps, decay, scale = (np.float64(np.float32(x)) for x in ADAMW_HYPER)
    p, g, m, v = (x.astype(np.float64) for x in adamw_inputs(n, 5))
    g = g * scale
    m_terms = np.abs(b1 * m) + np.abs((1 - b1) * g)   # the sizes of the sums' terms, for the roundings
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    step = lr * (m / bc1) / (np.sqrt(v / bc2) + eps)
    p_terms = np.abs(p * decay) + np.abs(step)
    p = p * decay - step
    assert np.all(np.abs(got[1] - m) <= 2.0 ** -22 * m_terms)
    assert np.all(np.abs(got[2] - v) <= 2.0 ** -21 * v)
    assert np.all(np.abs(got[0] - p) <= 2.0 ** -23 * p_terms + 2.0 ** -20 * np.abs(step))
    assert np.array_equal(got[3], to_bf16(got[0]))


@pytest.mark.parametrize("n", [3, 1001, 4096 + 2])
def test_adamw_4_wide_equals_scalar_bit_for_bit(emulator, tmp_path, n):
    scalar, scalar_threads = run_adamw(emulator, tmp_path, n, SCALAR)
    vec4, vec4_threads = run_adamw(emulator, tmp_path, n, VEC8)
    picked, picked_threads = run_adamw(emulator, tmp_path, n, PICKED)
    assert np.array_equal(scalar.view(np.uint32), vec4.view(np.uint32))
    assert np.array_equal(scalar.view(np.uint32), picked.view(np.uint32))
    assert picked_threads == vec4_threads
    if n > 4:
        assert scalar_threads >= 2 * vec4_threads


def test_adamw_pick_and_4_wide_on_unaligned_arrays(emulator, tmp_path):
    """fp32 arrays 4 bytes past a 16-byte boundary: the 4-wide kernel refuses them by name, the
    pick takes the scalar kernel with its result."""
    out, err = run_adamw(emulator, tmp_path, 1001, VEC8, misalign=1)
    assert out is None and "16 bytes" in err, err
    picked, picked_threads = run_adamw(emulator, tmp_path, 1001, PICKED, misalign=1)
    scalar, scalar_threads = run_adamw(emulator, tmp_path, 1001, SCALAR, misalign=1)
    assert picked_threads == scalar_threads
    assert np.array_equal(picked.view(np.uint32), scalar.view(np.uint32))


# ---------------------------------------------------------------------------------------------
# gradient norm

def run_global_norm(emulator, tmp_path, x, pieces, first, misalign=0, order="forward"):
    ranges = np.array(pieces, np.float32).reshape(-1)
    out, threads = run_emulator(emulator, tmp_path, GLOBAL_NORM, SCALAR, (x.size, len(pieces), first), (ranges, x),
                                misalign, order)
    return out, threads


# (offset, length) pieces of a buffer of 5000: 16-byte aligned multiples of 4 (the 4-wide loads),
# odd lengths and offsets (the scalar loop), one element, an empty piece, pieces that overlap or
# leave gaps; `first` of them into the first slot of partials
NORM_CASES = [
    ([(0, 4096)], 1),
    ([(0, 1000), (1000, 1000), (2000, 3000)], 1),
    ([(3, 997), (1001, 1), (1100, 0), (1200, 2001), (4800, 200)], 2),
    ([(4 * i, 4 * i + 1) for i in range(16)], 16),
    ([(17, 4983)], 0),
]


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("misalign", [0, 1])
@pytest.mark.parametrize("case", range(len(NORM_CASES)))
def test_global_norm_pieces_match_oracle(emulator, tmp_path, case, misalign, order):
    """The norm of pieces of a gradient buffer (global_norm_pieces into two slots of partials, as
    the model sums its layers', added by global_norm_finish) against float64 over the same
    elements; a second run gives the same bits; the whole buffer's global_norm against float64."""
    pieces, first = NORM_CASES[case]
    rng = np.random.default_rng(11 + case)
    x = (rng.standard_normal(5000) * np.exp(rng.uniform(-4, 2, 5000))).astype(np.float32)
    out, threads = run_global_norm(emulator, tmp_path, x, pieces, first, misalign, order)
    assert out is not None, threads
    x64 = x.astype(np.float64)
    ref = np.sqrt(sum(np.sum(x64[lo:lo + n] ** 2) for lo, n in pieces))
    assert abs(out[0] - ref) <= 1e-6 * ref, (out[0], ref)
    assert out[0].view(np.uint32) == out[1].view(np.uint32)
    whole = np.sqrt(np.sum(x64 ** 2))
    assert abs(out[2] - whole) <= 1e-6 * whole, (out[2], whole)


def test_global_norm_pieces_oracle_notices_a_missing_element(emulator, tmp_path):
    """The comparison above fails when the oracle sums one element more than the pieces hold (one
    element of the 5000, of ordinary size), so an element the kernel skipped would fail it."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal(5000).astype(np.float32)
    pieces = [(3, 997), (1200, 2001)]
    out, threads = run_global_norm(emulator, tmp_path, x, pieces, 1)
    assert out is not None, threads
    x64 = x.astype(np.float64)
    one_more = np.sqrt(np.sum(x64[3:1001] ** 2) + np.sum(x64[1200:3201] ** 2))
    assert abs(out[0] - one_more) > 1e-6 * one_more
