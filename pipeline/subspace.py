"""The per-layer tagged basis shared by TSV-M and EpiMer (paper eq. 10, ALGORITHMS.md).

For one matrix layer with task vectors δ_t ∈ R^{d_out × d_in}:

1. per task, the top k_ℓ singular triplets δ_t ≈ U_t diag(σ_t) V_tᵀ;
2. U = [U_1 … U_T] (d_out × p), W = [V_1 … V_T] (d_in × p), σ = [σ_1 … σ_T], p = k_ℓ·T,
   and the owner tag t of every atom;
3. Procrustes whitening: U = P Σ Qᵀ → U⊥ = P Qᵀ (the orthonormal matrix nearest to U),
   the same for W.

The atoms s_i = vec(u_i w_iᵀ) of the whitened factors are orthonormal, SᵀS = I_p.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

#: Singular values of the stacked factors below RCOND·σ_max count as zero in the polar
#: factor (see `polar_factor`). Only exactly dependent atoms (e.g. identical task
#: vectors) fall below it; generic inputs are whitened exactly as in TSV-M.
RCOND = 1e-6


@dataclass
class TaggedBasis:
    """Whitened factors of one layer. U: [d_out, p], W: [d_in, p], sigma: [p], tags: [p]."""

    U: torch.Tensor
    W: torch.Tensor
    sigma: torch.Tensor
    tags: torch.Tensor
    k: int  # the effective per-task rank k_ℓ; p = k·T

    @property
    def p(self) -> int:
        return int(self.sigma.numel())

    @property
    def num_tasks(self) -> int:
        return self.p // self.k if self.k else 0

    def to(self, dtype: torch.dtype) -> TaggedBasis:
        return TaggedBasis(self.U.to(dtype), self.W.to(dtype), self.sigma.to(dtype), self.tags, self.k)


def effective_rank(shape: Sequence[int], k: int, num_tasks: int) -> int:
    """k_ℓ = min(k, ⌊min(d_out, d_in) / T⌋): the largest per-task rank with p = k_ℓ·T orthonormal atoms."""
    if k < 1:
        raise ValueError(f"k must be a positive integer, got {k}")
    return min(k, min(int(shape[0]), int(shape[1])) // num_tasks)


def gram_svd(delta: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k singular triplets from an eigensolve of the smaller Gram matrix, in float64.

    The exact path: one min(d_out, d_in)² eigendecomposition. Triplets with σ ≈ 0 (delta of
    rank < k) get a zero singular vector on the recovered side instead of amplified noise.
    """
    a = delta.to(torch.float64)
    tall = a.shape[0] >= a.shape[1]
    gram = a.T @ a if tall else a @ a.T  # [d_small, d_small]
    evals, evecs = torch.linalg.eigh(gram)  # ascending
    evals = evals.flip(0)[:k].clamp_min(0.0)
    small = evecs.flip(1)[:, :k]  # singular vectors of the smaller side
    s = evals.sqrt()
    other = (a @ small) if tall else (a.T @ small)  # = other-side vectors · s
    # σ from a Gram eigensolve is accurate to ~1e-8·σ_max, so smaller ones are zero.
    tiny = s <= 1e-7 * s.max().clamp_min(torch.finfo(torch.float64).tiny)
    other = other / torch.where(tiny, torch.ones_like(s), s)
    other[:, tiny] = 0.0
    if tall:
        return other, s, small
    return small, s, other


