"""The simple attention kernels (llmc/attention.cuh: forward, and the backward's preprocess, dq
and dk/dv passes) and the embedding kernels (llmc/encoder.cuh: forward, backward into wte and
wpe) run on the CPU through test/attention_emu.cpp (the GPU emulation of test/gpu_emu.h) against
their CPU twins in llmc/ops_cpu.c (attention_forward / attention_backward, encoder_forward /
encoder_backward, fp32), on the same inputs.

Attention: head sizes 16, 32, 64 and 128 (every instantiation), one query head per key/value
head (GPT-2) and groups of 2, 3 and 4 (grouped-query, Llama), T of 1, T not a multiple of the
32-row tiles or the 64-row blocks, T over several blocks, two sequences, and sharp softmaxes.
Every output is compared: out (bf16) within half a bf16 ulp of the CPU's plus the fp32 roundings;
lse through the CPU's probabilities (lse = s - log p at each row's largest p); dq, dk and dv
(bf16) within half an ulp plus fp32 roundings plus what the bf16 rounding of out carries into
D = rowsum(dout * out), which the kernels take from the forward's bf16 out where the CPU uses
its fp32 probabilities. The bounds' magnitudes are computed here in float64 from the inputs.

Embedding: GPT-2's learned positions (wpe) and Llama's none, the residual stream in fp32 and in
bf16, repeated tokens (whose gradient rows the kernel adds atomically): out bit for bit (the two
embeddings added in fp32, then stored as the stream's type), dwte and dwpe within the fp32
roundings of their sums, added to non-zero starting values.

Outputs start as NaN, so an element the kernels do not write fails. Each case runs with the
threads of each block forward and in reverse and the blocks of each launch forward, in reverse
and shuffled (gpu_emu.ORDERS). Mutation checks confirm that a CPU reference that reads one
element of q, k, v or dout from the wrong place fails the attention's comparisons."""
import shutil
import subprocess

import numpy as np
import pytest

from conftest import ROOT
from gpu_emu import ORDERS, build_emulator, rewrite_launches, run_program, sanitizer_flags, to_bf16

U = 2.0 ** -24   # fp32 unit roundoff
ATTENTION, EMBEDDING = 0, 1


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    cc = shutil.which("gcc")
    if cc is None:
        pytest.skip("gcc not found: the CPU ops are C")
    build = tmp_path_factory.mktemp("attention")
    ops = build / "ops_cpu.o"
    subprocess.run([cc, "-std=gnu11", "-O2", "-fopenmp", *sanitizer_flags(), "-I", str(ROOT / "llmc"), "-c",
                    str(ROOT / "llmc" / "ops_cpu.c"), "-o", str(ops)], check=True)
    source = "\n".join((ROOT / "llmc" / h).read_text() for h in ("attention.cuh", "encoder.cuh"))
    return build_emulator(build, rewrite_launches(source, 10), "attention_emu", flags=["-fopenmp"], objects=[ops, "-lm"])


def half_ulp_bf16(ref):
    _, e = np.frexp(ref)
    return np.ldexp(1.0, e - 9)   # bf16 keeps 8 significant bits


def assert_within(name, got, ref, bound):
    assert got.shape == ref.shape and not np.isnan(got).any(), f"{name}: NaN, an element was not written"
    bad = np.abs(got.astype(np.float64) - ref) > bound
    assert not bad.any(), (name, np.argwhere(bad)[:5].tolist(), got[bad][:5], ref[bad][:5], bound[bad][:5])


# ---------------------------------------------------------------------------------------------
# attention

def attention_inputs(B, T, NH, NKV, HS, sharp, seed):
    rng = np.random.default_rng(seed)
    qkv = rng.standard_normal((B, T, (NH + 2 * NKV) * HS))
    qkv[:, :, :NH * HS] *= sharp   # larger scores: sharper softmaxes
    return to_bf16(qkv), to_bf16(rng.standard_normal((B, T, NH * HS)))


