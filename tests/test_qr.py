"""QR rendering: PNG bytes and the half-block terminal text decode back to segno's symbol."""

from __future__ import annotations

import io
import re

import pytest
import segno

from whatsappd import qr

# The shape of a real WhatsApp payload: server ref, noise key, identity key, adv secret.
CODE = "2@" + "Q" * 94 + "==," + "n" * 43 + "=," + "i" * 43 + "=," + "a" * 43 + "="
ANSI = re.compile(r"\x1b\[[0-9;]*m")
TOP, BOTTOM, FULL = "\u2580", "\u2584", "\u2588"


def symbol(code: str, border: int = qr.QUIET_ZONE) -> list[list[bool]]:
    return [[bool(m) for m in row] for row in segno.make(code, micro=False).matrix_iter(border=border)]


def unrender(text: str, *, dark_is_block: bool = True) -> list[list[bool]]:
    """Turn half-block text back into module rows (two per line)."""
    rows: list[list[bool]] = []
    for line in ANSI.sub("", text).splitlines():
        top = [ch in (TOP, FULL) for ch in line]
        bottom = [ch in (BOTTOM, FULL) for ch in line]
        if not dark_is_block:
            top, bottom = [not m for m in top], [not m for m in bottom]
        rows += [top, bottom]
    return rows


def test_matrix_is_the_segno_symbol_with_a_four_module_quiet_zone():
    """matrix() adds 4 light modules on every side around the smallest QR version that fits."""
    rows = qr.matrix(CODE)
    size = segno.make(CODE, micro=False).symbol_size(border=0)[0]
    assert len(rows) == len(rows[0]) == size + 8
    assert not any(rows[0]) and not any(row[0] for row in rows) and not any(rows[-1])
    assert rows == symbol(CODE)


def test_png_is_a_png_of_the_symbol_at_the_given_scale():
    """to_png returns PNG bytes; decoded, its pixels are the modules, black on white."""
    data = qr.to_png(CODE, scale=3)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    image_module = pytest.importorskip("PIL.Image")
    with image_module.open(io.BytesIO(data)) as image:
        gray = image.convert("L")
        rows = qr.matrix(CODE)
        assert gray.size == (len(rows) * 3, len(rows) * 3)
        pixels = [[gray.getpixel((x * 3 + 1, y * 3 + 1)) < 128 for x in range(len(rows))] for y in range(len(rows))]
    assert pixels == rows


def test_png_default_scale_is_8_pixels_per_module():
    """Without arguments the PNG is 8 px per module, quiet zone included."""
    data = qr.to_png(CODE)
    width = int.from_bytes(data[16:20], "big")  # IHDR width
    assert width == len(qr.matrix(CODE)) * 8


def test_text_has_the_right_dimensions_and_ansi_wraps_every_line():
    """to_text: width = symbol + 2 × 4, height = half that rounded up, each line black-on-white."""
    text = qr.to_text(CODE)
    size = len(qr.matrix(CODE))
    lines = text.splitlines()
    assert text.endswith("\n")
    assert len(lines) == (size + 1) // 2
    for line in lines:
        assert line.startswith("\x1b[30;47m") and line.endswith("\x1b[0m")
        assert len(ANSI.sub("", line)) == size


def test_ansi_text_decodes_back_to_the_symbol():
    """The ANSI half blocks draw exactly the dark modules (the last odd row pairs with light)."""
    rows = unrender(qr.to_text(CODE))
    expected = symbol(CODE)
    assert len(expected) % 2 == 1  # this payload exercises the odd last row
    assert rows[: len(expected)] == expected
    assert rows[len(expected):] == [[False] * len(expected)]


def test_plain_text_draws_dark_modules_and_inverted_draws_light_ones():
    """ansi=False has no escapes; invert=True swaps which modules are blocks (dark terminals)."""
    plain = qr.to_text(CODE, ansi=False)
    inverted = qr.to_text(CODE, ansi=False, invert=True)
    assert "\x1b" not in plain and "\x1b" not in inverted
    expected = symbol(CODE)
    assert unrender(plain)[: len(expected)] == expected
    assert unrender(inverted, dark_is_block=False)[: len(expected)] == expected
    # the quiet zone is blank in plain text and solid when inverted
    assert set(plain.splitlines()[0]) == {" "} and set(inverted.splitlines()[0]) == {FULL}


def test_border_is_adjustable():
    """border=2 gives a 4-column-narrower rendering with a 2-module quiet zone."""
    narrow = qr.to_text(CODE, ansi=False, border=2)
    assert len(narrow.splitlines()[0]) == len(qr.matrix(CODE)) - 4
    assert unrender(narrow)[: len(symbol(CODE, 2))] == symbol(CODE, 2)


def test_renderings_are_pure():
    """The same payload always renders to the same bytes and text."""
    assert qr.to_png(CODE) == qr.to_png(CODE)
    assert qr.to_text(CODE) == qr.to_text(CODE)


@pytest.mark.parametrize("bad", ["", None, 42])
def test_empty_or_non_string_payload_is_rejected(bad):
    """An empty or non-string payload raises ValueError rather than rendering nonsense."""
    with pytest.raises(ValueError):
        qr.to_png(bad)
    with pytest.raises(ValueError):
        qr.to_text(bad)
