"""``generate --from-image`` on PNGs other tools write: a ComfyUI graph (the peers' t2i template, resized for the
tiny model) and an A1111/Forge ``parameters`` block; what did not map is printed, the render uses the rest."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo
from typer.testing import CliRunner

from qwenstudio.cli.main import app
from qwenstudio.outputs import read_png_metadata

runner = CliRunner()
COMFY_PNG = Path(__file__).parents[1] / "fixtures" / "peers" / "comfyui" / "qwen_t2i_lightning.png"


def png_with(path: Path, **texts: str) -> Path:
    info = PngInfo()
    for k, v in texts.items():
        info.add_text(k, v)
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


def test_from_comfyui_png(tmp_path):
    with Image.open(COMFY_PNG) as im:
        graph = json.loads(im.text["prompt"])
    graph["58"]["inputs"].update(width=64, height=48)
    graph["3"]["inputs"].update(steps=2, model=["66", 0])
    graph["66"]["inputs"]["model"] = ["37", 0]  # without the Lightning LoRA (the tiny model has none)
    del graph["73"]
    src = png_with(tmp_path / "comfy.png", prompt=json.dumps(graph))
    out = tmp_path / "out.png"
    r = runner.invoke(app, ["generate", "--from-image", str(src), "--model", "tiny", "--out", str(out)])
    assert r.exit_code == 0, r.output
    req = read_png_metadata(out)["request"]
    assert (req["width"], req["height"], req["steps"], req["seed"]) == (64, 48, 2, 86754231)
    assert (req["sampler"], req["scheduler"], req["shift"], req["noise"], req["cfg_norm"]) == (
        "euler", "simple", 3.1, "comfy", False)
    assert req["prompt"].startswith("A coffee shop entrance")


def test_from_a1111_png_prints_what_did_not_map(tmp_path):
    src = png_with(tmp_path / "forge.png", parameters=(
        "a lighthouse\nNegative prompt: fog\nSteps: 2, Sampler: DPM++ 2M SDE, Schedule type: KL Optimal, "
        "CFG scale: 1, Seed: 5, Size: 64x48, Hires upscale: 2"))
    out = tmp_path / "out.png"
    r = runner.invoke(app, ["generate", "--from-image", str(src), "--model", "tiny", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "warning: not mapped: Hires upscale: 2" in r.output
    req = read_png_metadata(out)["request"]
    assert (req["sampler"], req["scheduler"], req["seed"], req["prompt"], req["negative_prompt"]) == (
        "dpmpp_2m_sde", "kl_optimal", 5, "a lighthouse", "fog")


def test_from_png_with_unknown_lora_is_one_line_error(tmp_path):
    src = png_with(tmp_path / "lora.png", parameters="a fox <lora:not_here:0.7>\nSteps: 2, Seed: 1, Size: 64x64")
    r = runner.invoke(app, ["generate", "--from-image", str(src), "--model", "tiny", "--out", str(tmp_path / "o.png")])
    assert r.exit_code != 0
    assert "not_here" in r.output and "Traceback" not in r.output
