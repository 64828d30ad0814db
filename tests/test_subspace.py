"""The tagged basis: truncated SVD, Procrustes whitening, per-layer rank clamp, coordinates."""

import pytest
import torch

from pipeline.subspace import (
    effective_rank,
    lift,
    polar_factor,
    projected_coordinates,
    tagged_basis,
    tagged_coordinates,
    truncated_svd,
    truncated_svd_batch,
)


@pytest.fixture
def small_steps(monkeypatch):
    """The iteration's cost model with a step's multiply-adds alone (STEP_OVERHEAD 10, not the
    measured 30): the small float32 matrices of these tests then get a budget of 3 steps or
    more and iterate, as ViT-B/32's layers do, so the iteration's rules run on them.
    `test_budget_bounds_the_work_and_small_layers_take_the_exact_path` checks the constant."""
    import pipeline.subspace as subspace

    monkeypatch.setattr(subspace, "STEP_OVERHEAD", 10.0)


def _deltas(T, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(T)]


@pytest.mark.parametrize("shape", [(40, 12), (12, 40), (30, 30)])
def test_truncated_svd_matches_full_svd(shape):
    (a,) = _deltas(1, shape)
    U, s, V = truncated_svd(a, 5)
    U_ref, s_ref, Vh_ref = torch.linalg.svd(a, full_matrices=False)
    torch.testing.assert_close(s, s_ref[:5], rtol=1e-10, atol=1e-10)
    # Singular vectors are defined up to sign: compare the rank-5 reconstructions.
    torch.testing.assert_close(
        (U * s) @ V.T, (U_ref[:, :5] * s_ref[:5]) @ Vh_ref[:5], rtol=1e-9, atol=1e-9
    )


def test_truncated_svd_of_rank_deficient_matrix_has_no_noise_vectors():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(20, 1, generator=g, dtype=torch.float64) @ torch.randn(
        1, 9, generator=g, dtype=torch.float64
    )
    U, s, V = truncated_svd(a, 3)
    assert s[1:].abs().max() < 1e-6 * s[0]
    assert U[:, 1:].abs().max() == 0  # zeroed, not amplified round-off
    torch.testing.assert_close((U * s) @ V.T, a)


@pytest.mark.parametrize("T", [2, 3, 8])
@pytest.mark.parametrize("shape", [(64, 48), (48, 64), (96, 32)])
def test_whitened_atoms_are_orthonormal(T, shape):
    basis = tagged_basis(_deltas(T, shape, seed=T), k=3)
    p = basis.p
    eye = torch.eye(p, dtype=torch.float64)
    torch.testing.assert_close(basis.U.T @ basis.U, eye, atol=1e-10, rtol=0)
    torch.testing.assert_close(basis.W.T @ basis.W, eye, atol=1e-10, rtol=0)
    # The atoms vec(u_i w_iᵀ) themselves: SᵀS = (UᵀU) ∘ (WᵀW) = I.
    S = torch.einsum("ai,bi->abi", basis.U, basis.W).reshape(-1, p)
    torch.testing.assert_close(S.T @ S, eye, atol=1e-10, rtol=0)
    assert basis.tags.tolist() == [t for t in range(T) for _ in range(basis.k)]


def test_polar_factor_is_nearest_orthonormal_matrix():
    (a,) = _deltas(1, (30, 6), seed=3)
    q = polar_factor(a)
    P, _, Qh = torch.linalg.svd(a, full_matrices=False)
    torch.testing.assert_close(q, P @ Qh)
    # Nearest: no random orthonormal matrix is closer in Frobenius norm.
    for seed in range(5):
        other, _ = torch.linalg.qr(
            torch.randn(30, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        )
        assert torch.linalg.norm(a - q) <= torch.linalg.norm(a - other) + 1e-12


@pytest.mark.parametrize(
    "shape,k,T,expected",
    [
        ((50, 768), 32, 8, 6),
        ((768, 768), 32, 8, 32),
        ((10, 8), 4, 3, 2),
        ((3072, 768), 4, 2, 4),
        ((5, 5), 4, 8, 0),
    ],
)
def test_effective_rank_clamp(shape, k, T, expected):
    assert effective_rank(shape, k, T) == expected


def test_k_above_layer_rank_is_clamped():
    basis = tagged_basis(_deltas(3, (10, 8)), k=50)
    assert basis.k == 2 and basis.p == 6
    with pytest.raises(ValueError, match="too small"):
        tagged_basis(_deltas(8, (5, 5)), k=4)


def test_coordinates_and_lift():
    deltas = _deltas(3, (40, 30), seed=5)
    basis = tagged_basis(deltas, k=4)
    tagged = tagged_coordinates(basis)
    assert tagged.shape == (3, basis.p)
    for t in range(3):
        own = basis.tags == t
        torch.testing.assert_close(tagged[t, own], basis.sigma[own])
        assert (tagged[t, ~own] == 0).all()
    proj = projected_coordinates(basis, deltas)
    # Projection coordinates are Sᵀ vec(δ_t); lifting them back and projecting again is idempotent.
    for t in range(3):
        back = projected_coordinates(basis, [lift(basis, proj[t])])[0]
        torch.testing.assert_close(back, proj[t])
    # TSV-M's lift of σ reconstructs a rank-k approximation close to the per-task SVDs.
    assert torch.linalg.norm(lift(basis, basis.sigma)) > 0


@pytest.mark.parametrize("wide", [False, True])  # the iteration runs on δᵀ for tall δ
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-8)])
def test_randomised_path_agrees_with_float64_reference(dtype, tol, wide):
    # Large enough for the randomised path (2l < min dim); low rank plus noise, as task vectors are.
    g = torch.Generator().manual_seed(7)
    a = torch.randn(300, 12, generator=g, dtype=torch.float64) @ torch.randn(
        12, 200, generator=g, dtype=torch.float64
    )
    a = a + 1e-3 * torch.randn(300, 200, generator=g, dtype=torch.float64)
    if wide:
        a = a.T.contiguous()
    U, s, V = truncated_svd(a.to(dtype), 4)
    U_ref, s_ref, Vh_ref = torch.linalg.svd(a, full_matrices=False)
    torch.testing.assert_close(s, s_ref[:4], rtol=tol, atol=0)
    approx, ref = (U * s) @ V.T, (U_ref[:, :4] * s_ref[:4]) @ Vh_ref[:4]
    assert torch.linalg.norm(approx - ref) <= tol * torch.linalg.norm(ref)
    torch.testing.assert_close(U.T @ U, torch.eye(4, dtype=torch.float64), atol=1e-10, rtol=0)


