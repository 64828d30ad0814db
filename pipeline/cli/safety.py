"""Guards around every stage: outputs that would overwrite its inputs are refused before it
runs, and any failure becomes one line naming the file and what is wrong."""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Sequence
from pathlib import Path

#: Options that name files or folders a command reads (checked against its outputs).
INPUT_OPTIONS = (
    "pretrained",
    "finetuned",
    "fisher",
    "basis",
    "hessian",
    "checkpoint",
    "head",
    "heads",
    "src",
    "summary",
    "landscape",
    "merged",
    "root",
)
#: Options that name files or Zarr stores a command writes (`{alpha}` expanded per α).
OUTPUT_OPTIONS = ("out", "report")
#: The artifact kind of each stage whose --out is a Zarr store (merge: when it ends in .zarr).
STORE_ARTIFACTS = {
    "merge": "merged",
    "basis": "basis",
    "hessian": "hessian",
    "fisher": "fisher",
    "landscape": "landscape",
}


def _paths_of(args: argparse.Namespace, options: Sequence[str]) -> list[tuple[str, str]]:
    """(option, path) for every path the given options of `args` hold."""
    found = []
    for option in options:
        value = getattr(args, option, None)
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, (str, Path)) and str(item):
                found.append((option, str(item)))
    return found


def _output_paths(args: argparse.Namespace) -> list[tuple[str, str]]:
    alphas = getattr(args, "alpha", None) or []
    out = []
    for option, path in _paths_of(args, OUTPUT_OPTIONS):
        if "{alpha}" in path and alphas:
            out += [(option, path.replace("{alpha}", str(a))) for a in alphas]
        else:
            out.append((option, path))
    return out


def same_path(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)  # inode identity: hard links and symlinks included
    except OSError:
        pass
    return a.resolve() == b.resolve()


def within(inner: Path, outer: Path) -> bool:
    return outer.resolve() in inner.resolve().parents


def _check_against_input(o: Path, option: str, in_option: str, inp: str) -> None:
    """Refuse output `o` of --`option` where it is, holds, or lies inside the input `inp`."""
    from pipeline.store import ArtifactError

    p = Path(inp)
    if same_path(o, p):
        raise ArtifactError(
            f"{o}: --{option} is also an input of this command (--{in_option.replace('_', '-')} {inp}); "
            "refusing to overwrite an input: choose another output path"
        )
    if p.exists() and o.is_dir() and within(p, o):
        raise ArtifactError(
            f"{o}: --{option} is a folder holding the input {inp}; refusing to replace it: choose another output path"
        )
    if p.is_dir() and (p / "zarr.json").is_file() and within(o, p):
        raise ArtifactError(
            f"{o}: --{option} lies inside the input store {inp}; choose an output path outside it"
        )


def check_outputs(args: argparse.Namespace) -> None:
    """Refuse outputs that would overwrite this command's own inputs, before anything runs.

    An output may not be an input (same resolved path or same inode), contain an input (a
    folder output over the inputs), lie inside an input store, or be another output of the
    same command. Raises ArtifactError naming both paths.
    """
    from pipeline.store import ArtifactError, check_output_path

    outputs = _output_paths(args)
    inputs = _paths_of(args, INPUT_OPTIONS)
    for i, (option, out) in enumerate(outputs):
        o = Path(out)
        for in_option, inp in inputs:
            _check_against_input(o, option, in_option, inp)
        for other_option, other in outputs[:i]:
            if same_path(o, Path(other)):
                raise ArtifactError(
                    f"{o}: given as both --{other_option} and --{option}; give each output its own path"
                )
        # Up front, so a bad --report is refused before the merge, not after it.
        kind = STORE_ARTIFACTS.get(getattr(args, "command", None))
        store = (
            option == "out"
            and kind is not None
            and (args.command != "merge" or o.suffix == ".zarr")
        )
        check_output_path(o, store=store, artifact=kind if store else None)


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _os_error_line(err: OSError) -> str:
    """An OS error's line: the file (or both files of a move) and the operation."""
    what = err.strerror
    if err.filename is not None and err.filename2 is not None:
        return f"cannot move or link {err.filename} to {err.filename2}: {what}"
    if err.filename is not None:
        kind = {
            IsADirectoryError: "it is a folder, a file was expected",
            NotADirectoryError: "a part of the path is not a folder",
        }
        return f"{err.filename}: cannot open or create it: {kind.get(type(err), what)}"
    return f"{what} (an operating-system error without a file name; --debug shows where)"


def error_line(err: BaseException) -> str:
    """The one-line message `main` prints for an exception: the file and what is wrong.

    Terminal colour codes and torch's advice to load with `weights_only=False` (running the
    file's code) are dropped; OS errors name the file and the operation."""
    if isinstance(err, OSError) and err.strerror is not None:
        return _os_error_line(err)
    text = _ANSI.sub("", str(err))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    refused = "Weights only load failed" in text or any(
        line.startswith("WeightsUnpickler error:") for line in lines
    )
    # torch's advice: re-run with weights_only=False (running the file's code), and a link.
    lines = [
        line.removeprefix("WeightsUnpickler error:").strip()
        for line in lines
        if "weights_only" not in line
        and not line.startswith("Check the documentation of torch.load")
    ]
    first = lines[0] if lines else ""
    if refused:  # torch's safe loader refused the pickle: say so, and what it found
        return f"refused to unpickle a checkpoint: {first or 'it needs code that a safe load does not run'}"
    if isinstance(err, (ValueError, FileNotFoundError)):
        return first or type(err).__name__
    if isinstance(err, RecursionError):
        return "an input nests too deeply to be read (corrupt or crafted file); --debug shows where"
    if isinstance(err, MemoryError):
        return "out of memory (an input declares more data than this machine holds); --debug shows where"
    return f"{type(err).__name__}: {first or 'no message'} (--debug shows the traceback)"
