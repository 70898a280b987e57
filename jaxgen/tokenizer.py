"""Tokenizers: one small protocol, two implementations, built from a GGUF file's tokenizer arrays or
an HF checkpoint directory's tokenizer files.

- `SentencePieceTokenizer` (Gemma): a SentencePiece ModelProto assembled from tokens/scores/types
  (llama.cpp's token types equal SentencePiece's piece types), or a directory's `tokenizer.model`,
  loaded by `sentencepiece`.
- `BPETokenizer` (Llama-3-style, SmolLM2, Qwen2): a byte-level BPE built by the `tokenizers` package
  from vocab + merges, with the pre-tokenizer regex that the GGUF's `tokenizer.ggml.pre` names; or any
  directory's `tokenizer.json` as it is (byte-level, or SentencePiece-style with byte fallback).

Both serialize to a small JSON-able dict (stored beside Orbax checkpoints) and stream-decode. A chat
template (the checkpoint's own Jinja text) travels in that dict and renders through `jaxgen.chat`;
the hand-written "gemma" / "chatml" formats are the fallback for checkpoints without one.
"""
from __future__ import annotations

import base64
import re
from typing import Protocol, Sequence

from jaxgen.errors import first_line

CONTROL, USER_DEFINED = 3, 4  # SentencePiece / llama.cpp token types
# Gemma's turn markers: CONTROL in its GGUF, but chat-formatted text must parse to them (user-defined in
# the SentencePiece model built here) and HF's tokenizer counts them special
_TURN_MARKERS = ("<start_of_turn>", "<end_of_turn>")

# Pre-tokenizer regexes, as llama.cpp maps `tokenizer.ggml.pre` names.
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
QWEN2_REGEX = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# name -> (split digits first, the regex, Unicode normalization before both). Qwen2's own tokenizer
# NFC-normalizes its input (transformers' Qwen2Tokenizer; the GGUF does not say so): "e" + U+0301 is the
# one token of "é" there, and was two tokens here.
PRE_TOKENIZERS = {"smollm": ("digits", GPT2_REGEX, None), "gpt2": (None, GPT2_REGEX, None),
                  "default": (None, GPT2_REGEX, None), "qwen2": (None, QWEN2_REGEX, "NFC")}


class Tokenizer(Protocol):
    bos_id: int | None
    eos_id: int
    pad_id: int
    add_bos: bool
    stop_ids: tuple[int, ...]  # ids that end generation by default
    vocab_size: int
    special_ids: frozenset[int]  # ids HF counts special: never written by a constraint (optional)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]: ...
    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str: ...
    def token_bytes(self) -> list[bytes]: ...
    def apply_chat_template(self, messages: list[dict]) -> str: ...
    def to_dict(self) -> dict: ...


def writable_bytes(tok: Tokenizer) -> list[bytes]:
    """`tok.token_bytes()` with the special tokens' entries empty: what constrained decoding may write. A
    special token is not its text (<|im_start|> in a JSON string would end the turn), so a constraint
    writes that text with ordinary tokens. (A tokenizer of one's own without `special_ids`: all of it.)"""
    special = getattr(tok, "special_ids", None)
    if not special:
        return tok.token_bytes()
    if getattr(tok, "_writable", None) is None:
        tok._writable = [b"" if i in special else b for i, b in enumerate(tok.token_bytes())]
    return tok._writable


def _text(text: str) -> str:
    """`text` if it has a UTF-8 form; else one clear ValueError (the tokenizers' own errors for a lone
    surrogate are a TypeError from the Rust binding and a UnicodeEncodeError)."""
    from jaxgen.knobs import text_problem

    if problem := text_problem(text, "the text to encode"):
        raise ValueError(problem)
    return text


