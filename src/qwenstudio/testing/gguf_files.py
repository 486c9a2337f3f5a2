"""GGUF test files of the tiny DiT, plus the weights a correct loader must produce from them.

gguf-py can quantize to the legacy types (Q8_0, Q5_x, Q4_x) and floats, and our ``quant/kquant.py`` to Q4_K, Q5_K
and Q6_K, so those files are real conversions of the tiny diffusers folder. Types nothing here writes (Q2_K, Q3_K:
the low-bit files published for Qwen-Image) are built from random blocks whose fp16 scale fields are overwritten
with small finite values; gguf-py's numpy ``dequantize`` then says what each weight must become. K-blocks are 256 wide, so the K-quant DiT
uses a 256-wide inner dim (2 heads x 128); layers whose rows are not whole K-blocks (img_in, txt_in) are Q8_0 —
which is also what real K-quant conversions do with odd-shaped layers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# Byte offsets of the fp16 scale fields in each K block (ggml-common.h block_q4_K / block_q5_K / block_q6_K).
K_SCALE_FIELDS: dict[str, dict[str, int]] = {
    "Q2_K": {"d": 80, "dmin": 82},  # scales[16], qs[64], d, dmin           = 84 bytes
    "Q3_K": {"d": 108},             # hmask[32], qs[64], scales[12], d      = 110 bytes
    "Q4_K": {"d": 0, "dmin": 2},  # d, dmin, scales[12], qs[128]            = 144 bytes
    "Q5_K": {"d": 0, "dmin": 2},  # d, dmin, scales[12], qh[32], qs[128]    = 176 bytes
    "Q6_K": {"d": 208},           # ql[128], qh[64], scales[16] (int8), d   = 210 bytes
}
# Ranges of d (and dmin) that give weights of roughly +-0.02, like a trained DiT.
_K_SCALE_RANGES = {
    "Q2_K": {"d": (5e-5, 1.5e-4), "dmin": (5e-5, 1.5e-4)},
    "Q3_K": {"d": (2e-5, 6e-5)},
    "Q4_K": {"d": (1e-5, 3e-5), "dmin": (1e-4, 2e-4)},
    "Q5_K": {"d": (5e-6, 1.5e-5), "dmin": (1e-4, 2e-4)},
    "Q6_K": {"d": (2e-6, 6e-6)},
}

KQUANT_DIT_CONFIG = {
    "patch_size": 2,
    "in_channels": 64,
    "out_channels": 16,
    "num_layers": 1,
    "attention_head_dim": 128,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,  # TinySpec.text_hidden_size: runs with the tiny folder's text encoder
    "axes_dims_rope": [16, 56, 56],
}


def write_tiny_gguf(folder: str | Path, dst: str | Path, qtype: str) -> Path:
    """The tiny diffusers folder's transformer as a GGUF of ``qtype`` (any of ``gguf.WRITABLE_QTYPES``)."""
    from ..engine.formats.gguf import write_dit_gguf

    return write_dit_gguf(folder, dst, qtype)


def expected_weights(path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF file dequantized by gguf-py's numpy reference, keyed by (un-prefixed) name."""
    import gguf

    from ..engine.formats.gguf import read_gguf

    _, tensors, _ = read_gguf(path)
    return {
        k: gguf.quants.dequantize(np.asarray(raw), gguf.GGMLQuantizationType(qt)).reshape(shape).astype(np.float32)
        for k, (qt, shape, raw) in tensors.items()
    }


def random_kquant_blocks(qtype: str, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [n_blocks, type_size]: random bytes with the fp16 scale fields set to small positive values."""
    import gguf

    _, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    blocks = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    for field, offset in K_SCALE_FIELDS[qtype].items():
        lo, hi = _K_SCALE_RANGES[qtype][field]
        scale = rng.uniform(lo, hi, size=n_blocks).astype(np.float16)
        blocks[:, offset:offset + 2] = scale.view(np.uint8).reshape(n_blocks, 2)
    return blocks


def write_kquant_gguf(
    dst: str | Path,
    qtypes: tuple[str, ...] = ("Q4_K", "Q5_K", "Q6_K"),
    *,
    seed: int = 0,
    config: dict | None = None,
) -> dict[str, np.ndarray]:
    """Write a K-quant DiT GGUF (like a "Q4_K_M" mix: eligible matrices cycle through ``qtypes``; matrices with
    rows not a multiple of 256 are Q8_0; 1-D tensors F32). Returns the expected float32 weights by name."""
    import gguf
    from diffusers import QwenImageTransformer2DModel

    from ..engine.formats.keymaps import CONFIG_METADATA_KEY
    from ..engine.loading import build_empty

    config = dict(config or KQUANT_DIT_CONFIG)
    model = build_empty(lambda: QwenImageTransformer2DModel.from_config(config))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(dst), arch="qwen_image")
    writer.add_string(CONFIG_METADATA_KEY, json.dumps(config))
    expected: dict[str, np.ndarray] = {}
    k_index = 0
    for name, shape in shapes.items():
        if len(shape) == 1:
            base = 1.0 if "norm" in name else 0.0
            data = (base + 0.02 * rng.standard_normal(shape)).astype(np.float32)
            writer.add_tensor(name, data)
            expected[name] = data
            continue
        if shape[-1] % 256 == 0:
            qt = gguf.GGMLQuantizationType[qtypes[k_index % len(qtypes)]]
            k_index += 1
            n_blocks = int(np.prod(shape)) // 256
            raw = random_kquant_blocks(qt.name, n_blocks, rng).reshape(*shape[:-1], -1)
        else:
            qt = gguf.GGMLQuantizationType.Q8_0
            raw = gguf.quants.quantize((0.02 * rng.standard_normal(shape)).astype(np.float32), qt)
        writer.add_tensor(name, raw, raw_dtype=qt)
        expected[name] = gguf.quants.dequantize(raw, qt).reshape(shape)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


def write_foreign_gguf(dst: str | Path, arch: str = "llama") -> Path:
    """A small valid GGUF of another architecture (for IncompatibleWeights tests)."""
    import gguf

    writer = gguf.GGUFWriter(str(dst), arch=arch)
    writer.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float16))
    q8 = gguf.GGMLQuantizationType.Q8_0
    writer.add_tensor("blk.0.attn_q.weight", gguf.quants.quantize(np.ones((32, 32), np.float32), q8), raw_dtype=q8)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(dst)


__all__ = [
    "KQUANT_DIT_CONFIG",
    "K_SCALE_FIELDS",
    "expected_weights",
    "random_kquant_blocks",
    "write_foreign_gguf",
    "write_kquant_gguf",
    "write_tiny_gguf",
]
