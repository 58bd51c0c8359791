"""Values from a run's status, made safe to show: on a terminal, in Markdown, in HTML.

Status is not trusted text. Stages report metrics (a string metric is whatever the stage wrote), and
anyone who may write the status subresource can put anything there, a checkpoint path or a stage name
included. So every value `idpo status` and `idpo report` print from it goes through here:
- `printable`: one line of visible characters. Control characters (terminal escape sequences, carriage
  returns, bells), bidirectional overrides ("Trojan Source"), lone surrogates and line or paragraph
  separators are shown as `\\xNN` / `\\uNNNN` escapes, never passed to the terminal; a value is cut to
  `limit` characters.
- `markdown`: `printable`, then HTML's special characters as entities (a Markdown renderer passes raw HTML
  through) and Markdown's inline punctuation backslash-escaped: no link, emphasis, code span or table cell
  can be opened by a value. `code` makes a code span, whose content is literal.
- `number` / `interval`: a metric as a finite float, or None: a string, a bool, NaN, a list of the wrong
  length are "unknown", never a crash.
"""

from __future__ import annotations

import html
import math
import re
import unicodedata
from typing import Any

LIMIT = 300  # characters of one value on screen: a status message is at most 500, a path less
# Invisible characters that change how the rest of a line reads: bidirectional embeddings, overrides
# and isolates, and marks.
_INVISIBLE = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_ESCAPED = ("Cc", "Cs", "Zl", "Zp")  # controls, lone surrogates (unprintable in UTF-8), separators
# What opens an inline construct or ends a table cell mid-line (values never start a line).
_MARKDOWN = re.compile(r"([\\`*_\[\]|~])")


_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(char: str) -> str:
    code = ord(char)
    return _NAMED.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def printable(value: Any, limit: int = LIMIT) -> str:
    """`value` as one line of visible text (escapes for anything a terminal would act on)."""
    text = value if isinstance(value, str) else str(value)
    text = text[:limit] + ("…" if len(text) > limit else "")
    return "".join(_escape(c) if c in _INVISIBLE or unicodedata.category(c) in _ESCAPED else c for c in text)


def markdown(value: Any, limit: int = LIMIT) -> str:
    """`value` as literal Markdown text, safe inside a table cell."""
    return _MARKDOWN.sub(r"\\\1", html.escape(printable(value, limit), quote=False))


def code(value: Any, limit: int = LIMIT) -> str:
    """`value` as a Markdown code span (shown literally, markup and all): fenced by more backticks than
    it holds in a row. Not for table cells, where a `|` still ends the cell."""
    text = printable(value, limit)
    fence = "`" * (max((len(run) for run in re.findall("`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def html_text(value: Any, limit: int = LIMIT) -> str:
    """`value` as literal HTML text (attribute-safe too)."""
    return html.escape(printable(value, limit))


def number(value: Any) -> float | None:
    """A finite number, or None for anything else (strings, bools, NaN, containers)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def interval(value: Any) -> tuple[float, float] | None:
    """A `[low, high]` pair of finite numbers, or None."""
    if not isinstance(value, list | tuple) or len(value) != 2:
        return None
    low, high = number(value[0]), number(value[1])
    return None if low is None or high is None else (low, high)


def mapping(value: Any) -> dict[str, Any]:
    """`value` if it is a dict, else an empty one: a status field of the wrong shape reads as absent."""
    return value if isinstance(value, dict) else {}


def listing(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def iteration_number(entry: Any) -> int | None:
    """An `iterations[]` entry's number, or None when the entry or its number is malformed."""
    n = mapping(entry).get("iteration")
    return n if isinstance(n, int) and not isinstance(n, bool) else None
