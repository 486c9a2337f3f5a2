"""SwarmUI: image metadata (``parameters`` = ``{"sui_image_params": {...}, "sui_models": [...]}``) and preset files.

Formats as SwarmUI's C# writes them (mcmonkeyprojects/SwarmUI; the test fixtures are written by that code itself,
compiled with Mono - tests/fixtures/peers/SOURCES.md):
``T2IParamInput.GenFullMetadataObject`` (param ids such as ``cfgscale``, ``negativeprompt``, ``sigmashift``; model
names without ``.safetensors``; ``loras``/``loraweights`` as lists of strings), ``T2IPreset.NetData`` + the
"Export All" button (``{title: {author, title, description, preview_image, is_starred, param_map}}``, every value a
string; list values comma-separated) and ``ApplyStringEdit`` (``{value}`` in a preset prompt is the user's prompt).
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import InvalidRequest
from .names import sampler_name, scheduler_name
from .settings import PastedSettings, lora_name, set_size

# T2IParamInput.ResolutionAspectReferences: the 512-px reference size of each aspect ratio
ASPECT_REFERENCES: dict[str, tuple[int, int]] = {
    "1:1": (512, 512), "4:3": (576, 448), "3:2": (608, 416), "8:5": (608, 384), "16:9": (672, 384),
    "21:9": (768, 320), "2:3": (416, 608), "5:8": (384, 608), "9:16": (384, 672), "9:21": (320, 768),
}  # no "3:4": SwarmUI then sizes by width/height (checked with its own GetImageWidth, see SOURCES.md)
NO_PREVIEW = "imgs/model_placeholder.jpg"  # what AddNewPreset stores when a preset has no preview image
VALUE = "{value}"
_INFO_KEYS = {"swarm_version", "original_prompt", "original_negativeprompt", "date", "generation_time", "prep_time"}


def side_length_size(side: int, aspect: str) -> tuple[int, int]:
    """``GetImageWidth``/``GetImageHeight`` for a side length and aspect: the reference size scaled by side/512,
    rounded (half to even, as C#'s Math.Round) to a multiple of 16."""
    rw, rh = ASPECT_REFERENCES[aspect]
    return int(round(rw * (side / 512.0) / 16) * 16), int(round(rh * (side / 512.0) / 16) * 16)


def _list(value: Any) -> list[str]:
    if isinstance(value, list):
        return [str(v).strip() for v in value]
    return [s.strip() for s in str(value).split(",") if s.strip()]


def _params_to_fields(params: dict[str, Any], out: PastedSettings, *, preset: bool) -> None:
    """Map SwarmUI param ids to our fields (shared by image metadata and presets)."""
    p = {str(k).lower(): v for k, v in params.items()}
    used = set()

    def num(key: str, kind: type):
        v = p[key]
        if isinstance(v, bool):
            raise TypeError(key)
        if kind is int and (isinstance(v, int) or (isinstance(v, str) and v.strip().lstrip("-").isdigit())):
            if len(str(v).strip()) > 20:  # a seed fits 2**63; longer is not a setting
                raise ValueError(key)
            return int(v)  # exactly (large seeds lose digits through float)
        f = float(v)
        if f != f or f in (float("inf"), float("-inf")):  # "1e400", "nan": not a setting, reported as unmapped
            raise ValueError(key)
        return int(f) if kind is int else kind(f)

    for key, name, kind in (("steps", "steps", int), ("cfgscale", "cfg", float), ("sigmashift", "shift", float)):
        if key in p:
            used.add(key)
            try:
                out.fields[name] = num(key, kind)
            except (TypeError, ValueError):
                out.unmapped.append(f"{key}: {p[key]}")
    for key, name in (("prompt", "prompt"), ("negativeprompt", "negative_prompt")):
        if key in p:
            used.add(key)
            out.fields[name] = str(p[key])
    if "seed" in p:
        used.add("seed")
        try:
            seed = num("seed", int)
            if seed >= 0:
                out.fields["seed"] = seed
            else:
                out.warnings.append("seed -1 is SwarmUI's 'random': no seed set")
        except (TypeError, ValueError):
            out.unmapped.append(f"seed: {p['seed']}")
    if "model" in p:
        used.add("model")
        out.fields["model"] = str(p["model"])
    if "sampler" in p:
        used.add("sampler")
        sampler, folded = sampler_name(p["sampler"])
        if sampler is None:
            out.unmapped.append(f"sampler: {p['sampler']} (no such sampler here)")
        else:
            out.fields["sampler"] = sampler
            if folded:
                out.fields.setdefault("scheduler", folded)
    if "scheduler" in p:
        used.add("scheduler")
        if scheduler_name(p["scheduler"]) is None:
            out.unmapped.append(f"scheduler: {p['scheduler']} (no such scheduler here)")
        else:
            out.fields["scheduler"] = scheduler_name(p["scheduler"])
    # size: SwarmUI prefers side length + aspect ratio when both are set and the aspect is one it knows
    aspect = str(p.get("aspectratio", "")).strip()
    used |= {"aspectratio", "sidelength", "width", "height"} & set(p)
    if "sidelength" in p and aspect in ASPECT_REFERENCES:
        try:
            w, h = side_length_size(int(float(p["sidelength"])), aspect)
            set_size(out, "width", w, "sidelength")
            set_size(out, "height", h, "sidelength")
        except (TypeError, ValueError):
            out.unmapped.append(f"sidelength: {p['sidelength']}")
    else:
        for key in ("width", "height"):
            if key in p:
                set_size(out, key, p[key], key)
        if "sidelength" in p:
            out.unmapped.append(f"sidelength: {p['sidelength']} (aspect ratio {aspect or 'unset'})")
    if aspect and "width" not in out.fields and aspect != "Custom":
        from ..engine.specs import QWEN_RESOLUTIONS

        if aspect in QWEN_RESOLUTIONS:
            out.fields["aspect"] = aspect
        else:
            out.unmapped.append(f"aspectratio: {aspect} (not one of {', '.join(QWEN_RESOLUTIONS)})")
    if "loras" in p:
        used |= {"loras", "loraweights"}
        names = _list(p["loras"])
        weights = _list(p.get("loraweights", []))
        if weights and len(weights) != len(names):
            out.unmapped.append(f"loras/loraweights: {len(names)} names, {len(weights)} weights")
        else:
            loras = []
            for i, n in enumerate(names):
                try:
                    loras.append({"name": lora_name(n, out), "weight": float(weights[i]) if weights else 1.0})
                except ValueError:
                    out.unmapped.append(f"loraweights: {weights[i]}")
            if loras:
                out.fields["loras"] = loras
    if "lorasectionconfinement" in p:
        # written by SwarmUI's <lora:...> prompt tag: the section each LoRA applies to; 0 = the whole image
        used.add("lorasectionconfinement")
        sections = _list(p["lorasectionconfinement"])
        if any(sec not in ("0", "-1") for sec in sections):
            out.unmapped.append(f"lorasectionconfinement: {','.join(sections)} (LoRAs confined to prompt sections; "
                                "applied to the whole image here)")
    if "loratencweights" in p:
        used.add("loratencweights")
        out.warnings.append("loratencweights (text-encoder LoRA weights) not applied: our LoRAs patch the DiT")
    if preset:
        for key, name in (("images", "batch"), ("batchsize", "batch")):
            if key in p:
                used.add(key)
                try:
                    out.fields[name] = num(key, int)
                except (TypeError, ValueError):
                    out.unmapped.append(f"{key}: {p[key]}")
    for key, value in p.items():
        if key in used:
            continue
        if key in _INFO_KEYS:
            out.info[key] = value
        else:
            out.unmapped.append(f"{key}: {value}")


def parse_swarmui_metadata(data: Any) -> PastedSettings:
    """A SwarmUI image's ``parameters`` JSON (already decoded) -> request fields."""
    if not isinstance(data, dict) or not isinstance(data.get("sui_image_params"), dict):
        raise InvalidRequest("not SwarmUI metadata: expected {'sui_image_params': {...}}", code="invalid_metadata")
    out = PastedSettings(source="swarmui")
    _params_to_fields(data["sui_image_params"], out, preset=False)
    models = data.get("sui_models")
    if isinstance(models, list):
        out.info["models"] = [m for m in models if isinstance(m, dict)]
    if isinstance(data.get("sui_extra_data"), dict):
        out.info["extra_data"] = data["sui_extra_data"]
    comfy_conventions(out)
    return out


def comfy_conventions(out: PastedSettings) -> None:
    """SwarmUI and ComfyUI render with ComfyUI's conventions: one CPU noise stream, plain CFG (no cfg-norm)."""
    out.fields.setdefault("noise", "comfy")
    out.fields.setdefault("cfg_norm", False)
    out.info["compat"] = "comfy"


# ------------------------------------------------------------------------------------------------ presets


def import_swarmui_presets(data: Any) -> list[tuple[dict[str, Any], PastedSettings]]:
    """A SwarmUI preset file -> one ``(preset body, settings)`` per preset.

    Accepts the "Export All" file (``{title: preset, ...}``) and a single preset object (``{title, param_map}``).
    The body is ours (``name, description, author, params``); a prompt holding ``{value}`` is kept as written
    and its ``params['prompt']`` is a template (``apply_prompt_template`` fills it at use time).
    """
    if not isinstance(data, dict) or not data:
        raise InvalidRequest("not a SwarmUI preset file: expected a JSON object", code="invalid_preset")
    if isinstance(data.get("param_map"), dict):
        items = [(str(data.get("title") or ""), data)]
    elif all(isinstance(v, dict) and isinstance(v.get("param_map"), dict) for v in data.values()):
        items = [(str(k), v) for k, v in data.items()]
    else:
        raise InvalidRequest(
            "not a SwarmUI preset file: expected {'title', 'param_map'} or {title: {..., 'param_map': {...}}}",
            code="invalid_preset",
        )
    result = []
    for key, preset in items:
        out = PastedSettings(source="swarmui")
        _params_to_fields(preset["param_map"], out, preset=True)
        for k in ("preview_image", "is_starred"):
            if preset.get(k) and preset.get(k) != NO_PREVIEW:
                out.info[k] = preset[k]
        title = preset.get("title") if isinstance(preset.get("title"), str) and preset["title"].strip() else key
        params = {k: v for k, v in out.fields.items() if k != "noise" and k != "cfg_norm"}
        if "loras" in params:
            params["loras"] = [dict(lo) for lo in params["loras"]]
        body = {
            "name": title.strip() or "imported preset",
            "description": preset.get("description", "") if isinstance(preset.get("description"), str) else "",
            "author": preset.get("author", "") if isinstance(preset.get("author"), str) else "",
            "params": params,
        }
        result.append((body, out))
    return result


def apply_prompt_template(template: str, prompt: str | None) -> str:
    """SwarmUI ``ApplyStringEdit``: ``{value}`` in a preset's prompt is replaced by the user's prompt (the part
    before any ``<segment:``/``<object:``/``<region:`` tag, which is kept after the result); without ``{value}``
    the preset's prompt replaces the user's."""
    if VALUE not in template:
        return template
    prior = prompt or ""
    low = prior.lower()
    cuts = [i for i in (low.find("<segment:"), low.find("<object:"), low.find("<region:")) if i != -1]
    if cuts:
        end = min(cuts)
        return template.replace(VALUE, prior[:end].strip()) + " " + prior[end:].strip()
    return template.replace(VALUE, prior)


def export_swarmui_presets(presets: list[dict[str, Any]]) -> str:
    """Our presets (``name, description, author, params``) as SwarmUI's "Export All" file (JSON, 4-space indent,
    every param_map value a string, lists comma-separated)."""
    data: dict[str, Any] = {}
    for preset in presets:
        params = preset.get("params", {})
        pm: dict[str, str] = {}
        for ours, theirs in (("prompt", "prompt"), ("negative_prompt", "negativeprompt"), ("model", "model"),
                             ("steps", "steps"), ("cfg", "cfgscale"), ("seed", "seed"), ("sampler", "sampler"),
                             ("scheduler", "scheduler"), ("shift", "sigmashift"), ("width", "width"),
                             ("height", "height"), ("aspect", "aspectratio"), ("batch", "images")):
            if params.get(ours) is not None:
                pm[theirs] = _swarm_str(params[ours])
        if params.get("width") is not None and params.get("height") is not None:
            pm["aspectratio"] = "Custom"  # SwarmUI uses width/height only with a Custom aspect ratio
        if params.get("loras"):
            from ..engine.requests import LoraRef

            loras = [LoraRef.coerce(lo) for lo in params["loras"]]  # stored presets hold any accepted LoRA form
            pm["loras"] = ",".join(lo.name for lo in loras)
            pm["loraweights"] = ",".join(_swarm_str(lo.weight) for lo in loras)
        title = preset["name"]
        data[title] = {"author": preset.get("author", ""), "title": title,
                       "description": preset.get("description", ""), "preview_image": "", "is_starred": False,
                       "param_map": pm}
    return json.dumps(data, indent=4, ensure_ascii=False)


def _swarm_str(value: Any) -> str:
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    return str(value)


__all__ = [
    "ASPECT_REFERENCES",
    "apply_prompt_template",
    "comfy_conventions",
    "export_swarmui_presets",
    "import_swarmui_presets",
    "parse_swarmui_metadata",
    "side_length_size",
]
