"""The loss curve as a PNG drawn with Pillow (already a dependency; matplotlib would be a heavy one for one plot).

Raw per-step losses as light dots, their exponential moving average as a line, step and loss axes with ticks.
"""

from __future__ import annotations

from pathlib import Path


def ema(values: list[float], beta: float = 0.9) -> list[float]:
    out, acc = [], None
    for v in values:
        acc = v if acc is None else beta * acc + (1 - beta) * v
        out.append(acc)
    return out


def plot_losses(losses: list[float], path: str | Path, *, title: str = "training loss", size=(800, 400)) -> Path:
    from PIL import Image, ImageDraw

    w, h = size
    left, right, top, bottom = 70, 20, 30, 40
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    d.text((left, 8), f"{title} ({len(losses)} steps)", fill="black")
    pw, ph = w - left - right, h - top - bottom
    d.rectangle([left, top, left + pw, top + ph], outline="black")
    if losses:
        lo, hi = min(losses), max(losses)
        if hi - lo < 1e-12:
            lo, hi = lo - 0.5, hi + 0.5
        n = max(len(losses) - 1, 1)

        def xy(i, v):
            return left + pw * i / n, top + ph * (1 - (v - lo) / (hi - lo))

        for i, v in enumerate(losses):
            x, y = xy(i, v)
            d.ellipse([x - 1.5, y - 1.5, x + 1.5, y + 1.5], fill=(150, 180, 230))
        smooth = ema(losses)
        if len(smooth) > 1:
            d.line([xy(i, v) for i, v in enumerate(smooth)], fill=(200, 40, 40), width=2)
        for k in range(5):
            v = lo + (hi - lo) * k / 4
            _, y = xy(0, v)
            d.line([left - 4, y, left, y], fill="black")
            d.text((4, y - 6), f"{v:.4g}", fill="black")
        for k in range(5):
            i = round(n * k / 4)
            x, _ = xy(i, lo)
            d.line([x, top + ph, x, top + ph + 4], fill="black")
            d.text((x - 8, top + ph + 8), str(i + 1), fill="black")
        d.text((left + pw - 150, top + 6), "- EMA(0.9)   . per step", fill=(200, 40, 40))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
