"""Model configuration: one frozen, hashable dataclass (a static jit argument) and its presets.

Every family jaxgen loads (GGUF: gemma3, llama, qwen2; HF directories: llama, mistral, qwen2, qwen3,
gemma2, gemma3: see jaxgen/checkpoint/hf.py) is described by plain fields, with no mode strings that
switch code paths beyond `activation` and `rope_type`:

- Gemma 2/3: GQA, pre+post ("sandwich") norms, GeGLU (tanh-gelu), tied embeddings scaled by
  sqrt(d_model), a per-layer pattern of sliding-window local and global attention (Gemma 3 with their
  own RoPE bases), query_pre_attn_scalar; Gemma 3 q/k RMSNorm, Gemma 2 attention and final softcaps.
- Llama / Mistral / Qwen2 / Qwen3: SwiGLU, plain RMSNorm, optional QKV bias (Qwen2), q/k RMSNorm
  (Qwen3), optional untied output, one RoPE theta (Llama 3.x: "llama3" frequency scaling), Mistral's
  window on every layer.
- Qwen3-MoE / Mixtral: those, with a mixture-of-experts MLP in every layer (n_experts > 0).

Norm weights in jaxgen's params are always the full multiplier (`x_normed * w`). Gemma checkpoints
store `w - 1` and apply `(1 + w)`; loaders fold the +1 in, so the model has one RMSNorm.

Presets live in `jaxgen/configs/<name>.toml` (package data: a built wheel carries them), one file each,
whose keys are exactly the fields below.
"""
from __future__ import annotations

import dataclasses
import importlib.resources
import math
import numbers
import pathlib
from typing import Any

import numpy as np

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib

CONFIG_DIR = importlib.resources.files("jaxgen") / "configs"  # a Traversable: inside the installed package
ACTIVATIONS = ("gelu_tanh", "silu")
_KIND_NAMES = {"int": "an integer", "float": "a finite number", "str": "a string", "bool": "true or false"}
ROPE_TYPES = ("default", "llama3")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    # a label (messages, files), not part of equality or the hash: two checkpoints of one architecture
    # (ckpt-100/, ckpt-200/) share compiled programs, which take the config as a static argument
    name: str = dataclasses.field(compare=False)
    vocab_size: int  # V
    d_model: int  # D
    n_layers: int  # L
    n_heads: int  # N query heads
    n_kv_heads: int  # K kv heads; N % K == 0 (GQA group G = N // K)
    head_dim: int  # H
    d_ff: int  # F
    max_seq_len: int  # longest sequence (prompt + new tokens) the model supports
    norm_eps: float = 1e-6
    activation: str = "silu"  # "silu" -> SwiGLU (Llama/Qwen2), "gelu_tanh" -> GeGLU (Gemma)
    rope_theta: float = 10_000.0  # RoPE base of global layers
    rope_local_theta: float = 10_000.0  # RoPE base of sliding-window layers (Gemma 3: 10k vs 1M)
    rope_type: str = "default"  # RoPE of global layers: "default" (positions / rope_scaling) or "llama3"
    rope_scaling: float = 1.0  # the scaling factor of global layers' RoPE (1.0 = none)
    rope_low_freq_factor: float = 1.0  # "llama3" only: wavelengths past original / this are divided by the factor
    rope_high_freq_factor: float = 4.0  # "llama3" only: wavelengths under original / this are kept
    rope_original_max_len: int = 8192  # "llama3" only: the pre-training context those two refer to
    sliding_window: int = 0  # window of local layers in tokens (a query sees itself and window - 1 before)
    # One letter per layer: "L" a sliding-window (local) layer, "G" a global one; "" = every layer
    # global. Gemma 3 270M: "LLLLLG" three times; Gemma 2: "LG" repeated; Mistral: all "L".
    layer_pattern: str = ""
    query_pre_attn_scalar: float = 0.0  # attention scale is this ** -0.5; 0 -> head_dim ** -0.5
    qk_norm: bool = False  # RMSNorm over H on q and k before RoPE (Gemma 3)
    sandwich_norm: bool = False  # extra norms after attention and after the MLP (Gemma 2/3)
    qkv_bias: bool = False  # biases on the q/k/v projections (Qwen2)
    tie_embeddings: bool = True  # unembedding is the token embedding (transposed by the einsum)
    embed_scale: bool = False  # multiply embeddings by sqrt(d_model) (Gemma)
    final_logit_softcap: float = 0.0  # cap * tanh(logits / cap); 0 = off (Gemma 2; not Gemma 3)
    attn_logit_softcap: float = 0.0  # the same on attention scores, before the mask (Gemma 2); 0 = off
    # Mixture of experts (Qwen3-MoE, Mixtral): every layer's MLP is n_experts SwiGLU / GeGLU experts of
    # width d_ff_expert, a token using the n_experts_per_tok its router scores highest (jaxgen.moe).
    n_experts: int = 0  # E; 0 = a dense MLP of width d_ff
    n_experts_per_tok: int = 0  # k (top-k of the router's softmax)
    d_ff_expert: int = 0  # Fe
    norm_topk_prob: bool = False  # renormalize the k router weights to sum to 1 (Mixtral: always)

    def __post_init__(self):
        def need(ok: bool, msg: str):
            if not ok:
                raise ValueError(f"ModelConfig {self.name!r}: {msg}")

        # each field's type first (a config file's `max_seq_len = true` or `norm_eps = "x"`), so the range
        # checks below compare numbers; an int is a float, a bool is neither. Numbers become Python's
        # (`norm_eps = 1` was traced as int32; numpy scalars from a caller's own header reading)
        kinds = {"int": numbers.Integral, "float": numbers.Real, "str": str, "bool": (bool, np.bool_)}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            need(isinstance(v, kinds[f.type]) and (f.type == "bool" or not isinstance(v, (bool, np.bool_)))
                 and (f.type != "float" or math.isfinite(v)),
                 f"{f.name} must be {_KIND_NAMES[f.type]}, got {v!r:.40}")
            if f.type in ("int", "float", "bool"):
                object.__setattr__(self, f.name, {"int": int, "float": float, "bool": bool}[f.type](v))
        for f in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff",
                  "max_seq_len", "rope_original_max_len"):
            need(isinstance(getattr(self, f), int) and getattr(self, f) > 0, f"{f} must be a positive int")
        need(self.n_heads % self.n_kv_heads == 0,
             f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        need(self.activation in ACTIVATIONS, f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        need(self.sliding_window >= 0, "sliding_window must be >= 0")
        need(self.rope_type in ROPE_TYPES, f"rope_type must be one of {ROPE_TYPES}, got {self.rope_type!r}")
        need(self.rope_scaling > 0 and self.rope_high_freq_factor > self.rope_low_freq_factor > 0,
             "rope_scaling and the rope frequency factors must be > 0, high > low")
        need(set(self.layer_pattern) <= {"L", "G"} and len(self.layer_pattern) in (0, self.n_layers),
             f"layer_pattern must be {self.n_layers} letters L (local) / G (global), or empty, got {self.layer_pattern!r}")
        need("L" not in self.layer_pattern or self.sliding_window > 0, "local layers ('L') need sliding_window > 0")
        need(self.final_logit_softcap >= 0 and self.attn_logit_softcap >= 0, "softcaps must be >= 0")
        need(self.norm_eps > 0, "norm_eps must be > 0")
        for f in ("n_experts", "n_experts_per_tok", "d_ff_expert"):
            need(isinstance(getattr(self, f), int) and not isinstance(getattr(self, f), bool) and getattr(self, f) >= 0,
                 f"{f} must be an int >= 0")
        if self.n_experts:
            need(1 <= self.n_experts_per_tok <= self.n_experts,
                 f"n_experts_per_tok ({self.n_experts_per_tok}) must be in [1, n_experts ({self.n_experts})]")
            need(self.d_ff_expert > 0, "d_ff_expert must be > 0 with n_experts")
        else:
            need(self.n_experts_per_tok == 0 and self.d_ff_expert == 0 and not self.norm_topk_prob,
                 "n_experts_per_tok, d_ff_expert and norm_topk_prob need n_experts > 0")

    # ---- derived layer layout -------------------------------------------------------------------
    def is_global(self, layer: int) -> bool:
        return not self.layer_pattern or self.layer_pattern[layer] == "G"

    @property
    def layer_kinds(self) -> tuple[bool, ...]:
        """is_global for each layer, in order."""
        return tuple(self.is_global(i) for i in range(self.n_layers))

    @property
    def n_global(self) -> int:
        return sum(self.layer_kinds)

    @property
    def n_local(self) -> int:
        return self.n_layers - self.n_global

    @property
    def attn_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def embed_multiplier(self) -> float:
        return math.sqrt(self.d_model) if self.embed_scale else 1.0

    def replace(self, **changes) -> "ModelConfig":
        return config_from_dict({**dataclasses.asdict(self), **changes})


FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig))


