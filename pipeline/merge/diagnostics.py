"""What one merge did: the report of its settings, timings and per-layer diagnostics (η, V_S,
R_S, task amplification) of docs/algorithms.md."""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from pipeline.curvature import (
    HessianOperator,
    LayerCurvature,
    NotStored,
    curvature_heterogeneity,
    frechet_variance,
    residual_energy,
    subspace_variance,
)
from pipeline.methods import LayerInputs, MergeSettings, get_method
from pipeline.subspace import TaggedBasis

log = logging.getLogger("pipeline.merge")


@dataclass
class MergeReport:
    """What one merge did, per matrix layer and in total.

    Per layer (subspace methods with curvature): η; V_S, Theorem 2's irreducible conflict at
    the Fréchet-mean minimiser; V_S_merged, the same objective at the merged coordinates; R_S;
    `amplification` [T], ‖δ̃_m on task t's atoms‖ / (α ‖σ_t‖) (1 for each task under TSV-M with
    tagged coordinates); `amplification_sq` [T, 2], the squared numerator and denominator the
    totals pool; `eps_relative`, ε / mean F̄ of the layer.
    """

    method: str
    settings: dict[str, Any]
    num_tasks: int
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    def amplification(self) -> list[float] | None:
        """Per task, over every layer: √(Σ_ℓ ‖δ̃_m,ℓ on t's atoms‖²) / (α √(Σ_ℓ ‖σ_ℓ,t‖²)); None
        when no layer reports it."""
        parts = [
            layer["amplification_sq"]
            for layer in self.layers.values()
            if "amplification_sq" in layer
        ]
        if not parts:
            return None
        num = [sum(p[t][0] for p in parts) for t in range(self.num_tasks)]
        den = [sum(p[t][1] for p in parts) for t in range(self.num_tasks)]
        return [math.sqrt(n / d) if d > 0 else math.nan for n, d in zip(num, den)]

    def totals(self) -> dict[str, float]:
        """Scalars over all layers: η, V_S, V_S_merged and R_S summed (each layer's objective is
        separable), the smallest and largest task amplification and ε / mean F̄ of any layer."""
        out: dict[str, float] = {}
        for key in ("eta", "V_S", "V_S_merged", "R_S"):
            vals = [layer[key] for layer in self.layers.values() if key in layer]
            if vals:
                out[key] = float(sum(vals))
        amp = self.amplification()
        if amp is not None:
            out["amplification_min"], out["amplification_max"] = float(min(amp)), float(max(amp))
        rel = [layer["eps_relative"] for layer in self.layers.values() if "eps_relative" in layer]
        if rel:
            out["eps_relative_min"], out["eps_relative_max"] = float(min(rel)), float(max(rel))
        errors = [
            layer["fisher_rank_error"]
            for layer in self.layers.values()
            if "fisher_rank_error" in layer
        ]
        if errors:
            out["fisher_rank_error"] = float(max(errors))  # the worst layer of a low-rank H̄
        cg = [layer for layer in self.layers.values() if "cg_residual" in layer]
        if cg:  # solver "cg": the worst layer's final relative residual, the most steps, fallbacks
            out["cg_residual"] = float(max(layer["cg_residual"] for layer in cg))
            out["cg_iterations"] = int(max(layer["cg_iterations"] for layer in cg))
            out["cg_fallbacks"] = int(sum(bool(layer["cg_fallback"]) for layer in cg))
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "settings": self.settings,
            "num_tasks": self.num_tasks,
            "totals": self.totals(),
            "amplification": self.amplification(),
            "timings_s": {k: round(v, 4) for k, v in self.timings.items()},
            "layers": self.layers,
        }


class Timer:
    """Adds the wall time of a `with` block to `report.timings[key]`."""

    def __init__(self, report: MergeReport, key: str) -> None:
        self.report, self.key = report, key

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.report.timings[self.key] += time.perf_counter() - self.start


def curvature_info(
    layer: LayerInputs, merged: torch.Tensor, s: MergeSettings, alpha: float, lam: torch.Tensor
) -> dict[str, Any]:
    """The diagnostics of one layer merged at `alpha` to coordinates `merged` [p], from its
    curvature (`_diagnostics`), with the low-rank Fisher's error and the CG solve's steps,
    residual and fallback where they apply."""
    curv = layer.curvature
    out = _diagnostics(curv, layer.coords, s.coords, merged, lam, layer.basis, alpha, s.eps)
    if curv.fisher_rank_error is not None:
        out["fisher_rank_error"] = curv.fisher_rank_error
    if isinstance(curv.H, HessianOperator):
        H = curv.H
        out.update(cg_iterations=H.iterations, cg_residual=H.residual, cg_fallback=H.fallback)
    return out


