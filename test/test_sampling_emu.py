"""The GPU sampler of the rollout engine (llmc/sampling.cuh) runs on the CPU through
test/sampling_emu.cpp (the GPU emulation of test/gpu_emu.h) against a NumPy reference written
from the math of its documented definition:
  - greedy (temperature 0) takes the largest logit, the smallest id among equal ones;
  - the log-probability is log_softmax(logits)[token] at temperature 1 over the V used tokens;
  - the candidate set orders tokens by logit descending, then id ascending; top-k keeps the first
    k; top-p keeps, inside that, the tokens whose softmax mass (at the temperature) before them
    is below top_p times the mass of the top-k set;
  - the token is a draw from the softmax at the temperature restricted to the set, keyed by the
    sequence's Philox key and step, so that a sequence's draw does not depend on the other rows.
The set the fast kernel (radix descent) draws from is observed through the emulator's __fmul_rn,
called once per token of the set; it must equal the reference's for random logits of several
vocabulary sizes up to SmolLM2's 49152, and for tied logits at the boundary. The distribution of
many draws (different steps) on a small vocabulary passes a chi-square test against the filtered
softmax, and fails it against the softmax at a wrong temperature. Each draw is also replayed
exactly: the argmax over the reference set of (x - max) / T plus Gumbel noise from a NumPy
Philox4x32-10 (checked on Random123's known-answer vectors) of the row's key and step."""
import math
import re
import subprocess

import numpy as np
import pytest

from conftest import ROOT
from gpu_emu import build_emulator, rewrite_launches

SMOLLM2_VOCAB = 49152


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    build = tmp_path_factory.mktemp("sampling")
    launched = rewrite_launches((ROOT / "llmc" / "sampling.cuh").read_text(), 2)
    # the dynamic shared array -> the emulated block's dynamic shared memory
    launched, n = re.subn(r"extern __shared__ __align__\(16\) unsigned char (\w+)\[\];",
                          r"unsigned char *\1 = smem.data();", launched)
    assert n == 1 and "extern __shared__" not in launched, "the dynamic shared array was not rewritten"
    return build_emulator(build, launched, "sampling_emu")


