"""Prompt encoding for the edit variants: the text encoder also *sees* the input images (the VL path).

Exactly what the reference edit pipelines get from ``Qwen2_5_VLProcessor`` + the text encoder, without needing
torchvision: images go through transformers' ``Qwen2VLImageProcessorPil`` (smart resize to multiples of
patch x merge, CLIP normalisation, 14x14x2 patches), each ``<|image_pad|>`` of the prompt is expanded to the number
of merged patches of its image, and the Qwen2.5-VL *decoder* (``text_encoder.model``, no LM head) runs with the
pixel values; the template's first ``drop_tokens`` hidden states are dropped. Edit-2509/2511 prefix the prompt with
"Picture N: <vision tokens>" per image; Qwen-Image-Edit with one unnumbered image.
"""

from __future__ import annotations

from collections import OrderedDict

from ..errors import InvalidRequest
from .text import PromptEmbedding

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


class VisionPromptEncoder:
    """Encodes (prompt, images) pairs; a small LRU keyed by the prompt and the images' content hashes."""

    def __init__(self, tokenizer, text_encoder, image_processor, *, template: str, image_template: str,
                 drop_tokens: int, max_tokens: int, cache_size: int = 16, tokenizer_lock=None):
        import threading

        self.tokenizer = tokenizer
        # shared with the engine's PromptEncoder: one tokenizer must not be called from two threads at once
        self.tokenizer_lock = tokenizer_lock or threading.Lock()
        self.text_encoder = text_encoder
        self.image_processor = image_processor
        self.template = template
        self.image_template = image_template
        self.drop_tokens = drop_tokens
        self.max_tokens = max_tokens
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple, PromptEmbedding] = OrderedDict()

    def text(self, prompt: str, n_images: int) -> str:
        """The templated prompt before image-token expansion."""
        if "{}" in self.image_template:
            prefix = "".join(self.image_template.format(i + 1) for i in range(n_images))
        else:
            prefix = self.image_template * n_images
        return self.template.format(prefix + prompt)

    def check(self, prompt: str) -> None:
        with self.tokenizer_lock:
            n = len(self.tokenizer(prompt).input_ids)
        if n > self.max_tokens:
            raise InvalidRequest(f"prompt is {n} tokens; the model's limit is {self.max_tokens} — shorten it",
                                 code="prompt_too_long")

    def encode(self, prompt: str, images: list, keys: tuple) -> PromptEmbedding:
        """``images``: PIL RGB images already resized by the variant's rules; ``keys``: a hashable identity of
        them (content hash + size) for the cache."""
        key = (prompt, keys)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        emb = self._encode(prompt, images)
        self._cache[key] = emb
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return emb

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
        with self.tokenizer_lock:
            tokens = self.tokenizer([expanded], return_tensors="pt")
        with torch.inference_mode():
            out = te.model(
                input_ids=tokens.input_ids.to(device),
                attention_mask=tokens.attention_mask.to(device),
                pixel_values=vis["pixel_values"].to(device=device, dtype=te.dtype),
                image_grid_thw=grid.to(device),
            )
        hidden = out.last_hidden_state[:, self.drop_tokens:]
        return PromptEmbedding(embeds=hidden, tokens=hidden.shape[1])

    def clear(self) -> None:
        self._cache.clear()
