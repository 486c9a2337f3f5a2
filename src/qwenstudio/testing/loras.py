"""Random low-rank LoRAs for the tiny DiT, written in every key style ``engine.lora.keys`` reads.

Each writer returns the state dict *and* the canonical full deltas (scale included), computed here independently of
the parser, so tests can merge them into a copy of the weights and compare against the side-branch path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# style -> (key template, role names, alpha?) for the plain LoRA styles; {m} dotted module, {f} underscore-flattened.
_LORA_STYLES: dict[str, tuple[str, str, str, bool]] = {
    "diffusers": ("transformer.{m}", "lora_A.weight", "lora_B.weight", True),
    "peft": ("{m}", "lora_A.weight", "lora_B.weight", False),
    "diffsynth": ("{m}", "lora_A.default.weight", "lora_B.default.weight", False),
    "kohya": ("lora_unet_{f}", "lora_down.weight", "lora_up.weight", True),
    "comfy": ("diffusion_model.{m}", "lora_down.weight", "lora_up.weight", True),
    "aitoolkit": ("diffusion_model.{m}", "lora_A.weight", "lora_B.weight", False),
    "lightx2v": ("{m}", "lora_down.weight", "lora_up.weight", True),
    "simpletuner": ("lycoris_{f}", "lora_down.weight", "lora_up.weight", True),
}
STYLES: tuple[str, ...] = (*_LORA_STYLES, "lokr", "lokr_factored", "loha")


def make_lora(
    model, style: str, *, seed: int = 0, rank: int = 4, alpha: float = 2.0, targets: list[str] | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state dict in ``style``, {module name: fp32 delta [out, in]}) for ``targets`` (default: every linear)."""
    import torch

    from ..engine.lora.keys import linear_targets

    shapes = linear_targets(model)
    names = targets if targets is not None else sorted(shapes)
    g = torch.Generator().manual_seed(seed)
    def rnd(*s, std=0.1):
        return torch.randn(s, generator=g) * std

    sd: dict[str, Any] = {}
    deltas: dict[str, Any] = {}
    a = torch.tensor(alpha, dtype=torch.float32)
    for m in names:
        i, o = shapes[m]
        f = m.replace(".", "_")
        if style in _LORA_STYLES:
            tpl, dn, up, with_alpha = _LORA_STYLES[style]
            base = tpl.format(m=m, f=f)
            d, u = rnd(rank, i), rnd(o, rank)
            sd[f"{base}.{dn}"], sd[f"{base}.{up}"] = d, u
            if with_alpha:
                sd[f"{base}.alpha"] = a
            deltas[m] = (u @ d) * (alpha / rank if with_alpha else 1.0)
        elif style == "lokr":  # unfactorised: alpha is ignored (ComfyUI/LyCORIS convention)
            w1, w2 = rnd(2, 2, std=0.3), rnd(o // 2, i // 2)
            sd.update({f"diffusion_model.{m}.lokr_w1": w1, f"diffusion_model.{m}.lokr_w2": w2,
                       f"diffusion_model.{m}.alpha": a})
            deltas[m] = torch.kron(w1, w2)
        elif style == "lokr_factored":
            w1, w2a, w2b = rnd(2, 2, std=0.3), rnd(o // 2, rank, std=0.3), rnd(rank, i // 2, std=0.3)
            sd.update({f"lycoris_{f}.lokr_w1": w1, f"lycoris_{f}.lokr_w2_a": w2a, f"lycoris_{f}.lokr_w2_b": w2b,
                       f"lycoris_{f}.alpha": a})
            deltas[m] = torch.kron(w1, w2a @ w2b) * (alpha / rank)
        elif style == "loha":
            w1a, w1b, w2a, w2b = rnd(o, rank, std=0.3), rnd(rank, i, std=0.3), rnd(o, rank, std=0.3), rnd(rank, i, std=0.3)
            sd.update({f"lycoris_{f}.hada_w1_a": w1a, f"lycoris_{f}.hada_w1_b": w1b, f"lycoris_{f}.hada_w2_a": w2a,
                       f"lycoris_{f}.hada_w2_b": w2b, f"lycoris_{f}.alpha": a})
            deltas[m] = (w1a @ w1b) * (w2a @ w2b) * (alpha / rank)
        else:
            raise ValueError(f"unknown LoRA style '{style}'; known: {', '.join(STYLES)}")
    return sd, deltas


def write_lora(path: str | Path, model, style: str, *, metadata: dict[str, str] | None = None, **kw) -> tuple[Path, dict]:
    """Write ``make_lora(model, style, **kw)`` as safetensors; returns (path, deltas)."""
    from safetensors.torch import save_file

    sd, deltas = make_lora(model, style, **kw)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.clone().contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    return path, deltas


def merge_deltas(model, deltas: dict, weight: float = 1.0) -> None:
    """Reference path: add ``weight * delta`` into the float weights of ``model`` in place (use on a copy)."""
    import torch

    with torch.no_grad():
        for name, d in deltas.items():
            W = model.get_submodule(name).weight
            W.copy_((W.float() + weight * d.to(W.device)).to(W.dtype))
