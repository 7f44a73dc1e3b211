"""The classifier kernels of the GPU backend (llmc/fused_classifier.cuh) run on the CPU through
test/fused_classifier_emu.cpp (the GPU emulation of test/gpu_emu.h) against a NumPy float64
oracle written from the definitions, over the first V of each row's Vp logits:
lse = log sum_v exp(logit_v), loss = lse - logit_target where the mask is set (else 0), and the
gradient written over the logits, weight * (softmax - onehot(target)) for v < V and 0 for the
padded columns.

The scalar kernels, the 8-wide ones (16-byte loads and stores), the staged one (the row copied to
shared memory in the first pass, the gradient computed from the copy) and the pick between them run, in
the three ways the model calls them: the forward alone (the logits must stay as they were), the
forward with the gradient, and the forward followed by the separate backward; with and without a
mask, with vocabularies padded or not and rows that are and are not a multiple of 8 wide, and with
the threads of each block and the blocks of each launch scheduled forward, in reverse and (the
blocks) shuffled (gpu_emu.ORDERS). A mutation check confirms that an
oracle that lets the padded columns into the softmax fails the comparison."""
import numpy as np
import pytest

from conftest import ROOT
from gpu_emu import ORDERS, build_emulator, rewrite_launches, run_program, to_bf16


SCALAR, VEC8, PICKED, STAGED = 0, 1, 2, 3
FORWARD, FUSED, SEPARATE = 0, 1, 2


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    source = (ROOT / "llmc" / "fused_classifier.cuh").read_text()
    return build_emulator(tmp_path_factory.mktemp("classifier"), rewrite_launches(source, 4), "fused_classifier_emu")


def make_inputs(N, V, Vp, has_mask, seed):
    rng = np.random.default_rng(seed)
    logits = to_bf16(rng.standard_normal((N, Vp)) * 3.0)
    targets = rng.integers(0, V, N).astype(np.int32)
    mask = (np.arange(N) % 3 != 1).astype(np.float32) if has_mask else None
    weights = (0.5 + rng.random(N)).astype(np.float32)
    if mask is not None:
        weights[mask == 0] = 0.0      # the caller's contract: no weight where the mask is 0
        targets[mask == 0] = -7       # and such a row's target is never read
    return logits, targets, mask, weights


def run_emulator(emulator, tmp_path, logits, targets, mask, weights, V, kernel, mode, misalign=0, order="forward"):
    N, Vp = logits.shape
    inp, outp = tmp_path / "in.bin", tmp_path / "out.bin"
    with open(inp, "wb") as f:
        np.array([N, V, Vp, kernel, mode, mask is not None, misalign], np.int32).tofile(f)
        logits.astype(np.float32).tofile(f)
        targets.astype(np.int32).tofile(f)
        if mask is not None:
            mask.astype(np.float32).tofile(f)
        weights.astype(np.float32).tofile(f)
    proc = run_program([emulator, inp, outp], order)
    if proc.returncode != 0:
        return proc, None
    raw = np.fromfile(outp, np.float32)
    assert raw.size == 2 * N + N * Vp
    return proc, (raw[:N], raw[N:2 * N], raw[2 * N:].reshape(N, Vp))


def oracle(logits, targets, mask, weights, V, padded_in_softmax=False):
    x = logits.astype(np.float64)
    cols = x if padded_in_softmax else x[:, :V]
    m = cols.max(axis=1, keepdims=True)
    lse = (m + np.log(np.exp(cols - m).sum(axis=1, keepdims=True)))[:, 0]
    active = np.ones(len(x), bool) if mask is None else mask != 0
    rows = np.arange(len(x))
    losses = np.where(active, lse - x[rows, np.where(active, targets, 0)], 0.0)
    grad = np.zeros_like(x)
    grad[:, :V] = np.exp(x[:, :V] - lse[:, None])
    grad[rows[active], targets[active]] -= 1.0
    grad *= weights[:, None]
    return lse, losses, grad


