"""`train_mora export`: any checkpoint as a Hugging Face model directory.

- SmolLM2's GGUF: the weights are the `gguf` package's dequantisation in Hugging Face's layout,
  tokenizer.json (converted from the GGUF's vocabulary) encodes as the reference tokenizer built
  from the GGUF with `tokenizers`, tokenizer_config.json carries the GGUF's jinja chat template
  and its special tokens, config.json its bos/eos ids; generate on the directory answers as on the
  GGUF, with no --tokenizer or --template.
- a native checkpoint of a pretrain run: the weights are the checkpoint's, read with NumPy and put
  in the native order by the test; a tokenizer.json given is copied as it is.
- wrong input: an --out that holds a model, a decode-only tokenizer, a tokenizer larger than the
  vocabulary.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import ROOT
from test_formats import hf_unpermute, llama_native_order

BIN = str(ROOT / "train_mora")
TEXT_TO_SHARDS = str(ROOT / "dev" / "data" / "text_to_shards.py")
SAMPLES = ["Hello world! 12345 apples", "  spaces\tand\nnewlines\n\n", "<|im_start|>user\nHi<|im_end|>\n",
           "naïve café, 東京 and emoji 🙂", "x" * 50 + " 3.14159"]


def run(args, ok=True):
    p = subprocess.run([BIN, *map(str, args)], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    if ok:
        assert p.returncode == 0, f"{args}\n{p.stdout}\n{p.stderr}"
    return p


@pytest.fixture(scope="module")
def smollm2_export(smollm2_gguf, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "smollm2"
    p = run(["export", "--model", smollm2_gguf, "--out", out])
    return out, p


def test_smollm2_weights_and_config(smollm2_gguf, smollm2_export):
    gguf = pytest.importorskip("gguf")
    out, p = smollm2_export
    reader = gguf.GGUFReader(smollm2_gguf)
    field = lambda k: reader.fields[k].contents()
    ours = load_file(str(out / "model.safetensors"))
    cfg = json.load(open(out / "config.json"))
    NH, NKV = field("llama.attention.head_count"), field("llama.attention.head_count_kv")
    ref = {t.name: t for t in reader.tensors}
    deq = lambda name: gguf.quants.dequantize(ref[name].data, ref[name].tensor_type)
    np.testing.assert_array_equal(ours["model.embed_tokens.weight"], deq("token_embd.weight"))
    np.testing.assert_array_equal(ours["model.layers.0.self_attn.q_proj.weight"], hf_unpermute(deq("blk.0.attn_q.weight"), NH))
    np.testing.assert_array_equal(ours["model.layers.29.self_attn.k_proj.weight"], hf_unpermute(deq("blk.29.attn_k.weight"), NKV))
    np.testing.assert_array_equal(ours["model.layers.29.mlp.down_proj.weight"], deq("blk.29.ffn_down.weight"))
    assert cfg["model_type"] == "llama" and cfg["num_hidden_layers"] == field("llama.block_count")
    # float32 settings with the shortest digits that give them back (NumPy's str of a float32): 1e-05
    assert cfg["rms_norm_eps"] == float(str(np.float32(field("llama.attention.layer_norm_rms_epsilon"))))
    assert cfg["rope_theta"] == float(str(np.float32(field("llama.rope.freq_base"))))
    assert "9.99999" not in (out / "config.json").read_text()
    assert cfg["bos_token_id"] == field("tokenizer.ggml.bos_token_id")
    assert cfg["eos_token_id"] == field("tokenizer.ggml.eos_token_id")
    assert f"tokenizer: converted from {smollm2_gguf}" in p.stdout and "chat template: smollm2" in p.stdout


def test_smollm2_tokenizer_and_template(smollm2_gguf, smollm2_export):
    gguf = pytest.importorskip("gguf")
    from tokenizers import Tokenizer
    from test_tokenizer import smollm2_reference_tokenizer
    out, _ = smollm2_export
    reader = gguf.GGUFReader(smollm2_gguf)
    field = lambda k: reader.fields[k].contents()
    ref, _ = smollm2_reference_tokenizer(smollm2_gguf)
    exported = Tokenizer.from_file(str(out / "tokenizer.json"))
    for text in SAMPLES:
        want = ref.encode(text, add_special_tokens=False).ids
        assert exported.encode(text, add_special_tokens=False).ids == want, text
        assert exported.decode(want, skip_special_tokens=False) == text
    tc = json.load(open(out / "tokenizer_config.json"))
    tokens = field("tokenizer.ggml.tokens")
    assert tc["chat_template"] == field("tokenizer.chat_template")
    assert tc["eos_token"] == tokens[field("tokenizer.ggml.eos_token_id")]
    assert tc["bos_token"] == tokens[field("tokenizer.ggml.bos_token_id")]
    assert tc["model_max_length"] == field("llama.context_length")


def test_generate_on_the_export_needs_no_tokenizer(smollm2_gguf, smollm2_export):
    out, _ = smollm2_export
    ask = ["--chat", "--prompt", "What is the capital of France?", "--max_new_tokens", "6", "--temperature", "0"]
    from_gguf = run(["generate", "--model", smollm2_gguf, *ask])
    from_export = run(["generate", "--model", out, *ask])
    assert from_export.stdout == from_gguf.stdout and "Paris" in from_export.stdout
    # the prompt was rendered and encoded alike: the same number of prompt tokens
    count = lambda p: p.stderr.split("[", 1)[1].split(" prompt tokens")[0]
    assert count(from_export) == count(from_gguf)


def test_export_refuses_a_directory_holding_a_model(smollm2_gguf, smollm2_export):
    out, _ = smollm2_export
    before = os.path.getmtime(out / "model.safetensors")
    p = run(["export", "--model", smollm2_gguf, "--out", out], ok=False)
    assert p.returncode != 0 and f"--out {out} holds model.safetensors already" in p.stderr, p.stderr
    assert os.path.getmtime(out / "model.safetensors") == before


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_run")
    (d / "text.txt").write_text("the quick brown fox jumps over the lazy dog. " * 200)
    p = subprocess.run([sys.executable, TEXT_TO_SHARDS, str(d / "text.txt"), "--out", str(d / "data")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    run(["pretrain", "--init", "llama:tiny", "--train_data", d / "data" / "train_*.bin", "--out", d / "run",
         "--batch_size", "2", "--seq_len", "32", "--steps", "3"])
    return d


def test_native_checkpoint_with_a_tokenizer_json(tiny_run, tmp_path):
    ckpt = tiny_run / "run" / "model_step000003.ckpt"
    tok = tiny_run / "data" / "tokenizer.json"
    out = tmp_path / "hf"
    p = run(["export", "--model", ckpt, "--out", out, "--tokenizer", tok])
    assert f"tokenizer: copied from {tok}" in p.stdout
    # the parameters lead the native file, after its 256-int header (AdamW's moments follow them)
    header = np.fromfile(ckpt, dtype=np.int32, count=256)
    n = int(np.uint32(header[21])) | (int(np.uint32(header[22])) << 32)
    params = np.fromfile(ckpt, dtype=np.float32, count=n, offset=1024)
    tensors = load_file(str(out / "model.safetensors"))
    np.testing.assert_array_equal(llama_native_order(tensors, bias=False, L=2), params)
    assert (out / "tokenizer.json").read_bytes() == tok.read_bytes()
    tc = json.load(open(out / "tokenizer_config.json"))
    assert tc["tokenizer_class"] == "PreTrainedTokenizerFast" and "chat_template" not in tc
    # the export loads back: generate answers as on the checkpoint
    ask = ["--prompt", "the quick", "--max_new_tokens", "8", "--temperature", "0"]
    assert run(["generate", "--model", out, *ask]).stdout == run(["generate", "--model", ckpt, "--tokenizer", tok, *ask]).stdout


def test_export_without_a_tokenizer_says_so(tiny_run, tmp_path):
    p = run(["export", "--model", tiny_run / "run" / "model_step000003.ckpt", "--out", tmp_path / "hf"])
    assert "tokenizer: none (generate on it needs --tokenizer)" in p.stdout
    assert sorted(os.listdir(tmp_path / "hf")) == ["config.json", "model.safetensors"]


def test_export_bad_tokenizers(tiny_run, smollm2_gguf, tmp_path):
    ckpt = tiny_run / "run" / "model_step000003.ckpt"
    p = run(["export", "--model", ckpt, "--out", tmp_path / "a", "--tokenizer", smollm2_gguf], ok=False)
    assert p.returncode != 0 and "has 49152 tokens, more than the vocabulary of 256" in p.stderr, p.stderr
    assert not (tmp_path / "a").exists()
    p = run(["export", "--model", ckpt], ok=False)
    assert p.returncode != 0 and "flag --out is required" in p.stderr, p.stderr


def read_safetensors_raw(path):
    """name -> (dtype, shape, raw bytes), read from the format's definition."""
    import struct
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    return {k: (v["dtype"], v["shape"], data[v["data_offsets"][0]:v["data_offsets"][1]])
            for k, v in header.items() if k != "__metadata__"}


