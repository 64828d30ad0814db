"""Parallel, checked reads of one tensor from every input: θ0 and the task vectors, the Fisher
diagonals, and the reusable buffers they are read into."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from pipeline import parallel
from pipeline.merge.inputs import MergeInputs, dtype_name
from pipeline.store import ArtifactError, TensorReader


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
                f"{reader.path}: tensor `{name}` minus θ0 overflows {dtype_name(dtype)}; merge with --dtype float64"
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


def read_pretrained(inputs: MergeInputs, name: str) -> torch.Tensor:
    """θ0[name] alone, checked finite (layers whose basis and curvature come from artifacts)."""
    theta0 = inputs.pretrained.get(name)
    _check_finite(inputs.pretrained, theta0, name)
    return theta0


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
