"""Readers of the real tasks: the task-vectors release's layout, torchvision datasets, image
folders and Hugging Face parquet exports.

Each reader opens one *source split* (the dataset's own `train` or `test`; EuroSAT in the
release's layout also `val`) as a ``torch.utils.data.Dataset`` whose items are
``(PIL.Image, int label)``; nothing is decoded before an item is asked for.
``pipeline.data`` carves our `val` split out of the source's train split and applies the
backbone's transform on top.

task_vectors (``data.layout: task_vectors``; :func:`open_task_vectors_split`): the files
the release's readers (mlfoundations/task_vectors ``src/datasets/*.py``) open under its one
data location, listed in their order, so that index i is the release reader's index i
(:data:`TASK_VECTORS_FILES`; docs/data.md has the tree and how to prepare it):

=========  ==========================================  ========================================
task       train / test (/ val)                        order
=========  ==========================================  ========================================
cars       stanford_cars devkit annotations            the .mat annotation order
dtd        dtd/train, dtd/val                          ImageFolder: sorted classes, sorted files
eurosat    EuroSAT_splits/{train,test,val}             ImageFolder
gtsrb      gtsrb/GTSRB/Training, GT-final_test.csv     sorted folders' .ppm files; csv rows
mnist      MNIST/raw idx files                         torchvision's MNIST
resisc45   NWPU-RESISC45 ∩ resisc45-{train,test}.txt   ImageFolder (the list only filters)
sun397     sun397/train, sun397/val                    ImageFolder
svhn       svhn/{train,test}_32x32.mat                 the file's order (torchvision's SVHN)
=========  ==========================================  ========================================

The twelve tasks the 14- and 20-task benchmarks add are read under the same data location
in the layouts of the tall-masks code's readers (nik-dim/tall_masks ``src/datasets/*.py``,
:data:`BENCHMARK_FILES`), in their order: CIFAR10/100 and STL10 in file order, Flowers102 in
``setid.mat``'s order, the Oxford-IIIT Pet lists' order, Food-101's json order, rendered SST2
in ImageFolder order, the MNIST family and PCAM in file order, FER2013 in the parquet
export's row order.

The following sources serve ``data.layout: sources``.

``cfg`` is a task's resolved data settings (see ``pipeline.data.task_config``): a dict
with ``root`` (the task's folder), ``download`` and the source-specific keys below.

torchvision (``download=False`` unless ``download: true``; root holds what torchvision
expects, e.g. ``root/MNIST/raw/...``; a missing folder is a ValueError naming it):

=========  ============================================  =============================================
task       train / test                                  notes
=========  ============================================  =============================================
mnist      MNIST train / test                            grayscale, converted to RGB
svhn       SVHN train / test (``extra`` unused)          label 10 is digit 0 (torchvision maps it)
gtsrb      GTSRB train / test                            class ids 0..42
dtd        partition ``partition`` (1) train / test      DTD's ``val`` lists are not used (the
                                                         task_vectors layout trains on train1 + val1)
eurosat    seeded per-class hold-out of                  ``test_per_class`` (270) images per class are
           ``test_per_class`` images                     test: the task-vectors split's size (2,700
                                                         test), not its images
sun397     official ``Training_0p.txt`` /                without the partition files (not part of
           ``Testing_0p.txt`` if present, p =            torchvision's download): a seeded hold-out of
           ``partition`` (1)                             ``test_per_class`` (50) images per class
cars       StanfordCars train / test                     devkit order of ``cars_meta.mat``
=========  ============================================  =============================================

Hold-outs use ``split_seed`` (0), independent of the `val` seed, so that changing the
validation seed never moves an image into or out of `test`.

folder: ``root/{train,test}/{class}/**/*.{jpg,jpeg,png,ppm,bmp,pgm,tif,tiff,webp}``;
classes are the sorted folder names of ``root/train`` unless ``classes`` lists them
(that list then fixes label order, and a folder not in it is an error).

parquet: Hugging Face exports (``tanganke/<task>``): ``root/data/{split}-*.parquet``
(also ``root/{split}-*.parquet``, ``root/{split}/*.parquet``, ``root/data/{split}/*.parquet``,
``root/default/{split}/*.parquet``), an ``image`` column of ``{bytes, path}`` structs
(the ``datasets.Image`` feature's storage) and an int ``label`` column
(``image_column`` / ``label_column`` rename them). Rows are read lazily, one row group at
a time, with a small cache of decoded row groups.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from pipeline.data.classnames import (
    BENCHMARK_DATASETS,
    CLASSNAMES,
    EUROSAT_FOLDERS,
    sun397_folder,
)
from pipeline.data.splits import IndexedView, per_class_holdout

log = logging.getLogger(__name__)

__all__ = [
    "BENCHMARK_FILES",
    "IMAGE_EXTENSIONS",
    "TASK_VECTORS_FILES",
    "TASK_VECTORS_SPLITS",
    "TORCHVISION_TASKS",
    "ArrayImages",
    "FileSamples",
    "ImageFolderSplit",
    "ParquetSplit",
    "SVHNMat",
    "folder_classes",
    "image_folder_samples",
    "open_source_split",
    "open_task_vectors_split",
    "parquet_class_names",
]

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg",
    ".jpeg",
    ".png",
    ".ppm",
    ".bmp",
    ".pgm",
    ".tif",
    ".tiff",
    ".webp",
)

# What torchvision expects under a task's root, for the error when it is not there.
_TORCHVISION_LAYOUT: dict[str, str] = {
    "mnist": "MNIST/raw/{train,t10k}-images-idx3-ubyte and {train,t10k}-labels-idx1-ubyte",
    "svhn": "{split}_32x32.mat with torchvision's MD5 (train_32x32.mat, test_32x32.mat)",
    "gtsrb": "gtsrb/GTSRB/Training/<class id>/*.ppm, gtsrb/GTSRB/Final_Test/Images/*.ppm "
    "and gtsrb/GT-final_test.csv",
    "dtd": "dtd/dtd/images/<class>/*.jpg and dtd/dtd/labels/{train,test}<partition>.txt",
    "eurosat": "eurosat/2750/<class>/*.jpg",
    "sun397": "SUN397/ClassName.txt and SUN397/<letter>/<class>/sun_*.jpg",
    "cars": "stanford_cars/devkit/{cars_meta.mat,cars_train_annos.mat}, stanford_cars/cars_train/, "
    "stanford_cars/cars_test_annos_withlabels.mat and stanford_cars/cars_test/",
}

TORCHVISION_TASKS: tuple[str, ...] = tuple(sorted(_TORCHVISION_LAYOUT))
"""Tasks the `torchvision` source can read (RESISC45 has no torchvision dataset)."""


# --------------------------------------------------------------------------- torchvision


def _torchvision_error(task: str, root: Path, err: Exception) -> ValueError:
    """One-line ValueError for a torchvision dataset that could not be opened."""
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    return ValueError(
        f"task `{task}`: no torchvision data under {root} ({reason}); expected "
        f"{_TORCHVISION_LAYOUT[task]} there (or set data.download: true where torchvision can download it)"
    )


def _check_classes(task: str, root: Path, found: list[str], expected: list[str]) -> None:
    """Label order guard: torchvision numbers classes from the files it finds."""
    if found != expected:
        missing = sorted(set(expected) - set(found))
        extra = sorted(set(found) - set(expected))
        raise ValueError(
            f"task `{task}`: the classes found under {root} do not give the expected label order "
            f"({len(found)} classes, expected {len(expected)}; missing {missing[:3]}, unexpected {extra[:3]})"
        )


def _sun397_name(path_name: str) -> str:
    """ClassName.txt entry as torchvision stores it ("apartment_building/outdoor") to a class name."""
    return path_name.replace("/", " ").replace("_", " ")


def _sun397_split(task: str, root: Path, base: Any, split: str, cfg: dict[str, Any]) -> Tensor:
    """Indices into the sorted SUN397 files for our source split (partition files or hold-out)."""
    partition = int(cfg.get("partition", 1))
    name = f"{'Training' if split == 'train' else 'Testing'}_{partition:02d}.txt"
    data_dir = root / "SUN397"
    listing = next((p for p in (data_dir / name, root / name) if p.is_file()), None)
    if listing is None:
        log.info(
            "task %s: no %s under %s; holding out %s images per class",
            task,
            name,
            data_dir,
            cfg.get("test_per_class", 50),
        )
        train, test = per_class_holdout(
            torch.tensor(base._labels),
            int(cfg.get("test_per_class", 50)),
            int(cfg.get("split_seed", 0)),
        )
        return train if split == "train" else test
    position = {
        "/" + p.relative_to(data_dir).as_posix(): i for i, p in enumerate(base._image_files)
    }
    wanted = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    missing = [w for w in wanted if w not in position]
    if missing:
        raise ValueError(
            f"task `{task}`: {listing} lists {len(missing)} images not found under {data_dir}, "
            f"e.g. {missing[0]}"
        )
    return torch.tensor(sorted(position[w] for w in wanted), dtype=torch.int64)


def _open_torchvision(task: str, split: str, cfg: dict[str, Any]) -> Dataset:
    """The source split of a torchvision dataset, items (PIL image, int label)."""
    from torchvision import datasets

    if task not in _TORCHVISION_LAYOUT:
        raise ValueError(
            f"task `{task}` has no torchvision dataset (torchvision tasks: {', '.join(TORCHVISION_TASKS)}); "
            f"set data.tasks.{task}.source to `folder` or `parquet`"
        )
    root = Path(cfg["root"])
    download = bool(cfg.get("download", False))
    train = split == "train"
    try:
        if task == "mnist":
            return datasets.MNIST(str(root), train=train, download=download)
        if task == "svhn":
            return datasets.SVHN(str(root), split=split, download=download)
        if task == "gtsrb":
            base = datasets.GTSRB(str(root), split=split, download=download)
            if train:  # class ids come from the sorted folder names: all 43 must be there
                folders = sorted(
                    p.name for p in (root / "gtsrb/GTSRB/Training").iterdir() if p.is_dir()
                )
                _check_classes(
                    task, root, folders, [f"{i:05d}" for i in range(len(CLASSNAMES[task]))]
                )
            return base
        if task == "dtd":
            base = datasets.DTD(
                str(root), split=split, partition=int(cfg.get("partition", 1)), download=download
            )
            _check_classes(task, root, list(base.classes), list(CLASSNAMES[task]))
            return base
        if task == "cars":
            base = datasets.StanfordCars(str(root), split=split, download=download)
            _check_classes(task, root, list(base.classes), list(CLASSNAMES[task]))
            return base
        if task == "eurosat":
            base = datasets.EuroSAT(str(root), download=download)
            _check_classes(task, root, list(base.classes), list(EUROSAT_FOLDERS))
            rest, held = per_class_holdout(
                torch.tensor(base.targets),
                int(cfg.get("test_per_class", 270)),
                int(cfg.get("split_seed", 0)),
            )
            return IndexedView(base, rest if train else held)
        # sun397: torchvision globs the files in file-system order; sort them so that
        # splits and seeds mean the same images on every machine.
        base = datasets.SUN397(str(root), download=download)
        _check_classes(task, root, [_sun397_name(c) for c in base.classes], list(CLASSNAMES[task]))
        order = sorted(range(len(base._image_files)), key=lambda i: str(base._image_files[i]))
        base._image_files = [base._image_files[i] for i in order]
        base._labels = [base._labels[i] for i in order]
        return IndexedView(base, _sun397_split(task, root, base, split, cfg))
    except (RuntimeError, OSError) as err:
        raise _torchvision_error(task, root, err) from err


# --------------------------------------------------------------------------- image folders


def folder_classes(root: Path, classes: list[str] | None = None) -> list[str]:
    """Class folder names in label order: ``classes`` if given, else sorted names under ``root/train``.

    Falls back to ``root/test`` when there is no train folder (evaluation-only tasks).
    """
    if classes is not None:
        return [str(c) for c in classes]
    for split in ("train", "test"):
        folder = root / split
        if folder.is_dir():
            names = sorted(
                p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")
            )
            if not names:
                raise ValueError(
                    f"image folder {folder} has no class folders (expected {folder}/<class>/*.jpg)"
                )
            return names
    raise ValueError(
        f"image folder {root / 'train'} does not exist (expected {root}/{{train,test}}/<class>/*.jpg)"
    )


class FileSamples(Dataset):
    """(PIL image, label) items read from a list of (path, label), in that order."""

    def __init__(self, samples: list[tuple[str, int]]) -> None:
        self.samples = samples
        self.targets = [label for _, label in samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        path, label = self.samples[index]
        with open(path, "rb") as fh:
            image = Image.open(fh)
            image.load()
        return image, label


class ImageFolderSplit(FileSamples):
    """``root/{split}/{class}/**/*.{jpg,png,...}`` as (PIL image, label) items, files sorted per class.

    Args:
        root: the task's folder.
        split: ``train`` or ``test``.
        classes: class folder names in label order (see :func:`folder_classes`).
    """

    def __init__(self, root: str | Path, split: str, classes: list[str] | None = None) -> None:
        root = Path(root)
        self.classes = folder_classes(root, classes)
        folder = root / split
        if not folder.is_dir():
            raise ValueError(
                f"image folder {folder} does not exist (expected {folder}/<class>/*.jpg)"
            )
        present = sorted(
            p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")
        )
        unknown = [name for name in present if name not in self.classes]
        if unknown:
            raise ValueError(
                f"image folder {folder}: class folder `{unknown[0]}` is not one of the task's "
                f"{len(self.classes)} classes (from `classes` or {root / 'train'})"
            )
        self.samples: list[tuple[Path, int]] = []
        for label, name in enumerate(self.classes):
            files = sorted(
                p for p in (folder / name).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS
            )
            self.samples.extend((path, label) for path in files)
        if not self.samples:
            raise ValueError(
                f"image folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})"
            )
        self.targets = [label for _, label in self.samples]


# --------------------------------------------------------------------------- parquet

_PARQUET_PATTERNS = (
    "data/{split}-*.parquet",
    "{split}-*.parquet",
    "data/{split}/*.parquet",
    "{split}/*.parquet",
    "default/{split}/*.parquet",
)


def parquet_files(root: Path, split: str) -> list[Path]:
    """The sorted parquet shards of ``split`` under ``root`` (first layout that matches)."""
    for pattern in _PARQUET_PATTERNS:
        files = sorted(root.glob(pattern.format(split=split)))
        if files:
            return files
    raise ValueError(
        f"no parquet files for split `{split}` under {root} (expected {root}/data/{split}-*.parquet)"
    )


def _features_class_names(features: Any, label_column: str) -> list[str] | None:
    """ClassLabel names of ``label_column`` from a `datasets` features description.

    Accepts the dict form (parquet metadata, dataset_info.json:
    ``{"label": {"_type": "ClassLabel", "names": [...]}}``) and the dataset card's list
    form (``[{"name": "label", "dtype": {"class_label": {"names": {"0": ...}}}}]``).
    """
    if isinstance(features, dict):
        feature = features.get(label_column)
        if isinstance(feature, dict) and isinstance(feature.get("names"), list):
            return [str(n) for n in feature["names"]]
        return None
    if isinstance(features, list):
        for feature in features:
            if isinstance(feature, dict) and feature.get("name") == label_column:
                dtype = feature.get("dtype")
                names = (
                    dtype.get("class_label", {}).get("names") if isinstance(dtype, dict) else None
                )
                if isinstance(names, dict):
                    return [str(names[k]) for k in sorted(names, key=lambda k: int(k))]
                if isinstance(names, list):
                    return [str(n) for n in names]
    return None


def _card_features(readme: Path) -> list[Any]:
    """``dataset_info.features`` entries of a dataset card's YAML header (one per config)."""
    import yaml

    text = readme.read_text(encoding="utf-8")
    if not text.startswith("---"):
        return []
    header = text.split("---", 2)[1] if text.count("---") >= 2 else ""
    try:
        meta = yaml.safe_load(header) or {}
    except yaml.YAMLError:
        return []
    info = meta.get("dataset_info") if isinstance(meta, dict) else None
    infos = info if isinstance(info, list) else [info]
    return [i.get("features") for i in infos if isinstance(i, dict)]


