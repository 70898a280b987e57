"""The mixture-of-experts MLP (Qwen3-MoE, Mixtral): a router picks each token's top-k experts, whose
gated MLP outputs are summed with the router's weights.

    probs = softmax(h @ router)            # [N, E], float32 (the reference implementations' choice)
    w, e = top_k(probs, k)                 # [N, k]; w / sum(w) when cfg.norm_topk_prob (Mixtral: always)
    out = sum_j w[:, j] * down_e(act(gate_e(h)) * up_e(h)) for e = e[:, j]

Expert weights may be int8 / int4 (`jaxgen.quant` QMatrix leaves over [E, I, O]): each computation
dequantizes what it reads (gathered: the pairs' experts; picked and looped: one expert at a time; grouped and
dense: all of them, so int8 saves memory there but not bandwidth). Only the chosen experts are
computed, in ways that give the same sums:
- `grouped`: the N * k (token, expert) pairs sorted by expert and run through `jax.lax.ragged_dot`
  (a grouped matmul: MaxText's and Tunix's MoE kernel), every expert's weights read once. Prefill
  and large batches.
- `gathered`: each pair's expert weights gathered and applied as batched matmuls: reads N * k expert
  matrices instead of E, fewer bytes when N * k < E (decode at small batch).
- `picked` (CPU, in place of gathered): a loop over the pairs, one expert indexed at a time.
- `looped` (CPU, in place of grouped): a loop over the experts and chunks of their sorted pairs.
`dense` (every expert for every token, weighted by a [N, E] matrix of the chosen weights) is the tests'
reference only. Axis legend as in jaxgen/model.py; E experts, k per token, Fe expert FFN width, N tokens.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxgen import backend, quant
from jaxgen.config import ModelConfig


def route(cfg: ModelConfig, h: jax.Array, router: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(weights [N, k] f32, experts [N, k] int32) of tokens h [N, D] under router [D, E]. Ties go
    to the lower expert index (lax.top_k's rule)."""
    logits = jnp.dot(h.astype(jnp.float32), router.astype(jnp.float32))  # [N, E]
    probs = jax.nn.softmax(logits, axis=-1)
    w, e = jax.lax.top_k(probs, cfg.n_experts_per_tok)
    if cfg.norm_topk_prob:
        w = w / jnp.sum(w, axis=-1, keepdims=True)
    return w, e.astype(jnp.int32)


def _float(w, dtype) -> jax.Array:
    """Expert weights as `dtype`: int8 / int4 experts (a QMatrix over [.., E, I, O]) dequantized."""
    return quant.dequantize(w, dtype) if isinstance(w, quant.QMatrix) else w.astype(dtype)


def _experts(w, idx):
    """The experts idx of w [E, I, O] (a float array or a QMatrix: its integers and scales alike)."""
    return jax.tree.map(lambda a: a[idx], w) if isinstance(w, quant.QMatrix) else w[idx]


def _expert(j, *ws, upcast: bool = False):
    """Expert j (a traced scalar) of each of ws [E, ...] (float arrays or QMatrix), for the loops of
    `picked` and `looped`: w[j], except half-precision experts traced for XLA:CPU with its bfloat16 float
    normalization on (a user's own jax.jit on CPU; jaxgen's programs compile without it:
    backend.cpu_bf16_normalized), which come from a lax.switch over the E static slices (as float32
    with `upcast`). Why: there XLA:CPU converts the *whole* stacked array to float32 before a bfloat16
    dynamic slice, and that conversion, loop-invariant, is hoisted out of the decode loop: a float32 copy
    of every expert per call (twice the bf16 experts' memory). A static slice in a branch is converted
    alone. Measured (`python -m benchmarks.moe --layer`: one layer of Qwen3-30B-A3B shapes, one token's 8
    of 128 experts, bf16, picked): 11.1 ms with the switch in a plain jit (compiled in 3.6 s: E branches
    per layer), 10.4 ms with w[j] in jaxgen's programs (compiled in 0.2 s); w[j] in a plain jit took
    555 ms. `upcast` is for one-row products (picked): XLA:CPU's normalized bfloat16 matrix-vector path
    is slow, its matrix-matrix one (looped's chunks) is not."""
    if not backend.cpu_bf16_normalized() or any(isinstance(w, quant.QMatrix) or w.dtype.itemsize != 2 for w in ws):
        return tuple(_experts(w, j) for w in ws)
    take = lambda i: tuple(w[i].astype(jnp.float32) if upcast else w[i] for w in ws)
    return jax.lax.switch(j, [lambda i=i: take(i) for i in range(ws[0].shape[0])])


