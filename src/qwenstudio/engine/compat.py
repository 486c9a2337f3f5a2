"""ComfyUI-compatible model behaviour for a diffusers ``QwenImageTransformer2DModel``.

RoPE positions: both tools centre the image grid on 0, but at an odd number of patches they round the other
way.  diffusers (``QwenEmbedRope`` with ``scale_rope``) gives a side of ``n`` patches the positions
``-(n - n//2) .. n//2 - 1`` (3 patches: -2, -1, 0); ComfyUI (``comfy/ldm/qwen_image/model.py``, ``process_img``)
gives ``-(n//2) .. n - 1 - n//2`` (3 patches: -1, 0, 1).  Even sides agree, and so do the text positions (both start
at ``max(h//2, w//2)``).  1328 px = 83 patches is odd, so a ComfyUI/SwarmUI render at the seeds' size can only be
reproduced with ComfyUI's positions.

``comfy_positions(transformer)`` switches a loaded model to ComfyUI's positions for the calls made inside the
``with`` block (weights untouched; the model is back to diffusers' positions afterwards).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from qwenstudio.errors import UnsupportedFormat

ROPE_MODES = ("diffusers", "comfy")


def axis_positions(n: int, mode: str = "diffusers") -> list[int]:
    """The RoPE positions of one image side of ``n`` patches under ``mode`` (see the module docstring)."""
    if mode not in ROPE_MODES:
        raise ValueError(f"unknown rope mode {mode!r}; valid: {', '.join(ROPE_MODES)}")
    first = -(n - n // 2) if mode == "diffusers" else -(n // 2)
    return list(range(first, first + n))


class ComfyRope(nn.Module):
    """Drop-in for diffusers' ``QwenEmbedRope`` (same call, same outputs) with ComfyUI's image positions.

    Reuses the wrapped module's frequency tables (``pos_freqs`` for positions >= 0, ``neg_freqs`` for < 0), so
    the frequencies themselves are diffusers' own; only which rows are taken differs.
    """

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        if not getattr(inner, "scale_rope", False) or not hasattr(inner, "pos_freqs"):
            raise UnsupportedFormat(
                f"ComfyUI positions are defined for QwenEmbedRope(scale_rope=True), not {type(inner).__name__}"
            )
        self.inner = inner

    def _axis(self, table_pos: torch.Tensor, table_neg: torch.Tensor, n: int) -> torch.Tensor:
        k = n // 2  # ComfyUI: k negative positions (-k .. -1), then 0 .. n - k - 1
        return torch.cat([table_neg[table_neg.shape[0] - k:], table_pos[: n - k]], dim=0)

    def _video_freqs(self, frame: int, height: int, width: int, idx: int, device) -> torch.Tensor:
        pos, neg = self.inner.pos_freqs, self.inner.neg_freqs
        if device is not None:
            pos, neg = pos.to(device), neg.to(device)
        splits = [d // 2 for d in self.inner.axes_dim]
        fpos, fneg = pos.split(splits, dim=1), neg.split(splits, dim=1)
        f = fpos[0][idx: idx + frame].view(frame, 1, 1, -1).expand(frame, height, width, -1)
        h = self._axis(fpos[1], fneg[1], height).view(1, height, 1, -1).expand(frame, height, width, -1)
        w = self._axis(fpos[2], fneg[2], width).view(1, 1, width, -1).expand(frame, height, width, -1)
        return torch.cat([f, h, w], dim=-1).reshape(frame * height * width, -1).contiguous()

    def forward(self, video_fhw, device=None, max_txt_seq_len=None):
        if max_txt_seq_len is None:
            raise ValueError("`max_txt_seq_len` must be provided.")
        if isinstance(video_fhw, list):  # a batch shares one layout (as in diffusers)
            video_fhw = video_fhw[0]
        if not isinstance(video_fhw, list):
            video_fhw = [video_fhw]
        freqs, max_index = [], 0
        for idx, (frame, height, width) in enumerate(video_fhw):
            freqs.append(self._video_freqs(frame, height, width, idx, device))
            max_index = max(height // 2, width // 2, max_index)
        pos = self.inner.pos_freqs if device is None else self.inner.pos_freqs.to(device)
        txt = pos[max_index: max_index + int(max_txt_seq_len), ...]
        return torch.cat(freqs, dim=0), txt


@contextmanager
def comfy_positions(transformer: nn.Module, enabled: bool = True) -> Iterator[nn.Module]:
    """Within the block, ``transformer`` (a diffusers ``QwenImageTransformer2DModel``) uses ComfyUI's RoPE
    positions; ``enabled=False`` leaves it as it is, so a caller can switch per request without branching."""
    original = transformer.pos_embed
    if not enabled or isinstance(original, ComfyRope):
        yield transformer
        return
    transformer.pos_embed = ComfyRope(original)
    try:
        yield transformer
    finally:
        transformer.pos_embed = original


__all__ = ["ROPE_MODES", "ComfyRope", "axis_positions", "comfy_positions"]
