"""Small generated data trees in real layouts, for tests and dry runs.

:func:`write_task_vectors_tree` writes all eight tasks in the task-vectors release's layout
under one data location: every class present, a few tiny images per class, each file in
the format the release's reader opens (JPEG/PPM folders, Stanford Cars' ``.mat``
annotations, GTSRB's ``;``-separated CSV, RESISC45's split lists, MNIST's idx files,
SVHN's ``.mat``). File names sort differently as strings and as numbers (``_1``, ``_10``,
``_2``) and list files are not in sorted order, so a reader that lists samples in another
order than the release's is caught.
"""

from __future__ import annotations

import csv
import struct
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.data.classnames import CLASSNAMES, EUROSAT_FOLDERS, sun397_folder

__all__ = ["TASK_VECTORS_SIZES", "write_task_vectors_tree"]

TASK_VECTORS_SIZES: dict[str, dict[str, int]] = {
    "cars": {"train": 24, "test": 12},
    "dtd": {"train": 2 * 47, "test": 47},
    "eurosat": {"train": 3 * 10, "val": 10, "test": 10},
    "gtsrb": {"train": 2 * 43, "test": 20},
    "mnist": {"train": 30, "test": 12},
    "resisc45": {"train": 2 * 45, "test": 45},
    "sun397": {"train": 397, "test": 397},
    "svhn": {"train": 25, "test": 11},
}
"""Samples per source split that :func:`write_task_vectors_tree` writes."""

_SUFFIXES = ("1", "10", "2")  # string order 1, 10, 2: differs from numeric order


def _image(rng: np.random.Generator, size: int = 8) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def _image_folder(
    folder: Path, classes: list[str], per_class: int, rng: np.random.Generator, ext: str = ".jpg"
) -> None:
    """``folder/<class>/<class>_<n><ext>``, ``per_class`` files each (names from _SUFFIXES)."""
    for name in classes:
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            _image(rng).save(folder / name / f"{name}_{_SUFFIXES[i % 3]}{'x' * (i // 3)}{ext}")


def _idx(path: Path, array: np.ndarray) -> None:
    """An MNIST idx file: magic (0x0803 images, 0x0801 labels), big-endian sizes, uint8 data."""
    header = struct.pack(">I", 0x0800 | array.ndim) + b"".join(
        struct.pack(">I", d) for d in array.shape
    )
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_task_vectors_tree(root: str | Path, seed: int = 0) -> None:
    """Write the eight tasks in the release's layout under ``root`` (its ``data_location``).

    Sizes per split are :data:`TASK_VECTORS_SIZES`. Every class of every task is present
    in every image folder (the release numbers labels by sorted folder names).
    """
    from scipy.io import savemat

    root = Path(root)
    rng = np.random.default_rng(seed)

    # EuroSAT_splits/{train,val,test}/<folder>/*.jpg
    for split, per in (("train", 3), ("val", 1), ("test", 1)):
        _image_folder(root / "EuroSAT_splits" / split, list(EUROSAT_FOLDERS), per, rng)
    # dtd/{train,val}: train = train1 + val1, val = test1
    _image_folder(root / "dtd/train", list(CLASSNAMES["dtd"]), 2, rng)
    _image_folder(root / "dtd/val", list(CLASSNAMES["dtd"]), 1, rng)
    # sun397/{train,val}/<letter>_<path>/
    folders = [sun397_folder(n) for n in CLASSNAMES["sun397"]]
    _image_folder(root / "sun397/train", folders, 1, rng)
    _image_folder(root / "sun397/val", folders, 1, rng)

    # RESISC45: NWPU-RESISC45/<class>/<class>_NNN.jpg and the split lists (file names)
    classes = [c.replace(" ", "_") for c in CLASSNAMES["resisc45"]]
    lists: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for name in classes:
        (root / "resisc45/NWPU-RESISC45" / name).mkdir(parents=True, exist_ok=True)
        files = [f"{name}_{i:03d}.jpg" for i in (1, 2, 3, 4)]
        for f in files:
            _image(rng).save(root / "resisc45/NWPU-RESISC45" / name / f)
        lists["train"] += [files[2], files[0]]
        lists["val"].append(files[1])
        lists["test"].append(files[3])
    for split, names in lists.items():
        order = rng.permutation(len(names))  # the published lists are not sorted
        (root / "resisc45" / f"resisc45-{split}.txt").write_text(
            "".join(names[i] + "\n" for i in order)
        )

    # GTSRB: Training/<00000..00042>/*.ppm (+ the per-class GT csv), test csv + Final_Test/Images
    training = root / "gtsrb/GTSRB/Training"
    _image_folder(training, [f"{i:05d}" for i in range(43)], 2, rng, ext=".ppm")
    for i in range(43):
        (training / f"{i:05d}" / f"GT-{i:05d}.csv").write_text(
            "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n"
        )
    images = root / "gtsrb/GTSRB/Final_Test/Images"
    images.mkdir(parents=True, exist_ok=True)
    n_test = TASK_VECTORS_SIZES["gtsrb"]["test"]
    test_labels = rng.integers(0, 43, n_test)
    with open(root / "gtsrb/GT-final_test.csv", "w", newline="") as fh:
        writer = csv.writer(fh, delimiter=";")
        writer.writerow(
            ["Filename", "Width", "Height", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId"]
        )
        for j in rng.permutation(n_test):  # rows not in file-name order
            name = f"{j:05d}.ppm"
            _image(rng).save(images / name)
            writer.writerow([name, 8, 8, 0, 0, 7, 7, int(test_labels[j])])

    # Stanford Cars: devkit/{cars_meta,cars_train_annos}.mat, cars_test_annos_withlabels.mat
    base = root / "stanford_cars"
    (base / "devkit").mkdir(parents=True, exist_ok=True)
    savemat(
        base / "devkit/cars_meta.mat",
        {"class_names": np.array(list(CLASSNAMES["cars"]), dtype=object).reshape(1, -1)},
    )
    for split, annos in (
        ("train", base / "devkit/cars_train_annos.mat"),
        ("test", base / "cars_test_annos_withlabels.mat"),
    ):
        n = TASK_VECTORS_SIZES["cars"][split]
        folder = base / f"cars_{split}"
        folder.mkdir(parents=True, exist_ok=True)
        record = np.zeros(
            (1, n),
            dtype=[
                (k, "O") for k in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")
            ],
        )
        for j, k in enumerate(rng.permutation(n)):  # annotation order differs from file-name order
            fname = f"{k + 1:05d}.jpg"
            _image(rng).save(folder / fname)
            record[0, j] = (0, 0, 7, 7, int(rng.integers(1, 197)), fname)
        savemat(annos, {"annotations": record})

    # MNIST: torchvision's unpacked idx files under MNIST/raw
    raw = root / "MNIST/raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, split in (("train", "train"), ("t10k", "test")):
        n = TASK_VECTORS_SIZES["mnist"][split]
        _idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _idx(raw / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n))

    # SVHN: svhn/{train,test}_32x32.mat, X [32, 32, 3, N] uint8, y [N, 1] in 1..10 (10 is digit 0)
    (root / "svhn").mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        n = TASK_VECTORS_SIZES["svhn"][split]
        y = rng.integers(1, 11, (n, 1)).astype(np.uint8)
        y[0, 0] = 10
        savemat(
            root / "svhn" / f"{split}_32x32.mat",
            {"X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8), "y": y},
        )
