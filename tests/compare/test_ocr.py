"""OCR verdicts on Pillow-rendered text (English and Chinese, from a known font), and `compare score` on PNGs written
by us and by another tool (A1111 `parameters` chunk only)."""

from __future__ import annotations

import json

from PIL.PngImagePlugin import PngInfo
from typer.testing import CliRunner

from qwenstudio.cli.main import app
from qwenstudio.outputs import save_png

runner = CliRunner()


def test_chinese_and_numbers_read_exactly(reader, render_text):  # (English: the CLI test below)
    zh = reader.score(render_text(["阿里云 云存储", "3.14159265-358979"]), "牌子上写着“阿里云”和「云存储」，墙上写着"
                                                                        '"3.14159265-358979"')
    assert [s.verdict for s in zh.strings] == ["✅", "✅", "✅"], zh.to_dict()


def test_a_wrong_rendering_scores_a_cross(reader, render_text):
    prompt = 'a chalkboard: "a foundational model", a neon sign "云计算"'
    s = reader.score(render_text(["a fundational model", "云计划"]), prompt)  # one letter missing, 算 -> 划
    assert s.passed is False and s.verdict == "❌"
    assert [x.passed for x in s.strings] == [False, False]
    assert all(0 < x.cer <= 0.34 for x in s.strings), s.to_dict()  # near misses, not blank reads


def test_score_cli_reads_prompts_from_metadata(tmp_path, render_text):
    ours = tmp_path / "ours.png"
    save_png(render_text("Hello World"), {"request": {"prompt": 'a sign "Hello World"', "negative_prompt": " ",
                                                      "steps": 4, "sampler": "euler", "scheduler": "reference",
                                                      "cfg": 1.0, "seed": 1, "width": 640, "height": 160,
                                                      "noise": "diffusers"}, "model": {"name": "x"}}, ours)
    other = tmp_path / "a1111.png"
    info = PngInfo()
    info.add_text("parameters", 'a poster reading "云计算"\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, '
                                "CFG scale: 7, Seed: 3, Size: 640x160")
    render_text("云计划").save(other, pnginfo=info)  # wrong character on purpose
    r = runner.invoke(app, ["compare", "score", str(ours), str(other), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert [o["verdict"] for o in out] == ["✅", "❌"]
    assert out[0]["strings"][0]["exact"] and out[0]["cer"] == 0
    assert out[0]["expected_from"] == "metadata" and out[1]["expected_from"] == "A1111 parameters"
    assert out[1]["strings"][0] | {"found": None} == {"expected": "云计算", "found": None, "distance": 1, "cer": 0.3333,
                                                    "exact": False, "passed": False, "verdict": "❌"}
    r = runner.invoke(app, ["compare", "score", str(other), "--prompt", 'text "云计划"', "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["verdict"] == "✅"


def test_score_cli_without_any_prompt_is_a_one_line_error(tmp_path, render_text):
    bare = tmp_path / "bare.png"
    render_text("x").save(bare)
    r = runner.invoke(app, ["compare", "score", str(bare)])
    assert r.exit_code == 2 and "pass --prompt or --expect" in r.output and "Traceback" not in r.output
