"""The built-in demo (`train_mora demo`, what `./train_mora` with no arguments runs) on a reduced
budget: 300 pretraining steps on 3000 dialogues, 100 preference pairs per dimension, 2 GRPO
steps, 2 samples per held-out prompt (about a minute on a quiet 2-core machine). The gain of MORA over the baseline needs the full budget and is not asserted
here; what the demo must produce whatever the budget is:

- the synthetic world as demo_world.h documents it, recounted from its files: every training
  and held-out request, plain harmful requests answered by the safe alternative rarely (2%) and
  harmful requests with an intent phrase mostly (70%), preference pairs of one dimension each;
- report.json complete and consistent: the overall reward is the mean of the dimensions, the
  improvement is (model - baseline) / |baseline|, the pool summary matches pool.jsonl;
- MORA's single-reward share drops after rewriting, and every accepted template rewrite is the
  original followed by the intent phrases of its missing dimensions (all three when none is
  missing), rebuilt here from the phrases as DESIGN.md states them; the baseline rewrites nothing;
- world_eval.json judges the very responses the eval table scored: its mean head rewards equal
  report.json's, and its rule qualities are the shares of the world's good responses.
"""
import json
import re
import subprocess

import pytest

from conftest import ROOT

BIN = str(ROOT / "train_mora")
DIMS = ["helpful", "harmless", "truthful"]
INTENTS = [  # rewrite.h's mora_dim_intents: the template rewrite appends these
    "Please give a complete, useful answer with concrete steps.",
    "Please keep the answer safe and point out any risks or responsible alternatives.",
    "Please stick to verified facts and say clearly when something is uncertain.",
]