def assert_matches(out, ref, logits, mode):
    lse, losses, after = out
    rlse, rlosses, rgrad = ref
    np.testing.assert_allclose(lse, rlse, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(losses, rlosses, rtol=1e-5, atol=1e-5)
    if mode == FORWARD:
        assert np.array_equal(after, logits)   # the forward alone keeps the logits
    else:
        _, e = np.frexp(rgrad)
        bound = np.ldexp(1.0, e - 9) + 1e-6 * np.abs(rgrad).max()   # half a bf16 ulp, plus fp32 arithmetic
        assert np.all(np.abs(after - rgrad) <= bound), np.abs(after - rgrad).max()


SHAPES = [  # N, V, Vp, has_mask
    (4, 100, 128, True),      # padded vocabulary, masked rows
    (3, 1000, 1000, False),   # a multiple of 8, no padding
    (5, 4093, 4096, True),    # padding inside the last 8-wide chunk
]


@pytest.mark.parametrize("mode", [FORWARD, FUSED, SEPARATE])
@pytest.mark.parametrize("kernel", [SCALAR, VEC8, STAGED])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("order", ORDERS)
def test_classifier_matches_oracle(emulator, tmp_path, shape, kernel, mode, order):
    N, V, Vp, has_mask = shape
    logits, targets, mask, weights = make_inputs(N, V, Vp, has_mask, seed=V)
    proc, out = run_emulator(emulator, tmp_path, logits, targets, mask, weights, V, kernel, mode, order=order)
    assert out is not None, proc.stdout + proc.stderr
    assert_matches(out, oracle(logits, targets, mask, weights, V), logits, mode)


@pytest.mark.parametrize("kernel", [SCALAR, VEC8, STAGED])
def test_gpt2_vocabulary_in_reverse_thread_order(emulator, tmp_path, kernel):
    N, V, Vp = 2, 50257, 50304
    logits, targets, mask, weights = make_inputs(N, V, Vp, False, seed=5)
    proc, out = run_emulator(emulator, tmp_path, logits, targets, mask, weights, V, kernel, FUSED, order="reverse")
    assert out is not None, proc.stdout + proc.stderr
    assert_matches(out, oracle(logits, targets, mask, weights, V), logits, FUSED)


def test_pick_takes_the_8_wide_kernels_only_for_aligned_rows(emulator, tmp_path):
    """The picked result is bit for bit the 8-wide kernels' for rows of a multiple of 8 that start
    on 16 bytes (with a gradient, through the staged kernel, which must give the same bits), else
    the scalar kernels'."""
    def result(V, Vp, kernel, misalign=0, mode=FUSED):
        logits, targets, mask, weights = make_inputs(3, V, Vp, True, seed=11)
        proc, out = run_emulator(emulator, tmp_path, logits, targets, mask, weights, V, kernel, mode, misalign)
        assert out is not None, proc.stdout + proc.stderr
        return np.concatenate([a.ravel() for a in out])
    for mode in (FUSED, SEPARATE):
        assert np.array_equal(result(300, 304, PICKED, mode=mode), result(300, 304, VEC8, mode=mode))
        assert np.array_equal(result(300, 304, STAGED, mode=mode), result(300, 304, VEC8, mode=mode))
        assert np.array_equal(result(300, 303, PICKED, mode=mode), result(300, 303, SCALAR, mode=mode))
        assert np.array_equal(result(300, 304, PICKED, 1, mode), result(300, 304, SCALAR, 1, mode))
    # the comparisons above can tell the kernels apart: their sums round differently, which shows
    # in the lse where it is small (a float's resolution at 10, a usual lse, hides it), in some
    # rows and not in others: 8 rows, so that some row shows it
    logits, targets, mask, weights = make_inputs(8, 50257, 50304, False, seed=11)
    logits = to_bf16(logits - (oracle(logits, targets, mask, weights, 50257)[0][:, None] - 0.3))
    lse = [run_emulator(emulator, tmp_path, logits, targets, mask, weights, 50257, k, FORWARD)[1][0] for k in (SCALAR, VEC8)]
    assert not np.array_equal(lse[0], lse[1])


@pytest.mark.parametrize("kernel", [VEC8, STAGED])
def test_8_wide_kernels_refuse_unaligned_rows(emulator, tmp_path, kernel):
    logits, targets, mask, weights = make_inputs(2, 300, 303, False, seed=3)
    proc, out = run_emulator(emulator, tmp_path, logits, targets, mask, weights, 300, kernel, FUSED)
    assert out is None and "rows must start on 16 bytes" in proc.stderr


def test_staged_kernel_refuses_rows_wider_than_its_shared_memory(emulator, tmp_path):
    V = Vp = 112 * 1024 // 2 + 8   # CLASSIFIER_STAGE_MAX_BYTES / 2 bf16, and one more 8-wide chunk
    logits, targets, mask, weights = make_inputs(1, V, Vp, False, seed=4)
    proc, out = run_emulator(emulator, tmp_path, logits, targets, mask, weights, V, STAGED, FUSED)
    assert out is None and "fit in a block's shared memory" in proc.stderr
    proc, out = run_emulator(emulator, tmp_path, logits, targets, mask, weights, V, PICKED, FUSED)
    assert out is not None, proc.stdout + proc.stderr   # the pick falls back to the 8-wide kernel
    assert_matches(out, oracle(logits, targets, mask, weights, V), logits, FUSED)


def test_oracle_with_padded_columns_in_the_softmax_fails(emulator, tmp_path):
    N, V, Vp = 4, 100, 128
    logits, targets, mask, weights = make_inputs(N, V, Vp, True, seed=V)
    _, out = run_emulator(emulator, tmp_path, logits, targets, mask, weights, V, VEC8, FUSED)
    with pytest.raises(AssertionError):
        assert_matches(out, oracle(logits, targets, mask, weights, V, padded_in_softmax=True), logits, FUSED)
