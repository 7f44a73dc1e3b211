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
  - the split is deterministic by seed and per dimension; truncation counts equal the byte
    counts computed here; on SmolLM2 the chat template and tokenizer are used and the truncation
    count equals the one computed with jinja2 + Hugging Face tokenizers;
  - every bad input exits non-zero with "FILE:LINE", and --skip_bad counts the bad lines.
"""
import json
import os
import random
import struct
import subprocess

import numpy as np
import pytest

from conftest import BUILD

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


def test_linear_head_learns_lexical_rules_only(train_mora_bin, tmp_path):
    data = write_jsonl(tmp_path / "pref.jsonl", planted(120, seed=1))
    out = tmp_path / "lin"
    p = reward(train_mora_bin, "--model", "llama:tiny", "--data", data, "--out", out, "--epochs", 25,
               "--lr", 1e-2, "--val_frac", 0.25)
    assert p.returncode == 0, p.stderr
    acc = json.loads((out / "reward_metrics.json").read_text())["val_accuracy"]
    assert acc["helpful"] >= 0.95 and acc["harmless"] >= 0.95, acc
    assert acc["truthful"] < 0.9, acc   # the documented limit of a linear head on this trunk


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
                       (["--val_frac", "1.5"], "--val_frac"), (["--chat_template", "nope"], "nope")):
        p = reward(train_mora_bin, "--model", "llama:tiny", "--data", path, "--out", tmp_path / "o", *args)
        assert p.returncode != 0 and word in p.stderr, (args, p.stderr)
    p = reward(train_mora_bin, "--model", "llama:tiny", "--out", tmp_path / "o")
    assert p.returncode != 0 and "--data" in p.stderr
    p = reward(train_mora_bin, "--model", "no/such/model.bin", "--data", path, "--out", tmp_path / "o")
    assert p.returncode != 0 and "no/such/model.bin" in p.stderr
    p = reward(train_mora_bin, "--help")
    assert p.returncode == 0 and "--head_hidden" in p.stdout and "--skip_bad" in p.stdout


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
    assert s["chat_template"] == "chatml" and s["text_encoding"] == "tokenizer"
    assert s["truncated_prompts"] == want
    assert not os.path.exists(out / "model.ckpt")     # a checkpoint trunk is not copied
    with open(out / "reward_heads.bin", "rb") as f:
        head = f.read(32)
    assert head[:8] == b"MORARWHD" and struct.unpack("<6i", head[8:])[3] == 576
