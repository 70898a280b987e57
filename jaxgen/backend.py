"""Which implementation each backend-sensitive step uses: one small, frozen, hashable `Paths` (a static
jit argument), chosen per backend and overridable, so that every accelerator path can be forced on CPU and
checked there against the reference path (tokens identical, log-probs within float rounding).

The choices, each with its reason (measured where a figure is given; "expected" where it awaits the
accelerator benchmark, `python -m benchmarks.accelerator`, whose `paths` rows time each one):

- decode_attention (global layers, one new token per row):
  "full"   every cache slot of the bucket, one einsum (the reference). The CPU default: on this
           project's 2-core CPU it was the fastest or tied (benchmarks/results/cpu-2026-12-05-
           accelerator.json, the paths rows: 107.5 tok/s against live's 106.5).
  "live"   key blocks (`decode_block` slots) up to the longest live row only (model.attend_blocked,
           an online softmax in a fori_loop whose trip count is data). Expected on TPU, whose loops
           run on the device.
  "pallas" jaxgen.kernels.decode_attention: one kernel per (row, kv head) that reads only that row's
           own length. Expected on GPU: XLA:GPU reads a while-loop's predicate on the host each
           iteration, which a per-layer data-dependent loop ("live") would pay at every layer.
           Layers the kernel does not take (kernels.decode_supported: int8 caches, head dims that
           are not a power of two, a jax without Pallas's Triton backend, which jax 0.11 deprecated)
           run "live".
- prefill_attention (multi-token calls whose keys fit one pass):
  "xla"    einsum, mask, softmax, einsum (the reference).
  "dpa"    jax.nn.dot_product_attention: cuDNN's fused flash attention on GPU for bf16 / f16
           without a softcap, XLA's own otherwise (TPU: XLA's fusion).
- gates: "cond" runs a sampling stage (penalties, bias, top-k / top-p, the full-vocabulary draw)
  only when some row needs it; "where" computes the stage always and selects. XLA:CPU and TPU run a
  conditional on the device; XLA:GPU copies its predicate to the host unless command buffers take it
  over, a host sync per gate per step (expected: "where" on GPU).
- dequant: the dtype a quantized (int8 / int4) matrix is dequantized to before its dot. float32 on
  CPU (XLA:CPU's bf16 dots are slower); bfloat16 on accelerators, so the dot runs on the tensor cores /
  MXU with f32 accumulation (expected; measured by the accelerator benchmark's int8 rows).
- unroll: load float layers one LayerParams per layer (model.unstack_layers). CPU: measured 48 vs
  42 ms per step on Gemma 3 270M. Accelerators: stacked layers and `lax.scan` (one compiled layer: the
  first call's compile time does not grow with depth; the goal there is <= 30 s per preset).

- moe (mixture-of-experts MLPs, jaxgen.moe): "auto" picks per call shape: "gathered" (the chosen
  experts' weights gathered per token; "picked" on CPU, one pair at a time: XLA:CPU's gather is
  4.4x slower, measured by benchmarks.moe --layer) when tokens x experts-per-token < experts, else
  "grouped" (jax.lax.ragged_dot over the tokens sorted by expert) on accelerators and "looped" (a loop
  over the experts and chunks of their tokens) on CPU, whose ragged_dot computes every expert on every
  row (measured: jaxgen.moe.looped); "dense" (every expert) is the reference.

`paths_for(backend)` gives the defaults; JAXGEN_PATHS="decode_attention=live,gates=where" overrides
fields (read when a program is traced, so set it before the first call). Engine functions take
`paths=None`, meaning `current()`: the default backend's paths with the overrides.

- bfloat16 data movement on CPU (`jit`, `CPU_COMPILER_OPTIONS`): jaxgen's programs are compiled for the
  CPU with XLA's `float-normalization-bf16` pass off. XLA:CPU has no bfloat16 gather, dynamic-slice or
  scatter; that pass converts the *whole* operand to float32 first, and for a loop-invariant operand
  (the [V, D] embedding table the decode loop looks tokens up in) the conversion is hoisted out of the
  loop: a float32 copy of the table made on every call and held while it runs. Measured on Gemma 3 270M
  in bfloat16 (benchmarks/results/x86_64-2cpu-2026-12-05-bf16cpu*.json): peak RSS 2743 -> 2103 MB,
  prefill 924 -> 1205 tok/s, batch-32 decode 306 -> 291 tok/s. With the pass off, bfloat16 arithmetic
  also rounds after each operation, as the program says and as HF transformers' bfloat16 does (the pass
  kept chains in float32, "excess precision"): `python -m benchmarks.bf16_cpu` measures both against
  HF; the README's dtype paragraph has the figures. Other backends compile with their defaults.
  Without the pass XLA:CPU cannot emit a dot whose result is bfloat16 (an internal RET_CHECK): every
  jaxgen dot asks for a float32 result (preferred_element_type); jax.nn.dot_product_attention's XLA
  form does not, so "dpa" runs in float32 on CPU (model._dpa). benchmarks.accelerator --smoke (a CI
  test) runs every path in bfloat16 on CPU: what would catch a new one. A user's own jax.jit around
  jaxgen code compiles with the pass on; code whose best form differs between the two asks
  `cpu_bf16_normalized()` while it is traced (moe._expert: a switch over the experts only there).
"""
from __future__ import annotations

