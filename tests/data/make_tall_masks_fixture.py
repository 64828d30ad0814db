"""Writes ``fixtures/tall_masks_templates.json`` from a checkout of the tall-masks code.

Usage: ``python tests/data/make_tall_masks_fixture.py <tall_masks checkout> [out.json]``.

The 14- and 20-task benchmarks (TSV-M, tall masks) add twelve datasets to the task-vectors
release's eight; their fine-tuned encoders and heads come from nik-dim/tall_masks, whose
``src/datasets/templates.py`` lists the prompts (lambdas, each called here with "{}" so the
fixture holds the format strings character for character) and whose ``src/datasets/*.py``
give the class names: written in the code (Flowers102, PCAM, FER2013, CIFAR10's list), taken
from torchvision's classes (EMNIST digits, FashionMNIST, KMNIST, RenderedSST2), or read from
the dataset files (CIFAR100's ``meta``, STL10's ``class_names.txt``, the Oxford-IIIT Pet
annotations, Food-101's ``meta/train.json``), which the fixture records as our lists of them.
``all_datasets`` is ``src/utils/variables_and_paths.py``'s ``ALL_DATASETS``, whose first 14
and 20 entries are the two benchmarks.

FER2013's names are lists of synonyms (``["happy", "smiling"]``); the head builder formats a
template with the list itself, so the prompt holds the list's ``str()``
("a photo of a ['happy', 'smiling'] looking face."), and that string is the class name here.
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

DATASETS = {
    "cifar100": "CIFAR100",
    "stl10": "STL10",
    "flowers102": "Flowers102",
    "oxford_pets": "OxfordIIITPet",
    "pcam": "PCAM",
    "fer2013": "FER2013",
    "emnist": "EMNIST",
    "cifar10": "CIFAR10",
    "food101": "Food101",
    "fashion_mnist": "FashionMNIST",
    "rendered_sst2": "RenderedSST2",
    "kmnist": "KMNIST",
}


def release_templates(src: Path) -> dict[str, list[str]]:
    """Dataset name -> its prompt format strings, from templates.py's ``dataset_to_template``."""
    scope: dict = {}
    exec(compile((src / "datasets/templates.py").read_text(), "templates.py", "exec"), scope)
    return {name: [f("{}") for f in fs] for name, fs in scope["dataset_to_template"].items()}


def list_literal(path: Path, target: str) -> list:
    """The list literal assigned to ``target`` (e.g. ``self.classnames``) in a source file."""
    for node in ast.walk(ast.parse(path.read_text())):
        named = isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == target
        if named and isinstance(node.value, ast.List):
            return ast.literal_eval(node.value)
    raise SystemExit(f"{path}: no list literal assigned to {target}")


def main() -> None:
    src = Path(sys.argv[1]) / "src"
    here = Path(__file__).parent
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else here / "fixtures/tall_masks_templates.json"
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from torchvision import datasets

    from pipeline.data.classnames import CLASSNAMES

    templates = release_templates(src)
    code_names = {
        "flowers102": list_literal(src / "datasets/flowers102.py", "self.classnames"),
        "pcam": list_literal(src / "datasets/pcam.py", "self.classnames"),
        "fer2013": [str(c) for c in list_literal(src / "datasets/fer2013.py", "self.classnames")],
        "cifar10": list_literal(src / "datasets/cifar10.py", "cifar_classnames"),
    }
    torchvision_names = {
        "emnist": list(datasets.EMNIST.classes_split_dict["digits"]),
        "fashion_mnist": list(datasets.FashionMNIST.classes),
        "kmnist": list(datasets.KMNIST.classes),
        "rendered_sst2": ["negative", "positive"],  # RenderedSST2.__init__ sets these
    }
    fixture = {}
    for task, name in DATASETS.items():
        if task in code_names:
            origin, names = "release code", code_names[task]
        elif task in torchvision_names:
            origin, names = "torchvision classes", torchvision_names[task]
        else:
            origin, names = "dataset files", list(CLASSNAMES[task])
        fixture[task] = {
            "dataset": name,
            "classnames_from": origin,
            "classnames": names,
            "templates": templates[name],
        }
    order = list_literal(src / "utils/variables_and_paths.py", "ALL_DATASETS")
    document = {"all_datasets": order, "tasks": fixture}
    out.write_text(json.dumps(document, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