def parquet_class_names(root: Path, label_column: str = "label") -> list[str] | None:
    """Class names stored with a parquet export, or None.

    Looked up in order: the `datasets` features in the first train (or test) shard's
    schema metadata (key ``huggingface``), ``root/dataset_info.json``, ``root/README.md``.
    """
    import pyarrow.parquet as pq

    for split in ("train", "test"):
        try:
            files = parquet_files(root, split)
        except ValueError:
            continue
        metadata = pq.read_schema(files[0]).metadata or {}
        if b"huggingface" in metadata:
            info = json.loads(metadata[b"huggingface"].decode()).get("info") or {}
            names = _features_class_names(info.get("features"), label_column)
            if names:
                return names
        break
    info_file = root / "dataset_info.json"
    if info_file.is_file():
        info = json.loads(info_file.read_text())
        candidates = (
            [info] + [v for v in info.values() if isinstance(v, dict)]
            if isinstance(info, dict)
            else []
        )
        for candidate in candidates:
            names = _features_class_names(candidate.get("features"), label_column)
            if names:
                return names
    readme = root / "README.md"
    if readme.is_file():
        for features in _card_features(readme):
            names = _features_class_names(features, label_column)
            if names:
                return names
    return None


class ParquetSplit(Dataset):
    """One split of a Hugging Face parquet export as (PIL image, label) items, read lazily.

    Only the label column is read up front ([N] int64 in :attr:`labels`); images are read
    one row group at a time (the last ``cache_row_groups`` are kept), so a sequential pass
    reads each row group once. File handles are opened on first use in each process, so
    the dataset can be handed to DataLoader workers.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        image_column: str = "image",
        label_column: str = "label",
        cache_row_groups: int = 4,
    ) -> None:
        import pyarrow.parquet as pq

        self.root = Path(root)
        self.files = parquet_files(self.root, split)
        self.image_column = image_column
        self.cache_row_groups = max(1, int(cache_row_groups))
        rows: list[tuple[int, int, int]] = []  # (file, row group, row within the group)
        labels: list[Tensor] = []
        for f, path in enumerate(self.files):
            pf = pq.ParquetFile(path)
            names = pf.schema_arrow.names
            for column in (image_column, label_column):
                if column not in names:
                    raise ValueError(
                        f"{path}: column `{column}` is missing (columns: {', '.join(names)})"
                    )
            for g in range(pf.metadata.num_row_groups):
                rows.extend((f, g, r) for r in range(pf.metadata.row_group(g).num_rows))
            column = pf.read(columns=[label_column]).column(0)
            if column.null_count:
                raise ValueError(
                    f"{path}: column `{label_column}` has {column.null_count} missing labels"
                )
            labels.append(torch.as_tensor(column.to_numpy(zero_copy_only=False).astype("int64")))
        self.rows = rows
        self.labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64)
        if len(self.labels) and int(self.labels.min()) < 0:
            raise ValueError(f"{self.files[0].parent}: column `{label_column}` has negative labels")
        self._handles: dict[int, Any] = {}
        self._pid = -1
        self._cache: OrderedDict[tuple[int, int], list[Any]] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        # Open file handles and decoded row groups stay behind (spawned DataLoader workers).
        return {**self.__dict__, "_handles": {}, "_cache": OrderedDict(), "_pid": -1}

    def __len__(self) -> int:
        return len(self.rows)

    def _row_group(self, f: int, g: int) -> list[Any]:
        """The image cells of row group g of file f, as Python objects (cached)."""
        import pyarrow.parquet as pq

        if self._pid != os.getpid():  # a forked worker must not share the parent's handles
            self._handles, self._cache, self._pid = {}, OrderedDict(), os.getpid()
        key = (f, g)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        if f not in self._handles:
            self._handles[f] = pq.ParquetFile(self.files[f])
        cells = (
            self._handles[f].read_row_group(g, columns=[self.image_column]).column(0).to_pylist()
        )
        self._cache[key] = cells
        if len(self._cache) > self.cache_row_groups:
            self._cache.popitem(last=False)
        return cells

    def _decode(self, cell: Any, f: int) -> Image.Image:
        """PIL image from a `datasets.Image` cell: {bytes, path} struct or raw bytes."""
        if isinstance(cell, dict):
            data, path = cell.get("bytes"), cell.get("path")
        else:
            data, path = cell, None
        if data is None and path:
            # Stored by reference: relative paths are relative to the shard's folder.
            file = Path(path) if os.path.isabs(path) else self.files[f].parent / path
            data = file.read_bytes()
        if data is None:
            raise ValueError(
                f"{self.files[f]}: an `{self.image_column}` cell holds neither bytes nor a path"
            )
        image = Image.open(io.BytesIO(data))
        image.load()
        return image

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        f, g, r = self.rows[index]
        return self._decode(self._row_group(f, g)[r], f), int(self.labels[index])


# --------------------------------------------------------------------------- task_vectors layout
#
# The files the task-vectors release's readers (mlfoundations/task_vectors, src/datasets/*.py)
# open under its one data location, and the order they list samples in. Sample index i here is
# the release reader's index i, so the release's random train/val split picks the same images.

TASK_VECTORS_SPLITS: dict[str, tuple[str, ...]] = {
    "cars": ("train", "test"),
    "dtd": ("train", "test"),
    "eurosat": ("train", "val", "test"),
    "gtsrb": ("train", "test"),
    "mnist": ("train", "test"),
    "resisc45": ("train", "test"),
    "sun397": ("train", "test"),
    "svhn": ("train", "test"),
    # the twelve the 14- and 20-task benchmarks add (tall-masks code; see below)
    **{task: ("train", "test") for task in BENCHMARK_DATASETS},
}
"""The source splits each task's reader has (EuroSAT alone has its own `val` folder)."""

