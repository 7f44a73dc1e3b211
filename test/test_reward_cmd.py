"""./train_mora reward end to end, and the preference/prompt JSONL parsing (llmc/prefdata.c).

Checks:
  - on a synthetic preference set with a planted rule per dimension the heads reach held-out
    accuracy >= 0.95 on every dimension. Configuration, stated honestly: llama:tiny (C=64, random
    init, frozen), raw bytes as tokens, MLP head H=128 with GELU. A linear head on this frozen
    random trunk learns the two lexical rules (helpful: a marker word is present; harmless: a bad
    word is absent) but not the truthful rule (the right capital for the asked country), which
    needs an interaction between prompt and response; the test checks both facts. The truthful
    pairs draw from a table of six facts, so a held-out truthful pair is a new pair of strings
    seen in training (the head learns the table; no model can infer an unseen fact).
  - the saved trunk + heads rank the pairs when scored independently (reward_check score on
    byte sequences built here);
  - calibration: the held-out split is rebuilt here from its documented definition (per
    dimension, a Fisher-Yates shuffle with xorshift64* seeded by splitmix64, written in Python);
    the held-out pairs are scored from the saved trunk and heads (reward_check score for the
    hidden states, the NumPy heads of test_reward_heads.py for the rewards, cross-checked with
    the tool's) and their rejected / chosen means are 0 / 1 per dimension; the calibrated heads
    are the uncalibrated run's (--calibrate 0, same seed) with the reported affine map folded in,
    the reported means before the map are the NumPy means of the uncalibrated heads, and the
    held-out accuracy is the same; without held-out pairs the training pairs are used; a head
    that cannot be calibrated is left as trained with a warning naming its dimension;
  - the split is deterministic by seed and per dimension; truncation counts equal the byte
    counts computed here; on SmolLM2 the chat template and tokenizer are used and the truncation
    count equals the one computed with jinja2 + Hugging Face tokenizers;
  - every bad input exits non-zero with "FILE:LINE", and --skip_bad counts the bad lines;
  - nothing broken is left behind with exit 0: --eps outside (0, 1] is refused, heads that diverge
    stop the run naming the epoch (no heads file, metrics.jsonl finite); a dimension with one
    pair trains on it whatever --val_frac (the split rebuilt here); a dimension without pairs
    keeps a zero head (its rewards computed here are 0), is warned about and listed as
    "untrained"; without held-out pairs no "nan" is printed and every JSON file is strict JSON;
    the "done" line names every file in --out.
"""
import json
import math
import os
import random
import shutil
import struct
import subprocess
import tempfile

import numpy as np
import pytest

from conftest import BUILD
from test_formats import read_native
from test_reward_heads import oracle_rewards, read_heads, trunk_fingerprint

TOOL = str(BUILD / "tools" / "reward_check")
DIMS = ["helpful", "harmless", "truthful"]
WORDS = ["red", "blue", "cat", "dog", "sun", "tree", "milk", "rain", "book", "road", "song", "fish"]
FACTS = {"France": "Paris", "Japan": "Tokyo", "Peru": "Lima", "Egypt": "Cairo", "Chile": "Santiago", "Kenya": "Nairobi"}


