"""The tensor-core flash-attention kernels (llmc/attention_flash.cuh) run on the CPU through
test/attention_flash_emu.cpp, which emulates ldmatrix, mma.sync, cp.async and the barriers from
the PTX definitions, against a float64 JAX oracle: the forward output and log-sum-exp, and the
gradients of sum(out * dout) with respect to q, k and v by automatic differentiation.

Shapes cover grouped-query and multi-head attention, head sizes 64 and 128, T of 1, T below,
across and not a multiple of the 64-row tiles, and sharp softmaxes (inputs scaled by 4) that
exercise the online rescaling; each runs with the asynchronous copies landing late (at the wait)
and early (when issued), which exposes a missing wait or a prefetch overwriting a stage in use,
and with each launch's blocks in index order, in reverse and shuffled (EMU_BLOCKS), which exposes
a block that counts on another having run.
The forward and the dQ pass also run with two 16-row tiles per warp (128 query rows a block, head
size 64), and that dQ must equal the one-tile dQ bit for bit. The warpgroup (wgmma) kernels must
equal the mma.sync kernels bit for bit, the pipelined forward (a key tile's softmax beside the
previous tile's P V, one or two warpgroups a block) too; their products are executed at the wait
for them (as late as the hardware may run them), so an accumulator read early, or an operand
changed before the wait, shows."""
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from gpu_emu import ORDERS, block_order_env, to_bf16

sys.path.insert(0, str(ROOT / "test" / "oracle"))
import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402
from model_jax import causal_attention  # noqa: E402


def build_emulator(directory, include_first=None):
    """test/attention_flash_emu.cpp built into directory; include_first: a directory searched for
    the kernels' headers before llmc/ (a changed copy of attention_flash.cuh)"""
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("g++ not found: the emulator is C++")
    exe = directory / "attention_flash_emu"
    first = ["-I", str(include_first)] if include_first else []
    subprocess.run([cxx, "-std=c++17", "-O2", "-U_FORTIFY_SOURCE", "-fno-strict-aliasing", "-Wall", "-Wno-unknown-pragmas",
                    *first, "-I", str(ROOT / "llmc"), "-o", str(exe), str(ROOT / "test" / "attention_flash_emu.cpp")],
                   check=True)
    return exe


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    return build_emulator(tmp_path_factory.mktemp("flash"))


