"""Sampling: pure, per-row logits transforms and a PRNG-keyed `sample`.

Every knob is a traced per-row array, so one batch can mix greedy and sampled rows and changing a knob
never recompiles. The transforms apply in this order (HF transformers' order for the shared ones):

 1. repetition penalty (HF / CTRL): for every token seen in the prompt or output so far,
    logit / r if logit > 0 else logit * r;
 2. presence and frequency penalties (OpenAI / vLLM), over generated tokens only:
    logit - presence * [count > 0] - frequency * count;
 3. logit bias and banned ids (a ban is a bias of -inf, so nothing later can revive it);
 4. temperature: rows with temperature 0 take the argmax here (greedy) and skip the rest;
 5. top-k: keep logits >= the k-th largest (ties with it are kept, as HF does);
 6. top-p (nucleus), on the distribution renormalized after top-k: keep the smallest set of most
    likely tokens whose mass reaches top_p (a token is kept iff the mass strictly above it is < top_p;
    ties with the last kept token are kept);
 7. min-p, relative to the most likely token: keep p >= min_p * p_max.

Top-k and top-p do not sort the vocabulary: a bounded candidate set (`candidates`, static, 256 by
default) is found two-level (the blocks of 64 ids with the largest maxima, then `lax.top_k` inside
them); top_k must be <= candidates. When a row's kept set lies inside its candidates, the draw is
among them; a row whose nucleus is larger than the candidate set (a flat distribution with top-k off)
falls back to a bisection on the logit threshold over the full vocabulary (30 halvings, then snapped
to the nearest real logit), run only when some row needs it. On CPU every pass that writes a new
[B, V] array costs ~15 ms at batch 32 and V = 262k, so stages run only where some row needs them.

Those gates (`_gate`) are `lax.cond`s, or with gates="where" (jaxgen.backend's choice on GPU, where a
conditional's predicate is read on the host) both branches and a select, for every stage whose work is
at most WHERE_ELEMS elements of [B, V] passes (the rest stay conds): the same tokens either way.

The draw itself is an inverse-CDF lookup with one uniform per row, keyed by fold_in(key(seed_row), step)
where generate's step is the row's count of tokens so far: a row's token depends only on its own logits,
seed and step, never on the rest of the batch or on when the row joined it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxgen import knobs as kn
from jaxgen.knobs import DEFAULT_CANDIDATES, SLOT_BUCKETS  # noqa: F401  (a request's limits live in jaxgen.knobs)


@struct.dataclass
class SamplingParams:  # every field is per row
    temperature: jax.Array  # [B] f32; 0 = greedy
    top_k: jax.Array  # [B] int32; 0 = off
    top_p: jax.Array  # [B] f32 in (0, 1]; 1 = off
    min_p: jax.Array  # [B] f32 in [0, 1]; 0 = off
    repetition_penalty: jax.Array  # [B] f32 > 0; 1 = off
    presence_penalty: jax.Array  # [B] f32; 0 = off
    frequency_penalty: jax.Array  # [B] f32; 0 = off
    bias_ids: jax.Array  # [B, NB] int32 token ids to bias; -1 = unused slot
    bias_values: jax.Array  # [B, NB] f32 added to those logits; -inf bans the token


def make_sampling_params(batch: int, *, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0,
                         repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
                         logit_bias=None, banned_ids=None, vocab_size: int | None = None,
                         candidates: int = DEFAULT_CANDIDATES, bias_slots: int | None = None
                         ) -> SamplingParams:
    """Validated host-side (numpy) SamplingParams; scalars broadcast to every row. The defaults are
    greedy decoding with every transform off, as in `generate`.

    logit_bias: {token_id: bias} for all rows, or a list of such dicts (one per row).
    banned_ids: ids banned for all rows, or a list of lists (one per row).
    Raises ValueError naming the bad knob before anything is compiled.
    """
    f32, i32 = np.float32, np.int32
    (temperature, top_k, top_p, min_p, repetition_penalty, presence_penalty, frequency_penalty, logit_bias,
     banned_ids) = map(kn.host_value, (temperature, top_k, top_p, min_p, repetition_penalty, presence_penalty,
                                       frequency_penalty, logit_bias, banned_ids))  # (NumPy / JAX values too)
    row = lambda name, value, dtype: kn.per_row(name, value, batch, dtype, candidates=candidates)
    t, k, p, mp, rp = (row(name, value, dtype) for name, value, dtype in (
        ("temperature", temperature, f32), ("top_k", top_k, i32), ("top_p", top_p, f32), ("min_p", min_p, f32),
        ("repetition_penalty", repetition_penalty, f32)))

    rows = [dict() for _ in range(batch)]
    for name, spec, as_dict in (("logit_bias", logit_bias, True), ("banned_ids", banned_ids, False)):
        if spec is None:
            continue
        per_row = isinstance(spec, (list, tuple)) and len(spec) > 0 and isinstance(spec[0], (dict, list, tuple))
        if per_row and len(spec) != batch:
            raise ValueError(f"{name} has {len(spec)} entries but there are {batch} prompts")
        for r in range(batch):
            entry = spec[r] if per_row else spec
            kn.check(name, entry if as_dict or not isinstance(entry, (list, tuple)) else list(entry),
                     vocab_size=vocab_size)
            items = entry.items() if as_dict else ((i, -np.inf) for i in entry)
            for tok, val in items:
                tok = int(tok)
                rows[r][tok] = -np.inf if val == -np.inf else rows[r].get(tok, 0.0) + float(val)
    most = max((len(r) for r in rows), default=0)
    nb = bias_slots or next((b for b in SLOT_BUCKETS if most <= b), None)  # a bucket: few compilations
    if nb is None or most > nb:
        raise ValueError(f"at most {nb or SLOT_BUCKETS[-1]} biased/banned ids per row, got {most}")
    bias_ids = np.full((batch, nb), -1, i32)
    bias_values = np.zeros((batch, nb), f32)
    for r, d in enumerate(rows):
        bias_ids[r, :len(d)] = list(d.keys())
        bias_values[r, :len(d)] = list(d.values())
    return SamplingParams(
        temperature=t, top_k=k, top_p=p, min_p=mp, repetition_penalty=rp,
        presence_penalty=row("presence_penalty", presence_penalty, f32),
        frequency_penalty=row("frequency_penalty", frequency_penalty, f32),
        bias_ids=bias_ids, bias_values=bias_values)


def uses_penalties(sp: SamplingParams) -> bool:
    """Host-side: whether any row of these (numpy) params uses a repetition / presence / frequency
    penalty, i.e. whether the decode state must carry the [B, V] token history they read."""
    return bool(np.any(np.asarray(sp.repetition_penalty) != 1.0) | np.any(np.asarray(sp.presence_penalty) != 0.0)
                | np.any(np.asarray(sp.frequency_penalty) != 0.0))


# ---- transforms (pure, [B, V] f32 -> [B, V] f32) --------------------------------------------------
def apply_penalties(logits, seen, counts, sp: SamplingParams):
    """seen [B, V] bool (prompt or output so far); counts [B, V] int32 (generated tokens only)."""
    r = sp.repetition_penalty[:, None]
    penalized = jnp.where(logits > 0, logits / r, logits * r)
    logits = jnp.where(seen, penalized, logits)
    c = counts.astype(jnp.float32)
    return logits - sp.presence_penalty[:, None] * (c > 0) - sp.frequency_penalty[:, None] * c


def apply_bias(logits, sp: SamplingParams):
    rows = jnp.arange(logits.shape[0])[:, None]
    ids = jnp.where(sp.bias_ids >= 0, sp.bias_ids, logits.shape[1])  # unused slots -> dropped
    return logits.at[rows, ids].add(sp.bias_values, mode="drop")


def apply_temperature(logits, sp: SamplingParams):
    t = jnp.where(sp.temperature > 0, sp.temperature, 1.0)
    return logits / t[:, None]


def _nucleus_bisect(logits, lse, top_p, hi, iters: int = 30):
    """Largest logit threshold tau with mass(logits >= tau) >= top_p, over the full vocabulary."""
    lo = jnp.min(jnp.where(jnp.isfinite(logits), logits, jnp.inf), axis=-1)

    def mass(tau):
        return jnp.sum(jnp.where(logits >= tau[:, None], jnp.exp(logits - lse[:, None]), 0.0), -1)

    def step(_, lohi):
        lo, hi = lohi
        mid = 0.5 * (lo + hi)
        ok = mass(mid) >= top_p
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo, _ = jax.lax.fori_loop(0, iters, step, (lo, hi))
    # Snap to the smallest real logit >= lo, so the kept set is exactly {logit >= that value}.
    return jnp.min(jnp.where(logits >= lo[:, None], logits, jnp.inf), axis=-1)


def argmax(logits: jax.Array, block: int = 64) -> jax.Array:
    """[B] int32 index of the first maximum of logits [B, V], as jnp.argmax. Two-level for a large
    vocabulary: the first block holding the maximum, then the first index in it. XLA:CPU's argmax
    (one variadic reduce over 262k ids) took 19 ms at batch 32; a block max and two small argmaxes ~2."""
    B, V = logits.shape
    nb = V // block
    if nb < 8 or V % block:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    x = logits.reshape(B, nb, block)
    b = jnp.argmax(jnp.max(x, axis=-1), axis=-1)  # [B] first block holding the maximum
    inner = jnp.take_along_axis(x, b[:, None, None], axis=1)[:, 0]  # [B, block]
    return (b * block + jnp.argmax(inner, axis=-1)).astype(jnp.int32)


def top_candidates(logits: jax.Array, C: int, block: int = 64):
    """lax.top_k(logits, C) of [B, V] (values descending, ties to the lower id), computed in two levels
    for a large vocabulary: the C blocks of `block` ids with the largest maxima hold the C largest
    values (a block left out has its maximum <= the C-th largest block maximum, and the C chosen blocks
    hold C values >= that), so lax.top_k runs over C * block ids instead of V (Gemma's 262k vocabulary
    at batch 32: 17 ms -> ~3 ms). Ties go to the lower id as in lax.top_k: the chosen blocks are
    read in vocabulary order, and every tied value lax.top_k keeps is inside them (a block left out
    that holds one has the C-th block maximum, and the chosen blocks with that maximum, one tied value
    each and at least as many as lax.top_k keeps, have lower ids: lax.top_k over the maxima keeps the
    lower). Equal, not just the same multiset, so that a mesh may run it on each device's slice of
    the vocabulary and merge (sharding.top_k, local=top_candidates) and still draw what one device does."""
    B, V = logits.shape
    nb = V // block
    if nb < 4 * C or V % block:  # (every vocabulary jaxgen ships is a multiple of 64)
        return jax.lax.top_k(logits, C)
    x = logits.reshape(B, nb, block)
    _, bi = jax.lax.top_k(jnp.max(x, axis=-1), C)  # [B, C] chosen blocks
    bi = jnp.sort(bi, axis=1)  # in vocabulary order
    sel = jnp.take_along_axis(x, bi[:, :, None], axis=1).reshape(B, C * block)
    # values gathered by index: a top_k whose indices go unused was rewritten by XLA into a full sort
    _, j = jax.lax.top_k(sel, C)
    vals = jnp.take_along_axis(sel, j, axis=1)
    ids = jnp.take_along_axis(bi, j // block, axis=1) * block + j % block
    return vals, ids.astype(jnp.int32)


# A gate's work, as [B, V] passes, above which gates="where" keeps the conditional: 8M elements
# (32 MB of f32, ~7 us at an H200's 4.8 TB/s) against a host round trip of ~10 us (expected; the
# accelerator benchmark's `paths` rows measure "cond" against "where").
WHERE_ELEMS = 1 << 23


def _gate(pred, on, off, operands=(), *, gates: str = "cond", passes: int = 1, size: int = 0):
    """on(*operands) if pred else off(*operands): a `lax.cond` (one branch runs), or with gates="where"
    both branches and a select when passes * size (the work of `on` in elements) <= WHERE_ELEMS."""
    if gates == "where" and passes * size <= WHERE_ELEMS:
        return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on(*operands), off(*operands))
    return jax.lax.cond(pred, on, off, *operands)


def keep_threshold(logits, sp: SamplingParams, candidates: int = DEFAULT_CANDIDATES, cand=None,
                   gates: str = "cond"):
    """[B] logit threshold from top-k, top-p and min-p (keep logits >= it) on temperature-scaled logits.
    `cand`: the C largest logits, descending, if the caller has them; `logits` may then be a function
    returning them, called only on the rare paths that need the whole vocabulary."""
    full = logits if callable(logits) else (lambda: logits)
    size = (jax.eval_shape(full) if callable(logits) else logits).size  # B * V: a gate's work per pass
    if cand is None:
        cand, _ = top_candidates(full(), min(candidates, full().shape[1]))  # [B, C] sorted descending
    B, C = cand.shape
    neg = jnp.full((B,), -jnp.inf)
    k = sp.top_k
    kth = jnp.take_along_axis(cand, jnp.clip(k - 1, 0, C - 1)[:, None], axis=1)[:, 0]
    thr_k = jnp.where(k > 0, kth, neg)

    # top-p on the distribution renormalized after top-k. Its normalizer: over the candidates when
    # everything >= thr_k is among them (top-k on and the k-th value above the last candidate's),
    # else over the vocabulary (only computed when some row needs it).
    in_cand = (k > 0) & (thr_k > cand[:, -1])
    masked = lambda: jnp.where(full() >= thr_k[:, None], full(), -jnp.inf)  # [B, V], built where needed
    lse_c = jax.nn.logsumexp(jnp.where(cand >= thr_k[:, None], cand, -jnp.inf), axis=-1)
    lse = _gate(jnp.all(in_cand | (sp.top_p >= 1.0)), lambda: lse_c,
                lambda: jnp.where(in_cand, lse_c, jax.nn.logsumexp(masked(), axis=-1)), gates=gates, passes=3,
                size=size)  # [B]
    cand = jnp.where(cand >= thr_k[:, None], cand, -jnp.inf)
    pc = jnp.exp(cand - lse[:, None])  # [B, C]
    before = jnp.cumsum(pc, axis=-1) - pc  # mass strictly above each candidate
    n_keep = jnp.sum(before < sp.top_p[:, None], axis=-1)  # >= 1
    thr_p = jnp.take_along_axis(cand, (n_keep - 1)[:, None], axis=1)[:, 0]
    resolved = (sp.top_p >= 1.0) | (n_keep < C) | (jnp.sum(pc, -1) >= sp.top_p)
    thr_p = _gate(jnp.all(resolved), lambda: thr_p,
                  lambda: jnp.where(resolved, thr_p, _nucleus_bisect(masked(), lse, sp.top_p, cand[:, -1])),
                  gates=gates, passes=32, size=size)
    thr_p = jnp.where(sp.top_p >= 1.0, neg, thr_p)

    thr_min = jnp.where(sp.min_p > 0, cand[:, 0] + jnp.log(jnp.maximum(sp.min_p, 1e-38)), neg)
    return jnp.maximum(jnp.maximum(thr_k, thr_p), thr_min)


def row_keys(seeds: jax.Array, step) -> jax.Array:
    """[B] typed keys: fold_in(key(seed_row), step_row), independent of the batch. `step` is a scalar
    or one value per row (generate passes each row's count of tokens so far, so a row's draws do not
    depend on when it joined a running batch)."""
    steps = jnp.broadcast_to(jnp.asarray(step, jnp.uint32), jnp.shape(seeds))
    return jax.vmap(lambda s, t: jax.random.fold_in(jax.random.key(s), t))(seeds, steps)


def categorical(keys, logits, block: int = 512):
    """One draw per row from softmax(logits) by inverse CDF; -inf logits are never drawn.

    Two-level, to avoid a cumulative sum over the whole vocabulary (slow on CPU at V = 262k): pick the
    block of `block` ids whose cumulative mass first exceeds u, then the id inside that block."""
    B, V = logits.shape
    nb = -(-V // block)
    m = jnp.max(logits, axis=-1, keepdims=True)
    p = jnp.exp(logits - m)  # [B, V]
    p = jnp.pad(p, ((0, 0), (0, nb * block - V))).reshape(B, nb, block)  # [B, nb, block]
    block_cdf = jnp.cumsum(jnp.sum(p, axis=-1), axis=-1)  # [B, nb]
    total = block_cdf[:, -1]
    u = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(keys) * total
    u = jnp.minimum(u, jnp.nextafter(total, 0.0))  # u < total
    b = jnp.minimum(jnp.sum(block_cdf <= u[:, None], axis=-1), nb - 1)  # [B] chosen block
    before = jnp.take_along_axis(block_cdf, b[:, None], axis=1)[:, 0] - jnp.take_along_axis(
        jnp.sum(p, axis=-1), b[:, None], axis=1)[:, 0]  # mass of the blocks before b
    inner = jnp.take_along_axis(p, b[:, None, None], axis=1)[:, 0]  # [B, block]
    cdf = before[:, None] + jnp.cumsum(inner, axis=-1)
    i = jnp.sum(cdf <= u[:, None], axis=-1)
    # Rounding may leave u at or past the block's last cumulative value: take its last nonzero id.
    last = block - 1 - jnp.argmax((inner > 0)[:, ::-1], axis=-1)
    i = jnp.where(i >= block, last, i)
    i = jnp.where(jnp.take_along_axis(inner, jnp.minimum(i, block - 1)[:, None], 1)[:, 0] > 0, i, last)
    return (b * block + i).astype(jnp.int32)


def _biased(logits, sp: SamplingParams, seen, counts, gates: str = "cond"):
    """Stages 1-3 (penalties, bias and bans) on f32 logits; the penalties run only when some row uses
    them (a traced `cond`, so no recompilation)."""
    logits = logits.astype(jnp.float32)
    size = logits.size
    if seen is not None:
        use = jnp.any((sp.repetition_penalty != 1.0) | (sp.presence_penalty != 0.0) | (sp.frequency_penalty != 0.0))
        logits = _gate(use, lambda x: apply_penalties(x, seen, counts, sp), lambda x: x, (logits,), gates=gates,
                       passes=4, size=size)
    # a [B, V] copy costs ~15 ms at batch 32 on CPU: only when some row has a bias or a ban
    return _gate(jnp.any(sp.bias_ids >= 0), lambda x: apply_bias(x, sp), lambda x: x, (logits,), gates=gates,
                 size=size)


def _filtered(logits, sp: SamplingParams, candidates: int, gates: str = "cond"):
    """Stages 4-7 for sampled rows: temperature-scaled logits, ids outside top-k / top-p / min-p at -inf."""
    scaled = apply_temperature(logits, sp)
    filtered = (sp.top_k > 0) | (sp.top_p < 1.0) | (sp.min_p > 0.0)
    thr = _gate(jnp.any(filtered), lambda x: keep_threshold(x, sp, candidates, gates=gates),
                lambda x: jnp.full(x.shape[:1], -jnp.inf), (scaled,), gates=gates, passes=3, size=logits.size)
    return jnp.where(scaled >= thr[:, None], scaled, -jnp.inf)


def _draw(keys, logits, sp: SamplingParams, candidates: int, gates: str = "cond", top=top_candidates):
    """Stages 4-7 and the draw for sampled rows. A row whose kept set lies inside its C candidates
    (threshold above the last candidate's value, so no id outside them can tie) draws among the
    candidates; other rows (no top-k / top-p / min-p, or a nucleus wider than C) draw over the
    vocabulary, a pass run only when some row needs it. The same distribution either way."""
    C = min(candidates, logits.shape[1])
    filtered = (sp.top_k > 0) | (sp.top_p < 1.0) | (sp.min_p > 0.0)
    # Temperature (> 0) keeps the order: scale the C candidates, not the vocabulary ([B, V] passes
    # that write a new array cost ~15 ms each at batch 32 on CPU).
    cand, ids = top(logits, C)  # [B, C]
    cand = apply_temperature(cand, sp)
    scaled = lambda: apply_temperature(logits, sp)  # [B, V], only on the paths that need it
    thr = jnp.where(filtered, keep_threshold(scaled, sp, candidates, cand=cand, gates=gates), -jnp.inf)  # [B]
    inside = filtered & (thr > cand[:, -1])
    tok_c = jnp.take_along_axis(ids, categorical(keys, jnp.where(cand >= thr[:, None], cand, -jnp.inf), block=C)[:, None], 1)[:, 0]
    full = lambda: categorical(keys, jnp.where(scaled() >= thr[:, None], scaled(), -jnp.inf))
    return jnp.where(inside, tok_c, _gate(jnp.all(inside), lambda: tok_c, full, gates=gates, passes=4,
                                          size=logits.size))


def distribution_logits(logits, sp: SamplingParams, seen=None, counts=None,
                        candidates: int = DEFAULT_CANDIDATES, gates: str = "cond") -> jax.Array:
    """[B, V] f32 logits whose softmax is exactly the distribution `sample` draws from: every transform
    applied, filtered ids at -inf, greedy rows one-hot (0 at the argmax, -inf elsewhere). Speculative
    decoding's accept test needs these probabilities, not just a draw."""
    logits = _biased(logits, sp, seen, counts, gates)
    greedy = argmax(logits)
    onehot = jnp.where(jnp.arange(logits.shape[1])[None, :] == greedy[:, None], 0.0, -jnp.inf)
    drawn = _gate(jnp.any(sp.temperature > 0), lambda x: _filtered(x, sp, candidates, gates), lambda x: onehot,
                  (logits,), gates=gates, passes=4, size=logits.size)
    return jnp.where((sp.temperature > 0)[:, None], drawn, onehot)


def sample(logits, keys, sp: SamplingParams, seen=None, counts=None,
           candidates: int = DEFAULT_CANDIDATES, gates: str = "cond", top=top_candidates) -> jax.Array:
    """Token ids [B] from raw logits [B, V] after every transform in the module docstring's order.

    keys: [B] typed PRNG keys (see `row_keys`). seen/counts feed the penalties (None = no history).
    gates (static): "cond" or "where" (see `_gate`; jaxgen.backend's choice). top: the candidates'
    search, lax.top_k or a function equal to it (`top_candidates`; sharding.top_k on a mesh).
    """
    # Each stage runs only when some row uses it (a traced `cond`, so no recompilation): a greedy
    # batch pays for one argmax, not for penalties, top-k candidates and a draw over 262k ids.
    logits = _biased(logits, sp, seen, counts, gates)
    greedy = argmax(logits)
    drawn = _gate(jnp.any(sp.temperature > 0), lambda x: _draw(keys, x, sp, candidates, gates, top),
                  lambda x: greedy, (logits,), gates=gates, passes=4, size=logits.size)
    return jnp.where(sp.temperature > 0, drawn, greedy)