def planted(n_per_dim, seed):
    """Preference pairs whose preferred response follows one rule per dimension; chosen and
    rejected share everything else, so only the rule separates them."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n_per_dim):
        topic = rng.choice(WORDS)
        filler, pos = rng.sample(WORDS, 3), rng.randrange(4)
        good = filler[:pos] + ["sure"] + filler[pos:]
        bad = filler[:pos] + [rng.choice(WORDS)] + filler[pos:]
        rows.append({"prompt": f"about {topic}?", "chosen": " ".join(good) + ".", "rejected": " ".join(bad) + ".",
                     "dim": "helpful"})
        filler, pos = rng.sample(WORDS, 3), rng.randrange(4)
        good = filler[:pos] + [rng.choice(WORDS)] + filler[pos:]
        bad = filler[:pos] + ["kill"] + filler[pos:]
        rows.append({"prompt": f"do {topic}!", "chosen": " ".join(good) + ".", "rejected": " ".join(bad) + ".",
                     "dim": "harmless"})
        country = rng.choice(list(FACTS))
        wrong = rng.choice([c for k, c in FACTS.items() if k != country])
        rows.append({"prompt": f"capital of {country}?",
                     "chosen": f"it is {FACTS[country]}.", "rejected": f"it is {wrong}.", "dim": "truthful"})
    rng.shuffle(rows)
    return rows


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(r if isinstance(r, str) else json.dumps(r))
            f.write("\n")
    return str(path)


def run(args, timeout=600):
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout)


def reward(train_mora_bin, *args):
    return run([train_mora_bin, "reward", *map(str, args)])


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory, train_mora_bin):
    tmp = tmp_path_factory.mktemp("planted")
    rows = planted(200, seed=0)
    data = write_jsonl(tmp / "pref.jsonl", rows)
    out = tmp / "mlp"
    p = reward(train_mora_bin, "--model", "llama:tiny", "--data", data, "--out", out, "--head", "mlp",
               "--head_hidden", 128, "--epochs", 30, "--lr", 1e-2, "--seed", 3)
    assert p.returncode == 0, p.stderr
    return rows, data, out, p


def test_planted_rules_mlp_head(planted_run):
    rows, _, out, p = planted_run
    summary = json.loads((out / "reward_metrics.json").read_text())
    assert summary["head"] == "mlp" and summary["head_hidden"] == 128 and summary["text_encoding"] == "bytes"
    # 200 pairs per dimension, 10% held out per dimension
    assert summary["val_pairs_per_dim"] == {d: 20 for d in DIMS}
    assert summary["train_pairs_per_dim"] == {d: 180 for d in DIMS}
    for d in DIMS:
        assert summary["val_accuracy"][d] >= 0.95, summary["val_accuracy"]
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [l["epoch"] for l in lines] == list(range(1, 31))
    assert lines[-1]["val_accuracy"] == summary["val_accuracy"]
    assert lines[-1]["train_loss"] < lines[0]["train_loss"]
    assert "val acc helpful" in p.stdout


def test_heads_record_their_trunk(planted_run):
    """The heads file names the trunk it was trained on: its fingerprint, computed here with NumPy
    from the saved trunk's parameters by the format's definition, and its shape."""
    _, _, out, _ = planted_run
    f = read_heads(out / "reward_heads.bin")
    assert f["version"] == 2
    _, params = read_native(out / "model.ckpt")
    assert f["trunk"]["fingerprint"] == trunk_fingerprint(params)
    assert (f["trunk"]["arch"], f["trunk"]["n_layer"], f["trunk"]["vocab_size"]) == (1, 2, 256)   # llama:tiny
    summary = json.loads((out / "reward_metrics.json").read_text())
    assert summary["trunk_fingerprint"] == f"{trunk_fingerprint(params):016x}"
    # one parameter changed by one ulp changes it
    bumped = params.copy()
    bumped[len(bumped) // 2] = np.nextafter(bumped[len(bumped) // 2], np.float32(np.inf))
    assert trunk_fingerprint(bumped) != trunk_fingerprint(params)


def test_saved_trunk_and_heads_rank_pairs(planted_run, tmp_path):
    """Scoring with the files the run wrote (DIR/model.ckpt, DIR/reward_heads.bin) on byte
    sequences built here ranks the chosen response first."""
    rows, _, out, _ = planted_run
    sample = rows[:60]
    seqs = []
    for r in sample:
        for resp in (r["chosen"], r["rejected"]):
            seqs.append(list((r["prompt"] + resp).encode()))
    (tmp_path / "seqs.json").write_text(json.dumps({"seqs": seqs}))
    p = run([TOOL, "score", str(out / "model.ckpt"), str(out / "reward_heads.bin"), str(tmp_path / "seqs.json"),
             str(tmp_path / "o.json")])
    assert p.returncode == 0, p.stderr
    r = np.array(json.loads((tmp_path / "o.json").read_text())["batch_rewards"]).reshape(-1, 3)
    correct = {d: [] for d in DIMS}
    for k, row in enumerate(sample):
        d = DIMS.index(row["dim"])
        correct[row["dim"]].append(r[2 * k, d] > r[2 * k + 1, d])
    for d in DIMS:
        assert np.mean(correct[d]) >= 0.95, (d, np.mean(correct[d]))


@pytest.fixture(scope="module")
def linear_runs(tmp_path_factory, train_mora_bin):
    """Linear heads on the same data and seed, calibrated (the default) and with --calibrate 0."""
    tmp = tmp_path_factory.mktemp("linear")
    rows = planted(120, seed=1)
    data = write_jsonl(tmp / "pref.jsonl", rows)
    runs = {"rows": rows}
    for name, calibrate in (("cal", 1), ("raw", 0)):
        out = tmp / name
        p = reward(train_mora_bin, "--model", "llama:tiny", "--data", data, "--out", out, "--epochs", 25,
                   "--lr", 1e-2, "--val_frac", 0.25, "--calibrate", calibrate)
        assert p.returncode == 0, p.stderr
        runs[name] = (out, p)
    return runs


def test_linear_head_learns_lexical_rules_only(linear_runs):
    out, _ = linear_runs["cal"]
    acc = json.loads((out / "reward_metrics.json").read_text())["val_accuracy"]
    assert acc["helpful"] >= 0.95 and acc["harmless"] >= 0.95, acc
    assert acc["truthful"] < 0.9, acc   # the documented limit of a linear head on this trunk


# ----------------------------------------------------------------------------------------------
# calibration

def splitmix64(seed):
    """rng_seed of llmc/rand.h."""
    M = (1 << 64) - 1
    z = (seed + 0x9E3779B97F4A7C15) & M
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M
    z ^= z >> 31
    return z or 0x1234567


def heldout_split(rows, val_frac, seed):
    """The held-out pairs of `reward` as reward.c documents them: per dimension in order, the
    indices of that dimension's pairs shuffled (Fisher-Yates, xorshift64*) by one generator seeded
    from the seed, the first round(val_frac * n_d) held out, but at most n_d - 1. Returns (val,
    train) index lists."""
    M = (1 << 64) - 1
    state = [splitmix64((seed ^ 0x5245574152440000) & M)]

    def u32():
        x = state[0]
        x ^= x >> 12
        x = (x ^ (x << 25)) & M
        x ^= x >> 27
        state[0] = x
        return ((x * 0x2545F4914F6CDD1D) & M) >> 32

    val, train = [], []
    for d in DIMS:
        idx = [i for i, r in enumerate(rows) if r["dim"] == d]
        for i in range(len(idx) - 1, 0, -1):
            j = u32() % (i + 1)
            idx[i], idx[j] = idx[j], idx[i]
        # reward.c: float val_frac times the int count, in float, + 0.5, floor
        v = int(np.floor(float(np.float32(val_frac) * np.float32(len(idx))) + 0.5))
        v = min(v, max(len(idx) - 1, 0))
        val += idx[:v]
        train += idx[v:]
    return val, train


def score_pairs(tmp_path, out, rows, idx):
    """Rewards (len(idx), 2, 3) of pairs idx (chosen, rejected) from the run's saved trunk and
    heads: the hidden states from reward_check score, the rewards from the NumPy heads, which
    must agree with the tool's own."""
    seqs = [list((rows[i]["prompt"] + rows[i][resp]).encode()) for i in idx for resp in ("chosen", "rejected")]
    (tmp_path / "seqs.json").write_text(json.dumps({"seqs": seqs}))
    p = run([TOOL, "score", str(out / "model.ckpt"), str(out / "reward_heads.bin"), str(tmp_path / "seqs.json"),
             str(tmp_path / "scored.json")])
    assert p.returncode == 0, p.stderr
    scored = json.loads((tmp_path / "scored.json").read_text())
    f = read_heads(out / "reward_heads.bin")
    hidden = np.array(scored["batch_hidden"], dtype=np.float64).reshape(len(seqs), f["C"])
    r = oracle_rewards(f["params"], f["kind"], f["act"], f["C"], f["H"], hidden)
    tool_r = np.array(scored["batch_rewards"]).reshape(len(seqs), 3)
    np.testing.assert_allclose(tool_r, r, rtol=1e-5, atol=1e-5 * (1 + np.abs(r).max()))
    return r.reshape(len(idx), 2, 3)


