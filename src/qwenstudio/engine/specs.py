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

# The scheduler config shipped with Qwen/Qwen-Image (scheduler/scheduler_config.json).
QWEN_IMAGE_SCHEDULER_CONFIG = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}

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
    # Edit variants (reference pipelines): VAE/reference images and the default output are resized to about
    # ``edit_area`` pixels (multiples of 32); the vision-language path sees images of about ``condition_area``
    # pixels (None: the same VAE-sized image, as Qwen-Image-Edit does).
    edit_area: int = 1024 * 1024
    condition_area: int | None = None
    dit_config: dict = field(default_factory=dict)  # DiT config this variant needs (2511: zero_cond_t)

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

EDIT_IMAGE_TEMPLATE = "<|vision_start|><|image_pad|><|vision_end|>"  # Qwen-Image-Edit: one image, no label
EDIT_PLUS_IMAGE_TEMPLATE = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"  # 2509/2511, numbered

_EDIT = replace(
    _QWEN_IMAGE,
    name="qwen-image-edit",
    description="Qwen-Image-Edit: one input image seen by the text encoder and appended as reference latents",
    template=EDIT_TEMPLATE,
    drop_tokens=64,
    max_input_images=1,
    image_template=EDIT_IMAGE_TEMPLATE,
)
_EDIT_2509 = replace(
    _EDIT,
    name="qwen-image-edit-2509",
    description="Qwen-Image-Edit-2509: 1-3 input images (also depth/edge/keypoint control images)",
    max_input_images=3,
    image_template=EDIT_PLUS_IMAGE_TEMPLATE,
    condition_area=384 * 384,
)
_EDIT_2511 = replace(
    _EDIT_2509,
    name="qwen-image-edit-2511",
    description="Qwen-Image-Edit-2511: 1-3 input images, zero_cond_t DiT (better consistency)",
    dit_config={"zero_cond_t": True},
)
_TINY_EDIT = replace(
    _EDIT, name="tiny-edit", description="tiny random model driven as Qwen-Image-Edit (smoke tests)",
    defaults=_TINY.defaults, resolutions=_TINY.resolutions, builtin=True, edit_area=64 * 64,
)
_TINY_EDIT_PLUS = replace(
    _EDIT_2509, name="tiny-edit-plus", description="tiny random model driven as Qwen-Image-Edit-2509 (smoke tests)",
    defaults=_TINY.defaults, resolutions=_TINY.resolutions, builtin=True, edit_area=64 * 64,
    condition_area=32 * 32,
)
_TINY_EDIT_2511 = replace(
    _TINY_EDIT_PLUS, name="tiny-edit-2511", dit_config={"zero_cond_t": True},
    description="tiny random model driven as Qwen-Image-Edit-2511 (zero_cond_t DiT; smoke tests)",
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
        _EDIT,
        _EDIT_2509,
        _EDIT_2511,
        _lightning(_EDIT, 4, "Qwen-Image-Edit-Lightning-4steps-V1.0"),
        _lightning(_EDIT, 8, "Qwen-Image-Edit-Lightning-8steps-V1.1"),
        _lightning(_EDIT_2509, 4, "Qwen-Image-Edit-2509-Lightning-4steps-V1.0"),
        _lightning(_EDIT_2509, 8, "Qwen-Image-Edit-2509-Lightning-8steps-V1.0"),
        _lightning(_EDIT_2511, 4, "Qwen-Image-Edit-2511-Lightning-4steps-V1.0"),
        _lightning(_EDIT_2511, 8, "Qwen-Image-Edit-2511-Lightning-8steps-V1.0"),
        _TINY_EDIT,
        _TINY_EDIT_PLUS,
        _TINY_EDIT_2511,
    )
}


def get_spec(name: str) -> ModelSpec:
    try:
        return SPECS[name]
    except KeyError:
        raise ModelNotFound(f"unknown model variant '{name}'; known: {', '.join(SPECS)}") from None
