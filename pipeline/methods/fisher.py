"""Fisher-weighted averaging (Matena & Raffel, 2022).

θ = Σ_t F̂_t ∘ θ_t / Σ_t F̂_t per coordinate, with F̂_t = F_t / ‖F_t‖ (optional, off by
default; the norm is over all merged tensors of task t) plus a floor ε, and F_t the
empirical Fisher diagonal of task t at θ_t (the same artifact EpiMer uses). No α.
Computed as θ0 + Σ_t F̂_t ∘ δ_t / Σ_t F̂_t, the same value with less cancellation.
"""

from __future__ import annotations

import torch


def merge_layer(
    deltas: torch.Tensor,
    fishers: torch.Tensor,
    *,
    eps: float,
    norms: torch.Tensor | None = None,
    chunk: int | None = None,
) -> torch.Tensor:
    """deltas, fishers: [T, *shape]; norms: [T] or None → merged delta [*shape].

    On the CPU the coordinates go through in chunks of `chunk` (default 65536) so the
    temporaries stay in cache; each coordinate's arithmetic does not depend on the chunking.
    """
    T = deltas.shape[0]
    flat_d, flat_f = deltas.reshape(T, -1), fishers.reshape(T, -1)
    n = flat_d.shape[1]
    if chunk is None:
        chunk = n if deltas.device.type != "cpu" else 1 << 16
    chunk = max(1, min(chunk, n))
    scale = None if norms is None else norms.to(device=deltas.device, dtype=deltas.dtype).view(T, 1)
    out = torch.empty(n, dtype=deltas.dtype, device=deltas.device)
    block = torch.empty((T, chunk), dtype=deltas.dtype, device=deltas.device)  # reused: no temporaries
    for start in range(0, n, chunk):
        f = flat_f[:, start : start + chunk]
        weights = block[:, : f.shape[1]]
        if scale is not None:
            torch.div(f.to(deltas.dtype), scale, out=weights).add_(eps)
        else:
            torch.add(f.to(deltas.dtype), eps, out=weights)
        total = weights.sum(dim=0)
        out[start : start + chunk] = weights.mul_(flat_d[:, start : start + chunk]).sum(dim=0).div_(total)
    return out.view(deltas.shape[1:])