def truncated_svd(
    delta: torch.Tensor, k: int, *, rtol: float | None = None, max_iter: int = 16, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k singular triplets of `delta` [d_out, d_in]: U [d_out, k], s [k], V [d_in, k] (float64).

    Randomised subspace iteration on a block of l = max(2k + 8, 32) vectors in the dtype of
    `delta` (cost d_out·d_in·l per product instead of a full SVD), accepted once every kept
    triplet has ‖δ v_i − σ_i u_i‖ ≤ rtol·σ_1, the residual measured in float64 (default
    rtol: 1e-5 for float32 input, the level float32 products reach; 1e-9 for float64).
    When the block is a large part of the matrix, or the spectrum is too flat to converge,
    the exact float64 Gram eigensolve is used instead, so the result never depends on luck.
    """
    d_out, d_in = delta.shape
    l = max(2 * k + 8, 32)
    if 2 * l >= min(d_out, d_in):
        return gram_svd(delta, k)
    work = delta if delta.dtype in (torch.float32, torch.float64) else delta.float()
    if rtol is None:
        rtol = 1e-9 if work.dtype == torch.float64 else 1e-5
    a64 = delta.to(torch.float64)
    gen = torch.Generator().manual_seed(seed)  # deterministic start block
    Y = work @ torch.randn(d_in, l, generator=gen, dtype=work.dtype)  # [d_out, l]
    previous = float("inf")
    for step in range(max_iter):
        # Rayleigh–Ritz on span(Y), in float64: orthonormalise Y (Cholesky QR: an l × l
        # factorisation instead of a d_out × l Householder QR), B = Qᵀδ is l × d_in, and
        # the SVD of B comes from the l × l eigensolve of B Bᵀ.
        Q = _orthonormalise(Y.to(torch.float64))
        B = Q.T @ a64  # [l, d_in]
        evals, Ub = torch.linalg.eigh(B @ B.T)
        s = evals.flip(0)[:k].clamp_min(0.0).sqrt()
        Ub = Ub.flip(1)[:, :k]
        V = (B.T @ Ub) / s.clamp_min(torch.finfo(torch.float64).tiny)  # [d_in, k]
        U = Q @ Ub  # [d_out, k]
        scale = float(s[0]) if s.numel() and s[0] > 0 else 1.0
        worst = float(torch.linalg.vector_norm(a64 @ V - U * s, dim=0).max())
        if worst <= rtol * scale:
            return _drop_null(U, s, V)
        if step >= 3 and worst > 0.5 * previous:
            break  # a flat spectrum: iterating further would not pay
        previous = worst
        Qw = Q.to(work.dtype)
        Y = work @ (work.T @ Qw)  # one power step: [d_out, l]
    log.debug("subspace iteration did not converge for shape %s, k=%d: exact Gram eigensolve", tuple(delta.shape), k)
    return gram_svd(delta, k)


def _orthonormalise(Y: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of span(Y) [n, l] (float64) by Cholesky QR, done twice for accuracy;
    a Householder QR only where Y is too ill-conditioned for Cholesky."""
    Q = Y
    for _ in range(2):
        L, info = torch.linalg.cholesky_ex(Q.T @ Q)
        if int(info) != 0:
            return torch.linalg.qr(Y)[0]
        Q = torch.linalg.solve_triangular(L, Q.T, upper=False).T  # Q R⁻¹ with R = Lᵀ
    return Q


def _drop_null(U: torch.Tensor, s: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Zero both singular vectors of σ ≈ 0 triplets (arbitrary or amplified-noise directions)."""
    tiny = s <= 1e-7 * s.max().clamp_min(torch.finfo(torch.float64).tiny)
    if bool(tiny.any()):
        U, V = U.clone(), V.clone()
        U[:, tiny] = 0.0
        V[:, tiny] = 0.0
    return U, s, V


def polar_factor(a: torch.Tensor, rcond: float = RCOND) -> torch.Tensor:
    """Orthonormal polar factor P Qᵀ of a = P Σ Qᵀ [n, p], computed in float64.

    From the p × p Gram matrix aᵀa = Q Σ² Qᵀ: P Qᵀ = a Q Σ⁻¹ Qᵀ (one n·p² product and a p³
    eigensolve instead of an n·p² SVD with a large constant). The stacked factors are
    near-orthonormal, so squaring the condition number costs nothing in float64.
    For a of full column rank this is the Procrustes whitening of TSV-M. When a is
    numerically rank-deficient (duplicated atoms), the polar factor is not unique; we take
    the canonical partial isometry over the singular values above rcond·σ_max instead of an
    arbitrary completion, so identical task vectors merge to themselves.
    """
    a64 = a.to(torch.float64)
    evals, Q = torch.linalg.eigh(a64.T @ a64)
    s = evals.clamp_min(0.0).sqrt()
    keep = s > rcond * s.max().clamp_min(torch.finfo(torch.float64).tiny)
    if not bool(keep.all()):
        log.debug("polar factor: %d of %d singular values below rcond", int((~keep).sum()), s.numel())
    Qk = Q[:, keep]
    return a64 @ ((Qk / s[keep]) @ Qk.T)


def tagged_basis(deltas: Sequence[torch.Tensor] | torch.Tensor, k: int, rcond: float = RCOND) -> TaggedBasis:
    """Build the tagged basis of one layer from its T task vectors [d_out, d_in] each.

    k is clamped to k_ℓ = min(k, ⌊min(d_out, d_in)/T⌋) (the caller warns). Returns float64
    factors; callers cast to their compute dtype.
    """
    T = len(deltas)
    shape = tuple(deltas[0].shape)
    k_eff = effective_rank(shape, k, T)
    if k_eff < 1:
        raise ValueError(f"layer of shape {shape} is too small for a tagged basis of {T} tasks")
    Us, Vs, ss = [], [], []
    for delta in deltas:
        U_t, s_t, V_t = truncated_svd(delta, k_eff)
        Us.append(U_t)
        Vs.append(V_t)
        ss.append(s_t)
    U = polar_factor(torch.cat(Us, dim=1), rcond)
    W = polar_factor(torch.cat(Vs, dim=1), rcond)
    sigma = torch.cat(ss)
    tags = torch.arange(T).repeat_interleave(k_eff)
    return TaggedBasis(U=U, W=W, sigma=sigma, tags=tags, k=k_eff)


def tagged_coordinates(basis: TaggedBasis) -> torch.Tensor:
    """δ̃_t [T, p]: σ on task t's own atoms, 0 elsewhere (the `tagged` coordinates)."""
    T = basis.num_tasks
    own = basis.tags.unsqueeze(0) == torch.arange(T).unsqueeze(1)  # [T, p]
    return torch.where(own, basis.sigma.unsqueeze(0), torch.zeros((), dtype=basis.sigma.dtype))


def projected_coordinates(basis: TaggedBasis, deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sᵀ vec(δ_t) = diag(U⊥ᵀ δ_t W⊥) for every task: [T, p] (the `projection` coordinates)."""
    U, W = basis.U, basis.W
    rows = [((delta.to(U.dtype) @ W) * U).sum(dim=0) for delta in deltas]  # (δW)[a,i]·U[a,i] summed over a
    return torch.stack(rows)


def lift(basis: TaggedBasis, coords: torch.Tensor) -> torch.Tensor:
    """S·coords as a matrix: U⊥ diag(coords) W⊥ᵀ, [d_out, d_in]."""
    return (basis.U * coords.to(basis.U.dtype)) @ basis.W.T
