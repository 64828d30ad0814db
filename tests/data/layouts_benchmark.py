"""Small generated trees of the twelve datasets the 14- and 20-task benchmarks add, in the
layouts the tall-masks code's readers open under its data location.

:func:`write_benchmark_tree` writes every class of every dataset with one to three tiny
images, in each dataset's own format (CIFAR python pickles, STL10's column-major binary,
Flowers102's ``.mat`` files, Oxford-IIIT Pet's annotation lists, Food-101's json, rendered
SST2's folders, idx files for EMNIST/KMNIST/FashionMNIST, a parquet export for FER2013 and
HDF5 for PCAM when h5py is installed). Sample orders are not sorted orders (Food-101's json
lists classes backwards, Flowers102's ids and the pet lists are shuffled), so a reader that
lists samples in another order than the dataset's reader is caught. It returns the labels each
split must read back, in order.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.data.classnames import CLASSNAMES

__all__ = ["write_benchmark_tree"]

_PET_RAW = [  # the annotation files' breed names, in class-id order
    "Abyssinian",
    "american_bulldog",
    "american_pit_bull_terrier",
    "basset_hound",
    "beagle",
    "Bengal",
    "Birman",
    "Bombay",
    "boxer",
    "British_Shorthair",
    "chihuahua",
    "Egyptian_Mau",
    "english_cocker_spaniel",
    "english_setter",
    "german_shorthaired",
    "great_pyrenees",
    "havanese",
    "japanese_chin",
    "keeshond",
    "leonberger",
    "Maine_Coon",
    "miniature_pinscher",
    "newfoundland",
    "Persian",
    "pomeranian",
    "pug",
    "Ragdoll",
    "Russian_Blue",
    "saint_bernard",
    "samoyed",
    "scottish_terrier",
    "shiba_inu",
    "Siamese",
    "Sphynx",
    "staffordshire_bull_terrier",
    "wheaten_terrier",
    "yorkshire_terrier",
]


def _pixels(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.integers(0, 256, shape, dtype=np.uint8)


def _jpeg(path: Path, rng: np.random.Generator, ext: str = "JPEG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_pixels(rng, 8, 8, 3)).save(path, ext)


def _idx(path: Path, array: np.ndarray) -> None:
    """An idx file (MNIST family): magic 0x0800 | ndim, big-endian sizes, uint8 data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">I", 0x0800 | array.ndim) + b"".join(
        struct.pack(">I", d) for d in array.shape
    )
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _pickle(path: Path, entry: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(entry, protocol=2))


def _labels(n_classes: int, per_class: int, rng: np.random.Generator) -> list[int]:
    """Every class ``per_class`` times, shuffled."""
    return rng.permutation(np.repeat(np.arange(n_classes), per_class)).tolist()


