"""Tokenizer fixtures from HF transformers' tokenizers built from the same GGUF files jaxgen loads: the ids
of random texts (special tokens' text, whitespace runs, digits after spaces, contractions, scripts,
emoji, combining marks, control characters) and the text of random id sequences, spelled and with
skip_special_tokens=True.

Run in a separate environment with torch, transformers, gguf, sentencepiece and protobuf (transformers'
GGUF reader imports torch) and the model packages installed:

    python tools/make_tokenizer_fixtures.py gemma3-270m smollm2-135m qwen2.5-coder-0.5b [--out tests/fixtures]

transformers' GGUF conversion departs from two of these models' own tokenizers; the reference is
corrected to the model's own, and the test then holds jaxgen to that:
- SmolLM2: its tokenizer.json (and llama.cpp's "smollm" pre-tokenizer) splits digits off first and then
  applies the GPT-2 regex; the converter does it the other way round ("  9": "  " + "9", not " " + " 9").
- Qwen2: transformers' own Qwen2Tokenizer NFC-normalizes its input (models/qwen2/tokenization_qwen2.py);
  the tokenizer it builds from the GGUF does not ("e" + U+0301 is the token of "é").

Writes tokenizers.json: per model, [text, ids] pairs (ids without BOS) and [ids, text, text with
skip_special_tokens=True] triples.
"""
import argparse
import json
import pathlib
import random
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from make_reference import gguf_path  # noqa: E402

PIECES = (list("abcXYZ019 .,;:!?-_'\"()[]{}<>/\\@#$%^&*=+~`|")
          + ["\t", "\n", "\r", "\r\n", "\n\n", "  ", "    ", "\xa0", "\u3000", "\u2028", "\x00", "\x07",
             "\x7f", "'s", "'S", "'ll", "'LL", "'re", "'ve", "'m", "'d", "'t", "the", " the", "The", "HELLO",
             "hello",
             "123", "3.14", "1,000", "½", "²", "٣", "Ⅻ", "é", "e\u0301", "ß", "İ", "ﬁ", "Å", "日本語", "中文",
             "한국어", "ไทย", "العربية", "हिन्दी", "Ελληνικά", "Русский", "🙂", "🚀", "👨\u200d👩\u200d👧", "❤️",
             "🇫🇷", "\u200b", "\u200d", "\ufeff", "\U0001d400", "𝔘",
             # special tokens' text (of one model or another) and look-alikes
             "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>",
             "<pad>", "<unk>", "<mask>", "<unused12>", "[multimodal]", "<|fim_prefix|>", "<|file_sep|>",
             "<tool_call>", "<s>", "</s>", "[INST]", "<0x0A>", "▁", "Ġ", "Ċ"])


def texts(rng, n):
    return [""] + ["".join(rng.choice(PIECES) for _ in range(rng.randint(1, 12))) for _ in range(n - 1)]


def reference(name, path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    backend = tok.backend_tokenizer
    if name.startswith("smollm"):
        from tokenizers import pre_tokenizers as P

        backend.pre_tokenizer = P.Sequence([P.Digits(individual_digits=True),
                                            P.ByteLevel(add_prefix_space=False, use_regex=True)])
    if name.startswith("qwen"):
        from tokenizers import normalizers

        backend.normalizer = normalizers.NFC()
    return tok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("--out", default="tests/fixtures")
    ap.add_argument("--cases", type=int, default=150)
    args = ap.parse_args()
    import transformers

    out = pathlib.Path(args.out) / "tokenizers.json"
    data = json.loads(out.read_text()) if out.exists() else {}
    for name in args.models:
        path = gguf_path(name)
        tok = reference(name, path)
        rng = random.Random(f"tokenizers-{name}")
        V = len(tok)
        special = sorted(tok.all_special_ids) + sorted(i for i, t in tok.added_tokens_decoder.items() if t.special)
        encode = [[t, tok(t, add_special_tokens=False)["input_ids"]] for t in texts(rng, args.cases)]
        decode = []
        for _ in range(args.cases):  # random ids, one in three with a special id among them
            ids = [rng.randrange(V) for _ in range(rng.randint(1, 8))]
            if rng.random() < 1 / 3:
                ids.insert(rng.randrange(len(ids) + 1), rng.choice(special))
            decode.append(ids)
        decode += [ids for _, ids in encode[1:args.cases // 3]]  # and ids that spell real text
        decode = [[ids, tok.decode(ids), tok.decode(ids, skip_special_tokens=True)] for ids in decode]
        data[name] = {"meta": {"gguf": path.name, "reference": f"transformers {transformers.__version__}"},
                      "encode": encode, "decode": decode}
        print(name, len(encode), "texts,", len(decode), "id sequences", file=sys.stderr)
    out.write_text(json.dumps(data, ensure_ascii=False, indent=0))
    print("wrote", out, file=sys.stderr)


if __name__ == "__main__":
    main()
