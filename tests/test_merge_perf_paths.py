"""The fast paths of the merge against float64 references: batched SVD with per-task
fallback, blocked projected Hessian at block edges, artifact-fed merges that skip reads."""

import re

import pytest
import torch

import pipeline.curvature as curvature
from pipeline.curvature import explicit_projected_hessian, projected_hessian
from pipeline.merge import BufferPool
from pipeline.subspace import gram_svd, truncated_svd_batch


def test_batched_svd_matches_float64_reference_with_per_task_fallback():
    g = torch.Generator().manual_seed(11)
    low = torch.randn(300, 10, generator=g, dtype=torch.float64) @ torch.randn(
        10, 200, generator=g, dtype=torch.float64
    )
    sigma = torch.tensor(
        [1.0, 0.95, 0.9, 0.85] + [0.8 * (1 - 1e-4 * i) for i in range(196)], dtype=torch.float64
    )
    P = torch.linalg.qr(torch.randn(300, 200, generator=g, dtype=torch.float64))[0]
    Q = torch.linalg.qr(torch.randn(200, 200, generator=g, dtype=torch.float64))[0]
    slow = 50.0 * (P * sigma) @ Q.T
    batch = torch.stack(
        [
            low + 1e-3 * torch.randn(300, 200, generator=g, dtype=torch.float64),  # converges
            slow,  # a 5 % gap at k, no cluster there: the cost model sends it to the exact path
            2.0 * low,
        ]
    )
    for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 1e-4)):
        U, s, V = truncated_svd_batch(batch.to(dtype), 4)
        assert U.dtype == torch.float64 and U.shape == (3, 300, 4) and V.shape == (3, 200, 4)
        for t in range(3):
            U_ref, s_ref, V_ref = gram_svd(batch[t], 4)
            torch.testing.assert_close(s[t], s_ref, rtol=tol, atol=0)
            approx, ref = (U[t] * s[t]) @ V[t].T, (U_ref * s_ref) @ V_ref.T
            assert torch.linalg.norm(approx - ref) <= tol * torch.linalg.norm(ref)


@pytest.mark.parametrize("p", [1, 5, 37])
@pytest.mark.parametrize("budget", [1, 200, 1 << 24])
def test_blocked_projected_hessian_equals_explicit_at_block_edges(monkeypatch, p, budget):
    g = torch.Generator().manual_seed(p)
    U = torch.linalg.qr(torch.randn(45, p, generator=g, dtype=torch.float64))[0]
    W = torch.linalg.qr(torch.randn(40, p, generator=g, dtype=torch.float64))[0]
    F = torch.rand(45, 40, generator=g, dtype=torch.float64) ** 3
    monkeypatch.setattr(
        curvature, "_BLOCK_ELEMENTS", budget * (45 + 40)
    )  # `budget` pairs per block
    torch.testing.assert_close(
        projected_hessian(F, U, W, eps=0.1),
        explicit_projected_hessian(F, U, W, eps=0.1),
        rtol=1e-12,
        atol=1e-12,
    )


