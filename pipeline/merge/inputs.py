"""Which tensors are merged, and the checks of a merge's inputs and settings before anything
is computed: tensor names, shapes and dtypes of every file (headers only) and the ranges of
the method's settings."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pipeline.curvature import check_solver
from pipeline.methods import COORDINATES, MergeSettings, get_method
from pipeline.methods import gradmatch as gradmatch_method
from pipeline.methods import iso as iso_method
from pipeline.methods import ties as ties_method
from pipeline.store import ArtifactError, TensorReader, check_tensor_name
from pipeline.subspace import effective_rank

log = logging.getLogger("pipeline.merge")


# --------------------------------------------------------------------------- which tensors


def is_floating(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point


def is_matrix_layer(shape: Sequence[int], dtype: torch.dtype) -> bool:
    """The matrix-layer rule of docs/algorithms.md: 2-D floating tensors get the subspace treatment.

    In open_clip names: attn.in_proj_weight (kept whole), attn.out_proj.weight, mlp.c_fc.weight,
    mlp.c_proj.weight, positional_embedding and proj; conv1 (4-D), class_embedding,
    LayerNorms and biases are vector tensors.
    """
    return len(shape) == 2 and is_floating(dtype)


def layer_rank(name: str, shape: Sequence[int], k: int, num_tasks: int, small: str) -> int:
    """The effective rank k_l of matrix layer `name` (`effective_rank`), with a warning where
    it is below `k`; below 1 the layer has no basis, and the warning ends with `small`, what
    becomes of it."""
    k_eff = effective_rank(shape, k, num_tasks)
    if k_eff < 1:
        log.warning(
            "%s: shape %s is too small for %d tasks; %s", name, list(shape), num_tasks, small
        )
    elif k_eff < k:
        log.warning(
            "%s: k=%d clamped to k_l=%d (min(d_out, d_in)=%d over T=%d tasks)",
            name,
            k,
            k_eff,
            min(shape),
            num_tasks,
        )
    return k_eff


# --------------------------------------------------------------------------- input checks


@dataclass
class MergeInputs:
    """Lazily opened inputs: θ0, θ_1..θ_T and optionally one Fisher reader per task."""

    pretrained: TensorReader
    finetuned: Sequence[TensorReader]
    fishers: Sequence[TensorReader] | None = None

    @property
    def num_tasks(self) -> int:
        return len(self.finetuned)

    def float_names(self) -> list[str]:
        return [n for n in self.pretrained.keys() if is_floating(self.pretrained.dtype(n))]

    def matrix_names(self) -> list[str]:
        p = self.pretrained
        return [n for n in p.keys() if is_matrix_layer(p.shape(n), p.dtype(n))]


def check_inputs(inputs: MergeInputs, fisher_names: Sequence[str] = ()) -> None:
    """Reject mismatched inputs before anything is computed or written.

    θ0's tensor names must be plain relative names (`check_tensor_name`: no `..`, absolute
    paths, backslashes or control characters). Every fine-tuned checkpoint must have exactly
    θ0's tensor names, shapes and dtypes;
    every Fisher file must hold `fisher_names` with θ0's shapes, in a floating dtype, and
    nothing θ0 lacks. Only headers are read. Raises ArtifactError naming the file and the
    tensor; values (NaN/Inf, negative or all-zero Fisher) are checked as each tensor is read.
    """
    if inputs.num_tasks < 2:
        raise ArtifactError(
            f"need at least two fine-tuned checkpoints to merge, got {inputs.num_tasks}"
        )
    base = inputs.pretrained
    names = base.keys()
    for name in names:  # names become paths in Zarr outputs: refused before anything is written
        check_tensor_name(name, base.path)
    expected = set(names)
    for reader in inputs.finetuned:
        have = set(reader.keys())
        for name in sorted(expected - have):
            raise ArtifactError(f"{reader.path}: tensor `{name}` is missing (it is in {base.path})")
        for name in sorted(have - expected):
            raise ArtifactError(f"{reader.path}: unexpected tensor `{name}` (not in {base.path})")
        for name in names:
            if reader.shape(name) != base.shape(name):
                raise ArtifactError(
                    f"{reader.path}: tensor `{name}` has shape {list(reader.shape(name))}, "
                    f"expected {list(base.shape(name))} as in {base.path}"
                )
            if reader.dtype(name) != base.dtype(name):
                raise ArtifactError(
                    f"{reader.path}: tensor `{name}` has dtype {dtype_name(reader.dtype(name))}, "
                    f"expected {dtype_name(base.dtype(name))} as in {base.path}"
                )
    if not fisher_names:
        return
    if inputs.fishers is None:
        raise ArtifactError(
            "this method needs one Fisher file per fine-tuned checkpoint (--fisher)"
        )
    if len(inputs.fishers) != inputs.num_tasks:
        raise ArtifactError(
            f"got {len(inputs.fishers)} Fisher files for {inputs.num_tasks} fine-tuned checkpoints; "
            "give one per checkpoint, in the same order"
        )
    for reader in inputs.fishers:
        have = set(reader.keys())
        for name in sorted(have - expected):
            raise ArtifactError(f"{reader.path}: unexpected tensor `{name}` (not in {base.path})")
        for name in fisher_names:
            if name not in have:
                raise ArtifactError(f"{reader.path}: Fisher tensor `{name}` is missing")
            if reader.shape(name) != base.shape(name):
                raise ArtifactError(
                    f"{reader.path}: Fisher tensor `{name}` has shape {list(reader.shape(name))}, "
                    f"expected {list(base.shape(name))}"
                )
            if not reader.dtype(name).is_floating_point:
                raise ArtifactError(
                    f"{reader.path}: Fisher tensor `{name}` has dtype {dtype_name(reader.dtype(name))}, "
                    "expected a floating dtype"
                )


def dtype_name(dtype: torch.dtype) -> str:
    """`float32` for torch.float32."""
    return str(dtype).removeprefix("torch.")


def check_settings(method: str, s: MergeSettings) -> None:
    """Reject settings out of their range (ValueError) before any input is read."""
    m = get_method(method)
    if "alpha" in m.uses:
        if not math.isfinite(s.alpha):
            raise ValueError(f"alpha must be finite, got {s.alpha}")
        if not s.alpha > 0:
            raise ValueError(f"alpha must be > 0, got {s.alpha}")
        if s.alpha > torch.finfo(s.dtype).max:
            raise ValueError(
                f"alpha {s.alpha} is beyond the range of {dtype_name(s.dtype)} (largest {torch.finfo(s.dtype).max:.4g})"
            )
    if m.subspace and s.k < 1:
        raise ValueError(f"k must be a positive integer, got {s.k}")
    if s.coords not in COORDINATES:
        raise ValueError(
            f"unknown coordinates `{s.coords}` (expected one of {', '.join(COORDINATES)})"
        )
    if not math.isfinite(s.eps):
        raise ValueError(f"eps must be finite, got {s.eps}")
    if s.eps < 0:
        raise ValueError(f"eps must be >= 0, got {s.eps}")
    if method == "ties" and not 0 < s.ties_density <= 100:
        raise ValueError(f"TIES density is a percentage in (0, 100], got {s.ties_density}")
    if method == "ties":
        ties_method.check_options(s.ties_sign, s.ties_disjoint)
    if method == "isocts":
        iso_method.check_fraction(s.iso_common_fraction)
    if method == "gradmatch":
        gradmatch_method.check_prior(s.gradmatch_prior)
    if s.fisher_rank is not None and s.fisher_rank < 1:
        raise ValueError(f"fisher_rank must be a positive integer, got {s.fisher_rank}")
    check_solver(s.solver, s.fisher_rank)
