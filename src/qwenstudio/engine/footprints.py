"""What each component needs on the accelerator, from file headers only: its weights as a whole, its largest repeated
block and the bytes outside the blocks (block-level streaming), its largest single layer (leaf-level streaming), and
the working memory of one run (activations at the requested size, batch and CFG batching; the VAE decode peak,
tiled or not). The memory planner (``engine/memory.py``) adds these up per placement.

Activation figures are estimates from each model's widths (read from the headers), with constants stated here:
  DiT       per token of one forward (image + text tokens), ~10 hidden-width buffers + 2 MLP-width buffers live at
            the peak of a block (q/k/v, joint attention, MLP in/out, residual streams); attention itself is
            flash/memory-efficient on GPUs (no tokens² matrix)
  text enc. per prompt token, ~10 hidden-width + 3 MLP-width buffers; a prompt of up to ``text_tokens`` tokens
  VAE       decode peak per output pixel = 21 x base width (96 in Qwen-Image) x itemsize: measured on this repo's
            real-width VAE in fp32 on the CPU (8.0 kB per pixel between 256² and 512², resident-set growth:
            ``benchmarks/vae_memory.py``); tiled decode holds one 256² tile plus the image
plus a fixed workspace for kernels and allocator slack (none on a simulated accelerator: the CPU has no kernel
libraries to reserve for). Real Qwen-Image at 1328², bf16, CFG batched: DiT ≈ 2.2 GiB,
VAE untiled ≈ 7.2 GiB (so big images decode tiled on small GPUs).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

GiB = 2**30
WORKSPACE = GiB // 2  # cuBLAS/cuDNN workspace, allocator fragmentation
DIT_ELEMS_PER_TOKEN = (10, 2)  # (x hidden width, x MLP width) live per token at a block's peak
TEXT_ELEMS_PER_TOKEN = (10, 3)
VAE_ELEMS_PER_PIXEL_PER_BASE = 21  # measured: 8.0 kB/pixel fp32 at base width 96
VAE_TILE = 256  # diffusers' AutoencoderKLQwenImage tile_sample_min_height/width
_BLOCK = re.compile(r"^(.*?(?:transformer_blocks|layers|blocks))\.(\d+)\.")
# Qwen-Image's real widths: the defaults when a header does not say (an int size, an unknown layout)
QWEN_IMAGE_WIDTHS = {"transformer": (3072, 12288), "text_encoder": (3584, 18944), "vae": (96, 0)}
# Qwen-Image's real layout as fractions of the component's bytes (largest block, outside the blocks, largest layer):
# used only for callers that give a plain byte count (e.g. the server summing several models)
_LAYOUT = {"transformer": (60, 1 / 60, 0.012, 0.0056), "text_encoder": (28, 0.031, 0.16, 0.08),
           "vae": (0, 0.0, 1.0, 0.2)}


@dataclass(frozen=True)
class Footprint:
    """Bytes of one component as loaded (compute dtype; fp8/GGUF stay quantized) and its layout."""

    total: int
    blocks: int = 0  # repeated blocks (transformer_blocks.N / layers.N)
    block: int = 0  # the largest block
    outside: int = 0  # bytes outside the repeated blocks (embeddings, norms, in/out projections)
    leaf: int = 0  # the two largest single layers (a Linear, an Embedding): the running one + the prefetched one
    width: int = 0  # hidden width (VAE: base width)
    mlp: int = 0  # MLP width

    @classmethod
    def estimate(cls, name: str, total: int) -> Footprint:
        """A footprint from a byte count alone, with Qwen-Image's real layout (``_LAYOUT``)."""
        n, block, outside, leaf = _LAYOUT.get(name, (0, 0.0, 1.0, 1.0))
        width, mlp = QWEN_IMAGE_WIDTHS.get(name, (0, 0))
        return cls(total, n, int(total * block), int(total * outside), int(total * leaf), width, mlp)

    def streamed(self, level: str) -> int:
        """Bytes on the accelerator while streaming: ``block`` = what lies outside the blocks + the running block +
        the one being prefetched; ``leaf`` = the running layer + the prefetched one (at most the two largest)."""
        if level == "block":
            return self.outside + 2 * self.block
        return self.leaf


def footprint_from_tensors(tensors: dict[str, tuple[tuple[int, ...], int]], name: str = "") -> Footprint:
    """A footprint from ``{key: (shape, resident bytes)}`` (a header read by ``header_tensors``)."""
    total = sum(b for _, b in tensors.values())
    groups: dict[tuple[str, int], int] = {}
    layers: dict[str, int] = {}
    for key, (_, nbytes) in tensors.items():
        m = _BLOCK.match(key)
        if m:
            groups[(m.group(1), int(m.group(2)))] = groups.get((m.group(1), int(m.group(2))), 0) + nbytes
        layer = key.rsplit(".", 1)[0]
        layers[layer] = layers.get(layer, 0) + nbytes
    families: dict[str, list[int]] = {}
    for (prefix, _), nbytes in groups.items():
        families.setdefault(prefix, []).append(nbytes)
    if families:  # the repeated blocks are the family holding the most bytes (the DiT's / the LLM's layers)
        blocks = max(families.values(), key=sum)
        n, block, outside = len(blocks), max(blocks), total - sum(blocks)
    else:
        n, block, outside = 0, 0, total
    width, mlp = _widths(tensors, name)
    return Footprint(total, n, block, outside, sum(sorted(layers.values())[-2:]), width, mlp)


