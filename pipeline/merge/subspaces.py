"""Where a matrix layer's tagged basis and projected curvature come from: computed on the fly
(the command-line merge) or read from the workflow's `basis` / `hessian` Zarr artifacts."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pipeline.curvature import LayerCurvature, SolvedHessian, layer_curvature
from pipeline.methods import COORDINATES
from pipeline.store import ArtifactError, ZarrReader
from pipeline.subspace import (
    TaggedBasis,
    projected_coordinates,
    tagged_basis,
    tagged_coordinates,
)


class SubspaceSource:
    """Where a layer's tagged basis and projected curvature come from."""

    def basis(self, name: str, deltas: torch.Tensor) -> TaggedBasis:
        raise NotImplementedError

    def coordinates(
        self, name: str, basis: TaggedBasis, deltas: torch.Tensor, mode: str
    ) -> torch.Tensor:
        if mode == "tagged":
            return tagged_coordinates(basis)
        return projected_coordinates(basis, deltas)

    def needs_deltas(self, name: str, mode: str) -> bool:
        """Whether basis, coordinates and curvature of matrix layer `name` need its task vectors."""
        return True

    def needs_fishers(self, name: str) -> bool:
        """Whether the curvature of matrix layer `name` needs its Fisher diagonals."""
        return True

    def curvature(
        self,
        name: str,
        basis: TaggedBasis,
        coords: torch.Tensor,
        mode: str,
        fishers: torch.Tensor,
        deltas: torch.Tensor,
    ) -> LayerCurvature:
        raise NotImplementedError


class ComputedSubspace(SubspaceSource):
    """Compute bases and projected Hessians on the fly (the command-line merge).

    The heavy algebra runs on `device` (task vectors and Fisher diagonals are moved there
    one layer at a time); p × p solves and the results come back to the CPU.
    """

    def __init__(
        self,
        k: int,
        eps: float,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        fisher_rank: int | None = None,
        solver: str = "auto",
    ) -> None:
        self.k, self.eps, self.dtype, self.device = k, eps, dtype, torch.device(device)
        self.fisher_rank, self.solver = fisher_rank, solver

    def basis(self, name: str, deltas: torch.Tensor) -> TaggedBasis:
        return tagged_basis(deltas.to(self.device), self.k).to(self.dtype)

    def coordinates(self, name, basis, deltas, mode) -> torch.Tensor:
        if mode == "tagged":
            return tagged_coordinates(basis).cpu()
        return projected_coordinates(basis, deltas.to(self.device)).cpu()

    def curvature(self, name, basis, coords, mode, fishers, deltas) -> LayerCurvature:
        return layer_curvature(
            basis,
            {mode: coords},
            fishers.to(self.device),
            deltas.to(self.device),
            self.eps,
            fisher_rank=self.fisher_rank,
            solver=self.solver,
            rows=False,  # b for the merge's uniform λ_t, from one product instead of T
        )


class StoredSubspace(SubspaceSource):
    """Read bases (and projected Hessians) from the workflow's `basis` / `hessian` Zarr artifacts."""

    def __init__(
        self, basis_path: str, hessian_path: str | None = None, dtype: torch.dtype = torch.float32
    ) -> None:
        self.basis_store = ZarrReader(basis_path)
        self.hessian_store = ZarrReader(hessian_path) if hessian_path else None
        self.dtype = dtype
        self._basis_layers = set(self.basis_store.group_keys())
        self._hessian_layers = set(self.hessian_store.group_keys()) if self.hessian_store else set()

    def basis(self, name: str, deltas: torch.Tensor) -> TaggedBasis:
        basis = read_basis(self.basis_store, name).to(self.dtype)
        T, d_out, d_in = deltas.shape
        if basis.U.shape[0] != d_out or basis.W.shape[0] != d_in or basis.num_tasks != T:
            raise ArtifactError(
                f"{self.basis_store.path}: basis of `{name}` was built for another set of checkpoints "
                f"(U {list(basis.U.shape)}, W {list(basis.W.shape)}, {basis.num_tasks} tasks); delete it and re-run"
            )
        return basis

    def coordinates(self, name, basis, deltas, mode) -> torch.Tensor:
        if mode == "tagged":
            return tagged_coordinates(basis)
        return self.basis_store.group(name).get("projection").to(torch.float64)

    def needs_deltas(self, name: str, mode: str) -> bool:
        # Basis, both coordinate modes and the curvature are all in the artifacts: an α sweep
        # reads only θ0 for its matrix layers.
        return name not in self._basis_layers

    def needs_fishers(self, name: str) -> bool:
        return self.hessian_store is None or name not in self._hessian_layers

    def curvature(self, name, basis, coords, mode, fishers, deltas) -> LayerCurvature:
        if self.hessian_store is None:
            raise ArtifactError("this method needs a hessian artifact")
        return read_curvature(self.hessian_store, name, (mode,))


def read_basis(store: ZarrReader, name: str) -> TaggedBasis:
    """One layer of a `basis/k{k}.zarr` artifact."""
    if name not in store.group_keys():
        raise ArtifactError(
            f"{store.path}: no basis for layer `{name}`; delete it and re-run the basis stage"
        )
    g = store.group(name)
    return TaggedBasis(
        U=g.get("U"),
        W=g.get("W"),
        sigma=g.get("sigma"),
        tags=g.get("tags").long(),
        k=int(g.attrs()["k"]),
    )


def read_curvature(
    store: ZarrReader, name: str, modes: Sequence[str] = COORDINATES
) -> LayerCurvature:
    """One layer of a `hessian/k{k}_f{f}.zarr` artifact, with the terms of the coordinate `modes`."""
    if name not in store.group_keys():
        raise ArtifactError(
            f"{store.path}: no projected Hessian for layer `{name}`; delete it and re-run"
        )
    g = store.group(name)
    for m in modes:
        if f"Hx_{m}" not in g:
            raise ArtifactError(
                f"{store.path}: layer `{name}` has no terms for `{m}` coordinates (the hessian stage "
                f"ran with --coords {' '.join(x for x in COORDINATES if f'Hx_{x}' in g)}); re-run it with --coords {m}"
            )
    H: torch.Tensor | SolvedHessian
    if "H" in g:
        H = g.get("H")
    else:  # solved by conjugate gradients in the hessian stage: the solutions, not H̄
        attrs = g.attrs()
        solutions = {m: g.get(f"solution_{m}") for m in modes}
        H = SolvedHessian(
            [(g.get(f"b_{m}"), solutions[m]) for m in modes],
            [
                pair
                for m in modes
                for pair in (
                    (g.get(f"delta_bar_{m}"), g.get(f"H_delta_bar_{m}")),
                    (solutions[m], g.get(f"H_solution_{m}")),
                )
            ],
            where=f"{store.path}, layer `{name}`",
            iterations=int(attrs.get("cg_iterations", 0)),
            residual=float(attrs.get("cg_residual", 0.0)),
        )
    return LayerCurvature(
        H=H,
        Hx={m: g.get(f"Hx_{m}") for m in modes},
        quad={m: g.get(f"quad_{m}") for m in modes},
        residual=g.get("residual"),
        fisher_rank_error=g.attrs().get("fisher_rank_error"),
        fisher_mean=g.attrs().get("fisher_mean"),
    )
