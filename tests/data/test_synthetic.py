"""Tests for the demo benchmark's generated tasks (pipeline/data/synthetic.py)."""

from __future__ import annotations

import pytest
import torch

from pipeline.data import synthetic
from pipeline.data.synthetic import PRETRAIN_TASK, TASKS, class_names, make_split, num_classes

ALL_TASKS = (*TASKS, PRETRAIN_TASK)


def test_eight_distinct_tasks_and_a_separate_pretraining_task() -> None:
    assert len(TASKS) == 8
    assert len(set(TASKS)) == 8
    assert PRETRAIN_TASK not in TASKS


@pytest.mark.parametrize("task", ALL_TASKS)
def test_shapes_dtypes_and_label_range(task: str) -> None:
    raw, labels = make_split(task, "train", n=50, seed=0, standardize=False)
    assert raw.shape == (50, 3, 32, 32)
    assert raw.dtype == torch.float32
    assert labels.shape == (50,)
    assert labels.dtype == torch.int64
    assert 0.0 <= float(raw.min()) and float(raw.max()) <= 1.0
    # By default each image is standardised: zero mean, unit std over its pixels.
    images, same_labels = make_split(task, "train", n=50, seed=0)
    assert torch.equal(labels, same_labels)
    torch.testing.assert_close(images.mean(dim=(1, 2, 3)), torch.zeros(50), atol=1e-4, rtol=0)
    # Loose: the divisor is std + eps, which matters for low-contrast images.
    torch.testing.assert_close(images.std(dim=(1, 2, 3)), torch.ones(50), atol=3e-2, rtol=0)
    assert torch.isfinite(images).all()
    counts = torch.bincount(labels, minlength=num_classes(task))
    # Balanced: every class present, counts differ by at most one.
    assert len(counts) == num_classes(task)
    assert int(counts.max() - counts.min()) <= 1


@pytest.mark.parametrize("task", ALL_TASKS)
def test_class_names_match_num_classes(task: str) -> None:
    names = class_names(task)
    assert len(names) == num_classes(task)
    assert len(set(names)) == len(names)
    limits = (4, 10) if task in TASKS else (4, 64)
    assert limits[0] <= num_classes(task) <= limits[1]


@pytest.mark.parametrize("task", ALL_TASKS)
def test_same_seed_gives_identical_tensors(task: str) -> None:
    first = make_split(task, "test", n=40, seed=3)
    second = make_split(task, "test", n=40, seed=3)
    assert torch.equal(first[0], second[0])
    assert torch.equal(first[1], second[1])


@pytest.mark.parametrize("task", ALL_TASKS)
def test_train_test_and_seeds_are_different_samples(task: str) -> None:
    train, _ = make_split(task, "train", n=40, seed=0)
    test, _ = make_split(task, "test", n=40, seed=0)
    other_seed, _ = make_split(task, "train", n=40, seed=1)
    assert not torch.equal(train, test)
    assert not torch.equal(train, other_seed)


def test_split_seed_is_stable_across_processes() -> None:
    # The same value in a fresh interpreter: Python's salted hash() would change it.
    import subprocess
    import sys

    code = "from pipeline.data import synthetic; print(synthetic.split_seed('shapes', 'train', 0))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(other.stdout) == synthetic.split_seed("shapes", "train", 0)
    assert synthetic.split_seed("shapes", "train", 0) != synthetic.split_seed("shapes", "test", 0)


def test_first_labels_fixed_seed_value() -> None:
    _, labels = make_split("glyphs", "train", n=10, seed=0)
    assert labels.tolist() == [0, 9, 4, 2, 3, 5, 6, 7, 8, 1]  # recorded from this implementation


def test_other_image_sizes_and_empty_split() -> None:
    images, labels = make_split("glyphs", "train", n=6, seed=0, image_size=48)
    assert images.shape == (6, 3, 48, 48)
    images, labels = make_split("shapes", "train", n=0)
    assert images.shape == (0, 3, 32, 32)
    assert labels.shape == (0,)


def test_labels_are_drawn_not_ignored() -> None:
    # Large objects change more pixels of the raw rendering than small ones.
    images, labels = make_split("size", "train", n=200, seed=0, standardize=False)
    background = images.median(dim=2, keepdim=True).values.median(dim=3, keepdim=True).values
    changed = ((images - background).abs().amax(dim=1) > 0.2).float().mean(dim=(1, 2))  # [N]
    assert changed[labels == 4].mean() > 3 * changed[labels == 0].mean()
    # Quadrant labels: the object is in the labelled half, left/right and top/bottom.
    images, labels = make_split("position", "train", n=200, seed=0, standardize=False)
    background = images.median(dim=2, keepdim=True).values.median(dim=3, keepdim=True).values
    mask = ((images - background).abs().amax(dim=1) > 0.2).float()  # [N, H, W]
    coords = torch.arange(32.0) + 0.5
    mass = mask.sum(dim=(1, 2)).clamp(min=1.0)
    centre_x = (mask.sum(dim=1) * coords).sum(dim=1) / mass
    centre_y = (mask.sum(dim=2) * coords).sum(dim=1) / mass
    assert ((centre_x > 16) == (labels % 2 == 1)).float().mean() > 0.9
    assert ((centre_y > 16) == (labels // 2 == 1)).float().mean() > 0.9


def test_unknown_task_names_the_task_and_lists_known_ones() -> None:
    with pytest.raises(ValueError, match="mnist") as error:
        make_split("mnist", "train", n=4)
    for task in ALL_TASKS:
        assert task in str(error.value)
    with pytest.raises(ValueError, match="mnist"):
        num_classes("mnist")
    with pytest.raises(ValueError, match="mnist"):
        class_names("mnist")


def test_bad_split_and_sizes_raise() -> None:
    with pytest.raises(ValueError, match="validation"):
        make_split("shapes", "validation", n=4)
    with pytest.raises(ValueError, match="n=-1"):
        make_split("shapes", "train", n=-1)
    with pytest.raises(ValueError, match="image_size"):
        make_split("shapes", "train", n=4, image_size=4)
