"""Edits over HTTP: uploads by content hash, native edit jobs, OpenAI /v1/images/edits with the official client,
and the input guards (format allowlist, bombs, part limits, traversal-proof upload ids)."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image


def _png(w=70, h=50, color=(200, 30, 30), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (w, h), color).save(buf, format="PNG")
    return buf.getvalue()


def _mask(w=70, h=50) -> bytes:
    m = Image.new("L", (w, h), 0)
    m.paste(255, (20, 10, 50, 40))
    buf = io.BytesIO()
    m.save(buf, format="PNG")
    return buf.getvalue()


def test_upload_then_native_inpaint_job_keeps_size_and_outside_pixels(serve):
    with serve() as s, s.client() as http:
        img = http.post("/api/uploads", files={"file": ("a.png", _png(), "image/png")})
        assert img.status_code == 201 and img.json()["width"] == 70 and len(img.json()["id"]) == 64
        again = http.post("/api/uploads", files={"file": ("b.png", _png(), "image/png")})
        assert again.json()["id"] == img.json()["id"]  # content-addressed
        mask = http.post("/api/uploads", files={"file": ("m.png", _mask(), "image/png")}).json()
        job = http.post("/api/jobs?wait=true", json={"prompt": "a blue square", "images": [img.json()["id"]],
                                                     "mask": mask["id"], "steps": 2, "seed": 3}).json()
        assert job["status"] == "done", job.get("error")
        out = http.get(job["outputs"][0]["url"])
        result = np.asarray(Image.open(io.BytesIO(out.content)).convert("RGB"))
        assert result.shape == (50, 70, 3)
        source = np.asarray(Image.open(io.BytesIO(_png())).convert("RGB"))
        outside = np.asarray(Image.open(io.BytesIO(_mask()))) == 0
        assert np.array_equal(result[outside], source[outside])  # pixel-aligned: untouched pixels are exact
        meta = job["outputs"][0]["metadata"]
        assert meta["request"]["images"][0]["sha256"] == img.json()["id"]


def test_openai_client_edit(serve):
    import openai

    with serve() as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
        res = client.images.edit(model="tiny", image=("a.png", io.BytesIO(_png(64, 48)), "image/png"),
                                 prompt="make it blue", response_format="b64_json",
                                 extra_body={"steps": 2, "seed": 1, "strength": 0.7})
        img = Image.open(io.BytesIO(base64.b64decode(res.data[0].b64_json)))
        assert img.size == (64, 48)
        res = client.images.edit(model="tiny", image=[("a.png", io.BytesIO(_png()), "image/png")],
                                 mask=("m.png", io.BytesIO(_mask()), "image/png"), prompt="x",
                                 extra_body={"steps": 2})
        assert Image.open(io.BytesIO(base64.b64decode(res.data[0].b64_json))).size == (70, 50)
        with pytest.raises(openai.BadRequestError) as e:  # the tiny text-to-image model takes one init image
            client.images.edit(model="tiny", image=[("a.png", io.BytesIO(_png()), "image/png")] * 2, prompt="x")
        assert e.value.code == "too_many_images"


@pytest.mark.parametrize(
    "payload,code",
    [
        (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "unsupported_image"),
        (b"GIF89a" + b"\0" * 40, "unsupported_image"),
        (b"", "invalid_image"),
    ],
)
def test_bad_uploads_are_typed_4xx(serve, payload, code):
    with serve() as s, s.client() as http:
        r = http.post("/api/uploads", files={"file": ("x.png", payload, "image/png")})
        assert r.status_code == 422 and r.json()["error"]["code"] == code


def test_bomb_upload_refused(serve):
    import struct
    import zlib

    # A PNG whose header claims 100000 x 100000 pixels: refused from the header, never decoded.
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    bomb = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b""))
    with serve() as s, s.client() as http:
        r = http.post("/api/uploads", files={"file": ("bomb.png", bomb, "image/png")})
        assert r.status_code == 422 and r.json()["error"]["code"] == "image_too_large"


def test_upload_limits_and_ids(serve):
    with serve() as s, s.client() as http:
        many = {f"f{i}": (f"{i}.png", _png(), "image/png") for i in range(12)}
        r = http.post("/api/uploads", files=many)
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_multipart"
        r = http.post("/api/uploads", content=b"{}", headers={"content-type": "application/json"})
        assert r.status_code == 415
        for bad in ("../../etc/passwd", "a" * 64 + "/../x", "A" * 64, "0" * 63):
            r = http.post("/api/jobs", json={"prompt": "x", "images": [bad]})
            assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_upload_id", bad
        r = http.post("/api/jobs", json={"prompt": "x", "images": ["0" * 64]})
        assert r.status_code == 404 and r.json()["error"]["code"] == "upload_not_found"


def test_upload_cap_is_separate_from_the_json_cap(serve):
    rng = np.random.default_rng(0)
    noisy = Image.fromarray(rng.integers(0, 255, (800, 800, 3), dtype=np.uint8))
    buf = io.BytesIO()
    noisy.save(buf, format="PNG")
    assert 1 << 20 < len(buf.getvalue()) < 4 << 20  # over the JSON cap, under the upload cap
    with serve(max_upload_bytes=4 << 20) as s, s.client() as http:
        assert http.post("/api/uploads", files={"file": ("n.png", buf.getvalue(), "image/png")}).status_code == 201
        r = http.post("/api/jobs", content=b'{"prompt": "' + b"x" * (2 << 20) + b'"}',
                      headers={"content-type": "application/json"})
        assert r.status_code == 413
        big = buf.getvalue() * 3  # over 4 MiB
        assert http.post("/api/uploads", files={"file": ("n.png", big, "image/png")}).status_code == 413
