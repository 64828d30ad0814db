"""Projected Hessians in the tagged subspace and the diagnostics of Theorems 2 and 3.

With the empirical Fisher diagonal F_t ∈ R^{d_out × d_in} (non-negative) as H_t and the
whitened factors U⊥ [d_out, p], W⊥ [d_in, p] of `subspace.tagged_basis`:

    H̃_t[i, j] = Σ_ab F_t[a, b] U⊥[a, i] U⊥[a, j] W⊥[b, i] W⊥[b, j] + ε δ_ij     (eq. 12)

H̄ = Σ_t λ_t H̃_t is formed once from the averaged Fisher F̄ (one dense projection per layer),
b = Σ_t λ_t H̃_t δ̃_t from the T lifts U⊥ diag(δ̃_t) W⊥ᵀ and one product with W⊥ (T products
where the per-task rows H̃_t δ̃_t are kept, as the `hessian` artifact does). Large products run
in the dtype of the inputs (float32 by default); every p × p solve runs in float64.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from pipeline.subspace import TaggedBasis

log = logging.getLogger(__name__)

#: Elements allowed in one intermediate of `projected_hessian` (≈ 64 MB in float32).
_BLOCK_ELEMENTS = 1 << 24

#: CPU scratch buffers of this module's products (`projected_hessian`, `hessian_matvec`, the
#: lifts of `layer_curvature`, `residual_energy_terms`), kept between calls: a fresh block
#: per GEMM costs a page fault per 4 KiB (glibc returns large blocks to the OS on free), ≈ 10 %
#: of the projection. Only the part a layer uses is ever touched (resident). Not thread-safe:
#: one layer's curvature at a time per process.
_SCRATCH: dict[str, torch.Tensor] = {}

#: How H̄ enters the solve: formed ("dense", the reference), as an operator ("cg"), or "auto":
#: the operator while conjugate gradients converge within a budget of steps worth half the
#: cost of forming H̄, formed otherwise (and always for float64 products, the reference path).
SOLVERS = ("auto", "dense", "cg")

#: `auto`: CG steps run before the convergence rate decides between going on and forming H̄.
_PROBE_STEPS = 4


def effective_solver(solver: str, fisher_rank: int | None) -> str:
    """The solver really used: with `fisher_rank` `auto` means the formed (low-rank) H̄."""
    if solver == "auto" and fisher_rank is not None:
        return "dense"
    return solver


def _scratch(key: str, numel: int, like: torch.Tensor) -> torch.Tensor:
    """An uninitialised flat tensor of `numel` elements with `like`'s dtype and device; on the
    CPU a view of a buffer reused by later calls with the same key."""
    if like.device.type != "cpu":
        return torch.empty(
            numel, dtype=like.dtype, device=like.device
        )  # the caching allocator reuses
    buf = _SCRATCH.get(key)
    if buf is None or buf.dtype != like.dtype or buf.numel() < numel:
        buf = _SCRATCH[key] = torch.empty(max(numel, _BLOCK_ELEMENTS), dtype=like.dtype)
    return buf[:numel]


def projected_hessian(
    fisher: torch.Tensor, U: torch.Tensor, W: torch.Tensor, eps: float = 0.0
) -> torch.Tensor:
    """Sᵀ diag(F) S + εI as a dense [p, p] float64 matrix, on U's device.

    fisher: [d_out, d_in] non-negative; U: [d_out, p]; W: [d_in, p].
    Face-splitting formulation over the p(p+1)/2 pairs i ≤ j only (symmetry halves the
    cost), by blocks of rows I = [i0, i1) of M:

        Q = W[:, I] ∘ W[:, j]  for the pairs (i, j) of the block   (d_in × c, broadcast, no gather)
        R = F Q                                                   (one GEMM, d_out·d_in·c)
        M[i, j] = Σ_a U[a, i] U[a, j] R[a, (i, j)]                (batched dot over a)

    where a block holds the triangle i ≤ j < i1 of its diagonal block and the rectangle
    I × [i1, p). The lower triangle is mirrored. Total cost d_out·d_in·p(p+1)/2
    multiply-adds in U's dtype; intermediates are bounded by `_BLOCK_ELEMENTS` and live in
    reused scratch buffers on the CPU.
    """
    d_out, d_in = fisher.shape
    if d_out < d_in:
        # The sum is symmetric in (rows, U) and (columns, W). With the longer side as rows the
        # GEMM is the same but the element-wise work on Q (d_in·c) is smaller: 768 × 3072 at
        # p = 256 takes 1.35 s instead of 1.63 s on a 2-core CPU.
        return projected_hessian(fisher.mT, W, U, eps)
    p = U.shape[1]
    F = fisher.to(device=U.device, dtype=U.dtype)
    M = torch.zeros(p, p, dtype=torch.float64, device=U.device)
    pairs = max(1, _BLOCK_ELEMENTS // (d_out + d_in))  # pairs per block
    i0 = 0
    while i0 < p:
        rest = p - i0
        m = max(1, min(rest, pairs // rest))  # rows of M in this block
        i1 = i0 + m
        ti, tj = torch.triu_indices(m, m, device=U.device) + i0  # the block's own triangle
        nd = ti.numel()
        c = nd + m * (p - i1)
        Q = _scratch("Q", d_in * c, U).view(d_in, c)
        torch.mul(W[:, ti], W[:, tj], out=Q[:, :nd])
        if i1 < p:
            torch.mul(W[:, i0:i1, None], W[:, None, i1:], out=Q[:, nd:].view(d_in, m, p - i1))
        R = torch.mm(F, Q, out=_scratch("R", d_out * c, U).view(d_out, c))  # [d_out, c]
        M[ti, tj] = R[:, :nd].mul_(U[:, ti]).mul_(U[:, tj]).sum(dim=0).to(torch.float64)
        if i1 < p:
            Rr = R[:, nd:].view(d_out, m, p - i1).mul_(U[:, None, i1:])  # R[a, i, j] · U[a, j]
            M[i0:i1, i1:] = torch.einsum("ai,aij->ij", U[:, i0:i1], Rr).to(torch.float64)
        i0 = i1
    M = M + M.triu(1).T
    if eps:
        M.diagonal().add_(eps)
    return M


def hessian_matvec(
    fisher: torch.Tensor, U: torch.Tensor, W: torch.Tensor, x: torch.Tensor, eps: float = 0.0
) -> torch.Tensor:
    """H̃ x = diag(U⊥ᵀ (F ∘ (U⊥ diag(x) W⊥ᵀ)) W⊥) + εx without forming H̃: [p] float64.

    Only the atoms where x ≠ 0 enter the lift (tagged coordinates touch k of p), so the
    cost is d_out·d_in·(nnz(x) + p) multiply-adds, in U's dtype and on U's device.
    """
    x = x.to(U.device)
    support = torch.nonzero(x).flatten()
    out = torch.zeros(U.shape[1], dtype=torch.float64, device=U.device)
    if support.numel():
        d_out, d_in = U.shape[0], W.shape[0]
        xs = x[support].to(U.dtype)
        X = _scratch("X", d_out * d_in, U).view(d_out, d_in)
        torch.mm(U[:, support] * xs, W[:, support].T, out=X)
        out = _diag_product(X.mul_(fisher.to(device=U.device, dtype=U.dtype)), U, W)
    return out + eps * x.to(torch.float64)


def _diag_product(Z: torch.Tensor, U: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """diag(Uᵀ Z W) [p] float64 on U's device, Z [d_out, d_in]: one product (d_out·d_in·p),
    into a scratch buffer."""
    d_out, p = U.shape
    Y = torch.mm(Z, W, out=_scratch("Y", d_out * p, U).view(d_out, p))  # [d_out, p]
    return Y.mul_(U).sum(dim=0).to(torch.float64)


class HessianOperator:
    """H̄ without its p × p matrix: `H @ x` and `solve(rhs)` (float64 [p]), what the merge and
    the diagnostics ask of it. `iterations`, `residual` and `fallback` describe the solves
    (CG steps, the worst final ‖rhs − H̄x‖/‖rhs‖, whether H̄ was formed after all)."""

    iterations: int = 0
    residual: float = 0.0
    fallback: bool = False

    def __matmul__(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def solve(self, rhs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class ImplicitHessian(HessianOperator):
    """H̄ = Sᵀ diag(F̄) S + εI as an operator (solvers `cg` and `auto`): products and solves
    without forming the p × p matrix.

    `H @ x` is one matrix-vector product (2·d_out·d_in·p multiply-adds, in U's dtype);
    `solve(rhs)` is conjugate gradients preconditioned by diag(H̄) (d_out·d_in·p once), from
    the Jacobi solution or the start given by `hint`, in float64 vectors, until
    ‖rhs − H̄x‖ ≤ tol·‖rhs‖ (re-measured at the end; up to 10·tol is accepted, the floor of
    float32 products on an ill-conditioned H̄). Forming H̄ costs
    d_out·d_in·p²/2, as much as p/4 = 64 products at p = 256, so CG pays while it converges
    in fewer steps. If it is still above 10·tol after `max_iter` steps (default p), H̄ is
    formed and solved by Cholesky, so the result never depends on the conditioning.
    Solutions are kept per right-hand side (an α sweep and the diagnostics solve with the
    same b), and so are the products the diagnostics ask for: a vector asked before or
    started from (δ̄, at every α) and any multiple of a solution (EpiMer's δ̃_m =
    scale·H̄⁻¹b; the final residual check computes H̄x) are answered from one product each,
    c·(H̄x) for v = c·x, whatever the order of the requests, so an α sweep and single merges
    report the same bits.

    adaptive (solver `auto`): the budget is p/8 steps (half the cost of forming H̄), and after
    `_PROBE_STEPS` steps, and every step after, the residual's mean rate of decrease predicts
    the steps still needed; once that exceeds the budget H̄ is formed without a warning. A
    well-conditioned layer costs a few products, an ill-conditioned one ≈ 4 products more
    than forming H̄ outright (6 % at p = 256).
    """

    def __init__(
        self,
        fisher: torch.Tensor,
        U: torch.Tensor,
        W: torch.Tensor,
        eps: float = 0.0,
        tol: float = 1e-6,
        max_iter: int | None = None,
        adaptive: bool = False,
    ) -> None:
        self.F, self.U, self.W, self.eps = fisher.to(device=U.device, dtype=U.dtype), U, W, eps
        p = U.shape[1]
        self.adaptive = adaptive
        self.tol = tol
        self.max_iter = (
            max_iter if max_iter is not None else (max(p // 8, _PROBE_STEPS) if adaptive else p)
        )
        G = self.F @ (W * W)  # [d_out, p]
        self.diag = ((U * U) * G).sum(dim=0).to(torch.float64).cpu() + eps
        self.iterations = 0  # the most CG steps any solve took
        self.residual = 0.0  # the worst final ‖rhs − H̄x‖ / ‖rhs‖
        self.fallback = False  # whether a solve formed H̄ instead
        self._solutions: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._products: list[tuple[torch.Tensor, torch.Tensor]] = []  # (v, H̄v) asked through `@`
        self._starts: list[tuple[torch.Tensor, torch.Tensor]] = []  # (rhs, x0) from `hint`
        self._formed: torch.Tensor | None = None  # H̄, once a solve has formed it

    def __matmul__(self, x: torch.Tensor) -> torch.Tensor:
        v = x.to(torch.float64).cpu()
        known = self._known(v)
        if known is not None:
            return known
        for _, solution in self._solutions:
            c = _multiple_of(v, solution)
            if c is not None:
                return c * self._product(solution)
        return self._product(v)

    def hint(self, rhs: torch.Tensor, start: torch.Tensor) -> None:
        """Start the conjugate gradients of `solve(rhs)` from `start` instead of the Jacobi
        solution diag(H̄)⁻¹rhs. Its product H̄·start (the one product of the start either way)
        is kept for `@`: the merge starts from δ̄, whose product η asks for."""
        self._starts.append((rhs.to(torch.float64).cpu(), start.to(torch.float64).cpu()))

    def _known(self, v: torch.Tensor) -> torch.Tensor | None:
        """H̄v if `@` has computed it before."""
        for u, Hu in self._products:
            if torch.equal(u, v):
                return Hu.clone()
        return None

    def _product(self, v: torch.Tensor) -> torch.Tensor:
        """H̄v, remembered for `@`."""
        known = self._known(v)
        if known is not None:
            return known
        Hv = self._apply(v)
        self._products.append((v.clone(), Hv))
        return Hv.clone()

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        return hessian_matvec(self.F, self.U, self.W, x.to(torch.float64), self.eps).cpu()

    def dense(self) -> torch.Tensor:
        if self._formed is None:
            self._formed = projected_hessian(self.F, self.U, self.W, self.eps).cpu()
        return self._formed

    def solve(self, rhs: torch.Tensor) -> torch.Tensor:
        rhs = rhs.to(torch.float64).cpu()
        for known, x in self._solutions:
            if torch.equal(known, rhs):
                return x.clone()
        x = self._cg(rhs) if self._formed is None else self._solve_formed(rhs)
        self._solutions.append((rhs, x))
        return x.clone()

    def _cg(self, b: torch.Tensor) -> torch.Tensor:
        norm_b = float(b.norm())
        if norm_b == 0.0:
            return torch.zeros_like(b)
        inv_diag = 1.0 / self.diag.clamp_min(torch.finfo(torch.float64).tiny)
        start = next((x0 for rhs, x0 in self._starts if torch.equal(rhs, b)), None)
        if start is not None:
            x = start.clone()
            r = b - self._product(x)
        else:
            x = b * inv_diag  # the Jacobi solution as the start
            r = b - self._apply(x)
        z = r * inv_diag
        d = z.clone()
        rz = float(r @ z)
        step = 0
        first = float(r.norm()) / norm_b
        while step < self.max_iter and (now := float(r.norm()) / norm_b) > self.tol:
            if (
                self.adaptive
                and step >= _PROBE_STEPS
                and _steps_needed(first, now, step, self.tol) > self.max_iter
            ):
                log.debug(
                    "CG after %d steps at %.2g: predicted beyond %d steps; forming H̄",
                    step,
                    now,
                    self.max_iter,
                )
                break
            Hd = self._apply(d)
            a = rz / float(d @ Hd)
            x += a * d
            r -= a * Hd
            z = r * inv_diag
            rz_next = float(r @ z)
            d = z + (rz_next / rz) * d
            rz = rz_next
            step += 1
        Hx = self._apply(x)
        self._products.append((x.clone(), Hx))  # for `@` (V_S at δ̃_m = scale·x, the artifact's H̄x)
        true_residual = float((b - Hx).norm()) / norm_b
        # The products run in U's dtype: on an ill-conditioned H̄ (condition number ~300) the
        # residual cannot be measured much below ~2e-6 in float32, and the formed H̄ solves no
        # more accurately (5.5e-6 from a float64 solve there; CG 1e-6 after 65 steps). So CG
        # aims at tol and accepts up to 10·tol; H̄ is formed only beyond that.
        self.iterations = max(self.iterations, step)
        if true_residual > 10 * self.tol:
            if not self.adaptive:
                log.warning(
                    "conjugate gradients reached ‖b − H̄x‖/‖b‖ = %.2g > %.2g after %d steps; forming H̄",
                    true_residual,
                    10 * self.tol,
                    step,
                )
            return self._solve_formed(b)
        self.residual = max(self.residual, true_residual)
        return x

    def _solve_formed(self, b: torch.Tensor) -> torch.Tensor:
        self.fallback = True
        x = solve_spd(self.dense(), b)
        self.residual = max(
            self.residual,
            float((b - self._apply(x)).norm())
            / max(float(b.norm()), torch.finfo(torch.float64).tiny),
        )
        return x


def _multiple_of(v: torch.Tensor, u: torch.Tensor, rtol: float = 1e-12) -> float | None:
    """c with v = c·u to float64 round-off (‖v − c·u‖ ≤ rtol‖v‖), or None."""
    uu = float(u @ u)
    if uu == 0.0:
        return None
    c = float(v @ u) / uu
    return c if float((v - c * u).norm()) <= rtol * float(v.norm()) else None


def _steps_needed(first: float, now: float, steps: int, tol: float) -> float:
    """CG steps to bring the relative residual from `first` to `tol`, at the mean rate of decrease
    the first `steps` steps took it from `first` to `now` (CG usually speeds up, so this errs long)."""
    if now >= first:
        return float("inf")
    return steps * math.log(tol / first) / math.log(now / first)


class NotStored(ValueError):
    """A `SolvedHessian` was asked for a solve or product that its artifact does not hold."""


class SolvedHessian(HessianOperator):
    """H̄ as a `hessian` artifact keeps it where conjugate gradients solved the layer: per
    coordinate mode the solution x = H̄⁻¹b of b = Σ_t λ_t H̃_t δ̃_t (uniform λ) and the products
    H̄δ̄ and H̄x. That is all EpiMer asks of H̄, at every α and with either aggregator
    (δ̃_m = scale·x), and all its diagnostics (η = (b − H̄δ̄)ᵀ(x − δ̄); V_S needs δ̃_mᵀH̄δ̃_m).

    `solve` answers the stored right-hand sides, `@` the stored vectors and their multiples
    (to 1e-6 relative, the products' float32 round-off: a merge in another dtype than the stage
    recomputes δ̄ to that accuracy); anything else is refused, naming `where`.
    """

    #: How far (relative) a vector may lie from a multiple of a stored one and still use its product.
    PARALLEL_RTOL = 1e-6

    def __init__(
        self,
        solutions: Sequence[tuple[torch.Tensor, torch.Tensor]],
        products: Sequence[tuple[torch.Tensor, torch.Tensor]],
        where: str,
        iterations: int = 0,
        residual: float = 0.0,
    ) -> None:
        self._solutions = [(b.to(torch.float64), x.to(torch.float64)) for b, x in solutions]
        self._products = [(v.to(torch.float64), Hv.to(torch.float64)) for v, Hv in products]
        self.where, self.iterations, self.residual = where, iterations, residual

    def solve(self, rhs: torch.Tensor) -> torch.Tensor:
        rhs = rhs.to(torch.float64).cpu()
        for b, x in self._solutions:
            if torch.equal(b, rhs) or torch.allclose(b, rhs, rtol=1e-12, atol=0.0):
                return x.clone()
        raise NotStored(
            f"{self.where}: H̄ was solved by conjugate gradients for the uniform task weights only, so it "
            "cannot solve for this right-hand side; re-run the hessian stage with --solver dense to store H̄"
        )

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        v = v.to(torch.float64).cpu()
        norm = float(v.norm())
        if norm == 0.0:
            return torch.zeros_like(v)
        for u, Hu in self._products:
            c = _multiple_of(v, u, self.PARALLEL_RTOL)
            if c is not None:
                return c * Hu
        raise NotStored(
            f"{self.where}: H̄ was solved by conjugate gradients and is known only on δ̄ and its solution; "
            "re-run the hessian stage with --solver dense to store H̄"
        )


def solved_terms(
    H: HessianOperator, b: torch.Tensor, delta_bar: torch.Tensor
) -> dict[str, torch.Tensor]:
    """What a `SolvedHessian` keeps for one coordinate mode: b, x = H̄⁻¹b, δ̄, H̄δ̄ and H̄x."""
    x = H.solve(b)
    return {
        "b": b,
        "solution": x,
        "delta_bar": delta_bar,
        "H_delta_bar": H @ delta_bar,
        "H_solution": H @ x,
    }


def check_solver(solver: str, fisher_rank: int | None) -> None:
    """Reject an unknown solver, or `cg` together with a low-rank H̄ (two alternatives to forming it)."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver `{solver}` (expected one of {', '.join(SOLVERS)})")
    if solver == "cg" and fisher_rank is not None:
        raise ValueError(
            f"solver `{solver}` and fisher_rank are two alternatives to forming H̄: choose one"
        )


