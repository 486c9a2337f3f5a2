"""Edit behaviour on the tiny model: pixel-aligned output, exact copy outside the mask, input validation."""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from qwenstudio.engine.editing import EditRequest
from qwenstudio.engine.images import load_image
from qwenstudio.engine.specs import get_spec
from qwenstudio.errors import InvalidRequest


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _img(w, h, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr).convert(mode)


@pytest.fixture(scope="module")
def plus_engine(tiny_engine):
    from qwenstudio import Engine

    return Engine(tiny_engine.components, get_spec("tiny-edit-plus"))


def test_odd_size_inpaint_is_pixel_aligned_and_exact_outside_mask(tiny_engine):
    img = _img(517, 389, 1)
    mask = Image.new("L", img.size, 0)
    mask.paste(255, (100, 80, 300, 250))
    res = tiny_engine.edit(prompt="a window", images=[_png(img)], mask=mask, steps=2, seed=1, cfg=1.0)
    out = res.images[0].image
    assert out.size == (517, 389)
    assert (res.request.width, res.request.height) == (528, 400)  # padded to the 16 px grid, not stretched
    a, b, m = np.asarray(out), np.asarray(img), np.asarray(mask) > 127
    assert (a[~m] == b[~m]).all()
    assert (a[m] != b[m]).any()
    meta = res.images[0].metadata
    assert meta["size"] == {"width": 517, "height": 389, "model_width": 528, "model_height": 400}
    assert meta["request"]["mask"]["width"] == 517 and len(meta["request"]["images"][0]["sha256"]) == 64


def test_keep_size_img2img_and_edit_return_input_size(tiny_engine, plus_engine):
    img = _img(77, 45, 2)
    r = tiny_engine.edit(prompt="x", images=[img], keep_size=True, steps=2, seed=1, cfg=1.0)
    assert r.images[0].image.size == (77, 45)
    r = plus_engine.edit(prompt="x", images=[img, _img(40, 40, 3)], keep_size=True, steps=2, seed=1, cfg=1.0)
    assert r.images[0].image.size == (77, 45)
    r = plus_engine.edit(prompt="x", images=[img], steps=2, seed=1, cfg=1.0)  # reference rule: ~area, x32
    assert r.images[0].image.size == (r.request.width, r.request.height) and r.request.width % 32 == 0


def test_mask_size_mismatch_is_resized_with_warning(tiny_engine):
    img = _img(64, 64, 4)
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    with pytest.warns(UserWarning, match="mask was resized"):
        r = tiny_engine.edit(prompt="x", images=[img], mask=mask, steps=2, seed=1, cfg=1.0)
    assert r.images[0].image.size == (64, 64)
    assert any("resized" in n for n in r.images[0].metadata["notes"])


def test_request_round_trip_and_rerun_is_identical(tiny_engine):
    img, other = _png(_img(64, 48, 5)), _png(_img(64, 48, 6))
    a = tiny_engine.edit(prompt="x", images=[img], strength=0.7, steps=3, seed=9, cfg=1.0)
    stored = a.images[0].metadata["request"]
    req = EditRequest.from_dict(stored)
    assert req.images == a.request.images and req.to_dict() == stored
    b = tiny_engine.edit(req, images=[img])
    assert np.array_equal(np.asarray(a.images[0].image), np.asarray(b.images[0].image))
    with pytest.raises(InvalidRequest) as e:
        tiny_engine.edit(req, images=[other])
    assert e.value.code == "image_mismatch"


def test_too_many_images_is_a_clear_error(tiny_engine, plus_engine):
    imgs = [_img(32, 32, i) for i in range(4)]
    with pytest.raises(InvalidRequest) as e:
        plus_engine.edit(prompt="x", images=imgs, steps=2)
    assert e.value.code == "too_many_images" and "at most 3" in str(e.value)
    with pytest.raises(InvalidRequest) as e:
        tiny_engine.edit(prompt="x", images=imgs[:2], steps=2)
    assert e.value.code == "too_many_images"
    with pytest.raises(InvalidRequest) as e:  # control images count towards the edit limit
        plus_engine.edit(prompt="x", images=imgs[:3], controls=[{"image": imgs[3], "mode": "depth"}], steps=2)
    assert e.value.code == "too_many_images"


def test_edit_plus_takes_control_images_as_inputs(plus_engine):
    r = plus_engine.edit(prompt="x", images=[_img(48, 48, 1)], controls=[{"image": _img(48, 48, 2), "mode": "depth"}],
                         steps=2, seed=1, cfg=1.0)
    assert r.images[0].metadata["request"]["controls"][0]["mode"] == "depth"


