"""``qwenstudio bench``: stock diffusers ``QwenImagePipeline`` vs our engine, same weights, same process.

Both run on the *same module objects*, so differences are the loop, the text path and the glue, never the weights.
Stages are timed with a device sync at each boundary (bench only; the engine itself never syncs per step): stock
stages by wrapping its ``encode_prompt`` / ``vae.decode`` and its step callback, ours from our progress callback.
Prompt caches are cleared before each run so text encoding is compared like for like.
"""

from __future__ import annotations

import copy
import itertools
import math
import statistics
import time
from contextlib import contextmanager
from typing import Any

import numpy as np

from .errors import InvalidRequest

PROMPT = "A cat holding a sign that says hello world, studio lighting, ultra detailed"
NEGATIVE = "blurry, low quality"


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def full_size_components(device, dtype):
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


def run_bench(*, model="tiny", random_full=False, shape=None, layers=2, vae="tiny", steps=4, cfg=4.0, width=0,
              height=0, repeats=2, device=None, dtype=None, compile="auto", attention="auto", quant=None,
              cache=None, compare_cache_dit=False, bf16=None) -> dict[str, Any]:
    """Stock ``QwenImagePipeline`` vs our engine on the same modules; then each lossy option vs our exact run.

    Order matters because speed options change the modules in place: stock runs first on the untouched model, then
    the exact options (attention backend, regional compile) are applied and ours runs, then the step cache (turned
    off again afterwards), then each ``quant`` of ``fp8,int4,nf4`` (each from the same float DiT, restored
    after it). Warm-up runs (``min(steps, 2)`` steps) are not timed but
    their wall time is reported: with compile on, that is the compile cost.

    ``bf16`` (default: on when it is the engine's default here — a CPU with native bf16 and the shape-true model,
    whose weights are bf16 values as published): also run ours in bf16 compute, and stock diffusers in bf16 beside
    it, so the table shows what the dtype buys and what our loop buys separately."""
    import torch

    from .engine.acceleration import accelerate_engine, parse_compile
    from .engine.engine import Engine, parse_dtype
    from .engine.loading import default_device, default_dtype
    from .engine.specs import get_spec

    if repeats < 1 or steps < 1:
        raise InvalidRequest("repeats and steps must be >= 1")
    quants = parse_bench_quants(quant, device or default_device())
    if shape not in (None, "wide"):
        raise InvalidRequest(f"unknown bench shape '{shape}'; valid: wide", code="invalid_shape")
    parse_compile(compile)  # a typo fails before minutes of model building
    if shape == "wide":
        from .testing.wide import WideSpec, build_wide_components

        device = torch.device(device or default_device())
        dt = parse_dtype(dtype) if dtype else default_dtype(device)
        engine = Engine(build_wide_components(WideSpec(layers=layers, vae=vae), device=device, dtype=dt),
                        get_spec("qwen-image"))
    elif random_full:
        device = torch.device(device or default_device())
        dt = parse_dtype(dtype) if dtype else default_dtype(device)
        engine = Engine(full_size_components(device, dt), get_spec("qwen-image"))
    else:
        engine = Engine.load(model, device=device, dtype=dtype, keep_lm_head=True, compile=False)  # stock: LM logits
    c = engine.components
    width = width or (64 if engine.spec.builtin else 256 if shape else 1024)
    height = height or (64 if engine.spec.builtin else 256 if shape else 1024)
    runner = _Runner(engine, steps=steps, cfg=cfg, width=width, height=height)

    runner.stock(steps=min(steps, 2))  # warm-up (allocator, kernels, lazy init)
    stock_runs = [runner.stock()]

    t = time.perf_counter()
    exact = accelerate_engine(engine, compile=compile, attention=attention, long_lived=True)
    runner.ours(steps=min(steps, 2))  # warm-up: compiles here when compile is on
    warmup = time.perf_counter() - t
    ours_runs = [runner.ours()]
    for _ in range(repeats - 1):  # alternate, so a change in the machine's load hits both sides alike
        stock_runs.append(runner.stock(exact=exact))
        ours_runs.append(runner.ours())
    ref_latents, ref_image = ours_runs[-1][1].latents, _pixels(ours_runs[-1][1])

    stock_img = (stock_runs[-1][1][0].permute(1, 2, 0).float().cpu().numpy() * 255).round()
    report = {
        "device": str(c.device), "dtype": str(c.dtype).replace("torch.", ""), "model": c.identity.get("name"),
        "shape": c.identity.get("shape"), "size": f"{width}x{height}", "steps": steps, "cfg": cfg,
        "repeats": repeats, "threads": torch.get_num_threads(), "load": _load_average(),
        "options": {k: v for k, v in exact.items()}, "warmup_s": {"ours": round(warmup, 3)},
        "stock": _summarise([r[0] for r in stock_runs]), "ours": _summarise([r[0] for r in ours_runs]),
        "steps_last_run": {"stock": [round(x, 5) for x in stock_runs[-1][0]["steps"]],
                           "ours": [round(x, 5) for x in ours_runs[-1][0]["steps"]]},
        "max_pixel_diff": float(np.abs(stock_img - ref_image).max()),
        "variants": [],
    }
    report["ratio_ours_over_stock"] = _ratios(report["ours"], report["stock"])

    def lossy(name: str, setup, teardown=None, warm: bool = False):
        state = setup()
        if warm:
            runner.ours(steps=min(steps, 2))
        timings, result = runner.ours()
        entry = {"name": name, **_summarise([timings]), **_errors(result, ref_latents, ref_image)}
        entry["ratio_total_vs_stock"] = round(entry["total"] / report["stock"]["total"], 3)
        entry["ratio_total_vs_ours_exact"] = round(entry["total"] / report["ours"]["total"], 3)
        entry["ratio_cpu_total_vs_stock"] = round(entry["cpu_total"] / max(report["stock"]["cpu_total"], 1e-9), 3)
        if state is not None:
            entry.update(state() if callable(state) else state)
        if "stock_bf16_total" in entry:
            entry["ratio_total_vs_stock_bf16"] = round(entry["total"] / entry["stock_bf16_total"], 3)
        report["variants"].append(entry)
        if teardown is not None:
            teardown()

    from .engine.step_cache import disable_step_cache, enable_step_cache, parse_cache

    if cache is not None:
        config = parse_cache(cache)
        if config is not None:
            def cache_on():
                sc = enable_step_cache(c.transformer, config)
                return lambda: {"cache": config.to_dict(), **_saved(sc.stats.to_dict(), len(c.transformer.transformer_blocks))}

            lossy(f"step cache {config.threshold}", cache_on, lambda: disable_step_cache(c.transformer))
            if compare_cache_dit:
                lossy("cache-dit DBCache F1B0", lambda: _cache_dit_on(c.transformer, config, steps),
                      lambda: _cache_dit_off(c.transformer))
    if bf16 is None:
        from .engine.precision import cpu_has_native_bf16

        bf16 = (shape == "wide" and dtype is None and c.device.type == "cpu" and c.dtype == torch.float32
                and cpu_has_native_bf16())
    if bf16:
        def to_dtype(dt):  # as the engine's CPU default: DiT and text encoder in bf16, the VAE stays fp32
            for m in (c.transformer, c.text_encoder):
                m.to(dt)
            c.dtype = dt

        def bf16_on():
            to_dtype(torch.bfloat16)

            def stock_too():  # after ours ran: stock diffusers on the same bf16 modules
                runner.stock(steps=min(steps, 2), exact=exact)
                timings, _ = runner.stock(exact=exact)
                return {"stock_bf16_total": round(timings["total"], 3),
                        "stock_bf16_cpu_total": round(timings["cpu_total"], 3),
                        "default_here": True}

            return stock_too

        lossy("bf16 compute", bf16_on, lambda: to_dtype(torch.float32), warm=True)
        if cache is not None and parse_cache(cache) is not None:
            config = parse_cache(cache)

            def bf16_cache_on():
                to_dtype(torch.bfloat16)
                sc = enable_step_cache(c.transformer, config)
                return lambda: {"cache": config.to_dict(),
                                **_saved(sc.stats.to_dict(), len(c.transformer.transformer_blocks))}

            def bf16_cache_off():
                disable_step_cache(c.transformer)
                to_dtype(torch.float32)

            lossy(f"bf16 + step cache {config.threshold}", bf16_cache_on, bf16_cache_off, warm=True)
    if quants:
        float_linears = {n: copy.deepcopy(m) for n, m in c.transformer.named_modules() if type(m) is torch.nn.Linear}
        float_bytes = dit_weight_bytes(c.transformer)

        def restore_float():  # each quantizer starts from the same float DiT
            for name, m in float_linears.items():
                parent, _, leaf = name.rpartition(".")
                setattr(c.transformer.get_submodule(parent) if parent else c.transformer, leaf, copy.deepcopy(m))

        for q in quants:
            def quant_on(q=q):
                state = _quantize(c, q, exact)
                return {**state, "dit_weight_bytes": dit_weight_bytes(c.transformer),
                        "dit_weight_bytes_float": float_bytes}

            lossy(q, quant_on, restore_float, warm=True)
    return report


