"""TIES-Merging (Yadav et al., 2023): trim, elect sign, disjoint merge.

1. Trim: keep the top `density` % of each task vector by magnitude, over the flattened
   concatenation of all merged tensors of that task (one global threshold per task).
2. Elect: per coordinate, the sign of the sum of the kept values ("mass"); where that sum
   is exactly zero, the majority sign of the kept non-zeros.
3. Disjoint merge: the mean of the kept values that agree with the elected sign (divided by
   the number of agreeing non-zeros, at least 1); `disjoint="sum"` omits the division.
θ = θ0 + α Δ.
"""

from __future__ import annotations

import torch


def magnitude_threshold(magnitudes: torch.Tensor, density: float) -> float:
    """Smallest magnitude kept when keeping the ⌊density·N/100⌋ largest of `magnitudes` [N].

    density is a percentage in (0, 100]. Values equal to the threshold are kept too.
    """
    n = magnitudes.numel()
    n_keep = int(n * density / 100.0)
    if n_keep >= n:
        return 0.0
    if n_keep == 0:
        return float("inf")
    # The n_keep-th largest is the (n - n_keep + 1)-th smallest (kthvalue is 1-indexed).
    return float(torch.kthvalue(magnitudes.flatten().float(), n - n_keep + 1).values)


def merge_layer(
    deltas: torch.Tensor, thresholds: torch.Tensor, *, alpha: float, disjoint: str = "mean"
) -> torch.Tensor:
    """deltas: [T, *shape]; thresholds: [T] per-task magnitude thresholds → α Δ [*shape]."""
    shape = (-1,) + (1,) * (deltas.ndim - 1)
    kept = torch.where(deltas.abs() >= thresholds.to(deltas.dtype).view(shape), deltas, 0.0)
    mass = kept.sum(dim=0)
    majority = (kept > 0).sum(dim=0) - (kept < 0).sum(dim=0)
    elected = torch.where(mass != 0, torch.sign(mass), torch.sign(majority).to(mass.dtype))
    agree = (torch.sign(kept) == elected) & (kept != 0)
    total = (kept * agree).sum(dim=0)
    if disjoint == "sum":
        return alpha * total
    if disjoint != "mean":
        raise ValueError(f"unknown TIES disjoint merge `{disjoint}` (expected `mean` or `sum`)")
    return alpha * total / agree.sum(dim=0).clamp_min(1).to(total.dtype)
