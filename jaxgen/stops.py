"""Stop strings, decided inside the compiled loop: no host round trip, no step decoded past a match.

A row ends when its generated text contains one of its stop strings. The text is the concatenation of
the new tokens' bytes (`tokenizer.token_bytes`), so "contains" is a byte-string search, which an
Aho-Corasick automaton over the batch's stop strings does one byte at a time. Reading a token is
reading its bytes, so the automaton's token-level transitions are precomputed on the host for every
(state, token): the state after the token's bytes, and which stop strings completed anywhere inside
them (a token "\\n\\n\\n" completes "\\n\\n"; a string split over several tokens completes on the
last). Most tokens act alike in every state (all those without a byte of any stop string send every
state to the root), so tokens fall into a few classes: the table is a class per token [V] and
[Q states, C classes] transitions, as small as the stop strings make it (two strings of 2 and 9
bytes on Gemma's 262k vocabulary: 12 states, a few hundred classes).

Per row: the automaton state [B] and a bitmask [B] of which of the batch's (at most 32) distinct stop
strings it stops on, so rows with different stops share one table. Tables are padded to STATE_BUCKETS
x CLASS_BUCKETS, so a batch without stop strings and one with a few run the same compiled program.
The host cuts the text before the match (`cut`); tokens end at the token that completed it.
"""
from __future__ import annotations

from collections import deque
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxgen.knobs import MAX_STOP_STRINGS, bucket

MAX_STRINGS = MAX_STOP_STRINGS  # distinct stop strings per call (bits of the int32 row mask)
STATE_BUCKETS = (16, 64, 256, 1024, 4096)
CLASS_BUCKETS = (64, 512, 4096, 32768, 262144)


@struct.dataclass
class StopStrings:
    token_class: jax.Array  # [V] int32 class of each token id
    next_state: jax.Array  # [Q, C] int32 state after reading a token of class c in state q
    hit: jax.Array  # [Q, C] int32 bit i set: reading that token completes stop string i
    mask: jax.Array  # [B] int32 bit i set: the row stops on stop string i


def _automaton(patterns: list[bytes]):
    """Aho-Corasick over bytes: the complete transition table delta [Q, 256] and, per state, the
    bitmask of patterns that end there (its own and its suffix links')."""
    goto, out = [{}], [0]
    for i, pat in enumerate(patterns):
        q = 0
        for b in pat:
            if b not in goto[q]:
                goto.append({})
                out.append(0)
                goto[q][b] = len(goto) - 1
            q = goto[q][b]
        out[q] |= 1 << i
    Q = len(goto)
    delta = np.zeros((Q, 256), np.int32)
    fail = [0] * Q
    order = deque()
    for b, q in goto[0].items():
        delta[0, b] = q
        order.append(q)
    while order:  # breadth first: a state's failure link is resolved before its children's
        q = order.popleft()
        out[q] |= out[fail[q]]
        delta[q] = delta[fail[q]]
        for b, r in goto[q].items():
            delta[q, b] = r
            fail[r] = delta[fail[q], b] if q else 0
            order.append(r)
    return delta, np.array(out, np.int64)


_TABLES: dict = {}  # (id(token_bytes), strings, V) -> (token_bytes, tables): a repeated request builds nothing


def build(strings_per_row: Sequence[Sequence[str]], token_bytes: Sequence[bytes], vocab_size: int,
          rows: int | None = None, universe: Sequence[str] | None = None) -> StopStrings:
    """Host (numpy) tables for these rows' stop strings (one list per row; rows past the list stop on
    none) over a vocabulary whose token i reads as token_bytes[i]. `universe` fixes the strings the
    table knows and their bit order (every row's strings must be among them), so that the prefills
    of one refill run share one table."""
    rows = len(strings_per_row) if rows is None else rows
    distinct: list[str] = list(universe or ())
    for i, strings in enumerate(strings_per_row):
        for s in strings:
            if not isinstance(s, str) or not s:
                raise ValueError(f"row {i}: a stop string must be a non-empty string, got {s!r}")
            if s not in distinct:
                if universe is not None:
                    raise ValueError(f"row {i}: stop string {s!r} is not in the run's table")
                distinct.append(s)
    if len(distinct) > MAX_STRINGS:
        raise ValueError(f"{len(distinct)} distinct stop strings in one call; at most {MAX_STRINGS}")
    mask = np.zeros((rows,), np.int64)
    for i, strings in enumerate(strings_per_row):
        for s in strings:
            mask[i] |= 1 << distinct.index(s)
    mask = mask.astype(np.uint32).view(np.int32)  # bit 31 is a string too
    key = (id(token_bytes), tuple(distinct), vocab_size)
    if key not in _TABLES:
        if len(_TABLES) >= 16:
            _TABLES.pop(next(iter(_TABLES)))
        _TABLES[key] = (token_bytes, _tables(distinct, token_bytes, vocab_size))
    token_class, next_state, hit = _TABLES[key][1]
    return StopStrings(token_class=token_class, next_state=next_state, hit=hit, mask=mask)


