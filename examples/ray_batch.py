"""Batch generation as a Ray Data stage: a JSONL file of `jaxgen batch` rows in, N actors, a JSONL file
of `jaxgen batch` output lines out (one per id, in no particular order).

    python examples/ray_batch.py prompts.jsonl results.jsonl --actors 2 --model gemma3-270m --max-new-tokens 64

On a cluster, `ray.init("auto")` joins it (RAY_ADDRESS), and the actors spread over its nodes; give each
actor a host's accelerators with --gpus-per-actor (it uses them all as its mesh). Needs "jaxgen[ray]".
"""
import argparse
import json
import time


def run(inp: str, out: str, actors: int = 1, block_rows: int = 64, gpus_per_actor: float = 0, **options) -> dict:
    import ray

    import jaxgen.ray

    t = time.perf_counter()
    ds = ray.data.read_json(inp)
    res = ds.map_batches(jaxgen.ray.Generate, fn_constructor_kwargs=options,
                         compute=ray.data.ActorPoolStrategy(size=actors), batch_size=block_rows,
                         batch_format="pandas", **({"num_gpus": gpus_per_actor} if gpus_per_actor else {}))
    # (a lost actor is restarted and its block retried: Ray Data's default for an actor pool; passing
    # max_restarts / max_task_retries as extra map_batches arguments is deprecated, gone in Ray 2.64)
    n = 0
    with open(out, "w") as f:
        for row in res.iter_rows():  # streamed: lines are written as blocks finish
            f.write(json.dumps(jaxgen.ray.to_line(row), ensure_ascii=False) + "\n")
            n += 1
    return {"rows": n, "wall_s": time.perf_counter() - t}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("input")
    ap.add_argument("output")
    ap.add_argument("--actors", type=int, default=1)
    ap.add_argument("--block-rows", type=int, default=64, help="rows per map_batches call")
    ap.add_argument("--gpus-per-actor", type=float, default=0)
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--batch-size", type=int, default=8, help="jaxgen's decode rows per actor")
    a = ap.parse_args()
    import ray

    ray.init(address=None, include_dashboard=False)  # RAY_ADDRESS joins a running cluster
    stats = run(a.input, a.output, a.actors, a.block_rows, a.gpus_per_actor, model=a.model,
                max_new_tokens=a.max_new_tokens, temperature=a.temperature, batch_size=a.batch_size)
    print(json.dumps(stats))


if __name__ == "__main__":
    main()
