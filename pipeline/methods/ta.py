"""Task Arithmetic (Ilharco et al., 2023), and the arithmetic mean (AM) as its α = 1/T case.

θ = θ0 + α Σ_t δ_t, applied to every floating tensor of the encoder alike.
The paper uses λ_t = 1/T = 0.125 for its eight tasks (Table 2, "AM / TA").
"""

from __future__ import annotations

import torch


def merge_layer(deltas: torch.Tensor, *, alpha: float, memo: dict | None = None) -> torch.Tensor:
    """deltas: [T, *shape] task vectors of one tensor → merged delta α Σ_t δ_t [*shape].

    memo: a dict kept for the tensor across an α sweep (the sum is taken once)."""
    return alpha * task_sum(deltas, memo)


def task_sum(deltas: torch.Tensor, memo: dict | None = None) -> torch.Tensor:
    """Σ_t δ_t, the unscaled `merge_layer` (with `memo`, taken once per sweep)."""
    if memo is None:
        return deltas.sum(dim=0)
    if "sum" not in memo:
        memo["sum"] = deltas.sum(dim=0)
    return memo["sum"]
