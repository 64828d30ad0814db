"""TSV-M, Task Singular Vectors: Merge (Gargiulo et al., 2025); docs/algorithms.md, "TSV-M".

Per matrix layer, with the tagged basis (U⊥, W⊥, σ) of `pipeline.subspace.tagged_basis`:
Δ_ℓ = U⊥ diag(σ) W⊥ᵀ, i.e. the subspace coordinates Σ_t δ̃_t = σ; θ = θ0 + α Δ.
Vector tensors (and layers too small for the basis): Δ = (1/T) Σ_t δ_t.
In the paper's unified view (Proposition 2) this is the subspace Fréchet sum with H̃_t = I.
"""

from __future__ import annotations

import torch

from pipeline.subspace import TaggedBasis, lift_memo


def merge_layer(
    basis: TaggedBasis, *, alpha: float, memo: dict | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """→ (merged delta α·lift(σ) [d_out, d_in], merged coordinates α σ [p]).

    memo: a dict kept for the layer across an α sweep (the lift of σ is computed once)."""
    lifted, scale, coords = merge_parts(basis, alpha=alpha, memo=memo)
    return lifted * scale, coords


def merge_parts(
    basis: TaggedBasis, *, alpha: float, memo: dict | None = None
) -> tuple[torch.Tensor, float, torch.Tensor]:
    """`merge_layer` as (lift(σ), α, α σ): the merged delta is α · lift(σ), left to the caller."""
    return lift_memo(basis, basis.sigma, memo), alpha, alpha * basis.sigma


def vector_mean(deltas: torch.Tensor, memo: dict | None = None) -> torch.Tensor:
    """deltas: [T, *shape] → mean_t δ_t, the unscaled merge of a vector tensor (with `memo`, a
    dict kept for the tensor across an α sweep, the mean is taken once)."""
    if memo is None:
        return deltas.mean(dim=0)
    if "mean" not in memo:
        memo["mean"] = deltas.mean(dim=0)
    return memo["mean"]