def config_from_dict(d: dict[str, Any]) -> ModelConfig:
    """Build a config, rejecting unknown or missing fields by name (no silent defaults for typos).
    A config written before layer_pattern (jaxgen 0.2: `global_every` N, layer i global iff
    i % N == N - 1 when sliding_window > 0) is read as the same pattern."""
    if "global_every" in d and "layer_pattern" not in d:
        d = dict(d)
        every = d.pop("global_every")
        if d.get("sliding_window", 0) and isinstance(every, int) and every > 0:
            d["layer_pattern"] = "".join("G" if i % every == every - 1 else "L" for i in range(d.get("n_layers", 0)))
    unknown = sorted(set(d) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown config field(s) {unknown}; known fields: {list(FIELDS)}")
    required = [f.name for f in dataclasses.fields(ModelConfig)
                if f.default is dataclasses.MISSING and f.name not in d]
    if required:
        raise ValueError(f"missing config field(s) {required}")
    return ModelConfig(**d)


def preset_names() -> list[str]:
    return sorted(p.name[:-len(".toml")] for p in CONFIG_DIR.iterdir() if p.name.endswith(".toml"))


def load_config(name_or_path: str) -> ModelConfig:
    """A preset by exact name (`jaxgen/configs/<name>.toml`) or a path to a .toml file."""
    path = pathlib.Path(name_or_path)
    if path.suffix == ".toml":
        with open(path, "rb") as f:
            return config_from_dict(tomllib.load(f))
    preset = CONFIG_DIR / f"{name_or_path}.toml"
    if not preset.is_file():
        raise ValueError(f"unknown config preset {name_or_path!r}; known presets: {preset_names()}")
    return config_from_dict(tomllib.loads(preset.read_text(encoding="utf-8")))