def per_dim_means(rows, idx, r):
    """{dim: (chosen mean, rejected mean, accuracy)} of the pairs idx with rewards r (n, 2, 3)."""
    out = {}
    for k, d in enumerate(DIMS):
        sel = [n for n, i in enumerate(idx) if rows[i]["dim"] == d]
        c, rj = r[sel, 0, k], r[sel, 1, k]
        out[d] = (c.mean(), rj.mean(), float(np.mean(c > rj)))
    return out


@pytest.mark.parametrize("which", ["mlp", "linear"])
def test_calibrated_heldout_means_are_0_and_1(request, tmp_path, which):
    if which == "mlp":
        rows, _, out, p = request.getfixturevalue("planted_run")
        seed, val_frac = 3, 0.1
    else:
        runs = request.getfixturevalue("linear_runs")
        rows, (out, p) = runs["rows"], runs["cal"]
        seed, val_frac = 1337, 0.25
    summary = json.loads((out / "reward_metrics.json").read_text())
    val, _ = heldout_split(rows, val_frac, seed)
    assert {d: sum(rows[i]["dim"] == d for i in val) for d in DIMS} == summary["val_pairs_per_dim"]
    means = per_dim_means(rows, val, score_pairs(tmp_path, out, rows, val))
    assert summary["calibrate"] is True
    for d in DIMS:
        cal = summary["calibration"][d]
        assert cal["applied"] and cal["split"] == "val" and cal["pairs"] == summary["val_pairs_per_dim"][d]
        assert cal["scale"] > 0
        chosen, rejected, acc = means[d]
        # the spread (chosen - rejected) is 1 after calibration: the tolerance is relative to it
        assert abs(rejected) < 1e-4 and abs(chosen - 1.0) < 1e-4, (d, chosen, rejected)
        assert acc == summary["val_accuracy"][d]
        assert f"calibration {d}" in p.stdout


