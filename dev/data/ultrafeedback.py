"""UltraFeedback -> train_mora preference JSONL.

Each record {instruction, completions: [{response, annotations: {aspect: {Rating}}}]} gives one
pair per aspect: the highest- against the lowest-rated completion (the first of equals), skipped
when they tie or fewer than two completions have a rating ("N/A" is no rating).
Aspects: helpfulness -> helpful, honesty -> truthful, truthfulness -> truthful
(instruction_following has no dimension of its own and is not used).

    python dev/data/ultrafeedback.py ultrafeedback.jsonl --out uf.jsonl
"""
import argparse

from prefio import ConvertError, field, run

ASPECTS = {"helpfulness": "helpful", "honesty": "truthful", "truthfulness": "truthful"}


def rating(where, k, aspect, completion):
    ann = completion.get("annotations")
    if not isinstance(ann, dict):
        raise ConvertError(f"{where}: completions[{k}] has no \"annotations\" object")
    entry = ann.get(aspect)
    if entry is None:
        return None
    value = entry.get("Rating") if isinstance(entry, dict) else None
    if value in (None, "N/A", ""):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConvertError(f"{where}: completions[{k}].annotations.{aspect}.Rating is {value!r}, not a number")


def convert(path, where, rec, writer):
    instruction = field(where, rec, "instruction")
    completions = field(where, rec, "completions", list)
    responses = []
    for k, c in enumerate(completions):
        if not isinstance(c, dict) or not isinstance(c.get("response"), str):
            raise ConvertError(f"{where}: completions[{k}] has no string \"response\"")
        responses.append(c["response"])
    for aspect, dim in ASPECTS.items():
        rated = [(r, k) for k, c in enumerate(completions) if (r := rating(where, k, aspect, c)) is not None]
        if len(rated) < 2:
            continue
        best = max(rated, key=lambda x: (x[0], -x[1]))
        worst = min(rated, key=lambda x: (x[0], x[1]))
        if best[0] == worst[0]:
            continue
        writer.add(instruction, responses[best[1]], responses[worst[1]], dim)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", help="JSONL, JSON or parquet files")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    run(convert, args.inputs, args.out)


if __name__ == "__main__":
    main()
