"""Fisher-weighted averaging (Matena & Raffel, 2022).

θ = Σ_t F̂_t ∘ θ_t / Σ_t F̂_t per coordinate, with F̂_t = F_t / ‖F_t‖ (optional, off by
default; the norm is over all merged tensors of task t) plus a floor ε, and F_t the
empirical Fisher diagonal of task t at θ_t (the same artifact EpiMer uses). No α.
Computed as θ0 + Σ_t F̂_t ∘ δ_t / Σ_t F̂_t, the same value with less cancellation.
"""

from __future__ import annotations

import torch


def merge_layer(
    deltas: torch.Tensor, fishers: torch.Tensor, *, eps: float, norms: torch.Tensor | None = None
) -> torch.Tensor:
    """deltas, fishers: [T, *shape]; norms: [T] or None → merged delta [*shape]."""
    weights = fishers.to(deltas.dtype)
    if norms is not None:
        shape = (-1,) + (1,) * (deltas.ndim - 1)
        weights = weights / norms.to(deltas.dtype).view(shape)
    weights = weights + eps
    return (weights * deltas).sum(dim=0) / weights.sum(dim=0)
