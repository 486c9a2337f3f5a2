"""Model variants as data (after black-forest-labs/flux ``util.configs``).

A variant is not a class: it is one ``ModelSpec`` entry saying how the same Qwen-Image architecture is driven —
prompt template and how many template tokens to drop, default sampling recipe, recommended sizes, and how many
input images it takes (0 for text-to-image; edit variants reuse the same record). Adding a variant is one entry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from ..errors import ModelNotFound

T2I_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
EDIT_TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new image "
    "that meets the user's requirements while maintaining consistency with the original input where appropriate."
    "<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)

# Official recommended sizes (Qwen-Image model card), width x height.
QWEN_RESOLUTIONS: dict[str, tuple[int, int]] = {
    "1:1": (1328, 1328),
    "16:9": (1664, 928),
    "9:16": (928, 1664),
    "4:3": (1472, 1104),
    "3:4": (1104, 1472),
    "3:2": (1584, 1056),
    "2:3": (1056, 1584),
}

# The official demo's optional "positive magic" suffix; applied only when the user asks for it.
POSITIVE_MAGIC = {"en": ", Ultra HD, 4K, cinematic composition.", "zh": ", 超清，4K，电影级构图."}


@dataclass(frozen=True)
class SamplingDefaults:
    steps: int = 50
    cfg: float = 4.0
    negative: str = " "
    sampler: str = "euler"
    scheduler: str = "reference"  # the folder's FlowMatch scheduler with dynamic exponential shift
    shift: float | None = None  # None: the scheduler's own shift; a number: constant sigma shift
    cfg_norm: bool = True  # the reference rescales the CFG result to the conditional norm


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    template: str = T2I_TEMPLATE
    drop_tokens: int = 34
    max_prompt_tokens: int = 1024
    defaults: SamplingDefaults = field(default_factory=SamplingDefaults)
    resolutions: dict[str, tuple[int, int]] = field(default_factory=lambda: dict(QWEN_RESOLUTIONS))
    default_aspect: str = "1:1"
    max_input_images: int = 0  # 0: text-to-image; 1: Qwen-Image-Edit; 3: Edit-2509/2511
    image_template: str | None = None  # per-image VL prefix for edit variants, e.g. "Picture {}: <|vision_start|>..."
    recipe_lora: str | None = None  # LoRA whose recipe these defaults are (Lightning), for docs and auto-defaults
    builtin: bool = False  # True for the random tiny model that needs no files

    @property
    def is_edit(self) -> bool:
        return self.max_input_images > 0

    @property
    def default_size(self) -> tuple[int, int]:
        return self.resolutions[self.default_aspect]


def _lightning(base: ModelSpec, steps: int, lora: str) -> ModelSpec:
    """Lightning recipe (model card): shift 3 at every resolution (base_shift = max_shift = ln 3, no terminal
    stretch), CFG 1, 4 or 8 steps, on the same scheduler."""
    return replace(
        base,
        name=f"{base.name}-lightning-{steps}step",
        description=f"{base.name} with the Lightning {steps}-step recipe (LoRA {lora} or its merged checkpoint)",
        defaults=replace(base.defaults, steps=steps, cfg=1.0, shift=3.0),
        recipe_lora=lora,
    )


LIGHTNING_LOG_SHIFT = math.log(3.0)

_QWEN_IMAGE = ModelSpec("qwen-image", "Qwen-Image (2025-08) text-to-image, 20B MMDiT")
_QWEN_IMAGE_2512 = replace(_QWEN_IMAGE, name="qwen-image-2512", description="Qwen-Image-2512 text-to-image")
_TINY = replace(
    _QWEN_IMAGE,
    name="tiny",
    description="built-in tiny random model (same architecture, random weights: output is noise) for smoke tests",
    defaults=replace(_QWEN_IMAGE.defaults, steps=4),
    resolutions={"1:1": (64, 64), "16:9": (112, 64), "9:16": (64, 112), "4:3": (80, 64), "3:4": (64, 80)},
    builtin=True,
)

SPECS: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        _QWEN_IMAGE,
        _QWEN_IMAGE_2512,
        _lightning(_QWEN_IMAGE, 4, "Qwen-Image-Lightning-4steps-V2.0"),
        _lightning(_QWEN_IMAGE, 8, "Qwen-Image-Lightning-8steps-V2.0"),
        _lightning(_QWEN_IMAGE_2512, 4, "Qwen-Image-2512-Lightning-4steps-V1.0"),
        _TINY,
    )
}


def get_spec(name: str) -> ModelSpec:
    try:
        return SPECS[name]
    except KeyError:
        raise ModelNotFound(f"unknown model variant '{name}'; known: {', '.join(SPECS)}") from None
