"""Provenance records: what an artifact is, the parameters and inputs it was made from, the
package version; and the check that refuses an artifact made from other inputs."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline import __version__
from pipeline.store.digests import file_fingerprint
from pipeline.store.errors import ArtifactError
from pipeline.store.readers import ZarrReader
from pipeline.store.writers import jsonable


def provenance(
    artifact: str,
    parameters: Mapping[str, Any],
    inputs: Iterable[str | os.PathLike] = (),
    artifact_version: int = 1,
) -> dict[str, Any]:
    """Standard provenance attributes for a Zarr artifact.

    artifact: its kind (`basis`, `hessian`, `fisher`, `merged`); parameters: everything
    that shaped it; inputs: the files it was made from, in order (each recorded with
    `file_fingerprint`). No timestamps: re-creating an artifact from the same inputs gives
    the same bytes.
    """
    return {
        "artifact": artifact,
        "artifact_version": artifact_version,
        "package_version": __version__,
        "parameters": jsonable(dict(parameters)),
        "inputs": {str(p): file_fingerprint(p) for p in inputs},
    }


def check_provenance(
    path: str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    *,
    artifact: str | None = None,
    parameters: Mapping[str, Any] | None = None,
    artifact_version: int | None = None,
) -> None:
    """Refuse a Zarr artifact that was not made from `inputs` (in order) with `parameters`.

    Compares the recorded fingerprints (size, content digest) of the artifact's inputs with
    those of the files given now, position by position (paths may differ: a moved or copied
    run still matches), and each given parameter with the recorded one. Raises ArtifactError
    naming the artifact, the first input or parameter that differs, and what to delete.
    """
    p = Path(path)
    attrs = ZarrReader(p).attrs()
    fix = f"delete {p} and re-run (Snakemake re-creates it)"
    if "inputs" not in attrs or "parameters" not in attrs:
        raise ArtifactError(f"{p}: no provenance record (inputs, parameters); {fix}")
    if artifact is not None and attrs.get("artifact") != artifact:
        raise ArtifactError(
            f"{p}: holds a `{attrs.get('artifact')}` artifact, expected `{artifact}`"
        )
    if artifact_version is not None and attrs.get("artifact_version") != artifact_version:
        raise ArtifactError(
            f"{p}: artifact version {attrs.get('artifact_version')} was written by another release "
            f"(this one reads version {artifact_version}); {fix}"
        )
    recorded = list(dict(attrs["inputs"]).items())
    if len(recorded) != len(inputs):
        raise ArtifactError(
            f"{p}: was made from {len(recorded)} input files, this run gives {len(inputs)}; {fix}"
        )
    for i, ((old_path, old), new_path) in enumerate(zip(recorded, inputs), start=1):
        new = file_fingerprint(new_path)
        if old.get("size") != new["size"] or old.get("digest") != new["digest"]:
            raise ArtifactError(
                f"{p}: input {i} differs from the one it was made from (recorded {old_path}: "
                f"{old.get('size')} bytes, {str(old.get('digest'))[:24]}…; given {new_path}: "
                f"{new['size']} bytes, {new['digest'][:24]}…); {fix}"
            )
    recorded_params = attrs["parameters"]
    for key, value in (parameters or {}).items():
        if recorded_params.get(key) != jsonable(value):
            raise ArtifactError(
                f"{p}: was made with {key}={recorded_params.get(key)!r}, this run asks for "
                f"{key}={value!r}; {fix}"
            )