import contextvars
import dataclasses
import functools
import os

import jax
from jax._src import core as _core

CHOICES = {
    "decode_attention": ("full", "live", "pallas"),
    "prefill_attention": ("xla", "dpa"),
    "gates": ("cond", "where"),
    "dequant": ("float32", "bfloat16"),
    "unroll": (True, False),
    "moe": ("auto", "grouped", "gathered", "picked", "looped", "dense"),
}
FIELDS = tuple(CHOICES) + ("decode_block",)
ENV = "JAXGEN_PATHS"


@dataclasses.dataclass(frozen=True)
class Paths:
    decode_attention: str = "full"  # "full" | "live" | "pallas"
    prefill_attention: str = "xla"  # "xla" | "dpa"
    gates: str = "cond"  # "cond" | "where"
    dequant: str = "float32"  # "float32" | "bfloat16"
    unroll: bool = True  # float layers unrolled (per-layer params) rather than scanned
    decode_block: int = 256  # key slots per loop step of the "live" decode path
    moe: str = "auto"  # "auto" | "grouped" | "gathered" | "picked" | "looped" | "dense" (MoE MLPs: jaxgen.moe)

    def __post_init__(self):
        for f, allowed in CHOICES.items():
            v = getattr(self, f)
            if v not in allowed or isinstance(v, bool) != isinstance(allowed[0], bool):
                raise ValueError(f"Paths.{f} must be one of {list(allowed)}, got {v!r}")
        b = self.decode_block
        if isinstance(b, bool) or not isinstance(b, int) or b < 16 or b & (b - 1):
            raise ValueError(f"Paths.decode_block must be a power of two >= 16, got {b!r}")

    def replace(self, **changes) -> "Paths":
        return dataclasses.replace(self, **changes)


REFERENCE = Paths()  # the CPU paths: what every other path is tested against
DEFAULTS = {
    "cpu": REFERENCE,
    "gpu": Paths(decode_attention="pallas", prefill_attention="dpa", gates="where", dequant="bfloat16",
                 unroll=False),
    "tpu": Paths(decode_attention="live", prefill_attention="dpa", gates="cond", dequant="bfloat16",
                 unroll=False),
}


def parse(text: str) -> dict:
    """`field=value,...` (JAXGEN_PATHS's form) as Paths fields; one line naming the problem otherwise."""
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, eq, value = item.partition("=")
        name, value = name.strip(), value.strip()
        if not eq or name not in FIELDS:
            raise ValueError(f"{ENV}: {item!r} is not field=value with a field among {list(FIELDS)}")
        if name == "decode_block":
            if not value.isdigit():
                raise ValueError(f"{ENV}: decode_block takes a number, got {value!r}")
            out[name] = int(value)
        elif isinstance(CHOICES[name][0], bool):
            if value.lower() not in ("1", "0", "true", "false"):
                raise ValueError(f"{ENV}: {name} takes true / false, got {value!r}")
            out[name] = value.lower() in ("1", "true")
        else:
            out[name] = value
    return out


def paths_for(backend: str) -> Paths:
    """The defaults of a backend ("cpu", "gpu", "tpu"; others get the reference paths) with the
    JAXGEN_PATHS overrides."""
    base = DEFAULTS.get(backend, REFERENCE)
    overrides = parse(os.environ.get(ENV, ""))
    try:
        return base.replace(**overrides)
    except ValueError as e:
        raise ValueError(f"{ENV}: {e}") from None


def check_env() -> None:
    """Raise the one-line error of a bad JAXGEN_PATHS without asking JAX for its backend (the command
    line checks it first, before `jax.distributed.initialize`, which must precede any backend use)."""
    paths_for("")


