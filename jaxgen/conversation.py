"""Multi-turn conversations on a kept KV cache: agents and RL for agents, where the model generates
until a tool call or an answer, the environment replies, and the model continues.

Each row's cache stays on the device between turns and a turn prefills only what the environment
appends, so an episode costs its new tokens, not the square of its length. Two layers:

- pure and jittable (no host state, so several turns with a JAX environment run inside one `jax.jit`):
  `begin` (the first turn: prompts), `extend` (a later turn: per-row appended segments), both returning
  the turn's `DecodeState` (its outputs) and the `Episode` to continue from; `feed` is `extend` without
  its decode loop (the host API times the two apart).
- the host API `Conversation(model, max_len=...)`: text or ids (or chat messages) in, Completions out,
  per-row histories with the mask of model-generated tokens that an RL loss needs.

The cache holds every token of a row's history but the last one the model generated (the decode
loop samples a token and feeds it on the next step; a finished row's last token was never fed), so a
turn feeds that token first, then the appended segment, at the positions that follow.

Contract: turn t of a conversation == a fresh `generate` over each row's whole history so far (its
prompt, then every reply and segment) with the same knobs and seed: identical greedy tokens,
identical sampled tokens (a row's key at its j-th new token of a turn is fold_in(key(seed_row), j),
as in `generate`, with seed_row from that turn's `seed` exactly as `generate` derives it), log-probs
equal up to float rounding (the history was prefilled in other chunks).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxgen import backend
from jaxgen import constraints as con
from jaxgen import knobs as kn
from jaxgen import lora as lora_mod
from jaxgen import sampling as smp
from jaxgen import stops as sst
from jaxgen.config import ModelConfig
from jaxgen.engine import (LENGTH, DecodeState, Prefix, _constrain, _no_stop_strings, _paths, decode, output,
                           prefill, record)
from jaxgen.generate import (Completion, SharedPrefix, _encode, _encode_prompts, fetch, place, prefix_slots, prepare,
                             stop_rows, to_completions)
from jaxgen.model import PREFILL_CHUNK, Params, prefill_hidden, unembed
from jaxgen.sharding import stack_shardings


@struct.dataclass
class Episode:
    """A batch of conversations between two turns (B rows)."""
    cache: jax.Array  # KVCache: each row's history but its pending token (cache.lengths [B] tokens)
    last: jax.Array  # [B] int32 each row's last generated token
    pending: jax.Array  # [B] bool: `last` is not in the cache yet (fed first on the row's next turn)
    seen: jax.Array  # [B, V | 0] bool tokens of the whole history (penalties; [B, 0] without them)


def carry(state: DecodeState, ep: Episode | None = None, took: jax.Array | None = None) -> Episode:
    """The Episode after a turn whose decode state is `state`. took [B] bool: the rows that took
    the turn (None: all); the others keep what `ep` says of them."""
    pending = state.num_new > 0
    if ep is not None and took is not None:
        pending = jnp.where(took, pending, ep.pending)
    return Episode(cache=state.cache, last=state.last, pending=pending, seen=state.seen)


def start(params: Params, prompts: jax.Array, prompt_lengths: jax.Array, sp: smp.SamplingParams,
          max_new_tokens: jax.Array, stop_ids: jax.Array, seeds: jax.Array, *, cfg: ModelConfig, max_new: int,
          cache_len: int, top_logprobs: int = 0, candidates: int = smp.DEFAULT_CANDIDATES, pad_id: int = 0,
          mesh=None, kv_quant: str | None = None, penalties: bool = False, n: int = 1,
          stop_strings: sst.StopStrings | None = None, prefix: Prefix | None = None,
          prefill_chunk: int = PREFILL_CHUNK, constraints: con.Constraints | None = None,
          constraint_start: jax.Array | None = None, paths: backend.Paths | None = None,
          adapters: jax.Array | None = None) -> DecodeState:
    """The first turn's prefill (`engine.prefill`, arguments as there) into a cache of cache_len
    slots, the conversation's whole length: each row's budget is capped by the room its history
    leaves (a row that fills the cache ends with LENGTH), and a prompt that does not fit is not
    written (the row ends with LENGTH and nothing generated; the host API refuses it before)."""
    pre = 0 if prefix is None else prefix.cache.lengths[0]
    plen = jnp.asarray(prompt_lengths)
    fits = pre + plen <= cache_len
    room = jnp.repeat(jnp.where(fits, cache_len - pre - plen, 0), n)  # [B]
    cap = jnp.maximum(jnp.minimum(max_new_tokens, room), 0)
    state = prefill(params, prompts, jnp.where(fits, plen, 0), sp, cap, stop_ids, seeds, cfg=cfg,
                    max_new=max_new, cache_len=cache_len, top_logprobs=top_logprobs, candidates=candidates,
                    pad_id=pad_id, mesh=mesh, kv_quant=kv_quant, penalties=penalties, n=n, stop_strings=stop_strings,
                    prefix=prefix, prefill_chunk=prefill_chunk, constraints=constraints,
                    constraint_start=constraint_start, paths=paths, adapters=adapters)
    cut = (jnp.repeat(plen, n) > 0) & (max_new_tokens > 0) & (cap <= 0)  # no room: ends at once
    return state.replace(done=state.done | cut, finish=jnp.where(cut, LENGTH, state.finish))


def feed(params: Params, ep: Episode, segments: jax.Array, segment_lengths: jax.Array, sp: smp.SamplingParams,
         max_new_tokens: jax.Array, stop_ids: jax.Array, seeds: jax.Array, *, cfg: ModelConfig, max_new: int,
         top_logprobs: int = 0, candidates: int = smp.DEFAULT_CANDIDATES, pad_id: int = 0, mesh=None,
         stop_strings: sst.StopStrings | None = None, prefill_chunk: int = PREFILL_CHUNK,
         constraints: con.Constraints | None = None, constraint_start: jax.Array | None = None,
         paths: backend.Paths | None = None) -> DecodeState:
    """Append right-padded segments [B, T] (segment_lengths [B]; 0 = the row sits this turn out) to
    each row's history and sample the first token of its reply: the decode state of the turn, with
    nothing else generated (`decode` continues it). Each row feeds its pending token, then its
    segment, at the positions after its cache; per-row arguments as in `engine.prefill` (B rows).
    A row whose history would overflow the cache feeds nothing and ends with LENGTH; a row's budget
    is capped by the room its history leaves. Penalties are on when ep.seen carries the history."""
    paths = _paths(paths, mesh)
    c = ep.cache
    B, T = segments.shape
    V, S = cfg.vocab_size, c.max_len
    took = segment_lengths > 0
    pend = (ep.pending & took).astype(jnp.int32)
    want = jnp.where(took, segment_lengths + pend, 0)  # tokens to feed per row
    fits = c.lengths + want <= S
    count = jnp.where(fits, want, 0)
    # [last] + segment for a row with a pending token, the segment alone otherwise: one shifted gather
    col = jnp.arange(T + 1)[None, :]
    seg = jnp.take_along_axis(segments, jnp.clip(col - pend[:, None], 0, T - 1), axis=1)
    tokens = jnp.where(col < pend[:, None], ep.last[:, None], seg).astype(jnp.int32)  # [B, T + 1]
    positions = jnp.where(col < count[:, None], c.lengths[:, None] + col, -1).astype(jnp.int32)
    h_last, cache = prefill_hidden(params, tokens, positions, c, cfg, prefill_chunk, paths,
                                   stack_shardings(c, mesh))  # [B, D]
    logits = unembed(params, h_last, cfg, paths)  # [B, V]

    seen = ep.seen
    if seen.shape[1]:  # the fed tokens join the history's penalty set
        rows = jnp.arange(B)[:, None]
        seen = seen.at[rows, jnp.where(positions >= 0, tokens, V)].set(True, mode="drop")
    cap = budget(max_new_tokens, cache)
    cut = took & (max_new_tokens > 0) & (~fits | (cap <= 0))  # overflow, or no room left to reply
    k = top_logprobs
    state = DecodeState(
        step=jnp.zeros((), jnp.int32), tokens=jnp.full((B, max_new), pad_id, jnp.int32),
        logprobs=jnp.zeros((B, max_new), jnp.float32),
        top_ids=jnp.zeros((B, max_new, k), jnp.int32), top_logprobs=jnp.zeros((B, max_new, k), jnp.float32),
        last=ep.last, done=(count == 0) | (cap <= 0), finish=jnp.where(cut, LENGTH, 0),
        num_new=jnp.zeros((B,), jnp.int32), seen=seen, counts=jnp.zeros(seen.shape, jnp.int32),
        stop_state=jnp.zeros((B,), jnp.int32),
        stops=_no_stop_strings(V, B) if stop_strings is None else jax.tree.map(jnp.asarray, stop_strings),
        cache=cache)
    if constraints is not None:
        state = state.replace(cons=jax.tree.map(jnp.asarray, constraints), cstate=jnp.asarray(constraint_start, jnp.int32))
    return _constrain(record(state, logits, sp, cap, stop_ids, seeds, k, candidates, pad_id, paths, mesh), mesh)


def begin(params: Params, prompts: jax.Array, prompt_lengths: jax.Array, sp: smp.SamplingParams,
          max_new_tokens: jax.Array, stop_ids: jax.Array, seeds: jax.Array, *, cfg: ModelConfig, max_new: int,
          cache_len: int, candidates: int = smp.DEFAULT_CANDIDATES, pad_id: int = 0, mesh=None,
          paths: backend.Paths | None = None, **options) -> tuple[DecodeState, Episode]:
    """The first turn: `start` then the decode loop. Returns the turn's state (its outputs: tokens,
    num_new, finish, logprobs) and the Episode to `extend`. options: as `start` takes them."""
    state = start(params, prompts, prompt_lengths, sp, max_new_tokens, stop_ids, seeds, cfg=cfg, max_new=max_new,
                  cache_len=cache_len, candidates=candidates, pad_id=pad_id, mesh=mesh, paths=paths, **options)
    state = finish(params, state, sp, max_new_tokens, stop_ids, seeds, cfg=cfg, max_new=max_new,
                   candidates=candidates, pad_id=pad_id, mesh=mesh, paths=paths)
    return state, carry(state)


def extend(params: Params, ep: Episode, segments: jax.Array, segment_lengths: jax.Array, sp: smp.SamplingParams,
           max_new_tokens: jax.Array, stop_ids: jax.Array, seeds: jax.Array, *, cfg: ModelConfig, max_new: int,
           candidates: int = smp.DEFAULT_CANDIDATES, pad_id: int = 0, mesh=None,
           paths: backend.Paths | None = None, **options) -> tuple[DecodeState, Episode]:
    """A later turn: `feed` then the decode loop. Returns the turn's state and the next Episode
    (rows that sat out keep theirs). options: as `feed` takes them."""
    state = feed(params, ep, segments, segment_lengths, sp, max_new_tokens, stop_ids, seeds, cfg=cfg,
                 max_new=max_new, candidates=candidates, pad_id=pad_id, mesh=mesh, paths=paths, **options)
    state = finish(params, state, sp, max_new_tokens, stop_ids, seeds, cfg=cfg, max_new=max_new,
                   candidates=candidates, pad_id=pad_id, mesh=mesh, paths=paths)
    return state, carry(state, ep, segment_lengths > 0)


def finish(params: Params, state: DecodeState, sp: smp.SamplingParams, max_new_tokens: jax.Array,
           stop_ids: jax.Array, seeds: jax.Array, *, cfg: ModelConfig, max_new: int,
           candidates: int = smp.DEFAULT_CANDIDATES, pad_id: int = 0, mesh=None,
           paths: backend.Paths | None = None) -> DecodeState:
    """The turn's decode loop after `start` / `feed`, each row's budget capped as they capped it
    (the room its history leaves: the first new token is pending, so the cache holds what was fed)."""
    return decode(params, state, sp, budget(max_new_tokens, state.cache), stop_ids, seeds, jnp.int32(max_new),
                  cfg=cfg, candidates=candidates, pad_id=pad_id, mesh=mesh, paths=paths)


def budget(max_new_tokens, cache):
    """[B] new tokens each row may take this turn: its request, capped so that its whole history
    (everything fed, then the reply) stays within the cache's max_len slots."""
    return jnp.maximum(jnp.minimum(max_new_tokens, cache.max_len - cache.lengths), 0)