def read_jsonl(path):
    with open(path, "rb") as f:
        return [json.loads(l) for l in f.read().decode("utf-8").splitlines() if l.strip()]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    d = tmp_path_factory.mktemp("demo")
    p = subprocess.run([BIN, "demo", "--out", str(d), "--pretrain_steps", "300", "--steps", "2", "--corpus", "3000",
                        "--pairs", "100", "--eval_samples", "2", "--seed", "7"],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return d, p.stdout


def strip_intents(prompt):
    for phrase in INTENTS:
        prompt = prompt.replace(" " + phrase, "")
    return prompt


def test_progress_output_names_every_phase(demo):
    _, out = demo
    for phase in ["[1/6] world", "[2/6] pretrain", "[3/6] reward heads", "[4/6] MORA", "[5/6] the baseline",
                  "[6/6] evaluation", "calibrate heads", "| improvement |", "judged by the world's rules", "demo done in"]:
        assert phase in out, phase
    assert re.search(r"pretrain: step \d+/300 \| loss [\d.]+ \| \d+ tok/s \| .* left", out)


def test_world_files_follow_the_rules(demo):
    d, _ = demo
    train = read_jsonl(d / "world" / "train_prompts.jsonl")
    held = read_jsonl(d / "world" / "eval_prompts.jsonl")
    # 12 items per kind, the last 4 held out, 2 phrasings each
    for rows, per_kind in ((train, 16), (held, 8)):
        for kind in ("ordinary", "harmful", "factual"):
            assert sum(r["id"].startswith(kind + "-") for r in rows) == per_kind
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    # the corpus: harmful requests (by their item texts) answered by the safe alternative
    harmful_tasks = {strip_intents(r["prompt"]) for r in train + held if r["id"].startswith("harmful")}
    plain, intent = [0, 0], [0, 0]
    for line in (d / "world" / "corpus.txt").read_text().splitlines():
        prompt, response = line.split("\t")
        if strip_intents(prompt) not in harmful_tasks:
            continue
        counts = intent if strip_intents(prompt) != prompt else plain
        counts[0] += response.startswith(" that is not legal. instead, ")
        counts[1] += 1
    assert plain[1] > 300 and intent[1] > 100
    assert plain[0] / plain[1] < 0.05, "plain harmful requests must rarely get the safe alternative"
    assert intent[0] / intent[1] > 0.55, "an intent phrase must make the safe alternative likely"
    prefs = read_jsonl(d / "world" / "preferences.jsonl")
    assert [sum(p["dim"] == dim for p in prefs) for dim in DIMS] == [100, 100, 100]
    assert all(p["chosen"] != p["rejected"] for p in prefs)


def test_report_is_complete_and_consistent(demo):
    d, _ = demo
    rep = json.loads((d / "report.json").read_text())
    for who in ("model_reward", "baseline_reward"):
        assert abs(rep[who]["overall"] - sum(rep[who][k] for k in DIMS) / 3) < 1e-9
    for k in DIMS + ["overall"]:
        m, b = rep["model_reward"][k], rep["baseline_reward"][k]
        assert abs(rep["improvement_pct"][k] - 100 * (m - b) / abs(b)) < 1e-6
    assert rep["n_prompts"] == 24 and rep["samples"] == 2
    pool = read_jsonl(d / "mora" / "pool.jsonl")
    st, = rep["model_pool"]
    assert st["prompts"] == len(pool) == 48
    assert st["single_before"] == sum(o["single"] for o in pool)
    assert st["single_after"] == sum(o["single"] and o["accepted"] is None for o in pool)
    assert st["accepted_rewrites"] == sum(o["accepted"] is not None for o in pool)
    assert abs(st["share_single_before"] - st["single_before"] / 48) < 1e-12
    assert abs(st["share_single_after"] - st["single_after"] / 48) < 1e-12
    assert st["hypervolume_before"] > 0 and st["hypervolume_after"] > 0
    md = (d / "report.md").read_text()
    assert "| improvement |" in md and "| stage | prompts | single before |" in md


def test_single_share_drops_and_rewrites_carry_the_missing_intents(demo):
    d, _ = demo
    pool = read_jsonl(d / "mora" / "pool.jsonl")
    accepted = [o for o in pool if o["accepted"] is not None]
    assert sum(o["single"] for o in pool) > 0 and accepted
    assert sum(o["single"] and o["accepted"] is None for o in pool) < sum(o["single"] for o in pool)
    n_template = 0
    for o in accepted:
        assert o["single"]
        cand, = [c for c in o["candidates"] if c["text"] == o["accepted"] and c["valid"]]
        assert cand["J"] > o["J"]
        if cand["source"] == "template":
            n_template += 1
            missing = o["missing"] or DIMS
            want = o["prompt"].strip() + "".join(" " + INTENTS[DIMS.index(m)] for m in missing)
            assert o["accepted"] == want
        else:  # a rewrite the model generated must still keep the request
            assert strip_intents(o["prompt"]).rstrip("?.") in o["accepted"] or cand["valid"]
    assert n_template > 0
    state = json.loads((d / "mora" / "pool_state.json").read_text())
    assert sorted(e["prompt"] for e in state["pool"] if e["rewritten"]) == sorted(o["accepted"] for o in accepted)
    base = read_jsonl(d / "baseline" / "pool.jsonl")
    assert [o["id"] for o in base] == [o["id"] for o in pool]
    assert all(o["accepted"] is None and o["candidates"] == [] for o in base)


def test_rule_judgement_is_of_the_evaluated_responses(demo):
    d, _ = demo
    rep = json.loads((d / "report.json").read_text())
    judged = json.loads((d / "world_eval.json").read_text())
    for who, key in (("model", "model_reward"), ("baseline", "baseline_reward")):
        j = judged[who]
        for k in DIMS:
            # the same seed and sampler: the heads' mean over the judged responses is the table's
            assert abs(j["heads_reward"][k] - rep[key][k]) < 1e-4 * max(1.0, abs(rep[key][k]))
            assert 0.0 <= j["rule_quality"][k] <= 1.0
        assert abs(j["rule_quality"]["overall"] - sum(j["rule_quality"][k] for k in DIMS) / 3) < 1e-9
        kinds = j["response_kinds"]
        assert sum(kinds[k]["responses"] for k in kinds) == 24 * 2
        # helpful quality is the share of responses the rules call helpful (help, comply, safe, right, wrong)
        good = sum(kinds[k].get(r, 0) for k in kinds for r in ("help", "comply", "safe", "right", "wrong"))
        assert abs(j["rule_quality"]["helpful"] - good / 48) < 1e-9
    assert "judged by the world's rules" in (d / "report.md").read_text()
