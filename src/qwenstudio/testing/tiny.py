"""Tiny random Qwen-Image models built from the *real* classes, for tests and `--model tiny`.

Real weights (20B DiT + 7B text encoder) cannot be downloaded where this project is developed, so every loader and
the whole engine are exercised on models of the same architecture at toy size: diffusers'
``QwenImageTransformer2DModel`` and ``AutoencoderKLQwenImage``, transformers' ``Qwen2_5_VLForConditionalGeneration``
and a byte-level BPE ``Qwen2Tokenizer`` trained offline that carries the Qwen special tokens. The latent layout is
the real one (16 latent channels, 8x VAE downsampling, 2x2 patches -> 64 transformer input channels), so shapes,
packing and noise conventions are exercised exactly as on the real model. Everything is deterministic from ``seed``.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..engine.specs import QWEN_IMAGE_SCHEDULER_CONFIG

# Qwen2.5-VL special tokens, in the order of the real tokenizer (ids 151643..151664 there).
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
)

# Text the BPE merges are learned from: the real prompt templates plus a few common prompt words, so that
# templates tokenize to a realistic handful of tokens rather than one token per byte.
_TOKENIZER_CORPUS = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n",
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
    "image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n"
    "<|im_start|>assistant\n",
    "Picture 1: Picture 2: Picture 3: ",
    "a photo of a cat, a dog, a red apple on a wooden table, a city street at night, sunset over mountains, "
    "portrait of a woman, ultra HD, 4K, cinematic composition, bad quality, blurry, low resolution, text, sign, "
    "hello world, dance monkey, astronaut riding a horse, watercolor painting, the quick brown fox jumps",
)


@dataclass(frozen=True)
class TinySpec:
    """Sizes of the tiny model. Defaults are the smallest that keep every real code path (VAE 8x, 16 latent ch)."""

    seed: int = 0
    num_layers: int = 2
    attention_head_dim: int = 16
    num_attention_heads: int = 2
    axes_dims_rope: tuple[int, int, int] = (8, 4, 4)
    text_hidden_size: int = 32
    text_layers: int = 2
    vae_base_dim: int = 8
    tokenizer_vocab: int = 600
    zero_cond_t: bool = False
    extra: dict = field(default_factory=dict)


def build_tokenizer(spec: TinySpec = TinySpec()):
    """A ``Qwen2Tokenizer`` with byte-level BPE merges learned from a fixed corpus (deterministic, offline)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=spec.tokenizer_vocab,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        special_tokens=[],
    )
    bpe.train_from_iterator(list(_TOKENIZER_CORPUS) * 4, trainer=trainer)
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in state["merges"]]
    tok = Qwen2Tokenizer(vocab=state["vocab"], merges=merges, model_max_length=32768)
    tok.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL_TOKENS[1:])})
    return tok


def _mrope_section(hidden: int, heads: int = 2) -> list[int]:
    """Qwen2.5-VL's multimodal RoPE split (16, 24, 24 of 64 rotary pairs at 7B), scaled to the tiny head size."""
    half = hidden // heads // 2
    t, h = half // 4, half * 3 // 8
    return [t, h, half - t - h]


def _dit_kwargs(spec: TinySpec) -> dict:
    """The DiT shape shared by the transformer and a ControlNet that must match it (real latent layout)."""
    return dict(patch_size=2, in_channels=64, out_channels=16, num_layers=spec.num_layers,
                attention_head_dim=spec.attention_head_dim, num_attention_heads=spec.num_attention_heads,
                joint_attention_dim=spec.text_hidden_size, axes_dims_rope=spec.axes_dims_rope)


def build_components(spec: TinySpec = TinySpec()) -> dict:
    """Instantiate transformer, VAE, text encoder, tokenizer and scheduler with random weights (fp32, CPU)."""
    import torch
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = build_tokenizer(spec)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}

    torch.manual_seed(spec.seed)
    transformer = QwenImageTransformer2DModel(**_dit_kwargs(spec), zero_cond_t=spec.zero_cond_t)
    _randomize_zero_inits(transformer, seed=spec.seed + 1)

    torch.manual_seed(spec.seed + 2)
    vae = AutoencoderKLQwenImage(
        base_dim=spec.vae_base_dim,
        z_dim=16,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    )

    torch.manual_seed(spec.seed + 3)
    h = spec.text_hidden_size
    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": h,
            "intermediate_size": 2 * h,
            "num_hidden_layers": spec.text_layers,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "vocab_size": len(tokenizer),
            "rope_scaling": {"mrope_section": _mrope_section(h), "rope_type": "default", "type": "default"},
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "rope_theta": 1000000.0,
        },
        vision_config={
            "depth": 2,
            "hidden_size": h,
            "intermediate_size": 2 * h,
            "num_heads": 2,
            "out_hidden_size": h,
            "fullatt_block_indexes": [1],
        },
        vocab_size=len(tokenizer),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()

    scheduler = FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER_CONFIG)
    return {"transformer": transformer.eval(), "vae": vae.eval(), "text_encoder": text_encoder,
            "tokenizer": tokenizer, "scheduler": scheduler}




