"""``qwenstudio edit`` on the tiny model, through the real CLI app."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from qwenstudio.cli.main import app

runner = CliRunner()


def _save(path, w, h, seed=0):
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def test_edit_inpaint_keeps_size_and_writes_metadata(tmp_path):
    img = _save(tmp_path / "in.png", 70, 50)
    mask = Image.new("L", (70, 50), 0)
    mask.paste(255, (10, 10, 40, 30))
    mask.save(tmp_path / "m.png")
    out = tmp_path / "out.png"
    r = runner.invoke(app, ["edit", "a red door", "--image", str(img), "--mask", str(tmp_path / "m.png"),
                            "--steps", "2", "--seed", "3", "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    with Image.open(out) as im:
        assert im.size == (70, 50)
        meta = json.loads(im.text["qwenstudio"])
    assert meta["mode"] == "inpaint" and meta["request"]["keep_size"] is True
    assert meta["request"]["images"][0]["width"] == 70 and "sha256" in meta["request"]["mask"]


def test_edit_plus_with_control_image(tmp_path):
    a, c = _save(tmp_path / "a.png", 48, 48, 1), _save(tmp_path / "depth.png", 48, 48, 2)
    r = runner.invoke(app, ["edit", "make it night", "--variant", "tiny-edit-plus", "--image", str(a),
                            "--control", str(c), "--control-mode", "depth", "--steps", "2", "--out",
                            str(tmp_path / "o.png")])
    assert r.exit_code == 0, r.output
    assert "edit" in r.output


def test_errors_are_one_line_exit_2(tmp_path):
    bad = tmp_path / "x.png"
    bad.write_bytes(b"GIF89a not really")
    r = runner.invoke(app, ["edit", "x", "--image", str(bad), "--steps", "2"])
    assert r.exit_code == 2
    assert r.output.strip().startswith("error:") and len(r.output.strip().splitlines()) == 1
    imgs = [str(_save(tmp_path / f"{i}.png", 16, 16, i)) for i in range(4)]
    r = runner.invoke(app, ["edit", "x", "--variant", "tiny-edit-plus", *sum((["--image", p] for p in imgs), [])])
    assert r.exit_code == 2 and "at most 3" in r.output
    r = runner.invoke(app, ["edit", "x", "--control", imgs[0], "--control-mode", "depth"])
    assert r.exit_code == 2 and "--controlnet" in r.output
