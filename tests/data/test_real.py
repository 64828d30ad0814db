"""Tests for the real-task readers (pipeline/data/real.py) through pipeline.data's interface.

Every test writes a tiny dataset (8×8 images) in the exact on-disk layout its reader
expects: torchvision's files for MNIST, SVHN, GTSRB, DTD, EuroSAT, SUN397 and
StanfordCars, an image-folder tree, and Hugging Face parquet shards.
"""

from __future__ import annotations

import csv
import io
import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import random_split

from pipeline.data import class_names, num_classes, open_dataset, prompt_templates
from pipeline.data.classnames import CLASSNAMES, EUROSAT_FOLDERS, TEMPLATES


def _image(
    path: Path, colour: tuple[int, ...], mode: str = "RGB", size: int = 8, fmt: str | None = None
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (size, size), colour).save(path, format=fmt)


def _resize_to_tensor(image: Image.Image) -> torch.Tensor:
    """A stand-in for the backbone's eval transform: records the mode, resizes to 5×5."""
    assert image.mode == "RGB"
    array = np.asarray(image.resize((5, 5)), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def _labels(dataset) -> list[int]:
    return [dataset[i][1] for i in range(len(dataset))]


def _check_train_val(spec: dict, task: str, n_source_train: int) -> None:
    """train and val are torch's random_split of the source's train split as the release calls it
    (v = min(int(f·N), 5000), generator seeded with val_seed), in its Subset order; another
    val_seed draws another val."""
    train, val = open_dataset(spec, task, "train"), open_dataset(spec, task, "val")
    cfg = {**spec, **(spec.get("tasks", {}).get(task, {}))}
    v = min(int(n_source_train * cfg.get("val_fraction", 0.1)), 5000)
    ref_train, ref_val = random_split(
        range(n_source_train),
        [n_source_train - v, v],
        generator=torch.Generator().manual_seed(cfg.get("val_seed", 0)),
    )
    expected_train, expected_val = torch.tensor(ref_train.indices), torch.tensor(ref_val.indices)
    if cfg.get("source") == "parquet":  # parquet reads each split in file order
        expected_train, expected_val = expected_train.sort().values, expected_val.sort().values
    assert torch.equal(train.indices, expected_train) and torch.equal(val.indices, expected_val)
    # Another seed draws another validation set (tiny sets may coincide for one seed, not for all).
    others = [open_dataset({**spec, "val_seed": seed}, task, "val").indices for seed in range(1, 6)]
    assert any(not torch.equal(other, val.indices) for other in others)


# --------------------------------------------------------------------------- MNIST


def _write_idx(path: Path, array: np.ndarray) -> None:
    """An idx-ubyte file: magic (0, 0, type 0x08 = uint8, ndim), big-endian dims, data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _write_mnist(root: Path, n_train: int = 20, n_test: int = 6) -> tuple[np.ndarray, np.ndarray]:
    raw = root / "MNIST" / "raw"
    rng = np.random.default_rng(0)
    labels = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        y = np.arange(n) % 10
        x = np.zeros((n, 28, 28), dtype=np.uint8)
        x[:, :, :] = (y * 20 + 10).reshape(n, 1, 1)  # the label is readable from the pixels
        x[:, 0, 0] = rng.integers(0, 255, n)
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", x)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", y)
        labels[prefix] = y
    return labels["train"], labels["t10k"]


def test_mnist_lengths_labels_rgb_and_transform(tmp_path: Path) -> None:
    train_y, test_y = _write_mnist(tmp_path / "mnist")
    spec = {"source": "torchvision", "root": str(tmp_path)}
    test = open_dataset(spec, "mnist", "test", transform=_resize_to_tensor)
    assert len(test) == 6 and _labels(test) == test_y.tolist()
    image, label = test[3]
    assert image.shape == (3, 5, 5) and image.dtype == torch.float32
    # Grayscale converted to RGB: three equal channels, value from the label.
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])
    assert image[:, 2, 2].tolist() == pytest.approx([(label * 20 + 10) / 255.0] * 3)
    raw_image, _ = open_dataset(spec, "mnist", "test")[0]  # no transform: [3, 28, 28] in [0, 1]
    assert raw_image.shape == (3, 28, 28) and float(raw_image.max()) <= 1.0
    _check_train_val(spec, "mnist", 20)
    train = open_dataset(spec, "mnist", "train")
    assert [train[i][1] for i in range(len(train))] == train_y[train.indices.numpy()].tolist()
    assert (
        class_names(spec, "mnist") == [str(d) for d in range(10)]
        and num_classes(spec, "mnist") == 10
    )


def test_missing_torchvision_data_names_task_folder_and_layout(tmp_path: Path) -> None:
    spec = {"source": "torchvision", "root": str(tmp_path)}
    with pytest.raises(ValueError) as error:
        open_dataset(spec, "mnist", "train")
    message = str(error.value)
    assert "`mnist`" in message and str(tmp_path / "mnist") in message and "MNIST/raw" in message
    assert "\n" not in message
    with pytest.raises(ValueError, match=r"`eurosat`.*eurosat/2750"):
        open_dataset(spec, "eurosat", "test")
    with pytest.raises(ValueError, match=r"resisc45.*folder"):
        open_dataset(spec, "resisc45", "test")
    with pytest.raises(ValueError, match=r"resisc45.*folder"):
        class_names(spec, "resisc45")


# --------------------------------------------------------------------------- SVHN


def test_svhn_mat_files_with_label_ten_as_zero(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scipy_io = pytest.importorskip("scipy.io", reason="torchvision's SVHN reader needs scipy")
    from torchvision.datasets import svhn

    root = tmp_path / "svhn"
    root.mkdir()
    digits = np.array([1, 10, 3, 10, 5, 6, 7, 8, 9, 2, 4, 10])  # SVHN writes digit 0 as label 10
    x = np.zeros((32, 32, 3, len(digits)), dtype=np.uint8)
    x[:, :, 0, :] = digits * 10
    scipy_io.savemat(
        root / "train_32x32.mat", {"X": x, "y": digits.reshape(-1, 1).astype(np.uint8)}
    )
    scipy_io.savemat(
        root / "test_32x32.mat", {"X": x[..., :4], "y": digits[:4].reshape(-1, 1).astype(np.uint8)}
    )
    # torchvision checks the MD5 of the real files; our tiny ones cannot match it.
    monkeypatch.setattr(svhn, "check_integrity", lambda fpath, md5=None: Path(fpath).is_file())
    spec = {"source": "torchvision", "root": str(tmp_path)}
    test = open_dataset(spec, "svhn", "test", transform=_resize_to_tensor)
    assert _labels(test) == [1, 0, 3, 0]
    image, _ = test[2]
    assert image.shape == (3, 5, 5) and image[0, 0, 0].item() == pytest.approx(30 / 255)
    _check_train_val(spec, "svhn", len(digits))


# --------------------------------------------------------------------------- GTSRB


def _write_gtsrb(root: Path) -> list[int]:
    base = root / "gtsrb"
    for class_id in range(
        43
    ):  # every class folder must exist: torchvision numbers the folders it finds
        for k in range(2 if class_id < 3 else 1):
            _image(
                base / "GTSRB/Training" / f"{class_id:05d}" / f"00000_{k:05d}.ppm",
                (class_id * 5, 0, 0),
            )
    test_ids = [4, 0, 42, 17]
    with open(base / "GT-final_test.csv", "w", newline="") as fh:
        writer = csv.writer(fh, delimiter=";")
        writer.writerow(
            ["Filename", "Width", "Height", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId"]
        )
        for i, class_id in enumerate(test_ids):
            _image(base / "GTSRB/Final_Test/Images" / f"{i:05d}.ppm", (class_id * 5, 0, 0))
            writer.writerow([f"{i:05d}.ppm", 8, 8, 0, 0, 7, 7, class_id])
    return test_ids


def test_gtsrb_train_folders_and_test_csv(tmp_path: Path) -> None:
    test_ids = _write_gtsrb(tmp_path / "gtsrb")
    spec = {"source": "torchvision", "root": str(tmp_path)}
    test = open_dataset(spec, "gtsrb", "test")
    assert _labels(test) == test_ids
    assert test[2][0][0, 0, 0].item() == pytest.approx(42 * 5 / 255)
    _check_train_val(spec, "gtsrb", 46)
    assert num_classes(spec, "gtsrb") == 43
    # A missing class folder would shift every later label: refused.
    (tmp_path / "gtsrb/gtsrb/GTSRB/Training/00007/00000_00000.ppm").unlink()
    (tmp_path / "gtsrb/gtsrb/GTSRB/Training/00007").rmdir()
    with pytest.raises(ValueError, match=r"`gtsrb`.*label order"):
        open_dataset(spec, "gtsrb", "train")


# --------------------------------------------------------------------------- DTD


def test_dtd_partition_lists(tmp_path: Path) -> None:
    data = tmp_path / "dtd" / "dtd" / "dtd"
    lines: dict[str, list[str]] = {"train1.txt": [], "test1.txt": [], "val1.txt": []}
    for c, name in enumerate(CLASSNAMES["dtd"]):
        for split, k in (("train1.txt", 1), ("train1.txt", 2), ("test1.txt", 3), ("val1.txt", 4)):
            _image(data / "images" / name / f"{name}_{k:04d}.jpg", (c * 5, 0, 0), fmt="JPEG")
            lines[split].append(f"{name}/{name}_{k:04d}.jpg")
    (data / "labels").mkdir()
    for file, entries in lines.items():
        (data / "labels" / file).write_text("\n".join(entries) + "\n")
    spec = {"source": "torchvision", "root": str(tmp_path)}
    test = open_dataset(spec, "dtd", "test")
    assert _labels(test) == list(range(47))
    _check_train_val(spec, "dtd", 94)  # torchvision's partition 1 train list only; val1 unused
    assert class_names(spec, "dtd")[30] == "polka-dotted"
    with pytest.raises(ValueError, match=r"`dtd`.*labels/"):
        open_dataset({**spec, "tasks": {"dtd": {"partition": 2}}}, "dtd", "test")


# --------------------------------------------------------------------------- EuroSAT


def test_eurosat_seeded_per_class_test_holdout(tmp_path: Path) -> None:
    for c, folder in enumerate(EUROSAT_FOLDERS):
        for k in range(5):
            _image(
                tmp_path / "eurosat/eurosat/2750" / folder / f"{folder}_{k}.jpg",
                (c * 20, k * 40, 0),
                fmt="JPEG",
            )
    spec = {
        "source": "torchvision",
        "root": str(tmp_path),
        "tasks": {"eurosat": {"test_per_class": 2}},
    }
    test = open_dataset(spec, "eurosat", "test", transform=_resize_to_tensor)
    assert len(test) == 20 and sorted(_labels(test)) == sorted(list(range(10)) * 2)
    _check_train_val(spec, "eurosat", 30)
    train_paths = {
        open_dataset(spec, "eurosat", s).base.base.samples[int(i)][0]
        for s in ("train", "val")
        for i in open_dataset(spec, "eurosat", s).base.indices
    }
    test_paths = {test.base.base.samples[int(i)][0] for i in test.base.indices}
    assert len(train_paths) == 30 and not train_paths & test_paths
    # The hold-out has its own seed: changing the validation seed never touches test.
    assert torch.equal(
        open_dataset({**spec, "val_seed": 9}, "eurosat", "test").base.indices, test.base.indices
    )
    moved = {**spec, "tasks": {"eurosat": {"test_per_class": 2, "split_seed": 1}}}
    assert not torch.equal(open_dataset(moved, "eurosat", "test").base.indices, test.base.indices)
    assert class_names(spec, "eurosat")[0] == "annual crop land"


# --------------------------------------------------------------------------- SUN397


def _write_sun397(root: Path) -> Path:
    data = root / "sun397" / "SUN397"
    data.mkdir(parents=True)
    # ClassName.txt as in the archive: "/a/abbey", "/a/apartment_building/outdoor", ...
    entries = ["/" + n[0] + "/" + n.replace(" ", "_") for n in CLASSNAMES["sun397"]]
    (data / "ClassName.txt").write_text("\n".join(entries) + "\n")
    for label in (0, 8, 396):
        for k in range(4):
            _image(
                data / entries[label][1:] / f"sun_{label:03d}{k}.jpg",
                (label % 256, k * 50, 0),
                fmt="JPEG",
            )
    return data


def test_sun397_holdout_and_partition_files(tmp_path: Path) -> None:
    data = _write_sun397(tmp_path)
    spec = {
        "source": "torchvision",
        "root": str(tmp_path),
        "tasks": {"sun397": {"test_per_class": 1, "val_fraction": 0.25}},  # 9 samples: v = 2
    }
    test = open_dataset(spec, "sun397", "test")
    assert sorted(_labels(test)) == [0, 8, 396]
    _check_train_val(spec, "sun397", 9)
    # With the official partition files, those lists are the splits.
    entries = (data / "ClassName.txt").read_text().split()
    train_list = [f"{entries[c]}/sun_{c:03d}{k}.jpg" for c in (0, 8, 396) for k in (0, 1)]
    test_list = [f"{entries[c]}/sun_{c:03d}{k}.jpg" for c in (0, 8) for k in (2, 3)]
    (data / "Training_01.txt").write_text("\n".join(train_list) + "\n")
    (data / "Testing_01.txt").write_text("\n".join(test_list) + "\n")
    test = open_dataset(spec, "sun397", "test")
    assert _labels(test) == [0, 0, 8, 8]
    assert (
        len(open_dataset(spec, "sun397", "train")) + len(open_dataset(spec, "sun397", "val")) == 6
    )
    assert class_names(spec, "sun397")[8] == "apartment building outdoor"


# --------------------------------------------------------------------------- Stanford Cars


def test_stanford_cars_devkit(tmp_path: Path) -> None:
    scipy_io = pytest.importorskip(
        "scipy.io", reason="torchvision's StanfordCars reader needs scipy"
    )
    base = tmp_path / "cars" / "stanford_cars"
    (base / "devkit").mkdir(parents=True)
    scipy_io.savemat(
        base / "devkit/cars_meta.mat", {"class_names": np.array(CLASSNAMES["cars"], dtype=object)}
    )
    records = np.dtype([("fname", "O"), ("class", "O")])
    for split, folder, annos, ids in (
        ("train", "cars_train", "devkit/cars_train_annos.mat", [1, 196, 50, 2, 7]),
        ("test", "cars_test", "cars_test_annos_withlabels.mat", [196, 1]),
    ):
        rows = []
        for i, class_id in enumerate(ids):  # devkit class ids are 1-based
            _image(base / folder / f"{i:05d}.jpg", (class_id, 0, 0), fmt="JPEG")
            rows.append((f"{i:05d}.jpg", class_id))
        scipy_io.savemat(base / annos, {"annotations": np.array(rows, dtype=records)})
    spec = {
        "source": "torchvision",
        "root": str(tmp_path),
        "val_fraction": 0.25,
    }  # 5 samples: v = 1
    assert _labels(open_dataset(spec, "cars", "test")) == [195, 0]
    _check_train_val(spec, "cars", 5)
    assert (
        class_names(spec, "cars")[0] == "AM General Hummer SUV 2000"
        and num_classes(spec, "cars") == 196
    )


# --------------------------------------------------------------------------- image folders


def _write_folder(root: Path) -> None:
    for split, per_class in (("train", 4), ("test", 2)):
        for c, name in enumerate(("baseball_diamond", "airplane", "cloud")):
            for k in range(per_class):
                _image(root / split / name / f"{k}.png", (c * 60, k * 30, 200, 128), mode="RGBA")


def test_folder_source_classes_labels_and_rgb(tmp_path: Path) -> None:
    _write_folder(tmp_path / "resisc45")
    (tmp_path / "resisc45/train/cloud/notes.txt").write_text("not an image")
    spec = {"source": "folder", "root": str(tmp_path)}
    assert class_names(spec, "resisc45") == [
        "airplane",
        "baseball diamond",
        "cloud",
    ]  # sorted folders
    test = open_dataset(spec, "resisc45", "test", transform=_resize_to_tensor)
    assert _labels(test) == [0, 0, 1, 1, 2, 2]
    image, _ = test[3]  # baseball_diamond (label 1) was written as colour index 0, file 1
    assert image.shape == (3, 5, 5) and image[:, 0, 0].tolist() == pytest.approx(
        [0.0, 30 / 255, 200 / 255]
    )
    _check_train_val(spec, "resisc45", 12)
    # `classes` fixes the label order (and so the names).
    ordered = {
        **spec,
        "tasks": {"resisc45": {"classes": ["cloud", "airplane", "baseball_diamond"]}},
    }
    assert _labels(open_dataset(ordered, "resisc45", "test")) == [0, 0, 1, 1, 2, 2]
    assert open_dataset(ordered, "resisc45", "test")[0][0][0, 0, 0].item() == pytest.approx(
        120 / 255
    )
    assert class_names(ordered, "resisc45") == ["cloud", "airplane", "baseball diamond"]
    missing_one = {**spec, "tasks": {"resisc45": {"classes": ["cloud", "airplane"]}}}
    with pytest.raises(ValueError, match="baseball_diamond"):
        open_dataset(missing_one, "resisc45", "train")


def test_folder_source_missing_and_empty_folders(tmp_path: Path) -> None:
    spec = {"source": "folder", "root": str(tmp_path)}
    with pytest.raises(ValueError, match=str(tmp_path / "resisc45" / "train")):
        open_dataset(spec, "resisc45", "train")
    with pytest.raises(ValueError, match=str(tmp_path / "resisc45" / "train")):
        class_names(spec, "resisc45")
    (tmp_path / "resisc45/train/a").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"holds no images"):
        open_dataset(spec, "resisc45", "val")
    with pytest.raises(ValueError, match=str(tmp_path / "resisc45" / "test")):
        open_dataset(spec, "resisc45", "test")


# --------------------------------------------------------------------------- parquet


def _png_bytes(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_parquet(root: Path, names: list[str] | None, shards: dict[str, list[list[int]]]) -> None:
    """HF layout: root/data/{split}-0000k-of-0000n.parquet, image {bytes, path} + label."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    features = {"image": {"_type": "Image"}, "label": {"_type": "ClassLabel", "names": names}}
    metadata = (
        {b"huggingface": json.dumps({"info": {"features": features}}).encode()} if names else None
    )
    image_type = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])
    (root / "data").mkdir(parents=True, exist_ok=True)
    for split, parts in shards.items():
        for k, labels in enumerate(parts):
            images = [
                {"bytes": _png_bytes((label * 40, k * 100, i)), "path": f"{split}_{k}_{i}.png"}
                for i, label in enumerate(labels)
            ]
            table = pa.table(
                {"image": pa.array(images, type=image_type), "label": pa.array(labels, pa.int64())}
            )
            table = table.replace_schema_metadata(metadata)
            pq.write_table(
                table,
                root / "data" / f"{split}-{k:05d}-of-{len(parts):05d}.parquet",
                row_group_size=3,
            )


