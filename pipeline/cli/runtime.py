"""What every computing stage shares: the logs, torch dtypes and devices, JSON output, task
heads, and torch's deterministic mode. torch is imported inside the functions, not here."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

log = logging.getLogger("pipeline")
# One line per stage run that its log keeps even under --quiet: wall time and what the stage
# measured (η, CG steps, accuracies).
summary = logging.getLogger("pipeline.summary")


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a --dtype choice (float32, float64, bfloat16)."""
    import torch

    return getattr(torch, name)


def checked_device(name: str) -> str:
    """A --device value, resolved and checked (`pipeline.devices.resolve_device`): `cuda`
    without a usable GPU is an error, not a silent CPU run."""
    from pipeline.devices import resolve_device

    return str(resolve_device(name, "--device"))


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    from pipeline.store import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str))


def task_head(
    path: str | Path, data: dict[str, Any], task: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """A head (weight [C, D], bias [C]) checked against the task's class count."""
    from pipeline.data import num_classes
    from pipeline.models.clip import load_head
    from pipeline.store import ArtifactError

    weight, bias = load_head(path)
    expected = num_classes(data, task)
    if weight.shape[0] != expected:
        raise ArtifactError(
            f"{path}: head tensor `weight` has {weight.shape[0]} rows (classes) but task `{task}` has {expected} classes"
        )
    return weight, bias


def deterministic_torch() -> None:
    """Same inputs, same machine ⇒ same bits: torch's deterministic algorithms where it has
    them (warnings, not errors, where it has none), no cuDNN autotuning, and the cuBLAS
    workspace setting CUDA needs for reproducible GEMMs. Uninitialised memory is not filled
    (our code never reads it, and filling costs a pass over every buffer)."""
    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # torch.use_deterministic_algorithms also sets torch._inductor's flag, and importing
    # inductor costs about a second per process (a demo run starts ~180). Nothing here goes
    # through torch.compile, so set the eager-mode switch alone where torch exposes it.
    set_eager = getattr(torch._C, "_set_deterministic_algorithms", None)
    if set_eager is not None:
        set_eager(True, warn_only=True)
    else:
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False
    torch.backends.cudnn.benchmark = False
