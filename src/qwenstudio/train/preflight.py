"""Will this training run fit? An estimate made before the first step, with what to change when it does not.

Measured: the DiT's resident bytes (fp8 / GGUF weights as stored, from the loaded modules), the LoRA's parameter
count (from the actual target modules), free memory (``engine.memory.measure``). Estimated (stated constants):

- optimizer: fp32 LoRA params + fp32 grads + AdamW moments (2 x fp32, or 2 x 1 byte for 8-bit AdamW);
- activations, per image token and model width D at the compute itemsize: ``ACTS_PER_BLOCK`` x T x D inside one
  transformer block (q/k/v, attention output, norms, modulation, the 4D MLP hidden twice, LoRA inputs), for every
  block without gradient checkpointing, for one block plus each block's T x D input with it;
- the dequantized weights of a quantized base: one block at a time with checkpointing, *every* block without it
  (autograd keeps each layer's upcast weight for its input gradient);
- the VAE kept for sample images plus 1 GiB of kernel workspace.
The text encoder and VAE visit the device one at a time while caching, before the DiT moves there.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..engine.memory import GiB

ACTS_PER_BLOCK = 32
WORKSPACE = GiB


@dataclass(frozen=True)
class DitShape:
    num_layers: int
    width: int  # inner dim (heads x head dim)
    resident_bytes: int  # weights as held in memory (fp8/GGUF stay quantized)
    block_params: int  # weights of one transformer block's linears
    lora_params: int  # trainable parameters of the LoRA
    quantized: bool


@dataclass(frozen=True)
class Estimate:
    device: str
    needed: dict[str, int]
    free: int | None
    caching_needed: int
    fits: bool
    advice: tuple[str, ...] = field(default_factory=tuple)

    @property
    def total(self) -> int:
        return sum(self.needed.values())

    def describe(self) -> str:
        parts = ", ".join(f"{k} {_gib(v)}" for k, v in self.needed.items() if v)
        free = f"{_gib(self.free)} free" if self.free is not None else "free memory unknown"
        verdict = "fits" if self.fits else "does NOT fit"
        text = f"training needs ~{_gib(self.total)} on {self.device} ({parts}); {free}: {verdict}"
        if self.advice:
            text += "; to make it fit: " + "; ".join(self.advice)
        return text


def dit_shape(model, lora_params: int) -> DitShape:
    """Sizes read from a built DiT (on any device, the meta device included)."""
    blocks = model.transformer_blocks
    cfg = model.config
    width = cfg.num_attention_heads * cfg.attention_head_dim
    resident = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    quantized = False
    block_params = 0
    for m in blocks[0].modules():
        if hasattr(m, "in_features") and hasattr(m, "out_features") and not list(m.children()):
            block_params += m.in_features * m.out_features
            w = getattr(m, "weight", None)
            quantized |= w is not None and w.dtype not in _float_dtypes()
    return DitShape(len(blocks), width, resident, block_params, lora_params, quantized)


def estimate(shape: DitShape, *, tokens: int, batch: int, compute_itemsize: int, gradient_checkpointing: bool,
             optimizer_8bit: bool, keep_vae_bytes: int, text_encoder_bytes: int, vae_bytes: int) -> dict[str, int]:
    """Bytes on the training device by what holds them, plus ``caching`` (the peak while encoding the dataset)."""
    t = tokens * batch
    block_dequant = shape.block_params * compute_itemsize if shape.quantized else 0
    per_block = ACTS_PER_BLOCK * t * shape.width * compute_itemsize
    if gradient_checkpointing:
        acts = per_block + shape.num_layers * t * shape.width * compute_itemsize
        dequant = 2 * block_dequant  # forward recompute + backward of one block
    else:
        acts = shape.num_layers * per_block
        dequant = shape.num_layers * block_dequant
    p = shape.lora_params
    return {
        "DiT weights": shape.resident_bytes,
        "dequantized weights": dequant,
        "activations": acts,
        "LoRA + grads + optimizer": p * 4 + p * 4 + p * (2 if optimizer_8bit else 8),
        "VAE for samples": keep_vae_bytes,
        "workspace": WORKSPACE,
        "caching": max(text_encoder_bytes, vae_bytes) + WORKSPACE,
    }


def preflight(shape: DitShape, *, device: str, free: int | None, tokens: int, batch: int, compute_itemsize: int,
              gradient_checkpointing: bool, optimizer_8bit: bool, keep_vae_bytes: int, text_encoder_bytes: int,
              vae_bytes: int, resolution: int, bitsandbytes_available: bool) -> Estimate:
    kw = dict(batch=batch, compute_itemsize=compute_itemsize, keep_vae_bytes=keep_vae_bytes,
              text_encoder_bytes=text_encoder_bytes, vae_bytes=vae_bytes)

    def total(s=shape, toks=tokens, gc=gradient_checkpointing, o8=optimizer_8bit):
        need = estimate(s, tokens=toks, gradient_checkpointing=gc, optimizer_8bit=o8, **kw)
        caching = need.pop("caching")
        return need, caching

    needed, caching = total()
    fits = free is None or (sum(needed.values()) <= free and caching <= free)
    advice: list[str] = []
    if not fits:
        def would(label: str, need_caching):
            need, cach = need_caching
            ok = sum(need.values()) <= free and cach <= free
            advice.append(f"{label} (~{_gib(sum(need.values()))}{', fits' if ok else ''})")

        if not gradient_checkpointing:
            would("enable gradient checkpointing", total(gc=True))
        if not shape.quantized:
            q = replace(shape, resident_bytes=shape.resident_bytes // compute_itemsize, quantized=True)
            would("train on an fp8 or GGUF Q8_0 DiT file", total(s=q))
        if not optimizer_8bit and device.startswith("cuda"):
            label = "use 8-bit AdamW" + ("" if bitsandbytes_available else " (pip install bitsandbytes)")
            would(label, total(o8=True))
        for r in (768, 512):
            if r < resolution:
                would(f"--resolution {r}", total(toks=tokens * r * r // (resolution * resolution)))
                break
        if batch > 1:
            advice.append("--batch-size 1")
    return Estimate(device, needed, free, caching, fits, tuple(advice))


def _float_dtypes():
    import torch

    return (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _gib(n: int | None) -> str:
    return f"{(n or 0) / GiB:.1f} GiB"
