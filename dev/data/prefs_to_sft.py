"""train_mora preference JSONL -> fine-tuning examples for `train_mora sft`.

Each pair {"prompt", "chosen", "rejected", "dim"} gives the example {"prompt", "response": chosen}:
supervised fine-tuning on the preferred responses, the usual first stage before preference
training. A prompt and response that come more than once (one pair per dimension, or several
rejected responses) give one example. --dims keeps the pairs of some dimensions only (for
instance harmless,truthful). Input in any format the converters read (JSONL, JSON list,
parquet with pyarrow); the output is written to a temporary file and renamed at the end.

    python dev/data/prefs_to_sft.py prefs.jsonl --out sft.jsonl [--dims helpful,harmless]
"""
import argparse
import json
import os
import sys

from prefio import DIMS, ConvertError, field, read_records


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", help="preference files")
    ap.add_argument("--out", required=True, help="fine-tuning examples (JSONL)")
    ap.add_argument("--dims", default=",".join(DIMS), help="comma-separated dimensions whose pairs are used")
    args = ap.parse_args()
    dims = [d for d in args.dims.split(",") if d]
    for d in dims:
        if d not in DIMS:
            ap.error(f"--dims: unknown dimension '{d}' (expected some of {', '.join(DIMS)})")
    tmp = f"{args.out}.tmp.{os.getpid()}"
    seen, written, other_dims = set(), 0, 0
    try:
        with open(tmp, "w", encoding="utf-8") as out:
            for path in args.inputs:
                for where, rec in read_records(path):
                    prompt, chosen = field(where, rec, "prompt"), field(where, rec, "chosen")
                    dim = field(where, rec, "dim")
                    if dim not in DIMS:
                        raise ConvertError(f"{where}: unknown dim \"{dim}\" (expected {', '.join(DIMS)})")
                    if dim not in dims:
                        other_dims += 1
                        continue
                    if not prompt.strip() or not chosen.strip() or (prompt, chosen) in seen:
                        continue
                    seen.add((prompt, chosen))
                    out.write(json.dumps({"prompt": prompt, "response": chosen}, ensure_ascii=False) + "\n")
                    written += 1
    except (ConvertError, OSError) as e:
        os.remove(tmp)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    if written == 0:
        os.remove(tmp)
        print(f"error: no example: no pair of {args.dims} has a prompt and a chosen response", file=sys.stderr)
        sys.exit(1)
    os.replace(tmp, args.out)
    print(f"wrote {written} examples to {args.out}" + (f"; {other_dims} pairs of other dimensions left out" if other_dims else ""))


if __name__ == "__main__":
    main()