TASK_VECTORS_FILES: dict[str, dict[str, str]] = {
    "cars": {
        "train": "stanford_cars/devkit/cars_train_annos.mat + stanford_cars/cars_train/*.jpg",
        "test": "stanford_cars/cars_test_annos_withlabels.mat + stanford_cars/cars_test/*.jpg",
    },
    "dtd": {"train": "dtd/train/<class>/*.jpg", "test": "dtd/val/<class>/*.jpg"},
    "eurosat": {
        "train": "EuroSAT_splits/train/<class>/*.jpg",
        "val": "EuroSAT_splits/val/<class>/*.jpg",
        "test": "EuroSAT_splits/test/<class>/*.jpg",
    },
    "gtsrb": {
        "train": "gtsrb/GTSRB/Training/<class id>/*.ppm",
        "test": "gtsrb/GT-final_test.csv + gtsrb/GTSRB/Final_Test/Images/*.ppm",
    },
    "mnist": {
        "train": "MNIST/raw/train-images-idx3-ubyte + train-labels-idx1-ubyte",
        "test": "MNIST/raw/t10k-images-idx3-ubyte + t10k-labels-idx1-ubyte",
    },
    "resisc45": {
        "train": "resisc45/resisc45-train.txt + resisc45/NWPU-RESISC45/<class>/*.jpg",
        "test": "resisc45/resisc45-test.txt + resisc45/NWPU-RESISC45/<class>/*.jpg",
    },
    "sun397": {"train": "sun397/train/<class>/*.jpg", "test": "sun397/val/<class>/*.jpg"},
    "svhn": {"train": "svhn/train_32x32.mat", "test": "svhn/test_32x32.mat"},
}
"""What each release reader opens under the data location, per source split (for errors and docs)."""

