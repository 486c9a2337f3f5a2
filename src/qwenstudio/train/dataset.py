"""A training folder: images with same-name ``.txt`` captions (the kohya / ai-toolkit convention).

Checked completely before anything loads, so a user learns about *every* bad file at once: images without a
caption, captions without an image, images Pillow cannot read, empty captions. Each image goes into the
aspect-ratio bucket closest to its own (buckets share one pixel area, sides multiples of ``bucket_step``), is
resized to cover the bucket and centre-cropped — the same scheme kohya's bucketing uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidRequest

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
MAX_ASPECT = 4.0


@dataclass(frozen=True)
class Item:
    image: Path
    caption: str
    size: tuple[int, int]  # (width, height) of the bucket


def buckets(resolution: int, step: int) -> list[tuple[int, int]]:
    """(width, height) pairs with area <= resolution², sides multiples of ``step``, aspect within 1:4..4:1."""
    area = resolution * resolution
    out = []
    w = step
    while w <= resolution * 2:
        h = (area // w) // step * step
        if h >= step and max(w / h, h / w) <= MAX_ASPECT:
            out.append((w, h))
        w += step
    return sorted(set(out))


def nearest_bucket(width: int, height: int, options: list[tuple[int, int]]) -> tuple[int, int]:
    ratio = math.log(width / height)
    return min(options, key=lambda wh: (abs(math.log(wh[0] / wh[1]) - ratio), -wh[0] * wh[1]))


def caption_text(raw: str, trigger: str | None) -> str:
    """The caption as trained: ``[trigger]`` in the text is replaced by the trigger word (ai-toolkit's convention);
    otherwise the trigger is prepended, ``"<trigger>, <caption>"`` (kohya's usual layout)."""
    text = " ".join(raw.split())
    if not trigger:
        return text.replace("[trigger]", "").strip()
    if "[trigger]" in text:
        return text.replace("[trigger]", trigger)
    return f"{trigger}, {text}" if text else trigger


def scan(folder: str | Path, *, resolution: int, bucket_step: int, trigger: str | None = None) -> list[Item]:
    """Every (image, caption) pair of ``folder``, bucketed. Raises one InvalidRequest (code ``bad_dataset``)
    listing every problem found."""
    from PIL import Image, UnidentifiedImageError

    root = Path(folder).expanduser()
    if not root.is_dir():
        raise InvalidRequest(f"dataset folder '{folder}' does not exist or is not a folder", code="bad_dataset")
    files = sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
    images = {p.stem: p for p in files if p.suffix.lower() in IMAGE_SUFFIXES}
    captions = {p.stem: p for p in files if p.suffix.lower() == ".txt"}
    dup = sorted({p.name for p in files if p.suffix.lower() in IMAGE_SUFFIXES and images[p.stem] != p})
    problems: dict[str, list[str]] = {
        "images without a .txt caption": sorted(images[s].name for s in images.keys() - captions.keys()),
        "captions without an image": sorted(captions[s].name for s in captions.keys() - images.keys()),
        "images sharing one caption name": dup,
        "unreadable images": [],
        "empty captions": [],
    }
    options = buckets(resolution, bucket_step)
    items: list[Item] = []
    for stem in sorted(images.keys() & captions.keys()):
        path = images[stem]
        try:
            with Image.open(path) as im:
                im.verify()
            with Image.open(path) as im:
                w, h = im.size
                im.load()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            problems["unreadable images"].append(f"{path.name} ({type(e).__name__})")
            continue
        try:
            raw = captions[stem].read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            problems["unreadable images"].append(f"{captions[stem].name} ({type(e).__name__})")
            continue
        if not raw.strip() and not trigger:
            problems["empty captions"].append(captions[stem].name)
            continue
        items.append(Item(path, caption_text(raw, trigger), nearest_bucket(w, h, options)))
    found = {k: v for k, v in problems.items() if v}
    if found:
        text = "; ".join(f"{len(v)} {k}: {', '.join(v[:20])}{' ...' if len(v) > 20 else ''}" for k, v in found.items())
        raise InvalidRequest(f"dataset '{root}' has problems — {text}", code="bad_dataset", detail=found)
    if not items:
        raise InvalidRequest(f"dataset '{root}' has no images ({', '.join(IMAGE_SUFFIXES)}) with captions",
                             code="bad_dataset")
    return items


def load_pixels(item: Item):
    """The image resized to cover its bucket and centre-cropped: [1, 3, H, W] float in [-1, 1]."""
    import numpy as np
    import torch
    from PIL import Image

    tw, th = item.size
    with Image.open(item.image) as im:
        im = im.convert("RGB")
        s = max(tw / im.width, th / im.height)
        nw, nh = max(tw, round(im.width * s)), max(th, round(im.height * s))
        im = im.resize((nw, nh), Image.Resampling.LANCZOS)
        left, top = (nw - tw) // 2, (nh - th) // 2
        im = im.crop((left, top, left + tw, top + th))
        arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).contiguous()


def epoch_batches(items: list[Item], *, repeats: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """One epoch as batches of item indices: each item ``repeats`` times, shuffled by (seed, epoch), grouped so a
    batch holds one bucket size only. Deterministic, so a resumed run sees the same batches."""
    import torch

    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = [i for i in range(len(items)) for _ in range(repeats)]
    order = [order[j] for j in torch.randperm(len(order), generator=g).tolist()]
    by_size: dict[tuple[int, int], list[int]] = {}
    for i in order:
        by_size.setdefault(items[i].size, []).append(i)
    batches = [idx[k:k + batch_size] for idx in by_size.values() for k in range(0, len(idx), batch_size)]
    perm = torch.randperm(len(batches), generator=g).tolist()
    return [batches[j] for j in perm]