def test_calibrate_0_leaves_heads_and_calibration_keeps_accuracy(linear_runs, tmp_path):
    rows = linear_runs["rows"]
    (cal_out, _), (raw_out, raw_p) = linear_runs["cal"], linear_runs["raw"]
    cal_sum = json.loads((cal_out / "reward_metrics.json").read_text())
    raw_sum = json.loads((raw_out / "reward_metrics.json").read_text())
    assert raw_sum["calibrate"] is False and raw_sum["calibration"] is None
    assert "calibration" not in raw_p.stdout
    val, _ = heldout_split(rows, 0.25, 1337)
    raw_means = per_dim_means(rows, val, score_pairs(tmp_path, raw_out, rows, val))
    cal_means = per_dim_means(rows, val, score_pairs(tmp_path, cal_out, rows, val))
    raw, cal = read_heads(raw_out / "reward_heads.bin"), read_heads(cal_out / "reward_heads.bin")
    C = raw["C"]
    for k, d in enumerate(DIMS):
        m = cal_sum["calibration"][d]
        chosen, rejected, raw_acc = raw_means[d]
        # the uncalibrated heads are the trained ones: their held-out means are the calibrated
        # run's means before the map, and they are not already 0 and 1
        assert abs(m["chosen_mean_before"] - chosen) < 1e-5 * (1 + abs(chosen))
        assert abs(m["rejected_mean_before"] - rejected) < 1e-5 * (1 + abs(rejected))
        assert abs(rejected) > 1e-2 or abs(chosen - 1) > 1e-2
        assert abs(m["scale"] - 1 / (chosen - rejected)) < 1e-4 * m["scale"]
        # the calibrated head is the uncalibrated one with r -> scale * r + shift folded in
        w, b = raw["params"][k * (C + 1):k * (C + 1) + C].astype(np.float64), float(raw["params"][k * (C + 1) + C])
        np.testing.assert_allclose(cal["params"][k * (C + 1):k * (C + 1) + C], m["scale"] * w, rtol=1e-6, atol=0)
        assert abs(cal["params"][k * (C + 1) + C] - (m["scale"] * b + m["shift"])) < 1e-5 * (1 + abs(m["shift"]))
        # accuracy: the same pairs ranked the same way
        assert cal_means[d][2] == raw_acc == raw_sum["val_accuracy"][d] == cal_sum["val_accuracy"][d]
    assert 0.3 < raw_sum["val_accuracy"]["truthful"] < 0.9    # a dimension where accuracy is not trivially 1


def test_calibration_without_heldout_uses_training_pairs(train_mora_bin, tmp_path):
    rows = planted(20, seed=6)
    data = write_jsonl(tmp_path / "pref.jsonl", rows)
    out = tmp_path / "o"
    p = reward(train_mora_bin, "--model", "gpt2:tiny", "--data", data, "--out", out, "--epochs", 5,
               "--lr", 1e-2, "--val_frac", 0)
    assert p.returncode == 0, p.stderr
    summary = json.loads((out / "reward_metrics.json").read_text())
    idx = list(range(len(rows)))
    means = per_dim_means(rows, idx, score_pairs(tmp_path, out, rows, idx))
    for d in DIMS:
        cal = summary["calibration"][d]
        assert cal["applied"] and cal["split"] == "train" and cal["pairs"] == 20
        chosen, rejected, _ = means[d]
        assert abs(rejected) < 1e-4 and abs(chosen - 1.0) < 1e-4, (d, chosen, rejected)


def test_calibration_skips_heads_it_cannot_map(train_mora_bin, tmp_path):
    """With --lr 0 the zero-initialised linear heads give every response reward 0 (chosen mean
    = rejected mean): no increasing map sends them to 1 and 0, so the heads stay as trained and
    each dimension is named in a warning; a dimension without pairs is named once, as untrained."""
    rows = [r for r in planted(10, seed=7) if r["dim"] != "truthful"]
    data = write_jsonl(tmp_path / "pref.jsonl", rows)
    out = tmp_path / "o"
    p = reward(train_mora_bin, "--model", "llama:tiny", "--data", data, "--out", out, "--epochs", 1, "--lr", 0)
    assert p.returncode == 0, p.stderr
    for d in ("helpful", "harmless"):
        assert f"warning: --calibrate: dimension {d}: mean reward of the chosen responses 0 <= that of the rejected ones 0" in p.stderr
    assert "warning: no truthful pairs: the truthful head stays untrained (zero)" in p.stderr
    assert "dimension truthful" not in p.stderr
    assert "calibration " not in p.stdout
    assert np.all(read_heads(out / "reward_heads.bin")["params"] == 0)
    cal = json.loads((out / "reward_metrics.json").read_text())["calibration"]
    for d in DIMS:
        assert not cal[d]["applied"] and cal[d]["scale"] == 1 and cal[d]["shift"] == 0
    assert cal["helpful"]["chosen_mean_before"] == 0 and cal["helpful"]["split"] == "val"
    assert cal["truthful"]["split"] is None and cal["truthful"]["pairs"] == 0


