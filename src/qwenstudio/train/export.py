"""Write the trained LoRA in the key style other tools load, with alpha stored the way each expects.

- ``peft`` (default; diffusers ``save_lora_weights`` layout): ``transformer.<module>.lora_A.weight`` /
  ``lora_B.weight``; rank and alpha in the ``lora_adapter_metadata`` JSON (``transformer.r``,
  ``transformer.lora_alpha`` ...), which diffusers' loader turns into a ``LoraConfig``.
- ``comfy``: ``diffusion_model.<module>.lora_down.weight`` / ``lora_up.weight`` + ``.alpha`` scalar tensors.
- ``kohya``: ``lora_unet_<module with _>.lora_down.weight`` / ``lora_up.weight`` + ``.alpha`` (musubi-tuner's
  layout), plus the ``ss_network_dim`` / ``ss_network_alpha`` metadata kohya tools read.

All carry ``qwenstudio_train_config`` (the TrainConfig JSON) and ``qwenstudio_train_step`` in the metadata. Which of
these ComfyUI's own key map accepts for Qwen-Image is checked in tests/fixtures/peers/comfy_lora_keys.py.
"""

from __future__ import annotations

import json
from pathlib import Path

from .. import __version__

METADATA_CONFIG_KEY = "qwenstudio_train_config"
PEFT_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY


def lora_state_dict(lora, fmt: str, dtype=None) -> dict:
    import torch

    dtype = dtype or torch.float32
    out = {}
    alpha = torch.tensor(lora.alpha, dtype=torch.float32)
    for name, down, up in lora.factors():
        d = down.detach().to("cpu", dtype).contiguous()
        u = up.detach().to("cpu", dtype).contiguous()
        if fmt == "peft":
            out[f"transformer.{name}.lora_A.weight"], out[f"transformer.{name}.lora_B.weight"] = d, u
        elif fmt == "comfy":
            base = f"diffusion_model.{name}"
            out[f"{base}.lora_down.weight"], out[f"{base}.lora_up.weight"], out[f"{base}.alpha"] = d, u, alpha.clone()
        elif fmt == "kohya":
            base = "lora_unet_" + name.replace(".", "_")
            out[f"{base}.lora_down.weight"], out[f"{base}.lora_up.weight"], out[f"{base}.alpha"] = d, u, alpha.clone()
        else:
            raise ValueError(f"unknown LoRA format {fmt}")
    return out


def lora_metadata(lora, fmt: str, config, step: int) -> dict[str, str]:
    meta = {
        "format": "pt",
        "qwenstudio_version": __version__,
        METADATA_CONFIG_KEY: config.to_json(),
        "qwenstudio_train_step": str(step),
        "qwenstudio_lora_format": fmt,
    }
    if fmt == "peft":
        meta[PEFT_METADATA_KEY] = json.dumps({
            "transformer.r": lora.rank, "transformer.lora_alpha": lora.alpha,
            "transformer.target_modules": lora.module_names, "transformer.lora_dropout": 0.0,
            "transformer.bias": "none", "transformer.use_dora": False, "transformer.init_lora_weights": True,
        }, sort_keys=True)
    if fmt == "kohya":
        meta.update({"ss_network_dim": str(lora.rank), "ss_network_alpha": f"{lora.alpha:g}",
                     "ss_network_module": "networks.lora_qwen_image"})
    return meta


def save_lora(path: str | Path, lora, fmt: str, config, step: int) -> Path:
    """Atomically write the LoRA (fp32 factors are small; bf16 would round the trained deltas for no gain worth
    having) and the config JSON beside it (``NAME.json``)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(lora_state_dict(lora, fmt), str(tmp), metadata=lora_metadata(lora, fmt, config, step))
    tmp.replace(path)
    side = path.with_suffix(".json")
    side_tmp = side.with_name(side.name + ".tmp")
    side_tmp.write_text(json.dumps({"config": config.to_dict(), "step": step, "format": fmt}, indent=2))
    side_tmp.replace(side)
    return path