# ---- the host API -------------------------------------------------------------------------------
start_jit = backend.jit(start, static_argnames=("cfg", "max_new", "cache_len", "top_logprobs", "candidates", "pad_id",
                                            "mesh", "kv_quant", "penalties", "n", "prefill_chunk", "paths"))
# the episode is donated: the turn writes its tokens into the kept cache in place
feed_jit = backend.jit(feed, static_argnames=("cfg", "max_new", "top_logprobs", "candidates", "pad_id", "mesh",
                                          "prefill_chunk", "paths"), donate_argnames="ep")
finish_jit = backend.jit(finish, static_argnames=("cfg", "max_new", "candidates", "pad_id", "mesh", "paths"),
                     donate_argnames="state")
PENALTIES = ("repetition_penalty", "presence_penalty", "frequency_penalty")
# what a turn takes: generate's knobs, less those fixed for the whole conversation or not multi-turn
TURN_KNOBS = frozenset(k for k, v in kn.KNOBS.items() if v.beam != "only" and k not in ("n", "num_beams", "lora"))
FIXED = ("n", "max_len", "chat", "tools", "penalties", "lora")  # Conversation(...)'s own options
REPLY = "\u27e6jaxgen-reply\u27e7"  # stands for a reply's content in a chat template (see `_chat_tail`)


