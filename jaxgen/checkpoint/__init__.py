"""Loading and saving weights: GGUF import, Orbax checkpoints, and the model registry."""
from jaxgen.checkpoint.registry import DEFAULT_MODEL, MODELS, ModelNotInstalledError, gguf_path, load

__all__ = ["DEFAULT_MODEL", "MODELS", "ModelNotInstalledError", "gguf_path", "load"]
