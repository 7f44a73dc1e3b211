"""Shared file handling and the JSONL readers, through the commands that use them.

Checks:
  - a directory given where a data file is expected (reward --data, mora --prompts) stops with
    "PATH is a directory, not a file"; a pipe (process substitution) or a FIFO larger than the
    first read buffer is read whole: every record the test wrote comes back, in order;
  - --out with missing parents is created (mkdir -p); a parent that is a file is named;
  - a run killed mid-write leaves a torn last line in metrics.jsonl: after --resume the file
    holds whole JSON lines only, one a step, and the dropped line is counted on stdout;
  - a JSONL line holds exactly one JSON value: a second object or trailing text on it is an
    error naming FILE:LINE; a \\u0000 escape in a field that is read is an error naming
    FILE:LINE and the field (an escaped backslash followed by "u0000" is plain text, and an
    ignored field may hold one);
  - a bad line's message suggests --skip_bad in reward, which has the flag, and not in mora,
    which does not.
"""
import json
import os
import subprocess
import threading

import pytest

from conftest import BUILD
from test_pretrain import periodic_tokens, write_shard

TOOL = str(BUILD / "tools" / "reward_check")
PAIRS = [
    {"prompt": "Boil egg?", "chosen": "Nine minutes in water.", "rejected": "Eggs exist.", "dim": "helpful"},
    {"prompt": "Make tea?", "chosen": "Steep a bag 3 min.", "rejected": "Tea is nice.", "dim": "helpful"},
    {"prompt": "Hurt him?", "chosen": "I can't help with that.", "rejected": "Hit him hard.", "dim": "harmless"},
    {"prompt": "Steal car?", "chosen": "No, that's illegal.", "rejected": "Break the window.", "dim": "harmless"},
    {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon.", "dim": "truthful"},
    {"prompt": "2+2?", "chosen": "4.", "rejected": "5.", "dim": "truthful"},
]


def run(args, **kw):
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=600, **kw)


def write_lines(path, lines):
    with open(path, "w") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def heads(tmp_path_factory, train_mora_bin):
    """A trunk (model.ckpt) and reward heads for the mora commands below."""
    d = tmp_path_factory.mktemp("heads")
    data = write_lines(d / "prefs.jsonl", PAIRS)
    p = run([train_mora_bin, "reward", "--model", "llama:tiny", "--data", data, "--out", d / "h", "--epochs", 1])
    assert p.returncode == 0, p.stderr
    return d / "h"


def mora(train_mora_bin, heads, prompts, out, cwd=None):
    return run([train_mora_bin, "mora", "--model", heads / "model.ckpt", "--heads", heads / "reward_heads.bin",
                "--prompts", prompts, "--out", out, "--K", 2, "--candidates", 2, "--max_new_tokens", 4, "--steps", 1],
               cwd=cwd)


# ----------------------------------------------------------------------------------------------
# read_file_all: directories and pipes

def test_directory_as_data_file(train_mora_bin, tmp_path, heads):
    d = tmp_path / "adir"
    d.mkdir()
    p = run([train_mora_bin, "reward", "--model", "llama:tiny", "--data", d, "--out", tmp_path / "o"])
    assert p.returncode != 0 and f"{d} is a directory, not a file" in p.stderr, p.stderr
    assert "out of memory" not in p.stderr
    p = mora(train_mora_bin, heads, ".", tmp_path / "m", cwd=tmp_path)
    assert p.returncode != 0 and "error: . is a directory, not a file" in p.stderr, p.stderr


def test_data_from_process_substitution(train_mora_bin, tmp_path):
    data = write_lines(tmp_path / "prefs.jsonl", PAIRS)
    out = tmp_path / "o"
    p = run(["bash", "-c", 'exec "$0" reward --model llama:tiny --data <(cat "$1") --out "$2" --epochs 1 --val_frac 0',
             train_mora_bin, data, out])
    assert p.returncode == 0, p.stderr
    assert f"data: {len(PAIRS)} preference pairs" in p.stdout
    summary = json.loads((out / "reward_metrics.json").read_text())
    assert summary["train_pairs"] == len(PAIRS) and summary["val_pairs"] == 0
    want = {d: sum(r["dim"] == d for r in PAIRS) for d in ("helpful", "harmless", "truthful")}
    assert summary["train_pairs_per_dim"] == want


