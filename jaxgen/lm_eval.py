"""jaxgen as an lm-evaluation-harness model: checkpoints scored with the field's standard tool, in JAX.

    pip install 'jaxgen[eval]'
    python -m jaxgen.lm_eval run --model jaxgen --model_args model=smollm2-135m,dtype=float32 --batch_size 32 \
        --tasks ... [--include_path DIR_OF_TASK_YAMLS]

(`python -m jaxgen.lm_eval` is lm-eval's own command line with this model registered as "jaxgen";
importing jaxgen.lm_eval registers it for `lm_eval.simple_evaluate(model="jaxgen", ...)` too.) In a
training loop, give it the model and swap params between evals; nothing reloads or recompiles:

    lm = jaxgen.lm_eval.JaxgenLM(model=jaxgen.Model(cfg, params, tokenizer))
    lm_eval.simple_evaluate(model=lm, tasks=[...])
    lm.update_params(new_params)

Contract: every request is answered as lm-eval's `hf` backend (HFLM) answers it on the same weights:
the same token ids (its `tok_encode`, BOS rule and empty-context prefix token), the same left
truncation to max_length, the same rolling windows (lm-eval's own window functions), log-likelihoods
within float rounding, is-greedy flags and greedy generations identical (tests/test_lm_eval.py against
fixtures of lm-eval's hf backend, tools/make_lm_eval_fixtures.py).

How: loglikelihood requests are sorted by length and scored in batches by `model.score_spans` (one
compiled program per bucket of batch, length, choices and continuation length; choices sharing their
input tokens share one row; chunked prefill; only the continuations' columns unembedded, a few at a
time, so a 262k vocabulary fits); generate_until groups requests by their generation kwargs and runs `jaxgen.generate`
with the request's `until` strings as in-graph stop strings, then cuts the text exactly as HFLM does.
"""
from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import numpy as np

try:
    from lm_eval import utils as lm_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import (_add_special_kwargs, handle_stop_sequences, has_bos_prefix,
                                      normalize_gen_kwargs, postprocess_generated_text)
except ImportError as e:  # pragma: no cover - the optional extra is missing
    raise ImportError("jaxgen.lm_eval needs lm-eval: pip install 'jaxgen[eval]'") from e

from jaxgen import backend
from jaxgen import knobs as kn
from jaxgen.checkpoint import DEFAULT_MODEL
from jaxgen.model import Model, score_spans

