"""The one table of request fields: types, bounds, help text and CLI flags for every settable field.

Everything that checks or describes a request reads this table — the type check of JSON bodies and presets
(``check_types``), the bound checks of ``GenerateRequest.validate`` (``check_bounds``), the OpenAPI/JSON schema
(``json_schema``) and the options shared by ``qwenstudio generate`` and ``qwenstudio edit`` (``cli/options.py``) —
so a limit changed here changes everywhere, and the docs cannot drift from the engine (they did: the OpenAPI body
said 2000 prompt characters and n <= 4 while the engine allowed 20000 and 16).

``None`` means "unset" for every field with ``nullable=True``: the engine's ``prepare`` fills it from (in order) a
named preset, a LoRA's recipe (Lightning) and the variant's defaults, and records which one in the metadata.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidRequest

MAX_SEED = 2**63 - 1  # fits SQLite INTEGER and JSON numbers exactly enough for every client we know
PROMPT_CHARS = 20000
MAX_PIXELS = 4096 * 4096
MAX_LORAS = 8


@dataclass(frozen=True)
class Field:
    name: str
    kind: type  # str, int, float, bool, dict, list
    help: str
    lo: float | None = None
    hi: float | None = None
    nullable: bool = True  # None = "unset" (filled by prepare)
    multiple_of: int | None = None
    max_len: int | None = None
    choices: str | tuple | None = None  # a tuple, or the name of a registry resolved lazily ("samplers")
    cli: str | None = None  # the CLI flag ("--steps"); None: not a CLI option (or handled by hand)
    modes: tuple[str, ...] = ("generate", "edit")
    code: str | None = None  # error code for an out-of-range value (default invalid_<name>)
    label: str | None = None  # how messages name it (default: the field name)


FIELDS: tuple[Field, ...] = (
    Field("prompt", str, "What to draw (or, for edit models, what to change).", nullable=False,
          max_len=PROMPT_CHARS),
    Field("negative_prompt", str, "Negative prompt (used when CFG > 1).", max_len=PROMPT_CHARS, cli="--negative"),
    Field("width", int, "Width in pixels, a multiple of 16.", 16, 4096, multiple_of=16, cli="--width"),
    Field("height", int, "Height in pixels, a multiple of 16.", 16, 4096, multiple_of=16, cli="--height"),
    Field("aspect", str, "Recommended size by aspect ratio, e.g. 16:9 (when width/height are not given).",
          max_len=32, cli="--aspect"),
    Field("steps", int, "Denoising steps.", 1, 200, cli="--steps"),
    Field("cfg", float, "True CFG scale; <= 1 skips the negative pass.", 0.0, 30.0, cli="--cfg"),
    Field("cfg_norm", bool, "Rescale the CFG result to the conditional norm (the reference; ComfyUI: off).",
          cli="--cfg-norm"),
    Field("sampler", str, "Sampler (ComfyUI names).", choices="samplers", cli="--sampler", code="invalid_sampler"),
    Field("scheduler", str, "Sigma schedule (reference or ComfyUI names).", choices="schedulers", cli="--scheduler",
          code="invalid_scheduler"),
    Field("shift", float, "Sigma shift (ComfyUI ModelSamplingAuraFlow; Lightning: 3).", 0.01, 100.0, cli="--shift"),
    Field("seed", int, "Seed (random when unset; always recorded).", 0, MAX_SEED, cli="--seed"),
    Field("batch", int, "Images per run.", 1, 16, nullable=False, cli="--batch"),
    Field("noise", str, "Seed convention: diffusers (seed+i per image; default) or comfy (one CPU stream).",
          choices=("diffusers", "comfy"), cli="--noise", label="noise convention"),
    Field("noise_skip", int, "Latent images of the noise stream to skip (re-creates image i of a comfy batch).",
          0, 1024, nullable=False),
    Field("magic", str, "Append the official positive-magic suffix: en or zh.", choices=("en", "zh"), cli="--magic"),
    Field("compat", str, "Reproduce another tool's render: comfy = ComfyUI/SwarmUI (RoPE positions, CPU noise "
          "stream, plain CFG, simple schedule with shift 3.1, unless set).", choices=("comfy",), cli="--compat"),
    Field("loras", list, "LoRA stack: [{name, weight}] (CLI: --lora NAME:WEIGHT, --loras 'a : 0.8, b : 0.5').",
          nullable=False),
    Field("preset", str, "A saved preset whose fields fill what the request leaves unset.", max_len=200,
          cli="--preset"),
    Field("extra", dict, "Free-form client data, stored with the image.", nullable=False),
    # image-conditioned modes (engine.edit)
    Field("strength", float, "How much to change, 0-1 (img2img/inpaint default 0.6; edit models 1.0).", 0.0, 1.0,
          cli="--strength", modes=("edit",)),
    Field("feather", int, "Seam blend inside the mask, in pixels.", 0, 256, nullable=False, cli="--feather",
          modes=("edit",)),
    Field("keep_size", bool, "Output at the input's exact size, pixel-aligned (default: on with a mask).",
          cli="--keep-size", modes=("edit",)),
    Field("controlnet", str, "A ControlNet name from the models home.", max_len=200, modes=("edit",)),
)

BY_NAME: dict[str, Field] = {f.name: f for f in FIELDS}
GENERATE_FIELDS = frozenset(f.name for f in FIELDS if "generate" in f.modes)
EDIT_FIELDS = frozenset(f.name for f in FIELDS)


def _choices(f: Field) -> tuple:
    if f.choices == "samplers":
        from .sampling import SAMPLERS

        return tuple(SAMPLERS)
    if f.choices == "schedulers":
        from .sampling import SCHEDULERS

        return tuple(SCHEDULERS)
    return tuple(f.choices or ())


def _type_ok(f: Field, value: Any) -> bool:
    if f.kind is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if f.kind is int:
        return isinstance(value, int)
    if f.kind is float:
        return isinstance(value, (int, float))
    return isinstance(value, f.kind)


def check_types(data: dict[str, Any]) -> None:
    """Wrongly typed fields are a 4xx before they can reach code that assumes the types (JSON bodies, presets)."""
    for name, value in data.items():
        f = BY_NAME.get(name)
        if f is None or (value is None and (f.nullable or name == "prompt")):
            continue
        if not _type_ok(f, value):
            raise InvalidRequest(f"field '{name}' has the wrong type ({type(value).__name__})", code="invalid_type")


def check_value(f: Field, value: Any, *, label: str | None = None) -> None:
    """One field's bounds (type, range, multiple, length, choices); ``None`` passes for nullable fields."""
    label = label or f.label or f.name
    if value is None:
        if f.nullable:
            return
        raise InvalidRequest(f"{label} is required", code=f.code or f"invalid_{f.name}")
    if not _type_ok(f, value):
        kind = {float: "a number", int: "an integer", bool: "true or false", str: "a string"}.get(f.kind, f.kind.__name__)
        raise InvalidRequest(f"{label} must be {kind}, got {value!r}", code=f.code or f"invalid_{f.name}")
    if f.kind is float and not math.isfinite(value):
        raise InvalidRequest(f"{label} must be a number (finite), got {value!r}", code=f.code or f"invalid_{f.name}")
    if f.lo is not None and not f.lo <= value <= f.hi:
        lo, hi = (int(f.lo), int(f.hi)) if f.kind is int else (f.lo, f.hi)
        raise InvalidRequest(f"{label} {value} out of range [{lo}, {hi}]", code=f.code or f"invalid_{f.name}")
    if f.multiple_of and value % f.multiple_of:
        near = max(f.multiple_of, int(value / f.multiple_of + 0.5) * f.multiple_of)
        raise InvalidRequest(f"{label} {value} is not a multiple of {f.multiple_of}; nearest valid: {near}",
                             code="invalid_size")
    if f.max_len is not None and f.kind is str and len(value) > f.max_len:
        raise InvalidRequest(f"{label} longer than {f.max_len} characters", code=f.code or f"invalid_{f.name}")
    choices = _choices(f)
    if choices and value not in choices:
        raise InvalidRequest(f"unknown {label} '{value}'; valid: {', '.join(choices)}",
                             code=f.code or f"invalid_{f.name}")


