"""Anthropic HH-RLHF -> train_mora preference JSONL.

Each record {chosen, rejected} holds two transcripts "\n\nHuman: ...\n\nAssistant: ..." that
differ in the last assistant turn. The prompt is everything before the last "\n\nAssistant:"
(for a single-turn conversation, just the human's message, without the "Human:" label, since
train_mora's chat template adds the roles); the responses are what follows it. The dimension
is --dim, or read from the path: harmless-base -> harmless, helpful-* -> helpful.

    python dev/data/hh_rlhf.py harmless-base/train.jsonl --out hh_harmless.jsonl
"""
import argparse
import os

from prefio import DIMS, ConvertError, field, run

ASSISTANT = "\n\nAssistant:"
HUMAN = "\n\nHuman:"


def split_transcript(where, name, text):
    """(prompt, response) of one transcript."""
    cut = text.rfind(ASSISTANT)
    if cut < 0:
        raise ConvertError(f"{where}: field \"{name}\" has no \"\\n\\nAssistant:\" turn")
    context, response = text[:cut], text[cut + len(ASSISTANT):].strip()
    if context.count(HUMAN) == 1 and context.startswith(HUMAN) and ASSISTANT not in context:
        prompt = context[len(HUMAN):].strip()
    else:
        prompt = context.strip()
    return prompt, response


def dim_from_path(path):
    parts = os.path.normpath(path).split(os.sep)
    if any(p.startswith("harmless-base") for p in parts):
        return "harmless"
    if any(p.startswith("helpful-") for p in parts):
        return "helpful"
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", help="JSONL, JSON or parquet files")
    ap.add_argument("--out", required=True)
    ap.add_argument("--dim", choices=DIMS, help="dimension of every pair (default: from each path)")
    args = ap.parse_args()
    for path in args.inputs:
        if args.dim is None and dim_from_path(path) is None:
            ap.error(f"{path}: cannot tell the dimension from the path (expected harmless-base or helpful-*); pass --dim")

    def convert(path, where, rec, writer):
        p_chosen, chosen = split_transcript(where, "chosen", field(where, rec, "chosen"))
        p_rejected, rejected = split_transcript(where, "rejected", field(where, rec, "rejected"))
        if p_chosen != p_rejected:
            raise ConvertError(f"{where}: \"chosen\" and \"rejected\" differ before their last assistant turn")
        writer.add(p_chosen, chosen, rejected, args.dim or dim_from_path(path))

    run(convert, args.inputs, args.out)


if __name__ == "__main__":
    main()
