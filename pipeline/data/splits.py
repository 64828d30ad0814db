"""Index splits shared by every data source: validation carve-outs and per-class hold-outs.

Every source has a `train` and a `test` split of its own (the dataset's official ones,
or a seeded per-class hold-out where the dataset has none, see :func:`per_class_holdout`).
The `val` split is carved out of the source's train split by :func:`train_val_indices`:
a seeded permutation puts ⌈f·N⌉ samples (f = 0.1 by default) in `val` and the rest in
`train`, so `train` ∪ `val` is the source's train split and they never overlap.
Indices come back sorted, so each split reads its samples in the source's own order.

All functions work on sizes and label tensors only: they never open a file.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = [
    "DEFAULT_VAL_FRACTION",
    "IndexedView",
    "per_class_holdout",
    "split_of_train",
    "train_val_indices",
]

DEFAULT_VAL_FRACTION = 0.1
"""Share of the source's train split that becomes `val` (SOURCES.md: 10 %, seed 0)."""


def train_val_indices(
    n: int, seed: int = 0, fraction: float = DEFAULT_VAL_FRACTION
) -> tuple[Tensor, Tensor]:
    """Split ``range(n)`` into (train [n - m], val [m]) int64 index tensors, m = ⌈fraction·n⌉.

    The validation indices are the first m entries of ``torch.randperm(n)`` drawn from a
    generator seeded with ``seed``; train is the rest. Both are sorted ascending. The same
    (n, seed, fraction) always gives the same split; a different seed gives another.

    Raises:
        ValueError: negative ``n`` or ``fraction`` outside [0, 1).
    """
    if n < 0:
        raise ValueError(f"number of samples must be >= 0, got n={n}")
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must lie in [0, 1), got {fraction}")
    n_val = math.ceil(fraction * n)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def split_of_train(
    split: str, n: int, seed: int = 0, fraction: float = DEFAULT_VAL_FRACTION
) -> Tensor:
    """Indices [M] int64 into a source's train split of size ``n`` for our `train` or `val`."""
    train, val = train_val_indices(n, seed, fraction)
    if split == "train":
        return train
    if split == "val":
        return val
    raise ValueError(f"split `{split}` is not carved from the train split (expected train or val)")


def per_class_holdout(labels: Tensor, per_class: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Hold out ``per_class`` samples of every class: (rest [N - H], held-out [H]) int64 indices.

    For datasets without an official test split (EuroSAT, SUN397 without its partition
    files): within each class, a seeded permutation picks the held-out samples, as the
    task-vectors preparation did (270 test images per EuroSAT class). A class with no more
    than ``per_class`` samples keeps half of them (rounded down) on the training side,
    so no class vanishes from either split. Both outputs are sorted.

    Args:
        labels: [N] int64 class of each sample.
        per_class: held-out samples per class, >= 1.
        seed: seed of the per-class permutations.
    """
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D [N], got shape {tuple(labels.shape)}")
    if per_class < 1:
        raise ValueError(f"held-out samples per class must be >= 1, got {per_class}")
    gen = torch.Generator().manual_seed(int(seed))
    kept: list[Tensor] = []
    held: list[Tensor] = []
    for cls in torch.unique(labels).tolist():  # ascending, so the draws are reproducible
        members = (labels == cls).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=gen)]
        take = per_class if len(members) > per_class else (len(members) + 1) // 2
        held.append(members[:take])
        kept.append(members[take:])
    empty = torch.zeros(0, dtype=torch.int64)
    return torch.cat([empty, *kept]).sort().values, torch.cat([empty, *held]).sort().values


class IndexedView(Dataset):
    """The samples ``indices`` of ``base``, with a per-item function applied lazily.

    ``base[i]`` must return (image, label); the item of the view is
    ``(prepare(image), int(label))``. Nothing is read before an item is asked for.
    """

    def __init__(self, base: Dataset, indices: Sequence[int] | Tensor, prepare=None) -> None:
        self.base = base
        self.indices = torch.as_tensor(indices, dtype=torch.int64)
        self.prepare = prepare

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        image, label = self.base[int(self.indices[i])]
        return (self.prepare(image) if self.prepare is not None else image), int(label)