def check_bounds(values: dict[str, Any], names=None) -> None:
    """Every field of ``values`` (or of ``names``) within its bounds."""
    for name in names if names is not None else values:
        f = BY_NAME.get(name)
        if f is not None and f.kind not in (list, dict):
            check_value(f, values.get(name))


def json_schema(name: str, caps: Any = None) -> dict[str, Any]:
    """The JSON schema of one field; ``caps`` (the server's operator caps) narrows steps, size and batch."""
    f = BY_NAME[name]
    if name == "loras":
        return {"type": "array", "maxItems": MAX_LORAS, "items": {
            "type": "object", "required": ["name"], "additionalProperties": False,
            "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 200},
                           "weight": {"type": "number", "minimum": -10, "maximum": 10}}}}
    if f.kind is dict:
        return {"type": "object"}
    types = {str: "string", int: "integer", float: "number", bool: "boolean"}
    s: dict[str, Any] = {"type": [types[f.kind], "null"] if f.nullable else types[f.kind]}
    hi = f.hi
    if caps is not None:
        if name in ("width", "height") and getattr(caps, "max_pixels", None):
            hi = max(f.lo, min(hi, int(caps.max_pixels ** 0.5) // 16 * 16))
        cap = {"steps": "max_steps", "batch": "max_batch"}.get(name)
        if cap and getattr(caps, cap, None):
            hi = min(hi, getattr(caps, cap))
    if f.lo is not None:
        s["minimum"], s["maximum"] = (int(f.lo), int(hi)) if f.kind is int else (f.lo, hi)
    if f.multiple_of:
        s["multipleOf"] = f.multiple_of
    if f.max_len is not None:
        s["maxLength"] = f.max_len
    if name == "prompt":
        s["minLength"] = 1
    choices = _choices(f)
    if choices:
        s["enum"] = [*choices, *([None] if f.nullable else [])]
    s["description"] = f.help
    return s
