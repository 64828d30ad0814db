"""The one driver that streams a state dict tensor by tensor, for every method and stage.

θ0, the T fine-tuned checkpoints and the Fisher diagonals are opened lazily; for each
tensor name the driver reads that tensor from every input (never T full models), checks
it, hands it to the method and passes the result to a sink that writes as it goes. The
`basis` and `hessian` stages of the workflow use the same reading and checking.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from pipeline import parallel
from pipeline.curvature import (
    HessianOperator,
    ImplicitHessian,
    LayerCurvature,
    NotStored,
    SolvedHessian,
    check_solver,
    curvature_heterogeneity,
    effective_solver,
    frechet_variance,
    layer_curvature,
    residual_energy,
    solved_terms,
    subspace_variance,
)
from pipeline.methods import COORDINATES, LayerInputs, MergeSettings, get_method
from pipeline.methods import gradmatch as gradmatch_method
from pipeline.methods import iso as iso_method
from pipeline.methods import ties as ties_method
from pipeline.store import ArtifactError, TensorReader, ZarrReader, check_tensor_name
from pipeline.subspace import (
    TaggedBasis,
    effective_rank,
    projected_coordinates,
    tagged_basis,
    tagged_coordinates,
)

log = logging.getLogger(__name__)


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
                    f"{reader.path}: tensor `{name}` has dtype {_dtype_name(reader.dtype(name))}, "
                    f"expected {_dtype_name(base.dtype(name))} as in {base.path}"
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
                    f"{reader.path}: Fisher tensor `{name}` has dtype {_dtype_name(reader.dtype(name))}, "
                    "expected a floating dtype"
                )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in `t` (numpy's check is ~30x faster than torch's on the CPU)."""
    if t.numel() == 0:
        return True
    if t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64, torch.float16):
        a = t.detach().numpy()
        if a.dtype != np.float16 and t.is_contiguous():
            # One read pass: a sum is finite only if every term is (NaN and ±inf propagate);
            # a finite tensor whose sum overflows takes the exact check below.
            with np.errstate(over="ignore", invalid="ignore"):
                if np.isfinite(np.add.reduce(a.reshape(-1))):
                    return True
        return bool(np.isfinite(a).all())
    return bool(torch.isfinite(t).all())


def _read_all(
    readers: Sequence[TensorReader],
    name: str,
    out: torch.Tensor,
    check: Callable[[TensorReader, torch.Tensor], None],
) -> None:
    """out[t] ← readers[t][name] for every t, in parallel, each checked by `check(reader, out[t])`."""

    def one(t: int) -> None:
        readers[t].read_into(name, out[t])
        check(readers[t], out[t])

    parallel.for_each(one, len(readers))


def _check_finite(reader: TensorReader, t: torch.Tensor, name: str) -> None:
    if not all_finite(t):
        raise ArtifactError(f"{reader.path}: tensor `{name}` contains NaN or Inf")


