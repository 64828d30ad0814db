"""Training for the demo benchmark: θ0, zero-shot-style heads, and per-task fine-tuning.

This is the task-vectors recipe (Ilharco et al., 2023) at demo scale:

1. :func:`pretrain` trains the encoder from scratch on the generic task, giving θ0
   (the stand-in for CLIP's pretrained visual tower).
2. :func:`fit_head` fits one linear head per task on θ0's frozen, normalised
   features (the stand-in for CLIP's zero-shot text head), rows scaled to a fixed
   logit scale as CLIP's are.
3. :func:`finetune` fine-tunes the whole encoder on one task with that head frozen
   (AdamW, warmup + cosine schedule), giving θ_t.
4. :func:`accuracy` is top-1 accuracy of an encoder with a head.

All functions take and return tensors (no disk I/O), never modify the encoder they
are given (they train a copy), run on the device the encoder is on, and are
deterministic for a given seed on CPU. They do not set the number of threads: the
caller (one demo job per core) calls ``torch.set_num_threads(1)``.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.data.synthetic import decode_attributes as decode_mixed_radix
from pipeline.models.backbone import ImageClassifier

__all__ = [
    "accuracy",
    "attribute_prototypes",
    "decode_mixed_radix",
    "finetune",
    "fit_head",
    "pretrain",
    "state_digest",
    "zeroshot_head",
]

log = logging.getLogger(__name__)

DEFAULT_LOGIT_SCALE = 50.0
"""Norm of each row of a linear-probe head (:func:`fit_head`). Features are unit vectors,
so logits lie in [-s, s] + bias, as with CLIP's logit scale (100)."""

PRETRAIN_LOGIT_SCALE = 20.0
"""The temperature θ0 is pretrained with: the scale of the normalised features against the
pretraining head or prototypes. A zero-shot head (:func:`zeroshot_head`) carries it, as
CLIP's zero-shot classifiers carry the logit scale CLIP learned in pretraining. On the demo
it also gives task vectors that disturb the other tasks less than a hotter head does
(docs/demo.md, "Design")."""


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #
def _device_of(module: nn.Module) -> torch.device:
    """The device of the module's first parameter (CPU for a parameter-free module)."""
    return next(module.parameters(), torch.empty(0)).device


def _check_data(images: Tensor, labels: Tensor, num_classes: int | None = None) -> None:
    """Raise ValueError unless images [N, 3, H, W] and labels [N] int64 in [0, C) agree."""
    if images.ndim != 4:
        raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"labels must be [N] with N = {images.shape[0]} (the number of images), "
            f"got shape {tuple(labels.shape)}"
        )
    if images.shape[0] == 0:
        raise ValueError("no images given")
    if labels.dtype != torch.int64:
        raise ValueError(f"labels must be int64 class indices, got {labels.dtype}")
    if num_classes is not None and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got range "
            f"[{int(labels.min())}, {int(labels.max())}]"
        )


def _check_positive(**settings: float) -> None:
    """Raise ValueError naming the first setting that is not > 0."""
    for name, value in settings.items():
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")


def _check_head(encoder: nn.Module, images: Tensor, weight: Tensor, bias: Tensor) -> None:
    """Raise ValueError unless weight is [C, D] with D the encoder's embedding size, bias [C]."""
    dim = _features(encoder, images[:1]).shape[1]
    if weight.ndim != 2 or weight.shape[1] != dim or bias.shape != weight.shape[:1]:
        raise ValueError(
            f"head must be weight [C, {dim}] and bias [C] for this encoder's {dim}-d "
            f"embeddings, got weight {tuple(weight.shape)} and bias {tuple(bias.shape)}"
        )


def _shuffled_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Index tensors of one epoch in a random order; the last batch may be shorter."""
    order = torch.randperm(n, generator=generator)
    yield from order.split(batch_size)


def _warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Learning-rate multiplier: linear warmup to 1, then cosine decay to 0 at total_steps."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _encoder_state(encoder: nn.Module) -> dict[str, Tensor]:
    """A detached CPU copy of the encoder's state dict."""
    return {name: t.detach().to("cpu", copy=True) for name, t in encoder.state_dict().items()}