class _Base:
    chat_format: str  # "gemma" | "chatml" | ""
    default_system: str | None

    def _finish_init(self, spec: dict):
        self.bos_id, self.eos_id, self.pad_id = spec.get("bos_id"), spec["eos_id"], spec.get("pad_id") or 0
        self.add_bos = bool(spec.get("add_bos"))
        self.chat_format = spec.get("chat_format", "")
        self.default_system = spec.get("default_system")
        self.stop_ids = tuple(spec.get("stop_ids") or (self.eos_id,))
        self.chat_template = spec.get("chat_template") or None  # the checkpoint's Jinja template
        self.special_tokens = dict(spec.get("special_tokens") or {})  # {"bos_token": "<s>", ...} for templates

    def apply_chat_template(self, messages: list[dict], tools: list | None = None,
                            add_generation_prompt: bool = True) -> str:
        """The conversation as text, ready for `encode`: the checkpoint's template rendered as
        transformers renders it (a BOS the template writes is left to `encode`, which adds it as an
        id when add_bos: the same ids as HF's tokenized template), else the fallback format."""
        if self.chat_template:
            from jaxgen import chat

            text = chat.render(self.chat_template, messages, tools=tools, add_generation_prompt=add_generation_prompt,
                               special_tokens=self.special_tokens)
            bos = self.special_tokens.get("bos_token")
            if self.add_bos and bos and text.startswith(bos):
                text = text[len(bos):]
            return text
        if tools:
            raise ValueError("tools= needs a chat template that renders them; this checkpoint has none")
        for m in messages:
            if set(m) - {"role", "content"} or m.get("role") not in ("system", "user", "assistant"):
                raise ValueError(f"chat messages need role in system/user/assistant and content, got {m!r}")
        if self.chat_format == "gemma":  # system text joins the first user turn, as Gemma 3's template does
            out, system = [], None
            for m in messages:
                if m["role"] == "system":
                    system = m["content"]
                    continue
                content = m["content"].strip()  # Gemma 3's template trims every turn's content
                if system is not None and m["role"] == "user":
                    content, system = f"{system}\n\n{content}", None
                role = "model" if m["role"] == "assistant" else "user"
                out.append(f"<start_of_turn>{role}\n{content}<end_of_turn>\n")
            return "".join(out) + ("<start_of_turn>model\n" if add_generation_prompt else "")
        if self.chat_format == "chatml":
            if self.default_system and (not messages or messages[0]["role"] != "system"):
                messages = [{"role": "system", "content": self.default_system}] + list(messages)
            turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
            return turns + ("<|im_start|>assistant\n" if add_generation_prompt else "")
        raise ValueError("this tokenizer has no chat template (a base model?)")

    def stream_decoder(self) -> "StreamDecoder":
        return StreamDecoder(self)


class SentencePieceTokenizer(_Base):
    def __init__(self, spec: dict):
        import sentencepiece as spm

        self.proto = spec["proto"] if isinstance(spec["proto"], bytes) else base64.b64decode(spec["proto"])
        self.sp = spm.SentencePieceProcessor(model_proto=self.proto)
        self.vocab_size = self.sp.get_piece_size()
        self._spec = spec
        self._finish_init(spec)
        # HF transformers (and llama.cpp) treat control pieces as special added tokens: their text in the
        # input is the token, decode spells them, skip_special drops them. SentencePiece itself neither
        # reads nor writes them, so a second processor has them as user-defined pieces (which it does
        # read and write) and <unk> spelled as its piece, not " ⁇ ".
        from sentencepiece import sentencepiece_model_pb2 as pb

        m = pb.ModelProto()
        m.ParseFromString(self.proto)
        kind = pb.ModelProto.SentencePiece
        special = set()
        for i, p in enumerate(m.pieces):
            if p.type in (kind.CONTROL, kind.UNKNOWN) or p.piece in _TURN_MARKERS:
                special.add(i)
            if p.type == kind.CONTROL:
                p.type = kind.USER_DEFINED
        self.special_ids = frozenset(special)
        unk = self.sp.unk_id()
        self._unk_text = self.sp.id_to_piece(unk) if unk >= 0 else ""
        m.trainer_spec.unk_surface = self._unk_text
        self._spelled = spm.SentencePieceProcessor(model_proto=m.SerializeToString())

    @classmethod
    def from_gguf_fields(cls, f: dict) -> "SentencePieceTokenizer":
        from sentencepiece import sentencepiece_model_pb2 as pb

        m = pb.ModelProto()
        m.trainer_spec.model_type = pb.TrainerSpec.BPE
        m.trainer_spec.byte_fallback = True
        m.trainer_spec.split_digits = True
        m.trainer_spec.allow_whitespace_only_pieces = True
        m.trainer_spec.unk_id, m.trainer_spec.bos_id = f["unk_id"], f["bos_id"]
        m.trainer_spec.eos_id, m.trainer_spec.pad_id = f["eos_id"], f["pad_id"]
        m.normalizer_spec.name = "identity"
        m.normalizer_spec.add_dummy_prefix = f["add_space_prefix"]
        m.normalizer_spec.remove_extra_whitespaces = False
        m.normalizer_spec.escape_whitespaces = True
        for i, (piece, score, typ) in enumerate(zip(f["tokens"], f["scores"], f["token_type"])):
            p = m.pieces.add()
            p.piece, p.score, p.type = piece, score, typ
            if typ == USER_DEFINED:  # GGUF spells the whitespace-run pieces with ' ', SentencePiece with '▁'
                p.piece = piece.replace(" ", "\u2581")
            if i == f["unk_id"]:
                p.type = pb.ModelProto.SentencePiece.UNKNOWN  # the GGUF marks <unk> CONTROL
            elif piece in _TURN_MARKERS:
                p.type = pb.ModelProto.SentencePiece.USER_DEFINED
        tokens = f["tokens"]
        stops = [f["eos_id"]] + [tokens.index(t) for t in ("<end_of_turn>",) if t in tokens]
        return cls({"kind": "sentencepiece", "proto": m.SerializeToString(), "bos_id": f["bos_id"],
                    "eos_id": f["eos_id"], "pad_id": f["pad_id"], "add_bos": f["add_bos"],
                    "chat_format": "gemma" if "<start_of_turn>" in tokens else "", "stop_ids": stops,
                    "chat_template": f.get("chat_template") or None, "special_tokens": _gguf_special(f)})

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """The text's ids; a special token's text in it (<eos>, <unk>, <start_of_turn>) is that token, as
        HF's tokenizer reads it."""
        text = _text(text)
        parts = text.split(self._unk_text) if self._unk_text else [text]
        ids = []
        for k, part in enumerate(parts):  # (the unknown piece cannot be a user-defined one: split on it)
            ids += ([self.sp.unk_id()] if k else []) + (self._spelled.encode(part) if part else [])
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """The ids' text, special tokens spelled (<bos>, <unk>); skip_special drops them, as HF's
        skip_special_tokens=True."""
        ids = [int(i) for i in ids]
        if skip_special:
            return self.sp.decode([i for i in ids if i not in self.special_ids])
        return self._spelled.decode(ids)

    def token_bytes(self) -> list[bytes]:
        """What each id adds to the decoded text, as bytes ('\u2581' -> space, <0xNN> -> that byte,
        special pieces -> their text): decode(ids) is the UTF-8 decoding of their concatenation."""
        if getattr(self, "_token_bytes", None) is not None:
            return self._token_bytes
        out = []
        for i in range(self.vocab_size):
            piece = self.sp.id_to_piece(i)
            if self.sp.is_byte(i):
                out.append(bytes([int(piece[3:5], 16)]))
            else:
                out.append(piece.replace("\u2581", " ").encode("utf-8"))
        self._token_bytes = out
        return out

    def to_dict(self) -> dict:
        return {**self._spec, "proto": base64.b64encode(self.proto).decode("ascii")}


