"""Per-format load time, peak RSS and run time relative to the fp32 diffusers folder; LoRA switch vs reload.

Each format loads in a fresh subprocess so peak RSS (ru_maxrss) is that format's alone. Two sizes: the test suite's
tiny model and a medium one (8 blocks x 512 wide DiT, ~58M params) where weights dominate the run time.
Usage: python benchmarks/formats_bench.py [--size tiny|medium|both] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FORMATS = ("diffusers_fp32", "comfy_bf16", "comfy_fp8_e4m3fn", "comfy_fp8_scaled", "gguf_Q8_0", "gguf_Q4_0",
           "gguf_F16")
SIZES = {"tiny": {}, "medium": {"num_layers": 8, "attention_head_dim": 64, "num_attention_heads": 8,
                                "axes_dims_rope": (8, 28, 28), "text_hidden_size": 256}}


def build(root: Path, size: str) -> Path:
    from qwenstudio.engine.formats.gguf import write_dit_gguf
    from qwenstudio.testing.formats import write_comfy_models_dir, write_text_encoder_file
    from qwenstudio.testing.tiny import TinySpec, write_diffusers_folder

    folder = write_diffusers_folder(root / "diffusers" / f"{size}-folder", TinySpec(**SIZES[size]))
    models = root
    write_comfy_models_dir(models, folder, variants=("bf16", "fp8_e4m3fn", "fp8_scaled"))
    write_text_encoder_file(folder, models / "text_encoders" / "qwen_2.5_vl_7b.safetensors", dtype="fp32")
    for q in ("Q8_0", "Q4_0", "F16"):
        write_dit_gguf(folder, models / "diffusion_models" / f"qwen_image_{q}.gguf", q)
    return folder


def model_name(fmt: str, size: str) -> str:
    if fmt == "diffusers_fp32":
        return f"{size}-folder"
    kind, variant = fmt.split("_", 1)
    return f"qwen_image_{variant}"


CHILD = r"""
import json, resource, sys, time, torch
import diffusers, transformers  # imported before timing: load time is file reading and building, not imports
from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer
from qwenstudio import Engine
from qwenstudio.config import Settings
root, name = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
t = time.perf_counter()
e = Engine.load(name, variant="tiny", device="cpu", settings=Settings(home=__import__("pathlib").Path(root) / "home"),
                models_dirs=(root,))
load = time.perf_counter() - t
kw = dict(prompt="a red fox", seed=0, steps=4, cfg=1.0, width=128, height=128)
e.generate(**kw)
runs = []
for _ in range(3):
    t = time.perf_counter(); r = e.generate(**kw); runs.append(time.perf_counter() - t)
torch.save(r.latents, root + f"/latents-{name}.pt")
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"load_s": load, "run_s": sorted(runs)[1], "peak_rss_mb": rss / 2**20}))
"""


def lora_switch(root: Path, size: str) -> dict:
    from qwenstudio import Engine
    from qwenstudio.config import Settings
    from qwenstudio.testing.loras import write_lora

    settings = Settings(home=root / "home")
    engine = Engine.load(f"{size}-folder", variant="tiny", device="cpu", settings=settings, models_dirs=(root,))
    for name, seed in (("a", 1), ("b", 2)):
        write_lora(root / "loras" / f"{name}.safetensors", engine.components.transformer, "comfy", seed=seed)
    kw = dict(prompt="x", seed=0, steps=1, cfg=1.0, width=64, height=64)
    engine.generate(**kw, loras=[("a", 1.0)])
    engine.generate(**kw, loras=[("b", 1.0)])  # both files now cached
    t = time.perf_counter()
    for i in range(10):
        engine.apply_loras(_req(("a" if i % 2 else "b")))
    switch = (time.perf_counter() - t) / 10
    t = time.perf_counter()
    Engine.load(f"{size}-folder", variant="tiny", device="cpu", settings=settings, models_dirs=(root,))
    reload = time.perf_counter() - t
    return {"lora_switch_s": switch, "base_reload_s": reload, "ratio": switch / reload}


def _req(name):
    from qwenstudio.engine.requests import GenerateRequest

    return GenerateRequest(prompt="x", loras=[(name, 1.0)])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="both", choices=("tiny", "medium", "both"))
    ap.add_argument("--json")
    args = ap.parse_args()
    import torch

    report = {}
    for size in (("tiny", "medium") if args.size == "both" else (args.size,)):
        root = Path(tempfile.mkdtemp(prefix=f"qs-bench-{size}-"))
        build(root, size)
        rows = {}
        for fmt in FORMATS:
            name = model_name(fmt, size)
            out = subprocess.run([sys.executable, "-c", CHILD, str(root), name], capture_output=True, text=True,
                                 check=True).stdout.strip().splitlines()[-1]
            rows[fmt] = json.loads(out)
        ref = torch.load(root / f"latents-{size}-folder.pt")
        base = rows["diffusers_fp32"]
        for fmt, row in rows.items():
            row["run_vs_folder"] = row["run_s"] / base["run_s"]
            row["max_latent_diff"] = float((torch.load(root / f"latents-{model_name(fmt, size)}.pt") - ref).abs().max())
        report[size] = {"formats": rows, "lora": lora_switch(root, size)}
        print(f"\n== {size} ==")
        print(f"{'format':20} {'load s':>8} {'peak RSS MB':>12} {'run s':>8} {'run/folder':>10} {'max dlatent':>12}")
        for fmt, r in rows.items():
            print(f"{fmt:20} {r['load_s']:8.3f} {r['peak_rss_mb']:12.0f} {r['run_s']:8.4f} {r['run_vs_folder']:10.2f}"
                  f" {r['max_latent_diff']:12.2e}")
        lo = report[size]["lora"]
        print(f"LoRA stack switch {lo['lora_switch_s'] * 1e3:.1f} ms vs base reload {lo['base_reload_s'] * 1e3:.0f} ms"
              f" (ratio {lo['ratio']:.3f})")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