@dataclasses.dataclass
class History:
    """One row's whole sequence, in the layout `jaxgen.score` / `rollout` take (a loss masks it)."""
    tokens: list[int]  # prefix and prompt, then each turn's reply and the segment appended after it
    generated: list[bool]  # True where the model generated the token (an RL loss trains on these only)
    logprobs: list[float]  # raw-model log-probability of each generated token; 0.0 at the others


class Conversation:
    """Multi-turn generation on a kept KV cache (see the module docstring for the contract).

        conv = Conversation(model, max_len=4096)
        first = conv.generate(["What is 17 * 23? Use the calculator."], stop="</tool_call>")
        reply = conv.generate(["<tool_result>391</tool_result>"])   # one segment per row, None = sits out

    The first call takes prompts (text or ids; with n > 1, each prompt's n samples become n rows that
    continue their own branches); each later call takes one appended segment per row (text, encoded
    without BOS, or ids; None: the row sits the turn out and its returned entry is None). Knobs are
    `generate`'s, per turn (one value or one per row); seed defaults to the turn's index, so turn t
    equals generate(histories, seed=t). Fixed for the conversation: max_len (the cache's slots: a
    row's whole history fits in it; a row that reaches it ends with finish_reason "length" and a
    `message`, and takes no further turn), n, chat / tools (segments are lists of chat messages
    rendered with the model's template: see `_chat_tail`), penalties (True: the penalty history of
    the whole conversation is carried, so repetition / presence / frequency penalties can be used),
    lora (an adapter from jaxgen.load_lora for every prompt, or one or None per prompt: each row keeps
    its prompt's adapter for the whole conversation, its cache holding that adapter's keys).
    """

    def __init__(self, model, *, max_len: int, n: int = 1, chat: bool = False, tools: list | None = None,
                 penalties: bool = False, lora=None):
        cfg = model.cfg
        if isinstance(max_len, bool) or not isinstance(max_len, (int, np.integer)) or max_len < 2:
            raise ValueError(f"max_len must be an integer >= 2 (the conversation's cache slots), got {max_len!r}")
        if max_len > cfg.max_seq_len:
            raise ValueError(f"max_len {max_len} exceeds {cfg.name}'s context of {cfg.max_seq_len} tokens")
        kn.check("n", n)
        if chat and not hasattr(model.tokenizer, "apply_chat_template"):
            raise ValueError("chat=True needs a model with a tokenizer (and its chat template)")
        if tools is not None and not chat:
            raise ValueError("tools= is rendered by the chat template: it needs chat=True")
        self.model, self.max_len, self.n, self.chat, self.tools = model, int(max_len), int(n), bool(chat), tools
        self.penalties = bool(penalties)
        self.lora = lora
        self.turn = 0  # turns taken
        self._ep: Episode | None = None
        self._rows = 0  # B, the padded decode rows
        self._hist: list[History] = []
        self._ended: list[str | None] = []  # why a row can take no further turn
        self._messages: list[list[dict]] = []  # chat: each row's messages so far
        self._reply_end: list[str] = []  # chat: the text of the stop id that ended the row's last reply
        self._pending = np.zeros(0, bool)  # [R] the row's last generated token is not in the cache yet

    @property
    def rows(self) -> int:
        """R, the conversation's rows (prompts x n); 0 before the first turn."""
        return len(self._hist)

    def history(self, i: int) -> History:
        return self._hist[i]

    def histories(self) -> dict:
        """Every row's history right-padded (pad 0): tokens [R, L] int32, generated [R, L] bool,
        logprobs [R, L] f32, lengths [R] int32 (the arguments of `jaxgen.score`: its log-prob of
        tokens[:, j] is at column j - 1)."""
        L = max(len(h.tokens) for h in self._hist)
        out = {"tokens": np.zeros((self.rows, L), np.int32), "generated": np.zeros((self.rows, L), bool),
               "logprobs": np.zeros((self.rows, L), np.float32),
               "lengths": np.array([len(h.tokens) for h in self._hist], np.int32)}
        for i, h in enumerate(self._hist):
            k = len(h.tokens)
            out["tokens"][i, :k], out["generated"][i, :k], out["logprobs"][i, :k] = h.tokens, h.generated, h.logprobs
        return out

    def messages(self, i: int) -> list[dict]:
        """chat=True: row i's messages so far (each reply as an assistant message with its text)."""
        return list(self._messages[i])

    def generate(self, segments, *, timings: dict | None = None, **request):
        """One turn: the first call's prompts, or one appended segment per row (see the class).
        Returns a Completion per row (None for rows that sat out). timings: a dict that receives
        prefill_s and decode_s of this turn (device-synchronized) and the compile-inclusive wall_s."""
        import time

        request = kn.host_values(request)
        for k in request:
            if k in FIXED:
                raise ValueError(f"{k} is fixed for the whole conversation: pass it to Conversation(...)")
            if k == "num_beams":
                raise ValueError("a Conversation does not run beam search (num_beams)")
            if k not in TURN_KNOBS:
                raise ValueError(f"Conversation.generate() got an unknown option {k!r}")
        if not self.penalties and any(not kn.is_off(k, request.get(k)) for k in PENALTIES):
            raise ValueError("repetition / presence / frequency penalties need Conversation(..., penalties=True): the "
                             "penalty history of the whole conversation is carried from the first turn")
        first = not self._hist
        if not first and self._ep is None:
            raise ValueError("this conversation's cache was given to a turn that failed; start a new Conversation")
        if not first and request.get("prefix") is not None:
            raise ValueError("prefix= applies to the first turn only (later turns append to each row's history)")
        include_stop = kn.check("include_stop", request.pop("include_stop", False))
        top_logprobs = request.pop("top_logprobs", 0)
        candidates = request.pop("candidates", smp.DEFAULT_CANDIDATES)
        if request.get("seed") is None:
            request["seed"] = self.turn
        t0 = time.perf_counter()
        model, S = self.model, self.max_len
        run = self._first if first else self._next
        took, prompts, ids, args, p, stop, results, commit = run(segments, request, top_logprobs, candidates)
        model = self.model  # (the first turn puts the LoRA table on it)
        commit()  # every check passed: the refused rows end, the chat messages join the record
        if not took.any():  # every row that asked overflowed: nothing to run
            self.turn += 1
            return results
        fed_tokens = int(np.sum(args["prompt_lengths"]))
        mnt = np.asarray(args["max_new_tokens"])
        statics = dict(cfg=model.cfg, max_new=p.max_new, top_logprobs=top_logprobs, candidates=candidates,
                       mesh=model.mesh, prefill_chunk=model.prefill_chunk, paths=model.paths)
        args = place(model, args)
        if first:
            state = start_jit(model.params, **args, **statics, cache_len=S, kv_quant=model.kv_quant,
                              penalties=self.penalties, n=self.n)
        else:
            args["segments"], args["segment_lengths"] = args.pop("prompts"), args.pop("prompt_lengths")
            ep = self._ep
            self._ep = None  # donated to the turn: a failure below leaves no half-used cache to continue
            state = feed_jit(model.params, ep, **args, **statics)
        if timings is not None:
            jax.block_until_ready(state)
            t1 = time.perf_counter()
        loop = {k: args[k] for k in ("sp", "max_new_tokens", "stop_ids", "seeds")}
        state = finish_jit(model.params, state, **loop, cfg=model.cfg, max_new=p.max_new, candidates=candidates,
                           mesh=model.mesh, paths=model.paths)
        out = fetch(output(state))
        if timings is not None:
            t2 = time.perf_counter()
            timings.update(prefill_s=t1 - t0, decode_s=t2 - t1, wall_s=t2 - t0,
                           fed_tokens=fed_tokens)
        R = len(self._hist)
        done = to_completions(model, prompts, out, R, self.n if first else 1, stop, include_stop)
        pending = np.zeros(self._rows, bool)
        pending[:R] = self._pending
        for i, c in enumerate(done):
            if not took[i]:
                continue
            h = self._hist[i]
            h.tokens += ids[i]
            h.generated += [False] * len(ids[i])
            h.logprobs += [0.0] * len(ids[i])
            h.tokens += c.tokens
            h.generated += [True] * len(c.tokens)
            h.logprobs += c.logprobs
            pending[i] = len(c.tokens) > 0
            if c.finish_reason == "error":
                self._ended[i] = "its logits became NaN or infinite"
            elif len(h.tokens) >= S:
                self._ended[i] = f"its history reached max_len={S} tokens"
                if c.finish_reason == "length" and len(c.tokens) < int(mnt[i]):
                    c.message = f"the reply was cut at max_len={S} tokens of history; the row takes no further turn"
            if self.chat:
                self._messages[i].append({"role": "assistant", "content": c.text})
                self._reply_end[i] = (model.tokenizer.decode([c.stop_reason]) if c.finish_reason == "stop"
                                      and isinstance(c.stop_reason, int) else "")
            results[i] = c
        self._pending = pending[:R]
        self._ep = Episode(cache=state.cache, last=state.last, seen=state.seen,
                           pending=place(model, {"p": pending})["p"])
        self.turn += 1
        return results

    def _first(self, prompts, request, top_logprobs, candidates):
        """The first turn's arguments: prompts (or chat conversations) and the rows' histories."""

        model, S, n = self.model, self.max_len, self.n
        convs = None
        if self.chat:
            convs = self._conversations(prompts)
            prompts = [model.tokenizer.apply_chat_template(m, tools=self.tools) for m in convs]
        prefix = request.pop("prefix", None)
        pre_ids = []
        if isinstance(prefix, SharedPrefix):
            pre_ids = list(prefix.ids)
        elif prefix is not None:
            if isinstance(prefix, str):
                kn.check("prefix", prefix)
            prefix = pre_ids = _encode(model, prefix, "prefix")
        if pre_ids and prefix_slots(model.cfg, len(pre_ids)) > S:
            raise ValueError(f"the prefix of {len(pre_ids)} tokens takes {prefix_slots(model.cfg, len(pre_ids))} "
                             f"cache slots (its bucket), more than max_len={S}")
        ids = _encode_prompts(model, prompts, add_bos=False if prefix is not None else None)
        for i, x in enumerate(ids):
            if len(pre_ids) + len(x) >= S:
                what = f"the prefix's {len(pre_ids)} + " if pre_ids else ""
                raise ValueError(f"prompt {i}: {what}{len(x)} tokens leave no room for a reply within max_len={S}")
        model = self.model = lora_mod.attach(model, self.lora, len(ids))  # the table every turn runs with
        _, args, p = prepare(model, ids, n=n, prefix=prefix, top_logprobs=top_logprobs, candidates=candidates,
                             lora=self.lora, **request)
        R = len(ids) * n

        def commit():
            self._rows = p.batch * n
            self._hist = [History(tokens=pre_ids + ids[i // n], generated=[False] * (len(pre_ids) + len(ids[i // n])),
                                  logprobs=[0.0] * (len(pre_ids) + len(ids[i // n]))) for i in range(R)]
            self._pending = np.zeros(R, bool)
            self._ended = [None] * R
            self._messages = [list(convs[i // n]) for i in range(R)] if convs else [[] for _ in range(R)]
            self._reply_end = [""] * R

        return (np.ones(R, bool), prompts, [[] for _ in range(R)], args, p, stop_rows(request.get("stop"), len(ids), n),
                [None] * R, commit)

    def _next(self, segments, request, top_logprobs, candidates):
        """A later turn's arguments: one segment per row (None = sits out)."""

        model, S, R = self.model, self.max_len, self.rows
        if not isinstance(segments, (list, tuple)):
            raise ValueError("segments must be a list with one entry per row (None: the row sits this turn out)")
        if not segments:
            raise ValueError("no segments given")
        if len(segments) != R:
            raise ValueError(f"got {len(segments)} segments for the conversation's {R} rows (one per row: "
                             "None for a row that sits this turn out)")
        if all(s is None for s in segments):
            raise ValueError("every segment is None: no row takes this turn")
        results, ids, took, refused, said = [None] * R, [[] for _ in range(R)], np.zeros(R, bool), {}, {}
        for i, seg in enumerate(segments):
            if seg is None:
                continue
            if self._ended[i]:
                raise ValueError(f"row {i} has ended ({self._ended[i]}): pass None for it")
            if self.chat:
                said[i] = self._conversations([seg], what=f"segment {i}")[0]
                text = self._chat_tail(i, said[i])
                x = model.tokenizer.encode(text, add_bos=False) if text else []
                if not x:
                    raise ValueError(f"segment {i}: the chat template adds nothing after the reply for these messages")
            else:
                x = _encode(model, seg, f"segment {i}", add_bos=False)
            total = len(self._hist[i].tokens) + len(x)
            if total >= S:  # no slot would be left for a reply
                refused[i] = (f"appending {len(x)} tokens would take the row's history to {total} of max_len={S} "
                              "tokens, leaving no room for a reply; nothing was appended")
                continue
            ids[i], took[i] = x, True
        if not took.any():
            args = p = None
        else:
            _, args, p = prepare(model, [x if took[i] else [0] for i, x in enumerate(ids)], n=1, batch=self._rows,
                                     top_logprobs=top_logprobs, candidates=candidates, **request)
            args["prompt_lengths"][:R] = np.where(took, args["prompt_lengths"][:R], 0)
        stop = stop_rows(request.get("stop"), R, 1)

        def commit():
            for i, why in refused.items():
                self._ended[i] = why
                results[i] = Completion(tokens=[], finish_reason="length", logprobs=[],
                                            text="" if model.tokenizer is not None else None, prompt=segments[i],
                                            message=why + "; the row takes no further turn")
            for i in np.flatnonzero(took):
                self._messages[i] += said.get(i, [])

        return took, list(segments), ids, args, p, stop, results, commit

    def _conversations(self, items, what="prompt"):
        """chat=True: each item as a list of message dicts (one dict is one message)."""
        out = []
        for j, m in enumerate(items):
            m = [m] if isinstance(m, dict) else m
            if not isinstance(m, (list, tuple)) or not m or not all(isinstance(x, dict) and "role" in x for x in m):
                label = what if what != "prompt" else f"prompt {j}"
                raise ValueError(f"{label}: with chat=True each entry is a message dict or a list of them "
                                 f"(with a 'role'), got {m!r:.80}")
            out.append(list(m))
        return out

    def _chat_tail(self, i: int, new: list[dict]) -> str:
        """The text the chat template puts after row i's last reply when `new` messages follow it.
        The reply itself is in the cache as the model's own tokens (for RL, the sampled tokens are
        the ones trained on, not a re-encoding of their text), so only the template's text after it
        is fed: the template renders the conversation with a placeholder for the reply's content,
        and what follows the placeholder is the tail (less the end-of-turn text, when the reply
        ended on the stop id that produces it)."""
        msgs = self._messages[i]
        probe = msgs[:-1] + [{**msgs[-1], "content": REPLY}] + new
        text = self.model.tokenizer.apply_chat_template(probe, tools=self.tools, add_generation_prompt=True)
        at = text.find(REPLY)
        if at < 0:
            raise ValueError("this chat template does not render an assistant reply's content as given, so chat=True "
                             "cannot tell what follows a reply; append token ids or text instead")
        tail = text[at + len(REPLY):]
        end = self._reply_end[i]
        return tail[len(end):] if end and tail.startswith(end) else tail