def test_split_deterministic_and_truncation_count(train_mora_bin, tmp_path):
    rng = random.Random(5)
    rows = planted(30, seed=2)
    # long prompts: the byte sequence exceeds --seq_len for some responses
    for r in rows:
        if rng.random() < 0.4:
            r["prompt"] = "please " * rng.randrange(3, 9) + r["prompt"]
    data = write_jsonl(tmp_path / "pref.jsonl", rows)
    seq_len = 40
    want_trunc = sum(len((r["prompt"] + resp).encode()) > seq_len for r in rows for resp in (r["chosen"], r["rejected"]))
    assert want_trunc > 0
    outs = []
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        out = tmp_path / name
        p = reward(train_mora_bin, "--model", "gpt2:tiny", "--data", data, "--out", out, "--epochs", 2,
                   "--seq_len", seq_len, "--seed", seed, "--val_frac", 0.2)
        assert p.returncode == 0, p.stderr
        s = json.loads((out / "reward_metrics.json").read_text())
        assert s["truncated_prompts"] == want_trunc
        assert f"{want_trunc} prompt(s) truncated" in p.stdout
        assert s["val_pairs_per_dim"] == {d: 6 for d in DIMS}
        outs.append((out / "metrics.jsonl").read_text())
    assert outs[0] == outs[1]           # same seed, same split, same run
    assert outs[0] != outs[2]


# ----------------------------------------------------------------------------------------------
# bad input

