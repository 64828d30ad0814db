"""The empirical Fisher diagonal (paper eq. 27) from per-sample gradients: the public entry
points, the driver that runs the chunks of every data fraction in one pass, and the one-time
self-check of the traced method against plain single-sample backwards."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from pipeline.fisher.data import (
    FisherResult,
    LabelledData,
    check_data,
    check_dataset,
    check_labels,
    iter_batches,
    per_fraction,
    sample_order,
)
from pipeline.fisher.gradients import loop_chunk, single_sample_grads, traced_chunk, vmap_chunk
from pipeline.fisher.model import check_logits, evaluation, functional_tensors, no_tf32, setup
from pipeline.fisher.tracer import Unsupported, Workspace

logger = logging.getLogger(__name__)

Strategy = Literal["auto", "traced", "vmap", "loop"]


def empirical_fisher(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    fractions: Sequence[float],
    *,
    param_names: Sequence[str] | None = None,
    batch_size: int = 64,
    chunk_size: int = 8,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> dict[float, dict[str, torch.Tensor]]:
    """Empirical Fisher diagonal ``(1/N) Σ_n g_n²`` for several data fractions in one pass.

    g_n is the gradient of sample n's cross-entropy (true label) w.r.t. the parameters in
    ``param_names``, computed chunk by chunk by the traced method, or by vmap where the model
    needs it (see the `pipeline.fisher` docstring). Deterministic on CPU for a fixed thread count.

    Args:
        model: maps images ``[B, ...]`` to logits ``[B, C]`` (encoder + frozen head; keep the
            head in buffers or leave it out of ``param_names``). Put in eval mode for the
            computation (its previous train/eval flags are restored); its tensors are not
            modified: copies on ``device`` are passed through ``torch.func.functional_call``.
        images: ``[N, ...]`` the task's preprocessed training inputs.
        labels: ``[N]`` integer class indices (the true labels).
        fractions: data fractions, each in (0, 1]; fraction f uses the first
            ``min(N, fisher_batches(N, f, batch_size)·batch_size)`` samples of
            ``sample_order(N, seed)``.
        param_names: parameters to differentiate; default every parameter with
            ``requires_grad``.
        batch_size: B of the fraction rule.
        chunk_size: samples per vectorised per-sample-gradient chunk. Memory: the traced
            method holds the activations of one chunk and one layer's per-sample gradients
            (chunk × the largest tensor) at a time, plus O(2·|θ|) for the first chunk's
            self-check; the vmap fallback O(chunk·|θ|).
        seed: seed of the sample ordering.
        device: where the computation runs: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, or ``"auto"``
            (CUDA when available).
        dtype: float32 or float64: the model's tensors and inputs are cast to it; bfloat16 or
            float16: mixed precision (``torch.autocast``: float32 tensors, matrix products
            and the per-sample gradients in the low precision; a vmap fallback runs in
            float32). Squares and sums are float32.
        progress: show a tqdm bar (samples/s) on stderr.

    Returns:
        ``{fraction: {name: Fisher diagonal}}`` in the order given (repeats dropped), each
        tensor float32 on the CPU with the parameter's shape.
    """
    return _in_memory(
        model, images, labels, fractions, "auto", param_names=param_names,
        batch_size=batch_size, chunk_size=chunk_size, seed=seed, device=device, dtype=dtype,
        progress=progress,
    )  # fmt: skip


def empirical_fisher_dataset(
    model: torch.nn.Module,
    dataset: Dataset,
    fractions: Sequence[float],
    *,
    param_names: Sequence[str] | None = None,
    batch_size: int = 64,
    chunk_size: int = 8,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    num_workers: int = 0,
    progress: bool = True,
) -> dict[float, dict[str, torch.Tensor]]:
    """:func:`empirical_fisher` streamed from a Dataset of ``(image [3, H, W], label)`` items.

    The same ordering and fractions: item ``i`` of the dataset plays the part of
    ``images[i]``, so for a dataset holding the same samples the result is the same. Only
    the ``n_max`` items the largest fraction needs are read, each once, chunk by chunk
    through a ``DataLoader`` (``num_workers`` worker processes; pinned memory on CUDA).

    Args:
        model, fractions, param_names, batch_size, chunk_size, seed, device, dtype, progress:
            as for :func:`empirical_fisher`.
        dataset: a map-style Dataset with ``len()``; items ``(image tensor, int label)``, e.g.
            from ``pipeline.data.open_dataset`` or a ``TensorDataset``.
        num_workers: DataLoader workers decoding images in parallel (0: in this process).

    Returns:
        ``{fraction: {name: Fisher diagonal}}``, float32 on the CPU.
    """
    check_dataset(dataset, num_workers, "empirical_fisher")
    return _empirical_fisher(
        model, dataset, fractions, param_names=param_names, batch_size=batch_size,
        chunk_size=chunk_size, seed=seed, device=device, dtype=dtype, num_workers=num_workers,
        progress=progress, strategy="auto",
    )  # fmt: skip


def empirical_fisher_loop(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    fractions: Sequence[float],
    **options: Any,
) -> dict[float, dict[str, torch.Tensor]]:
    """Reference for :func:`empirical_fisher`: one backward pass per sample in a Python loop.

    Same arguments (the keyword ``options`` of :func:`empirical_fisher`) and result
    (``chunk_size`` only groups samples between progress updates). Slow; for tests and
    benchmarks only.
    """
    return _in_memory(model, images, labels, fractions, "loop", **options)


def _in_memory(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    fractions: Sequence[float],
    strategy: Strategy,
    **options: Any,
) -> FisherResult:
    """The entry points on tensors in memory: ``images`` and ``labels`` checked, then the driver
    with ``strategy`` and the keyword ``options`` of :func:`empirical_fisher`."""
    check_data(images, labels)
    return _empirical_fisher(
        model, (images, labels), fractions, num_workers=0, strategy=strategy, **options
    )


def _empirical_fisher(
    model: torch.nn.Module,
    data: LabelledData,
    fractions: Sequence[float],
    *,
    param_names: Sequence[str] | None = None,
    batch_size: int = 64,
    chunk_size: int = 8,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    num_workers: int = 0,
    progress: bool = True,
    strategy: Strategy = "auto",
) -> FisherResult:
    """Shared driver of the public functions, with their defaults. ``data``: ``(images,
    labels)`` (checked) or a Dataset. ``strategy``: "auto" (traced, falling back to vmap), or one method forced:
    "traced" (raises ``Unsupported`` instead), "vmap", "loop"."""
    fractions, device, names, mixed, tensor_dtype, n_total, n_used = setup(
        model, data, fractions, param_names, batch_size, chunk_size, device, dtype
    )
    ends = sorted(set(n_used.values()))  # prefix boundaries
    order = sample_order(n_total, seed)[: ends[-1]].tolist()
    # Chunks never straddle a prefix boundary, so every fraction ends on a chunk boundary.
    chunks, start = [], 0
    for end in ends:
        chunks += [order[s : min(s + chunk_size, end)] for s in range(start, end, chunk_size)]
        start = end
    logger.info(
        "Empirical Fisher of %d tensors, %d of %d samples (fractions %s; %s, chunks of %d, %s %s)",
        len(names), ends[-1], n_total, ", ".join(f"{f:g}" for f in fractions), strategy,
        chunk_size, device, str(dtype).removeprefix("torch."),
    )  # fmt: skip

    snapshots: dict[int, dict[str, torch.Tensor]] = {}
    precision = torch.autocast(device.type, dtype=dtype) if mixed else no_tf32()
    with evaluation(model), torch.enable_grad():
        params, others = functional_tensors(model, names, device, tensor_dtype)
        accumulator = _Accumulator(model, params, others, strategy)
        bar = tqdm(
            total=ends[-1], desc="Fisher", unit="sample", file=sys.stderr, disable=not progress
        )
        done, n_classes = 0, 0
        batches = iter_batches(data, chunks, device, num_workers=num_workers)
        with bar, precision:
            for x, y in batches:
                x = x.to(tensor_dtype) if x.is_floating_point() else x
                if done == 0:
                    n_classes = check_logits(model, params, others, x[:1])
                check_labels(y, n_classes)
                accumulator.add(x, y, start=done)
                done += len(y)
                bar.update(len(y))
                if done in ends:
                    snapshots[done] = {n: (s / done).cpu() for n, s in accumulator.sums.items()}

    return per_fraction(fractions, n_used, snapshots)


class _Accumulator:
    """Running Σ_n g_n² (float32, on the compute device) over the chunks fed to ``add``."""

    def __init__(
        self,
        model: torch.nn.Module,
        params: dict[str, torch.Tensor],
        others: dict[str, torch.Tensor],
        strategy: Strategy,
    ) -> None:
        self.model, self.params, self.others = model, params, others
        self.strategy = strategy
        self.method = "traced" if strategy == "auto" else strategy
        self.sums = {
            n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in params.items()
        }
        # Reused per-sample weight-gradient buffer (squared in place once consumed).
        self.workspace = Workspace()

    def add(self, x: torch.Tensor, y: torch.Tensor, start: int) -> None:
        """Add the chunk x [c, ...], y [c] (samples start .. start + c of the ordering)."""
        args = (self.model, self.params, self.others, x, y)
        if self.method == "loop":
            loop_chunk(*args, self.sums)
        elif self.method == "vmap":
            vmap_chunk(*args, self.sums)
        elif start == 0:
            self._first_traced(x, y)
        else:
            try:
                traced_chunk(*args, self.sums, self.workspace)
            except Unsupported as err:  # raised before anything was accumulated
                if self.strategy == "traced":
                    raise
                logger.warning("Tracing failed at sample %d (%s); using vmap", start, err)
                self.method = "vmap"
                vmap_chunk(*args, self.sums)

    def _first_traced(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Traced first chunk, checked against plain single-sample backwards of its first and
        last samples before it is added; on failure vmap (or raise for strategy "traced")."""
        args = (self.model, self.params, self.others, x, y)
        keep = sorted({0, x.shape[0] - 1})
        chunk_sums = {n: torch.zeros_like(s) for n, s in self.sums.items()}
        try:
            kept = traced_chunk(*args, chunk_sums, self.workspace, keep=keep)
            _self_check(*args, keep, kept)
        except Unsupported as err:
            if self.strategy == "traced":
                raise
            logger.warning("Per-sample gradients by tracing not possible (%s); using vmap", err)
            self.method = "vmap"
            vmap_chunk(*args, self.sums)
            return
        for name, s in chunk_sums.items():
            self.sums[name] += s


def _self_check(
    model: torch.nn.Module,
    params: dict[str, torch.Tensor],
    others: dict[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    keep: list[int],
    kept: dict[str, torch.Tensor],
) -> None:
    """Compare traced per-sample gradients ``kept[name][j]`` of samples ``keep[j]`` with a plain
    single-sample backward; raise ``Unsupported`` on a mismatch.

    Guards against a parameter use the tracer saw but misread (e.g. a layer whose input is not
    batch-first) or did not see at all.
    """
    low_precision = (torch.float16, torch.bfloat16)
    half = x.dtype in low_precision or any(p.dtype in low_precision for p in params.values())
    half = half or torch.is_autocast_enabled(x.device.type)
    tol = 5e-2 if half else 1e-3
    for j, i in enumerate(keep):
        reference = single_sample_grads(model, params, others, x[i : i + 1], y[i : i + 1])
        for name, ref in reference.items():
            got = kept[name][j]
            scale = max(ref.abs().max().item(), got.abs().max().item())
            err = (got.float() - ref.float()).abs().max().item()
            if err > tol * scale:
                raise Unsupported(
                    f"self-check failed for `{name}` on sample {i} of the first chunk: max error "
                    f"{err:.3g} vs gradient scale {scale:.3g}"
                )
