"""Write the tiny model in the single-file layouts ComfyUI users download, for tests of detection and loading.

Real files cannot be downloaded here, so each layout is reproduced from the tiny diffusers folder with the real key
names and dtypes: the DiT with/without ``model.diffusion_model.``, in bf16/fp32/fp8 (e4m3fn, e5m2) and ComfyUI's
"fp8 scaled" (per-layer ``weight_scale`` + ``comfy_quant``, and the older ``scale_weight`` ± ``scale_input`` +
``scaled_fp8`` marker); the Qwen2.5-VL text encoder under HF
names (optionally fp8 scaled like ``qwen_2.5_vl_7b_fp8_scaled.safetensors``); the VAE under Wan 2.1 names. Our
files carry their exact config in metadata (toy sizes cannot be inferred the way real ones are).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

DIT_VARIANTS = ("bf16", "fp32", "fp8_e4m3fn", "fp8_e5m2", "fp8_scaled", "fp8_scaled_legacy", "fp8_scaled_input")


def _save(tensors: dict, dst: Path, metadata: dict) -> Path:
    from qwenstudio.engine.formats.convert import save_tensors

    return save_tensors(tensors, dst, metadata)


def _folder_tensors(folder: Path) -> dict:
    from qwenstudio.engine.loading import component_files, iter_safetensors

    return dict(iter_safetensors(component_files(folder)))


def write_dit_file(tiny_folder: str | Path, dst: str | Path, variant: str = "bf16", *, prefix: bool = True) -> Path:
    """The DiT as a ComfyUI single file (``variant`` in DIT_VARIANTS)."""
    from qwenstudio.engine.formats.convert import convert

    if variant not in DIT_VARIANTS:
        raise ValueError(f"variant must be one of {DIT_VARIANTS}")
    if variant in ("bf16", "fp32"):
        return convert(tiny_folder, dst, "comfy", dtype=variant, prefix=prefix, overwrite=True)
    if variant == "fp8_scaled":  # ComfyUI's per-layer format
        return convert(tiny_folder, dst, "fp8_scaled", prefix=prefix, overwrite=True)
    if variant.startswith("fp8_scaled"):  # the older scaled_fp8-marker layout, optionally with scale_input
        return convert(tiny_folder, dst, "fp8_scaled_legacy", prefix=prefix, scale_input=variant.endswith("input"),
                       overwrite=True)
    return convert(tiny_folder, dst, "fp8", fp8_dtype="float8_" + variant[4:], prefix=prefix, overwrite=True)


def write_text_encoder_file(
    tiny_folder: str | Path, dst: str | Path, *, fp8_scaled: bool = False, dtype: str = "bf16", prefix: str = ""
) -> Path:
    """The text encoder as ``qwen_2.5_vl_7b*.safetensors``: HF (pre-transformers-5) names, optional ComfyUI prefix,
    Linear weights of the language and vision blocks fp8 scaled if asked; config JSON in metadata."""
    import torch

    from qwenstudio.engine.formats.comfy import TEXT_ENCODER_CONFIG_METADATA_KEY
    from qwenstudio.engine.quant.fp8 import quantize_fp8

    folder = Path(tiny_folder) / "text_encoder"
    target = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    out: dict = {}
    for k, t in _folder_tensors(folder).items():
        linear = k.endswith(".weight") and t.ndim == 2 and (".layers." in k or "visual.blocks." in k or "merger.mlp" in k)
        if fp8_scaled and linear:
            q, s = quantize_fp8(t, True)
            out[prefix + k] = q
            out[prefix + k[: -len("weight")] + "scale_weight"] = s
            out[prefix + k[: -len("weight")] + "scale_input"] = torch.tensor(1.0)
        else:
            out[prefix + k] = t.to(target) if t.is_floating_point() else t
    if fp8_scaled:
        out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    config = json.loads((folder / "config.json").read_text())
    return _save(out, Path(dst), {"format": "pt", TEXT_ENCODER_CONFIG_METADATA_KEY: json.dumps(config)})


def write_vae_file(tiny_folder: str | Path, dst: str | Path, *, dtype: str = "fp32") -> Path:
    """The VAE as ``qwen_image_vae.safetensors`` under ComfyUI's Wan 2.1 key names; config JSON in metadata."""
    import torch

    from qwenstudio.engine.formats.comfy import VAE_CONFIG_METADATA_KEY, vae_key_to_comfy

    folder = Path(tiny_folder) / "vae"
    config = {k: v for k, v in json.loads((folder / "config.json").read_text()).items() if not k.startswith("_")}
    target = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    out = {vae_key_to_comfy(k, config["num_res_blocks"]): t.to(target) for k, t in _folder_tensors(folder).items()}
    return _save(out, Path(dst), {"format": "pt", VAE_CONFIG_METADATA_KEY: json.dumps(config)})


def write_comfy_models_dir(
    root: str | Path, tiny_folder: str | Path, variants: tuple[str, ...] = ("bf16",), *, tokenizer: bool = True
) -> dict[str, Path]:
    """A ComfyUI ``models/`` tree: diffusion_models/qwen_image_<variant>.safetensors for each variant,
    text_encoders/qwen_2.5_vl_7b.safetensors, vae/qwen_image_vae.safetensors, an empty loras/, and (optionally) the
    tokenizer at ``<root>/tokenizer`` since no ComfyUI file carries one. Returns name -> path."""
    root = Path(root)
    paths: dict[str, Path] = {}
    for v in variants:
        paths[f"dit_{v}"] = write_dit_file(tiny_folder, root / "diffusion_models" / f"qwen_image_{v}.safetensors", v)
    paths["text_encoder"] = write_text_encoder_file(tiny_folder, root / "text_encoders" / "qwen_2.5_vl_7b.safetensors")
    paths["vae"] = write_vae_file(tiny_folder, root / "vae" / "qwen_image_vae.safetensors")
    (root / "loras").mkdir(parents=True, exist_ok=True)
    paths["loras"] = root / "loras"
    if tokenizer:
        shutil.copytree(Path(tiny_folder) / "tokenizer", root / "tokenizer", dirs_exist_ok=True)
        paths["tokenizer"] = root / "tokenizer"
    return paths
