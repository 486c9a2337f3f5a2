"""`qwenstudio compare` on the tiny model: a 2-prompt subset of the built-in Lightning-report suite on two variants
(one a Lightning LoRA whose recipe sets steps/CFG), the report, the plan, and resume after a real kill."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from qwenstudio.cli.main import app
from qwenstudio.engine.loading import load_diffusers_folder
from qwenstudio.outputs import read_png_metadata
from qwenstudio.testing.loras import write_lora

runner = CliRunner()


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, tiny_folder):
    d = tmp_path_factory.mktemp("compare-models")
    dit = load_diffusers_folder(tiny_folder, device="cpu").transformer
    write_lora(d / "loras" / "tiny-Lightning-2steps.safetensors", dit, "diffusers", seed=5)
    for name in ("Qwen-Image-Lightning-8steps-V1.1", "Qwen-Image-Lightning-4steps-V1.0"):  # the suite's LoRA names
        write_lora(d / "loras" / f"{name}.safetensors", dit, "comfy", seed=6)
    return d


def _records(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_compare_suite_subset_two_variants(tmp_path, models_dir):
    out = tmp_path / "cmp"
    args = ["compare", "--suite", "lightning-report", "--case", "pi-meeting-room,capybara-hello-world",
            "--variant", "base:steps=3", "--variant", "fast:lora=tiny-Lightning-2steps:1", "--model", "tiny",
            "--models-dir", str(models_dir), "--out", str(out)]
    r = runner.invoke(app, [*args, "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)["summary"]
    recs = _records(out)
    assert [(x["variant"], x["case"], x["seed"]) for x in recs] == [
        ("base", "pi-meeting-room", 42), ("base", "capybara-hello-world", 42),
        ("fast", "pi-meeting-room", 42), ("fast", "capybara-hello-world", 42)]
    for x in recs:
        req = read_png_metadata(out / x["image"])["request"]
        assert req == x["request"] and req["seed"] == 42 and req["width"] == 64
        if x["variant"] == "base":
            assert (req["steps"], req["cfg"], x["nfe"]) == (3, 4.0, 6)
        else:  # the Lightning LoRA's recipe: 2 steps (from its name), CFG 1, shift 3 — set by the engine
            assert (req["steps"], req["cfg"], req["shift"], x["nfe"]) == (2, 1.0, 3.0, 2)
            assert req["loras"] == [{"name": "tiny-Lightning-2steps", "weight": 1.0}]
        assert x["seconds"] > 0 and x["peak_memory"]["bytes"] > 0
        assert x["text"]["verdict"] == "❌"  # random weights draw noise, never the text
    hello = next(x for x in recs if x["case"] == "capybara-hello-world")
    assert [s["expected"] for s in hello["text"]["strings"]] == ["Hello World"]
    base, fast = summary["variants"]["base"], summary["variants"]["fast"]
    assert (base["images"], base["nfe"], base["speedup"]) == (2, "6", 1.0)
    assert (base["text_scored"], base["text_passed"]) == (2, 0)
    assert fast["nfe"] == "2" and fast["speedup"] == pytest.approx(base["mean_seconds"] / fast["mean_seconds"])
    assert summary["categories"] == {"long numbers": {"base": [0, 1], "fast": [0, 1]},
                                     "hair": {"base": [0, 1], "fast": [0, 1]}}
    html = (out / "report.html").read_text()
    srcs = re.findall(r'<img src="([^"]+)"', html)
    assert sorted(srcs) == sorted(x["image"] for x in recs) and all((out / s).is_file() for s in srcs)
    assert "speed-up vs first" in html and "CER" in html and "tiny-Lightning-2steps" in html
    assert html.count('class="request"') == 4  # every image's exact request
    assert "<script" not in html and "http" not in html.split("</style>")[0]  # no external resources
    md = (out / "report.md").read_text()
    assert md.count("](images/") == 4 and "| fast (`fast:lora=tiny-Lightning-2steps:1`) | 2 |" in md

    r = runner.invoke(app, [*args, "--dry-run"])  # everything done: the plan says so, nothing runs
    assert r.exit_code == 0 and "= 4 images (4 already done)" in r.output, r.output


def test_builtin_suite_with_its_own_variants(tmp_path, models_dir):
    """The Lightning report's layout on the tiny model: base 50 steps CFG 4 (NFE 100), the 8- and 4-step LoRAs at
    CFG 1 (steps from their recipes), and the report's own verdicts shown beside ours."""
    out = tmp_path / "lightning"
    r = runner.invoke(app, ["compare", "--case", "chalkboard-sentence", "--model", "tiny", "--models-dir",
                            str(models_dir), "--out", str(out), "--no-warmup", "--no-ocr"])
    assert r.exit_code == 0, r.output
    recs = _records(out)
    assert [(x["variant"], x["nfe"], x["request"]["steps"], x["request"]["cfg"]) for x in recs] == [
        ("Base NFE=100", 100, 50, 4.0), ("8steps-V1.1 NFE=8", 8, 8, 1.0), ("4steps-V1.0 NFE=4", 4, 4, 1.0)]
    html = (out / "report.html").read_text()
    assert "the reference report's verdicts: Base NFE=100 <span class=\"bad\">✗ fail</span>" in html
    assert "foundational image generation model" in html


