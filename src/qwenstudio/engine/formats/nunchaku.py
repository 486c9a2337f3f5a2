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
from dataclasses import dataclass
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


def nunchaku_config(metadata: dict, shapes: dict, source: str = "nunchaku file") -> dict:
    """The diffusers config stored by nunchaku (``config`` metadata: the base model's transformer/config.json, which
    ``merge_safetensors`` copies in), else inferred from the header's shapes."""
    raw = metadata.get("config")
    if raw:
        try:
            cfg = json.loads(raw)
        except json.JSONDecodeError:
            raise IncompatibleWeights(f"{source}: the 'config' metadata is not valid JSON") from None
        return {k: v for k, v in cfg.items() if not k.startswith("_")}
    try:
        blocks = {int(m.group(1)) for k in shapes if (m := re.match(r"transformer_blocks\.(\d+)\.", k))}
        inner, in_channels = shapes["img_in.weight"]
        head_dim = shapes["transformer_blocks.0.attn.norm_q.weight"][0]
        return {"patch_size": 2, "in_channels": in_channels, "out_channels": shapes["proj_out.weight"][0] // 4,
                "num_layers": len(blocks), "attention_head_dim": head_dim,
                "num_attention_heads": inner // head_dim, "joint_attention_dim": shapes["txt_in.weight"][1]}
    except (KeyError, ValueError) as e:
        raise IncompatibleWeights(f"{source}: cannot infer the DiT configuration of this nunchaku file ({e})") from None


@dataclass(frozen=True)
class LayerPlan:
    """Where one 4-bit layer of a nunchaku file goes in diffusers' DiT."""

    layer: str  # the file's module name, e.g. transformer_blocks.0.attn.to_qkv
    kind: str  # "svdq" (W4A4) or "awq" (W4A16, the modulation)
    targets: tuple[str, ...]  # the diffusers Linears it becomes (three for a fused q/k/v, in that order)
    in_features: int
    out_features: int
    keys: tuple[str, ...]  # the file's keys it consumes

    @property
    def act_unsigned(self) -> bool:
        """nunchaku's ``NunchakuFeedForward``: ``net[2].act_unsigned = precision != "nvfp4"`` (the layer masks
        nvfp4 itself)."""
        return self.layer.endswith("mlp.net.2")


def plan_layers(shapes: dict, dtypes: dict, source: str = "nunchaku file") -> list[LayerPlan]:
    """The 4-bit layers of a nunchaku header (key -> shape, key -> safetensors dtype), each with its place."""
    plans = []
    for layer in sorted({k[: -len(".qweight")] for k in shapes if k.endswith(".qweight")}):
        m = re.fullmatch(r"(transformer_blocks\.\d+\.)(.+)", layer)
        if m is None:
            raise IncompatibleWeights(f"{source}: '{layer}' has no place in a Qwen-Image DiT")
        prefix, local = m.groups()
        rows, cols = shapes[f"{layer}.qweight"]
        awq = dtypes[f"{layer}.qweight"] == "I32"  # AWQ: [out/4, in/2] int32; SVDQuant: [out, in/2] int8
        keys = tuple(f"{layer}.{s}" for s in _MODULE_KEYS if f"{layer}.{s}" in shapes)
        plans.append(LayerPlan(layer, "awq" if awq else "svdq", tuple(prefix + t for t in _FUSED.get(local, (local,))),
                               cols * 2, rows * 4 if awq else rows, keys))
    return plans


def map_keys(model, shapes: dict, dtypes: dict, source: str = "nunchaku file") -> tuple[list[LayerPlan], list[str]]:
    """Place every key of a nunchaku header in ``model`` (diffusers' DiT built from its config, e.g. on meta): the
    4-bit layers, each checked against the Linear(s) it replaces, and the plain tensors, checked against the model's.
    Returns (layers, plain keys); a key without a place, a shape that differs, or a model tensor the file lacks is
    IncompatibleWeights naming it."""
    from torch import nn

    plans = plan_layers(shapes, dtypes, source)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    covered: set[str] = set()
    for p in plans:
        for t in p.targets:
            try:
                lin = model.get_submodule(t)
            except AttributeError:
                raise IncompatibleWeights(f"{source}: '{p.layer}' has no place in a Qwen-Image DiT") from None
            if not isinstance(lin, nn.Linear) or lin.in_features != p.in_features \
                    or lin.out_features * len(p.targets) != p.out_features:
                raise IncompatibleWeights(f"{source}: '{p.layer}' is {p.in_features} -> {p.out_features}, the "
                                          f"model's '{t}' is {getattr(lin, 'in_features', '?')} -> "
                                          f"{getattr(lin, 'out_features', '?')} (x{len(p.targets)})")
            covered |= {f"{t}.{n}" for n, _ in lin.named_parameters()}
    handled = {k for p in plans for k in p.keys}
    plain = [k for k in shapes if k not in handled]
    for k in plain:
        if k not in expected:
            raise IncompatibleWeights(f"{source}: unexpected tensor '{k}' — is this file for another model?")
        if tuple(shapes[k]) != expected[k]:
            raise IncompatibleWeights(f"{source}: tensor '{k}' has shape {tuple(shapes[k])}, the model expects "
                                      f"{expected[k]}")
    missing = sorted(set(expected) - covered - set(plain))
    if missing:
        raise IncompatibleWeights(f"{source}: {len(missing)} tensor(s) missing: {', '.join(missing[:5])}")
    return plans, plain


def _set(model, name: str, module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def load_dit_svdquant(path: str | Path, *, device=None, dtype=None):
    """A nunchaku SVDQuant Qwen-Image file -> ``QwenImageTransformer2DModel`` with ``SVDQuantLinear`` /
    ``Int4WeightLinear`` layers (torch reference arithmetic on any device; see quant/svdquant.py)."""
    import torch
    from diffusers import QwenImageTransformer2DModel
    from safetensors import safe_open

    from ..loading import build_empty, default_device, default_dtype, read_safetensors_header
    from ..quant.svdquant import awq_modulation_layer, from_kernel_layout, split_outputs
    from .detect import detect
    from .four_bit import fill_unhandled

    info = detect(path)
    if info.quant is None or not info.quant.startswith("svdq_"):
        raise UnsupportedFormat(f"{info.path}: not a nunchaku SVDQuant file")
    precision = info.quant.split("_")[1]
    device = torch.device(device or default_device())
    dtype = dtype or default_dtype(device)
    config = nunchaku_config(info.metadata, info.shapes, str(info.path))
    try:
        model = build_empty(lambda: QwenImageTransformer2DModel.from_config(config))
    except (TypeError, ValueError) as e:
        raise IncompatibleWeights(f"{info.path}: its config does not build a Qwen-Image DiT ({e})") from None
    header = read_safetensors_header(info.path)
    dtypes = {k: v["dtype"] for k, v in header.items() if k != "__metadata__"}
    plans, _ = map_keys(model, info.shapes, dtypes, str(info.path))

    with safe_open(str(info.path), framework="pt") as f:
        for p in plans:
            tensors = {k.rsplit(".", 1)[1]: f.get_tensor(k) for k in p.keys}
            if p.kind == "awq":
                _set(model, p.targets[0], awq_modulation_layer(tensors, dtype=dtype, device=device))
                continue
            q = from_kernel_layout(tensors, precision, act_unsigned=p.act_unsigned, dtype=dtype, device=device)
            parts = split_outputs(q, [q.out_features // len(p.targets)] * len(p.targets)) \
                if len(p.targets) > 1 else [q]
            for t, part in zip(p.targets, parts):
                _set(model, t, part)

    model = fill_unhandled(model, info, {k for p in plans for k in p.keys}, device=device, dtype=dtype)
    if device.type == "cuda":
        from ..quant.svdquant import attach_kernels, kernel_support

        reason = kernel_support(precision, device)
        if reason is None:
            attach_kernels(model, device)
        else:
            warnings.warn(f"{info.path.name}: {reason}; running nunchaku's arithmetic with the torch reference "
                          "implementation (same numbers, several times slower than the kernels)", stacklevel=2)
    return model.eval()


__all__ = ["LayerPlan", "load_dit_svdquant", "map_keys", "nunchaku_config", "plan_layers", "svdquant_kind"]
