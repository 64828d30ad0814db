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
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor

__all__ = [
    "THETA0_CHECK_DIGEST",
    "THETA0_CHECK_STEPS",
    "THETA0_PATH",
    "THETA0_RECIPE",
    "THETA0_RECORD_PATH",
    "THETA0_SHA256",
    "load_shipped_theta0",
    "verify_shipped_theta0",
]

THETA0_PATH = Path(__file__).parent / "files" / "demo-theta0.safetensors"

THETA0_RECORD_PATH = THETA0_PATH.with_suffix(".json")
"""The shipped file's record beside it, plain JSON that the workflow reads without torch:
``sha256``, ``recipe`` and ``check`` (``steps``, ``digest``), the values below."""

_RECORD = json.loads(THETA0_RECORD_PATH.read_text())

THETA0_RECIPE: dict[str, Any] = _RECORD["recipe"]
"""Backbone, ``data`` section, ``pretrain`` settings and torch CPU threads of the shipped θ0
(the arguments of ``python -m pipeline pretrain``). ``train.train_size`` is the generated train
split before the 10 % validation carve-out (54,000 images are trained on); ``threads`` is part
of the recipe because matrix products split their sums by thread count, which fixes the bits."""

THETA0_SHA256: str = _RECORD["sha256"]
"""SHA-256 of the shipped file's bytes (safetensors with fixed metadata)."""

THETA0_CHECK_STEPS: int = _RECORD["check"]["steps"]
"""Optimiser steps of the recipe that the quick regeneration check runs."""

THETA0_CHECK_DIGEST: str = _RECORD["check"]["digest"]
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
