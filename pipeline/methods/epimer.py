"""EpiMer: the curvature-aware subspace Fréchet mean (paper eqs. 8–14, docs/algorithms.md).

Per matrix layer, with the tagged basis S (atoms u_i w_iᵀ), projected Hessians
H̃_t = Sᵀ diag(F_t) S + εI, H̄ = Σ_t λ_t H̃_t and b = Σ_t λ_t H̃_t δ̃_t:

    frechet_sum  (eq. 14, the default):  δ̃_m = α T H̄⁻¹ b
    frechet_mean (eq. 13):               δ̃_m = α H̄⁻¹ b

lifted as Δ_ℓ = U⊥ diag(δ̃_m) W⊥ᵀ (computed as scale · U⊥ diag(H̄⁻¹b) W⊥ᵀ, so that an α sweep
lifts once), θ = θ0 + Δ (α already inside). With identical F_t the
sum aggregator reduces to TSV-M: H̄⁻¹ b = δ̄, so δ̃_m = α Σ_t δ̃_t. Vector tensors follow TSV-M.
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline.curvature import solve_spd, task_weights
from pipeline.subspace import TaggedBasis, lift_memo

AGGREGATORS = ("frechet_sum", "frechet_mean")


def merge_layer(
    basis: TaggedBasis,
    H: torch.Tensor,
    Hx: torch.Tensor,
    *,
    weights: torch.Tensor | None = None,
    **settings: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """H: H̄ [p, p]; Hx: rows H̃_t δ̃_t [T, p] → (merged delta [d_out, d_in], δ̃_m [p] float64).

    weights: λ_t (default 1/T), for b = Σ_t λ_t H̃_t δ̃_t; settings: alpha (required),
    aggregator, memo, as for `merge_parts`."""
    lam = task_weights(Hx.shape[0], weights)
    lifted, scale, coords = merge_parts(basis, H, lam @ Hx.to(torch.float64), **settings)
    return lifted * scale, coords


def merge_parts(
    basis: TaggedBasis,
    H: torch.Tensor,
    b: torch.Tensor,
    *,
    alpha: float,
    aggregator: str = "frechet_sum",
    memo: dict | None = None,
) -> tuple[torch.Tensor, float, torch.Tensor]:
    """EpiMer of one layer as (lift(H̄⁻¹b), scale, δ̃_m), b = Σ_t λ_t H̃_t δ̃_t [p]: the merged
    delta is scale · lift(H̄⁻¹b), left to the caller (the merge driver adds θ0 + scale · lift
    in one fused step); memo is a dict kept for the layer across an α sweep (the lift of
    H̄⁻¹b is computed once)."""
    if aggregator == "frechet_sum":
        scale = alpha * basis.num_tasks
    elif aggregator == "frechet_mean":
        scale = alpha
    else:
        raise ValueError(
            f"unknown EpiMer aggregator `{aggregator}` (expected one of {', '.join(AGGREGATORS)})"
        )
    solution = solve_spd(H, b.to(torch.float64))
    return lift_memo(basis, solution, memo), scale, scale * solution
