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


# --------------------------------------------------------------------------- #
# The CLIP-like regime: multi-attribute pretraining, shifted tasks, real digits.
# --------------------------------------------------------------------------- #
from pipeline.data.synthetic import (  # noqa: E402
    ATTRIBUTES,
    ATTRIBUTES_TASK,
    CLIP_TASKS,
    attribute_class_counts,
    decode_attributes,
    zeroshot_rows,
)


@pytest.mark.parametrize("task", [*CLIP_TASKS, ATTRIBUTES_TASK])
def test_clip_tasks_shapes_determinism_and_splits(task: str) -> None:
    raw, labels = make_split(task, "train", n=60, seed=0, standardize=False)
    assert raw.shape == (60, 3, 32, 32) and labels.dtype == torch.int64
    assert 0.0 <= float(raw.min()) and float(raw.max()) <= 1.0
    assert 0 <= int(labels.min()) and int(labels.max()) < num_classes(task)
    again, same = make_split(task, "train", n=60, seed=0, standardize=False)
    assert torch.equal(raw, again) and torch.equal(labels, same)
    test, _ = make_split(task, "test", n=60, seed=0, standardize=False)
    assert not torch.equal(raw, test)
    assert len(class_names(task)) == num_classes(task) == len(set(class_names(task)))


def test_attribute_labels_decode_in_mixed_radix_order_and_balance_each_attribute() -> None:
    counts = attribute_class_counts()
    assert counts == [16, 8, 3, 4, 4] and num_classes(ATTRIBUTES_TASK) == 6144
    # Reference: the index of a tuple in the lexicographic product is its mixed-radix code.
    import itertools

    combos = list(itertools.product(*(range(c) for c in counts)))
    codes = torch.tensor([0, 1, 17, 383, 384, 6143, 2024])
    expected = torch.tensor([combos[int(c)] for c in codes])
    assert torch.equal(decode_attributes(codes, counts), expected)
    # The class names follow the same order.
    names = class_names(ATTRIBUTES_TASK)
    assert names[2024] == ", ".join(ATTRIBUTES[a][i] for a, i in zip(ATTRIBUTES, combos[2024]))
    _, labels = make_split(ATTRIBUTES_TASK, "train", n=480, seed=0)
    per_attribute = decode_attributes(labels, counts)
    for a, count in enumerate(counts):
        hist = torch.bincount(per_attribute[:, a], minlength=count)
        assert int(hist.max() - hist.min()) <= 1, (list(ATTRIBUTES)[a], hist.tolist())


@pytest.mark.parametrize("task", CLIP_TASKS)
def test_zeroshot_rows_are_the_pretraining_classes_the_task_names(task: str) -> None:
    attribute, rows = zeroshot_rows(task)
    pretrain_names = ATTRIBUTES[list(ATTRIBUTES)[attribute]]
    assert len(rows) == num_classes(task)
    for name, row in zip(class_names(task), rows):
        # "3" is the pretraining symbol "digit 3"; the other tasks use the same names.
        assert pretrain_names[row] in (name, f"digit {name}"), (task, name, pretrain_names[row])


def test_zeroshot_rows_reject_a_task_without_rows() -> None:
    with pytest.raises(ValueError, match="shapes.*shapes_textured"):
        zeroshot_rows("shapes")


def test_digits_task_renders_the_real_packaged_digits_from_disjoint_pools() -> None:
    from pipeline.data.digits import load_digits

    pools = synthetic._digit_pools()
    images, labels = load_digits()
    assert len(pools["test"][1]) == synthetic.DIGITS_TEST_SOURCES == 720
    assert len(pools["train"][1]) == 1797 - 720
    # The pools partition the 1,797 real images: no test rendering comes from a training digit.
    rows = {tuple(r) for r in (pools["train"][0] * 16).round().to(torch.uint8).flatten(1).tolist()}
    test_rows = {
        tuple(r) for r in (pools["test"][0] * 16).round().to(torch.uint8).flatten(1).tolist()
    }
    every = {tuple(r) for r in images.flatten(1).tolist()}
    assert rows | test_rows <= every
    assert sum(len(p[1]) for p in pools.values()) == len(labels)
    assert torch.equal(
        torch.sort(torch.cat([pools["train"][1], pools["test"][1]])).values,
        torch.sort(labels).values,
    )


def test_digits_images_are_drawn_from_the_labelled_class(monkeypatch) -> None:
    # Pools in which only the digit 3 has ink: an object appears exactly on the images
    # labelled 3, so each rendering is drawn from its own label's source images.
    blank = {}
    for split, (images, labels) in synthetic._digit_pools().items():
        blank[split] = ((labels == 3).float().view(-1, 1, 1).expand(-1, 8, 8).clone(), labels)
    monkeypatch.setattr(synthetic, "_digit_pools", lambda: blank)
    raw, labels = make_split("digits", "test", n=200, seed=0, standardize=False)
    background = raw.median(dim=2, keepdim=True).values.median(dim=3, keepdim=True).values
    ink = ((raw - background).abs().amax(dim=1) > 0.25).float().mean(dim=(1, 2))  # [N]
    assert bool((ink[labels == 3] > 0.1).all())
    assert bool((ink[labels != 3] < 0.02).all())