def times(H: torch.Tensor | HessianOperator, x: torch.Tensor) -> torch.Tensor:
    """H̄ x in float64, for a dense H̄ or a `HessianOperator`."""
    if isinstance(H, HessianOperator):
        return H @ x
    return H.to(torch.float64) @ x.to(torch.float64)


def explicit_projected_hessian(
    fisher: torch.Tensor, U: torch.Tensor, W: torch.Tensor, eps: float = 0.0
) -> torch.Tensor:
    """Reference Sᵀ diag(vec F) S + εI with S built explicitly ([d_out·d_in, p]); tests only."""
    S = torch.einsum("ai,bi->abi", U, W).reshape(-1, U.shape[1]).to(torch.float64)
    f = fisher.reshape(-1).to(torch.float64)
    return S.T @ (f[:, None] * S) + eps * torch.eye(U.shape[1], dtype=torch.float64)


# --------------------------------------------------------------------------- low-rank Fisher (opt-in)


@dataclass
class LowRankFisher:
    """F ≈ A Bᵀ with A [d_out, R] ≥ 0, B [d_in, R] ≥ 0; `error` = ‖F − A Bᵀ‖_F / ‖F‖_F (float64)."""

    A: torch.Tensor
    B: torch.Tensor
    error: float


def low_rank_fisher(
    fisher: torch.Tensor, rank: int, *, iters: int = 20, tol: float = 1e-4, seed: int = 0
) -> LowRankFisher:
    """Non-negative rank-`rank` factorisation of a Fisher diagonal F [d_out, d_in] (F ≥ 0).

    Start from NNDSVD on a randomised top-R SVD (per singular pair, the non-negative part
    with the larger mass; the first pair of a non-negative matrix is its Perron pair, so a
    rank-1 F is recovered exactly), then hierarchical ALS sweeps (each column of A, then of
    B, gets its exact non-negative least-squares update with the others fixed, so the error
    never grows) until the squared error improves by less than `tol` relatively, or after
    `iters` sweeps. Each sweep reads F twice; products run in F's dtype on its device. The
    reported error is measured in float64 on the whole matrix.
    """
    if rank < 1:
        raise ValueError(f"fisher_rank must be a positive integer, got {rank}")
    d_out, d_in = fisher.shape
    R = min(rank, d_out, d_in)
    F = fisher if fisher.dtype in (torch.float32, torch.float64) else fisher.float()
    # Randomised range finder with two power steps: an initial guess only, refined below.
    gen = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(
        F @ torch.randn(d_in, min(R + 8, d_in), generator=gen, dtype=F.dtype).to(F.device)
    )[0]
    for _ in range(2):
        Q = torch.linalg.qr(F @ torch.linalg.qr(F.T @ Q)[0])[0]
    Ub, sv, Vt = torch.linalg.svd((Q.T @ F).double(), full_matrices=False)
    U, V = Q.double() @ Ub[:, :R], Vt[:R].T
    A = torch.empty(d_out, R, dtype=F.dtype, device=F.device)
    B = torch.empty(d_in, R, dtype=F.dtype, device=F.device)
    for r in range(R):  # NNDSVD
        u, v = U[:, r], V[:, r]
        up, un, vp, vn = u.clamp_min(0), (-u).clamp_min(0), v.clamp_min(0), (-v).clamp_min(0)
        pos, neg = up.norm() * vp.norm(), un.norm() * vn.norm()
        x, y, m = (up, vp, pos) if pos >= neg else (un, vn, neg)
        scale = (sv[r] * m).sqrt()
        A[:, r] = (scale * x / x.norm().clamp_min(1e-300)).to(F.dtype)
        B[:, r] = (scale * y / y.norm().clamp_min(1e-300)).to(F.dtype)
    norm2 = float(F.double().square().sum())
    # Zero entries would stay zero under the updates: give them a small uniform start.
    fill = (norm2 / F.numel()) ** 0.5 * 1e-2
    A[A == 0] = fill
    B[B == 0] = fill
    tiny = torch.finfo(F.dtype).tiny
    previous = float("inf")
    for _ in range(iters):
        FB, BtB = F @ B, B.T @ B
        for r in range(R):
            A[:, r] = (A[:, r] + (FB[:, r] - A @ BtB[:, r]) / BtB[r, r].clamp_min(tiny)).clamp_min(
                0
            )
        FtA, AtA = F.T @ A, A.T @ A
        for r in range(R):
            B[:, r] = (B[:, r] + (FtA[:, r] - B @ AtA[:, r]) / AtA[r, r].clamp_min(tiny)).clamp_min(
                0
            )
        # ‖F − A Bᵀ‖² = ‖F‖² − 2 tr(Aᵀ F B) + tr(AᵀA BᵀB), from the products at hand.
        err2 = (
            norm2
            - 2.0 * float((FtA * B).sum(dtype=torch.float64))
            + float((AtA * (B.T @ B)).sum(dtype=torch.float64))
        )
        if previous != float("inf") and previous - err2 <= tol * previous:
            break
        previous = err2
    residual = F.double() - A.double() @ B.double().T
    error = float(residual.norm()) / max(norm2, 1e-300) ** 0.5
    return LowRankFisher(A=A, B=B, error=error)