def test_parquet_export_lazy_rows_and_classlabel_names(tmp_path: Path) -> None:
    root = tmp_path / "eurosat"
    train = [[0, 1, 2, 3, 0, 1, 2], [3, 3, 0, 1]]  # two shards, row groups of 3
    _write_parquet(root, ["w", "x", "y", "z"], {"train": train, "test": [[2, 0, 1]]})
    spec = {"source": "parquet", "root": str(tmp_path)}
    assert class_names(spec, "eurosat") == [
        "w",
        "x",
        "y",
        "z",
    ]  # ClassLabel beats the built-in list
    test = open_dataset(spec, "eurosat", "test", transform=_resize_to_tensor)
    assert _labels(test) == [2, 0, 1]
    image, _ = test[1]
    assert image[:, 0, 0].tolist() == pytest.approx([0.0, 0.0, 1 / 255])
    _check_train_val(spec, "eurosat", 11)
    source = open_dataset(spec, "eurosat", "train").base
    assert source.labels.tolist() == train[0] + train[1]
    # Row 8 is shard 1, row 1: colour (label 3 * 40, shard 1 * 100, row 1).
    assert np.asarray(source[8][0])[0, 0].tolist() == [120, 100, 1]
    assert len(source._cache) <= source.cache_row_groups
    # Picklable after use (spawned DataLoader workers), without the open handles.
    clone = pickle.loads(pickle.dumps(source))
    assert clone._handles == {} and np.array_equal(
        np.asarray(clone[8][0]), np.asarray(source[8][0])
    )


