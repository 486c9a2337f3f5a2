"""Prompt encoding for the edit variants: the text encoder also *sees* the input images (the VL path).

Exactly what the reference edit pipelines get from ``Qwen2_5_VLProcessor`` + the text encoder, without needing
torchvision: images go through transformers' ``Qwen2VLImageProcessorPil`` (smart resize to multiples of
patch x merge, CLIP normalisation, 14x14x2 patches), each ``<|image_pad|>`` of the prompt is expanded to the number
of merged patches of its image, and the Qwen2.5-VL *decoder* (``text_encoder.model``, no LM head) runs with the
pixel values; the template's first ``drop_tokens`` hidden states are dropped. Edit-2509/2511 prefix the prompt with
"Picture N: <vision tokens>" per image; Qwen-Image-Edit with one unnumbered image.
"""

from __future__ import annotations

from ..errors import InvalidRequest
from .text import PromptEmbedding, PromptEncoder

IMAGE_PAD = "<|image_pad|>"


def build_image_processor(text_encoder, folder=None):
    """``Qwen2VLImageProcessorPil`` configured like the model: patch/merge/temporal sizes from the vision tower's
    config, pixel bounds from ``processor/preprocessor_config.json`` when the model folder has one, else the
    Qwen2.5-VL release values (min 3136, max 12845056 pixels)."""
    import json
    from pathlib import Path

    from transformers import Qwen2VLImageProcessorPil

    vc = text_encoder.config.vision_config
    kw = {"patch_size": vc.patch_size, "merge_size": vc.spatial_merge_size,
          "temporal_patch_size": vc.temporal_patch_size,
          "size": {"shortest_edge": 56 * 56, "longest_edge": 12845056}}
    if folder is not None:
        cfg_path = Path(folder) / "processor" / "preprocessor_config.json"
        if cfg_path.is_file():
            cfg = json.loads(cfg_path.read_text())
            lo, hi = cfg.get("min_pixels"), cfg.get("max_pixels")
            if isinstance(cfg.get("size"), dict):
                lo = cfg["size"].get("shortest_edge", lo)
                hi = cfg["size"].get("longest_edge", hi)
            kw["size"] = {"shortest_edge": int(lo or 3136), "longest_edge": int(hi or 12845056)}
            for k in ("image_mean", "image_std"):
                if k in cfg:
                    kw[k] = cfg[k]
    return Qwen2VLImageProcessorPil(**kw)


class VisionPromptEncoder(PromptEncoder):
    """Encodes (prompt, images) pairs through the VL path; the LRU is keyed by the prompt and the images' content
    hashes. Shares the text encoder, tokenizer (and its lock) with the engine's PromptEncoder."""

    def __init__(self, tokenizer, text_encoder, image_processor, *, template: str, image_template: str,
                 drop_tokens: int, max_tokens: int, cache_size: int = 16, tokenizer_lock=None):
        super().__init__(tokenizer, text_encoder, template=template, drop_tokens=drop_tokens, max_tokens=max_tokens,
                         cache_size=cache_size, tokenizer_lock=tokenizer_lock)
        self.image_processor = image_processor
        self.image_template = image_template

    def text(self, prompt: str, n_images: int) -> str:
        """The templated prompt before image-token expansion."""
        if "{}" in self.image_template:
            prefix = "".join(self.image_template.format(i + 1) for i in range(n_images))
        else:
            prefix = self.image_template * n_images
        return self.template.format(prefix + prompt)

    def check(self, prompt: str) -> None:
        """The user's prompt alone against the limit (image tokens depend on the images' sizes)."""
        self.refuse_if_too_long(len(self.tokenize(prompt).input_ids))

    def encode(self, prompt: str, images: list, keys: tuple) -> PromptEmbedding:
        """``images``: PIL RGB images already resized by the variant's rules; ``keys``: a hashable identity of
        them (content hash + size) for the cache."""
        return self.cached((prompt, keys), lambda: self._encode(prompt, images))

    def _encode(self, prompt: str, images: list) -> PromptEmbedding:
        import torch

        self.check(prompt)
        te = self.text_encoder
        device = te.device
        vis = self.image_processor(images=list(images), return_tensors="pt")
        grid = vis["image_grid_thw"]
        merge = self.image_processor.merge_size ** 2
        text = self.text(prompt, len(images))
        parts = text.split(IMAGE_PAD)
        if len(parts) - 1 != len(images):
            raise InvalidRequest(f"the template has {len(parts) - 1} image slots for {len(images)} images")
        expanded = parts[0]
        for i, part in enumerate(parts[1:]):
            expanded += IMAGE_PAD * int(grid[i].prod().item() // merge) + part
        tokens = self.tokenize([expanded], return_tensors="pt")
        with torch.inference_mode():
            out = te.model(
                input_ids=tokens.input_ids.to(device),
                attention_mask=tokens.attention_mask.to(device),
                pixel_values=vis["pixel_values"].to(device=device, dtype=te.dtype),
                image_grid_thw=grid.to(device),
            )
        hidden = out.last_hidden_state[:, self.drop_tokens:]
        return PromptEmbedding(embeds=hidden, tokens=hidden.shape[1])

