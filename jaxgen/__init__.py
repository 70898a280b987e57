"""jaxgen: fast, exact, composable autoregressive generation in JAX."""
__version__ = "0.3.0"

from jaxgen.cache import KVCache, cache_bytes, init_cache
from jaxgen.config import ModelConfig, config_from_dict, load_config, preset_names
from jaxgen.beam import BeamOutput, beam_search
from jaxgen.engine import GenerateOutput, generate_jit, generate_tokens
from jaxgen.generate import Completion, SharedPrefix, generate, plan, precompile, prefill_prefix, stream
from jaxgen.checkpoint import load
from jaxgen.conversation import Conversation
from jaxgen.checkpoint.registry import persistent_compile_cache as enable_compile_cache
from jaxgen.model import Model, Params, forward, init_params, score
from jaxgen.lora import Adapter, load_lora, merge_lora
from jaxgen.sharding import reshard
from jaxgen.sampling import SamplingParams, make_sampling_params, sample

__all__ = ["__version__", "KVCache", "cache_bytes", "init_cache", "ModelConfig", "config_from_dict", "load_config",
           "preset_names", "Completion", "GenerateOutput", "Model", "generate", "generate_jit",
           "generate_tokens", "plan", "precompile", "prefill_prefix", "SharedPrefix", "stream", "load", "enable_compile_cache", "Params", "forward", "init_params", "score", "SamplingParams",
           "make_sampling_params", "sample", "BeamOutput", "beam_search", "Conversation", "Adapter", "load_lora",
           "merge_lora", "reshard"]