_PREPARE_HINT = "see docs/data.md, `task_vectors` layout, for how to prepare it"


def _missing(task: str, path: Path, what: str) -> FileNotFoundError:
    """Error for a file or folder of the task_vectors layout that is not there."""
    return FileNotFoundError(
        f"task `{task}` (data.layout: task_vectors): expected {what} at {path}, found nothing there; "
        f"{_PREPARE_HINT}, or point data.root (or data.tasks.{task}.root) at the folder that holds it"
    )


def _expected_folders(task: str) -> list[str]:
    """Class folder names of a task's release layout, sorted (ImageFolder's label order)."""
    if task == "eurosat":
        return list(EUROSAT_FOLDERS)
    if task == "sun397":
        return [sun397_folder(name) for name in CLASSNAMES["sun397"]]
    if task == "resisc45":
        return [name.replace(" ", "_") for name in CLASSNAMES["resisc45"]]
    if task == "gtsrb":
        return [f"{i:05d}" for i in range(len(CLASSNAMES["gtsrb"]))]
    return list(CLASSNAMES[task])  # dtd: its folder names are its class names


def image_folder_samples(
    task: str,
    folder: Path,
    expected: list[str],
    is_valid: Callable[[str], bool] | None = None,
    extensions: tuple[str, ...] = IMAGE_EXTENSIONS,
) -> list[tuple[str, int]]:
    """(path, label) of ``folder/<class>/**`` in torchvision ``ImageFolder``'s order.

    Classes are the sorted sub-folder names, label i the i-th; within a class the folder
    tree is walked as ``sorted(os.walk(..., followlinks=True))`` and each folder's file
    names sorted (``torchvision.datasets.folder.make_dataset``). A file is kept when
    ``is_valid(path)`` says so, else when its lower-cased name ends with one of
    ``extensions``.

    Raises:
        FileNotFoundError: ``folder`` does not exist.
        ValueError: the class folders are not ``expected`` (a missing class would shift
            every later label), or a class folder holds no kept file.
    """
    if not folder.is_dir():
        raise _missing(task, folder, "a folder of class folders")
    classes = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    if classes != expected:
        missing = [c for c in expected if c not in classes]
        extra = [c for c in classes if c not in expected]
        raise ValueError(
            f"task `{task}`: {folder} has {len(classes)} class folders, expected the {len(expected)} "
            f"of the release's layout (missing {missing[:3]}, unexpected {extra[:3]}); labels are the "
            f"sorted folder names, so every class folder must be there, and nothing else"
        )
    samples: list[tuple[str, int]] = []
    for label, name in enumerate(classes):
        count = len(samples)
        for dirpath, _, fnames in sorted(os.walk(folder / name, followlinks=True)):
            for fname in sorted(fnames):
                path = os.path.join(dirpath, fname)
                keep = (
                    is_valid(path) if is_valid is not None else fname.lower().endswith(extensions)
                )
                if keep:
                    samples.append((path, label))
        if len(samples) == count:
            raise ValueError(
                f"task `{task}`: class folder {folder / name} holds no images "
                f"({', '.join(extensions) if is_valid is None else 'none of the listed files'})"
            )
    return samples