# generation kwargs a task may give (after lm-eval's normalize_gen_kwargs), as jaxgen.generate knobs
GEN_KNOBS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")
DEFAULT_BATCH = 32
# rows' lengths, two buckets per octave: padding costs whole forward columns (a row of 33 tokens
# computes 48, not 64); more buckets would mean more compiled programs for a small eval
SCORE_BUCKETS = tuple(sorted({b for p in kn.PROMPT_BUCKETS for b in (p, p * 3 // 2)}))
MAX_GEN_TOKS = 256  # HFLM's default when a task gives no max_gen_toks


@functools.partial(backend.jit, static_argnames=("cfg", "chunk", "paths"))
def _score(params, tokens, targets, first, lengths, cfg, chunk, paths):
    return score_spans(params, tokens, targets, first, lengths, cfg, chunk, paths)


def _mesh(text):
    """lm-eval splits model_args at commas: a mesh is written data=2;model=4 (or with ':')."""
    from jaxgen.sharding import make_mesh

    return make_mesh(str(text).replace(";", ",").replace(":", ","))


class JaxgenLM(TemplateLM):
    """An lm-eval model backed by jaxgen. model (or HFLM's name, pretrained): a registry name, .gguf
    path, HF or Orbax directory (as `jaxgen.load` takes it; default the default model), or a ready
    `jaxgen.Model` (with a tokenizer). dtype / quant / kv_quant /
    mesh: as `jaxgen.load` (mesh as data=2;model=4). lora: a PEFT adapter directory, merged into the
    weights. batch_size: rows per compiled call ("auto" = 32). max_length: context window for
    truncation and rolling windows (default: the config's max_seq_len, what HFLM reads from
    config.json). max_gen_toks: default new tokens per generation (256, as HFLM). add_bos_token /
    prefix_token_id: as HFLM's. seed: sampling seed base (row i of a generate_until call samples with
    seed + i). device: JAX runs on its default backend (JAX_PLATFORMS); another device is ignored with
    a warning, as HFLM falls back to the CPU (lm-eval's command line passes cuda:0 by default). Anything
    else is refused: an option that does nothing is an error, not a warning."""

    def __init__(self, model=None, dtype="auto", quant=None, kv_quant=None, mesh=None, lora=None,
                 batch_size=DEFAULT_BATCH, max_length=None, max_gen_toks=MAX_GEN_TOKS, add_bos_token=None,
                 prefix_token_id=None, seed=0, pretrained=None, device=None, max_batch_size=None, **unknown):
        super().__init__()
        if unknown:
            raise ValueError(f"jaxgen lm-eval model: unknown option(s) {', '.join(sorted(unknown))}; it takes model, "
                             "dtype, quant, kv_quant, mesh, lora, batch_size, max_length, max_gen_toks, "
                             "add_bos_token, prefix_token_id, seed")
        if pretrained is not None and model is not None:  # (pretrained: HFLM's name, so its commands carry over)
            raise ValueError("jaxgen lm-eval model: give model= or pretrained=, not both")
        model = model if model is not None else pretrained if pretrained is not None else DEFAULT_MODEL
        if device not in (None, "") and _platform(device) != jax.default_backend():
            # lm-eval's command line passes device="cuda:0" unless told otherwise, and HFLM runs on the CPU
            # when there is no such device: so does this (said, not silent)
            logging.getLogger(__name__).warning("jaxgen lm-eval model: device %r ignored: JAX runs on its default "
                                                "backend, %s (choose it with JAX_PLATFORMS)", device,
                                                jax.default_backend())
        self.batch_size = _batch_size(batch_size)
        if batch_size in ("auto", None, "") and max_batch_size not in (None, ""):  # HFLM: the cap on "auto"
            self.batch_size = min(self.batch_size, _batch_size(max_batch_size))
        for name, v in (("max_length", max_length), ("max_gen_toks", max_gen_toks)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"jaxgen lm-eval model: {name} must be a positive integer, got {v!r}")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"jaxgen lm-eval model: seed must be an integer, got {seed!r}")
        if isinstance(model, Model):
            if any(x is not None for x in (quant, kv_quant, mesh, lora)) or dtype != "auto":
                raise ValueError("jaxgen lm-eval model: dtype / quant / kv_quant / mesh / lora apply when loading; "
                                 "this Model is loaded already")
        else:
            import jaxgen

            adapter = jaxgen.load_lora(lora) if lora is not None else None  # a bad adapter fails before the model
            model = jaxgen.load(str(model), dtype, quant=quant, kv_quant=kv_quant,
                                mesh=_mesh(mesh) if mesh is not None else None, need_tokenizer=True)
            if adapter is not None:
                model = dataclasses.replace(model, params=jaxgen.merge_lora(model.params, adapter, model.cfg))
        if model.tokenizer is None:
            raise ValueError("jaxgen lm-eval model: the model has no tokenizer (lm-eval requests are text)")
        self.model = model
        self.tokenizer = model.tokenizer
        self._max_length = max_length or model.cfg.max_seq_len
        self._max_gen_toks = max_gen_toks
        self.add_bos_token = add_bos_token
        self.custom_prefix_token_id = prefix_token_id
        self.seed = seed
        self.name = model.cfg.name

    def update_params(self, params):
        """Evaluate other weights of the same model (a training step's): same shapes, same programs."""
        self.model = dataclasses.replace(self.model, params=params)

    # --- lm-eval's tokenization hooks, as HFLM defines them ---
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:  # context of an empty-context request and of rolling windows
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        return self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return self.name

    def _special_text(self, i: int) -> str:
        """An id's text with special tokens spelled out (HF's decode(id), skip_special_tokens=False)."""
        sp = self.tokenizer.special_tokens
        for key, tid in (("bos_token", self.tokenizer.bos_id), ("eos_token", self.tokenizer.eos_id)):
            if i == tid and sp.get(key):
                return sp[key]
        return self.tokenizer.decode([i])

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len=None, **kwargs):
        # HFLM: add_special_tokens (else add_bos_token) decides, default True = the tokenizer's BOS rule (which
        # add_bos_token overrides, as it does HF's post-processor); a string already starting with the BOS
        # text gets none
        special = _add_special_kwargs(add_special_tokens, self.add_bos_token).get("add_special_tokens", True)
        if add_special_tokens is None and has_bos_prefix(string, self._special_text(self.prefix_token_id)):
            special = False
        add_bos = self.add_bos_token if special else False  # None: the tokenizer's own rule
        ids = self.tokenizer.encode(string, add_bos=add_bos)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens) -> str:  # HFLM: skip_special_tokens=True
        return self.tokenizer.decode(tokens, skip_special=True)

    # --- requests ---
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """[(key, context ids, continuation ids)] -> [(sum of log-probs, is greedy)], as HFLM: the input is
        (context + continuation)[-(max_length + 1):][:-1], the continuation its last tokens' targets.
        Requests with the same input (the choices of a multiple-choice question whose answers are one
        token, or differ only in the last) share one row, as HFLM's logits cache shares one forward."""
        rows: dict[tuple, list] = {}  # input ids -> [(request index, continuation ids)]
        for r, (_, ctx, cont) in enumerate(requests):
            if not ctx or not cont:
                raise ValueError("a loglikelihood request needs a non-empty context and continuation (token ids)")
            if len(cont) > self.max_length:
                raise ValueError(f"a continuation of {len(cont)} tokens exceeds max_length {self.max_length}")
            full = (list(ctx) + list(cont))[-(self.max_length + 1):]
            rows.setdefault(tuple(full[:-1]), []).append((r, full[-len(cont):]))
        order = sorted(rows, key=lambda inp: -len(inp))  # buckets fill, the longest first
        out = [None] * len(requests)
        # choices and continuation columns: one bucket for the whole call (fewer programs; padding them
        # costs a few gathered values, where padding the rows' length would cost whole forward columns)
        K = _pow2(max(len(v) for v in rows.values()))
        C = _pow2(max(len(c) for v in rows.values() for _, c in v))
        for start in range(0, len(order), self.batch_size):
            group = order[start:start + self.batch_size]
            B = kn.bucket(len(group), kn.BATCH_BUCKETS, "batch size")
            T = kn.bucket(max(len(inp) for inp in group), SCORE_BUCKETS, "sequence length")
            tokens = np.zeros((B, T), np.int32)
            lengths = np.zeros((B,), np.int32)
            first = np.zeros((B, K), np.int32)  # unused k: first = lengths (an empty span)
            targets = np.zeros((B, K, min(C, T)), np.int32)  # aligned at the row's earliest continuation start
            for b, inp in enumerate(group):
                n, longest = len(inp), max(len(c) for _, c in rows[inp])
                tokens[b, :n], lengths[b], first[b] = inp, n, n
                for k, (_, cont) in enumerate(rows[inp]):
                    first[b, k] = n - len(cont)
                    targets[b, k, longest - len(cont):longest] = cont
            m = self.model
            total, greedy = jax.device_get(_score(m.params, tokens, targets, first, lengths, m.cfg,
                                                  m.prefill_chunk, m.paths))
            for b, inp in enumerate(group):
                for k, (r, _) in enumerate(rows[inp]):
                    out[r] = (float(total[b, k]), bool(greedy[b, k]))
        for (key, _, _), answer in zip(requests, out):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each document's whole log-likelihood, in lm-eval's own disjoint windows of max_length tokens
        (every token predicted once, conditioned on up to max_length - 1 before it)."""
        windows, owner = [], []
        for k, req in enumerate(requests):
            (string,) = req.args
            for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(k)
        sums = [0.0] * len(requests)
        for k, (lp, _) in zip(owner, self._loglikelihood_tokens(windows)):
            sums[k] += lp
        for req, total in zip(requests, sums):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return sums

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Each request's continuation up to its first `until` string (or the end-of-text token, or
        max_gen_toks), as HFLM returns it: greedy unless the request samples. Requests with equal
        generation kwargs run as one `jaxgen.generate` call per batch_size rows."""
        import jaxgen

        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        eos = self._special_text(self.eot_token_id)
        out = [None] * len(requests)
        for idx in groups.values():
            gen = normalize_gen_kwargs(requests[idx[0]].args[1], self.max_gen_toks)
            until = handle_stop_sequences(gen.pop("until", None), eos=eos)
            max_gen = gen.pop("max_gen_toks")
            knobs = self._knobs(gen)
            if max_gen >= self.max_length:
                raise ValueError(f"max_gen_toks {max_gen} must be less than max_length {self.max_length}")
            prompts = [self.tok_encode(requests[i].args[0], left_truncate_len=self.max_length - max_gen) for i in idx]
            order = sorted(range(len(idx)), key=lambda j: -len(prompts[j]))
            for start in range(0, len(order), self.batch_size):
                part = order[start:start + self.batch_size]
                done = jaxgen.generate(self.model, [prompts[j] for j in part], max_new_tokens=max_gen,
                                       stop=[u for u in until if u], seed=[self.seed + idx[j] for j in part], **knobs)
                for j, c in zip(part, done):
                    ids = c.tokens[:-1] if isinstance(c.stop_reason, int) else c.tokens  # a stop id: not text
                    text = postprocess_generated_text(self.tok_decode(ids), until, None)
                    out[idx[j]] = text
                    self.cache_hook.add_partial("generate_until", requests[idx[j]].args, text)
        return out

    def _knobs(self, gen: dict) -> dict:
        """normalize_gen_kwargs' output (less until / max_gen_toks) as generate knobs; any other key is an
        error (a task's sampling option silently dropped would change its numbers)."""
        do_sample = gen.pop("do_sample", False)
        extra = sorted(set(gen) - set(GEN_KNOBS))
        if extra:
            raise ValueError(f"generation kwargs {', '.join(extra)} are not supported by the jaxgen model "
                             f"(supported: until, max_gen_toks, do_sample, {', '.join(GEN_KNOBS)})")
        if not do_sample:
            gen["temperature"] = 0.0
        elif not gen.get("temperature"):
            raise ValueError("do_sample=True needs temperature > 0 (as transformers' generate requires)")
        return gen

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        if chat_template is False or chat_template is None:
            return None
        return self.tokenizer.chat_template or self.tokenizer.chat_format or None

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        """The checkpoint's chat template rendered as transformers renders it. add_generation_prompt=False
        continues the last (assistant) message, as HFLM's continue_final_message: the text ends where
        that message's content ends (transformers cuts the rendering the same way)."""
        text = self.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)
        if add_generation_prompt or not chat_history:
            return text
        content = chat_history[-1]["content"]
        for piece in (content, content.strip()):  # transformers: the whole content, else its stripped form
            at = text.rfind(piece) if piece else -1
            if at >= 0:
                return text[:at + len(piece)]
        raise ValueError("the chat template does not render the final message's content: cannot continue it")


