"""One process of the 2-process test (tests/test_multihost.py): 4 fake CPU devices each, joined by
jax.distributed into one 8-device mesh (data=2 across the processes, model=4), one global batch."""
import json
import os
import sys

# (after the flags the test passes: conftest.TEST_XLA_FLAGS)
os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS", ""),
                                                 "--xla_force_host_platform_device_count=4"]))
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
port, pid, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
assert jax.device_count() == 8 and jax.local_device_count() == 4

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import jaxgen  # noqa: E402
from jaxgen import sharding as shd  # noqa: E402
from tests.test_sharding import KNOBS, PROMPTS  # noqa: E402
from tests.conftest import CONFIGS, random_params  # noqa: E402

cfg = CONFIGS["gemma"]
mesh = shd.make_mesh("data=2,model=4")
model = jaxgen.Model(cfg, shd.shard_params(random_params(cfg, seed=11), cfg, mesh), mesh=mesh)
tokens = [[o.tokens for o in jaxgen.generate(model, PROMPTS, max_new_tokens=12, stop_ids=[], **k)] for k in KNOBS]
if pid == 0:
    with open(out, "w") as f:
        json.dump(tokens, f)
jax.distributed.shutdown()
