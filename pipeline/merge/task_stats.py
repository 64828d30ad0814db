"""Statistics over every merged tensor of each task, gathered before the tensor-by-tensor pass:
TIES's trimmed, sign-elected sums (one streamed pass per task) and the Fisher norms of
normalised Fisher merging."""

from __future__ import annotations

import itertools
import logging
import math
from typing import Any

import torch

from pipeline import parallel
from pipeline.merge.inputs import MergeInputs, dtype_name
from pipeline.merge.reading import all_finite
from pipeline.methods import MergeSettings, get_method
from pipeline.methods import ties as ties_method
from pipeline.store import ArtifactError, TensorReader

log = logging.getLogger("pipeline.merge")


def global_task_stats(inputs: MergeInputs, method: str, s: MergeSettings) -> dict[str, Any]:
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
    (two model-sized arrays and a byte per coordinate for each count), and the buffered task,
    or the steps in flight of a mapped one (the pass drops the pages it is done with)."""
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
            f"the task vectors θ_t − θ0 overflow {dtype_name(s.dtype)}; merge with --dtype float64"
        )
    return ties_method.StreamedTies(sums, dict(zip(names, zip(offsets, offsets[1:]))), base)
