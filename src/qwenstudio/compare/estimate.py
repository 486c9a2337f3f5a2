"""The time a comparison will take, for ``--dry-run``, without loading anything.

Cost model: seconds = fixed (text encode + VAE decode, scaled by pixels) + NFE × seconds per model evaluation
(scaled linearly by image tokens). The per-evaluation time comes from, in order: images this output folder already
finished for the same variant (a resumed run), a ``qwenstudio bench --json`` report (``--bench FILE``), or the H100
measurements in the project's reference notes (full-size Qwen-Image, bf16, eager: 197 ms per DiT forward, 31 ms text
encoder, 78 ms VAE decode at 1024²). Steps and CFG are what the run would use: the variant's settings, else a
Lightning LoRA's recipe (from its name), else the recipe's defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

H100_REFERENCE = {"step": 0.197, "text_encode": 0.031, "vae_decode": 0.078, "pixels": 1024 * 1024, "cfg": 1.0}


@dataclass(frozen=True)
class Estimate:
    images: int
    seconds: float | None
    basis: str


def planned_steps_cfg(variant, size: tuple[int, int] | None) -> tuple[int, float, tuple[int, int]]:
    """(steps, cfg, size) the engine would pick for ``variant``, from data only."""
    from ..engine.lora import detect_lightning

    spec = _spec(variant)
    steps, cfg = spec.defaults.steps, spec.defaults.cfg
    for ref in variant.fields.get("loras") or ():
        recipe = detect_lightning(ref.name) if ref.weight else None
        if recipe is not None:
            steps, cfg = recipe.steps, recipe.cfg
    steps = variant.fields.get("steps") or steps
    cfg = variant.fields.get("cfg") if variant.fields.get("cfg") is not None else cfg
    dw, dh = spec.default_size
    w, h = size or (variant.fields.get("width") or dw, variant.fields.get("height") or dh)
    return int(steps), float(cfg), (int(w), int(h))


def estimate(plan, done: dict[str, dict[str, Any]], bench: dict[str, Any] | None = None) -> dict[str, Estimate]:
    """{variant label: Estimate of its remaining images}."""
    from .engines import nfe

    out = {}
    for v in plan.variants:
        jobs = [j for j in plan.jobs() if j.variant.label == v.label and j.key not in done]
        if not jobs:
            out[v.label] = Estimate(0, 0.0, "done")
            continue
        mine = [r for r in done.values() if r["variant"] == v.label]
        total, basis = 0.0, ""
        for j in jobs:
            steps, cfg, (w, h) = planned_steps_cfg(v, j.size)
            n, px = nfe(steps, cfg), w * h
            if mine:
                per = sum(r["seconds"] / (r["nfe"] * r["request"]["width"] * r["request"]["height"])
                          for r in mine) / len(mine)
                total += per * n * px
                basis = f"{len(mine)} finished image(s) of this variant"
                continue
            ref = _bench_basis(bench) if bench else (None if _is_tiny(v) else H100_REFERENCE)
            if ref is None:
                out[v.label] = Estimate(len(jobs), None, "no basis (the tiny model: pass --bench)")
                break
            per_eval = ref["step"] / (2 if ref["cfg"] > 1 else 1)
            scale = px / ref["pixels"]
            total += ref["text_encode"] + ref["vae_decode"] * scale + n * per_eval * scale
            basis = "bench report" if bench else "H100 reference measurements (bf16, eager)"
        else:
            out[v.label] = Estimate(len(jobs), total, basis)
    return out


def _spec(variant):
    """The recipe the model would run with: ``identify_model`` (by content, as Engine.load decides) when the model
    resolves, else its name (a dry run may plan for files not on this machine)."""
    from ..engine.identity import identify_name
    from ..engine.sources import identify_model
    from ..engine.specs import get_spec
    from ..errors import QwenStudioError

    if variant.variant:
        return get_spec(variant.variant)
    model = str(variant.model)
    try:
        return get_spec(identify_model(model)[1].variant)
    except QwenStudioError:
        name = Path(model).stem if model.endswith((".safetensors", ".gguf")) else Path(model).name
        return get_spec(identify_name(name).variant)


def _is_tiny(variant) -> bool:
    return _spec(variant).builtin


def _bench_basis(bench: dict[str, Any]) -> dict[str, float]:
    from ..errors import InvalidRequest

    try:
        w, h = (int(x) for x in str(bench["size"]).split("x"))
        ours = bench["ours"]
        return {"step": float(ours["step"]), "text_encode": float(ours["text_encode"]),
                "vae_decode": float(ours["vae_decode"]), "pixels": w * h, "cfg": float(bench["cfg"])}
    except (KeyError, TypeError, ValueError):
        raise InvalidRequest("--bench: not a `qwenstudio bench --json` report", code="invalid_bench") from None