def low_rank_projected_hessian(
    factors: LowRankFisher, U: torch.Tensor, W: torch.Tensor, eps: float = 0.0
) -> torch.Tensor:
    """Sᵀ diag(A Bᵀ) S + εI = Σ_r (U⊥ᵀ diag(a_r) U⊥) ∘ (W⊥ᵀ diag(b_r) W⊥) + εI: [p, p] float64.

    Cost (d_out + d_in)·p²·R instead of d_out·d_in·p²/2; positive semi-definite (each term
    is a Hadamard product of two PSD matrices), and ‖H − Ĥ‖_F ≤ ‖F − A Bᵀ‖_F because the
    columns of S = [w_i ⊗ u_i] are orthonormal.
    """
    A = factors.A.to(device=U.device, dtype=U.dtype)
    B = factors.B.to(device=U.device, dtype=U.dtype)
    p = U.shape[1]
    M = torch.zeros(p, p, dtype=torch.float64, device=U.device)
    for r in range(A.shape[1]):
        left = (U * A[:, r : r + 1]).T @ U
        right = (W * B[:, r : r + 1]).T @ W
        M += (left * right).to(torch.float64)
    M = 0.5 * (M + M.T)
    if eps:
        M.diagonal().add_(eps)
    return M


# --------------------------------------------------------------------------- solves


