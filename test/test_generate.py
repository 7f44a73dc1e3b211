"""Generation on the CPU (llmc/generate.c) against the JAX oracle on SmolLM2-135M-Instruct.

The GGUF is loaded by our code for generation; the oracle reads the same dequantised weights
written in Hugging Face layout (ckpt_tool convert, whose q/k un-permutation test_formats.py
checks against NumPy) and decodes greedily without a cache, in float32. Greedy tokens must be
equal (a divergence is tolerated only at a near-tie, reported with its logit gap) and the
log-probs of the generated tokens must match."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import BUILD, ROOT

sys.path.insert(0, str(ROOT / "test" / "oracle"))

GEN = str(BUILD / "tools" / "gen_tool")
TOK = str(BUILD / "tools" / "tok_tool")
CKPT = str(BUILD / "tools" / "ckpt_tool")

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "def fibonacci(n):",
]
NEW_TOKENS = 32


def run(args, stdin=None, timeout=900):
    p = subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr
    return p.stdout


def chat_ids(gguf, user):
    text = run([TOK, "chat", "smollm2", user])
    return [int(x) for x in run([TOK, "encode", gguf], stdin=text).split()]


def generate(model, prompts, temperature=0.0, top_k=0, top_p=1.0, max_new=NEW_TOKENS, seed=1, stops=()):
    stdin = "".join(" ".join(map(str, p)) + "\n" for p in prompts)
    out = run([GEN, model, str(temperature), str(top_k), str(top_p), str(max_new), str(seed), *map(str, stops)], stdin)
    return [json.loads(line) for line in out.strip().split("\n")]


@pytest.fixture(scope="module")
def smollm2_hf(smollm2_gguf, tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2_hf")
    run([CKPT, "convert", smollm2_gguf, "hf", str(out)])
    return str(out)


def oracle_greedy(hf_dir, prompts, n_new):
    """Greedy decoding by full recomputation in float32 with the JAX oracle. Returns per prompt
    the tokens, their log-probs and the top-2 logit gap at every step."""
    import jax.numpy as jnp
    import model_jax
    from safetensors.numpy import load_file

    cfg = json.load(open(os.path.join(hf_dir, "config.json")))
    params = {k: jnp.asarray(v.astype(np.float32)) for k, v in model_jax.normalise_names(load_file(os.path.join(hf_dir, "model.safetensors"))).items()}
    spec = model_jax.spec_from_config(cfg)
    B, L = len(prompts), max(len(p) for p in prompts) + n_new
    seqs = np.zeros((B, L), dtype=np.int32)
    lens = [len(p) for p in prompts]
    for b, p in enumerate(prompts):
        seqs[b, : len(p)] = p
    tokens, logprobs, gaps = [[] for _ in prompts], [[] for _ in prompts], [[] for _ in prompts]
    for _ in range(n_new):
        # right padding never reaches earlier positions through the causal mask
        lg = np.asarray(model_jax._logits_jit(params, spec, jnp.asarray(seqs)), dtype=np.float64)
        for b in range(B):
            row = lg[b, lens[b] - 1]
            top = np.argsort(-row)[:2]
            lse = np.log(np.exp(row - row.max()).sum()) + row.max()
            tokens[b].append(int(top[0]))
            logprobs[b].append(float(row[top[0]] - lse))
            gaps[b].append(float(row[top[0]] - row[top[1]]))
            seqs[b, lens[b]] = top[0]
            lens[b] += 1
    return tokens, logprobs, gaps


def test_greedy_matches_oracle(smollm2_gguf, smollm2_hf):
    prompts = [chat_ids(smollm2_gguf, p) for p in PROMPTS]
    ours = generate(smollm2_gguf, prompts)
    want_tokens, want_logprobs, gaps = oracle_greedy(smollm2_hf, prompts, NEW_TOKENS)
    for b, got in enumerate(ours):
        assert got["finish"] == "length"
        n = len(got["tokens"])
        for t in range(n):
            if got["tokens"][t] != want_tokens[b][t]:
                # only a near-tie may flip the argmax between two float32 implementations
                assert gaps[b][t] < 1e-3, f"prompt {b} diverges at token {t} with logit gap {gaps[b][t]}"
                print(f"prompt {b}: near-tie at token {t} (logit gap {gaps[b][t]:.2e}); compared up to there")
                break
            assert abs(got["logprobs"][t] - want_logprobs[b][t]) < 2e-3, (b, t, got["logprobs"][t], want_logprobs[b][t])


def test_sampling_is_seeded_and_top_k_1_is_greedy(smollm2_gguf):
    prompts = [chat_ids(smollm2_gguf, p) for p in PROMPTS[:2]]
    a = generate(smollm2_gguf, prompts, temperature=1.0, top_p=0.9, max_new=12, seed=5)
    b = generate(smollm2_gguf, prompts, temperature=1.0, top_p=0.9, max_new=12, seed=5)
    c = generate(smollm2_gguf, prompts, temperature=1.0, top_p=0.9, max_new=12, seed=6)
    assert a == b
    assert [x["tokens"] for x in a] != [x["tokens"] for x in c]
    greedy = generate(smollm2_gguf, prompts, max_new=12)
    top1 = generate(smollm2_gguf, prompts, temperature=1.3, top_k=1, max_new=12, seed=9)
    assert [x["tokens"] for x in greedy] == [x["tokens"] for x in top1]


def test_stop_token_ends_sequence(smollm2_gguf):
    im_end = int(run([TOK, "special", smollm2_gguf, "<|im_end|>"]))
    prompt = chat_ids(smollm2_gguf, "Say hello.")
    out = generate(smollm2_gguf, [prompt], max_new=64, stops=[im_end])[0]
    assert out["finish"] == "eos" and out["tokens"][-1] == im_end
    assert im_end not in out["tokens"][:-1]


def test_capital_of_france(train_mora_bin, smollm2_gguf):
    """The chat answer names Paris and ends at the end-of-turn token, which is not printed; the
    device line is on stderr, so stdout is the answer alone."""
    p = subprocess.run([train_mora_bin, "generate", "--model", smollm2_gguf, "--chat", "--temperature", "0",
                        "--prompt", "What is the capital of France?", "--max_new_tokens", "40"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "(eos)" in p.stderr, p.stderr
    assert "Paris" in p.stdout and "<|im_end|>" not in p.stdout and "<|" not in p.stdout, p.stdout
    assert "device" not in p.stdout


@pytest.mark.parametrize("extra,message", [
    (["--chat", "--template", "nope"], "nope"),
    (["--max_new_tokens", "9000"], "context"),
    (["--prompt", ""], "--prompt"),
    (["--temperature", "-1"], "--temperature"),
])
def test_generate_bad_input(train_mora_bin, smollm2_gguf, extra, message):
    args = [train_mora_bin, "generate", "--model", smollm2_gguf, "--prompt", "Hi"] + extra
    p = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and message in p.stderr, p.stderr


def test_generate_bad_vocabulary(train_mora_bin, smollm2_gguf, tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{ this is not json")
    p = subprocess.run([train_mora_bin, "generate", "--model", smollm2_gguf, "--tokenizer", str(bad), "--prompt", "Hi"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and str(bad) in p.stderr, p.stderr


# ----------------------------------------------------------------------------------------------
# ./train_mora generate's output: stops, streams, --logprobs rows, and the checks of its input

TEXT_TO_SHARDS = str(ROOT / "dev" / "data" / "text_to_shards.py")
# the plain template's rendering of --prompt hi, and the answer a tiny byte-level model learns to
# give: it holds the beginnings of the stop string "\n\nHuman:" ("\n\n", "\nHuman") that must be
# printed once the next bytes show they are not the stop, a tab, a backslash and a two-byte
# character
CHAT_PROMPT = "\n\nHuman: hi\n\nAssistant:"
ANSWER = " hello\tw\\x \u00e9\n\nthere\nHuman ok"


def run_generate(args, **kw):
    return subprocess.run(args, capture_output=True, timeout=300, **kw)


@pytest.fixture(scope="module")
def byte_model(train_mora_bin, tmp_path_factory):
    """llama:tiny trained on the dialogue CHAT_PROMPT + ANSWER repeated, as byte tokens (the
    README's dev/data/text_to_shards.py), with the byte tokenizer the script writes."""
    d = tmp_path_factory.mktemp("byte_model")
    (d / "dialogue.txt").write_bytes(((CHAT_PROMPT + ANSWER) * 400).encode())
    p = subprocess.run([sys.executable, TEXT_TO_SHARDS, str(d / "dialogue.txt"), "--out", str(d / "data")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    p = subprocess.run([train_mora_bin, "pretrain", "--init", "llama:tiny", "--train_data", str(d / "data" / "train_*.bin"),
                        "--out", str(d / "run"), "--batch_size", "8", "--seq_len", "64", "--steps", "150",
                        "--lr", "1e-2", "--warmup", "10"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    return {"model": str(d / "run" / "model_step000150.ckpt"), "tokenizer": str(d / "data" / "tokenizer.json"), "dir": d}


def test_text_to_shards_writes_byte_tokens(byte_model):
    from tokenizers import Tokenizer
    text = ((CHAT_PROMPT + ANSWER) * 400).encode()
    shard = np.fromfile(byte_model["dir"] / "data" / "train_000000.bin", dtype=np.uint8)
    header = shard[:1024].view(np.int32)
    assert header[0] == 20240520 and header[1] == 1 and header[2] == len(text)
    assert bytes(shard[1024:].view(np.uint16).astype(np.uint8)) == text
    tok = Tokenizer.from_file(byte_model["tokenizer"])
    assert tok.get_vocab_size() == 256 and tok.encode(text.decode()).ids == list(text)


def test_stop_string_is_not_printed(train_mora_bin, byte_model):
    p = run_generate([train_mora_bin, "generate", "--model", byte_model["model"], "--tokenizer", byte_model["tokenizer"],
                      "--chat", "--template", "plain", "--prompt", "hi", "--temperature", "0", "--max_new_tokens", "40"])
    assert p.returncode == 0, p.stderr
    # the whole answer, the held-back beginnings included, and nothing of the stop string; the
    # device line is on stderr, so stdout is the text alone
    assert p.stdout == (ANSWER + "\n").encode(), p.stdout
    assert b"(stop)" in p.stderr and b"device: cpu" in p.stderr, p.stderr


def unescape(field):
    out, i = bytearray(), 0
    while i < len(field):
        if field[i] == "\\":
            c = field[i + 1]
            if c == "x":
                out.append(int(field[i + 2:i + 4], 16))
                i += 4
                continue
            out += {"n": b"\n", "t": b"\t", "r": b"\r", "\\": b"\\"}[c]
            i += 2
        else:
            out += field[i].encode()
            i += 1
    return bytes(out)


def test_logprobs_rows_are_one_line_each(train_mora_bin, byte_model):
    p = run_generate([train_mora_bin, "generate", "--model", byte_model["model"], "--tokenizer", byte_model["tokenizer"],
                      "--chat", "--template", "plain", "--prompt", "hi", "--temperature", "0", "--max_new_tokens", "40",
                      "--logprobs"])
    assert p.returncode == 0, p.stderr
    rows = p.stdout.decode().split("\n")
    assert rows[-1] == ""
    rows = rows[:-1]
    # one row a generated token: the answer's bytes, then the stop string's (byte tokens: id = byte)
    want = (ANSWER + "\n\nHuman:").encode()
    assert len(rows) == len(want), rows
    for row, byte in zip(rows, want):
        fields = row.split("\t")
        assert len(fields) == 3, row
        assert int(fields[0]) == byte and float(fields[1]) <= 0.0
        assert unescape(fields[2]) == bytes([byte]), row
        assert all(0x20 <= ord(c) < 0x7f for c in fields[2]), row
    assert rows[want.index(b"\t")].endswith("\t\\t") and rows[want.index(b"\\")].endswith("\t\\\\")
    assert rows[want.index(0xc3)].endswith("\t\\xc3")


def test_max_new_tokens_beyond_the_context(train_mora_bin, byte_model, smollm2_gguf):
    args = [train_mora_bin, "generate", "--model", byte_model["model"], "--tokenizer", byte_model["tokenizer"], "--prompt", "hi"]
    p = run_generate(args + ["--max_new_tokens", "2147483647"], text=True)
    assert p.returncode != 0
    assert "--max_new_tokens 2147483647 it exceeds the model's context of 64 tokens" in p.stderr, p.stderr
    # generate() itself (llmc/generate.c), as the other commands call it
    p = subprocess.run([GEN, byte_model["model"], "0", "0", "1", "2147483647", "1"], input="104 105\n",
                       capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    assert "prompt 0 has 2 tokens; with max_new_tokens 2147483647 that exceeds the model's context of 64" in p.stderr, p.stderr
    p = subprocess.run([train_mora_bin, "generate", "--model", smollm2_gguf, "--prompt", "Hi", "--max_new_tokens", "2147483647"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "context of 8192 tokens" in p.stderr, p.stderr
    # the default 128 does not fit the tiny model's 64 positions: it generates what fits
    p = run_generate(args + ["--temperature", "1", "--seed", "3"], text=True)
    assert p.returncode == 0, p.stderr
    assert "note: the default --max_new_tokens 128" in p.stderr, p.stderr
    assert f"[2 prompt tokens, {64 - 2} generated (length)" in p.stderr, p.stderr


def test_tokenizer_vocabulary_must_fit_the_model(train_mora_bin, byte_model, smollm2_gguf, tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    args = [train_mora_bin, "generate", "--model", byte_model["model"], "--prompt", "hello", "--max_new_tokens", "5",
            "--temperature", "0"]
    # more tokens than the model has ids: refused before generating
    p = run_generate(args + ["--tokenizer", smollm2_gguf], text=True)
    assert p.returncode != 0
    assert f"--tokenizer {smollm2_gguf} has 49152 tokens, more than the vocabulary of 256" in p.stderr, p.stderr
    # fewer: a padded vocabulary is fine while the model's tokens have text (ASCII bytes here:
    # the first 128 byte tokens)
    full = json.load(open(byte_model["tokenizer"]))
    full["model"]["vocab"] = {k: v for k, v in full["model"]["vocab"].items() if v < 128}
    ascii_tok = tmp_path / "ascii.json"
    ascii_tok.write_text(json.dumps(full))
    p = run_generate([train_mora_bin, "generate", "--model", byte_model["model"], "--tokenizer", str(ascii_tok),
                      "--chat", "--template", "plain", "--prompt", "hi", "--temperature", "0", "--max_new_tokens", "8"])
    assert p.returncode == 0, p.stderr
    assert p.stdout == ANSWER.encode()[:8] + b"\n"
    # ... with a warning: 128 ids of the model's 256 is too few for padding
    assert f"warning: --tokenizer {ascii_tok} has 128 tokens, far fewer than the model's vocabulary of 256" in p.stderr.decode()
    p = run_generate(args + ["--tokenizer", byte_model["tokenizer"]], text=True)
    assert p.returncode == 0 and "far fewer" not in p.stderr, p.stderr
    # a tokenizer of another vocabulary: the first generated id it has no token for stops the run
    small = Tokenizer(models.BPE())
    small.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    small.decoder = decoders.ByteLevel()
    small.train_from_iterator(["hello world hello"], trainers.BpeTrainer(vocab_size=30, show_progress=False))
    small.save(str(tmp_path / "small.json"))
    n = small.get_vocab_size()
    p = run_generate(args + ["--tokenizer", str(tmp_path / "small.json")], text=True)
    assert p.returncode != 0
    m = re.search(r"the model generated token id (\d+), which --tokenizer (\S+) does not have \((\d+) tokens; "
                  r"the model's vocabulary is 256\)", p.stderr)
    assert m and int(m.group(1)) >= n and m.group(2) == str(tmp_path / "small.json") and int(m.group(3)) == n, p.stderr


def test_system_and_template_need_chat(train_mora_bin, byte_model):
    args = [train_mora_bin, "generate", "--model", byte_model["model"], "--tokenizer", byte_model["tokenizer"], "--prompt", "hi"]
    for flag, value in [("--system", "be terse"), ("--template", "plain")]:
        p = run_generate(args + [flag, value], text=True)
        assert p.returncode != 0 and f"flag {flag} applies only with --chat" in p.stderr, p.stderr
        p = run_generate(args + [flag, value, "--chat", "--max_new_tokens", "2"] + ([] if flag == "--template" else ["--template", "plain"]), text=True)
        assert p.returncode == 0, p.stderr


def test_non_finite_weights(train_mora_bin, byte_model, tmp_path):
    data = bytearray(open(byte_model["model"], "rb").read())
    data[1024 + 4 * 7: 1024 + 4 * 8] = np.float32(np.nan).tobytes()   # element 7 of wte, the first tensor
    bad = tmp_path / "nan.ckpt"
    bad.write_bytes(bytes(data))
    p = run_generate([train_mora_bin, "generate", "--model", str(bad), "--tokenizer", byte_model["tokenizer"], "--prompt", "hi",
                      "--max_new_tokens", "3"],
                     text=True)
    assert p.returncode != 0
    assert f"{bad}: tensor wte has a non-finite weight (nan at element 7 of" in p.stderr, p.stderr
