"""Input images for edits: safe loading, content references, and the resize/pad rules of the reference pipelines.

Every image a user gives (file path, bytes or a PIL image) goes through ``load_image``: the format is sniffed from
the content (PNG, JPEG, WebP only — never trusted from a file name), the byte size and the pixel count are bounded
*before* any pixel is decoded (a PNG header claiming 100k x 100k is refused without allocating it), animated images
are refused, EXIF rotation is applied, and alpha is flattened (onto white for pictures; a mask with transparency
uses it as OpenAI's images/edits does: transparent = edit here). Each image is referenced in requests and metadata
by ``ImageRef`` (sha256 of the bytes + decoded size + format), never embedded.

Pillow's decompression-bomb guard reads a module global (``Image.MAX_IMAGE_PIXELS``); we never change it. Our own
limit is a per-call argument checked against the header size, and Pillow's warning is turned into our error
inside a ``warnings.catch_warnings`` block, so nothing global is left modified.
"""

from __future__ import annotations

import hashlib
import io
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InvalidRequest

MAX_IMAGE_BYTES = 50 * 1024 * 1024
MAX_IMAGE_PIXELS = 40_000_000  # about 7300 x 5500; larger photos should be downscaled first
FORMATS = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp"}


@dataclass(frozen=True)
class ImageRef:
    """A content reference to an input image: what metadata records instead of the pixels."""

    sha256: str
    width: int
    height: int
    format: str

    @classmethod
    def from_dict(cls, data: Any) -> ImageRef:
        if isinstance(data, ImageRef):
            return data
        if not isinstance(data, dict) or set(data) != {"sha256", "width", "height", "format"}:
            raise InvalidRequest(f"an image reference needs sha256, width, height, format; got {data!r}")
        return cls(str(data["sha256"]), int(data["width"]), int(data["height"]), str(data["format"]))


@dataclass(frozen=True)
class LoadedImage:
    image: Any  # PIL.Image.Image, mode "RGB" (pictures) or "L" (masks), EXIF orientation applied
    ref: ImageRef


def sniff_format(data: bytes) -> str | None:
    """'png' | 'jpeg' | 'webp' from the magic bytes, else None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def _describe(data: bytes) -> str:
    head = data[:64].lstrip().lower()
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "a GIF"
    if data.startswith(b"BM"):
        return "a BMP"
    if head.startswith((b"<svg", b"<?xml")) or b"<svg" in head:
        return "an SVG"
    return "not a PNG, JPEG or WebP image"


def read_source(source: Any, *, what: str = "image", max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
    """Bytes of ``source``: bytes/bytearray/memoryview, a path, or a PIL image (re-encoded losslessly as PNG)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif isinstance(source, (str, Path)):
        path = Path(source)
        try:
            size = path.stat().st_size
        except OSError as e:
            raise InvalidRequest(f"cannot read {what} {path}: {e.strerror or e}", code="image_unreadable") from None
        if size > max_bytes:
            raise InvalidRequest(f"{what} {path} is {size} bytes; the limit is {max_bytes}", code="image_too_large")
        data = path.read_bytes()
    elif hasattr(source, "save") and hasattr(source, "size"):  # a PIL image given directly
        buf = io.BytesIO()
        img = source
        if getattr(img, "mode", "RGB") not in ("RGB", "RGBA", "L", "LA"):
            img = img.convert("RGBA" if "A" in img.getbands() else "RGB")
        img.save(buf, format="PNG")
        data = buf.getvalue()
    else:
        raise InvalidRequest(f"{what} must be a file path, bytes or a PIL image, got {type(source).__name__}",
                             code="invalid_image")
    if not data:
        raise InvalidRequest(f"{what} is empty (0 bytes)", code="invalid_image")
    if len(data) > max_bytes:
        raise InvalidRequest(f"{what} is {len(data)} bytes; the limit is {max_bytes}", code="image_too_large")
    return data


