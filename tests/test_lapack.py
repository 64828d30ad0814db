"""The GIL-free LAPACK calls of the exact path (`pipeline.lapack`)."""

import threading
import time

import numpy as np
import pytest

from pipeline import lapack


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(70, 30), (30, 70), (40, 40)])
@pytest.mark.parametrize("order", ["C", "F"])
def test_small_gram_is_the_gram_of_the_smaller_side(dtype, shape, order):
    a = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    a = np.asfortranarray(a) if order == "F" else np.ascontiguousarray(a)
    g = lapack.small_gram(a)
    a64 = a.astype(np.float64)
    ref = a64.T @ a64 if shape[0] >= shape[1] else a64 @ a64.T
    assert g.dtype == dtype and g.flags.f_contiguous and g.shape == ref.shape
    upper = np.triu_indices(ref.shape[0])
    tol = 1e-4 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(g[upper], ref[upper], rtol=0, atol=tol * np.abs(ref).max())


def test_small_gram_of_a_strided_view():
    a = np.random.default_rng(1).standard_normal((60, 50))
    view = a[::2, ::2]  # neither C nor F contiguous
    np.testing.assert_allclose(np.triu(lapack.small_gram(view)), np.triu(view.T @ view))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("partial", [True, False])
def test_top_eigh_against_numpy(dtype, partial):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((50, 50))
    sym = x @ x.T
    w_ref, v_ref = np.linalg.eigh(sym)
    g = np.asfortranarray(np.triu(sym).astype(dtype))  # only the upper triangle is read
    w, v = lapack.top_eigh(g, 6, partial=partial)
    assert w.dtype == dtype and v.shape == (50, 6)
    tol = 1e-4 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(w, w_ref[::-1][:6], rtol=tol)
    cos = np.abs(np.sum(v.astype(np.float64) * v_ref[:, ::-1][:, :6], axis=0))
    np.testing.assert_allclose(cos, 1.0, atol=10 * tol)


def test_bad_input_is_rejected_with_the_shape_and_dtype():
    with pytest.raises(TypeError, match="float32 or float64.*int64"):
        lapack.small_gram(np.ones((3, 2), dtype=np.int64))
    with pytest.raises(ValueError, match=r"square Fortran-ordered.*\(3, 2\)"):
        lapack.top_eigh(np.ones((3, 2), order="F"), 1)
    with pytest.raises(ValueError, match=r"k must lie in \[1, 3\], got 4"):
        lapack.top_eigh(np.eye(3, order="F"), 4)
    with pytest.raises(AttributeError, match="no BLAS/LAPACK routine named 'zzzz'"):
        lapack._routine("zzzz")


def test_calls_release_the_gil():
    """Two threads inside the eigensolver at once: their calls overlap in time, which the
    GIL-holding SciPy wrappers never allow (the second starts when the first returns)."""
    x = np.random.default_rng(3).standard_normal((900, 900))
    gram = np.asfortranarray(x @ x.T)
    lapack.top_eigh(gram.copy(order="F"), 4, partial=False)  # workspace query, warm caches
    spans = [None, None]
    start = threading.Barrier(2)

    def run(i):
        g = gram.copy(order="F")
        start.wait()
        t0 = time.perf_counter()
        lapack.top_eigh(g, 4, partial=False)
        spans[i] = (t0, time.perf_counter())

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    (a0, a1), (b0, b1) = spans
    overlap = min(a1, b1) - max(a0, b0)
    assert overlap > 0.5 * min(a1 - a0, b1 - b0)
