"""Latent plumbing: seeded noise, 2x2 patch packing, VAE decode, and a cheap RGB preview.

Shapes: the VAE latent of an HxW image is [B, 16, 1, H/8, W/8] (one frame of a video VAE); the DiT sees it
packed into [B, (H/16)*(W/16), 64] — 2x2 patches, channel-major inside a patch, as the reference pipeline does.
"""

from __future__ import annotations

from ..errors import InvalidRequest

LATENT_CHANNELS = 16
VAE_SCALE = 8

# ComfyUI's latent->RGB factors for the Wan 2.1 VAE family (comfy/latent_formats.py, class Wan21), applied to the
# normalised latents the DiT works in: a preview costs one tiny matmul instead of a VAE decode.
_PREVIEW_FACTORS = [
    [-0.1299, -0.1692, 0.2932], [0.0671, 0.0406, 0.0442], [0.3568, 0.2548, 0.1747], [0.0372, 0.2344, 0.1420],
    [0.0313, 0.0189, -0.0328], [0.0296, -0.0956, -0.0665], [-0.3477, -0.4059, -0.2925], [0.0166, 0.1902, 0.1975],
    [-0.0412, 0.0267, -0.1364], [-0.1293, 0.0740, 0.1636], [0.0680, 0.3019, 0.1128], [0.0032, 0.0581, 0.0639],
    [-0.1251, 0.0927, 0.1699], [0.0060, -0.0633, 0.0005], [0.3477, 0.2275, 0.2950], [0.1984, 0.0913, 0.1861],
]
_PREVIEW_BIAS = [-0.1835, -0.0868, -0.3360]


def latent_hw(width: int, height: int) -> tuple[int, int]:
    return height // VAE_SCALE, width // VAE_SCALE


def make_noise(*, seeds: list[int], convention: str, width: int, height: int, skip: int = 0):
    """CPU float32 noise of shape [B, 16, H/8, W/8], so a seed means the same image on any device.

    ``diffusers``: image i draws from its own generator seeded with seeds[i] (image i of a batch equals a single
    run with that seed; the reference pipeline with a list of generators). ``comfy``: one generator seeded once
    draws the whole batch, as ComfyUI's ``prepare_noise`` (torch.manual_seed + randn of the latent shape); ``skip``
    drops the first ``skip`` latent images of that stream, which re-creates image i of a batch on its own.
    """
    import torch

    lh, lw = latent_hw(width, height)
    if convention == "diffusers":
        return torch.cat(
            [torch.randn((1, LATENT_CHANNELS, lh, lw), generator=torch.Generator().manual_seed(s)) for s in seeds]
        )
    if convention == "comfy":
        g = torch.Generator().manual_seed(seeds[0])
        return torch.randn((skip + len(seeds), LATENT_CHANNELS, lh, lw), generator=g)[skip:]
    raise InvalidRequest(f"unknown noise convention '{convention}'")


def pack(latents):
    """[B, C, H, W] -> [B, (H/2)(W/2), 4C] (2x2 patches)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(packed, lh: int, lw: int):
    """[B, (H/2)(W/2), 4C] -> [B, C, H, W]."""
    b, _, c4 = packed.shape
    x = packed.view(b, lh // 2, lw // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, lh, lw)


def decode(vae, latents):
    """Normalised DiT latents [B, 16, h, w] -> float images in [0, 1], [B, 3, H, W] (on the VAE's device)."""
    import torch

    cfg = vae.config
    mean = torch.tensor(cfg.latents_mean, device=latents.device).view(1, cfg.z_dim, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(cfg.latents_std, device=latents.device).view(1, cfg.z_dim, 1, 1, 1)
    x = latents.unsqueeze(2).to(vae.dtype)
    x = x / inv_std.to(x.dtype) + mean.to(x.dtype)
    image = vae.decode(x, return_dict=False)[0][:, :, 0]
    return (image.float() / 2 + 0.5).clamp(0, 1)


def to_pil(images) -> list:
    """[B, 3, H, W] floats in [0, 1] -> PIL images, rounded as diffusers' ``numpy_to_pil`` does."""
    from PIL import Image

    arr = (images.permute(0, 2, 3, 1).cpu().float().numpy() * 255).round().astype("uint8")
    return [Image.fromarray(a) for a in arr]


def preview_rgb(latents):
    """Normalised latents [B, 16, h, w] -> uint8 RGB array [B, h, w, 3] via a linear map (no VAE)."""
    import torch

    f = torch.tensor(_PREVIEW_FACTORS, device=latents.device, dtype=torch.float32)
    bias = torch.tensor(_PREVIEW_BIAS, device=latents.device, dtype=torch.float32)
    rgb = torch.einsum("bchw,cr->bhwr", latents.float(), f) + bias
    return ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()


def decode_checked(vae, latents, should_stop):
    """``decode`` that stops (raises Cancelled) at the next decoder layer once ``should_stop()`` is true; the
    output is bit-identical to ``decode`` (tiled or not: the checks are forward pre-hooks that compute nothing)."""
    from .stopping import check, stop_checks

    check(should_stop, "vae_decode")
    with stop_checks(should_stop, {"vae_decode": vae.decoder}):
        return decode(vae, latents)


def encode_checked(vae, pixels, should_stop):
    """``vae.encode(pixels)`` with the same per-layer stop checks (edit inputs, img2img, masks, controls)."""
    from .stopping import check, stop_checks

    check(should_stop, "vae_encode")
    with stop_checks(should_stop, {"vae_encode": vae.encoder}):
        return vae.encode(pixels)
