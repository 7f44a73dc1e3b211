"""PKU-SafeRLHF -> train_mora preference JSONL.

Each record {prompt, response_0, response_1, better_response_id, safer_response_id} gives two
pairs: better_response_id picks the chosen response of a helpful pair, safer_response_id that
of a harmless pair (the other response is the rejected one).

    python dev/data/pku_saferlhf.py train.jsonl [more files] --out pku.jsonl
"""
import argparse

from prefio import ConvertError, field, run


def response_id(where, rec, name):
    value = field(where, rec, name, (int, str))
    if str(value) not in ("0", "1") or isinstance(value, bool):
        raise ConvertError(f"{where}: field \"{name}\" is {value!r}, expected 0 or 1")
    return int(value)


def convert(path, where, rec, writer):
    prompt = field(where, rec, "prompt")
    responses = [field(where, rec, "response_0"), field(where, rec, "response_1")]
    better = response_id(where, rec, "better_response_id")
    safer = response_id(where, rec, "safer_response_id")
    writer.add(prompt, responses[better], responses[1 - better], "helpful")
    writer.add(prompt, responses[safer], responses[1 - safer], "harmless")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", help="JSONL, JSON or parquet files")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    run(convert, args.inputs, args.out)


if __name__ == "__main__":
    main()
