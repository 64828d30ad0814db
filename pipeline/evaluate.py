"""Top-1 accuracy of an encoder with each task's own frozen head."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from pipeline.models.backbone import ImageClassifier

log = logging.getLogger(__name__)


@torch.no_grad()
def top1_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> float:
    """Fraction of `images` [N, ...] whose arg-max logit equals `labels` [N]."""
    model.eval()
    correct = 0
    for start in range(0, len(images), batch_size):
        logits = model(images[start : start + batch_size])
        correct += int((logits.argmax(dim=-1) == labels[start : start + batch_size]).sum())
    return correct / max(1, len(images))


def evaluate_tasks(
    encoder: nn.Module,
    heads: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    datasets: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    batch_size: int = 256,
) -> list[dict[str, Any]]:
    """One row per task: {task, accuracy, n}. heads: task → (weight [C, D], bias [C])."""
    rows = []
    for task, (images, labels) in datasets.items():
        weight, bias = heads[task]
        if int(labels.max()) >= weight.shape[0]:
            raise ValueError(
                f"task `{task}`: labels go up to {int(labels.max())} but its head has {weight.shape[0]} classes"
            )
        acc = top1_accuracy(ImageClassifier(encoder, weight, bias), images, labels, batch_size)
        log.info("%s: top-1 %.4f on %d images", task, acc, len(labels))
        rows.append({"task": task, "accuracy": acc, "n": len(labels)})
    return rows


def check_sequence(name: str, values: Sequence[Any], expected: int) -> None:
    if len(values) != expected:
        raise ValueError(f"got {len(values)} {name} for {expected} tasks; give one per task, in order")