def oracle(qkv, dout, NH, NKV, HS):
    """float64 out (B, T, NH*HS), lse (B, NH, T) and dqkv (B, T, QKV) of causal attention."""
    B, T, _ = qkv.shape
    x = jnp.asarray(qkv, jnp.float64)

    def attention(x):
        q = x[..., : NH * HS].reshape(B, T, NH, HS).transpose(0, 2, 1, 3)
        k = x[..., NH * HS:(NH + NKV) * HS].reshape(B, T, NKV, HS).transpose(0, 2, 1, 3)
        v = x[..., (NH + NKV) * HS:].reshape(B, T, NKV, HS).transpose(0, 2, 1, 3)
        return causal_attention(q, k, v)

    out, vjp = jax.vjp(attention, x)
    (dqkv,) = vjp(jnp.asarray(dout, jnp.float64))
    q = x[..., : NH * HS].reshape(B, T, NH, HS).transpose(0, 2, 1, 3)
    k = jnp.repeat(x[..., NH * HS:(NH + NKV) * HS].reshape(B, T, NKV, HS).transpose(0, 2, 1, 3), NH // NKV, axis=1)
    scores = jnp.einsum("bhtd,bhsd->bhts", q, k) / math.sqrt(HS)
    scores = jnp.where(jnp.tril(jnp.ones((T, T), dtype=bool)), scores, -jnp.inf)
    lse = jax.scipy.special.logsumexp(scores, axis=-1)
    return np.asarray(out), np.asarray(lse), np.asarray(dqkv)


def rel_err(got, ref):
    return float(np.linalg.norm(got.astype(np.float64) - ref) / np.linalg.norm(ref))


SHAPES = [  # B, T, NH, NKV, HS, input scale, row tiles per warp of the forward and of the dQ pass
    (1, 1, 1, 1, 64, 1.0, 1, 1),
    (2, 37, 2, 2, 64, 1.0, 1, 1),
    (1, 130, 4, 2, 64, 1.0, 1, 1),
    (1, 200, 3, 1, 64, 4.0, 1, 1),
    (2, 45, 2, 1, 128, 1.0, 1, 1),
    (1, 150, 2, 2, 128, 4.0, 1, 1),
    (1, 1, 1, 1, 64, 1.0, 2, 1),
    (2, 37, 2, 2, 64, 1.0, 2, 1),     # one block of 128 rows, partly past T
    (1, 200, 3, 1, 64, 4.0, 2, 1),    # two blocks; the first row tile skips its last key tile
    (1, 256, 2, 2, 64, 1.0, 2, 1),    # whole blocks
    (1, 1, 1, 1, 64, 1.0, 1, 2),      # dQ with two row tiles: the second wholly past T
    (2, 37, 2, 2, 64, 1.0, 1, 2),     # one block of 128 rows, partly past T
    (1, 200, 3, 1, 64, 4.0, 1, 2),    # two blocks; the first row tile skips its last key tile
    (1, 300, 4, 2, 64, 1.0, 1, 2),    # three blocks, the last one's second row tile past T
    (2, 256, 2, 2, 64, 1.0, 2, 2),    # whole blocks, both passes with two row tiles
]


def run_emulator(emulator, tmp_path, shape, copies, lpt=0, forward_rw=None, qreg=0, kvreg=0, wg=0, eager=0, rope=0,
                 blocks="forward"):
    """qkv, dout, out, lse, dqkv: run_emulator_full's first five"""
    return run_emulator_full(emulator, tmp_path, shape, copies, lpt, forward_rw, qreg, kvreg, wg, eager, rope,
                             blocks=blocks)[:5]


def run_emulator_full(emulator, tmp_path, shape, copies, lpt=0, forward_rw=None, qreg=0, kvreg=0, wg=0, eager=0, rope=0,
                      rope_fwd=0, blocks="forward"):
    """inputs qkv, dout and the emulated out, lse, dqkv for one shape; the inputs do not depend on
    the dQ pass's row tiles, the grid order (lpt 1: heads, batch, tiles; 0: tiles, heads, batch) or
    forward_rw, which runs the forward with other row tiles than the shape's, or qreg / kvreg (the
    dQ pass's Q and dO, the dK/dV pass's K and V fragments held in registers), or wg (bits 0, 1, 2:
    the forward, the dQ pass, the dK/dV pass with warpgroup products; bits 3, 4: the dQ and dK/dV
    passes with warpgroup products reading every operand from shared memory; bits 5, 6: the
    pipelined warpgroup forward, bits 7, 8: the pipelined warpgroup dQ pass, bits 9, 10: the
    pipelined warpgroup dK/dV pass, each with one or two warpgroups a block; bits 11, 12: the
    pipelined forward and dQ pass with warpgroups on the query heads of a kv head), or eager (1: the
    forward's softmax reference is the running max itself, rescaled at every move), or rope (1: dQ
    and dK taken back through RoPE in the backward's epilogue, 2: by rope_backward's arithmetic on
    the host after the backward), or rope_fwd (1: the k heads rotated by rope_forward's arithmetic
    on the host, the q heads by the forward as it loads them, stored back into qkv; 2: both by
    rope_forward's arithmetic on the host before the forward); blocks: the order of each launch's
    blocks (forward, reverse or shuffle: EMU_BLOCKS); the sixth value is qkv as the forward left it"""
    B, T, NH, NKV, HS, scale, RW, DQ_RW = shape
    QKV = (NH + 2 * NKV) * HS
    rng = np.random.default_rng(hash(shape[:7]) % 2**32)
    qkv = to_bf16(rng.standard_normal((B, T, QKV)) * scale)
    dout = to_bf16(rng.standard_normal((B, T, NH * HS)))
    inp, outp = tmp_path / "in.bin", tmp_path / "out.bin"
    with open(inp, "wb") as f:
        np.array([B, T, NH, NKV, HS, RW if forward_rw is None else forward_rw, DQ_RW, lpt, qreg, kvreg, wg, eager, rope,
                  rope_fwd], np.int32).tofile(f)
        qkv.tofile(f)
        dout.tofile(f)
    proc = subprocess.run([str(emulator), str(inp), str(outp), copies], capture_output=True, text=True, timeout=600,
                          env=block_order_env(blocks))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = np.fromfile(outp, np.float32)
    n_out, n_stat = B * T * NH * HS, B * NH * T
    assert got.size == n_out + n_stat + 2 * B * T * QKV
    assert np.isfinite(got).all(), "unwritten (NaN-poisoned) or non-finite outputs"
    out = got[:n_out].reshape(B, T, NH * HS)
    lse = got[n_out:n_out + n_stat].reshape(B, NH, T)
    dqkv = got[n_out + n_stat:n_out + n_stat + B * T * QKV].reshape(B, T, QKV)
    qkv_after = got[n_out + n_stat + B * T * QKV:].reshape(B, T, QKV)
    return qkv, dout, out, lse, dqkv, qkv_after


@pytest.mark.parametrize("blocks", ORDERS)
@pytest.mark.parametrize("copies", ["late", "early"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B%d_T%d_NH%d_NKV%d_HS%d_x%g_rw%d_dq%d" % s)
def test_flash_attention_emulated(emulator, tmp_path, shape, copies, blocks):
    B, T, NH, NKV, HS, scale, RW, DQ_RW = shape
    QKV = (NH + 2 * NKV) * HS
    qkv, dout, out, lse, dqkv = run_emulator(emulator, tmp_path, shape, copies, blocks=blocks)

    ref_out, ref_lse, ref_dqkv = oracle(qkv, dout, NH, NKV, HS)
    # bf16 outputs: relative L2 error of a few 2^-9 roundings; lse is fp32 from fp32 sums
    assert rel_err(out, ref_out) < 5e-3
    assert np.abs(lse - ref_lse).max() < 1e-4 * max(1.0, np.abs(ref_lse).max())
    parts = {"dq": (0, NH * HS), "dk": (NH * HS, (NH + NKV) * HS), "dv": ((NH + NKV) * HS, QKV)}
    for name, (c0, c1) in parts.items():
        got_part, ref_part = dqkv[..., c0:c1], ref_dqkv[..., c0:c1]
        if np.abs(ref_part).max() < 1e-12:
            # T = 1: one key per row, so dq = 0 exactly; left is D's rounding (out stored in bf16)
            assert np.abs(got_part).max() < 2e-2, f"{name}: max abs {np.abs(got_part).max():.3e} where 0 is exact"
            continue
        err = rel_err(got_part, ref_part)
        assert err < 1.5e-2, f"{name}: relative error {err:.3e}"


@pytest.mark.parametrize("shape", [(2, 37, 2, 2, 64, 1.0), (1, 300, 4, 2, 64, 4.0)],
                         ids=lambda s: "B%d_T%d_NH%d_NKV%d_HS%d_x%g" % s)
def test_flash_dq_row_tiles_identical(emulator, tmp_path, shape):
    """Each dQ row sums the same products in the same order whether its warp holds one row tile
    or two, so the two launches must agree bit for bit (the GPU harness asserts the same)."""
    NH, HS = shape[2], shape[4]
    dq = [run_emulator(emulator, tmp_path, shape + (1, dq_rw), "late")[4][..., : NH * HS] for dq_rw in (1, 2)]
    differ = int(np.count_nonzero(dq[0].view(np.uint32) != dq[1].view(np.uint32)))
    assert differ == 0, f"{differ} of {dq[0].size} dq elements differ between one and two row tiles"


@pytest.mark.parametrize("shape", [(2, 37, 2, 2, 64, 1.0, 1, 1), (1, 200, 3, 1, 64, 4.0, 2, 2), (2, 45, 2, 1, 128, 1.0, 1, 1)],
                         ids=lambda s: "B%d_T%d_NH%d_NKV%d_HS%d_x%g_rw%d_dq%d" % s)
def test_flash_grid_orders_identical(emulator, tmp_path, shape):
    """The grouped and the lpt grid give every block the same (head, batch, tile) work, so out,
    lse and dqkv must agree bit for bit (the tuner only picks among such configurations)."""
    runs = [run_emulator(emulator, tmp_path, shape, "late", lpt)[2:] for lpt in (0, 1)]
    for name, a, b in zip(("out", "lse", "dqkv"), runs[0], runs[1]):
        differ = int(np.count_nonzero(a.view(np.uint32) != b.view(np.uint32)))
        assert differ == 0, f"{name}: {differ} of {a.size} elements differ between the grid orders"


@pytest.mark.parametrize("shape", [(2, 37, 2, 2, 64, 1.0), (1, 200, 3, 1, 64, 4.0)],
                         ids=lambda s: "B%d_T%d_NH%d_NKV%d_HS%d_x%g" % s)
def test_flash_forward_row_tiles_identical(emulator, tmp_path, shape):
    """A query row's tiles are added in the same order with one row tile a warp or two, so the
    forward's out and lse agree bit for bit (the GPU tuner checks the same before using two)."""
    runs = [run_emulator(emulator, tmp_path, shape + (1, 1), "late", forward_rw=rw)[2:4] for rw in (1, 2)]
    for name, a, b in zip(("out", "lse"), runs[0], runs[1]):
        differ = int(np.count_nonzero(a.view(np.uint32) != b.view(np.uint32)))
        assert differ == 0, f"{name}: {differ} of {a.size} elements differ between one and two row tiles"


@pytest.mark.parametrize("shape", [(1, 200, 3, 1, 64, 4.0, 1, 1), (1, 150, 2, 2, 128, 4.0, 1, 1), (2, 256, 2, 2, 64, 4.0, 2, 1)],
                         ids=lambda s: "B%d_T%d_NH%d_NKV%d_HS%d_x%g_rw%d_dq%d" % s)
def test_flash_forward_eager_rescale(emulator, tmp_path, shape):
    """The forward with its softmax reference the running max itself (flash_forward_max_slack 0,
    rescaled at every move, what bench_train times the default against): the oracle's output and
    lse too, on sharp softmaxes where the max moves often."""
    B, T, NH, NKV, HS, scale, RW, DQ_RW = shape
    qkv, dout, out, lse, _ = run_emulator(emulator, tmp_path, shape, "late", eager=1)
    ref_out, ref_lse, _ = oracle(qkv, dout, NH, NKV, HS)
    assert rel_err(out, ref_out) < 5e-3
    assert np.abs(lse - ref_lse).max() < 1e-4 * max(1.0, np.abs(ref_lse).max())


@pytest.mark.parametrize("shape", [(2, 37, 2, 2, 64, 1.0, 1, 1), (1, 200, 3, 1, 64, 4.0, 1, 1), (1, 130, 4, 2, 64, 1.0, 1, 2)],
                         ids=lambda s: "B%d_T%d_NH%d_NKV%d_HS%d_x%g_rw%d_dq%d" % s)
def test_flash_register_fragments(emulator, tmp_path, shape):
    """The backward with the dQ pass's Q and dO fragments and the dK/dV pass's K and V fragments
    held in registers matches the oracle, and gives the same bits as with them read from shared
    memory on every key or query tile (the tuner only picks among such configurations)."""
    B, T, NH, NKV, HS, scale, RW, DQ_RW = shape
    plain = run_emulator(emulator, tmp_path, shape, "late")
    variants = [(0, 1)] + ([(1, 0), (1, 1)] if DQ_RW == 1 else [])
    for qreg, kvreg in variants:
        got = run_emulator(emulator, tmp_path, shape, "late", qreg=qreg, kvreg=kvreg)
        differ = int(np.count_nonzero(got[4].view(np.uint32) != plain[4].view(np.uint32)))
        assert differ == 0, f"qreg={qreg} kvreg={kvreg}: {differ} of {got[4].size} dqkv elements differ"
    qkv, dout, _, _, dqkv = run_emulator(emulator, tmp_path, shape, "early", qreg=int(DQ_RW == 1), kvreg=1)
    ref_dqkv = oracle(qkv, dout, NH, NKV, HS)[2]
    assert rel_err(dqkv, ref_dqkv) < 1.5e-2


@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 64, 1.0, 1, 1), (2, 37, 2, 2, 64, 1.0, 1, 1), (1, 200, 3, 1, 64, 4.0, 1, 1),
                                   (1, 300, 6, 2, 64, 1.0, 1, 2), (1, 256, 2, 2, 64, 1.0, 1, 1)],
                         ids=lambda s: "B%d_T%d_NH%d_NKV%d_HS%d_x%g_rw%d_dq%d" % s)
