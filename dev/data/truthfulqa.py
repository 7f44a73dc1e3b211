"""TruthfulQA (generation split) -> train_mora truthful preference JSONL.

Each record {question, best_answer, correct_answers, incorrect_answers} gives the pairs
best_answer > each incorrect answer; with --all_correct every correct answer is paired with
every incorrect one. Answer lists may be JSON lists (Hugging Face) or "; "-separated strings
(the original CSV).

    python dev/data/truthfulqa.py generation.jsonl --out tqa.jsonl
"""
import argparse

from prefio import ConvertError, field, run


def answers(where, rec, name):
    value = field(where, rec, name, (list, str))
    if isinstance(value, str):
        value = [a.strip() for a in value.split(";")]
    if not all(isinstance(a, str) for a in value):
        raise ConvertError(f"{where}: field \"{name}\" must hold strings")
    return [a for a in value if a.strip()]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", help="JSONL, JSON or parquet files")
    ap.add_argument("--out", required=True)
    ap.add_argument("--all_correct", action="store_true", help="pair every correct answer, not only the best")
    args = ap.parse_args()

    def convert(path, where, rec, writer):
        question = field(where, rec, "question")
        best = field(where, rec, "best_answer")
        good = answers(where, rec, "correct_answers") if args.all_correct else [best]
        for bad in answers(where, rec, "incorrect_answers"):
            for g in good:
                writer.add(question, g, bad, "truthful")

    run(convert, args.inputs, args.out)


if __name__ == "__main__":
    main()