def _mm(a, b) -> jax.Array:
    """a @ b, f32 accumulation: b dequantized to a's dtype, or a taken to float32 for a float32 b
    (what `_expert` gives from half-precision experts on CPU)."""
    a = a.astype(jnp.float32) if not isinstance(b, quant.QMatrix) and b.dtype == jnp.float32 else a
    return jnp.dot(a, _float(b, a.dtype), preferred_element_type=jnp.float32)


def activation(cfg: ModelConfig, x: jax.Array) -> jax.Array:
    """The MLP's gate activation (GeGLU's tanh GELU or SwiGLU's SiLU), for the experts here and the dense MLP
    of jaxgen.model (which imports this module: defined once, below both)."""
    return jax.nn.gelu(x, approximate=True) if cfg.activation == "gelu_tanh" else jax.nn.silu(x)


def dense(cfg: ModelConfig, h, w, e, we_gate, we_up, we_down) -> jax.Array:
    """Every expert on every token, the unchosen weighted 0: the reference [N, D] (f32)."""
    f32 = lambda a: _float(a, jnp.float32)
    g = jnp.einsum("nd,edf->nef", f32(h), f32(we_gate))
    u = jnp.einsum("nd,edf->nef", f32(h), f32(we_up))
    y = jnp.einsum("nef,efd->ned", activation(cfg, g) * u, f32(we_down))  # [N, E, D]
    comb = jnp.zeros(y.shape[:2], jnp.float32).at[jnp.arange(h.shape[0])[:, None], e].add(w)  # [N, E]
    return jnp.einsum("ne,ned->nd", comb, y)


def gathered(cfg: ModelConfig, h, w, e, we_gate, we_up, we_down) -> jax.Array:
    """The chosen experts' weights gathered per (token, expert) pair: [N, D] (f32)."""
    mm = lambda eq, a, b: jnp.einsum(eq, a, _float(b, a.dtype), preferred_element_type=jnp.float32)
    g = mm("nd,nkdf->nkf", h, _experts(we_gate, e))  # [N, k, Fe]
    u = mm("nd,nkdf->nkf", h, _experts(we_up, e))
    y = mm("nkf,nkfd->nkd", (activation(cfg, g) * u).astype(h.dtype), _experts(we_down, e))  # [N, k, D]
    return jnp.einsum("nk,nkd->nd", w, y)


