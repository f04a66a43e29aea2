"""Strings from users, files and plugins, made safe to show: data, never control sequences.

Class names, paths, CSV fields, plugin names and error texts can hold anything. Shown as they
are, an escape sequence recolours or clears the terminal, a carriage return hides a line, a bidi
override reverses one. ``shown`` writes every such character as a Python escape (``\\x1b``), so
what the user sees is what the file holds; ``one_line`` makes a message one line of plain text.
Markup (rich, HTML, mathtext) is escaped where it is rendered, on top of this.
"""

import re

_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-_]")


def shown(text: object) -> str:
    """``text`` with each non-printable character (controls, bidi overrides, lone surrogates) as an escape."""
    return "".join(c if c.isprintable() else _escape(c) for c in str(text))


def one_line(text: object) -> str:
    """``text`` as one line: ANSI sequences dropped, line breaks and runs of space one space, the rest ``shown``."""
    return shown(" ".join(_ANSI.sub("", str(text)).split()))


def _escape(char: str) -> str:
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # a byte of a file name that is not UTF-8 (Python's surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    return char.encode("unicode_escape").decode("ascii")


def setting(value: object, limit: int | None = None) -> str:
    """A config value in few characters: yes/no, none, numbers as %g, [a, b], {key: value}; past ``limit``
    characters, cut with an ellipsis. Strings are ``shown``."""
    if value is None:
        text = "none"
    elif isinstance(value, bool):
        text = "yes" if value else "no"
    elif isinstance(value, float):
        text = f"{value:g}"
    elif isinstance(value, (list, tuple)):
        text = "[" + ", ".join(setting(v) for v in value) + "]"
    elif isinstance(value, dict):
        text = "{" + ", ".join(f"{shown(k)}: {setting(v)}" for k, v in value.items()) + "}"
    else:
        text = shown(value)
    return text if limit is None or len(text) <= limit else text[: limit - 1] + "…"