def solve_spd(
    H: torch.Tensor | HessianOperator, rhs: torch.Tensor, *, what: str = "H̄"
) -> torch.Tensor:
    """H⁻¹ rhs in float64 by Cholesky; on failure a symmetric eigensolve with a warning.

    H ≻ 0 whenever ε > 0, so the fallback only triggers for ε = 0 with a singular
    projected Fisher; eigenvalues ≤ 1e-12·λ_max are then treated as zero (pseudo-inverse).
    """
    if isinstance(H, HessianOperator):
        return H.solve(rhs)
    H = H.to(torch.float64)
    b = rhs.to(torch.float64)
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) == 0:
        return torch.cholesky_solve(b.unsqueeze(-1) if b.ndim == 1 else b, L).reshape(b.shape)
    log.warning("%s is not positive definite (Cholesky failed); using a symmetric eigensolve", what)
    evals, evecs = torch.linalg.eigh(H)
    cutoff = 1e-12 * evals.abs().max().clamp_min(torch.finfo(torch.float64).tiny)
    inv = torch.where(evals > cutoff, 1.0 / evals, torch.zeros_like(evals))
    return (
        evecs @ (inv.unsqueeze(-1) * (evecs.T @ b)) if b.ndim > 1 else evecs @ (inv * (evecs.T @ b))
    )