def picked(cfg: ModelConfig, h, w, e, we_gate, we_up, we_down) -> jax.Array:
    """Each (token, expert) pair in turn, the expert's matrices indexed in the stacked arrays (a
    fori_loop over the N * k pairs): [N, D] (f32). Why (CPU, few tokens): XLA:CPU's gather in
    `gathered` is slow to copy out every pair's experts (measured, `python -m benchmarks.moe --layer`:
    one token's 8 of 128 Qwen3-30B-A3B experts, one layer: 53 ms gathered, 12 ms here). XLA:CPU still
    copies each indexed expert (a dynamic slice; bfloat16 experts: see `_expert`) before its matmul:
    separate per-expert arrays would be read in place (7 ms) but need a second params layout."""
    N, k = e.shape
    pe, pw = e.reshape(-1), w.reshape(-1)

    def pair(p, y):
        x = jax.lax.dynamic_slice_in_dim(h, p // k, 1)  # [1, D]
        wg, wu, wd = _expert(pe[p], we_gate, we_up, we_down, upcast=True)
        a = (activation(cfg, _mm(x, wg)) * _mm(x, wu)).astype(h.dtype)
        return y.at[p // k].add(pw[p] * _mm(a, wd)[0])

    return jax.lax.fori_loop(0, N * k, pair, jnp.zeros((N, h.shape[1]), jnp.float32))


def grouped(cfg: ModelConfig, h, w, e, we_gate, we_up, we_down) -> jax.Array:
    """The (token, expert) pairs sorted by expert, each expert's group one matmul (ragged_dot): [N, D] (f32)."""
    order, xs, sizes = _sorted_pairs(h, e, we_gate.shape[0])
    rd = lambda a, b: jax.lax.ragged_dot(a, _float(b, a.dtype), sizes, preferred_element_type=jnp.float32)
    g, u = rd(xs, we_gate), rd(xs, we_up)  # [N * k, Fe]
    return _combine(rd((activation(cfg, g) * u).astype(h.dtype), we_down), order, w)


def _sorted_pairs(h, e, E: int):
    """The N * k (token, expert) pairs sorted by expert: (order [N * k], their tokens xs [N * k, D],
    pairs per expert [E], 0 for unpicked ones). Pair p is token p // k's (p % k)-th expert."""
    flat = e.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    return order, h[order // e.shape[1]], jnp.bincount(flat, length=E).astype(jnp.int32)


def _combine(y, order, w):
    """Per-pair outputs y [N * k, D] in sorted order -> each token's weighted sum [N, D]."""
    N, k = w.shape
    y = jnp.zeros_like(y).at[order].set(y).reshape(N, k, -1)  # back to (token, j) order
    return jnp.einsum("nk,nkd->nd", w, y)


def looped(cfg: ModelConfig, h, w, e, we_gate, we_up, we_down) -> jax.Array:
    """The pairs sorted by expert as in `grouped`, then a loop over the experts and, within one, over
    chunks of its pairs: [chunk, D] @ that expert's matrices. Every chosen expert is read once and
    each pair computed once (a chunk's rows past the expert's group are masked to zero). Why: XLA:CPU
    lowers ragged_dot as every group over every row (measured, 2-layer Qwen3-MoE shapes at batch 32:
    3.7 tokens/s, the flops of all 128 experts on all 256 pairs); this loop does the pairs' own work."""
    E, D, P = we_gate.shape[0], h.shape[1], e.size
    chunk = int(min(max(8, 1 << max(P // E - 1, 0).bit_length()), 256))  # ~ the mean group, a power of two
    order, xs, sizes = _sorted_pairs(h, e, E)
    xs = jnp.pad(xs, ((0, chunk), (0, 0)))  # [P + chunk, D]: a chunk never runs past the end
    starts = jnp.cumsum(sizes) - sizes

    def expert(j, y):
        def step(c, y):  # (the expert's weights are taken in here: an unpicked expert's are never read)
            at = starts[j] + c * chunk
            x = jax.lax.dynamic_slice_in_dim(xs, at, chunk)  # [chunk, D]
            wg, wu, wd = _expert(j, we_gate, we_up, we_down)
            a = (activation(cfg, _mm(x, wg)) * _mm(x, wu)).astype(h.dtype)
            out = jnp.where((jnp.arange(chunk) < sizes[j] - c * chunk)[:, None], _mm(a, wd), 0.0)
            return jax.lax.dynamic_update_slice_in_dim(y, jax.lax.dynamic_slice_in_dim(y, at, chunk) + out, at, 0)
        return jax.lax.fori_loop(0, (sizes[j] + chunk - 1) // chunk, step, y)

    return _combine(jax.lax.fori_loop(0, E, expert, jnp.zeros((P + chunk, D), jnp.float32))[:P], order, w)


IMPLS = {"dense": dense, "gathered": gathered, "picked": picked, "grouped": grouped, "looped": looped}


def choose(cfg: ModelConfig, n_tokens: int) -> str:
    """The implementation for a call of n_tokens tokens (static): when the pairs read fewer expert
    matrices than there are experts (decode at small batch), picked on CPU (see `picked`) and gathered
    elsewhere; else looped on CPU (see `looped`) and grouped (ragged_dot) on accelerators, whose
    kernels group the rows."""
    cpu = jax.default_backend() == "cpu"
    if n_tokens * cfg.n_experts_per_tok < cfg.n_experts:
        return "picked" if cpu else "gathered"
    return "looped" if cpu else "grouped"


def mlp(cfg: ModelConfig, h: jax.Array, lp, impl: str | None = None) -> jax.Array:
    """The MoE MLP of h [B, T, D] with a layer's router [D, E], we_gate / we_up [E, D, Fe] and
    we_down [E, Fe, D] -> [B, T, D] in h's dtype. impl: "grouped" / "gathered" / "dense" (None: `choose`)."""
    B, T, D = h.shape
    x = h.reshape(B * T, D)
    w, e = route(cfg, x, lp.router)
    out = IMPLS[impl or choose(cfg, B * T)](cfg, x, w, e, lp.we_gate, lp.we_up, lp.we_down)
    return out.reshape(B, T, D).astype(h.dtype)
