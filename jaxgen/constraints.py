"""Structured output: a regex, a JSON schema or a list of choices, enforced inside the compiled loop.

A constraint is a regular language over the output text. outlines-core turns a regex and the
vocabulary's token bytes into a token-level automaton (state x token -> state); JSON schemas become a
regex first (jaxgen.schema: every keyword enforced exactly or the schema refused), choices an
alternation of escaped strings. On the device a row reads
its automaton state [B]: the tokens with a transition are allowed, the row's stop ids only in an
accepting state, and the state advances on the token appended; a row whose state is accepting with
no transition left ends there (finish "stop"). No host round trip per token.

Tables: most tokens behave alike in every state (all those that can never occur in a JSON number
...), so tokens fall into classes: `token_class` [V] and `next_state` [Q, C] (-1: not allowed), with
`accepting` / `closed` [Q]. Every constraint of a call shares one table (their states side by side,
the classes their common refinement); state 0 is "unconstrained" (every class allowed, loops to 0),
the start of rows without a constraint. Tables are padded to STATE_BUCKETS x CLASS_BUCKETS so that
another constraint of a similar size reuses the compiled program; MAX_CELLS bounds Q x C.

Compiled automata are cached on disk under $JAXGEN_CACHE/constraints, keyed by the regex and the
vocabulary's bytes: a million rows with one schema build it once.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxgen.errors import first_line
from jaxgen.json_regex import escape, json_whitespace, python_regex
from jaxgen.knobs import bucket, text_problem

STATE_BUCKETS = (16, 64, 256, 1024, 4096, 16384)
CLASS_BUCKETS = (64, 512, 4096, 32768, 262144)
MAX_CELLS = 1 << 24  # Q x C table cells per call (int32: 64 MB), before padding
KINDS = ("regex", "json_schema", "choices")
_SCHEMAS: dict = {}  # (schema's JSON text, whitespace) -> its regex: a million rows with one schema compile it once

@struct.dataclass
class Constraints:
    token_class: jax.Array  # [V] int32 class of each token id
    next_state: jax.Array  # [Q, C] int32 state after a token of class c in state q; -1: not allowed
    accepting: jax.Array  # [Q] bool the text so far is a whole match (stop ids allowed)
    closed: jax.Array  # [Q] bool accepting and no token may follow: the row ends here


class Built(str):
    """A constraint's regex as `to_regex` writes it for outlines-core. The front ends build each row's
    constraint once and pass it on as `regex=`, where it is taken as it is: read again as a Python
    regex it would be written again (the same language in another string, not the run's table entry)."""
    __slots__ = ()


def to_regex(kind: str, value, whitespace: str | None = None) -> Built:
    """The regex outlines-core builds for one constraint: kind "regex" (Python's syntax and meaning:
    the output is what re.fullmatch accepts; `json_regex.python_regex` writes it out for Rust's reader),
    "json_schema" (a dict or JSON text; whitespace: a Python regex of the JSON whitespace allowed
    between tokens, "" = compact, the default) or "choices" (a non-empty list of strings, the output is
    exactly one of them). A `Built` regex is returned as it is."""
    if isinstance(value, Built) and kind == "regex":
        return value
    if kind == "json_schema" and (key := _schema_key(value, whitespace)) in _SCHEMAS:
        return _SCHEMAS[key]  # (an equal schema was checked and compiled already: rows share it)
    if kind in KINDS and (problem := text_problem(value, kind)):  # (the tables are built over UTF-8 bytes)
        raise ValueError(problem)
    if kind == "regex":
        if not isinstance(value, str) or not value:
            raise ValueError(f"regex must be a non-empty string, got {value!r:.80}")
        return Built(python_regex(value))  # (Python's parse: an invalid regex is refused there)
    if kind == "choices":
        if (not isinstance(value, (list, tuple)) or not value
                or not all(isinstance(c, str) and c for c in value)):
            raise ValueError(f"choices must be a non-empty list of non-empty strings, got {value!r:.80}")
        return Built("(" + "|".join(escape(c) for c in value) + ")")
    if kind == "json_schema":
        from jaxgen.schema import to_regex as schema_regex

        built = Built(schema_regex(value, None if whitespace is None else json_whitespace(whitespace)))
        if key is not None:
            if len(_SCHEMAS) >= 256:
                _SCHEMAS.pop(next(iter(_SCHEMAS)))
            _SCHEMAS[key] = built
        return built
    raise ValueError(f"unknown constraint kind {kind!r}; choose one of {KINDS}")


def _schema_key(value, whitespace):
    """A schema's memo key: its JSON text (keys in order: properties are written in the schema's order)
    and the whitespace; None where that text would not give the value back (an int key, NaN), so
    such a schema is compiled, not taken for another one with the same text."""
    if isinstance(value, str):
        return value, whitespace
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):  # not JSON: to_regex names the problem
        return None
    return (text, whitespace) if json.loads(text) == value else None


