/* Compiled merge passes (`pipeline.methods._passes`, built by setup.py; optional): TIES's
 * per-task pass and Fisher-weighted averaging (further down).
 *
 * One task's TIES pass over a range of coordinates, fused: the compiled twin of the NumPy
 * steps in `TrimmedSums._pass` (pipeline/methods/ties.py), with the same float operations in
 * the same order, so the sums come out bit for bit the same (tests/methods/test_ties.py).
 *
 * Per coordinate i, with δ = src[i] − ref[i] (src[i] without ref):
 *   kept  d = |δ| > hi                     (whatever the exact threshold in [lo, hi])
 *   band  lo ≤ |δ| ≤ hi                    → (i + index_base, δ) appended to the band arrays
 *   below |δ| < lo, or δ NaN               → counted
 *   κ = δ·d (δ where kept, else δ·0: NaN stays NaN for `finish` to report)
 *   P += max(κ, 0), N += min(κ, 0), c⁺ += κ > 0, c += d
 * These four sums are all either sign election needs (`TrimmedSums.finish`): "mass" reads the
 * sign of P + N, "frequency" compares c⁺ with c⁻ = c − c⁺; the election itself is one shared
 * NumPy select over the sums, so both passes feed it the same bits.
 * `fresh` (the first task) writes 0 + value instead of adding. NumPy's maximum and minimum
 * propagate NaN, as these do; the sign of a zero they return never reaches the sums' bits
 * (P and N start at +0, and x + (±0) = x for every x but −0).
 *
 * One pass reads the task and θ0 once and each sum once, where the NumPy steps sweep a cached
 * block a dozen times. The GIL is released, so
 * the caller's threads run their ranges in parallel.
 *
 * ties_pass(dtype, src, ref, P, N, c_pos, c_kept, n, lo, hi, fresh, band, band_idx, band_val, index_base)
 *   dtype: 4 (float32) or 8 (float64); the addresses are ints (0 for no ref); counts are uint8;
 *   band_idx (int64) and band_val (dtype) hold room for n values when band is true.
 *   Returns (number below lo, number in the band).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define BLOCK 2048

/* One block of at most BLOCK coordinates: sums, counts and the band's byte mask in one
 * branch-free (vectorisable) loop; FRESH and HAS_REF are constants at each call site, so each
 * of the four variants compiles to its own straight loop. Returns the number below lo. */
#define DEFINE_BLOCK(NAME, REAL, ABS)                                                          \
    static inline __attribute__((always_inline)) int NAME(                                     \
        const REAL *restrict s, const REAL *restrict r, REAL *restrict p, REAL *restrict q,   \
        uint8_t *restrict c1, uint8_t *restrict c2, uint8_t *restrict mask, int m, REAL lo,    \
        REAL hi, const int FRESH, const int HAS_REF)                                           \
    {                                                                                          \
        int under = 0;                                                                         \
        for (int i = 0; i < m; i++) {                                                          \
            REAL x = HAS_REF ? s[i] - r[i] : s[i];                                             \
            REAL a = ABS(x); /* NaN stays NaN: neither kept nor in the band, but below */      \
            int d = a > hi;                                                                    \
            int ge = a >= lo;                                                                  \
            mask[i] = (uint8_t)(ge & !d);                                                      \
            under += !ge;                                                                      \
            REAL k = d ? x : x * (REAL)0;                                                      \
            int nan = k != k;                                                                  \
            REAL mx = ((k >= 0) | nan) ? k : (REAL)0;                                          \
            REAL mn = ((k <= 0) | nan) ? k : (REAL)0;                                          \
            uint8_t up = (uint8_t)(k > 0);                                                     \
            if (FRESH) {                                                                       \
                p[i] = mx + (REAL)0;                                                           \
                q[i] = mn + (REAL)0;                                                           \
                c1[i] = up;                                                                    \
                c2[i] = (uint8_t)d;                                                            \
            } else {                                                                           \
                p[i] += mx;                                                                    \
                q[i] += mn;                                                                    \
                c1[i] += up;                                                                   \
                c2[i] += (uint8_t)d;                                                           \
            }                                                                                  \
        }                                                                                      \
        return under;                                                                          \
    }

