"""GPU acceptance run: the CUDA paths the CPU test suite cannot reach, in one command for a machine with a GPU.

1. The tiny model on CUDA in bf16 under every memory strategy (resident, model_offload, group_offload) gives the same
   image as the fp32 CPU run within bf16 tolerance, and a LoRA / GGUF / fp8 base runs there too.
2. ``qwenstudio bench --random-full``: full-size random Qwen-Image, stock diffusers vs ours, per-stage times.
Usage: python benchmarks/gpu_check.py [--skip-full] [--json out.json]   (exits 2 with a message when no CUDA)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-full", action="store_true", help="skip the full-size random-weights benchmark")
    ap.add_argument("--json")
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: this check is for a GPU machine", file=sys.stderr)
        return 2
    from qwenstudio import Engine
    from qwenstudio.config import Settings
    from qwenstudio.engine.formats.gguf import write_dit_gguf
    from qwenstudio.testing.formats import write_comfy_models_dir
    from qwenstudio.testing.loras import write_lora

    root = Path(tempfile.mkdtemp(prefix="qs-gpu-"))
    settings = Settings(home=root / "home")
    report: dict = {"device": torch.cuda.get_device_name(0), "strategies": {}, "formats": {}}
    kw = dict(prompt="a red fox", seed=3, steps=4, cfg=3.0, width=128, height=96)
    ref = Engine.load("tiny", device="cpu", settings=settings).generate(**kw).latents
    folder = settings.cache_dir / next(p.name for p in settings.cache_dir.iterdir() if p.name.startswith("tiny-"))

    for strategy in ("resident", "model_offload", "group_offload"):
        engine = Engine.load("tiny", device="cuda", settings=settings, offload=strategy)
        out = engine.generate(**kw).latents.float().cpu()
        report["strategies"][strategy] = float((out - ref).abs().max())
        del engine
        torch.cuda.empty_cache()

    models = root / "models"
    write_comfy_models_dir(models, folder, variants=("bf16", "fp8_e4m3fn", "fp8_scaled"))
    write_dit_gguf(folder, models / "diffusion_models" / "qwen_image_Q8_0.gguf", "Q8_0")
    base = Engine.load("tiny", device="cpu", settings=settings)
    write_lora(models / "loras" / "check.safetensors", base.components.transformer, "comfy", seed=1)
    for name in ("qwen_image_bf16", "qwen_image_fp8_e4m3fn", "qwen_image_fp8_scaled", "qwen_image_Q8_0"):
        engine = Engine.load(name, variant="tiny", device="cuda", settings=settings, models_dirs=(models,))
        plain = engine.generate(**kw).latents.float().cpu()
        lora = engine.generate(**kw, loras=[("check", 1.0)]).latents.float().cpu()
        report["formats"][name] = {"max_diff_vs_cpu_fp32": float((plain - ref).abs().max()),
                                   "lora_changes_output": bool((lora - plain).abs().max() > 1e-3)}
        del engine
        torch.cuda.empty_cache()

    if not args.skip_full:
        from qwenstudio.bench import run_bench

        report["bench_random_full"] = run_bench(random_full=True, steps=4, cfg=4.0, width=1024, height=1024)
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    bad = [s for s, d in report["strategies"].items() if not d < 0.1]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