def test_flash_dkv_two_key_row_tiles(emulator, tmp_path, shape):
    """The dK/dV pass with two key row tiles a warp (blocks of 128 keys, 32 queries an iteration)
    gives the one-tile pass's bits: T of 1 (the second row tile wholly past T), 37 (one block, partly
    past T), 200 and 300 (a last block whose second row tile is partly or wholly past T; grouped
    heads), 256 (whole blocks), in both grid orders; with the copies landing early it matches the
    oracle. A mutation that unmasks the second row tile's first queries (which the one-tile pass
    never visits) would add their products and fail the bit comparison."""
    B, T, NH, NKV, HS, scale, RW, DQ_RW = shape
    for lpt in (0, 1):
        plain = run_emulator(emulator, tmp_path, shape, "late", lpt=lpt)
        got = run_emulator(emulator, tmp_path, shape, "late", lpt=lpt, kvreg=2)
        differ = int(np.count_nonzero(got[4].view(np.uint32) != plain[4].view(np.uint32)))
        assert differ == 0, f"lpt={lpt}: {differ} of {got[4].size} dqkv elements differ from the one-tile pass"
    qkv, dout, _, _, dqkv = run_emulator(emulator, tmp_path, shape, "early", kvreg=2)
    if T > 1:
        assert rel_err(dqkv, oracle(qkv, dout, NH, NKV, HS)[2]) < 1.5e-2


