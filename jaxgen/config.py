"""Model configuration: one frozen, hashable dataclass (a static jit argument) and its presets.

Both families jaxgen loads are described by plain fields, with no mode strings that switch code paths
beyond `activation`:

- Gemma 3: GQA, q/k RMSNorm, pre+post ("sandwich") norms, GeGLU (tanh-gelu), tied embeddings scaled by
  sqrt(d_model), a per-layer pattern of sliding-window local and global attention with their own RoPE
  bases, and query_pre_attn_scalar.
- Llama / Qwen2: SwiGLU, plain RMSNorm, optional QKV bias, optional untied output, one RoPE theta.

Norm weights in jaxgen's params are always the full multiplier (`x_normed * w`). Gemma checkpoints
store `w - 1` and apply `(1 + w)`; loaders fold the +1 in, so the model has one RMSNorm.

Presets live in `jaxgen/configs/<name>.toml` (package data: a built wheel carries them), one file each,
whose keys are exactly the fields below.
"""
from __future__ import annotations

import dataclasses
import importlib.resources
import math
import pathlib
from typing import Any

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib

CONFIG_DIR = importlib.resources.files("jaxgen") / "configs"  # a Traversable: inside the installed package
ACTIVATIONS = ("gelu_tanh", "silu")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    name: str
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
    rope_scaling: float = 1.0  # linear position scaling of global layers (1.0 = none)
    sliding_window: int = 0  # window of local layers in tokens; 0 = every layer is global
    global_every: int = 1  # layer i is global iff i % global_every == global_every - 1
    query_pre_attn_scalar: float = 0.0  # attention scale is this ** -0.5; 0 -> head_dim ** -0.5
    qk_norm: bool = False  # RMSNorm over H on q and k before RoPE (Gemma 3)
    sandwich_norm: bool = False  # extra norms after attention and after the MLP (Gemma 2/3)
    qkv_bias: bool = False  # biases on the q/k/v projections (Qwen2)
    tie_embeddings: bool = True  # unembedding is the token embedding (transposed by the einsum)
    embed_scale: bool = False  # multiply embeddings by sqrt(d_model) (Gemma)
    final_logit_softcap: float = 0.0  # cap * tanh(logits / cap); 0 = off (Gemma 2; not Gemma 3)

    def __post_init__(self):
        def need(ok: bool, msg: str):
            if not ok:
                raise ValueError(f"ModelConfig {self.name!r}: {msg}")

        for f in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff",
                  "max_seq_len", "global_every"):
            need(isinstance(getattr(self, f), int) and getattr(self, f) > 0, f"{f} must be a positive int")
        need(self.n_heads % self.n_kv_heads == 0,
             f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        need(self.activation in ACTIVATIONS, f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        need(self.sliding_window >= 0, "sliding_window must be >= 0")
        need(self.norm_eps > 0, "norm_eps must be > 0")

    # ---- derived layer layout -------------------------------------------------------------------
    def is_global(self, layer: int) -> bool:
        return self.sliding_window == 0 or layer % self.global_every == self.global_every - 1

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
    """Build a config, rejecting unknown or missing fields by name (no silent defaults for typos)."""
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
