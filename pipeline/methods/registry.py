"""The registry of merge methods: one row per method, plain data, importable without torch.

A row names the method, says what it needs (Fisher diagonals, the tagged basis, projected
Hessians), which settings name its artifacts, and how tables, figures and the report show it
(label, colour, citation, order). Its per-tensor function lives in `pipeline.methods.layer`
(torch); the built-in rows point at it through `_Entry`, which imports it on first call, so
reading the registry (the workflow, tables, figures, `show`) never imports torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.methods.layer import LayerInputs, LayerResult, MergeSettings


class _Entry:
    """A method's per-tensor function named by module and attribute, imported on first call."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name
        self._function: Callable[..., Any] | None = None

    def __call__(self, layer: LayerInputs, settings: MergeSettings) -> LayerResult:
        if self._function is None:
            self._function = getattr(importlib.import_module(self.module), self.name)
        return self._function(layer, settings)

    def __repr__(self) -> str:
        return f"{self.module}.{self.name}"


def _entry(name: str) -> _Entry:
    return _Entry("pipeline.methods.layer", name)


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
    # Merged whole in the driver's prepare pass (task_stats["streamed"]): per tensor only θ0
    # is read.
    streamed: bool = False
    default_alpha: float | None = 1.0
    label: str = ""  # the name in tables, figures and the report ("" → the registry name)
    colour: str = "#000000"  # its line and bar colour in every figure
    citation: str = ""  # the paper that defines it
    order: int = 100  # its place in tables and legends (the paper's order: flat geometry first)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "ta",
            "Task Arithmetic: θ0 + α Σ δ_t (α = 1/T is the arithmetic mean)",
            _entry("_ta"),
            ("alpha",),
            default_alpha=None,
            label="Task Arithmetic",
            colour="#999999",
            citation="Ilharco et al. 2023, arXiv 2212.04089",
            order=0,
        ),
        Method(
            "ties",
            "TIES-Merging: trim to the top K %, elect signs, disjoint mean",
            _entry("_ties"),
            ("alpha",),
            options=("ties_density", "ties_sign", "ties_disjoint"),
            streamed=True,
            label="TIES",
            colour="#e08214",
            citation="Yadav et al. 2023, arXiv 2306.01708",
            order=1,
        ),
        Method(
            "fisher",
            "Fisher-weighted averaging of θ_t with the empirical Fisher diagonal",
            _entry("_fisher"),
            ("fraction",),
            needs_fisher="all",
            default_alpha=None,
            label="Fisher averaging",
            colour="#1b7837",
            citation="Matena and Raffel 2022, arXiv 2111.09832",
            order=5,
        ),
        Method(
            "tsvm",
            "TSV-M: task singular vectors, Procrustes-whitened, summed",
            _entry("_tsvm"),
            ("k", "alpha"),
            subspace=True,
            label="TSV-M",
            colour="#2166ac",
            citation="Gargiulo et al. 2025, arXiv 2412.00081",
            order=4,
        ),
        Method(
            "epimer",
            "EpiMer: curvature-aware subspace Fréchet mean (tagged basis, projected Fisher)",
            _entry("_epimer"),
            ("k", "alpha", "fraction"),
            needs_fisher="matrix",
            subspace=True,
            curvature=True,
            label="EpiMer",
            colour="#c51b7d",
            citation="arXiv 2605.26693",
            order=7,
        ),
        Method(
            "isoc",
            "Iso-C: the task-vector sum's singular values replaced by their mean",
            _entry("_isoc"),
            ("alpha",),
            label="Iso-C",
            colour="#35978f",
            citation="Marczak et al. 2025, arXiv 2502.04959",
            order=2,
        ),
        Method(
            "isocts",
            "Iso-CTS: Iso-C over a common subspace plus task-specific directions",
            _entry("_isocts"),
            ("alpha",),
            options=("iso_common_fraction",),
            label="Iso-CTS",
            colour="#80cdc1",
            citation="Marczak et al. 2025, arXiv 2502.04959",
            order=3,
        ),
        Method(
            "gradmatch",
            "Uncertainty-based gradient matching: (H_0 + Σ F_t)⁻¹ Σ (H_0 + F_t) δ_t",
            _entry("_gradmatch"),
            ("alpha", "fraction"),
            options=("gradmatch_prior",),
            needs_fisher="all",
            label="Gradient matching",
            colour="#8c510a",
            citation="Daheim et al. 2024, arXiv 2310.12808",
            order=6,
        ),
    )
}


def get_method(name: str) -> Method:
    """The registry row for `name`, or a ValueError listing the known methods."""
    if name not in METHODS:
        raise ValueError(f"unknown merge method `{name}`; known methods: {', '.join(METHODS)}")
    return METHODS[name]


def setting_names(
    method: str, *, alphas: Sequence[Any], ks: Sequence[Any], fractions: Sequence[Any]
) -> list[str]:
    """Every setting name of `method` over a grid, in the order k, α, fraction (outermost first),
    each axis only where the method uses it; the values are spelled as given (the workflow
    passes its one spelling of each float).

    setting_names("tsvm", alphas=["0.5", "1.0"], ks=[32], fractions=["0.1"])
    → ["k32_a0.5", "k32_a1.0"]
    """
    uses = get_method(method).uses
    axes = [
        (prefix, values)
        for key, prefix, values in (
            ("k", "k", ks),
            ("alpha", "a", alphas),
            ("fraction", "f", fractions),
        )
        if key in uses
    ]
    names = [""]
    for prefix, values in axes:
        names = [f"{n}_{prefix}{v}" if n else f"{prefix}{v}" for n in names for v in values]
    return names


def setting_name(
    method: str, *, alpha: float | None = None, k: int | None = None, fraction: float | None = None
) -> str:
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