def rope_oracle(x, NH, NKV, HS, sign, theta=10000.0):
    """x (B, T, QKV) with its q and k heads rotated by their positions' angles times sign (+1:
    RoPE's forward, -1: its backward, on a gradient), in float64."""
    B, T, QKV = x.shape
    half = HS // 2
    angle = sign * np.arange(T)[:, None] * theta ** (-2.0 * np.arange(half) / HS)
    c, s = np.cos(angle)[None, :, None, :], np.sin(angle)[None, :, None, :]
    heads = x[:, :, :(NH + NKV) * HS].astype(np.float64).reshape(B, T, NH + NKV, HS)
    x1, x2 = heads[..., :half], heads[..., half:]
    out = x.astype(np.float64).copy()
    out[:, :, :(NH + NKV) * HS] = np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1).reshape(B, T, -1)
    return out


@pytest.mark.parametrize("shape,kvreg,wg", [((2, 37, 2, 2, 64, 1.0, 1, 1), 0, 0), ((1, 200, 9, 3, 64, 1.0, 1, 2), 0, 0),
                                            ((1, 300, 6, 2, 64, 1.0, 1, 1), 2, 0), ((1, 150, 2, 2, 128, 1.0, 1, 1), 0, 0),
                                            ((1, 130, 4, 2, 64, 1.0, 1, 1), 1, 0), ((1, 130, 4, 2, 64, 1.0, 1, 1), 0, 128),
                                            ((1, 200, 9, 3, 64, 1.0, 1, 1), 0, 256), ((1, 130, 4, 2, 64, 1.0, 1, 1), 0, 512),
                                            ((1, 200, 9, 3, 64, 1.0, 1, 1), 0, 1024 | 256),
                                            ((1, 200, 9, 3, 64, 1.0, 1, 1), 0, 4096), ((1, 130, 4, 2, 64, 1.0, 1, 1), 0, 4096)],
                         ids=lambda s: "B%d_T%d_NH%d_NKV%d_HS%d_x%g_rw%d_dq%d" % s if isinstance(s, tuple) else str(s))