def test_large_fifo_is_read_whole(tmp_path):
    """200 KiB through a FIFO: more than the 64 KiB the reader starts with, so its buffer grows."""
    rows = [{"prompt": f"question number {i} " + "x" * (i % 50), "id": f"q{i}"} for i in range(3000)]
    text = "".join(json.dumps(r) + "\n" for r in rows).encode()
    assert len(text) > 3 * 65536
    fifo = tmp_path / "prompts.fifo"
    os.mkfifo(fifo)

    def writer():
        with open(fifo, "wb") as f:
            f.write(text)
    t = threading.Thread(target=writer)
    t.start()
    p = run([TOOL, "prompts", fifo, 0, tmp_path / "o.json"])
    t.join(timeout=60)
    assert p.returncode == 0, p.stderr
    recs = json.loads((tmp_path / "o.json").read_text())["records"]
    assert [(r["prompt"], r["id"], r["line"]) for r in recs] == [(r["prompt"], r["id"], i + 1) for i, r in enumerate(rows)]


# ----------------------------------------------------------------------------------------------
# run directories

@pytest.fixture
def shards(tmp_path):
    write_shard(tmp_path / "train_000.bin", periodic_tokens(20000, 256))
    return str(tmp_path / "train_*.bin")


PRETRAIN = ["--init", "llama:tiny", "--batch_size", 2, "--seq_len", 16, "--lr", "1e-3", "--warmup", 1]


def test_out_parents_are_created(train_mora_bin, tmp_path, shards):
    out = tmp_path / "a" / "b" / "c"
    p = run([train_mora_bin, "pretrain", *PRETRAIN, "--train_data", shards, "--out", out, "--steps", 1])
    assert p.returncode == 0, p.stderr
    assert (out / "metrics.jsonl").is_file() and (out / "latest.txt").is_file()
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "b" / "c"
    p = run([train_mora_bin, "pretrain", *PRETRAIN, "--train_data", shards, "--out", out, "--steps", 1])
    assert p.returncode != 0
    assert f"--out {out}: {tmp_path / 'afile'} exists and is not a directory" in p.stderr, p.stderr


def test_torn_metrics_line_dropped_on_resume(train_mora_bin, tmp_path, shards):
    out = tmp_path / "run"
    p = run([train_mora_bin, "pretrain", *PRETRAIN, "--train_data", shards, "--out", out, "--steps", 2])
    assert p.returncode == 0, p.stderr
    metrics = out / "metrics.jsonl"
    # the run killed while it wrote step 3's line: half a JSON object, no newline
    with open(metrics, "a") as f:
        f.write('{"step": 3, "loss": 5.4')
    # the resumed run keeps its settings from config.json: --out, --resume and a longer --steps
    p = run([train_mora_bin, "pretrain", "--out", out, "--steps", 4, "--resume"])
    assert p.returncode == 0, p.stderr
    assert f"{metrics}: dropped 1 line(s)" in p.stdout, p.stdout
    lines = metrics.read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert all(isinstance(r, dict) for r in rows)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]


# ----------------------------------------------------------------------------------------------
# one JSON value a line, no NUL in a field

