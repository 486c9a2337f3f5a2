"""Request and result records: validated, JSON round-trippable, the one schema shared by CLI, API and metadata.

A ``GenerateRequest`` leaves settings as ``None`` for "unset" — never a default filled in at the edge, so a recipe
can tell what the user chose from what they left open. ``Engine.prepare`` (engine/prepare.py) fills the unset ones
once — preset, then LoRA recipe, then the variant's defaults (``resolve(spec)``) — and records where each value came
from in ``settings_from``; the concrete request is what runs and what is written into the PNG, so re-running the
stored request reproduces the image exactly. Field types and bounds live in one table, ``engine/fields.py``.
"""

from __future__ import annotations

import secrets
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from ..errors import InvalidRequest
from . import fields as F
from .specs import POSITIVE_MAGIC, ModelSpec

NOISE_CONVENTIONS = ("diffusers", "comfy")
MAX_SEED = F.MAX_SEED

# Bounds checked before anything is queued or loaded (SECURITY.md: every numeric parameter is bounded); derived
# from the field table so there is one source.
LIMITS = {
    "side": (int(F.BY_NAME["width"].lo), int(F.BY_NAME["width"].hi)),
    "pixels": F.MAX_PIXELS,
    "steps": (int(F.BY_NAME["steps"].lo), int(F.BY_NAME["steps"].hi)),
    "cfg": (F.BY_NAME["cfg"].lo, F.BY_NAME["cfg"].hi),
    "shift": (F.BY_NAME["shift"].lo, F.BY_NAME["shift"].hi),
    "batch": (int(F.BY_NAME["batch"].lo), int(F.BY_NAME["batch"].hi)),
    "prompt_chars": F.PROMPT_CHARS,
}
# Filled by Engine.prepare: the recipe sources may set these; a user's value always wins.
RECIPE_FIELDS = ("negative_prompt", "width", "height", "steps", "cfg", "cfg_norm", "sampler", "scheduler", "shift",
                 "noise")


def nearest_multiple(value: int, multiple: int = 16) -> int:
    return max(multiple, int(value / multiple + 0.5) * multiple)  # half rounds up: 1000 -> 1008


@dataclass(frozen=True)
class LoraRef:
    name: str
    weight: float = 1.0

    @classmethod
    def coerce(cls, value: Any) -> LoraRef:
        if isinstance(value, LoraRef):
            return value
        if isinstance(value, dict) and isinstance(value.get("name"), str):
            return cls(value["name"], value.get("weight", 1.0))
        if isinstance(value, (list, tuple)) and len(value) == 2 and isinstance(value[0], str):
            return cls(value[0], value[1])
        raise InvalidRequest(f"a LoRA must be {{'name': str, 'weight': number}}, got {value!r}", code="invalid_lora")


