#!/usr/bin/env python3
"""Writes llm.c token shards of text files with any Hugging Face tokenizer, as llm.c's own data scripts do
(pip install tokenizers; transformers is not needed).

    python3 scripts/shards_from_hf.py --tokenizer tokenizer.json --input a.txt b.txt --out data/mine
    python3 scripts/shards_from_hf.py --tokenizer meta-llama/Meta-Llama-3-8B --bos "<|begin_of_text|>" ...

Each input file is one document, encoded on its own without the tokenizer's post-processor (no template tokens),
with --bos, when given, in front of it (llm.c's fineweb.py puts <|endoftext|> before every document). The output
is the layout of the C++ text_to_shards: <out>/<prefix>_train_NNNNNN.bin and <out>/<prefix>_val_NNNNNN.bin, the
last --val-fraction of the tokens being the validation part, each shard at most --shard-tokens tokens. A shard is a
header of 256 little-endian int32 (magic, version, token count) and the tokens: version 1 (magic 20240520) holds
uint16 tokens, version 7 (magic 20240801) uint32, chosen by the tokenizer's size unless --version says. The trainers
read them with --data 'DIR/PREFIX_train_*.bin' --val-data 'DIR/PREFIX_val_*.bin' (and --tokenizer for samples).
All tokens are held in memory (4 bytes each) before the split is known.
"""
import argparse
import array
import os
import sys

MAGIC = {1: (20240520, "H"), 7: (20240801, "I")}


def load_tokenizer(name):
    from tokenizers import Tokenizer

    if os.path.exists(name):
        return Tokenizer.from_file(name)
    return Tokenizer.from_pretrained(name)  # a Hugging Face Hub repository


def write_shard(path, tokens, version):
    magic, code = MAGIC[version]
    header = array.array("i", [0] * 256)
    header[0], header[1], header[2] = magic, version, len(tokens)
    body = array.array(code, tokens)
    if sys.byteorder != "little":
        header.byteswap()
        body.byteswap()
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(body.tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", required=True, help="a tokenizer.json file or a Hugging Face Hub repository name")
    p.add_argument("--input", nargs="+", required=True, help="text files, in order, one document each")
    p.add_argument("--out", default="shards", help="output directory (created when missing)")
    p.add_argument("--prefix", default="corpus", help="shard file-name prefix")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, help="at most this many tokens per shard")
    p.add_argument("--val-fraction", type=float, default=0.1, help="the last fraction of the tokens, 0 <= f < 1")
    p.add_argument("--version", type=int, choices=[0, 1, 7], default=0,
                   help="llm.c version: 1 (uint16), 7 (uint32); 0: 1 unless the tokenizer has more than 65536 tokens")
    p.add_argument("--bos", default="", help="a token put before every document, e.g. <|endoftext|>")
    a = p.parse_args()
    if not 0 <= a.val_fraction < 1:
        p.error(f"--val-fraction {a.val_fraction}: expected 0 <= f < 1")
    if a.shard_tokens < 1:
        p.error(f"--shard-tokens {a.shard_tokens}: expected >= 1")

    tok = load_tokenizer(a.tokenizer)
    vocab = tok.get_vocab_size(with_added_tokens=True)
    version = a.version or (7 if vocab > 65536 else 1)
    if version == 1 and vocab > 65536:
        p.error(f"the tokenizer has {vocab} tokens, more than version 1's uint16 holds (use --version 7)")
    bos = []
    if a.bos:
        bos_id = tok.token_to_id(a.bos)
        if bos_id is None:
            p.error(f"--bos {a.bos!r} is not a token of {a.tokenizer}")
        bos = [bos_id]

    tokens = array.array("I")
    for name in a.input:
        with open(name, encoding="utf-8") as f:
            text = f.read()
        tokens.extend(bos)
        tokens.extend(tok.encode(text, add_special_tokens=False).ids)
    if not tokens:
        p.error("the input files hold no text")
    val = int(a.val_fraction * len(tokens) + 0.5)  # rounded half up, as text_to_shards does
    train_end = len(tokens) - val
    if train_end == 0:
        p.error(f"--val-fraction {a.val_fraction} leaves no training tokens out of {len(tokens)}")

    os.makedirs(a.out, exist_ok=True)
    for part, begin, end in (("train", 0, train_end), ("val", train_end, len(tokens))):
        for n, at in enumerate(range(begin, end, a.shard_tokens)):
            path = os.path.join(a.out, f"{a.prefix}_{part}_{n:06d}.bin")
            write_shard(path, tokens[at:min(at + a.shard_tokens, end)], version)
            print(path)
    print(f"{len(a.input)} file(s) -> {train_end} train and {val} val tokens, version {version}, "
          f"vocabulary {vocab}, in {a.out}")


if __name__ == "__main__":
    main()
