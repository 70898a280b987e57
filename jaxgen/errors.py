"""The one line jaxgen shows for a library's exception.

XLA, TensorStore, safetensors, outlines-core and jsonschema put pages of context (specs, stack dumps, the
schema again) under the line that says what went wrong; a user's error message keeps that line only.
"""

from __future__ import annotations


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first non-blank line of `e`'s message, cut to `limit` characters; the exception's type name
    when the message is empty (`str(e).splitlines()[0]` raised IndexError there, hiding the error)."""
    for line in str(e).splitlines():
        if line.strip():
            return line.strip()[:limit]
    return type(e).__name__