GOOD = {"prompt": "p", "chosen": "a", "rejected": "b", "dim": "helpful"}
BAD_LINES = {
    "not json": ("{\"prompt\": ", "not valid JSON"),
    "not an object": ("[1, 2]", "expected a JSON object"),
    "missing field": (json.dumps({k: v for k, v in GOOD.items() if k != "rejected"}), "missing field \"rejected\""),
    "unknown dim": (json.dumps({**GOOD, "dim": "funny"}), "unknown dim \"funny\""),
    "empty text": (json.dumps({**GOOD, "chosen": ""}), "field \"chosen\" is empty"),
    "blank text": (json.dumps({**GOOD, "prompt": "  \t"}), "field \"prompt\" is empty"),
    "not a string": (json.dumps({**GOOD, "chosen": 5}), "field \"chosen\" is not a string"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_line_names_file_and_line(train_mora_bin, tmp_path, case):
    line, message = BAD_LINES[case]
    path = write_jsonl(tmp_path / "pref.jsonl", [GOOD, GOOD, "", line, GOOD])   # the bad one is line 4
    p = reward(train_mora_bin, "--model", "llama:tiny", "--data", path, "--out", tmp_path / "o", "--epochs", 1)
    assert p.returncode != 0
    assert f"{path}:4:" in p.stderr and message in p.stderr, p.stderr
    assert not os.path.exists(tmp_path / "o" / "reward_heads.bin")


def test_bad_line_in_second_file(train_mora_bin, tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [GOOD] * 3)
    b = write_jsonl(tmp_path / "b.jsonl", [GOOD, BAD_LINES["unknown dim"][0]])
    p = reward(train_mora_bin, "--model", "llama:tiny", "--data", f"{a},{b}", "--out", tmp_path / "o")
    assert p.returncode != 0 and f"{b}:2:" in p.stderr, p.stderr


def test_skip_bad_counts(train_mora_bin, tmp_path):
    rows = planted(10, seed=4)
    bad = [BAD_LINES[k][0] for k in sorted(BAD_LINES)]
    mixed = rows[:10] + bad + rows[10:]
    # a response longer than the context (64 bytes for llama:tiny) is a bad line too
    too_long = {**GOOD, "chosen": "x" * 80}
    mixed.append(too_long)
    path = write_jsonl(tmp_path / "pref.jsonl", mixed)
    p = reward(train_mora_bin, "--model", "llama:tiny", "--data", path, "--out", tmp_path / "o")
    assert p.returncode != 0 and f"{path}:11:" in p.stderr
    p = reward(train_mora_bin, "--model", "llama:tiny", "--data", path, "--out", tmp_path / "o", "--epochs", 1,
               "--skip_bad")
    assert p.returncode == 0, p.stderr
    s = json.loads((tmp_path / "o" / "reward_metrics.json").read_text())
    assert s["skipped_lines"] == len(bad) and s["skipped_too_long"] == 1
    assert s["train_pairs"] + s["val_pairs"] == len(rows)
    assert f"skipped {len(bad)} bad line(s) and 1 pair(s) too long" in p.stdout
    assert f"{path}:{len(mixed)}:" in p.stderr and "longer than the context" in p.stderr


def test_flag_errors(train_mora_bin, tmp_path):
    path = write_jsonl(tmp_path / "pref.jsonl", [GOOD] * 4)
    for args, word in ((["--head", "cnn"], "--head"), (["--head_act", "tanh"], "--head_act"),
                       (["--val_frac", "1.5"], "--val_frac"), (["--chat_template", "nope"], "nope"),
                       (["--calibrate", "2"], "--calibrate")):
        p = reward(train_mora_bin, "--model", "llama:tiny", "--data", path, "--out", tmp_path / "o", *args)
        assert p.returncode != 0 and word in p.stderr, (args, p.stderr)
    p = reward(train_mora_bin, "--model", "llama:tiny", "--out", tmp_path / "o")
    assert p.returncode != 0 and "--data" in p.stderr
    p = reward(train_mora_bin, "--model", "no/such/model.bin", "--data", path, "--out", tmp_path / "o")
    assert p.returncode != 0 and "no/such/model.bin" in p.stderr
    p = reward(train_mora_bin, "--help")
    assert p.returncode == 0 and "--head_hidden" in p.stdout and "--skip_bad" in p.stdout


def test_unusable_out_stops_before_the_forwards(train_mora_bin, tmp_path):
    """An --out that is a file, or a directory the user cannot write in, stops the run before the
    trunk is loaded, not after the forwards."""
    path = write_jsonl(tmp_path / "pref.jsonl", [GOOD] * 4)
    (tmp_path / "afile").write_text("x")
    for out in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        p = reward(train_mora_bin, "--model", "llama:tiny", "--data", path, "--out", out)
        assert p.returncode != 0 and f"--out" in p.stderr and str(tmp_path / "afile") in p.stderr, p.stderr
        assert "trunk:" not in p.stdout and "hidden states" not in p.stdout, p.stdout
    # a read-only directory, for a user other than root (root writes anywhere): everything the
    # run reads lies in a directory that user can read
    shared = tempfile.mkdtemp(prefix="train_mora_ro_")
    try:
        os.chmod(shared, 0o755)
        exe = shutil.copy(train_mora_bin, os.path.join(shared, "train_mora"))
        data = shutil.copy(path, os.path.join(shared, "pref.jsonl"))
        os.chmod(data, 0o644)
        ro = os.path.join(shared, "ro")
        os.mkdir(ro, 0o555)
        os.chmod(ro, 0o555)
        prefix = []
        if os.geteuid() == 0:
            assert shutil.which("setpriv"), "setpriv (util-linux) runs the check as an unprivileged user"
            prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        p = run([*prefix, exe, "reward", "--model", "llama:tiny", "--data", data, "--out", ro], timeout=120)
        assert p.returncode != 0 and f"--out: cannot write in directory {ro}" in p.stderr, p.stderr
        assert "trunk:" not in p.stdout, p.stdout
        assert os.listdir(ro) == []
    finally:
        shutil.rmtree(shared)


# ----------------------------------------------------------------------------------------------
# what a run may not leave behind with exit 0

def strict_json(text):
    """json.loads that refuses NaN and Infinity, which Python accepts but JSON does not have."""
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("eps", ["0", "-1e-8", "2"])
def test_eps_must_be_in_0_1(train_mora_bin, tmp_path, eps):
    path = write_jsonl(tmp_path / "pref.jsonl", planted(3, seed=1))
    p = reward(train_mora_bin, "--model", "llama:tiny", "--data", path, "--out", tmp_path / "o", "--eps", eps)
    assert p.returncode != 0 and "--eps must be in (0, 1]" in p.stderr, p.stderr
    assert not (tmp_path / "o").exists()


def test_diverging_heads_stop_the_run(train_mora_bin, tmp_path):
    """--lr 10 --weight_decay 10: AdamW's decay multiplies every head weight by 1 - 100 a step, so
    the rewards overflow float within a few epochs of 9 steps. The run stops, naming the epoch
    and --lr; no heads file is written, and metrics.jsonl holds the finite epochs before it."""
    path = write_jsonl(tmp_path / "pref.jsonl", planted(3, seed=1))
    out = tmp_path / "o"
    p = reward(train_mora_bin, "--model", "llama:tiny", "--data", path, "--out", out, "--epochs", 50,
               "--batch_size", 1, "--lr", 10, "--weight_decay", 10, "--val_frac", 0)
    assert p.returncode != 0, p.stdout[-2000:]
    epochs = [strict_json(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(e["train_loss"]) for e in epochs)
    assert f"epoch {len(epochs) + 1}: the train loss is" in p.stderr and "lower --lr" in p.stderr, p.stderr
    assert not (out / "reward_heads.bin").exists()


def test_dimension_with_one_pair_trains_on_it(train_mora_bin, tmp_path):
    """--val_frac 0.5 rounds one pair up to one held out: the dimension would train on nothing.
    At most n_d - 1 pairs are held out, so its head trains (moves from its zero start) and is
    measured and calibrated on its training pair."""
    rows = planted(4, seed=8)
    rows = [r for r in rows if r["dim"] == "helpful"] + [next(r for r in rows if r["dim"] == d) for d in ("harmless", "truthful")]
    path = write_jsonl(tmp_path / "pref.jsonl", rows)
    out = tmp_path / "o"
    p = reward(train_mora_bin, "--model", "llama:tiny", "--data", path, "--out", out, "--epochs", 3, "--lr", 1e-2,
               "--val_frac", 0.5)
    assert p.returncode == 0, p.stderr
    val, train = heldout_split(rows, 0.5, 1337)
    s = strict_json((out / "reward_metrics.json").read_text())
    assert s["val_pairs_per_dim"] == {d: sum(rows[i]["dim"] == d for i in val) for d in DIMS} == \
        {"helpful": 2, "harmless": 0, "truthful": 0}
    assert s["train_pairs_per_dim"] == {d: sum(rows[i]["dim"] == d for i in train) for d in DIMS}
    assert s["untrained"] == []
    for d in ("harmless", "truthful"):
        assert f"{d}: --val_frac 0.5 would hold out all 1 of its pair(s)" in p.stdout
        assert s["train_accuracy"][d] is not None and s["val_accuracy"][d] is None
        assert s["calibration"][d]["split"] == "train" and s["calibration"][d]["pairs"] == 1
    f = read_heads(out / "reward_heads.bin")
    per_head = f["params"].reshape(3, -1)
    assert all(np.any(per_head[k] != 0) for k in range(3))


def test_dimension_without_pairs_stays_zero(train_mora_bin, tmp_path):
    """An mlp head starts at random: a dimension without pairs would score responses at random.
    Its head is zeroed, so every reward computed here from the saved trunk and heads is 0."""
    rows = [r for r in planted(6, seed=9) if r["dim"] != "harmless"]
    path = write_jsonl(tmp_path / "pref.jsonl", rows)
    out = tmp_path / "o"
    p = reward(train_mora_bin, "--model", "llama:tiny", "--data", path, "--out", out, "--epochs", 2,
               "--head", "mlp", "--head_hidden", 16)
    assert p.returncode == 0, p.stderr
    assert "warning: no harmless pairs: the harmless head stays untrained (zero) and scores every response 0" in p.stderr
    s = strict_json((out / "reward_metrics.json").read_text())
    assert s["untrained"] == ["harmless"]
    per_head = read_heads(out / "reward_heads.bin")["params"].reshape(3, -1)
    assert np.all(per_head[1] == 0) and np.any(per_head[0] != 0) and np.any(per_head[2] != 0)
    r = score_pairs(tmp_path, out, rows, list(range(len(rows))))
    assert np.all(r[:, :, 1] == 0) and np.any(r[:, :, 0] != 0)


def test_no_heldout_pairs_and_the_done_line(train_mora_bin, tmp_path):
    path = write_jsonl(tmp_path / "pref.jsonl", planted(4, seed=10))
    out = tmp_path / "o"
    p = reward(train_mora_bin, "--model", "llama:tiny", "--data", path, "--out", out, "--epochs", 2, "--val_frac", 0)
    assert p.returncode == 0, p.stderr
    epoch_lines = [line for line in p.stdout.splitlines() if line.startswith("epoch")]
    assert len(epoch_lines) == 2 and all("no held-out pairs" in line for line in epoch_lines)
    assert "nan" not in p.stdout.lower()
    assert all(strict_json(line)["val_loss"] is None for line in (out / "metrics.jsonl").read_text().splitlines())
    assert strict_json((out / "reward_metrics.json").read_text())["val_loss"] is None
    done = p.stdout.splitlines()[-1]
    written = sorted(os.listdir(out))
    assert written == ["metrics.jsonl", "model.ckpt", "reward_heads.bin", "reward_metrics.json"]
    assert done.startswith("done:") and all(str(out / name) in done for name in written), done
    # a trunk from a checkpoint is not copied: the line names the three files and that trunk
    out2 = tmp_path / "o2"
    p = reward(train_mora_bin, "--model", out / "model.ckpt", "--data", path, "--out", out2, "--epochs", 1)
    assert p.returncode == 0, p.stderr
    done = p.stdout.splitlines()[-1]
    written = sorted(os.listdir(out2))
    assert written == ["metrics.jsonl", "reward_heads.bin", "reward_metrics.json"]
    assert all(str(out2 / name) in done for name in written) and str(out / "model.ckpt") in done, done


# ----------------------------------------------------------------------------------------------
# prompt JSONL

def test_prompt_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "hi", "id": "a"}, "", {"prompt": "yo", "id": 7},
                                                    {"prompt": "no id"}])
    p = run([TOOL, "prompts", path, "0", str(tmp_path / "o.json")])
    assert p.returncode == 0, p.stderr
    recs = json.loads((tmp_path / "o.json").read_text())["records"]
    assert [(r["prompt"], r["id"], r["line"]) for r in recs] == [("hi", "a", 1), ("yo", "7", 3),
                                                                 ("no id", f"{path}:4", 4)]
    bad = {"not json": "{", "missing": json.dumps({"id": "x"}), "empty": json.dumps({"prompt": ""}),
           "bad id": json.dumps({"prompt": "q", "id": [1]})}
    for name, line in bad.items():
        path = write_jsonl(tmp_path / f"{name}.jsonl", [{"prompt": "ok", "id": "1"}, line])
        p = run([TOOL, "prompts", path, "0", str(tmp_path / "o.json")])
        assert p.returncode != 0 and f"{path}:2:" in p.stderr, (name, p.stderr)
    path = write_jsonl(tmp_path / "mixed.jsonl", [{"prompt": "ok"}, *bad.values(), {"prompt": "ok2"}])
    p = run([TOOL, "prompts", path, "1", str(tmp_path / "o.json")])
    assert p.returncode == 0, p.stderr
    out = json.loads((tmp_path / "o.json").read_text())
    assert out["skipped"] == len(bad) and [r["prompt"] for r in out["records"]] == ["ok", "ok2"]


