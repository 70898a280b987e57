"""Chat templates: a checkpoint's own Jinja template, rendered as transformers' `apply_chat_template`
renders it, in a sandbox.

The environment is the one transformers builds: jinja2's `ImmutableSandboxedEnvironment` (a template
cannot reach Python internals or mutate its inputs) with trim_blocks, lstrip_blocks and the
loop-controls extension; `tojson` that keeps non-ASCII text as it is (jinja's own escapes HTML);
the helpers `raise_exception(msg)` and `strftime_now(fmt)`; a `{% generation %}` block that renders its
body. Variables: messages, tools, add_generation_prompt and the special-token strings (bos_token,
eos_token, ...). Any failure, including the sandbox refusing an attribute, is one ValueError line.
"""
from __future__ import annotations

import datetime
import functools
import json

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


def render(template: str, messages: list[dict], *, tools: list | None = None, add_generation_prompt: bool = True,
           special_tokens: dict | None = None, **extra) -> str:
    """The template's text for `messages` (dicts with a "role"; content, tool_calls, ... as the
    template reads them). special_tokens: {"bos_token": "<s>", ...}."""
    if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise ValueError(f"chat messages must be a list of dicts with a 'role', got {messages!r:.200}")
    try:
        return _compile(template).render(messages=list(messages), tools=tools,
                                         add_generation_prompt=add_generation_prompt,
                                         **(special_tokens or {}), **extra)
    except jinja2.exceptions.SecurityError as e:
        raise ValueError(f"chat template refused by the sandbox: {e}") from None
    except jinja2.exceptions.TemplateError as e:
        raise ValueError(f"chat template: {e}") from None
    except Exception as e:  # an error inside the template's own logic (a bad index, a type error)
        raise ValueError(f"chat template failed: {type(e).__name__}: {e}") from None