def test_invalid_requests(tiny_engine):
    img = _img(32, 32)
    for kw, code in [
        (dict(images=[img], strength=1.5), "invalid_strength"),
        (dict(images=[img], strength=0.0), "invalid_strength"),
        (dict(images=[img], feather=-1), "invalid_feather"),
        (dict(mask=img), "missing_image"),
        (dict(controls=[{"image": img, "mode": "depth"}]), "missing_controlnet"),
        (dict(images=[img], controls=[{"image": img, "mode": "bogus"}]), "invalid_control"),
    ]:
        with pytest.raises(InvalidRequest) as e:
            tiny_engine.edit(prompt="x", steps=2, **kw)
        assert e.value.code == code, (kw, e.value.code)
    with pytest.raises(InvalidRequest):
        EditRequest(prompt="x").resolve(get_spec("tiny-edit"))


def _bomb_png(w=100_000, h=100_000) -> bytes:
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    def chunk_bytes(kind, payload):
        c = kind + payload
        return struct.pack(">I", len(payload)) + c + struct.pack(">I", zlib.crc32(c) & 0xFFFFFFFF)

    # a complete, tiny file (a few hundred bytes) whose header claims w x h: decoding it would allocate w*h*3 bytes
    return (b"\x89PNG\r\n\x1a\n" + chunk_bytes(b"IHDR", ihdr) + chunk_bytes(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk_bytes(b"IEND", b""))


def _animated_png() -> bytes:
    buf = io.BytesIO()
    frames = [Image.new("RGB", (8, 8), c) for c in ("red", "blue")]
    frames[0].save(buf, format="PNG", save_all=True, append_images=frames[1:])
    return buf.getvalue()


def _other(fmt) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("data,code", [
    (b"hello, not an image", "unsupported_image"),
    (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>', "unsupported_image"),
    (b"<svg width='10' height='10'></svg>", "unsupported_image"),
    (None, "unsupported_image"),  # GIF
    ("BMP", "unsupported_image"),
    (b"", "invalid_image"),
    (b"\x89PNG\r\n\x1a\n\x00\x00", "invalid_image"),  # truncated
    ("animated", "unsupported_image"),
    ("bomb", "image_too_large"),
])
def test_bad_images_are_typed_errors(data, code):
    if data is None:
        data = _other("GIF")
    elif data == "BMP":
        data = _other("BMP")
    elif data == "animated":
        data = _animated_png()
    elif data == "bomb":
        data = _bomb_png()
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(InvalidRequest) as e:
        load_image(data)
    assert e.value.code == code, str(e.value)
    assert Image.MAX_IMAGE_PIXELS == before  # no global left modified


def test_bomb_is_refused_below_pillows_own_limit_and_per_call_limit():
    with pytest.raises(InvalidRequest) as e:
        load_image(_bomb_png(9000, 9000))  # 81 MP: under Pillow's default guard, over ours
    assert e.value.code == "image_too_large"
    with pytest.raises(InvalidRequest):
        load_image(_png(_img(64, 64)), max_pixels=1000)


def test_grayscale_alpha_jpeg_webp_and_masks():
    gray = load_image(_png(_img(20, 10, mode="L")))
    assert gray.image.mode == "RGB" and gray.ref.format == "png" and (gray.ref.width, gray.ref.height) == (20, 10)
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert load_image(_png(rgba)).image.getpixel((0, 0)) == (255, 255, 255)  # flattened onto white
    for fmt, name in (("JPEG", "jpeg"), ("WEBP", "webp")):
        buf = io.BytesIO()
        _img(16, 16).save(buf, format=fmt)
        assert load_image(buf.getvalue()).ref.format == name
    m = rgba.copy()
    m.putpixel((1, 1), (0, 0, 0, 255))
    mask = load_image(_png(m), mask=True).image  # transparent = edit (OpenAI convention)
    assert mask.mode == "L" and mask.getpixel((0, 0)) == 255 and mask.getpixel((1, 1)) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_image(_png(_img(8, 8)), mask=True)


def test_file_paths_and_missing_files(tmp_path):
    p = tmp_path / "a.webp.png"
    _img(8, 8).save(p, format="PNG")
    assert load_image(p).ref.width == 8
    with pytest.raises(InvalidRequest) as e:
        load_image(tmp_path / "nope.png")
    assert e.value.code == "image_unreadable"
