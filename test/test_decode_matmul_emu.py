"""The decode step's product (llmc/decode_matmul.cuh: out = act(inp @ W^T + bias) for at most 64
rows, on the tensor cores, the K dimension split over blocks) runs on the CPU through
test/decode_matmul_emu.cpp (the GPU emulation of test/gpu_emu.h, mma.sync from
test/gpu_emu_mma.h) against a NumPy float64 oracle written from the definition, with GELU in its
tanh form. Cases cover row counts that fill and do not fill the 8-row n-tiles (every
instantiation), one K split and several (the last block of each feature tile adding the splits'
partials), with and without bias and GELU, and check that the tile counters are back at 0 after
the launch, as a CUDA graph replay needs. decode_matmul_swiglu, which forms its input from the
MLP's gate and up as it loads it, must give the same bits as decode_matmul on SwiGLU's output
(the activations as swiglu.cuh rounds them, which the emulator also returns), and match the
oracle on those activations. A mutation check confirms that an oracle without the
bias fails the comparison, and the launcher refuses shapes it cannot take. The products run with
their blocks in index order, in reverse and shuffled (gpu_emu.ORDERS), so that the sum of the
splits must be taken by whichever block of a tile finishes last, as on a GPU, not by a fixed one."""
import numpy as np
import pytest

from conftest import ROOT
from gpu_emu import ORDERS, build_emulator, rewrite_launches, run_program, to_bf16

SOURCE = (ROOT / "llmc" / "decode_matmul.cuh").read_text()


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    return build_emulator(tmp_path_factory.mktemp("decode_matmul"), rewrite_launches(SOURCE, 4), "decode_matmul_emu")


def oracle(inp, weight, bias, gelu, drop_bias=False):
    y = inp.astype(np.float64) @ weight.astype(np.float64).T
    if bias is not None and not drop_bias:
        y = y + bias.astype(np.float64)
    if gelu:
        y = 0.5 * y * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (y + 0.044715 * y ** 3)))
    return y


def run(emulator, tmp_path, M, IC, OC, has_bias, gelu, sms, seed, order="forward", swiglu=0):
    rng = np.random.default_rng(seed)
    inp = to_bf16(rng.standard_normal((M, IC * (2 if swiglu else 1))))
    weight = to_bf16(rng.standard_normal((OC, IC)) / np.sqrt(IC))
    bias = to_bf16(0.5 * rng.standard_normal(OC)) if has_bias else None
    inp_path, out_path = tmp_path / "in.bin", tmp_path / "out.bin"
    with open(inp_path, "wb") as f:
        np.array([M, IC, OC, has_bias, gelu, sms, swiglu], np.int32).tofile(f)
        for a in (inp, weight, bias):
            if a is not None:
                a.astype(np.float32).tofile(f)
    proc = run_program([emulator, inp_path, out_path], order)
    return proc, out_path, (inp, weight, bias)


def check(got, inputs, gelu, drop_bias=False):
    inp, weight, bias = inputs
    want = oracle(inp, weight, bias, gelu, drop_bias)
    # one bf16 rounding of the output (half an ulp) plus fp32 sums over IC terms
    _, e = np.frexp(want)
    terms = np.abs(inp.astype(np.float64)) @ np.abs(weight.astype(np.float64)).T
    bound = np.ldexp(1.0, e - 9) + 4 * inp.shape[1] * np.finfo(np.float32).eps * (terms + 1.0)
    assert np.all(np.abs(got - want) <= bound), np.abs(got - want).max()


