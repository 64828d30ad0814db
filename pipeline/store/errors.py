"""The error every artifact read or write raises, and the check on tensor names that keeps
a name from becoming a path outside its store."""

from __future__ import annotations

import os
import re


class ArtifactError(ValueError):
    """A file could not be read or does not hold what it should. The message names the file."""


_BAD_NAME_CHAR = re.compile(r"[\x00-\x1f\x7f\\]")


def check_tensor_name(name: str, source: str | os.PathLike) -> None:
    """Refuse a tensor name that is not a plain relative name.

    Zarr stores a tensor `a/b` as the folder `a/b/` of the store, so a name is a path: empty
    segments, `.` or `..`, a leading `/`, backslashes and control characters (NUL included)
    could leave the store or collide with its metadata, and are refused for every output
    format alike. `source` is the file the name comes from (named in the error).
    """
    problem = None
    if not isinstance(name, str) or not name:
        problem = "is empty"
    else:
        bad = _BAD_NAME_CHAR.search(name)
        if bad is not None:
            problem = (
                "contains a backslash"
                if bad.group() == "\\"
                else f"contains the control character {bad.group()!r}"
            )
        elif name.startswith("/"):
            problem = "is an absolute path"
        elif any(part in ("", ".", "..") for part in name.split("/")):
            problem = "has an empty, `.` or `..` path segment"
        elif "zarr.json" in name.split("/"):
            problem = "has a segment `zarr.json` (the name of Zarr's metadata files)"
    if problem is not None:
        text = str(name)
        shown = (
            repr(text) if len(text) <= 120 else f"{text[:120]!r}…"
        )  # repr: NUL and control characters visible
        raise ArtifactError(
            f"{source}: tensor name {shown} {problem}; tensor names must be relative names of "
            "'/'-separated segments without `.`, `..`, backslashes or control characters: rename "
            "it in that file"
        )