def _with_spectrum(sigma, shape, seed):
    """U diag(σ) Vᵀ with Haar-random orthonormal U [d_out, n], V [d_in, n], n = len(σ)."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(shape[0], len(sigma), generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(shape[1], len(sigma), generator=g, dtype=torch.float64))[0]
    return (U * torch.as_tensor(sigma, dtype=torch.float64)) @ V.T


def test_slow_convergence_takes_the_exact_path_early(monkeypatch):
    """A gap at k (5 %) that would take ~170 steps to resolve, and no cluster at k: the first
    product's Ritz values predict more work than the exact path, which the task takes at
    once, so the triplets are the exact ones after one product instead of a budget's worth."""
    import pipeline.subspace as subspace

    sigma = [1.0, 0.95, 0.9, 0.85] + [0.8 * (1 - 1e-4 * i) for i in range(296)]
    a = _with_spectrum(sigma, (400, 300), seed=8)
    products = []
    real_mm = subspace._batched_mm
    monkeypatch.setattr(subspace, "_batched_mm", lambda *x: products.append(1) or real_mm(*x))
    U, s, V = truncated_svd(a, 4)
    torch.testing.assert_close(s, torch.tensor(sigma[:4], dtype=torch.float64), rtol=1e-10, atol=0)
    U_ref, s_ref, Vh_ref = torch.linalg.svd(a, full_matrices=False)
    torch.testing.assert_close(
        (U * s) @ V.T, (U_ref[:, :4] * s_ref[:4]) @ Vh_ref[:4], rtol=0, atol=1e-9
    )
    budget = subspace.step_budget(300, 400, 32, 4)  # 7 with the cost model's constants
    assert budget >= 5 and len(products) == 1  # B = QᵀM of the first step, not 2·budget


@pytest.mark.usefixtures("small_steps")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("flat_first", [False, True], ids=["gapped-first", "flat-first"])
def test_first_product_hands_gapless_tasks_to_the_exact_path(dtype, flat_first, monkeypatch):
    """A batch of a noise-floor task (σ_k inside a dense bulk) and a gapped low-rank one.

    The first task's first product probes the layer. Gapped first: the batch iterates; the
    other task's first product sends the noise-floor task to the exact path before any power
    step, its triplets exactly `gram_svd`'s, and the gapped task iterates on alone (every
    product has one matrix) and is accepted without the exact path, matching a float64 SVD.
    Noise-floor first: one product of that task alone, then the exact path for both."""
    import pipeline.subspace as subspace

    k, shape = 8, (420, 180)
    flat = _family("noise-floor", shape, k, seed=21)
    gapped = _with_spectrum(
        torch.cat([torch.linspace(1.0, 0.5, 12), 1e-4 * torch.ones(168)]), shape, seed=3
    )
    batch = torch.stack([flat, gapped] if flat_first else [gapped, flat]).to(dtype)
    products, exact = [], []
    real_mm, real_exact = subspace._batched_mm, subspace._exact_path

    def batched_mm(a, b):
        products.append(a.shape[0])
        return real_mm(a, b)

    def exact_path(deltas, k, rtol=None, **kw):
        exact.append(len(deltas))
        return real_exact(deltas, k, rtol, **kw)

    monkeypatch.setattr(subspace, "_batched_mm", batched_mm)
    monkeypatch.setattr(subspace, "_exact_path", exact_path)
    U, s, V = subspace.truncated_svd_batch(batch, k)
    monkeypatch.setattr(subspace, "_exact_path", real_exact)
    f, g = (0, 1) if flat_first else (1, 0)
    U_ref, s_ref, V_ref = subspace.gram_svd(batch[f], k)
    assert torch.equal(U[f], U_ref) and torch.equal(s[f], s_ref) and torch.equal(V[f], V_ref)
    tol = 1e-4 if dtype == torch.float32 else 1e-8
    _check_against_reference(batch[g], U[g], s[g], V[g], k, tol)
    if flat_first:
        assert products == [1] and exact == [2]
        return
    assert len(products) > 2 and set(products) == {1}  # the probe, the other task, then one
    assert exact == [1]  # the noise-floor task alone


