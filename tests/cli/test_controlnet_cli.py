"""ControlNets by name on the command line: ``edit --controlnet NAME``, ``generate --controlnet NAME --control``,
and ``--from-image`` re-creating a ControlNet run (the ControlNet is recorded in the PNG's request)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from qwenstudio.cli.main import app

runner = CliRunner()


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    from qwenstudio.testing.tiny import write_controlnet_file

    root = tmp_path_factory.mktemp("cli-models")
    write_controlnet_file(root / "controlnet" / "tiny-union.safetensors")
    return root


def _save(path, w, h, seed=0):
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def _meta(path):
    with Image.open(path) as im:
        return json.loads(im.text["qwenstudio"]), np.asarray(im.convert("RGB"))


def test_edit_controlnet_by_name_and_from_image(tmp_path, home):
    ctrl = _save(tmp_path / "depth.png", 64, 48, 1)
    out = tmp_path / "a.png"
    r = runner.invoke(app, ["edit", "a robot", "--control", str(ctrl), "--control-mode", "depth", "--controlnet",
                            "tiny-union", "--models-dir", str(home), "--steps", "2", "--seed", "5", "--out", str(out)])
    assert r.exit_code == 0, r.output
    meta, pixels = _meta(out)
    assert meta["request"]["controlnet"] == "tiny-union" and meta["mode"] == "controlnet"
    again = tmp_path / "b.png"
    r = runner.invoke(app, ["edit", "--from-image", str(out), "--control", str(ctrl), "--models-dir", str(home),
                            "--out", str(again)])
    assert r.exit_code == 0, r.output
    meta2, pixels2 = _meta(again)
    assert meta2["request"] == meta["request"] and np.array_equal(pixels, pixels2)
    other = _save(tmp_path / "other.png", 64, 48, 2)
    r = runner.invoke(app, ["edit", "--from-image", str(out), "--control", str(other), "--models-dir", str(home)])
    assert r.exit_code == 2 and "not the ones" in r.output


def test_generate_time_control_by_name_and_from_image(tmp_path, home):
    ctrl = _save(tmp_path / "pose.png", 64, 64, 3)
    out = tmp_path / "g.png"
    r = runner.invoke(app, ["generate", "a dancer", "--controlnet", "tiny-union", "--control", str(ctrl),
                            "--control-scale", "0.7", "--models-dir", str(home), "--steps", "2", "--seed", "1",
                            "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    meta, pixels = _meta(out)
    assert meta["request"]["controlnet"] == "tiny-union" and meta["request"]["controls"][0]["scale"] == 0.7
    again = tmp_path / "g2.png"
    r = runner.invoke(app, ["generate", "--from-image", str(out), "--control", str(ctrl), "--models-dir", str(home),
                            "--out", str(again), "--json"])
    assert r.exit_code == 0, r.output
    assert np.array_equal(pixels, _meta(again)[1])


def test_unknown_controlnet_name_is_one_line_exit_2(tmp_path, home):
    ctrl = _save(tmp_path / "c.png", 64, 64, 4)
    for cmd in (["edit", "x"], ["generate", "x"]):
        r = runner.invoke(app, [*cmd, "--control", str(ctrl), "--controlnet", "nope", "--models-dir", str(home),
                                "--steps", "2"])
        assert r.exit_code == 2 and "no controlnet named 'nope'" in r.output.lower(), r.output
    r = runner.invoke(app, ["generate", "x", "--controlnet", "tiny-union", "--models-dir", str(home), "--steps", "2"])
    assert r.exit_code == 2 and "go together" in r.output