class SVHNMat(Dataset):
    """SVHN's ``{split}_32x32.mat`` as torchvision's SVHN reads it: sample order of the file,
    label 10 is digit 0; items (PIL image 32x32 RGB, label)."""

    def __init__(self, path: Path) -> None:
        import numpy as np
        from scipy.io import loadmat

        mat = loadmat(str(path))
        if "X" not in mat or "y" not in mat:
            found = sorted(k for k in mat if not k.startswith("__"))
            raise ValueError(
                f"{path}: expected the variables X [32, 32, 3, N] and y [N, 1], found {found}; "
                "use torchvision's SVHN download (train_32x32.mat, test_32x32.mat)"
            )
        self.data = np.ascontiguousarray(np.transpose(mat["X"], (3, 0, 1, 2)))  # [N, H, W, 3]
        labels = (
            mat["y"].astype(np.int64).squeeze(-1)
            if mat["y"].ndim == 2
            else mat["y"].astype(np.int64)
        )
        labels[labels == 10] = 0
        if len(labels) != len(self.data):
            raise ValueError(f"{path}: X holds {len(self.data)} images but y {len(labels)} labels")
        self.targets = labels.tolist()

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.data[index]), self.targets[index]


def _cars_samples(task: str, root: Path, split: str) -> list[tuple[str, int]]:
    """Stanford Cars in the annotation file's order, labels the devkit's 1-based class minus one."""
    from scipy.io import loadmat

    base = root / "stanford_cars"
    devkit = base / "devkit"
    if split == "train":
        annotations, images = devkit / "cars_train_annos.mat", base / "cars_train"
    else:
        annotations, images = base / "cars_test_annos_withlabels.mat", base / "cars_test"
    meta = devkit / "cars_meta.mat"
    for path, what in ((meta, "the devkit's class list"), (annotations, "the annotations")):
        if not path.is_file():
            raise _missing(task, path, what)
    if not images.is_dir():
        raise _missing(task, images, "the image folder")
    names = [str(n) for n in loadmat(str(meta), squeeze_me=True)["class_names"].tolist()]
    known = list(CLASSNAMES["cars"])
    if names != known:
        first = next(
            (i for i, (a, b) in enumerate(zip(names, known)) if a != b), min(len(names), len(known))
        )
        raise ValueError(
            f"task `cars`: {meta} lists {len(names)} classes, expected the devkit's {len(known)} in "
            f"order; they first differ at label {first}: use the Stanford Cars devkit's cars_meta.mat"
        )
    import numpy as np

    records = np.atleast_1d(loadmat(str(annotations), squeeze_me=True)["annotations"])
    return [(str(images / str(r["fname"])), int(r["class"]) - 1) for r in records]


