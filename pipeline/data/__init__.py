"""Task datasets behind one interface, for the demo's generated tasks and the real ones.

``spec`` is the `data` section of the workflow config (a plain dict), so a rule can pass
it as one JSON parameter and Snakemake re-runs exactly the jobs whose data changed:

.. code-block:: yaml

    data:
      layout: task_vectors       # task_vectors | sources
      root: data                 # task_vectors: the release's data location (one for all tasks)
      val_seed: 0                # seed of the validation carve-out (the release: 0)
      val_fraction: 0.1          # the release's val_fraction
      val_max: 5000              # the release's max_val_samples
      tasks:                     # per-task overrides: any key above, plus source-specific ones
        resisc45: {layout: sources, source: parquet, root: /datasets/resisc45}

Layouts:

- ``task_vectors``: each of the eight tasks read from the files the task-vectors release's
  readers open under one data location (``data.root``), listing samples in their order
  (:func:`pipeline.data.real.open_task_vectors_split`, docs/data.md).
- ``sources`` (the default): ``source`` picks the reader (synthetic | torchvision | folder |
  parquet) and a task's files live in ``{root}/{task}`` (:mod:`pipeline.data.real`);
  ``source: synthetic`` is the generated demo. ``source`` is not read under ``task_vectors``:
  a task read otherwise sets ``data.tasks.<task>.layout: sources``.

Splits: ``train``, ``val``, ``test``. ``test`` is the source's test split. For real tasks
``val`` and ``train`` follow the release's rule on the source's train split of N samples
(:func:`pipeline.data.splits.release_train_val_indices`): v = min(⌊0.1·N⌋, 5000),
``random_split([N - v, v])`` with ``torch.Generator().manual_seed(0)``, ``train`` the first
N - v of the permutation and ``val`` the last v, both in the permutation's order (parquet
sources read them sorted, see :func:`open_dataset`). EuroSAT in the task_vectors layout
has its own ``val`` folder: ``train`` is the whole train folder and ``val`` that folder, as
the release's ``EuroSATVal``. The demo's generated tasks keep their own carve-out (⌈0.1·N⌉
samples, sorted); ``train_size`` is N, the generated train split before it.

Two ways to read a split:

- :func:`open_dataset` (every source): a ``torch.utils.data.Dataset`` of
  ``(image [3, H, W] float32, int label)``; real images are decoded and passed through
  ``transform`` (the backbone's eval transform) one item at a time.
- :func:`load_split` (synthetic only): the whole split as two tensors.

Per-task keys: ``classes`` (folder: class folder names in label order; parquet and
torchvision: the class names to use), ``templates`` (prompt templates with ``{}``), and
the source-specific keys documented in :mod:`pipeline.data.real` (``partition``,
``test_per_class``, ``split_seed``, ``image_column``, ``label_column``).

``cache_dir`` (synthetic only; the workflow sets it to ``results/<name>/.cache/data``):
generated `val` and `test` splits are kept there as safetensors and read back by later
jobs, bit for bit what generation gives; without it every call generates.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from pipeline.data.splits import (
    DEFAULT_VAL_FRACTION,
    DEFAULT_VAL_MAX,
    IndexedView,
    release_split_of_train,
    split_of_train,
)

__all__ = [
    "LAYOUTS",
    "SOURCES",
    "SPLITS",
    "class_names",
    "load_split",
    "num_classes",
    "open_dataset",
    "prompt_templates",
    "task_config",
]

SOURCES = ("synthetic", "torchvision", "folder", "parquet")
LAYOUTS = ("task_vectors", "sources")
SPLITS = ("train", "val", "test")

# Keys that only make sense for one task: never inherited from the global section.
_TASK_ONLY_KEYS = ("classes", "templates")


def task_config(spec: dict[str, Any], task: str) -> dict[str, Any]:
    """The settings of one task: the global `data` keys overlaid with ``data.tasks.<task>``.

    ``layout`` (default ``sources``) decides the reader: under ``task_vectors`` the task's
    ``source`` becomes ``task_vectors`` whatever ``source`` says and ``root`` is the
    release's data location, ``data.root`` itself; under ``sources`` ``root`` is the task's
    own folder, ``{data.root}/{task}``. A per-task ``root`` overrides either.

    Raises:
        ValueError: unknown layout or source, or ``data.tasks.<task>`` that is not a mapping.
    """
    overrides = (spec.get("tasks") or {}).get(task) or {}
    if not isinstance(overrides, dict):
        raise ValueError(f"data.tasks.{task} must be a mapping of settings, got {overrides!r}")
    cfg = {k: v for k, v in spec.items() if k != "tasks" and k not in _TASK_ONLY_KEYS}
    cfg.update(overrides)
    layout = cfg.setdefault("layout", "sources")
    if layout not in LAYOUTS:
        raise ValueError(
            f"unknown data layout `{layout}` for task `{task}`; known layouts: {', '.join(LAYOUTS)}"
        )
    source = cfg.setdefault("source", "synthetic")
    if source not in SOURCES:
        raise ValueError(
            f"unknown data source `{source}` for task `{task}`; known sources: {', '.join(SOURCES)}"
        )
    if layout == "task_vectors":
        cfg["source"] = "task_vectors"
        cfg["root"] = str(
            Path(overrides["root"]) if "root" in overrides else Path(spec.get("root", "data"))
        )
    elif source != "synthetic":
        cfg["root"] = str(
            Path(overrides["root"])
            if "root" in overrides
            else Path(spec.get("root", "data")) / task
        )
    return cfg


def _check_split(task: str, split: str) -> None:
    if split not in SPLITS:
        raise ValueError(
            f"unknown split `{split}` for task `{task}` (expected one of {', '.join(SPLITS)})"
        )


def _val_settings(cfg: dict[str, Any]) -> tuple[int, float]:
    return int(cfg.get("val_seed", 0)), float(cfg.get("val_fraction", DEFAULT_VAL_FRACTION))


def _val_max(cfg: dict[str, Any]) -> int | None:
    value = cfg.get("val_max", DEFAULT_VAL_MAX)
    return None if value is None else int(value)


@functools.cache
def _generator_source_digest() -> bytes:
    """SHA-256 of the generator's and the carve-out's source files (read once per process)."""
    from pipeline.data import splits, synthetic

    digest = hashlib.sha256()
    for module in (synthetic, splits):
        digest.update(Path(module.__file__).read_bytes())
    return digest.digest()


def _synthetic_cache_path(cfg: dict[str, Any], task: str, split: str) -> Path:
    """Where a generated split is kept: named by a digest of every setting that shapes it and
    of the generator's own source, so a changed setting or generator never reads a stale file."""
    keys = ("seed", "image_size", "train_size", "test_size", "val_seed", "val_fraction")
    settings = {k: cfg.get(k) for k in keys} | {"task": task, "split": split}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    digest.update(_generator_source_digest())
    return Path(cfg["cache_dir"]) / f"{task}-{split}-{digest.hexdigest()[:16]}.safetensors"