def row_regexes(rows: int, regex=None, json_schema=None, choices=None, whitespace: str | None = None
                ) -> list[str | None]:
    """One regex (or None: unconstrained) per row from the request's constraint arguments, each given
    once for all rows or as a list with one entry (or None) per row. At most one kind per row."""
    out: list[str | None] = [None] * rows
    per_row = {"regex": lambda v: isinstance(v, (list, tuple)),
               "json_schema": lambda v: isinstance(v, (list, tuple)),
               "choices": lambda v: isinstance(v, (list, tuple)) and len(v) > 0
               and all(c is None or isinstance(c, (list, tuple)) for c in v)}
    for kind, value in (("regex", regex), ("json_schema", json_schema), ("choices", choices)):
        if value is None:
            continue
        values = list(value) if per_row[kind](value) else [value] * rows
        if len(values) != rows:
            raise ValueError(f"{kind} has {len(values)} entries but there are {rows} prompts")
        for i, v in enumerate(values):
            if v is None:
                continue
            if out[i] is not None:
                raise ValueError(f"prompt {i}: give at most one of regex, json_schema, choices")
            try:
                out[i] = to_regex(kind, v, whitespace)
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}") from None
    return out


# ---- automata (host) ----------------------------------------------------------------------------
_VOCAB: dict = {}  # (id(token_bytes), end ids) -> (token_bytes, digest): the vocabulary's cache key
_MEMO: dict = {}  # (digest, regex, end ids) -> automaton


def _vocab(token_bytes: Sequence[bytes], end_ids: Sequence[int]):
    key = (id(token_bytes), tuple(end_ids))
    if key not in _VOCAB:
        h = hashlib.sha256()
        for b in token_bytes:
            h.update(len(b).to_bytes(4, "little") + b)
        h.update(repr(sorted(end_ids)).encode())
        _VOCAB[key] = (token_bytes, h.hexdigest())  # token_bytes held: its id stays unique
    return _VOCAB[key]


def _outlines_vocab(token_bytes, end_ids):
    from outlines_core import Vocabulary

    ends = set(end_ids)
    groups: dict = {}
    for i, b in enumerate(token_bytes):
        if b and i not in ends:  # special tokens read as nothing (writable_bytes); end ids are the stop ids' business
            groups.setdefault(b, []).append(i)
    eos = min(ends) if ends else len(token_bytes)
    first = len(token_bytes) + 1  # the id of a token written only by the regex's leading "\x00" (`_build`)
    groups.setdefault(b"\x00", []).append(first)
    return Vocabulary(eos, groups), eos, first


_FORM = "v2"  # of the cached automata: v2 are built as `_build` says; v1 lost some matches


def automaton(regex: str, token_bytes: Sequence[bytes], end_ids: Sequence[int] = ()) -> dict:
    """outlines-core's token automaton of `regex`, states renumbered 0 .. Q-1 (0 = initial): arrays
    src, tok, dst [E] of its transitions (end ids left out) and `accepting` [Q]. Cached in memory and
    on disk ($JAXGEN_CACHE/constraints/<sha256>.npz)."""
    _, digest = _vocab(token_bytes, end_ids)
    key = hashlib.sha256(f"{_FORM}\0{digest}\0{regex}".encode()).hexdigest()
    if key in _MEMO:
        return _MEMO[key]
    path = _cache_dir() / f"{key}.npz"
    if path.exists():
        with np.load(path) as z:
            auto = {k: z[k] for k in ("src", "tok", "dst", "accepting")}
    else:
        auto = _build(regex, token_bytes, end_ids)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(tmp, **auto)
        os.replace(tmp, path)  # atomic: a concurrent run sees the whole file or none
    if len(_MEMO) >= 64:
        _MEMO.pop(next(iter(_MEMO)))
    _MEMO[key] = auto
    return auto


