"""TIES-Merging (Yadav et al., 2023): trim, elect sign, disjoint merge.

1. Trim: keep the top `density` % of each task vector by magnitude, over the flattened
   concatenation of all merged tensors of that task (one global threshold per task).
2. Elect a sign per coordinate, by one of two rules (`sign`):
   - "mass" (the TIES paper's rule and its authors' `resolve_sign(..., "mass")`): the sign of
     the sum of the kept values; where that sum is exactly zero, the majority sign of the
     kept non-zeros (a tied vote elects nothing);
   - "frequency" (mergekit's `get_mask(..., method="count")`): the sign held by more kept
     non-zeros, + on a tie (c⁺ ≥ c⁻ elects +, so a coordinate with nothing kept elects + and
     merges to 0). Magnitudes play no part in the vote.
3. Disjoint merge: the mean of the kept values that agree with the elected sign (divided by
   the number of agreeing non-zeros, at least 1); `disjoint="sum"` omits the division.
θ = θ0 + α Δ.

`TrimmedSums` computes it from four running sums, one task at a time (see there); the merge
driver streams every task through it once, and `merge_layer` is the same code on one tensor.
"""

from __future__ import annotations

import ctypes
import functools
import math
import mmap
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pipeline import parallel

try:  # the compiled pass (setup.py builds it where a C compiler is found)
    from pipeline.methods import _passes as KERNEL
except ImportError:  # the NumPy pass: the same bits, more slowly
    KERNEL = None


#: The sign elections (`TrimmedSums.finish`) and disjoint merges (`TrimmedSums.merged`).
SIGN_RULES = ("mass", "frequency")
DISJOINT_MODES = ("mean", "sum")


def check_options(sign: str, disjoint: str) -> None:
    """ValueError naming the accepted values when `sign` or `disjoint` is not one of them."""
    if sign not in SIGN_RULES:
        raise ValueError(
            f"unknown TIES sign election `{sign}` (expected one of: {', '.join(SIGN_RULES)})"
        )
    if disjoint not in DISJOINT_MODES:
        raise ValueError(
            f"unknown TIES disjoint merge `{disjoint}` (expected one of: {', '.join(DISJOINT_MODES)})"
        )


def magnitude_threshold(magnitudes: torch.Tensor, density: float) -> float:
    """Smallest magnitude kept when keeping the ⌊density·N/100⌋ largest of `magnitudes` [N].

    density is a percentage in (0, 100]. Values equal to the threshold are kept too.
    """
    n = magnitudes.numel()
    n_keep = int(n * density / 100.0)
    if n_keep >= n:
        return 0.0
    if n_keep == 0:
        return float("inf")
    # The n_keep-th largest is the (n - n_keep + 1)-th smallest (kthvalue is 1-indexed).
    return float(_kth_smallest(magnitudes.flatten(), n - n_keep + 1))


def _kth_smallest(x: torch.Tensor, k: int, chunk: int = 1 << 22) -> torch.Tensor:
    """The k-th smallest (1-indexed) of non-negative float32/float64 values x [N], exactly.

    Large inputs go through `_bracketed_select` (one pass over x), and through `_radix_select`
    (two passes) in the rare case that its bracket misses.
    """
    if x.dtype not in (torch.float32, torch.float64) or x.numel() < (1 << 20):
        return torch.kthvalue(
            x.float() if x.dtype not in (torch.float32, torch.float64) else x, k
        ).values
    found = _bracketed_select(x, k, chunk)
    return found if found is not None else _radix_select(x, k, chunk)


