"""Tokenizer and chat templates (tokenizer.c, llmc/chat_template.c via build/tools/tok_tool)
checked token for token against Hugging Face `tokenizers`, and chat renderings against jinja2.

References are independent of our C: the `tokenizers` package (built from the GGUF's own tokens
and merges with the gguf package, or trained here), jinja2 rendering the GGUF's chat_template,
and Python's own UTF-8 codec and GPT-2 byte mapping."""
import json
import os
import pathlib
import random
import subprocess

import pytest

from conftest import BUILD

tokenizers = pytest.importorskip("tokenizers")
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

TOK_TOOL = pathlib.Path(os.environ.get("TOK_TOOL", BUILD / "tools" / "tok_tool"))  # override: another build
SMOLLM2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")


# ----------------------------------------------------------------------------------------------
# running tok_tool

def tool(*args, stdin=b"", check=True):
    assert TOK_TOOL.exists(), f"{TOK_TOOL} is not built: run make"
    proc = subprocess.run([str(TOK_TOOL), *map(str, args)], input=stdin, capture_output=True, timeout=300)
    if check:
        assert proc.returncode == 0, f"tok_tool {args} failed: {proc.stderr.decode(errors='replace')}"
    return proc


def c_encode(vocab, texts, special=True):
    """Our ids for each text (str or bytes), one tok_tool process for the whole batch."""
    data = b"".join((t.encode() if isinstance(t, str) else t).hex().encode() + b"\n" for t in texts)
    args = ["encode-batch", vocab] + ([] if special else ["--no-special"])
    lines = tool(*args, stdin=data).stdout.decode().split("\n")
    assert len(lines) == len(texts) + 1 and lines[-1] == ""
    return [[int(x) for x in line.split()] for line in lines[:-1]]


def c_decode(vocab, id_lists):
    data = "".join(" ".join(map(str, ids)) + "\n" for ids in id_lists).encode()
    lines = tool("decode-batch", vocab, stdin=data).stdout.decode().split("\n")
    assert len(lines) == len(id_lists) + 1
    return [bytes.fromhex(line) for line in lines[:-1]]


def hf_encode(tk, texts):
    return [e.ids for e in tk.encode_batch(texts, add_special_tokens=False)]


def assert_same_ids(ours, theirs, texts, what):
    for k, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            first = next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), min(len(a), len(b)))
            pytest.fail(f"{what}: text {k} differs at token {first}: ours {a[max(0, first - 3):first + 5]} "
                        f"vs tokenizers {b[max(0, first - 3):first + 5]}; text {texts[k][:200]!r}")
    assert len(ours) == len(theirs)


# ----------------------------------------------------------------------------------------------
# the corpus: >= 100k characters of prose, code, numbers, whitespace, scripts, emoji, specials

WORDS = ("the quick brown fox jumps over lazy dog alignment model reward prompt harmless helpful "
         "truthful language training gradient tokenizer Paris London Zürich naïve café résumé "
         "coöperate façade Ångström déjà vu über straße fiancée jalapeño").split()
CONTRACTIONS = ["don't", "it's", "they're", "I've", "we'll", "she'd", "I'm", "DON'T", "IT'S", "They'RE",
                "WE'LL", "o'clock", "rock'n'roll", "'tis", "y'all", "ma'am", "'s", "''", "'"]
CODE = [
    "int main(int argc, char **argv) {\n    for (int i = 0; i < argc; i++) printf(\"%s\\n\", argv[i]);\n    return 0;\n}\n",
    "def f(x, y=3):\n\tif x >= y and not x == 0:\n\t\treturn x ** 2 // y\n\treturn {'a': [1, 2, 3]}\n",
    "    x += 1;  // increment\n        y <<= 2;\n\n\n  }\n",
    "SELECT name, COUNT(*) FROM users WHERE id IN (1,2,3) GROUP BY name;\r\n",
    "<div class=\"x\">&nbsp;&amp;</div>\n<!-- comment -->\n",
    "fn main() -> Result<(), Box<dyn Error>> { let v: Vec<u8> = vec![0xff; 16]; Ok(()) }",
    "$ make -j2 && ./train_mora --batch_size 8 --lr 3e-4 2>&1 | tee log.txt",
    "    \n\t\n \t \n",
]
NUMBERS = ["0", "7", "42", "1234567890", "3.14159", "-2.5e-10", "1,234,567.89", "2024-11-26", "12:34:56",
           "+1 (555) 010-9999", "0x7f", "v1.2.3", "١٢٣٤", "１２３", "²³", "½¾", "Ⅻ", "৩৪", "๓๔๕", "10%", "$99.99",
           "99999999999999999999", "1st 2nd 3rd"]
SPACES = [" ", "  ", "   ", "\t", "\t\t", "\n", "\n\n", "\n\n\n", "\r\n", " \n ", "\u00a0", "\u3000", "\u2028",
          "\x0b", "\x0c", "\x85", "\u2003\u2003", " \t \n\n  ", "\x1c", "\u200b", "        "]