# --------------------------------------------------------------------------- per-layer curvature


@dataclass
class LayerCurvature:
    """What the merge and the diagnostics need for one layer (all float64).

    H: H̄ [p, p] (or an operator); b: {coords mode → [p] b = Σ_t λ_t H̃_t δ̃_t}; Hx: {coords
    mode → [T, p] rows H̃_t δ̃_t}, where asked for (`layer_curvature(rows=True)`, the hessian
    artifact); quad: {coords mode → [T] δ̃_tᵀ H̃_t δ̃_t}; residual: [T] per-task residual
    energy (δ_t^⊥)ᵀ diag(F_t) δ_t^⊥. A mode with rows and no b gets b = (1/T) Σ_t rows.
    """

    H: torch.Tensor | HessianOperator
    Hx: dict[str, torch.Tensor]
    quad: dict[str, torch.Tensor]
    residual: torch.Tensor
    fisher_rank_error: float | None = None  # ‖F̄ − F̂‖_F / ‖F̄‖_F when H̄ comes from a rank-R F̂
    # mean_ab F̄[a, b], the scale the jitter ε is read against (ε / mean F̄ in the merge report);
    # None where the curvature comes from an artifact that does not record it.
    fisher_mean: float | None = None
    b: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for mode, rows in self.Hx.items():
            if mode not in self.b:
                self.b[mode] = task_weights(rows.shape[0]) @ rows.to(torch.float64)


