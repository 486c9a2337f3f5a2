"""Which DiT layers lose the most when their matmul runs in fp8 (e4m3, per-row scales, emulated)?

On the shape-true model (real width, ``--layers`` blocks, random weights) at 256², one forward: each group of
Linears alone is switched to fp8 compute and the relative L2 error of the DiT output vs fp32 is printed, then all of
them with and without the keep-list. This is how ``FP8_COMPUTE_KEEP_SUFFIXES`` was chosen (see the README's Speed
section). Usage: python benchmarks/fp8_sensitivity.py [--layers 1]
"""

from __future__ import annotations

import argparse
import json

GROUPS = {
    "modulation (img_mod/txt_mod)": ("img_mod.1", "txt_mod.1"),
    "attention q/k/v": ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj",
                        "attn.add_v_proj"),
    "attention out": ("attn.to_out.0", "attn.to_add_out"),
    "img_mlp.net.0 (up)": ("img_mlp.net.0.proj",),
    "img_mlp.net.2 (down)": ("img_mlp.net.2",),
    "txt_mlp.net.0 (up)": ("txt_mlp.net.0.proj",),
    "txt_mlp.net.2 (down)": ("txt_mlp.net.2",),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=1)
    args = ap.parse_args()
    import torch
    from torch import nn

    from qwenstudio.engine.quant.fp8 import FP8_COMPUTE_KEEP_SUFFIXES, quantize_linear_fp8
    from qwenstudio.testing.wide import WideSpec, build_wide_components

    c = build_wide_components(WideSpec(layers=args.layers))
    tr = c.transformer
    del c.text_encoder
    g = torch.Generator().manual_seed(0)
    kw = {"hidden_states": torch.randn(1, 256, 64, generator=g),
          "encoder_hidden_states": torch.randn(1, 40, 3584, generator=g) * 0.5,
          "timestep": torch.tensor([0.6]), "img_shapes": [[(1, 16, 16)]], "return_dict": False}
    linears = {n: m for n, m in tr.transformer_blocks.named_modules() if type(m) is nn.Linear}
    fp8 = {n: quantize_linear_fp8(m) for n, m in linears.items()}
    for m in fp8.values():
        m.compute = "emulate"

    def run(names):
        for n, float_linear in linears.items():
            parent, _, leaf = n.rpartition(".")
            setattr(tr.transformer_blocks.get_submodule(parent), leaf, fp8[n] if n in names else float_linear)
        with torch.inference_mode():
            return tr(**kw)[0]

    ref = run(set())
    rows = {}
    for group, suffixes in GROUPS.items():
        names = {n for n in linears if n.endswith(suffixes)}
        rows[group] = float((run(names) - ref).norm() / ref.norm())
    everything = set(linears)
    rows["all block Linears"] = float((run(everything) - ref).norm() / ref.norm())
    kept = {n for n in everything if not n.endswith(FP8_COMPUTE_KEEP_SUFFIXES)}
    rows[f"all but the keep-list {FP8_COMPUTE_KEEP_SUFFIXES}"] = float((run(kept) - ref).norm() / ref.norm())
    print(json.dumps({k: round(v, 5) for k, v in rows.items()}, indent=2))


if __name__ == "__main__":
    main()