@dataclass(frozen=True)
class GenerateRequest:
    prompt: str
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    aspect: str | None = None  # a key of the spec's resolutions, used when width/height are not given
    steps: int | None = None
    cfg: float | None = None
    cfg_norm: bool | None = None
    sampler: str | None = None
    scheduler: str | None = None
    shift: float | None = None
    seed: int | None = None
    batch: int = 1
    noise: str | None = None  # seed convention: "diffusers" (default: seed+i per image) or "comfy" (one CPU stream)
    noise_skip: int = 0  # latent images of the noise stream to skip: re-creates image i of a comfy batch alone
    magic: str | None = None  # append the official "positive magic" suffix: "en" or "zh"
    loras: tuple[LoraRef, ...] = ()  # LoRA stack for this request, by registry name (or path, local callers)
    extra: dict[str, Any] = field(default_factory=dict)
    preset: str | None = None  # a saved preset whose fields fill what this request leaves unset (prepare)
    compat: str | None = None  # "comfy": reproduce a ComfyUI/SwarmUI render (prepare fills its conventions)
    # Set by Engine.prepare: field -> where its value came from ("user", "preset NAME", "lora NAME", "variant NAME").
    # Not a client field: the edges refuse it (``from_dict(trusted=False)``).
    settings_from: dict[str, str] | None = None

    def __post_init__(self):
        # Accept the JSON forms ({"name", "weight"} or [name, weight]) so from_dict(to_dict(r)) == r.
        refs = tuple(LoraRef.coerce(x) for x in (self.loras or ()))
        object.__setattr__(self, "loras", refs)

    # ---- serialisation -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, trusted: bool = True) -> GenerateRequest:
        """``trusted=False`` (what a client sent): ``settings_from`` is the engine's record, not a client field."""
        names = {f.name for f in fields(cls)} - (set() if trusted else {"settings_from"})
        unknown = sorted(set(data) - names)
        if unknown:
            raise InvalidRequest(f"unknown request field(s): {', '.join(unknown)}")
        if not isinstance(data.get("prompt"), str):
            raise InvalidRequest("'prompt' must be a string")
        return cls(**data)

    @property
    def is_prepared(self) -> bool:
        return self.settings_from is not None

    def user_set(self) -> set[str]:
        """The recipe fields this request sets (the rest are open for a preset, a LoRA recipe or the variant)."""
        return {k for k in RECIPE_FIELDS if getattr(self, k) is not None}

    # ---- validation ----------------------------------------------------------------------------------------
    def resolve(self, spec: ModelSpec) -> GenerateRequest:
        """Fill every still-unset field from the variant's defaults, draw a seed if none, validate all bounds.
        Part of ``Engine.prepare``; on its own it knows nothing of presets or LoRA recipes."""
        d = spec.defaults
        width, height = self.width, self.height
        if width is None or height is None:
            aspect = self.aspect or spec.default_aspect
            if aspect not in spec.resolutions:
                raise InvalidRequest(f"unknown aspect '{aspect}'; valid: {', '.join(spec.resolutions)}")
            dw, dh = spec.resolutions[aspect]
            width, height = width or dw, height or dh
        r = replace(
            self,
            negative_prompt=d.negative if self.negative_prompt is None else self.negative_prompt,
            width=width,
            height=height,
            steps=d.steps if self.steps is None else self.steps,
            cfg=d.cfg if self.cfg is None else self.cfg,
            cfg_norm=d.cfg_norm if self.cfg_norm is None else self.cfg_norm,
            sampler=d.sampler if self.sampler is None else self.sampler,
            scheduler=d.scheduler if self.scheduler is None else self.scheduler,
            shift=d.shift if self.shift is None else self.shift,
            seed=secrets.randbelow(2**32) if self.seed is None else self.seed,
            noise=self.noise or "diffusers",
        )
        r.validate(spec)
        return r

    def validate(self, spec: ModelSpec) -> None:
        """Every bound, from the field table (``engine/fields.py``), plus the checks that span fields."""
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise InvalidRequest("prompt is empty")
        names = [f.name for f in F.FIELDS if f.name in self.__dataclass_fields__ and f.kind not in (list, dict)]
        F.check_bounds(self.__dict__, names)
        for name in ("width", "height", "steps", "cfg", "sampler", "scheduler", "seed"):
            if getattr(self, name) is None:
                raise InvalidRequest(f"{name} is unset: prepare the request first", code=f"invalid_{name}")
        if self.width * self.height > LIMITS["pixels"]:
            raise InvalidRequest(f"{self.width}x{self.height} exceeds {LIMITS['pixels']} pixels", code="invalid_size")
        if len(self.loras) > F.MAX_LORAS:
            raise InvalidRequest(f"at most {F.MAX_LORAS} LoRAs per request", code="invalid_lora")
        for ref in self.loras:
            check_float(f"LoRA '{ref.name}' weight", ref.weight, -10.0, 10.0, code="invalid_lora")
        if self.steps < 2 and self.scheduler == "kl_optimal":  # also checked where the sigmas are built
            raise InvalidRequest("scheduler 'kl_optimal' needs steps >= 2 (ComfyUI's formula gives NaN for 1 step)",
                                 code="invalid_steps")
        if self.steps < 2 and self.sampler in ("uni_pc", "uni_pc_bh2"):
            raise InvalidRequest(f"sampler '{self.sampler}' needs at least 2 steps", code="invalid_steps")
        if self.magic is not None and self.magic not in POSITIVE_MAGIC:
            raise InvalidRequest(f"unknown magic '{self.magic}'; valid: {', '.join(POSITIVE_MAGIC)}")

    def full_prompt(self) -> str:
        return self.prompt + (POSITIVE_MAGIC[self.magic] if self.magic else "")

    def image_seeds(self) -> list[int]:
        """Per-image seeds under the request's convention (diffusers: seed+i; comfy: one stream, same seed)."""
        if self.noise == "comfy":
            return [self.seed] * self.batch
        return [(self.seed + i) % (MAX_SEED + 1) for i in range(self.batch)]

    def for_image(self, i: int) -> GenerateRequest:
        """The single-image request that re-creates image ``i`` of this batch exactly."""
        if self.noise == "comfy":
            return replace(self, batch=1, noise_skip=self.noise_skip + i)
        return replace(self, batch=1, seed=self.image_seeds()[i])


def check_int(name: str, v: Any, lo: int, hi: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int):
        raise InvalidRequest(f"{name} must be an integer, got {v!r}")
    if not lo <= v <= hi:
        raise InvalidRequest(f"{name} {v} out of range [{lo}, {hi}]", code=f"invalid_{name}")


def check_float(name: str, v: Any, lo: float, hi: float, code: str | None = None) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
        raise InvalidRequest(f"{name} must be a number, got {v!r}", code=code or f"invalid_{name}")
    if not lo <= v <= hi:
        raise InvalidRequest(f"{name} {v} out of range [{lo}, {hi}]", code=code or f"invalid_{name}")


@dataclass
class GeneratedImage:
    image: Any  # PIL.Image.Image
    metadata: dict[str, Any]  # the single-image request + model identity + timings; see Engine._metadata


@dataclass
class GenerateResult:
    images: list[GeneratedImage]
    request: GenerateRequest  # the resolved batch request
    timings: dict[str, Any]
    latents: Any = None  # final normalised latents [B, 16, H/8, W/8] (for parity checks and latent workflows)
