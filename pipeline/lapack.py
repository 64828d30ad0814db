"""Symmetric rank-k updates and eigensolvers of LAPACK, called without holding the GIL.

SciPy's Python wrappers (`scipy.linalg.eigh`, `scipy.linalg.blas.dsyrk`) hold the GIL for the
whole call: through them, the exact path of the truncated SVD (`pipeline.subspace`) would run
one Gram eigensolve at a time however many worker threads it is given. SciPy also exports the
same routines as C function pointers (`scipy.linalg.cython_blas`, `cython_lapack`); called
through `ctypes`, which releases the GIL around a foreign call, they run side by side on the
shared worker threads (`pipeline.parallel`), one per core. The library is the one SciPy loads
(its bundled OpenBLAS in the wheels).

Every routine here takes NumPy arrays of float32 or float64 and works in that precision.
"""

from __future__ import annotations

import ctypes
import functools

import numpy as np

_INT = ctypes.c_int


@functools.cache
def _routine(name: str):
    """The C entry point of the BLAS or LAPACK routine `name` that SciPy exports."""
    import scipy.linalg.cython_blas as cython_blas
    import scipy.linalg.cython_lapack as cython_lapack

    # Prototypes of our own (not the shared ctypes.pythonapi attributes, which other code may set).
    get_name = ctypes.PYFUNCTYPE(ctypes.c_char_p, ctypes.py_object)(
        ("PyCapsule_GetName", ctypes.pythonapi)
    )
    get_pointer = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)(
        ("PyCapsule_GetPointer", ctypes.pythonapi)
    )
    for module in (cython_lapack, cython_blas):
        capsule = module.__pyx_capi__.get(name)
        if capsule is not None:
            # CFUNCTYPE: ctypes releases the GIL for the call.
            return ctypes.CFUNCTYPE(None)(get_pointer(capsule, get_name(capsule)))
    raise AttributeError(f"SciPy exports no BLAS/LAPACK routine named {name!r}")


def _prefix(dtype: np.dtype) -> str:
    if dtype == np.float32:
        return "s"
    if dtype == np.float64:
        return "d"
    raise TypeError(f"LAPACK routines here take float32 or float64 arrays, got {dtype}")


def _p(array: np.ndarray) -> ctypes.c_void_p:
    return ctypes.c_void_p(array.ctypes.data)


def _i(value: int):
    return ctypes.byref(_INT(value))


def _c(flag: str) -> ctypes.c_char_p:
    return ctypes.c_char_p(flag.encode())


def small_gram(a: np.ndarray) -> np.ndarray:
    """The Gram matrix of a's smaller side, aᵀa for a tall [m, n] (m ≥ n), else a aᵀ, by one
    symmetric rank-k update (`?syrk`: half a GEMM's work): [n_small, n_small] in a's dtype,
    Fortran order, with only the upper triangle set."""
    if not (a.flags.c_contiguous or a.flags.f_contiguous):
        a = np.ascontiguousarray(a)
    m, n = a.shape
    # A C-ordered a is the Fortran array X = aᵀ [n, m] (leading dimension n); an F-ordered one
    # is X = a [m, n] (leading dimension m). ?syrk forms X Xᵀ ('N') or Xᵀ X ('T').
    c_order = a.flags.c_contiguous
    lda = n if c_order else m
    small = min(m, n)
    trans = "N" if (m >= n) == c_order else "T"  # aᵀa = X Xᵀ in C order, a aᵀ in F order
    out = np.zeros((small, small), dtype=a.dtype, order="F")
    one, zero = np.ones(1, a.dtype), np.zeros(1, a.dtype)
    _routine(_prefix(a.dtype) + "syrk")(
        _c("U"), _c(trans), _i(small), _i(max(m, n)), _p(one), _p(a), _i(lda), _p(zero), _p(out),
        _i(small),
    )  # fmt: skip
    return out


@functools.cache
def _workspace(name: str, n: int, k: int) -> tuple[int, int]:
    """(lwork, liwork) LAPACK asks for: a workspace query (`lwork = −1`) of `name` at n, k."""
    dtype = np.float32 if name[0] == "s" else np.float64
    work, iwork = np.zeros(1, dtype), np.zeros(1, np.int32)
    a = np.zeros((max(n, 1), max(n, 1)), dtype, order="F")
    _call_eigensolver(name, a, n, k, np.zeros(n, dtype), None, work, -1, iwork, -1)
    return max(1, int(work[0])), max(1, int(iwork[0]))


def _call_eigensolver(name, a, n, k, w, z, work, lwork, iwork, liwork) -> tuple[int, int]:
    """One call of ?syevr (top k, range by index) or ?syevd (all); returns (info, found)."""
    info, found = _INT(0), _INT(0)
    if name.endswith("syevd"):
        _routine(name)(
            _c("V"), _c("U"), _i(n), _p(a), _i(n), _p(w), _p(work), _i(lwork), _p(iwork),
            _i(liwork), ctypes.byref(info),
        )  # fmt: skip
        return info.value, n
    zero = np.zeros(1, a.dtype)
    isuppz = np.zeros(2 * max(k, 1), np.int32)
    zz = z if z is not None else np.zeros((max(n, 1), max(k, 1)), a.dtype, order="F")
    _routine(name)(
        _c("V"), _c("I"), _c("U"), _i(n), _p(a), _i(n), _p(zero), _p(zero), _i(n - k + 1),
        _i(n), _p(zero), ctypes.byref(found), _p(w), _p(zz), _i(n), _p(isuppz), _p(work),
        _i(lwork), _p(iwork), _i(liwork), ctypes.byref(info),
    )  # fmt: skip
    return info.value, found.value