def _cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("JAXGEN_CACHE", pathlib.Path.home() / ".cache" / "jaxgen")) / "constraints"


def _build(regex: str, token_bytes, end_ids) -> dict:
    from outlines_core import Index

    vocab, eos, first = _outlines_vocab(token_bytes, end_ids)
    try:
        # "$": outlines-core's DFA is leftmost-first, which drops the threads of lower priority than a
        # match (an alternation's later branches, a lazy repeat's longer runs): (a|ab) became "a" alone and
        # choices=["a", "ab"] could not write "ab". With the end anchor nothing matches before the text
        # ends, and the automaton holds the whole language. The leading \x00, written by a token of its
        # own (`first`), keeps the regex from matching the empty text, where the anchor leaves the DFA no
        # start state that outlines-core takes; the automaton starts after it.
        index = Index(f"\\x00(?:{regex})$", vocab)
    except Exception as e:
        why = first_line(e, 2000)  # (the part naming missing tokens may come late in it)
        if "incompatible" in why:  # a character no token can write: outlines-core names it
            why = why[why.find("missing tokens"):].split(". ")[0] if "missing tokens" in why else why
            raise ValueError(f"constraint {regex!r:.80}: no token sequence of this vocabulary satisfies it "
                             f"({why[:160]})") from None
        raise ValueError(f"constraint {regex!r:.80} cannot be compiled: {why[:200]}") from None
    trans = index.get_transitions()  # {state: {token: next}}; ids are sparse
    init = trans[index.get_initial_state()][first]
    finals = set(index.get_final_states())
    order, seen = [init], {init}  # the states reachable from the start, in the order first reached
    for s in order:
        for t, n in trans.get(s, {}).items():
            if t not in (eos, first) and n not in seen:
                seen.add(n), order.append(n)
    number = {s: i for i, s in enumerate(order)}
    src, tok, dst = [], [], []
    for s in order:
        for t, n in trans.get(s, {}).items():
            if t not in (eos, first):  # the end is allowed by the row's stop ids in accepting states
                src.append(number[s]), tok.append(t), dst.append(number[n])
    accepting = np.array([s in finals for s in order], bool)
    if not accepting.any():
        raise ValueError(f"constraint {regex!r:.80}: no token sequence of this vocabulary satisfies it")
    return {"src": np.array(src, np.int32), "tok": np.array(tok, np.int32), "dst": np.array(dst, np.int32),
            "accepting": accepting}


def _union(autos: list[dict], vocab_size: int):
    """The automata side by side (state 0: unconstrained, then each one's states at its offset) and the
    token classes: (offsets [A + 1], (src, tok, dst) [E] int64, token_class [V], first [C])."""
    offsets = np.cumsum([1] + [len(a["accepting"]) for a in autos])
    Q = int(offsets[-1])
    src = np.concatenate([a["src"] + o for a, o in zip(autos, offsets)] + [np.zeros(0, np.int32)]).astype(np.int64)
    tok = np.concatenate([a["tok"] for a in autos] + [np.zeros(0, np.int32)]).astype(np.int64)
    dst = np.concatenate([a["dst"] + o for a, o in zip(autos, offsets)] + [np.zeros(0, np.int32)]).astype(np.int64)
    # Token classes: tokens with the same transitions from every state. A token's signature is a
    # random-weighted sum over its transitions (uint64, wrapping); equal signatures are then checked
    # to mean equal transitions (`build`), so a collision cannot merge two different tokens silently.
    w = np.random.default_rng(0).integers(1, 2 ** 63, size=Q, dtype=np.uint64)
    sig = np.zeros(vocab_size, np.uint64)
    with np.errstate(over="ignore"):
        np.add.at(sig, tok, w[src] * (dst.astype(np.uint64) + np.uint64(2)))
    _, first, token_class = np.unique(sig, return_index=True, return_inverse=True)
    return offsets, (src, tok, dst), token_class, first


def _too_big(Q: int, C: int) -> str | None:
    """Why one call's table of Q states x C token classes cannot be built (None: it can)."""
    if Q * C > MAX_CELLS:
        return (f"the constraints need {Q} states x {C} token classes = {Q * C:,} table cells, over the budget of "
                f"{MAX_CELLS:,} (jaxgen.constraints.MAX_CELLS); simplify the regex / schema (e.g. smaller "
                f"maxLength) or split the batch")
    if Q > STATE_BUCKETS[-1]:
        return (f"the constraints need {Q} automaton states, over the largest bucket {STATE_BUCKETS[-1]}; simplify "
                f"the regex / schema or split the batch")
    return None


