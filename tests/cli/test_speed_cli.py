"""Speed options at the CLI: the bench reports each lossy option's error against the exact run, the engine options
are typed one-line errors when wrong, and the GPU check script runs its CPU dry run offline."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from qwenstudio.cli.main import app

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[2]


def run(*args):
    return runner.invoke(app, list(args))


def test_bench_reports_lossy_options_against_the_exact_run(tmp_path):
    save = tmp_path / "bench"
    r = run("bench", "--steps", "6", "--repeats", "1", "--cache", "0.5", "--quant", "fp8,int4", "--json", "--save",
            str(save))
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["max_pixel_diff"] <= 1 and report["options"] == {"compile": False, "attention": "native"}
    cache, fp8, int4 = report["variants"]
    # int4 quantizes the float DiT again (an fp8 one would be refused: quant_needs_float_base), with its error and bytes
    assert int4["name"] == "int4" and int4["int4_layers_quantized"] > 0 and 0 < int4["latent_rel_l2"] < 0.2
    assert int4["dit_weight_bytes"] < int4["dit_weight_bytes_float"] == fp8["dit_weight_bytes_float"]
    # 6 steps x CFG as one batched forward = 6 transformer calls
    assert cache["name"] == "step cache 0.5" and cache["calls"] == 6 and cache["reused"] + cache["computed"] == 6
    assert fp8["name"] == "fp8" and fp8["fp8_compute"] == "emulate" and fp8["fp8_layers"] > 0
    for v in (cache, fp8):
        assert 20 < v["psnr_db"] and v["latent_rel_l2"] < 0.2 and v["total"] > 0
    assert 0 < fp8["latent_rel_l2"]  # fp8 is lossy: the report must show it
    assert json.loads(save.with_suffix(".json").read_text())["variants"][1]["name"] == "fp8"
    md = save.with_suffix(".md").read_text()
    assert "| stage | stock diffusers (s) | qwenstudio (s) | ours/stock |" in md and "| fp8 |" in md
    assert "| int4 |" in md and "int4 layers; DiT weights" in md
    r = run("bench", "--quant", "fp8,int3")
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "unknown quant 'int3'" in r.output


def test_generate_speed_options_are_recorded_and_typos_are_one_line_errors(tmp_path):
    out = tmp_path / "x.png"
    r = run("generate", "a fox", "--steps", "2", "--seed", "1", "--cache", "0.5", "--attention", "math", "--out",
            str(out), "--json")
    assert r.exit_code == 0, r.output
    acc = json.loads(r.stdout)["images"][0]["model"]["acceleration"]
    assert acc["attention"] == "_native_math" and acc["cache"]["threshold"] == 0.5 and acc["compile"] is False
    for args, text in ((("--attention", "flash"), "needs a CUDA device"), (("--compile", "maybe"), "compile"),
                       (("--quant", "int3"), "unknown quant"), (("--cache", "lots"), "threshold")):
        r = run("generate", "a fox", "--steps", "1", *args)
        assert r.exit_code == 2 and text in r.output and "Traceback" not in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1


def test_gpu_check_dry_run_exercises_every_section_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--json", str(out)],
                       capture_output=True, text=True, env=env, timeout=600, check=False)
    assert p.returncode == 0, p.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["dit_forward"]["fp8_emulate_ms"] > 0 and 0 < report["dit_forward"]["fp8_rel_l2_vs_bf16"] < 0.1
    e2e = report["end_to_end"]
    assert e2e["lightning_4step_cfg1"]["variants"][0]["name"] == "fp8" and e2e["lightning_4step_cfg1"]["cfg"] == 1.0
    assert e2e["20step_cfg4"]["variants"][0]["name"].startswith("step cache")
    assert set(report["memory_caps"]) == {"24GB", "16GB", "12GB", "8GB"}
    four = report["four_bit"]  # the tiny DiT: only the 128-wide MLP down projections fit int4's group of 64
    assert four["int4"]["int4_layers_quantized"] == 4 and 0 < four["int4"]["rel_l2_vs_bf16"] < 0.1
    if importlib.util.find_spec("bitsandbytes") is None:  # in the `test` extra: NF4 runs on bitsandbytes' CPU backend
        assert "not installed" in four["nf4"]["skipped"]
    else:
        assert four["nf4"]["nf4_layers_quantized"] > 0 and 0 < four["nf4"]["rel_l2_vs_bf16"] < 0.1
    assert all("CUDA-only" in row["skipped"] for row in four["nunchaku_kernels"].values())
    loads = four["engine_load"]  # Engine.load(quant=...) on the device vs the CPU: the same device in a dry run
    for q in ("int4", "fp8") + (("nf4",) if "skipped" not in four["nf4"] else ()):
        assert loads[q]["max_diff_vs_cpu"] == 0 and loads[q]["lora_changes_output"], (q, loads[q])
    assert report["memory_caps"]["8GB"]["fp8"]["strategy"] == "group_offload"  # the planner no longer refuses
    for kind in ("fp8", "q8_0"):  # each cap's plan ran (the tiny model, CPU on both sides): the resident latents
        runs = report["memory_runs"][kind]
        assert all(runs[cap]["max_latent_diff"] == 0 and runs[cap]["slowdown"] > 0 for cap in report["memory_caps"])


def test_serve_checks_speed_options_before_binding():
    r = run("serve", "--attention", "warp", "--port", "1")
    assert r.exit_code == 2 and "unknown attention backend 'warp'" in r.output