def _gtsrb_samples(task: str, root: Path, split: str) -> list[tuple[str, int]]:
    """GTSRB: train the sorted class folders' .ppm files; test the rows of GT-final_test.csv."""
    import csv

    base = root / "gtsrb"
    if split == "train":
        return image_folder_samples(
            task, base / "GTSRB/Training", _expected_folders(task), extensions=(".ppm",)
        )
    images, table = base / "GTSRB/Final_Test/Images", base / "GT-final_test.csv"
    if not table.is_file():
        raise _missing(task, table, "the test labels (GT-final_test.csv, ';'-separated)")
    if not images.is_dir():
        raise _missing(task, images, "the test images")
    with open(table, newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter=";", skipinitialspace=True))
    if rows and not {"Filename", "ClassId"} <= set(rows[0]):
        raise ValueError(
            f"{table}: expected the columns Filename and ClassId, found {sorted(rows[0])}"
        )
    return [(str(images / row["Filename"]), int(row["ClassId"])) for row in rows]


def _resisc45_samples(task: str, root: Path, split: str) -> list[tuple[str, int]]:
    """RESISC45: the ImageFolder order of NWPU-RESISC45, keeping the files named in the split's list.

    The release filters by file name (``os.path.basename(path) in resisc45-<split>.txt``),
    so the order is ImageFolder's (sorted classes, sorted files), not the list's.
    """
    listing = root / "resisc45" / f"resisc45-{split}.txt"
    if not listing.is_file():
        raise _missing(task, listing, f"the published {split} list (one image file name a line)")
    wanted = {line.strip() for line in listing.read_text().splitlines() if line.strip()}
    samples = image_folder_samples(
        task,
        root / "resisc45/NWPU-RESISC45",
        _expected_folders(task),
        is_valid=lambda path: os.path.basename(path) in wanted,
    )
    if len(samples) != len(wanted):
        found = {os.path.basename(p) for p, _ in samples}
        absent = sorted(wanted - found)
        raise ValueError(
            f"task `resisc45`: {listing} names {len(wanted)} images, {len(absent)} of them are not under "
            f"{root / 'resisc45/NWPU-RESISC45'} (e.g. {absent[0]}); an incomplete tree changes the split"
        )
    return samples


_TV_FOLDERS = {
    "dtd": {"train": "dtd/train", "test": "dtd/val"},
    "sun397": {"train": "sun397/train", "test": "sun397/val"},
    "eurosat": {
        "train": "EuroSAT_splits/train",
        "val": "EuroSAT_splits/val",
        "test": "EuroSAT_splits/test",
    },
}


def open_task_vectors_split(task: str, split: str, cfg: dict[str, Any]) -> Dataset:
    """One source split of a task in the release's layout under ``cfg["root"]`` (its data location).

    Items are (PIL image, int label), listed in the release reader's order. ``split`` is
    one of :data:`TASK_VECTORS_SPLITS` [task].

    Raises:
        FileNotFoundError: a file or folder the release's reader opens is missing (the
            message names the path and where the preparation is described).
        ValueError: unknown task or split, or files that do not give the release's classes.
    """
    if task not in TASK_VECTORS_SPLITS:
        raise ValueError(
            f"task `{task}` is not one of the release's eight tasks nor of the twelve the 14- and "
            f"20-task benchmarks add ({', '.join(TASK_VECTORS_SPLITS)}); "
            f"set data.tasks.{task}.layout: sources with a `source` for it"
        )
    if split not in TASK_VECTORS_SPLITS[task]:
        raise ValueError(
            f"task `{task}` has no source split `{split}` in the task_vectors layout "
            f"(it has {', '.join(TASK_VECTORS_SPLITS[task])})"
        )
    root = Path(cfg["root"])
    if task in BENCHMARK_DATASETS:
        return _open_benchmark(task, split, root)
    if task in _TV_FOLDERS:
        folder = root / _TV_FOLDERS[task][split]
        return FileSamples(image_folder_samples(task, folder, _expected_folders(task)))
    if task == "resisc45":
        return FileSamples(_resisc45_samples(task, root, split))
    if task == "gtsrb":
        return FileSamples(_gtsrb_samples(task, root, split))
    if task == "cars":
        return FileSamples(_cars_samples(task, root, split))
    if task == "svhn":
        path = root / "svhn" / f"{split}_32x32.mat"
        if not path.is_file():
            raise _missing(task, path, "torchvision's SVHN file")
        return SVHNMat(path)
    # mnist: torchvision's reader on the data location itself (root/MNIST/raw/...)
    from torchvision import datasets

    raw = root / "MNIST" / "raw"
    prefix = "train" if split == "train" else "t10k"
    for name in (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"):
        if not (raw / name).is_file():
            raise _missing(task, raw / name, "torchvision's unpacked MNIST file")
    return datasets.MNIST(str(root), train=split == "train", download=False)


# --------------------------------------------------------------------------- 14 and 20 tasks
#
# The twelve datasets the TSV-M / tall-masks benchmarks add, in the files and sample order of
# the tall-masks code's readers (nik-dim/tall_masks, src/datasets/*.py): torchvision's readers
# on torchvision's on-disk layouts, each under the folder that code passes as `root`
# (mostly `<data_location>/<name>`), FER2013 a Hugging Face dataset. PCAM, EMNIST,
# FashionMNIST and KMNIST are read there from "~/data/<Name>" whatever the data location is;
# here they sit under the data root as if it were ~/data. torchvision's CIFAR, STL10 and
# Flowers102 readers check the MD5 of the real files, so those four have readers of their own
# below that list the same samples in the same order; PCAM has an h5py reader with
# torchvision's indexing that keeps its file open; the others are torchvision's readers.

_BENCHMARK_ROOTS: dict[str, str] = {
    "cifar10": ".",
    "cifar100": ".",
    "stl10": "stl10",
    "flowers102": "flowers102",
    "oxford_pets": "OxfordIIITPet",
    "pcam": "PCAM",
    "fer2013": "FER2013",
    "emnist": "EMNIST",
    "food101": "food101",
    "fashion_mnist": "FashionMNIST",
    "rendered_sst2": "RenderedSST2",
    "kmnist": "KMNIST",
}
"""The folder under the data location that the tall-masks reader hands torchvision as root."""

_PCAM_FILE = "pcam/camelyonpatch_level_2_split_{split}_{xy}.h5"

BENCHMARK_FILES: dict[str, dict[str, list[str]]] = {
    "cifar10": {
        "train": [f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)],
        "test": ["cifar-10-batches-py/test_batch"],
    },
    "cifar100": {"train": ["cifar-100-python/train"], "test": ["cifar-100-python/test"]},
    "stl10": {
        s: [f"stl10_binary/{s}_X.bin", f"stl10_binary/{s}_y.bin", "stl10_binary/class_names.txt"]
        for s in ("train", "test")
    },
    "flowers102": {
        s: ["flowers-102/imagelabels.mat", "flowers-102/setid.mat", "flowers-102/jpg"]
        for s in ("train", "test")
    },
    "oxford_pets": {
        s: [f"oxford-iiit-pet/annotations/{f}.txt", "oxford-iiit-pet/images"]
        for s, f in (("train", "trainval"), ("test", "test"))
    },
    "pcam": {
        s: [_PCAM_FILE.format(split=s, xy=xy) for xy in ("x", "y")] for s in ("train", "test")
    },
    "fer2013": {
        s: [f"default/{s}/*.parquet (or {s}-*.parquet, data/{s}-*.parquet)"]
        for s in ("train", "test")
    },
    "emnist": {
        s: [f"EMNIST/raw/emnist-digits-{s}-{kind}-ubyte" for kind in ("images-idx3", "labels-idx1")]
        for s in ("train", "test")
    },
    "food101": {s: [f"food-101/meta/{s}.json", "food-101/images"] for s in ("train", "test")},
    "fashion_mnist": {
        s: [f"FashionMNIST/raw/{p}-{kind}-ubyte" for kind in ("images-idx3", "labels-idx1")]
        for s, p in (("train", "train"), ("test", "t10k"))
    },
    "rendered_sst2": {s: [f"rendered-sst2/{s}"] for s in ("train", "test")},
    "kmnist": {
        s: [f"KMNIST/raw/{p}-{kind}-ubyte" for kind in ("images-idx3", "labels-idx1")]
        for s, p in (("train", "train"), ("test", "t10k"))
    },
}
"""Per added task and source split, the files under its folder (:data:`_BENCHMARK_ROOTS`) that
its reader opens (for errors and docs)."""


