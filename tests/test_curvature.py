"""Projected Hessians and the diagnostics of Theorems 2 and 3 against explicit float64 references."""

import pytest
import torch

from pipeline.curvature import (
    ImplicitHessian,
    LowRankFisher,
    SolvedHessian,
    curvature_heterogeneity,
    effective_solver,
    explicit_projected_hessian,
    frechet_objective,
    frechet_variance,
    hessian_matvec,
    layer_curvature,
    low_rank_fisher,
    low_rank_projected_hessian,
    projected_hessian,
    residual_energy,
    solve_spd,
    solved_terms,
    subspace_variance,
)
from pipeline.methods.epimer import merge_layer
from pipeline.subspace import lift, projected_coordinates, tagged_basis, tagged_coordinates


def _problem(T, shape, k, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    deltas = [torch.randn(shape, generator=g, dtype=dtype) for _ in range(T)]
    fishers = [
        torch.rand(shape, generator=g, dtype=dtype) ** 4 * 10 ** (t % 3) for t in range(T)
    ]  # heterogeneous
    basis = tagged_basis(deltas, k).to(dtype)
    return deltas, fishers, basis


@pytest.mark.parametrize("shape", [(24, 16), (16, 40), (33, 7)])
def test_fast_projected_hessian_equals_explicit(shape):
    deltas, fishers, basis = _problem(3, shape, 2)
    fast = projected_hessian(fishers[0], basis.U, basis.W, eps=1e-3)
    ref = explicit_projected_hessian(fishers[0], basis.U, basis.W, eps=1e-3)
    torch.testing.assert_close(fast, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast, fast.T)


def test_projected_hessian_chunking_does_not_change_the_result(monkeypatch):
    import pipeline.curvature as curvature

    deltas, fishers, basis = _problem(4, (30, 20), 4)
    whole = projected_hessian(fishers[1], basis.U, basis.W)
    monkeypatch.setattr(curvature, "_BLOCK_ELEMENTS", 60)  # one pair per chunk
    torch.testing.assert_close(
        projected_hessian(fishers[1], basis.U, basis.W), whole, rtol=1e-12, atol=1e-12
    )


def test_float32_projected_hessian_close_to_float64_reference():
    deltas, fishers, basis = _problem(8, (64, 48), 4)
    b32 = basis.to(torch.float32)
    fast = projected_hessian(fishers[2].float(), b32.U, b32.W)
    ref = explicit_projected_hessian(fishers[2], basis.U, basis.W)
    assert torch.linalg.norm(fast - ref) <= 1e-5 * torch.linalg.norm(ref)


@pytest.mark.parametrize("mode", ["tagged", "projection"])
def test_hessian_matvec_equals_explicit_product(mode):
    deltas, fishers, basis = _problem(3, (20, 12), 3)
    x = tagged_coordinates(basis) if mode == "tagged" else projected_coordinates(basis, deltas)
    for t in range(3):
        H_t = explicit_projected_hessian(fishers[t], basis.U, basis.W, eps=0.5)
        torch.testing.assert_close(
            hessian_matvec(fishers[t], basis.U, basis.W, x[t], eps=0.5), H_t @ x[t]
        )


@pytest.mark.parametrize("T", [2, 3, 8])
@pytest.mark.parametrize("mode", ["tagged", "projection"])
def test_eta_equals_objective_gap_and_is_nonnegative(T, mode):
    deltas, fishers, basis = _problem(T, (48, 40), 2, seed=T)
    eps = 1e-4
    coords = tagged_coordinates(basis) if mode == "tagged" else projected_coordinates(basis, deltas)
    curv = layer_curvature(basis, {mode: coords}, fishers, deltas, eps)
    lam = torch.full((T,), 1.0 / T, dtype=torch.float64)
    H_ts = [explicit_projected_hessian(f, basis.U, basis.W, eps) for f in fishers]
    H_bar = sum(l * H for l, H in zip(lam, H_ts))
    torch.testing.assert_close(curv.H, H_bar)
    b = lam @ curv.Hx[mode]
    delta_I = lam @ coords
    delta_H = torch.linalg.solve(H_bar, b)
    gap = frechet_objective(delta_I, H_ts, coords, lam) - frechet_objective(
        delta_H, H_ts, coords, lam
    )
    eta = curvature_heterogeneity(curv.H, b, delta_I)
    assert eta >= 0
    assert eta == pytest.approx(gap, rel=1e-8, abs=1e-12)
    assert eta > 0  # heterogeneous curvature: curvature-aware merging strictly helps
    # V_S by the expansion equals the explicit per-task sum, for any merged point.
    for delta_m in (delta_H, 2.5 * delta_H, delta_I):
        V = subspace_variance(curv.H, b, curv.quad[mode], delta_m, lam)
        assert V == pytest.approx(frechet_objective(delta_m, H_ts, coords, lam), rel=1e-9)


@pytest.mark.parametrize("mode", ["tagged", "projection"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_b_from_one_product_equals_the_weighted_rows(mode, dtype):
    """rows=False: b = Σ_t λ_t H̃_t δ̃_t from the weighted sum of the F_t ∘ X_t and one product,
    and the quadratic terms from the lifts, against explicit float64 per-task Hessians."""
    T, eps = 5, 1e-3
    deltas, fishers, basis = _problem(T, (36, 28), 3, seed=4)
    coords = tagged_coordinates(basis) if mode == "tagged" else projected_coordinates(basis, deltas)
    lam = torch.tensor([0.1, 0.3, 0.2, 0.25, 0.15], dtype=torch.float64)
    H_ts = [explicit_projected_hessian(f, basis.U, basis.W, eps) for f in fishers]
    want_b = sum(l * (H @ x) for l, H, x in zip(lam, H_ts, coords))
    want_quad = torch.stack([x @ (H @ x) for H, x in zip(H_ts, coords)])
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    inputs = (
        basis.to(dtype),
        {mode: coords},
        [f.to(dtype) for f in fishers],
        [d.to(dtype) for d in deltas],
        eps,
    )
    fast = layer_curvature(*inputs, weights=lam, rows=False)
    rows = layer_curvature(*inputs, weights=lam)
    assert fast.Hx == {} and rows.Hx[mode].shape == (T, basis.p)
    scale = float(want_b.norm())
    for got in (fast, rows):
        assert float((got.b[mode] - want_b).norm()) <= tol * scale
        torch.testing.assert_close(got.quad[mode], want_quad, rtol=tol, atol=0.0)
    torch.testing.assert_close(rows.b[mode], lam @ rows.Hx[mode], rtol=0.0, atol=0.0)


def test_eta_vanishes_for_identical_curvature():
    deltas, fishers, basis = _problem(4, (30, 30), 3)
    same = [fishers[0]] * 4
    coords = tagged_coordinates(basis)
    curv = layer_curvature(basis, {"tagged": coords}, same, deltas, 1e-6)
    lam = torch.full((4,), 0.25, dtype=torch.float64)
    eta = curvature_heterogeneity(curv.H, lam @ curv.Hx["tagged"], lam @ coords)
    assert eta < 1e-12 * float(coords.square().sum())


def test_residual_energy_matches_explicit_projection():
    deltas, fishers, basis = _problem(3, (20, 16), 2)
    curv = layer_curvature(basis, {"tagged": tagged_coordinates(basis)}, fishers, deltas, 0.0)
    S = torch.einsum("ai,bi->abi", basis.U, basis.W).reshape(-1, basis.p)
    for t in range(3):
        d = deltas[t].reshape(-1)
        perp = d - S @ (S.T @ d)
        assert float(curv.residual[t]) == pytest.approx(
            float((fishers[t].reshape(-1) * perp**2).sum()), rel=1e-10
        )
        # and the lift-based residual is orthogonal to the subspace
        r = deltas[t] - lift(basis, projected_coordinates(basis, [deltas[t]])[0])
        assert float((S.T @ r.reshape(-1)).abs().max()) < 1e-10
    lam = torch.full((3,), 1 / 3, dtype=torch.float64)
    assert residual_energy(curv.residual, lam) == pytest.approx(float(curv.residual.mean()))
    # The hessian stage passes the stored projection coordinates instead of recomputing them.
    stored = projected_coordinates(basis, deltas)
    given = layer_curvature(
        basis, {"tagged": tagged_coordinates(basis)}, fishers, deltas, 0.0, projection=stored
    )
    torch.testing.assert_close(given.residual, curv.residual, rtol=1e-12, atol=0)


def test_solve_spd_falls_back_to_eigensolve_with_a_warning(caplog):
    H = torch.diag(torch.tensor([2.0, 0.0, 1.0], dtype=torch.float64))  # singular: Cholesky fails
    rhs = torch.tensor([4.0, 0.0, 3.0], dtype=torch.float64)
    with caplog.at_level("WARNING"):
        x = solve_spd(H, rhs)
    assert "Cholesky failed" in caplog.text
    torch.testing.assert_close(x, torch.tensor([2.0, 0.0, 3.0], dtype=torch.float64))
    torch.testing.assert_close(solve_spd(torch.eye(3, dtype=torch.float64) * 2, rhs), rhs / 2)


# --------------------------------------------------------------------------- low-rank Fisher (opt-in)


def _orthonormal(rows, cols, g):
    return torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=torch.float64))[0]


def test_low_rank_hessian_is_the_projection_of_its_factors():
    g = torch.Generator().manual_seed(11)
    U, W = _orthonormal(30, 9, g), _orthonormal(20, 9, g)
    A = torch.rand(30, 3, generator=g, dtype=torch.float64)
    B = torch.rand(20, 3, generator=g, dtype=torch.float64)
    fast = low_rank_projected_hessian(LowRankFisher(A, B, 0.0), U, W, eps=0.2)
    torch.testing.assert_close(
        fast, explicit_projected_hessian(A @ B.T, U, W, eps=0.2), rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_rank_one_fisher_is_recovered_exactly(dtype):
    g = torch.Generator().manual_seed(12)
    F = (torch.rand(40, 1, generator=g, dtype=torch.float64) + 0.1) @ (
        torch.rand(1, 25, generator=g, dtype=torch.float64) + 0.1
    )
    factors = low_rank_fisher(F.to(dtype), 1)
    assert factors.error < (1e-10 if dtype == torch.float64 else 1e-5)
    assert (factors.A >= 0).all() and (factors.B >= 0).all()
    U, W = _orthonormal(40, 6, g), _orthonormal(25, 6, g)
    exact = explicit_projected_hessian(F, U, W)
    approx = low_rank_projected_hessian(factors, U.to(dtype), W.to(dtype))
    assert torch.linalg.norm(approx - exact) <= (
        1e-10 if dtype == torch.float64 else 1e-5
    ) * torch.linalg.norm(exact)


@pytest.mark.parametrize("rank", [1, 2, 5])
def test_low_rank_hessian_error_is_bounded_by_the_fisher_error(rank):
    g = torch.Generator().manual_seed(13 + rank)
    F = torch.rand(36, 28, generator=g, dtype=torch.float64) ** 3
    factors = low_rank_fisher(F, rank)
    assert (factors.A >= 0).all() and (factors.B >= 0).all()
    fisher_error = torch.linalg.norm(F - factors.A @ factors.B.T)
    assert factors.error == pytest.approx(float(fisher_error / torch.linalg.norm(F)), rel=1e-9)
    U, W = _orthonormal(36, 10, g), _orthonormal(28, 10, g)
    approx = low_rank_projected_hessian(factors, U, W)
    assert torch.linalg.norm(approx - explicit_projected_hessian(F, U, W)) <= fisher_error * (
        1 + 1e-9
    )
    assert (
        torch.linalg.eigvalsh(approx).min() >= -1e-12 * torch.linalg.eigvalsh(approx).max()
    )  # PSD


def test_low_rank_sweeps_never_increase_the_error():
    g = torch.Generator().manual_seed(14)
    F = torch.rand(50, 30, generator=g, dtype=torch.float64) ** 2
    errors = [low_rank_fisher(F, 3, iters=n, tol=0.0).error for n in (0, 1, 5, 25)]
    assert all(b <= a + 1e-12 for a, b in zip(errors, errors[1:]))
    assert errors[-1] < errors[0]


def test_low_rank_sweeps_run_until_the_tolerance_with_the_defaults():
    g = torch.Generator().manual_seed(15)
    F = torch.rand(60, 40, generator=g, dtype=torch.float64) ** 2
    one, default = low_rank_fisher(F, 3, iters=1), low_rank_fisher(F, 3)
    assert default.error < one.error - 1e-4  # the default sweeps go on past the first


def test_fisher_rank_must_be_positive():
    with pytest.raises(ValueError, match="fisher_rank"):
        low_rank_fisher(torch.rand(4, 4), 0)


# --------------------------------------------------------------------------- solver "cg"


def test_implicit_hessian_products_diagonal_and_solves_equal_the_formed_matrix():
    deltas, fishers, basis = _problem(4, (40, 30), 3)
    F_bar = sum(fishers) / len(fishers)
    dense = projected_hessian(F_bar, basis.U, basis.W, eps=1e-6)
    H = ImplicitHessian(F_bar, basis.U, basis.W, eps=1e-6, tol=1e-12)
    x = torch.randn(basis.p, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(H @ x, dense @ x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(H.diag, dense.diagonal(), rtol=1e-12, atol=1e-12)
    b = dense @ x
    torch.testing.assert_close(solve_spd(H, b), torch.linalg.solve(dense, b), rtol=1e-9, atol=1e-12)
    assert 1 <= H.iterations <= basis.p and H.residual <= 1e-12 and not H.fallback
    iterations = H.iterations
    torch.testing.assert_close(H.solve(b), torch.linalg.solve(dense, b), rtol=1e-9, atol=1e-12)
    assert H.iterations == iterations  # the second solve with the same b is the stored one


def _operator_problem(seed):
    """A small layer's basis, F̄, the formed H̄ (ε = 1e-6), a random b and δ̄, and the generator."""
    deltas, fishers, basis = _problem(4, (40, 30), 3)
    F_bar = sum(fishers) / len(fishers)
    dense = projected_hessian(F_bar, basis.U, basis.W, eps=1e-6)
    g = torch.Generator().manual_seed(seed)
    b, delta_bar = (torch.randn(basis.p, generator=g, dtype=torch.float64) for _ in range(2))
    return basis, F_bar, dense, b, delta_bar, g


def _count_products(monkeypatch):
    """The vectors x of every `hessian_matvec` call from here on (copies), in a list."""
    import pipeline.curvature as curvature

    products = []
    real = curvature.hessian_matvec
    monkeypatch.setattr(
        curvature, "hessian_matvec", lambda *a: products.append(a[3].clone()) or real(*a)
    )
    return products


def test_implicit_hessian_answers_repeats_and_multiples_of_a_solution_from_one_product(monkeypatch):
    """An α sweep's diagnostics ask H̄δ̄ at every α and H̄(scale·x) for x = H̄⁻¹b: one product
    for H̄δ̄, none for H̄x (the solve's final residual measured it), and the same bits whichever
    α comes first."""
    basis, F_bar, dense, b, delta_bar, g = _operator_problem(2)
    products = _count_products(monkeypatch)

    def diagnostics(H, scales):
        x = H.solve(b)
        return [(H @ delta_bar, H @ (c * x)) for c in scales]

    first = ImplicitHessian(F_bar, basis.U, basis.W, eps=1e-6, tol=1e-12)
    first.solve(b)
    solved = len(products)
    got = diagnostics(first, [0.3, 1.0, 2.4])
    assert len(products) == solved + 1  # three α values: H̄δ̄ once, H̄x from the solve
    for (Hd, Hm), c in zip(got, [0.3, 1.0, 2.4]):
        torch.testing.assert_close(Hd, dense @ delta_bar, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(Hm, dense @ (c * first.solve(b)), rtol=1e-12, atol=1e-12)
    again = diagnostics(ImplicitHessian(F_bar, basis.U, basis.W, eps=1e-6, tol=1e-12), [2.4])
    assert torch.equal(again[0][1], got[2][1]) and torch.equal(again[0][0], got[0][0])
    other = torch.randn(basis.p, generator=g, dtype=torch.float64)
    torch.testing.assert_close(
        first @ other, dense @ other, rtol=1e-12, atol=1e-12
    )  # anything else: a product


def test_implicit_hessian_starts_from_a_hint_and_keeps_its_product(monkeypatch):
    """`hint(b, δ̄)`: the solve of b starts from δ̄ (one product, H̄δ̄, which `@` then answers),
    reaches the same solution, and a start that is the solution ends the solve at once."""
    basis, F_bar, dense, b, delta_bar, _ = _operator_problem(5)
    products = _count_products(monkeypatch)
    H = ImplicitHessian(F_bar, basis.U, basis.W, eps=1e-6, tol=1e-12)
    H.hint(b, delta_bar)
    x = H.solve(b)
    torch.testing.assert_close(x, torch.linalg.solve(dense, b), rtol=1e-9, atol=1e-12)
    assert torch.equal(products[0], delta_bar)  # the first product is the start's
    n = len(products)
    torch.testing.assert_close(H @ delta_bar, dense @ delta_bar, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(H @ (2.0 * x), dense @ (2.0 * x), rtol=1e-9, atol=1e-12)
    assert len(products) == n  # both known
    exact = torch.linalg.solve(dense, b)
    warm = ImplicitHessian(F_bar, basis.U, basis.W, eps=1e-6, tol=1e-9)
    warm.hint(b, exact)
    torch.testing.assert_close(warm.solve(b), exact, rtol=1e-12, atol=1e-12)
    assert warm.iterations == 0


def test_implicit_hessian_forms_the_matrix_when_cg_does_not_converge(caplog):
    deltas, fishers, basis = _problem(3, (40, 30), 3)
    F_bar = fishers[0] * torch.logspace(
        0, 8, 30, dtype=torch.float64
    )  # columns 1e8 apart: ill-conditioned
    dense = projected_hessian(F_bar, basis.U, basis.W, eps=1e-9)
    H = ImplicitHessian(F_bar, basis.U, basis.W, eps=1e-9, tol=1e-10, max_iter=2)
    b = dense @ torch.ones(basis.p, dtype=torch.float64)
    x = H.solve(b)
    assert H.fallback and "forming H̄" in caplog.text
    torch.testing.assert_close(x, solve_spd(dense, b), rtol=1e-12, atol=1e-12)


def _log_normal_fisher(sigma, shape=(120, 90), seed=3):
    """Element-wise log-normal Fisher: diag(H̄) cannot precondition it away (condition grows with sigma)."""
    return torch.exp(
        sigma
        * torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    )


def test_auto_solver_keeps_cg_where_it_converges_within_its_budget_and_forms_the_matrix_early_elsewhere(
    caplog,
):
    _, _, basis = _problem(8, (120, 90), 4)
    p = basis.p
    budget = p // 2
    for sigma, expect_cg in ((2.0, True), (4.0, False)):  # CG needs 14 and 32 steps to 1e-10
        F = _log_normal_fisher(sigma)
        dense = projected_hessian(F, basis.U, basis.W, eps=1e-9)
        b = dense @ torch.ones(p, dtype=torch.float64)
        plain = ImplicitHessian(F, basis.U, basis.W, eps=1e-9, tol=1e-10)
        plain.solve(b)
        assert (plain.iterations <= budget) == expect_cg and not plain.fallback
        auto = ImplicitHessian(
            F, basis.U, basis.W, eps=1e-9, tol=1e-10, max_iter=budget, adaptive=True
        )
        caplog.clear()
        x = auto.solve(b)
        torch.testing.assert_close(x, solve_spd(dense, b), rtol=1e-8, atol=1e-12)
        if expect_cg:
            assert not auto.fallback and auto.iterations == plain.iterations
        else:  # the rate of the first steps predicts more than the budget: H̄ formed at once, quietly
            assert auto.fallback and auto.iterations < budget // 2 and "forming" not in caplog.text
            assert auto.residual <= 1e-12
            auto.solve(2 * b)
            assert auto.iterations < budget // 2  # later right-hand sides use the formed H̄


def test_auto_solver_forms_the_matrix_for_float64_products_and_with_fisher_rank():
    deltas, fishers, basis = _problem(3, (20, 16), 2)
    coords = tagged_coordinates(basis)
    assert isinstance(
        layer_curvature(basis, {"tagged": coords}, fishers, deltas, eps=1e-6, solver="auto").H,
        torch.Tensor,
    )
    single = (
        basis.to(torch.float32),
        {"tagged": coords},
        [f.float() for f in fishers],
        [d.float() for d in deltas],
    )
    curv = layer_curvature(*single, eps=1e-6, solver="auto")
    assert isinstance(curv.H, ImplicitHessian) and curv.H.adaptive
    low = layer_curvature(*single, eps=1e-6, solver="auto", fisher_rank=1)
    assert isinstance(low.H, torch.Tensor) and low.fisher_rank_error is not None
    assert effective_solver("auto", None) == "auto" and effective_solver("auto", 2) == "dense"
    assert effective_solver("cg", None) == "cg"


def test_solved_hessian_gives_the_dense_merge_and_diagnostics_at_every_alpha_and_refuses_the_rest():
    deltas, fishers, basis = _problem(4, (36, 28), 3)
    coords = tagged_coordinates(basis)
    T = len(deltas)
    lam = torch.full((T,), 1.0 / T, dtype=torch.float64)
    dense = layer_curvature(basis, {"tagged": coords}, fishers, deltas, eps=1e-6)
    b, delta_bar = lam @ dense.Hx["tagged"], lam @ coords
    F_bar = sum(fishers) / T
    terms = solved_terms(
        ImplicitHessian(F_bar, basis.U, basis.W, eps=1e-6, tol=1e-12), b, delta_bar
    )
    solved = SolvedHessian(
        [(terms["b"], terms["solution"])],
        [(terms["delta_bar"], terms["H_delta_bar"]), (terms["solution"], terms["H_solution"])],
        where="layer `x`",
    )
    for alpha, aggregator in ((0.3, "frechet_sum"), (1.0, "frechet_mean")):
        want, want_coords = merge_layer(
            basis, dense.H, dense.Hx["tagged"], alpha=alpha, aggregator=aggregator
        )
        got, got_coords = merge_layer(
            basis, solved, dense.Hx["tagged"], alpha=alpha, aggregator=aggregator
        )
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
        assert subspace_variance(solved, b, dense.quad["tagged"], got_coords, lam) == pytest.approx(
            subspace_variance(dense.H, b, dense.quad["tagged"], want_coords, lam), rel=1e-9
        )
    assert curvature_heterogeneity(solved, b, delta_bar) == pytest.approx(
        curvature_heterogeneity(dense.H, b, delta_bar), rel=1e-9
    )
    # TSV-M's merge is a multiple of δ̄: its diagnostics need H̄ only there
    torch.testing.assert_close(
        solved @ (2.5 * delta_bar), 2.5 * (dense.H @ delta_bar), rtol=1e-12, atol=1e-12
    )
    with pytest.raises(ValueError, match="layer `x`.*uniform task weights"):
        solved.solve(torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64) @ dense.Hx["tagged"])
    with pytest.raises(ValueError, match="layer `x`.*known only on"):
        solved @ torch.ones(basis.p, dtype=torch.float64)


def test_diagnostics_with_the_implicit_hessian_equal_the_formed_ones():
    deltas, fishers, basis = _problem(4, (36, 28), 3)
    coords = tagged_coordinates(basis)
    lam = torch.full((4,), 0.25, dtype=torch.float64)
    dense = layer_curvature(basis, {"tagged": coords}, fishers, deltas, eps=1e-6)
    cg = layer_curvature(basis, {"tagged": coords}, fishers, deltas, eps=1e-6, solver="cg")
    assert isinstance(cg.H, ImplicitHessian)
    b = lam @ dense.Hx["tagged"]
    delta_bar = lam @ coords
    x_dense, x_cg = solve_spd(dense.H, b), solve_spd(cg.H, b)
    torch.testing.assert_close(x_cg, x_dense, rtol=1e-5, atol=1e-9)
    eta_dense = curvature_heterogeneity(dense.H, b, delta_bar)
    assert curvature_heterogeneity(cg.H, b, delta_bar) == pytest.approx(
        eta_dense, rel=1e-5, abs=1e-9
    )
    v_dense = subspace_variance(dense.H, b, dense.quad["tagged"], 4 * x_dense, lam)
    assert subspace_variance(cg.H, b, cg.quad["tagged"], 4 * x_cg, lam) == pytest.approx(
        v_dense, rel=1e-5
    )


def test_solver_cg_and_fisher_rank_exclude_each_other():
    deltas, fishers, basis = _problem(3, (20, 16), 2)
    coords = tagged_coordinates(basis)
    with pytest.raises(ValueError, match="two alternatives"):
        layer_curvature(
            basis, {"tagged": coords}, fishers, deltas, eps=1e-6, solver="cg", fisher_rank=1
        )
    with pytest.raises(ValueError, match="unknown solver"):
        layer_curvature(basis, {"tagged": coords}, fishers, deltas, eps=1e-6, solver="lu")


# --------------------------------------------------------------------------- V_S at the minimiser, amplification, ε / mean F̄


@pytest.mark.parametrize("mode", ["tagged", "projection"])
def test_v_s_is_the_frechet_objective_at_its_minimiser(mode):
    """Theorem 2's V_S = C − bᵀH̄⁻¹b equals Σ_t λ_t (δ̃* − δ̃_t)ᵀ H̃_t (δ̃* − δ̃_t) at δ̃* = H̄⁻¹b
    with explicit float64 H̃_t, and no other point (δ̄, the merged αT·δ̃*) has a smaller objective."""
    T = 4
    deltas, fishers, basis = _problem(T, (40, 32), 3, seed=5)
    coords = tagged_coordinates(basis) if mode == "tagged" else projected_coordinates(basis, deltas)
    eps = 1e-3
    curv = layer_curvature(basis, {mode: coords}, fishers, deltas, eps)
    lam = torch.full((T,), 1.0 / T, dtype=torch.float64)
    H_ts = [explicit_projected_hessian(f, basis.U, basis.W, eps) for f in fishers]
    H_bar = sum(l * H for l, H in zip(lam, H_ts))
    b = sum(l * (H @ c) for l, H, c in zip(lam, H_ts, coords))
    minimiser = torch.linalg.solve(H_bar, b)
    want = frechet_objective(minimiser, H_ts, coords, lam)
    v_s = frechet_variance(curv.H, lam @ curv.Hx[mode], curv.quad[mode], lam)
    assert v_s == pytest.approx(want, rel=1e-9)
    C = sum(float(l) * float(c @ (H @ c)) for l, H, c in zip(lam, H_ts, coords))
    assert v_s == pytest.approx(C - float(b @ minimiser), rel=1e-9)
    for other in (
        lam @ coords,
        T * minimiser,
        minimiser + 1e-2 * torch.randn(basis.p, dtype=torch.float64),
    ):
        assert frechet_objective(other, H_ts, coords, lam) > v_s
    # The solved (CG) artifact gives the same V_S without H̄.
    F_bar = sum(fishers) / T
    terms = solved_terms(
        ImplicitHessian(F_bar, basis.U, basis.W, eps=eps, tol=1e-12),
        lam @ curv.Hx[mode],
        lam @ coords,
    )
    solved = SolvedHessian([(terms["b"], terms["solution"])], [], where="layer `x`")
    assert frechet_variance(solved, lam @ curv.Hx[mode], curv.quad[mode], lam) == pytest.approx(
        want, rel=1e-8
    )


def test_layer_curvature_records_the_mean_of_the_averaged_fisher():
    deltas, fishers, basis = _problem(3, (20, 12), 2, dtype=torch.float32)
    curv = layer_curvature(basis, {"tagged": tagged_coordinates(basis)}, fishers, deltas, 1e-4)
    want = float(torch.stack([f.double() for f in fishers]).mean(dim=0).mean())
    assert curv.fisher_mean == pytest.approx(want, rel=1e-6)


def _explicit_amplification(basis, merged, alpha):
    """Float64 loop: per task, ‖merged on its atoms‖ / (α ‖its σ‖)."""
    out = []
    for t in range(basis.num_tasks):
        num = den = 0.0
        for i in range(basis.p):
            if int(basis.tags[i]) == t:
                num += float(merged[i]) ** 2
                den += (alpha * float(basis.sigma[i])) ** 2
        out.append(num**0.5 / den**0.5)
    return out


def test_merge_diagnostics_amplification_eps_relative_and_both_v_s():
    from pipeline.merge import MergeReport, _diagnostics

    T, alpha, eps = 4, 0.7, 1e-3
    deltas, fishers, basis = _problem(T, (36, 28), 3, seed=2)
    coords = tagged_coordinates(basis)
    curv = layer_curvature(basis, {"tagged": coords}, fishers, deltas, eps)
    lam = torch.full((T,), 1.0 / T, dtype=torch.float64)
    _, merged = merge_layer(basis, curv.H, curv.Hx["tagged"], alpha=alpha)  # δ̃_m = αT H̄⁻¹b
    got = _diagnostics(curv, coords, "tagged", merged, lam, basis, alpha, eps)
    want_amp = _explicit_amplification(basis, merged, alpha)
    assert got["amplification"] == pytest.approx(want_amp, rel=1e-12)
    assert len(set(round(a, 6) for a in want_amp)) > 1  # heterogeneous curvature: tasks differ
    mean_F = float(torch.stack(fishers).mean())
    assert got["eps_relative"] == pytest.approx(eps / mean_F, rel=1e-12)
    H_ts = [explicit_projected_hessian(f, basis.U, basis.W, eps) for f in fishers]
    minimiser = torch.linalg.solve(sum(l * H for l, H in zip(lam, H_ts)), lam @ curv.Hx["tagged"])
    assert got["V_S"] == pytest.approx(frechet_objective(minimiser, H_ts, coords, lam), rel=1e-9)
    assert got["V_S_merged"] == pytest.approx(
        frechet_objective(merged, H_ts, coords, lam), rel=1e-9
    )
    assert got["V_S_merged"] > got["V_S"]
    # TSV-M on tagged coordinates, δ̃_m = α σ: every task is amplified exactly 1×.
    tsvm = _diagnostics(curv, coords, "tagged", alpha * basis.sigma, lam, basis, alpha, eps)
    assert tsvm["amplification"] == pytest.approx([1.0] * T, rel=1e-12)
    # The report pools the squared parts over layers, then takes the ratio.
    report = MergeReport("epimer", {"alpha": alpha}, T)
    report.layers = {"a": got, "b": tsvm}
    pooled = [
        (
            (got["amplification_sq"][t][0] + tsvm["amplification_sq"][t][0])
            / (got["amplification_sq"][t][1] + tsvm["amplification_sq"][t][1])
        )
        ** 0.5
        for t in range(T)
    ]
    assert report.amplification() == pytest.approx(pooled, rel=1e-12)
    totals = report.totals()
    assert totals["V_S"] == pytest.approx(got["V_S"] + tsvm["V_S"])
    assert totals["V_S_merged"] == pytest.approx(got["V_S_merged"] + tsvm["V_S_merged"])
    assert (totals["amplification_min"], totals["amplification_max"]) == (min(pooled), max(pooled))
    assert totals["eps_relative_max"] == got["eps_relative"]
    assert report.as_dict()["amplification"] == report.amplification()


def test_merge_reports_from_stored_and_computed_curvature_agree(toy, tmp_path):
    """The hessian artifact records mean F̄ per layer: a merge from the stored basis and Hessians
    reports the same V_S, V_S_merged, amplification and ε / mean F̄ as one computing them."""
    import json

    from pipeline.cli import main

    from .test_cli import _args, _basis, _hessian, _stored_merge

    paths = toy(3, rank=2)
    basis = _basis(paths, tmp_path / "basis.zarr")
    hessian = tmp_path / "hessian.zarr"
    assert _hessian(paths, basis, hessian, "--eps", "1e-6") == 0
    common = ["--alpha", "0.5", "--eps", "1e-6", "--report"]
    out, report = tmp_path / "stored.safetensors", str(tmp_path / "stored.json")
    assert _stored_merge(paths, "epimer", basis, hessian, out, *common, report) == 0
    out, report = tmp_path / "computed.safetensors", str(tmp_path / "computed.json")
    assert main(_args(paths, "epimer", out, "--k", "2", *common, report)) == 0
    stored, computed = (
        json.loads((tmp_path / f"{n}.json").read_text()) for n in ("stored", "computed")
    )
    for key in (
        "V_S",
        "V_S_merged",
        "amplification_min",
        "amplification_max",
        "eps_relative_min",
        "eps_relative_max",
    ):
        assert stored["totals"][key] == pytest.approx(computed["totals"][key], rel=1e-4), key
    assert (
        stored["totals"]["V_S"] < stored["totals"]["V_S_merged"]
    )  # the minimiser is not αT times itself
    assert stored["amplification"] == pytest.approx(computed["amplification"], rel=1e-4)
    assert len(stored["amplification"]) == 3
