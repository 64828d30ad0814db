"""The workflow's cached stages, `basis` and `hessian`: per matrix layer the tagged basis, and
the projected curvature on it, written to Zarr artifacts that an α sweep of merges reads
(`StoredSubspace`) instead of computing them once per merge."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from pipeline.curvature import ImplicitHessian, LayerCurvature, layer_curvature, solved_terms
from pipeline.merge.inputs import MergeInputs, check_inputs, layer_rank
from pipeline.merge.reading import BufferPool, iter_matrix_layers, read_fishers
from pipeline.merge.subspaces import StoredSubspace
from pipeline.methods import COORDINATES
from pipeline.subspace import TaggedBasis, projected_coordinates, tagged_basis


def build_basis(
    inputs: MergeInputs,
    k: int,
    writer: Any,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> dict[str, int]:
    """The `basis` stage: one Zarr group per matrix layer with U, W, sigma, tags, projection.

    `projection` holds Sᵀ vec(δ_t) [T, p] (float64) for the `projection` coordinates and
    the residual energy. The SVDs and products run on `device`. Returns {layer: effective k}.
    """
    check_inputs(inputs)
    T = inputs.num_tasks
    ranks = {}
    for name, deltas in iter_matrix_layers(inputs, dtype, progress, f"basis k={k}"):
        if layer_rank(name, deltas.shape[1:], k, T, "no basis (merged as a vector tensor)") < 1:
            continue
        on_device = deltas.to(device)
        basis = tagged_basis(on_device, k).to(dtype)
        writer.write("U", basis.U.cpu(), group=name)
        writer.write("W", basis.W.cpu(), group=name)
        writer.write("sigma", basis.sigma.cpu(), group=name)
        writer.write("tags", basis.tags, group=name)
        writer.write(
            "projection",
            projected_coordinates(basis, on_device).to(torch.float64).cpu(),
            group=name,
        )
        writer.set_attrs({"k": basis.k}, group=name)
        ranks[name] = basis.k
    return ranks


def build_hessian(
    inputs: MergeInputs,
    basis_path: str,
    eps: float,
    writer: Any,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    device: str | torch.device = "cpu",
    coords: Sequence[str] = COORDINATES,
    fisher_rank: int | None = None,
    solver: str = "dense",
) -> dict[str, int]:
    """The `hessian` stage: per layer H̄, H̃_t δ̃_t and δ̃_tᵀ H̃_t δ̃_t for the coordinate modes
    `coords` (both by default; a tagged-only sweep skips the projection matrix-vector
    products), and the R_S terms. Products run on `device`. fisher_rank: H̄ from a rank-R
    non-negative factorisation of F̄ (opt-in), its relative error stored per layer.

    solver "cg" / "auto" (as in the merge): where conjugate gradients solve a layer, H̄ is not
    formed and the layer keeps, per mode, b = Σ_t H̃_t δ̃_t / T, x = H̄⁻¹b, δ̄, H̄δ̄ and H̄x
    instead of H (`SolvedHessian`; the CG steps and residual in its attributes); where H̄ was
    formed it keeps H as the dense solver does.

    Returns counts for the stage's log: layers, layers solved by CG (`cg_layers`), the most CG
    steps of any layer (`cg_iterations`), layers whose H̄ was formed (`dense_layers`)."""
    counts = {"layers": 0, "cg_layers": 0, "cg_iterations": 0, "dense_layers": 0}
    for mode in coords:
        if mode not in COORDINATES:
            raise ValueError(
                f"unknown coordinates `{mode}` (expected one of {', '.join(COORDINATES)})"
            )
    check_inputs(inputs, inputs.matrix_names())
    source = StoredSubspace(basis_path, dtype=dtype)
    layers = set(source.basis_store.group_keys())
    buffers = BufferPool()
    T = inputs.num_tasks
    lam = torch.full((T,), 1.0 / T, dtype=torch.float64)  # as the merge forms b and δ̄
    for name, deltas in iter_matrix_layers(inputs, dtype, progress, "projected Hessians"):
        if name not in layers:
            continue  # too small for a basis: merged as a vector tensor
        stored = source.basis(name, deltas)
        basis = TaggedBasis(
            stored.U.to(device), stored.W.to(device), stored.sigma.to(device), stored.tags, stored.k
        )
        modes = {mode: source.coordinates(name, basis, deltas, mode).cpu() for mode in coords}
        # Stored in the basis artifact: R_S needs no product for it.
        projection = (
            modes["projection"]
            if "projection" in modes
            else source.coordinates(name, basis, deltas, "projection")
        )
        fishers = read_fishers(inputs, name, dtype, buffers)
        curv = layer_curvature(
            basis,
            modes,
            fishers.to(device),
            deltas.to(device),
            eps,
            fisher_rank=fisher_rank,
            projection=projection,
            solver=solver,
        )
        _write_curvature(writer, name, curv, modes, lam, fisher_rank, counts)
    return counts


def _write_curvature(
    writer: Any,
    name: str,
    curv: LayerCurvature,
    modes: dict[str, torch.Tensor],
    lam: torch.Tensor,
    fisher_rank: int | None,
    counts: dict[str, int],
) -> None:
    """One layer's group of the `hessian` artifact: H̄ or the CG solutions in its place, and
    per coordinate mode in `modes` ({mode: δ̃_t [T, p]}) the terms of the merge; `counts` of
    `build_hessian` updated. lam: the task weights λ_t [T] of the CG solutions."""
    H = curv.H
    if isinstance(H, ImplicitHessian):
        H = _write_solved(writer, name, H, curv, modes, lam, counts)
    counts["layers"] += 1
    if isinstance(H, torch.Tensor):
        counts["dense_layers"] += 1
        writer.write("H", H, group=name)
    for mode in modes:
        writer.write(f"Hx_{mode}", curv.Hx[mode], group=name)
        writer.write(f"quad_{mode}", curv.quad[mode], group=name)
    writer.write("residual", curv.residual, group=name)
    writer.set_attrs(
        {"fisher_mean": curv.fisher_mean}, group=name
    )  # for ε / mean F̄ in the merge report
    if curv.fisher_rank_error is not None:
        writer.set_attrs(
            {"fisher_rank": fisher_rank, "fisher_rank_error": curv.fisher_rank_error},
            group=name,
        )


def _write_solved(
    writer: Any,
    name: str,
    H: ImplicitHessian,
    curv: LayerCurvature,
    modes: dict[str, torch.Tensor],
    lam: torch.Tensor,
    counts: dict[str, int],
) -> ImplicitHessian | torch.Tensor:
    """The CG solutions of a layer whose H̄ is not formed (`solved_terms` per mode, with b and δ̄
    weighted by `lam`), written with the CG steps and residual; returns H̄ itself where CG fell
    back to forming it (stored as the dense solver stores it), else `H`."""
    terms = {
        mode: solved_terms(H, curv.b[mode], lam @ coords.to(torch.float64))
        for mode, coords in modes.items()
    }
    if H.fallback:
        return H.dense()  # formed after all: stored as the dense solver stores it
    for mode, values in terms.items():
        for key, value in values.items():
            writer.write(f"{key}_{mode}", value, group=name)
    writer.set_attrs({"cg_iterations": H.iterations, "cg_residual": H.residual}, group=name)
    counts["cg_layers"] += 1
    counts["cg_iterations"] = max(counts["cg_iterations"], int(H.iterations))
    return H