class _ArrayUnpickler:
    """Unpickles CIFAR's python batches (dicts of lists, bytes and numpy arrays) and nothing
    else: only numpy's array reconstruction is importable, so a pickle cannot run code."""

    _ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),
        }
    )

    @classmethod
    def load(cls, path: Path) -> dict[str, Any]:
        import importlib
        import pickle

        allowed = cls._ALLOWED

        class Restricted(pickle.Unpickler):
            def find_class(self, module: str, name: str) -> Any:
                if (module, name) not in allowed:
                    raise ValueError(
                        f"{path}: refusing to unpickle `{module}.{name}`; a CIFAR batch holds only "
                        "lists and numpy arrays (use the python version of the CIFAR download)"
                    )
                if module.startswith("numpy.core"):
                    module = "numpy._core" + module[len("numpy.core") :]
                return getattr(importlib.import_module(module), name)

        with open(path, "rb") as fh:
            entry = Restricted(fh, encoding="latin1").load()
        if not isinstance(entry, dict):
            raise TypeError(
                f"{path}: holds a {type(entry).__name__}, expected a dict (a CIFAR python batch)"
            )
        return entry


class ArrayImages(Dataset):
    """(PIL image, label) items from an image array [N, H, W] or [N, H, W, C] uint8 and labels."""

    def __init__(self, images: Any, labels: list[int], mode: str | None = None) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.targets = labels
        self.mode = mode

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        import numpy as np

        image = Image.fromarray(np.asarray(self.images[index]))
        return (image.convert(self.mode) if self.mode else image), self.targets[index]


def _check_names(task: str, source: Path, found: list[str]) -> None:
    """The label order the files give must be the benchmark's class order."""
    expected = list(CLASSNAMES[task])
    if found != expected:
        first = next(
            (i for i, (a, b) in enumerate(zip(found, expected)) if a != b),
            min(len(found), len(expected)),
        )
        raise ValueError(
            f"task `{task}`: {source} names {len(found)} classes, expected the {len(expected)} of "
            f"the dataset in order; they first differ at label {first}"
        )


def _cifar(task: str, base: Path, split: str) -> ArrayImages:
    """CIFAR10/100 python batches in file order, as torchvision's CIFAR readers list them."""
    import numpy as np

    meta_name, names_key, label_key = {
        "cifar10": ("cifar-10-batches-py/batches.meta", "label_names", "labels"),
        "cifar100": ("cifar-100-python/meta", "fine_label_names", "fine_labels"),
    }[task]
    meta = base / meta_name
    if not meta.is_file():
        raise _missing(task, meta, "the class list of the CIFAR python download")
    _check_names(task, meta, [str(n) for n in _ArrayUnpickler.load(meta)[names_key]])
    images, labels = [], []
    for name in BENCHMARK_FILES[task][split]:
        path = base / name
        if not path.is_file():
            raise _missing(task, path, "a batch of the CIFAR python download")
        entry = _ArrayUnpickler.load(path)
        images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.extend(int(y) for y in entry[label_key])
    data = np.concatenate(images).transpose(0, 2, 3, 1)  # [N, 32, 32, 3]
    return ArrayImages(np.ascontiguousarray(data), labels)


