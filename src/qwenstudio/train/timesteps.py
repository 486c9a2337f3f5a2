"""Flow-matching noise levels and targets, as musubi-tuner trains Qwen-Image.

Followed: kohya-ss/musubi-tuner@30c658c4f4b0bf05038b3346eff9670259b10fc7,
``src/musubi_tuner/training/trainer_base.py`` (``get_noisy_model_input_and_timesteps``) and
``src/musubi_tuner/qwen_image_train_network.py`` (``target = noise - latents``):

- ``shift`` (musubi's documented default for Qwen-Image, ``--discrete_flow_shift 2.2``): ``t = sigmoid(sigmoid_scale
  * n)``, n ~ N(0, 1) (logit-normal), then ``t = shift * t / (1 + (shift - 1) * t)``.
- ``qwen_shift``: the same with the shift the inference scheduler uses at this resolution,
  ``exp(mu)``, ``mu`` linear in the image token count from (256, 0.5) to (8192, 0.9).
- ``uniform``: t ~ U(0, 1).

Noisy input ``x_t = (1 - t) * x0 + t * noise``, target velocity ``noise - x0``, plain MSE (``--weighting_scheme
none``). One deliberate difference: the DiT gets ``timestep = t`` (what our sampler passes at inference), where
musubi passes ``(t * 1000 + 1) / 1000``, a 0.001 offset. DiffSynth-Studio (modelscope/DiffSynth-Studio@fed7b18,
``diffsynth/diffusion/loss.py`` ``FlowMatchSFTLoss``) instead draws t uniformly from the 1000-step inference
schedule and weights the loss by a Gaussian in t; same target.
"""

from __future__ import annotations

import math


def qwen_mu(image_seq_len: int) -> float:
    """The reference scheduler's dynamic-shift exponent at this many image tokens (base 256 -> 0.5, 8192 -> 0.9)."""
    m = (0.9 - 0.5) / (8192 - 256)
    return image_seq_len * m + (0.5 - m * 256)


def sample_t(batch: int, *, method: str, shift: float, sigmoid_scale: float, image_seq_len: int, generator):
    """[batch] noise levels in (0, 1), float32 on the CPU, drawn from ``generator``."""
    import torch

    if method == "uniform":
        return torch.rand(batch, generator=generator)
    if method == "qwen_shift":
        shift = math.exp(qwen_mu(image_seq_len))
    t = torch.sigmoid(torch.randn(batch, generator=generator) * sigmoid_scale)
    return (t * shift) / (1 + (shift - 1) * t)


def noisy_input(x0, noise, t):
    """x_t = (1 - t) x0 + t noise, with t broadcast over [B, C, H, W]."""
    t = t.view(-1, *([1] * (x0.ndim - 1)))
    return (1 - t) * x0 + t * noise


def velocity_target(x0, noise):
    return noise - x0
