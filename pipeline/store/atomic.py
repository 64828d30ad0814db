"""Atomic outputs: every artifact is written into a temporary sibling and renamed into place
on success, removed on failure; abandoned temporaries of killed writers are cleaned up by the
next writer of the same path. Also the fault-injection hook that tests use to kill a writer
part-way."""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import json
import os
import shutil
import signal
import socket
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from pipeline.store.errors import ArtifactError

FAULT_AFTER_ENV = "PIPELINE_FAULT_AFTER"
#: Test hook: only artifacts whose path matches this glob (fnmatch) are faulted.
FAULT_PATH_ENV = "PIPELINE_FAULT_PATH"
#: Test hook: a folder; when set, each artifact is faulted at most once (a marker file there
#: records it), so a job's retry runs through.
FAULT_ONCE_ENV = "PIPELINE_FAULT_ONCE"
_fault_writes = 0


def fault_point(path: Path, *, commit: bool = False) -> None:
    """Test hook that simulates a job killed part-way (OOM killer, scheduler, power cut of a node).

    Inactive unless the environment sets PIPELINE_FAULT_AFTER=n. Then, for artifacts whose
    path matches PIPELINE_FAULT_PATH (fnmatch globs separated by `os.pathsep`; every artifact
    when unset), the process sends
    itself SIGKILL just before its (n+1)-th tensor write, or at the latest just before the
    final rename (`commit`); no Python cleanup runs, exactly as for a real kill. With
    PIPELINE_FAULT_ONCE=folder, an artifact is killed only if no earlier process killed
    itself on it: the first kill leaves a marker file (its content: the artifact's path) in
    that folder, and later attempts run through. Used only by tests/test_atomic.py and
    tests/workflow/test_determinism.py.
    """
    global _fault_writes
    limit = os.environ.get(FAULT_AFTER_ENV)
    if limit is None:
        return
    pattern = os.environ.get(FAULT_PATH_ENV)
    if pattern and not any(fnmatch.fnmatch(str(path), glob) for glob in pattern.split(os.pathsep)):
        return
    if commit or _fault_writes >= int(limit):
        once = os.environ.get(FAULT_ONCE_ENV)
        if once:
            marker = Path(once) / hashlib.sha1(str(Path(path).resolve()).encode()).hexdigest()
            try:  # O_EXCL: of two processes on one artifact, exactly one creates the marker
                fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            except FileExistsError:
                return
            os.write(fd, str(path).encode())
            os.close(fd)
        os.kill(os.getpid(), signal.SIGKILL)
    _fault_writes += 1


HOST = socket.gethostname().replace("-", "_") or "host"