def run_attention(emulator, tmp_path, qkv, dout, NH, NKV, HS, order="forward"):
    """The kernels' (out, lse, dqkv) and the CPU's (out, att, dqkv), float32."""
    B, T, QKV = qkv.shape
    inp, outp = tmp_path / "in.bin", tmp_path / "out.bin"
    with open(inp, "wb") as f:
        np.array([ATTENTION, B, T, NH, NKV, HS], np.int32).tofile(f)
        qkv.astype(np.float32).tofile(f)
        dout.astype(np.float32).tofile(f)
    proc = run_program([emulator, inp, outp], order)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    raw = np.fromfile(outp, np.float32)
    shapes = [(B, T, NH * HS), (B, NH, T), (B, T, QKV), (B, T, NH * HS), (B, NH, T, T), (B, T, QKV)]
    arrays, at = [], 0
    for shape in shapes:
        n = int(np.prod(shape))
        arrays.append(raw[at:at + n].reshape(shape))
        at += n
    assert at == raw.size
    return arrays[:3], arrays[3:]


def attention_bounds(qkv, dout, NH, NKV, HS):
    """Bounds on |kernel - CPU| for out, dq, dk, dv (each (B, T, NH*HS) or (B, T, NKV*HS)) past
    half a bf16 ulp, and the fp32 error of the scores per query row (B, NH, T), from float64
    magnitudes: the products' and sums' roundings relative to the magnitudes of their terms
    (2^-13: T, HS <= 300 terms of 2^-24 each, with the exp's amplification of a score's error),
    and the bf16 rounding of out in D = rowsum(dout * out) (2^-8 of rowsum |dout * out|)."""
    B, T, _ = qkv.shape
    x = qkv.astype(np.float64)
    g_all = dout.astype(np.float64)
    scale = 1.0 / np.sqrt(HS)
    group = NH // NKV
    causal = np.tril(np.ones((T, T), bool))
    rel = 2.0 ** -13
    out_b = np.zeros((B, T, NH * HS))
    dq_b = np.zeros((B, T, NH * HS))
    dk_b = np.zeros((B, T, NKV * HS))
    dv_b = np.zeros((B, T, NKV * HS))
    ds_err = np.zeros((B, NH, T))
    for b in range(B):
        for h in range(NH):
            kvh = h // group
            q = x[b, :, h * HS:(h + 1) * HS]
            k = x[b, :, (NH + kvh) * HS:(NH + kvh + 1) * HS]
            v = x[b, :, (NH + NKV + kvh) * HS:(NH + NKV + kvh + 1) * HS]
            g = g_all[b, :, h * HS:(h + 1) * HS]
            s = np.where(causal, q @ k.T * scale, -np.inf)
            p = np.exp(s - s.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            o = p @ v
            ds_err[b, h] = (HS + 4) * U * scale * (np.abs(q) @ np.abs(k).T * causal).max(axis=1)
            dpe = 2 * ds_err[b, h][:, None] + 16 * U   # relative error of each probability
            out_b[b, :, h * HS:(h + 1) * HS] = (p * (dpe + rel)) @ np.abs(v)
            dD = 2.0 ** -8 * (np.abs(g) * np.abs(o)).sum(axis=1)   # D's error, per query row
            mag = p * (np.abs(g) @ np.abs(v).T + (np.abs(g) * np.abs(o)).sum(axis=1, keepdims=True))   # |p (dp - D)| terms
            err = mag * (dpe + rel) + p * dD[:, None]
            dq_b[b, :, h * HS:(h + 1) * HS] = scale * err @ np.abs(k)
            dk_b[b, :, kvh * HS:(kvh + 1) * HS] += scale * err.T @ np.abs(q)
            dv_b[b, :, kvh * HS:(kvh + 1) * HS] += (p * (dpe + rel)).T @ np.abs(g)
    return out_b, dq_b, dk_b, dv_b, ds_err


def check_attention(gpu, cpu, qkv, dout, NH, NKV, HS):
    (out, lse, dqkv), (out_ref, att, dqkv_ref) = gpu, cpu
    B, T, _ = qkv.shape
    out_b, dq_b, dk_b, dv_b, ds_err = attention_bounds(qkv, dout, NH, NKV, HS)
    assert_within("out", out, out_ref, half_ulp_bf16(out_ref) + out_b)
    q_end, k_end = NH * HS, (NH + NKV) * HS
    for name, part, bound in (("dq", slice(0, q_end), dq_b), ("dk", slice(q_end, k_end), dk_b), ("dv", slice(k_end, None), dv_b)):
        ref = dqkv_ref[:, :, part].astype(np.float64)
        assert_within(name, dqkv[:, :, part], ref, half_ulp_bf16(ref) + bound + 2 * U * np.abs(ref))
    # lse = s - log p at each row's largest CPU probability (s in float64 from the inputs)
    x = qkv.astype(np.float64)
    scale = 1.0 / np.sqrt(HS)
    rows = np.arange(T)
    for b in range(B):
        for h in range(NH):
            kvh = h // (NH // NKV)
            j = att[b, h].argmax(axis=1)
            s = (x[b, :, h * HS:(h + 1) * HS] * x[b, j, (NH + kvh) * HS:(NH + kvh + 1) * HS]).sum(axis=1) * scale
            want = s - np.log(att[b, h, rows, j].astype(np.float64))
            tol = 4 * ds_err[b, h] + 2.0 ** -18 * (1.0 + np.abs(want))
            assert_within("lse", lse[b, h], want, tol)


ATTENTION_SHAPES = [  # B, T, NH, NKV, HS, sharpness of the scores
    (1, 1, 1, 1, 16, 1.0),      # one position
    (2, 37, 4, 4, 16, 1.0),     # GPT-2: a head for each key/value head; T under one block, not a tile multiple
    (1, 70, 4, 2, 32, 2.0),     # groups of 2; T past one block of 64 rows
    (2, 65, 3, 1, 64, 1.0),     # one key/value head for 3 query heads; T one past a block
    (1, 100, 8, 2, 128, 3.0),   # groups of 4, Llama's head size, sharp
    (1, 150, 2, 2, 64, 4.0),    # three blocks, the last partly filled, very sharp
]


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("shape", ATTENTION_SHAPES, ids=lambda s: "B%d_T%d_NH%d_NKV%d_HS%d_x%g" % s)
def test_attention_matches_cpu(emulator, tmp_path, shape, order):
    B, T, NH, NKV, HS, sharp = shape
    qkv, dout = attention_inputs(B, T, NH, NKV, HS, sharp, seed=T * 100 + HS + NH)
    gpu, cpu = run_attention(emulator, tmp_path, qkv, dout, NH, NKV, HS, order)
    check_attention(gpu, cpu, qkv, dout, NH, NKV, HS)


@pytest.mark.parametrize("which", ["q", "k", "v", "dout"])
def test_attention_bounds_notice_one_changed_input(emulator, tmp_path, which):
    """The comparisons fail when the CPU sees one element of q, k, v or dout replaced by its
    neighbour (the kernels the unchanged inputs), on a shape with groups and several blocks: one
    element read from the wrong place shows."""
    B, T, NH, NKV, HS = 1, 70, 4, 2, 32
    qkv, dout = attention_inputs(B, T, NH, NKV, HS, 2.0, seed=5)
    gpu, _ = run_attention(emulator, tmp_path, qkv, dout, NH, NKV, HS)
    col = {"q": 1 * HS + 3, "k": (NH + 1) * HS + 3, "v": (NH + NKV + 1) * HS + 3, "dout": 1 * HS + 3}[which]
    changed_qkv, changed_dout = qkv.copy(), dout.copy()
    target = changed_dout if which == "dout" else changed_qkv
    target[0, 40, col] = target[0, 40, col + 1]
    assert abs(target[0, 40, col] - (dout if which == "dout" else qkv)[0, 40, col]) > 0.1
    _, cpu = run_attention(emulator, tmp_path, changed_qkv, changed_dout, NH, NKV, HS)
    with pytest.raises(AssertionError):
        check_attention(gpu, cpu, qkv, dout, NH, NKV, HS)


def test_attention_refuses_a_head_size_it_has_no_kernel_for(emulator, tmp_path):
    qkv, dout = attention_inputs(1, 4, 2, 2, 24, 1.0, seed=1)
    inp, outp = tmp_path / "in.bin", tmp_path / "out.bin"
    with open(inp, "wb") as f:
        np.array([ATTENTION, 1, 4, 2, 2, 24], np.int32).tofile(f)
        qkv.astype(np.float32).tofile(f)
        dout.astype(np.float32).tofile(f)
    proc = run_program([emulator, inp, outp])
    assert proc.returncode != 0 and "head_dim must be 16, 32, 64 or 128" in proc.stderr


# ---------------------------------------------------------------------------------------------
# embedding

def run_embedding(emulator, tmp_path, tokens, wte, wpe, dout, dwte0, dwpe0, bf16_stream, order="forward"):
    B, T = tokens.shape
    V, C = wte.shape
    maxT = wpe.shape[0] if wpe is not None else T
    inp, outp = tmp_path / "in.bin", tmp_path / "out.bin"
    with open(inp, "wb") as f:
        np.array([EMBEDDING, B, T, C, V, maxT, wpe is not None, bf16_stream], np.int32).tofile(f)
        tokens.astype(np.int32).tofile(f)
        for a in (wte, wpe, dout, dwte0, dwpe0):
            if a is not None:
                a.astype(np.float32).tofile(f)
    proc = run_program([emulator, inp, outp], order)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    raw = np.fromfile(outp, np.float32)
    shapes = [(B, T, C), (V, C)] + ([(maxT, C)] if wpe is not None else [])
    arrays, at = [], 0
    for _ in range(2):
        for shape in shapes:
            n = int(np.prod(shape))
            arrays.append(raw[at:at + n].reshape(shape))
            at += n
    assert at == raw.size
    k = len(shapes)
    return arrays[:k], arrays[k:]


EMBEDDING_SHAPES = [  # B, T, C, V, maxT, learned positions (GPT-2), bf16 stream
    (2, 37, 48, 50, 64, True, False),    # GPT-2, fp32 stream
    (2, 37, 48, 50, 64, True, True),     # GPT-2, bf16 stream
    (3, 20, 40, 7, 20, False, False),    # Llama (no wpe): few tokens, each many times
    (3, 20, 40, 7, 20, False, True),
    (1, 1, 5, 3, 1, True, True),         # one position, less than a block of threads
    (4, 64, 96, 1000, 128, True, False), # several blocks per row of the grid; token 0 at many positions
]


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("shape", EMBEDDING_SHAPES, ids=lambda s: "B%d_T%d_C%d_V%d_maxT%d_%s_%s" % (
    s[:5] + ("wpe" if s[5] else "nowpe", "bf16" if s[6] else "fp32")))
def test_embedding_matches_cpu(emulator, tmp_path, shape, order):
    B, T, C, V, maxT, has_wpe, bf16_stream = shape
    rng = np.random.default_rng(B * 1000 + T + C)
    tokens = rng.integers(0, V, (B, T)).astype(np.int32)
    tokens[:, ::3] = 0   # a token repeated within and across sequences
    wte = to_bf16(rng.standard_normal((V, C)))
    wpe = to_bf16(0.5 * rng.standard_normal((maxT, C))) if has_wpe else None
    dout = rng.standard_normal((B, T, C)).astype(np.float32)
    if bf16_stream:
        dout = to_bf16(dout)
    dwte0 = (0.1 * rng.standard_normal((V, C))).astype(np.float32)
    dwpe0 = (0.1 * rng.standard_normal((maxT, C))).astype(np.float32) if has_wpe else None
    gpu, cpu = run_embedding(emulator, tmp_path, tokens, wte, wpe, dout, dwte0, dwpe0, bf16_stream, order)
    out = gpu[0]
    want = to_bf16(cpu[0]) if bf16_stream else cpu[0]   # the CPU's fp32 sum, stored as the stream's type
    assert not np.isnan(out).any() and np.array_equal(out.view(np.uint32), want.view(np.uint32))
    # dwte: each row the sum of its token's positions' gradients, in whatever order the adds ran
    d64 = np.abs(dout.astype(np.float64)).reshape(B * T, C)
    counts = np.bincount(tokens.ravel(), minlength=V)
    terms = np.zeros((V, C))
    np.add.at(terms, tokens.ravel(), d64)
    bound = (counts[:, None] + 2) * U * (terms + np.abs(dwte0)) * 2   # both sides' roundings
    assert_within("dwte", gpu[1], cpu[1].astype(np.float64), bound)
    assert np.array_equal(gpu[1][counts == 0], dwte0[counts == 0])   # tokens not seen keep their values
    if has_wpe:
        terms = np.abs(dout.astype(np.float64)).sum(axis=0)   # (T, C)
        bound = np.zeros((maxT, C))
        bound[:T] = (B + 2) * U * (terms + np.abs(dwpe0[:T])) * 2
        assert_within("dwpe", gpu[2], cpu[2].astype(np.float64), bound)
        assert np.array_equal(gpu[2][T:], dwpe0[T:])   # positions past T untouched
