"""The per-layer tagged basis shared by TSV-M and EpiMer (paper eq. 10, docs/algorithms.md).

For one matrix layer with task vectors δ_t ∈ R^{d_out × d_in}:

1. per task, the top k_ℓ singular triplets δ_t ≈ U_t diag(σ_t) V_tᵀ;
2. U = [U_1 … U_T] (d_out × p), W = [V_1 … V_T] (d_in × p), σ = [σ_1 … σ_T], p = k_ℓ·T,
   and the owner tag t of every atom;
3. Procrustes whitening: U = P Σ Qᵀ → U⊥ = P Qᵀ (the orthonormal matrix nearest to U),
   the same for W.

The atoms s_i = vec(u_i w_iᵀ) of the whitened factors are orthonormal, SᵀS = I_p.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import glob
import itertools
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

log = logging.getLogger(__name__)

#: Singular values of the stacked factors below RCOND·σ_max count as zero in the polar
#: factor (see `polar_factor`). Only exactly dependent atoms (e.g. identical task
#: vectors) fall below it; generic inputs are whitened exactly as in TSV-M.
RCOND = 1e-6

#: Near-equal singular values: consecutive Ritz values σ̃_{i+1} ≥ (1 − CLUSTER_GAP)·σ̃_i belong
#: to one cluster. Where the cluster holding σ̃_k runs on to CLUSTER_GUARD Ritz values past k,
#: the top-k subspace is not determined to better than the cluster's width, and those of the
#: k triplets inside it are accepted as any basis of the cluster (`_accepted`).
CLUSTER_GAP = 0.02
CLUSTER_GUARD = 4
#: The residual ‖Mv − σ̃u‖ a triplet inside that cluster may keep, relative to its own σ̃.
CLUSTER_RESID = 0.1
#: The cluster rule is opt-in: set to 1, a flat tail at k is accepted as any basis of its
#: cluster (the triplets are then not the exact top k, the merge moves by up to the cluster's
#: freedom, and on the benchmark's flat spectra the iteration costs more than the float32-Gram
#: exact path: docs/numerics.md, docs/performance.md). Unset or 0, every triplet
#: meets rtol, by iteration or on the exact path, as TSV-M's full SVD would give.
CLUSTER_ENV = "PIPELINE_SVD_CLUSTERS"
#: Set to 1, every truncated SVD takes the exact path (`gram_svd`): the reference that
#: benchmarks/merge.py compares the merges with.
EXACT_ENV = "PIPELINE_EXACT_SVD"


#: Null triplets: σ ≤ max(NULL_FLOOR, rtol)·σ₁. Below NULL_FLOOR a Gram eigensolve cannot
#: resolve σ (float64: ≈ 10⁻⁸·σ₁); below rtol·σ₁ any unit vectors pass the acceptance rule,
#: so such a triplet's directions are arbitrary (noise, or the float32 rounding of an exactly
#: rank-deficient task vector), and two paths would pick different ones. Both singular vectors
#: of a null triplet are zero, whichever path computed it (`_drop_null`, `_exact_task`).
NULL_FLOOR = 1e-7


def _default_rtol(dtype: torch.dtype) -> float:
    """The acceptance tolerance where none is given: 1e-9 for float64, 1e-5 otherwise."""
    return 1e-9 if dtype == torch.float64 else 1e-5


def _null_floor(rtol: float) -> float:
    """σ/σ₁ at or below which a triplet is null (`NULL_FLOOR`)."""
    return max(NULL_FLOOR, rtol)


def _env_flag(name: str) -> bool:
    """Whether the switch `name` (CLUSTER_ENV, EXACT_ENV) is on: set, and not to 0."""
    return os.environ.get(name, "") not in ("", "0")


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
        return TaggedBasis(
            self.U.to(dtype), self.W.to(dtype), self.sigma.to(dtype), self.tags, self.k
        )


def effective_rank(shape: Sequence[int], k: int, num_tasks: int) -> int:
    """k_ℓ = min(k, ⌊min(d_out, d_in) / T⌋): the largest per-task rank with p = k_ℓ·T orthonormal atoms."""
    if k < 1:
        raise ValueError(f"k must be a positive integer, got {k}")
    return min(k, min(int(shape[0]), int(shape[1])) // num_tasks)


def gram_svd(
    delta: torch.Tensor, k: int, rtol: float | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k singular triplets from an eigensolve of the smaller Gram matrix, as float64.

    The exact path: the top k eigenpairs of the min(d_out, d_in)² Gram matrix (`_lapack_top_eigh`
    on the CPU), the other side's vectors from one float64 product with delta. For float32 input
    the Gram and its eigensolve are float32 and every triplet is checked in float64 against
    the acceptance rule; a matrix that fails it gets the float64 Gram (`SINGLE_GRAM_RTOL`).
    Null triplets (σ within max(1e-7, rtol)·σ₁ of zero, `NULL_FLOOR`: delta of rank < k) get
    zero singular vectors on both sides, as the iteration's (`_drop_null`), instead of
    amplified noise on one side and an arbitrary null-space direction on the other.
    `_exact_path` runs it for several matrices at once.
    """
    return _exact_path([delta], k, rtol)[0]


#: For float32 task vectors on the CPU the exact path forms the Gram matrix and its
#: eigensolve in float32 (`?syrk`, `?syevr`: half the work of float64), then measures every
#: triplet's residual ‖aᵀu_i − σ_i v_i‖ in float64 and keeps the result only if each is within
#: rtol·σ_1 (the iteration's acceptance rule). The float32 Gram leaves residuals of about
#: 10⁻⁸·σ_1²/σ_i, so this holds where σ_k is above ≈ σ_1/60 (real task vectors, and every
#: benchmark family; a rank below k too, whose null triplets, `NULL_FLOOR`, are not tested);
#: a matrix that fails gets the float64 Gram.
#: Only where rtol ≥ SINGLE_GRAM_RTOL (the float32 default is 1e-5); float64 input and a
#: tighter rtol take the float64 Gram at once.
SINGLE_GRAM_RTOL = 1e-6


def _single_gram(dtype: torch.dtype, device: torch.device, rtol: float | None) -> bool:
    """Whether the exact path starts from a float32 Gram (`SINGLE_GRAM_RTOL`)."""
    if device.type != "cpu" or dtype == torch.float64:
        return False
    return rtol is None or rtol >= SINGLE_GRAM_RTOL