def test_buffer_pool_reuses_memory_by_size():
    pool = BufferPool()
    a = pool.get((2, 6, 4), torch.float32)
    b = pool.get((2, 4, 6), torch.float32)  # same size: the same storage, reshaped
    assert a.data_ptr() == b.data_ptr() and b.shape == (2, 4, 6)
    assert pool.get((2, 6, 4), torch.float64).data_ptr() != a.data_ptr()
    assert pool.get((2, 6, 4), torch.float32, "fishers").data_ptr() != a.data_ptr()  # another slot


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_pass_finiteness_check_agrees_with_isfinite(dtype):
    """`all_finite` sums instead of testing every entry: a NaN or ±inf anywhere fails, and a
    finite tensor whose sum overflows still passes (through the exact check)."""
    from pipeline.merge import all_finite

    big = torch.finfo(dtype).max
    x = torch.randn(1000, dtype=dtype)
    assert all_finite(x)
    assert all_finite(
        torch.full((10,), big, dtype=dtype)
    )  # the sum overflows; every entry is finite
    for bad in (float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y[517] = bad
        assert not all_finite(y)
    z = torch.full((10,), big, dtype=dtype)
    z[3] = -big
    z[4] = float("inf")
    assert not all_finite(z)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fisher_check_by_integer_maximum(tmp_path, dtype):
    """The Fisher check's one-pass maximum over the bits: ordinary diagonals (zeros included,
    and −0, which takes the exact path) pass; NaN, inf, negatives and all-zero fail, named."""
    from pipeline.merge import MergeInputs, read_fishers
    from pipeline.store import ArtifactError, open_tensors, write_safetensors

    base = {"w": torch.zeros(4, 5, dtype=dtype)}
    write_safetensors(tmp_path / "p.safetensors", base)
    cases = {
        "ok": torch.rand(4, 5, dtype=dtype)
        * torch.tensor([0.0, 1.0, 1e-30, 1e30, 2.0], dtype=dtype),
        "minus_zero": torch.tensor([-0.0] + [1.0] * 19, dtype=dtype).view(4, 5),
        "nan": torch.ones(4, 5, dtype=dtype).index_put_(
            (torch.tensor([1]), torch.tensor([2])), torch.tensor(float("nan"), dtype=dtype)
        ),
        "inf": torch.ones(4, 5, dtype=dtype).index_put_(
            (torch.tensor([3]), torch.tensor([0])), torch.tensor(float("inf"), dtype=dtype)
        ),
        "negative": torch.ones(4, 5, dtype=dtype).index_put_(
            (torch.tensor([0]), torch.tensor([4])), torch.tensor(-0.5, dtype=dtype)
        ),
        "zero": torch.zeros(4, 5, dtype=dtype),
    }
    expected = {
        "nan": "contains NaN or Inf",
        "inf": "contains NaN or Inf",
        "negative": "negative entries (-0.5)",
        "zero": "is all zero",
    }
    for case, fisher in cases.items():
        write_safetensors(tmp_path / f"{case}.safetensors", {"w": fisher})
        with (
            open_tensors(tmp_path / "p.safetensors") as p,
            open_tensors(tmp_path / f"{case}.safetensors") as f,
        ):
            inputs = MergeInputs(pretrained=p, finetuned=[p], fishers=[f])
            if case in expected:
                with pytest.raises(ArtifactError, match=re.escape(expected[case])):
                    read_fishers(inputs, "w", dtype)
            else:
                assert torch.equal(read_fishers(inputs, "w", dtype)[0], fisher)


def _benchmark_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "merge.py"
    spec = importlib.util.spec_from_file_location("benchmark_merge", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("shape", [(256, 1024), (768, 256)])
def test_benchmark_spectral_families_have_their_spectra(shape):
    """benchmarks/merge.py --spectrum: each family's task vectors have the spectrum it names."""
    bench = _benchmark_module()
    assert set(bench.SPECTRA) == {
        "low-rank",
        "power-0.5",
        "power-1",
        "noise-floor",
        "rank-deficient",
        "duplicated",
        "fisher-scales",
    }
    g = torch.Generator().manual_seed(0)
    n = min(shape)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    target = 2e-3 * (shape[0] * shape[1]) ** 0.5
    for name, a in (("power-0.5", -0.5), ("power-1", -1.0)):
        s = torch.linalg.svdvals(bench._task_vector(shape, name, g).double())
        torch.testing.assert_close(s / s[0], i**a, rtol=1e-3, atol=1e-6)
        assert abs(float(s.norm()) / target - 1) < 1e-3
    s = torch.linalg.svdvals(bench._task_vector(shape, "rank-deficient", g).double())
    assert s[15] > 1e3 * s[16]  # exactly rank 16 (float32 round-off beyond)
    s = torch.linalg.svdvals(bench._task_vector(shape, "noise-floor", g).double())
    assert s[15] > 2 * s[16]  # 16 directions above the bulk,
    assert s[32] / s[31] > 0.99 and s[71] / s[31] > 0.8  # and σ_k inside a dense bulk
    s = torch.linalg.svdvals(bench._task_vector(shape, "low-rank", g).double())
    assert s[63] > 10 * s[64]  # rank 64 above the floor: a gap past k = 32


def test_benchmark_gemm_probe_times_its_product_and_restores_the_threads(monkeypatch):
    """benchmarks/merge.py's `gemm_gflops` column: 2·m·n·p flops over the median product time,
    with the thread count asked for during the products and torch's own restored after."""
    bench = _benchmark_module()
    assert "gemm_gflops" in bench.KEYS
    monkeypatch.setattr(bench, "PROBE_SHAPE", (64, 32, 16))
    seen = []
    real_mm = torch.Tensor.__matmul__

    def mm(a, b):
        seen.append((tuple(a.shape), tuple(b.shape), torch.get_num_threads()))
        return real_mm(a, b)

    clock = iter(range(100))  # each perf_counter call 1 s later: every product takes 1 s
    monkeypatch.setattr(bench.time, "perf_counter", lambda: float(next(clock)))
    monkeypatch.setattr(torch.Tensor, "__matmul__", mm)
    before = torch.get_num_threads()
    rate = bench.gemm_rate(1, repeats=5)
    assert rate == pytest.approx(2 * 64 * 32 * 16 / 1e9)
    assert seen == [((64, 32), (32, 16), 1)] * 7  # two warm-up products, then five timed
    assert torch.get_num_threads() == before


def test_available_cores_follow_the_affinity_mask(monkeypatch):
    import os

    from pipeline import parallel

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3}, raising=False)
    assert parallel.available_cores() == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 5}, raising=False)
    assert parallel.available_cores() == 3

    def missing(pid):
        raise OSError("no affinity")

    monkeypatch.setattr(os, "sched_getaffinity", missing, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert parallel.available_cores() == 6