SCRIPTS = ["你好，世界！这是一个测试。", "日本語のテキストとカタカナ、ひらがな。", "안녕하세요 세계", "Привет, мир! Ёжик.",
           "Γειά σου Κόσμε", "مرحبا بالعالم ١٢٣", "שלום עולם", "नमस्ते दुनिया", "สวัสดีชาวโลก", "Xin chào thế giới",
           "e\u0301te\u0301 cafe\u0301", "ﬁnancial ﬂow", "ǅemal", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "Ꭰꮳ", "ᚠᛇᚻ"]
EMOJI = ["😀", "👍🏽", "👨\u200d👩\u200d👧", "🇫🇷", "❤️", "🎉🎉🎉", "🤖:", "☃", "✓✗", "…", "—", "“quoted”", "«guillemets»",
         "→ ← ↑", "∑∫√∞≠≤", "©®™", "•·"]
SPECIAL_BITS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_start|>user\n", "<|im_end|>\n",
                "<|im_sta", "<|im_start|", "<<|im_end|>>", "<|endoftext|><|endoftext|>", " <|im_start|> "]


def random_unicode(rng, n):
    """n code points drawn from assigned ranges across the BMP and beyond (no surrogates)."""
    out = []
    while len(out) < n:
        cp = rng.choice([rng.randrange(0x20, 0x250), rng.randrange(0x370, 0x2000), rng.randrange(0x2000, 0x3000),
                         rng.randrange(0x3000, 0xA000), rng.randrange(0xAC00, 0xD7A4), rng.randrange(0xF900, 0xFFFE),
                         rng.randrange(0x10000, 0x1FAFF)])
        out.append(chr(cp))
    return "".join(out)


def build_corpus(seed=1234, min_chars=100_000, with_specials=True):
    rng = random.Random(seed)
    sources = [WORDS, CONTRACTIONS, CODE, NUMBERS, SPACES, SCRIPTS, EMOJI] + ([SPECIAL_BITS] if with_specials else [])
    texts, total = [], 0
    while total < min_chars:
        parts = []
        for _ in range(rng.randrange(5, 120)):
            kind = rng.random()
            if kind < 0.45:
                w = rng.choice(WORDS)
                parts.append(rng.choice([w, w.capitalize(), w.upper()]) + rng.choice([" ", " ", " ", ", ", ". ", "", "\n"]))
            elif kind < 0.9:
                parts.append(rng.choice(rng.choice(sources)))
            elif kind < 0.97:
                parts.append(random_unicode(rng, rng.randrange(1, 12)))
            else:
                parts.append(rng.choice(SPACES) * rng.randrange(1, 40))
        text = "".join(parts)
        if rng.random() < 0.3:
            text = rng.choice(SPACES) + text + rng.choice(SPACES)   # leading and trailing whitespace
        texts.append(text)
        total += len(text)
    texts += ["", " ", "\n", "a", "1", "'", "  hello", "hello  ", "x\n\n\ny", "123456789", "'S'T'RE", "<|im_start|>"]
    return texts


@pytest.fixture(scope="module")
def corpus():
    texts = build_corpus()
    assert sum(map(len, texts)) >= 100_000
    return texts


# ----------------------------------------------------------------------------------------------
# reference tokenizers

def gguf_vocab(path):
    """tokens, merges, token types and metadata of a GGUF file, read with the gguf package."""
    import gguf
    reader = gguf.GGUFReader(path)

    def strings(key):
        f = reader.fields[key]
        return [bytes(f.parts[i]).decode("utf-8") for i in f.data]

    def scalar(key):
        f = reader.fields[key]
        return f.parts[f.data[0]]

    types = [int(reader.fields["tokenizer.ggml.token_type"].parts[i][0]) for i in reader.fields["tokenizer.ggml.token_type"].data]
    return dict(tokens=strings("tokenizer.ggml.tokens"), merges=strings("tokenizer.ggml.merges"), types=types,
                bos=int(scalar("tokenizer.ggml.bos_token_id")[0]), eos=int(scalar("tokenizer.ggml.eos_token_id")[0]),
                pre=bytes(scalar("tokenizer.ggml.pre")).decode(),
                chat_template=bytes(scalar("tokenizer.chat_template")).decode())


