#!/usr/bin/env python3
"""Trains the small byte-level BPE tokenizers of the tokenizer tests with the Hugging Face `tokenizers` library and
writes what the library makes of the test texts (pip install tokenizers).

    python3 tests/data/bpe/make_tokenizers.py

Writes, beside this script:
  gpt2_style.json     GPT-2's ByteLevel pre-tokenizer (its regex split), <|endoftext|>, an added <sep> with
                      lstrip and rstrip
  llama3_style.json   Llama 3's Split regex then ByteLevel without a regex, ignore_merges, two special tokens
  qwen2_style.json    Qwen2's Split regex (single digits), ByteLevel with add_prefix_space; merges in the older
                      "left right" string form
  encodings.json      for each tokenizer and each test text: the ids of encode(text, add_special_tokens=False)
                      and decode(ids, skip_special_tokens=False)

Each tokenizer has a vocabulary of about 1000 tokens, trained on the Genesis text of tests/data/kjv_genesis.txt and
a few lines in other scripts (so that merges join the bytes of multi-byte characters). The host test
tests/host/test_bpe_tokenizer.cpp checks the C++ tokenizer against encodings.json without Python.
"""
import json
import os

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "..", "kjv_genesis.txt")

GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# Text in other scripts, trained on beside Genesis.
EXTRA_TRAINING = [
    "Café crème, naïve façade, résumé, Ærø, Straße, Ångström, señor, über, œuvre.",
    "Au commencement, Dieu créa les cieux et la terre. La terre était informe et vide.",
    "Ἐν ἀρχῇ ἐποίησεν ὁ θεὸς τὸν οὐρανὸν καὶ τὴν γῆν. В начале сотворил Бог небо и землю.",
    "起初，神创造天地。地是空虚混沌，渊面黑暗。はじめに神は天と地とを創造された。태초에 하나님이 천지를 창조하시니라.",
    "emoji 😀😀 🎉🎉 👍👍 ❤️ ✨ 🙏",
] * 20

TEST_TEXTS = [
    "",
    "In the beginning God created the heaven and the earth.",
    "And God said, Let there be light: and there was light.",
    "Hello, world! How's it going? I'm fine; we'll see, they've gone, she'd said, it's done, don't.",
    "DON'T YOU'LL I'M WE'RE THEY'VE SHE'D IT'S Don'T it'ſ",
    "'s 't 're 've 'm 'll 'd ' 'x ''s",
    "Café, naïve façade, résumé, Ærø, Straße, Ångström",
    "e\u0301 with a combining acute, A\u030a too",
    "起初，神创造天地。はじめに神は天と地とを創造された。한국어 텍스트",
    "Ἐν ἀρχῇ ἐποίησεν · В начале сотворил Бог · עברית · العربية · हिन्दी",
    "emoji 😀🎉👍🏽 family 👨\u200d👩\u200d👧 flag 🇫🇷 ❤️!",
    "a  b   c    d\t\te \n\n\n f   \n  g    ",
    "   leading spaces",
    "trailing spaces   ",
    "\r\nwindows\r\nline ends\r\n\r\n",
    "line one\nline two\n\nline four\n",
    "tabs\tand\t\tmore\ttabs\t",
    "1234567890 3.14159 10,000 2024-12-31 x1y22z333 ١٢٣ ½ Ⅻ",
    "no-break\u00a0space, thin\u2009space, ideographic\u3000space, line\u2028sep",
    "punctuation!!! ...??? (brackets) [more] {braces} <angles> @#$%^&*_+=|\\/~`",
    "first<|endoftext|>second<|endoftext|>",
    "left  <sep>  right<sep>end",
    "<|begin_of_text|>Genesis<|end_of_text|>",
    "spaces before\n   an indented line and after   \n",
    "x" * 300,
    " " * 70 + "y",
]


def genesis_lines():
    with open(CORPUS, encoding="utf-8") as f:
        return f.read().splitlines()


def train(pre_tokenizer, special, vocab_size=1000, ignore_merges=False):
    tok = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(genesis_lines() + EXTRA_TRAINING, trainer=trainer)
    return tok


def main():
    made = {}
    gpt2 = train(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), ["<|endoftext|>"])
    gpt2.add_tokens([AddedToken("<sep>", lstrip=True, rstrip=True, normalized=True)])
    made["gpt2_style.json"] = gpt2

    llama3 = train(pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ]), ["<|begin_of_text|>", "<|end_of_text|>"], ignore_merges=True)
    made["llama3_style.json"] = llama3

    qwen2 = train(pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=False),
    ]), ["<|endoftext|>"])
    made["qwen2_style.json"] = qwen2

    encodings = {}
    for name, tok in made.items():
        path = os.path.join(HERE, name)
        doc = json.loads(tok.to_str())
        if name == "qwen2_style.json":  # the older merges form, "left right" (GPT-2's own file has it)
            doc["model"]["merges"] = [" ".join(pair) for pair in doc["model"]["merges"]]
        with open(path, "w", encoding="utf-8") as f:
            json.dump(doc, f, ensure_ascii=False, indent=1)
            f.write("\n")
        reloaded = Tokenizer.from_file(path)
        cases = []
        for text in TEST_TEXTS:
            ids = reloaded.encode(text, add_special_tokens=False).ids
            assert ids == tok.encode(text, add_special_tokens=False).ids, (name, text)
            cases.append({"text": text, "ids": ids, "decoded": reloaded.decode(ids, skip_special_tokens=False)})
        encodings[name] = cases
        print(f"{name}: {reloaded.get_vocab_size()} tokens")
    with open(os.path.join(HERE, "encodings.json"), "w", encoding="utf-8") as f:
        json.dump(encodings, f, ensure_ascii=False, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
