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
Philox4x32-10 (checked on Random123's known-answer vectors) of the row's key and step (the
kernels score x / T + G, the same argmax: a constant shift of the row moves every score alike).

The split path (greedy and plain temperature sampling with each row cut over several blocks, the
one-block kernel merging their partials) must draw the reference kernel's and the one-block
kernel's tokens, on vocabularies that do not divide evenly into its blocks, aligned and unaligned
rows, up to its 32 blocks per row; flag rows with non-finite logits; advance the rows' state
except the padding rows'; and follow the config of each call when the same launches are replayed
with the config changed (top-k and top-p go to the one-block kernel)."""
import math

import numpy as np
import pytest

from conftest import ROOT
from gpu_emu import ORDERS, build_emulator, rewrite_launches, run_program

SMOLLM2_VOCAB = 49152


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    build = tmp_path_factory.mktemp("sampling")
    launched = rewrite_launches((ROOT / "llmc" / "sampling.cuh").read_text(), 2)
    return build_emulator(build, launched, "sampling_emu")


MODES = {"fast": 0, "reference": 1, "split": 2}


def run_calls(emulator, tmp_path, logits, configs, keys, steps, V=None, mode="fast", sms=132, advance=None,
              dummy_slot=-1, order="forward"):
    """Consecutive calls of sample_rows() under emulation on the same buffers (the split path's
    scratch and the rows' state), as a captured decode step's replays: logits (calls, n_rows, Vp)
    of which the first V (default all) are used, configs one (temperature, top_k, top_p) per call;
    mode "fast" (the one-block kernel alone), "reference" or "split" (with the split path's
    scratch, sized for `sms` multiprocessors); advance None or (row_token, row_pos, row_slot).
    Returns (blocks per row of the split path, [(tokens, logprobs, err, sets) per call], final
    (row_token, row_pos, row_step)), sets[r] the float32 logits of row r's set."""
    calls, n, Vp = logits.shape
    assert len(configs) == calls
    V = Vp if V is None else V
    inp, outp = tmp_path / "in.bin", tmp_path / "out.bin"
    tokens0, pos0, slots = advance if advance is not None else (np.zeros(n), np.zeros(n), np.zeros(n))
    with open(inp, "wb") as f:
        np.array([n, V, Vp, MODES[mode], sms, calls, int(advance is not None), dummy_slot], np.int32).tofile(f)
        for temperature, top_k, top_p in configs:
            np.array([temperature], np.float32).tofile(f)
            np.array([top_k], np.int32).tofile(f)
            np.array([top_p], np.float32).tofile(f)
        np.asarray(keys, np.uint64).tofile(f)
        for a in (steps, tokens0, pos0, slots):
            np.asarray(a, np.int32).tofile(f)
        logits.astype(np.float32).tofile(f)
    proc = run_program([emulator, inp, outp], order, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    raw = np.fromfile(outp, np.uint8)

    def ints(at, k):
        return raw[at:at + 4 * k].view(np.int32).copy()

    blocks, at, results = int(ints(0, 1)[0]), 4, []
    for _ in range(calls):
        tokens = ints(at, n)
        logprobs = raw[at + 4 * n:at + 8 * n].view(np.float32).copy()
        err = int(ints(at + 8 * n, 1)[0])
        sets, at = [], at + 8 * n + 4
        for _ in range(n):
            k = int(ints(at, 1)[0])
            sets.append(raw[at + 4:at + 4 + 4 * k].view(np.float32).copy())
            at += 4 + 4 * k
        results.append((tokens, logprobs, err, sets))
    state = (ints(at, n), ints(at + 4 * n, n), ints(at + 8 * n, n))
    assert at + 12 * n == raw.size
    return blocks, results, state


def run_sampler(emulator, tmp_path, logits, temperature, top_k, top_p, keys, steps, V=None, reference=False,
                order="forward", mode=None, sms=132):
    """(tokens, logprobs, err, sets) from one sample_rows() call under emulation; logits (n_rows,
    Vp) of which the first V (default all) are used; sets[r] the float32 logits of row r's set.
    mode as run_calls' (default: "reference" when reference, else "fast")."""
    mode = mode or ("reference" if reference else "fast")
    _, results, _ = run_calls(emulator, tmp_path, logits[None], [(temperature, top_k, top_p)], keys, steps, V=V,
                              mode=mode, sms=sms, order=order)
    return results[0]


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


@pytest.mark.parametrize("order", ORDERS)
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
    orders = ORDERS if V <= 4096 else ["forward"]
    for order in orders:
        tokens, logprobs, err, sets = run_sampler(emulator, tmp_path, x, T, k, p, keys, steps, order=order)
        assert err == 0
        for r in range(2):
            keep = reference_set(x[r], T, k, p)
            assert len(keep) < V, "the case must filter"
            want = np.sort(x[r, keep])   # the float32 logits the kernel scores
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


# ---------------------------------------------------------------------------------------------
# the split path: greedy and plain temperature sampling with each row cut over several blocks

SPLIT_THREADS = 256   # SAMPLE_SPLIT_THREADS: a thread's next group is this many groups on

SPLIT_CASES = [  # V, Vp, rows, sms, blocks per row (expected), temperature
    (3001, 3001, 4, 2, 2, 1.0),        # Vp % 4 != 0: rows alternately 16-byte aligned or not
    (3001, 3001, 4, 2, 2, 0.0),
    (9001, 9001, 5, 9, 7, 0.7),        # 2251 groups over 7 blocks
    (9001, 9088, 5, 9, 7, 0.0),
    (12289, 12289, 3, 4, 5, 1.3),
    (49157, 49280, 2, 16, 32, 1.0),    # the most blocks per row: the merge's whole warp
    (49157, 49157, 2, 16, 32, 0.0),
]


def split_logits(rng, rows, V, Vp, blocks):
    """Random rows with ties for the maximum in different blocks' ranges and inside one thread's
    tokens (two of a group, and the group a thread takes next), where greedy must take the
    smallest id; padding past V that would win if read."""
    x = (rng.standard_normal((rows, Vp)) * rng.uniform(0.5, 4.0, (rows, 1))).astype(np.float32)
    x[:, V:] = 1e4
    groups = (V + 3) // 4
    for r in range(rows):
        top = float(x[r, :V].max()) + 1.0
        spots = [4 * (b * groups // blocks) + 1 for b in range(blocks)]
        middle = spots[(r + len(spots) // 2) % len(spots)]
        pick = [spots[-1], middle, middle + 1, middle + 4 * SPLIT_THREADS]
        x[r, [v for v in pick if v < V]] = top
    return x


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("case", SPLIT_CASES, ids=lambda c: "V%d_Vp%d_rows%d_S%d_T%g" % (c[0], c[1], c[2], c[4], c[5]))
def test_split_path_matches_reference(emulator, tmp_path, case, order):
    """The split path draws the reference and the one-block kernel's tokens on vocabularies that do
    not divide evenly into its blocks; its log-probabilities match a float64 log-softmax; its
    Gumbel scores are taken from every token of the row (the logits they are computed from equal
    the whole row's), greedy draws nothing."""
    V, Vp, rows, sms, want_blocks, T = case
    rng = np.random.default_rng(V + rows)
    x = split_logits(rng, rows, V, Vp, want_blocks)
    keys = [int(v) for v in rng.integers(0, 2 ** 64, rows, dtype=np.uint64)]
    steps = [int(v) for v in rng.integers(0, 1000, rows)]
    blocks, (split,), _ = run_calls(emulator, tmp_path, x[None], [(T, 0, 1.0)], keys, steps, V=V, mode="split", sms=sms,
                                    order=order)
    assert blocks == want_blocks
    tokens, logprobs, err, sets = split
    ref_tokens, _, ref_err, _ = run_sampler(emulator, tmp_path, x, T, 0, 1.0, keys, steps, V=V, reference=True)
    one_tokens, _, one_err, _ = run_sampler(emulator, tmp_path, x, T, 0, 1.0, keys, steps, V=V, sms=sms)
    assert err == 0 and ref_err == 0 and one_err == 0
    assert list(tokens) == list(ref_tokens) == list(one_tokens)
    check_logprobs(x, tokens, logprobs, V)
    for r in range(rows):
        row = x[r, :V]
        if T == 0:
            assert len(sets[r]) == 0
            assert tokens[r] == int(np.argmax(row))   # the smallest id of the tied maxima
            continue
        assert np.array_equal(np.sort(sets[r]), np.sort(row))
        scores = gumbel_draw_scores(row, T, keys[r], steps[r])
        best2 = np.sort(scores)[-2:]
        if best2[1] - best2[0] >= 1e-4:
            assert tokens[r] == int(np.argmax(scores)), r


def test_split_path_flags_nonfinite_rows_and_advances_rows(emulator, tmp_path):
    """Two calls on the same rows: a NaN, +inf or -inf logit in the first, a middle or the last
    block's range flags its row in each call (error bit 1, token 0, log-probability NaN) and
    leaves its state;
    the other rows advance (token, position and step), except the padding row on the dummy slot;
    the second call draws with the advanced steps. Tokens, flags and states as the reference
    kernel's."""
    rng = np.random.default_rng(21)
    rows, V, Vp, sms, want_blocks, dummy = 6, 5003, 5003, 6, 4, 9
    x = np.stack([split_logits(rng, rows, V, Vp, want_blocks) for _ in range(2)])
    groups = (V + 3) // 4
    x[:, 0, 4 * (3 * groups // 4) + 2] = np.nan        # the last range
    x[:, 2, 1] = np.inf                                 # the first
    x[:, 3, 4 * (groups // 2) + 3] = -np.inf            # a middle one
    keys = [int(v) for v in rng.integers(0, 2 ** 64, rows, dtype=np.uint64)]
    steps = [3, 0, 8, 1, 0, 40]
    advance = ([7, 8, 9, 10, 11, 12], [20, 21, 22, 23, 0, 25], [0, 1, 2, 3, dummy, 5])
    configs = [(1.0, 0, 1.0), (0.0, 0, 1.0)]
    runs = {mode: run_calls(emulator, tmp_path, x, configs, keys, steps, V=V, mode=mode, sms=sms, advance=advance,
                            dummy_slot=dummy) for mode in ("split", "reference")}
    blocks, results, (tok, pos, step) = runs["split"]
    assert blocks == want_blocks
    bad, good = [0, 2, 3], [1, 4, 5]
    for c, (tokens, logprobs, err, _) in enumerate(results):
        ref_tokens, _, ref_err, _ = runs["reference"][1][c]
        assert err == 1 and ref_err == 1
        assert list(tokens) == list(ref_tokens)
        assert all(tokens[r] == 0 and np.isnan(logprobs[r]) for r in bad)
        check_logprobs(x[c][good], tokens[good], logprobs[good], V)
    assert [list(a) for a in (tok, pos, step)] == [list(a) for a in runs["reference"][2]]
    last = results[1][0]
    assert list(tok) == [7, last[1], 9, 10, 11, last[5]]
    assert list(pos) == [20, 23, 22, 23, 0, 27]
    assert list(step) == [3, 2, 8, 1, 0, 42]


def test_split_scratch_follows_each_calls_config(emulator, tmp_path):
    """Replays of one launch sequence with the config changed between them (as a CUDA graph's):
    with the split path's scratch, the calls with top-k or top-p go to the one-block kernel (its
    candidate set is recorded; the split kernel returns at once) and the others to the split
    path; every call's tokens and the rows' final state equal the reference kernel's and the
    one-block kernel's alone."""
    rng = np.random.default_rng(33)
    rows, V, Vp, sms, want_blocks = 3, 4099, 4100, 3, 4
    configs = [(1.0, 0, 1.0), (0.8, 20, 1.0), (1.0, 0, 0.9), (0.0, 0, 1.0), (0.5, V, 1.0), (1.2, 0, 1.0)]
    x = np.stack([split_logits(rng, rows, V, Vp, want_blocks) for _ in configs])
    keys = [5, 6, 7]
    advance = ([1, 2, 3], [0, 0, 0], [0, 1, 2])
    runs = {mode: run_calls(emulator, tmp_path, x, configs, keys, [0, 5, 9], V=V, mode=mode, sms=sms, advance=advance)
            for mode in ("split", "fast", "reference")}
    assert runs["split"][0] == want_blocks
    for c, (T, k, p) in enumerate(configs):
        tokens, logprobs, err, sets = runs["split"][1][c]
        assert err == 0
        assert list(tokens) == list(runs["fast"][1][c][0]) == list(runs["reference"][1][c][0]), c
        check_logprobs(x[c], tokens, logprobs, V)
        for r in range(rows):
            want = reference_set(x[c][r, :V], T, k, p) if T > 0 else []
            assert len(sets[r]) == len(want), (c, r)
            if T > 0:
                assert tokens[r] in want
    assert [list(a) for a in runs["split"][2]] == [list(a) for a in runs["reference"][2]]
    n = len(configs)
    assert list(runs["split"][2][2]) == [0 + n, 5 + n, 9 + n]   # every row advanced once a call