def task_weights(T: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """λ_t [T] float64: `weights`, or 1/T each."""
    if weights is None:
        return torch.full((T,), 1.0 / T, dtype=torch.float64)
    return weights.to(torch.float64)


def layer_curvature(
    basis: TaggedBasis,
    coords: dict[str, torch.Tensor],
    fishers: Sequence[torch.Tensor] | torch.Tensor,
    deltas: Sequence[torch.Tensor] | torch.Tensor,
    eps: float,
    weights: torch.Tensor | None = None,
    fisher_rank: int | None = None,
    projection: torch.Tensor | None = None,
    solver: str = "dense",
    rows: bool = True,
) -> LayerCurvature:
    """Projected curvature of one layer for every coordinate mode in `coords` ({mode: [T, p]}).

    fishers, deltas: [T, d_out, d_in] (or T tensors); weights: λ_t [T] (default 1/T).
    The products run on the basis' device in its dtype; the results are float64 on the CPU.
    Cost: H̄ from the averaged Fisher (d_out·d_in·p(p+1)/2); per mode and task the lift
    X_t = U⊥ diag(δ̃_t) W⊥ᵀ (d_out·d_in·nnz(δ̃_t)), which gives δ̃_tᵀ H̃_t δ̃_t = Σ F_t ∘ X_t²
    without a product; b = Sᵀ vec(Σ_t λ_t F_t ∘ X_t) + ε Σ_t λ_t δ̃_t from one product
    (d_out·d_in·p) for all tasks, or with `rows` one per task (the rows H̃_t δ̃_t, which the
    hessian artifact keeps); the residual energy 2·d_out·d_in·p per task.
    fisher_rank: form H̄ from a non-negative rank-R factorisation of F̄ instead (opt-in;
    (d_out + d_in)·p²·R instead of d_out·d_in·p²/2 multiply-adds: 77× fewer at 3072 × 768,
    R = 4); b, the quadratic terms and the residuals stay exact. The factorisation's
    relative error is returned in `fisher_rank_error`. projection: the stored Sᵀ vec(δ_t)
    [T, p], if at hand (saves a product per task in the residual energy). solver: "dense"
    forms H̄; "cg" returns it as an `ImplicitHessian` (solves by conjugate gradients, each
    started from δ̄ = Σ_t λ_t δ̃_t, whose product η needs anyway); "auto" (the merge's default)
    an adaptive one, that forms H̄ where CG would take more than p/8 steps, and forms it for
    float64 products, for ε = 0 or with fisher_rank.
    """
    if not (math.isfinite(eps) and eps >= 0):
        # A NaN, infinite or negative jitter turns every stored H̄ into NaN/Inf or indefinite.
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    T = len(fishers)
    lam = task_weights(T, weights)
    dtype, device = basis.U.dtype, basis.U.device
    if isinstance(fishers, torch.Tensor):
        F = fishers.to(device=device, dtype=dtype)
        F_bar = torch.tensordot(
            lam.to(device=device, dtype=dtype), F, dims=1
        )  # one pass, [d_out, d_in]
    else:
        F = [f.to(device=device, dtype=dtype) for f in fishers]
        F_bar = sum(float(lam[t]) * F[t] for t in range(T))
    rank_error = None
    check_solver(solver, fisher_rank)
    H: torch.Tensor | HessianOperator
    # auto forms H̄ for float64 products (the reference path: CG stops at float32 round-off) and
    # for ε = 0, where H̄ may be singular and its defined solution is the pseudo-inverse one.
    if solver == "auto" and fisher_rank is None and dtype != torch.float64 and eps > 0:
        H = ImplicitHessian(F_bar, basis.U, basis.W, eps, adaptive=True)
    elif solver == "cg":
        H = ImplicitHessian(F_bar, basis.U, basis.W, eps)
    elif fisher_rank is None:
        H = projected_hessian(F_bar, basis.U, basis.W, eps).cpu()
    else:
        factors = low_rank_fisher(F_bar, fisher_rank)
        H = low_rank_projected_hessian(factors, basis.U, basis.W, eps).cpu()
        rank_error = factors.error
    fisher_mean = float(F_bar.sum(dtype=torch.float64)) / F_bar.numel()
    del F_bar
    Hx, quad, b = {}, {}, {}
    for mode, x in coords.items():
        terms = _task_terms(F, basis.U, basis.W, x, eps, lam, rows)
        if rows:
            Hx[mode], quad[mode] = terms
            b[mode] = lam @ Hx[mode]
        else:
            b[mode], quad[mode] = terms
        if isinstance(H, ImplicitHessian):
            H.hint(b[mode], lam @ x.to(torch.float64).cpu())
    residual = residual_energy_terms(basis, F, deltas, projection).cpu()
    return LayerCurvature(
        H=H,
        Hx=Hx,
        quad=quad,
        residual=residual,
        fisher_rank_error=rank_error,
        fisher_mean=fisher_mean,
        b=b,
    )


def _task_terms(
    F: Sequence[torch.Tensor] | torch.Tensor,
    U: torch.Tensor,
    W: torch.Tensor,
    x: torch.Tensor,
    eps: float,
    lam: torch.Tensor,
    rows: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One coordinate mode's terms (x: δ̃_t [T, p]): (rows H̃_t δ̃_t [T, p], or with `rows`
    False b = Σ_t λ_t H̃_t δ̃_t [p]) and the quadratic terms δ̃_tᵀ H̃_t δ̃_t [T], float64 on
    the CPU. Per task the lift X_t = U diag(δ̃_t) Wᵀ over the support of δ̃_t; then
    δ̃_tᵀ H̃_t δ̃_t = Σ_ab F_t X_t² + ε‖δ̃_t‖² (accumulated in float64), and
    H̃_t δ̃_t = diag(Uᵀ (F_t ∘ X_t) W) + εδ̃_t, whose product with W b needs once, for the
    weighted sum of the F_t ∘ X_t."""
    x64 = x.to(torch.float64).cpu()
    T = x64.shape[0]
    d_out, d_in = U.shape[0], W.shape[0]
    quad = torch.zeros(T, dtype=torch.float64)
    out = torch.zeros(T, U.shape[1], dtype=torch.float64) if rows else None
    acc = None
    X = _scratch("X", d_out * d_in, U).view(d_out, d_in)
    FX = _scratch("FX", d_out * d_in, U).view(d_out, d_in)
    for t in range(T):
        xt = x[t].to(U.device)
        support = torch.nonzero(xt).flatten()
        if support.numel() == 0:
            continue
        torch.mm(U[:, support] * xt[support].to(U.dtype), W[:, support].T, out=X)
        torch.mul(F[t], X, out=FX)
        # Σ_ab F_t X_t² by rows (float32 dots of d_in terms), the rows summed in float64.
        quad[t] = torch.linalg.vecdot(FX, X, dim=1).sum(dtype=torch.float64).cpu()
        if rows:
            out[t] = _diag_product(FX, U, W).cpu()
        elif acc is None:
            acc = torch.mul(
                FX, float(lam[t]), out=_scratch("acc", d_out * d_in, U).view(d_out, d_in)
            )
        else:
            acc.add_(FX, alpha=float(lam[t]))
    quad += eps * x64.square().sum(dim=1)
    if rows:
        return out + eps * x64, quad
    b = eps * (lam @ x64)
    if acc is not None:
        b += _diag_product(acc, U, W).cpu()
    return b, quad


def residual_energy_terms(
    basis: TaggedBasis,
    fishers: Sequence[torch.Tensor] | torch.Tensor,
    deltas: Sequence[torch.Tensor] | torch.Tensor,
    projection: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per task (δ_t^⊥)ᵀ diag(F_t) δ_t^⊥ with δ_t^⊥ = δ_t − S Sᵀ δ_t: [T] float64.

    One task at a time (intermediates of one [d_out, d_in] matrix), products in the basis'
    dtype on its device, the weighted sum of squares accumulated in float64. projection:
    Sᵀ vec(δ_t) [T, p] when already known (the basis artifact stores it), which saves one
    d_out·d_in·p product per task.
    """
    U, W = basis.U, basis.W
    d_out, d_in = U.shape[0], W.shape[0]
    perp = _scratch("X", d_out * d_in, U).view(d_out, d_in)
    out = []
    for t in range(len(deltas)):
        delta = deltas[t].to(device=U.device, dtype=U.dtype)
        if projection is None:
            coords = _diag_product(delta, U, W).to(U.dtype)  # Sᵀ vec(δ_t) [p]
        else:
            coords = projection[t].to(device=U.device, dtype=U.dtype)
        torch.addmm(delta, U * coords, W.T, alpha=-1.0, out=perp)  # δ_t − S Sᵀ δ_t
        perp.square_()
        # Σ_ab F_t (δ_t^⊥)² by rows (float32 dots of d_in terms), the rows summed in float64.
        fisher = fishers[t].to(device=U.device, dtype=U.dtype)
        out.append(torch.linalg.vecdot(fisher, perp, dim=1).sum(dtype=torch.float64))
    return torch.stack(out)


# --------------------------------------------------------------------------- diagnostics


def curvature_heterogeneity(
    H: torch.Tensor | HessianOperator, b: torch.Tensor, delta_bar: torch.Tensor
) -> float:
    """η = cᵀ H̄⁻¹ c with c = b − H̄ δ̄ (Theorem 3); η = F(δ̃_I) − F(δ̃_H) ≥ 0."""
    c = b.to(torch.float64) - times(H, delta_bar)
    if isinstance(H, HessianOperator):
        # H̄⁻¹ c = H̄⁻¹ b − δ̄: the solve the merge has already done, not a second one.
        return max(float(c @ (H.solve(b) - delta_bar.to(torch.float64))), 0.0)
    return max(float(c @ solve_spd(H, c)), 0.0)


def frechet_variance(
    H: torch.Tensor | HessianOperator, b: torch.Tensor, quad: torch.Tensor, weights: torch.Tensor
) -> float:
    """V_S of Theorem 2, the irreducible conflict: the Fréchet objective at its minimiser
    δ̃* = H̄⁻¹b (Theorem 1),

        V_S = F(δ̃*) = C − bᵀ H̄⁻¹ b,   C = Σ_t λ_t δ̃_tᵀ H̃_t δ̃_t,

    (eq. 39 of the appendix). H: H̄ [p, p] or an operator that solves it; b: [p]; quad: [T]
    δ̃_tᵀ H̃_t δ̃_t; weights: λ_t [T]. Float64; clamped at 0 (a round-off negative).
    """
    b64 = b.to(torch.float64)
    x = H.solve(b64) if isinstance(H, HessianOperator) else solve_spd(H, b64)
    value = float((weights.to(torch.float64) * quad.to(torch.float64)).sum() - b64 @ x)
    return max(value, 0.0)


def subspace_variance(
    H: torch.Tensor | HessianOperator,
    b: torch.Tensor,
    quad: torch.Tensor,
    delta_m: torch.Tensor,
    weights: torch.Tensor,
) -> float:
    """The Fréchet objective at given coordinates δ̃_m [p] (the merge report's `V_S_merged`;
    Theorem 2's V_S is this at the minimiser, `frechet_variance`):

    Σ_t λ_t (δ̃_m − δ̃_t)ᵀ H̃_t (δ̃_m − δ̃_t), expanded so no H̃_t is needed:
    δ̃_mᵀ H̄ δ̃_m − 2 δ̃_mᵀ b + Σ_t λ_t δ̃_tᵀ H̃_t δ̃_t (H̃_t symmetric).
    """
    d = delta_m.to(torch.float64)
    value = float(
        d @ times(H, d) - 2.0 * (d @ b.to(torch.float64)) + (weights.to(torch.float64) * quad).sum()
    )
    return max(value, 0.0)


def residual_energy(residual_terms: torch.Tensor, weights: torch.Tensor) -> float:
    """R_S = Σ_t λ_t (δ_t^⊥)ᵀ diag(F_t) δ_t^⊥ (Theorem 2)."""
    return float((weights.to(torch.float64) * residual_terms.to(torch.float64)).sum())


def frechet_objective(
    delta: torch.Tensor,
    hessians: Sequence[torch.Tensor],
    coords: torch.Tensor,
    weights: torch.Tensor,
) -> float:
    """F(δ) = Σ_t λ_t (δ − δ̃_t)ᵀ H̃_t (δ − δ̃_t) with explicit per-task H̃_t [p, p]; tests only."""
    total = 0.0
    for t, H_t in enumerate(hessians):
        r = delta.to(torch.float64) - coords[t].to(torch.float64)
        total += float(weights[t]) * float(r @ (H_t.to(torch.float64) @ r))
    return total