def smollm2_reference_tokenizer(path):
    """The HF tokenizer built from a SmolLM2 GGUF's vocabulary as SmolLM2's tokenizer.json defines
    it: Digits(individual_digits) then ByteLevel, control tokens added. Returns (tokenizer, vocab)."""
    v = gguf_vocab(path)
    # llama.cpp's "smollm" pre-tokenizer is the regex pair {\p{N}, GPT-2's}: each digit alone,
    # then GPT-2's split, which is SmolLM2's tokenizer.json Sequence[Digits, ByteLevel]
    assert v["pre"] == "smollm"
    vocab = {tok: i for i, tok in enumerate(v["tokens"])}
    merges = [tuple(m.split(" ")) for m in v["merges"]]
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(v["tokens"][i], special=True, normalized=False)
                           for i, t in enumerate(v["types"]) if t == 3])
    return tk, v


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    """(GGUF path, metadata, HF tokenizer built from the GGUF: smollm2_reference_tokenizer)."""
    tk, v = smollm2_reference_tokenizer(smollm2_gguf)
    return smollm2_gguf, v, tk


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A GPT-2-style byte-level BPE (ByteLevel pre-tokenizer, ~4000 tokens, special tokens)
    trained here with `tokenizers` and saved as tokenizer.json."""
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    # max_token_length keeps every token within llm.c .bin's one-byte length field
    trainer = trainers.BpeTrainer(vocab_size=4000, special_tokens=SMOLLM2_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), max_token_length=64)
    tk.train_from_iterator(build_corpus(seed=7, min_chars=200_000, with_specials=False), trainer)
    path = tmp_path_factory.mktemp("trained") / "tokenizer.json"
    tk.save(str(path))
    return path, tk


def variant(tmp_path, base_json, name, edit):
    """Writes base tokenizer.json edited by edit(dict) and returns (path, HF tokenizer of it)."""
    d = json.loads(base_json)
    edit(d)
    s = json.dumps(d, ensure_ascii=False)
    path = tmp_path / name / "tokenizer.json"
    path.parent.mkdir()
    path.write_text(s, encoding="utf-8")
    return path, Tokenizer.from_str(s)


# ----------------------------------------------------------------------------------------------
# SmolLM2: our GGUF loading vs tokenizers built from the same tokens and merges

def test_smollm2_gguf_matches_tokenizers(smollm2, corpus):
    path, _, tk = smollm2
    ours = c_encode(path, corpus)
    assert_same_ids(ours, hf_encode(tk, corpus), corpus, "SmolLM2 GGUF")
    # special tokens were really matched whole: <|im_start|> is id 1 in SmolLM2
    k = next(i for i, t in enumerate(corpus) if "<|im_start|>" in t)
    assert 1 in ours[k]


def test_smollm2_metadata(smollm2):
    path, v, _ = smollm2
    info = dict(line.split(" ", 1) for line in tool("info", path).stdout.decode().splitlines())
    assert int(info["vocab_size"]) == len(v["tokens"])
    assert int(info["bos"]) == v["bos"] and int(info["eos"]) == v["eos"]
    assert info["pre"] == "digits(individual) > gpt2"
    for name in SMOLLM2_SPECIALS:
        assert int(tool("special", path, name).stdout) == v["tokens"].index(name)
    assert int(tool("special", path, "hello").stdout) == -1
    assert tool("token", path, 1000).stdout.decode() == v["tokens"][1000] + "\n"


def test_smollm2_tokenizer_json_both_merge_forms(smollm2, corpus, tmp_path):
    """The same vocabulary saved as tokenizer.json (Sequence[Digits, ByteLevel] pre-tokenizer),
    with merges as ["a", "b"] arrays (what tokenizers writes) and as "a b" strings."""
    _, _, tk = smollm2
    base = tk.to_str()
    arrays, tk_arrays = variant(tmp_path, base, "arrays", lambda d: None)
    assert isinstance(json.loads(base)["model"]["merges"][0], list)

    def to_strings(d):
        d["model"]["merges"] = [" ".join(m) for m in d["model"]["merges"]]
    strings, tk_strings = variant(tmp_path, base, "strings", to_strings)
    sample = corpus[:150]
    expected = hf_encode(tk, sample)
    assert_same_ids(c_encode(arrays, sample), expected, sample, "tokenizer.json, array merges")
    assert_same_ids(c_encode(strings, sample), hf_encode(tk_strings, sample), sample, "tokenizer.json, string merges")


def test_smollm2_chat_encoding(smollm2):
    """A rendered chat (from our template) tokenizes exactly as tokenizers tokenizes it."""
    path, _, tk = smollm2
    text = tool("chat", "smollm2", "What is 2+2? Answer in one word.").stdout.decode()
    assert c_encode(path, [text]) == hf_encode(tk, [text])


# ----------------------------------------------------------------------------------------------
# a vocabulary trained here

def test_trained_bytelevel_matches_tokenizers(trained, corpus):
    path, tk = trained
    assert_same_ids(c_encode(path, corpus), hf_encode(tk, corpus), corpus, "trained ByteLevel BPE")


def test_duplicated_merges_take_their_last_rank(trained, corpus, tmp_path):
    """A merge listed twice: `tokenizers` builds its merge map in list order, so the later copy's
    (worse) rank is the one that counts. The trained vocabulary with its first 40 merges repeated
    at the end of the list encodes differently from the original, as tokenizers does."""
    path, _ = trained
    def repeat_first_merges(d):
        d["model"]["merges"] = d["model"]["merges"] + d["model"]["merges"][:40]
    dup, tk = variant(tmp_path, path.read_text(encoding="utf-8"), "dup", repeat_first_merges)
    texts = corpus[:300]
    theirs = hf_encode(tk, texts)
    assert theirs != hf_encode(trained[1], texts)   # the duplicates change what tokenizers does
    assert_same_ids(c_encode(dup, texts), theirs, texts, "merges listed twice")


def test_trained_special_tokens_not_split_and_optional(trained):
    path, tk = trained
    text = "a<|im_start|>b<|endoftext|><|im_end|>"
    ours = c_encode(path, [text])[0]
    assert ours == hf_encode(tk, [text])[0]
    ids = [tk.token_to_id(s) for s in SMOLLM2_SPECIALS]
    assert all(i in ours for i in ids)
    # with special-token parsing off the markers are plain text: none of the special ids appears
    plain = c_encode(path, [text], special=False)[0]
    assert not any(i in plain for i in ids)
    assert c_decode(path, [plain])[0] == text.encode()


def test_pre_tokenizer_variants(trained, corpus, tmp_path):
    """Other pre-tokenizer chains tokenizer.json can declare, over the trained vocabulary:
    Llama 3's Split regex with ignore_merges, whole-number Digits with add_prefix_space, and
    GPT-2's regex written as an explicit Split."""
    path, _ = trained
    base = path.read_text(encoding="utf-8")

    def llama3(d):
        d["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_REGEX}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
        d["model"]["ignore_merges"] = True

    def digits_prefix(d):
        d["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": False},
            {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}]}

    def split_gpt2(d):
        d["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": GPT2_REGEX}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}

    for name, edit in [("llama3", llama3), ("digits_prefix", digits_prefix), ("split_gpt2", split_gpt2)]:
        vpath, tk = variant(tmp_path, base, name, edit)
        assert_same_ids(c_encode(vpath, corpus), hf_encode(tk, corpus), corpus, name)