def _train_loop(
    model: nn.Module,
    params: list[nn.Parameter],
    images: Tensor,
    labels: Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    weight_decay: float,
    warmup_fraction: float,
    seed: int,
    what: str,
    max_grad_norm: float | None = None,
    loss_fn: Callable[[Tensor, Tensor], tuple[Tensor, int]] | None = None,
    max_steps: int | None = None,
) -> None:
    """Minimise ``loss_fn`` (cross-entropy by default) of ``model(images)`` over ``params``
    with AdamW + warmup-cosine; ``max_grad_norm`` clips the global gradient norm per step.
    ``max_steps`` stops after that many optimiser steps, with the schedule of the full run,
    so the parameters equal the full run's after as many steps."""
    loss_fn = loss_fn or _cross_entropy
    device = _device_of(model)
    n = images.shape[0]
    steps_per_epoch = math.ceil(n / batch_size)
    total_steps = epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _warmup_cosine(total_steps, max(1, round(warmup_fraction * total_steps)))
    )
    shuffle = torch.Generator().manual_seed(seed)
    model.train()
    start = time.perf_counter()
    step = 0
    for epoch in range(epochs):
        loss_sum, correct = 0.0, 0
        for index in _shuffled_batches(n, batch_size, shuffle):
            if max_steps is not None and step >= max_steps:
                return
            step += 1
            x, y = images[index].to(device), labels[index].to(device)
            logits = model(x)  # [B, C]
            loss, batch_correct = loss_fn(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            schedule.step()
            loss_sum += loss.item() * y.shape[0]
            correct += batch_correct
        log.info(
            "%s epoch %d/%d: loss %.4f, train acc %.3f, lr %.2e, %.1fs",
            what,
            epoch + 1,
            epochs,
            loss_sum / n,
            correct / n,
            schedule.get_last_lr()[0],
            time.perf_counter() - start,
        )


def _cross_entropy(logits: Tensor, labels: Tensor) -> tuple[Tensor, int]:
    """Mean cross-entropy of logits [B, C] against labels [B], and the number of hits."""
    return F.cross_entropy(logits, labels), int((logits.argmax(dim=1) == labels).sum())


def _attribute_loss(class_counts: list[int]) -> Callable[[Tensor, Tensor], tuple[Tensor, int]]:
    """Loss of concatenated per-attribute logits [B, ΣC] against mixed-radix labels [B]: the
    mean over attributes of each attribute's cross-entropy; hits count images with every
    attribute right."""

    def loss(logits: Tensor, labels: Tensor) -> tuple[Tensor, int]:
        targets = decode_mixed_radix(labels, class_counts)  # [B, A]
        parts = logits.split(class_counts, dim=1)
        total = sum(F.cross_entropy(part, targets[:, a]) for a, part in enumerate(parts))
        hits = torch.stack([part.argmax(dim=1) for part in parts], dim=1) == targets
        return total / len(class_counts), int(hits.all(dim=1).sum())

    return loss


PROTOTYPE_SEED = 0
"""Seed of the fixed class prototypes of the multi-attribute pretraining (see
:func:`attribute_prototypes`)."""


def attribute_prototypes(
    class_counts: list[int], dim: int, seed: int = PROTOTYPE_SEED
) -> list[Tensor]:
    """Fixed unit-norm class prototypes, one matrix [C_a, D] per attribute.

    They play the part of CLIP's text embeddings: θ0 is trained so that each image's
    normalised embedding points towards the prototype of each of its attributes' classes,
    and a downstream task's zero-shot head is the rows of its classes. Drawn from a seeded
    generator (Gaussian rows, normalised), so the heads need no file of their own.
    """
    gen = torch.Generator().manual_seed(seed)
    return [F.normalize(torch.randn(count, dim, generator=gen), dim=1) for count in class_counts]


def zeroshot_head(
    class_counts: list[int],
    attribute: int,
    rows: list[int],
    dim: int,
    *,
    logit_scale: float = PRETRAIN_LOGIT_SCALE,
    seed: int = PROTOTYPE_SEED,
) -> tuple[Tensor, Tensor]:
    """A task's zero-shot head: rows ``rows`` of attribute ``attribute``'s pretraining prototypes.

    Returns:
        weight: [len(rows), dim], rows of norm ``logit_scale``.
        bias: [len(rows)] zeros (the pretraining head has no bias).

    Raises:
        ValueError: ``attribute`` or a row is out of range.
    """
    if not 0 <= attribute < len(class_counts):
        raise ValueError(
            f"attribute index {attribute} out of range for {len(class_counts)} attributes"
        )
    bad = [r for r in rows if not 0 <= r < class_counts[attribute]]
    if bad or not rows:
        raise ValueError(
            f"zero-shot head rows {rows} must be a non-empty list in "
            f"[0, {class_counts[attribute]}) "
            f"(the classes of attribute {attribute}); out of range: {bad}"
        )
    _check_positive(logit_scale=logit_scale)
    prototypes = attribute_prototypes(class_counts, dim, seed)[attribute]
    weight = logit_scale * prototypes[torch.tensor(rows)]
    return weight, torch.zeros(len(rows))


def state_digest(state: dict[str, Tensor]) -> str:
    """SHA-256 (hex) of a state dict's names, dtypes, shapes and bytes, in name order.

    Two state dicts have the same digest exactly when they hold the same bits under the
    same names, whatever file they came from.
    """
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu")
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def _features(encoder: nn.Module, images: Tensor, batch_size: int = 512) -> Tensor:
    """Normalised embeddings [N, D] of images [N, 3, H, W], in eval mode."""
    device = _device_of(encoder)
    was_training = encoder.training
    encoder.eval()
    try:
        chunks = [
            F.normalize(encoder(batch.to(device)), dim=-1) for batch in images.split(batch_size)
        ]
    finally:
        encoder.train(was_training)
    return torch.cat(chunks)


class _PretrainModel(nn.Module):
    """Encoder plus a throwaway linear head on its scaled, normalised embeddings."""

    def __init__(self, encoder: nn.Module, dim: int, num_classes: int, logit_scale: float):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(dim, num_classes)
        self.logit_scale = logit_scale

    def forward(self, images: Tensor) -> Tensor:
        # Same normalised features the task heads will see, so θ0 is trained for them.
        features = F.normalize(self.encoder(images), dim=-1)  # [B, D]
        return self.head(self.logit_scale * features)  # [B, C]


class _AttributeModel(nn.Module):
    """Encoder plus fixed prototype heads of every attribute (buffers, never trained):
    logits [B, ΣC] are the scaled cosines of the normalised embedding with every prototype."""

    prototypes: Tensor

    def __init__(self, encoder: nn.Module, prototypes: Tensor, logit_scale: float):
        super().__init__()
        self.encoder = encoder
        self.register_buffer("prototypes", prototypes)  # [ΣC, D]
        self.logit_scale = logit_scale

    def forward(self, images: Tensor) -> Tensor:
        features = F.normalize(self.encoder(images), dim=-1)  # [B, D]
        return self.logit_scale * features @ self.prototypes.T  # [B, ΣC]


# --------------------------------------------------------------------------- #
# Public API
# --------------------------------------------------------------------------- #
def pretrain(
    encoder: nn.Module,
    images: Tensor,
    labels: Tensor,
    num_classes: int,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    weight_decay: float = 0.05,
    warmup_fraction: float = 0.05,
    logit_scale: float = PRETRAIN_LOGIT_SCALE,
    attribute_classes: list[int] | None = None,
    max_grad_norm: float | None = None,
    max_steps: int | None = None,
) -> dict[str, Tensor]:
    """Train θ0: the encoder and a throwaway linear head on the generic task, or (with
    ``attribute_classes``) the encoder against fixed prototype heads of many attributes.

    Args:
        encoder: images [N, 3, H, W] → embeddings [N, D]; a copy is trained.
        images: [N, 3, H, W] training images.
        labels: [N] int64 in [0, num_classes).
        num_classes: number of generic-task classes C.
        epochs, lr, batch_size, weight_decay: AdamW with linear warmup over
            ``warmup_fraction`` of the steps, then cosine decay to zero.
        seed: seeds the head's initialisation and the shuffling.
        logit_scale: features are normalised and multiplied by this before the head.
        attribute_classes: class count of each attribute; labels are then mixed-radix
            codes of one class per attribute (first attribute most significant, their
            product ``num_classes``), the heads are :func:`attribute_prototypes` (fixed)
            and the loss is the mean of the attributes' cross-entropies.
        max_grad_norm: clip the global gradient norm of each step to this (None: no clipping).
        max_steps: stop after this many optimiser steps (None: train all epochs); the
            learning-rate schedule is the full run's, so the result is the full run's
            parameters after ``max_steps`` steps (what the shipped θ0's quick check runs).

    Returns:
        The trained encoder's state dict (CPU tensors); the head is discarded.
    """
    _check_data(images, labels, num_classes)
    _check_positive(epochs=epochs, lr=lr, batch_size=batch_size)
    if max_steps is not None:
        _check_positive(max_steps=max_steps)
    torch.manual_seed(seed)
    trained = copy.deepcopy(encoder)
    dim = _features(trained, images[:1]).shape[1]
    loss_fn = None
    if attribute_classes is not None:
        if math.prod(attribute_classes) != num_classes:
            raise ValueError(
                f"attribute_classes {attribute_classes} multiply to "
                f"{math.prod(attribute_classes)}, "
                f"but the labels have {num_classes} mixed-radix classes; pass the counts of the "
                "pretraining task's attributes"
            )
        prototypes = torch.cat(attribute_prototypes(attribute_classes, dim))
        model: nn.Module = _AttributeModel(trained, prototypes, logit_scale).to(_device_of(trained))
        loss_fn = _attribute_loss(list(attribute_classes))
    else:
        model = _PretrainModel(trained, dim, num_classes, logit_scale).to(_device_of(trained))
    _train_loop(
        model,
        list(model.parameters()),
        images,
        labels,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        weight_decay=weight_decay,
        warmup_fraction=warmup_fraction,
        seed=seed,
        what="pretrain",
        max_grad_norm=max_grad_norm,
        loss_fn=loss_fn,
        max_steps=max_steps,
    )
    return _encoder_state(trained)


def fit_head(
    encoder: nn.Module,
    images: Tensor,
    labels: Tensor,
    num_classes: int,
    *,
    steps: int = 300,
    lr: float = 0.05,
    seed: int = 0,
    logit_scale: float = DEFAULT_LOGIT_SCALE,
) -> tuple[Tensor, Tensor]:
    """Fit a linear probe on the encoder's frozen, normalised features.

    The head is a cosine classifier like CLIP's zero-shot head: each class row is a
    unit vector times ``logit_scale``, so logits stay in a well-conditioned range
    whatever the data (an unconstrained logistic regression on separable features
    would grow without bound). Features are computed once; the head is fitted with
    full-batch Adam on the cross-entropy.

    Args:
        encoder: images [N, 3, H, W] → embeddings [N, D]; not modified.
        images: [N, 3, H, W] training images.
        labels: [N] int64 in [0, num_classes).
        num_classes: number of classes C.
        steps: full-batch Adam steps.
        lr: Adam learning rate.
        seed: seeds the initialisation of the class directions.
        logit_scale: norm s of every row of the returned weight.

    Returns:
        weight: [C, D], rows of norm ``logit_scale``.
        bias: [C].
    """
    _check_data(images, labels, num_classes)
    _check_positive(steps=steps, lr=lr, logit_scale=logit_scale)
    torch.manual_seed(seed)
    start = time.perf_counter()
    features = _features(encoder, images)  # [N, D]
    labels = labels.to(features.device)
    # Start from the class means of the features, a good and deterministic guess.
    directions = torch.zeros(num_classes, features.shape[1], device=features.device)
    directions.index_add_(0, labels, features)
    directions = directions + 1e-3 * torch.randn_like(directions)
    directions.requires_grad_(True)
    bias = torch.zeros(num_classes, device=features.device, requires_grad=True)
    optimizer = torch.optim.Adam([directions, bias], lr=lr)
    for _ in range(steps):
        weight = logit_scale * F.normalize(directions, dim=1)
        loss = F.cross_entropy(features @ weight.T + bias, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        weight = logit_scale * F.normalize(directions, dim=1)
        logits = features @ weight.T + bias  # [N, C]
        loss = F.cross_entropy(logits, labels)
        train_acc = (logits.argmax(dim=1) == labels).float().mean()
    log.info(
        "fit_head: %d classes, loss %.4f, train acc %.3f, %.1fs",
        num_classes,
        loss.item(),
        train_acc.item(),
        time.perf_counter() - start,
    )
    return weight.detach().cpu(), bias.detach().cpu()


def finetune(
    encoder: nn.Module,
    weight: Tensor,
    bias: Tensor,
    images: Tensor,
    labels: Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    weight_decay: float,
    seed: int,
    warmup_fraction: float = 0.1,
    max_grad_norm: float | None = None,
) -> dict[str, Tensor]:
    """Fine-tune the whole encoder on one task with its head frozen.

    Args:
        encoder: θ0, images [N, 3, H, W] → embeddings [N, D]; a copy is trained.
        weight: [C, D] frozen head weight (from :func:`fit_head`).
        bias: [C] frozen head bias.
        images: [N, 3, H, W] training images.
        labels: [N] int64 in [0, C).
        epochs, lr, batch_size, weight_decay: AdamW with linear warmup over
            ``warmup_fraction`` of the steps, then cosine decay to zero.
        seed: seeds the shuffling.
        max_grad_norm: clip the global gradient norm of each step to this (None: no
            clipping), which keeps the first steps on a new domain from overshooting.

    Returns:
        The fine-tuned encoder's state dict θ_t (CPU tensors), same keys as θ0.
    """
    _check_data(images, labels)
    _check_positive(epochs=epochs, lr=lr, batch_size=batch_size)
    _check_head(encoder, images, weight, bias)
    _check_data(images, labels, num_classes=weight.shape[0])
    torch.manual_seed(seed)
    trained = copy.deepcopy(encoder)
    device = _device_of(trained)
    model = ImageClassifier(trained, weight.to(device), bias.to(device))
    _train_loop(
        model,
        list(trained.parameters()),  # the head is buffers: only the encoder moves
        images,
        labels,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        weight_decay=weight_decay,
        warmup_fraction=warmup_fraction,
        seed=seed,
        what="finetune",
        max_grad_norm=max_grad_norm,
    )
    return _encoder_state(trained)


@torch.no_grad()
def accuracy(
    encoder: nn.Module,
    weight: Tensor,
    bias: Tensor,
    images: Tensor,
    labels: Tensor,
    batch_size: int = 256,
) -> float:
    """Top-1 accuracy in [0, 1] of ``encoder`` with the head (weight [C, D], bias [C]).

    Runs in eval mode without gradients; the encoder's train/eval mode is restored.
    ``images`` is [N, 3, H, W] and ``labels`` [N] int64.
    """
    _check_data(images, labels)
    _check_positive(batch_size=batch_size)
    _check_head(encoder, images, weight, bias)
    _check_data(images, labels, num_classes=weight.shape[0])
    device = _device_of(encoder)
    classifier = ImageClassifier(encoder, weight.to(device), bias.to(device))
    was_training = encoder.training
    encoder.eval()
    correct = 0
    try:
        for x, y in zip(images.split(batch_size), labels.split(batch_size), strict=True):
            predicted = classifier(x.to(device)).argmax(dim=1)  # [B]
            correct += int((predicted == y.to(device)).sum())
    finally:
        encoder.train(was_training)
    return correct / images.shape[0]
