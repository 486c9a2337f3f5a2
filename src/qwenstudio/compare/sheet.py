"""Contact sheets: images in a labelled grid (x values across, y values down, one block per z value)."""

from __future__ import annotations

from pathlib import Path

# Fonts tried in order for labels (CJK-capable first, so prompt_sr labels in Chinese render); Pillow's bundled
# default font (Latin only) when none is installed.
_FONT_CANDIDATES = (
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
)


def label_font(size: int):
    from PIL import ImageFont

    for path in _FONT_CANDIDATES:
        if Path(path).exists():
            try:
                return ImageFont.truetype(path, size)
            except OSError:
                continue
    return ImageFont.load_default(size=size)


def _fit(image, box: int):
    """Scale to fit a ``box`` square (nearest-neighbour when enlarging, so tiny images stay crisp)."""
    from PIL import Image

    w, h = image.size
    s = box / max(w, h)
    resample = Image.Resampling.NEAREST if s > 1 else Image.Resampling.LANCZOS
    return image.resize((max(1, round(w * s)), max(1, round(h * s))), resample)


def _wrap(draw, text: str, font, width: int) -> list[str]:
    words, lines, cur = list(text), [], ""
    for ch in words:  # by character: works for Chinese and for long unspaced values alike
        if draw.textlength(cur + ch, font=font) > width and cur:
            lines.append(cur)
            cur = ch.lstrip()
        else:
            cur += ch
    return [*lines, cur] if cur else lines


def contact_sheet(cells: dict[tuple[int, int, int], object], x_labels: list[str], y_labels: list[str],
                  z_labels: list[str], title: str = "", cell: int | None = None):
    """A PIL image: for each z, a header, then a row of x labels and one row of images per y value with its label
    at the left. ``cells`` maps (ix, iy, iz) to PIL images (missing cells stay blank)."""
    from PIL import Image, ImageDraw

    if cell is None:
        biggest = max((max(im.size) for im in cells.values()), default=128)
        cell = min(512, max(160, biggest))
    pad, fs = 8, max(12, cell // 12)
    font, big = label_font(fs), label_font(int(fs * 1.3))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left = min(260, max([int(probe.textlength(t, font=font)) + 1 for t in y_labels] + [0]) + 3 * pad)
    left = max(left, pad) if any(y_labels) else pad
    head_lines = max(len(_wrap(probe, t, font, cell)) for t in x_labels)
    head = head_lines * (fs + 4) + pad
    z_head = (int(fs * 1.3) + 2 * pad) if any(z_labels) else 0
    title_h = (int(fs * 1.3) + 2 * pad) if title else 0
    block_h = z_head + head + len(y_labels) * (cell + pad)
    width = left + len(x_labels) * (cell + pad) + pad
    sheet = Image.new("RGB", (width, title_h + len(z_labels) * block_h + pad), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((pad, pad), _wrap(draw, title, big, width - 2 * pad)[0], fill="black", font=big)
    for iz, zl in enumerate(z_labels):
        top = title_h + iz * block_h
        if zl:
            draw.text((pad, top + pad), zl, fill="#1a4d8f", font=big)
        top += z_head
        for ix, xl in enumerate(x_labels):
            x0 = left + ix * (cell + pad)
            for k, line in enumerate(_wrap(draw, xl, font, cell)):
                draw.text((x0, top + k * (fs + 4)), line, fill="black", font=font)
        for iy, yl in enumerate(y_labels):
            y0 = top + head + iy * (cell + pad)
            for k, line in enumerate(_wrap(draw, yl, font, left - 2 * pad)[:4]):
                draw.text((pad, y0 + k * (fs + 4)), line, fill="black", font=font)
            for ix in range(len(x_labels)):
                im = cells.get((ix, iy, iz))
                x0 = left + ix * (cell + pad)
                draw.rectangle([x0 - 1, y0 - 1, x0 + cell, y0 + cell], outline="#cccccc")
                if im is not None:
                    thumb = _fit(im.convert("RGB"), cell)
                    sheet.paste(thumb, (x0 + (cell - thumb.width) // 2, y0 + (cell - thumb.height) // 2))
    return sheet