# ----------------------------------------------------------------------------------------------
# decoding

def test_roundtrip_and_decode_matches_tokenizers(smollm2, trained, corpus):
    for path, tk in [(smollm2[0], smollm2[2]), trained]:
        ids = c_encode(path, corpus)
        decoded = c_decode(path, ids)
        for text, got in zip(corpus, decoded):
            assert got == text.encode(), f"decode(encode(s)) != s for {text[:100]!r}"
        # random id sequences: split multi-byte characters give invalid UTF-8, which tokenizers
        # replaces with U+FFFD; our raw bytes decoded the same way must give the same string
        rng = random.Random(5)
        n_vocab = tk.get_vocab_size()
        seqs = [[rng.randrange(n_vocab) for _ in range(rng.randrange(1, 40))] for _ in range(300)]
        for seq, got in zip(seqs, c_decode(path, seqs)):
            assert got.decode("utf-8", errors="replace") == tk.decode(seq, skip_special_tokens=False), seq


def byte_level_char(b):
    """GPT-2's bytes_to_unicode for one byte, computed independently of our C."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    if b in printable:
        return chr(b)
    return chr(256 + [x for x in range(256) if x not in printable].index(b))


def test_invalid_utf8_never_crashes(smollm2, trained):
    rng = random.Random(9)
    blobs = [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))) for _ in range(200)]
    blobs += [b"\x80", b"\xc3", b"abc\xe4\xbd", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf", b"x\x80y \x80\x80"]
    for path, tk in [(smollm2[0], smollm2[2]), trained]:
        vocab = tk.get_vocab()
        ids = c_encode(path, blobs)
        # every byte comes back, except bytes the vocabulary has no base token for (SmolLM2 never
        # saw e.g. 0xFF), which tokenizers drops too when there is no unknown token
        kept = [bytes(b for b in blob if byte_level_char(b) in vocab) for blob in blobs]
        assert c_decode(path, ids) == kept
        # a lone invalid byte is the base token spelled with its byte-level character
        assert ids[len(blobs) - 7] == [vocab[byte_level_char(0x80)]]
        # valid text around invalid bytes tokenizes like the valid text alone
        assert c_encode(path, [b"hello\x80"])[0][:-1] == hf_encode(tk, ["hello"])[0]
    # the trained vocabulary has all 256 base tokens: every byte string round-trips
    assert c_decode(trained[0], c_encode(trained[0], blobs)) == blobs


def write_llmc_bin(tk, bin_path):
    """llm.c's tokenizer .bin (version 2) of a tokenizers vocabulary, written here in Python."""
    import numpy as np
    vocab = tk.get_vocab()
    n = tk.get_vocab_size()
    byte_of = {byte_level_char(b): b for b in range(256)}
    header = np.zeros(256, dtype=np.uint32)
    header[:4] = [20240328, 2, n, vocab["<|endoftext|>"]]
    blob = bytearray(header.tobytes())
    id_to_tok = {i: t for t, i in vocab.items()}
    for i in range(n):
        tok = id_to_tok[i]
        raw = bytes(byte_of[c] for c in tok) if all(c in byte_of for c in tok) else tok.encode()
        blob += bytes([len(raw)]) + raw
    bin_path.write_bytes(bytes(blob))


