"""Header-only stand-ins for the real Qwen-Image files: every tensor's key, shape and resident bytes, as the memory
planner reads them from a file header (``engine/footprints.py``), without any weights. Built from the real model
classes on the meta device (so the keys and shapes are the real ones) with each file kind's storage rule:

  bf16      every tensor 2 bytes per value
  fp8       ComfyUI's fp8_e4m3fn files: the 2-D weights 1 byte per value, the rest (norms, biases) at the compute dtype
  q8_0      GGUF Q8_0: 2-D weights 34 bytes per 32 values, the rest at the compute dtype
  q4_k_m    GGUF Q4_K_M (llama.cpp's mix): 2-D weights Q4_K (144 bytes / 256 values), the value and MLP-down
            projections Q6_K (210 / 256), the rest at the compute dtype
For the tests and ``benchmarks/gpu_check.py`` (the planner's table at 24/16/12/8 GB).
"""

from __future__ import annotations

DIT_KINDS = ("bf16", "fp8", "q8_0", "q4_k_m")
_Q6_K = ("to_v.", "add_v_proj.", "img_mlp.net.2.", "txt_mlp.net.2.")


def _value_bytes(key: str, shape: tuple[int, ...], kind: str, itemsize: int) -> int:
    numel = 1
    for d in shape:
        numel *= d
    if kind == "bf16" or len(shape) != 2:
        return numel * itemsize
    if kind == "fp8":
        return numel
    if kind == "q8_0":
        return numel * 34 // 32
    if kind == "q4_k_m":
        return numel * (210 if any(s in key for s in _Q6_K) else 144) // 256
    raise ValueError(f"unknown DiT file kind '{kind}'; valid: {', '.join(DIT_KINDS)}")


def _meta_shapes(build) -> dict[str, tuple[int, ...]]:
    import torch

    with torch.device("meta"):
        module = build()
    return {k: tuple(p.shape) for k, p in module.state_dict().items()}


def qwen_image_shapes() -> dict[str, dict[str, tuple[int, ...]]]:
    """``{component: {key: shape}}`` of full-size Qwen-Image (the real classes on the meta device; seconds)."""
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from ..engine.formats.comfy import QWEN25_VL_7B_CONFIG, QWEN_IMAGE_VAE_CONFIG

    te = _meta_shapes(lambda: Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig.from_dict(QWEN25_VL_7B_CONFIG)))
    return {"transformer": _meta_shapes(lambda: QwenImageTransformer2DModel()),
            "text_encoder": {k: s for k, s in te.items() if not k.startswith("lm_head.")},
            "vae": _meta_shapes(lambda: AutoencoderKLQwenImage.from_config(QWEN_IMAGE_VAE_CONFIG))}


def qwen_image_tensors(dit: str = "bf16", *, itemsize: int = 2, shapes: dict | None = None,
                       quant: str | None = None) -> dict[str, dict]:
    """``{component: {key: (shape, resident bytes)}}`` for full-size Qwen-Image with a ``dit`` kind of DiT file, the
    bf16 text encoder (Qwen2.5-VL-7B, no LM head) and the VAE. ``shapes``: ``qwen_image_shapes()``, to reuse.
    ``quant`` (with a bf16 DiT): the DiT as ``--quant fp8|int4|nf4`` runs it (the rule of engine/footprints.py)."""
    from ..engine.quant.load_time import quantized_weight_bytes

    shapes = shapes or qwen_image_shapes()

    def resident(name: str, key: str, shape: tuple[int, ...]) -> int:
        if name == "transformer" and quant and dit == "bf16" and key.endswith(".weight"):
            q = quantized_weight_bytes(key[: -len(".weight")], shape, quant)
            if q is not None:
                return q
        return _value_bytes(key, shape, dit if name == "transformer" else "bf16", itemsize)

    return {name: {k: (s, resident(name, k, s)) for k, s in shapes[name].items()} for name in shapes}


def qwen_image_footprints(dit: str = "bf16", *, itemsize: int = 2, shapes: dict | None = None,
                          quant: str | None = None) -> dict:
    """The planner's input for full-size Qwen-Image (``qwen_image_tensors`` through ``footprint_from_tensors``)."""
    from ..engine.footprints import footprint_from_tensors

    return {name: footprint_from_tensors(t, name)
            for name, t in qwen_image_tensors(dit, itemsize=itemsize, shapes=shapes, quant=quant).items()}
