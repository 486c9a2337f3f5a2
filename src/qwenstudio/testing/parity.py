"""The parity check every reference comparison uses: our latents against a reference pipeline's packed latents."""

from __future__ import annotations

PARITY_TOL = 1e-4  # fp32 CPU target for max |latent diff| (DESIGN.md)


def check_latent_parity(name: str, ours, ref_packed, width: int, height: int, tol: float = PARITY_TOL) -> float:
    """Unpack the reference's [B, L, 64] latents, assert same shape, max |diff| <= tol and a non-trivial reference;
    print and return the difference (the numbers the issue notes report)."""
    from ..engine import latents as L

    ref = L.unpack(ref_packed, height // 8, width // 8)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    diff = (ours.float() - ref.float()).abs().max().item()
    print(f"parity {name}: max |latent diff| = {diff:.3e}")
    assert diff <= tol
    assert ref.abs().max() > 0.1
    return diff
