"""Tests for the generic splits (pipeline/data/splits.py) and their use by the synthetic source."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.data import load_split, open_dataset, task_config
from pipeline.data.splits import per_class_holdout, split_of_train, train_val_indices
from pipeline.data.synthetic import make_split


@pytest.mark.parametrize("n", [1, 9, 10, 11, 257])
def test_train_and_val_partition_the_indices(n: int) -> None:
    train, val = train_val_indices(n, seed=0)
    assert len(val) == math.ceil(0.1 * n)
    assert torch.equal(torch.cat([train, val]).sort().values, torch.arange(n))
    assert not set(train.tolist()) & set(val.tolist())
    assert torch.equal(train, train.sort().values) and torch.equal(val, val.sort().values)
    assert train.dtype == val.dtype == torch.int64


def test_val_is_deterministic_for_a_seed_and_moves_with_it() -> None:
    first = train_val_indices(1000, seed=3)[1]
    assert torch.equal(first, train_val_indices(1000, seed=3)[1])
    assert not torch.equal(first, train_val_indices(1000, seed=4)[1])
    # It is the prefix of the seeded permutation, so a reader can reproduce it.
    expected = torch.randperm(1000, generator=torch.Generator().manual_seed(3))[:100].sort().values
    assert torch.equal(first, expected)


def test_fraction_and_bad_arguments() -> None:
    assert len(train_val_indices(100, fraction=0.25)[1]) == 25
    assert len(train_val_indices(100, fraction=0.0)[1]) == 0
    with pytest.raises(ValueError, match="fraction"):
        train_val_indices(10, fraction=1.0)
    with pytest.raises(ValueError, match="n=-1"):
        train_val_indices(-1)
    with pytest.raises(ValueError, match="test"):
        split_of_train("test", 10)


def test_per_class_holdout_takes_that_many_per_class() -> None:
    labels = torch.tensor([0] * 10 + [1] * 7 + [2] * 3 + [3])
    rest, held = per_class_holdout(labels, per_class=4, seed=1)
    assert torch.equal(torch.cat([rest, held]).sort().values, torch.arange(len(labels)))
    counts = torch.bincount(labels[held], minlength=4).tolist()
    # Classes larger than per_class give per_class; smaller ones give half, rounded up
    # (the training side keeps the other half), so a class of two or more is on both sides.
    assert counts == [4, 4, 2, 1]
    assert torch.bincount(labels[rest], minlength=4).tolist() == [6, 3, 1, 0]
    again = per_class_holdout(labels, per_class=4, seed=1)
    assert torch.equal(held, again[1])
    assert not torch.equal(held, per_class_holdout(labels, per_class=4, seed=2)[1])


def test_per_class_holdout_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="1-D"):
        per_class_holdout(torch.zeros(2, 2, dtype=torch.int64), 1)
    with pytest.raises(ValueError, match=">= 1"):
        per_class_holdout(torch.zeros(4, dtype=torch.int64), 0)


SPEC = {"source": "synthetic", "train_size": 40, "test_size": 12, "image_size": 16}


def test_synthetic_val_is_carved_from_the_generated_train_split() -> None:
    full_images, full_labels = make_split("shapes", "train", 40, seed=0, image_size=16)
    train_images, train_labels = load_split(SPEC, "shapes", "train")
    val_images, val_labels = load_split(SPEC, "shapes", "val")
    assert len(train_labels) == 36 and len(val_labels) == 4  # train_size is N before the carve-out
    train_idx, val_idx = train_val_indices(40, seed=0)
    assert torch.equal(train_images, full_images[train_idx])
    assert torch.equal(val_labels, full_labels[val_idx])
    assert torch.equal(val_images, full_images[val_idx])
    test_images, test_labels = load_split(SPEC, "shapes", "test")
    assert test_images.shape == (12, 3, 16, 16) and test_labels.dtype == torch.int64


def test_synthetic_val_seed_moves_val_but_not_test() -> None:
    other = {**SPEC, "val_seed": 5}
    assert not torch.equal(
        load_split(SPEC, "shapes", "val")[0], load_split(other, "shapes", "val")[0]
    )
    assert torch.equal(
        load_split(SPEC, "shapes", "test")[0], load_split(other, "shapes", "test")[0]
    )


def test_open_dataset_synthetic_matches_load_split() -> None:
    images, labels = load_split(SPEC, "colour", "val")
    dataset = open_dataset(
        SPEC, "colour", "val", transform=lambda x: 1 / 0
    )  # ignored for synthetic
    assert len(dataset) == len(labels)
    image, label = dataset[2]
    assert isinstance(label, int) and label == int(labels[2])
    assert torch.equal(image, images[2]) and image.dtype == torch.float32


def test_unknown_split_and_source_and_real_load_split() -> None:
    with pytest.raises(ValueError, match="validation"):
        load_split(SPEC, "shapes", "validation")
    with pytest.raises(ValueError, match="imagenet"):
        open_dataset({"source": "imagenet"}, "shapes", "train")
    with pytest.raises(ValueError, match="open_dataset"):
        load_split({"source": "folder"}, "resisc45", "train")


def test_task_config_overrides_and_roots() -> None:
    spec = {
        "source": "torchvision",
        "root": "/data",
        "val_seed": 1,
        "classes": ["x"],
        "tasks": {
            "resisc45": {"source": "folder", "root": "/elsewhere/r45"},
            "dtd": {"val_seed": 7},
        },
    }
    assert task_config(spec, "mnist")["root"] == "/data/mnist"
    assert "classes" not in task_config(spec, "mnist")  # per-task keys are never inherited
    assert task_config(spec, "resisc45") == {
        "layout": "sources",
        "source": "folder",
        "root": "/elsewhere/r45",
        "val_seed": 1,
    }
    assert task_config(spec, "dtd")["val_seed"] == 7
    with pytest.raises(ValueError, match="data.tasks.dtd"):
        task_config({"tasks": {"dtd": [1]}}, "dtd")


def test_generated_val_and_test_are_cached_bit_for_bit(tmp_path, monkeypatch) -> None:
    import pipeline.data as data

    spec = {**SPEC, "cache_dir": str(tmp_path / "cache")}
    fresh = {s: load_split(SPEC, "glyphs", s) for s in ("val", "test")}
    first = {s: load_split(spec, "glyphs", s) for s in ("val", "test")}
    assert len(list((tmp_path / "cache").iterdir())) == 2  # val and test; train is never cached

    def no_generation(*args):
        raise AssertionError("generated again instead of read from the cache")

    monkeypatch.setattr(data, "_generate_synthetic_split", no_generation)
    for s in ("val", "test"):
        again = load_split(spec, "glyphs", s)
        for a, b, c in zip(fresh[s], first[s], again):
            assert torch.equal(a, b) and torch.equal(a, c) and a.dtype == c.dtype
    with pytest.raises(AssertionError, match="generated again"):
        load_split({**spec, "test_size": 13}, "glyphs", "test")  # another setting, another file
    with pytest.raises(AssertionError, match="generated again"):
        load_split({**spec, "val_seed": 3}, "glyphs", "val")
    monkeypatch.undo()
    for f in (tmp_path / "cache").iterdir():  # a damaged file is generated again
        f.write_bytes(b"not a safetensors file")
    assert torch.equal(load_split(spec, "glyphs", "val")[0], fresh["val"][0])