def test_llmc_bin_decodes_like_tokenizers(trained, tmp_path):
    """llm.c's tokenizer .bin (version 2) written from the trained vocabulary decodes as the
    vocabulary does in tokenizers."""
    path, tk = trained
    vocab = tk.get_vocab()
    n = tk.get_vocab_size()
    bin_path = tmp_path / "tok.bin"
    write_llmc_bin(tk, bin_path)
    info = tool("info", bin_path).stdout.decode()
    assert f"vocab_size {n}\n" in info and f"eos {vocab['<|endoftext|>']}\n" in info and "can_encode 0" in info
    rng = random.Random(3)
    seqs = [[rng.randrange(n) for _ in range(30)] for _ in range(50)]
    for seq, got in zip(seqs, c_decode(bin_path, seqs)):
        assert got.decode("utf-8", errors="replace") == tk.decode(seq, skip_special_tokens=False)
    proc = tool("encode", bin_path, stdin=b"hello", check=False)
    assert proc.returncode != 0 and b"only decode" in proc.stderr


# ----------------------------------------------------------------------------------------------
# writing tokenizer.json (tok_tool save-hf, tokenizer_save_hf)

# texts aimed at what a wrong writer would change: every special token, digit runs (Digits,
# \p{N}{1,3}), whitespace runs and newlines (the regexes' lookahead), contractions, non-ASCII
SAVE_HF_TEXTS = [
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nWhat is 1234567+89?<|im_end|>\n",
    "<|endoftext|><|endoftext|>x<|im_end|>", "12 123 1234 12345 3.14159 2024-11-26 ١٢٣ ²³ ½",
    "a  b   c    d\t\te\n\n\nf \n \r\n g   ", "   leading and trailing   ", "\n\n", " ",
    "don't DON'T they're I've we'll", "Zürich naïve café — “quoted” «x» 你好，世界 😀👍🏽 🇫🇷",
    "def f(x):\n\treturn x ** 2  # comment\n", "<|im_sta <|im_start| <<|im_end|>>",
]


def save_hf(vocab, out):
    out.parent.mkdir(parents=True, exist_ok=True)
    tool("save-hf", vocab, out)
    return out


def check_saved_hf(src, ref, out, texts, what, roundtrip=True):
    """The tokenizer.json that save-hf wrote from src, read by tokenizers and by us, against the
    reference tokenizers object ref (the tokenizer src stands for): same vocabulary and added
    tokens, same ids for every text, and decoding that gives the text back (roundtrip; with
    add_prefix_space decoding gives the pieces' added spaces too, as the original does)."""
    hf = Tokenizer.from_file(str(out))
    assert hf.get_vocab() == ref.get_vocab(), f"{what}: vocabulary differs"
    added = {i: (a.content, a.special) for i, a in hf.get_added_tokens_decoder().items()}
    assert added == {i: (a.content, a.special) for i, a in ref.get_added_tokens_decoder().items()}, what
    expected = hf_encode(ref, texts)
    assert_same_ids(hf_encode(hf, texts), expected, texts, f"{what}: written file read by tokenizers")
    ours = c_encode(out, texts)
    assert_same_ids(ours, expected, texts, f"{what}: written file read by tok_tool")
    decoded = c_decode(out, ours)
    assert decoded == c_decode(src, ours), f"{what}: our decode of the written file"
    for text, ids, got in zip(texts, ours, decoded):
        if roundtrip:
            assert got == text.encode(), f"{what}: our decode(encode(s)) != s for {text[:100]!r}"
        theirs = hf.decode(ids, skip_special_tokens=False)
        assert theirs == ref.decode(ids, skip_special_tokens=False) == got.decode(), f"{what}: decode of {text[:100]!r}"
    # any ids, also those splitting a character: both decoders give the bytes of the original
    rng = random.Random(11)
    n_vocab = ref.get_vocab_size()
    seqs = [[rng.randrange(n_vocab) for _ in range(rng.randrange(1, 30))] for _ in range(200)]
    assert c_decode(out, seqs) == c_decode(src, seqs), f"{what}: our decode of the written file"
    for seq in seqs:
        assert hf.decode(seq, skip_special_tokens=False) == ref.decode(seq, skip_special_tokens=False), seq
    info = lambda p: {k: v for k, v in (line.split(" ", 1) for line in tool("info", p).stdout.decode().splitlines())
                      if k in ("vocab_size", "pre", "can_encode")}
    assert info(out) == info(src), what
    return json.loads(out.read_text(encoding="utf-8"))


