"""Top-1 accuracy of an encoder with each task's own frozen head.

Test data is either held in memory (``(images [N, ...], labels [N])``) or streamed from a
map-style ``Dataset`` of ``(image, label)`` items through a ``DataLoader`` (worker processes,
pinned memory on CUDA); both are read in index order, in batches, on the chosen device, in
float32 or under bfloat16 autocast.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from pipeline.devices import resolve_device
from pipeline.fisher import LabelledData, iter_batches
from pipeline.fisher.data import check_positive_int
from pipeline.models.backbone import ImageClassifier

log = logging.getLogger(__name__)

# Compute dtypes: float32 runs as is, the half precisions under torch.autocast.
_MIXED = (torch.bfloat16, torch.float16)


@torch.no_grad()
def top1_correct(
    model: nn.Module,
    data: LabelledData,
    batch_size: int = 256,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    num_workers: int = 0,
    progress: bool = False,
    name: str = "data",
) -> torch.Tensor:
    """Whether each sample's arg-max logit equals its label: a bool tensor [N] on the CPU, in
    the data's order.

    Args:
        model: maps images [B, ...] to logits [B, C]; moved to ``device`` (in place, as
            ``nn.Module.to`` does) and put in eval mode.
        data: ``(images [N, ...], labels [N])`` or a Dataset of ``(image, label)`` items.
        batch_size: samples per forward pass.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or ``"auto"``.
        dtype: float32, or bfloat16 / float16 for autocast forward passes.
        num_workers: DataLoader workers (Datasets only).
        progress: tqdm bar (images/s) on stderr.
        name: what the data is, for messages (e.g. the task).
    """
    check_positive_int("batch_size", batch_size)
    if dtype != torch.float32 and dtype not in _MIXED:
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    device = resolve_device(device)
    n = _length(data, name)
    model = model.to(device).eval()
    chunks = [range(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    precision = (
        torch.autocast(device.type, dtype=dtype) if dtype in _MIXED else contextlib.nullcontext()
    )
    correct = []  # [b] bool per batch, kept on the device until the end
    bar = tqdm(
        total=n, desc=f"evaluate {name}", unit="image", file=sys.stderr, disable=not progress
    )
    with bar, precision:
        for x, y in iter_batches(data, chunks, device, num_workers=num_workers):
            logits = model(x.float() if x.is_floating_point() else x)  # [b, C]
            _check_batch_labels(y, logits.shape[-1], name)
            correct.append(logits.argmax(dim=-1) == y)
            bar.update(len(y))
    return torch.cat(correct).cpu()


def top1_accuracy(
    model: nn.Module,
    data: LabelledData,
    batch_size: int = 256,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    num_workers: int = 0,
    progress: bool = False,
    name: str = "data",
) -> tuple[float, int]:
    """Fraction of samples whose arg-max logit equals their label, and the number of samples
    (arguments as for :func:`top1_correct`).

    Returns:
        (accuracy in [0, 1], N).
    """
    correct = top1_correct(
        model, data, batch_size, device=device, dtype=dtype, num_workers=num_workers,
        progress=progress, name=name,
    )  # fmt: skip
    return int(correct.sum()) / len(correct), len(correct)


def evaluate_tasks(
    encoder: nn.Module,
    heads: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    datasets: Mapping[str, LabelledData],
    batch_size: int = 256,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    num_workers: int = 0,
    progress: bool = False,
    split: str = "test",
) -> list[dict[str, Any]]:
    """One row per task, in the order of ``datasets``: ``{task, split, accuracy, n, correct}``,
    ``correct`` the per-image correctness (bool tensor [n], in the data's order) from which
    paired standard errors between two checkpoints follow.

    Args:
        encoder: images [B, 3, H, W] -> embeddings [B, D]; moved to ``device``.
        heads: task -> (weight [C, D], bias [C]) of its frozen classifier.
        datasets: task -> ``(images [N, ...], labels [N])`` or a Dataset of (image, label).
        batch_size, device, dtype, num_workers, progress: as for :func:`top1_correct`.
        split: the name of the split the datasets hold (test, val), for the rows and the log.
    """
    rows = []
    for task, data in datasets.items():
        if task not in heads:
            raise ValueError(f"task `{task}` has test data but no head; give one head per task")
        weight, bias = heads[task]
        model = ImageClassifier(encoder, weight, bias)
        correct = top1_correct(
            model, data, batch_size, device=device, dtype=dtype, num_workers=num_workers,
            progress=progress, name=f"task `{task}`",
        )  # fmt: skip
        n = len(correct)
        acc = int(correct.sum()) / n
        log.info("%s (%s): top-1 %.4f on %d images", task, split, acc, n)
        rows.append({"task": task, "split": split, "accuracy": acc, "n": n, "correct": correct})
    return rows


def pack_correct(correct: torch.Tensor | Sequence[bool]) -> str:
    """Per-image correctness [N] as text: base64 (standard alphabet) of numpy.packbits of the
    bool vector (bit order "big", the last byte padded with zeros). `unpack_correct` inverts it."""
    import base64

    import numpy as np

    bits = np.asarray(correct.numpy() if isinstance(correct, torch.Tensor) else correct, dtype=bool)
    return base64.b64encode(np.packbits(bits)).decode("ascii")


def unpack_correct(text: str, n: int) -> torch.Tensor:
    """The bool vector [n] that `pack_correct` wrote as `text`."""
    import base64

    import numpy as np

    bits = np.unpackbits(np.frombuffer(base64.b64decode(text, validate=True), dtype=np.uint8))
    if len(bits) < n or len(bits) - n >= 8:
        raise ValueError(f"packed correctness of {len(bits) // 8} bytes does not hold {n} images")
    return torch.from_numpy(bits[:n].astype(bool))


def check_sequence(name: str, values: Sequence[Any], expected: int) -> None:
    if len(values) != expected:
        raise ValueError(
            f"got {len(values)} {name} for {expected} tasks; give one per task, in order"
        )


def _length(data: LabelledData, name: str) -> int:
    """N of the data, after checking its form; ValueError naming ``name`` when empty."""
    if isinstance(data, tuple):
        if len(data) != 2 or not all(isinstance(t, torch.Tensor) for t in data):
            raise ValueError(f"{name}: expected (images [N, ...], labels [N]) tensors")
        images, labels = data
        if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(
                f"{name}: labels {tuple(labels.shape)} must be [N] for images {tuple(images.shape)}"
            )
        n = images.shape[0]
    elif isinstance(data, Dataset):
        try:
            n = len(data)  # type: ignore[arg-type]
        except TypeError as err:
            raise ValueError(f"{name}: {type(data).__name__} has no len()") from err
    else:
        raise ValueError(
            f"{name}: expected (images, labels) tensors or a Dataset, got {type(data).__name__}"
        )
    if n == 0:
        raise ValueError(f"{name}: no samples to evaluate")
    return n


def _check_batch_labels(labels: torch.Tensor, n_classes: int, name: str) -> None:
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= n_classes:
        bad = low if low < 0 else high
        raise ValueError(f"{name}: label {bad} is outside its head's {n_classes} classes")
