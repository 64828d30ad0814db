"""Index splits shared by every data source: validation carve-outs and per-class hold-outs.

Every source has a `train` and a `test` split of its own (the dataset's official ones,
or a seeded per-class hold-out where the dataset has none, see :func:`per_class_holdout`).
The `val` split of a real task is carved out of the source's train split of N samples by
the task-vectors release's rule (:func:`release_train_val_indices`, its
``split_train_into_train_val`` in ``src/datasets/registry.py``): v = min(⌊f·N⌋, 5000)
with f = 0.1, ``random_split(train, [N - v, v], generator=torch.Generator().manual_seed(0))``,
so `train` is the first N - v entries of the permutation (what the released θ_t were
fine-tuned on) and `val` the last v. Both keep the permutation's order, as the release's
``Subset`` does: index i of our `train` is index i of the release's ``<Dataset>Val``
train set.

The generated demo tasks keep their own carve-out (:func:`train_val_indices`: ⌈f·N⌉
samples, the first of a seeded permutation, sorted).

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
    "DEFAULT_VAL_MAX",
    "IndexedView",
    "per_class_holdout",
    "release_split_of_train",
    "release_train_val_indices",
    "split_of_train",
    "train_val_indices",
]

DEFAULT_VAL_FRACTION = 0.1
"""Share of the source's train split that becomes `val` (the release's `val_fraction`, docs/data.md)."""


DEFAULT_VAL_MAX = 5000
"""Cap on the `val` size of the release's rule (``max_val_samples=5000`` in ``get_dataset``)."""


def release_train_val_indices(
    n: int,
    seed: int = 0,
    fraction: float = DEFAULT_VAL_FRACTION,
    max_val: int | None = DEFAULT_VAL_MAX,
) -> tuple[Tensor, Tensor]:
    """The release's `train` / `val` split of ``range(n)``: ([n - v], [v]) int64, v = min(⌊f·n⌋, max_val).

    Equal to ``torch.utils.data.random_split(range(n), [n - v, v],
    generator=torch.Generator().manual_seed(seed))``: one ``torch.randperm(n)`` from that
    generator, `train` its first n - v entries and `val` the last v, each in the
    permutation's order (not sorted). For MNIST (n = 60000, seed 0) train[0] is 36044,
    which the release asserts.

    Raises:
        ValueError: ``fraction`` outside (0, 1), or a split that would be empty (the release
            asserts both sizes are positive), naming n and the sizes.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(
            f"validation fraction must lie in (0, 1) (the release asserts it), got {fraction}"
        )
    v = int(n * fraction)
    if max_val is not None:
        v = min(v, int(max_val))
    if v <= 0 or n - v <= 0:
        raise ValueError(
            f"the release's train/val split of {n} samples gives {n - v} train and {v} val samples "
            f"(v = min(int({fraction}·N), {max_val})); both must be > 0: the source's train split needs "
            f"at least {math.ceil(1 / fraction)} samples (or a larger data.val_fraction)"
        )
    # random_split draws exactly this permutation and cuts it at the cumulative lengths.
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    return perm[: n - v].clone(), perm[n - v :].clone()


def release_split_of_train(
    split: str,
    n: int,
    seed: int = 0,
    fraction: float = DEFAULT_VAL_FRACTION,
    max_val: int | None = DEFAULT_VAL_MAX,
) -> Tensor:
    """Indices [M] int64 (permutation order) into a source's train split of size ``n`` for our
    `train` or `val`, by the release's rule (:func:`release_train_val_indices`)."""
    train, val = release_train_val_indices(n, seed, fraction, max_val)
    if split == "train":
        return train
    if split == "val":
        return val
    raise ValueError(f"split `{split}` is not carved from the train split (expected train or val)")


def train_val_indices(
    n: int, seed: int = 0, fraction: float = DEFAULT_VAL_FRACTION
) -> tuple[Tensor, Tensor]:
    """The generated demo's split of ``range(n)``: (train [n - m], val [m]) int64, m = ⌈fraction·n⌉.

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