def _widths(tensors: dict, name: str) -> tuple[int, int]:
    def dim(suffix: str, axis: int) -> int:
        for key, (shape, _) in tensors.items():
            if key.endswith(suffix) and len(shape) > axis:
                return int(shape[axis])
        return 0

    default = QWEN_IMAGE_WIDTHS.get(name, (0, 0))
    if name == "transformer":
        return dim("img_in.weight", 0) or default[0], dim("blocks.0.img_mlp.net.0.proj.weight", 0) or default[1]
    if name == "text_encoder":
        return dim("embed_tokens.weight", 1) or default[0], dim("layers.0.mlp.gate_proj.weight", 0) or default[1]
    if name == "vae":
        return dim("decoder.conv_out.weight", 1) or dim("decoder.head.2.weight", 1) or default[0], 0
    return default


# ---- reading headers ---------------------------------------------------------------------------------------------

def safetensors_tensors(files: list[Path], compute_itemsize: int, skip_prefixes: tuple[str, ...] = (),
                        quant: str | None = None) -> dict:
    """``{key: (shape, resident bytes)}``: float tensors at the compute dtype, fp8/int tensors as stored. ``quant``
    (a DiT run with ``--quant fp8|int4|nf4``): the float Linear weights the quantizer rewrites at load are counted
    at their quantized size (``quantized_weight_bytes``)."""
    from .formats.keymaps import strip_dit_prefix
    from .loading import read_safetensors_header
    from .quant.load_time import quantized_weight_bytes

    itemsize = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "I32": 4,
                "I64": 8}
    out = {}
    for f in files:
        for key, info in read_safetensors_header(f).items():
            if key == "__metadata__" or key.startswith(skip_prefixes):
                continue
            numel = 1
            for d in info["shape"]:
                numel *= d
            dt = info["dtype"]
            is_float = dt in ("F64", "F32", "F16", "BF16")
            nbytes = numel * (compute_itemsize if is_float else itemsize.get(dt, 1))
            if quant and is_float and key.endswith(".weight"):
                quantized = quantized_weight_bytes(strip_dit_prefix(key)[: -len(".weight")], info["shape"], quant)
                nbytes = nbytes if quantized is None else quantized
            out[key] = (tuple(info["shape"]), nbytes)
    return out


def gguf_tensors(path: Path, compute_itemsize: int) -> dict:
    """``{key: (shape, resident bytes)}`` of a GGUF DiT: quantized blocks as stored, float tensors at the compute
    dtype (the loader's rule)."""
    from .formats.gguf import read_gguf

    _, tensors, _ = read_gguf(path)
    out = {}
    for key, (qtype, shape, raw) in tensors.items():
        numel = 1
        for d in shape:
            numel *= d
        out[key] = (shape, numel * compute_itemsize if qtype in (0, 1, 30) else int(raw.nbytes))
    return out


# ---- working memory ------------------------------------------------------------------------------------------

def dit_activations(fp: Footprint, width: int, height: int, *, batch: int = 1, cfg_batched: bool = True,
                    text_tokens: int = 1024, itemsize: int = 2, workspace: int = WORKSPACE) -> int:
    """Peak working bytes of one DiT forward: tokens x live buffers x itemsize, the CFG pair batched (2x)."""
    d, m = fp.width or QWEN_IMAGE_WIDTHS["transformer"][0], fp.mlp or QWEN_IMAGE_WIDTHS["transformer"][1]
    tokens = (width // 16) * (height // 16) + text_tokens
    per_token = DIT_ELEMS_PER_TOKEN[0] * d + DIT_ELEMS_PER_TOKEN[1] * m
    return batch * (2 if cfg_batched else 1) * tokens * per_token * itemsize + workspace


def text_activations(fp: Footprint, *, text_tokens: int = 1024, itemsize: int = 2, workspace: int = WORKSPACE) -> int:
    """Peak working bytes of one prompt encode (prompts are encoded one at a time, embeddings cached)."""
    h, m = fp.width or QWEN_IMAGE_WIDTHS["text_encoder"][0], fp.mlp or QWEN_IMAGE_WIDTHS["text_encoder"][1]
    return text_tokens * (TEXT_ELEMS_PER_TOKEN[0] * h + TEXT_ELEMS_PER_TOKEN[1] * m) * itemsize + workspace


def vae_decode_peak(fp: Footprint, pixels: int, *, batch: int = 1, tiled: bool = False, itemsize: int = 2,
                    workspace: int = WORKSPACE) -> int:
    """Peak working bytes of decoding ``batch`` images of ``pixels`` each; tiled: one tile's peak plus the image
    (tiles and blended rows, 3 channels, ~3 copies)."""
    base = fp.width or QWEN_IMAGE_WIDTHS["vae"][0]
    per_pixel = VAE_ELEMS_PER_PIXEL_PER_BASE * base * itemsize
    if tiled:
        return batch * (min(pixels, VAE_TILE * VAE_TILE) * per_pixel + 9 * pixels * itemsize) + workspace
    return batch * pixels * per_pixel + workspace
