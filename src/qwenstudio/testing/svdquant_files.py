"""The tiny DiT behind the committed nunchaku (SVDQuant) fixtures, rebuilt from a seed without diffusers' init code.

nunchaku's kernels work in 128-channel tiles, so this DiT is wider than the suite's tiny one (2 heads x 64 = 128,
one block); its text width (32) matches the tiny text encoder so the files run in the whole engine. Weights are
drawn parameter by parameter from one seeded CPU generator, in name order, so the same fp32 model comes back on any
machine and torch/diffusers version: the fixtures' source ("the same model in fp32") is this function.
"""

from __future__ import annotations

from pathlib import Path

SVDQ_DIT_CONFIG = {
    "patch_size": 2,
    "in_channels": 64,
    "out_channels": 16,
    "num_layers": 1,
    "attention_head_dim": 64,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "axes_dims_rope": [16, 24, 24],
}
FIXTURES = Path(__file__).resolve().parents[3] / "tests" / "fixtures" / "peers" / "nunchaku"
INT4_FILE = "svdq-int4_r16-tiny-qwen-image.safetensors"
FP4_FILE = "svdq-fp4_r32-tiny-qwen-image.safetensors"


def build_source_dit(seed: int = 0):
    """fp32 ``QwenImageTransformer2DModel`` with deterministic weights: Linear weights ~ N(0, 1/in), biases
    ~ N(0, 0.02^2), norm scales ~ 1 + N(0, 0.1^2)."""
    import torch
    from diffusers import QwenImageTransformer2DModel

    model = QwenImageTransformer2DModel(**SVDQ_DIT_CONFIG).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            r = torch.randn(p.shape, generator=gen)
            if p.dim() == 2:
                p.copy_(r / p.shape[1] ** 0.5)
            elif name.endswith("bias"):
                p.copy_(0.02 * r)
            else:
                p.copy_(1 + 0.1 * r)
    return model


def save_source_dit(model, path: Path, *, prefix: str = "") -> Path:
    """``model`` (``build_source_dit()``) as one safetensors DiT file with its config in the metadata (its shapes
    alone do not give the RoPE split): "the same model in fp32" the 4-bit tests and benchmarks compare against.
    ``prefix``: e.g. ``"model.diffusion_model."`` for ComfyUI's key layout."""
    import json

    from ..engine.formats.convert import save_tensors
    from ..engine.formats.keymaps import CONFIG_METADATA_KEY

    path.parent.mkdir(parents=True, exist_ok=True)
    return save_tensors({prefix + k: v.detach() for k, v in model.state_dict().items()}, path,
                        {"format": "pt", CONFIG_METADATA_KEY: json.dumps(SVDQ_DIT_CONFIG)})


def source_dit_inputs(seed: int = 1) -> dict:
    """Keyword inputs of one forward of ``build_source_dit()``: 64 image tokens (8 x 8), a 5-token prompt, t = 0.3."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(1, 64, 64, generator=g),
            "encoder_hidden_states": torch.randn(1, 5, 32, generator=g),
            "encoder_hidden_states_mask": torch.ones(1, 5),
            "timestep": torch.tensor([0.3]), "img_shapes": [(1, 8, 8)], "return_dict": False}