def test_save_hf_smollm2_gguf(smollm2, corpus, tmp_path):
    """SmolLM2's GGUF tokenizer written as tokenizer.json is SmolLM2's tokenizer.json: the same
    ids as tokenizers built from the GGUF's tokens and merges, the pre-tokenizer as SmolLM2 declares
    it, the 17 control tokens as special added tokens."""
    path, v, tk = smollm2
    out = save_hf(path, tmp_path / "smollm2" / "tokenizer.json")
    d = check_saved_hf(path, tk, out, corpus + SAVE_HF_TEXTS, "SmolLM2 GGUF")
    pre = d["pre_tokenizer"]
    assert pre["type"] == "Sequence" and [p["type"] for p in pre["pretokenizers"]] == ["Digits", "ByteLevel"]
    assert pre["pretokenizers"][0]["individual_digits"] is True
    assert pre["pretokenizers"][1]["use_regex"] is True and pre["pretokenizers"][1]["add_prefix_space"] is False
    assert d["model"]["merges"] == [m.split(" ") for m in v["merges"]]
    assert [a["content"] for a in d["added_tokens"]] == v["tokens"][:17]
    assert all(a["special"] and not a["normalized"] for a in d["added_tokens"])
    assert d["normalizer"] is None and d["decoder"]["type"] == "ByteLevel"
    # our encoding of the written file and of the GGUF agree on the whole corpus (also without
    # special-token parsing)
    assert c_encode(out, corpus, special=False) == c_encode(path, corpus, special=False)


def llama3_pre(d):
    d["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": LLAMA3_REGEX}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    d["model"]["ignore_merges"] = True


# words the trained vocabulary has never seen
UNSEEN_WORDS = ["xylophone", "quixotic", "Zanzibar", "Übermensch", "fjörður", "bureaucracy"]


def llama3_pre_whole_words(d):
    """Llama 3's chain, plus whole words in the vocabulary that no merge builds: with
    ignore_merges a piece that is a token is emitted whole, so the flag changes ids."""
    llama3_pre(d)
    vocab = d["model"]["vocab"]
    n = max(vocab.values()) + 1
    for w in UNSEEN_WORDS:
        for form in (w, " " + w, " " + w.capitalize()):
            spelled = "".join(byte_level_char(b) for b in form.encode())
            if spelled not in vocab:
                vocab[spelled] = n
                n += 1


def qwen2_pre(d):
    d["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": QWEN2_REGEX}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]}


def digits_prefix_pre(d):
    d["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": False},
        {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}]}


def split_gpt2_pre(d):
    d["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": GPT2_REGEX}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}


# (name, edit of the trained tokenizer.json, the pre_tokenizer save-hf must write: types in order,
# then the final ByteLevel's add_prefix_space and use_regex)
SAVE_HF_VARIANTS = [
    ("gpt2", lambda d: None, [], False, True),
    ("llama3", llama3_pre_whole_words, [("Split", LLAMA3_REGEX)], False, False),
    ("qwen2", qwen2_pre, [("Split", QWEN2_REGEX)], False, False),
    ("digits_prefix", digits_prefix_pre, [("Digits", False)], True, True),
    # GPT-2's regex as an explicit Split is what ByteLevel with use_regex does: written as that
    ("split_gpt2", split_gpt2_pre, [], False, True),
]


@pytest.mark.parametrize("name,edit,steps,prefix_space,use_regex", SAVE_HF_VARIANTS, ids=[v[0] for v in SAVE_HF_VARIANTS])
def test_save_hf_pre_tokenizer_kinds(trained, corpus, tmp_path, name, edit, steps, prefix_space, use_regex):
    """A tokenizer.json of each pre-tokenizer kind, loaded by us and written back by save-hf,
    tokenizes as the original does in tokenizers, and declares its pre-tokenizer the way GPT-2,
    Llama 3, Qwen2 and SmolLM2 do."""
    src, ref = variant(tmp_path, trained[0].read_text(encoding="utf-8"), name, edit)
    out = save_hf(src, tmp_path / "out" / "tokenizer.json")
    texts = corpus + SAVE_HF_TEXTS + [" ".join(UNSEEN_WORDS), "".join(UNSEEN_WORDS)]
    d = check_saved_hf(src, ref, out, texts, name, roundtrip=not prefix_space)
    pre = d["pre_tokenizer"]
    chain = pre["pretokenizers"] if pre["type"] == "Sequence" else [pre]
    assert pre["type"] == ("Sequence" if steps else "ByteLevel")
    got = [(p["type"], p["pattern"]["Regex"] if p["type"] == "Split" else p["individual_digits"]) for p in chain[:-1]]
    assert got == steps
    for p in chain[:-1]:
        if p["type"] == "Split":
            assert p["behavior"] == "Isolated" and p["invert"] is False
    assert chain[-1]["type"] == "ByteLevel"
    assert (chain[-1]["add_prefix_space"], chain[-1]["use_regex"]) == (prefix_space, use_regex)
    assert d["model"]["ignore_merges"] is (name == "llama3")
    if name == "llama3":   # the whole-word tokens, reachable only through ignore_merges, are used
        n_trained = trained[1].get_vocab_size()
        assert sum(i >= n_trained for i in c_encode(out, [" ".join(UNSEEN_WORDS)])[0]) == len(UNSEEN_WORDS)
    assert d["model"]["merges"] == json.loads(src.read_text(encoding="utf-8"))["model"]["merges"]


