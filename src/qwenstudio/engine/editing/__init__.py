"""Image-conditioned generation: edit variants, img2img, inpaint, edit-inpaint, ControlNet (see ``run``)."""

from ..images import ImageRef
from .request import CONTROL_MODES, ControlRef, EditRequest
from .run import Control, bind_inputs, composite, load_controlnet, run_edit

__all__ = ["CONTROL_MODES", "Control", "ControlRef", "EditRequest", "ImageRef", "bind_inputs", "composite",
           "load_controlnet", "run_edit"]