BENCH_QUANTS = ("fp8", "int4", "nf4")


def parse_bench_quants(quant: str | None, device) -> list[str]:
    """``--quant fp8,int4,nf4`` -> the list, checked before minutes of model building (nf4 also for the device)."""
    if quant in (None, "", "none"):
        return []
    quants = [q.strip().lower() for q in quant.split(",") if q.strip()]
    for q in quants:
        if q not in BENCH_QUANTS:
            raise InvalidRequest(f"unknown quant '{q}'; valid: {', '.join(BENCH_QUANTS)} (comma-separated)",
                                 code="invalid_quant")
    if "nf4" in quants:
        from .engine.quant.load_time import check_quant_device

        check_quant_device("nf4", device)
    return quants


def dit_weight_bytes(transformer) -> int:
    """Bytes of the DiT's weights as they sit in memory: parameters, buffers, and bitsandbytes' absmax (held in
    each 4-bit weight's quant_state, outside the module's tensors)."""
    n = sum(t.numel() * t.element_size() for t in [*transformer.parameters(), *transformer.buffers()])
    for m in transformer.modules():
        state = getattr(getattr(m, "weight", None), "quant_state", None)
        if state is not None:
            n += state.absmax.numel() * state.absmax.element_size()
    return n


def _quantize(c, quant: str, exact: dict) -> dict:
    """Quantize the bench DiT in place the way ``--quant`` does at load; returns what was done."""
    if quant == "fp8":
        from .engine.acceleration import fp8_compute_mode
        from .engine.quant.fp8 import quantize_model_fp8, set_fp8_compute

        n = len(quantize_model_fp8(c.transformer))
        mode = fp8_compute_mode(c.device, exact.get("compile", False), True)
        return {"fp8_layers": n, "fp8_compute": mode, "fp8_compute_layers": set_fp8_compute(c.transformer, mode)}
    from .engine.quant.load_time import quantize_on_load

    return quantize_on_load(c.transformer, quant, device=c.device, dtype=c.dtype)