def test_flash_backward_rope_epilogue(emulator, tmp_path, shape, kvreg, wg):
    """The backward taking dQ and dK back through RoPE in its epilogues gives, bit for bit, what
    rope_backward's arithmetic makes of the plain backward's dqkv (head sizes 64 and 128, grouped
    heads, T not a multiple of the tiles, the dQ pass with two row tiles, the dK/dV pass with K and
    V in registers or two key row tiles, both passes pipelined with one or two warpgroups a block), and
    matches the float64 oracle rotated back; the values are rotated (the rotation at position 0 is
    the identity, so a tile left alone would show from position 1 on)."""
    B, T, NH, NKV, HS, scale, RW, DQ_RW = shape
    fused = run_emulator(emulator, tmp_path, shape, "late", kvreg=kvreg, wg=wg, rope=1)
    after = run_emulator(emulator, tmp_path, shape, "late", kvreg=kvreg, wg=wg, rope=2)
    plain = run_emulator(emulator, tmp_path, shape, "late", kvreg=kvreg, wg=wg)
    differ = int(np.count_nonzero(fused[4].view(np.uint32) != after[4].view(np.uint32)))
    assert differ == 0, f"{differ} of {fused[4].size} dqkv elements differ from the backward followed by rope_backward"
    assert not np.array_equal(fused[4], plain[4])
    qkv, dout = fused[0], fused[1]
    ref = rope_oracle(oracle(qkv, dout, NH, NKV, HS)[2], NH, NKV, HS, -1)
    assert rel_err(fused[4], ref) < 1.5e-2


