"""Multi-turn tool use on Gemma 3 270M float32, side by side.  python -m benchmarks.conversation [--quick]

The workload: 16 episodes x 4 turns; each episode's prompt is a ~1,000-token system prompt (shared
text) and a 16-token question; every turn the model writes 64 new tokens (no stop ids: every row
writes all 64) and the environment appends a 32-token tool reply. Token ids, the same for every system.

- jaxgen Conversation: the cache kept on the device; a turn prefills the 32 new tokens (+ the reply's
  last token) per row; `timings=` splits each turn into its prefill and its decode loop.
- jaxgen re-prefill: each turn a fresh `generate` over the whole history (what Tunix's agentic
  rollout and the gemma sampler do); `stream(timings=)` splits it. Its tokens are checked equal to the
  Conversation's (the contract).
- HF transformers: `generate` with `past_key_values` carried from turn to turn (its documented cache
  reuse), input = the previous sequences + the tool reply, greedy, min_new_tokens = max_new_tokens.

jaxgen runs one warm-up episode first (compilation) and times the second; HF needs no warm-up beyond
one small call. Each system runs in its own process (HF in its virtualenv: setup_peers.sh hf).
Writes benchmarks/results/<machine>-<date>-conversation.json and the README's bench-conversation table.
"""
import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

SYSTEM = ("You are a careful assistant with a calculator and a search tool. Call a tool by writing "
          "<tool_call>{\"name\": ..., \"arguments\": ...}</tool_call>; its result comes back between "
          "<tool_result> tags. Think step by step, cite the tool results you use, and answer briefly. ")
TOOL = "<tool_result>{\"status\": \"ok\", \"value\": %d, \"unit\": \"km\", \"source\": \"atlas, page %d\"}</tool_result>\n"


def workload(tok, episodes, system_tokens, question_tokens, reply_tokens, turns):
    """Prompt ids [episodes] (all the same length) and tool replies [turns - 1][episodes]."""
    text = ""
    while len(tok.encode(text)) < system_tokens:
        text += SYSTEM
    system = tok.encode(text)[:system_tokens]  # BOS included
    prompts, replies = [], []
    for e in range(episodes):
        q = tok.encode(f"Question {e}: how far is city {e} from city {e + 7}, and what is twice that?",
                       add_bos=False)
        prompts.append(system + (q * 4)[:question_tokens])
    for t in range(1, turns):
        replies.append([(tok.encode(TOOL % (100 * e + t, t) * 3, add_bos=False))[:reply_tokens]
                        for e in range(episodes)])
    return prompts, replies


def run_jaxgen(spec):
    import jaxgen
    from jaxgen.conversation import Conversation
    from jaxgen.generate import stream, to_completions

    model = jaxgen.load(spec["model"], "float32")
    kw = dict(max_new_tokens=spec["new"], stop_ids=[])
    prompts, replies = spec["prompts"], spec["replies"]

    def conversation():
        conv = Conversation(model, max_len=spec["max_len"])
        turns, outs = [], []
        for t in range(spec["turns"]):
            timings = {}
            out = conv.generate(prompts if t == 0 else replies[t - 1], timings=timings, **kw)
            outs.append([c.tokens for c in out])
            turns.append({k: timings[k] for k in ("prefill_s", "decode_s", "wall_s", "fed_tokens")})
        return turns, outs, conv

    def reprefill(outs):
        histories = [list(p) for p in prompts]
        turns, got = [], []
        for t in range(spec["turns"]):
            if t:
                histories = [h + o + r for h, o, r in zip(histories, outs[t - 1], replies[t - 1])]
            timings = {}
            t0 = time.perf_counter()
            *_, last = stream(model, histories, chunk_steps=1 << 30, timings=timings, **kw)
            wall = time.perf_counter() - t0 - timings["compile_s"]
            got.append([c.tokens for c in to_completions(model, histories, last, len(histories))])
            turns.append({"prefill_s": timings["prefill_s"], "decode_s": timings["decode_s"], "wall_s": wall,
                          "fed_tokens": sum(map(len, histories))})
        return turns, got

    conversation()  # warm-up: compiles every turn's programs
    conv_turns, outs, conv = conversation()
    reprefill(outs)  # warm-up
    re_turns, re_outs = reprefill(outs)
    return {"conversation": conv_turns, "reprefill": re_turns, "equal_tokens": re_outs == outs,
            "history_tokens": [len(conv.history(i).tokens) for i in range(len(prompts))]}