class BPETokenizer(_Base):
    def __init__(self, spec: dict):
        from tokenizers import Tokenizer as HFTokenizer

        self.tk = HFTokenizer.from_str(spec["tokenizer_json"])
        self.vocab_size = self.tk.get_vocab_size(with_added_tokens=True)
        self.special_ids = frozenset(i for i, t in self.tk.get_added_tokens_decoder().items() if t.special)
        self._spec = spec
        self._finish_init(spec)

    @classmethod
    def from_gguf_fields(cls, f: dict) -> "BPETokenizer":
        from tokenizers import AddedToken, Regex, Tokenizer as HFTokenizer, decoders, models, normalizers
        from tokenizers import pre_tokenizers

        pre = f.get("pre") or "default"
        if pre not in PRE_TOKENIZERS:
            raise ValueError(f"unsupported BPE pre-tokenizer {pre!r}; known: {sorted(PRE_TOKENIZERS)}")
        digits, regex, normal = PRE_TOKENIZERS[pre]
        vocab = {t: i for i, t in enumerate(f["tokens"])}
        merges = [tuple(m.split(" ", 1)) for m in f["merges"]]
        tk = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
        steps = [pre_tokenizers.Digits(individual_digits=True)] if digits else []
        steps += [pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        tk.pre_tokenizer = pre_tokenizers.Sequence(steps)
        if normal == "NFC":
            tk.normalizer = normalizers.NFC()
        tk.decoder = decoders.ByteLevel()
        # llama.cpp's converter types an added token CONTROL when it is special, USER_DEFINED when not
        # (Qwen's <tool_call>): both are read whole from text, only special ones are dropped by skip_special
        types = f.get("token_type") or []
        tk.add_tokens([AddedToken(t, special=ty == CONTROL, normalized=False)
                       for t, ty in zip(f["tokens"], types) if ty in (CONTROL, USER_DEFINED)])
        template = f.get("chat_template") or ""
        system = re.search(r"<\|im_start\|>system\\?\n(.*?)<\|im_end\|>", template, re.S)
        tokens = f["tokens"]
        stops = sorted({f["eos_id"]} | {vocab[t] for t in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>") if t in vocab})
        return cls({"kind": "bpe", "tokenizer_json": tk.to_str(), "bos_id": f.get("bos_id"),
                    "eos_id": f["eos_id"], "pad_id": f.get("pad_id"), "add_bos": f["add_bos"],
                    "chat_format": "chatml" if "<|im_start|>" in tokens else "",
                    "default_system": system.group(1) if system else None, "stop_ids": stops,
                    "chat_template": template or None, "special_tokens": _gguf_special(f)})

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        ids = self.tk.encode(_text(text), add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """The ids' text; skip_special drops special tokens' text, as HF's skip_special_tokens=True."""
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def token_bytes(self) -> list[bytes]:
        """What each id adds to the decoded text, as bytes: a byte-level token through the inverse of
        GPT-2's byte -> printable character map, an added (special) token as its text."""
        if getattr(self, "_token_bytes", None) is not None:
            return self._token_bytes
        inverse = {c: b for b, c in _gpt2_byte_chars().items()}
        added = {i: t.content for i, t in self.tk.get_added_tokens_decoder().items()}
        byte_level = _is_byte_level(self._spec["tokenizer_json"])
        out = []
        for i in range(self.vocab_size):
            if i in added:
                out.append(added[i].encode("utf-8"))
                continue
            piece = self.tk.id_to_token(i) or ""
            if not byte_level:  # SentencePiece-style: '\u2581' is a space, <0xNN> a byte (byte fallback)
                byte = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)
                out.append(bytes([int(byte.group(1), 16)]) if byte else piece.replace("\u2581", " ").encode("utf-8"))
            elif all(c in inverse for c in piece):
                out.append(bytes(inverse[c] for c in piece))
            else:
                out.append(piece.encode("utf-8"))
        self._token_bytes = out
        return out

    def to_dict(self) -> dict:
        return dict(self._spec)


def _gguf_special(f: dict) -> dict:
    """The special-token strings a GGUF's chat template may use (bos_token, eos_token, ...)."""
    tokens = f["tokens"]
    names = {"bos_token": f.get("bos_id"), "eos_token": f.get("eos_id"), "pad_token": f.get("pad_id"),
             "unk_token": f.get("unk_id")}
    return {k: tokens[i] for k, i in names.items() if isinstance(i, int) and 0 <= i < len(tokens)}


def _is_byte_level(tokenizer_json: str) -> bool:
    """Whether a tokenizer.json decodes through GPT-2's byte-level map (else SentencePiece-style)."""
    import json

    spec = json.loads(tokenizer_json)
    decoder = spec.get("decoder") or {}
    kinds = [d.get("type") for d in decoder.get("decoders", [decoder])] if isinstance(decoder, dict) else []
    fallback = (spec.get("model") or {}).get("byte_fallback", False) or "ByteFallback" in kinds
    return "ByteLevel" in kinds or not fallback


def _gpt2_byte_chars() -> dict[int, str]:
    """GPT-2's byte -> character map: printable bytes stand for themselves, the others for 256 + k."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + \
        list(range(ord("\xae"), ord("\xff") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


class StreamDecoder:
    """Incremental detokenization: feed ids as they come, get the new text. Text is emitted only once
    it is stable: a trailing partial UTF-8 sequence (decoded as U+FFFD) waits for its next bytes.

    Each push decodes only a window: the ids since the previous emission (ids[read:]) behind the ids
    of the emission before it (ids[prefix:read]) as context, and emits the difference between the two
    decodings, so a token whose text depends on its neighbour (a leading space) decodes as in the
    whole text, and the work per push does not grow with the length of the output."""

    def __init__(self, tok: Tokenizer):
        self.tok, self.ids, self.prefix, self.read = tok, [], 0, 0

    def _emit(self, final: bool) -> str:
        before = self.tok.decode(self.ids[self.prefix:self.read]) if self.read > self.prefix else ""
        text = self.tok.decode(self.ids[self.prefix:])
        if (text.endswith("\ufffd") and not final) or len(text) <= len(before):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(before):]

    def push(self, ids: Sequence[int]) -> str:
        self.ids.extend(int(i) for i in ids)
        return self._emit(final=False)

    def flush(self) -> str:
        return self._emit(final=True)


def from_gguf_fields(f: dict) -> Tokenizer:
    if f["model"] == "llama":
        return SentencePieceTokenizer.from_gguf_fields(f)
    if f["model"] == "gpt2":
        return BPETokenizer.from_gguf_fields(f)
    raise ValueError(f"unsupported GGUF tokenizer model {f['model']!r} (supported: llama, gpt2)")


def _token_text(v) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    return v.get("content") if isinstance(v, dict) else v if isinstance(v, str) else None


def from_hf_dir(path, config: dict) -> Tokenizer | None:
    """The tokenizer of an HF checkpoint directory: `tokenizer.json` (through `tokenizers`) or else
    `tokenizer.model` (through `sentencepiece`), with tokenizer_config.json / special_tokens_map.json
    (special tokens, add_bos_token, the chat template), chat_template.jinja (the template, preferred)
    and generation_config.json (eos_token_id: an id or a list, as Llama 3 ends on any of three).
    None when the directory has neither file (it still loads, for token-id prompts)."""
    import json
    import pathlib

    path = pathlib.Path(path)
    def read(name):
        if not (path / name).is_file():
            return {}
        try:
            d = json.loads((path / name).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path / name}: not readable JSON ({e})") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path / name}: not a JSON object")
        return d

    tcfg, smap, gcfg = read("tokenizer_config.json"), read("special_tokens_map.json"), read("generation_config.json")
    special = {k: _token_text(tcfg.get(k, smap.get(k))) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    special = {k: v for k, v in special.items() if v}
    template = tcfg.get("chat_template")
    if template is not None and not isinstance(template, (str, list)):
        raise ValueError(f"{path / 'tokenizer_config.json'}: chat_template must be a string or a list")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text(encoding="utf-8")
    if (path / "tokenizer.json").is_file():
        from tokenizers import Tokenizer as HFTokenizer

        text = (path / "tokenizer.json").read_text(encoding="utf-8")
        try:
            tk = HFTokenizer.from_str(text)
        except Exception as e:
            raise ValueError(f"{path / 'tokenizer.json'}: not a tokenizers file ({first_line(e)})") from None
        to_id = tk.token_to_id
        spec = {"kind": "bpe", "tokenizer_json": text}
    elif (path / "tokenizer.model").is_file():
        import sentencepiece as spm

        proto = (path / "tokenizer.model").read_bytes()
        try:
            sp = spm.SentencePieceProcessor(model_proto=proto)
        except Exception as e:
            raise ValueError(f"{path / 'tokenizer.model'}: not a SentencePiece model ({e})") from None
        to_id = lambda t: (i if (i := sp.piece_to_id(t)) != sp.unk_id() or t == sp.id_to_piece(i) else None)
        spec = {"kind": "sentencepiece", "proto": proto}
        special.setdefault("bos_token", sp.id_to_piece(sp.bos_id()) if sp.bos_id() >= 0 else None)
        special.setdefault("eos_token", sp.id_to_piece(sp.eos_id()) if sp.eos_id() >= 0 else None)
        special = {k: v for k, v in special.items() if v}
    else:
        return None
    ids = lambda v: [v] if isinstance(v, int) else [i for i in v if isinstance(i, int)] if isinstance(v, list) else []
    bos_id = to_id(special["bos_token"]) if "bos_token" in special else next(iter(ids(config.get("bos_token_id"))),
                                                                                None)
    eos = [to_id(special["eos_token"])] if "eos_token" in special else []
    eos += ids(gcfg.get("eos_token_id")) + ids(config.get("eos_token_id"))
    eos = [i for i in dict.fromkeys(eos) if i is not None]
    if not eos:
        raise ValueError(f"{path}: no end-of-sequence token in tokenizer_config.json, generation_config.json "
                         f"or config.json (eos_token / eos_token_id)")
    add_bos = tcfg.get("add_bos_token")
    if add_bos is None:  # what HF's encode does: the tokenizer.json post-processor adds BOS, or not
        if spec["kind"] == "bpe":
            add_bos = bos_id is not None and tk.encode("a", add_special_tokens=True).ids[:1] == [bos_id]
        else:
            add_bos = bos_id is not None
    pad = to_id(special["pad_token"]) if "pad_token" in special else None
    spec.update(bos_id=bos_id, eos_id=eos[0], pad_id=pad if pad is not None else 0, add_bos=bool(add_bos),
                stop_ids=eos, chat_template=template or None, special_tokens=special, chat_format="")
    return (BPETokenizer if spec["kind"] == "bpe" else SentencePieceTokenizer)(spec)


def from_dict(spec: dict) -> Tokenizer:
    kinds = {"sentencepiece": SentencePieceTokenizer, "bpe": BPETokenizer}
    if spec.get("kind") not in kinds:
        raise ValueError(f"unknown tokenizer kind {spec.get('kind')!r}")
    return kinds[spec["kind"]](spec)