class _Runner:
    """One timed run of stock diffusers or of our engine, with stage times and per-step times."""

    def __init__(self, engine, *, steps, cfg, width, height):
        from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

        c = engine.components
        self.engine, self.c = engine, c
        self.steps, self.cfg, self.width, self.height = steps, cfg, width, height
        self.pipe = QwenImagePipeline(
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(c.scheduler_config), vae=c.vae,
            text_encoder=c.text_encoder, tokenizer=c.tokenizer, transformer=c.transformer,
        )
        self.pipe.set_progress_bar_config(disable=True)

    def stock(self, steps=None, exact: dict | None = None) -> tuple[dict, Any]:
        """``exact``: the options ours runs with; a compiled model is run uncompiled here (stock has no compile)."""
        import torch

        pipe, c = self.pipe, self.c
        if exact and exact.get("compile"):
            from .engine.real_rope import stock_rope

            with _eager(), stock_rope(c.transformer):
                return self.stock(steps)
        marks: dict[str, Any] = {"text_encode": 0.0, "vae_decode": 0.0}
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
            t0, cpu0 = time.perf_counter(), time.process_time()
            image = pipe(PROMPT, negative_prompt=NEGATIVE, true_cfg_scale=self.cfg, height=self.height,
                         width=self.width, num_inference_steps=steps or self.steps,
                         generator=torch.Generator().manual_seed(0), output_type="pt",
                         callback_on_step_end=on_step).images
            _sync(c.device)
            total, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        finally:
            del pipe.encode_prompt, c.vae.decode  # drop the instance overrides
        marks["steps"] = [b - a for a, b in itertools.pairwise(step_ends)]
        marks["total"], marks["cpu_total"] = total, cpu
        return marks, image

    def ours(self, steps=None) -> tuple[dict, Any]:
        """Through the engine's public ``generate``: whatever the engine does (CFG batching, caches) is measured."""
        from .engine.requests import GenerateRequest

        engine, c = self.engine, self.c
        engine.prompts.clear()
        ends: list[float] = []

        def on_progress(p):
            _sync(c.device)
            ends.append(time.perf_counter())

        request = GenerateRequest(prompt=PROMPT, negative_prompt=NEGATIVE, width=self.width, height=self.height,
                                  steps=steps or self.steps, cfg=self.cfg, seed=0, scheduler="reference",
                                  sampler="euler")
        _sync(c.device)
        t0, cpu0 = time.perf_counter(), time.process_time()
        result = engine.generate(request, on_progress=on_progress)
        _sync(c.device)
        total, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        t = dict(result.timings)
        t["steps"] = [b - a for a, b in itertools.pairwise(ends)]
        t["total"], t["cpu_total"] = total, cpu
        return t, result


