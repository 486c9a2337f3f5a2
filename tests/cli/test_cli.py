"""The CLI end to end on the tiny model: PNG with metadata, --from-image bit-identical, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from qwenstudio.cli.main import app
from qwenstudio.outputs import read_png_metadata

runner = CliRunner()


def run(*args):
    return runner.invoke(app, list(args))


def test_generate_writes_png_with_both_metadata_chunks(tmp_path):
    out = tmp_path / "fox.png"
    r = run("generate", "a red fox", "--model", "tiny", "--seed", "1", "--steps", "3", "--out", str(out))
    assert r.exit_code == 0, r.output
    with Image.open(out) as im:
        assert im.size == (64, 64)
        params = im.text["parameters"]
        meta = json.loads(im.text["qwenstudio"])
    assert params.startswith("a red fox\nNegative prompt:  \nSteps: 3, Sampler: Euler, Schedule type: reference")
    assert "Seed: 1, Size: 64x64" in params
    assert meta["request"]["seed"] == 1 and meta["request"]["steps"] == 3 and meta["model"]["variant"] == "tiny"
    assert meta["seed"] == 1 and meta["noise"] == "diffusers"


def test_from_image_recreates_bit_identical_pixels(tmp_path):
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    r = run("generate", "a lighthouse", "--steps", "3", "--cfg", "3", "--negative", "fog", "--sampler", "dpmpp_2m",
            "--scheduler", "karras", "--shift", "2.5", "--width", "80", "--height", "48", "--out", str(first))
    assert r.exit_code == 0, r.output
    r = run("generate", "--from-image", str(first), "--out", str(second))
    assert r.exit_code == 0, r.output
    a, b = np.asarray(Image.open(first)), np.asarray(Image.open(second))
    assert a.shape == (48, 80, 3) and np.array_equal(a, b)
    assert read_png_metadata(first)["request"] == read_png_metadata(second)["request"]


def test_batch_json_output(tmp_path):
    r = run("generate", "boats", "--batch", "2", "--seed", "9", "--steps", "2", "--out", str(tmp_path), "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert [im["seed"] for im in data["images"]] == [9, 10]
    assert all(os.path.exists(im["path"]) for im in data["images"])
    assert data["timings"]["total"] > 0


@pytest.mark.parametrize(
    "args,message",
    [
        (["--width", "100"], "width 100 is not a multiple of 16; nearest valid: 96"),
        (["--steps", "0"], "steps 0 out of range"),
        (["--sampler", "dpm_fast"], "unknown sampler 'dpm_fast'; valid: euler"),
        (["--model", "/no/such/folder"], "not found"),
    ],
)
def test_bad_input_is_one_line_nonzero_exit(args, message):
    r = run("generate", "x", *args)
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]


def test_unreadable_model_folder(tmp_path):
    (tmp_path / "model_index.json").write_text("{not json")
    for c in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        (tmp_path / c).mkdir()
    r = run("generate", "x", "--model", str(tmp_path))
    assert r.exit_code == 2 and "not valid JSON" in r.stderr


def test_models_lists_variants():
    r = run("models", "--json")
    assert r.exit_code == 0
    names = [m["name"] for m in json.loads(r.stdout)["variants"]]
    assert {"qwen-image", "qwen-image-2512", "qwen-image-lightning-4step", "qwen-image-lightning-8step", "tiny"} <= set(names)


def test_real_process_exit_code_and_single_line(tmp_path):
    env = {**os.environ}
    p = subprocess.run([sys.executable, "-m", "qwenstudio.cli.main", "generate", "x", "--height", "33"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip() == "error: height 33 is not a multiple of 16; nearest valid: 32"


def test_lora_flags(tmp_path, monkeypatch, tiny_folder):
    from qwenstudio.engine.loading import load_diffusers_folder
    from qwenstudio.testing.loras import write_lora

    model = load_diffusers_folder(tiny_folder, device="cpu").transformer
    lora_path, _ = write_lora(tmp_path / "models" / "loras" / "my_style.safetensors", model, "comfy", seed=5)
    out = tmp_path / "l.png"
    r = run("generate", "x", "--steps", "2", "--seed", "1", "--models-dir", str(tmp_path / "models"),
            "--lora", "my_style:0.7", "--out", str(out))
    assert r.exit_code == 0, r.output
    meta = read_png_metadata(out)
    assert meta["request"]["loras"] == [{"name": "my_style", "weight": 0.7}]
    from qwenstudio.interop.settings import a1111_short_hash

    assert meta["loras"] == [{"name": "my_style", "weight": 0.7, "file": "my_style.safetensors",
                              "hash": a1111_short_hash(lora_path)}]
    assert f'Lora hashes: "my_style: {a1111_short_hash(lora_path)}"' in Image.open(out).text["parameters"]
    r = run("generate", "x", "--steps", "2", "--loras", "my_style : 0.5, missing_one : 1", "--models-dir",
            str(tmp_path / "models"))
    assert r.exit_code == 2 and "missing_one" in r.stderr


def test_bench_prints_ratios_against_stock_diffusers():
    r = run("bench", "--steps", "2", "--repeats", "1", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert set(report["ratio_ours_over_stock"]) == {"text_encode", "step", "vae_decode", "total", "cpu_total"}
    assert all(v > 0 for v in report["ratio_ours_over_stock"].values())
    assert report["max_pixel_diff"] <= 1  # same weights, same seed: the same image
    assert len(report["steps_last_run"]["ours"]) == 1  # per-step times (after the first step)


def test_bad_or_unavailable_device_and_non_png_out_are_one_line_errors(tmp_path):
    for args, want in [(["--device", "foo"], "error: unknown device 'foo'; available here: cpu"),
                       (["--device", "cuda"], "error: device 'cuda' is not available on this machine; available: cpu"),
                       (["--device", "mps"], "error: device 'mps' is not available on this machine; available: cpu"),
                       (["--out", str(tmp_path / "x.jpg")], "error: --out")]:
        r = runner.invoke(app, ["generate", "x", "--steps", "1", *args])
        assert r.exit_code == 2, r.output
        assert r.output.strip().splitlines() == [r.output.strip()] and r.output.strip().startswith(want), r.output
    assert not (tmp_path / "x.jpg").exists()
    r = runner.invoke(app, ["edit", "x", "--image", str(tmp_path / "none.png"), "--device", "cuda:3"])
    assert r.exit_code == 2 and "not available" in r.output


def test_from_image_reads_a_png_swarmui_wrote(tmp_path):
    """A PNG whose metadata SwarmUI's own writer made (tests/fixtures/peers/swarmui): its settings run here.
    The size is overridden (the PNG asks for 1584x1072: SwarmUI's side length 1328 at 3:2) to keep the tiny run small."""
    png = os.path.join(os.path.dirname(__file__), "..", "fixtures", "peers", "swarmui", "swarmui_side_length.png")
    out = tmp_path / "again.png"
    r = run("generate", "--from-image", png, "--model", "tiny", "--width", "64", "--height", "48", "--steps", "2",
            "--out", str(out))
    assert r.exit_code == 0, r.output
    meta = read_png_metadata(out)
    req = meta["request"]
    assert (req["prompt"], req["seed"], req["cfg"], req["sampler"], req["scheduler"]) == (
        "a red bicycle", 7, 2.5, "euler", "simple")
    assert (req["noise"], req["cfg_norm"]) == ("comfy", False)  # SwarmUI renders with ComfyUI's conventions
    assert meta["settings_from"]["shift"] == "compat comfy" and meta["settings_from"]["width"] == "user"
