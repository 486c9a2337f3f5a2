"""Key names shared by every single-file layout of the Qwen-Image DiT.

ComfyUI's Qwen-Image module tree (comfy/ldm/qwen_image/model.py) uses the same parameter names as diffusers'
``QwenImageTransformer2DModel``; single files differ only by a prefix (``model.diffusion_model.`` in full
checkpoints, ``diffusion_model.`` in some exports). GGUF conversions (city96, QuantStack) use the ComfyUI names.
The architecture's sizes are read back from tensor shapes, so a file needs no config.json.
"""

from __future__ import annotations

import json
import re

DIT_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.")
CONFIG_METADATA_KEY = "qwenstudio.transformer_config"  # written by our converters/writers; optional on read


def strip_dit_prefix(key: str) -> str:
    for p in DIT_PREFIXES:
        if key.startswith(p):
            return key[len(p):]
    return key


def dit_prefix(keys) -> str:
    """The prefix used by a DiT checkpoint's keys ('' if none)."""
    for k in keys:
        if k.endswith("img_in.weight"):
            return k[: -len("img_in.weight")]
    return ""


def infer_dit_config(shapes: dict[str, tuple[int, ...]], metadata: dict | None = None) -> dict:
    """QwenImageTransformer2DModel config from un-prefixed key -> shape. Explicit config in metadata wins."""
    if metadata and CONFIG_METADATA_KEY in metadata:
        return json.loads(metadata[CONFIG_METADATA_KEY])
    blocks = {int(m.group(1)) for k in shapes if (m := re.match(r"transformer_blocks\.(\d+)\.", k))}
    inner, in_channels = shapes["img_in.weight"]
    head_dim = shapes["transformer_blocks.0.attn.norm_q.weight"][0]
    out_channels = shapes["proj_out.weight"][0] // 4
    config = {
        "patch_size": 2,
        "in_channels": in_channels,
        "out_channels": out_channels,
        "num_layers": len(blocks),
        "attention_head_dim": head_dim,
        "num_attention_heads": inner // head_dim,
        "joint_attention_dim": shapes["txt_in.weight"][1],
        "axes_dims_rope": [16, 56, 56] if head_dim == 128 else _rope_axes(head_dim),
    }
    return config


def _rope_axes(head_dim: int) -> list[int]:
    """Fallback split of a non-standard head dim among (frame, height, width) RoPE axes, each even, roughly in
    Qwen-Image's 16:56:56 proportions. Files we write carry the exact config in metadata instead."""
    a = max(2, round(head_dim / 16) * 2)
    b = (head_dim - a) // 4 * 2
    return [a, b, head_dim - a - b]