#define DEFINE_PASS(NAME, BLOCK_FN, REAL)                                                      \
    static void NAME(const REAL *src, const REAL *ref, REAL *P, REAL *N, uint8_t *cp,          \
                     uint8_t *ck, Py_ssize_t n, REAL lo, REAL hi, int fresh, int band,         \
                     int64_t *band_idx, REAL *band_val, int64_t index_base, Py_ssize_t *below, \
                     Py_ssize_t *in_band)                                                      \
    {                                                                                          \
        Py_ssize_t nb = 0, nbelow = 0;                                                         \
        uint8_t mask[BLOCK];                                                                   \
        for (Py_ssize_t b0 = 0; b0 < n; b0 += BLOCK) {                                        \
            const int m = (int)(n - b0 < BLOCK ? n - b0 : BLOCK);                             \
            const REAL *s = src + b0, *r = ref ? ref + b0 : NULL;                              \
            int under;                                                                         \
            if (fresh && r)                                                                    \
                under = BLOCK_FN(s, r, P + b0, N + b0, cp + b0, ck + b0, mask, m, lo, hi, 1, 1); \
            else if (fresh)                                                                    \
                under = BLOCK_FN(s, r, P + b0, N + b0, cp + b0, ck + b0, mask, m, lo, hi, 1, 0); \
            else if (r)                                                                        \
                under = BLOCK_FN(s, r, P + b0, N + b0, cp + b0, ck + b0, mask, m, lo, hi, 0, 1); \
            else                                                                               \
                under = BLOCK_FN(s, r, P + b0, N + b0, cp + b0, ck + b0, mask, m, lo, hi, 0, 0); \
            if (!band)                                                                         \
                continue;                                                                      \
            nbelow += under;                                                                   \
            /* The band is about 1 % of the values: skip 8 mask bytes at a time. */            \
            for (int w = 0; w < m; w += 8) {                                                   \
                uint64_t word = 0;                                                             \
                int len = m - w < 8 ? m - w : 8;                                               \
                memcpy(&word, mask + w, (size_t)len);                                          \
                if (!word)                                                                     \
                    continue;                                                                  \
                for (int i = w; i < w + len; i++) {                                            \
                    if (mask[i]) {                                                             \
                        band_idx[nb] = index_base + b0 + i;                                    \
                        band_val[nb] = r ? s[i] - r[i] : s[i];                                 \
                        nb++;                                                                  \
                    }                                                                          \
                }                                                                              \
            }                                                                                  \
        }                                                                                      \
        *below = nbelow;                                                                       \
        *in_band = nb;                                                                         \
    }

DEFINE_BLOCK(block_f32, float, fabsf)
DEFINE_BLOCK(block_f64, double, fabs)
DEFINE_PASS(pass_f32, block_f32, float)
DEFINE_PASS(pass_f64, block_f64, double)

/* Fisher-weighted averaging over a range of coordinates: the compiled twin of
 * `pipeline.methods.fisher._merge_cpu`, the same float operations in the same order. For T
 * rows of deltas d and Fisher diagonals f (row t at t·stride), per coordinate i:
 *   w_t = f_t[i] (/ scale_t) + ε,  out[i] = (Σ_t w_t·d_t[i]) / (Σ_t w_t), both sums in task order.
 * Blocks of BLOCK coordinates keep the two running sums in cache (vectorisable loops). */
#define DEFINE_FISHER(NAME, REAL)                                                              \
    static void NAME(int T, const REAL *d, const REAL *f, Py_ssize_t stride, Py_ssize_t n,      \
                     REAL eps, const REAL *scale, REAL *out)                                   \
    {                                                                                          \
        REAL tot[BLOCK], num[BLOCK];                                                           \
        for (Py_ssize_t b0 = 0; b0 < n; b0 += BLOCK) {                                        \
            const int m = (int)(n - b0 < BLOCK ? n - b0 : BLOCK);                             \
            for (int t = 0; t < T; t++) {                                                      \
                const REAL *restrict ft = f + t * stride + b0;                                 \
                const REAL *restrict dt = d + t * stride + b0;                                 \
                const REAL s = scale ? scale[t] : (REAL)1;                                     \
                if (t == 0) {                                                                  \
                    for (int i = 0; i < m; i++) {                                              \
                        REAL w = (scale ? ft[i] / s : ft[i]) + eps;                            \
                        tot[i] = w;                                                            \
                        num[i] = w * dt[i];                                                    \
                    }                                                                          \
                } else {                                                                       \
                    for (int i = 0; i < m; i++) {                                              \
                        REAL w = (scale ? ft[i] / s : ft[i]) + eps;                            \
                        tot[i] = tot[i] + w;                                                   \
                        num[i] = num[i] + w * dt[i];                                           \
                    }                                                                          \
                }                                                                              \
            }                                                                                  \
            for (int i = 0; i < m; i++)                                                        \
                out[b0 + i] = num[i] / tot[i];                                                 \
        }                                                                                      \
    }

