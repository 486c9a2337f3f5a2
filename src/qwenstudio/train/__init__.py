"""LoRA training on the engine's own model loading, prompt encoding and side-branch LoRAs.

``train_lora(TrainConfig(dataset="imgs/", out="my.safetensors", model="..."))`` -> ``TrainResult``; the CLI is
``qwenstudio train-lora``. See README "Train a LoRA".
"""

from .config import DEFAULT_TARGETS, TrainConfig
from .loop import TrainEvent, TrainResult, train_lora

__all__ = ["DEFAULT_TARGETS", "TrainConfig", "TrainEvent", "TrainResult", "train_lora"]