@pytest.mark.usefixtures("small_steps")
@pytest.mark.parametrize("below,iterates", [(0.3, True), (-0.3, False)])
def test_first_step_hands_over_where_the_steps_cost_the_exact_path(below, iterates, monkeypatch):
    """A task iterates on after its first product only where its predicted steps plus
    FIRST_STEP_MARGIN (the first product, the float64 tests, a step of misprediction) stay
    below the steps its exact path is worth."""
    import pipeline.subspace as subspace

    a = _family("low-rank", (420, 180), 8, seed=21).float()
    worth = subspace.steps_worth(180, 420, 32, 8, single=True)  # float32: float32 Gram
    predicted = worth - subspace.FIRST_STEP_MARGIN - below
    monkeypatch.setattr(subspace, "_first_step_steps", lambda *_: predicted)
    products = []
    real_mm = subspace._batched_mm
    monkeypatch.setattr(subspace, "_batched_mm", lambda *x: products.append(1) or real_mm(*x))
    U, s, V = truncated_svd(a, 8)
    assert (len(products) > 1) == iterates
    _check_against_reference(a, U, s, V, 8, 1e-4)


@pytest.mark.usefixtures("small_steps")
def test_cluster_rule_iterates_past_the_first_product(monkeypatch):
    """Under the opt-in cluster rule a flat tail at k is accepted by iterating, so the first
    product's prediction hands nothing over: the noise-floor task that the default sends to
    the exact path at once iterates, and its triplets meet the cluster rule."""
    import pipeline.subspace as subspace

    a = _family("noise-floor", (420, 180), 8, seed=21).float()
    products = []
    real_mm = subspace._batched_mm
    monkeypatch.setattr(subspace, "_batched_mm", lambda *x: products.append(1) or real_mm(*x))
    monkeypatch.setenv(subspace.CLUSTER_ENV, "0")
    truncated_svd(a, 8)
    assert len(products) == 1
    products.clear()
    monkeypatch.setenv(subspace.CLUSTER_ENV, "1")
    U, s, V = truncated_svd(a, 8)
    assert len(products) > 1
    _check_against_reference(a, U, s, V, 8, 1e-4)


def test_first_step_prediction_from_ritz_values():
    """`_first_step_steps`: a gap at k needs few steps, a flat tail at k more than any budget,
    σ ≈ 0 beyond the rank none, and values at the Ritz values' round-off are not counted."""
    import pipeline.subspace as subspace

    k, rtol = 4, 1e-5
    gap = torch.tensor([1.0, 0.9, 0.8, 0.7] + [0.01] * 28)
    # (0.7/1)/1e-5 = 7e4 at (0.01/0.7)² a step: log(7e4) / log(4900) ≈ 1.3.
    assert 1.0 < subspace._first_step_steps(gap, k, rtol, coarse=True) < 2.0
    flat = torch.tensor([1.0, 0.9] + [0.5 * (1 - 1e-3 * i) for i in range(30)])
    assert subspace._first_step_steps(flat, k, rtol, coarse=True) > 100
    equal = torch.tensor([1.0, 0.9, 0.8] + [0.5] * 29)  # σ̃_k = σ̃_l: no progress at all
    assert subspace._first_step_steps(equal, k, rtol, coarse=False) == float("inf")
    rank2 = torch.tensor([1.0, 0.5] + [1e-9] * 30)
    assert subspace._first_step_steps(rank2, k, rtol, coarse=False) < 1.0
    # A tail at 10⁻⁴·σ̃_1 counts from a float64 Gram, not from a float32 one.
    low = torch.tensor([1.0, 0.5] + [1e-4 * (1 - 1e-3 * i) for i in range(30)])
    assert subspace._first_step_steps(low, k, rtol, coarse=False) > 20
    assert subspace._first_step_steps(low, k, rtol, coarse=True) < 1.0
    assert subspace._first_step_steps(torch.zeros(32), k, rtol, coarse=True) == 0.0


def _floor_spectrum(n: int) -> torch.Tensor:
    """Eight values above a dense floor that holds σ_k (k = 12): 1 … 0.3, then 0.01·(1 − 10⁻³ i)."""
    top = torch.linspace(1.0, 0.3, 8, dtype=torch.float64)
    floor = 0.01 * (1.0 - 1e-3 * torch.arange(n - 8, dtype=torch.float64))
    return torch.cat([top, floor])