DEFINE_FISHER(fisher_f32, float)
DEFINE_FISHER(fisher_f64, double)

/* fisher_pass(dtype, T, d, f, stride, n, eps, scale, out): addresses as ints (scale 0: none;
 * else T values of the dtype); d and f hold T rows of `stride` values from the given start. */
static PyObject *fisher_pass(PyObject *self, PyObject *args)
{
    int itemsize, T;
    unsigned long long d, f, scale, out;
    Py_ssize_t stride, n;
    double eps;
    if (!PyArg_ParseTuple(args, "iiKKnndKK", &itemsize, &T, &d, &f, &stride, &n, &eps, &scale, &out))
        return NULL;
    if ((itemsize != 4 && itemsize != 8) || T < 1 || n < 0 || stride < n || !d || !f || !out) {
        PyErr_SetString(PyExc_ValueError, "Fisher pass: bad dtype, task count, length or buffer");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    if (itemsize == 4)
        fisher_f32(T, (const float *)(uintptr_t)d, (const float *)(uintptr_t)f, stride, n, (float)eps,
                   (const float *)(uintptr_t)scale, (float *)(uintptr_t)out);
    else
        fisher_f64(T, (const double *)(uintptr_t)d, (const double *)(uintptr_t)f, stride, n, eps,
                   (const double *)(uintptr_t)scale, (double *)(uintptr_t)out);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *ties_pass(PyObject *self, PyObject *args)
{
    int itemsize, fresh, band;
    unsigned long long src, ref, P, N, cp, ck, band_idx, band_val;
    Py_ssize_t n;
    long long index_base;
    double lo, hi;
    if (!PyArg_ParseTuple(args, "iKKKKKKnddppKKL", &itemsize, &src, &ref, &P, &N, &cp, &ck, &n, &lo,
                          &hi, &fresh, &band, &band_idx, &band_val, &index_base))
        return NULL;
    if (itemsize != 4 && itemsize != 8) {
        PyErr_SetString(PyExc_ValueError, "TIES pass: dtype must be float32 (4) or float64 (8)");
        return NULL;
    }
    if (n < 0 || !src || !P || !N || !cp || !ck || (band && (!band_idx || !band_val))) {
        PyErr_SetString(PyExc_ValueError, "TIES pass: a null buffer or a negative length");
        return NULL;
    }
    Py_ssize_t below = 0, in_band = 0;
    Py_BEGIN_ALLOW_THREADS
    if (itemsize == 4)
        pass_f32((const float *)(uintptr_t)src, (const float *)(uintptr_t)ref, (float *)(uintptr_t)P,
                 (float *)(uintptr_t)N, (uint8_t *)(uintptr_t)cp, (uint8_t *)(uintptr_t)ck, n,
                 (float)lo, (float)hi, fresh, band, (int64_t *)(uintptr_t)band_idx,
                 (float *)(uintptr_t)band_val, (int64_t)index_base, &below, &in_band);
    else
        pass_f64((const double *)(uintptr_t)src, (const double *)(uintptr_t)ref,
                 (double *)(uintptr_t)P, (double *)(uintptr_t)N, (uint8_t *)(uintptr_t)cp,
                 (uint8_t *)(uintptr_t)ck, n, lo, hi, fresh, band, (int64_t *)(uintptr_t)band_idx,
                 (double *)(uintptr_t)band_val, (int64_t)index_base, &below, &in_band);
    Py_END_ALLOW_THREADS
    return Py_BuildValue("nn", below, in_band);
}

static PyMethodDef methods[] = {
    {"ties_pass", ties_pass, METH_VARARGS, "One task's fused TIES pass over a range (see the source)."},
    {"fisher_pass", fisher_pass, METH_VARARGS, "Fisher-weighted averaging over a range (see the source)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_passes", NULL, -1, methods};

PyMODINIT_FUNC PyInit__passes(void) { return PyModule_Create(&module); }