def temporary_sibling(path: Path) -> Path:
    # Same directory, so the final rename stays on one file system and is atomic. Host and
    # pid in the name let a later writer tell an abandoned temporary from a live one.
    _remove_stale_temporaries(path)
    return path.with_name(f".{path.name}.tmp-{HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _remove_stale_temporaries(path: Path) -> None:
    """Delete temporaries of `path` left by killed writers on this host (their pid is gone).

    Temporaries of live processes, or written on other hosts of a shared file system, are
    left alone: they may belong to a job that is still running.
    """
    if not path.parent.is_dir():
        return
    prefix = f".{path.name}.tmp-{HOST}-"
    for entry in path.parent.iterdir():
        if not entry.name.startswith(prefix):
            continue
        pid = entry.name[len(prefix) :].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _process_alive(int(pid)):
            remove(entry)


def check_output_path(
    path: str | os.PathLike, *, store: bool = False, artifact: str | None = None
) -> None:
    """Refuse an output path whose replacement would destroy something else.

    A file output (`store=False`) must not be an existing folder. A Zarr output (`store=True`)
    may replace only an empty folder or a Zarr store that holds an artifact of the same kind
    (its `artifact` attribute equals `artifact`): never a file, a folder of other things, or
    another kind of artifact. An existing ancestor that is a file is named too. Raises
    ArtifactError; nothing is touched.
    """
    p = Path(path)
    for parent in p.parents:
        if parent.is_dir():
            break
        if parent.exists():
            raise ArtifactError(
                f"{p}: cannot create it: {parent} is a file, not a folder; choose another output "
                "path"
            )
    if not (p.exists() or p.is_symlink()):
        return
    keep = "move or delete it, or choose another output path"
    if not store:
        if p.is_dir():
            raise ArtifactError(
                f"{p}: is an existing folder; refusing to replace a folder with a file ({keep})"
            )
        return
    if not p.is_dir():
        raise ArtifactError(
            f"{p}: exists and is a file, not a Zarr store; refusing to replace it ({keep})"
        )
    if not any(not entry.name.startswith(".") for entry in p.iterdir()):
        return  # empty (Snakemake's hidden marker aside): nothing to lose
    try:
        meta = json.loads((p / "zarr.json").read_bytes())
        found = meta["attributes"].get("artifact") if meta.get("node_type") == "group" else None
        is_store = meta.get("node_type") == "group"
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        is_store, found = False, None
    if not is_store:
        raise ArtifactError(
            f"{p}: is an existing folder that is not a Zarr artifact; refusing to replace it "
            f"({keep})"
        )
    if found != artifact:
        raise ArtifactError(
            f"{p}: holds "
            f"{f'a `{found}` artifact' if found else 'a Zarr store of no known artifact kind'}; "
            "refusing to replace it with "
            f"{f'a `{artifact}` artifact' if artifact else 'another store'} ({keep})"
        )


def make_parents(path: Path) -> list[Path]:
    """Create `path`'s missing parent folders; return them, deepest first (see `remove_created`)."""
    created = []
    for parent in path.parents:
        if parent.is_dir():
            break
        created.append(parent)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ArtifactError(
            f"{path}: cannot create its folder {path.parent} ({err.strerror or err})"
        ) from err
    return created


def remove_created(folders: Sequence[Path]) -> None:
    """Remove the folders `make_parents` created, deepest first, as long as they are empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty (another job wrote there) or already gone
            break


#: How often a store's rename is retried when a concurrent writer's store lands in between.
_RENAME_TRIES = 8


def rename_into_place(tmp: Path, path: Path) -> None:
    """Rename `tmp` to `path` atomically. On failure `tmp` is removed and the error names `path`."""
    try:
        fault_point(path, commit=True)
        if not tmp.is_dir():
            os.replace(
                tmp, path
            )  # a folder at `path` fails here (IsADirectoryError): never removed
            return
        for _ in range(_RENAME_TRIES):
            old = None
            if path.is_dir() and not path.is_symlink():
                # A directory cannot be renamed over a non-empty one. Move the old one aside
                # first (one atomic rename), so no moment exists where a half-deleted store sits
                # at `path`.
                old = path.with_name(
                    f".{path.name}.tmp-{HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}-old"
                )
                try:
                    os.replace(path, old)
                except FileNotFoundError:  # a concurrent writer moved it aside first
                    old = None
            try:
                os.replace(tmp, path)
            except OSError as err:
                if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                # A concurrent writer's complete store landed in between: move it aside too.
                continue
            finally:
                if old is not None:
                    shutil.rmtree(old, ignore_errors=True)
            return
        raise ArtifactError(
            f"{path}: other processes kept replacing it while this one renamed its output into "
            "place; run one writer per output"
        )
    except BaseException as err:
        remove(tmp)
        if isinstance(err, OSError) and not isinstance(err, ArtifactError):
            raise ArtifactError(
                f"{path}: cannot move the finished output into place ({err.strerror or err})"
            ) from err
        raise


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write to; rename it into place on success.

    On any exception the temporary is removed and `path` is left as it was, so a failed or
    killed job never leaves something that looks like a finished artifact. An existing folder
    at `path` is refused (`check_output_path`); parent folders created here are removed again
    when the write fails.
    """
    final = Path(path)
    check_output_path(final)
    created = make_parents(final)
    tmp = temporary_sibling(final)
    try:
        yield tmp
        rename_into_place(tmp, final)
    except BaseException:
        remove(tmp)
        remove_created(created)
        raise
