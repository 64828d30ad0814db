"""The twelve datasets the 14- and 20-task benchmarks add: generated trees in the tall-masks
code's layouts read back with the right labels, in the right order, under the release's
``<Dataset>Val`` split; names and prompts equal to that code's (the committed fixture)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision import datasets

from pipeline.data import class_names, open_dataset, prompt_templates
from pipeline.data.classnames import (
    BENCHMARK_14,
    BENCHMARK_20,
    BENCHMARK_DATASETS,
    KNOWN_TASKS,
    TASK_VECTORS_DATASETS,
)
from pipeline.data.real import open_task_vectors_split
from tests.data.layouts_benchmark import write_benchmark_tree

FIXTURE = Path(__file__).parent / "fixtures" / "tall_masks_templates.json"
TASKS = list(BENCHMARK_DATASETS)
SPLITS = [(task, split) for task in TASKS for split in ("train", "test")]


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> tuple[Path, dict[str, dict[str, list[int]]]]:
    root = tmp_path_factory.mktemp("benchmark_data")
    return root, write_benchmark_tree(root)


def spec_of(root: Path) -> dict:
    return {"layout": "task_vectors", "root": str(root)}


def labels_of(dataset) -> list[int]:
    return [dataset[i][1] for i in range(len(dataset))]


@pytest.mark.parametrize("task,split", SPLITS)
def test_source_splits_list_the_readers_labels_in_order(tree, task, split) -> None:
    root, expected = tree
    if task == "pcam" and "pcam" not in expected:
        pytest.skip("h5py is not installed: no PCAM tree (see test_pcam_without_h5py_says_so)")
    dataset = open_task_vectors_split(task, split, {"root": str(root)})
    assert labels_of(dataset) == expected[task][split]
    image, _ = dataset[len(dataset) - 1]
    assert image.size[0] > 0


@pytest.mark.parametrize(
    "task,module,make",
    [
        ("cifar10", "cifar", lambda r, train: datasets.CIFAR10(str(r), train=train)),
        ("cifar100", "cifar", lambda r, train: datasets.CIFAR100(str(r), train=train)),
        (
            "stl10",
            "stl10",
            lambda r, train: datasets.STL10(str(r / "stl10"), split="train" if train else "test"),
        ),
        (
            "flowers102",
            "flowers102",
            lambda r, train: datasets.Flowers102(
                str(r / "flowers102"), split="train" if train else "test"
            ),
        ),
    ],
)
def test_own_readers_equal_torchvisions_item_for_item(
    tree, monkeypatch, task, module, make
) -> None:
    """torchvision's CIFAR, STL10 and Flowers102 readers check the real files' MD5; with that
    check off they are the reference for ours: the same labels and pixels, in the same order."""
    import importlib

    root, _ = tree
    monkeypatch.setattr(
        importlib.import_module(f"torchvision.datasets.{module}"),
        "check_integrity",
        lambda *a, **k: True,
    )
    for train in (True, False):
        ref = make(root, train)
        ours = open_task_vectors_split(task, "train" if train else "test", {"root": str(root)})
        assert len(ours) == len(ref)
        for i in range(len(ref)):
            (a, y), (b, z) = ours[i], ref[i]
            assert y == z
            assert np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB")))
        if task != "flowers102":  # the tall-masks code writes its own Flowers102 names
            assert list(ref.classes) == class_names(spec_of(root), task)


def test_val_split_is_the_release_rule(tree) -> None:
    """<Dataset>Val: random_split of the train split into N - v and v, v = min(⌊0.1 N⌋, 5000),
    generator seeded 0 (tall_masks src/datasets/registry.py, the same rule as the 8 tasks)."""
    root, expected = tree
    spec = spec_of(root)
    for task in ("cifar100", "food101", "flowers102"):
        n = len(expected[task]["train"])
        v = min(int(0.1 * n), 5000)
        keep, held = torch.utils.data.random_split(
            range(n), [n - v, v], generator=torch.Generator().manual_seed(0)
        )
        train, val = open_dataset(spec, task, "train"), open_dataset(spec, task, "val")
        assert labels_of(val) == [expected[task]["train"][i] for i in held.indices]
        assert labels_of(train) == [expected[task]["train"][i] for i in keep.indices]
        assert labels_of(open_dataset(spec, task, "test")) == expected[task]["test"]


@pytest.mark.parametrize("task", TASKS)
def test_names_and_prompts_equal_the_tall_masks_code(task) -> None:
    code = json.loads(FIXTURE.read_text())["tasks"][task]
    assert code["dataset"] == BENCHMARK_DATASETS[task]
    spec = {"layout": "task_vectors", "root": "/nonexistent"}
    assert class_names(spec, task) == code["classnames"]
    assert prompt_templates(spec, task) == code["templates"]  # in order, character for character


def test_benchmark_task_lists_are_the_codes_all_datasets() -> None:
    order = json.loads(FIXTURE.read_text())["all_datasets"]
    dataset = {**TASK_VECTORS_DATASETS, **BENCHMARK_DATASETS}
    assert [dataset[t] for t in BENCHMARK_14] == order[:14]
    assert [dataset[t] for t in BENCHMARK_20] == order[:20]
    assert set(BENCHMARK_14[:8]) == set(KNOWN_TASKS)


def test_fer2013_names_are_the_prompted_synonym_lists() -> None:
    spec = {"layout": "task_vectors", "root": "/nonexistent"}
    assert class_names(spec, "fer2013")[3] == "['happy', 'smiling']"
    assert prompt_templates(spec, "fer2013")[0].format("['happy', 'smiling']") == (
        "a photo of a ['happy', 'smiling'] looking face."
    )


@pytest.mark.parametrize(
    "task,remove",
    [
        ("cifar10", "cifar-10-batches-py/data_batch_3"),
        ("stl10", "stl10/stl10_binary/train_y.bin"),
        ("flowers102", "flowers102/flowers-102/setid.mat"),
        ("oxford_pets", "OxfordIIITPet/oxford-iiit-pet/annotations/trainval.txt"),
        ("food101", "food101/food-101/meta/train.json"),
        ("emnist", "EMNIST/EMNIST/raw/emnist-digits-train-labels-idx1-ubyte"),
        ("rendered_sst2", "RenderedSST2/rendered-sst2/train"),
        ("fer2013", "FER2013"),
    ],
)
def test_a_missing_file_is_named_with_the_preparation(tmp_path, tree, task, remove) -> None:
    root, _ = tree
    top = remove.split("/")[0]
    shutil.copytree(root / top, tmp_path / top)
    target = tmp_path / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(FileNotFoundError, match="docs/data.md") as err:
        open_dataset(spec_of(tmp_path), task, "train")
    assert str(target) in str(err.value)


def test_a_wrong_class_list_is_refused(tmp_path, tree) -> None:
    root, _ = tree
    shutil.copytree(root / "stl10", tmp_path / "stl10")
    names = tmp_path / "stl10/stl10_binary/class_names.txt"
    lines = names.read_text().splitlines()
    lines[1], lines[2] = lines[2], lines[1]
    names.write_text("\n".join(lines))
    with pytest.raises(ValueError, match="first differ at label 1"):
        open_dataset(spec_of(tmp_path), "stl10", "test")


def test_pcam_without_h5py_says_so(tmp_path, monkeypatch) -> None:
    import builtins

    folder = tmp_path / "PCAM/pcam"
    folder.mkdir(parents=True)
    for xy in ("x", "y"):
        (folder / f"camelyonpatch_level_2_split_test_{xy}.h5").write_bytes(b"")
    real_import = builtins.__import__

    def no_h5py(name, *args, **kwargs):
        if name == "h5py":
            raise ImportError("no h5py")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_h5py)
    with pytest.raises(ValueError, match="pip install h5py"):
        open_dataset(spec_of(tmp_path), "pcam", "test")


def test_pcam_reader_equals_torchvisions(tree) -> None:
    """Where h5py is installed: our PCAM reader lists what torchvision's PCAM does."""
    pytest.importorskip("h5py")
    root, _ = tree
    for split in ("train", "test"):
        ref = datasets.PCAM(str(root / "PCAM"), split=split)
        ours = open_task_vectors_split("pcam", split, {"root": str(root)})
        assert len(ours) == len(ref)
        for i in range(len(ref)):
            (a, y), (b, z) = ours[i], ref[i]
            assert y == z and np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("task", ["fer2013", "flowers102", "stl10"])
def test_zeroshot_head_sees_the_tall_masks_prompts(task, monkeypatch) -> None:
    """heads.source zeroshot on an added task embeds exactly the prompts the tall-masks head
    builder makes (`t(classname)` for each class, each template, in order)."""
    import open_clip

    import pipeline.models.clip
    from pipeline.models.zeroshot import build_zeroshot_head
    from tests.test_zeroshot import FakeTextTower

    code = json.loads(FIXTURE.read_text())["tasks"][task]
    tower = FakeTextTower()
    monkeypatch.setattr(
        pipeline.models.clip, "build_clip", lambda name, pretrained=None, device=None: tower
    )
    monkeypatch.setattr(open_clip, "get_tokenizer", lambda name: tower.tokenize)
    spec = {"layout": "task_vectors", "root": "/nonexistent"}
    weight, _ = build_zeroshot_head("ViT-B-32", None, task, spec, device="cpu", batch_size=7)
    assert tower.seen == [t.format(c) for c in code["classnames"] for t in code["templates"]]
    assert weight.shape[0] == len(code["classnames"])