@pytest.mark.parametrize("shape,wg", [((2, 37, 2, 2, 64, 1.0, 1, 1), 0), ((1, 200, 9, 3, 64, 1.0, 1, 1), 0),
                                      ((1, 300, 4, 2, 64, 1.0, 2, 1), 0), ((1, 150, 2, 2, 128, 1.0, 1, 1), 0),
                                      ((1, 130, 4, 2, 64, 1.0, 1, 1), 1), ((1, 1, 1, 1, 64, 1.0, 1, 1), 0),
                                      ((1, 130, 4, 2, 64, 1.0, 1, 1), 32), ((1, 200, 4, 2, 64, 1.0, 1, 1), 64)],
                         ids=lambda s: "B%d_T%d_NH%d_NKV%d_HS%d_x%g_rw%d_dq%d" % s if isinstance(s, tuple) else "wg%d" % s)
def test_flash_forward_rope_on_load(emulator, tmp_path, shape, wg):
    """The forward rotating its query rows by RoPE as it loads them and storing them back
    (attention_flash_forward_rope, the k heads rotated before it) gives, bit for bit, the out,
    lse and qkv that RoPE's arithmetic on the q and k heads before the plain forward gives, and
    so the same dqkv from the backward reading that qkv (head sizes 64 and 128, grouped heads, T
    not a multiple of the tiles, two row tiles a warp, the warpgroup forward, the pipelined one
    with one and two warpgroups a block); qkv afterwards is
    rotated (position 0 is the identity, so a tile left alone would show from position 1 on) and
    matches the float64 rotation, and out the oracle's attention on it."""
    B, T, NH, NKV, HS, scale, RW, DQ_RW = shape
    fused = run_emulator_full(emulator, tmp_path, shape, "late", wg=wg, rope_fwd=1)
    host = run_emulator_full(emulator, tmp_path, shape, "late", wg=wg, rope_fwd=2)
    for name, a, b in zip(("out", "lse", "dqkv", "qkv afterwards"), fused[2:], host[2:]):
        differ = int(np.count_nonzero(a.view(np.uint32) != b.view(np.uint32)))
        assert differ == 0, f"{name}: {differ} of {a.size} elements differ from RoPE before the plain forward"
    qkv, dout, out, lse, _, rotated = fused
    ref = rope_oracle(qkv, NH, NKV, HS, +1)
    assert np.abs(rotated - ref).max() <= 2.0 ** -7 * np.abs(ref).max()   # bf16 rounding of each element
    if T > 1:
        assert not np.array_equal(rotated[:, 1:, :(NH + NKV) * HS], qkv[:, 1:, :(NH + NKV) * HS])
    assert np.array_equal(rotated[:, :, (NH + NKV) * HS:], qkv[:, :, (NH + NKV) * HS:])   # v untouched
    ref_out, ref_lse, _ = oracle(rotated, dout, NH, NKV, HS)
    assert rel_err(out, ref_out) < 5e-3
    assert np.abs(lse - ref_lse).max() < 1e-4 * max(1.0, np.abs(ref_lse).max())


# The forward's warpgroup product S = Q K^T as the kernel issues and waits for it, and two ways to
# get it wrong that a GPU may or may not show: reading an accumulator before the wait (the value
# is the product's result only once waited for), and changing an A register before the wait (the
# tensor cores may read it at any time until then); each puts things back after the wait, so that
# only a product run later than its issue sees the difference.
# The third misuse is the pipelined forward's: leaving out the wait for the previous tile's P V
# before O is rescaled and P's fragments are rewritten (the next wait then runs that product on
# the changed registers). Each: (the text replaced, its replacement, the emulator's wg bits).
WGMMA_S_WAIT = "flash_wgmma_finish(s[0]);"
WGMMA_PV_WAIT = "flash_wgmma_wait_group<0>();   // P V of tile j - 1: O, and pa free again"
WGMMA_MISUSES = {
    "accumulator read before the wait":
        (WGMMA_S_WAIT, "flash_wgmma_commit(); float early = s[0][0][0]; flash_wgmma_wait(); s[0][0][0] = early;", 1),
    "A register changed before the wait":
        (WGMMA_S_WAIT,
         "uint32_t kept = q_frag[0][0][0]; q_frag[0][0][0] = 0; flash_wgmma_finish(s[0]); q_frag[0][0][0] = kept;", 1),
    "pipelined: no wait for P V before its operands change": (WGMMA_PV_WAIT, "", 64),
}


