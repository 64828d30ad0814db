"""One layer's merge: the settings every method reads, a layer's inputs across tasks, the merged
result, and each registered method's per-tensor entry point (`merge_tensor` of its registry row).

Imports torch; the registry (`pipeline.methods.registry`) names these entry points without
importing them, so tables, figures and the workflow read the registry without torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from pipeline.curvature import LayerCurvature
from pipeline.methods import epimer, fisher, gradmatch, iso, ta, tsvm
from pipeline.subspace import TaggedBasis

COORDINATES = ("tagged", "projection")


@dataclass(frozen=True)
class MergeSettings:
    """Every setting any method reads. A method ignores the ones it does not use."""

    alpha: float = 1.0
    k: int = 32
    aggregator: str = "frechet_sum"
    coords: str = "tagged"
    eps: float = 1e-8
    ties_density: float = 20.0
    ties_sign: str = (
        "mass"  # ties: "mass" (the TIES paper's election) or "frequency" (majority of kept signs)
    )
    ties_disjoint: str = "mean"
    fisher_normalise: bool = False
    fisher_rank: int | None = (
        None  # epimer: H̄ from a rank-R non-negative factorisation of F̄ (opt-in)
    )
    # epimer: "dense" forms H̄; "cg" solves by conjugate gradients without it; "auto": CG where
    # it converges in ≤ p/8 steps, H̄ formed elsewhere.
    solver: str = "auto"
    iso_common_fraction: float = iso.COMMON_FRACTION  # isocts: share of a layer's rank kept common
    gradmatch_prior: float = 0.0  # gradmatch: prior precision h, H_0 = h I (Fisher units)
    dtype: torch.dtype = torch.float32
    # Where the heavy algebra of tsvm/epimer runs (changes results by round-off at most).
    device: str = "cpu"


@dataclass
class LayerInputs:
    """One tensor of the encoder, across tasks. deltas/fishers: [T, *shape] in the compute dtype."""

    name: str
    deltas: torch.Tensor
    fishers: torch.Tensor | None = None
    basis: TaggedBasis | None = None  # set for matrix layers of subspace methods
    coords: torch.Tensor | None = None  # δ̃_t [T, p] in the chosen coordinates
    curvature: LayerCurvature | None = None
    task_stats: dict[str, Any] = field(default_factory=dict)  # global per-task statistics
    memo: dict = field(default_factory=dict)  # what a method keeps for the layer's other α values


@dataclass
class LayerResult:
    delta: torch.Tensor  # the merged delta [*shape] is scale · delta
    coords: torch.Tensor | None = None  # merged subspace coordinates δ̃_m [p]
    # Left to the driver, which forms θ0 + scale · delta in one fused step: an α sweep then
    # scales a product kept for the layer without a scaled copy per α.
    scale: float = 1.0
    # `delta` is already θ0 + scale · delta, in the merge dtype (TIES adds θ0 in its own pass).
    with_theta0: bool = False


def _ta(layer: LayerInputs, s: MergeSettings) -> LayerResult:
    return LayerResult(ta.task_sum(layer.deltas, memo=layer.memo), scale=s.alpha)


def _ties(layer: LayerInputs, s: MergeSettings) -> LayerResult:
    # The driver's streamed pass merged every tensor (`ties.StreamedTies`): this one's share,
    # θ0 + α Δ in one pass over it.
    merged = layer.task_stats["streamed"].merged(layer.name, s.alpha, s.ties_disjoint)
    return LayerResult(merged.view(layer.deltas.shape[1:]), with_theta0=True)


def _fisher(layer: LayerInputs, s: MergeSettings) -> LayerResult:
    norms = layer.task_stats.get("fisher_norm") if s.fisher_normalise else None
    return LayerResult(fisher.merge_layer(layer.deltas, layer.fishers, eps=s.eps, norms=norms))


def _tsvm(layer: LayerInputs, s: MergeSettings) -> LayerResult:
    if layer.basis is None:
        return LayerResult(tsvm.vector_mean(layer.deltas, memo=layer.memo), scale=s.alpha)
    lifted, scale, coords = tsvm.merge_parts(layer.basis, alpha=s.alpha, memo=layer.memo)
    return LayerResult(lifted, coords, scale)


def _epimer(layer: LayerInputs, s: MergeSettings) -> LayerResult:
    if layer.basis is None:
        return LayerResult(tsvm.vector_mean(layer.deltas, memo=layer.memo), scale=s.alpha)
    curv = layer.curvature
    lifted, scale, coords = epimer.merge_parts(
        layer.basis,
        curv.H,
        curv.b[s.coords],
        alpha=s.alpha,
        aggregator=s.aggregator,
        memo=layer.memo,
    )
    return LayerResult(lifted, coords, scale)


def _isoc(layer: LayerInputs, s: MergeSettings) -> LayerResult:
    deltas = layer.deltas.to(s.device)
    return LayerResult(iso.merge_layer(deltas, variant="c", memo=layer.memo), scale=s.alpha)


def _isocts(layer: LayerInputs, s: MergeSettings) -> LayerResult:
    deltas = layer.deltas.to(s.device)
    delta = iso.merge_layer(deltas, variant="cts", fraction=s.iso_common_fraction, memo=layer.memo)
    return LayerResult(delta, scale=s.alpha)


def _gradmatch(layer: LayerInputs, s: MergeSettings) -> LayerResult:
    delta = gradmatch.merge_layer(
        layer.deltas, layer.fishers, prior=s.gradmatch_prior, eps=s.eps, memo=layer.memo
    )
    return LayerResult(delta, scale=s.alpha)
