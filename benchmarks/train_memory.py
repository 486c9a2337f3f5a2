"""Training-memory estimate for the *real* Qwen-Image DiT (60 blocks, 24 x 128 heads), from the same planner the
``train-lora`` preflight uses (qwenstudio/train/preflight.py), for several bases, ranks and resolutions.

The DiT is built on the meta device (no weights, no memory) so parameter and LoRA counts are exact; byte counts
per weight for fp8/GGUF are the formats' own (fp8: 1 byte; Q8_0: 34 bytes per 32; Q4_K: 144 bytes per 256) with
the keep-high-precision layers in bf16. Activations are the planner's stated estimate, not a measurement.
Usage: python benchmarks/train_memory.py [--resolution 1024] [--rank 16] [--caption-tokens 256]
"""

from __future__ import annotations

import argparse

GiB = 2**30
BASES = {"bf16": 2.0, "fp8": 1.0, "GGUF Q8_0": 34 / 32, "GGUF Q4_K_M (~Q4_K)": 144 / 256}
TEXT_ENCODER = {"bf16": 16.6 * GiB, "fp8_scaled": 9.4 * GiB}  # Qwen2.5-VL-7B incl. vision tower, no lm_head
VAE = 0.24 * GiB


def real_dit_on_meta():
    import torch
    from diffusers import QwenImageTransformer2DModel

    with torch.device("meta"):
        return QwenImageTransformer2DModel()  # diffusers' defaults are Qwen-Image's real config


def main() -> None:
    from qwenstudio.engine.lora.keys import linear_targets
    from qwenstudio.engine.quant.fp8 import keep_high_precision
    from qwenstudio.train.config import DEFAULT_TARGETS
    from qwenstudio.train.lora_modules import match_targets
    from qwenstudio.train.preflight import DitShape, estimate

    ap = argparse.ArgumentParser()
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--caption-tokens", type=int, default=256)
    args = ap.parse_args()

    dit = real_dit_on_meta()
    shapes = linear_targets(dit)
    lora_params = sum(args.rank * (shapes[n][0] + shapes[n][1]) for n in match_targets(dit, DEFAULT_TARGETS))
    block = dit.transformer_blocks[0]
    block_params = sum(m.in_features * m.out_features for m in block.modules() if type(m).__name__ == "Linear")
    quantizable = sum(p.numel() for n, p in dit.named_parameters()
                      if n.endswith(".weight") and p.ndim == 2 and not keep_high_precision(n))
    total = sum(p.numel() for p in dit.parameters())
    tokens = (args.resolution // 16) ** 2 + args.caption_tokens
    n_targets = len(match_targets(dit, DEFAULT_TARGETS))
    print(f"Qwen-Image DiT: {total / 1e9:.2f}B params, LoRA rank {args.rank} on {n_targets} linears: "
          f"{lora_params / 1e6:.1f}M params; {args.resolution}² = {tokens} tokens with the caption\n")
    print("| base | grad ckpt | optimizer | DiT | activations | dequant | LoRA+opt | total on GPU (train) | "
          "caching peak |")
    print("|---|---|---|---|---|---|---|---|---|")
    for base, bpw in BASES.items():
        resident = int(quantizable * bpw + (total - quantizable) * 2)
        shape = DitShape(len(dit.transformer_blocks), dit.config.num_attention_heads * dit.config.attention_head_dim,
                         resident, block_params, lora_params, quantized=base != "bf16")
        for gc, o8 in ((True, True), (True, False), (False, True)):
            need = estimate(shape, tokens=tokens, batch=1, compute_itemsize=2, gradient_checkpointing=gc,
                            optimizer_8bit=o8, keep_vae_bytes=int(VAE),
                            text_encoder_bytes=int(TEXT_ENCODER["fp8_scaled"]), vae_bytes=int(VAE))
            caching = need.pop("caching")
            g = lambda k: f"{need[k] / GiB:.1f}"  # noqa: E731
            print(f"| {base} | {'on' if gc else 'off'} | {'AdamW 8-bit' if o8 else 'AdamW'} | {g('DiT weights')} | "
                  f"{g('activations')} | {g('dequantized weights')} | {g('LoRA + grads + optimizer')} | "
                  f"**{sum(need.values()) / GiB:.1f} GiB** | {caching / GiB:.1f} GiB |")


if __name__ == "__main__":
    main()
