"""Readers of the real tasks: torchvision datasets, image folders and Hugging Face parquet exports.

Each reader opens one *source split* (the dataset's own `train` or `test`) as a
``torch.utils.data.Dataset`` whose items are ``(PIL.Image, int label)``; nothing is
decoded before an item is asked for. ``pipeline.data`` carves our `val` split out of
the source's train split and applies the backbone's transform on top.

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
dtd        partition ``partition`` (1) train / test      as the task-vectors preparation: DTD's
                                                         ``val`` lists are not used
eurosat    seeded per-class hold-out of                  ``test_per_class`` (270) images per class are
           ``test_per_class`` images                     test, as the task-vectors split (2,700 test)
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

from pipeline.data.classnames import CLASSNAMES, EUROSAT_FOLDERS
from pipeline.data.splits import IndexedView, per_class_holdout

log = logging.getLogger(__name__)

__all__ = [
    "IMAGE_EXTENSIONS",
    "TORCHVISION_TASKS",
    "ImageFolderSplit",
    "ParquetSplit",
    "folder_classes",
    "open_source_split",
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


class ImageFolderSplit(Dataset):
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

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        path, label = self.samples[index]
        with open(path, "rb") as fh:
            image = Image.open(fh)
            image.load()
        return image, label


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
}


def open_source_split(source: str, task: str, split: str, cfg: dict[str, Any]) -> Dataset:
    """The dataset's own `train` or `test` split from a real source, items (PIL image, int label)."""
    if split not in ("train", "test"):
        raise ValueError(f"source split must be train or test, got `{split}`")
    return _READERS[source](task, split, cfg)