def test_save_hf_holes_unk_and_plain_added_tokens(trained, tmp_path):
    """Ids without a token stay holes, the unknown token is kept, and added tokens keep their
    special flag, also non-special ones and ones with spaces, quotes or non-ASCII in them."""
    path, _ = trained

    def edit(d):
        vocab = d["model"]["vocab"]
        del vocab["ÿ"]   # byte 0xFF (never in UTF-8, so in no merge): its id becomes a hole
        d["model"]["unk_token"] = "<|endoftext|>"   # and the byte is now the unknown token
        n = max(vocab.values()) + 1
        for k, content in enumerate(['<tool>', '<|naïve tok|>', '<x"\\y>']):
            vocab[content] = n + k   # in the vocab too, as tokenizers writes them: that pins their ids
            d["added_tokens"].append({"id": n + k, "content": content, "single_word": False, "lstrip": False,
                                      "rstrip": False, "normalized": False, "special": k == 2})
    src, ref = variant(tmp_path, path.read_text(encoding="utf-8"), "edge", edit)
    out = save_hf(src, tmp_path / "out" / "tokenizer.json")
    texts = SAVE_HF_TEXTS + ["call <tool> now", "a<|naïve tok|>b", 'q <x"\\y> q', "<tool><tool>"]
    d = check_saved_hf(src, ref, out, texts, "holes/unk/added")
    assert d["model"]["unk_token"] == "<|endoftext|>"
    hole = json.loads(path.read_text(encoding="utf-8"))["model"]["vocab"]["ÿ"]
    assert hole not in d["model"]["vocab"].values()
    specials = {a["content"]: a["special"] for a in d["added_tokens"]}
    assert specials["<tool>"] is False and specials['<x"\\y>'] is True and specials["<|endoftext|>"] is True
    # the byte 0xFF has no base token: our encoding gives the unknown token for it, before and after
    blobs = [b"a\xffb", b"\xff\xff", b"caf\xc3\xa9 \xff"]
    assert c_encode(out, blobs) == c_encode(src, blobs)
    assert ref.token_to_id("<|endoftext|>") in c_encode(out, blobs)[0]


def test_save_hf_refuses_llmc_bin(trained, tmp_path):
    """An llm.c .bin tokenizer only decodes (no merges, no pre-tokenizer): save-hf refuses it
    with a message saying so, and writes nothing."""
    bin_path = tmp_path / "tok.bin"
    write_llmc_bin(trained[1], bin_path)
    out = tmp_path / "out" / "tokenizer.json"
    out.parent.mkdir()
    proc = tool("save-hf", bin_path, out, check=False)
    assert proc.returncode != 0
    assert str(bin_path).encode() in proc.stderr and b"llm.c .bin" in proc.stderr and b"only" in proc.stderr, proc.stderr
    assert list(out.parent.iterdir()) == []


def test_save_hf_replaces_whole_file(trained, tmp_path):
    """The file is written beside and renamed over: an existing tokenizer.json is replaced whole
    and no temporary file is left."""
    out = tmp_path / "tokenizer.json"
    out.write_text("old")
    save_hf(trained[0], out)
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer.json"]
    assert Tokenizer.from_file(str(out)).get_vocab() == trained[1].get_vocab()


# ----------------------------------------------------------------------------------------------
# chat templates

LLAMA3_JINJA = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
                "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
                "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
                "{{ content }}{% endfor %}{% if add_generation_prompt %}"
                "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

CHAT_CASES = [(None, "Hello!"), ("You are terse.", "What is 2+2?"), (None, "  multi\nline\n\n text  "),
              ("", "empty system"), (None, "emoji 😀 and <|im_end|> inside")]


def chat_args(system, user, gen):
    args = ["chat", None, user]
    if system is not None:
        args += ["--system", system]
    if not gen:
        args.append("--no-generation-prompt")
    return args


def test_smollm2_matches_gguf_jinja(smollm2):
    jinja2 = pytest.importorskip("jinja2", reason="pip install jinja2 (listed in test/requirements.txt)")
    template = jinja2.Environment().from_string(smollm2[1]["chat_template"])
    for system, user in CHAT_CASES:
        messages = ([{"role": "system", "content": system}] if system is not None else []) + [{"role": "user", "content": user}]
        for gen in (True, False):
            args = chat_args(system, user, gen)
            args[1] = "smollm2"
            expected = template.render(messages=messages, add_generation_prompt=gen)
            assert tool(*args).stdout.decode() == expected
    assert "You are a helpful AI assistant named SmolLM, trained by Hugging Face" in tool("chat", "smollm2", "hi").stdout.decode()
    # the model's own jinja template is recognised as SmolLM2's
    assert tool("guess-template", smollm2[0]).stdout.decode() == "smollm2\n"