@pytest.mark.parametrize("misuse", sorted(WGMMA_MISUSES))
def test_wgmma_products_run_at_their_wait(emulator, tmp_path, misuse):
    """The emulated warpgroup products are asynchronous: each runs at the wait for its group, not
    at its issue, so a kernel that reads an accumulator before that wait or changes an A operand
    before it gives other results under the emulation (the changed kernel is built from a copy of
    attention_flash.cuh), while the kernel as it is gives the mma.sync kernels' bits."""
    target, replacement, wg = WGMMA_MISUSES[misuse]
    source = (ROOT / "llmc" / "attention_flash.cuh").read_text()
    assert source.count(target) == 1, "the wait this test changes is not where it expects it"
    headers = tmp_path / "changed"
    headers.mkdir()
    (headers / "attention_flash.cuh").write_text(source.replace(target, replacement))
    changed = build_emulator(tmp_path, headers)
    shape = (2, 150, 2, 2, 64, 1.0, 1, 1)
    plain = run_emulator(emulator, tmp_path, shape, "late", qreg=1, kvreg=1)
    for exe, should_differ in ((emulator, False), (changed, True)):
        out = run_emulator(exe, tmp_path, shape, "late", qreg=1, kvreg=1, wg=wg)[2]   # a warpgroup forward
        differ = int(np.count_nonzero(out.view(np.uint32) != plain[2].view(np.uint32)))
        assert (differ > 0) == should_differ, f"{misuse}: {differ} of {out.size} outputs differ from the mma.sync forward"


@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 64, 1.0, 1, 1), (2, 37, 2, 2, 64, 1.0, 1, 1), (1, 200, 3, 1, 64, 4.0, 1, 1),
                                   (1, 256, 2, 2, 64, 1.0, 1, 1), (2, 150, 4, 2, 64, 1.0, 1, 1)],
                         ids=lambda s: "B%d_T%d_NH%d_NKV%d_HS%d_x%g_rw%d_dq%d" % s)
def test_flash_wgmma(emulator, tmp_path, shape):
    """The warpgroup kernels (wgmma, their K/V or Q/dO tiles in the core-matrix layout read through
    matrix descriptors) sum the same products in the same order of k as the mma.sync kernels, so
    under the emulation, which does both from the PTX ISA's definitions, the forward's out and lse
    and the backward's dqkv equal those of the kernels with the same fragments in registers (the
    dQ pass's Q and dO, the dK/dV pass's K and V) bit for bit, each pass alone and all three
    together, and so do the backward passes reading those operands from shared memory as well
    and the pipelined forward, dQ and dK/dV passes with one or two warpgroups a block, the
    forward and dQ pass also with their warpgroups on the query heads of a kv head (grouped
    heads); with the copies landing early they also match the oracle."""
    B, T, NH, NKV, HS, scale, RW, DQ_RW = shape
    plain = run_emulator(emulator, tmp_path, shape, "late", qreg=1, kvreg=1)
    heads = [2048, 4096, 2048 | 4096 | 1024] if (NH // NKV) % 2 == 0 or (NH // NKV) % 3 == 0 else []
    for wg in (1, 2, 4, 7, 8, 16, 25, 32, 64, 38, 88, 128, 256, 164, 336, 512, 1024, 672, 1344, *heads):
        got = run_emulator(emulator, tmp_path, shape, "late", qreg=1, kvreg=1, wg=wg)
        for name, a, b in zip(("out", "lse", "dqkv"), got[2:], plain[2:]):
            differ = int(np.count_nonzero(a.view(np.uint32) != b.view(np.uint32)))
            assert differ == 0, f"wg={wg} {name}: {differ} of {a.size} elements differ from the mma.sync kernels"
    for wg in (7, 25, 38, 88, 164, 336, 672, 1344, *heads[2:]):
        qkv, dout, out, lse, dqkv = run_emulator(emulator, tmp_path, shape, "early", qreg=1, kvreg=1, wg=wg)
        ref_out, ref_lse, ref_dqkv = oracle(qkv, dout, NH, NKV, HS)
        assert rel_err(out, ref_out) < 5e-3
        assert np.abs(lse - ref_lse).max() < 1e-4 * max(1.0, np.abs(ref_lse).max())
        if np.abs(ref_dqkv).max() > 1e-12 and T > 1:
            assert rel_err(dqkv, ref_dqkv) < 1.5e-2