def _exact_path(
    deltas: Sequence[torch.Tensor], k: int, rtol: float | None = None, *, single: bool | None = None
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """`gram_svd` of each matrix. On the CPU each matrix's whole exact path (`_exact_task`:
    Gram, eigensolve, the other side's vectors and, after a float32 Gram, the float64 check)
    runs in NumPy and LAPACK calls that hold no GIL (`pipeline.lapack`), one BLAS thread
    each (`_one_blas_thread`), on the shared worker threads (`pipeline.parallel`), as many
    matrices at a time as torch has threads; each matrix's result is the same whichever
    thread computes it. Elsewhere torch's GEMM and full `eigh` in float64. `single`: float32
    Gram first (`SINGLE_GRAM_RTOL`; default: for float32 input on the CPU)."""
    from pipeline import parallel

    if not deltas:
        return []
    device = deltas[0].device
    if device.type != "cpu":
        floor = _null_floor(rtol if rtol is not None else _default_rtol(deltas[0].dtype))
        out = []
        for d in deltas:
            a = d.detach().to(torch.float64)
            out.append(_gram_triplets(a, *_torch_top_eigh(a, k), floor))
        return out
    if single is None:
        single = _single_gram(deltas[0].dtype, device, rtol)
    tol = rtol if rtol is not None else _default_rtol(deltas[0].dtype)
    floor = _null_floor(tol)
    work = [
        (d.detach().float() if single else d.detach().to(torch.float64)).numpy() for d in deltas
    ]
    width = max(1, min(torch.get_num_threads(), parallel.available_cores(), len(work)))
    check = tol if single else None
    with _one_blas_thread():
        if width == 1:
            found = [_exact_task(a, k, check, floor) for a in work]
        else:
            # `width` lanes, each taking the next matrix when it is free: never more at once
            # than `width`, and a lane on a core shared with another process takes fewer.
            found = [None] * len(work)
            queue = itertools.count()  # next() is atomic under the GIL

            def lane(_: int) -> None:
                while (i := next(queue)) < len(work):
                    found[i] = _exact_task(work[i], k, check, floor)

            for _ in parallel.pool().map(lane, range(width)):
                pass
    out: list = [
        None if triplets is None else tuple(torch.from_numpy(x) for x in triplets)
        for triplets in found
    ]
    failed = [i for i, triplets in enumerate(out) if triplets is None]
    if failed:
        log.debug(
            "float32 Gram short of rtol %.1e for %d of %d matrices of shape %s, k=%d: float64 Gram",
            tol,
            len(failed),
            len(deltas),
            tuple(deltas[0].shape),
            k,
        )
        redo = _exact_path([deltas[i] for i in failed], k, rtol, single=False)
        for i, triplets in zip(failed, redo):
            out[i] = triplets
    return out


def _exact_task(
    an: np.ndarray, k: int, check: float | None, floor: float = NULL_FLOOR
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """One matrix's exact path in NumPy and GIL-free LAPACK (`pipeline.lapack`), for a worker
    thread: U [d_out, k], σ [k], V [d_in, k] (float64) of an [d_out, d_in].

    The top k eigenpairs of the smaller side's Gram in an's dtype (`_lapack_top_eigh`). From a
    float64 Gram (`check` None): σ = √λ, the other side's vectors from one float64 product.
    From a float32 Gram (`check` = rtol): a float64 Rayleigh–Ritz step on the eigenvectors'
    span (v orthonormalised, C = a V, CᵀC = R Σ² Rᵀ: V ← V R, U = C R Σ⁻¹, both sides
    orthonormal to float64 round-off, σ descending), and the triplets returned only if each
    residual ‖aᵀu_i − σ_i v_i‖ is within rtol·σ_1 (None otherwise: the caller takes the
    float64 Gram); its two products with a convert a to float64 by blocks of rows
    (`CHECK_BLOCK`). Null triplets (σ ≤ floor·σ₁, `NULL_FLOOR`) get zero vectors on both sides."""
    from pipeline import lapack

    try:
        evals, small = _lapack_top_eigh(an, k)
    except np.linalg.LinAlgError:
        if check is None:
            raise
        return None  # a float32 Gram out of range (entries near 1e19 and up): the float64 one
    tall = an.shape[0] >= an.shape[1]
    small = np.ascontiguousarray(small, dtype=np.float64)
    if check is None:  # an is float64
        s = np.sqrt(np.maximum(evals.astype(np.float64), 0.0))
        other = lapack.matmul(an if tall else an.T, small)  # [n_large, k] = vectors · σ
    else:
        if lapack.orthonormalize(small) is None:
            return None
        C = np.empty((max(an.shape), small.shape[1]))  # A small, A = an (tall) or anᵀ
        for r0, r1, rows in _rows64(an, tall):
            C[r0:r1] = lapack.matmul(rows, small)
        lam, R = lapack.top_eigh(lapack.small_gram(C), k, partial=False)  # CᵀC, descending
        s = np.sqrt(np.maximum(lam, 0.0))
        small = lapack.matmul(small, np.ascontiguousarray(R))
        other = lapack.matmul(C, np.ascontiguousarray(R))
    tiny = s <= floor * max(float(s.max(initial=0.0)), np.finfo(np.float64).tiny)
    other /= np.where(tiny, 1.0, s)
    other[:, tiny] = 0.0
    small[:, tiny] = 0.0  # both sides, as `_drop_null` leaves the iteration's
    if check is not None:
        resid = -small * s  # + Aᵀ other: aᵀu − σv for tall a (a u − σv wide)
        for r0, r1, rows in _rows64(an, tall):
            resid += lapack.matmul(rows.T, other[r0:r1])
        r = np.sqrt(np.einsum("ij,ij->j", resid, resid))
        r[tiny] = 0.0
        if not bool((r <= check * max(float(s[0]), np.finfo(np.float64).tiny)).all()):
            return None
    if tall:
        return other, s, small
    return small, s, other


#: The float64 products that check a float32 Gram's triplets (`_exact_task`) convert the matrix
#: to float64 a block of rows at a time, CHECK_BLOCK elements (1.5 MiB: 256 rows of 768), which
#: stays in cache between its conversion and its product, instead of writing and reading back a
#: float64 copy of the whole matrix: that stage takes about a quarter less time at 3072 × 768
#: and 2304 × 768 (`_exact_task` on one thread, float32 power-law matrices, k = 32; 2-core
#: AMD EPYC virtual machine, 2026-12-07, package 0.1.0).
CHECK_BLOCK = 196608


def _rows64(an: np.ndarray, tall: bool):
    """(start, stop, float64 copy of rows start:stop) of A = an (tall) or anᵀ (wide), in blocks
    of about CHECK_BLOCK elements."""
    A = an if tall else an.T
    step = max(64, CHECK_BLOCK // max(1, A.shape[1]))
    for r0 in range(0, A.shape[0], step):
        r1 = min(A.shape[0], r0 + step)
        yield r0, r1, A[r0:r1].astype(np.float64)


def _gram_triplets(
    a: torch.Tensor, evals: torch.Tensor, small: torch.Tensor, floor: float = NULL_FLOOR
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, σ, V of a [d_out, d_in] (float64) from the top eigenpairs of its smaller Gram matrix:
    eigenvalues [k] descending, eigenvectors `small` [n_small, k] (the path off the CPU);
    null triplets (σ ≤ floor·σ₁) zero on both sides."""
    tall = a.shape[0] >= a.shape[1]
    s = evals.clamp_min(0.0).sqrt()
    other = (a @ small) if tall else (a.T @ small)  # = other-side vectors · s
    tiny = s <= floor * s.max().clamp_min(torch.finfo(torch.float64).tiny)
    other = other / torch.where(tiny, torch.ones_like(s), s)
    other[:, tiny] = 0.0
    small = small.clone()
    small[:, tiny] = 0.0  # both sides, as `_drop_null` leaves the iteration's
    if tall:
        return other, s, small
    return small, s, other


def _torch_top_eigh(a: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top k eigenpairs of a's smaller Gram matrix by torch's full `eigh` (descending)."""
    evals, evecs = torch.linalg.eigh(a.mT @ a if a.shape[0] >= a.shape[1] else a @ a.mT)
    return evals.flip(0)[:k], evecs.flip(1)[:, :k]


#: The exact path's eigensolvers on one CPU thread, in float32 multiply-adds (seconds × twice
#: the float64 GEMM rate, as `exact_cost` counts): LAPACK's full symmetric eigensolve of an
#: n × n matrix ≈ full·n³; its top k eigenpairs (tridiagonal reduction, then MRRR on the
#: k wanted values and their back-transformation) ≈ partial·n³ + vector·n·k; for a
#: float64 matrix (`EIGH64`) and a float32 one (`EIGH32`), each (full, partial, vector).
#: Measured on a 2-core AMD EPYC virtual machine (AVX-512), 2026-12-06, scipy 1.17's OpenBLAS
#: through `pipeline.lapack`, one thread, medians of 3, at the float64 GEMM rate of 25 GMAC/s:
#: float64 n = 768: full 0.077 s, top 8 0.024 s, top 32 0.031 s, top 192 0.078 s; n = 1024:
#: full 0.194 s, top 32 0.080 s, top 256 0.179 s. float32 n = 768: full 0.046 s, top 32
#: 0.017 s, top 192 0.037 s; n = 1024: full 0.133 s, top 32 0.044 s, top 256 0.082 s. The
#: Gram by a symmetric rank-n_large update (one triangle: `?syrk`) at 3072 × 768: 0.038 s in
#: float64, 0.020 s in float32.
EIGH64 = (11.0, 2.5, 2.0e4)
EIGH32 = (5.5, 1.6, 8.0e3)


def _partial_eigh_pays(n: int, k: int, single: bool = False) -> bool:
    """Whether the top-k eigensolve of an n × n matrix costs less than the full one."""
    full, partial, vector = EIGH32 if single else EIGH64
    return k < n and partial * n**3 + vector * n * k < full * n**3


def _lapack_top_eigh(an: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The top k eigenpairs of the Gram matrix of an's smaller side (anᵀan for tall an), in
    an's dtype (float32 or float64), through LAPACK without the GIL (`pipeline.lapack`; NumPy
    only, for worker threads): eigenvalues [k] descending, eigenvectors [n_small, k]. The
    Gram's upper triangle by `?syrk` (half a GEMM's work), then `?syevr` for the top k pairs
    where that costs less than the full eigensolve (`_partial_eigh_pays`), else the full
    divide-and-conquer `?syevd`."""
    from pipeline import lapack

    n = min(an.shape)
    partial = _partial_eigh_pays(n, k, an.dtype == np.float32)
    gram = lapack.small_gram(an)
    if not np.isfinite(gram).all():
        raise np.linalg.LinAlgError(f"the {n} × {n} Gram matrix in {an.dtype} is not finite")
    return lapack.top_eigh(gram, k, partial=partial)


@functools.cache
def _scipy_blas_threads() -> tuple | None:
    """(get, set) of the thread count of the OpenBLAS that scipy's wheels bundle, or None where
    scipy uses another BLAS (left as it is)."""
    import scipy

    root = os.path.dirname(os.path.dirname(scipy.__file__))
    for path in sorted(glob.glob(os.path.join(root, "scipy.libs", "libscipy_openblas*.so*"))):
        try:
            lib = ctypes.CDLL(path)  # the copy scipy has loaded: the same handle
            return lib.scipy_openblas_get_num_threads, lib.scipy_openblas_set_num_threads
        except (OSError, AttributeError):
            continue
    return None


@contextlib.contextmanager
def _one_blas_thread():
    """scipy's OpenBLAS on the calling thread only, for the duration. Its worker threads spin
    after each call, outside the OpenMP wait policy (docs/performance.md, "Threads and
    contention"), and take the cores that torch's team needs next: with them, a batch of
    exact paths at 2 threads cost twice the CPU seconds of torch's full eigensolve."""
    blas = _scipy_blas_threads()
    before = blas[0]() if blas else 1
    if before != 1:
        blas[1](1)
    try:
        yield
    finally:
        if before != 1:
            blas[1](before)


def exact_cost(n_small: int, n_large: int, k: int, single: bool = False) -> float:
    """Work of the exact path for one task's top k (`gram_svd`), in float32 multiply-adds.

    float64 (`single` False): the Gram matrix (one triangle, n_small²·n_large/2 products at
    half the float32 rate), its eigensolve (the cheaper of the full and the top-k one,
    `EIGH64`) and the product for the other side's vectors (n_small·n_large·k in float64).
    float32 Gram (`single`, `SINGLE_GRAM_RTOL`): half that Gram, the float32 eigensolve
    (`EIGH32`), and two float64 products with the matrix (the Rayleigh–Ritz step's and the
    residual check's)."""
    n = float(n_small)
    full, partial, vector = EIGH32 if single else EIGH64
    eig = full * n**3
    if _partial_eigh_pays(n_small, k, single):
        eig = partial * n**3 + vector * n * k
    if single:
        return 0.5 * n * n * n_large + eig + 4.0 * n * n_large * k
    return n * n * n_large + eig + 2.0 * n * n_large * k


def step_cost(n_small: int, n_large: int, block: int) -> float:
    """Work of one step of the subspace iteration for one task, in float32 multiply-adds: two
    products with the matrix (2·n_small·n_large·block) and STEP_OVERHEAD·n_small·block² for
    the rest of the step (`STEP_OVERHEAD`)."""
    return 2.0 * n_small * n_large * block + STEP_OVERHEAD * n_small * block * block


#: The work of a step besides its two products with the matrix, in units of n_small·block²
#: float32 multiply-adds: the Householder QR of the [n_small, block] block, the Rayleigh–Ritz
#: step (the block's [block, block] Gram and its eigensolve) and the residual estimates.
#: These run far below the GEMM rate (small LAPACK calls, one per task), so their share is
#: measured, not counted: on a 2-core AMD EPYC virtual machine (2026-12-06, torch 2.14.1, two
#: threads, T = 8 tasks of ViT-B/32's layers, block 72, k = 32, float32) a step of all 8 tasks
#: took 18 ms at 768 × 768 (the two GEMMs 9.5 ms), 36 ms at 2304 × 768, 47 ms at 3072 × 768 and
#: 49 ms at 768 × 3072, against 106, 176, 215 and 211 ms for the 8 tasks' exact path (two
#: lanes): 6.0, 4.8, 4.6 and 4.3 steps, which `exact_cost` / `step_cost` gives with 30–38
#: here. Their multiply-adds alone (≈ 10) would give 9.8, 6.2, 5.6 and 5.6.
STEP_OVERHEAD = 30.0


def steps_worth(n_small: int, n_large: int, block: int, k: int, single: bool = False) -> float:
    """How many steps of subspace iteration cost what one task's exact path costs:
    `exact_cost` / `step_cost` (`single`: against the float32 Gram)."""
    return exact_cost(n_small, n_large, k, single) / step_cost(n_small, n_large, block)


def step_budget(n_small: int, n_large: int, block: int, k: int, single: bool = False) -> int:
    """Steps of subspace iteration a task's top k may take, with a block of `block` vectors:
    as many as cost no more than the exact path (`steps_worth`, whole steps). Below 3 (a
    block that is a large part of the matrix, or a cheap exact path) the exact path is taken
    at once."""
    return int(steps_worth(n_small, n_large, block, k, single))


def truncated_svd(
    delta: torch.Tensor,
    k: int,
    *,
    rtol: float | None = None,
    max_iter: int | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k singular triplets of `delta` [d_out, d_in]: U [d_out, k], s [k], V [d_in, k] (float64).

    The one-matrix case of `truncated_svd_batch` (same algorithm, same acceptance test).
    """
    U, s, V = truncated_svd_batch(delta.unsqueeze(0), k, rtol=rtol, max_iter=max_iter, seed=seed)
    return U[0], s[0], V[0]


def truncated_svd_batch(
    deltas: torch.Tensor,
    k: int,
    *,
    rtol: float | None = None,
    max_iter: int | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k singular triplets of each of T matrices at once.

    deltas: [T, d_out, d_in] → U [T, d_out, k], s [T, k], V [T, d_in, k], float64, on deltas' device.
    max_iter: the steps a task may take (default `step_budget` of the shape).

    Randomised subspace iteration on a block of l = max(2k + 8, 32) vectors, batched over the
    T tasks, with the large products in the dtype of `deltas` (float32: half the memory
    traffic of float64 and twice the GEMM rate). It runs on M, the task matrix turned so that
    its rows are its smaller side (M = δᵀ for tall δ), from a random start block
    (`_start_block`). A step is two GEMMs, B = QᵀM and the next block M Bᵀ; B's Rayleigh–Ritz
    triplets (`_rayleigh_ritz`) and their residuals, read off the next block for free
    (`_residual_estimate`), decide when a task takes the float64 acceptance test (`_Iteration`).
    A task is accepted once every kept triplet has ‖M v_i − σ_i u_i‖ ≤ rtol·σ_1 (default rtol:
    1e-5 for float32, 1e-9 for float64), except inside a cluster of near-equal singular values
    at k under the opt-in cluster rule (`_accepted`, docs/numerics.md).

    Bounded work: a task takes at most `step_budget` steps, as many as cost what the exact
    path costs (`steps_worth`: `exact_cost` / `step_cost`; float32 input: its float32 Gram).
    The first task's first product B = QᵀM probes the layer: where its Ritz values predict
    steps that, with `FIRST_STEP_MARGIN`, cost what the exact path costs
    (`_first_step_steps`: no gap at k, as in a power law or a noise floor) every task takes
    the exact path at once, for 1/T of a product.
    Otherwise the other tasks' first products follow, and each task so predicted leaves for
    the exact path having cost half a step; from the third step on a task switches to the
    exact path as soon as its rate of progress predicts more steps than the budget has left
    (the only rule under the opt-in cluster rule); where the budget is under 3 steps, the
    exact path is taken at once. A task that is not accepted within its budget gets the exact
    path (`gram_svd`), so the result never depends on luck.
    """
    T, d_out, d_in = deltas.shape
    l = max(2 * k + 8, 32)
    n_small, n_large = min(d_out, d_in), max(d_out, d_in)
    single = _single_gram(deltas.dtype, deltas.device, rtol)
    worth = steps_worth(n_small, n_large, l, k, single) if max_iter is None else float(max_iter)
    if 2 * l >= n_small or worth < 3 or _env_flag(EXACT_ENV):
        return _stack_triplets(_exact_path(list(deltas), k, rtol))
    run = _Iteration(deltas, k, rtol, worth)
    M = run.M  # [T, n_small, n_large]
    omega = _start_block(M, l, seed)
    active = torch.arange(T)  # tasks still iterating
    Y = None
    first = None  # the first task's first product, where it probed the layer's spectrum
    Q0 = torch.linalg.qr(omega)[0]  # the start block's orthonormal basis, shared by all tasks
    if T > 1 and not _env_flag(CLUSTER_ENV):
        # The tasks of one layer are fine-tuned from one θ0 with one recipe, and their spectra
        # share a shape: the first task's first product speaks for the batch. Predicted slow
        # (no gap at k), every task takes the exact path at once, for 1/T of a product instead
        # of T halves of a step (about a tenth of what the exact path costs).
        first = _batched_mm(Q0.mT.unsqueeze(0), M[:1])
        coarse = first.dtype != torch.float64
        if bool(run.slow_start(_rayleigh_ritz(Q0.unsqueeze(0), first, k, coarse)).all()):
            log.debug(
                "first product of shape %s predicts more steps than the exact path costs, k=%d: "
                "exact Gram eigensolve for all %d tasks",
                tuple(deltas.shape[1:]),
                k,
                T,
            )
            return _stack_triplets(_exact_path(list(deltas), k, rtol))
    for step in range(run.budget):
        # Householder QR: orthonormal to the products' round-off whatever Y's conditioning
        # (the power steps make it ill-conditioned), and Q enters the GEMMs in that dtype anyway.
        Q = Q0.expand(T, -1, -1) if Y is None else torch.linalg.qr(Y)[0]
        Ma = M[active] if active.numel() < T else M
        if step == 0 and first is not None:
            B = torch.cat([first, _batched_mm(Q.mT[1:], Ma[1:])])
        else:
            B = _batched_mm(Q.mT, Ma)  # [n, l, n_large]
        coarse = B.dtype != torch.float64 and bool((run.previous[active] > 1e-2).all())
        ritz = _rayleigh_ritz(Q, B, k, coarse)
        if step == 0 and not _env_flag(CLUSTER_ENV):
            # The cost model on the first product's Ritz values: a task predicted to cost the
            # exact path's work or more (FIRST_STEP_MARGIN) leaves for the exact path before
            # the power step.
            # Not under the cluster rule, which accepts a flat tail at k by iterating: a
            # random block's Ritz values spread such a cluster wider than CLUSTER_GAP.
            slow = run.slow_start(ritz)
            if bool(slow.all()):
                break
            if bool(slow.any()):
                rest = ~slow
                active, Ma, Q, B = (x[rest.to(x.device)] for x in (active, Ma, Q, B))
                ritz = ritz.select(rest)
        done, tried = run.early(active, Q, B, ritz)
        if bool(done.all()):
            break
        if bool(done.any()):
            rest = ~done
            active, Ma, Q, B, tried = (x[rest.to(x.device)] for x in (active, Ma, Q, B, tried))
            ritz = ritz.select(rest)
        Y = _batched_mm(Ma, B.mT)  # [n, n_small, l]: M Mᵀ Q, the next block
        keep = run.keep(step, active, Q, B, ritz, _residual_estimate(Y, ritz), tried)
        if not bool(keep.any()):
            break
        if not bool(keep.all()):
            active, Y = active[keep], Y[keep.to(Y.device)]
    return run.finish(deltas)


def _start_block(M: torch.Tensor, l: int, seed: int) -> torch.Tensor:
    """The start block [n_small, l] in M's dtype on M's device, drawn on the CPU from `seed`:
    deterministic, and the same on every device.

    Why this orientation and start: the QR is on the smaller side (a [3072, 72] Householder
    QR costs twice a GEMM pass over the matrix; a [768, 72] one a third of it), and starting
    from a random block rather than δ·Ω puts the Rayleigh–Ritz steps after the 1st, 3rd,
    5th… product instead of the 2nd, 4th, 6th: on the benchmark's task vectors the 5th
    product's triplets already pass at 1e-5, so a layer takes five GEMM passes, not six.
    """
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(M.shape[1], l, generator=gen, dtype=M.dtype).to(M.device)


class _Ritz(NamedTuple):
    """One step's Rayleigh–Ritz triplets of the active tasks (`_rayleigh_ritz`), n of them."""

    s: torch.Tensor  # [n, k] the top k Ritz values σ̃, descending
    s_all: torch.Tensor  # [n, l] all l Ritz values, descending
    Ub: torch.Tensor  # [n, l, k] their eigenvectors of B Bᵀ
    U: torch.Tensor  # [n, n_small, k] = Q Ub (float64)
    null: torch.Tensor  # [n, k] σ̃ ≈ 0: not tested
    rate: torch.Tensor  # [n] (CPU) a step's convergence factor for σ̃_k, (σ̃_l / σ̃_k)²
    coarse: bool  # the Gram B Bᵀ was formed in float32

    def select(self, rows: torch.Tensor) -> _Ritz:
        return _Ritz(*(x[rows.to(x.device)] for x in self[:6]), self.coarse)

    def exact(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Task i's (σ̃, Ub, all Ritz values) for `_ritz64` where its Gram was float64."""
        return None if self.coarse else (self.s[i], self.Ub[i], self.s_all[i])


def _rayleigh_ritz(Q: torch.Tensor, B: torch.Tensor, k: int, coarse: bool) -> _Ritz:
    """The Rayleigh–Ritz triplets of B = QᵀM [n, l, n_large], Q [n, n_small, l] orthonormal.

    Their vectors never feed the iteration (the next block is M Bᵀ), only the residual
    estimates: far from convergence (`coarse`) a float32 Gram does that at a third of the cost
    of a float64 one, and triplets that go to the float64 test get a float64 Gram (`_ritz64`).
    """
    tiny = torch.finfo(torch.float64).tiny
    if coarse:
        gram = (B @ B.mT).to(torch.float64)
    else:
        B64 = B.to(torch.float64)
        gram = B64 @ B64.mT
    evals, Ub = torch.linalg.eigh(gram)  # ascending, [n, l], [n, l, l]
    # The convergence factor of a step for the k-th triplet, (σ_{l+1}/σ_k)², from the Ritz values.
    rate = (evals[:, 0].clamp_min(0.0) / evals[:, -k].clamp_min(tiny)).cpu()
    s_all = evals.flip(-1).clamp_min(0.0).sqrt()  # [n, l], descending
    s = s_all[:, :k]  # [n, k]
    Ub = Ub.flip(-1)[:, :, :k]  # [n, l, k]
    # Thin products as (Ubᵀ Xᵀ)ᵀ: on MKL about 2× faster than X Ub for these shapes.
    U = (Ub.mT @ Q.to(torch.float64).mT).mT  # [n, n_small, k]
    null = s <= 1e-7 * s[:, :1].clamp_min(tiny)  # not tested
    return _Ritz(s, s_all, Ub, U, null, rate, coarse)


def _residual_estimate(Y: torch.Tensor, ritz: _Ritz) -> torch.Tensor:
    """‖M v_i − σ̃_i u_i‖ / σ̃_1 [n, k] (CPU) from the next block Y = M Bᵀ [n, n_small, l]:
    M V = Y Ub / σ̃ in the products' dtype. It only decides when to run the float64 test."""
    tiny = torch.finfo(torch.float64).tiny
    inv = 1.0 / ritz.s.clamp_min(tiny)
    MV = (ritz.Ub.mT.to(Y.dtype) @ Y.mT).mT.to(torch.float64) * inv.unsqueeze(1)
    resid = torch.linalg.vector_norm(MV - ritz.U * ritz.s.unsqueeze(1), dim=1).masked_fill(
        ritz.null, 0.0
    )  # [n, k]
    return (resid / ritz.s[:, :1].clamp_min(tiny)).cpu()  # relative to σ̃_1


class _Iteration:
    """The per-task state and decisions of one `truncated_svd_batch` run.

    Per step, for Q an orthonormal basis of the block Y (Householder QR in the products'
    dtype, of a [min(d_out, d_in), l] block):

        B = Qᵀ M            [l, n_large]   (one GEMM, d_out·d_in·l)
        B Bᵀ = Ub Λ Ubᵀ     [l, l]         (Rayleigh–Ritz, float64)
        U = Q Ub, σ = √Λ, V = Bᵀ Ub / σ
        Y ← M Bᵀ = M Mᵀ Q   [n_small, l]   (the next power step, one GEMM)

    and the residual MV − Uσ = Y Ub / σ − Uσ comes from the new Y for free. The acceptance
    test (`test`) re-measures it in float64 on the original matrix, after one float64 Cholesky
    QR step has made U's columns orthonormal to float64 round-off (Mᵀu_i = σ_i v_i holds by
    construction, so this residual is the whole test). From the second step on, a task whose
    last residual, times this step's convergence factor (σ̃_l / σ̃_k)² read off the Ritz
    values, predicts a residual below rtol/4 takes that test straight after B, before the
    power step's GEMM, which it then skips if accepted (`early`). `keep` tests the others
    whose estimate passes, and hands to the exact path those whose progress predicts more
    steps than the budget has left; `slow_start`, after the first product, those whose Ritz
    values already predict steps that cost the exact path's work (`FIRST_STEP_MARGIN`).
    """

    def __init__(self, deltas: torch.Tensor, k: int, rtol: float | None, worth: float) -> None:
        T, d_out, d_in = deltas.shape
        A = deltas if deltas.dtype in (torch.float32, torch.float64) else deltas.float()
        # worth: the steps the exact path costs (`steps_worth`); budget: the whole ones.
        self.k, self.worth, self.budget = k, worth, int(worth)
        self.rtol = rtol if rtol is not None else _default_rtol(A.dtype)
        self.flip = d_out > d_in
        self.M = A.mT if self.flip else A  # a view: the GEMMs take either layout
        self.out: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] = [None] * T
        # The last step's residual estimate (max_i over the triplets) and its distance to
        # acceptance, max_i r_i / (what triplet i may keep), per task.
        self.previous = torch.full((T,), float("inf"), dtype=torch.float64)
        self.distance = torch.full((T,), float("inf"), dtype=torch.float64)
        # For the float64 tests, in M's layout (a plain copy).
        self.scratch = torch.empty_like(self.M[0], dtype=torch.float64)

    def test(self, t: int, Q: torch.Tensor, B: torch.Tensor, ritz: tuple | None) -> bool:
        """The float64 acceptance test of task t's triplets from Q and B = QᵀM; accepts them if
        they pass. `ritz`: this step's (σ, Ub, all l Ritz values) where its Gram was float64."""
        floor = _null_floor(self.rtol)
        U, sv, V, null, s_all = _ritz64(Q, B, self.k, ritz, floor)
        r = _residual64(self.M[t], U, sv, V, null, self.scratch)
        if not _accepted(r, s_all, self.k, self.rtol):
            return False
        U, sv, V = _drop_null(U, sv, V, floor)
        self.out[t] = (V, sv, U) if self.flip else (U, sv, V)
        return True

    def slow_start(self, ritz: _Ritz) -> torch.Tensor:
        """After the first product: which tasks the Ritz values predict to cost at least the
        exact path by iterating: their predicted steps (`_first_step_steps`) plus
        `FIRST_STEP_MARGIN` reach the steps the exact path is worth (`steps_worth`); they take
        it at once (a spectrum without a gap at k: a power law, a noise floor). [n] bool."""
        s_all = ritz.s_all.cpu()
        return torch.tensor(
            [
                _first_step_steps(s_all[i], self.k, self.rtol, ritz.coarse) + FIRST_STEP_MARGIN
                >= self.worth
                for i in range(s_all.shape[0])
            ],
            dtype=torch.bool,
        )

    def early(
        self, active: torch.Tensor, Q: torch.Tensor, B: torch.Tensor, ritz: _Ritz
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The early float64 tests, before the power step: (accepted, tried) masks over `active`.
        Accepted, a task skips the next power step's GEMM (on a converging task, one of its
        last two); refused, it iterates on."""
        done = torch.zeros(active.numel(), dtype=torch.bool)
        tried = torch.zeros(active.numel(), dtype=torch.bool)
        for i, t in enumerate(active.tolist()):
            if self.previous[t] * ritz.rate[i] <= 0.25 * self.rtol:
                tried[i] = True
                done[i] = self.test(t, Q[i], B[i], ritz.exact(i))
        return done, tried

    def keep(
        self,
        step: int,
        active: torch.Tensor,
        Q: torch.Tensor,
        B: torch.Tensor,
        ritz: _Ritz,
        rel: torch.Tensor,
        tried: torch.Tensor,
    ) -> torch.Tensor:
        """After the power step: which of `active` iterate on. A task whose residual estimates
        `rel` [n, k] pass is tested (unless `early` tried it) and leaves if accepted; one
        whose progress predicts more steps than its budget has left leaves for the exact path."""
        worst = rel.max(dim=1).values
        s_all = ritz.s_all.cpu()
        keep = torch.ones(active.numel(), dtype=torch.bool)
        for i, t in enumerate(active.tolist()):
            far = _distance(rel[i], s_all[i], self.k, self.rtol)
            if far <= 1.0 and not tried[i] and self.test(t, Q[i], B[i], ritz.exact(i)):
                keep[i] = False
            elif step >= 2 and step + _steps_needed(far, self.distance[t]) > self.budget - 1:
                # The cost model: at this step's rate of progress the task would not be accepted
                # by its last step (budget − 1), so the steps would cost more than the exact
                # path (a spectrum without a gap at k and no cluster there).
                keep[i] = False
            else:
                self.previous[t] = worst[i]
                self.distance[t] = far
        return keep

    def finish(self, deltas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The stacked triplets; tasks not accepted get the exact path (`gram_svd`)."""
        missing = [t for t, got in enumerate(self.out) if got is None]
        if missing:
            log.debug(
                "subspace iteration not accepted within its budget for %d of %d tasks of shape "
                "%s, k=%d: exact Gram eigensolve",
                len(missing),
                len(self.out),
                tuple(deltas.shape[1:]),
                self.k,
            )
        for t, triplets in zip(
            missing, _exact_path([deltas[t] for t in missing], self.k, self.rtol)
        ):
            self.out[t] = triplets
        return _stack_triplets(self.out)


def _batched_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [n, i, j] @ b [n, j, k]. On the CPU one GEMM per matrix: MKL's batched kernel runs
    these shapes (3072 × 768 by 72 columns) about 15 % slower than a loop of plain GEMMs."""
    if a.device.type != "cpu":
        return a @ b
    out = torch.empty(
        a.shape[0], a.shape[1], b.shape[2], dtype=torch.promote_types(a.dtype, b.dtype)
    )
    for i in range(a.shape[0]):
        torch.mm(a[i], b[i], out=out[i])
    return out


def _tail_cluster(s_all: torch.Tensor, k: int) -> int:
    """The first index c of the cluster of near-equal Ritz values (`CLUSTER_GAP`) that holds σ̃_k
    (index k − 1) and runs on CLUSTER_GUARD values past it, or k where there is none.
    s_all: the block's l Ritz values, descending. Without the opt-in (`CLUSTER_ENV`) there is
    no cluster: k."""
    if not _env_flag(CLUSTER_ENV):
        return k
    end = k - 1 + CLUSTER_GUARD
    if end >= s_all.numel():
        return k
    linked = s_all[1 : end + 1] >= (1.0 - CLUSTER_GAP) * s_all[:end]  # linked[i]: σ̃_{i+1} joins σ̃_i
    if not bool(linked[k - 1 : end].all()):
        return k
    c = k - 1
    while c > 0 and bool(linked[c - 1]):
        c -= 1
    return c


def _allowed(s_all: torch.Tensor, k: int, rtol: float) -> torch.Tensor:
    """The residual ‖M v_i − σ̃_i u_i‖ / σ̃_1 each of the top k triplets may keep [k] (float64):
    rtol, or inside the tail cluster (`_tail_cluster`) max(rtol, CLUSTER_RESID·σ̃_i/σ̃_1).
    s_all: the block's l Ritz values, descending."""
    c = _tail_cluster(s_all, k)
    allowed = torch.full((k,), rtol, dtype=torch.float64)
    if c < k:
        own = (
            CLUSTER_RESID
            * s_all[c:k].to(torch.float64)
            / s_all[0].clamp_min(torch.finfo(torch.float64).tiny)
        )
        allowed[c:] = own.clamp_min(rtol)
    return allowed


def _distance(r: torch.Tensor, s_all: torch.Tensor, k: int, rtol: float) -> float:
    """max_i r_i / allowed_i (`_allowed`): ≤ 1 when the triplets pass (`_accepted`).
    r [k]: residuals ‖M v_i − σ̃_i u_i‖ / σ̃_1."""
    return float((r.to(torch.float64) / _allowed(s_all, k, rtol)).max())


#: What a task's iteration costs beyond the steps `_first_step_steps` predicts, in steps: the
#: first product, the float64 acceptance tests, and the step or so by which the prediction
#: falls short. A task iterates on after its first product only where the predicted steps
#: plus this margin stay below what its exact path is worth (`steps_worth`). Measured on the
#: benchmark's ViT-B/32 layers (T = 8, k = 32, float32; the machine of `STEP_OVERHEAD`), as
#: the whole iteration's time over one step's: low-rank, 1.8 steps predicted, 4.0–4.3 taken
#: (2.3–2.5 over); power-1, 3.8–4.4 predicted, 6.6–7.2 taken (2.6–3.0 over), where the exact
#: path is worth 6.0 steps at 768 × 768 and 4.3–4.8 at the other shapes: the low-rank layers
#: iterate (0.66–0.92 of the exact path's time) and the power-1 layers take the exact path
#: (iterating cost 1.1–1.7 times as much).
FIRST_STEP_MARGIN = 2.5

#: The first step's Ritz values come from a float32 Gram where `coarse`: its eigenvalues carry
#: round-off of ≈ 10⁻⁶·σ̃_1², so Ritz values below COARSE_FLOOR·σ̃_1 are not told apart from
#: zero, and `_first_step_steps` leaves those triplets to the later rate-of-progress rule.
COARSE_FLOOR = 1e-3


def _first_step_steps(s_all: torch.Tensor, k: int, rtol: float, coarse: bool) -> float:
    """The steps task's top k triplets still need after the first product B = QᵀM (from a
    random block), predicted from its l Ritz values s_all (descending) alone.

    Subspace iteration shrinks triplet i's residual by about (σ_{l+1}/σ_i)² a step, and one
    step from a random start leaves it at about σ_i/σ_1 relative to σ_1. So triplet i needs
    log((σ̃_i/σ̃_1) / allowed_i) / log((σ̃_i/σ̃_l)²) steps (`_allowed`), with the first
    product's Ritz values for σ (the l-th for σ_{l+1}); the task, the most any triplet needs.
    It is an estimate, within a step or two of what the iteration takes on the benchmark's
    c_fc layers (3072 × 768, k = 32, float32): low-rank 1.8 predicted, 2 taken; power-1 4,
    5–6; power-0.5 13, 12–13; noise-floor 22–25, far more than any budget. Near the
    threshold (`FIRST_STEP_MARGIN`) a wrong call costs little either way, as the two paths
    then cost about the same; a task
    that iterates on and falls behind still leaves by the rate-of-progress rule
    (`_Iteration.keep`). Triplets at or below the round-off of the Ritz values
    (`COARSE_FLOOR`, or 10⁻⁷·σ̃_1 for a float64 Gram), or already below what they may keep,
    count as needing none.
    """
    s = s_all.to(torch.float64)
    top = float(s[0])
    if not top > 0.0:
        return 0.0
    rel = s[:k] / top
    floor = COARSE_FLOOR if coarse else 1e-7
    allowed = _allowed(s_all, k, rtol)
    need = (rel > floor) & (rel > allowed)
    if not bool(need.any()):
        return 0.0
    rate = (s[-1] / s[:k][need]).square()
    if bool((rate >= 1.0).any()):
        return float("inf")
    return float((torch.log(rel[need] / allowed[need]) / -torch.log(rate)).max())


def _accepted(r: torch.Tensor, s_all: torch.Tensor, k: int, rtol: float) -> bool:
    """The acceptance rule of the top-k triplets (docs/numerics.md). Every triplet has residual
    ‖M v_i − σ̃_i u_i‖ ≤ rtol·σ̃_1, except the triplets inside a cluster of near-equal singular
    values that holds σ̃_k and runs past it (`_tail_cluster`): there the top-k subspace is
    defined only up to the cluster, any basis of it serves, and each of those triplets needs
    ‖M v_i − σ̃_i u_i‖ ≤ CLUSTER_RESID·σ̃_i (u_i then lies in the span of the singular vectors
    whose σ is near σ̃_i; tests/test_subspace.py checks that against a float64 SVD)."""
    return _distance(r, s_all, k, rtol) <= 1.0


def _steps_needed(now: float, before: float) -> float:
    """Further steps until the distance to acceptance reaches 1, at the last step's rate."""
    if now <= 1.0:
        return 0.0
    if not now < before:
        return float("inf")
    return math.log(now) / math.log(before / now)


def _orthonormal_columns(U: torch.Tensor) -> torch.Tensor:
    """U [n, k] (float64, columns orthonormal to float32 round-off, as Q Ub is) made
    orthonormal to float64 round-off by one Cholesky QR step; Householder QR if that fails."""
    L, info = torch.linalg.cholesky_ex(U.mT @ U)
    if int(info) != 0:
        return torch.linalg.qr(U)[0]
    return torch.linalg.solve_triangular(L, U.mT, upper=False).mT  # U L⁻ᵀ


def _ritz64(
    Q: torch.Tensor,
    B: torch.Tensor,
    k: int,
    ritz: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    floor: float = NULL_FLOOR,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One task's top-k Rayleigh–Ritz triplets in float64 from Q [n_small, l] (orthonormal)
    and B = QᵀM [l, n_large]: U [n_small, k] (orthonormal to float64 round-off), σ [k],
    V = Bᵀ Ub / σ [n_large, k], the mask of null triplets (σ ≤ floor·σ₁), and all l Ritz
    values (descending, CPU).
    `ritz`: (σ, Ub, all Ritz values) where already known from a float64 Gram of this B."""
    tiny = torch.finfo(torch.float64).tiny
    B64 = B.to(torch.float64)
    if ritz is None:
        evals, Ub = torch.linalg.eigh(B64 @ B64.mT)
        s_all = evals.flip(-1).clamp_min(0.0).sqrt()
        s, Ub = s_all[:k], Ub.flip(-1)[:, :k]
    else:
        s, Ub, s_all = ritz
    null = s <= floor * s[:1].clamp_min(tiny)
    U = _orthonormal_columns((Ub.mT @ Q.to(torch.float64).mT).mT)
    V = (Ub.mT @ B64).mT / s.clamp_min(tiny)
    return U, s, V, null, s_all.cpu()


def _residual64(
    a: torch.Tensor,
    U: torch.Tensor,
    s: torch.Tensor,
    V: torch.Tensor,
    null: torch.Tensor,
    scratch: torch.Tensor | None = None,
) -> torch.Tensor:
    """‖a v_i − σ_i u_i‖ / σ_1 for each triplet, 0 for the null ones, measured in float64: [k] (CPU).

    Formed as Vᵀ aᵀ ([k, d_out]): float64 GEMMs with k = 32 columns run ~2.5× faster in that
    orientation than a V. `scratch` (a's shape, float64) takes the float64 copy of a: a fresh
    one per test costs page faults comparable to the product itself."""
    a64 = scratch.copy_(a) if scratch is not None else a.to(torch.float64)
    av_t = V.mT @ a64.mT  # (a V)ᵀ
    r = torch.linalg.vector_norm(av_t - (U * s).mT, dim=1).masked_fill(null, 0.0)
    return (r / s[0].clamp_min(torch.finfo(torch.float64).tiny)).cpu()


def _stack_triplets(triplets) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    U, s, V = zip(*triplets)
    return torch.stack(U), torch.stack(s), torch.stack(V)


def _drop_null(
    U: torch.Tensor, s: torch.Tensor, V: torch.Tensor, floor: float = NULL_FLOOR
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Zero both singular vectors of null triplets, σ ≤ floor·σ₁ (`NULL_FLOOR`): arbitrary or
    amplified-noise directions."""
    tiny = s <= floor * s.max().clamp_min(torch.finfo(torch.float64).tiny)
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
        log.debug(
            "polar factor: %d of %d singular values below rcond", int((~keep).sum()), s.numel()
        )
    Qk = Q[:, keep]
    return a64 @ ((Qk / s[keep]) @ Qk.T)


def tagged_basis(
    deltas: Sequence[torch.Tensor] | torch.Tensor, k: int, rcond: float = RCOND
) -> TaggedBasis:
    """Build the tagged basis of one layer from its T task vectors ([T, d_out, d_in] or T tensors).

    k is clamped to k_l = min(k, floor(min(d_out, d_in)/T)) (the caller warns). The T
    truncated SVDs run as one batch on the device of `deltas`. Returns float64 factors;
    callers cast to their compute dtype.
    """
    stacked = deltas if isinstance(deltas, torch.Tensor) else torch.stack(list(deltas))
    T = stacked.shape[0]
    shape = tuple(stacked.shape[1:])
    k_eff = effective_rank(shape, k, T)
    if k_eff < 1:
        raise ValueError(f"layer of shape {shape} is too small for a tagged basis of {T} tasks")
    Us, ss, Vs = truncated_svd_batch(stacked, k_eff)  # [T, d_out, k], [T, k], [T, d_in, k]
    # Concatenate along the atom axis, task-major: U = [U_1 ... U_T] (d_out x p).
    U = polar_factor(Us.permute(1, 0, 2).reshape(shape[0], T * k_eff), rcond)
    W = polar_factor(Vs.permute(1, 0, 2).reshape(shape[1], T * k_eff), rcond)
    sigma = ss.reshape(-1)
    tags = torch.arange(T).repeat_interleave(k_eff)
    return TaggedBasis(U=U, W=W, sigma=sigma, tags=tags, k=k_eff)


def tagged_coordinates(basis: TaggedBasis) -> torch.Tensor:
    """δ̃_t [T, p]: σ on task t's own atoms, 0 elsewhere (the `tagged` coordinates)."""
    T = basis.num_tasks
    own = (basis.tags.unsqueeze(0) == torch.arange(T).unsqueeze(1)).to(basis.sigma.device)  # [T, p]
    return torch.where(
        own,
        basis.sigma.unsqueeze(0),
        torch.zeros((), dtype=basis.sigma.dtype, device=basis.sigma.device),
    )


def projected_coordinates(basis: TaggedBasis, deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sᵀ vec(δ_t) = diag(U⊥ᵀ δ_t W⊥) for every task: [T, p] (the `projection` coordinates)."""
    U, W = basis.U, basis.W
    rows = [
        ((delta.to(device=U.device, dtype=U.dtype) @ W) * U).sum(dim=0) for delta in deltas
    ]  # (δW)[a,i]·U[a,i] summed over a
    return torch.stack(rows)


def lift(basis: TaggedBasis, coords: torch.Tensor) -> torch.Tensor:
    """S·coords as a matrix: U⊥ diag(coords) W⊥ᵀ, [d_out, d_in]."""
    return (basis.U * coords.to(device=basis.U.device, dtype=basis.U.dtype)) @ basis.W.T


def lift_memo(basis: TaggedBasis, unit: torch.Tensor, memo: dict | None = None) -> torch.Tensor:
    """S·unit as a matrix, U⊥ diag(unit) W⊥ᵀ [d_out, d_in].

    With `memo` (a dict kept for one layer), the lift of `unit` is computed once: every α of a
    sweep scales the same product (the merge driver adds θ0 + scale · lift in one fused step).
    A single merge computes the same product the same way, so both give the same bits.
    """
    hit = memo.get("lift") if memo is not None else None
    if hit is not None and torch.equal(hit[0], unit):
        return hit[1]
    lifted = lift(basis, unit)
    if memo is not None:
        memo["lift"] = (unit.clone(), lifted)
    return lifted
