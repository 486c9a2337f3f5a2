"""``qwenstudio bench``: stock diffusers ``QwenImagePipeline`` vs our engine, same weights, same process.

Both run on the *same module objects*, so differences are the loop, the text path and the glue, never the weights.
Stages are timed with a device sync at each boundary (bench only; the engine itself never syncs per step): stock
stages by wrapping its ``encode_prompt`` / ``vae.decode`` and its step callback, ours from our progress callback.
Prompt caches are cleared before each run so text encoding is compared like for like.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from .errors import InvalidRequest

PROMPT = "A cat holding a sign that says hello world, studio lighting, ultra detailed"
NEGATIVE = "blurry, low quality"


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _full_size_components(device, dtype):
    """Qwen-Image at full size with random weights, built directly on the device (no download possible here)."""
    import torch
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from .engine.formats.comfy import QWEN25_VL_7B_CONFIG, QWEN_IMAGE_VAE_CONFIG
    from .engine.loading import Components, assign_tensor, build_empty
    from .engine.specs import QWEN_IMAGE_SCHEDULER_CONFIG
    from .testing.tiny import build_tokenizer

    def materialize(module):
        """Random weights for the meta parameters, made on the device; the real buffers (RoPE tables) just move."""
        g = torch.Generator(device=device).manual_seed(0)
        for name, p in list(module.named_parameters()):
            assign_tensor(module, name, torch.randn(p.shape, generator=g, device=device).mul_(0.02).to(dtype))
        for mod in module.modules():
            for bname, buf in list(mod.named_buffers(recurse=False)):
                if buf is not None:
                    setattr(mod, bname, buf.to(device))
        return module.eval()

    transformer = materialize(build_empty(lambda: QwenImageTransformer2DModel()))  # defaults = Qwen-Image's
    vae = materialize(build_empty(lambda: AutoencoderKLQwenImage.from_config(QWEN_IMAGE_VAE_CONFIG)))
    te_cfg = Qwen2_5_VLConfig.from_dict(QWEN25_VL_7B_CONFIG)
    text_encoder = materialize(build_empty(lambda: Qwen2_5_VLForConditionalGeneration(te_cfg)))
    return Components(transformer, vae, text_encoder, build_tokenizer(), dict(QWEN_IMAGE_SCHEDULER_CONFIG),
                      torch.device(device), dtype, {"name": "random-full", "format": "random"})


def run_bench(*, model="tiny", random_full=False, steps=4, cfg=4.0, width=0, height=0, repeats=2, device=None,
              dtype=None) -> dict[str, Any]:
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    from .engine.engine import Engine, parse_dtype
    from .engine.loading import default_device, default_dtype
    from .engine.requests import GenerateRequest
    from .engine.specs import get_spec

    if repeats < 1 or steps < 1:
        raise InvalidRequest("repeats and steps must be >= 1")
    if random_full:
        device = torch.device(device or default_device())
        dt = parse_dtype(dtype) if dtype else default_dtype(device)
        engine = Engine(_full_size_components(device, dt), get_spec("qwen-image"))
    else:
        engine = Engine.load(model, device=device, dtype=dtype, keep_lm_head=True)  # stock computes LM logits
    c = engine.components
    width = width or (64 if engine.spec.builtin else 1024)
    height = height or (64 if engine.spec.builtin else 1024)
    pipe = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(c.scheduler_config), vae=c.vae,
        text_encoder=c.text_encoder, tokenizer=c.tokenizer, transformer=c.transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    request = GenerateRequest(prompt=PROMPT, negative_prompt=NEGATIVE, width=width, height=height, steps=steps,
                              cfg=cfg, seed=0, scheduler="reference", sampler="euler")

    def stock_once() -> tuple[dict, Any]:
        marks: dict[str, float] = {"text_encode": 0.0, "vae_decode": 0.0}
        step_ends: list[float] = []
        orig_encode, orig_decode = pipe.encode_prompt, c.vae.decode

        def timed(name, fn):
            def wrapper(*a, **k):
                _sync(c.device)
                t = time.perf_counter()
                out = fn(*a, **k)
                _sync(c.device)
                marks[name] += time.perf_counter() - t
                return out
            return wrapper

        def on_step(p, i, t, kw):
            _sync(c.device)
            step_ends.append(time.perf_counter())
            return {}

        pipe.encode_prompt, c.vae.decode = timed("text_encode", orig_encode), timed("vae_decode", orig_decode)
        try:
            _sync(c.device)
            t0 = time.perf_counter()
            image = pipe(PROMPT, negative_prompt=NEGATIVE, true_cfg_scale=cfg, height=height, width=width,
                         num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="pt",
                         callback_on_step_end=on_step).images
            _sync(c.device)
            total = time.perf_counter() - t0
        finally:
            del pipe.encode_prompt, c.vae.decode  # drop the instance overrides
        marks["steps"] = [b - a for a, b in zip(step_ends[:-1], step_ends[1:])]
        marks["total"] = total
        return marks, image

    def ours_once() -> tuple[dict, Any]:
        engine.prompts.clear()
        ends: list[float] = []

        def on_progress(p):
            _sync(c.device)
            ends.append(time.perf_counter())

        _sync(c.device)
        t0 = time.perf_counter()
        result = engine.generate(request, on_progress=on_progress)
        _sync(c.device)
        total = time.perf_counter() - t0
        t = dict(result.timings)
        t["steps"] = [b - a for a, b in zip(ends[:-1], ends[1:])]
        t["total"] = total
        return t, result

    stock_once(), ours_once()  # warm-up (allocator, kernels, lazy init)
    stock_runs = [stock_once() for _ in range(repeats)]
    ours_runs = [ours_once() for _ in range(repeats)]

    import numpy as np

    ref = (stock_runs[-1][1][0].permute(1, 2, 0).float().cpu().numpy() * 255).round()
    ours_img = np.asarray(ours_runs[-1][1].images[0].image, dtype=np.float64)
    report = {
        "device": str(c.device), "dtype": str(c.dtype).replace("torch.", ""), "model": c.identity.get("name"),
        "size": f"{width}x{height}", "steps": steps, "cfg": cfg, "repeats": repeats,
        "stock": _summarise([r[0] for r in stock_runs]), "ours": _summarise([r[0] for r in ours_runs]),
        "steps_last_run": {"stock": [round(x, 5) for x in stock_runs[-1][0]["steps"]],
                           "ours": [round(x, 5) for x in ours_runs[-1][0]["steps"]]},
        "max_pixel_diff": float(np.abs(ref - ours_img).max()),
    }
    report["ratio_ours_over_stock"] = {
        k: round(report["ours"][k] / report["stock"][k], 3) for k in report["stock"] if report["stock"][k] > 0
    }
    return report


def _summarise(runs: list[dict]) -> dict[str, float]:
    """Median over runs of each stage; the step time is the median of all steps after the first of each run."""
    steps = [s for r in runs for s in r["steps"]] or [0.0]
    return {
        "text_encode": statistics.median(r["text_encode"] for r in runs),
        "step": statistics.median(steps),
        "vae_decode": statistics.median(r["vae_decode"] for r in runs),
        "total": statistics.median(r["total"] for r in runs),
    }


def print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    title = (f"{report['model']} on {report['device']} ({report['dtype']}), {report['size']}, {report['steps']} steps, "
             f"CFG {report['cfg']}, median of {report['repeats']}")
    table = Table("stage", "stock diffusers (s)", "qwenstudio (s)", "ours/stock", title=title)
    for k in ("text_encode", "step", "vae_decode", "total"):
        table.add_row(k, f"{report['stock'][k]:.4f}", f"{report['ours'][k]:.4f}",
                      f"{report['ratio_ours_over_stock'].get(k, float('nan')):.3f}")
    console = Console()
    console.print(table)
    for name in ("stock", "ours"):
        steps = ", ".join(f"{x * 1e3:.1f}" for x in report["steps_last_run"][name])
        console.print(f"{name} denoise steps (ms, last run, from the 2nd step): {steps}")
    console.print(f"max pixel difference between the two images: {report['max_pixel_diff']:.0f} / 255")