def problem(regexes: Sequence[str | None], token_bytes: Sequence[bytes], vocab_size: int,
            end_ids: Sequence[int] = ()) -> str | None:
    """Why one call cannot hold the tables of these regexes together (over MAX_CELLS or the largest
    state bucket), or None; front ends that batch rows (`jaxgen batch`) split their calls by it.
    Builds (and caches) each automaton: raises ValueError for a regex the vocabulary cannot write."""
    distinct = list(dict.fromkeys(r for r in regexes if r is not None))
    if not distinct:
        return None
    offsets, _, _, first = _union([automaton(r, token_bytes, end_ids) for r in distinct], vocab_size)
    return _too_big(int(offsets[-1]), len(first))


def build(regexes: Sequence[str | None], token_bytes: Sequence[bytes], vocab_size: int, end_ids: Sequence[int] = (),
          rows: int | None = None, universe: Sequence[str] | None = None) -> tuple[Constraints, np.ndarray]:
    """Host tables for these rows' regexes (None: unconstrained; rows past the list too) and each
    row's start state [rows]. `universe` fixes the regexes the table knows (a refill run's prefills
    share one table); every row's regex must be among them."""
    rows = len(regexes) if rows is None else rows
    distinct = list(universe or ())
    for r in regexes:
        if r is not None and r not in distinct:
            if universe is not None:
                raise ValueError(f"constraint {r!r:.80} is not in the run's table")
            distinct.append(r)
    autos = [automaton(r, token_bytes, end_ids) for r in distinct]
    offsets, (src, tok, dst), token_class, first = _union(autos, vocab_size)
    Q, C = int(offsets[-1]), len(first)
    if why := _too_big(Q, C):
        raise ValueError(why)
    Qb, Cb = bucket(Q, STATE_BUCKETS, "constraint automaton states"), bucket(C, CLASS_BUCKETS, "constraint token classes")
    next_state = np.full((Qb, Cb), -1, np.int32)
    next_state[0, :] = 0
    next_state[src, token_class[tok]] = dst
    count = np.bincount(tok, minlength=vocab_size)
    if not (np.array_equal(next_state[src, token_class[tok]], dst)
            and np.array_equal(count, count[first][token_class])):
        raise RuntimeError("token-class signature collision (report this); the table would be wrong")
    accepting = np.zeros(Qb, bool)
    accepting[0] = True
    for a, o in zip(autos, offsets):
        accepting[o:o + len(a["accepting"])] = a["accepting"]
    out_degree = np.bincount(src, minlength=Qb)
    closed = accepting & (out_degree == 0)
    closed[0] = False
    start = np.zeros(rows, np.int32)
    for i, r in enumerate(regexes):
        if r is not None:
            start[i] = offsets[distinct.index(r)]
    return Constraints(token_class=token_class.astype(np.int32), next_state=next_state, accepting=accepting,
                       closed=closed), start


# ---- on the device ------------------------------------------------------------------------------
def allowed(c: Constraints, state: jax.Array, stop_ids: jax.Array) -> jax.Array:
    """[B, V] bool: tokens the rows' states [B] allow; stop ids [B, NS] (-1 unused) only where accepting."""
    B, V = state.shape[0], c.token_class.shape[0]
    ok = jnp.take(c.next_state[state], c.token_class, axis=1) >= 0  # [B, C] -> [B, V]
    ids = jnp.where(stop_ids >= 0, stop_ids, V)
    acc = jnp.broadcast_to(c.accepting[state][:, None], ids.shape)
    return ok.at[jnp.arange(B)[:, None], ids].set(acc, mode="drop")


def advance(c: Constraints, state: jax.Array, tokens: jax.Array):
    """States [B] after each of tokens [B, J] in turn, and whether each is closed: ([B, J], [B, J]).
    A token without a transition (a stop id) leaves the state as it is."""
    states = []
    for j in range(tokens.shape[1]):  # J is 1, or a speculative block (small, static)
        nxt = c.next_state[state, c.token_class[tokens[:, j]]]
        state = jnp.where(nxt >= 0, nxt, state)
        states.append(state)
    states = jnp.stack(states, axis=1)
    return states, c.closed[states]
