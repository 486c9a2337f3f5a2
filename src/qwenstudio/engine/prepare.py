"""``prepare``: the one place a request becomes concrete, run once before any GPU work.

The edges (CLI, HTTP, studio, presets, ``--from-image``) only parse: a field the user did not give stays ``None``.
Here, in order, each unset field is filled from

1. the named preset (``"preset": "name"``; its ``{value}`` in a prompt takes the user's prompt, as SwarmUI does),
2. a LoRA's recipe (a Lightning LoRA: its steps, CFG 1, shift 3),
3. the variant's defaults (``ModelSpec.defaults``),

and ``settings_from`` records which one (``"user"``, ``"preset NAME"``, ``"lora NAME"``, ``"variant NAME"``,
``"random"`` for a drawn seed) — so a Lightning LoRA from the CLI runs at 8 steps/CFG 1 unless the user typed
``--cfg``, and the PNG says why. Then every bound is checked and the prompts are tokenized against the model's limit
(cheap: file headers and the tokenizer only), so a server refuses a bad job before queueing it.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

from ..errors import InvalidRequest, ModelNotFound
from .requests import RECIPE_FIELDS, GenerateRequest

PresetLookup = Callable[[str], dict]  # preset name -> its params (ModelNotFound code preset_not_found if none)
PRESET_FILLS = (*RECIPE_FIELDS, "aspect", "seed", "magic", "noise", "batch", "prompt", "loras")


def prepare_request(engine, request: GenerateRequest) -> GenerateRequest:
    if request.is_prepared:  # concrete already (a stored job, a prepared request): bounds only, never re-filled
        return engine.check_request(request)
    sources = {k: "user" for k in request.user_set()}
    if request.seed is not None:
        sources["seed"] = "user"
    if request.loras:
        sources["loras"] = "user"
    if request.preset:
        request = _apply_preset(engine.preset_lookup, request, sources)
    request = _apply_compat(request, sources)
    request = _apply_lora_recipes(engine, request, sources)
    before = {k: getattr(request, k) for k in (*RECIPE_FIELDS, "seed")}
    req = request.resolve(engine.spec)
    for k, v in before.items():
        if v is None:
            from_images = k in ("width", "height") and getattr(request, "anchor", None) is not None
            sources[k] = "random" if k == "seed" else "input image" if from_images else f"variant {engine.spec.name}"
    req = replace(req, settings_from=dict(sorted(sources.items())))
    return engine.check_request(req, original=request)


def _apply_preset(lookup: PresetLookup | None, request: GenerateRequest, sources: dict) -> GenerateRequest:
    name = request.preset
    if lookup is None:
        raise InvalidRequest(f"preset '{name}' given, but no preset store is available here", code="preset_not_found")
    params = lookup(name)
    if not isinstance(params, dict):
        raise ModelNotFound(f"no preset named '{name}'", code="preset_not_found")
    from . import fields as F

    data = {k: v for k, v in params.items() if k in F.BY_NAME and k in PRESET_FILLS}
    F.check_types(data)
    F.check_bounds(data, [k for k in data if F.BY_NAME[k].kind not in (list, dict)])
    updates: dict[str, Any] = {}
    for k, v in data.items():
        current = getattr(request, k)
        if k == "prompt":
            if isinstance(v, str) and "{value}" in v:  # SwarmUI: the preset's prompt wraps the user's
                updates["prompt"] = v.replace("{value}", request.prompt)
                sources["prompt"] = f"preset {name}"
            continue
        if k == "loras":
            if not request.loras and v:
                updates["loras"] = v
                sources["loras"] = f"preset {name}"
            continue
        if current is None or (k == "batch" and current == 1 and v != 1):
            updates[k] = v
            sources[k] = f"preset {name}"
    return replace(request, **updates)


# What "the same settings" mean in ComfyUI/SwarmUI (REFERENCE.md): ComfyUI's CPU noise stream, plain CFG (no
# renorm), KSampler's euler/simple with ModelSamplingAuraFlow shift 3.1. RoPE positions: pipeline.denoise.
COMFY_CONVENTIONS = {"noise": "comfy", "cfg_norm": False, "scheduler": "simple", "shift": 3.1}


def _apply_compat(request: GenerateRequest, sources: dict) -> GenerateRequest:
    if request.compat != "comfy":
        return request
    updates = {}
    for k, v in COMFY_CONVENTIONS.items():
        current = getattr(request, k)
        if current is None:
            updates[k] = v
            sources[k] = "compat comfy"
    return replace(request, **updates)


def _apply_lora_recipes(engine, request: GenerateRequest, sources: dict) -> GenerateRequest:
    """A Lightning LoRA (weight != 0) fills steps/CFG/shift/scheduler that nobody set."""
    from .lora import detect_lightning

    for ref in request.loras:
        if not ref.weight:
            continue
        path = engine.lora_path(ref.name)
        from .loading import read_safetensors_header

        metadata = read_safetensors_header(path).get("__metadata__") or {}
        recipe = detect_lightning(path, metadata)
        if recipe is None:
            continue
        updates = {k: v for k, v in recipe.as_fields().items() if getattr(request, k) is None}
        for k in updates:
            sources[k] = f"lora {ref.name}"
        request = replace(request, **updates)
    return request
