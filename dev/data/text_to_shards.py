"""Text files into llm.c token shards with one token a byte (ids 0..255): the vocabulary of the
tiny presets (gpt2:tiny, llama:tiny, gpt2:tiny64, llama:tiny64), for a first run without a real
tokenizer. Also writes the byte-level tokenizer.json that decodes those ids, for
`train_mora generate --tokenizer`.

    python3 dev/data/text_to_shards.py book.txt --out data [--val_frac 0.1] [--shard_tokens 10000000]

writes data/train_000000.bin, data/train_000001.bin, ... (and data/val_000000.bin when
--val_frac > 0: the end of the text) and data/tokenizer.json. Then:

    ./train_mora pretrain --init llama:tiny --train_data "data/train_*.bin" --out runs/tiny
    ./train_mora generate --model runs/tiny/model_step000100.ckpt --tokenizer data/tokenizer.json --prompt "The"

Only the standard library: a shard is 256 int32 of header (magic 20240520, version 1, the token
count) and the tokens as uint16.
"""
import argparse
import json
import os
import struct
import sys

MAGIC, VERSION, HEADER_INTS = 20240520, 1, 256


def write_shard(path, data):
    header = [0] * HEADER_INTS
    header[0], header[1], header[2] = MAGIC, VERSION, len(data)
    with open(path + ".tmp", "wb") as f:
        f.write(struct.pack("<%di" % HEADER_INTS, *header))
        f.write(struct.pack("<%dH" % len(data), *data))
    os.replace(path + ".tmp", path)


def bytes_to_unicode():
    """GPT-2's byte-level alphabet: the character that stands for each byte in tokenizer.json."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def byte_tokenizer():
    """A Hugging Face tokenizer.json whose token i is byte i (no merges)."""
    chars = bytes_to_unicode()
    level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
        "pre_tokenizer": level, "post_processor": None, "decoder": level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "vocab": {chars[b]: b for b in range(256)}, "merges": []},
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", help="text files (read as bytes, concatenated)")
    ap.add_argument("--out", required=True, help="directory for the shards and tokenizer.json")
    ap.add_argument("--val_frac", type=float, default=0.0, help="share of the text (its end) in val_000000.bin")
    ap.add_argument("--shard_tokens", type=int, default=10_000_000, help="tokens per train shard")
    args = ap.parse_args()
    if not 0.0 <= args.val_frac < 1.0:
        sys.exit("error: --val_frac must be in [0, 1), got %g" % args.val_frac)
    if args.shard_tokens < 2:
        sys.exit("error: --shard_tokens must be at least 2, got %d" % args.shard_tokens)
    data = b""
    for path in args.inputs:
        with open(path, "rb") as f:
            data += f.read()
    n_val = int(len(data) * args.val_frac)
    train, val = data[: len(data) - n_val], data[len(data) - n_val:]
    if len(train) < 2:
        sys.exit("error: %s: fewer than 2 bytes of training text" % ", ".join(args.inputs))
    os.makedirs(args.out, exist_ok=True)
    for k, start in enumerate(range(0, len(train), args.shard_tokens)):
        write_shard(os.path.join(args.out, "train_%06d.bin" % k), train[start:start + args.shard_tokens])
    if val:
        write_shard(os.path.join(args.out, "val_000000.bin"), val)
    with open(os.path.join(args.out, "tokenizer.json"), "w") as f:
        json.dump(byte_tokenizer(), f, ensure_ascii=False)
    print("%d train tokens in %d shard(s), %d val tokens, and tokenizer.json in %s"
          % (len(train), (len(train) + args.shard_tokens - 1) // args.shard_tokens, len(val), args.out))


if __name__ == "__main__":
    main()
