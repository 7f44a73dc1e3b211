"""Checkpoint formats, judged by independent readers and writers.

GGUF files are read and written with the `gguf` package (dequantisation by gguf.quants),
safetensors with the `safetensors` package, llm.c .bin files are written here in NumPy from the
format's definition, and the native file is read back in NumPy from its documented layout
(256 int32 header, then the parameters in model.h's order). The C side is driven through
build/tools/ckpt_tool (test/tools/ckpt_tool.c)."""
import json
import os
import struct
import subprocess

import gguf
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import BUILD

TOOL = os.environ.get("CKPT_TOOL", str(BUILD / "tools" / "ckpt_tool"))
NATIVE_MAGIC = 0x41524F4D  # the bytes "MORA"


def run_tool(*args):
    """Runs ckpt_tool and asserts success; returns stdout."""
    assert os.path.exists(TOOL), f"{TOOL} is not built: run make"
    proc = subprocess.run([TOOL, *map(str, args)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"ckpt_tool {args} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def run_tool_fails(*args):
    """Runs ckpt_tool expecting a clean failure (exit 1 with an error line, no crash); returns stderr."""
    assert os.path.exists(TOOL), f"{TOOL} is not built: run make"
    proc = subprocess.run([TOOL, *map(str, args)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, f"expected exit 1, got {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    assert proc.stderr.startswith("error: "), proc.stderr
    return proc.stderr


def info(path):
    out = run_tool("info", path)
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def read_native(path):
    """The native checkpoint in NumPy: (header int32[256], params float32[num_parameters])."""
    header = np.fromfile(path, dtype=np.int32, count=256)
    assert header[0] == NATIVE_MAGIC
    n = int(np.uint32(header[21])) | (int(np.uint32(header[22])) << 32)
    params = np.fromfile(path, dtype=np.float32, offset=1024)
    assert params.size == n
    return header, params


def bf16_bits(x):
    """float32 -> bfloat16 bits, round to nearest even (as torch and ggml do)."""
    u = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def bf16_to_f32(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32)


def write_safetensors_manual(path, tensors):
    """A safetensors file written from the format definition; tensors: name -> (dtype, shape, raw bytes)."""
    header, offset, blobs = {}, 0, []
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        blobs.append(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


# ------------------------------------------------------------------------------------------
# GGUF dequantisation

def test_dequant_matches_gguf_package_on_smollm2(smollm2_gguf, tmp_path):
    out = tmp_path / "deq.safetensors"
    run_tool("dequant", smollm2_gguf, out)
    ours = load_file(str(out))
    reader = gguf.GGUFReader(smollm2_gguf)
    assert len(ours) == len(reader.tensors) == 272
    types = set()
    for t in reader.tensors:
        ref = gguf.quants.dequantize(t.data, t.tensor_type)
        types.add(t.tensor_type.name)
        assert ours[t.name].shape == ref.shape, t.name
        np.testing.assert_array_equal(ours[t.name], ref, err_msg=t.name)
    assert types == {"Q4_1", "Q8_0", "F32"}


QTYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"]


def small_gguf(path, qtype, rng, version=3, alignment=None):
    """A GGUF with a 2-D, a 3-D and a 1-D tensor of type qtype (1-D stays F32 for block types)."""
    w = gguf.GGUFWriter(str(path), "llama")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    qt = gguf.GGMLQuantizationType[qtype]
    data = {
        "a.weight": rng.standard_normal((4, 64)).astype(np.float32),
        "b.weight": (rng.standard_normal((3, 2, 96)) * 3).astype(np.float32),
        "c.weight": rng.standard_normal(32).astype(np.float32),
    }
    data["a.weight"][0, :5] = [0.0, -0.0, 1e-6, 65504.0, -2.5e-5]  # zero, subnormal-ish, fp16 max
    for name, x in data.items():
        if qtype == "F32":
            w.add_tensor(name, x)
        elif qtype == "F16":
            w.add_tensor(name, x.astype(np.float16))
        else:
            q = gguf.quants.quantize(x, qt)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if version != 3:
        with open(path, "r+b") as f:
            f.seek(4)
            f.write(struct.pack("<I", version))
    return data


@pytest.mark.parametrize("qtype", QTYPES)
def test_dequant_small_gguf_each_type(qtype, tmp_path):
    rng = np.random.default_rng(QTYPES.index(qtype))
    path = tmp_path / f"{qtype}.gguf"
    original = small_gguf(path, qtype, rng)
    out = tmp_path / "deq.safetensors"
    run_tool("dequant", path, out)
    ours = load_file(str(out))
    reader = gguf.GGUFReader(str(path))
    for t in reader.tensors:
        assert t.tensor_type.name == qtype
        ref = gguf.quants.dequantize(t.data, t.tensor_type).reshape(original[t.name].shape)
        assert ours[t.name].shape == original[t.name].shape, t.name
        np.testing.assert_array_equal(ours[t.name], ref, err_msg=t.name)
        # and the values are the original up to the type's precision
        tol = {"F32": 0, "F16": 1e-3, "BF16": 1e-2, "Q8_0": 0.02, "Q4_0": 0.3, "Q4_1": 0.2}[qtype]
        x = original[t.name]
        assert np.max(np.abs(ours[t.name] - x)) <= tol * max(1.0, np.max(np.abs(x))), t.name


def test_gguf_metadata_every_value_type_v2_and_alignment(tmp_path):
    path = tmp_path / "meta.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_custom_alignment(64)
    T = gguf.GGUFValueType
    values = [
        ("t.u8", 200, T.UINT8), ("t.i8", -100, T.INT8), ("t.u16", 60000, T.UINT16),
        ("t.i16", -30000, T.INT16), ("t.u32", 4000000000, T.UINT32), ("t.i32", -2000000000, T.INT32),
        ("t.f32", 0.1, T.FLOAT32), ("t.bool", True, T.BOOL), ("t.str", "héllo\nworld", T.STRING),
        ("t.u64", 2**63 + 12345, T.UINT64), ("t.i64", -(2**62) - 7, T.INT64), ("t.f64", 1 / 3, T.FLOAT64),
    ]
    for key, val, vt in values:
        w.add_key_value(key, val, vt)
    w.add_key_value("t.arr_i16", [-1, 2, -300], T.ARRAY, sub_type=T.INT16)
    w.add_key_value("t.arr_u64", [0, 2**64 - 1], T.ARRAY, sub_type=T.UINT64)
    w.add_key_value("t.arr_f32", [0.5, -1.25], T.ARRAY, sub_type=T.FLOAT32)
    w.add_key_value("t.arr_str", ["a", "", "c,d"], T.ARRAY, sub_type=T.STRING)
    w.add_tensor("x", np.arange(5, dtype=np.float32))
    w.add_tensor("y", np.arange(7, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with open(path, "r+b") as f:  # version 2 has the same little-endian layout
        f.seek(4)
        f.write(struct.pack("<I", 2))
    lines = [json.loads(l) for l in run_tool("meta", path).splitlines()]
    head, kvs = lines[0], {l["key"]: l for l in lines if "key" in l}
    tensors = {l["tensor"]: l for l in lines if "tensor" in l}
    assert head["version"] == 2
    reader = gguf.GGUFReader(str(path))
    assert head["data_offset"] == reader.data_offset and head["data_offset"] % 64 == 0
    assert set(kvs) == set(reader.fields) - {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        ours = kvs[key]
        assert ours["type"] == int(field.types[0]), key
        if field.types[0] == T.ARRAY:
            assert ours["arr_type"] == int(field.types[1]), key
            ref = field.contents()
            if field.types[1] == T.FLOAT32:
                np.testing.assert_array_equal(np.float32(ours["value"]), np.float32(ref))
            else:
                assert ours["value"] == ref, key
        elif field.types[0] in (T.FLOAT32, T.FLOAT64):
            assert ours["value"] == float(field.contents()), key
        else:
            assert ours["value"] == field.contents(), key
    for t in reader.tensors:
        assert tensors[t.name]["dims"] == [int(d) for d in t.shape]
        assert tensors[t.name]["offset"] + reader.data_offset == t.data_offset
    out = tmp_path / "xy.safetensors"
    run_tool("dequant", path, out)
    np.testing.assert_array_equal(load_file(str(out))["y"], np.arange(7, dtype=np.float32))


# ------------------------------------------------------------------------------------------
# GGUF models

def hf_permute(w, n_head):
    """convert_hf_to_gguf.py's LlamaModel.permute: HF rows -> llama.cpp's interleaved RoPE rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_unpermute(w, n_head):
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.fixture(scope="module")
def smollm2_hf(smollm2_gguf, tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2") / "hf"
    run_tool("convert", smollm2_gguf, "hf", out)
    return out


def test_smollm2_gguf_loads_in_hf_layout(smollm2_gguf, smollm2_hf):
    reader = gguf.GGUFReader(smollm2_gguf)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    ref = {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in reader.tensors}
    NH, NKV = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
    ours = load_file(str(smollm2_hf / "model.safetensors"))
    cfg = json.load(open(smollm2_hf / "config.json"))
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["torch_dtype"] == "float32"
    assert cfg["hidden_size"] == meta["llama.embedding_length"] == 576
    assert cfg["num_hidden_layers"] == meta["llama.block_count"]
    assert cfg["num_attention_heads"] == NH and cfg["num_key_value_heads"] == NKV
    assert cfg["intermediate_size"] == meta["llama.feed_forward_length"]
    assert cfg["vocab_size"] == len(reader.fields["tokenizer.ggml.tokens"].data) == 49152
    assert cfg["max_position_embeddings"] == meta["llama.context_length"]
    assert np.float32(cfg["rope_theta"]) == np.float32(meta["llama.rope.freq_base"])
    assert np.float32(cfg["rms_norm_eps"]) == np.float32(meta["llama.attention.layer_norm_rms_epsilon"])
    assert cfg["tie_word_embeddings"] is True and "lm_head.weight" not in ours
    assert len(ours) == 2 + 9 * cfg["num_hidden_layers"]
    np.testing.assert_array_equal(ours["model.embed_tokens.weight"], ref["token_embd.weight"])
    np.testing.assert_array_equal(ours["model.norm.weight"], ref["output_norm.weight"])
    for l in range(cfg["num_hidden_layers"]):
        p, b = f"model.layers.{l}.", f"blk.{l}."
        q, k = ours[p + "self_attn.q_proj.weight"], ours[p + "self_attn.k_proj.weight"]
        np.testing.assert_array_equal(q, hf_unpermute(ref[b + "attn_q.weight"], NH))
        np.testing.assert_array_equal(k, hf_unpermute(ref[b + "attn_k.weight"], NKV))
        np.testing.assert_array_equal(hf_permute(q, NH), ref[b + "attn_q.weight"])
        for hf, gg in [("self_attn.v_proj", "attn_v"), ("self_attn.o_proj", "attn_output"),
                       ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
                       ("mlp.down_proj", "ffn_down"), ("input_layernorm", "attn_norm"),
                       ("post_attention_layernorm", "ffn_norm")]:
            np.testing.assert_array_equal(ours[p + hf + ".weight"], ref[b + gg + ".weight"], err_msg=p + hf)
    got = info(smollm2_gguf)
    assert got["chat_template"] == "smollm2" and got["tokenizer_path"] == smollm2_gguf
    assert int(got["num_parameters"]) == sum(v.size for v in ours.values())


def write_llama_gguf(path, rng, drop=None, reshape=None, raw_type=None, bias=False, arch="llama", extra_tensor=None,
                     window=None):
    """A tiny llama GGUF written like llama.cpp's converter (q/k rows permuted for the llama
    architecture; qwen2 keeps Hugging Face's rows); returns the HF tensors."""
    V, C, L, NH, NKV, HS, F = 40, 16, 2, 4, 2, 4, 24
    hf = {"model.embed_tokens.weight": rng.standard_normal((V, C)), "model.norm.weight": rng.standard_normal(C),
          "lm_head.weight": rng.standard_normal((V, C))}
    for l in range(L):
        p = f"model.layers.{l}."
        hf[p + "input_layernorm.weight"] = rng.standard_normal(C)
        hf[p + "self_attn.q_proj.weight"] = rng.standard_normal((NH * HS, C))
        hf[p + "self_attn.k_proj.weight"] = rng.standard_normal((NKV * HS, C))
        hf[p + "self_attn.v_proj.weight"] = rng.standard_normal((NKV * HS, C))
        if bias:
            hf[p + "self_attn.q_proj.bias"] = rng.standard_normal(NH * HS)
            hf[p + "self_attn.k_proj.bias"] = rng.standard_normal(NKV * HS)
            hf[p + "self_attn.v_proj.bias"] = rng.standard_normal(NKV * HS)
        hf[p + "self_attn.o_proj.weight"] = rng.standard_normal((C, NH * HS))
        hf[p + "post_attention_layernorm.weight"] = rng.standard_normal(C)
        hf[p + "mlp.gate_proj.weight"] = rng.standard_normal((F, C))
        hf[p + "mlp.up_proj.weight"] = rng.standard_normal((F, C))
        hf[p + "mlp.down_proj.weight"] = rng.standard_normal((C, F))
    hf = {k: v.astype(np.float32) for k, v in hf.items()}
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    for l in range(L):
        for a, b in [("input_layernorm.weight", "attn_norm.weight"), ("self_attn.q_proj.weight", "attn_q.weight"),
                     ("self_attn.k_proj.weight", "attn_k.weight"), ("self_attn.v_proj.weight", "attn_v.weight"),
                     ("self_attn.q_proj.bias", "attn_q.bias"), ("self_attn.k_proj.bias", "attn_k.bias"),
                     ("self_attn.v_proj.bias", "attn_v.bias"),
                     ("self_attn.o_proj.weight", "attn_output.weight"), ("post_attention_layernorm.weight", "ffn_norm.weight"),
                     ("mlp.gate_proj.weight", "ffn_gate.weight"), ("mlp.up_proj.weight", "ffn_up.weight"),
                     ("mlp.down_proj.weight", "ffn_down.weight")]:
            names[f"model.layers.{l}.{a}"] = f"blk.{l}.{b}"
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(L)
    w.add_context_length(64)
    w.add_embedding_length(C)
    w.add_feed_forward_length(F)
    w.add_head_count(NH)
    w.add_head_count_kv(NKV)
    w.add_rope_freq_base(50000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_token_list([f"t{i}" for i in range(V)])
    w.add_chat_template("{{ '<|start_header_id|>' }}")
    if window is not None:
        w.add_sliding_window(window)
    for hn, x in hf.items():
        gn = names[hn]
        if "q_proj" in hn and arch == "llama":
            x = hf_permute(x, NH)
        elif "k_proj" in hn and arch == "llama":
            x = hf_permute(x, NKV)
        if gn == drop:
            continue
        if gn == reshape:
            x = x[:-1]
        if gn == raw_type:  # a type this reader does not dequantise, as raw blocks
            q = np.zeros((x.shape[0], 144), np.uint8)  # one 256-element Q4_K block a row
            w.add_tensor(gn, q, raw_dtype=gguf.GGMLQuantizationType.Q4_K)
            continue
        w.add_tensor(gn, x)
    if extra_tensor is not None:
        w.add_tensor(*extra_tensor)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


@pytest.mark.parametrize("arch,bias", [("llama", False), ("llama", True), ("qwen2", True)])
def test_tiny_llama_gguf_unpermuted_untied(tmp_path, arch, bias):
    path = tmp_path / "tiny.gguf"
    hf = write_llama_gguf(path, np.random.default_rng(5), bias=bias, arch=arch)
    got = info(path)
    assert got["tied_embeddings"] == "0" and got["n_kv_head"] == "2" and got["chat_template"] == "llama3"
    assert got["qkv_bias"] == str(int(bias))
    run_tool("convert", path, "hf", tmp_path / "hf")
    ours = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert set(ours) == set(hf)
    for name, x in hf.items():
        np.testing.assert_array_equal(ours[name], x, err_msg=name)
    cfg = json.load(open(tmp_path / "hf" / "config.json"))
    assert cfg["model_type"] == ("qwen2" if bias else "llama") and cfg["rope_theta"] == 50000.0


# ------------------------------------------------------------------------------------------
# Hugging Face safetensors

GPT2 = dict(V=50, C=8, L=2, NH=2, maxT=16)


def gpt2_hf_tensors(rng, V=GPT2["V"], C=GPT2["C"], L=GPT2["L"], maxT=GPT2["maxT"]):
    """GPT-2 tensors in Hugging Face's shapes (Conv1D weights (in, out))."""
    t = {"wte.weight": rng.standard_normal((V, C)), "wpe.weight": rng.standard_normal((maxT, C)),
         "ln_f.weight": rng.standard_normal(C), "ln_f.bias": rng.standard_normal(C)}
    for l in range(L):
        p = f"h.{l}."
        for n, s in [("ln_1.weight", (C,)), ("ln_1.bias", (C,)), ("attn.c_attn.weight", (C, 3 * C)),
                     ("attn.c_attn.bias", (3 * C,)), ("attn.c_proj.weight", (C, C)), ("attn.c_proj.bias", (C,)),
                     ("ln_2.weight", (C,)), ("ln_2.bias", (C,)), ("mlp.c_fc.weight", (C, 4 * C)),
                     ("mlp.c_fc.bias", (4 * C,)), ("mlp.c_proj.weight", (4 * C, C)), ("mlp.c_proj.bias", (C,))]:
            t[p + n] = rng.standard_normal(s)
    return {k: v.astype(np.float32) for k, v in t.items()}


def gpt2_native_order(t, L=GPT2["L"]):
    """The params buffer model.h defines, from HF GPT-2 tensors (names without prefix)."""
    per_layer = lambda n, tr=False: [t[f"h.{l}.{n}"].T if tr else t[f"h.{l}.{n}"] for l in range(L)]
    parts = [t["wte.weight"], t["wpe.weight"], *per_layer("ln_1.weight"), *per_layer("ln_1.bias"),
             *per_layer("attn.c_attn.weight", True), *per_layer("attn.c_attn.bias"),
             *per_layer("attn.c_proj.weight", True), *per_layer("attn.c_proj.bias"),
             *per_layer("ln_2.weight"), *per_layer("ln_2.bias"), *per_layer("mlp.c_fc.weight", True),
             *per_layer("mlp.c_fc.bias"), *per_layer("mlp.c_proj.weight", True), *per_layer("mlp.c_proj.bias"),
             t["ln_f.weight"], t["ln_f.bias"]]
    return np.concatenate([np.ascontiguousarray(p).ravel() for p in parts])


def gpt2_config(**over):
    cfg = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": GPT2["V"],
           "n_positions": GPT2["maxT"], "n_embd": GPT2["C"], "n_layer": GPT2["L"], "n_head": GPT2["NH"],
           "n_inner": None, "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new"}
    cfg.update(over)
    return cfg


def save_hf(d, tensors, config, dtype="F32"):
    """Writes tensors (float32) as dtype: F32/F16 through the safetensors package, BF16 by hand.
    Returns the float32 values the file holds."""
    d.mkdir(parents=True, exist_ok=True)
    json.dump(config, open(d / "config.json", "w"))
    if dtype == "BF16":
        bits = {k: bf16_bits(v) for k, v in tensors.items()}
        write_safetensors_manual(d / "model.safetensors", {k: ("BF16", v.shape, v.tobytes()) for k, v in bits.items()})
        return {k: bf16_to_f32(v) for k, v in bits.items()}
    np_dtype = np.float32 if dtype == "F32" else np.float16
    save_file({k: v.astype(np_dtype) for k, v in tensors.items()}, str(d / "model.safetensors"))
    return {k: v.astype(np_dtype).astype(np.float32) for k, v in tensors.items()}


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
@pytest.mark.parametrize("prefix", ["", "transformer."])
def test_hf_gpt2_loads_and_saves(tmp_path, dtype, prefix):
    t = gpt2_hf_tensors(np.random.default_rng(1))
    held = save_hf(tmp_path / "in", {prefix + k: v for k, v in t.items()}, gpt2_config(), dtype)
    held = {k[len(prefix):]: v for k, v in held.items()}
    # loader: the native file holds exactly model.h's layout of the (transposed) HF tensors
    run_tool("convert", tmp_path / "in", "native", tmp_path / "m.bin")
    header, params = read_native(tmp_path / "m.bin")
    np.testing.assert_array_equal(params, gpt2_native_order(held))
    # writer: a HF directory that the safetensors package reads back equal
    run_tool("convert", tmp_path / "in" / "model.safetensors", "hf", tmp_path / "out")
    back = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(back) == {"transformer." + k for k in held}
    for k, v in held.items():
        np.testing.assert_array_equal(back["transformer." + k], v, err_msg=k)
    cfg = json.load(open(tmp_path / "out" / "config.json"))
    assert cfg["architectures"] == ["GPT2LMHeadModel"] and cfg["n_inner"] == 4 * GPT2["C"]
    assert (cfg["vocab_size"], cfg["n_positions"], cfg["n_embd"], cfg["n_layer"], cfg["n_head"]) == (50, 16, 8, 2, 2)
    # a grads-shaped buffer under HF names and shapes
    run_tool("hf_tensors", tmp_path / "m.bin", tmp_path / "g.safetensors", "-2.5")
    grads = load_file(str(tmp_path / "g.safetensors"))
    for k, v in held.items():
        np.testing.assert_array_equal(grads["transformer." + k], np.float32(-2.5) * v, err_msg=k)


LLAMA = dict(V=40, C=16, L=2, NH=4, NKV=2, HS=4, F=24)


def shard_hf(d, t):
    """Replaces d/model.safetensors by two shards of the tensors t and their index file."""
    os.remove(d / "model.safetensors")
    names = sorted(t)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for fname, keys in shards.items():
        save_file({k: t[k] for k in keys}, str(d / fname))
    json.dump({"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}},
              open(d / "model.safetensors.index.json", "w"))


def llama_hf_tensors(rng, bias=False, lm_head=True):
    V, C, L, NH, NKV, HS, F = (LLAMA[k] for k in ("V", "C", "L", "NH", "NKV", "HS", "F"))
    t = {"model.embed_tokens.weight": rng.standard_normal((V, C)), "model.norm.weight": rng.standard_normal(C)}
    if lm_head:
        t["lm_head.weight"] = rng.standard_normal((V, C))
    for l in range(L):
        p = f"model.layers.{l}."
        shapes = [("input_layernorm.weight", (C,)), ("self_attn.q_proj.weight", (NH * HS, C)),
                  ("self_attn.k_proj.weight", (NKV * HS, C)), ("self_attn.v_proj.weight", (NKV * HS, C)),
                  ("self_attn.o_proj.weight", (C, NH * HS)), ("post_attention_layernorm.weight", (C,)),
                  ("mlp.gate_proj.weight", (F, C)), ("mlp.up_proj.weight", (F, C)), ("mlp.down_proj.weight", (C, F))]
        if bias:
            shapes += [("self_attn.q_proj.bias", (NH * HS,)), ("self_attn.k_proj.bias", (NKV * HS,)),
                       ("self_attn.v_proj.bias", (NKV * HS,))]
        for n, s in shapes:
            t[p + n] = rng.standard_normal(s)
    return {k: v.astype(np.float32) for k, v in t.items()}


def llama_native_order(t, bias, L=LLAMA["L"]):
    g = lambda l, n: t[f"model.layers.{l}.{n}"]
    parts = [t["model.embed_tokens.weight"], *[g(l, "input_layernorm.weight") for l in range(L)]]
    parts += [np.concatenate([g(l, "self_attn.q_proj.weight"), g(l, "self_attn.k_proj.weight"),
                              g(l, "self_attn.v_proj.weight")]) for l in range(L)]
    if bias:
        parts += [np.concatenate([g(l, "self_attn.q_proj.bias"), g(l, "self_attn.k_proj.bias"),
                                  g(l, "self_attn.v_proj.bias")]) for l in range(L)]
    parts += [g(l, "self_attn.o_proj.weight") for l in range(L)]
    parts += [g(l, "post_attention_layernorm.weight") for l in range(L)]
    parts += [np.concatenate([g(l, "mlp.gate_proj.weight"), g(l, "mlp.up_proj.weight")]) for l in range(L)]
    parts += [g(l, "mlp.down_proj.weight") for l in range(L)]
    parts += [t["model.norm.weight"]]
    if "lm_head.weight" in t:
        parts += [t["lm_head.weight"]]
    return np.concatenate([p.ravel() for p in parts])


def llama_config(model_type="llama", **over):
    cfg = {"model_type": model_type, "hidden_size": LLAMA["C"], "num_hidden_layers": LLAMA["L"],
           "num_attention_heads": LLAMA["NH"], "num_key_value_heads": LLAMA["NKV"],
           "intermediate_size": LLAMA["F"], "vocab_size": LLAMA["V"], "max_position_embeddings": 128,
           "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "tie_word_embeddings": False}
    cfg.update(over)
    return cfg


@pytest.mark.parametrize("kind", ["llama_untied_f16", "qwen2_tied_bf16", "llama_sharded_f32"])
def test_hf_llama_family_loads_and_saves(tmp_path, kind):
    bias, untied = kind.startswith("qwen2"), kind.startswith("llama")
    t = llama_hf_tensors(np.random.default_rng(2), bias=bias, lm_head=untied)
    cfg = llama_config("qwen2" if bias else "llama", tie_word_embeddings=not untied)
    dtype = kind.rsplit("_", 1)[1].upper()
    src = tmp_path / "in"
    held = save_hf(src, t, cfg, dtype)
    if "sharded" in kind:
        shard_hf(src, t)
    (src / "tokenizer.json").write_text("{}")
    got = info(src)
    assert got["tokenizer_path"] == str(src / "tokenizer.json")
    assert (got["tied_embeddings"], got["qkv_bias"], got["n_kv_head"]) == (str(int(not untied)), str(int(bias)), "2")
    run_tool("convert", src, "native", tmp_path / "m.bin")
    np.testing.assert_array_equal(read_native(tmp_path / "m.bin")[1], llama_native_order(held, bias))
    run_tool("convert", tmp_path / "m.bin", "hf", tmp_path / "out")
    back = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(back) == set(held)
    for k, v in held.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)
    out_cfg = json.load(open(tmp_path / "out" / "config.json"))
    assert out_cfg["architectures"] == (["Qwen2ForCausalLM"] if bias else ["LlamaForCausalLM"])
    assert out_cfg["torch_dtype"] == "float32" and out_cfg["tie_word_embeddings"] == (not untied)
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "vocab_size", "max_position_embeddings", "rms_norm_eps", "rope_theta"):
        assert np.float32(out_cfg[key]) == np.float32(cfg[key]), key
    assert out_cfg["head_dim"] == LLAMA["HS"]


# A GPT-2 block's tensors: GGUF name, Hugging Face name, whether llama.cpp's converter transposes it
GPT2_GGUF_BLOCK = [("attn_norm.weight", "ln_1.weight", 0), ("attn_norm.bias", "ln_1.bias", 0),
                   ("attn_qkv.weight", "attn.c_attn.weight", 1), ("attn_qkv.bias", "attn.c_attn.bias", 0),
                   ("attn_output.weight", "attn.c_proj.weight", 1), ("attn_output.bias", "attn.c_proj.bias", 0),
                   ("ffn_norm.weight", "ln_2.weight", 0), ("ffn_norm.bias", "ln_2.bias", 0),
                   ("ffn_up.weight", "mlp.c_fc.weight", 1), ("ffn_up.bias", "mlp.c_fc.bias", 0),
                   ("ffn_down.weight", "mlp.c_proj.weight", 1), ("ffn_down.bias", "mlp.c_proj.bias", 0)]


def gpt2_gguf_writer(path):
    """A GGUFWriter for the test GPT-2 (GPT2's sizes) with its hyperparameters written."""
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_block_count(GPT2["L"])
    w.add_context_length(GPT2["maxT"])
    w.add_embedding_length(GPT2["C"])
    w.add_feed_forward_length(4 * GPT2["C"])
    w.add_head_count(GPT2["NH"])
    w.add_layer_norm_eps(1e-5)
    w.add_vocab_size(GPT2["V"])
    return w


def test_gpt2_gguf_loads(tmp_path):
    """A GPT-2 GGUF as llama.cpp's converter writes it: Conv1D weights transposed to (out, in),
    output.weight a copy of token_embd (tied), some tensors F16."""
    t = gpt2_hf_tensors(np.random.default_rng(12))
    C, L = GPT2["C"], GPT2["L"]
    w = gpt2_gguf_writer(tmp_path / "g.gguf")
    held = {}

    def add(gname, hname, transpose=False, f16=False):
        x = t[hname].T.copy() if transpose else t[hname]
        w.add_tensor(gname, x.astype(np.float16) if f16 else x)
        held[hname] = t[hname].astype(np.float16).astype(np.float32) if f16 else t[hname]

    add("token_embd.weight", "wte.weight", f16=True)
    add("position_embd.weight", "wpe.weight")
    for l in range(L):
        for g, h, tr in GPT2_GGUF_BLOCK:
            add(f"blk.{l}.{g}", f"h.{l}.{h}", transpose=bool(tr), f16=(g == "ffn_up.weight"))
    add("output_norm.weight", "ln_f.weight")
    add("output_norm.bias", "ln_f.bias")
    w.add_tensor("output.weight", t["wte.weight"].astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    got = info(tmp_path / "g.gguf")
    assert (got["arch"], got["tied_embeddings"], got["vocab_size"], got["max_seq_len"]) == ("gpt2", "1", "50", "16")
    run_tool("convert", tmp_path / "g.gguf", "hf", tmp_path / "hf")
    back = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert set(back) == {"transformer." + k for k in held}
    for k, v in held.items():
        np.testing.assert_array_equal(back["transformer." + k], v, err_msg=k)


# ------------------------------------------------------------------------------------------
# llm.c .bin and native

def write_llmc_bin(path, t, version, Vp=64):
    """llm.c's GPT-2 checkpoint: header int32[256] (magic 20240326), params in llm.c order,
    wte padded with zero rows to Vp."""
    V, C, L, NH, maxT = (GPT2[k] for k in ("V", "C", "L", "NH", "maxT"))
    header = np.zeros(256, np.int32)
    header[:8] = [20240326, version, maxT, V, L, NH, C, Vp]
    padded = dict(t)
    padded["wte.weight"] = np.concatenate([t["wte.weight"], np.zeros((Vp - V, C), np.float32)])
    params = gpt2_native_order(padded)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(params.tobytes() if version == 3 else bf16_bits(params).tobytes())
    return params if version == 3 else bf16_to_f32(bf16_bits(params))


@pytest.mark.parametrize("version", [3, 5])
def test_llmc_bin_loads(tmp_path, version):
    t = gpt2_hf_tensors(np.random.default_rng(3))
    params = write_llmc_bin(tmp_path / "model.bin", t, version)
    got = info(tmp_path / "model.bin")
    assert (got["format"], got["vocab_size"], got["padded_vocab_size"], got["ffn_hidden"]) == ("llmc_bin", "50", "64", "32")
    run_tool("convert", tmp_path / "model.bin", "hf", tmp_path / "hf")
    back = load_file(str(tmp_path / "hf" / "model.safetensors"))
    held = t if version == 3 else {k: bf16_to_f32(bf16_bits(v)) for k, v in t.items()}
    for k, v in held.items():
        np.testing.assert_array_equal(back["transformer." + k], v, err_msg=k)
    assert json.load(open(tmp_path / "hf" / "config.json"))["vocab_size"] == GPT2["V"]
    run_tool("convert", tmp_path / "model.bin", "native", tmp_path / "n.bin")
    header, native = read_native(tmp_path / "n.bin")
    np.testing.assert_array_equal(native, params)
    assert list(header[2:12]) == [0, 50, 64, 16, 2, 8, 2, 2, 4, 32]


def test_native_roundtrip_bit_exact(tmp_path):
    write_llmc_bin(tmp_path / "g.bin", gpt2_hf_tensors(np.random.default_rng(4)), 3)
    out = run_tool("roundtrip", tmp_path / "g.bin", tmp_path / "g.native")
    assert "bit-exact" in out and "MISMATCH" not in out
    src = tmp_path / "llama"
    save_hf(src, llama_hf_tensors(np.random.default_rng(6), bias=True), llama_config("qwen2"))
    out = run_tool("roundtrip", src, tmp_path / "l.native")
    assert "bit-exact" in out and "MISMATCH" not in out
    got = info(tmp_path / "l.native")
    assert (got["format"], got["step"], got["has_optimizer"]) == ("native", "12345", "1")
    assert got == {**info(src), "format": "native", "step": "12345", "has_optimizer": "1", "tokenizer_path": ""}


# ------------------------------------------------------------------------------------------
# bad inputs: exit 1 with a message naming the file and the problem

def test_missing_file(tmp_path):
    err = run_tool_fails("info", tmp_path / "nope.gguf")
    assert "nope.gguf" in err and "No such file" in err


def test_wrong_magic(tmp_path):
    p = tmp_path / "junk.bin"
    p.write_bytes(b"JUNKJUNKJUNK" * 100)
    err = run_tool_fails("info", p)
    assert "junk.bin" in err and "unknown checkpoint format" in err
    err = run_tool_fails("dequant", p, tmp_path / "out.safetensors")
    assert "junk.bin" in err and "bad magic" in err
    assert not (tmp_path / "out.safetensors").exists()


def test_corrupt_gguf_header_and_metadata(tmp_path):
    p = tmp_path / "c.gguf"
    write_llama_gguf(p, np.random.default_rng(13))
    good = p.read_bytes()
    bad = bytearray(good)
    struct.pack_into("<Q", bad, 8, 2**40)  # tensor count
    p.write_bytes(bytes(bad))
    assert "absurd tensor count 1099511627776" in run_tool_fails("info", p)
    bad = bytearray(good)
    struct.pack_into("<I", bad, 4, 1)  # GGUF v1 used 32-bit counts
    p.write_bytes(bytes(bad))
    assert "GGUF version 1 is not supported" in run_tool_fails("info", p)
    # the value type of the first key (general.architecture) set to one GGUF does not define
    bad = bytearray(good)
    key_len = struct.unpack_from("<Q", bad, 24)[0]
    assert bad[32:32 + key_len] == b"general.architecture"
    struct.pack_into("<I", bad, 32 + key_len, 42)
    p.write_bytes(bytes(bad))
    err = run_tool_fails("info", p)
    assert "c.gguf" in err and "general.architecture" in err and "unknown value type 42" in err


@pytest.mark.parametrize("fmt", ["gguf_header", "gguf_metadata", "gguf_data", "llmc", "native", "safetensors"])
def test_truncated_file(tmp_path, fmt):
    rng = np.random.default_rng(7)
    if fmt.startswith("gguf"):
        p = tmp_path / "t.gguf"
        write_llama_gguf(p, rng)
        # inside the fixed header; inside the chat template's value; inside the last tensor's data
        template_at = gguf.GGUFReader(str(p)).fields["tokenizer.chat_template"].offset
        cut = {"gguf_header": 20, "gguf_metadata": template_at + 40}.get(fmt, os.path.getsize(p) - 100)
    elif fmt == "llmc":
        p = tmp_path / "t.bin"
        write_llmc_bin(p, gpt2_hf_tensors(rng), 3)
        cut = os.path.getsize(p) - 4
    elif fmt == "native":
        write_llmc_bin(tmp_path / "g.bin", gpt2_hf_tensors(rng), 3)
        p = tmp_path / "t.native"
        run_tool("convert", tmp_path / "g.bin", "native", p)
        cut = os.path.getsize(p) - 4
    else:
        save_hf(tmp_path, gpt2_hf_tensors(rng), gpt2_config())
        p = tmp_path / "model.safetensors"
        cut = os.path.getsize(p) - 4
    with open(p, "r+b") as f:
        f.truncate(cut)
    err = run_tool_fails("info", p)
    assert p.name in err and "truncated file" in err
    if fmt == "gguf_metadata":
        assert "reading tokenizer.chat_template" in err


def test_unknown_gguf_tensor_type(tmp_path):
    p = tmp_path / "q4k.gguf"
    write_llama_gguf(p, np.random.default_rng(8), raw_type="blk.1.ffn_up.weight")
    err = run_tool_fails("info", p)
    assert "q4k.gguf" in err and "blk.1.ffn_up.weight" in err and "Q4_K" in err and "12" in err
    # a type number ggml does not define at all
    reader = gguf.GGUFReader(str(p))
    field_offset = [t for t in reader.tensors if t.name == "blk.1.ffn_up.weight"][0].field.offset
    raw = bytearray(p.read_bytes())
    name_len = struct.unpack_from("<Q", raw, field_offset)[0]
    type_at = field_offset + 8 + name_len + 4 + 8 * 2
    assert struct.unpack_from("<I", raw, type_at)[0] == 12
    struct.pack_into("<I", raw, type_at, 99)
    p.write_bytes(bytes(raw))
    err = run_tool_fails("info", p)
    assert "blk.1.ffn_up.weight" in err and "type 99" in err


def test_missing_tensor(tmp_path):
    p = tmp_path / "m.gguf"
    write_llama_gguf(p, np.random.default_rng(9), drop="blk.1.ffn_up.weight")
    err = run_tool_fails("info", p)
    assert "m.gguf" in err and "missing tensor blk.1.ffn_up.weight" in err
    t = llama_hf_tensors(np.random.default_rng(9))
    del t["model.layers.0.mlp.down_proj.weight"]
    save_hf(tmp_path / "hf", t, llama_config())
    err = run_tool_fails("info", tmp_path / "hf")
    assert "hf" in err and "missing tensor model.layers.0.mlp.down_proj.weight" in err


def test_misshaped_tensor(tmp_path):
    p = tmp_path / "s.gguf"
    write_llama_gguf(p, np.random.default_rng(10), reshape="blk.0.attn_k.weight")
    err = run_tool_fails("info", p)
    assert "s.gguf" in err and "blk.0.attn_k.weight has shape [7, 16], expected [8, 16]" in err
    # the message says where the expected shape comes from: a vocabulary that does not match the
    # tokenizer's count is the usual cause with an embedding
    assert "expected [8, 16] from the file's metadata (llama.* hyperparameters" in err
    p = tmp_path / "v.gguf"
    write_llama_gguf(p, np.random.default_rng(10), reshape="token_embd.weight")
    err = run_tool_fails("info", p)
    assert "token_embd.weight has shape" in err and "the vocabulary is the count of tokenizer.ggml.tokens" in err, err
    t = gpt2_hf_tensors(np.random.default_rng(10))
    t["h.1.attn.c_attn.weight"] = t["h.1.attn.c_attn.weight"].T.copy()
    save_hf(tmp_path / "hf", t, gpt2_config())
    err = run_tool_fails("info", tmp_path / "hf")
    assert "model.safetensors" in err and "h.1.attn.c_attn.weight has shape [24, 8], expected [8, 24]" in err


def test_config_the_model_cannot_run(tmp_path):
    # 16 channels do not split into 3 heads
    save_hf(tmp_path / "hf", llama_hf_tensors(np.random.default_rng(11)), llama_config(num_attention_heads=3))
    err = run_tool_fails("info", tmp_path / "hf")
    assert "config.json" in err and "hidden_size 16 is not divisible by num_attention_heads 3" in err
    # 4 query heads cannot share 3 key/value heads
    save_hf(tmp_path / "hf3", llama_hf_tensors(np.random.default_rng(11)), llama_config(num_key_value_heads=3))
    err = run_tool_fails("info", tmp_path / "hf3")
    assert "config.json" in err and "n_kv_head 3" in err
    # a field that changes the computation in a way the model does not implement
    save_hf(tmp_path / "hf2", llama_hf_tensors(np.random.default_rng(11)),
            llama_config(rope_scaling={"rope_type": "llama3", "factor": 8.0}))
    err = run_tool_fails("info", tmp_path / "hf2")
    assert "config.json" in err and "rope_scaling" in err
    # the same in a GGUF: frequencies scaled by a rope_freqs tensor (as Llama 3.1's converter writes)
    p = tmp_path / "rope.gguf"
    write_llama_gguf(p, np.random.default_rng(11), extra_tensor=("rope_freqs.weight", np.ones(2, np.float32)))
    err = run_tool_fails("info", p)
    assert "rope.gguf" in err and "rope_freqs.weight" in err and "plain RoPE" in err
    # an llm.c header whose heads do not divide the channels
    p = tmp_path / "bad.bin"
    write_llmc_bin(p, gpt2_hf_tensors(np.random.default_rng(11)), 3)
    raw = bytearray(p.read_bytes())
    struct.pack_into("<i", raw, 5 * 4, 3)
    p.write_bytes(bytes(raw))
    err = run_tool_fails("info", p)
    assert "bad.bin" in err and "channels" in err and "not divisible" in err


# ------------------------------------------------------------------------------------------
# what config.json says, and what a file holds beyond it: the loaded model against the float64
# JAX oracle (test/oracle/model_jax.py) on the file's weights; refusals by exit code and message

GEN_TOOL = os.environ.get("GEN_TOOL", str(BUILD / "tools" / "gen_tool"))


def engine_greedy(model, prompt, n_new):
    """Greedy tokens and their log-probs from build/tools/gen_tool (generate.c on the loaded model)."""
    p = subprocess.run([GEN_TOOL, str(model), "0", "0", "1", str(n_new), "1"], input=" ".join(map(str, prompt)) + "\n",
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.splitlines()[0])
    return out["tokens"], out["logprobs"], p.stderr


def oracle_log_softmax(params, cfg, seq):
    """(T, V) float64 log-softmax of the oracle's logits for one sequence."""
    import sys
    from conftest import ROOT
    sys.path.insert(0, str(ROOT / "test" / "oracle"))
    import model_jax
    lg = np.asarray(model_jax.logits(params, cfg, np.array([seq], np.int32)), np.float64)[0]
    m = lg.max(-1, keepdims=True)
    return lg - m - np.log(np.exp(lg - m).sum(-1, keepdims=True))


def assert_engine_matches_oracle(model, params, cfg, prompt, n_new=6, tol=2e-3):
    """The engine's greedy continuation of prompt is the oracle's (each token the oracle's argmax
    up to tol) with the oracle's log-probs; returns the engine's stderr."""
    tokens, logprobs, err = engine_greedy(model, prompt, n_new)
    assert len(tokens) == n_new
    lsm = oracle_log_softmax(params, cfg, list(prompt) + tokens)
    for i, (t, lp) in enumerate(zip(tokens, logprobs)):
        row = lsm[len(prompt) - 1 + i]
        assert row[t] >= row.max() - tol, (i, t, int(row.argmax()), row[t], row.max())
        assert abs(lp - row[t]) < tol, (i, t, lp, row[t])
    return err


def max_logprob_gap(model, params, cfg, prompt, n_new=6):
    """max |engine log-prob - oracle log-prob| over the engine's greedy tokens."""
    tokens, logprobs, _ = engine_greedy(model, prompt, n_new)
    lsm = oracle_log_softmax(params, cfg, list(prompt) + tokens)
    return max(abs(lp - lsm[len(prompt) - 1 + i][t]) for i, (t, lp) in enumerate(zip(tokens, logprobs)))


PROMPT = [1, 7, 22, 3, 30]


def test_transformers5_rope_parameters_theta(tmp_path):
    """transformers 5 writes RoPE as "rope_parameters": {"rope_theta", "rope_type"} with no top-level
    rope_theta: the model must run at that theta, as the oracle does given it."""
    t = llama_hf_tensors(np.random.default_rng(21))
    cfg5 = llama_config()
    del cfg5["rope_theta"]
    cfg5["rope_parameters"] = {"rope_theta": 50000.0, "rope_type": "default"}
    save_hf(tmp_path / "hf", t, cfg5)
    assert float(info(tmp_path / "hf")["rope_theta"]) == 50000.0
    assert_engine_matches_oracle(tmp_path / "hf", t, llama_config(rope_theta=50000.0), PROMPT)
    # the test tells the two thetas apart: at transformers' old default the log-probs differ
    assert max_logprob_gap(tmp_path / "hf", t, llama_config(rope_theta=10000.0), PROMPT) > 0.01
    # "default" in transformers 4's rope_scaling is plain RoPE too
    cfg4 = llama_config(rope_theta=50000.0, rope_scaling={"rope_type": "default"})
    save_hf(tmp_path / "hf4", t, cfg4)
    assert_engine_matches_oracle(tmp_path / "hf4", t, llama_config(rope_theta=50000.0), PROMPT)


@pytest.mark.parametrize("field", ["rope_parameters", "rope_scaling"])
@pytest.mark.parametrize("rope_type", ["llama3", "yarn", "linear", "dynamic"])
def test_scaled_rope_is_refused(tmp_path, field, rope_type):
    cfg = llama_config()
    cfg[field] = {"rope_type": rope_type, "factor": 4.0, "rope_theta": 100000.0, "original_max_position_embeddings": 32}
    if field == "rope_parameters":
        del cfg["rope_theta"]
    save_hf(tmp_path / "hf", llama_hf_tensors(np.random.default_rng(22)), cfg)
    err = run_tool_fails("info", tmp_path / "hf")
    assert str(tmp_path / "hf" / "config.json") in err and f"{field}.rope_type" in err and rope_type in err


def write_gpt2_gguf(path, t, head=None):
    """A GPT-2 GGUF as llama.cpp's converter writes it (Conv1D weights as (out, in)), all F32;
    output.weight is head when given (an untied classifier), else absent (tied)."""
    C, L = GPT2["C"], GPT2["L"]
    w = gpt2_gguf_writer(path)
    w.add_tensor("token_embd.weight", t["wte.weight"])
    w.add_tensor("position_embd.weight", t["wpe.weight"])
    for l in range(L):
        for g, h, tr in GPT2_GGUF_BLOCK:
            x = t[f"h.{l}.{h}"]
            w.add_tensor(f"blk.{l}.{g}", x.T.copy() if tr else x)
    w.add_tensor("output_norm.weight", t["ln_f.weight"])
    w.add_tensor("output_norm.bias", t["ln_f.bias"])
    if head is not None:
        w.add_tensor("output.weight", head)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_untied_gpt2_survives_gguf_hf_roundtrip(tmp_path):
    """An untied GPT-2 (GGUF output.weight unlike token_embd) exported to Hugging Face and loaded
    back keeps its classifier: lm_head.weight + tie_word_embeddings false, and the oracle's
    log-probs on the untied weights (transformers' GPT2LMHeadModel uses lm_head.weight then)."""
    t = gpt2_hf_tensors(np.random.default_rng(23))
    head = np.random.default_rng(24).standard_normal((GPT2["V"], GPT2["C"])).astype(np.float32)
    write_gpt2_gguf(tmp_path / "g.gguf", t, head)
    untied = {**t, "lm_head.weight": head}
    cfg = gpt2_config()
    assert_engine_matches_oracle(tmp_path / "g.gguf", untied, cfg, PROMPT)
    run_tool("convert", tmp_path / "g.gguf", "hf", tmp_path / "hf")
    out_cfg = json.load(open(tmp_path / "hf" / "config.json"))
    assert out_cfg["tie_word_embeddings"] is False
    np.testing.assert_array_equal(load_file(str(tmp_path / "hf" / "model.safetensors"))["lm_head.weight"], head)
    assert info(tmp_path / "hf")["tied_embeddings"] == "0"
    assert_engine_matches_oracle(tmp_path / "hf", untied, cfg, PROMPT)
    # the tied reading of the same file is a different model: the test tells them apart
    assert max_logprob_gap(tmp_path / "hf", t, cfg, PROMPT) > 0.01
    # GPT-2's default is tied: a tie_word_embeddings true file with a lm_head copy is tied
    save_hf(tmp_path / "tied", {**t, "lm_head.weight": t["wte.weight"]}, gpt2_config(tie_word_embeddings=True))
    assert info(tmp_path / "tied")["tied_embeddings"] == "1"


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_untied_config_without_lm_head_is_refused(tmp_path, family):
    if family == "gpt2":
        save_hf(tmp_path / "hf", gpt2_hf_tensors(np.random.default_rng(25)), gpt2_config(tie_word_embeddings=False))
    else:
        save_hf(tmp_path / "hf", llama_hf_tensors(np.random.default_rng(25), lm_head=False), llama_config())
    err = run_tool_fails("info", tmp_path / "hf")
    assert str(tmp_path / "hf" / "config.json") in err and "tie_word_embeddings" in err and "lm_head.weight" in err


def test_tensors_the_config_does_not_account_for(tmp_path):
    # the file has two layers, the config says one
    save_hf(tmp_path / "layers", llama_hf_tensors(np.random.default_rng(26)), llama_config(num_hidden_layers=1))
    err = run_tool_fails("info", tmp_path / "layers")
    assert str(tmp_path / "layers") in err and "model.layers.1." in err and "config.json" in err
    # a sequence-classification checkpoint: score.weight, no lm_head, tie_word_embeddings unset
    t = llama_hf_tensors(np.random.default_rng(26), lm_head=False)
    t["score.weight"] = np.ones((1, LLAMA["C"]), np.float32)
    cfg = llama_config(architectures=["LlamaForSequenceClassification"])
    del cfg["tie_word_embeddings"]
    save_hf(tmp_path / "seqcls", t, cfg)
    err = run_tool_fails("info", tmp_path / "seqcls")
    assert str(tmp_path / "seqcls") in err and "score.weight" in err
    # a GGUF with a block the metadata does not count
    p = tmp_path / "extra.gguf"
    write_llama_gguf(p, np.random.default_rng(26), extra_tensor=("blk.2.attn_norm.weight", np.ones(16, np.float32)))
    err = run_tool_fails("info", p)
    assert "extra.gguf" in err and "blk.2.attn_norm.weight" in err


def test_known_buffers_are_not_parameters(tmp_path):
    """GPT-2's attention-mask buffers and Llama's RoPE inverse frequencies, which older exports
    keep, load as before: the parameters are exactly the model's (model.h's layout in NumPy)."""
    t = gpt2_hf_tensors(np.random.default_rng(27))
    extra = {**t, "h.0.attn.bias": np.tril(np.ones((1, 1, 16, 16), np.float32)), "h.1.attn.masked_bias": np.float32([-1e4])}
    save_hf(tmp_path / "g", extra, gpt2_config())
    run_tool("convert", tmp_path / "g", "native", tmp_path / "g.bin")
    np.testing.assert_array_equal(read_native(tmp_path / "g.bin")[1], gpt2_native_order(t))
    t = llama_hf_tensors(np.random.default_rng(27))
    extra = {**t, "model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(2, np.float32)}
    save_hf(tmp_path / "l", extra, llama_config())
    run_tool("convert", tmp_path / "l", "native", tmp_path / "l.bin")
    np.testing.assert_array_equal(read_native(tmp_path / "l.bin")[1], llama_native_order(t, False))


@pytest.mark.parametrize("model_type,over", [
    ("mistral", dict(sliding_window=8)),
    ("mistral", dict(sliding_window=None)),
    ("mistral", dict(sliding_window=512)),
    ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=0)),
    ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1)),
    ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=2)),
    ("qwen2", dict(use_sliding_window=False, sliding_window=8)),
])
def test_sliding_window_becomes_the_context(tmp_path, model_type, over):
    """Where transformers' config says a layer attends through a window W shorter than
    max_position_embeddings, the context is W (full attention equals it up to W tokens) with a
    note; elsewhere it stays max_position_embeddings. Up to W tokens the log-probs are the
    oracle's (full attention)."""
    transformers = pytest.importorskip("transformers")
    t = llama_hf_tensors(np.random.default_rng(28), bias=model_type == "qwen2")
    cfg = llama_config(model_type, **over)
    save_hf(tmp_path / "hf", t, cfg)
    ref = transformers.AutoConfig.from_pretrained(str(tmp_path / "hf"))
    if model_type == "mistral":
        active = ref.sliding_window is not None
    else:
        active = "sliding_attention" in ref.layer_types
    want = min(ref.sliding_window, cfg["max_position_embeddings"]) if active else cfg["max_position_embeddings"]
    p = subprocess.run([TOOL, "info", str(tmp_path / "hf")], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    assert int(dict(l.split("=", 1) for l in p.stdout.splitlines())["max_seq_len"]) == want
    if want < cfg["max_position_embeddings"]:
        assert "config.json" in p.stderr and "sliding_window" in p.stderr and str(want) in p.stderr
    else:
        assert "sliding" not in p.stderr
    err = assert_engine_matches_oracle(tmp_path / "hf", t, cfg, PROMPT[:3], n_new=min(5, want - 3))
    assert ("note:" in err) == (want < cfg["max_position_embeddings"])


@pytest.mark.parametrize("window", [8, 64, 100, None])
def test_gguf_sliding_window_becomes_the_context(tmp_path, window):
    """A GGUF's ARCH.attention.sliding_window (the key the gguf package writes) shorter than its
    context_length (64 here) is the context, with a note naming the key, as for a Hugging Face
    config; a window as long or longer, or none, leaves context_length."""
    path = tmp_path / "w.gguf"
    write_llama_gguf(path, np.random.default_rng(30), window=window)
    reader = gguf.GGUFReader(str(path))
    ctx = int(reader.fields["llama.context_length"].parts[-1][0])
    field = reader.fields.get("llama.attention.sliding_window")
    written = int(field.parts[-1][0]) if field is not None else None
    assert written == window and ctx == 64
    want = min(written, ctx) if written else ctx
    p = subprocess.run([TOOL, "info", str(path)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    assert int(dict(l.split("=", 1) for l in p.stdout.splitlines())["max_seq_len"]) == want
    assert ("llama.attention.sliding_window" in p.stderr) == (want < ctx), p.stderr


def test_absurd_config_on_a_small_file_names_the_file(tmp_path):
    """A config far larger than its file is refused by the first tensor that does not fit, before
    anything is allocated, not as an allocation failure."""
    t = llama_hf_tensors(np.random.default_rng(29))
    save_hf(tmp_path / "hf", t, llama_config(hidden_size=65536, num_hidden_layers=1024, intermediate_size=1048576,
                                             num_attention_heads=1024, num_key_value_heads=1024))
    err = run_tool_fails("info", tmp_path / "hf")
    assert "model.safetensors" in err and "model.embed_tokens.weight has shape [40, 16], expected [40, 65536]" in err
    assert "out of memory" not in err
    # an llm.c header asking for 2^24 tokens x 2^16 channels x 1024 layers on a small file
    p = tmp_path / "max.bin"
    write_llmc_bin(p, gpt2_hf_tensors(np.random.default_rng(29)), 3)
    raw = bytearray(p.read_bytes())
    struct.pack_into("<8i", raw, 0, 20240326, 3, 1 << 20, 1 << 24, 1024, 1024, 1 << 16, 1 << 24)
    p.write_bytes(bytes(raw))
    err = run_tool_fails("info", p)
    assert "max.bin" in err and "truncated file" in err and "out of memory" not in err


def test_allocation_failure_names_the_source(tmp_path, smollm2_gguf):
    """A model too large for the memory is named with its file and parameter count (the GGUF's
    tensor sizes: tied). The address-space limit is the tool's own need (its libraries: with CUDA
    linked, most of a GiB), found on a tiny model, plus the GGUF's size and 256 MiB: SmolLM2's
    parameters alone (538 MB) do not fit in what is left."""
    n_params = sum(int(np.prod(t.shape)) for t in gguf.GGUFReader(smollm2_gguf).tensors)
    save_hf(tmp_path / "tiny", llama_hf_tensors(np.random.default_rng(1)), llama_config())
    limited = lambda mib, path: subprocess.run(["sh", "-c", 'ulimit -v "$1" && exec "$2" info "$3"', "sh",
                                                str(mib * 1024), TOOL, str(path)], capture_output=True, text=True, timeout=600)
    base = next((mib for mib in range(64, 8192, 64) if limited(mib, tmp_path / "tiny").returncode == 0), None)
    assert base is not None, "ckpt_tool info did not run on a tiny model under 8 GiB of address space"
    p = limited(base + os.path.getsize(smollm2_gguf) // 2**20 + 256, smollm2_gguf)
    assert p.returncode == 1, p.stderr
    assert p.stderr.startswith("error: " + smollm2_gguf) and "out of memory" in p.stderr, p.stderr
    assert f"{n_params} parameters" in p.stderr and "GiB" in p.stderr


def test_run_directory_index_and_shard(tmp_path):
    """A run directory loads the checkpoint its latest.txt names; a sharded set loads from its
    index file as from its directory; one shard alone is refused."""
    t = llama_hf_tensors(np.random.default_rng(30))
    save_hf(tmp_path / "hf", t, llama_config())
    run = tmp_path / "run"
    run.mkdir()
    run_tool("convert", tmp_path / "hf", "native", run / "model_step000001.ckpt")
    run_tool("convert", tmp_path / "hf", "native", run / "model_step000002.ckpt")
    (run / "latest.txt").write_text("model_step000002.ckpt\n")
    (run / "config.json").write_text(json.dumps({"command": "pretrain"}))
    want = llama_native_order(t, False)
    p = subprocess.run([TOOL, "convert", str(run), "native", str(tmp_path / "back.bin")], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "run directory" in p.stderr and str(run / "model_step000002.ckpt") in p.stderr
    np.testing.assert_array_equal(read_native(tmp_path / "back.bin")[1], want)
    assert_engine_matches_oracle(run, t, llama_config(), PROMPT)
    # a run without a checkpoint yet
    (run / "latest.txt").unlink()
    err = run_tool_fails("info", run)
    assert str(run) in err and "no checkpoint yet" in err and "latest.txt" in err
    # sharded: the index file, and one shard
    d = tmp_path / "sharded"
    save_hf(d, t, llama_config())
    shard_hf(d, t)
    run_tool("convert", d / "model.safetensors.index.json", "native", tmp_path / "idx.bin")
    np.testing.assert_array_equal(read_native(tmp_path / "idx.bin")[1], want)
    err = run_tool_fails("info", d / "model-00001-of-00002.safetensors")
    assert "model-00001-of-00002.safetensors" in err and "one shard" in err and f"pass the directory {d}" in err


def test_llmc_bin_trailing_bytes(tmp_path):
    """Like native files: the size must be the header's config exactly (256 int32 + the
    parameters, fp32 or bf16), counted here from the format's definition."""
    p = tmp_path / "trail.bin"
    params = write_llmc_bin(p, gpt2_hf_tensors(np.random.default_rng(31)), 3)
    expected = 1024 + 4 * params.size
    assert os.path.getsize(p) == expected
    with open(p, "ab") as f:
        f.write(b"\0" * 4096)
    err = run_tool_fails("info", p)
    assert "trail.bin" in err and "4096 trailing bytes" in err and str(expected) in err and str(expected + 4096) in err
    # a version 5 (bf16) header on fp32 data: twice the size it says
    p = tmp_path / "v5.bin"
    write_llmc_bin(p, gpt2_hf_tensors(np.random.default_rng(31)), 3)
    raw = bytearray(p.read_bytes())
    struct.pack_into("<i", raw, 4, 5)
    p.write_bytes(bytes(raw))
    err = run_tool_fails("info", p)
    assert "v5.bin" in err and f"{2 * params.size} trailing bytes" in err and str(1024 + 2 * params.size) in err


def test_zero_heads_is_an_error_not_a_crash(tmp_path):
    p = tmp_path / "div0.gguf"
    w = gguf.GGUFWriter(str(p), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(16)
    w.add_feed_forward_length(24)
    w.add_head_count(0)
    w.add_key_length(4)
    w.add_value_length(4)
    w.add_tensor("token_embd.weight", np.zeros((8, 16), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    err = run_tool_fails("info", p)  # exit 1 with a message, not SIGFPE
    assert "div0.gguf" in err and "llama.attention.head_count" in err
    for key in ("num_attention_heads", "num_key_value_heads"):
        save_hf(tmp_path / key, llama_hf_tensors(np.random.default_rng(32)), llama_config(head_dim=4, **{key: 0}))
        err = run_tool_fails("info", tmp_path / key)
        assert str(tmp_path / key / "config.json") in err and key in err