def write_benchmark_tree(root: str | Path, seed: int = 0) -> dict[str, dict[str, list[int]]]:
    """Write the twelve added datasets under ``root`` (the data location); returns
    task -> source split -> the labels its reader must list, in order."""
    from scipy.io import savemat

    root = Path(root)
    rng = np.random.default_rng(seed)
    expected: dict[str, dict[str, list[int]]] = {}

    # CIFAR10 / CIFAR100: pickled dicts, data [N, 3072] channel-planar rows
    for task, folder, files, names_key, label_key in (
        (
            "cifar10",
            "cifar-10-batches-py",
            {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
            "label_names",
            "labels",
        ),
        (
            "cifar100",
            "cifar-100-python",
            {"train": ["train"], "test": ["test"]},
            "fine_label_names",
            "fine_labels",
        ),
    ):
        n = len(CLASSNAMES[task])
        meta = "batches.meta" if task == "cifar10" else "meta"
        _pickle(root / folder / meta, {names_key: list(CLASSNAMES[task]), "num_cases_per_batch": 2})
        expected[task] = {}
        for split, names in files.items():
            expected[task][split] = []
            for name in names:
                labels = _labels(n, 1, rng)[: 3 if task == "cifar10" else n]
                data = _pixels(rng, len(labels), 3 * 32 * 32)
                _pickle(
                    root / folder / name, {"batch_label": b"batch", label_key: labels, "data": data}
                )
                expected[task][split] += labels

    # STL10: stl10/stl10_binary/{split}_X.bin [N, 3, 96, 96] column-major, {split}_y.bin 1..10
    folder = root / "stl10/stl10_binary"
    folder.mkdir(parents=True)
    (folder / "class_names.txt").write_text("\n".join(CLASSNAMES["stl10"]) + "\n")
    expected["stl10"] = {}
    for split in ("train", "test"):
        labels = _labels(10, 1, rng)
        (folder / f"{split}_X.bin").write_bytes(_pixels(rng, len(labels), 3, 96, 96).tobytes())
        (folder / f"{split}_y.bin").write_bytes((np.array(labels) + 1).astype(np.uint8).tobytes())
        expected["stl10"][split] = labels

    # Flowers102: flowers102/flowers-102/{jpg/image_NNNNN.jpg, imagelabels.mat, setid.mat}
    folder = root / "flowers102/flowers-102"
    per_image = _labels(102, 2, rng)  # image i (1-based) has label per_image[i - 1]
    for i in range(1, len(per_image) + 1):
        _jpeg(folder / "jpg" / f"image_{i:05d}.jpg", rng)
    savemat(folder / "imagelabels.mat", {"labels": np.array([per_image]) + 1})
    ids = rng.permutation(np.arange(1, len(per_image) + 1))
    trn, tst = ids[: len(ids) // 2], ids[len(ids) // 2 :]
    savemat(folder / "setid.mat", {"trnid": trn[None], "valid": trn[None, :1], "tstid": tst[None]})
    expected["flowers102"] = {
        "train": [per_image[i - 1] for i in trn],
        "test": [per_image[i - 1] for i in tst],
    }

    # Oxford-IIIT Pet: OxfordIIITPet/oxford-iiit-pet/{annotations/{trainval,test}.txt, images/}
    folder = root / "OxfordIIITPet/oxford-iiit-pet"
    (folder / "annotations").mkdir(parents=True)
    expected["oxford_pets"] = {}
    for split, listing in (("train", "trainval"), ("test", "test")):
        labels = _labels(37, 1, rng)
        lines = []
        for k, label in enumerate(labels):
            image_id = f"{_PET_RAW[label]}_{100 + k if split == 'train' else 200 + k}"
            _jpeg(folder / "images" / f"{image_id}.jpg", rng)
            species = 1 if _PET_RAW[label][0].isupper() else 2
            lines.append(f"{image_id} {label + 1} {species} 1")
        (folder / "annotations" / f"{listing}.txt").write_text("\n".join(lines) + "\n")
        expected["oxford_pets"][split] = labels

    # Food-101: food101/food-101/{meta/{train,test}.json, images/<class>/<id>.jpg}; the json
    # lists classes backwards (the reader walks it in file order, labels by sorted name).
    folder = root / "food101/food-101"
    (folder / "meta").mkdir(parents=True)
    classes = list(CLASSNAMES["food101"])
    expected["food101"] = {}
    for split, per in (("train", 2), ("test", 1)):
        meta, labels = {}, []
        for label in reversed(range(len(classes))):
            ids = [f"{classes[label]}/{split}{k}" for k in range(per)]
            for image_id in ids:
                _jpeg(folder / "images" / f"{image_id}.jpg", rng)
            meta[classes[label]] = ids
            labels += [label] * per
        (folder / "meta" / f"{split}.json").write_text(json.dumps(meta))
        expected["food101"][split] = labels

    # Rendered SST2: RenderedSST2/rendered-sst2/{train,test}/{negative,positive}/*.png
    expected["rendered_sst2"] = {}
    for split, per in (("train", 3), ("test", 2)):
        for name in ("negative", "positive"):
            for k in (1, 10, 2)[:per]:
                _jpeg(root / "RenderedSST2/rendered-sst2" / split / name / f"{k}.png", rng, "PNG")
        expected["rendered_sst2"][split] = [0] * per + [1] * per

    # EMNIST (digits), KMNIST, FashionMNIST: idx files under <Name>/<Name>/raw
    for task, folder, prefixes in (
        (
            "emnist",
            "EMNIST/EMNIST/raw",
            {"train": "emnist-digits-train", "test": "emnist-digits-test"},
        ),
        ("kmnist", "KMNIST/KMNIST/raw", {"train": "train", "test": "t10k"}),
        ("fashion_mnist", "FashionMNIST/FashionMNIST/raw", {"train": "train", "test": "t10k"}),
    ):
        expected[task] = {}
        for split, prefix in prefixes.items():
            labels = _labels(10, 2 if split == "train" else 1, rng)
            _idx(root / folder / f"{prefix}-images-idx3-ubyte", _pixels(rng, len(labels), 28, 28))
            _idx(root / folder / f"{prefix}-labels-idx1-ubyte", np.array(labels))
            expected[task][split] = labels

    # FER2013: the parquet export of Jeneral/fer-2013 (img_bytes, labels)
    import pyarrow as pa
    import pyarrow.parquet as pq

    expected["fer2013"] = {}
    for split in ("train", "test"):
        labels = _labels(7, 2, rng)
        cells = []
        for _ in labels:
            buf = io.BytesIO()
            Image.fromarray(_pixels(rng, 8, 8)).save(buf, "PNG")
            cells.append(buf.getvalue())
        folder = root / "FER2013/default" / split
        folder.mkdir(parents=True)
        table = pa.table(
            {"img_bytes": pa.array(cells, pa.binary()), "labels": pa.array(labels, pa.int64())}
        )
        pq.write_table(table, folder / "0000.parquet", row_group_size=5)
        expected["fer2013"][split] = labels

    # PCAM: PCAM/pcam/camelyonpatch_level_2_split_{split}_{x,y}.h5 (needs h5py)
    try:
        import h5py
    except ImportError:
        h5py = None
    if h5py is not None:
        folder = root / "PCAM/pcam"
        folder.mkdir(parents=True)
        expected["pcam"] = {}
        for split in ("train", "test"):
            labels = _labels(2, 3, rng)
            with h5py.File(folder / f"camelyonpatch_level_2_split_{split}_x.h5", "w") as fh:
                fh["x"] = _pixels(rng, len(labels), 96, 96, 3)
            with h5py.File(folder / f"camelyonpatch_level_2_split_{split}_y.h5", "w") as fh:
                fh["y"] = np.array(labels, dtype=np.uint8).reshape(-1, 1, 1, 1)
            expected["pcam"][split] = labels
    return expected
