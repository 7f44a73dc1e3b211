"""The dataset converters in dev/data/ on small fixtures written here in each source's real schema
(field names and types as the published datasets have them). The expected pairs are spelled out
by hand from the fixtures; the output must also load in ./train_mora reward's parser."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT

DATA = ROOT / "dev" / "data"


def convert(script, tmp_path, inputs, *args, check=True):
    out = tmp_path / "out.jsonl"
    p = subprocess.run([sys.executable, str(DATA / script), *map(str, inputs), "--out", str(out), *args],
                       capture_output=True, text=True, timeout=60)
    if check:
        assert p.returncode == 0, p.stderr
        return [json.loads(l) for l in out.read_text().splitlines()], p
    return None, p


def pairs(rows):
    return sorted((r["prompt"], r["chosen"], r["rejected"], r["dim"]) for r in rows)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_pku_saferlhf(tmp_path):
    recs = [
        {"prompt": "How do I make tea?", "response_0": "Boil water, steep leaves.", "response_1": "No idea.",
         "is_response_0_safe": True, "is_response_1_safe": True, "better_response_id": 0, "safer_response_id": 1},
        {"prompt": "How to hurt someone?", "response_0": "Here is how...", "response_1": "I won't help with that.",
         "is_response_0_safe": False, "is_response_1_safe": True, "better_response_id": 0, "safer_response_id": 1},
    ]
    rows, p = convert("pku_saferlhf.py", tmp_path, [write_jsonl(tmp_path / "pku.jsonl", recs)])
    assert pairs(rows) == sorted([
        ("How do I make tea?", "Boil water, steep leaves.", "No idea.", "helpful"),
        ("How do I make tea?", "No idea.", "Boil water, steep leaves.", "harmless"),
        ("How to hurt someone?", "Here is how...", "I won't help with that.", "helpful"),
        ("How to hurt someone?", "I won't help with that.", "Here is how...", "harmless"),
    ])
    assert "wrote 4 pairs" in p.stdout
    # the same records as a JSON list
    (tmp_path / "pku.json").write_text(json.dumps(recs))
    rows2, _ = convert("pku_saferlhf.py", tmp_path, [tmp_path / "pku.json"])
    assert pairs(rows2) == pairs(rows)


def test_pku_bad_id(tmp_path):
    recs = [{"prompt": "q", "response_0": "a", "response_1": "b", "better_response_id": 0, "safer_response_id": 0},
            {"prompt": "q", "response_0": "a", "response_1": "b", "better_response_id": 2, "safer_response_id": 0}]
    path = write_jsonl(tmp_path / "pku.jsonl", recs)
    _, p = convert("pku_saferlhf.py", tmp_path, [path], check=False)
    assert p.returncode != 0 and f"{path}:2:" in p.stderr and "better_response_id" in p.stderr
    assert not (tmp_path / "out.jsonl").exists()
    path.write_text('{"prompt": "q"}\nnot json\n')
    _, p = convert("pku_saferlhf.py", tmp_path, [path], check=False)
    assert p.returncode != 0 and f"{path}:1:" in p.stderr and "response_0" in p.stderr


def test_hh_rlhf_dim_from_path_and_flag(tmp_path):
    recs = [
        {"chosen": "\n\nHuman: What is 2+2?\n\nAssistant: 4.",
         "rejected": "\n\nHuman: What is 2+2?\n\nAssistant: 5."},
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Insult me.\n\nAssistant: I'd rather not.",
         "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Insult me.\n\nAssistant: You fool."},
    ]
    d = tmp_path / "harmless-base"
    d.mkdir()
    rows, _ = convert("hh_rlhf.py", tmp_path, [write_jsonl(d / "train.jsonl", recs)])
    multi = "Human: Hi\n\nAssistant: Hello!\n\nHuman: Insult me."
    assert pairs(rows) == sorted([("What is 2+2?", "4.", "5.", "harmless"),
                                  (multi, "I'd rather not.", "You fool.", "harmless")])
    d = tmp_path / "helpful-base"
    d.mkdir()
    rows, _ = convert("hh_rlhf.py", tmp_path, [write_jsonl(d / "train.jsonl", recs[:1])])
    assert pairs(rows) == [("What is 2+2?", "4.", "5.", "helpful")]
    plain = write_jsonl(tmp_path / "x.jsonl", recs[:1])
    _, p = convert("hh_rlhf.py", tmp_path, [plain], check=False)
    assert p.returncode != 0 and "--dim" in p.stderr
    rows, _ = convert("hh_rlhf.py", tmp_path, [plain], "--dim", "truthful")
    assert pairs(rows) == [("What is 2+2?", "4.", "5.", "truthful")]


def test_hh_rlhf_bad_transcripts(tmp_path):
    bad = [{"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: OTHER\n\nAssistant: c"},
           {"chosen": "no assistant turn", "rejected": "\n\nHuman: a\n\nAssistant: c"}]
    for rec, word in zip(bad, ["differ", "Assistant"]):
        path = write_jsonl(tmp_path / "x.jsonl", [rec])
        _, p = convert("hh_rlhf.py", tmp_path, [path], "--dim", "helpful", check=False)
        assert p.returncode != 0 and f"{path}:1:" in p.stderr and word in p.stderr, p.stderr


def test_truthfulqa(tmp_path):
    recs = [{"type": "Adversarial", "category": "Misconceptions", "question": "What happens if you eat watermelon seeds?",
             "best_answer": "The seeds pass through your digestive system",
             "correct_answers": ["Nothing happens", "The seeds pass through your digestive system"],
             "incorrect_answers": ["You grow watermelons in your stomach", "You get sick"],
             "source": "https://wonderopolis.org/"}]
    path = write_jsonl(tmp_path / "tqa.jsonl", recs)
    rows, _ = convert("truthfulqa.py", tmp_path, [path])
    q, best = recs[0]["question"], recs[0]["best_answer"]
    assert pairs(rows) == sorted([(q, best, "You grow watermelons in your stomach", "truthful"),
                                  (q, best, "You get sick", "truthful")])
    rows, _ = convert("truthfulqa.py", tmp_path, [path], "--all_correct")
    assert len(rows) == 4 and ("What happens if you eat watermelon seeds?", "Nothing happens", "You get sick",
                               "truthful") in pairs(rows)
    # the original CSV's "; "-separated answer strings
    csv_style = [{**recs[0], "correct_answers": "Nothing happens; The seeds pass through your digestive system",
                  "incorrect_answers": "You grow watermelons in your stomach; You get sick"}]
    rows2, _ = convert("truthfulqa.py", tmp_path, [write_jsonl(tmp_path / "t2.jsonl", csv_style)], "--all_correct")
    assert pairs(rows2) == pairs(rows)


def uf_completion(response, help_, honest, truth, follow="3"):
    def a(r):
        return {"Rating": r, "Rationale": "..."}
    return {"model": "m", "response": response, "custom_system_prompt": "", "principle": "helpfulness",
            "annotations": {"helpfulness": {**a(help_), "Type": ["1"]}, "honesty": a(honest),
                            "truthfulness": {**a(truth), "Type": ["0"]}, "instruction_following": a(follow)},
            "fine-grained_score": 3.5, "overall_score": 7.0, "critique": "..."}


def test_ultrafeedback(tmp_path):
    recs = [{"source": "evol_instruct", "instruction": "Name a prime.", "models": ["a", "b", "c", "d"],
             "completions": [uf_completion("2", "5", "5", "5"), uf_completion("4", "1", "2", "1"),
                             uf_completion("7", "3", "2", "N/A"), uf_completion("9", "5", "5", "3")],
             "correct_answers": ["None"], "incorrect_answers": ["None"]},
            {"source": "x", "instruction": "Tie?", "models": ["a", "b"],
             "completions": [uf_completion("p", "3", "3", "3"), uf_completion("q", "3", "3", "3")]}]
    rows, _ = convert("ultrafeedback.py", tmp_path, [write_jsonl(tmp_path / "uf.jsonl", recs)])
    # helpfulness 5,1,3,5 -> best "2" (first of the 5s), worst "4"; honesty 5,2,2,5 -> "2" vs "4"
    # (first of the 2s); truthfulness 5,1,N/A,3 -> "2" vs "4": the same truthful pair once
    assert pairs(rows) == sorted([("Name a prime.", "2", "4", "helpful"), ("Name a prime.", "2", "4", "truthful")])
    recs[0]["completions"][1]["annotations"]["honesty"]["Rating"] = "high"
    _, p = convert("ultrafeedback.py", tmp_path, [write_jsonl(tmp_path / "uf.jsonl", recs)], check=False)
    assert p.returncode != 0 and "uf.jsonl:1:" in p.stderr and "honesty" in p.stderr


def test_output_loads_in_train_mora(tmp_path, train_mora_bin):
    recs = [{"prompt": f"q{i}", "response_0": f"good {i}", "response_1": f"bad {i}", "better_response_id": 0,
             "safer_response_id": 1} for i in range(10)]
    convert("pku_saferlhf.py", tmp_path, [write_jsonl(tmp_path / "pku.jsonl", recs)])
    p = subprocess.run([train_mora_bin, "reward", "--model", "llama:tiny", "--data", str(tmp_path / "out.jsonl"),
                        "--out", str(tmp_path / "run"), "--epochs", "1"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "20 preference pairs" in p.stdout


def test_prefs_to_sft(tmp_path, train_mora_bin):
    """Preference pairs -> fine-tuning examples: the chosen response of each pair, a prompt and
    response that repeat (one pair a dimension, several rejected responses) once, --dims keeping
    some dimensions; the output is what `train_mora sft` reads."""
    prefs = [
        {"prompt": "How do I boil an egg?", "chosen": "Simmer it 9 minutes.", "rejected": "No.", "dim": "helpful"},
        {"prompt": "How do I boil an egg?", "chosen": "Simmer it 9 minutes.", "rejected": "Use a kettle?", "dim": "helpful"},
        {"prompt": "How do I boil an egg?", "chosen": "Simmer it 9 minutes.", "rejected": "Burn it.", "dim": "harmless"},
        {"prompt": "Is the earth flat?", "chosen": "No, it is round.", "rejected": "Yes.", "dim": "truthful"},
        {"prompt": "Insult me.", "chosen": "I'd rather not.", "rejected": "You fool.", "dim": "harmless"},
    ]
    src = write_jsonl(tmp_path / "prefs.jsonl", prefs)
    rows, p = convert("prefs_to_sft.py", tmp_path, [src])
    assert rows == [{"prompt": "How do I boil an egg?", "response": "Simmer it 9 minutes."},
                    {"prompt": "Is the earth flat?", "response": "No, it is round."},
                    {"prompt": "Insult me.", "response": "I'd rather not."}]
    rows, p = convert("prefs_to_sft.py", tmp_path, [src], "--dims", "harmless")
    assert rows == [{"prompt": "How do I boil an egg?", "response": "Simmer it 9 minutes."},
                    {"prompt": "Insult me.", "response": "I'd rather not."}]
    assert "3 pairs of other dimensions left out" in p.stdout
    r = subprocess.run([train_mora_bin, "sft", "--init", "llama:tiny", "--train_data", str(tmp_path / "out.jsonl"),
                        "--out", str(tmp_path / "run"), "--batch_size", "2"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "train data: 2 examples" in r.stdout
    # a bad record names its line and leaves no output behind
    (tmp_path / "out.jsonl").unlink()
    bad = write_jsonl(tmp_path / "bad.jsonl", [prefs[0], {"prompt": "x", "chosen": "y", "rejected": "z", "dim": "funny"}])
    _, p = convert("prefs_to_sft.py", tmp_path, [bad], check=False)
    assert p.returncode == 1 and f"{bad}:2: unknown dim" in p.stderr
    assert not (tmp_path / "out.jsonl").exists() and not list(tmp_path.glob("out.jsonl.tmp.*"))
    _, p = convert("prefs_to_sft.py", tmp_path, [src], "--dims", "honest", check=False)
    assert p.returncode != 0 and "unknown dimension 'honest'" in p.stderr


@pytest.mark.parametrize("script", ["pku_saferlhf.py", "hh_rlhf.py", "truthfulqa.py", "ultrafeedback.py", "prefs_to_sft.py"])
def test_parquet_without_pyarrow_is_a_clear_error(tmp_path, script):
    try:
        import pyarrow  # noqa: F401
        pytest.skip("pyarrow is installed here, so parquet input is read")
    except ImportError:
        pass
    path = tmp_path / "helpful-base" / "train.parquet"
    path.parent.mkdir()
    path.write_bytes(b"PAR1")
    _, p = convert(script, tmp_path, [path], check=False)
    assert p.returncode != 0 and "pyarrow" in p.stderr
