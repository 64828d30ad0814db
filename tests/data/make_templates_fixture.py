"""Writes ``fixtures/task_vectors_templates.json`` from a checkout of the task-vectors release.

Usage: ``python tests/data/make_templates_fixture.py <task_vectors checkout> [out.json]``.

The release's prompt lists (``src/datasets/templates.py``) are lambdas; each is called with
the placeholder "{}" so that the fixture holds the format strings character for character.
Class names the release writes in its code (MNIST, SVHN, GTSRB, RESISC45 and EuroSAT's
renaming table) are evaluated from that code; Cars, DTD and SUN397 take their names from
the dataset files (``cars_meta.mat``, the DTD and SUN397 folder names), which the fixture
records as the release's readers derive them (see ``derive`` below).
"""

from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path

from pipeline.data.classnames import EUROSAT_FOLDERS, TASK_VECTORS_DATASETS


def release_templates(src: Path) -> dict[str, list[str]]:
    """Dataset name -> its prompt format strings, from templates.py's ``dataset_to_template``."""
    scope: dict = {}
    exec(compile((src / "datasets/templates.py").read_text(), "templates.py", "exec"), scope)
    return {name: [f("{}") for f in fs] for name, fs in scope["dataset_to_template"].items()}


def list_literal(path: Path, target: str) -> list[str]:
    """The list of strings assigned to ``target`` (e.g. ``self.classnames``) in a release file."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == target:
            if isinstance(node.value, ast.List):
                return [ast.literal_eval(e) for e in node.value.elts]
    raise SystemExit(f"{path}: no list literal assigned to {target}")


def eurosat_names(src: Path) -> list[str]:
    """EuroSAT folder names (sorted, as ImageFolder numbers them) through the release's renaming."""
    text = (src / "datasets/eurosat.py").read_text()
    tree = ast.parse(text)
    scope: dict = {"re": re}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "pretify_classname":
            exec(compile(ast.Module([node], []), "eurosat.py", "exec"), scope)
    table = next(
        ast.literal_eval(n.value)
        for n in ast.walk(tree)
        if isinstance(n, ast.Assign) and ast.unparse(n.targets[0]) == "ours_to_open_ai"
    )
    folders = sorted(EUROSAT_FOLDERS)
    return [table[scope["pretify_classname"](f.replace("_", " "))] for f in folders]


def main() -> None:
    release = Path(sys.argv[1])
    out = (
        Path(sys.argv[2])
        if len(sys.argv) > 2
        else Path(__file__).parent / "fixtures/task_vectors_templates.json"
    )
    src = release / "src"
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from pipeline.data.classnames import CLASSNAMES, sun397_folder

    templates = release_templates(src)
    resisc = list_literal(src / "datasets/resisc45.py", "classes")
    code_names = {
        "mnist": list_literal(src / "datasets/mnist.py", "self.classnames"),
        "svhn": list_literal(src / "datasets/svhn.py", "self.classnames"),
        "gtsrb": list_literal(src / "datasets/gtsrb.py", "self.classnames"),
        "resisc45": [" ".join(c.split("_")) for c in resisc],
        "eurosat": eurosat_names(src),
    }
    # Names read from the dataset files, derived as the release's readers do.
    folders = sorted(sun397_folder(n) for n in CLASSNAMES["sun397"])
    data_names = {
        "cars": [c.replace("_", " ") for c in CLASSNAMES["cars"]],
        "dtd": [c.replace("_", " ") for c in sorted(CLASSNAMES["dtd"])],
        "sun397": [f[2:].replace("_", " ") for f in folders],
    }
    fixture = {}
    for task, name in TASK_VECTORS_DATASETS.items():
        fixture[task] = {
            "dataset": name,
            "classnames_from": "release code" if task in code_names else "dataset files",
            "classnames": code_names.get(task) or data_names[task],
            "templates": templates[name],
        }
    out.write_text(json.dumps(fixture, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
