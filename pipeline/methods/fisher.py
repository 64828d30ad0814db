"""Fisher-weighted averaging (Matena & Raffel, 2022).

θ = Σ_t F̂_t ∘ θ_t / Σ_t F̂_t per coordinate, with F̂_t = F_t / ‖F_t‖ (optional, off by
default; the norm is over all merged tensors of task t) plus a floor ε, and F_t the
empirical Fisher diagonal of task t at θ_t (the same artifact EpiMer uses). No α.
Computed as θ0 + Σ_t F̂_t ∘ δ_t / Σ_t F̂_t, the same value with less cancellation.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline import parallel

try:  # the compiled pass (setup.py builds it where a C compiler is found)
    from pipeline.methods import _passes as KERNEL
except ImportError:  # the NumPy pass: the same bits, more slowly
    KERNEL = None

#: Coordinates per step of the CPU pass: a step's [T, STEP] weights stay in cache.
STEP = 1 << 14


def merge_layer(
    deltas: torch.Tensor,
    fishers: torch.Tensor,
    *,
    eps: float,
    norms: torch.Tensor | None = None,
    chunk: int | None = None,
) -> torch.Tensor:
    """deltas, fishers: [T, *shape]; norms: [T] or None → merged delta [*shape].

    On the CPU the coordinates go through in steps of `chunk` (default `STEP`) so the
    temporaries stay in cache, in NumPy, one range of steps per core; each coordinate's
    arithmetic does not depend on the steps: w_t = F_t (/ norm_t) + ε, then Σ_t w_t δ_t / Σ_t w_t
    with both sums in task order. Elsewhere (a GPU) the same arithmetic in torch.
    """
    T = deltas.shape[0]
    flat_d, flat_f = deltas.reshape(T, -1), fishers.reshape(T, -1)
    n = flat_d.shape[1]
    on_cpu = deltas.device.type == "cpu" and fishers.device.type == "cpu"
    if on_cpu and deltas.dtype in (torch.float32, torch.float64) and fishers.dtype == deltas.dtype:
        out = torch.empty(n, dtype=deltas.dtype)  # torch, not NumPy: no huge-page first touch
        _merge_cpu(
            flat_d.contiguous().numpy(),
            flat_f.contiguous().numpy(),
            eps,
            norms,
            out.numpy(),
            chunk or STEP,
        )
    else:
        out = _merge_torch(flat_d, flat_f, eps, norms, chunk or (STEP if on_cpu else max(1, n)))
    return out.view(deltas.shape[1:])


def _merge_cpu(
    d: np.ndarray, f: np.ndarray, eps: float, norms: torch.Tensor | None, out: np.ndarray, step: int
) -> None:
    T = d.shape[0]
    scale = (
        None
        if norms is None
        else norms.detach().cpu().to(torch.float64).numpy().astype(d.dtype).reshape(T, 1)
    )
    step = max(1, step)

    if (
        KERNEL is not None
        and d.flags.c_contiguous
        and f.flags.c_contiguous
        and out.flags.c_contiguous
    ):
        # The compiled pass (pipeline/methods/_passes.c): the same operations in the same order.
        item, n = d.itemsize, d.shape[1]
        weights = None if scale is None else np.ascontiguousarray(scale.reshape(T))

        def fused(start: int, stop: int) -> None:
            KERNEL.fisher_pass(
                item, T, d.ctypes.data + start * item, f.ctypes.data + start * item, n, stop - start,
                eps, 0 if weights is None else weights.ctypes.data, out.ctypes.data + start * item,
            )  # fmt: skip

        parallel.map_ranges(fused, parallel.split(n, step))
        return

    def run(start: int, stop: int) -> None:
        size = min(step, stop - start)
        w, total, num = (
            np.empty((T, size), d.dtype),
            np.empty(size, d.dtype),
            np.empty(size, d.dtype),
        )
        for a in range(start, stop, step):
            b = min(a + step, stop)
            m = b - a
            wv = w[:, :m]
            if scale is not None:
                np.divide(f[:, a:b], scale, out=wv)
                wv += eps
            else:
                np.add(f[:, a:b], eps, out=wv)
            _task_sum(wv, total[:m])
            np.multiply(wv, d[:, a:b], out=wv)
            _task_sum(wv, num[:m])
            np.divide(num[:m], total[:m], out=out[a:b])

    parallel.map_ranges(run, parallel.split(d.shape[1], step))


def _task_sum(rows: np.ndarray, out: np.ndarray) -> None:
    """out ← Σ_t rows[t], added row after row in task order. (NumPy's reduction over the first
    axis pairs the terms up for some shapes, e.g. a single column of eight rows, which would
    make a coordinate's rounding depend on the size of its step.)"""
    np.copyto(out, rows[0])
    for row in rows[1:]:
        np.add(out, row, out=out)


def _merge_torch(
    flat_d: torch.Tensor, flat_f: torch.Tensor, eps: float, norms: torch.Tensor | None, chunk: int
) -> torch.Tensor:
    T, n = flat_d.shape
    chunk = max(1, min(chunk, n))
    scale = None if norms is None else norms.to(device=flat_d.device, dtype=flat_d.dtype).view(T, 1)
    out = torch.empty(n, dtype=flat_d.dtype, device=flat_d.device)
    block = torch.empty(
        (T, chunk), dtype=flat_d.dtype, device=flat_d.device
    )  # reused: no temporaries
    for start in range(0, n, chunk):
        f = flat_f[:, start : start + chunk]
        weights = block[:, : f.shape[1]]
        if scale is not None:
            torch.div(f.to(flat_d.dtype), scale, out=weights).add_(eps)
        else:
            torch.add(f.to(flat_d.dtype), eps, out=weights)
        total = weights.sum(dim=0)
        out[start : start + chunk] = (
            weights.mul_(flat_d[:, start : start + chunk]).sum(dim=0).div_(total)
        )
    return out