#: Whether this process has warned that a CG-solved hessian artifact could not give V_S.
_warned_v_s = False


def _diagnostics(
    curv: LayerCurvature,
    coords: torch.Tensor,
    mode: str,
    merged: torch.Tensor,
    lam: torch.Tensor,
    basis: TaggedBasis | None = None,
    alpha: float | None = None,
    eps: float | None = None,
) -> dict[str, Any]:
    """One layer's diagnostics. coords: δ̃_t [T, p]; merged: δ̃_m [p]; lam: λ_t [T].

    η (Theorem 3); V_S at the minimiser H̄⁻¹b (Theorem 2); V_S_merged, the Fréchet objective at
    δ̃_m; R_S; with the basis and α, each task's amplification ‖δ̃_m[tags = t]‖ / (α ‖σ[tags = t]‖)
    (and its squared parts, pooled over layers by `MergeReport.amplification`); with ε and a
    known mean F̄, ε / mean F̄.
    """
    b = curv.b[mode]
    delta_bar = lam @ coords.to(torch.float64)
    out: dict[str, Any] = {"eta": curvature_heterogeneity(curv.H, b, delta_bar)}
    out["V_S"] = frechet_variance(curv.H, b, curv.quad[mode], lam)
    try:
        out["V_S_merged"] = subspace_variance(curv.H, b, curv.quad[mode], merged, lam)
    except NotStored as err:
        # H̄ solved, not stored, and the merge is not a multiple of δ̄ or H̄⁻¹b (TSV-M's tagged
        # merge with projection coordinates): V_S needs H̄ there.
        global _warned_v_s
        if not _warned_v_s:
            log.warning("V_S_merged left out where H̄ was not stored, first at %s", err)
            _warned_v_s = True
    out["R_S"] = residual_energy(curv.residual, lam)
    if basis is not None and alpha is not None:
        sq = _amplification_parts(basis, merged, alpha)
        out["amplification"] = [math.sqrt(n / d) if d > 0 else math.nan for n, d in sq]
        out["amplification_sq"] = sq
    if eps is not None and curv.fisher_mean is not None:
        out["eps_relative"] = eps / curv.fisher_mean if curv.fisher_mean > 0 else math.inf
    return out


def _amplification_parts(
    basis: TaggedBasis, merged: torch.Tensor, alpha: float
) -> list[list[float]]:
    """Per task t: [‖δ̃_m[tags = t]‖², (α ‖σ[tags = t]‖)²] in float64 (merged: δ̃_m [p])."""
    d = merged.to(torch.float64).cpu()
    sigma = basis.sigma.to(torch.float64).cpu()
    tags = basis.tags.cpu()
    return [
        [float(d[tags == t].square().sum()), float((alpha * sigma[tags == t]).square().sum())]
        for t in range(basis.num_tasks)
    ]


# MergeSettings fields named like a method's own settings that belong to every curvature method.
_SHARED = ("fisher_rank",)


def settings_dict(method: str, s: MergeSettings) -> dict[str, Any]:
    """The settings a merge records for `method` (in its report and in its output's provenance):
    every one it uses, its own without their prefix."""
    m = get_method(method)
    out: dict[str, Any] = {}
    if "alpha" in m.uses:
        out["alpha"] = s.alpha
    if m.subspace:
        out.update(k=s.k, coords=s.coords)
    if m.curvature:
        out["aggregator"] = s.aggregator
    if m.needs_fisher != "none" or m.curvature:
        out["eps"] = s.eps
    # The method's own settings (registry `options`, and the MergeSettings fields named after
    # it, such as fisher_normalise), recorded without the method's prefix: ties_density → density.
    own = [
        *m.options,
        *(
            f.name
            for f in fields(MergeSettings)
            if f.name.startswith(f"{method}_") and f.name not in _SHARED
        ),
    ]
    for key in dict.fromkeys(own):
        out[key.removeprefix(f"{method}_")] = getattr(s, key)
    if m.curvature:
        out.update(fisher_rank=s.fisher_rank, solver=s.solver)  # fisher_rank None: exact H̄
    out["dtype"] = str(s.dtype).replace("torch.", "")
    return out