def load_image(source: Any, *, what: str = "image", mask: bool = False, max_pixels: int = MAX_IMAGE_PIXELS,
               max_bytes: int = MAX_IMAGE_BYTES) -> LoadedImage:
    """Decode one input image safely (see module doc). ``mask=True`` returns mode "L" (255 = edit here)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    data = read_source(source, what=what, max_bytes=max_bytes)
    fmt = sniff_format(data)
    if fmt is None:
        raise InvalidRequest(f"{what} is {_describe(data)}; use PNG, JPEG or WebP", code="unsupported_image")
    if fmt == "png" and len(data) >= 24 and data[12:16] == b"IHDR":  # refuse from the header alone
        hw, hh = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        if hw * hh > max_pixels:
            raise InvalidRequest(f"{what} claims {hw}x{hh} = {hw * hh} pixels; the limit is {max_pixels}",
                                 code="image_too_large")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data), formats=[k for k, v in FORMATS.items() if v == fmt])
            w, h = im.size
            if w <= 0 or h <= 0:
                raise InvalidRequest(f"{what} has zero size ({w}x{h})", code="invalid_image")
            if w * h > max_pixels:
                raise InvalidRequest(
                    f"{what} is {w}x{h} = {w * h} pixels; the limit is {max_pixels} — downscale it first",
                    code="image_too_large",
                )
            if getattr(im, "is_animated", False) or getattr(im, "n_frames", 1) > 1:
                raise InvalidRequest(f"{what} is animated; give a single still frame", code="unsupported_image")
            im.load()
            im = ImageOps.exif_transpose(im)
        except InvalidRequest:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise InvalidRequest(f"{what} claims a size too large to decode safely", code="image_too_large") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
            raise InvalidRequest(f"{what} is a damaged or truncated {fmt.upper()} file ({e})",
                                 code="invalid_image") from None
    w, h = im.size
    ref = ImageRef(hashlib.sha256(data).hexdigest(), w, h, fmt)
    return LoadedImage(_to_mask(im) if mask else _to_rgb(im), ref)


def _has_alpha(im) -> bool:
    return im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)


def _to_rgb(im):
    """Pictures: alpha flattened onto white (what a viewer shows), 16-bit and palette images to 8-bit RGB."""
    from PIL import Image

    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        import numpy as np

        arr = np.asarray(im, dtype=np.float64)
        im = Image.fromarray((arr / max(arr.max(), 1) * 255).round().astype("uint8"), "L")
    if _has_alpha(im):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return im.convert("RGB")


def _to_mask(im):
    """Masks: white = edit. An image with real transparency is read as OpenAI's edit masks are: transparent =
    edit (mask = 255 - alpha). Otherwise its luminance is the mask."""
    if _has_alpha(im):
        alpha = im.convert("RGBA").getchannel("A")
        if alpha.getextrema() != (255, 255):
            from PIL import ImageChops

            return ImageChops.invert(alpha)
    return im.convert("L")


# ---- the reference pipelines' size rules ------------------------------------------------------------------------

def area_dimensions(target_area: int, ratio: float, multiple: int = 32) -> tuple[int, int]:
    """diffusers' ``calculate_dimensions``: about ``target_area`` pixels at aspect ``ratio`` (w/h), each side
    rounded to a multiple of 32 (Python's round: half to even, as the reference)."""
    width = math.sqrt(target_area * ratio)
    height = width / ratio
    return max(multiple, round(width / multiple) * multiple), max(multiple, round(height / multiple) * multiple)


def ceil_to(value: int, multiple: int = 16) -> int:
    return -(-value // multiple) * multiple


def resize(img, width: int, height: int):
    """The reference ``VaeImageProcessor.resize`` for PIL images (Lanczos; same size -> a copy)."""
    from PIL import Image

    return img.resize((width, height), resample=Image.LANCZOS)


def pad_to(img, width: int, height: int):
    """Pad (never stretch) ``img`` at the bottom/right to ``width`` x ``height`` by repeating its edge pixels."""
    import numpy as np
    from PIL import Image

    w, h = img.size
    if (w, h) == (width, height):
        return img
    arr = np.asarray(img)
    pad = ((0, height - h), (0, width - w)) + (((0, 0),) if arr.ndim == 3 else ())
    return Image.fromarray(np.pad(arr, pad, mode="edge"), img.mode)


def to_tensor(img):
    """PIL RGB -> float tensor [1, 3, H, W] in [-1, 1] (the reference ``preprocess`` after its resize)."""
    import numpy as np
    import torch

    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0) * 2.0 - 1.0


def mask_to_array(mask_img):
    """PIL "L" -> float32 numpy [H, W] in [0, 1]."""
    import numpy as np

    return np.asarray(mask_img, dtype=np.float32) / 255.0