if __name__ != "__main__":  # (run as a script, main() imports the module, which registers the class)
    register_model("jaxgen")(JaxgenLM)


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _platform(device) -> str:
    """A torch-style device name as JAX's backend name: cuda / cuda:0 -> gpu."""
    name = str(device).split(":")[0].lower()
    return "gpu" if name == "cuda" else name


def _batch_size(v) -> int:
    if v in ("auto", None, ""):
        return DEFAULT_BATCH
    if isinstance(v, str) and v.startswith("auto:"):
        raise ValueError("jaxgen lm-eval model: batch_size auto:N is HFLM's memory probe; give a number")
    try:
        b = int(v)
    except (TypeError, ValueError):
        b = 0
    if b < 1 or b > kn.BATCH_BUCKETS[-1]:
        raise ValueError(f"jaxgen lm-eval model: batch_size must be 1..{kn.BATCH_BUCKETS[-1]} or auto, got {v!r}")
    return b


def main():
    """lm-eval's command line with the jaxgen model registered (`--model jaxgen`); a bad option or
    model is one line on stderr and exit status 2, not a traceback."""
    import importlib
    import sys

    importlib.import_module("jaxgen.lm_eval")  # registers JaxgenLM under its importable name
    from jaxgen.checkpoint import ModelNotInstalledError
    from lm_eval.__main__ import cli_evaluate

    try:
        cli_evaluate()
    except (ValueError, ModelNotInstalledError) as e:
        print(f"jaxgen lm-eval: {e}".splitlines()[0], file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
