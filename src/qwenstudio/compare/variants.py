"""Variants of a comparison: ``LABEL:SETTINGS`` where SETTINGS are ``NAME=VALUE`` pairs separated by commas.

    base:                                            the model's own defaults
    base:steps=50,cfg=4                              explicit settings
    lightning8:lora=Qwen-Image-Lightning-8steps-V1.1:1   a Lightning LoRA: its recipe (8 steps, CFG 1, shift 3) fills
                                                     whatever the variant leaves unset, as in ``generate``
    q4:model=qwen-image-Q4_K_M,steps=20              another model file (loaded through Engine.load)
    two:lora=a:0.8+b:0.5                             a LoRA stack

NAME is any request field (``steps, cfg, shift, sampler, scheduler, negative_prompt, cfg_norm, magic, noise …``),
``size=WxH``, ``lora``, ``model`` or ``variant`` (the recipe). The label is everything before the first colon.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidRequest
from .values import jsonable, parse_settings


@dataclass(frozen=True)
class Variant:
    label: str
    spec: str  # as the user wrote it
    model: str
    variant: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)  # request fields

    def signature(self) -> str:
        """What makes two runs of this variant the same (the resume check)."""
        return json.dumps({"model": self.model, "variant": self.variant, "fields": jsonable(self.fields)},
                          sort_keys=True, ensure_ascii=False)

    def describe(self) -> dict[str, Any]:
        return {"label": self.label, "spec": self.spec, "model": self.model, "variant": self.variant,
                "fields": jsonable(self.fields)}


def parse_variant(text: str, default_model: str, default_variant: str | None = None) -> Variant:
    label, _, settings = text.partition(":")
    label = label.strip()
    if not label:
        raise InvalidRequest(f"variant '{text}' has no label (write LABEL:SETTINGS, e.g. base:steps=50)",
                             code="invalid_variant")
    fields_ = parse_settings(settings)
    model = fields_.pop("model", None) or default_model
    variant = fields_.pop("variant", None) or default_variant
    if "prompt" in fields_ or "seed" in fields_:
        raise InvalidRequest(f"variant '{label}': prompt and seed come from the suite and --seed",
                             code="invalid_variant")
    return Variant(label, text.strip(), str(model), variant, fields_)


def parse_variants(texts: list[str], default_model: str, default_variant: str | None = None) -> list[Variant]:
    out = [parse_variant(t, default_model, default_variant) for t in texts]
    labels = [v.label for v in out]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise InvalidRequest(f"variant label(s) used twice: {', '.join(dupes)}", code="invalid_variant")
    if not out:
        raise InvalidRequest("give at least one --variant (or a suite that defines its variants)",
                             code="invalid_variant")
    return out