def run_sampler(emulator, tmp_path, logits, temperature, top_k, top_p, keys, steps, V=None, reference=False,
                order="forward"):
    """(tokens, logprobs, err, sets) from sample_rows() under emulation; logits (n_rows, Vp) of
    which the first V (default all) are used; sets[r] the float32 x - max of row r's set."""
    n, Vp = logits.shape
    V = Vp if V is None else V
    inp, outp = tmp_path / "in.bin", tmp_path / "out.bin"
    with open(inp, "wb") as f:
        np.array([n, V, Vp, int(reference)], np.int32).tofile(f)
        np.array([temperature], np.float32).tofile(f)
        np.array([top_k], np.int32).tofile(f)
        np.array([top_p], np.float32).tofile(f)
        np.asarray(keys, np.uint64).tofile(f)
        np.asarray(steps, np.int32).tofile(f)
        logits.astype(np.float32).tofile(f)
    proc = subprocess.run([str(emulator), str(inp), str(outp), order], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    raw = np.fromfile(outp, np.uint8)
    tokens = raw[:4 * n].view(np.int32).copy()
    logprobs = raw[4 * n:8 * n].view(np.float32).copy()
    err = int(raw[8 * n:8 * n + 4].view(np.int32)[0])
    sets, at = [], 8 * n + 4
    for _ in range(n):
        k = int(raw[at:at + 4].view(np.int32)[0])
        sets.append(raw[at + 4:at + 4 + 4 * k].view(np.float32).copy())
        at += 4 + 4 * k
    assert at == raw.size
    return tokens, logprobs, err, sets


def log_softmax(x):
    """float64 log-softmax of one row."""
    x = np.asarray(x, np.float64)
    z = x - x.max()
    return z - np.log(np.exp(z).sum())


def reference_set(x, temperature, top_k, top_p):
    """The ids of the candidate set of logits x (one row), from the definition: tokens in order
    of logit descending, id ascending; the first top_k (0 or >= V: all); of those, the ones whose
    mass exp(x / T) before them (float64) is below top_p times the mass of the top-k set."""
    x64 = np.asarray(x, np.float64)
    V = len(x64)
    order = np.lexsort((np.arange(V), -x64))   # last key first: logit descending, then id ascending
    if 0 < top_k < V:
        order = order[:top_k]
    if np.float32(top_p) < 1:
        p = np.exp((x64[order] - x64.max()) / np.float64(np.float32(temperature)))
        before = np.concatenate([[0.0], np.cumsum(p)[:-1]])
        order = order[before < np.float64(np.float32(top_p)) * p.sum()]
    return np.sort(order)


def filtered_softmax(x, temperature, top_k, top_p):
    """float64 probabilities over the V tokens of the draw: softmax at the temperature
    restricted to reference_set."""
    keep = reference_set(x, temperature, top_k, top_p)
    x64 = np.asarray(x, np.float64)
    w = np.zeros(len(x64))
    w[keep] = np.exp((x64[keep] - x64.max()) / temperature)
    return w / w.sum()


def chi_square_p_value(stat, df):
    """P(chi2_df >= stat) for an integer df, in closed form (the regularized upper incomplete
    gamma function at half-integer and integer shape)."""
    h = stat / 2.0
    if df % 2 == 0:
        return math.exp(-h) * sum(h ** i / math.factorial(i) for i in range(df // 2))
    return math.erfc(math.sqrt(h)) + math.exp(-h) * sum(h ** (i - 0.5) / math.gamma(i + 0.5)
                                                         for i in range(1, (df + 1) // 2))


PHILOX_DOMAIN_SAMPLING = int.from_bytes(b"SAMP", "big")


def philox4x32_10(counter, key0, key1):
    """Philox4x32-10 (Salmon et al., SC 2011) on arrays: counter (4, n) uint32 words, key words
    key0, key1 (n) -> (4, n) uint32. Each round multiplies words 0 and 2 by M0, M1 and mixes
    the high halves with words 1, 3 and the round key; the key grows by the Weyl constants."""
    M0, M1, W0, W1, MASK = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85, 0xFFFFFFFF
    c = [np.asarray(w, np.uint64) & MASK for w in counter]
    k0, k1 = np.asarray(key0, np.uint64) & MASK, np.asarray(key1, np.uint64) & MASK
    for _ in range(10):
        p0, p1 = c[0] * np.uint64(M0), c[2] * np.uint64(M1)
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ k0, p1 & np.uint64(MASK), (p0 >> np.uint64(32)) ^ c[3] ^ k1,
             p0 & np.uint64(MASK)]
        k0, k1 = (k0 + np.uint64(W0)) & np.uint64(MASK), (k1 + np.uint64(W1)) & np.uint64(MASK)
    return np.array(c, np.uint64)


def test_philox_known_answers():
    """Random123's known-answer vectors for philox4x32 10 (counter, key -> output)."""
    vectors = [([0] * 4, [0, 0], [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]),
               ([0xffffffff] * 4, [0xffffffff] * 2, [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]),
               ([0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344], [0xa4093822, 0x299f31d0],
                [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1])]
    for counter, key, want in vectors:
        got = philox4x32_10([[w] for w in counter], [key[0]], [key[1]])[:, 0]
        assert [int(w) for w in got] == want


def gumbel_draw_scores(x, temperature, key, step):
    """float64 scores (x_v - max) / T + G_v of the Gumbel-max draw for one row, G_v from the
    uniform ((bits >> 9) + 1/2) / 2^23 of Philox(key, counter (v / 4, step, "SAMP", 0)) lane v % 4."""
    V = len(x)
    groups = np.arange((V + 3) // 4, dtype=np.uint64)
    n = len(groups)
    bits = philox4x32_10([groups, np.full(n, step), np.full(n, PHILOX_DOMAIN_SAMPLING), np.zeros(n)],
                         np.full(n, key & 0xFFFFFFFF), np.full(n, key >> 32))
    u = ((bits.T.reshape(-1)[:V] >> np.uint64(9)).astype(np.float64) + 0.5) / 2.0 ** 23
    x64 = np.asarray(x, np.float64)
    return (x64 - x64.max()) / temperature - np.log(-np.log(u))


def check_logprobs(x_rows, tokens, logprobs, V):
    for r in range(len(tokens)):
        want = log_softmax(x_rows[r, :V])[tokens[r]]
        assert abs(float(logprobs[r]) - want) <= 1e-5 * max(1.0, abs(want)), (r, logprobs[r], want)


@pytest.mark.parametrize("order", ["forward", "reverse"])
def test_greedy_takes_argmax_smallest_id_on_ties(emulator, tmp_path, order):
    rng = np.random.default_rng(1)
    V, Vp = 1000, 1024
    x = (rng.standard_normal((4, Vp)) * 3).astype(np.float32)
    x[:, V:] = 1e4                     # padding past V is never a token
    x[0, [17, 600, 999]] = 20.0        # a tie for the maximum: the smallest id wins
    x[1, [998, 999]] = 15.0
    x[2] = -1.0                        # every logit equal
    x[3, 0] = -100.0
    tokens, logprobs, err, sets = run_sampler(emulator, tmp_path, x, 0.0, 0, 1.0, [1, 2, 3, 4], [0, 0, 0, 0], V=V,
                                              order=order)
    assert err == 0
    assert list(tokens) == [17, 998, 0, int(np.argmax(x[3, :V]))]
    assert all(len(s) == 0 for s in sets)   # greedy draws nothing
    check_logprobs(x, tokens, logprobs, V)


def test_greedy_smollm2_vocabulary(emulator, tmp_path):
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((2, SMOLLM2_VOCAB)) * 4).astype(np.float32)
    x[1, [40000, 40001]] = 30.0
    tokens, logprobs, err, _ = run_sampler(emulator, tmp_path, x, 0.0, 0, 1.0, [5, 6], [3, 3])
    assert err == 0
    assert list(tokens) == [int(np.argmax(x[0])), 40000]
    check_logprobs(x, tokens, logprobs, SMOLLM2_VOCAB)


SET_CASES = [  # V, temperature, top_k, top_p, logit scale
    (1000, 1.0, 50, 1.0, 3.0),
    (1000, 0.8, 0, 0.9, 3.0),
    (4096, 1.2, 200, 0.7, 2.0),
    (4096, 0.5, 3000, 0.99, 1.0),
    (SMOLLM2_VOCAB, 1.0, 40, 1.0, 4.0),
    (SMOLLM2_VOCAB, 1.0, 0, 0.95, 4.0),
    (SMOLLM2_VOCAB, 0.7, 1000, 0.8, 2.0),
]


@pytest.mark.parametrize("case", SET_CASES, ids=lambda c: "V%d_T%g_k%d_p%g" % c[:4])
def test_sets_match_reference(emulator, tmp_path, case):
    """The fast kernel's set (radix descent) equals the reference's, the token is in it, and the
    log-probability is right; for V <= 4096 the reference kernel draws the same tokens."""
    V, T, k, p, scale = case
    rng = np.random.default_rng(V + k)
    x = (rng.standard_normal((2, V)) * np.array([[scale], [scale * 0.3]])).astype(np.float32)
    keys, steps = [11, 12], [0, 9]
    orders = ["forward", "reverse"] if V <= 4096 else ["forward"]
    for order in orders:
        tokens, logprobs, err, sets = run_sampler(emulator, tmp_path, x, T, k, p, keys, steps, order=order)
        assert err == 0
        for r in range(2):
            keep = reference_set(x[r], T, k, p)
            assert len(keep) < V, "the case must filter"
            want = np.sort(x[r, keep] - x[r].max())   # float32 x - max, as the kernel computes it
            assert len(sets[r]) == len(keep), (r, len(sets[r]), len(keep))
            assert np.array_equal(np.sort(sets[r]), want)
            assert tokens[r] in keep
        check_logprobs(x, tokens, logprobs, V)
        if V <= 4096:
            ref_tokens, ref_logprobs, ref_err, ref_sets = run_sampler(emulator, tmp_path, x, T, k, p, keys, steps,
                                                                      reference=True, order=order)
            assert ref_err == 0 and list(ref_tokens) == list(tokens)
            for r in range(2):
                assert np.array_equal(np.sort(ref_sets[r]), np.sort(sets[r]))


@pytest.mark.parametrize("top_k, top_p", [(37, 1.0), (0, 0.3), (90, 0.5)])
def test_ties_at_the_boundary(emulator, tmp_path, top_k, top_p):
    """Logits from three values: the set's boundary falls inside a group of equal logits, where
    the smaller ids are kept (the descent reaches the id bits); every draw is in the reference set."""
    rng = np.random.default_rng(top_k)
    V, n = 600, 12
    row = rng.choice(np.array([0.0, 0.5, 1.0], np.float32), V)
    x = np.tile(row, (n, 1))
    T = 1.0
    tokens, _, err, sets = run_sampler(emulator, tmp_path, x, T, top_k, top_p, [77] * n, np.arange(n))
    keep = reference_set(row, T, top_k, top_p)
    assert err == 0
    for r in range(n):
        assert len(sets[r]) == len(keep)
        assert tokens[r] in keep, (r, tokens[r])
    # the boundary group is split: some but not all of the tokens of its logit are kept
    boundary = row[keep].min()
    assert 0 < np.isin(np.flatnonzero(row == boundary), keep).sum() < (row == boundary).sum()


def test_draws_follow_filtered_softmax(emulator, tmp_path):
    """Chi-square of 1000 draws (one sequence, steps 0..999) against the softmax at temperature
    0.7 restricted to the top-6 / top-0.9 set; the same counts fail against temperature 1."""
    x_row = np.array([2.0, 1.6, 1.3, 1.1, 0.2, -0.3, -1.0, 1.45], np.float32)
    T, k, p, n = 0.7, 6, 0.9, 1000
    x = np.tile(x_row, (n, 1))
    tokens, logprobs, err, _ = run_sampler(emulator, tmp_path, x, T, k, p, [0x1234567890ABCDEF] * n, np.arange(n))
    assert err == 0
    counts = np.bincount(tokens, minlength=len(x_row))

    def p_value(probs):
        support = probs > 0
        assert counts[~support].sum() == 0, "a draw outside the set"
        expected = n * probs[support]
        assert expected.min() >= 5
        stat = float(((counts[support] - expected) ** 2 / expected).sum())
        return chi_square_p_value(stat, int(support.sum()) - 1)

    want = filtered_softmax(x_row, T, k, p)
    assert (want > 0).sum() >= 4, "the set must leave a real choice"
    assert p_value(want) > 1e-4
    wrong = filtered_softmax(x_row, 1.0, k, p)
    assert np.array_equal(wrong > 0, want > 0), "the mutation changes only the temperature"
    assert p_value(wrong) < 1e-4
    check_logprobs(x[:50], tokens[:50], logprobs[:50], len(x_row))


def test_chi_square_p_value():
    """The closed form against values from its definition: df 2 is exp(-x/2); df 1 is erfc(sqrt(x/2))."""
    assert abs(chi_square_p_value(3.0, 2) - math.exp(-1.5)) < 1e-15
    assert abs(chi_square_p_value(3.841458820694124, 1) - 0.05) < 1e-12
    assert abs(chi_square_p_value(11.070497693516351, 5) - 0.05) < 1e-12


def test_draw_does_not_depend_on_other_rows(emulator, tmp_path):
    """A sequence's token (its key, step and logits) is the same alone, in a batch, at another
    position, and beside other sequences; another step or key of it draws differently somewhere."""
    rng = np.random.default_rng(5)
    V = 500
    x = (rng.standard_normal((6, V)) * 1.5).astype(np.float32)
    keys = [101, 202, 303, 404, 505, 606]
    steps = [4, 0, 7, 7, 2, 9]
    args = (1.0, 100, 0.95)
    alone = [run_sampler(emulator, tmp_path, x[i:i + 1], *args, keys[i:i + 1], steps[i:i + 1])[0][0] for i in (0, 3)]
    batch = run_sampler(emulator, tmp_path, x[:4], *args, keys[:4], steps[:4])[0]
    perm = [5, 3, 4, 0]
    other = run_sampler(emulator, tmp_path, x[perm], *args, [keys[i] for i in perm], [steps[i] for i in perm])[0]
    assert [batch[0], batch[3]] == alone
    assert [other[3], other[1]] == alone
    # the draws do depend on the step: over 8 steps a flat-ish row gives more than one token
    x8 = np.tile(x[0], (8, 1))
    assert len(set(run_sampler(emulator, tmp_path, x8, *args, [keys[0]] * 8, np.arange(8))[0])) > 1


def test_draws_replay_philox_gumbel_max(emulator, tmp_path):
    """Every token is the argmax over the reference set of (x - max) / T + Gumbel noise from an
    independent Philox of the row's key and step (rows whose two best scores are within 1e-4,
    where float32 rounding could decide, are not compared; most rows are)."""
    rng = np.random.default_rng(9)
    V, n, T, k, p = 2001, 24, 0.9, 300, 0.95
    x = (rng.standard_normal((n, V)) * 0.5).astype(np.float32)
    keys = [int(v) for v in rng.integers(0, 2 ** 64, n, dtype=np.uint64)]
    steps = [int(v) for v in rng.integers(0, 5000, n)]
    tokens, _, err, _ = run_sampler(emulator, tmp_path, x, T, k, p, keys, steps)
    assert err == 0
    compared = 0
    for r in range(n):
        keep = reference_set(x[r], T, k, p)
        scores = gumbel_draw_scores(x[r], T, keys[r], steps[r])[keep]
        best2 = np.sort(scores)[-2:]
        if best2[1] - best2[0] < 1e-4:
            continue
        assert tokens[r] == keep[np.argmax(scores)], r
        compared += 1
    assert compared >= n - 2


@pytest.mark.parametrize("reference", [False, True], ids=["fast", "reference"])
def test_nonfinite_logits_flag_the_row(emulator, tmp_path, reference):
    """A row with a NaN or an infinite logit sets SAMPLE_ERR_NONFINITE_LOGITS (1) and gets token
    0 and a NaN log-probability; the other rows are sampled as usual."""
    rng = np.random.default_rng(3)
    V = 300
    x = rng.standard_normal((3, V)).astype(np.float32)
    x[0, 123] = np.nan
    x[2, 7] = np.inf
    tokens, logprobs, err, sets = run_sampler(emulator, tmp_path, x, 1.0, 20, 1.0, [1, 2, 3], [0, 0, 0],
                                              reference=reference)
    assert err == 1
    assert tokens[0] == 0 and tokens[2] == 0 and np.isnan(logprobs[0]) and np.isnan(logprobs[2])
    assert tokens[1] in reference_set(x[1], 1.0, 20, 1.0)
    check_logprobs(x[1:2], tokens[1:2], logprobs[1:2], V)


def test_reference_kernel_refuses_large_top_p_vocabulary(emulator, tmp_path):
    """The reference kernel's top-p holds 64 decisions per thread: past V = 64 * 256 it sets
    SAMPLE_ERR_REFERENCE_VOCAB (4) instead of sampling."""
    x = np.zeros((1, 64 * 256 + 1), np.float32)
    tokens, logprobs, err, _ = run_sampler(emulator, tmp_path, x, 1.0, 0, 0.9, [1], [0], reference=True)
    assert err == 4 and tokens[0] == 0 and np.isnan(logprobs[0])