def nearest_bf16(x):
    """The bfloat16 nearest to each float32 (ties to the even one), chosen by comparing the
    distances to the two bfloat16 neighbours in float64."""
    x = np.asarray(x, np.float32)
    lo_bits = (x.view(np.uint32) & 0xFFFF0000)
    lo = lo_bits.view(np.float32).astype(np.float64)
    hi = (lo_bits + 0x10000).view(np.float32).astype(np.float64)
    d_lo, d_hi = np.abs(x - lo), np.abs(hi - x)
    even_lo = ((lo_bits >> 16) & 1) == 0
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & ~even_lo)
    return np.where(pick_hi, hi, lo).astype(np.float32)


def test_bfloat16_export(tiny_run, tmp_path):
    """--dtype bfloat16: every weight is the bfloat16 nearest to the float32 export's, config.json
    says so, and the engine reads the file back to exactly those values."""
    ckpt = tiny_run / "run" / "model_step000003.ckpt"
    run(["export", "--model", ckpt, "--out", tmp_path / "f32"])
    p = run(["export", "--model", ckpt, "--out", tmp_path / "bf16", "--dtype", "bfloat16"])
    assert "model.safetensors (bfloat16)" in p.stdout
    f32 = load_file(str(tmp_path / "f32" / "model.safetensors"))
    raw = read_safetensors_raw(tmp_path / "bf16" / "model.safetensors")
    assert set(raw) == set(f32)
    got = {}
    for name, (dtype, shape, data) in raw.items():
        assert dtype == "BF16" and shape == list(f32[name].shape), name
        got[name] = (np.frombuffer(data, np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)
        np.testing.assert_array_equal(got[name], nearest_bf16(f32[name]), err_msg=name)
    assert json.load(open(tmp_path / "bf16" / "config.json"))["torch_dtype"] == "bfloat16"
    assert os.path.getsize(tmp_path / "bf16" / "model.safetensors") < 0.6 * os.path.getsize(tmp_path / "f32" / "model.safetensors")
    # read back by the engine: exported again as float32, the weights are the bfloat16 values
    run(["export", "--model", tmp_path / "bf16", "--out", tmp_path / "back"])
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    for name in got:
        np.testing.assert_array_equal(back[name], got[name], err_msg=name)
    p = run(["export", "--model", ckpt, "--out", tmp_path / "x", "--dtype", "fp8"], ok=False)
    assert p.returncode != 0 and "flag --dtype: expected float32 or bfloat16, got 'fp8'" in p.stderr
