"""LoRA support for the Qwen-Image DiT: every key style read into one canonical form (``keys``), applied as
switchable low-rank side branches (``adapters``), and Lightning recipe detection (``lightning``)."""

from .adapters import LoraLinear, LoraManager, check_weight, parse_lora_arg, parse_stack_spec
from .keys import LoraFile, LoraMatchReport, LoraWeights, convert_state_dict, linear_targets, read_lora_file
from .lightning import LightningRecipe, apply_recipe, detect_lightning

__all__ = [
    "LightningRecipe",
    "LoraFile",
    "LoraLinear",
    "LoraManager",
    "LoraMatchReport",
    "LoraWeights",
    "apply_recipe",
    "check_weight",
    "convert_state_dict",
    "detect_lightning",
    "linear_targets",
    "parse_lora_arg",
    "parse_stack_spec",
    "read_lora_file",
]