def _stl10(task: str, base: Path, split: str) -> ArrayImages:
    """STL10's binary files: images stored [N, 3, W, H] (column-major), labels 1..10."""
    import numpy as np

    for name in BENCHMARK_FILES[task][split]:
        if not (base / name).is_file():
            raise _missing(task, base / name, "a file of the STL10 binary download")
    folder = base / "stl10_binary"
    names = (folder / "class_names.txt").read_text().splitlines()
    _check_names(task, folder / "class_names.txt", names)
    labels = np.fromfile(folder / f"{split}_y.bin", dtype=np.uint8).astype(np.int64) - 1
    images = np.memmap(folder / f"{split}_X.bin", dtype=np.uint8, mode="r")
    if images.size != len(labels) * 3 * 96 * 96:
        raise ValueError(
            f"{folder / f'{split}_X.bin'}: {images.size} bytes, expected {len(labels)} images of "
            "3x96x96 (one per label in the _y.bin file)"
        )
    # [N, 3, W, H] -> [N, H, W, 3]: torchvision swaps the last two axes, then moves channels last
    return ArrayImages(images.reshape(-1, 3, 96, 96).transpose(0, 3, 2, 1), labels.tolist())


def _flowers102(task: str, base: Path, split: str) -> FileSamples:
    """Flowers102: setid.mat's `trnid` / `tstid` order, labels imagelabels.mat minus one."""
    from scipy.io import loadmat

    folder = base / "flowers-102"
    for name in BENCHMARK_FILES[task][split]:
        if not (base / name).exists():
            raise _missing(task, base / name, "a file of the Flowers102 download")
    key = "trnid" if split == "train" else "tstid"
    ids = loadmat(str(folder / "setid.mat"), squeeze_me=True)[key]
    labels = loadmat(str(folder / "imagelabels.mat"), squeeze_me=True)["labels"]
    return FileSamples(
        [(str(folder / f"jpg/image_{int(i):05d}.jpg"), int(labels[int(i) - 1]) - 1) for i in ids]
    )


class _PCAMFiles(Dataset):
    """PCAM's HDF5 pair (x [N, 96, 96, 3] uint8, y [N, 1, 1, 1]) as torchvision's PCAM reads it."""

    def __init__(self, images: Path, targets: Path) -> None:
        try:
            import h5py
        except ImportError as err:
            raise ValueError(
                f"task `pcam`: reading {images} needs h5py, which is not installed; "
                "`pip install h5py` (torchvision's PCAM reader needs it too)"
            ) from err
        self.images, self.h5py, self.file = images, h5py, None
        with h5py.File(targets, "r") as fh:
            self.targets = [int(y) for y in fh["y"][:, 0, 0, 0]]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "file": None}  # each DataLoader worker opens its own handle

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        if self.file is None:
            self.file = self.h5py.File(self.images, "r")
        return Image.fromarray(self.file["x"][index]).convert("RGB"), self.targets[index]


class _Grayscale(Dataset):
    """Items of ``base`` with images converted to mode "L" (the tall-masks FER2013 reader does)."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        image, label = self.base[index]
        return image.convert("L"), label


def _open_benchmark(task: str, split: str, root: Path) -> Dataset:
    """One source split of an added task under the data location ``root``."""
    from torchvision import datasets

    base = root / _BENCHMARK_ROOTS[task]
    if task in ("cifar10", "cifar100"):
        return _cifar(task, base, split)
    if task == "stl10":
        return _stl10(task, base, split)
    if task == "flowers102":
        return _flowers102(task, base, split)
    if task == "fer2013":
        if not base.is_dir():
            what = "the parquet export of the Hugging Face dataset Jeneral/fer-2013"
            raise _missing(task, base, what)
        try:
            return _Grayscale(ParquetSplit(base, split, "img_bytes", "labels"))
        except ValueError as err:
            raise ValueError(f"task `fer2013`: {err}; {_PREPARE_HINT}") from err
    for name in BENCHMARK_FILES[task][split]:
        if not (base / name).exists():
            raise _missing(task, base / name, "a file of torchvision's layout of the dataset")
    if task == "pcam":
        x, y = (base / _PCAM_FILE.format(split=split, xy=xy) for xy in ("x", "y"))
        return _PCAMFiles(x, y)
    train = split == "train"
    if task == "oxford_pets":
        pets = datasets.OxfordIIITPet(str(base), split="trainval" if train else "test")
        _check_names(task, base / "oxford-iiit-pet/annotations", list(pets.classes))
        return pets
    if task == "food101":
        food = datasets.Food101(str(base), split=split)
        _check_names(task, base / "food-101/meta", list(food.classes))
        return food
    if task == "rendered_sst2":
        return datasets.RenderedSST2(str(base), split=split)
    if task == "emnist":
        return datasets.EMNIST(str(base), split="digits", train=train)
    if task == "kmnist":
        return datasets.KMNIST(str(base), train=train)
    return datasets.FashionMNIST(str(base), train=train)


# --------------------------------------------------------------------------- dispatch

_READERS: dict[str, Callable[[str, str, dict[str, Any]], Dataset]] = {
    "torchvision": _open_torchvision,
    "folder": lambda task, split, cfg: ImageFolderSplit(cfg["root"], split, cfg.get("classes")),
    "parquet": lambda task, split, cfg: ParquetSplit(
        cfg["root"],
        split,
        cfg.get("image_column", "image"),
        cfg.get("label_column", "label"),
        cfg.get("cache_row_groups", 4),
    ),
    "task_vectors": open_task_vectors_split,
}


def open_source_split(source: str, task: str, split: str, cfg: dict[str, Any]) -> Dataset:
    """The dataset's own `train` or `test` split from a real source, items (PIL image, int label).

    ``source`` ``task_vectors`` reads the release's layout, where EuroSAT also has `val`.
    """
    if source == "task_vectors":
        return open_task_vectors_split(task, split, cfg)
    if split not in ("train", "test"):
        raise ValueError(f"source split must be train or test, got `{split}`")
    return _READERS[source](task, split, cfg)