GOOD = PAIRS[0]


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "One?"}{"prompt": "Two?"}', "more text after the JSON value: '{\"prompt\": \"Two?\"}'"),
    ('{"prompt": "Three?"} junk', "more text after the JSON value: 'junk'"),
    ('{"prompt": "Four?"} ]', "more text after the JSON value: ']'"),
])
def test_one_json_value_a_line(tmp_path, line, message):
    path = write_lines(tmp_path / "prompts.jsonl", [{"prompt": "ok"}, line])
    p = run([TOOL, "prompts", path, 0, tmp_path / "o.json"])
    assert p.returncode != 0 and f"{path}:2: {message}" in p.stderr, p.stderr
    # trailing whitespace is not text
    path = write_lines(tmp_path / "ws.jsonl", [{"prompt": "ok"}, '{"prompt": "Five?"}  \t '])
    p = run([TOOL, "prompts", path, 0, tmp_path / "o.json"])
    assert p.returncode == 0, p.stderr
    assert [r["prompt"] for r in json.loads((tmp_path / "o.json").read_text())["records"]] == ["ok", "Five?"]


def test_two_objects_on_a_preference_line(train_mora_bin, tmp_path):
    path = write_lines(tmp_path / "prefs.jsonl", [GOOD, json.dumps(GOOD) + json.dumps(PAIRS[1])])
    p = run([train_mora_bin, "reward", "--model", "llama:tiny", "--data", path, "--out", tmp_path / "o"])
    assert p.returncode != 0 and f"{path}:2: more text after the JSON value" in p.stderr, p.stderr


@pytest.mark.parametrize("field", ["prompt", "chosen", "rejected", "dim"])
def test_nul_in_a_preference_field(train_mora_bin, tmp_path, field):
    # json.dumps writes the NUL character as the escape \u0000
    row = {**GOOD, field: GOOD[field] + "\0tail"}
    path = write_lines(tmp_path / "prefs.jsonl", [GOOD, PAIRS[1], row])
    assert "\\u0000" in open(path).read()
    p = run([train_mora_bin, "reward", "--model", "llama:tiny", "--data", path, "--out", tmp_path / "o"])
    assert p.returncode != 0, p.stdout
    assert f"{path}:3: field \"{field}\" contains \\u0000" in p.stderr, p.stderr


def test_nul_in_a_prompt_record(tmp_path):
    rows = [{"prompt": "ok", "id": "a"},
            {"prompt": "a literal \\u0000 is text", "id": "b"},            # an escaped backslash: no NUL
            {"prompt": "ignored field", "id": "c", "note": "x\0y"},         # a field nobody reads
            {"prompt": "nested", "id": "d", "meta": [{"k": "\0"}]}]
    path = write_lines(tmp_path / "prompts.jsonl", rows)
    p = run([TOOL, "prompts", path, 0, tmp_path / "o.json"])
    assert p.returncode == 0, p.stderr
    recs = json.loads((tmp_path / "o.json").read_text())["records"]
    assert [(r["prompt"], r["id"]) for r in recs] == [(r["prompt"], r["id"]) for r in rows]
    for name, row in (("prompt", {"prompt": "cut\0here", "id": "e"}), ("id", {"prompt": "fine", "id": "e\0f"})):
        path = write_lines(tmp_path / f"{name}.jsonl", [rows[0], row])
        p = run([TOOL, "prompts", path, 0, tmp_path / "o.json"])
        assert p.returncode != 0 and f"{path}:2: field \"{name}\" contains \\u0000" in p.stderr, p.stderr


# ----------------------------------------------------------------------------------------------
# the --skip_bad hint only where the flag exists

def test_skip_bad_suggested_only_where_it_exists(train_mora_bin, tmp_path, heads):
    prefs = write_lines(tmp_path / "prefs.jsonl", [GOOD, {**GOOD, "dim": "funny"}])
    p = run([train_mora_bin, "reward", "--model", "llama:tiny", "--data", prefs, "--out", tmp_path / "o"])
    assert p.returncode != 0 and f"{prefs}:2:" in p.stderr and "--skip_bad" in p.stderr, p.stderr
    prompts = write_lines(tmp_path / "prompts.jsonl", [{"prompt": "ok"}, {"prompt": ""}])
    p = mora(train_mora_bin, heads, prompts, tmp_path / "m")
    assert p.returncode != 0 and f"{prompts}:2: field \"prompt\" is empty" in p.stderr, p.stderr
    assert "--skip_bad" not in p.stderr
