"""Real-valued RoPE for compiled blocks: the same rotation as diffusers' complex form, in cos/sin arithmetic.

Why: diffusers' Qwen-Image attention rotates Q/K by multiplying complex tensors (``view_as_complex``), and inductor
cannot generate code for complex dtypes — each compiled block then calls out to eager kernels four times and
cannot fuse the rotation with the QK norm around it. Rotating the pair ``(a, b)`` by ``(c, s)`` as
``(a c - b s, a s + b c)`` is the complex product written out, so the result equals the complex form up to float
rounding (tested ≤ 1e-6 in fp32). Used only where the blocks are compiled (``acceleration.apply_acceleration``): the
eager path keeps diffusers' processor untouched, so parity with stock diffusers stays bit-for-bit there.

Two pieces: a forward hook on ``transformer.pos_embed`` turns its complex frequency tables into ``RealRope``
(cos, sin, each ``[S, 1, D]``, computed once per forward, outside the blocks), and ``RealRopeAttnProcessor`` — the
joint text+image attention of ``QwenDoubleStreamAttnProcessor2_0`` — applies it. A complex table (a model whose
pos_embed was swapped afterwards) still goes through diffusers' own processor.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import NamedTuple

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_qwenimage import QwenDoubleStreamAttnProcessor2_0


class RealRope(NamedTuple):
    cos: torch.Tensor  # [S, 1, D]: each frequency repeated for its (real, imaginary) pair
    sin: torch.Tensor


def real_rope(freqs: torch.Tensor) -> RealRope:
    """Complex ``[S, D/2]`` frequencies -> ``RealRope``; anything else passes through unchanged."""
    if not torch.is_tensor(freqs) or not freqs.is_complex():
        return freqs
    cos = torch.view_as_real(freqs)[..., 0].repeat_interleave(2, dim=-1)
    sin = torch.view_as_real(freqs)[..., 1].repeat_interleave(2, dim=-1)
    return RealRope(cos.unsqueeze(1).contiguous(), sin.unsqueeze(1).contiguous())


def rotate(x: torch.Tensor, rope: RealRope) -> torch.Tensor:
    """``x`` [B, S, H, D] rotated pairwise, in fp32 like diffusers' complex form, back in ``x``'s dtype."""
    xf = x.float()
    a, b = xf.unflatten(-1, (-1, 2)).unbind(-1)
    turned = torch.stack([-b, a], dim=-1).flatten(-2)
    return (xf * rope.cos + turned * rope.sin).to(x.dtype)


class RealRopeAttnProcessor(QwenDoubleStreamAttnProcessor2_0):
    """Qwen-Image's joint attention with ``RealRope`` (see the module docstring); the attention backend chosen
    through diffusers' dispatcher (``set_attention_backend``) is honoured as in the parent."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                 attention_mask=None, image_rotary_emb=None):
        if image_rotary_emb is None or not isinstance(image_rotary_emb[0], RealRope) or attention_mask is not None:
            return super().__call__(attn, hidden_states, encoder_hidden_states, encoder_hidden_states_mask,
                                    attention_mask, image_rotary_emb)
        if encoder_hidden_states_mask is not None:
            image_mask = hidden_states.new_ones(hidden_states.shape[:2], dtype=torch.bool)
            attention_mask = torch.cat([encoder_hidden_states_mask, image_mask], dim=1)[:, None, None, :]
        head_dim = attn.inner_dim // attn.heads
        seq_txt = encoder_hidden_states.shape[1]

        def heads(t):
            return t.unflatten(-1, (-1, head_dim))

        img_q, img_k, img_v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(
            attn.to_v(hidden_states))
        txt_q, txt_k, txt_v = (heads(attn.add_q_proj(encoder_hidden_states)),
                               heads(attn.add_k_proj(encoder_hidden_states)),
                               heads(attn.add_v_proj(encoder_hidden_states)))
        if attn.norm_q is not None:
            img_q = attn.norm_q(img_q)
        if attn.norm_k is not None:
            img_k = attn.norm_k(img_k)
        if attn.norm_added_q is not None:
            txt_q = attn.norm_added_q(txt_q)
        if attn.norm_added_k is not None:
            txt_k = attn.norm_added_k(txt_k)
        img_rope, txt_rope = image_rotary_emb
        img_q, img_k = rotate(img_q, img_rope), rotate(img_k, img_rope)
        txt_q, txt_k = rotate(txt_q, txt_rope), rotate(txt_k, txt_rope)

        joint = dispatch_attention_fn(
            torch.cat([txt_q, img_q], dim=1), torch.cat([txt_k, img_k], dim=1), torch.cat([txt_v, img_v], dim=1),
            attn_mask=attention_mask, dropout_p=0.0, is_causal=False, backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )
        joint = joint.flatten(2, 3).to(img_q.dtype)
        img_out = attn.to_out[0](joint[:, seq_txt:, :].contiguous())
        if len(attn.to_out) > 1:
            img_out = attn.to_out[1](img_out)
        return img_out, attn.to_add_out(joint[:, :seq_txt, :].contiguous())


class _ToReal:
    """The pos_embed hook; ``enabled`` False (``stock_rope``) passes diffusers' complex tables through."""

    def __init__(self) -> None:
        self.enabled = True

    def __call__(self, module, args, output):
        if not self.enabled or not isinstance(output, tuple):
            return output
        return tuple(real_rope(f) for f in output)


@contextmanager
def stock_rope(transformer):
    """Run ``transformer`` with diffusers' complex RoPE for a while (the bench's stock runs)."""
    hook = getattr(transformer, "qwenstudio_real_rope", None)
    if hook is None:
        yield
        return
    hook.enabled = False
    try:
        yield
    finally:
        hook.enabled = True


def use_real_rope(transformer) -> int:
    """Switch ``transformer`` to real-valued RoPE in place (idempotent); returns the number of attention layers.
    Call before ``set_attention_backend`` (which sets the backend on the processors present then)."""
    if getattr(transformer, "qwenstudio_real_rope", None) is None:
        hook = _ToReal()
        transformer.pos_embed.register_forward_hook(hook)
        transformer.qwenstudio_real_rope = hook
    n = 0
    for block in transformer.transformer_blocks:
        if not isinstance(block.attn.processor, RealRopeAttnProcessor):
            block.attn.set_processor(RealRopeAttnProcessor())
        n += 1
    return n