def run_hf(spec):
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    torch.set_num_threads(os.cpu_count() or 2)
    path = pathlib.Path(spec["gguf"])
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    kw = dict(do_sample=False, max_new_tokens=spec["new"], min_new_tokens=spec["new"], pad_token_id=0,
              return_dict_in_generate=True)
    with torch.inference_mode():
        model.generate(torch.tensor([spec["prompts"][0][:8]]), **{**kw, "max_new_tokens": 2, "min_new_tokens": 2})
        turns, seq, cache = [], torch.tensor(spec["prompts"]), DynamicCache()
        for t in range(spec["turns"]):
            if t:
                seq = torch.cat([seq, torch.tensor(spec["replies"][t - 1])], dim=1)
            t0 = time.perf_counter()
            out = model.generate(seq, attention_mask=torch.ones_like(seq), past_key_values=cache, **kw)
            turns.append({"wall_s": time.perf_counter() - t0})
            seq, cache = out.sequences, out.past_key_values
    import transformers
    return {"hf": turns, "versions": {"torch": torch.__version__, "transformers": transformers.__version__}}


SYSTEMS = {"jaxgen": run_jaxgen, "hf": run_hf}


def table(res, spec):
    conv, re_, hf = res.get("conversation"), res.get("reprefill"), res.get("hf")
    rows = ["| turn | Conversation s (prefill share) | re-prefill s (prefill share) | HF past_key_values s | "
            "re-prefill / Conversation | HF / Conversation |", "|---|---|---|---|---|---|"]
    for t in range(spec["turns"]):
        c = conv[t] if conv else None
        r = re_[t] if re_ else None
        h = hf[t]["wall_s"] if hf else None
        cell = lambda x: f"{x['wall_s']:.2f} ({x['prefill_s'] / (x['prefill_s'] + x['decode_s']):.0%})" if x else "not run"
        ratio = lambda a, b: f"{a / b:.2f}x" if a and b else ""
        rows.append(f"| {t + 1} | {cell(c)} | {cell(r)} | {f'{h:.2f}' if h else 'not run'} | "
                    f"{ratio(r and r['wall_s'], c and c['wall_s'])} | {ratio(h, c and c['wall_s'])} |")
    tot = lambda turns, k="wall_s": sum(x[k] for x in turns) if turns else None
    c, r, h = tot(conv), tot(re_), tot(hf)
    rows.append(f"| all {spec['turns']} | {c:.2f} | {r:.2f} | {f'{h:.2f}' if h else 'not run'} | {ratio(r, c)} | "
                f"{ratio(h, c)} |" if c and r else "| all | | | | | |")
    return "\n".join(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--systems", default="jaxgen,hf")
    ap.add_argument("--quick", action="store_true", help="4 episodes x 3 turns, short texts, jaxgen only")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per system")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps(SYSTEMS[a.worker](json.loads(pathlib.Path(a.spec).read_text()))), flush=True)
        return 0
    import jaxgen
    from jaxgen.checkpoint import registry
    from run import publish, python_for

    tok = jaxgen.load("gemma3-270m", "float32").tokenizer
    q = a.quick
    spec = {"model": "gemma3-270m", "gguf": str(registry.gguf_path("gemma3-270m")), "episodes": 4 if q else 16,
            "turns": 3 if q else 4, "system_tokens": 100 if q else 1000, "question_tokens": 16,
            "new": 16 if q else 64, "reply_tokens": 32}
    spec["prompts"], spec["replies"] = workload(tok, spec["episodes"], spec["system_tokens"], spec["question_tokens"],
                                                spec["reply_tokens"], spec["turns"])
    total = spec["system_tokens"] + spec["question_tokens"] + spec["turns"] * spec["new"] + (spec["turns"] - 1) * 32
    spec["max_len"] = -(-total // 256) * 256  # the conversation's cache slots: the longest history, rounded up
    spec_file = ROOT / "benchmarks" / "results" / ".conversation-spec.json"
    spec_file.write_text(json.dumps(spec))
    res = {}
    for s in (["jaxgen"] if q else a.systems.split(",")):
        py = python_for(s)
        if py is None:
            print(f"{s}: no virtualenv (benchmarks/setup_peers.sh)", file=sys.stderr)
            continue
        env = dict(os.environ, PYTHONPATH=str(ROOT) if s == "jaxgen" else "", TF_CPP_MIN_LOG_LEVEL="3")
        try:
            p = subprocess.run([py, str(pathlib.Path(__file__).resolve()), "--worker", s, "--spec", str(spec_file)],
                               capture_output=True, text=True, env=env, cwd=ROOT, timeout=a.timeout)
        except subprocess.TimeoutExpired:
            print(f"{s}: timed out after {a.timeout} s", file=sys.stderr)
            continue
        if p.returncode != 0:
            print(f"{s} failed:\n{p.stderr[-3000:]}", file=sys.stderr)
            continue
        res.update(json.loads(p.stdout.strip().splitlines()[-1]))
    if "equal_tokens" in res and not res["equal_tokens"]:
        print("the Conversation's tokens differ from re-prefilling the history: the contract is broken", file=sys.stderr)
        return 1
    text = table(res, spec)
    print(text)
    if not q:
        meta = {k: v for k, v in spec.items() if k not in ("prompts", "replies")}
        publish("conversation", {"spec": meta, "results": res}, text, "python -m benchmarks.conversation")
    return 0


if __name__ == "__main__":
    sys.exit(main())
