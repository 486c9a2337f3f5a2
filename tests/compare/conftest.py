"""Fixtures for the compare/grid tests: a CJK-capable font from a PyPI package (no apt needed) and text renderer."""

from __future__ import annotations

from importlib.resources import files

import pytest


@pytest.fixture(scope="session")
def cjk_font_path() -> str:
    # WenQuanYi Micro Hei (Chinese + Latin), shipped by the paperang-p2-fonts-cjk wheel (test extra)
    return str(files("paperang_p2_fonts_cjk") / "fonts" / "wqy-microhei.ttc")


@pytest.fixture(scope="session")
def render_text(cjk_font_path):
    """render_text(lines, size=(w, h)) -> a PIL image with black text on white, one line per entry."""
    from PIL import Image, ImageDraw, ImageFont

    def render(lines, size=(640, 160), font_size=40):
        im = Image.new("RGB", size, "white")
        draw = ImageDraw.Draw(im)
        font = ImageFont.truetype(cjk_font_path, font_size)
        for i, line in enumerate([lines] if isinstance(lines, str) else lines):
            draw.text((24, 24 + i * int(font_size * 1.5)), line, fill="black", font=font)
        return im

    return render


@pytest.fixture(scope="session")
def reader():
    from qwenstudio.compare.ocr import TextReader

    return TextReader()
