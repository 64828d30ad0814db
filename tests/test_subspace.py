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
)


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
    torch.testing.assert_close((U * s) @ V.T, (U_ref[:, :5] * s_ref[:5]) @ Vh_ref[:5], rtol=1e-9, atol=1e-9)


def test_truncated_svd_of_rank_deficient_matrix_has_no_noise_vectors():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(20, 1, generator=g, dtype=torch.float64) @ torch.randn(1, 9, generator=g, dtype=torch.float64)
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
        other, _ = torch.linalg.qr(torch.randn(30, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
        assert torch.linalg.norm(a - q) <= torch.linalg.norm(a - other) + 1e-12


@pytest.mark.parametrize(
    "shape,k,T,expected",
    [((50, 768), 32, 8, 6), ((768, 768), 32, 8, 32), ((10, 8), 4, 3, 2), ((3072, 768), 4, 2, 4), ((5, 5), 4, 8, 0)],
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
    a = torch.randn(300, 12, generator=g, dtype=torch.float64) @ torch.randn(12, 200, generator=g, dtype=torch.float64)
    a = a + 1e-3 * torch.randn(300, 200, generator=g, dtype=torch.float64)
    if wide:
        a = a.T.contiguous()
    U, s, V = truncated_svd(a.to(dtype), 4)
    U_ref, s_ref, Vh_ref = torch.linalg.svd(a, full_matrices=False)
    torch.testing.assert_close(s, s_ref[:4], rtol=tol, atol=0)
    approx, ref = (U * s) @ V.T, (U_ref[:, :4] * s_ref[:4]) @ Vh_ref[:4]
    assert torch.linalg.norm(approx - ref) <= tol * torch.linalg.norm(ref)
    torch.testing.assert_close(U.T @ U, torch.eye(4, dtype=torch.float64), atol=1e-10, rtol=0)


def test_flat_spectrum_falls_back_to_the_exact_solver():
    g = torch.Generator().manual_seed(8)
    a = torch.randn(400, 300, generator=g, dtype=torch.float64)  # no gap: iteration cannot converge
    U, s, V = truncated_svd(a, 4)
    s_ref = torch.linalg.svdvals(a)[:4]
    torch.testing.assert_close(s, s_ref, rtol=1e-10, atol=0)


@pytest.mark.parametrize("refuse", [False, True])
def test_early_float64_test_accepts_or_iterates_on(monkeypatch, refuse):
    """A task whose last residual times the step's Ritz-value rate predicts far below rtol goes
    straight to the float64 test without the next power step; refused there, it iterates on
    as usual. Either way the triplets are the exact ones."""
    import pipeline.subspace as subspace

    g = torch.Generator().manual_seed(9)
    # Rank 16 inside the 32-vector block, noise large enough that it takes three steps.
    a = torch.randn(300, 16, generator=g, dtype=torch.float64) @ torch.randn(16, 200, generator=g, dtype=torch.float64)
    a = a + 0.3 * torch.randn(300, 200, generator=g, dtype=torch.float64)
    batch = torch.stack([a, 0.5 * a.flip(0)]).float()
    tests, products = [], []
    real_test, real_mm = subspace._residual64, subspace._batched_mm

    def residual64(*args):
        tests.append(args)
        return float("inf") if refuse and len(tests) <= 2 else real_test(*args)

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
    if refuse:  # both refused early at step 2, so its power step runs; accepted early at step 3
        assert len(tests) == 4 and len(products) == 7
    else:  # steps 0 and 1 with both products, step 2 without its power step
        assert len(tests) == 2 and len(products) == 5


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
