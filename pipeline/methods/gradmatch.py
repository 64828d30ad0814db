"""Uncertainty-based gradient matching (Daheim et al., 2024, ICLR, arXiv 2310.12808) with the
diagonal Fisher artifacts; docs/algorithms.md, "Gradient matching".

The paper's merge (as also in the authors' `uncertainty_based_gradient_matching.py`):

    θ = θ0 + Σ_t α_t H̄⁻¹ (H_0 + H_t) δ_t,    H̄ = H_0 + Σ_t α_t H_t,

with H_t the curvature of task t's loss at θ_t (here its Fisher diagonal F_t, so every product
is per coordinate), H_0 the prior precision (the curvature the pretrained model brings; here
H_0 = h·I with h the `gradmatch_prior` setting, in the units of the Fisher artifacts, an
average of squared gradients as in the authors' script, which divides its sum of squared
gradients by the number of batches) and α_t the task weights. This project takes α_t = 1 for
every task and applies its global α on the result:

    θ = θ0 + α (H_0 + Σ_t F_t)⁻¹ Σ_t (H_0 + F_t) δ_t.

Reductions (tests/methods/test_gradmatch.py): h = 0 is Fisher averaging of the task vectors
(Σ_t F_t δ_t / Σ_t F_t, the EpiMer paper's Case 3 with diagonal curvature); identical F_t and
h = 0 is the task mean (1/T) Σ_t δ_t; h → ∞ is Task Arithmetic's sum Σ_t δ_t. The floor ε of
Fisher averaging (`eps`) is added to every F_t here too, so coordinates where every Fisher
entry is zero stay defined; at h = 0 the merge is then Fisher averaging's exactly (α = 1).
"""

from __future__ import annotations

import math

import torch

from pipeline.methods import fisher

#: Coordinates per step of the h > 0 pass: a step's [T, STEP] temporaries stay small.
STEP = 1 << 16


def check_prior(prior: float) -> None:
    """Reject a prior precision that is negative or not finite."""
    if not (math.isfinite(prior) and prior >= 0):
        raise ValueError(
            f"the gradient-matching prior precision must be finite and >= 0, got {prior}"
        )


def merge_layer(
    deltas: torch.Tensor,
    fishers: torch.Tensor,
    *,
    prior: float,
    eps: float,
    memo: dict | None = None,
) -> torch.Tensor:
    """deltas, fishers: [T, *shape] → the unscaled merge (H_0 + Σ_t F_t)⁻¹ Σ_t (H_0 + F_t) δ_t.

    F_t is taken as F_t + ε; H_0 = prior · I. memo: a dict kept for the tensor across an α
    sweep (the merge is computed once)."""
    if memo is not None and "gradmatch" in memo:
        return memo["gradmatch"]
    check_prior(prior)
    if prior == 0:
        out = fisher.merge_layer(deltas, fishers, eps=eps)  # Σ (F_t + ε) δ_t / Σ (F_t + ε)
    else:
        out = _with_prior(deltas, fishers, prior, eps)
    if memo is not None:
        memo["gradmatch"] = out
    return out


def _with_prior(
    deltas: torch.Tensor, fishers: torch.Tensor, prior: float, eps: float
) -> torch.Tensor:
    """(h + Σ_t w_t)⁻¹ (Σ_t w_t δ_t + h Σ_t δ_t), w_t = F_t + ε, in steps of `STEP` coordinates."""
    T = deltas.shape[0]
    flat_d, flat_f = deltas.reshape(T, -1), fishers.reshape(T, -1).to(deltas.dtype)
    out = torch.empty(flat_d.shape[1], dtype=deltas.dtype, device=deltas.device)
    for start in range(0, flat_d.shape[1], STEP):
        d, w = flat_d[:, start : start + STEP], flat_f[:, start : start + STEP] + eps  # (T, n)
        numerator = (w * d).sum(dim=0) + prior * d.sum(dim=0)
        out[start : start + STEP] = numerator / (w.sum(dim=0) + prior)
    return out.view(deltas.shape[1:])
