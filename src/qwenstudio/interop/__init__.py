"""Settings from other tools (A1111/Forge, SwarmUI, ComfyUI) mapped to our request fields, and back.

``read_pasted_settings(png_path_or_text)`` is the entry point; what does not map is listed, never guessed.
"""

from qwenstudio.interop.a1111 import extract_lora_tags, lora_hashes_value, lora_prompt_tags, parse_a1111_parameters
from qwenstudio.interop.comfy_workflow import parse_comfy_prompt
from qwenstudio.interop.names import a1111_sampler_label, a1111_schedule_label, sampler_name, scheduler_name
from qwenstudio.interop.pasted import parse_pasted_text, read_pasted_settings, read_png_settings
from qwenstudio.interop.settings import PastedSettings, a1111_short_hash, tensor_sha256
from qwenstudio.interop.swarmui import (
    apply_prompt_template,
    export_swarmui_presets,
    import_swarmui_presets,
    parse_swarmui_metadata,
    side_length_size,
)

__all__ = [
    "PastedSettings",
    "a1111_sampler_label",
    "a1111_schedule_label",
    "a1111_short_hash",
    "apply_prompt_template",
    "export_swarmui_presets",
    "extract_lora_tags",
    "import_swarmui_presets",
    "lora_hashes_value",
    "lora_prompt_tags",
    "parse_a1111_parameters",
    "parse_comfy_prompt",
    "parse_pasted_text",
    "parse_swarmui_metadata",
    "read_pasted_settings",
    "read_png_settings",
    "sampler_name",
    "scheduler_name",
    "side_length_size",
    "tensor_sha256",
]
