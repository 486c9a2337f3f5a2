"""A *shape-true* Qwen-Image for benchmarks: the real width, few blocks, random weights, built in RAM.

The tiny model (``testing/tiny.py``) is too small to measure compute: a step takes milliseconds and the bench then
times Python overhead. This one keeps every per-block matmul at the real size — 24 heads x 128 (inner 3072), joint
attention dim 3584, 64 input / 16 output channels, RoPE axes (16, 56, 56) — with ``layers`` of the 60 blocks, so a
ratio measured on it is the ratio of the real model's per-block compute. The text encoder has the real hidden size
(3584, 28 heads / 4 KV heads, MLP 18944) with ``text_layers`` layers and the tiny tokenizer's small vocabulary. The
VAE is the tiny one by default (the bench is about the DiT; the real-width VAE decodes 256² in seconds on a CPU and
adds ~0.5 GB) — ``vae="real"`` builds the real-width one. Sizes in fp32: DiT ~1.36 GB per block, text encoder
~0.93 GB per layer. The random weights are rounded to bf16 values (``stored="bf16"``), as the published files are,
so the bench can compare fp32 and bf16 compute on the same weights.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WideSpec:
    """The shape-true model's knobs; everything else is the real Qwen-Image configuration."""

    layers: int = 2
    text_layers: int = 1
    vae: str = "tiny"  # "tiny" or "real"
    seed: int = 0
    stored: str = "bf16"  # the weights' values are bf16-representable, as in the published files ("fp32": not)


WIDE_DIT_CONFIG = {"patch_size": 2, "in_channels": 64, "out_channels": 16, "attention_head_dim": 128,
                   "num_attention_heads": 24, "joint_attention_dim": 3584, "axes_dims_rope": (16, 56, 56)}


def build_wide_components(spec: WideSpec = WideSpec(), *, device="cpu", dtype=None):
    """Random shape-true ``Components`` (see the module docstring); deterministic from ``spec.seed``."""
    import torch
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from ..engine.formats.comfy import QWEN_IMAGE_VAE_CONFIG
    from ..engine.loading import Components
    from ..engine.specs import QWEN_IMAGE_SCHEDULER_CONFIG
    from ..errors import InvalidRequest
    from .tiny import QWEN_SPECIAL_TOKENS, TinySpec, build_tokenizer

    if spec.layers < 1 or spec.text_layers < 1:
        raise InvalidRequest("the shape-true model needs at least one DiT block and one text layer")
    if spec.vae not in ("tiny", "real"):
        raise InvalidRequest(f"unknown VAE size '{spec.vae}'; valid: tiny, real")
    dtype = dtype or torch.float32
    tokenizer = build_tokenizer(TinySpec())
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}

    torch.manual_seed(spec.seed)
    transformer = QwenImageTransformer2DModel(**WIDE_DIT_CONFIG, num_layers=spec.layers)
    _fill_zero_inits(transformer, spec.seed + 1)

    torch.manual_seed(spec.seed + 2)
    vae_config = dict(QWEN_IMAGE_VAE_CONFIG) if spec.vae == "real" else {
        "base_dim": 8, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 1,
        "temperal_downsample": [False, True, True]}
    vae = AutoencoderKLQwenImage.from_config(vae_config)

    torch.manual_seed(spec.seed + 3)
    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": spec.text_layers,
            "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": len(tokenizer),
            "rope_scaling": {"mrope_section": [16, 24, 24], "rope_type": "default", "type": "default"},
            "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"], "rope_theta": 1000000.0,
            "rms_norm_eps": 1e-6,
        },
        vision_config={"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                       "out_hidden_size": 3584, "fullatt_block_indexes": [0]},
        vocab_size=len(tokenizer), image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    text_encoder = Qwen2_5_VLForConditionalGeneration(config)
    models = [m.eval() for m in (transformer, vae, text_encoder)]
    if spec.stored == "bf16":  # published weights are bf16: fp32 compute then upcasts them, bf16 compute is exact
        with torch.no_grad():
            for m in models:
                for p in m.parameters():
                    p.copy_(p.to(torch.bfloat16))
    if dtype != torch.float32 or torch.device(device).type != "cpu":  # built in fp32 on the CPU
        models = [m.to(device=device, dtype=dtype) for m in models]
    identity = {"name": f"wide-{spec.layers}L", "format": "random",
                "shape": {"layers": spec.layers, "text_layers": spec.text_layers, "vae": spec.vae,
                          "stored": spec.stored}}
    return Components(*models, tokenizer, dict(QWEN_IMAGE_SCHEDULER_CONFIG), torch.device(device), dtype, identity)


def _fill_zero_inits(module, seed: int) -> None:
    """diffusers zero-initialises the AdaLN/output projections; a model that outputs zeros measures nothing."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if torch.count_nonzero(p) == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
