"""The samples a Fisher estimate reads: the seeded ordering shared by all data fractions, the
number of batches per fraction, chunked delivery to the compute device, and the checks on
the inputs (fractions, tensors, datasets, labels)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

FisherResult = dict[float, dict[str, torch.Tensor]]
LabelledData = tuple[torch.Tensor, torch.Tensor] | Dataset
"""Samples with labels: ``(images [N, ...], labels [N])`` in memory, or a map-style Dataset of
``(image, label)`` items."""


def fisher_batches(n_samples: int, fraction: float, batch_size: int = 64) -> int:
    """Number of batches used for data fraction ``fraction``: ``max(1, ⌊fraction·N / B⌋)``.

    Args:
        n_samples: N, the size of the task's training split (≥ 1).
        fraction: f in (0, 1].
        batch_size: B (≥ 1).

    Returns:
        The number of batches; ``min(N, batches·B)`` samples are used (a single batch is
        shorter than B only when N < B).
    """
    check_positive_int("n_samples", n_samples)
    check_positive_int("batch_size", batch_size)
    _check_fraction(fraction)
    # Rounded to 9 decimals before the floor so that e.g. 0.29·6400/64, which is
    # 28.999999999999996 in binary floating point, counts as the 29 batches it means.
    return max(1, math.floor(round(float(fraction) * n_samples / batch_size, 9)))


def sample_order(n_samples: int, seed: int) -> torch.Tensor:
    """The seeded permutation of the training samples shared by all data fractions.

    Args:
        n_samples: N (≥ 1).
        seed: seed of a fresh CPU ``torch.Generator``; the global RNG is not touched.

    Returns:
        ``[N]`` int64 permutation of ``0..N-1``; a fraction uses a prefix of it.
    """
    check_positive_int("n_samples", n_samples)
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed)
    return torch.randperm(int(n_samples), generator=generator)


def iter_batches(
    data: LabelledData,
    index_chunks: Sequence[Sequence[int]],
    device: torch.device,
    *,
    num_workers: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(images [c, ...], labels [c] int64)`` on ``device`` for each chunk of indices.

    Args:
        data: ``(images [N, ...], labels [N])`` tensors (gathered by indexing, no workers), or a
            map-style ``torch.utils.data.Dataset`` of ``(image, label)`` items (read through a
            ``DataLoader`` with ``num_workers`` worker processes, pinned memory on CUDA).
        index_chunks: the sample indices of each chunk, in order.
        device: where the chunks go.
        num_workers: DataLoader workers (Datasets only; 0 reads in this process).

    Images keep their dtype (the caller casts); labels become int64.
    """
    non_blocking = device.type == "cuda"
    if isinstance(data, tuple):
        images, labels = data
        for idx in index_chunks:
            idx = torch.as_tensor(idx, dtype=torch.int64)
            x, y = images[idx], labels[idx]
            if non_blocking:
                x, y = x.pin_memory(), y.pin_memory()
            yield x.to(device, non_blocking=non_blocking), y.to(device, torch.int64, non_blocking)
        return
    loader = DataLoader(
        data, batch_sampler=[list(map(int, idx)) for idx in index_chunks],
        num_workers=num_workers, pin_memory=non_blocking,
    )  # fmt: skip
    for batch in loader:
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise ValueError(
                "dataset items must be (image, label) pairs; the collated batch is a "
                f"{type(batch).__name__}"
            )
        x, y = batch
        if not isinstance(y, torch.Tensor):
            y = torch.as_tensor(y)
        if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
            raise ValueError(f"dataset labels must be integer class indices, got dtype {y.dtype}")
        yield x.to(device, non_blocking=non_blocking), y.to(device, torch.int64, non_blocking)


def per_fraction(
    fractions: Sequence[float],
    n_used: dict[float, int],
    snapshots: dict[int, dict[str, torch.Tensor]],
) -> FisherResult:
    """``{fraction: estimate}`` from the estimates taken after each prefix of the ordering
    (``snapshots``, keyed by its number of samples; ``n_used``: samples per fraction)."""
    result: FisherResult = {}
    for f in fractions:
        snapshot = snapshots[n_used[f]]
        # Fractions that round to the same prefix must not share tensor objects.
        shared = any(n_used[g] == n_used[f] for g in result)
        result[f] = {n: v.clone() for n, v in snapshot.items()} if shared else snapshot
    return result


def check_positive_int(what: str, value: Any) -> None:
    """Raise ValueError naming `what` unless `value` is an integer ≥ 1 (bool is not)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")


def _check_fraction(fraction: Any) -> None:
    is_number = isinstance(fraction, numbers.Real) and not isinstance(fraction, bool)
    if not is_number or not 0 < fraction <= 1:
        raise ValueError(f"data fraction must be a number in (0, 1], got {fraction!r}")


def check_fractions(fractions: Sequence[float]) -> list[float]:
    if isinstance(fractions, numbers.Real):
        raise ValueError(
            f"fractions must be a sequence of numbers in (0, 1], got the number {fractions!r}"
        )
    fractions = list(fractions)
    if not fractions:
        raise ValueError("fractions is empty: give at least one data fraction in (0, 1]")
    for f in fractions:
        _check_fraction(f)
    return [float(f) for f in dict.fromkeys(fractions)]


def check_data(images: torch.Tensor, labels: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() < 1 or images.shape[0] == 0:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(
            f"images is empty (shape {shape}): the task needs at least one training sample"
        )
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1:
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels must be a 1-D tensor [N], got shape {shape}")
    if labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"labels has {labels.shape[0]} entries but images has {images.shape[0]} samples; they "
            "must be the same split in the same order"
        )
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer class indices (int64), got dtype {labels.dtype}")
    if labels.min().item() < 0:
        raise ValueError(f"labels must be class indices ≥ 0, got {labels.min().item()}")


def _check_length(dataset: Dataset) -> int:
    try:
        n = len(dataset)  # type: ignore[arg-type]
    except TypeError as err:
        raise ValueError(
            f"dataset {type(dataset).__name__} has no len(): a map-style Dataset is needed"
        ) from err
    if n == 0:
        raise ValueError("dataset is empty: the task needs at least one training sample")
    return n


def check_labels(labels: torch.Tensor, n_classes: int) -> None:
    """A chunk's labels [c] must be class indices in [0, C)."""
    low, high = labels.min().item(), labels.max().item()
    if low < 0:
        raise ValueError(f"labels must be class indices ≥ 0, got {low}")
    if high >= n_classes:
        raise ValueError(f"label {high} is out of range for the head's {n_classes} classes")


def check_dataset(dataset: Any, num_workers: Any, in_memory: str) -> None:
    """The Dataset entry points' checks: a sized map-style Dataset and a worker count ≥ 0;
    ``in_memory`` names the function to call with tensors instead."""
    if not isinstance(dataset, Dataset):
        raise ValueError(
            f"dataset must be a torch.utils.data.Dataset, got {type(dataset).__name__}; for "
            f"in-memory tensors use {in_memory}(model, images, labels, ...)"
        )
    _check_length(dataset)
    if (
        isinstance(num_workers, bool)
        or not isinstance(num_workers, numbers.Integral)
        or num_workers < 0
    ):
        raise ValueError(f"num_workers must be an integer ≥ 0, got {num_workers!r}")
