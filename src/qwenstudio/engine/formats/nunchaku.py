"""nunchaku SVDQuant Qwen-Image files (``svdq-int4_r32-qwen-image*.safetensors``, ``svdq-fp4_r128-*``, the
Lightning-fused and Edit ones): recognised by content, loaded into diffusers' ``QwenImageTransformer2DModel``.

Layout (``NunchakuQwenImageTransformer2DModel``): in each block the attention projections (``attn.to_qkv`` and
``attn.add_qkv_proj`` fused, ``attn.to_out.0``, ``attn.to_add_out``) and both MLPs are SVDQuant W4A4 layers
(``qweight`` int8, ``wscales`` bf16 per 64 or fp8 per 16, ``smooth_factor``, ``proj_down``/``proj_up``, ``bias``,
nvfp4 also ``wtscale``/``wcscales``); ``img_mod.1``/``txt_mod.1`` are AWQ W4A16 (``qweight`` int32, ``wscales``,
``wzeros``) with nunchaku's output interleave and +1 folded into the scales; everything else (embeddings, norms,
``norm_out``, ``proj_out``) is bf16 under diffusers' names. The config is the JSON in the ``config`` metadata.

The fused projections are split back into diffusers' to_q/to_k/to_v (exact, see ``split_outputs``) so the module
tree, LoRA key names and the engine's code are those of every other format: a LoRA trained on Qwen-Image (the
Lightning ones included) applies as side branches, one per request.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

from ...errors import IncompatibleWeights, UnsupportedFormat

_FUSED = {
    "attn.to_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "attn.add_qkv_proj": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
_MODULE_KEYS = ("qweight", "wscales", "wzeros", "smooth_factor", "smooth_factor_orig", "proj_down", "proj_up",
                "bias", "wtscale", "wcscales")


def svdquant_kind(dtypes: dict[str, str], shapes: dict[str, tuple]) -> tuple[str, str] | None:
    """(quant, dtype) for a nunchaku SVDQuant file from its header, e.g. ("svdq_int4_r32", "int4"), else None."""
    layers = [k[: -len(".qweight")] for k, d in dtypes.items() if k.endswith(".qweight") and d == "I8"]
    layers = [p for p in layers if f"{p}.wscales" in dtypes and f"{p}.proj_down" in shapes]
    if not layers:
        return None
    first = layers[0]
    precision = "nvfp4" if dtypes[f"{first}.wscales"].startswith("F8") else "int4"
    rank = shapes[f"{first}.proj_down"][1]
    return f"svdq_{precision}_r{rank}", precision


def _config(path: Path, metadata: dict, shapes: dict) -> dict:
    """The diffusers config stored by nunchaku (``config`` metadata), else inferred from shapes."""
    raw = metadata.get("config")
    if raw:
        try:
            cfg = json.loads(raw)
        except json.JSONDecodeError:
            raise IncompatibleWeights(f"{path}: the 'config' metadata is not valid JSON") from None
        return {k: v for k, v in cfg.items() if not k.startswith("_")}
    try:
        blocks = {int(m.group(1)) for k in shapes if (m := re.match(r"transformer_blocks\.(\d+)\.", k))}
        inner, in_channels = shapes["img_in.weight"]
        head_dim = shapes["transformer_blocks.0.attn.norm_q.weight"][0]
        return {"patch_size": 2, "in_channels": in_channels, "out_channels": shapes["proj_out.weight"][0] // 4,
                "num_layers": len(blocks), "attention_head_dim": head_dim,
                "num_attention_heads": inner // head_dim, "joint_attention_dim": shapes["txt_in.weight"][1]}
    except (KeyError, ValueError) as e:
        raise IncompatibleWeights(f"{path}: cannot infer the DiT configuration of this nunchaku file ({e})") from None


def _set(model, name: str, module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def load_dit_svdquant(path: str | Path, *, device=None, dtype=None):
    """A nunchaku SVDQuant Qwen-Image file -> ``QwenImageTransformer2DModel`` with ``SVDQuantLinear`` /
    ``Int4WeightLinear`` layers (torch reference arithmetic on any device; see quant/svdquant.py)."""
    import torch
    from diffusers import QwenImageTransformer2DModel
    from safetensors import safe_open

    from ..loading import build_empty, default_device, default_dtype, fill_module, iter_safetensors
    from ..quant.svdquant import awq_modulation_layer, from_kernel_layout, split_outputs
    from .detect import detect

    info = detect(path)
    if info.quant is None or not info.quant.startswith("svdq_"):
        raise UnsupportedFormat(f"{info.path}: not a nunchaku SVDQuant file")
    precision = info.quant.split("_")[1]
    device = torch.device(device or default_device())
    dtype = dtype or default_dtype(device)
    config = _config(info.path, info.metadata, info.shapes)
    try:
        model = build_empty(lambda: QwenImageTransformer2DModel.from_config(config))
    except (TypeError, ValueError) as e:
        raise IncompatibleWeights(f"{info.path}: its config does not build a Qwen-Image DiT ({e})") from None

    layers = sorted({k.rsplit(".", 1)[0] for k in info.shapes if k.endswith(".qweight")})
    handled: set[str] = set()
    with safe_open(str(info.path), framework="pt") as f:
        keys = set(f.keys())
        for layer in layers:
            tensors = {s: f.get_tensor(f"{layer}.{s}") for s in _MODULE_KEYS if f"{layer}.{s}" in keys}
            handled |= {f"{layer}.{s}" for s in tensors}
            block, _, local = layer.partition(".")[2].partition(".")
            prefix = f"transformer_blocks.{block}."
            if tensors["qweight"].dtype == torch.int32:  # AWQ W4A16 modulation
                _set(model, layer, awq_modulation_layer(tensors, dtype=dtype, device=device))
                continue
            q = from_kernel_layout(tensors, precision, act_unsigned=local.endswith("mlp.net.2"), dtype=dtype,
                                   device=device)
            targets = _FUSED.get(local, (local,))
            parts = split_outputs(q, [q.out_features // len(targets)] * len(targets)) if len(targets) > 1 else [q]
            for t, part in zip(targets, parts):
                try:
                    model.get_submodule(prefix + t)
                except AttributeError:
                    raise IncompatibleWeights(f"{info.path}: '{layer}' has no place in a Qwen-Image DiT") from None
                _set(model, prefix + t, part)

    def rest():
        for key, t in iter_safetensors([info.path]):
            if key not in handled:
                yield key, t

    fill_module(model, rest(), dtype=dtype, device=device, name=f"transformer ({info.path.name})")
    if device.type == "cuda":
        from ..quant.svdquant import attach_kernels, kernel_support

        reason = kernel_support(precision, device)
        if reason is None:
            attach_kernels(model, device)
        else:
            warnings.warn(f"{info.path.name}: {reason}; running nunchaku's arithmetic with the torch reference "
                          "implementation (same numbers, several times slower than the kernels)", stacklevel=2)
    return model.eval()


__all__ = ["load_dit_svdquant", "svdquant_kind"]
