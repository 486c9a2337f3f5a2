"""Encode every caption and image once, before training, so the text encoder (7B) and the VAE can leave memory.

Text: the engine's own ``PromptEncoder`` (same template, same dropped prefix, same token limit as generation), so
the LoRA is trained on exactly the embeddings it will see at inference. Images: the VAE posterior *mean*,
normalised with the VAE's latents_mean/std as the DiT sees latents (musubi-tuner caches the same way; sampling the
posterior every step adds noise a LoRA does not need). Cached tensors are plain (not inference-mode) CPU tensors,
so autograd may use them.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass

from .dataset import Item, load_pixels


@dataclass
class Cached:
    latents: object  # [16, h, w] float32, normalised
    embeds: object  # [L, D] in the model dtype


def encode_latents(vae, pixels):
    """[1, 3, H, W] in [-1, 1] -> normalised latents [16, H/8, W/8] (float32, CPU)."""
    import torch

    cfg = vae.config
    with torch.inference_mode():
        dist = vae.encode(pixels.unsqueeze(2).to(device=vae.device, dtype=vae.dtype)).latent_dist
        lat = dist.mean.float()
        mean = torch.tensor(cfg.latents_mean, device=lat.device).view(1, cfg.z_dim, 1, 1, 1)
        std = torch.tensor(cfg.latents_std, device=lat.device).view(1, cfg.z_dim, 1, 1, 1)
        lat = ((lat - mean) / std)[0, :, 0]
    return lat.cpu().clone()


def cache_dataset(engine, items: list[Item], device, on_item=None) -> list[Cached]:
    """Latents and caption embeddings for every item, with each encoder visiting ``device`` once."""
    c = engine.components
    out_lat, out_emb = [], []
    c.vae.to(device)
    for i, item in enumerate(items):
        out_lat.append(encode_latents(c.vae, load_pixels(item)))
        if on_item:
            on_item("latents", i + 1, len(items))
    c.vae.to("cpu")
    c.text_encoder.to(device)
    for i, item in enumerate(items):
        engine.prompts.check(item.caption)
        out_emb.append(engine.prompts.encode(item.caption).embeds[0].detach().cpu().clone())
        if on_item:
            on_item("captions", i + 1, len(items))
    engine.prompts.clear()
    return [Cached(lat, emb) for lat, emb in zip(out_lat, out_emb)]


def free_text_encoder(engine) -> None:
    """Drop the text encoder (prompt embeddings stay in the engine's prompt cache) and give its memory back."""
    import torch

    engine.components.text_encoder = None
    engine.prompts.text_encoder = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
