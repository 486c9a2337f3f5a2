"""``EditRequest``: a ``GenerateRequest`` plus its input images, by content reference.

It shares every field, bound and default of text-to-image (same validation, same metadata format); the images,
mask and control images are ``ImageRef``s (sha256 + size + format), so metadata never embeds pixels and re-running
a stored request needs the same files (their hashes are checked). ``width``/``height`` are the size the model works
at (multiples of 16), filled from the images by the reference rules when not given; with ``keep_size`` the output is
cropped back to the first image's exact size.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from ...errors import InvalidRequest
from ..images import ImageRef, area_dimensions, ceil_to
from ..requests import LIMITS, GenerateRequest, check_float, check_int
from ..specs import ModelSpec

# Labels for control images. The InstantX union ControlNet infers the kind of control from the image itself (it
# has no mode input in diffusers); for Edit-2509 a control image is just one more input image. The mode is recorded
# in metadata so a run can be re-created and searched.
CONTROL_MODES = ("canny", "soft_edge", "depth", "pose", "keypoint", "lineart", "tile", "blur", "gray", "other")
MAX_FEATHER = 256


@dataclass(frozen=True)
class ControlRef:
    image: ImageRef
    mode: str = "other"
    scale: float = 1.0
    start: float = 0.0  # fraction of the steps where the control starts / ends acting (reference guidance start/end)
    end: float = 1.0

    @classmethod
    def coerce(cls, value: Any) -> ControlRef:
        if isinstance(value, ControlRef):
            return value
        if isinstance(value, dict) and "image" in value:
            extra = set(value) - {"image", "mode", "scale", "start", "end"}
            if extra:
                raise InvalidRequest(f"unknown control field(s): {', '.join(sorted(extra))}", code="invalid_control")
            return cls(ImageRef.from_dict(value["image"]), value.get("mode", "other"), value.get("scale", 1.0),
                       value.get("start", 0.0), value.get("end", 1.0))
        raise InvalidRequest(f"a control must be {{'image': ref, 'mode': str, 'scale': number}}, got {value!r}",
                             code="invalid_control")


@dataclass(frozen=True)
class EditRequest(GenerateRequest):
    images: tuple[ImageRef, ...] = ()
    mask: ImageRef | None = None
    strength: float | None = None  # None: 1.0 for edit variants, the reference's 0.6 for img2img/inpaint
    feather: int = 4  # pixels of blended seam inside the mask when compositing onto the input
    keep_size: bool | None = None  # None: on when there is a mask
    controls: tuple[ControlRef, ...] = ()
    controlnet: str | None = None  # a ControlNet's name in the models home (base models: controls, or inpainting)

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "images", tuple(ImageRef.from_dict(x) for x in (self.images or ())))
        if self.mask is not None:
            object.__setattr__(self, "mask", ImageRef.from_dict(self.mask))
        object.__setattr__(self, "controls", tuple(ControlRef.coerce(x) for x in (self.controls or ())))

    @property
    def anchor(self) -> ImageRef | None:
        """The image whose pixel grid the output follows (the first input image, else the first control)."""
        if self.images:
            return self.images[0]
        return self.controls[0].image if self.controls else None

    def resolve(self, spec: ModelSpec) -> EditRequest:
        self._validate_inputs(spec)
        keep = (self.mask is not None) if self.keep_size is None else bool(self.keep_size)
        strength = self.strength
        if strength is None:
            strength = 1.0 if (spec.is_edit and self.mask is None) else (1.0 if spec.is_edit else 0.6)
        width, height = self.width, self.height
        anchor = self.anchor
        if keep:
            grid = ceil_to(anchor.width), ceil_to(anchor.height)
            # resolve() is idempotent: an already resolved request carries exactly the grid size
            if (width is not None or height is not None) and (width, height) != grid:
                raise InvalidRequest("width/height cannot be set with keep_size (the output is the input's size)",
                                     code="invalid_size")
            width, height = grid
        elif width is None or height is None:
            if spec.is_edit:
                # reference: the output follows the last image (the first when it is the one being inpainted)
                ref = self.images[0] if self.mask is not None else self.images[-1]
                w, h = area_dimensions(spec.edit_area, ref.width / ref.height)
            else:
                w, h = (max(16, anchor.width // 16 * 16), max(16, anchor.height // 16 * 16))
            width, height = width or w, height or h
        r = replace(self, width=width, height=height, keep_size=keep, strength=float(strength))
        return GenerateRequest.resolve(r, spec)

    def _validate_inputs(self, spec: ModelSpec) -> None:
        n = len(self.images) + (len(self.controls) if spec.is_edit else 0)
        if spec.is_edit:
            if not self.images:
                raise InvalidRequest(f"'{spec.name}' edits an image: give at least one --image", code="missing_image")
            if n > spec.max_input_images:
                raise InvalidRequest(
                    f"'{spec.name}' takes at most {spec.max_input_images} input image(s) (control images count); "
                    f"got {n}", code="too_many_images")
        else:
            if len(self.images) > 1:
                raise InvalidRequest(
                    f"'{spec.name}' is a text-to-image model: it takes one init image (img2img/inpaint); for "
                    "multi-image edits use an edit variant such as qwen-image-edit-2509", code="too_many_images")
            if not self.images and not self.controls:
                raise InvalidRequest("give an --image (or a --control image)", code="missing_image")
            if len(self.controls) > 4:
                raise InvalidRequest("at most 4 control images", code="too_many_images")
        if self.mask is not None and not self.images:
            raise InvalidRequest("a mask needs an --image to inpaint", code="missing_image")
        if self.strength is not None:
            check_float("strength", self.strength, 0.0, 1.0)
            if self.strength <= 0:
                raise InvalidRequest("strength must be > 0 (0 would return the input unchanged)",
                                     code="invalid_strength")
        check_int("feather", self.feather, 0, MAX_FEATHER)
        if self.controlnet is not None:
            if not isinstance(self.controlnet, str) or not self.controlnet.strip():
                raise InvalidRequest("'controlnet' must be a ControlNet name", code="invalid_control")
            if spec.is_edit:
                raise InvalidRequest(f"'{spec.name}' takes control images as input images, not through a ControlNet",
                                     code="invalid_control")
            if not self.controls and not (self.images and self.mask is not None):
                # an image + a mask alone suit an inpainting ControlNet (checked against its config in prepare)
                raise InvalidRequest("a ControlNet needs control images (--control), or an --image and a --mask "
                                     "for an inpainting ControlNet", code="missing_control")
        for c in self.controls:
            if c.mode not in CONTROL_MODES:
                raise InvalidRequest(f"unknown control mode '{c.mode}'; valid: {', '.join(CONTROL_MODES)}",
                                     code="invalid_control")
            check_float("control scale", c.scale, 0.0, 10.0, code="invalid_control")
            check_float("control start", c.start, 0.0, 1.0, code="invalid_control")
            check_float("control end", c.end, 0.0, 1.0, code="invalid_control")
            if c.start >= c.end:
                raise InvalidRequest("control start must be below its end", code="invalid_control")
            if spec.is_edit and (c.scale != 1.0 or c.start != 0.0 or c.end != 1.0):
                raise InvalidRequest(f"'{spec.name}' takes control images as input images; scale/start/end apply "
                                     "to a ControlNet on a base model", code="invalid_control")
        a = self.anchor
        if a is not None and (self.keep_size or (self.keep_size is None and self.mask is not None)):
            if ceil_to(a.width) * ceil_to(a.height) > LIMITS["pixels"]:
                raise InvalidRequest(
                    f"{a.width}x{a.height} is too large to edit at its own size; use --no-keep-size or downscale it",
                    code="invalid_size")
