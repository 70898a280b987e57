"""Two processes on localhost, joined with jax.distributed (4 fake CPU devices each), generate one
global batch together on a data=2 x model=4 mesh and produce the single-process tokens."""
import json
import os
import socket
import subprocess
import sys

import jaxgen
from jaxgen.model import Model

from .conftest import CONFIGS, TEST_XLA_FLAGS, random_params
from .test_sharding import KNOBS, PROMPTS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path):
    cfg = CONFIGS["gemma"]
    base = Model(cfg, random_params(cfg, seed=11))
    want = [[o.tokens for o in jaxgen.generate(base, PROMPTS, max_new_tokens=12, stop_ids=[], **k)] for k in KNOBS]
    port, out = free_port(), tmp_path / "tokens.json"
    worker = os.path.join(os.path.dirname(__file__), "multihost_worker.py")
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["XLA_FLAGS"] = TEST_XLA_FLAGS  # the worker adds its 4 devices
    procs = [subprocess.Popen([sys.executable, worker, str(port), str(i), str(out)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=300)[0])
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(l[-3000:] for l in logs)
    assert json.loads(out.read_text()) == want