def test_parquet_class_names_fallbacks(tmp_path: Path) -> None:
    _write_parquet(tmp_path / "eurosat", None, {"train": [[0, 1]], "test": [[1]]})
    _write_parquet(tmp_path / "custom", None, {"train": [[0, 1]], "test": [[1]]})
    spec = {"source": "parquet", "root": str(tmp_path)}
    assert class_names(spec, "eurosat") == list(CLASSNAMES["eurosat"])  # the known task's list
    with pytest.raises(ValueError, match=r"`custom`.*classes"):
        class_names(spec, "custom")
    with_list = {**spec, "tasks": {"custom": {"classes": ["no", "yes"]}}}
    assert class_names(with_list, "custom") == ["no", "yes"]
    # A dataset card's YAML header (as on the Hub) also gives the names.
    (tmp_path / "custom/README.md").write_text(
        "---\ndataset_info:\n  features:\n  - name: image\n    dtype: image\n  - name: label\n    dtype:\n"
        "      class_label:\n        names:\n          '0': cold\n          '1': hot\n---\n# Custom\n"
    )
    assert class_names(spec, "custom") == ["cold", "hot"]
    (tmp_path / "custom/dataset_info.json").write_text(
        json.dumps({"features": {"label": {"names": ["a", "b"]}}})
    )
    assert class_names(spec, "custom") == ["a", "b"]


