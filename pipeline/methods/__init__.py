"""The merge methods, one module each, and the registry that names them.

Each row says what a method needs (Fisher diagonals, the tagged basis, projected
Hessians), which settings its setting name uses, and which per-tensor function merges
one tensor. Methods are pure: the driver in `pipeline.merge` reads the inputs and hands
each function the tensors of one layer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from pipeline.curvature import LayerCurvature
from pipeline.methods import epimer, fisher, gradmatch, iso, ta, ties, tsvm
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
    ties_sign: str = "mass"  # ties: "mass" (the TIES paper's election) or "frequency" (majority of kept signs)
    ties_disjoint: str = "mean"
    fisher_normalise: bool = False
    fisher_rank: int | None = None  # epimer: H̄ from a rank-R non-negative factorisation of F̄ (opt-in)
    solver: str = "auto"  # epimer: "dense" forms H̄; "cg" solves by conjugate gradients without it; "auto": CG where it converges in ≤ p/8 steps, H̄ formed elsewhere
    iso_common_fraction: float = iso.COMMON_FRACTION  # isocts: share of a layer's rank kept common
    gradmatch_prior: float = 0.0  # gradmatch: prior precision h, H_0 = h I (Fisher units)
    dtype: torch.dtype = torch.float32
    device: str = "cpu"  # where the heavy algebra of tsvm/epimer runs (does not change results beyond round-off)


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
        layer.basis, curv.H, curv.Hx[s.coords], alpha=s.alpha, aggregator=s.aggregator, memo=layer.memo
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


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    merge_tensor: Callable[[LayerInputs, MergeSettings], LayerResult]
    uses: tuple[str, ...]  # the settings that name an artifact: alpha, k, fraction
    # The `merge.<key>` config settings the workflow passes to this method's merges only, as
    # `--<key with - for _>` of `pipeline merge` (the `options` param of merge.smk's rules):
    # changing one re-runs this method's merges and no other method's.
    options: tuple[str, ...] = ()
    needs_fisher: str = "none"  # "none", "matrix" (matrix layers), "all" (every floating tensor)
    subspace: bool = False  # matrix layers get the tagged basis
    curvature: bool = False  # needs projected Hessians
    streamed: bool = False  # merged whole in the driver's prepare pass (task_stats["streamed"]): per tensor only θ0 is read
    default_alpha: float | None = 1.0
    label: str = ""  # the name in tables, figures and the report ("" → the registry name)
    colour: str = "#000000"  # its line and bar colour in every figure
    citation: str = ""  # the paper that defines it
    order: int = 100  # its place in tables and legends (the paper's order: flat geometry first)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("ta", "Task Arithmetic: θ0 + α Σ δ_t (α = 1/T is the arithmetic mean)", _ta, ("alpha",), default_alpha=None, label="Task Arithmetic", colour="#999999", citation="Ilharco et al. 2023, arXiv 2212.04089", order=0),
        Method("ties", "TIES-Merging: trim to the top K %, elect signs, disjoint mean", _ties, ("alpha",), options=("ties_density", "ties_sign", "ties_disjoint"), streamed=True, label="TIES", colour="#e08214", citation="Yadav et al. 2023, arXiv 2306.01708", order=1),
        Method("fisher", "Fisher-weighted averaging of θ_t with the empirical Fisher diagonal", _fisher, ("fraction",), needs_fisher="all", default_alpha=None, label="Fisher averaging", colour="#1b7837", citation="Matena and Raffel 2022, arXiv 2111.09832", order=3),
        Method("tsvm", "TSV-M: task singular vectors, Procrustes-whitened, summed", _tsvm, ("k", "alpha"), subspace=True, label="TSV-M", colour="#2166ac", citation="Gargiulo et al. 2025, arXiv 2412.00081", order=2),
        Method("epimer", "EpiMer: curvature-aware subspace Fréchet mean (tagged basis, projected Fisher)", _epimer, ("k", "alpha", "fraction"), needs_fisher="matrix", subspace=True, curvature=True, label="EpiMer", colour="#c51b7d", citation="arXiv 2605.26693", order=4),
        Method("isoc", "Iso-C: the task-vector sum's singular values replaced by their mean", _isoc, ("alpha",), label="Iso-C", colour="#35978f", citation="Marczak et al. 2025, arXiv 2502.04959", order=5),
        Method("isocts", "Iso-CTS: Iso-C over a common subspace plus task-specific directions", _isocts, ("alpha",), options=("iso_common_fraction",), label="Iso-CTS", colour="#80cdc1", citation="Marczak et al. 2025, arXiv 2502.04959", order=6),
        Method("gradmatch", "Uncertainty-based gradient matching: (H_0 + Σ F_t)⁻¹ Σ (H_0 + F_t) δ_t", _gradmatch, ("alpha", "fraction"), options=("gradmatch_prior",), needs_fisher="all", label="Gradient matching", colour="#8c510a", citation="Daheim et al. 2024, arXiv 2310.12808", order=7),
    )
}


def get_method(name: str) -> Method:
    """The registry row for `name`, or a ValueError listing the known methods."""
    if name not in METHODS:
        raise ValueError(f"unknown merge method `{name}`; known methods: {', '.join(METHODS)}")
    return METHODS[name]


def setting_names(method: str, *, alphas: Sequence[Any], ks: Sequence[Any], fractions: Sequence[Any]) -> list[str]:
    """Every setting name of `method` over a grid, in the order k, α, fraction (outermost first),
    each axis only where the method uses it; the values are spelled as given (the workflow
    passes its one spelling of each float).

    setting_names("tsvm", alphas=["0.5", "1.0"], ks=[32], fractions=["0.1"]) → ["k32_a0.5", "k32_a1.0"]
    """
    uses = get_method(method).uses
    axes = [(prefix, values) for key, prefix, values in (("k", "k", ks), ("alpha", "a", alphas), ("fraction", "f", fractions)) if key in uses]
    names = [""]
    for prefix, values in axes:
        names = [f"{n}_{prefix}{v}" if n else f"{prefix}{v}" for n in names for v in values]
    return names


def setting_name(method: str, *, alpha: float | None = None, k: int | None = None, fraction: float | None = None) -> str:
    """The artifact name of a setting, naming only the parameters the method uses.

    ta/a0.3, ties/a0.3, fisher/f0.05, tsvm/k32_a1.0, epimer/k32_a1.0_f0.05
    """
    uses = get_method(method).uses
    parts = []
    if "k" in uses:
        parts.append(f"k{k}")
    if "alpha" in uses:
        parts.append(f"a{alpha}")
    if "fraction" in uses:
        parts.append(f"f{fraction}")
    return "_".join(parts)
