"""Rendering a WhatsApp QR payload (the `code` of a `qr` message) as a PNG or as terminal text.

Pure functions over segno; nothing here knows about companies or engines. The symbol is the
smallest QR version that holds the payload, at the highest error-correction level that fits
in that version (segno's default `boost_error`), which helps a phone camera read a screen.
"""

from __future__ import annotations

import io

import segno

__all__ = ["QUIET_ZONE", "matrix", "to_png", "to_text"]

#: Light modules around the symbol; 4 is what the QR standard asks for.
QUIET_ZONE = 4

# Dark text on a light background, whatever the terminal's own colours: ANSI black (30) on
# white (47), the 8-colour pair every terminal has, reset at the end of each line so the
# background colour never bleeds past the symbol.
_ANSI_ON = "\x1b[30;47m"
_ANSI_OFF = "\x1b[0m"

# Half blocks: one character holds two modules, the top and the bottom one.
_BLOCKS = {(False, False): " ", (True, False): "\u2580", (False, True): "\u2584", (True, True): "\u2588"}


def _make(code: str) -> segno.QRCode:
    if not isinstance(code, str) or not code:
        raise ValueError("a QR payload must be a non-empty string")
    return segno.make(code, micro=False)


def matrix(code: str, *, border: int = QUIET_ZONE) -> list[list[bool]]:
    """The symbol as rows of modules (True = dark), quiet zone included."""
    if border < 0:
        raise ValueError("border must be >= 0")
    return [[bool(module) for module in row] for row in _make(code).matrix_iter(border=border)]


def to_png(code: str, *, scale: int = 8, border: int = QUIET_ZONE) -> bytes:
    """The QR code as a black-on-white PNG, `scale` pixels per module, with a quiet zone."""
    if scale < 1:
        raise ValueError("scale must be >= 1")
    if border < 0:
        raise ValueError("border must be >= 0")
    out = io.BytesIO()
    _make(code).save(out, kind="png", scale=scale, border=border, dark="#000", light="#fff")
    return out.getvalue()


def to_text(code: str, *, ansi: bool = True, invert: bool = False, border: int = QUIET_ZONE) -> str:
    """The QR code in Unicode half blocks, two module rows per line, each line ending in "\\n".

    With `ansi` (the default) each line is wrapped in escape codes for black on white, so the
    code reads correctly on dark and light terminals alike. Without it, plain text: blocks are
    the dark modules, right on a light background (and on paper); `invert=True` draws the light
    modules instead, right on a dark background without colours. The width is the symbol's
    size plus twice the border; the height is half that, rounded up (a last odd row is paired
    with a light one).
    """
    rows = matrix(code, border=border)
    if len(rows) % 2:
        rows.append([False] * len(rows[0]))
    draw_dark = ansi or not invert
    lines = []
    for top, bottom in zip(rows[0::2], rows[1::2], strict=True):
        text = "".join(_BLOCKS[(t == draw_dark, b == draw_dark)] for t, b in zip(top, bottom, strict=True))
        lines.append(f"{_ANSI_ON}{text}{_ANSI_OFF}\n" if ansi else f"{text}\n")
    return "".join(lines)