@contextmanager
def _eager():
    """Run the compiled blocks' original eager forward for a while (``torch.compiler.set_stance``)."""
    import torch

    with torch.compiler.set_stance("force_eager"):
        yield


def _pixels(result):
    return np.asarray(result.images[0].image, dtype=np.float64)


def _errors(result, ref_latents, ref_image) -> dict:
    """Quality of a lossy run against the exact one: PSNR of the decoded image, relative L2 of the final latents."""
    img = _pixels(result)
    mse = float(((img - ref_image) ** 2).mean())
    psnr = float("inf") if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)
    a, b = result.latents.float().cpu(), ref_latents.float().cpu()
    rel = float((a - b).norm() / b.norm().clamp_min(1e-12))
    return {"psnr_db": round(psnr, 2), "latent_rel_l2": round(rel, 5), "max_pixel_diff": float(np.abs(img - ref_image).max())}


def _saved(stats: dict, blocks: int) -> dict:
    """Calls saved by the step cache: forwards that ran block 0 only, and the share of block evaluations skipped."""
    calls = max(stats["calls"], 1)
    skipped = stats["reused"] * (blocks - 1)
    return {**stats, "block_evals_saved": round(skipped / (calls * blocks), 3)}


def _cache_dit_on(transformer, config, steps):
    """The same policy through the ``cache-dit`` package (evaluation only; not a dependency)."""
    try:
        import cache_dit
        from cache_dit import DBCacheConfig, TaylorSeerCalibratorConfig
    except ImportError:
        raise InvalidRequest("--compare-cache-dit needs the cache-dit package (pip install cache-dit)") from None
    calibrator = TaylorSeerCalibratorConfig(taylorseer_order=1) if config.taylor else None
    cache_dit.enable_cache(transformer, cache_config=DBCacheConfig(
        Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=config.threshold,
        max_warmup_steps=config.warmup_steps, max_continuous_cached_steps=config.max_skip, num_inference_steps=steps,
        enable_separate_cfg=True), calibrator_config=calibrator)

    def stats():
        s = cache_dit.summary(transformer)[0]
        calls = s.accumulated_transformer_executed_steps
        reused = len(s.cached_steps) + len(s.cfg_cached_steps)
        return _saved({"calls": calls, "computed": calls - reused, "reused": reused},
                      len(transformer.transformer_blocks))

    return stats


def _cache_dit_off(transformer):
    import cache_dit

    cache_dit.disable_cache(transformer)


def _ratios(ours: dict, stock: dict) -> dict:
    return {k: round(ours[k] / stock[k], 3) for k in stock if stock[k] > 0}


def _load_average():
    import os

    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _summarise(runs: list[dict]) -> dict[str, float]:
    """Median over runs of each stage; the step time is the median of all steps after the first of each run."""
    steps = [s for r in runs for s in r["steps"]] or [0.0]
    return {
        "text_encode": statistics.median(r["text_encode"] for r in runs),
        "step": statistics.median(steps),
        "vae_decode": statistics.median(r["vae_decode"] for r in runs),
        "total": statistics.median(r["total"] for r in runs),
        # CPU seconds of this process: on a shared CPU machine a steadier measure of compute than wall time
        "cpu_total": statistics.median(r["cpu_total"] for r in runs),
    }


