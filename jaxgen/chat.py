"""Chat templates: a checkpoint's own Jinja template, rendered as transformers' `apply_chat_template`
renders it, in a sandbox.

The environment is the one transformers builds: jinja2's `ImmutableSandboxedEnvironment` (a template
cannot reach Python internals or mutate its inputs) with trim_blocks, lstrip_blocks and the
loop-controls extension; `tojson` that keeps non-ASCII text as it is (jinja's own escapes HTML);
the helpers `raise_exception(msg)` and `strftime_now(fmt)`; a `{% generation %}` block that renders its
body. Variables: messages, tools, add_generation_prompt and the special-token strings (bos_token,
eos_token, ...). Any failure, including the sandbox refusing an attribute, is one ValueError line.

The inputs are prepared as transformers prepares them: a message's keys whose value is None are dropped
(an OpenAI-style tool call's `"content": None` renders as no content, not "None"), a reasoning text under
`reasoning_content`, `thinking` or `reasoning` is given under the first two as well (the names templates
read), and the template sees only plain JSON-like data: any other object (an array, an image) becomes a
placeholder naming its type, since the sandbox lets a template call an object's public methods.
"""
from __future__ import annotations

import dataclasses
import datetime
import functools
import json
from collections.abc import Mapping

import jinja2
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment


class _Generation(Extension):
    """`{% generation %}...{% endgeneration %}` (templates that mark assistant tokens for training
    masks): rendered as its body."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(template)


def _plain(x):
    """`x` rebuilt from JSON-like types only (dict, list, tuple, str, int, float, bool, None); a subclass
    (an enum, a numpy scalar) as its base value, a dataclass or pydantic model as a dict of its fields,
    anything else as "<TypeName>"."""
    if x is None or type(x) in (str, int, float, bool):
        return x
    for base in (str, int, float):  # (bool has no subclasses: the line above took it)
        if isinstance(x, base):
            return base(x) if base is not str else str.__str__(x)
    if isinstance(x, Mapping):
        return {_plain(k): _plain(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_plain(v) for v in x]
    if isinstance(x, tuple):
        return tuple(_plain(v) for v in x)
    if type(x).__module__ == "numpy" and hasattr(x, "item") and getattr(x, "ndim", None) == 0:
        return _plain(x.item())
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: _plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if callable(getattr(x, "model_dump", None)):
        return _plain(x.model_dump())
    return f"<{type(x).__name__}>"


_REASONING = ("reasoning_content", "thinking", "reasoning")  # the first two are the names templates read


def _message(m: dict) -> dict:
    m = _plain({k: v for k, v in m.items() if v is not None})
    reasoning = next((m[k] for k in _REASONING if m.get(k) is not None), None)
    return m if reasoning is None else {"thinking": reasoning, **m, "reasoning_content": reasoning}


def render(template: str, messages: list[dict], *, tools: list | None = None, add_generation_prompt: bool = True,
           special_tokens: dict | None = None, **extra) -> str:
    """The template's text for `messages` (dicts with a "role"; content, tool_calls, ... as the
    template reads them). special_tokens: {"bos_token": "<s>", ...}."""
    if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise ValueError(f"chat messages must be a list of dicts with a 'role', got {messages!r:.200}")
    try:
        return _compile(template).render(messages=[_message(m) for m in messages], tools=_plain(tools),
                                         add_generation_prompt=add_generation_prompt,
                                         **_plain({**(special_tokens or {}), **extra}))
    except jinja2.exceptions.SecurityError as e:
        raise ValueError(f"chat template refused by the sandbox: {e}") from None
    except jinja2.exceptions.TemplateError as e:
        raise ValueError(f"chat template: {e}") from None
    except Exception as e:  # an error inside the template's own logic (a bad index, a type error)
        raise ValueError(f"chat template failed: {type(e).__name__}: {e}") from None