def _tables(distinct: list[str], token_bytes: Sequence[bytes], V: int):
    if not distinct:
        Q, C = STATE_BUCKETS[0], CLASS_BUCKETS[0]
        return np.zeros((V,), np.int32), np.zeros((Q, C), np.int32), np.zeros((Q, C), np.int32)
    delta, out = _automaton([s.encode("utf-8") for s in distinct])
    Q = delta.shape[0]
    # Run every state over every token's bytes at once, longest tokens first so that column c
    # touches only the tokens with more than c bytes.
    tb = [token_bytes[i] if i < len(token_bytes) else b"" for i in range(V)]  # ids past the tokenizer: no text
    lens = np.array([len(b) for b in tb])
    order = np.argsort(-lens, kind="stable")
    width = int(lens.max()) if V else 0
    flat = np.frombuffer(b"".join(tb[t] for t in order) + b"\0", np.uint8)
    starts = np.concatenate([[0], np.cumsum(lens[order])[:-1]])
    col = np.arange(max(width, 1))[None, :]
    mat = np.where(col < lens[order][:, None], flat[np.minimum(starts[:, None] + col, len(flat) - 1)], 0)  # [V, width]
    state = np.repeat(np.arange(Q)[:, None], V, axis=1)  # [Q, V]
    hit = np.zeros((Q, V), np.int64)
    sorted_lens = lens[order]
    for c in range(width):
        n = int(np.sum(sorted_lens > c))  # tokens with more than c bytes
        st = delta[state[:, :n], mat[None, :n, c]]
        state[:, :n] = st
        hit[:, :n] |= out[st]
    inv = np.empty(V, np.int64)
    inv[order] = np.arange(V)
    state, hit = state[:, inv], hit[:, inv]  # back to token-id order
    cols = np.concatenate([state, hit], axis=0).T  # [V, 2Q]: a token's behaviour in every state
    uniq, token_class = _classes(cols)
    Qb = bucket(Q, STATE_BUCKETS, "stop-string automaton states")
    Cb = bucket(len(uniq), CLASS_BUCKETS, "stop-string token classes")
    next_state = np.zeros((Qb, Cb), np.int32)
    hits = np.zeros((Qb, Cb), np.int64)
    next_state[:Q, :len(uniq)] = uniq[:, :Q].T
    hits[:Q, :len(uniq)] = uniq[:, Q:].T
    return token_class.reshape(V).astype(np.int32), next_state, hits.astype(np.uint32).view(np.int32)


def _classes(cols: np.ndarray):
    """(distinct rows of cols [V, k], the index of each row among them). np.unique(axis=0) sorts
    rows lexicographically (2.3 s on Gemma's vocabulary); a 64-bit hash of each row, checked for
    collisions, is 20x faster."""
    weights = np.random.default_rng(0).integers(1, 2 ** 63, cols.shape[1], dtype=np.uint64) | np.uint64(1)
    h = (cols.astype(np.uint64) * weights).sum(axis=1, dtype=np.uint64)
    _, first, inverse = np.unique(h, return_index=True, return_inverse=True)
    uniq = cols[first]
    if not np.array_equal(uniq[inverse.reshape(-1)], cols):  # a collision: take the slow exact way
        return np.unique(cols, axis=0, return_inverse=True)
    return uniq, inverse


def advance(t: StopStrings, state: jax.Array, tokens: jax.Array):
    """Read tokens [B, J] from automaton states [B]: (states [B, J] after each token, hit [B, J] bool:
    that token completed one of the row's stop strings)."""
    states, hits = [], []
    for j in range(tokens.shape[1]):  # J is 1 (plain decoding) or a speculative block (<= gamma + 1)
        c = t.token_class[tokens[:, j]]
        hits.append((t.hit[state, c] & t.mask) != 0)
        state = t.next_state[state, c]
        states.append(state)
    return jnp.stack(states, axis=1), jnp.stack(hits, axis=1)


def cut(text: str, strings: Sequence[str], keep: bool = False) -> tuple[str, str | None]:
    """(text up to its first stop string, that string); the string itself kept with keep=True.
    The first occurrence is the one that starts first; of two starting at the same place, the longer."""
    best = None
    for s in strings:
        i = text.find(s)
        if i >= 0 and (best is None or (i, -len(s)) < (best[0], -len(best[1]))):
            best = (i, s)
    if best is None:
        return text, None
    i, s = best
    return text[:i + len(s)] if keep else text[:i], s
