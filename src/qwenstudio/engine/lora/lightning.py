"""Lightning (few-step distillation) LoRAs come with a sampling recipe; using one with the base model's 50-step,
CFG-4 defaults gives burnt images, so when one is in the stack its recipe becomes the default — but never over a
value the user set explicitly. Recipe (Qwen-Image-Lightning model card): 4 or 8 steps, CFG 1, shift 3 on the
reference FlowMatch scheduler; it is the same recipe as the ``*-lightning-*step`` specs in ``specs.py``."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_STEPS = re.compile(r"(\d+)[-_ ]?steps?", re.IGNORECASE)
_METADATA_FIELDS = ("ss_output_name", "name", "modelspec.title", "modelspec.description", "ss_training_comment")


@dataclass(frozen=True)
class LightningRecipe:
    steps: int
    cfg: float = 1.0
    shift: float = 3.0
    scheduler: str = "reference"

    def as_fields(self) -> dict[str, Any]:
        return {"steps": self.steps, "cfg": self.cfg, "shift": self.shift, "scheduler": self.scheduler}


def detect_lightning(path: str | Path, metadata: Mapping[str, str] | None = None) -> LightningRecipe | None:
    """A recipe if the file name stem (or a name-like metadata field) says "lightning"; steps from "4steps" /
    "8-step" in the same text (8 when unstated: the safer of the two published recipes)."""
    texts = [Path(path).stem] + [str(metadata[k]) for k in _METADATA_FIELDS if metadata and k in metadata]
    for text in texts:
        if "lightning" in text.lower():
            m = _STEPS.search(text)
            steps = int(m.group(1)) if m and 1 <= int(m.group(1)) <= 200 else 8
            return LightningRecipe(steps=steps)
    return None


def apply_recipe(request_fields: dict, recipe: LightningRecipe | None, user_set: set[str]) -> dict:
    """A copy of ``request_fields`` with the recipe's steps/cfg/shift/scheduler filled in, except for the fields
    named in ``user_set`` (what the user typed explicitly)."""
    out = dict(request_fields)
    if recipe is not None:
        out.update({k: v for k, v in recipe.as_fields().items() if k not in user_set})
    return out
