"""The decode-attention kernels of the GPU rollout engine (llmc/decode_attention.cuh) run on the
CPU through test/decode_attention_emu.cpp (the GPU emulation of test/gpu_emu.h) against a NumPy
float64 oracle written from the math: row r, query head h, attends over its own sequence's
positions 0..pos[r] of cache slot slot[r], key/value head h // (NH / NKV):
out = softmax(q . k / sqrt(HS)) v.

Shapes cover NH = NKV and grouped-query attention (groups of 2, 3 and 4 heads, which one block
takes together, and groups of 12 and 18, larger than a block's 8 heads), head sizes 64 and 128,
one split and several, sequence lengths of 1, on split boundaries and not multiples of the split
length, lengths on either side of a block's positions per loop iteration (64 at head size 64, 32
at 128), rows that share a slot, more splits than any
row needs, and sharp softmaxes; each runs through the split kernel with its combine and through
the reference kernel, with the threads of each block scheduled forward and in reverse (a
missing barrier shows in one order or the other) and the blocks of each launch forward, in
reverse and shuffled (gpu_emu.ORDERS: a block that counts on another having run shows). A mutation check confirms that an oracle with the wrong scale or the wrong
head mapping fails the comparison."""
import math
import os
import re

import numpy as np
import pytest

from conftest import ROOT
from gpu_emu import ORDERS, build_emulator, rewrite_launches, run_program, to_bf16

SPLIT = 256   # DECODE_SPLIT_LEN


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    build = tmp_path_factory.mktemp("decode")
    source = (ROOT / "llmc" / "decode_attention.cuh").read_text()
    assert re.search(r"#define DECODE_SPLIT_LEN (\d+)", source).group(1) == str(SPLIT)
    return build_emulator(build, rewrite_launches(source, 4), "decode_attention_emu")