def build_controlnet(spec: TinySpec = TinySpec(), seed: int = 7):
    """A tiny union ``QwenImageControlNetModel`` matching the tiny DiT (random, non-zero residual projections)."""
    import torch
    from diffusers import QwenImageControlNetModel

    torch.manual_seed(seed)
    net = QwenImageControlNetModel(**_dit_kwargs(spec))
    _randomize_zero_inits(net, seed=seed + 1)
    return net.eval()


def build_inpaint_controlnet(spec: TinySpec = TinySpec(), seed: int = 9):
    """A tiny *inpainting* ``QwenImageControlNetModel`` (``extra_condition_channels=4``: masked-image latents plus
    one mask channel in 2x2 patches, as InstantX's Qwen-Image-ControlNet-Inpainting) matching the tiny DiT."""
    import torch
    from diffusers import QwenImageControlNetModel

    torch.manual_seed(seed)
    net = QwenImageControlNetModel(**_dit_kwargs(spec), extra_condition_channels=4)
    _randomize_zero_inits(net, seed=seed + 1)
    return net.eval()


def write_inpaint_controlnet_folder(path: str | os.PathLike, spec: TinySpec = TinySpec(), seed: int = 9) -> Path:
    """Write the tiny inpainting ControlNet as a diffusers model folder (config.json + safetensors)."""
    path = Path(path)
    if not (path / "config.json").exists():
        build_inpaint_controlnet(spec, seed).save_pretrained(path, safe_serialization=True)
    return path


def write_inpaint_controlnet_file(path: str | os.PathLike, spec: TinySpec = TinySpec(), seed: int = 9) -> Path:
    """Write the tiny inpainting ControlNet as one safetensors file (diffusers key names, no config inside)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in build_inpaint_controlnet(spec, seed).state_dict().items()}, str(path))
    return path


def write_controlnet_folder(path: str | os.PathLike, spec: TinySpec = TinySpec(), seed: int = 7) -> Path:
    """Write the tiny ControlNet as a diffusers model folder (config.json + safetensors)."""
    path = Path(path)
    if not (path / "config.json").exists():
        build_controlnet(spec, seed).save_pretrained(path, safe_serialization=True)
    return path


def write_controlnet_file(path: str | os.PathLike, spec: TinySpec = TinySpec(), seed: int = 7, prefix: str = "",
                          dtype=None) -> Path:
    """Write the tiny ControlNet as one safetensors file with the published (diffusers) key names, as the
    InstantX union file is distributed (and as ComfyUI's ``controlnet/`` folder holds it); no config inside."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {f"{prefix}{k}": (v if dtype is None else v.to(dtype)).contiguous()
             for k, v in build_controlnet(spec, seed).state_dict().items()}
    save_file(state, str(path))
    return path


def _randomize_zero_inits(module, seed: int) -> None:
    """Diffusers zero-initialises some output projections (e.g. AdaLN, proj_out); a model whose outputs are all
    zero would make parity tests vacuous, so give every parameter small random values."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if torch.count_nonzero(p) == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def write_diffusers_folder(path: str | os.PathLike, spec: TinySpec = TinySpec()) -> Path:
    """Write the tiny model as a diffusers folder (safetensors only), atomically: built in a temp dir, then renamed."""
    path = Path(path)
    if (path / "model_index.json").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    from transformers.utils import logging as hf_logging

    comps = build_components(spec)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=path.parent))
    hf_logging.disable_progress_bar()  # "Writing model shards" bars would clutter the CLI's first run
    try:
        for name in ("transformer", "vae", "text_encoder"):
            comps[name].save_pretrained(tmp / name, safe_serialization=True)
    finally:
        hf_logging.enable_progress_bar()
    comps["tokenizer"].save_pretrained(tmp / "tokenizer")
    comps["scheduler"].save_pretrained(tmp / "scheduler")
    index = {
        "_class_name": "QwenImagePipeline",
        "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
        "tokenizer": ["transformers", "Qwen2Tokenizer"],
        "transformer": ["diffusers", "QwenImageTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKLQwenImage"],
    }
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
    (tmp / "qwenstudio_tiny.json").write_text(json.dumps(asdict(spec), indent=2))
    try:
        os.replace(tmp, path)
    except OSError:  # another process won the race; keep theirs
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return path