CASES = [  # M, IC, OC, has_bias, gelu, sms
    (1, 32, 16, 1, 0, 1),         # one row, one chunk, one split
    (5, 64, 48, 0, 0, 4),         # n-tile partly filled; splits = 2 (one chunk each)
    (13, 96, 32, 1, 1, 8),        # two n-tiles, GELU, as many splits as chunks (3)
    (37, 256, 64, 1, 0, 16),      # four n-tiles (5 rows past M), 8 splits of one chunk
    (64, 768, 48, 1, 1, 132),     # GPT-2's width, 64 rows: six splits of four chunks
    (64, 576, 32, 0, 0, 2),       # SmolLM2's width: two splits of 9 chunks over four warps
    (8, 1056, 16, 1, 0, 1),       # two splits of 16 and 17 chunks: a warp takes 4 or 5, one or two prefetch groups
    (64, 576, 64, 0, 0, 2),       # SmolLM2's width: one split (2 sms for 4 tiles), 18 chunks over four warps
    (8, 1056, 32, 1, 0, 1),       # one split, 33 chunks: a warp takes 8 or 9, two or three prefetch groups
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "M%d_IC%d_OC%d_b%d_g%d_sms%d" % c)
@pytest.mark.parametrize("order", ORDERS)
def test_decode_matmul_matches_oracle(emulator, tmp_path, case, order):
    M, IC, OC, has_bias, gelu, sms = case
    proc, out_path, inputs = run(emulator, tmp_path, M, IC, OC, has_bias, gelu, sms, seed=M * 31 + IC + OC, order=order)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    raw = np.fromfile(out_path, np.float32)
    assert raw.size == M * OC + OC // 16
    got, counters = raw[:M * OC].reshape(M, OC), raw[M * OC:]
    check(got, inputs, gelu)
    assert np.all(counters == 0), "a tile counter was not reset for the next launch"


def test_oracle_without_bias_fails(emulator, tmp_path):
    proc, out_path, inputs = run(emulator, tmp_path, 9, 64, 32, 1, 0, 4, seed=3)
    assert proc.returncode == 0, proc.stderr
    got = np.fromfile(out_path, np.float32)[:9 * 32].reshape(9, 32)
    check(got, inputs, 0)
    with pytest.raises(AssertionError):
        check(got, inputs, 0, drop_bias=True)


@pytest.mark.parametrize("M,IC,OC", [(65, 32, 16), (4, 48, 16), (4, 32, 24)])
def test_refuses_shapes_it_cannot_take(emulator, tmp_path, M, IC, OC):
    proc, _, _ = run(emulator, tmp_path, M, IC, OC, 0, 0, 4, seed=1)
    assert proc.returncode != 0 and "decode_matmul: needs" in proc.stderr


SWIGLU_CASES = [  # M, IC, OC, has_bias, sms
    (3, 32, 16, 0, 1),        # one chunk, one split
    (64, 1536, 576, 0, 132),  # SmolLM2-135M's fcproj at 64 rows
    (13, 256, 48, 1, 8),      # two n-tiles, bias, several splits
]


@pytest.mark.parametrize("case", SWIGLU_CASES, ids=lambda c: "M%d_IC%d_OC%d_b%d_sms%d" % c)
@pytest.mark.parametrize("order", ORDERS)
def test_swiglu_input_equals_the_two_step_path(emulator, tmp_path, case, order):
    M, IC, OC, has_bias, sms = case
    proc, out_path, (fc, weight, bias) = run(emulator, tmp_path, M, IC, OC, has_bias, 0, sms, seed=M + IC + OC, order=order,
                                             swiglu=1)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    raw = np.fromfile(out_path, np.float32)
    n_out, tiles = M * OC, OC // 16
    assert raw.size == 2 * n_out + tiles + M * IC
    fused, counters = raw[:n_out].reshape(M, OC), raw[n_out:n_out + tiles]
    plain = raw[n_out + tiles:2 * n_out + tiles].reshape(M, OC)
    act = raw[2 * n_out + tiles:].reshape(M, IC)
    assert np.array_equal(fused.view(np.uint32), plain.view(np.uint32)), "the fused input differs from the two-step path"
    assert np.all(counters == 0)
    # the activations the emulator returns are SwiGLU's (to bf16 rounding), and the product is right
    gate, up = fc[:, :IC].astype(np.float64), fc[:, IC:].astype(np.float64)
    swiglu = gate / (1.0 + np.exp(-gate)) * up
    assert np.all(np.abs(act - swiglu) <= np.ldexp(1.0, np.frexp(swiglu)[1] - 8) + 1e-30)
    check(fused, (act, weight, bias), 0)
