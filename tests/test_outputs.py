"""PNG metadata: A1111 parameters text + JSON chunk, atomic writes, parsing other tools' PNGs."""

from __future__ import annotations

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from qwenstudio import InvalidRequest
from qwenstudio.outputs import parse_a1111, read_png_metadata, save_png

META = {
    "generator": "qwenstudio test",
    "request": {"prompt": "p", "negative_prompt": "n", "steps": 4, "sampler": "euler", "scheduler": "simple",
                "cfg": 1.0, "seed": 12, "width": 32, "height": 16, "shift": 3.1, "noise": "comfy", "magic": None},
    "model": {"name": "m", "fingerprint": "abc"},
}


def test_round_trip(tmp_path):
    path = save_png(Image.new("RGB", (32, 16), (1, 2, 3)), META, tmp_path / "sub" / "x.png")
    assert read_png_metadata(path) == META
    assert [p.name for p in path.parent.iterdir()] == ["x.png"]  # no temp files left behind
    assert path.stat().st_mode & 0o777 == 0o644


def test_failed_write_leaves_no_partial_file(tmp_path):
    class Broken:
        def save(self, *a, **k):
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        save_png(Broken(), META, tmp_path / "y.png")
    assert list(tmp_path.iterdir()) == []


def test_a1111_png_from_another_tool(tmp_path):
    info = PngInfo()
    info.add_text("parameters", "a castle\nNegative prompt: ugly\nSteps: 20, Sampler: euler, CFG scale: 2.5, "
                                "Seed: 77, Size: 1328x1328, Model: qwen_image_fp8_e4m3fn")
    p = tmp_path / "other.png"
    Image.new("RGB", (8, 8)).save(p, pnginfo=info)
    req = read_png_metadata(p)["request"]
    assert req == {"prompt": "a castle", "negative_prompt": "ugly", "steps": 20, "sampler": "euler", "cfg": 2.5,
                   "seed": 77, "width": 1328, "height": 1328}


def test_parse_multiline_prompt():
    assert parse_a1111("line one\nline two\nSteps: 4, Seed: 1")["prompt"] == "line one\nline two"


def test_no_metadata(tmp_path):
    p = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(p)
    with pytest.raises(InvalidRequest, match="no generation metadata"):
        read_png_metadata(p)
    (tmp_path / "bad.png").write_bytes(b"nope")
    with pytest.raises(InvalidRequest, match="not a readable image"):
        read_png_metadata(tmp_path / "bad.png")