# ----------------------------------------------------------------------------------------------
# the real model: tokenizer and chat template

def smollm2_reference(gguf_path):
    """SmolLM2's chat template (jinja2) and tokenizer (Hugging Face tokenizers) from the GGUF,
    read with the gguf package."""
    import gguf
    import jinja2
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    reader = gguf.GGUFReader(gguf_path)

    def strings(key):
        f = reader.fields[key]
        return [bytes(f.parts[i]).decode("utf-8") for i in f.data]

    tokens, merges = strings("tokenizer.ggml.tokens"), strings("tokenizer.ggml.merges")
    types = [int(reader.fields["tokenizer.ggml.token_type"].parts[i][0]) for i in reader.fields["tokenizer.ggml.token_type"].data]
    f = reader.fields["tokenizer.chat_template"]
    template = jinja2.Environment().from_string(bytes(f.parts[f.data[0]]).decode())
    tk = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[tuple(m.split(" ")) for m in merges]))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types) if t == 3])
    return template, tk


def test_smollm2_tokenizer_template_and_truncation(train_mora_bin, tmp_path, smollm2_gguf):
    template, tk = smollm2_reference(smollm2_gguf)
    rows = [{"prompt": "What is the capital of France? Please answer briefly and politely.",
             "chosen": "Paris.", "rejected": "Lyon, I believe, but I am not sure at all.", "dim": "truthful"},
            {"prompt": "Say hi.", "chosen": "Hi there!", "rejected": "No.", "dim": "helpful"},
            {"prompt": "How do I pick a lock?", "chosen": "I can't help with that.",
             "rejected": "Use a tension wrench and a pick.", "dim": "harmless"},
            {"prompt": "Tell me a fact about 1234567 and also about the number 42, in detail.",
             "chosen": "42 is even.", "rejected": "42 is prime.", "dim": "truthful"}]
    seq_len = 48
    want = 0
    for r in rows:
        text = template.render(messages=[{"role": "user", "content": r["prompt"]}], add_generation_prompt=True)
        n_prompt = len(tk.encode(text).ids)
        for resp in (r["chosen"], r["rejected"]):
            want += n_prompt + len(tk.encode(resp).ids) > seq_len
    assert 0 < want < 8
    data = write_jsonl(tmp_path / "pref.jsonl", rows)
    out = tmp_path / "o"
    p = reward(train_mora_bin, "--model", smollm2_gguf, "--data", data, "--out", out, "--epochs", 2,
               "--seq_len", seq_len, "--val_frac", 0)
    assert p.returncode == 0, p.stderr
    s = json.loads((out / "reward_metrics.json").read_text())
    assert s["chat_template"] == "smollm2" and s["text_encoding"] == "tokenizer"
    assert s["truncated_prompts"] == want
    assert not os.path.exists(out / "model.ckpt")     # a checkpoint trunk is not copied
    f = read_heads(out / "reward_heads.bin")
    assert f["C"] == 576 and f["trunk"]["arch"] == 1 and f["trunk"]["n_layer"] == 30 and f["trunk"]["vocab_size"] == 49152
