"""Iso-C and Iso-CTS, isotropic merging (Marczak et al., 2025, arXiv 2502.04959);
docs/algorithms.md, "Iso-C and Iso-CTS". Definitions as in the paper and its authors' code
(danielm1405/iso-merging, `src/utils/iso.py`); the code here is this project's own.

Per matrix layer (2-D floating tensor), with Δ = Σ_t δ_t the task-vector sum [d_out, d_in] and
m = min(d_out, d_in):

- Iso-C: Δ = U Σ Vᵀ (thin SVD); the merged update is σ̄ U Vᵀ with
  σ̄ = (1/m) Σ_i σ_i, the mean singular value: the sum's directions with a flat spectrum.
- Iso-CTS: the common subspace is the sum's top c left and right
  singular vectors, c from the common-space fraction f (the authors' default 0.8); each task t
  adds its own top s = (m − c) / T directions of δ_t − U_c U_cᵀ δ_t (its part outside the
  common subspace); the m columns of U = [U_1 … U_T U_c] and the m rows of Vᵀ are replaced by
  their nearest orthonormal sets (the polar factors of their SVDs), and the singular values
  (the sum's top c and the tasks' kept ones) by their mean: σ̄ U Vᵀ.

θ = θ0 + α · (the above); the authors choose α on validation data from 0.1, 0.2, …, 3.0.
Vector tensors (biases, LayerNorms, class embedding, the 4-D patch embedding): (1/T) Σ_t δ_t,
as the authors' code does, then × α.

The authors' code rounds the common size so that every task gets the same number of
directions: c₀ = ⌊f m⌋, s = round((m − c₀) / T) (Python's round, half to even), c = m − T s.
Where that rounding would ask for more than m directions in all (tiny layers, f near 0)
this module takes s = ⌊m / T⌋ instead; no ViT layer reaches that case at f = 0.8.
"""

from __future__ import annotations

import torch

#: Iso-CTS's common-subspace fraction in the authors' configuration (config/method/iso_cts.yaml).
COMMON_FRACTION = 0.8


def check_fraction(fraction: float) -> None:
    """Reject a common-space fraction outside [0, 1] with a message that says what is allowed."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"the Iso-CTS common-space fraction must be in [0, 1], got {fraction}")


def subspace_sizes(m: int, num_tasks: int, fraction: float) -> tuple[int, int]:
    """(c, s): the common-subspace size and the directions per task for a layer of rank m.

    c + T·s = m always. subspace_sizes(768, 8, 0.8) → (768 − 8·19, 19) = (616, 19)."""
    check_fraction(fraction)
    common = int(m * fraction)
    per_task = round((m - common) / num_tasks)
    if num_tasks * per_task > m:  # the rounding overshoots: as many as fit
        per_task = m // num_tasks
    return m - num_tasks * per_task, per_task


def iso_c(deltas: torch.Tensor) -> torch.Tensor:
    """deltas: [T, d_out, d_in] → the unscaled Iso-C update σ̄ U Vᵀ [d_out, d_in] of Δ = Σ_t δ_t."""
    U, S, Vh = torch.linalg.svd(
        deltas.sum(dim=0), full_matrices=False
    )  # (d_out, m), (m,), (m, d_in)
    return (U * S.mean()) @ Vh


def iso_cts(deltas: torch.Tensor, *, fraction: float = COMMON_FRACTION) -> torch.Tensor:
    """deltas: [T, d_out, d_in] → the unscaled Iso-CTS update σ̄ U Vᵀ [d_out, d_in].

    fraction: the common-space fraction f of the module docstring."""
    T, d_out, d_in = deltas.shape
    m = min(d_out, d_in)
    c, s = subspace_sizes(m, T, fraction)
    U_sum, S_sum, Vh_sum = torch.linalg.svd(deltas.sum(dim=0), full_matrices=False)
    U_c = U_sum[:, :c]  # (d_out, c): the common subspace
    U = torch.empty((d_out, m), dtype=deltas.dtype, device=deltas.device)
    Vh = torch.empty((m, d_in), dtype=deltas.dtype, device=deltas.device)
    S = torch.empty(m, dtype=deltas.dtype, device=deltas.device)
    if s > 0:
        for t in range(T):
            # δ_t with its common part removed; its top s directions are task t's share.
            specific = deltas[t] - U_c @ (U_c.T @ deltas[t])
            U_t, S_t, Vh_t = torch.linalg.svd(specific, full_matrices=False)
            U[:, t * s : (t + 1) * s] = U_t[:, :s]
            S[t * s : (t + 1) * s] = S_t[:s]
            Vh[t * s : (t + 1) * s] = Vh_t[:s]
    # The common directions last, as the authors' code orders them (the result does not change).
    U[:, T * s :], S[T * s :], Vh[T * s :] = U_c, S_sum[:c], Vh_sum[:c]
    return (_polar(U) * S.mean()) @ _polar(Vh)


def _polar(A: torch.Tensor) -> torch.Tensor:
    """The orthonormal polar factor P Qᵀ of A = P Σ Qᵀ: the nearest matrix with orthonormal
    columns (or rows, for a wide A) in the Frobenius norm."""
    P, _, Qh = torch.linalg.svd(A, full_matrices=False)
    return P @ Qh


def merge_layer(
    deltas: torch.Tensor,
    *,
    variant: str,
    fraction: float = COMMON_FRACTION,
    memo: dict | None = None,
) -> torch.Tensor:
    """deltas: [T, *shape] → the unscaled merged update [*shape] (the caller scales it by α).

    variant: "c" (Iso-C) or "cts" (Iso-CTS). 2-D tensors get the isotropic merge, every other
    shape the task mean. memo: a dict kept for the tensor across an α sweep, so the SVDs run
    once per sweep."""
    if memo is not None and "iso" in memo:
        return memo["iso"]
    if deltas.dim() != 3:
        out = deltas.mean(dim=0)
    elif variant == "c":
        out = iso_c(deltas)
    elif variant == "cts":
        out = iso_cts(deltas, fraction=fraction)
    else:
        raise ValueError(f"unknown Iso variant `{variant}` (expected `c` or `cts`)")
    if memo is not None:
        memo["iso"] = out
    return out
