"""Content stamps: re-runs decided by what an artifact holds, not by when it was written.

Snakemake re-runs a job when an input is newer than its output. Its checksums spare a touched
input only up to `--max-checksum-file-size` (1 MB) and never for directories, so a touched,
copied or restored checkpoint or Zarr store re-runs everything downstream of it.

The workflow keeps, per results folder, a manifest (`.content-stamps.json`) of each artifact's
content digest (`pipeline.store.file_fingerprint`) and modification time as the workflow left
them. Two steps use it:

- `restore` (before Snakemake builds its DAG): an artifact whose modification time differs from
  the manifest's while its content digest is the recorded one gets the recorded time back, so
  a touch, a copy without `-p` or a restore from backup re-runs nothing. An artifact whose
  content differs keeps its new time: its dependents re-run. Only files that differ in time
  are digested, and `file_fingerprint` caches digests by (path, inode, size, mtime).
- `settle` (after a run, with the run's jobs): an artifact a job re-created with the recorded
  content gets the earliest time that is still no older than its inputs (its recorded time
  when its inputs are unchanged), so re-creating one damaged artifact does not make everything
  downstream of it out of date. Then the manifest records every artifact as the run left it.

A Zarr store's time is that of its `.snakemake_timestamp` file, which Snakemake reads as the
directory's time; both are set.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pipeline.store import ArtifactError, file_fingerprint

#: The manifest, in the results folder of a run (paths in it are relative to that folder, so a
#: copied or moved results folder keeps its stamps).
MANIFEST = ".content-stamps.json"
#: What counts as an artifact under the results folder: files by suffix, and Zarr stores.
ARTIFACT_SUFFIXES = (".safetensors", ".csv")
STORE_SUFFIX = ".zarr"
#: Folders under the results folder that hold no artifact another job reads.
SKIPPED_FOLDERS = ("logs", ".cache", "tables", "plots")
#: Snakemake's time carrier inside a directory output.
TIMESTAMP_FILE = ".snakemake_timestamp"


def artifacts(root: str | os.PathLike) -> list[Path]:
    """Every artifact under `root` (a run's results folder): `*.safetensors` and `*.csv` files
    and `*.zarr` stores, outside logs/, .cache/, tables/ and plots/; stores are not entered."""
    root = Path(root)
    found: list[Path] = []
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        if here == root:
            dirs[:] = [d for d in dirs if d not in SKIPPED_FOLDERS]
        stores = [d for d in dirs if d.endswith(STORE_SUFFIX)]
        found += [here / d for d in stores]
        dirs[:] = [d for d in dirs if not d.endswith(STORE_SUFFIX) and not d.startswith(".")]
        found += [
            here / f for f in files if f.endswith(ARTIFACT_SUFFIXES) and not f.startswith(".")
        ]
    return sorted(found)


def _carrier(path: Path) -> Path:
    """The file whose modification time Snakemake reads for `path`."""
    if path.is_dir() and (path / TIMESTAMP_FILE).is_file():
        return path / TIMESTAMP_FILE
    return path


def mtime_ns(path: str | os.PathLike) -> int:
    """The modification time (ns) Snakemake sees for a file or a directory output."""
    return _carrier(Path(path)).stat().st_mtime_ns


def _set_mtime_ns(path: Path, ns: int) -> None:
    carrier = _carrier(path)
    for p in {carrier, path}:
        st = p.stat()
        os.utime(p, ns=(st.st_atime_ns, ns))


def _digest(path: Path) -> str | None:
    try:
        return file_fingerprint(path)["digest"]
    except (ArtifactError, OSError):
        return None


def _key(root: Path, path: Path) -> str:
    return os.path.relpath(os.path.abspath(path), os.path.abspath(root))


def read_manifest(root: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The manifest of `root`: relative path → {"digest": str, "mtime_ns": int} ({} when there is
    none or it is unreadable: then nothing is restored, and the next step writes a new one)."""
    try:
        data = json.loads((Path(root) / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {
        k: v
        for k, v in data.items()
        if isinstance(v, dict)
        and isinstance(v.get("digest"), str)
        and isinstance(v.get("mtime_ns"), int)
    }


def _write_manifest(root: Path, entries: dict[str, dict[str, Any]]) -> None:
    tmp = root / f"{MANIFEST}.tmp-{os.getpid()}"
    try:
        tmp.write_text(json.dumps(entries, indent=0, sort_keys=True))
        os.replace(tmp, root / MANIFEST)
    except OSError:
        # A manifest that cannot be written only costs re-runs by timestamp, never a wrong result.
        tmp.unlink(missing_ok=True)


def _record(root: Path, manifest: dict[str, dict[str, Any]], path: Path) -> None:
    key = _key(root, path)
    ns = mtime_ns(path)
    old = manifest.get(key)
    if old is not None and old["mtime_ns"] == ns:
        return
    digest = _digest(path)
    if digest is None:
        manifest.pop(key, None)
    else:
        manifest[key] = {"digest": digest, "mtime_ns": ns}


def restore(root: str | os.PathLike) -> list[str]:
    """Give every artifact under `root` whose content is the recorded one its recorded time;
    record artifacts the manifest does not know yet. Returns the restored paths (relative)."""
    root = Path(root)
    if not root.is_dir():
        return []
    manifest = read_manifest(root)
    restored: list[str] = []
    changed = False
    for path in artifacts(root):
        key = _key(root, path)
        old = manifest.get(key)
        try:
            ns = mtime_ns(path)
        except OSError:
            continue
        if old is not None and old["mtime_ns"] == ns:
            continue
        digest = _digest(path)
        if digest is None:
            continue
        if old is not None and old["digest"] == digest:
            _set_mtime_ns(path, old["mtime_ns"])
            restored.append(key)
        elif old is None:
            # First sight: today's state is what Snakemake judges now, so it is safe to return to.
            manifest[key] = {"digest": digest, "mtime_ns": ns}
            changed = True
        # Changed content keeps its new time (its dependents re-run) and its old record: the
        # record is the state the workflow left, and `settle` replaces it after the next run.
    if changed:
        _write_manifest(root, manifest)
    return restored


def missing(root: str | os.PathLike) -> list[str]:
    """The recorded artifacts under `root` that are gone (deleted, e.g. after a read error named
    them), as paths joined to `root`, sorted."""
    root = Path(root)
    return sorted(str(root / key) for key in read_manifest(root) if not (root / key).exists())


def settle(
    root: str | os.PathLike, jobs: Iterable[tuple[Sequence[str], Sequence[str]]]
) -> list[str]:
    """After a run: re-date the artifacts its jobs re-created with their recorded content, then
    record every artifact under `root` as the run left it.

    jobs: (input paths, output paths) of each job of the run's DAG. An output under `root` whose
    content is the recorded one gets max(recorded time, newest time of its inputs) when that is
    earlier than its time now; inputs are settled first. Returns the re-dated paths (relative)."""
    root = Path(root)
    if not root.is_dir():
        return []
    manifest = read_manifest(root)
    producer: dict[str, list[str]] = {}
    for inputs, outputs in jobs:
        for out in outputs:
            producer[os.path.abspath(out)] = [os.path.abspath(i) for i in inputs]
    settled: dict[str, int | None] = {}
    redated: list[str] = []

    def final_ns(path: str, seen: frozenset[str] = frozenset()) -> int | None:
        if path in settled:
            return settled[path]
        try:
            ns: int | None = mtime_ns(path)
        except OSError:
            ns = None
        if path in producer and ns is not None and path not in seen:
            newest_input = max(
                (t for t in (final_ns(i, seen | {path}) for i in producer[path]) if t is not None),
                default=None,
            )
            old = manifest.get(_key(root, Path(path)))
            if (
                old is not None
                and old["mtime_ns"] != ns
                and Path(path).is_relative_to(root.absolute())
            ):
                target = max(old["mtime_ns"], newest_input or 0)
                if target < ns and _digest(Path(path)) == old["digest"]:
                    _set_mtime_ns(Path(path), target)
                    redated.append(_key(root, Path(path)))
                    ns = target
        settled[path] = ns
        return ns

    for out in producer:
        final_ns(out)
    for path in artifacts(root):
        try:
            _record(root, manifest, path)
        except OSError:
            continue
    present = {_key(root, p) for p in artifacts(root)}
    _write_manifest(root, {k: v for k, v in manifest.items() if k in present})
    return redated
