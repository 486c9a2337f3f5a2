"""Request and result records: validated, JSON round-trippable, the one schema shared by CLI, API and metadata.

A ``GenerateRequest`` may leave settings as ``None`` ("use the model's default"); ``resolve(spec)`` turns it into a
fully concrete request (every number filled in, seed drawn) which is what runs and what is written into the PNG, so
re-running the stored request reproduces the image exactly.
"""

from __future__ import annotations

import secrets
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from ..errors import InvalidRequest
from .specs import POSITIVE_MAGIC, ModelSpec

NOISE_CONVENTIONS = ("diffusers", "comfy")
MAX_SEED = 2**63 - 1  # fits SQLite INTEGER and JSON numbers exactly enough for every client we know

# Bounds checked before anything is queued or loaded (SECURITY.md: every numeric parameter is bounded).
LIMITS = {
    "side": (16, 4096),
    "pixels": 4096 * 4096,
    "steps": (1, 200),
    "cfg": (0.0, 30.0),
    "shift": (0.01, 100.0),
    "batch": (1, 16),
    "prompt_chars": 20000,
}


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
    noise: str = "diffusers"  # seed convention: "diffusers" (seed+i per image) or "comfy" (one CPU stream)
    noise_skip: int = 0  # latent images of the noise stream to skip: re-creates image i of a comfy batch alone
    magic: str | None = None  # append the official "positive magic" suffix: "en" or "zh"
    loras: tuple[LoraRef, ...] = ()  # LoRA stack for this request, by registry name (or path, local callers)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        # Accept the JSON forms ({"name", "weight"} or [name, weight]) so from_dict(to_dict(r)) == r.
        refs = tuple(LoraRef.coerce(x) for x in (self.loras or ()))
        object.__setattr__(self, "loras", refs)

    # ---- serialisation -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerateRequest:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise InvalidRequest(f"unknown request field(s): {', '.join(unknown)}")
        if not isinstance(data.get("prompt"), str):
            raise InvalidRequest("'prompt' must be a string")
        return cls(**data)

    # ---- validation ----------------------------------------------------------------------------------------
    def resolve(self, spec: ModelSpec) -> GenerateRequest:
        """Fill every default from the spec, draw a seed if none, and validate all bounds."""
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
        )
        r.validate(spec)
        return r

    def validate(self, spec: ModelSpec) -> None:
        from .sampling import SAMPLERS, SCHEDULERS

        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise InvalidRequest("prompt is empty")
        if len(self.prompt) > LIMITS["prompt_chars"] or len(self.negative_prompt or "") > LIMITS["prompt_chars"]:
            raise InvalidRequest(f"prompt longer than {LIMITS['prompt_chars']} characters")
        lo, hi = LIMITS["side"]
        for name, v in (("width", self.width), ("height", self.height)):
            _check_int(name, v, lo, hi)
            if v % 16:
                raise InvalidRequest(
                    f"{name} {v} is not a multiple of 16; nearest valid: {nearest_multiple(v)}", code="invalid_size"
                )
        if self.width * self.height > LIMITS["pixels"]:
            raise InvalidRequest(f"{self.width}x{self.height} exceeds {LIMITS['pixels']} pixels", code="invalid_size")
        _check_int("steps", self.steps, *LIMITS["steps"])
        _check_int("batch", self.batch, *LIMITS["batch"])
        _check_int("seed", self.seed, 0, MAX_SEED)
        _check_int("noise_skip", self.noise_skip, 0, 1024)
        _check_float("cfg", self.cfg, *LIMITS["cfg"])
        if self.shift is not None:
            _check_float("shift", self.shift, *LIMITS["shift"])
        if self.sampler not in SAMPLERS:
            raise InvalidRequest(f"unknown sampler '{self.sampler}'; valid: {', '.join(SAMPLERS)}", code="invalid_sampler")
        if self.scheduler not in SCHEDULERS:
            raise InvalidRequest(
                f"unknown scheduler '{self.scheduler}'; valid: {', '.join(SCHEDULERS)}", code="invalid_scheduler"
            )
        if self.noise not in NOISE_CONVENTIONS:
            raise InvalidRequest(f"unknown noise convention '{self.noise}'; valid: {', '.join(NOISE_CONVENTIONS)}")
        if len(self.loras) > 8:
            raise InvalidRequest("at most 8 LoRAs per request", code="invalid_lora")
        for ref in self.loras:
            _check_float(f"LoRA '{ref.name}' weight", ref.weight, -10.0, 10.0, code="invalid_lora")
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


def _check_int(name: str, v: Any, lo: int, hi: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int):
        raise InvalidRequest(f"{name} must be an integer, got {v!r}")
    if not lo <= v <= hi:
        raise InvalidRequest(f"{name} {v} out of range [{lo}, {hi}]", code=f"invalid_{name}")


def _check_float(name: str, v: Any, lo: float, hi: float, code: str | None = None) -> None:
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