def _synthetic_split(cfg: dict[str, Any], task: str, split: str) -> tuple[Tensor, Tensor]:
    """A generated split; with ``cache_dir`` set, `val` and `test` are generated once and read
    back after (every evaluation reads them, and `val` costs generating all of train)."""
    if not cfg.get("cache_dir") or split == "train":
        return _generate_synthetic_split(cfg, task, split)
    from pipeline.store import load_tensors, write_safetensors

    path = _synthetic_cache_path(cfg, task, split)
    if path.is_file():
        try:
            cached = load_tensors(path)
            return cached["images"], cached["labels"]
        except (OSError, ValueError, KeyError):  # unreadable: generate it again below
            pass
    images, labels = _generate_synthetic_split(cfg, task, split)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(path, {"images": images, "labels": labels}, {"task": task, "split": split})
    return images, labels


def _generate_synthetic_split(cfg: dict[str, Any], task: str, split: str) -> tuple[Tensor, Tensor]:
    from pipeline.data import synthetic

    seed, image_size = int(cfg.get("seed", 0)), int(cfg.get("image_size", 32))
    if split == "test":
        return synthetic.make_split(
            task, "test", int(cfg.get("test_size", 500)), seed=seed, image_size=image_size
        )
    images, labels = synthetic.make_split(
        task, "train", int(cfg.get("train_size", 2000)), seed=seed, image_size=image_size
    )
    index = split_of_train(split, len(labels), *_val_settings(cfg))
    return images[index], labels[index]