def _title(report: dict) -> str:
    shape = f" {report['shape']}" if report.get("shape") else ""
    return (f"{report['model']}{shape} on {report['device']} ({report['dtype']}, {report['threads']} threads, load "
            f"{report['load']}), {report['size']}, {report['steps']} steps, CFG {report['cfg']}, median of "
            f"{report['repeats']}; ours: {report['options']}")


def print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("stage", "stock diffusers (s)", "qwenstudio (s)", "ours/stock", title=_title(report))
    for k in ("text_encode", "step", "vae_decode", "total", "cpu_total"):
        table.add_row(k, f"{report['stock'][k]:.4f}", f"{report['ours'][k]:.4f}",
                      f"{report['ratio_ours_over_stock'].get(k, float('nan')):.3f}")
    console = Console()
    console.print(table)
    for name in ("stock", "ours"):
        steps = ", ".join(f"{x * 1e3:.1f}" for x in report["steps_last_run"][name])
        console.print(f"{name} denoise steps (ms, last run, from the 2nd step): {steps}")
    console.print(f"max pixel difference between the two images: {report['max_pixel_diff']:.0f} / 255; "
                  f"our warm-up (incl. compile): {report['warmup_s']['ours']:.1f} s")
    if report["variants"]:
        lossy = Table("lossy option", "total (s)", "vs stock", "CPU s vs stock", "vs ours exact", "PSNR (dB)",
                      "latent rel L2", "saved", title="lossy options vs our exact run")
        for v in report["variants"]:
            lossy.add_row(v["name"], f"{v['total']:.3f}", f"{v['ratio_total_vs_stock']:.3f}",
                          f"{v['ratio_cpu_total_vs_stock']:.3f}",
                          f"{v['ratio_total_vs_ours_exact']:.3f}", f"{v['psnr_db']:.2f}", f"{v['latent_rel_l2']:.4f}",
                          _saved_text(v))
        console.print(lossy)


def _saved_text(v: dict) -> str:
    if "stock_bf16_total" in v:
        return (f"stock diffusers in bf16: {v['stock_bf16_total']:.2f} s (ours/stock-bf16 "
                f"{v['ratio_total_vs_stock_bf16']:.3f}); the engine's default here")
    if "reused" in v:
        return f"{v['reused']}/{v['calls']} calls reused, {v['block_evals_saved']:.0%} block evals"
    weights = (f"; DiT weights {v['dit_weight_bytes'] / v['dit_weight_bytes_float']:.2f}x the float ones"
               if v.get("dit_weight_bytes_float") else "")
    if "fp8_layers" in v:
        return f"{v.get('fp8_compute_layers', 0)} fp8 layers ({v.get('fp8_compute', '')}){weights}"
    for q in ("int4", "nf4"):
        if f"{q}_layers_quantized" in v:
            return f"{v[f'{q}_layers_quantized']} {q} layers{weights}"
    return ""


def report_markdown(report: dict) -> str:
    """The bench as Markdown tables (the README's Speed section is pasted from this)."""
    lines = [f"**{_title(report)}**", "", "| stage | stock diffusers (s) | qwenstudio (s) | ours/stock |", "|---|---|---|---|"]
    for k in ("text_encode", "step", "vae_decode", "total", "cpu_total"):
        lines.append(f"| {k} | {report['stock'][k]:.3f} | {report['ours'][k]:.3f} | "
                     f"{report['ratio_ours_over_stock'].get(k, float('nan')):.3f} |")
    summary = (f"max pixel difference stock vs ours: {report['max_pixel_diff']:.0f}/255; our warm-up (incl. "
               f"compile): {report['warmup_s']['ours']:.1f} s")
    lines += ["", summary]
    if report["variants"]:
        header = "| lossy option | total (s) | vs stock | CPU s vs stock | vs ours exact | PSNR (dB) | latent rel L2 | saved |"
        lines += ["", header, "|---|---|---|---|---|---|---|---|"]
        for v in report["variants"]:
            lines.append(f"| {v['name']} | {v['total']:.3f} | {v['ratio_total_vs_stock']:.3f} | "
                         f"{v['ratio_cpu_total_vs_stock']:.3f} | "
                         f"{v['ratio_total_vs_ours_exact']:.3f} | {v['psnr_db']:.2f} | {v['latent_rel_l2']:.4f} | "
                         f"{_saved_text(v)} |")
    return "\n".join(lines) + "\n"