def test_dry_run_prints_the_suite_plan_with_estimates():
    r = runner.invoke(app, ["compare", "--model", "qwen_image_bf16", "--dry-run", "--json"])
    assert r.exit_code == 0, r.output
    plan = json.loads(r.stdout)
    assert plan["images"] == 33 and len(plan["cases"]) == 11 and plan["seeds"] == [42]
    steps = {v["variant"]: v for v in plan["variants"]}
    assert list(steps) == ["Base NFE=100", "8steps-V1.1 NFE=8", "4steps-V1.0 NFE=4"]
    b, l8, l4 = (steps[k]["seconds"] for k in steps)
    assert b > l8 > l4 > 0 and "H100" in steps["Base NFE=100"]["basis"]
    r = runner.invoke(app, ["compare", "--model", "qwen_image_bf16", "--dry-run"])
    assert "704x1280 (floored" in r.output


def test_bad_variant_and_suite_are_one_line_errors(tmp_path):
    for args, text in ((["--variant", ":steps=2"], "has no label"), (["--variant", "a:stepz=2"], "unknown setting"),
                       (["--suite", str(tmp_path / "nope.json")], "no suite"),
                       (["--case", "nope"], "has no case 'nope'")):
        r = runner.invoke(app, ["compare", *args, "--dry-run"])
        assert r.exit_code == 2 and text in r.output and "Traceback" not in r.output, r.output


def test_resume_after_kill_runs_only_the_rest(tmp_path):
    suite = tmp_path / "suite.txt"
    suite.write_text("# three prompts, no quoted text (no OCR needed)\na lighthouse\na red door\n\na boat at dawn\n")
    out = tmp_path / "run"
    args = ["compare", "--suite", str(suite), "--variant", "a:steps=2", "--variant", "b:steps=1,cfg=1",
            "--seed", "1", "--seed", "2", "--no-warmup", "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "qwenstudio.cli.main", *args], env=dict(os.environ),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    results = out / "results.jsonl"
    deadline = time.monotonic() + 120
    while not (results.exists() and results.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()[-2000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    before = results.read_text().splitlines()
    done = len([ln for ln in before if ln.endswith("}")])
    assert 2 <= done < 12

    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert f"resuming: {done} image(s) already done, {12 - done} to go" in r.output
    assert len(re.findall(rf"\[\d+/{12 - done}\]", r.output)) == 12 - done  # only the rest ran
    recs = _records(out)
    assert len({x["key"] for x in recs}) == 12 and len(recs) == 12
    assert [json.dumps(x, ensure_ascii=False) for x in recs[:done]] == before[:done]  # first run's results kept
    assert (out / "report.html").read_text().count("<img ") == 12

    changed = [a if a != "b:steps=1,cfg=1" else "b:steps=2,cfg=1" for a in args]  # one variant changed
    r = runner.invoke(app, changed)
    assert r.exit_code == 0 and "resuming: 6 image(s) already done, 6 to go" in r.output, r.output


def test_missing_lora_fails_before_anything_runs(tmp_path):
    out = tmp_path / "x"
    r = runner.invoke(app, ["compare", "--case", "1", "--model", "tiny", "--out", str(out)])  # the suite's variants
    assert r.exit_code == 2, r.output
    assert "variant '8steps-V1.1 NFE=8': no LoRA named 'Qwen-Image-Lightning-8steps-V1.1'" in r.output
    assert not (out / "results.jsonl").exists()