def oracle(qkv, k_cache, v_cache, slots, positions, NH, NKV, HS, scale=None, kv_head=None):
    """float64 out (N, NH*HS): each row's query heads against its own slot's positions 0..pos.
    scale and kv_head (h -> key/value head) default to the true 1/sqrt(HS) and h // (NH/NKV); the
    mutation check passes wrong ones."""
    scale = 1.0 / math.sqrt(HS) if scale is None else scale
    kv_head = (lambda h: h // (NH // NKV)) if kv_head is None else kv_head
    N = qkv.shape[0]
    out = np.zeros((N, NH * HS))
    for r in range(N):
        s, p = slots[r], positions[r]
        for h in range(NH):
            q = qkv[r, h * HS:(h + 1) * HS].astype(np.float64)
            k = k_cache[s, kv_head(h), :p + 1].astype(np.float64)
            v = v_cache[s, kv_head(h), :p + 1].astype(np.float64)
            scores = k @ q * scale
            w = np.exp(scores - scores.max())
            out[r, h * HS:(h + 1) * HS] = (w / w.sum()) @ v
    return out


def within_tolerance(got, ref, HS):
    """True when every output is ref rounded to bf16 up to fp32 accumulation: |got - ref| at most
    half a bf16 ulp of ref plus 1e-5 of the head's largest |ref|."""
    N = ref.shape[0]
    _, e = np.frexp(ref)
    half_ulp = np.ldexp(1.0, e - 9)   # bf16 keeps 8 significant bits
    head_max = np.abs(ref.reshape(N, -1, HS)).max(axis=-1, keepdims=True)
    bound = half_ulp + 1e-5 * np.broadcast_to(head_max, (N, ref.shape[1] // HS, HS)).reshape(N, -1)
    return bool(np.all(np.abs(got.astype(np.float64) - ref) <= bound))


def run_emulator(emulator, tmp_path, qkv, k_cache, v_cache, slots, positions, NH, NKV, HS, n_splits, reference,
                 order="forward", write_kv=False, cos_sin=None, caches=False, loads=0, norm_x=None, smem_optin=None):
    """out (N, NH*HS) float32 and the error flags from decode_attention() under emulation (and the
    k and v caches after the call, when caches); loads: the fast kernel's way to request keys and
    values (decode_attention_loads: 0 direct, 1 early, 2 staged); smem_optin: the shared memory a
    block may take on the emulated card (EMU_SMEM_OPTIN; an H100's 227 KiB when None)."""
    N = qkv.shape[0]
    S, _, Tmax, _ = k_cache.shape
    inp, outp = tmp_path / "in.bin", tmp_path / "out.bin"
    with open(inp, "wb") as f:
        np.array([N, NH, NKV, HS, S, Tmax, n_splits, reference, int(write_kv), int(cos_sin is not None),
                  0 if norm_x is None else norm_x.shape[1]], np.int32).tofile(f)
        np.array(list(slots) + list(positions), np.int32).tofile(f)
        for x in (qkv, k_cache, v_cache) + (() if cos_sin is None else (cos_sin,)) + (() if norm_x is None else (norm_x,)):
            x.astype(np.float32).tofile(f)
    env = dict(os.environ, DECODE_ATTENTION_LOADS=str(loads))
    env.pop("EMU_SMEM_OPTIN", None)
    if smem_optin is not None:
        env["EMU_SMEM_OPTIN"] = str(smem_optin)
    proc = run_program([emulator, inp, outp], order, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    raw = np.fromfile(outp, np.uint8)
    n_out, n_cache = N * NH * HS, k_cache.size
    assert raw.size == (n_out + 1 + 2 * n_cache) * 4
    out = raw[:n_out * 4].view(np.float32).reshape(N, NH * HS)
    err = int(raw[n_out * 4:(n_out + 1) * 4].view(np.int32)[0])
    if not caches:
        return out, err
    rest = raw[(n_out + 1) * 4:].view(np.float32)
    return out, err, rest[:n_cache].reshape(k_cache.shape), rest[n_cache:].reshape(k_cache.shape)


def make_inputs(shape, seed):
    """bf16-representable qkv, k_cache and v_cache for shape (see SHAPES)."""
    NH, NKV, HS, S, Tmax, rows, _, scale = shape
    rng = np.random.default_rng(seed)
    qkv = to_bf16(rng.standard_normal((len(rows), (NH + 2 * NKV) * HS)) * scale)
    k_cache = to_bf16(rng.standard_normal((S, NKV, Tmax, HS)) * scale)
    v_cache = to_bf16(rng.standard_normal((S, NKV, Tmax, HS)))
    return qkv, k_cache, v_cache


SHAPES = [  # NH, NKV, HS, slots S, Tmax, rows (slot, length), n_splits (None: as rollout.cu, for Tmax), input scale
    (2, 2, 64, 3, 300, [(0, 1), (1, 256), (2, 300), (1, 257)], None, 1.0),
    (8, 2, 64, 4, 600, [(3, 1), (0, 37), (2, 513), (1, 600), (0, 255)], None, 1.0),
    (4, 1, 128, 2, 700, [(1, 700), (0, 2), (1, 256), (0, 511)], None, 2.0),
    (1, 1, 128, 2, 100, [(0, 1), (1, 100), (0, 50)], None, 1.0),
    (18, 1, 64, 2, 280, [(1, 280), (0, 1), (0, 129)], None, 1.0),
    (4, 2, 128, 2, 300, [(0, 300), (1, 3)], 4, 3.0),
    (9, 3, 64, 5, 320, [(0, 63), (1, 64), (2, 65), (3, 129), (4, 300)], None, 1.0),
    (12, 1, 128, 3, 260, [(0, 31), (1, 32), (2, 33), (0, 260)], None, 1.0),
    # SmolLM2's generation (64 + 128 positions): the staged variant's keys and values take 48 KiB,
    # which with its static arrays needs the raised shared memory limit
    (9, 3, 64, 3, 192, [(0, 1), (1, 100), (2, 192)], None, 1.0),
]


def shape_id(s):
    NH, NKV, HS, S, Tmax, rows, splits, scale = s
    return "NH%d_NKV%d_HS%d_T%d_len%s_splits%s_x%g" % (NH, NKV, HS, Tmax, "-".join(str(n) for _, n in rows),
                                                       splits or "auto", scale)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("kernel", ["split", "reference"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_decode_attention_emulated(emulator, tmp_path, shape, kernel, order):
    NH, NKV, HS, S, Tmax, rows, n_splits, _ = shape
    n_splits = n_splits or -(-Tmax // SPLIT)   # decode_attention_splits
    qkv, k_cache, v_cache = make_inputs(shape, SHAPES.index(shape))
    slots, positions = [s for s, _ in rows], [n - 1 for _, n in rows]
    got, err = run_emulator(emulator, tmp_path, qkv, k_cache, v_cache, slots, positions, NH, NKV, HS, n_splits,
                            kernel == "reference", order)
    assert err == 0
    assert np.isfinite(got).all(), "unwritten (NaN-poisoned) or non-finite outputs"
    ref = oracle(qkv, k_cache, v_cache, slots, positions, NH, NKV, HS)
    assert within_tolerance(got, ref, HS), "max abs error %.3e" % np.abs(got - ref).max()


def test_oracle_mutations_fail(emulator, tmp_path):
    """The comparison catches a wrong scale and a wrong GQA head mapping."""
    shape = SHAPES[1]
    NH, NKV, HS, S, Tmax, rows, _, _ = shape
    qkv, k_cache, v_cache = make_inputs(shape, 1)
    slots, positions = [s for s, _ in rows], [n - 1 for _, n in rows]
    got, err = run_emulator(emulator, tmp_path, qkv, k_cache, v_cache, slots, positions, NH, NKV, HS,
                            -(-Tmax // SPLIT), False)
    assert err == 0
    args = (qkv, k_cache, v_cache, slots, positions, NH, NKV, HS)
    assert within_tolerance(got, oracle(*args), HS)
    assert not within_tolerance(got, oracle(*args, scale=1.0 / HS), HS)
    assert not within_tolerance(got, oracle(*args, kv_head=lambda h: h % NKV), HS)


def test_decode_attention_position_errors(emulator, tmp_path):
    """A row past the cache or past the grid's splits sets DECODE_ERR_POSITION (2) and is left
    unwritten; the other rows are still right."""
    shape = (4, 2, 64, 2, 600, [(0, 5), (1, 301), (0, 601), (1, 256)], 2, 1.0)
    NH, NKV, HS, S, Tmax, rows, _, _ = shape
    qkv, k_cache, v_cache = make_inputs(shape, 7)
    slots, positions = [s for s, _ in rows], [n - 1 for _, n in rows]
    # one split covers positions 0..255: row 1 (pos 300) is past the grid, row 2 (pos 600) past the cache
    got, err = run_emulator(emulator, tmp_path, qkv, k_cache, v_cache, slots, positions, NH, NKV, HS, 1, False)
    assert err == 2
    assert np.isnan(got[1]).all() and np.isnan(got[2]).all()
    ok = [0, 3]
    ref = oracle(qkv[ok], k_cache, v_cache, [slots[i] for i in ok], [positions[i] for i in ok], NH, NKV, HS)
    assert within_tolerance(got[ok], ref, HS)


# --- the cache write inside the attention (write_kv), as a decode step calls it

def rope_table(Tmax, HS, theta=10000.0):
    """cos_sin (Tmax, HS/2, 2) float32: the angles of pair i at position t, t * theta^(-2i/HS)."""
    i = np.arange(HS // 2)
    angle = np.arange(Tmax)[:, None] * theta ** (-2.0 * i / HS)[None, :]
    return np.stack([np.cos(angle), np.sin(angle)], axis=-1).astype(np.float32)


def rotate_bf16(x, cs):
    """A head vector x (HS,) rotated by cos_sin row cs (HS/2, 2) in float32, as rows_kv_write does
    (x1 c - x2 s, x2 c + x1 s, each product and sum rounded to float32), then rounded to bf16."""
    half = x.shape[0] // 2
    x1, x2 = x[:half].astype(np.float32), x[half:].astype(np.float32)
    c, s_ = cs[:, 0], cs[:, 1]
    return to_bf16(np.concatenate([x1 * c - x2 * s_, x2 * c + x1 * s_]).astype(np.float32))


def written_inputs(qkv, k_cache, v_cache, slots, positions, NH, NKV, HS, cos_sin):
    """qkv with its q heads rotated and the caches with every row's (rotated) key and value at
    (slot, pos): what rows_kv_write leaves for the attention."""
    qkv, k_cache, v_cache = qkv.copy(), k_cache.copy(), v_cache.copy()
    for r, (s_, p) in enumerate(zip(slots, positions)):
        row = qkv[r]
        if cos_sin is not None:
            for h in range(NH):
                row[h * HS:(h + 1) * HS] = rotate_bf16(row[h * HS:(h + 1) * HS], cos_sin[p])
        for g in range(NKV):
            k = row[(NH + g) * HS:(NH + g + 1) * HS]
            k_cache[s_, g, p] = k if cos_sin is None else rotate_bf16(k, cos_sin[p])
            v_cache[s_, g, p] = row[(NH + NKV + g) * HS:(NH + NKV + g + 1) * HS]
    return qkv, k_cache, v_cache


WRITE_SHAPES = [  # NH, NKV, HS, slots S, Tmax, rows (slot, length) with distinct slots, n_splits, RoPE
    (4, 4, 64, 4, 300, [(0, 1), (1, 64), (2, 257), (3, 300)], None, False),
    (9, 3, 64, 3, 300, [(2, 1), (0, 200), (1, 256)], None, True),
    (12, 1, 128, 3, 520, [(0, 33), (1, 513), (2, 260)], None, True),
    (18, 1, 64, 2, 280, [(1, 280), (0, 129)], None, True),
    (2, 1, 128, 2, 100, [(1, 100), (0, 2)], 3, False),
]


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("shape", WRITE_SHAPES, ids=lambda s: "NH%d_NKV%d_HS%d_len%s%s" % (
    s[0], s[1], s[2], "-".join(str(n) for _, n in s[5]), "_rope" if s[7] else ""))
def test_decode_attention_writes_the_cache(emulator, tmp_path, shape, order):
    """With write_kv the kernel rotates q and the row's key itself, takes the row's own key and
    value from qkv and writes them to the cache: its output equals the oracle's on the rotated
    inputs, and the cache afterwards holds exactly the rotated key and the value at (slot, pos),
    nothing else changed."""
    NH, NKV, HS, S, Tmax, rows, n_splits, rope = shape
    n_splits = n_splits or -(-Tmax // SPLIT)
    rng = np.random.default_rng(WRITE_SHAPES.index(shape) + 100)
    qkv = to_bf16(rng.standard_normal((len(rows), (NH + 2 * NKV) * HS)))
    k_cache = to_bf16(rng.standard_normal((S, NKV, Tmax, HS)))
    v_cache = to_bf16(rng.standard_normal((S, NKV, Tmax, HS)))
    cos_sin = rope_table(Tmax, HS) if rope else None
    slots, positions = [s_ for s_, _ in rows], [n - 1 for _, n in rows]
    got, err, k_after, v_after = run_emulator(emulator, tmp_path, qkv, k_cache, v_cache, slots, positions, NH, NKV, HS,
                                              n_splits, False, order, write_kv=True, cos_sin=cos_sin, caches=True)
    assert err == 0
    q_rot, k_ref, v_ref = written_inputs(qkv, k_cache, v_cache, slots, positions, NH, NKV, HS, cos_sin)
    np.testing.assert_array_equal(k_after, k_ref)
    np.testing.assert_array_equal(v_after, v_ref)
    assert np.isfinite(got).all(), "unwritten (NaN-poisoned) or non-finite outputs"
    ref = oracle(q_rot, k_ref, v_ref, slots, positions, NH, NKV, HS)
    assert within_tolerance(got, ref, HS), "max abs error %.3e" % np.abs(got - ref).max()
    if rope:   # the rotation matters: the unrotated inputs give other outputs
        assert not within_tolerance(got, oracle(*written_inputs(qkv, k_cache, v_cache, slots, positions, NH, NKV, HS,
                                                                None), slots, positions, NH, NKV, HS), HS)


@pytest.mark.parametrize("loads", [1, 2], ids=["early", "staged"])
@pytest.mark.parametrize("case", [("read", s) for s in SHAPES] + [("write", s) for s in WRITE_SHAPES],
                         ids=lambda c: c[0] + "_NH%d_NKV%d_HS%d_len%s" % (c[1][0], c[1][1], c[1][2],
                                                                         "-".join(str(n) for _, n in c[1][5])))
def test_loads_variants_same_bits(emulator, tmp_path, case, loads):
    """The fast kernel's early-loads variant (every load of the first iteration requested before
    any is used) and its staged variant (the split's keys and values copied into shared memory by
    cp.async, which lands only when the thread waits) give the default kernel's outputs and cache
    writes bit for bit (their threads and blocks run in reverse here), and so the oracle's: on the shapes
    above, reading a written cache and writing it itself, with and without RoPE."""
    kind, shape = case
    NH, NKV, HS, S, Tmax, rows, n_splits, extra = shape
    n_splits = n_splits or -(-Tmax // SPLIT)
    slots, positions = [s_ for s_, _ in rows], [n - 1 for _, n in rows]
    if kind == "read":
        qkv, k_cache, v_cache = make_inputs(shape, SHAPES.index(shape))
        args, kw = (qkv, k_cache, v_cache, slots, positions, NH, NKV, HS, n_splits, False), {}
        ref = oracle(qkv, k_cache, v_cache, slots, positions, NH, NKV, HS)
    else:
        rng = np.random.default_rng(WRITE_SHAPES.index(shape) + 200)
        qkv = to_bf16(rng.standard_normal((len(rows), (NH + 2 * NKV) * HS)))
        k_cache = to_bf16(rng.standard_normal((S, NKV, Tmax, HS)))
        v_cache = to_bf16(rng.standard_normal((S, NKV, Tmax, HS)))
        cos_sin = rope_table(Tmax, HS) if extra else None
        args = (qkv, k_cache, v_cache, slots, positions, NH, NKV, HS, n_splits, False)
        kw = dict(write_kv=True, cos_sin=cos_sin)
        ref = oracle(*written_inputs(qkv, k_cache, v_cache, slots, positions, NH, NKV, HS, cos_sin), slots, positions,
                     NH, NKV, HS)
    plain = run_emulator(emulator, tmp_path, *args, "forward", caches=True, **kw)
    other = run_emulator(emulator, tmp_path, *args, "reverse", caches=True, loads=loads, **kw)
    assert plain[1] == 0 and other[1] == 0
    for a, b in zip(plain, other):
        np.testing.assert_array_equal(np.asarray(a).view(np.uint32) if hasattr(a, "view") else a,
                                      np.asarray(b).view(np.uint32) if hasattr(b, "view") else b)
    assert within_tolerance(other[0], ref, HS)


@pytest.mark.parametrize("shape", [s for s in SHAPES if s[2] == 128 and s[4] >= 256], ids=shape_id)
def test_staged_falls_back_on_a_card_with_less_shared_memory(emulator, tmp_path, shape):
    """Where a block may take only 96 KiB of shared memory (EMU_SMEM_OPTIN, a card like sm_86's
    99 KiB), the staged variant's keys and values of a 256-position split at head size 128
    (128 KiB) do not fit: the launcher runs the direct kernel instead (decode_staged_fits), whose
    outputs are the default's bit for bit; a staged launch would be refused."""
    NH, NKV, HS, S, Tmax, rows, n_splits, _ = shape
    n_splits = n_splits or -(-Tmax // SPLIT)
    slots, positions = [s_ for s_, _ in rows], [n - 1 for _, n in rows]
    qkv, k_cache, v_cache = make_inputs(shape, SHAPES.index(shape))
    args = (qkv, k_cache, v_cache, slots, positions, NH, NKV, HS, n_splits, False)
    plain = run_emulator(emulator, tmp_path, *args, "forward")
    small = run_emulator(emulator, tmp_path, *args, "reverse", loads=2, smem_optin=96 * 1024)
    assert plain[1] == 0 and small[1] == 0
    np.testing.assert_array_equal(plain[0].view(np.uint32), small[0].view(np.uint32))


def test_reference_kernel_refuses_write_kv(emulator, tmp_path):
    shape = WRITE_SHAPES[0]
    NH, NKV, HS, S, Tmax, rows, _, _ = shape
    qkv, k_cache, v_cache = make_inputs(shape[:6] + (None, 1.0), 0)
    inp, outp = tmp_path / "in.bin", tmp_path / "out.bin"
    with open(inp, "wb") as f:
        np.array([len(rows), NH, NKV, HS, S, Tmax, 2, 1, 1, 0, 0], np.int32).tofile(f)
        np.array([s_ for s_, _ in rows] + [n - 1 for _, n in rows], np.int32).tofile(f)
        for x in (qkv, k_cache, v_cache):
            x.astype(np.float32).tofile(f)
    proc = run_program([emulator, inp, outp], "forward")
    assert proc.returncode != 0 and "write_kv" in proc.stderr


@pytest.mark.parametrize("loads", [0, 1, 2], ids=["direct", "early", "staged"])
@pytest.mark.parametrize("shape", WRITE_SHAPES[1:4], ids=lambda s: "NH%d_NKV%d_HS%d_len%s%s" % (
    s[0], s[1], s[2], "-".join(str(n) for _, n in s[5]), "_rope" if s[7] else ""))
def test_decode_attention_applies_the_rows_norm(emulator, tmp_path, shape, loads):
    """With the rows' residual stream x (DecodeRowNorm: the engine's folded decode step), row r's
    q, k and v are scaled by its RMSNorm factor 1 / sqrt(mean(x_r^2) + eps) before the rotation:
    the output and the written key and value match the float64 oracle on the scaled inputs (the
    cache within one bf16 rounding), and differ from the unscaled ones."""
    NH, NKV, HS, S, Tmax, rows, n_splits, rope = shape
    n_splits = n_splits or -(-Tmax // SPLIT)
    rng = np.random.default_rng(WRITE_SHAPES.index(shape) + 300)
    C = 3 * HS + 8   # not a multiple of the block's threads
    qkv = to_bf16(rng.standard_normal((len(rows), (NH + 2 * NKV) * HS)))
    k_cache = to_bf16(rng.standard_normal((S, NKV, Tmax, HS)))
    v_cache = to_bf16(rng.standard_normal((S, NKV, Tmax, HS)))
    x = to_bf16(rng.standard_normal((len(rows), C)) * np.array([0.5, 2.0, 8.0])[:len(rows), None])
    cos_sin = rope_table(Tmax, HS) if rope else None
    slots, positions = [s_ for s_, _ in rows], [n - 1 for _, n in rows]
    got, err, k_after, v_after = run_emulator(emulator, tmp_path, qkv, k_cache, v_cache, slots, positions, NH, NKV, HS,
                                              n_splits, False, "reverse", write_kv=True, cos_sin=cos_sin, caches=True,
                                              loads=loads, norm_x=x)
    assert err == 0
    rstd = 1.0 / np.sqrt((x.astype(np.float64) ** 2).mean(axis=1) + 1e-5)
    scaled = qkv.astype(np.float64) * rstd[:, None]
    # the oracle's caches and rotated q from the scaled rows (rotate_bf16 rotates in float32)
    q_rot, k_ref, v_ref = written_inputs(scaled.astype(np.float32), k_cache, v_cache, slots, positions, NH, NKV, HS,
                                         cos_sin)
    for after, ref in ((k_after, k_ref), (v_after, v_ref)):
        _, e = np.frexp(ref)
        assert np.all(np.abs(after - ref) <= np.ldexp(1.0, e - 8)), np.abs(after - ref).max()   # one bf16 ulp
    ref_out = oracle(q_rot, k_ref, v_ref, slots, positions, NH, NKV, HS)
    rel = np.linalg.norm(got - ref_out) / np.linalg.norm(ref_out)
    assert np.isfinite(got).all() and rel < 1e-2, rel
    plain = oracle(*written_inputs(qkv, k_cache, v_cache, slots, positions, NH, NKV, HS, cos_sin), slots, positions,
                   NH, NKV, HS)
    assert np.linalg.norm(got - plain) / np.linalg.norm(plain) > 5e-2, "the scale must show"