def test_parquet_path_only_cells_and_missing_files(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path / "custom"
    _image(root / "data" / "pics" / "a.png", (9, 8, 7))
    image_type = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])
    table = pa.table(
        {
            "image": pa.array([{"bytes": None, "path": "pics/a.png"}], type=image_type),
            "label": pa.array([0], pa.int64()),
        }
    )
    pq.write_table(table, root / "data" / "test-00000-of-00001.parquet")
    spec = {"source": "parquet", "root": str(tmp_path), "tasks": {"custom": {"classes": ["only"]}}}
    assert np.asarray(
        open_dataset(spec, "custom", "test")[0][0].mul(255).round()[:, 0, 0]
    ).tolist() == [9, 8, 7]
    with pytest.raises(ValueError, match=r"no parquet files for split `train`"):
        open_dataset(spec, "custom", "train")
    pq.write_table(
        table.rename_columns(["img", "label"]), root / "data" / "train-00000-of-00001.parquet"
    )
    with pytest.raises(ValueError, match=r"column `image` is missing"):
        open_dataset(spec, "custom", "val")


# --------------------------------------------------------------------------- names and templates


def test_known_tasks_have_consistent_names_and_templates() -> None:
    sizes = {
        "cars": 196,
        "dtd": 47,
        "eurosat": 10,
        "gtsrb": 43,
        "mnist": 10,
        "resisc45": 45,
        "sun397": 397,
        "svhn": 10,
        # the twelve the 14- and 20-task benchmarks add
        "cifar100": 100,
        "stl10": 10,
        "flowers102": 102,
        "oxford_pets": 37,
        "pcam": 2,
        "fer2013": 7,
        "emnist": 10,
        "cifar10": 10,
        "food101": 101,
        "fashion_mnist": 10,
        "rendered_sst2": 2,
        "kmnist": 10,
    }
    assert {task: len(names) for task, names in CLASSNAMES.items()} == sizes
    for task, names in CLASSNAMES.items():
        assert len(set(names)) == len(names), task
        assert all("{}" in t for t in TEMPLATES[task])
    # Folder-sorted datasets list their classes in sorted order.
    for task in ("dtd", "resisc45", "sun397"):
        assert list(CLASSNAMES[task]) == sorted(CLASSNAMES[task]), task
    assert list(EUROSAT_FOLDERS) == sorted(EUROSAT_FOLDERS)
    spec = {"source": "torchvision", "tasks": {"mnist": {"templates": ["digit {}"]}}}
    assert prompt_templates(spec, "mnist") == ["digit {}"]
    assert prompt_templates(spec, "gtsrb") == list(TEMPLATES["gtsrb"])
    assert "{}" in prompt_templates({"source": "folder"}, "custom")[0]
    with pytest.raises(ValueError, match="template"):
        prompt_templates({"tasks": {"mnist": {"templates": ["no placeholder"]}}}, "mnist")
