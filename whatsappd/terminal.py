"""Characters that must never reach a terminal raw: one rule for refusing them and escaping them.

A company name, a push name or an error text is shown by `whatsappctl` and in logs. Control
characters there (ESC, CSI as C1 0x9b, BEL, CR, NL, DEL) can retitle a window, clear the
screen or forge whole lines; format characters (the bidi overrides and isolates, zero-width
spaces, the BOM) can make a line read as something else than it is; line and paragraph
separators start new lines in some terminals and viewers. Names refuse them (`first_unsafe`);
everything else printed from the API is escaped (`escape`), so it is shown, never obeyed.
"""

from __future__ import annotations

import functools
import sys
import unicodedata
from typing import Any

__all__ = ["describe", "escape", "escape_all", "first_unsafe", "is_unsafe", "safe_text_pattern"]

# Unicode general categories: Cc controls (C0, DEL, C1), Cf format (bidi, zero-width, BOM),
# Cs lone surrogates (not text; JSON can carry them), Zl/Zp line and paragraph separators.
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
# Zero-width (non-)joiners are format characters that real names need: emoji sequences and
# Persian or Indic scripts. They join or part letters and move nothing.
_JOINERS = frozenset({"\u200c", "\u200d"})


def is_unsafe(char: str) -> bool:
    """True for a character a terminal or a viewer may obey instead of showing."""
    return char not in _JOINERS and unicodedata.category(char) in _UNSAFE_CATEGORIES


def first_unsafe(text: str) -> int | None:
    """The index of the first unsafe character of text, or None if there is none."""
    return next((i for i, char in enumerate(text) if is_unsafe(char)), None)


def _escaped(code: int) -> str:
    # \\uXXXX reads the same in Python's and ECMA-262's regular expressions; a character beyond
    # the BMP stands as itself (Python's re, which schemathesis uses, takes it whole).
    return f"\\u{code:04x}" if code < 0x10000 else chr(code)


@functools.cache
def safe_text_pattern() -> str:
    """A regular expression that matches exactly the texts (of Unicode scalar values) with no
    unsafe character, derived from is_unsafe (so the OpenAPI document states the very rule names are checked against)."""
    ranges: list[list[int]] = []
    for code in range(sys.maxunicode + 1):
        # Lone surrogates (Cs) are refused too, but a regular expression engine that works on
        # Unicode scalar values (Rust's, under schemathesis's validator) cannot name them.
        if is_unsafe(chr(code)) and not 0xD800 <= code <= 0xDFFF:
            if ranges and ranges[-1][1] == code - 1:
                ranges[-1][1] = code
            else:
                ranges.append([code, code])
    parts = (_escaped(a) if a == b else f"{_escaped(a)}-{_escaped(b)}" for a, b in ranges)
    # (?![\\s\\S]) is the end of the text in both dialects; Python's $ would also match before a final newline.
    return "^[^" + "".join(parts) + "]*(?![\\s\\S])"


def describe(char: str) -> str:
    """'U+001B' or 'U+202E (RIGHT-TO-LEFT OVERRIDE)': how an error names a character."""
    name = unicodedata.name(char, "")
    return f"U+{ord(char):04X}" + (f" ({name})" if name else "")


_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(char: str) -> str:
    if char in _SHORT:
        return _SHORT[char]
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def escape(value: object) -> str:
    """str(value) with every unsafe character written as a Python-style escape (ESC -> '\\x1b')."""
    text = value if isinstance(value, str) else str(value)
    if first_unsafe(text) is None:
        return text
    return "".join(_escape_char(char) if is_unsafe(char) else char for char in text)


def escape_all(value: Any) -> Any:
    """A copy of a parsed JSON value with every string in it (keys too) escaped."""
    if isinstance(value, str):
        return escape(value)
    if isinstance(value, dict):
        return {escape(k): escape_all(v) for k, v in value.items()}
    if isinstance(value, list):
        return [escape_all(v) for v in value]
    return value
