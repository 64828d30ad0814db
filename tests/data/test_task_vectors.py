"""The task_vectors layout: the release's split rule, its readers' files and sample order,
its class names and prompts (mlfoundations/task_vectors, src/datasets/*.py).

References are computed independently: ``torch.utils.data.random_split`` as the release calls
it, torchvision's ``ImageFolder`` / ``GTSRB`` / ``StanfordCars`` / ``MNIST`` readers (the
release's readers are these or copies of them) on the same generated tree, and scipy for
SVHN's ``.mat``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import random_split
from torchvision import datasets

from pipeline.data import class_names, open_dataset, prompt_templates, task_config
from pipeline.data.real import open_task_vectors_split
from pipeline.data.splits import release_split_of_train, release_train_val_indices
from tests.data.layouts import TASK_VECTORS_SIZES, write_task_vectors_tree

FIXTURE = Path(__file__).parent / "fixtures" / "task_vectors_templates.json"
TASKS = ["cars", "dtd", "eurosat", "gtsrb", "mnist", "resisc45", "sun397", "svhn"]


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("task_vectors")
    write_task_vectors_tree(root)
    return root


def spec_of(root: Path, **extra) -> dict:
    return {"layout": "task_vectors", "root": str(root), **extra}


# --------------------------------------------------------------------------- the split rule


@pytest.mark.parametrize("n", [60000, 73257, 26640, 8144, 3760, 18900, 19850, 37, 10])
def test_release_split_equals_random_split(n: int) -> None:
    v = min(int(n * 0.1), 5000)
    ref_train, ref_val = random_split(
        range(n), [n - v, v], generator=torch.Generator().manual_seed(0)
    )
    train, val = release_train_val_indices(n)
    assert train.tolist() == list(ref_train.indices) and val.tolist() == list(ref_val.indices)
    assert len(val) == v and torch.equal(release_split_of_train("val", n), val)


def test_release_split_mnist_first_index_and_cap() -> None:
    train, val = release_train_val_indices(60000)
    assert int(train[0]) == 36044  # the release's own assertion for MNISTVal
    assert len(val) == 5000 and len(release_train_val_indices(73257)[1]) == 5000  # the cap
    assert len(release_train_val_indices(26640)[1]) == 2664
    assert len(release_train_val_indices(100, max_val=None, fraction=0.5)[1]) == 50


def test_release_split_rejects_what_the_release_asserts() -> None:
    with pytest.raises(ValueError, match=r"0 val samples"):
        release_train_val_indices(9)  # int(0.9) = 0
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        release_train_val_indices(100, fraction=0.0)
    with pytest.raises(ValueError, match="train or val"):
        release_split_of_train("test", 100)


# --------------------------------------------------------------------------- readers and order


def _pairs(ds) -> list[tuple[str, int]]:
    return [(str(p), int(y)) for p, y in ds.samples]


@pytest.mark.parametrize(
    "task,split,folder",
    [
        ("eurosat", "train", "EuroSAT_splits/train"),
        ("eurosat", "val", "EuroSAT_splits/val"),
        ("eurosat", "test", "EuroSAT_splits/test"),
        ("dtd", "train", "dtd/train"),
        ("dtd", "test", "dtd/val"),
        ("sun397", "train", "sun397/train"),
        ("sun397", "test", "sun397/val"),
    ],
)
def test_image_folder_tasks_read_the_release_folders_in_imagefolder_order(
    tree, task, split, folder
) -> None:
    ours = open_task_vectors_split(task, split, {"root": str(tree)})
    reference = datasets.ImageFolder(str(tree / folder))
    assert _pairs(ours) == _pairs(reference)
    assert len(ours) == TASK_VECTORS_SIZES[task][split]


@pytest.mark.parametrize("split", ["train", "test"])
def test_resisc45_keeps_listed_files_in_imagefolder_order(tree, split) -> None:
    ours = open_task_vectors_split("resisc45", split, {"root": str(tree)})
    wanted = {
        line.strip() for line in (tree / f"resisc45/resisc45-{split}.txt").read_text().splitlines()
    }
    reference = datasets.ImageFolder(
        str(tree / "resisc45/NWPU-RESISC45"), is_valid_file=lambda p: os.path.basename(p) in wanted
    )
    assert _pairs(ours) == _pairs(reference)
    listed = [
        line.strip() for line in (tree / f"resisc45/resisc45-{split}.txt").read_text().splitlines()
    ]
    assert [
        os.path.basename(p) for p, _ in ours.samples
    ] != listed  # the list's order is not the reader's


@pytest.mark.parametrize("split", ["train", "test"])
def test_gtsrb_and_cars_follow_their_readers(tree, split) -> None:
    ours = open_task_vectors_split("gtsrb", split, {"root": str(tree)})
    reference = datasets.GTSRB(str(tree), split=split)
    assert [(str(p), y) for p, y in ours.samples] == [(str(p), y) for p, y in reference._samples]
    assert all(p.endswith(".ppm") for p, _ in ours.samples)  # the GT-*.csv in Training are skipped
    cars = open_task_vectors_split("cars", split, {"root": str(tree)})
    cars_ref = datasets.StanfordCars(str(tree), split=split)
    assert [(str(p), y) for p, y in cars.samples] == [(str(p), y) for p, y in cars_ref._samples]


@pytest.mark.parametrize("split", ["train", "test"])
def test_mnist_and_svhn_follow_torchvision(tree, split) -> None:
    from scipy.io import loadmat

    mnist = open_task_vectors_split("mnist", split, {"root": str(tree)})
    reference = datasets.MNIST(str(tree), train=split == "train")
    assert torch.equal(mnist.targets, reference.targets)
    svhn = open_task_vectors_split("svhn", split, {"root": str(tree)})
    mat = loadmat(str(tree / "svhn" / f"{split}_32x32.mat"))
    labels = mat["y"].astype(np.int64).squeeze(1) % 10  # torchvision: 10 is digit 0
    assert svhn.targets == labels.tolist() and svhn.targets[0] == 0
    image, label = svhn[3]
    assert np.array_equal(np.asarray(image), mat["X"][:, :, :, 3]) and label == labels[3]


# --------------------------------------------------------------------------- splits through open_dataset


@pytest.mark.parametrize("task", [t for t in TASKS if t != "eurosat"])
def test_val_and_train_are_the_release_random_split(tree, task) -> None:
    spec = spec_of(tree)
    n = TASK_VECTORS_SIZES[task]["train"]
    v = min(int(n * 0.1), 5000)
    ref_train, ref_val = random_split(
        range(n), [n - v, v], generator=torch.Generator().manual_seed(0)
    )
    train, val, test = (open_dataset(spec, task, s) for s in ("train", "val", "test"))
    assert train.indices.tolist() == list(ref_train.indices)  # the permutation's (Subset's) order
    assert val.indices.tolist() == list(ref_val.indices)
    assert test.indices.tolist() == list(range(TASK_VECTORS_SIZES[task]["test"]))
    source = open_task_vectors_split(task, "train", {"root": str(tree)})
    i = int(ref_val.indices[0])
    assert val[0][1] == source[i][1]  # item 0 of val is the source's sample perm[N - v]


def test_eurosat_val_is_its_own_folder(tree) -> None:
    spec = spec_of(tree)
    train, val, test = (open_dataset(spec, "eurosat", s) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (30, 10, 10)  # the whole train folder is train
    val_ref = datasets.ImageFolder(str(tree / "EuroSAT_splits/val"))
    assert [val[i][1] for i in range(len(val))] == [y for _, y in val_ref.samples]


def test_layout_roots_and_per_task_escape(tree) -> None:
    spec = {
        **spec_of(tree),
        "source": "synthetic",
        "tasks": {"resisc45": {"layout": "sources", "source": "folder"}},
    }
    assert task_config(spec, "mnist")["source"] == "task_vectors"
    assert task_config(spec, "mnist")["root"] == str(tree)  # the release's one data location
    assert task_config(spec, "resisc45")["root"] == str(tree / "resisc45")
    with pytest.raises(ValueError, match="known layouts"):
        task_config({"layout": "release"}, "mnist")
    with pytest.raises(ValueError, match="eight tasks"):
        open_dataset(spec_of(tree), "shapes", "test")


# --------------------------------------------------------------------------- missing files


def test_missing_files_name_the_expected_path(tmp_path, tree) -> None:
    root = tmp_path / "copy"
    shutil.copytree(tree / "resisc45", root / "resisc45")
    (root / "resisc45/resisc45-test.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"resisc45/resisc45-test\.txt.*docs/data\.md"):
        open_dataset(spec_of(root), "resisc45", "test")
    with pytest.raises(FileNotFoundError, match=r"EuroSAT_splits/train"):
        open_dataset(spec_of(root), "eurosat", "train")
    with pytest.raises(FileNotFoundError, match=r"svhn/train_32x32\.mat"):
        open_dataset(spec_of(root), "svhn", "val")
    with pytest.raises(FileNotFoundError, match=r"MNIST/raw/t10k-images-idx3-ubyte"):
        open_dataset(spec_of(root), "mnist", "test")
    with pytest.raises(FileNotFoundError, match=r"stanford_cars/devkit/cars_meta\.mat"):
        open_dataset(spec_of(root), "cars", "test")
    with pytest.raises(FileNotFoundError, match=r"gtsrb/GT-final_test\.csv"):
        shutil.copytree(tree / "gtsrb/GTSRB", root / "gtsrb/GTSRB")
        open_dataset(spec_of(root), "gtsrb", "test")
    # A listed image that is not there, and a missing class folder, change the split: errors.
    name = (root / "resisc45/resisc45-train.txt").read_text().split()[0]
    next((root / "resisc45/NWPU-RESISC45").rglob(name)).unlink()
    with pytest.raises(ValueError, match=f"not under.*{name}"):
        open_dataset(spec_of(root), "resisc45", "train")
    shutil.copytree(tree / "dtd", root / "dtd")
    shutil.rmtree(root / "dtd/val/zigzagged")
    with pytest.raises(ValueError, match=r"missing \['zigzagged'\]"):
        open_dataset(spec_of(root), "dtd", "test")


# --------------------------------------------------------------------------- names and prompts


@pytest.mark.parametrize("task", TASKS)
def test_names_and_prompts_equal_the_release(task) -> None:
    release = json.loads(FIXTURE.read_text())[task]
    spec = {"layout": "task_vectors", "root": "/nonexistent"}
    assert class_names(spec, task) == release["classnames"]
    assert prompt_templates(spec, task) == release["templates"]  # in order, character for character


def test_folder_names_give_the_release_class_names(tree) -> None:
    """The release derives DTD and SUN397 names from its folders: sorted, SUN397 without the
    two-character prefix, "_" as " "; our names are those, label for label."""
    fixture = json.loads(FIXTURE.read_text())
    for task, folder, cut in (("dtd", "dtd/train", 0), ("sun397", "sun397/train", 2)):
        ref = datasets.ImageFolder(str(tree / folder))
        derived = [c[cut:].replace("_", " ") for c in ref.classes]
        assert derived == fixture[task]["classnames"] == class_names(spec_of(tree), task)


def test_cars_class_list_must_be_the_devkit_order(tmp_path, tree) -> None:
    from scipy.io import savemat

    from pipeline.data.classnames import CLASSNAMES

    shutil.copytree(tree / "stanford_cars", tmp_path / "stanford_cars")
    names = list(CLASSNAMES["cars"])
    names[3], names[4] = names[4], names[3]
    savemat(
        tmp_path / "stanford_cars/devkit/cars_meta.mat",
        {"class_names": np.array(names, dtype=object).reshape(1, -1)},
    )
    with pytest.raises(ValueError, match=r"cars_meta\.mat.*differ at label 3"):
        open_dataset(spec_of(tmp_path), "cars", "train")