def _cosines(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """Cosines of the principal angles between the column spans of X and Y (orthonormal)."""
    return torch.linalg.svdvals(X.T @ Y)


@pytest.mark.parametrize("spectrum", ["power-1", "power-0.5", "noise-floor"])
@pytest.mark.parametrize("shape", [(500, 300), (300, 500)])
@pytest.mark.parametrize("partial", [True, False], ids=["top-k-eigh", "full-eigh"])
def test_exact_path_against_float64_svd(spectrum, shape, partial, monkeypatch):
    """`gram_svd`, with the top-k and with the full eigensolve, against a float64 SVD of
    matrices with known spectra: σ to 1e-10 relative, the top-k subspaces to 1e-8 in principal
    angle, each singular vector pair to 1e-8 up to a common sign, and the triplets consistent
    (a v = σ u, aᵀ u = σ v)."""
    import pipeline.subspace as subspace

    n, k = min(shape), 12
    i = torch.arange(1, n + 1, dtype=torch.float64)
    sigma = {"power-1": i**-1.0, "power-0.5": i**-0.5, "noise-floor": _floor_spectrum(n)}
    a = _with_spectrum(sigma[spectrum], shape, seed=31)
    assert subspace._partial_eigh_pays(n, k)  # the default path at these sizes
    monkeypatch.setattr(subspace, "_partial_eigh_pays", lambda n, k, single=False: partial)
    U, s, V = subspace.gram_svd(a, k)
    assert U.shape == (shape[0], k) and V.shape == (shape[1], k) and s.dtype == torch.float64
    U_ref, s_ref, Vh_ref = torch.linalg.svd(a, full_matrices=False)
    torch.testing.assert_close(s, s_ref[:k], rtol=1e-10, atol=0)
    torch.testing.assert_close(s_ref[:k], sigma[spectrum][:k], rtol=1e-10, atol=0)
    for X, X_ref in ((U, U_ref[:, :k]), (V, Vh_ref[:k].T)):
        assert float(_cosines(X, X_ref).min()) >= 1 - 1e-8
        signs = torch.sign((X * X_ref).sum(dim=0))  # the pairs (u_i, v_i) flip together
        assert torch.linalg.norm(X * signs - X_ref, dim=0).max() <= 1e-8
    assert torch.equal(torch.sign((U * U_ref[:, :k]).sum(0)), torch.sign((V * Vh_ref[:k].T).sum(0)))
    torch.testing.assert_close(U.T @ U, torch.eye(k, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(a @ V, U * s, atol=1e-10 * float(s[0]), rtol=0)
    torch.testing.assert_close(a.T @ U, V * s, atol=1e-10 * float(s[0]), rtol=0)


@pytest.mark.parametrize("shape", [(500, 300), (300, 500)])
def test_float32_gram_check_by_blocks_of_rows(shape, monkeypatch):
    """The float32 Gram's float64 check (`_exact_task`) converts the matrix by blocks of rows
    (`CHECK_BLOCK`): with 64-row blocks (8 of them, the last one short) the triplets are the
    one-block ones to float64 round-off, pass the same acceptance test and match a float64
    SVD to the float32 Gram's accuracy."""
    import numpy as np

    import pipeline.subspace as subspace

    n, k = min(shape), 12
    i = torch.arange(1, n + 1, dtype=torch.float64)
    a64 = _with_spectrum(i**-1.0, shape, seed=5)
    an = a64.float().numpy()
    blocks = [r1 - r0 for r0, r1, _ in subspace._rows64(an, shape[0] >= shape[1])]
    assert blocks == [500] and subspace.CHECK_BLOCK // n >= 500  # one block by default
    whole = subspace._exact_task(an, k, 1e-5)
    monkeypatch.setattr(subspace, "CHECK_BLOCK", 64 * n)
    rows = list(subspace._rows64(an, shape[0] >= shape[1]))
    assert [r1 - r0 for r0, r1, _ in rows] == [64] * 7 + [52]
    assert all(block.dtype == np.float64 for _, _, block in rows)
    blocked = subspace._exact_task(an, k, 1e-5)
    assert whole is not None and blocked is not None
    for x, y in zip(whole, blocked):
        np.testing.assert_allclose(y, x, rtol=0, atol=1e-12)
    U, s, V = (torch.from_numpy(x) for x in blocked)
    a = torch.from_numpy(an).double()  # the float32 matrix the path was given
    s_ref = torch.linalg.svdvals(a)[:k]
    torch.testing.assert_close(s, s_ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(a.T @ U, V * s, atol=1e-5 * float(s[0]), rtol=0)


@pytest.mark.parametrize("shape", [(400, 260), (260, 400)])
@pytest.mark.parametrize("partial", [True, False], ids=["top-k-eigh", "full-eigh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exact_path_of_rank_deficient_matrix(shape, partial, dtype, monkeypatch):
    """Rank 5 < k = 12: the five triplets of the float64 SVD, then σ ≈ 0 with zero vectors on
    both sides (as the iteration leaves them); the five kept vectors stay orthonormal."""
    import pipeline.subspace as subspace

    k, rank = 12, 5
    sigma = torch.tensor([3.0, 2.0, 1.0, 0.5, 0.25], dtype=torch.float64)
    a = _with_spectrum(sigma, shape, seed=32).to(dtype)
    monkeypatch.setattr(subspace, "_partial_eigh_pays", lambda n, k, single=False: partial)
    U, s, V = subspace.gram_svd(a, k)
    U_ref, s_ref, Vh_ref = torch.linalg.svd(a.double(), full_matrices=False)
    # float64: the float64 Gram's accuracy; float32: the float32 Gram's, checked to rtol 1e-5.
    tol = 1e-10 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(s[:rank], s_ref[:rank], rtol=tol, atol=0)
    # Null: below the Gram's resolution (float64: 1e-7·σ₁), or below rtol (float32: 1e-5·σ₁).
    floor = 1e-5 if dtype == torch.float32 else 1e-7
    assert float(s[rank:].max()) <= floor * float(s[0])
    assert U[:, rank:].abs().max() == 0 and V[:, rank:].abs().max() == 0  # no noise vectors
    for X in (U, V):
        torch.testing.assert_close(
            X[:, :rank].T @ X[:, :rank], torch.eye(rank, dtype=torch.float64), atol=tol, rtol=0
        )
    for X, X_ref in ((U[:, :rank], U_ref[:, :rank]), (V[:, :rank], Vh_ref[:rank].T)):
        assert float(_cosines(X, X_ref).min()) >= 1 - 1e-8
    # The rank-5 part (all of a in float64; a less its float32 rounding, σ < 1e-7·σ₁, in float32).
    rank_part = (U_ref[:, :rank] * s_ref[:rank]) @ Vh_ref[:rank]
    torch.testing.assert_close((U * s) @ V.T, rank_part, atol=tol * float(s[0]), rtol=0)
    if dtype == torch.float64:
        torch.testing.assert_close(rank_part, a, atol=1e-12, rtol=0)


def test_exact_path_keeps_scipy_blas_on_the_calling_thread(monkeypatch):
    """The exact path runs scipy's OpenBLAS on one thread (its spinning workers would take the
    cores torch's threads need) and restores the thread count afterwards."""
    import pipeline.lapack as lapack
    import pipeline.subspace as subspace

    blas = subspace._scipy_blas_threads()
    if blas is None:
        pytest.skip("scipy does not bundle OpenBLAS here")
    get, set_ = blas
    seen = []
    real_eigh = lapack.top_eigh
    monkeypatch.setattr(
        lapack, "top_eigh", lambda *a, **kw: seen.append(get()) or real_eigh(*a, **kw)
    )
    before = get()
    try:
        set_(2)
        U, s, V = subspace.gram_svd(torch.randn(90, 60, dtype=torch.float64), 4)
        assert seen == [1] and get() == 2
    finally:
        set_(before)
    torch.testing.assert_close(s, torch.linalg.svdvals(U @ torch.diag(s) @ V.T)[:4])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exact_path_of_a_batch_runs_side_by_side_with_the_same_bits(dtype, monkeypatch):
    """With torch on 2 threads the exact paths of a batch run on 2 worker threads at a time;
    every task gets the bits `gram_svd` gives it alone, on the calling thread (float32: the
    float32 Gram and its float64 check; float64: the float64 Gram)."""
    import pipeline.parallel as parallel
    import pipeline.subspace as subspace

    g = torch.Generator().manual_seed(33)
    batch = torch.randn(5, 260, 150, generator=g).to(dtype)
    threads = torch.get_num_threads()
    cores = [2]
    monkeypatch.setattr(parallel, "available_cores", lambda: cores[0])
    monkeypatch.setenv(subspace.EXACT_ENV, "1")
    mapped = []
    real_pool = parallel.pool

    class Spy:
        def map(self, fn, *args):
            mapped.append(len(args[0]))
            return real_pool().map(fn, *args)

    monkeypatch.setattr(parallel, "pool", Spy)
    try:
        torch.set_num_threads(2)
        U, s, V = truncated_svd_batch(batch, 6)
        cores[0] = 1
        alone = [subspace.gram_svd(a, 6) for a in batch]
    finally:
        torch.set_num_threads(threads)
    assert mapped == [2]  # two lanes side by side, each taking the next task when free
    for t in range(5):
        assert torch.equal(U[t], alone[t][0]) and torch.equal(s[t], alone[t][1])
        assert torch.equal(V[t], alone[t][2])


@pytest.mark.parametrize("shape", [(300, 200), (200, 300)])
def test_exact_path_off_the_cpu_agrees_with_lapack(shape):
    """The eigensolve other devices take (torch's full `eigh` of the Gram), run here on the
    CPU: the same triplets as the LAPACK top-k path, to float64 round-off."""
    import pipeline.subspace as subspace

    a = _with_spectrum(torch.arange(1, 201, dtype=torch.float64) ** -1.0, shape, seed=34)
    U, s, V = subspace._gram_triplets(a, *subspace._torch_top_eigh(a, 10))
    U_ref, s_ref, V_ref = subspace.gram_svd(a, 10)
    torch.testing.assert_close(s, s_ref, rtol=1e-12, atol=0)
    torch.testing.assert_close((U * s) @ V.T, (U_ref * s_ref) @ V_ref.T, rtol=0, atol=1e-12)


def test_budget_bounds_the_work_and_small_layers_take_the_exact_path(monkeypatch):
    import pipeline.subspace as subspace

    # The budget is what the exact path costs: 7 steps at 3072 × 768 with a 72-vector block
    # (k = 32) against its float64 Gram, where a full eigensolve would cost 15; 4 against the
    # float32 Gram (with the float64 check) that float32 task vectors take, which a step of
    # all eight tasks of that shape costs 4.3–4.6 times over on the CPU (`STEP_OVERHEAD`).
    budget = subspace.step_budget(768, 3072, 72, 32)
    budget32 = subspace.step_budget(768, 3072, 72, 32, single=True)
    assert 6 <= budget <= 15 and 3 <= budget32 <= 0.7 * budget
    assert budget32 == int(subspace.steps_worth(768, 3072, 72, 32, single=True))
    assert 4.0 <= subspace.steps_worth(768, 3072, 72, 32, single=True) <= 5.0
    step = subspace.step_cost(768, 3072, 72)
    assert step * budget <= subspace.exact_cost(768, 3072, 32) < step * (budget + 1)
    assert step * budget32 <= subspace.exact_cost(768, 3072, 32, True) < step * (budget32 + 1)
    # The exact path's eigensolve is the top-k one where that is cheaper than the full one.
    for single, (full_rate, _, _) in ((False, subspace.EIGH64), (True, subspace.EIGH32)):
        assert subspace._partial_eigh_pays(768, 32, single)
        assert not subspace._partial_eigh_pays(768, 384, single)
        gram = (0.5 if single else 1.0) * 768**2 * 3072
        products = (4 if single else 2) * 768 * 3072
        full = gram + full_rate * 768**3 + products * 32
        assert subspace.exact_cost(768, 3072, 32, single) < 0.6 * full
        assert subspace.exact_cost(768, 3072, 400, single) == gram + full_rate * 768**3 + (
            products * 400
        )
    # A block that is a large part of the matrix: the exact path without a product.
    products = []
    monkeypatch.setattr(subspace, "_batched_mm", lambda *x: products.append(1))
    a = torch.randn(150, 1000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert subspace.step_budget(150, 1000, 72, 32) < 3 and 2 * 72 < 150  # a 72-vector block
    U, s, V = truncated_svd(a, 32)
    assert not products
    torch.testing.assert_close(s, torch.linalg.svdvals(a)[:32], rtol=1e-10, atol=0)


def _check_against_reference(a: torch.Tensor, U, s, V, k: int, tol: float) -> None:
    """The acceptance rule's definition (docs/numerics.md), checked against a float64 SVD of a.

    Triplets above the cluster of near-equal singular values that holds σ_k (consecutive
    reference values within CLUSTER_GAP, running CLUSTER_GUARD values past k) are the exact
    ones: σ to `tol`·σ₁ and their rank-c reconstruction to `tol`. Triplets inside it have
    ‖a v − σ u‖ ≤ CLUSTER_RESID·σ (checked in float64), σ within that of a reference singular
    value, and u in the span of the reference vectors whose σ_j lies within ±20 % of σ: by the
    Davis–Kahan bound on A = a aᵀ at most CLUSTER_RESID / (2·0.2 − 0.2²) of u lies outside it."""
    import pipeline.subspace as subspace

    a = a.double()
    if a.shape[0] > a.shape[1]:  # the rule is stated on the wide orientation; the same for aᵀ
        a, U, V = a.T, V, U
    U_ref, s_ref, Vh_ref = torch.linalg.svd(a, full_matrices=False)
    c = subspace._tail_cluster(s_ref, k)
    if c:
        torch.testing.assert_close(s[:c], s_ref[:c], rtol=0, atol=tol * float(s_ref[0]))
        approx, ref = (U[:, :c] * s[:c]) @ V[:, :c].T, (U_ref[:, :c] * s_ref[:c]) @ Vh_ref[:c]
        assert torch.linalg.norm(approx - ref) <= tol * torch.linalg.norm(ref)
    # Null triplets (σ within rtol or 1e-7 of zero, `NULL_FLOOR`) have zero vectors.
    live = (U.abs().amax(dim=0) > 0) | (V.abs().amax(dim=0) > 0)
    assert not bool((s[~live] > 1e-5 * s[0]).any())
    for i in range(c, k):
        if not live[i]:
            continue
        r = torch.linalg.vector_norm(a @ V[:, i] - s[i] * U[:, i])
        assert r <= subspace.CLUSTER_RESID * s[i] * (1 + 1e-9)
        assert (s_ref - s[i]).abs().min() <= r + 1e-12 * s[0]
        band = ((s_ref - s[i]).abs() <= 0.2 * s[i]).nonzero().flatten()
        inside = U_ref[:, band].T @ U[:, i]
        outside = (
            (1.0 - float(inside.square().sum())) ** 0.5 if float(inside.square().sum()) < 1 else 0.0
        )
        assert outside <= subspace.CLUSTER_RESID / (2 * 0.2 - 0.2**2) + 1e-6
    Ul = U[:, live]
    torch.testing.assert_close(
        Ul.T @ Ul, torch.eye(int(live.sum()), dtype=torch.float64), atol=1e-8, rtol=0
    )


def _family(name: str, shape, k: int, seed: int) -> torch.Tensor:
    """Small cases of benchmarks/merge.py's spectral families (--spectrum)."""
    n = min(shape)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    if name == "power-0.5":
        return _with_spectrum(i**-0.5, shape, seed)
    if name == "power-1":
        return _with_spectrum(i**-1.0, shape, seed)
    if name == "rank-deficient":  # exactly rank k/2
        return _with_spectrum(torch.linspace(1.0, 0.1, k // 2, dtype=torch.float64), shape, seed)
    low = torch.randn(shape[0], k // 2, generator=g, dtype=torch.float64) @ torch.randn(
        k // 2, shape[1], generator=g, dtype=torch.float64
    )
    noise = torch.randn(shape, generator=g, dtype=torch.float64)
    if name == "noise-floor":  # k/2 directions above a dense Gaussian bulk that holds σ_k
        return 3.0 * low / (k // 2) ** 0.5 + noise
    if name == "gaussian":  # no signal: the bulk's top edge
        return noise
    return low + 1e-3 * noise  # "low-rank": the benchmark's default inputs


@pytest.mark.usefixtures("small_steps")
@pytest.mark.parametrize(
    "name", ["low-rank", "power-0.5", "power-1", "rank-deficient", "noise-floor", "gaussian"]
)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-8)])
@pytest.mark.parametrize("clusters", [False, True], ids=["exact-top-k", "cluster-rule"])
def test_spectral_families_against_float64_reference(name, dtype, tol, clusters, monkeypatch):
    """Without the opt-in every triplet is the exact one (the reference check finds no
    cluster); with it (PIPELINE_SVD_CLUSTERS=1) the triplets inside a flat tail meet the
    cluster rule's definition."""
    import pipeline.subspace as subspace

    monkeypatch.setenv(subspace.CLUSTER_ENV, "1" if clusters else "0")
    k, shape = 8, (420, 180)
    a = _family(name, shape, k, seed=21)
    U, s, V = truncated_svd(a.to(dtype), k)
    _check_against_reference(a.to(dtype), U, s, V, k, tol)


@pytest.mark.usefixtures("small_steps")
@pytest.mark.parametrize("clusters", ["0", "1"])
def test_duplicated_tasks_get_identical_triplets(clusters, monkeypatch):
    import pipeline.subspace as subspace

    monkeypatch.setenv(subspace.CLUSTER_ENV, clusters)
    a = _family("noise-floor", (420, 180), 8, seed=5).float()
    U, s, V = truncated_svd_batch(torch.stack([a, a, 2 * a]), 8)
    assert torch.equal(U[0], U[1]) and torch.equal(s[0], s[1]) and torch.equal(V[0], V[1])
    torch.testing.assert_close(s[2], 2 * s[0], rtol=1e-5, atol=0)


@pytest.mark.usefixtures("small_steps")
@pytest.mark.parametrize("refuse", [False, True])
def test_early_float64_test_accepts_or_iterates_on(monkeypatch, refuse):
    """A task whose last residual times the step's Ritz-value rate predicts far below rtol goes
    straight to the float64 test without the next power step; refused there, it iterates on
    as usual. Either way the triplets are the exact ones."""
    import pipeline.subspace as subspace

    g = torch.Generator().manual_seed(9)
    # Rank 16 inside the 32-vector block, noise large enough that it takes three steps.
    a = torch.randn(300, 16, generator=g, dtype=torch.float64) @ torch.randn(
        16, 200, generator=g, dtype=torch.float64
    )
    a = a + 0.3 * torch.randn(300, 200, generator=g, dtype=torch.float64)
    batch = torch.stack([a, 0.5 * a.flip(0)]).float()
    tests, products = [], []
    real_test, real_mm = subspace._residual64, subspace._batched_mm

    def residual64(*args):
        tests.append(args)
        return (
            torch.full((4,), float("inf"), dtype=torch.float64)
            if refuse and len(tests) <= 2
            else real_test(*args)
        )

    def batched_mm(*args):
        products.append(args)
        return real_mm(*args)

    monkeypatch.setattr(subspace, "_residual64", residual64)
    monkeypatch.setattr(subspace, "_batched_mm", batched_mm)
    U, s, V = subspace.truncated_svd_batch(batch, 4)
    for t in range(2):
        U_ref, s_ref, Vh_ref = torch.linalg.svd(batch[t].double(), full_matrices=False)
        torch.testing.assert_close(s[t], s_ref[:4], rtol=1e-5, atol=0)
        approx, ref = (U[t] * s[t]) @ V[t].T, (U_ref[:, :4] * s_ref[:4]) @ Vh_ref[:4]
        assert torch.linalg.norm(approx - ref) <= 1e-4 * torch.linalg.norm(ref)
    # The first product is task 0's alone (it probes the layer), then task 1's.
    if refuse:  # both refused early at step 2, so its power step runs; accepted early at step 3
        assert len(tests) == 4 and len(products) == 8
    else:  # steps 0 and 1 with both products, step 2 without its power step
        assert len(tests) == 2 and len(products) == 6


def test_lift_memo_lifts_once_per_layer_and_equals_the_scaled_lift(monkeypatch):
    import pipeline.subspace as subspace

    basis = tagged_basis([d.float() for d in _deltas(3, (30, 20))], 2)
    unit = torch.randn(basis.p, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    calls = []
    real = subspace.lift
    monkeypatch.setattr(subspace, "lift", lambda *a: calls.append(a) or real(*a))
    memo: dict = {}
    swept = [subspace.lift_memo(basis, unit, memo) * c for c in (0.5, 1.0, 2.0)]
    assert len(calls) == 1  # one GEMM for the three scales
    alone = subspace.lift_memo(basis, unit) * 2.0
    assert torch.equal(alone, swept[2])  # a single merge gets the sweep's bits
    for c, got in zip((0.5, 1.0, 2.0), swept):
        torch.testing.assert_close(got, real(basis, c * unit), rtol=1e-6, atol=1e-7)
    other = unit.flip(0)
    subspace.lift_memo(basis, other, memo)
    assert len(calls) == 3 and torch.equal(memo["lift"][0], other)  # another vector is lifted anew


def _gram_dtypes(monkeypatch) -> list:
    """Spy: the dtype of every Gram the exact path eigensolves on the CPU."""
    import pipeline.subspace as subspace

    seen = []
    real = subspace._lapack_top_eigh
    monkeypatch.setattr(
        subspace, "_lapack_top_eigh", lambda an, k: seen.append(str(an.dtype)) or real(an, k)
    )
    return seen


@pytest.mark.parametrize("name", ["power-0.5", "power-1", "noise-floor", "gaussian"])
@pytest.mark.parametrize("shape", [(420, 180), (180, 420)])
def test_float32_gram_meets_the_acceptance_rule(name, shape, monkeypatch):
    """float32 task vectors take the float32 Gram on the exact path: no float64 Gram, every
    triplet within rtol = 1e-5 (residual measured here against a float64 SVD of the same
    matrix), the top-k subspace and σ those of the float64 SVD to what rtol allows."""
    import pipeline.subspace as subspace

    k = 8
    a = _family(name, shape, k, seed=41).float()
    seen = _gram_dtypes(monkeypatch)
    U, s, V = subspace.gram_svd(a, k)
    assert seen == ["float32"]
    a64 = a.double()
    for X in (U, V):
        torch.testing.assert_close(X.T @ X, torch.eye(k, dtype=torch.float64), atol=1e-4, rtol=0)
    resid = torch.linalg.vector_norm(a64.T @ U - V * s, dim=0).max()
    resid = torch.maximum(resid, torch.linalg.vector_norm(a64 @ V - U * s, dim=0).max())
    s_ref = torch.linalg.svdvals(a64)
    assert float(resid) <= 1e-5 * float(s_ref[0])
    torch.testing.assert_close(s, s_ref[:k], rtol=0, atol=1e-5 * float(s_ref[0]))
    _check_against_reference(a, U, s, V, k, 1e-4)


@pytest.mark.parametrize("case", ["steep", "tight-rtol", "float64"], ids=lambda c: c)
def test_float32_gram_hands_what_it_cannot_meet_to_float64(case, monkeypatch):
    """σ_k far below σ_1 (a float32 Gram leaves residuals of ≈ 1e-8·σ_1²/σ_k) fails the
    float64 check and gets the float64 Gram; an rtol below SINGLE_GRAM_RTOL and float64
    input take it at once. The result is the float64 exact path's either way."""
    import pipeline.subspace as subspace

    k, shape = 8, (300, 160)
    # σ_i = 10^-(i-1)/2: σ_8 = 3e-4·σ_1
    sigma = 10.0 ** (-0.5 * torch.arange(160, dtype=torch.float64))
    a = _with_spectrum(sigma, shape, seed=42)
    a = a if case == "float64" else a.float()
    rtol = 1e-7 if case == "tight-rtol" else None
    seen = _gram_dtypes(monkeypatch)
    U, s, V = subspace.gram_svd(a, k, rtol)
    assert seen == (["float32", "float64"] if case == "steep" else ["float64"])
    U_ref, s_ref, V_ref = subspace._exact_path([a], k, rtol, single=False)[0]
    assert torch.equal(U, U_ref) and torch.equal(s, s_ref) and torch.equal(V, V_ref)


def test_exact_path_batch_redoes_only_the_failing_matrices(monkeypatch):
    """In a batch, the matrices the float32 Gram cannot serve get the float64 Gram, alone; the
    others keep their float32-Gram triplets."""
    import pipeline.subspace as subspace

    shape, k = (300, 160), 8
    good = _family("power-0.5", shape, k, seed=43).float()
    steep = _with_spectrum(10.0 ** (-0.5 * torch.arange(160.0)), shape, seed=44).float()
    seen = _gram_dtypes(monkeypatch)
    out = subspace._exact_path([good, steep, good], k)
    assert sorted(seen) == ["float32"] * 3 + ["float64"]
    alone = subspace.gram_svd(good, k)
    for t in (0, 2):
        assert all(torch.equal(x, y) for x, y in zip(out[t], alone))
    ref = subspace._exact_path([steep], k, single=False)[0]
    assert all(torch.equal(x, y) for x, y in zip(out[1], ref))


@pytest.mark.usefixtures("small_steps")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rank_deficient_layer_gets_one_basis_whichever_path(dtype, monkeypatch):
    """Task vectors of rank k/2 < k: the iteration and the exact path (PIPELINE_EXACT_SVD=1)
    zero the same null triplets on both sides, so the whitened basis, and with it the merge,
    does not depend on which path ran (an arbitrary null-space direction on one side would
    enter the polar factor and move every atom)."""
    import pipeline.subspace as subspace

    k, shape = 8, (420, 180)
    batch = torch.stack([_family("rank-deficient", shape, k, seed=50 + t) for t in range(3)]).to(
        dtype
    )
    iterated = subspace.tagged_basis(batch, k)
    monkeypatch.setenv(subspace.EXACT_ENV, "1")
    exact = subspace.tagged_basis(batch, k)
    torch.testing.assert_close(
        iterated.sigma, exact.sigma, rtol=0, atol=1e-5 * float(exact.sigma.max())
    )
    null = exact.U.abs().amax(dim=0) <= 1e-12
    assert int(null.sum()) == 3 * (k - k // 2)
    assert torch.equal(null, iterated.U.abs().amax(dim=0) <= 1e-12)
    for X, Y in ((iterated.U, exact.U), (iterated.W, exact.W)):
        assert X[:, null].abs().max() <= 1e-12 and Y[:, null].abs().max() <= 1e-12
        # Each atom up to its sign (the pairs u_i, w_i flip together).
        signs = torch.sign((X * Y).sum(dim=0))
        torch.testing.assert_close(X[:, ~null] * signs[~null], Y[:, ~null], rtol=0, atol=1e-4)


@pytest.mark.parametrize("shape", [(300, 160), (160, 300)])
def test_float32_gram_serves_a_rank_below_k(shape, monkeypatch):
    """Rank k/2 < k in float32: the triplets past the rank are below rtol·σ₁, null (zero on
    both sides, excluded from the check), so the float32 Gram serves the matrix; the kept
    triplets meet the acceptance rule against a float64 SVD."""
    import pipeline.subspace as subspace

    k = 8
    a = _family("rank-deficient", shape, k, seed=42).float()
    seen = _gram_dtypes(monkeypatch)
    U, s, V = subspace.gram_svd(a, k)
    assert seen == ["float32"]
    assert U[:, k // 2 :].abs().max() == 0 and V[:, k // 2 :].abs().max() == 0
    assert float(s[k // 2 :].max()) <= 1e-5 * float(s[0])
    _check_against_reference(a, U, s, V, k // 2, 1e-4)


@pytest.mark.parametrize("name,iterates", [("power-1", False), ("low-rank", True)])
def test_attention_projection_sized_layers_take_the_cheaper_path(name, iterates, monkeypatch):
    """Two float32 tasks of ViT-B/32's attention out-projection shape (768 × 768, k = 32),
    with the measured cost model: σ_i ∝ i⁻¹ (≈ 4 steps predicted after the first product, more
    than the exact path is worth, 6 steps) takes the exact path after the probe alone; a gap at
    k (rank 16 plus a 10⁻³ floor: under 2 steps) iterates and is accepted without it. Either
    way the triplets meet the acceptance rule against a float64 SVD."""
    import pipeline.subspace as subspace

    k, shape = 32, (768, 768)
    batch = torch.stack([_family(name, shape, k, seed=60 + t) for t in range(2)]).float()
    products, exact = [], []
    real_mm, real_exact = subspace._batched_mm, subspace._exact_path
    monkeypatch.setattr(
        subspace, "_batched_mm", lambda a, b: products.append(a.shape[0]) or real_mm(a, b)
    )
    monkeypatch.setattr(
        subspace, "_exact_path", lambda d, *a, **kw: exact.append(len(d)) or real_exact(d, *a, **kw)
    )
    U, s, V = subspace.truncated_svd_batch(batch, k)
    if iterates:
        assert sum(exact) == 0 and len(products) > 2
    else:
        assert products == [1] and exact == [2]
    _check_against_reference(batch[0], U[0], s[0], V[0], k, 1e-4)
