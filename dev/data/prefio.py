"""Shared input/output of the preference converters in dev/data/.

read_records(path) yields (where, record) for every record of a JSONL, JSON (a list of objects)
or, when pyarrow is importable, parquet file; `where` is "FILE:LINE" (JSONL) or "FILE:#INDEX"
so that every error can say where it is. PrefWriter writes train_mora's preference JSONL
({"prompt", "chosen", "rejected", "dim"}) to a temporary file and renames it at the end,
dropping exact duplicates and pairs with an empty text or identical responses (counted).
"""
import json
import os
import sys

DIMS = ("helpful", "harmless", "truthful")


class ConvertError(Exception):
    """Bad input: the message starts with FILE:LINE."""


def read_records(path):
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ConvertError(f"{path}: parquet input needs pyarrow, which is not installed; "
                               "convert the file to JSONL first")
        for i, rec in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path}:#{i}", rec
        return
    with open(path, encoding="utf-8") as f:
        text = f.read()
    stripped = text.lstrip()
    if path.endswith(".json") or stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConvertError(f"{path}:{e.lineno}: not valid JSON ({e.msg})")
        if isinstance(data, dict):
            # a datasets-style export: {"data": [...]} or {"rows": [...]}
            data = data.get("data", data.get("rows"))
        if not isinstance(data, list):
            raise ConvertError(f"{path}: expected a JSON list of records")
        for i, rec in enumerate(data):
            if not isinstance(rec, dict):
                raise ConvertError(f"{path}:#{i}: expected a JSON object")
            yield f"{path}:#{i}", rec
        return
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConvertError(f"{path}:{n}: not valid JSON ({e.msg})")
        if not isinstance(rec, dict):
            raise ConvertError(f"{path}:{n}: expected a JSON object")
        yield f"{path}:{n}", rec


def field(where, rec, name, kind=str):
    """rec[name], checked for presence and type."""
    if name not in rec:
        raise ConvertError(f"{where}: missing field \"{name}\"")
    value = rec[name]
    if not isinstance(value, kind):
        raise ConvertError(f"{where}: field \"{name}\" has type {type(value).__name__}")
    return value


class PrefWriter:
    def __init__(self, out_path):
        self.out_path = out_path
        self.tmp_path = f"{out_path}.tmp.{os.getpid()}"
        self.f = open(self.tmp_path, "w", encoding="utf-8")
        self.seen = set()
        self.counts = {d: 0 for d in DIMS}
        self.dropped = 0

    def add(self, prompt, chosen, rejected, dim):
        assert dim in DIMS
        key = (prompt, chosen, rejected, dim)
        if not prompt.strip() or not chosen.strip() or not rejected.strip() or chosen == rejected or key in self.seen:
            self.dropped += 1
            return
        self.seen.add(key)
        self.f.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected, "dim": dim},
                                ensure_ascii=False) + "\n")
        self.counts[dim] += 1

    def close(self):
        self.f.close()
        os.replace(self.tmp_path, self.out_path)
        total = sum(self.counts.values())
        per_dim = ", ".join(f"{d} {n}" for d, n in self.counts.items() if n)
        print(f"wrote {total} pairs ({per_dim}) to {self.out_path}; dropped {self.dropped} "
              "(empty text, identical responses or duplicate)")

    def abort(self):
        self.f.close()
        os.remove(self.tmp_path)


def run(convert, inputs, out_path):
    """convert(where, record, writer) for every record of every input; a ConvertError prints
    its message and exits 1 without leaving a partial output."""
    writer = PrefWriter(out_path)
    try:
        for path in inputs:
            for where, rec in read_records(path):
                convert(path, where, rec, writer)
    except (ConvertError, OSError) as e:
        writer.abort()
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    writer.close()