def top_eigh(gram: np.ndarray, k: int, *, partial: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The k largest eigenpairs of the symmetric `gram` [n, n] (its upper triangle is read;
    Fortran order, overwritten): eigenvalues [k] descending, eigenvectors [n, k], in its dtype.

    `partial`: LAPACK's ?syevr for those k pairs alone (tridiagonal reduction, then MRRR on
    the wanted eigenvalues and their back-transformation), else the full divide-and-conquer
    ?syevd and the top k of its result."""
    n = gram.shape[0]
    if gram.shape != (n, n) or not gram.flags.f_contiguous:
        raise ValueError(f"top_eigh takes a square Fortran-ordered array, got {gram.shape}")
    if not 1 <= k <= n:
        raise ValueError(f"top_eigh: k must lie in [1, {n}], got {k}")
    name = _prefix(gram.dtype) + ("syevr" if partial else "syevd")
    lwork, liwork = _workspace(name, n, k)
    w = np.zeros(n, gram.dtype)
    z = np.zeros((n, k), gram.dtype, order="F") if partial else None
    info, found = _call_eigensolver(
        name, gram, n, k, w, z, np.zeros(lwork, gram.dtype), lwork, np.zeros(liwork, np.int32),
        liwork,
    )  # fmt: skip
    if info != 0 or found != (k if partial else n):
        raise np.linalg.LinAlgError(
            f"LAPACK {name} failed on a {n} × {n} matrix (info = {info}, {found} eigenvalues "
            f"found of {k if partial else n})"
        )
    if partial:
        return w[:k][::-1].copy(), z[:, ::-1].copy()
    return w[n - k :][::-1].copy(), gram[:, n - k :][:, ::-1].copy()


def _fortran_operand(x: np.ndarray) -> tuple[str, int]:
    """(trans, leading dimension) that make BLAS read the C- or F-ordered x as xᵀ: a C-ordered
    [r, c] array is the Fortran array xᵀ [c, r]; an F-ordered one is x itself."""
    if x.flags.c_contiguous:
        return "N", max(1, x.shape[1])
    return "T", max(1, x.shape[0])


def matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b by one `?gemm` ([m, k] @ [k, n] → [m, n], C order), for C- or F-ordered a and b of
    one dtype (float32 or float64); other layouts are copied first."""
    if a.dtype != b.dtype:
        raise TypeError(f"matmul: operands of one dtype, got {a.dtype} and {b.dtype}")
    a, b = (
        x if x.flags.c_contiguous or x.flags.f_contiguous else np.ascontiguousarray(x)
        for x in (a, b)
    )
    (m, k), (k2, n) = a.shape, b.shape
    if k != k2:
        raise ValueError(f"matmul: shapes {a.shape} and {b.shape} do not chain")
    out = np.empty((m, n), dtype=a.dtype)
    if m == 0 or n == 0:
        return out
    if k == 0:
        out.fill(0)
        return out
    # out (C order) is the Fortran array outᵀ [n, m] = bᵀ aᵀ.
    tb, ldb = _fortran_operand(b)
    ta, lda = _fortran_operand(a)
    one, zero = np.ones(1, a.dtype), np.zeros(1, a.dtype)
    _routine(_prefix(a.dtype) + "gemm")(
        _c(tb), _c(ta), _i(n), _i(m), _i(k), _p(one), _p(b), _i(ldb), _p(a), _i(lda), _p(zero),
        _p(out), _i(max(1, n)),
    )  # fmt: skip
    return out


def orthonormalize(v: np.ndarray) -> np.ndarray | None:
    """v [n, k] (float64, C order, full column rank and near-orthonormal columns) made
    orthonormal to float64 round-off by one Cholesky QR step, v R⁻¹ with RᵀR = vᵀv (`?potrf`,
    `?trsm`), in place; None where vᵀv is not positive definite."""
    n, k = v.shape
    if not v.flags.c_contiguous:
        raise ValueError("orthonormalize takes a C-ordered array")
    if k == 0:
        return v
    prefix = _prefix(v.dtype)
    # v in C order is the Fortran array vᵀ [k, n]; vᵀv = X Xᵀ for that X.
    gram = np.zeros((k, k), v.dtype, order="F")
    one, zero = np.ones(1, v.dtype), np.zeros(1, v.dtype)
    _routine(prefix + "syrk")(
        _c("U"), _c("N"), _i(k), _i(n), _p(one), _p(v), _i(k), _p(zero), _p(gram), _i(k)
    )  # fmt: skip
    info = _INT(0)
    _routine(prefix + "potrf")(_c("U"), _i(k), _p(gram), _i(k), ctypes.byref(info))
    if info.value != 0:
        return None
    # v R⁻¹ in C order is (R⁻ᵀ vᵀ)ᵀ: solve Rᵀ Y = vᵀ for the Fortran array Y = vᵀ [k, n].
    _routine(prefix + "trsm")(
        _c("L"), _c("U"), _c("T"), _c("N"), _i(k), _i(n), _p(one), _p(gram), _i(k), _p(v), _i(k)
    )  # fmt: skip
    return v