# The ChatML template as models without a default system prompt ship it (OpenHermes, Dolphin, ...)
CHATML_JINJA = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_chatml_matches_jinja(tmp_path):
    """chatml is ChatML alone: no system prompt is added to a conversation without one (it was
    SmolLM2's for every ChatML model), and a GGUF carrying this template is recognised as chatml."""
    jinja2 = pytest.importorskip("jinja2", reason="pip install jinja2 (listed in test/requirements.txt)")
    gguf = pytest.importorskip("gguf")
    template = jinja2.Environment().from_string(CHATML_JINJA)
    for system, user in CHAT_CASES:
        messages = ([{"role": "system", "content": system}] if system is not None else []) + [{"role": "user", "content": user}]
        for gen in (True, False):
            args = chat_args(system, user, gen)
            args[1] = "chatml"
            expected = template.render(messages=messages, add_generation_prompt=gen)
            assert tool(*args).stdout.decode() == expected
    assert "SmolLM" not in tool("chat", "chatml", "hi").stdout.decode()
    path = tmp_path / "chatml.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_string("tokenizer.chat_template", CHATML_JINJA)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert tool("guess-template", str(path)).stdout.decode() == "chatml\n"


def test_llama3_matches_jinja():
    jinja2 = pytest.importorskip("jinja2", reason="pip install jinja2 (listed in test/requirements.txt)")
    template = jinja2.Environment().from_string(LLAMA3_JINJA)
    for system, user in CHAT_CASES:
        messages = ([{"role": "system", "content": system}] if system is not None else []) + [{"role": "user", "content": user}]
        for gen in (True, False):
            args = chat_args(system, user, gen)
            args[1] = "llama3"
            expected = template.render(messages=messages, add_generation_prompt=gen, bos_token="<|begin_of_text|>")
            assert tool(*args).stdout.decode() == expected


def test_plain_template_and_stops():
    assert tool("chat", "plain", "Hi there").stdout.decode() == "\n\nHuman: Hi there\n\nAssistant:"
    assert tool("chat", "plain", "Hi", "--system", "Be kind.").stdout.decode() == "Be kind.\n\nHuman: Hi\n\nAssistant:"
    assert tool("stops", "plain").stdout.decode() == "\\n\\nHuman:\n"
    assert tool("stops", "chatml").stdout.decode() == "<|im_end|>\n"
    assert tool("stops", "smollm2").stdout.decode() == "<|im_end|>\n"
    assert tool("stops", "llama3").stdout.decode() == "<|eot_id|>\n"


# ----------------------------------------------------------------------------------------------
# errors

def test_unknown_template_lists_valid_names():
    proc = tool("chat", "vicuna", "hi", check=False)
    assert proc.returncode != 0
    assert b'"vicuna"' in proc.stderr and b"chatml, smollm2, llama3, plain" in proc.stderr


@pytest.mark.parametrize("name,content,needle", [
    ("truncated", '{"model": {"type": "BPE", "vocab": {"a": 0', b"invalid JSON"),
    ("no_model", '{"added_tokens": []}', b'missing "model"'),
    ("bad_merge", '{"model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["a b"]}, '
                  '"pre_tokenizer": {"type": "ByteLevel"}}', b"model.merges[0]"),
    ("metaspace", '{"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}, '
                  '"pre_tokenizer": {"type": "Metaspace"}}', b"Metaspace"),
    ("bad_regex", '{"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}, "pre_tokenizer": {"type": '
                  '"Split", "pattern": {"Regex": "[a-z]+"}, "behavior": "Isolated", "invert": false}}', b"[a-z]+"),
    ("normalizer", '{"normalizer": {"type": "NFC"}, "model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}, '
                   '"pre_tokenizer": {"type": "ByteLevel"}}', b"NFC"),
    ("rstrip", '{"added_tokens": [{"id": 0, "content": "<x>", "rstrip": true}], "model": {"type": "BPE", '
               '"vocab": {"a": 1}, "merges": []}, "pre_tokenizer": {"type": "ByteLevel"}}', b"rstrip"),
])
def test_bad_tokenizer_json_is_a_clear_error(tmp_path, name, content, needle):
    path = tmp_path / f"{name}.json"
    path.write_text(content)
    proc = tool("info", path, check=False)
    assert proc.returncode != 0
    assert str(path).encode() in proc.stderr and needle in proc.stderr, proc.stderr


def test_bos_eos_from_tokenizer_config(trained, tmp_path):
    """bos/eos of a tokenizer.json come from the tokenizer_config.json beside it (string or
    {"content": ...} form), else from well-known names."""
    path, tk = trained
    info = tool("info", path).stdout.decode()
    assert f"eos {tk.token_to_id('<|endoftext|>')}\n" in info
    vpath, _ = variant(tmp_path, path.read_text(encoding="utf-8"), "with_config", lambda d: None)
    (vpath.parent / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"}}))
    info = tool("info", vpath).stdout.decode()
    assert f"bos {tk.token_to_id('<|im_start|>')}\n" in info and f"eos {tk.token_to_id('<|im_end|>')}\n" in info


def test_bad_ids_are_a_clear_error(trained):
    path, tk = trained
    proc = tool("decode", path, stdin=f"1 2 {tk.get_vocab_size()}".encode(), check=False)
    assert proc.returncode != 0 and b"outside the vocabulary" in proc.stderr
    proc = tool("decode", path, stdin=b"1 x", check=False)
    assert proc.returncode != 0 and b"not a token id" in proc.stderr