def _bracketed_select(
    x: torch.Tensor, k: int, chunk: int, sample: int = 1 << 20, seed: int = 0
) -> torch.Tensor | None:
    """The k-th smallest of x [N] from one pass, or None when the bracket missed it.

    The order statistics of a random sample of `sample` values (fixed seed), six standard
    deviations of the sample rank either side of k/N, bracket the k-th value [lo, hi]; one
    pass counts the values below lo and gathers those in [lo, hi] (about 0.5 % of N at the
    default density), and `kthvalue` of that band is exact whenever the count shows the k-th
    value inside it. The answer does not depend on the sample: only whether it is found here.
    """
    n = x.numel()
    g = torch.Generator(device=x.device).manual_seed(seed)
    lo, hi = _bracket(x[torch.randint(n, (sample,), generator=g, device=x.device)], k, n)
    below, band = 0, []
    for part in x.split(chunk):
        at_least = part >= lo
        below += part.numel() - int(torch.count_nonzero(at_least))  # ~25× faster than a bool .sum()
        band.append(part[at_least.logical_and_(part <= hi)])
    inside = torch.cat(band)
    if below < k <= below + inside.numel():
        return torch.kthvalue(inside, k - below).values
    return None


def _bracket(picked: torch.Tensor, k: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[lo, hi] from a random sample `picked` of n values: its order statistics six standard
    deviations of the sample rank either side of k/n (the k-th smallest of all n is inside
    unless the sample misrepresents them; callers check by counting)."""
    sample = picked.numel()
    q = k / n
    half = 6.0 * math.sqrt(sample * q * (1.0 - q)) + 16.0
    lo_rank = max(1, math.floor(q * sample - half))
    hi_rank = min(sample, math.ceil(q * sample + half))
    if picked.device.type == "cpu" and picked.dtype in (torch.float32, torch.float64):
        # Both order statistics from one NumPy introselect (NaN sorts last, as in kthvalue).
        part = torch.from_numpy(np.partition(picked.numpy(), [lo_rank - 1, hi_rank - 1]))
        return part[lo_rank - 1], part[hi_rank - 1]
    return torch.kthvalue(picked, lo_rank).values, torch.kthvalue(picked, hi_rank).values


def _radix_select(x: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """The k-th smallest of non-negative float32/float64 values x [N], exactly, in two passes.

    Radix select: for non-negative IEEE floats the bit patterns, read as integers, sort like
    the values, so a histogram of the top 16 bits finds the bucket holding the k-th value
    and only that bucket goes to `kthvalue`. Both passes run over chunks of `chunk` values,
    so the temporaries stay small (no 8-byte copy of all N values).
    """
    ints = x.view(torch.int32 if x.dtype == torch.float32 else torch.int64)
    shift = ints.element_size() * 8 - 16  # sign bit is 0: 15 significant bits remain
    counts = torch.zeros(1 << 15, dtype=torch.int64, device=x.device)
    for part in ints.split(chunk):
        counts += torch.bincount(part >> shift, minlength=1 << 15)
    counts = counts.cumsum(0)
    bucket = int(torch.searchsorted(counts, torch.tensor(k, dtype=counts.dtype, device=x.device)))
    below = int(counts[bucket - 1]) if bucket else 0
    inside = torch.cat(
        [v[(i >> shift) == bucket] for v, i in zip(x.split(chunk), ints.split(chunk))]
    )
    return torch.kthvalue(inside, k - below).values


def merge_layer(
    deltas: torch.Tensor,
    thresholds: torch.Tensor,
    *,
    alpha: float,
    disjoint: str = "mean",
    sign: str = "mass",
    chunk: int | None = None,
) -> torch.Tensor:
    """deltas: [T, *shape]; thresholds: [T] per-task magnitude thresholds → α Δ [*shape].

    `sign` is the election rule ("mass" or "frequency", see the module docstring). Through
    `TrimmedSums` (on the CPU, in steps of `chunk` coordinates, default `PASS_CHUNK`): every
    coordinate's arithmetic is the same whatever the step, so the result does not depend on
    it. Raises ValueError for NaN or Inf task vectors and for unknown `sign` or `disjoint`.
    """
    check_options(sign, disjoint)
    T = deltas.shape[0]
    dtype = deltas.dtype if deltas.dtype in (torch.float32, torch.float64) else torch.float32
    flat = deltas.reshape(T, -1).to(device="cpu", dtype=dtype)
    sums = TrimmedSums(flat.shape[1], dtype, T, chunk=chunk or PASS_CHUNK)
    for t, threshold in enumerate(thresholds.tolist()):
        sums.add(flat[t], None, threshold)
    if not sums.finish(sign):
        raise ValueError("TIES: the task vectors contain NaN or Inf")
    return (
        sums.merged(alpha, disjoint)
        .view(deltas.shape[1:])
        .to(device=deltas.device, dtype=deltas.dtype)
    )


# --------------------------------------------------------------------------- streamed sums


#: Coordinates per step of the element-wise passes: the step's scratch arrays stay in cache.
PASS_CHUNK = 1 << 18
#: Values sampled to bracket a task's threshold (`TrimmedSums.add_top`).
BRACKET_SAMPLE = 1 << 18

#: A task for `TrimmedSums`: a flat tensor, or [(offset, 1-D array)] pieces tiling [0, n) in order.
Source = torch.Tensor | Sequence[tuple[int, np.ndarray]]


class TrimmedSums:
    """TIES over flat task vectors added one task at a time, without holding more than one.

    Per coordinate, over the trimmed values κ_t (δ_t where |δ_t| ≥ the task's threshold, else 0):
    P = Σ_t max(κ_t, 0), N = Σ_t min(κ_t, 0), c⁺ = #{t: κ_t > 0}, c = #{t: κ_t ≠ 0}, summed in
    task order; c⁻ = c − c⁺ (c adds the pass's kept mask as it is: one comparison fewer per task
    than counting c⁻). That is all the merge needs, under either election: "mass" elects the
    sign of Σ_t κ_t = P + N (a zero mass: the sign of c⁺ − c⁻), "frequency" elects + where
    c⁺ ≥ c⁻; the kept values agreeing with the elected sign sum to P (count c⁺) for +, to N
    (count c⁻) for −. So each task is read once, its threshold and its contribution come from
    the same pass (`add_top`), the election is a select between the sums (`finish`), and the
    merge for any α is a scaling (`merged`).

    The passes run in steps of `PASS_CHUNK` coordinates, split over the CPU threads: through the
    compiled kernel (`KERNEL`, pipeline/methods/_passes.c: one fused sweep per step, the GIL
    released) where it is built, else as a dozen NumPy element-wise steps on cached data; both
    give the same bits.
    """

    def __init__(self, n: int, dtype: torch.dtype, num_tasks: int, chunk: int = PASS_CHUNK) -> None:
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"TIES sums are float32 or float64, got {dtype}")
        self.n, self.dtype, self.chunk = n, dtype, max(1, chunk)
        self.count_dtype = torch.uint8 if num_tasks < 256 else torch.int32
        # Not zeroed: the first task's pass writes them (0 + its values, the same bits as adding
        # to zeros) instead of reading and adding to a model's worth of zeros.
        self.pos = torch.empty(n, dtype=dtype)  # P, then the agreeing sum (after `finish`)
        self.neg = torch.empty(n, dtype=dtype)  # N
        self.n_pos = torch.empty(n, dtype=self.count_dtype)  # c⁺, then the agreeing count
        self.n_kept = torch.empty(n, dtype=self.count_dtype)  # c = c⁺ + c⁻
        self.empty = True  # no task added yet: the four arrays hold no values
        self.finished = False
        self._idx: torch.Tensor | None = None
        self._base_sample: tuple[torch.Tensor, torch.Tensor] | None = None  # (base, base at _idx)

    def reset(self) -> None:
        """Back to no tasks (after a bracket miss, see `add_top`)."""
        self.empty = True
        self.finished = False

    # ----------------------------------------------------------------- adding tasks

    def add(self, source: Source, base: torch.Tensor | None, threshold: float) -> None:
        """Add the task δ = source − base (or source itself when base is None), keeping |δ| ≥ threshold.

        source: a flat tensor of n values, or pieces [(offset, 1-D array)] that tile [0, n) in
        order (e.g. read-only views of each tensor in a mapped file, `SafetensorsReader.mapped`)."""
        self._add(self._pieces(source), base, float(threshold))

    def _add(
        self, pieces: list[tuple[int, np.ndarray]], base: torch.Tensor | None, threshold: float
    ) -> None:
        self._run(pieces, base, threshold, self._below(threshold), band=False)

    def add_top(self, source: Source, base: torch.Tensor | None, density: float) -> float | None:
        """Add the task δ = source − base keeping its top `density` % by magnitude; its threshold.

        One pass: a random sample's order statistics bracket the threshold [lo, hi] (as in
        `_bracketed_select`); the pass adds every |δ| > hi at once, counts the values below lo
        and gathers the band [lo, hi] (about 1 % of δ), whose `kthvalue` is the exact threshold;
        the band's kept values are added after it, still before the next task. Returns None when
        the count shows the bracket missed (magnitudes so degenerate that the sample misrepresents
        them, e.g. a handful of non-zeros): the sums are then invalid, and the caller `reset`s and
        re-adds every task with `add` and its exact threshold (`magnitude_threshold`).
        """
        n = self.n
        pieces = self._pieces(source)
        n_keep = int(n * density / 100.0)
        if n_keep >= n or n_keep == 0 or n < BRACKET_SAMPLE:
            flat = torch.from_numpy(np.concatenate([a for _, a in pieces]))  # a writable copy
            delta = flat - base if base is not None else flat
            threshold = magnitude_threshold(delta.abs(), density)
            self._add(pieces, base, threshold)
            return threshold
        k = n - n_keep + 1  # the threshold is the k-th smallest magnitude
        picked = torch.from_numpy(self._sample(pieces))
        if base is not None:
            picked -= self._sampled_base(base)
        lo, hi = _bracket(picked.abs_(), k, n)
        below, bands = self._run(pieces, base, lo, hi, band=True)
        inside = _cat([v for _, vals in bands for v in vals], self.dtype)
        if not below < k <= below + inside.numel():
            return None
        # The (k − below)-th smallest band magnitude; NumPy's introselect is ~10× faster than
        # torch.kthvalue here (880k values: 1 ms against 12 ms). NaN never lands in the band.
        band_abs = np.abs(inside.numpy())
        threshold = float(np.partition(band_abs, k - below - 1)[k - below - 1])
        del inside

        def add_band(band: tuple[list[np.ndarray], list[np.ndarray]]) -> None:
            # Band coordinates are distinct: each gets this task's one addition, as in the pass.
            idx, val = _cat(band[0], torch.int64).numpy(), _cat(band[1], self.dtype).numpy()
            keep = np.abs(val) >= threshold
            if threshold == 0:  # zeros are kept too, and count for neither sign
                keep &= val != 0
            idx, val = idx[keep], val[keep]
            P, N = self.pos.numpy(), self.neg.numpy()
            cp, ck = self.n_pos.numpy(), self.n_kept.numpy()
            up = val > 0  # the rest are negative: a gather and a scatter for each value, not four
            pos, neg = idx[up], idx[~up]
            P[pos] += val[up]
            N[neg] += val[~up]
            cp[pos] += 1
            ck[idx] += 1

        for _ in parallel.map_ranges(
            lambda i, _: add_band(bands[i]), [(i, i + 1) for i in range(len(bands))]
        ):
            pass  # each thread's band lies in its own range of coordinates
        return threshold

    def _pieces(self, source: Source) -> list[tuple[int, np.ndarray]]:
        """source as [(offset, 1-D array in the sums' dtype)], checked to tile [0, n)."""
        if isinstance(source, torch.Tensor):
            if source.shape != (self.n,):
                raise ValueError(
                    f"TIES sums over {self.n} coordinates, got a task of shape {tuple(source.shape)}"
                )
            return [(0, source.to(self.dtype).contiguous().numpy())]
        pieces, end = [], 0
        want = torch.empty((), dtype=self.dtype).numpy().dtype
        for offset, arr in source:
            if offset != end or arr.ndim != 1 or arr.dtype != want:
                raise ValueError(
                    f"TIES pieces must tile [0, {self.n}) in order as 1-D {want} arrays"
                )
            pieces.append((offset, arr))
            end = offset + arr.size
        if end != self.n:
            raise ValueError(f"TIES pieces cover [0, {end}), expected [0, {self.n})")
        return pieces

    def _sample_idx(self) -> torch.Tensor:
        """BRACKET_SAMPLE random coordinates (fixed seed), sorted: the same for every task."""
        if self._idx is None or self._idx.numel() != BRACKET_SAMPLE:
            g = torch.Generator().manual_seed(0)
            self._idx = torch.randint(self.n, (BRACKET_SAMPLE,), generator=g).sort().values
        return self._idx

    def _sampled_base(self, base: torch.Tensor) -> torch.Tensor:
        """base at `_sample_idx`, gathered once per base tensor (θ0 is the same for every task,
        and the random gather costs as much as the source's own)."""
        if self._base_sample is None or self._base_sample[0] is not base:
            self._base_sample = (base, base[self._sample_idx()])
        return self._base_sample[1]

    def _sample(self, pieces: list[tuple[int, np.ndarray]]) -> np.ndarray:
        """The source values at `_sample_idx` (a fresh array)."""
        idx = self._sample_idx().numpy()
        out = np.empty(idx.size, pieces[0][1].dtype)
        starts = np.searchsorted(idx, [off for off, _ in pieces] + [self.n])
        for (off, arr), a, b in zip(pieces, starts[:-1], starts[1:]):
            if b > a:
                out[a:b] = arr[idx[a:b] - off]
            _release(arr, 0, arr.size)  # the sample touches every page; the pass reads them next
        return out

    def _below(self, threshold: float) -> float:
        """The largest value below `threshold` (|δ| ≥ threshold ⟺ |δ| > this)."""
        t = torch.tensor(threshold, dtype=self.dtype)
        return float(torch.nextafter(t, torch.zeros_like(t)))

    def _run(
        self,
        pieces: list[tuple[int, np.ndarray]],
        base: torch.Tensor | None,
        lo: float,
        hi: float,
        band: bool,
    ):
        """The pass over every coordinate, split over threads: adds |δ| > hi; with `band`, also
        returns the number of |δ| < lo and, per thread's range, the indices of lo ≤ |δ| ≤ hi and
        their δ values (lists of arrays)."""
        if base is not None and base.shape != (self.n,):
            raise ValueError(
                f"TIES sums over {self.n} coordinates, got θ0 of shape {tuple(base.shape)}"
            )
        ref = base.to(self.dtype).numpy() if base is not None else None
        fresh = self.empty
        results = list(
            parallel.map_ranges(
                lambda start, stop: self._pass(pieces, ref, lo, hi, band, fresh, start, stop),
                self._ranges(),
            )
        )
        self.empty = False
        if not band:
            return None
        return sum(r[0] for r in results), [(r[1], r[2]) for r in results]

    def _ranges(self) -> list[tuple[int, int]]:
        return parallel.split(self.n, self.chunk)

    def _pass(
        self, pieces, ref, lo: float, hi: float, band: bool, fresh: bool, start: int, stop: int
    ):
        if (
            KERNEL is not None
            and self.count_dtype == torch.uint8
            and all(src.flags.c_contiguous for _, src in pieces)
            and (ref is None or ref.flags.c_contiguous)
        ):
            return self._pass_compiled(pieces, ref, lo, hi, band, fresh, start, stop)
        P, N = self.pos.numpy(), self.neg.numpy()
        cp, ck = self.n_pos.numpy(), self.n_kept.numpy()
        size = min(self.chunk, stop - start)
        dtype = P.dtype
        x_buf, a_buf = (np.empty(size, dtype) for _ in range(2))
        d_buf, b_buf = np.empty(size, bool), np.empty(size, bool)
        lo, hi = dtype.type(lo), dtype.type(hi)
        below, band_idx, band_val = 0, [], []
        for off, src, s, e in _steps(pieces, start, stop, size):
            L = e - s
            x = x_buf[:L]  # δ, then κ
            if ref is not None:
                with np.errstate(over="ignore", invalid="ignore"):  # `finish` reports NaN and Inf
                    np.subtract(src[s - off : e - off], ref[s:e], out=x)
            else:
                np.copyto(x, src[s - off : e - off])
            a = np.abs(x, out=a_buf[:L])
            d = np.greater(a, hi, out=d_buf[:L])  # kept whatever the exact threshold in [lo, hi]
            if band:
                b = np.greater_equal(a, lo, out=b_buf[:L])
                below += L - int(np.count_nonzero(b))
                np.greater(b, d, out=b)  # lo ≤ |δ| ≤ hi
                i = np.flatnonzero(b)
                if i.size:
                    band_idx.append(i + s)
                    band_val.append(x[i])
            k = np.multiply(x, d, out=x)  # κ; NaN stays NaN, and `finish` reports it
            # d is exactly κ ≠ 0: |δ| > hi ≥ 0 means δ ≠ 0, and NaN fails the comparison.
            if fresh:  # the first task: 0 + value (−0 becomes +0), as when adding to zeros
                np.copyto(ck[s:e], d, casting="unsafe")
                np.add(np.maximum(k, 0, out=a), 0, out=P[s:e])
                np.add(np.minimum(k, 0, out=a), 0, out=N[s:e])
                np.copyto(cp[s:e], np.greater(k, 0, out=d), casting="unsafe")
                _release(src, s - off, e - off)
                continue
            np.add(ck[s:e], d, out=ck[s:e], casting="unsafe")
            np.add(P[s:e], np.maximum(k, 0, out=a), out=P[s:e])
            np.add(N[s:e], np.minimum(k, 0, out=a), out=N[s:e])
            np.add(cp[s:e], np.greater(k, 0, out=d), out=cp[s:e], casting="unsafe")
            _release(src, s - off, e - off)
        return below, band_idx, band_val

    def _pass_compiled(
        self, pieces, ref, lo: float, hi: float, band: bool, fresh: bool, start: int, stop: int
    ):
        """`_pass` through the compiled kernel (pipeline/methods/_passes.c): the same float
        operations per coordinate, fused into one sweep, with the GIL released."""
        P, N = self.pos.numpy(), self.neg.numpy()
        cp, ck = self.n_pos.numpy(), self.n_kept.numpy()
        size = min(self.chunk, stop - start)
        item = P.itemsize
        idx_buf, val_buf = (
            np.empty(size if band else 0, np.int64),
            np.empty(size if band else 0, P.dtype),
        )
        base_addr = (P.ctypes.data, N.ctypes.data, cp.ctypes.data, ck.ctypes.data)
        ref_addr = ref.ctypes.data if ref is not None else 0
        below, band_idx, band_val = 0, [], []
        for off, src, s, e in _steps(pieces, start, stop, size):
            n_below, n_band = KERNEL.ties_pass(
                item, src.ctypes.data + (s - off) * item, ref_addr + s * item if ref_addr else 0,
                base_addr[0] + s * item, base_addr[1] + s * item, base_addr[2] + s, base_addr[3] + s,
                e - s, float(lo), float(hi), fresh, band,
                idx_buf.ctypes.data if band else 0, val_buf.ctypes.data if band else 0, s,
            )  # fmt: skip
            _release(src, s - off, e - off)
            below += n_below
            if n_band:
                band_idx.append(idx_buf[:n_band].copy())
                band_val.append(val_buf[:n_band].copy())
        return below, band_idx, band_val

    # ----------------------------------------------------------------- the merge

    def finish(self, sign: str = "mass") -> bool:
        """Elect the signs by rule `sign` ("mass" or "frequency"): `pos` becomes the agreeing
        sum, `n_pos` its count. False when a sum is NaN or infinite (some input was, or a sum
        overflowed): the sums are then unusable."""
        if sign not in SIGN_RULES:
            raise ValueError(
                f"unknown TIES sign election `{sign}` (expected one of: {', '.join(SIGN_RULES)})"
            )
        if self.empty:  # no task: nothing kept anywhere
            for t in (self.pos, self.neg, self.n_pos, self.n_kept):
                t.zero_()
            self.empty = False
        if not all(list(parallel.map_ranges(lambda a, b: self._elect(a, b, sign), self._ranges()))):
            return False
        self.neg = self.n_kept = None
        self.finished = True
        return True

    def _elect(self, start: int, stop: int, sign: str) -> bool:
        """Per coordinate, (P, c⁺) stays where + is elected and becomes (N, c⁻) where − is: a
        bitwise select on a mask of all ones where − is elected (exact, and branch-free: a masked
        copy is several times slower on a random mix of signs).

        "mass": the mask is the mass P + N's sign bit, spread by an arithmetic shift. The mass is
        never −0 (P ≥ +0 and N ≤ +0 are sums starting at +0), so the sign bit is set exactly
        where it is negative. A zero mass with nothing kept selects P = 0, c⁺ = 0 as it should;
        only exact cancellations (P = −N > 0) take the vote.
        "frequency": the mask is c⁺ < c⁻, integer counts only (a tie elects +).
        False at the first non-finite mass under either rule."""
        P, N = self.pos.numpy(), self.neg.numpy()
        cp, ck = self.n_pos.numpy(), self.n_kept.numpy()
        ints = np.int32 if P.dtype == np.float32 else np.int64
        Pi, Ni, shift = P.view(ints), N.view(ints), 8 * P.itemsize - 1
        size = min(self.chunk, stop - start)
        mass, flip = np.empty(size, P.dtype), np.empty(size, ints)
        zero, kept = np.empty(size, bool), np.empty(size, bool)
        m_count, flip_count = np.empty(size, cp.dtype), np.empty(size, cp.dtype)
        for s in range(start, stop, size):
            e = min(stop, s + size)
            L = e - s
            m = np.add(P[s:e], N[s:e], out=mass[:L])
            if not np.isfinite(m).all():
                return False
            if sign == "frequency":
                mask = m.view(ints)  # the mass is checked: its memory holds the mask
                np.copyto(
                    mask,
                    np.less(
                        cp[s:e], np.subtract(ck[s:e], cp[s:e], out=flip_count[:L]), out=zero[:L]
                    ),
                )
                np.negative(mask, out=mask)  # 1 → all ones where c⁺ < c⁻
            else:
                tie = np.logical_and(
                    np.equal(m, 0, out=zero[:L]), np.greater(P[s:e], 0, out=kept[:L]), out=zero[:L]
                )
                mask = np.right_shift(
                    m.view(ints), shift, out=m.view(ints)
                )  # 0, or all ones where negative
                if (
                    tie.any()
                ):  # P = −N > 0: the majority sign of the kept non-zeros (a tied vote: no sign)
                    t = np.flatnonzero(tie)
                    i = t + s
                    vote = 2 * cp[i].astype(np.int64) - ck[i]  # c⁺ − c⁻
                    mask[t] = np.where(vote < 0, -1, 0)
                    none = i[vote == 0]
                    P[none], cp[none] = 0, 0
            f = np.bitwise_xor(Pi[s:e], Ni[s:e], out=flip[:L])
            np.bitwise_xor(Pi[s:e], np.bitwise_and(f, mask, out=f), out=Pi[s:e])
            mc = m_count[:L]
            np.copyto(mc, mask, casting="unsafe")  # 0 or all ones in the count dtype
            fc = np.subtract(ck[s:e], cp[s:e], out=flip_count[:L])  # c⁻
            np.bitwise_xor(cp[s:e], fc, out=fc)
            np.bitwise_xor(cp[s:e], np.bitwise_and(fc, mc, out=fc), out=cp[s:e])
        return True

    def merged(
        self,
        alpha: float,
        disjoint: str = "mean",
        start: int = 0,
        stop: int | None = None,
        base: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """α Δ over coordinates [start, stop) (after `finish`); base + α Δ when given base
        [stop − start] (θ0 in the sums' dtype: the same bits as adding α Δ to it after)."""
        if not self.finished:
            raise RuntimeError("TrimmedSums.merged before finish")
        if disjoint not in DISJOINT_MODES:
            raise ValueError(
                f"unknown TIES disjoint merge `{disjoint}` (expected one of: {', '.join(DISJOINT_MODES)})"
            )
        stop = self.n if stop is None else stop
        if base is not None and (base.shape != (stop - start,) or base.dtype != self.dtype):
            raise ValueError(
                f"TIES: θ0 for [{start}, {stop}) must be {self.dtype} of shape ({stop - start},)"
            )
        out = torch.empty(stop - start, dtype=self.dtype)
        o, P, c = out.numpy(), self.pos.numpy()[start:stop], self.n_pos.numpy()[start:stop]
        ref = base.numpy() if base is not None else None

        def run(a: int, b: int) -> None:  # (α P) / max(c⁺, 1) [+ θ0], step by step in cache
            size = min(self.chunk, b - a)
            count = np.empty(size, P.dtype)
            for s in range(a, b, size):
                e = min(b, s + size)
                np.multiply(P[s:e], alpha, out=o[s:e])
                if disjoint == "mean":
                    np.maximum(c[s:e], 1, out=count[: e - s], casting="unsafe")
                    np.divide(o[s:e], count[: e - s], out=o[s:e])
                if ref is not None:
                    np.add(ref[s:e], o[s:e], out=o[s:e])

        parallel.map_ranges(run, parallel.split(stop - start, self.chunk))
        return out


@functools.cache
def _madvise():
    """libc's madvise(addr, length, advice), or None where there is none to call."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int), ctypes.c_int
    return fn


def _release(src: np.ndarray, start: int, stop: int) -> None:
    """Drop the whole pages of src[start:stop] from the process's memory where src views a
    read-only file map (`SafetensorsReader.mapped`): the kernel's page cache keeps them, and a
    later read maps them back. So a pass over a mapped task holds the steps in flight, not the
    whole task beside the sums (at ViT-B/32 that is the difference between 1.7 and 2.1 GB of
    peak RSS). Anything else (a tensor, a writable map, whose pages hold the only copy of their
    values) is left alone."""
    advice = getattr(mmap, "MADV_DONTNEED", None)
    view = src.base
    while isinstance(view, np.ndarray):
        view = view.base
    if (
        advice is None
        or not src.flags.c_contiguous
        or not isinstance(view, memoryview)
        or not view.readonly
        or not isinstance(view.obj, mmap.mmap)
        or _madvise() is None
    ):
        return
    item, page = src.itemsize, mmap.PAGESIZE
    first = -(-(src.ctypes.data + start * item) // page) * page  # whole pages inside the range
    last = (src.ctypes.data + stop * item) // page * page
    if last > first:
        _madvise()(first, last - first, advice)


def _steps(pieces: list[tuple[int, np.ndarray]], start: int, stop: int, size: int):
    """(offset, source, s, e) for every step [s, e) of at most `size` coordinates that covers
    [start, stop), each inside one piece (the piece's values at [s − offset, e − offset))."""
    for off, src in pieces:
        first, last = max(start, off), min(stop, off + src.size)
        for s in range(first, last, size):
            yield off, src, s, min(last, s + size)


@dataclass
class StreamedTies:
    """TIES of a whole model from one streamed pass over its tasks (`pipeline.merge`): the
    finished sums over the flattened tensors, each tensor's range [start, stop) in them, and
    θ0 in the merge dtype as the pass read it (the output adds to it; no second read)."""

    sums: TrimmedSums
    ranges: dict[str, tuple[int, int]]
    base: torch.Tensor

    def theta0(self, name: str) -> torch.Tensor:
        start, stop = self.ranges[name]
        return self.base[start:stop]

    def merged(self, name: str, alpha: float, disjoint: str = "mean") -> torch.Tensor:
        """θ0 + α Δ of tensor `name`, flat, in the merge dtype (one pass: the same bits as
        adding `delta` to `theta0`)."""
        start, stop = self.ranges[name]
        return self.sums.merged(alpha, disjoint, start, stop, base=self.base[start:stop])


def _cat(arrays: list[np.ndarray], dtype: torch.dtype) -> torch.Tensor:
    """One tensor of the arrays (torch.cat, not np.concatenate: NumPy asks for huge pages above
    4 MB, whose first touch costs several times more than small pages on some VMs)."""
    return (
        torch.cat([torch.from_numpy(a) for a in arrays]) if arrays else torch.empty(0, dtype=dtype)
    )
