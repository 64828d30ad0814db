"""The merge driver: one pass over the tensors of θ0, for one α or a sweep of α values.

For each tensor name the driver reads that tensor from every input (never T full models),
checks it, fits the layer's subspace and curvature where the method needs them, hands the
layer to the method once per α and passes each result to its target's writer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from tqdm import tqdm

from pipeline.curvature import effective_solver
from pipeline.merge.diagnostics import MergeReport, Timer, curvature_info, settings_dict
from pipeline.merge.inputs import (
    MergeInputs,
    check_inputs,
    check_settings,
    is_floating,
    is_matrix_layer,
    layer_rank,
)
from pipeline.merge.reading import BufferPool, read_deltas, read_fishers, read_pretrained
from pipeline.merge.subspaces import ComputedSubspace, SubspaceSource
from pipeline.merge.task_stats import global_task_stats
from pipeline.methods import LayerInputs, MergeSettings, get_method
from pipeline.subspace import effective_rank


@dataclass
class MergeTarget:
    """One output of `merge_sweep`: its α and where its tensors go."""

    alpha: float
    write: Callable[[str, torch.Tensor], None]
    write_coords: Callable[[str, torch.Tensor], None] | None = None


def merge(
    method: str,
    inputs: MergeInputs,
    settings: MergeSettings,
    write: Callable[[str, torch.Tensor], None],
    *,
    subspace: SubspaceSource | None = None,
    write_coords: Callable[[str, torch.Tensor], None] | None = None,
    diagnostics: bool = True,
    progress: bool = True,
) -> MergeReport:
    """Merge tensor by tensor; `write(name, merged θ tensor)` receives each output in θ0's dtype.

    subspace: where bases/curvature come from (default: computed on the fly with settings.k).
    diagnostics: for TSV-M and EpiMer with Fisher available, report η, V_S, R_S per layer.
    """
    target = MergeTarget(settings.alpha, write, write_coords)
    return merge_sweep(
        method,
        inputs,
        settings,
        [target],
        subspace=subspace,
        diagnostics=diagnostics,
        progress=progress,
    )[0]


def merge_sweep(
    method: str,
    inputs: MergeInputs,
    settings: MergeSettings,
    targets: Sequence[MergeTarget],
    *,
    subspace: SubspaceSource | None = None,
    diagnostics: bool = True,
    progress: bool = True,
) -> list[MergeReport]:
    """One merge per target α (settings.alpha is ignored) from one pass over the inputs.

    Reading, bases, projected Hessians and TIES thresholds are shared; per α and tensor only
    the method's solve, the lift and the write are repeated, with the same code as a single
    merge, so each output is bit for bit the one `merge` gives at its α. Returns one report per
    target (their `timings` are one shared dict: the whole sweep's).
    """
    if not targets:
        raise ValueError("merge_sweep needs at least one target")
    get_method(method)  # an unknown method is refused before its settings
    per_alpha = _settings_per_alpha(method, settings, targets)
    with_curvature = _check_sweep_inputs(method, inputs, diagnostics)
    s = per_alpha[0]
    subspace = subspace or ComputedSubspace(s.k, s.eps, s.dtype, s.device, s.fisher_rank, s.solver)
    sweep = _Sweep(method, inputs, targets, per_alpha, subspace, with_curvature)
    names = inputs.pretrained.keys()
    for name in tqdm(
        names, desc=f"merge {method}", unit="tensor", disable=not progress, leave=False
    ):
        sweep.merge_tensor(name)
    return sweep.reports


def _settings_per_alpha(
    method: str, settings: MergeSettings, targets: Sequence[MergeTarget]
) -> list[MergeSettings]:
    """`settings` at each target's α, with the solver the settings resolve to, each checked."""
    settings = replace(settings, solver=effective_solver(settings.solver, settings.fisher_rank))
    per_alpha = [replace(settings, alpha=t.alpha) for t in targets]
    for s_a in per_alpha:
        check_settings(method, s_a)
    return per_alpha


def _check_sweep_inputs(method: str, inputs: MergeInputs, diagnostics: bool) -> bool:
    """Check the inputs with the Fisher tensors `method` reads; returns whether the matrix
    layers get curvature (the method's own, or TSV-M's diagnostics where Fishers are given),
    whose Fisher tensors are then checked too."""
    m = get_method(method)
    fisher_names = {"all": inputs.float_names(), "matrix": inputs.matrix_names(), "none": []}[
        m.needs_fisher
    ]
    check_inputs(inputs, fisher_names)
    with_curvature = m.curvature or (m.subspace and diagnostics and inputs.fishers is not None)
    if with_curvature:
        check_inputs(inputs, inputs.matrix_names())
    return bool(with_curvature)


class _Sweep:
    """What the tensors of one `merge_sweep` share: the settings per α, the task statistics,
    the read buffers and the reports (one per target, with one timings dict)."""

    def __init__(
        self,
        method: str,
        inputs: MergeInputs,
        targets: Sequence[MergeTarget],
        per_alpha: list[MergeSettings],
        subspace: SubspaceSource,
        with_curvature: bool,
    ) -> None:
        self.m, self.inputs, self.targets = get_method(method), inputs, targets
        self.per_alpha, self.s = per_alpha, per_alpha[0]
        self.subspace, self.with_curvature = subspace, with_curvature
        self.T = inputs.num_tasks
        self.lam = torch.full((self.T,), 1.0 / self.T, dtype=torch.float64)
        self.reports = [
            MergeReport(method, settings_dict(method, s_a), self.T) for s_a in per_alpha
        ]
        self.report = self.reports[0]  # holds the shared timings
        for other in self.reports[1:]:
            other.timings = self.report.timings
        self.buffers = BufferPool()
        with Timer(self.report, "prepare"):
            self.stats = global_task_stats(inputs, method, self.s)

    def merge_tensor(self, name: str) -> None:
        """Read tensor `name` from every input, merge it at every α and write each output."""
        shape = self.inputs.pretrained.shape(name)
        dtype0 = self.inputs.pretrained.dtype(name)
        in_subspace = (
            self.m.subspace
            and is_matrix_layer(shape, dtype0)
            and effective_rank(shape, self.s.k, self.T) >= 1
        )
        with Timer(self.report, "read"):
            theta0, deltas = self._read(name, shape, dtype0, in_subspace)
        if not is_floating(theta0.dtype):
            with Timer(self.report, "write"):
                for t in self.targets:
                    t.write(name, theta0)  # integer buffers are not merged
            return
        layer = LayerInputs(name=name, deltas=deltas, task_stats=self.stats)
        if self._needs_fishers(name, theta0, in_subspace):
            with Timer(self.report, "read"):
                layer.fishers = read_fishers(self.inputs, name, self.s.dtype, self.buffers)
        info: dict[str, Any] = {}
        if self.m.subspace and is_matrix_layer(theta0.shape, theta0.dtype):
            info = self._fit_subspace(layer, theta0.shape)
        for target, s_a, report_a in zip(self.targets, self.per_alpha, self.reports):
            self._solve_and_write(layer, theta0, info, target, s_a, report_a)

    def _read(
        self, name: str, shape: Sequence[int], dtype0: torch.dtype, in_subspace: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """θ0[name] and the task vectors [T, *shape], which are a shape only (never read) where
        TIES's streamed pass or the stored subspace artifacts stand in for them."""
        stats, s = self.stats, self.s
        if not (
            self.m.streamed or (in_subspace and not self.subspace.needs_deltas(name, s.coords))
        ):
            return read_deltas(self.inputs, name, s.dtype, self.buffers)
        if self.m.streamed and name in stats["streamed"].ranges:  # θ0 (checked) is in memory
            theta0 = stats["streamed"].theta0(name).view(shape).to(dtype0)
        else:
            theta0 = read_pretrained(self.inputs, name)
        return theta0, torch.empty((self.T, *shape), dtype=s.dtype, device="meta")

    def _needs_fishers(self, name: str, theta0: torch.Tensor, in_subspace: bool) -> bool:
        """Whether tensor `name` is merged with its Fisher diagonals read."""
        m = self.m
        if in_subspace and not self.subspace.needs_fishers(name):
            return m.needs_fisher == "all"  # the stored curvature replaces them
        return m.needs_fisher == "all" or (
            is_matrix_layer(theta0.shape, theta0.dtype)
            and (m.needs_fisher == "matrix" or self.with_curvature)
        )

    def _fit_subspace(self, layer: LayerInputs, shape: Sequence[int]) -> dict[str, Any]:
        """The matrix layer's basis, coordinates and (where needed) curvature, set on `layer`;
        returns the report's k and p for it (nothing where the layer is too small for a basis
        and is merged as a vector tensor)."""
        s, name, deltas = self.s, layer.name, layer.deltas
        if layer_rank(name, shape, s.k, self.T, "merged as a vector tensor") < 1:
            return {}
        with Timer(self.report, "basis"):
            layer.basis = self.subspace.basis(name, deltas)
            layer.coords = self.subspace.coordinates(name, layer.basis, deltas, s.coords)
        if self.with_curvature:
            with Timer(self.report, "hessian"):
                layer.curvature = self.subspace.curvature(
                    name, layer.basis, layer.coords, s.coords, layer.fishers, deltas
                )
        return {"k": layer.basis.k, "p": layer.basis.p}

    def _solve_and_write(
        self,
        layer: LayerInputs,
        theta0: torch.Tensor,
        info: dict[str, Any],
        target: MergeTarget,
        s_a: MergeSettings,
        report_a: MergeReport,
    ) -> None:
        """The method's merge of `layer` at `s_a`'s α, lifted onto θ0, recorded in `report_a`
        and written to `target`."""
        with Timer(self.report, "solve"):
            result = self.m.merge_tensor(layer, s_a)
            if result.with_theta0:
                merged = result.delta.cpu().to(theta0.dtype)
            else:  # θ0 + scale · delta in one fused step (one rounding; no scaled copy of the delta)
                merged = torch.add(
                    theta0.to(self.s.dtype), result.delta.cpu(), alpha=result.scale
                ).to(theta0.dtype)
            if result.coords is not None:
                result.coords = result.coords.cpu()
        info_a = dict(info)
        if layer.curvature is not None and result.coords is not None:
            info_a.update(curvature_info(layer, result.coords, self.s, s_a.alpha, self.lam))
        if info_a:
            report_a.layers[layer.name] = info_a
        with Timer(self.report, "write"):
            target.write(layer.name, merged)
            if target.write_coords is not None and result.coords is not None:
                target.write_coords(layer.name, result.coords)