def load_split(spec: dict[str, Any], task: str, split: str) -> tuple[Tensor, Tensor]:
    """(images [N, 3, H, W] float32, labels [N] int64) of one split of a synthetic task.

    Real sources are too large to stack in memory: use :func:`open_dataset` for them.
    """
    _check_split(task, split)
    cfg = task_config(spec, task)
    if cfg["source"] != "synthetic":
        raise ValueError(
            f"load_split reads whole splits into memory and serves only the synthetic source; "
            f"task `{task}` has source `{cfg['source']}`: use open_dataset(spec, task, split, transform)"
        )
    return _synthetic_split(cfg, task, split)


class _TensorPairs(Dataset):
    """(images[i] [3, H, W], int(labels[i])) views of two stacked tensors."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.images[i], int(self.labels[i])


class _Prepare:
    """PIL image -> RGB -> ``transform`` (or a float tensor [3, H, W] in [0, 1] without one).

    A class rather than a closure so that DataLoader workers can pickle it.
    """

    def __init__(self, transform: Any = None) -> None:
        self.transform = transform

    def __call__(self, image: Any) -> Tensor:
        image = image.convert("RGB")  # MNIST is grayscale, some folders hold RGBA or palette PNGs
        if self.transform is not None:
            return self.transform(image)
        from torchvision.transforms.functional import pil_to_tensor

        return pil_to_tensor(image).to(torch.float32) / 255.0


def open_dataset(spec: dict[str, Any], task: str, split: str, transform: Any = None) -> Dataset:
    """One split of a task as a Dataset of ``(image [3, H, W] float32, int label)``.

    Args:
        spec: the config's `data` section.
        task: task name (lowercase: cars, dtd, ..., or a demo task).
        split: ``train``, ``val`` or ``test``.
        transform: PIL image -> tensor, applied per item to real images after RGB
            conversion (e.g. open_clip's ``preprocess``). Without one, images become
            [3, H, W] tensors in [0, 1] at their stored size. Ignored for synthetic tasks.

    Raises:
        ValueError: unknown split or source, or the task's files are missing (the
            message names the folder and what was expected there).
    """
    _check_split(task, split)
    cfg = task_config(spec, task)
    if cfg["source"] == "synthetic":
        return _TensorPairs(*_synthetic_split(cfg, task, split))
    from pipeline.data.real import open_source_split

    source = cfg["source"]
    if source == "task_vectors" and task == "eurosat":
        # The release's EuroSATVal: the whole train folder, and its own val folder.
        base = open_source_split(source, task, split, cfg)
        return IndexedView(base, torch.arange(len(base)), _Prepare(transform))
    base = open_source_split(source, task, "test" if split == "test" else "train", cfg)
    if split == "test":
        indices = torch.arange(len(base))
    else:
        seed, fraction = _val_settings(cfg)
        try:
            indices = release_split_of_train(split, len(base), seed, fraction, _val_max(cfg))
        except ValueError as err:
            raise ValueError(f"task `{task}` ({cfg['root']}): {err}") from err
        if source == "parquet":
            # Parquet decodes whole row groups: reading in file order visits each once.
            # (The order of a split does not change what is in it.)
            indices = indices.sort().values
    return IndexedView(base, indices, _Prepare(transform))


def class_names(spec: dict[str, Any], task: str) -> list[str]:
    """Class names of a task, index i naming label i (what zero-shot prompts are built from).

    - synthetic: the demo task's names;
    - task_vectors, torchvision: :data:`pipeline.data.classnames.CLASSNAMES`, the release's
      names (no data needed);
    - folder: the class folder names (``classes`` or the sorted folders), "_" shown as " ";
    - parquet: ``classes``, else the export's ClassLabel names (parquet metadata,
      dataset_info.json, README.md), else the known task's list.

    A per-task ``classes`` list overrides the names of task_vectors, torchvision and parquet tasks.
    """
    from pipeline.data import classnames

    cfg = task_config(spec, task)
    source, given = cfg["source"], cfg.get("classes")
    if given is not None and (
        not isinstance(given, list) or not all(isinstance(c, str) for c in given)
    ):
        raise ValueError(f"data.tasks.{task}.classes must be a list of strings, got {given!r}")
    if source == "synthetic":
        from pipeline.data import synthetic

        return synthetic.class_names(task)
    if source == "folder":
        from pipeline.data.real import folder_classes

        return [name.replace("_", " ") for name in folder_classes(Path(cfg["root"]), given)]
    if source in ("torchvision", "task_vectors"):
        from pipeline.data.real import TASK_VECTORS_SPLITS, TORCHVISION_TASKS

        if source == "task_vectors" and task not in TASK_VECTORS_SPLITS:
            raise ValueError(
                f"task `{task}` has no reader of the releases' layouts "
                f"(tasks: {', '.join(TASK_VECTORS_SPLITS)}); "
                f"set data.tasks.{task}.layout: sources with a `source` for it"
            )
        if source == "torchvision" and task not in TORCHVISION_TASKS:
            raise ValueError(
                f"task `{task}` has no torchvision dataset (torchvision tasks: {', '.join(TORCHVISION_TASKS)}); "
                f"set data.tasks.{task}.source to `folder` or `parquet`"
            )
        known = list(classnames.CLASSNAMES[task])
        if given is not None and len(given) != len(known):
            raise ValueError(
                f"data.tasks.{task}.classes has {len(given)} names, task `{task}` has {len(known)} classes"
            )
        return list(given) if given is not None else known
    # parquet
    if given is not None:
        return list(given)
    from pipeline.data.real import parquet_class_names

    names = parquet_class_names(Path(cfg["root"]), cfg.get("label_column", "label"))
    if names is None and task in classnames.CLASSNAMES:
        names = list(classnames.CLASSNAMES[task])
    if names is None:
        raise ValueError(
            f"task `{task}`: no class names for the parquet export under {cfg['root']} (no ClassLabel "
            f"features in its parquet metadata, dataset_info.json or README.md); set data.tasks.{task}.classes"
        )
    return names


def num_classes(spec: dict[str, Any], task: str) -> int:
    """Number of classes C of a task (labels lie in [0, C))."""
    cfg = task_config(spec, task)
    if cfg["source"] == "synthetic":
        from pipeline.data import synthetic

        return synthetic.num_classes(task)
    return len(class_names(spec, task))


def prompt_templates(spec: dict[str, Any], task: str) -> list[str]:
    """Zero-shot prompt templates of a task ("{}" stands for the class name).

    ``data.tasks.<task>.templates`` if given, else the task's own list in
    :mod:`pipeline.data.classnames`, else generic photo templates.
    """
    from pipeline.data import classnames

    given = task_config(spec, task).get("templates")
    templates = list(given) if given is not None else list(classnames.templates(task))
    bad = [t for t in templates if not isinstance(t, str) or "{}" not in t]
    if bad or not templates:
        raise ValueError(
            f"task `{task}`: every prompt template must be a string containing {{}}, got {bad or templates!r}"
        )
    return templates
