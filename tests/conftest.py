"""Test setup: 8 fake CPU devices (for the sharding tests) and tiny random configs for speed."""
import os
import shutil
import tempfile

# XLA:CPU compiles the tests' programs without LLVM's optimizations (-O0), here and in every command the tests
# start (they add TEST_XLA_FLAGS to their own XLA_FLAGS). Why: a tiny-config file's time is ~95% compilation
# (tests/test_conversation.py: XLA's backend compiles 194.5 s of 233 s), and -O0 cuts a compile by about a third
# (the tiny Gemma's generate program: 2.45 -> 1.58 s). Results differ by float rounding only: tokens equal and
# log-probs within 1.2e-5 of -O2's (tiny Gemma and Qwen sampled, Gemma 3 270M float32 and int8 greedy, 8-16
# tokens a row); the tests' tolerances are wider. A program runs slower, so the real-model files gain less
# (test_real_models 368 -> 350 s) and one loses (test_quant_real, int8 dequantization and caches over 256-token
# chunks: 165 -> 225 s). Measured, the whole suite as CI runs it (-n 2 --dist loadfile, this 2-core machine,
# one after the other, 2026-12-07): 2584 -> 1899 s, the tests' own times 5121 -> 3743 s, 707 passed either way.
# The main job in .ci/run (the README's first command) and test_install's wheel run at XLA's defaults, what
# users get.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS", ""),
                                                 "--xla_force_host_platform_device_count=8", TEST_XLA_FLAGS]))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

from jaxgen.config import ModelConfig  # noqa: E402
from jaxgen.model import Model  # noqa: E402
from jaxgen.model import init_params  # noqa: E402

# Gemma-3-like: GQA, q/k norm, sandwich norms, GeGLU, tied scaled embeddings, 2 local : 1 global with
# a 5-token window (shorter than the test sequences, so the ring buffers wrap), and 2 trailing local
# layers after the last global one (as in Gemma 3 1B's 26 = 4 x 6 + 2 layers).
TINY_GEMMA = ModelConfig(
    name="tiny-gemma", vocab_size=64, d_model=32, n_layers=8, n_heads=4, n_kv_heads=2, head_dim=16,
    d_ff=64, max_seq_len=512, activation="gelu_tanh", rope_theta=1e6, rope_local_theta=1e4,
    sliding_window=5, layer_pattern="LLGLLGLL", query_pre_attn_scalar=16.0, qk_norm=True, sandwich_norm=True,
    embed_scale=True)
# Qwen2-like: SwiGLU, QKV bias, untied output, all-global.
TINY_QWEN = ModelConfig(
    name="tiny-qwen", vocab_size=64, d_model=32, n_layers=3, n_heads=4, n_kv_heads=1, head_dim=8,
    d_ff=48, max_seq_len=512, activation="silu", rope_theta=1e4, qkv_bias=True, tie_embeddings=False)
CONFIGS = {"gemma": TINY_GEMMA, "qwen": TINY_QWEN}


def pytest_addoption(parser):
    parser.addoption("--run-qwen", action="store_true",
                     help="also run the Qwen2.5-Coder parity tests (needs the 0.5 GB model packages)")


def pytest_configure(config):
    config.addinivalue_line("markers", "qwen: Qwen2.5-Coder real-model tests, opt-in with --run-qwen")
    _share_compiled_programs()


_XLA_CACHE = None  # the run's compilation cache directory, made (and removed) by this process


def _share_compiled_programs():
    """JAX's persistent compilation cache, one fresh directory per test run, shared by both xdist workers (they inherit
    the variable from the controller, which sets it before starting them) and by every command the tests start
    (`jaxgen`, notebooks' kernels, Ray actors). Why: each test module drops its programs (jax.clear_caches,
    below) and the next compiles the same tiny-config programs again; so do the commands. Measured (-n 2, the
    whole suite, cold cache, on the 2-core CI kind): 2583 s -> 2246 s (the tests' own times 5043 s -> 4445 s; 6
    modules alone: 360 s -> 317 s). Every program is cached (no minimum compile time: most tiny ones compile in
    under JAX's default 1 s). A program loaded from the cache still runs, and still counts in CompileCounter
    (jax's backend-compile event wraps the cache lookup). A directory the user set (JAX_COMPILATION_CACHE_DIR)
    is used as it is and kept."""
    global _XLA_CACHE
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        _XLA_CACHE = tempfile.mkdtemp(prefix="jaxgen-tests-xla-")
        os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE
        os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    # this process imported jax above, before the variables were set
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")))


def pytest_unconfigure(config):
    if _XLA_CACHE is not None:
        shutil.rmtree(_XLA_CACHE, ignore_errors=True)


# The longest files first (measured with --durations): CI runs `-n 2 --dist loadfile`, where pytest-xdist
# hands files to its two workers in collection order, so a long file started last would run alone at
# the end. Within a file the order is kept.
LONGEST_FIRST = ["test_real_models", "test_notebooks", "test_quant_real", "test_ray", "test_generate", "test_lora", "test_lm_eval", "test_moe", "test_conversation", "test_batch",
                 "test_constraints", "test_schema", "test_long_prompts", "test_prefix", "test_cli", "test_speculative",
                 "test_knobs", "test_benchmarks", "test_beam", "test_stops", "test_multihost"]


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # (stable)
    if config.getoption("--run-qwen"):
        return
    skip = pytest.mark.skip(reason="Qwen real-model test: opt in with --run-qwen")
    for item in items:
        if item.get_closest_marker("qwen") is not None:
            item.add_marker(skip)


def random_params(cfg, seed=0):
    """init_params, with norms and biases perturbed so that a wrong norm or bias would show."""
    params = init_params(cfg, jax.random.key(seed))
    leaves, treedef = jax.tree.flatten_with_path(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    out = []
    for (path, x), k in zip(leaves, keys):
        name = path[-1].name
        if "norm" in name or name.startswith("b"):
            x = x + 0.3 * jax.random.normal(k, x.shape, x.dtype)
        out.append(x)
    return jax.tree.unflatten(treedef, out)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop every compiled program after each test module. Each XLA:CPU executable holds its own
    memory mappings (two test modules leave ~10,900 of them; 650 after jax.clear_caches), and the whole
    suite in one process passed the kernel's vm.max_map_count (65,530): XLA's compiler then segfaulted
    on a failed mmap, in whichever test came next."""
    yield
    jax.clear_caches()


@pytest.fixture(scope="session", params=sorted(CONFIGS))
def tiny_model(request):
    cfg = CONFIGS[request.param]
    return Model(cfg, random_params(cfg))


@pytest.fixture(scope="session")
def gemma_model():
    return Model(TINY_GEMMA, random_params(TINY_GEMMA))


class CompileCounter:
    """Records every real XLA backend compilation (jax.monitoring event) with its function name."""

    def __init__(self):
        self.names = []
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event, duration, fun_name=None, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            self.names.append(fun_name)

    def count(self, name=None):
        return sum(1 for n in self.names if name is None or n == name)


_COUNTER = None


@pytest.fixture(scope="session")
def compile_counter():
    global _COUNTER
    if _COUNTER is None:
        _COUNTER = CompileCounter()
    return _COUNTER