def current() -> Paths:
    """paths_for(the default backend)."""
    return paths_for(jax.default_backend())


def resolve(paths: Paths | None) -> Paths:
    return current() if paths is None else paths


# XLA options for jaxgen's programs compiled for the CPU (see the module docstring). A user's own jit
# around jaxgen.forward on CPU gets them from `jit` below (or jax.jit(f, compiler_options=...)).
CPU_COMPILER_OPTIONS = {"xla_disable_hlo_passes": "float-normalization-bf16"}


def _top_level(args) -> bool:
    """True outside any JAX transformation. jax has no public form of this test (0.10). Should a later jax
    drop the private one, a tracer among the call's arguments says it instead (that misses a nested call
    whose arguments are all concrete: jax then refuses the options with its own error, on CPU only)."""
    clean = getattr(_core, "trace_state_clean", None)
    if clean is not None:
        return clean()
    return not any(isinstance(x, _core.Tracer) for x in jax.tree.leaves(args))


# True while a program compiled with CPU_COMPILER_OPTIONS is being traced (set by `jit` around the traced
# function, so it is a fact of the compile, read at trace time like jax.default_backend()).
_TRACING_WITH_OPTIONS = contextvars.ContextVar("jaxgen_tracing_with_cpu_options", default=False)


def cpu_bf16_normalized() -> bool:
    """Whether the program being traced goes to XLA:CPU with its float-normalization-bf16 pass on: the CPU
    backend, outside jaxgen's own programs (a user's jax.jit around jaxgen code). There a bfloat16 dynamic
    slice, gather or scatter converts its whole operand to float32, which the workarounds that ask this
    (moe._expert) avoid; inside jaxgen's programs the operation reads bfloat16 in place."""
    return jax.default_backend() == "cpu" and not _TRACING_WITH_OPTIONS.get()


# Called as observe(fun, jit_kwargs, args, kwargs) before each top-level call (or lower) of a program made by
# `jit`. For tests (tests/test_backend.py lowers every program the host API runs for GPU and TPU from this CPU
# machine); empty otherwise, and then the check is one list test.
OBSERVERS: list = []


def jit(fun, **kw):
    """`jax.jit(fun, **kw)`, compiled with CPU_COMPILER_OPTIONS when the default backend is the CPU.

    Compiler options belong to a jit object, not to a call, and the backend is unknown at import (asking
    JAX for it here would start the backends before `jax.distributed.initialize`): so one jit object
    per kind, picked at each call. The result is called, lowered and traced like a jax.jit function.
    The option programs trace `fun` with `cpu_bf16_normalized()` False: a distinct function, so that
    jax's trace caches never hand one kind's trace to the other."""
    @functools.wraps(fun)
    def with_options(*args, **kwargs):
        token = _TRACING_WITH_OPTIONS.set(True)
        try:
            return fun(*args, **kwargs)
        finally:
            _TRACING_WITH_OPTIONS.reset(token)

    programs = {"cpu": jax.jit(with_options, compiler_options=CPU_COMPILER_OPTIONS, **kw),
                # nested inside one of jaxgen's option programs (it takes no options of its own, the outer
                # compile has them): traced as they are
                "inside cpu": jax.jit(with_options, **kw),
                "other": jax.jit(fun, **kw)}

    # Inside another transformation (a user's jax.jit, vmap, scan) the program is part of the caller's,
    # which takes no options from a nested jit (jax refuses them there): a plain one.
    # (the backend first: other backends never ask the private test)
    def pick(args: tuple = (), kwargs: dict | None = None):
        """The jit object for a call with these arguments (the fallback top-level test reads them)."""
        if _TRACING_WITH_OPTIONS.get():
            return programs["inside cpu"]
        top = jax.default_backend() == "cpu" and _top_level((args, kwargs or {}))
        return programs["cpu" if top else "other"]

    def observed(args, kwargs):
        if OBSERVERS and not _TRACING_WITH_OPTIONS.get() and _top_level((args, kwargs)):
            for observe in OBSERVERS:
                observe(fun, kw, args, kwargs)
        return pick(args, kwargs)

    @functools.wraps(fun)
    def call(*args, **kwargs):
        return observed(args, kwargs)(*args, **kwargs)

    call.lower = lambda *a, **k: observed(a, k).lower(*a, **k)
    call.trace = lambda *a, **k: pick(a, k).trace(*a, **k)
    call.eval_shape = lambda *a, **k: pick(a, k).eval_shape(*a, **k)
    call._cache_size = lambda: pick()._cache_size()  # the tests' count of compiled programs
    return call
