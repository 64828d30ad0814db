"""The demo's shipped θ0: an encoder pretrained on every attribute at once, read from the package.

Pretraining θ0 well takes far longer than the rest of the demo (minutes of two CPU cores on
tens of thousands of images), so `files/demo-theta0.safetensors` ships the result, and the
workflow copies it (`pretrain: {source: shipped}`). The file is checked against its SHA-256
when read, and :data:`THETA0_RECIPE` is the whole recipe that made it:

    python -m pipeline pretrain --regenerate-shipped --out theta0.safetensors

trains θ0 again with those settings and fails unless the result has the shipped bits
(``make theta0`` runs it). Training is deterministic on CPU for a fixed thread count, which
the recipe records. A full regeneration takes minutes; :data:`THETA0_CHECK_STEPS` steps of it,
whose parameters have the digest :data:`THETA0_CHECK_DIGEST`, are what the test suite checks.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from torch import Tensor

__all__ = [
    "THETA0_CHECK_DIGEST",
    "THETA0_CHECK_STEPS",
    "THETA0_PATH",
    "THETA0_RECIPE",
    "THETA0_SHA256",
    "load_shipped_theta0",
    "verify_shipped_theta0",
]

THETA0_PATH = Path(__file__).parent / "files" / "demo-theta0.safetensors"

THETA0_RECIPE: dict[str, Any] = {
    "backbone": "demo-96",
    "data": {"source": "synthetic", "seed": 0, "image_size": 32},
    "train": {
        "task": "attributes",
        "train_size": 60000,  # 54,000 after the 10 % validation carve-out
        "epochs": 15,
        "lr": 0.002,
        "batch_size": 128,
        "weight_decay": 0.05,
        "max_grad_norm": 1.0,
        "seed": 0,
    },
    "threads": 2,  # matrix products split their sums by thread count: it fixes the bits
}
"""Backbone, ``data`` section, ``pretrain`` settings and torch CPU threads of the shipped θ0
(the arguments of ``python -m pipeline pretrain``)."""

THETA0_SHA256 = "a1e7676749006e6afcd41919a59ff0f735c8831b6e1a4dc822c54245d06212d0"
"""SHA-256 of the shipped file's bytes (safetensors with fixed metadata)."""

THETA0_CHECK_STEPS = 4
"""Optimiser steps of the recipe that the quick regeneration check runs."""

THETA0_CHECK_DIGEST = "40df71426856ed04cb53a7698da579e0335570eac000ae8f6fd5cf3946c68a9a"
"""``pipeline.train.state_digest`` of the recipe's parameters after :data:`THETA0_CHECK_STEPS`
steps (the same data, initialisation, schedule and threads as the full run)."""

THETA0_METADATA = {"stage": "pretrain", "backbone": THETA0_RECIPE["backbone"]}
"""The safetensors metadata the pretrain stage writes, part of the shipped file's bytes."""


def file_sha256(path: str | Path) -> str:
    """SHA-256 (hex) of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def verify_shipped_theta0(path: str | Path = THETA0_PATH) -> Path:
    """Return ``path`` after checking that its SHA-256 is :data:`THETA0_SHA256`.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file's digest differs (message names both digests and the fix).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: the shipped θ0 is missing; reinstall the package, or regenerate it with "
            "`make theta0`"
        )
    digest = file_sha256(path)
    if digest != THETA0_SHA256:
        raise ValueError(
            f"{path}: SHA-256 {digest} is not the shipped θ0's {THETA0_SHA256}; reinstall the "
            "package to restore it (`make theta0` regenerates it from its recipe)"
        )
    return path


def load_shipped_theta0(path: str | Path = THETA0_PATH) -> dict[str, Tensor]:
    """The shipped θ0's state dict (demo-96 names, float32), after checking its SHA-256."""
    from pipeline.store import load_tensors

    return load_tensors(verify_shipped_theta0(path))