def read_deltas(
    inputs: MergeInputs, name: str, dtype: torch.dtype, buffers: BufferPool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """θ0[name] (original dtype) and the task vectors δ_t = θ_t − θ0 stacked [T, *shape] in `dtype`.

    The T tensors are read in parallel, each subtracted and checked on its read thread while
    it is in the cache. With `buffers`, the [T, *shape] result lives in a buffer reused by
    later calls (valid until the next read of the same size): no fresh pages to fault in for
    every tensor. A NaN or Inf in θ_t is reported with its file, and so is a difference that
    overflows `dtype`.
    """
    theta0 = inputs.pretrained.get(name)
    # One buffer for all tasks, filled in place: no per-task temporaries, no stacking copy.
    shape = (inputs.num_tasks, *theta0.shape)
    deltas = (
        buffers.get(shape, dtype, "deltas")
        if buffers is not None
        else torch.empty(shape, dtype=dtype)
    )
    base = theta0.to(dtype)

    def one(t: int) -> None:
        reader, out = inputs.finetuned[t], deltas[t]
        reader.read_into(name, out)
        _sub_in_place(out, base)
        # Checked after the subtraction, which carries a NaN or Inf of θ0 or θ_t into δ_t (so
        # θ0 needs no pass of its own); a non-finite δ_t of finite inputs is an overflow.
        if not all_finite(out):
            _check_finite(inputs.pretrained, theta0, name)
            _check_finite(reader, reader.get(name), name)
            raise ArtifactError(
                f"{reader.path}: tensor `{name}` minus θ0 overflows {_dtype_name(dtype)}; merge with --dtype float64"
            )

    parallel.for_each(one, len(inputs.finetuned))
    if not inputs.finetuned:
        _check_finite(inputs.pretrained, theta0, name)
    return theta0, deltas


def _sub_in_place(a: torch.Tensor, b: torch.Tensor) -> None:
    """a −= b. NumPy on the CPU: one thread per call, so T calls on the read threads run side
    by side instead of each starting the intra-op pool (read and subtract 1.0 → 0.7 s for the
    ViT-B/32 benchmark's eight tasks)."""
    if (
        a.device.type == "cpu"
        and a.dtype in (torch.float32, torch.float64)
        and a.is_contiguous()
        and b.is_contiguous()
    ):
        with np.errstate(all="ignore"):  # an overflow is reported by the caller's check
            np.subtract(a.numpy(), b.numpy(), out=a.numpy())
    else:
        a.sub_(b)


#: The bit pattern of +inf, read as an unsigned integer of the float's width.
_POS_INF_BITS = {torch.float32: 0x7F800000, torch.float64: 0x7FF0000000000000}


def read_fishers(
    inputs: MergeInputs, name: str, dtype: torch.dtype, buffers: BufferPool | None = None
) -> torch.Tensor:
    """Fisher diagonals of one tensor for every task, checked finite, non-negative and not
    all zero (an all-zero diagonal means an empty or failed Fisher run): [T, *shape].

    Read in parallel; with `buffers`, into a reused buffer (valid until the next call for a
    tensor of the same size)."""
    readers = inputs.fishers or ()
    shape = (len(readers), *inputs.pretrained.shape(name))
    out = (
        buffers.get(shape, dtype, "fishers")
        if buffers is not None
        else torch.empty(shape, dtype=dtype)
    )

    def check(reader: TensorReader, f: torch.Tensor) -> None:
        if not f.numel():
            return
        # In NumPy: this runs on a worker thread, where a torch op would start an OpenMP team of
        # its own (see `pipeline.parallel`).
        if (
            f.device.type == "cpu"
            and f.dtype in (torch.float32, torch.float64)
            and f.is_contiguous()
        ):
            # One read pass for the usual case: read as unsigned integers, finite non-negative
            # floats (sign bit clear, exponent not all ones) are exactly those below +inf's
            # pattern, and order like their values; so a maximum below it passes the first two
            # checks and is the largest entry. Anything else (NaN, inf, negatives, −0) takes
            # the exact min and max below, which also name the problem.
            u = f.numpy().reshape(-1).view(np.uint32 if f.dtype == torch.float32 else np.uint64)
            top = np.max(u)
            if top < _POS_INF_BITS[f.dtype]:
                if top == 0:
                    raise ArtifactError(
                        f"{reader.path}: Fisher tensor `{name}` is all zero (empty or failed Fisher run); re-compute it"
                    )
                return
        # Min and max settle all three checks: both are NaN when any entry is NaN.
        if f.device.type == "cpu" and f.dtype in (torch.float32, torch.float64, torch.float16):
            low, high = float(np.min(f.numpy())), float(np.max(f.numpy()))
        else:
            low, high = (float(v) for v in torch.aminmax(f))
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ArtifactError(f"{reader.path}: tensor `{name}` contains NaN or Inf")
        if low < 0:
            raise ArtifactError(
                f"{reader.path}: Fisher tensor `{name}` has negative entries ({low:.3g})"
            )
        if high == 0:
            raise ArtifactError(
                f"{reader.path}: Fisher tensor `{name}` is all zero (empty or failed Fisher run); re-compute it"
            )

    _read_all(readers, name, out, check)
    return out


class BufferPool:
    """Reusable CPU buffers keyed by element count and dtype.

    A merge reads about 2·T·(model size) bytes; a fresh [T, *shape] tensor per tensor name
    costs a page fault per 4 KiB (the allocator returns large blocks to the OS on free), which
    dominated the reading time. Tensors of equal size (c_fc and c_proj, conv1) share one buffer.
    """

    def __init__(self) -> None:
        self._free: dict[tuple[int, torch.dtype], torch.Tensor] = {}

    def get(self, shape: Sequence[int], dtype: torch.dtype, slot: str = "") -> torch.Tensor:
        """An uninitialised tensor of `shape`, overwriting what the last one of that size (and
        `slot`: buffers of different slots never share memory) held."""
        n = math.prod(shape)
        key = (slot, n, dtype)
        if key not in self._free:
            self._free[key] = torch.empty(n, dtype=dtype)
        return self._free[key].view(*shape)


# --------------------------------------------------------------------------- subspace sources


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


# --------------------------------------------------------------------------- the merge


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


class _Timer:
    def __init__(self, report: MergeReport, key: str) -> None:
        self.report, self.key = report, key

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.report.timings[self.key] += time.perf_counter() - self.start


def _global_task_stats(inputs: MergeInputs, method: str, s: MergeSettings) -> dict[str, Any]:
    """Statistics over all merged tensors of each task (one task in memory at a time)."""
    m = get_method(method)
    stats: dict[str, Any] = {}
    names = inputs.float_names()
    if m.streamed:  # the streamed pass is TIES's trimmed, sign-elected sums (ties.StreamedTies)
        stats["streamed"] = _ties_sums(inputs, names, s)
    if m.needs_fisher == "all" and s.fisher_normalise:
        norms = [
            sum(float(reader.get(n).double().square().sum()) for n in names) ** 0.5
            for reader in inputs.fishers or ()
        ]
        stats["fisher_norm"] = torch.tensor(norms, dtype=s.dtype).clamp_min(
            torch.finfo(s.dtype).tiny
        )
    return stats


def _ties_sums(inputs: MergeInputs, names: list[str], s: MergeSettings) -> ties_method.StreamedTies:
    """TIES over the flattened concatenation of `names`, every task streamed through once.

    θ0 is read once into a flat buffer. Each θ_t goes through `TrimmedSums.add_top`, which
    finds the task's threshold and adds its kept values in one pass, straight from a read-only
    map of its file where the reader has one in the merge dtype (safetensors); otherwise read
    into a second flat buffer first (the tensors of a task in parallel). Memory: θ0, the sums
    (two model-sized arrays and a byte per coordinate for each count), and the mapped or
    buffered task."""
    sizes = [math.prod(inputs.pretrained.shape(n)) for n in names]
    offsets = [0, *itertools.accumulate(sizes)]
    base = torch.empty(offsets[-1], dtype=s.dtype)
    buffer: list[torch.Tensor] = []  # the flat task buffer, allocated on first need
    want = torch.empty((), dtype=s.dtype).numpy().dtype

    def fill(reader: TensorReader, flat: torch.Tensor) -> torch.Tensor:
        def one(i: int) -> None:
            reader.read_into(
                names[i], flat[offsets[i] : offsets[i + 1]].view(inputs.pretrained.shape(names[i]))
            )

        parallel.for_each(one, len(names), parallel=reader.concurrent_reads)
        return flat

    def read(reader: TensorReader) -> torch.Tensor:
        if not buffer:
            buffer.append(torch.empty(offsets[-1], dtype=s.dtype))
        return fill(reader, buffer[0])

    def task(reader: TensorReader) -> ties_method.Source:
        views = [reader.mapped(n) for n in names]
        if all(v is not None and v.dtype == want for v in views):
            return list(zip(offsets, views))
        reader.unmap()
        return read(reader)

    def first_non_finite(reader: TensorReader, flat: torch.Tensor) -> None:
        for i, name in enumerate(names):
            if not all_finite(flat[offsets[i] : offsets[i + 1]]):
                raise ArtifactError(f"{reader.path}: tensor `{name}` contains NaN or Inf")

    fill(inputs.pretrained, base)
    first_non_finite(inputs.pretrained, base)  # tensor by tensor: no model-sized mask
    sums = ties_method.TrimmedSums(offsets[-1], s.dtype, inputs.num_tasks)
    thresholds: list[float] = []
    for t, reader in enumerate(inputs.finetuned):
        threshold = sums.add_top(task(reader), base, s.ties_density)
        reader.unmap()
        if threshold is None:  # the sampled bracket missed: exact threshold, sums rebuilt with it
            log.debug("TIES: threshold bracket of task %d missed; re-adding tasks 0..%d", t, t)
            threshold = ties_method.magnitude_threshold(
                read(reader).sub_(base).abs_(), s.ties_density
            )
            sums.reset()
            for r, known in [*zip(inputs.finetuned[:t], thresholds), (reader, threshold)]:
                sums.add(read(r), base, known)
        thresholds.append(threshold)
    if not sums.finish(s.ties_sign):  # a NaN or Inf went into the sums: name the tensor
        for reader in inputs.finetuned:
            first_non_finite(reader, read(reader))
        raise ArtifactError(
            f"the task vectors θ_t − θ0 overflow {_dtype_name(s.dtype)}; merge with --dtype float64"
        )
    return ties_method.StreamedTies(sums, dict(zip(names, zip(offsets, offsets[1:]))), base)


def check_settings(method: str, s: MergeSettings) -> None:
    m = get_method(method)
    if "alpha" in m.uses:
        if not math.isfinite(s.alpha):
            raise ValueError(f"alpha must be finite, got {s.alpha}")
        if not s.alpha > 0:
            raise ValueError(f"alpha must be > 0, got {s.alpha}")
        if s.alpha > torch.finfo(s.dtype).max:
            raise ValueError(
                f"alpha {s.alpha} is beyond the range of {_dtype_name(s.dtype)} (largest {torch.finfo(s.dtype).max:.4g})"
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
    m = get_method(method)
    settings = replace(settings, solver=effective_solver(settings.solver, settings.fisher_rank))
    per_alpha = [replace(settings, alpha=t.alpha) for t in targets]
    for s_a in per_alpha:
        check_settings(method, s_a)
    s = per_alpha[0]
    fisher_names = {"all": inputs.float_names(), "matrix": inputs.matrix_names(), "none": []}[
        m.needs_fisher
    ]
    check_inputs(inputs, fisher_names)
    with_curvature = m.curvature or (m.subspace and diagnostics and inputs.fishers is not None)
    if with_curvature:
        check_inputs(inputs, inputs.matrix_names())
    subspace = subspace or ComputedSubspace(s.k, s.eps, s.dtype, s.device, s.fisher_rank, s.solver)
    T = inputs.num_tasks
    lam = torch.full((T,), 1.0 / T, dtype=torch.float64)
    reports = [MergeReport(method, _settings_dict(method, s_a), T) for s_a in per_alpha]
    report = reports[0]  # holds the shared timings
    for other in reports[1:]:
        other.timings = report.timings
    buffers = BufferPool()

    with _Timer(report, "prepare"):
        stats = _global_task_stats(inputs, method, s)
    names = inputs.pretrained.keys()
    for name in tqdm(
        names, desc=f"merge {method}", unit="tensor", disable=not progress, leave=False
    ):
        shape, dtype0 = inputs.pretrained.shape(name), inputs.pretrained.dtype(name)
        in_subspace = (
            m.subspace and is_matrix_layer(shape, dtype0) and effective_rank(shape, s.k, T) >= 1
        )
        with _Timer(report, "read"):
            if m.streamed or (in_subspace and not subspace.needs_deltas(name, s.coords)):
                if m.streamed and name in stats["streamed"].ranges:  # θ0 (checked) is in memory
                    theta0 = stats["streamed"].theta0(name).view(shape).to(dtype0)
                else:
                    theta0 = _read_pretrained(inputs, name)
                deltas = torch.empty(
                    (T, *shape), dtype=s.dtype, device="meta"
                )  # shape only: never read
            else:
                theta0, deltas = read_deltas(inputs, name, s.dtype, buffers)
        if not is_floating(theta0.dtype):
            with _Timer(report, "write"):
                for t in targets:
                    t.write(name, theta0)  # integer buffers are not merged
            continue
        layer = LayerInputs(name=name, deltas=deltas, task_stats=stats)
        needs_fisher_here = m.needs_fisher == "all" or (
            is_matrix_layer(theta0.shape, theta0.dtype)
            and (m.needs_fisher == "matrix" or with_curvature)
        )
        if in_subspace and not subspace.needs_fishers(name):
            needs_fisher_here = m.needs_fisher == "all"  # the stored curvature replaces them
        if needs_fisher_here:
            with _Timer(report, "read"):
                layer.fishers = read_fishers(inputs, name, s.dtype, buffers)
        info: dict[str, Any] = {}
        if m.subspace and is_matrix_layer(theta0.shape, theta0.dtype):
            k_eff = effective_rank(theta0.shape, s.k, T)
            if k_eff < 1:
                log.warning(
                    "%s: shape %s is too small for %d tasks; merged as a vector tensor",
                    name,
                    list(theta0.shape),
                    T,
                )
            else:
                if k_eff < s.k:
                    log.warning(
                        "%s: k=%d clamped to k_l=%d (min(d_out, d_in)=%d over T=%d tasks)",
                        name,
                        s.k,
                        k_eff,
                        min(theta0.shape),
                        T,
                    )
                with _Timer(report, "basis"):
                    layer.basis = subspace.basis(name, deltas)
                    layer.coords = subspace.coordinates(name, layer.basis, deltas, s.coords)
                info.update(k=layer.basis.k, p=layer.basis.p)
                if with_curvature:
                    with _Timer(report, "hessian"):
                        layer.curvature = subspace.curvature(
                            name, layer.basis, layer.coords, s.coords, layer.fishers, deltas
                        )
        for t, s_a, report_a in zip(targets, per_alpha, reports):
            with _Timer(report, "solve"):
                result = m.merge_tensor(layer, s_a)
                if result.with_theta0:
                    merged = result.delta.cpu().to(theta0.dtype)
                else:  # θ0 + scale · delta in one fused step (one rounding; no scaled copy of the delta)
                    merged = torch.add(
                        theta0.to(s.dtype), result.delta.cpu(), alpha=result.scale
                    ).to(theta0.dtype)
                if result.coords is not None:
                    result.coords = result.coords.cpu()
            info_a = dict(info)
            if layer.curvature is not None and result.coords is not None:
                info_a.update(
                    _diagnostics(
                        layer.curvature,
                        layer.coords,
                        s.coords,
                        result.coords,
                        lam,
                        layer.basis,
                        s_a.alpha,
                        s.eps,
                    )
                )
                if layer.curvature.fisher_rank_error is not None:
                    info_a["fisher_rank_error"] = layer.curvature.fisher_rank_error
                if isinstance(layer.curvature.H, HessianOperator):
                    H = layer.curvature.H
                    info_a.update(
                        cg_iterations=H.iterations, cg_residual=H.residual, cg_fallback=H.fallback
                    )
            if info_a:
                report_a.layers[name] = info_a
            with _Timer(report, "write"):
                t.write(name, merged)
                if t.write_coords is not None and result.coords is not None:
                    t.write_coords(name, result.coords)
    return reports


def _read_pretrained(inputs: MergeInputs, name: str) -> torch.Tensor:
    """θ0[name] alone, checked finite (layers whose basis and curvature come from artifacts)."""
    theta0 = inputs.pretrained.get(name)
    if not all_finite(theta0):
        raise ArtifactError(f"{inputs.pretrained.path}: tensor `{name}` contains NaN or Inf")
    return theta0


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
    b = lam @ curv.Hx[mode]
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


def _settings_dict(method: str, s: MergeSettings) -> dict[str, Any]:
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
    if m.curvature and s.fisher_rank is not None:
        out["fisher_rank"] = s.fisher_rank
    if m.curvature and s.solver != "dense":
        out["solver"] = s.solver  # the dense default is recorded as before the option existed
    out["dtype"] = str(s.dtype).replace("torch.", "")
    return out


def iter_matrix_layers(
    inputs: MergeInputs, dtype: torch.dtype, progress: bool, desc: str
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, deltas [T, d_out, d_in]) for every matrix layer, read and checked one at a time.

    The yielded tensor is a reused buffer: it is overwritten by the next layer of its size.
    """
    buffers = BufferPool()
    for name in tqdm(
        inputs.matrix_names(), desc=desc, unit="layer", disable=not progress, leave=False
    ):
        _, deltas = read_deltas(inputs, name, dtype, buffers)
        yield name, deltas


# --------------------------------------------------------------------------- cached stages


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
        k_eff = effective_rank(deltas.shape[1:], k, T)
        if k_eff < 1:
            log.warning(
                "%s: shape %s is too small for %d tasks; no basis (merged as a vector tensor)",
                name,
                list(deltas.shape[1:]),
                T,
            )
            continue
        if k_eff < k:
            log.warning(
                "%s: k=%d clamped to k_l=%d (min(d_out, d_in)=%d over T=%d tasks)",
                name,
                k,
                k_eff,
                min(deltas.shape[1:]),
                T,
            )
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
        H = curv.H
        if isinstance(H, ImplicitHessian):
            T = inputs.num_tasks
            lam = torch.full((T,), 1.0 / T, dtype=torch.float64)  # as the merge forms b and δ̄
            terms = {
                mode: solved_terms(
                    H, lam @ curv.Hx[mode].to(torch.float64), lam @ modes[mode].to(torch.float64)
                )
                for mode in coords
            }
            if H.fallback:
                H = H.dense()  # formed after all: stored as the dense solver stores it
            else:
                for mode, values in terms.items():
                    for key, value in values.items():
                        writer.write(f"{key}_{mode}", value, group=name)
                writer.set_attrs(
                    {"cg_iterations": H.iterations, "cg_residual": H.residual}, group=name
                )
                counts["cg_layers"] += 1
                counts["cg_iterations"] = max(counts["cg_iterations"], int(H.iterations))
        counts["layers"] += 1
        if isinstance(H, torch.Tensor):
            counts["dense_layers"] += 1
            writer.write("H", H, group=name)
        for mode in coords:
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
    return counts
