"""Task datasets behind one interface: `load_split(spec, task, split)`.

`spec` is the `data` section of the workflow config (a plain dict), so a rule can pass it
as one JSON parameter and Snakemake re-runs exactly the jobs whose data changed.
Sources: `synthetic` (the demo's generated tasks).
"""

from __future__ import annotations

from typing import Any

import torch

SOURCES = ("synthetic",)


def _source(spec: dict[str, Any]) -> str:
    source = spec.get("source", "synthetic")
    if source not in SOURCES:
        raise ValueError(f"unknown data source `{source}`; known sources: {', '.join(SOURCES)}")
    return source


def load_split(spec: dict[str, Any], task: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images [N, 3, H, W] float32, labels [N] int64) of one split of one task."""
    _source(spec)
    from pipeline.data import synthetic

    sizes = {"train": spec.get("train_size", 2000), "test": spec.get("test_size", 500)}
    if split not in sizes:
        raise ValueError(f"unknown split `{split}` for task `{task}` (expected train or test)")
    return synthetic.make_split(
        task, split, int(sizes[split]), seed=int(spec.get("seed", 0)), image_size=int(spec.get("image_size", 32))
    )


def num_classes(spec: dict[str, Any], task: str) -> int:
    _source(spec)
    from pipeline.data import synthetic

    return synthetic.num_classes(task)
