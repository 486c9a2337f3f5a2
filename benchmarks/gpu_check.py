"""GPU acceptance run: the CUDA paths the CPU test suite cannot reach, in one offline command for a GPU machine.

1. The tiny model on CUDA in bf16 under every memory strategy (resident, model_offload, group_offload) gives the same
   image as the fp32 CPU run within bf16 tolerance, and a LoRA / GGUF / fp8 base runs there too.
2. Speed (issue 12), full-size random Qwen-Image weights at 1024², stock diffusers beside each number:
   DiT forward bf16 eager (= stock) / + regional compile / fp8 scaled-mm + compile (and the fp8 error vs bf16);
   Lightning settings 4 steps CFG 1 end to end; 20 steps CFG 4 (+ the step cache); VAE decode; peak memory.
   Targets (H100-class): DiT forward <= 130 ms bf16 / <= 90 ms fp8; Lightning 4-step <= 0.40 s; 50-step CFG 4 <= 9 s.
3. Memory caps 24/16/12/8 GB: the plan the memory planner makes (placement, per-component modes, GiB needed, why)
   for the bf16, fp8, GGUF Q8_0 and Q4_K_M DiT files (header-only stand-ins of the real files), then the fp8 and the
   GGUF Q8_0 DiT (in memory) run Lightning 4 steps under each cap's plan with the cap enforced
   (``torch.cuda.set_per_process_memory_fraction``): seconds, slowdown vs resident (target at 8 GB: <= 2x), peak.
4. 4-bit (issue 17): ``--quant int4`` (ours) and ``--quant nf4`` (bitsandbytes) on the full-size bf16 DiT —
   quantize time, forward ms, peak memory, rel-L2 vs bf16 — and nunchaku's kernels on the SVDQuant fixtures vs the
   torch reference where the GPU supports them (int4: sm75/80/86/89, nvfp4: sm120/121; skipped with that reason
   elsewhere, e.g. on sm90), and ``Engine.load(quant=int4|nf4|fp8)`` on a small float file as users run it (the
   float DiT loaded in RAM, each layer quantized onto the GPU) vs the same run on the CPU, with and without a LoRA.
   NF4 needs ``pip install bitsandbytes``, the kernels ``nunchaku``; each row says when it is missing.
Everything it needs is in the project's dependencies (no downloads: random weights are made on the device).

Usage: python benchmarks/gpu_check.py [--skip-tiny] [--skip-full] [--skip-4bit] [--size 1024] [--json out.json]
       python benchmarks/gpu_check.py --dry-run   # CPU, the tiny model at 64², no compile: exercises every
                                                  # section's code offline in seconds (numbers meaningless)
Exits 2 with a message when there is no CUDA device (and no --dry-run).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

GIB = 2**30


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-tiny", action="store_true", help="skip the tiny-model strategy/format checks")
    ap.add_argument("--skip-full", action="store_true", help="skip the full-size speed and memory sections")
    ap.add_argument("--skip-4bit", action="store_true", help="skip the 4-bit section (int4, nf4, nunchaku kernels)")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, no compile: check the script runs")
    ap.add_argument("--json")
    args = ap.parse_args()
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: this check is for a GPU machine (or pass --dry-run)", file=sys.stderr)
        return 2
    report: dict = {"device": torch.cuda.get_device_name(0) if not args.dry_run else "cpu (dry run)",
                    "torch": torch.__version__}
    ok = True
    if not args.skip_tiny and not args.dry_run:
        report["tiny"] = tiny_checks()
        ok = all(d < 0.1 for d in report["tiny"]["strategies"].values())
    if not args.skip_full:
        size = 64 if args.dry_run else args.size
        report["dit_forward"] = dit_forward(size, args.dry_run)
        report["end_to_end"] = end_to_end(size, args.dry_run)
        report["memory_caps"] = memory_caps(size, args.dry_run)
        report["memory_runs"] = memory_runs(size, args.dry_run, report["memory_caps"])
    if not args.skip_4bit:
        report["four_bit"] = four_bit(64 if args.dry_run else args.size, args.dry_run)
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0 if ok else 1


def tiny_checks() -> dict:
    import torch

    from qwenstudio import Engine
    from qwenstudio.config import Settings
    from qwenstudio.engine.formats.gguf import write_dit_gguf
    from qwenstudio.testing.formats import write_comfy_models_dir
    from qwenstudio.testing.loras import write_lora

    root = Path(tempfile.mkdtemp(prefix="qs-gpu-"))
    settings = Settings(home=root / "home")
    out: dict = {"strategies": {}, "formats": {}}
    kw = {"prompt": "a red fox", "seed": 3, "steps": 4, "cfg": 3.0, "width": 128, "height": 96}
    ref = Engine.load("tiny", device="cpu", settings=settings).generate(**kw).latents
    folder = settings.cache_dir / next(p.name for p in settings.cache_dir.iterdir() if p.name.startswith("tiny-"))
    for strategy in ("resident", "model_offload", "group_offload"):
        engine = Engine.load("tiny", device="cuda", settings=settings, offload=strategy)
        out["strategies"][strategy] = float((engine.generate(**kw).latents.float().cpu() - ref).abs().max())
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
        out["formats"][name] = {"max_diff_vs_cpu_fp32": float((plain - ref).abs().max()),
                                "lora_changes_output": bool((lora - plain).abs().max() > 1e-3)}
        del engine
        torch.cuda.empty_cache()
    # fp8 compute on the tiny model: scaled_mm (compiled) vs the CPU emulation of the same arithmetic
    from qwenstudio.engine.quant.fp8 import scaled_mm_supported

    if scaled_mm_supported("cuda"):
        gpu = Engine.load("tiny", device="cuda", dtype="bfloat16", settings=settings, quant="fp8", compile=True)
        cpu = Engine.load("tiny", device="cpu", settings=settings, quant="fp8")
        a, b = gpu.generate(**kw).latents.float().cpu(), cpu.generate(**kw).latents.float()
        out["fp8_scaled_mm_vs_cpu_emulation_rel_l2"] = float((a - b).norm() / b.norm())
    return out


def _components(dry_run: bool):
    """Full-size random Qwen-Image in bf16 on the GPU, or (dry run) the tiny model on the CPU."""
    import torch

    if dry_run:
        from qwenstudio import Engine

        return Engine.load("tiny", device="cpu").components
    from qwenstudio.bench import full_size_components

    return full_size_components(torch.device("cuda"), torch.bfloat16)


def _timed(fn, device, repeats: int = 5) -> float:
    """Median seconds of ``fn()`` after one warm-up call, with device syncs."""
    import statistics

    import torch

    def sync():
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()

    fn()
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _peak_gib(dry_run: bool) -> float | None:
    import torch

    return None if dry_run else round(torch.cuda.max_memory_allocated() / GIB, 2)


def dit_forward(size: int, dry_run: bool) -> dict:
    """One DiT forward at ``size``² with 128 text tokens: stock eager, regional compile, fp8 + compile."""
    import torch

    from qwenstudio.engine.acceleration import apply_acceleration, fp8_compute_mode
    from qwenstudio.engine.quant.fp8 import quantize_model_fp8, set_fp8_compute

    c = _components(dry_run)
    tr, dev, dt = c.transformer, c.device, c.dtype
    del c.text_encoder, c.vae
    g = torch.Generator(device=dev).manual_seed(0)
    n = (size // 16) ** 2
    text = torch.randn(1, 128, tr.config.joint_attention_dim, generator=g, device=dev).to(dt)
    kw = {"hidden_states": torch.randn(1, n, 64, generator=g, device=dev).to(dt), "encoder_hidden_states": text,
          "timestep": torch.tensor([0.5], device=dev), "img_shapes": [[(1, size // 16, size // 16)]],
          "return_dict": False}
    out: dict = {"size": size, "text_tokens": 128}
    with torch.inference_mode():
        ref = tr(**kw)[0].float()
        out["eager_ms (stock)"] = round(_timed(lambda: tr(**kw), dev) * 1e3, 2)
        if not dry_run:
            t = time.perf_counter()
            apply_acceleration(tr, compile=True, device=dev)
            tr(**kw)
            out["compile_warmup_s"] = round(time.perf_counter() - t, 1)
            out["compiled_bf16_ms"] = round(_timed(lambda: tr(**kw), dev) * 1e3, 2)
        quantize_model_fp8(tr)
        mode = fp8_compute_mode(dev, not dry_run, True)
        set_fp8_compute(tr, mode)
        t = time.perf_counter()
        got = tr(**kw)[0].float()
        out[f"fp8_{mode}_first_call_s"] = round(time.perf_counter() - t, 1)
        out[f"fp8_{mode}_ms"] = round(_timed(lambda: tr(**kw), dev) * 1e3, 2)
        out["fp8_rel_l2_vs_bf16"] = round(float((got - ref).norm() / ref.norm()), 5)
    out["peak_gib"] = _peak_gib(dry_run)
    if not dry_run:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return out


def end_to_end(size: int, dry_run: bool) -> dict:
    """``run_bench`` (stock QwenImagePipeline vs ours, same modules): Lightning settings (4 steps, CFG 1) with fp8,
    then 20 steps CFG 4 with the step cache. VAE decode and text encode come with each report."""
    import torch

    from qwenstudio.bench import run_bench

    common = {"random_full": not dry_run, "width": size, "height": size, "repeats": 1 if dry_run else 2,
              "compile": "off" if dry_run else "on"}
    out = {"lightning_4step_cfg1": run_bench(steps=2 if dry_run else 4, cfg=1.0, quant="fp8", **common)}
    out["lightning_4step_cfg1"]["peak_gib"] = _peak_gib(dry_run)
    if not dry_run:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    out["20step_cfg4"] = run_bench(steps=3 if dry_run else 20, cfg=4.0, cache=0.08, **common)
    out["20step_cfg4"]["peak_gib"] = _peak_gib(dry_run)
    return out


CAPS = (24, 16, 12, 8)


def memory_caps(size: int, dry_run: bool) -> dict:
    """The plan under each cap (placement, per-component modes, GiB needed, why) for the bf16 / fp8 / GGUF Q8_0 /
    GGUF Q4_K_M DiT files of the real model, from header-only stand-ins of those files (testing/headers.py)."""
    from qwenstudio.engine.memory import MemoryInfo, plan_memory
    from qwenstudio.errors import QwenStudioError
    from qwenstudio.testing.headers import DIT_KINDS, qwen_image_footprints, qwen_image_shapes

    shapes = qwen_image_shapes()
    footprints = {kind: qwen_image_footprints(kind, shapes=shapes) for kind in DIT_KINDS}
    out: dict = {}
    for cap in CAPS:
        info = MemoryInfo(ram_free=120 * GIB, ram_total=128 * GIB, vram_free=cap * GIB, vram_total=cap * GIB)
        row = {}
        for kind, fps in footprints.items():
            try:
                plan = plan_memory(fps, info, device="cuda", width=size, height=size, compute_itemsize=2)
                row[kind] = plan.as_metadata()
            except QwenStudioError as e:  # the planner refuses what cannot fit: that is the answer for this cap
                row[kind] = f"refused: {e}"
        out[f"{cap}GB"] = row
    return out


def memory_runs(size: int, dry_run: bool, caps: dict) -> dict:
    """Lightning (4 steps, CFG 1) with the fp8 and the GGUF Q8_0 DiT under each cap's plan vs resident, same process,
    same weights: seconds, slowdown, max latent difference (target at 8 GB: runs, <= 2x). GPU: full-size random
    weights, the cap enforced with ``torch.cuda.set_per_process_memory_fraction``. Dry run: the tiny model on the
    CPU under the same placements (simulated accelerator), which checks the hooks, not the speed."""
    out = {}
    for kind in ("fp8", "q8_0"):
        try:
            out[kind] = _runs_for(kind, size, dry_run, {cap: row[kind] for cap, row in caps.items()})
        except Exception as e:  # noqa: BLE001  (a GPU report: record the failure and go on)
            out[kind] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    return out


def _runs_for(kind: str, size: int, dry_run: bool, plans: dict) -> dict:
    import torch

    from qwenstudio.engine.engine import Engine
    from qwenstudio.engine.memory import Plan, unstream_weights
    from qwenstudio.engine.quant.fp8 import quantize_model_fp8
    from qwenstudio.engine.specs import get_spec

    c = _components(dry_run)
    if kind == "fp8":
        quantize_model_fp8(c.transformer)
    else:
        _random_q8_0(c.transformer)
    device = "cpu" if dry_run else "cuda"
    spec = get_spec("tiny" if dry_run else "qwen-image")
    kw = {"prompt": "a red fox", "seed": 1, "steps": 2 if dry_run else 4, "cfg": 1.0, "width": size, "height": size}
    resident = Engine(c, spec, plan=Plan("cpu" if dry_run else "resident", 0, 0))
    ref = resident.generate(**kw).latents.float().cpu()
    out: dict = {"resident_s": round(_timed(lambda: resident.generate(**kw), device, repeats=2), 3)}
    total = None if dry_run else torch.cuda.get_device_properties(0).total_memory
    for cap, meta in plans.items():
        if isinstance(meta, str):
            out[cap] = meta
            continue
        plan = Plan(meta["strategy"], 0, 0, modes=meta["components"])
        for m in (c.transformer, c.text_encoder, c.vae):
            unstream_weights(m)
            m.to("cpu")
        if not dry_run:
            torch.cuda.empty_cache()
            torch.cuda.set_per_process_memory_fraction(min(1.0, int(cap[:-2]) * GIB / total))
            torch.cuda.reset_peak_memory_stats()
        try:
            if plan.strategy == "resident" and not dry_run:
                for m in (c.transformer, c.text_encoder, c.vae):
                    m.to(device)
            engine = Engine(c, spec, plan=plan)
            got = engine.generate(**kw).latents.float().cpu()
            t = _timed(lambda e=engine: e.generate(**kw), device, repeats=2)
            out[cap] = {"strategy": plan.strategy, "components": meta["components"], "seconds": round(t, 3),
                        "slowdown": round(t / out["resident_s"], 2), "max_latent_diff": float((got - ref).abs().max()),
                        "peak_gib": _peak_gib(dry_run)}
        except Exception as e:  # noqa: BLE001  (a GPU report: record any failure and go on to the next cap)
            out[cap] = {"strategy": plan.strategy, "error": f"{type(e).__name__}: {str(e)[:200]}"}
        finally:
            if not dry_run:
                torch.cuda.set_per_process_memory_fraction(1.0)
    return out


def four_bit(size: int, dry_run: bool) -> dict:
    """``--quant int4`` / ``--quant nf4`` on the full-size bf16 DiT (rebuilt per mode from the same seed: quantizing
    is in place), then nunchaku's kernels vs the torch reference on the committed SVDQuant fixtures."""
    import torch

    from qwenstudio.engine.quant.load_time import quantize_on_load
    from qwenstudio.errors import QwenStudioError

    out: dict = {"size": size, "text_tokens": 128}
    ref = None
    for mode in ("bf16", "int4", "nf4"):
        c = _components(dry_run)
        tr, dev, dt = c.transformer, c.device, c.dtype
        del c.text_encoder, c.vae
        g = torch.Generator(device=dev).manual_seed(0)
        n = (size // 16) ** 2
        kw = {"hidden_states": torch.randn(1, n, 64, generator=g, device=dev).to(dt),
              "encoder_hidden_states": torch.randn(1, 128, tr.config.joint_attention_dim, generator=g,
                                                   device=dev).to(dt),
              "timestep": torch.tensor([0.5], device=dev), "img_shapes": [[(1, size // 16, size // 16)]],
              "return_dict": False}
        row: dict = {}
        try:
            if mode != "bf16":  # as Engine.load does it: outside inference mode (bitsandbytes makes Parameters)
                t = time.perf_counter()
                with torch.no_grad():
                    row.update(quantize_on_load(tr, mode, device=dev, dtype=dt))
                row["quantize_s"] = round(time.perf_counter() - t, 2)
            with torch.inference_mode():
                if not dry_run:  # peak of the forward on the quantized model, not of the bf16 one it came from
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                got = tr(**kw)[0].float()
                row["forward_ms"] = round(_timed(lambda m=tr: m(**kw), dev, repeats=3) * 1e3, 2)
        except QwenStudioError as e:  # e.g. nf4 off CUDA / without bitsandbytes: the reason is the row
            row = {"skipped": str(e)}
        else:
            if ref is None:
                ref = got
            row["rel_l2_vs_bf16"] = round(float((got - ref).norm() / ref.norm()), 5)
            held = [*tr.parameters(), *tr.buffers()]
            held += [x.quant_state.absmax for x in held if getattr(x, "quant_state", None) is not None]  # NF4 stats
            row["dit_gib"] = round(sum(x.numel() * x.element_size() for x in held) / GIB, 3)
            row["peak_gib"] = _peak_gib(dry_run)
        out[mode] = row
        del c, tr
    out["nunchaku_kernels"] = _nunchaku_kernels("cpu" if dry_run else "cuda")
    out["engine_load"] = _quant_at_load("cpu" if dry_run else "cuda")
    return out


def _quant_at_load(device: str) -> dict:
    """``Engine.load(..., quant=q)`` the way users run it, on ``device``: the float DiT is loaded in RAM and each layer
    quantized onto the device (the path no CPU test can show on a GPU). Per mode: the plan, the latents with and
    without a LoRA vs the same run on the CPU (fp32 both sides), and the device's peak memory."""
    import torch

    from qwenstudio import Engine
    from qwenstudio.errors import QwenStudioError
    from qwenstudio.testing.formats import write_comfy_models_dir
    from qwenstudio.testing.loras import write_lora
    from qwenstudio.testing.svdquant_files import build_source_dit, save_source_dit
    from qwenstudio.testing.tiny import write_diffusers_folder

    root = Path(tempfile.mkdtemp(prefix="qs-quant-load-"))
    source = build_source_dit()
    write_comfy_models_dir(root / "models", write_diffusers_folder(root / "tiny-qwen-image"), variants=())
    save_source_dit(source, root / "models" / "diffusion_models" / "wide-fp32.safetensors")
    write_lora(root / "models" / "loras" / "check.safetensors", source, "comfy", seed=1)
    kw = {"prompt": "a red fox", "seed": 3, "steps": 4, "cfg": 1.0, "width": 64, "height": 64}
    out: dict = {}
    for q in ("int4", "nf4", "fp8"):
        load = {"models_dirs": (root / "models",), "variant": "tiny", "dtype": "float32", "quant": q}
        try:
            cpu = Engine.load("wide-fp32", device="cpu", compile=False, **load)
            want = [cpu.generate(**kw).latents.float(), cpu.generate(**kw, loras=[("check", 1.0)]).latents.float()]
            del cpu
            if device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            # fp8 compute on a GPU runs compiled (eager is refused); its scaled_mm vs the CPU emulation is ~1e-3
            engine = Engine.load("wide-fp32", device=device, compile=q == "fp8" and device == "cuda", **load)
            got = [engine.generate(**kw).latents.float().cpu(),
                   engine.generate(**kw, loras=[("check", 1.0)]).latents.float().cpu()]
        except QwenStudioError as e:  # e.g. fp8 compute needs compile on a GPU: the reason is the row
            out[q] = {"skipped": str(e)}
            continue
        memory = engine.describe().get("memory", {})
        out[q] = {"strategy": engine.plan.strategy, "ram_needed_gib": memory.get("ram_needed_gib"),
                  "max_diff_vs_cpu": max(float((g - w).abs().max()) for g, w in zip(got, want)),
                  "lora_changes_output": bool((got[1] - got[0]).abs().max() > 1e-3),
                  "peak_gib": _peak_gib(device != "cuda")}
        del engine
    return out


def _nunchaku_kernels(device: str) -> dict:
    """Each SVDQuant fixture on ``device``: with nunchaku's kernels where they run (vs the CPU reference), else the
    reason they do not (capability first: sm90 cannot run either precision)."""
    import warnings

    import torch

    from qwenstudio.engine.formats.nunchaku import load_dit_svdquant
    from qwenstudio.engine.quant.svdquant import kernel_support
    from qwenstudio.testing.svdquant_files import FIXTURES, FP4_FILE, INT4_FILE

    out = {}
    for precision, name in (("int4", INT4_FILE), ("nvfp4", FP4_FILE)):
        reason = kernel_support(precision, device)
        if reason is not None:
            out[precision] = {"skipped": reason}
            continue
        g = torch.Generator().manual_seed(0)
        kw = {"hidden_states": torch.randn(1, 64, 64, generator=g), "encoder_hidden_states": torch.randn(1, 16, 32,
              generator=g), "timestep": torch.tensor([0.5]), "img_shapes": [[(1, 8, 8)]], "return_dict": False}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cpu = load_dit_svdquant(FIXTURES / name, device="cpu", dtype=torch.bfloat16)
        gpu = load_dit_svdquant(FIXTURES / name, device=device, dtype=torch.bfloat16)
        on = {k: v.to(device) if torch.is_tensor(v) else v for k, v in kw.items()}
        cast = {k: v.bfloat16() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kw.items()}
        on = {k: v.bfloat16() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in on.items()}
        with torch.inference_mode():
            a, b = gpu(**on)[0].float().cpu(), cpu(**cast)[0].float()
            ms = _timed(lambda: gpu(**on), device, repeats=5) * 1e3
        out[precision] = {"kernel_layers": sum(1 for m in gpu.modules() if getattr(m, "kernel", None) is not None),
                          "rel_l2_kernels_vs_reference": round(float((a - b).norm() / b.norm()), 5),
                          "forward_ms": round(ms, 3)}
    return out
def _random_q8_0(transformer) -> None:
    """Every block Linear as a GGUF Q8_0 layer with random blocks (scale 0.02/127: the weights' spread), made on the
    layer's device: the GGUF path's memory and dequantize-per-call cost, without a 20 GB file."""
    import torch

    from qwenstudio.engine.quant.gguf_linear import GGUFLinear

    for name, mod in list(transformer.transformer_blocks.named_modules()):
        if type(mod) is not torch.nn.Linear or mod.in_features % 32:
            continue
        dev = mod.weight.device
        new = GGUFLinear(mod.in_features, mod.out_features, "Q8_0", bias=mod.bias is not None, device=dev,
                         dtype=mod.weight.dtype)
        blocks = new.weight.view(mod.out_features, -1, 34)
        g = torch.Generator(device=dev).manual_seed(0)
        blocks[..., 2:] = torch.randint(0, 256, blocks[..., 2:].shape, generator=g, device=dev, dtype=torch.uint8)
        blocks[..., :2] = torch.tensor([0.02 / 127], dtype=torch.float16, device=dev).view(torch.uint8)
        if mod.bias is not None:
            new.bias.data.copy_(mod.bias.data)
        parent = transformer.transformer_blocks.get_submodule(name.rpartition(".")[0])
        setattr(parent, name.rpartition(".")[2], new)


if __name__ == "__main__":
    sys.exit(main())
