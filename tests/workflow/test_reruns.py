"""What re-runs what: performance knobs re-run nothing, an unchanged input re-runs nothing
however its timestamp moved (touch, copy, restore), changed content re-runs exactly its
dependents, and one damaged artifact is re-created alone (pipeline/stamps.py, docs/workflow.md).

The unit tests drive pipeline.stamps on hand-made folders; the slow ones dry-run Snakemake on
copies of the finished tiny run (tests/workflow/conftest.py)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from pipeline import stamps
from pipeline.store import (
    ArtifactError,
    ZarrReader,
    file_fingerprint,
    write_safetensors,
    write_zarr,
)
from tests.workflow.test_workflow import SNAKEMAKE, TINY, planned_jobs, snakemake

HOUR_NS = 3600 * 10**9


def _tiny() -> dict:
    return yaml.safe_load(TINY.read_text())


def _shift(path: Path, ns: int) -> None:
    """Move the time Snakemake reads for `path` by `ns` (a touch into the future, say)."""
    carrier = path / stamps.TIMESTAMP_FILE if path.is_dir() else path
    t = carrier.stat().st_mtime_ns + ns
    os.utime(carrier, ns=(t, t))


def _copy_without_times(src: Path, dst: Path) -> None:
    """`cp -r` without `-p`: every file gets a new modification time."""
    if src.is_dir():
        shutil.copytree(src, dst, copy_function=shutil.copy)
    else:
        shutil.copy(src, dst)


# --------------------------------------------------------------------------- unit: stamps


@pytest.fixture
def results(tmp_path):
    """A results folder with a checkpoint, a Zarr store (with Snakemake's time carrier) and a CSV,
    dated an hour ago, and its manifest."""
    root = tmp_path / "results" / "run"
    write_safetensors(
        root / "checkpoints" / "a.safetensors", {"w": torch.arange(6.0).reshape(2, 3)}
    )
    write_zarr(root / "basis" / "k2.zarr", {"u": torch.ones(3, 2)}, {"artifact": "basis"})
    (root / "basis" / "k2.zarr" / stamps.TIMESTAMP_FILE).touch()
    (root / "eval").mkdir()
    (root / "eval" / "x.csv").write_text("task,split,accuracy\nshapes,test,0.5\n")
    (root / "logs").mkdir()
    (root / "logs" / "x.csv").write_text("not an artifact\n")
    for p in stamps.artifacts(root):
        _shift(p, -HOUR_NS)
    assert stamps.restore(root) == []  # first sight: recorded, nothing restored
    return root


def test_artifacts_are_the_files_and_stores_jobs_read(results):
    assert [p.relative_to(results).as_posix() for p in stamps.artifacts(results)] == [
        "basis/k2.zarr",
        "checkpoints/a.safetensors",
        "eval/x.csv",
    ]
    assert set(stamps.read_manifest(results)) == {
        "basis/k2.zarr",
        "checkpoints/a.safetensors",
        "eval/x.csv",
    }


def test_touched_and_copied_artifacts_get_their_recorded_times_back(results):
    before = {p: stamps.mtime_ns(p) for p in stamps.artifacts(results)}
    ckpt, store = results / "checkpoints" / "a.safetensors", results / "basis" / "k2.zarr"
    _shift(ckpt, 2 * HOUR_NS)  # touch
    backup = results.parent / "k2-backup.zarr"
    _copy_without_times(store, backup)  # a restore from a backup taken without times
    shutil.rmtree(store)
    _copy_without_times(backup, store)
    assert stamps.mtime_ns(store) != before[store]
    assert sorted(stamps.restore(results)) == ["basis/k2.zarr", "checkpoints/a.safetensors"]
    assert {p: stamps.mtime_ns(p) for p in stamps.artifacts(results)} == before
    assert store.stat().st_mtime_ns == before[store]  # the directory's own time follows its carrier


def test_changed_content_keeps_its_new_time_and_its_old_record(results):
    ckpt = results / "checkpoints" / "a.safetensors"
    recorded = stamps.read_manifest(results)["checkpoints/a.safetensors"]
    write_safetensors(ckpt, {"w": torch.arange(6.0).reshape(2, 3) + 1})
    now = stamps.mtime_ns(ckpt)
    assert now > recorded["mtime_ns"]
    assert stamps.restore(results) == []
    assert stamps.mtime_ns(ckpt) == now
    assert stamps.read_manifest(results)["checkpoints/a.safetensors"] == recorded


def test_a_copied_results_folder_keeps_its_stamps(results, tmp_path):
    before = {p.relative_to(results): stamps.mtime_ns(p) for p in stamps.artifacts(results)}
    elsewhere = tmp_path / "moved" / "run"
    _copy_without_times(results, elsewhere)
    assert len(stamps.restore(elsewhere)) == 3
    assert {
        p.relative_to(elsewhere): stamps.mtime_ns(p) for p in stamps.artifacts(elsewhere)
    } == before


def test_settle_redates_a_recreated_artifact_no_earlier_than_its_inputs(results, tmp_path):
    ckpt, store, csv = (
        results / "checkpoints" / "a.safetensors",
        results / "basis" / "k2.zarr",
        results / "eval" / "x.csv",
    )
    recorded = {p: stamps.mtime_ns(p) for p in (ckpt, store, csv)}
    jobs = [([str(ckpt)], [str(store)]), ([str(store)], [str(csv)])]
    # The store re-created with the same content, its input unchanged: its recorded time.
    shutil.rmtree(store)
    write_zarr(store, {"u": torch.ones(3, 2)}, {"artifact": "basis"})
    (store / stamps.TIMESTAMP_FILE).touch()
    assert stamps.settle(results, jobs) == ["basis/k2.zarr"]
    assert stamps.mtime_ns(store) == recorded[store]
    # The checkpoint changed, the store re-made with the same content after it: the store may not
    # be older than the checkpoint (that would re-run it for ever), so it takes the checkpoint's time.
    write_safetensors(ckpt, {"w": torch.zeros(2, 3)})
    changed = stamps.mtime_ns(ckpt)
    shutil.rmtree(store)
    write_zarr(store, {"u": torch.ones(3, 2)}, {"artifact": "basis"})
    (store / stamps.TIMESTAMP_FILE).touch()
    _shift(store, HOUR_NS)
    stamps.settle(results, jobs)
    assert stamps.mtime_ns(store) == changed
    manifest = stamps.read_manifest(results)
    assert manifest["checkpoints/a.safetensors"] == {
        "digest": file_fingerprint(ckpt)["digest"],
        "mtime_ns": changed,
    }


def test_settle_keeps_the_new_time_of_changed_content(results):
    ckpt, store = results / "checkpoints" / "a.safetensors", results / "basis" / "k2.zarr"
    shutil.rmtree(store)
    write_zarr(store, {"u": torch.full((3, 2), 2.0)}, {"artifact": "basis"})
    (store / stamps.TIMESTAMP_FILE).touch()
    now = stamps.mtime_ns(store)
    assert stamps.settle(results, [([str(ckpt)], [str(store)])]) == []
    assert stamps.mtime_ns(store) == now
    assert stamps.read_manifest(results)["basis/k2.zarr"]["mtime_ns"] == now


def test_missing_names_deleted_recorded_artifacts(results):
    shutil.rmtree(results / "basis" / "k2.zarr")
    assert stamps.missing(results) == [str(results / "basis" / "k2.zarr")]


def test_an_unreadable_manifest_restores_nothing_and_is_rewritten(results):
    (results / stamps.MANIFEST).write_text("{not json")
    _shift(results / "checkpoints" / "a.safetensors", HOUR_NS)
    assert stamps.restore(results) == []
    assert set(stamps.read_manifest(results)) == {
        "basis/k2.zarr",
        "checkpoints/a.safetensors",
        "eval/x.csv",
    }


# --------------------------------------------------------------------------- workflow


def _copy(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(run, dst, symlinks=True)  # copy2 keeps modification times
    return dst


# (config section, key, value): each changes how a job runs, not what it makes.
KNOBS = [
    ("data", "download", True),
    ("data", "tasks", {"shapes": {"download": True}}),
    ("fisher", "chunk_size", 7),
    ("fisher", "num_workers", 2),
    ("fisher", "device", "cpu"),
    ("evaluate", "batch_size", 13),
    ("evaluate", "num_workers", 2),
    ("evaluate", "device", "cpu"),
    ("merge", "device", "cuda:1"),
]


@pytest.mark.slow
def test_performance_knobs_schedule_nothing(finished_run, tmp_path):
    run = _copy(finished_run, tmp_path)
    for section, key, value in KNOBS:
        cfg = _tiny()
        cfg.setdefault(section, {})[key] = value
        assert planned_jobs(run, cfg) == {}, f"{section}.{key}: {value!r} schedules jobs"
    # A setting that shapes results still re-runs what it shapes, and only that.
    cfg = _tiny()
    cfg["evaluate"] = {"dtype": "bfloat16"}
    T, F = len(cfg["tasks"]), len(cfg["fisher"]["fractions"])
    # One evaluation job per sweep (one k): ta, ties, tsvm one each; fisher and epimer one per fraction.
    assert planned_jobs(run, cfg) == {
        "evaluate_ta": 1,
        "evaluate_ties": 1,
        "evaluate_tsvm": 1,
        "evaluate_fisher": F,
        "evaluate_epimer": F,
        "evaluate_finetuned": T,
        "evaluate_zeroshot": 1,
        "report": 1,
        "tables": 1,
        "plots": 1,
        "all": 1,
    }


# Snakemake's own checksums cover files up to this size; real checkpoints are far larger, so the
# tests set it below the tiny run's file sizes to see what a 350 MB checkpoint gets.
LARGE = ("--max-checksum-file-size", "1000")


def _dry(run: Path, cfg: dict, *extra: str) -> tuple[dict[str, int], str]:
    res = snakemake(run, "-n", "--cores", "2", *extra, config=cfg)
    out = res.stdout + res.stderr
    if "Nothing to be done" in out:
        return {}, out
    counts = {}
    for line in out.split("Job stats:")[1].splitlines()[3:]:
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            break
        if parts[0] != "total":
            counts[parts[0]] = int(parts[1])
    return counts, out


@pytest.mark.slow
def test_touching_copying_or_restoring_unchanged_inputs_schedules_nothing(finished_run, tmp_path):
    run = _copy(finished_run, tmp_path)
    root = run / "results" / "tiny"
    ckpt = root / "checkpoints" / "shapes.safetensors"
    assert ckpt.stat().st_size > 1000
    _shift(ckpt, HOUR_NS)  # touch
    _shift(root / "checkpoints" / "pretrained.safetensors", HOUR_NS)
    store = root / "basis" / "k2.zarr"  # a directory: never checksummed by Snakemake
    _copy_without_times(store, tmp_path / "backup.zarr")
    shutil.rmtree(store)
    _copy_without_times(tmp_path / "backup.zarr", store)  # restored from a backup
    counts, out = _dry(run, _tiny(), *LARGE)
    assert counts == {}, out[-3000:]
    assert "content stamps: 3 artifact(s)" in out
    # The whole results folder copied without times (cp -r, rsync without -t).
    shutil.move(root, tmp_path / "saved")
    _copy_without_times(tmp_path / "saved", root)
    counts, out = _dry(run, _tiny(), *LARGE)
    assert counts == {}, out[-3000:]


@pytest.mark.slow
def test_one_changed_byte_reruns_exactly_its_dependents(finished_run, tmp_path):
    run = _copy(finished_run, tmp_path)
    ckpt = run / "results" / "tiny" / "checkpoints" / "shapes.safetensors"
    data = bytearray(ckpt.read_bytes())
    data[-1] ^= 0x01  # one bit of the last tensor's last element
    ckpt.write_bytes(bytes(data))
    cfg = _tiny()
    F, K = len(cfg["fisher"]["fractions"]), len(cfg["merge"]["k"])
    sweeps = {"ta": 1, "ties": 1, "fisher": F, "tsvm": K, "epimer": K * F}  # every α sweep
    expected = {
        "fisher": F,  # this task's Fisher diagonals (one estimator), not the other tasks'
        "evaluate_finetuned": 1,  # this task's fine-tuned reference
        "basis": K,
        "hessian": K * F,
        **{f"merge_{m}": n for m, n in sweeps.items()},
        **{f"evaluate_{m}": n for m, n in sweeps.items()},
        "landscape": 1,
        "report": 1,
        "tables": 1,
        "plots": 1,
        "all": 1,
    }  # not: training, heads, θ0's evaluation, the other tasks' Fisher diagonals and references
    for extra in ((), LARGE):
        counts, out = _dry(run, cfg, *extra)
        assert counts == expected, (extra, out[-3000:])


@pytest.mark.slow
def test_a_damaged_store_is_recreated_alone_by_the_printed_command(finished_run, tmp_path):
    run = _copy(finished_run, tmp_path)
    store = run / "results" / "tiny" / "merged" / "ta" / "a0.5.zarr"
    digest = file_fingerprint(store)["digest"]
    # Its sweep's other α: the job that re-creates the store writes it again, with the same content.
    sibling = store.parent / "a1.0.zarr"
    sibling_digest = file_fingerprint(sibling)["digest"]
    chunk = max(
        (p for p in store.rglob("*") if p.is_file() and "c" in p.parts),
        key=lambda p: p.stat().st_size,
    )
    chunk.write_bytes(b"\0" * chunk.stat().st_size)  # damage: same size, other bytes
    reader = ZarrReader(store)
    with pytest.raises(ArtifactError, match="delete .*a0.5.zarr and re-run"):
        for name in reader.keys():
            reader.get(name)
    shutil.rmtree(store)  # what the message says
    # A plain run would re-create nothing (the evaluation and summary exist): the workflow names
    # the command that re-creates the store alone.
    counts, out = _dry(run, _tiny())
    assert counts == {}
    marker = "re-create them (only them) with:\n  "
    assert marker in out, out[-3000:]
    command = shlex.split(out.split(marker, 1)[1].splitlines()[0])
    # The targets come first: --configfile takes several values and would swallow them.
    assert command[:4] == ["snakemake", "results/tiny/merged/ta/a0.5.zarr", "--cores", "1"], command
    res = subprocess.run(
        [*SNAKEMAKE, "--directory", str(run), *command[1:]], capture_output=True, text=True
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert file_fingerprint(store)["digest"] == digest
    assert file_fingerprint(sibling)["digest"] == sibling_digest
    # Nothing downstream of it is out of date, now or after the next unrelated change.
    assert _dry(run, _tiny())[0] == {}
    # Forcing the path re-creates it in place, with the same effect.
    res = subprocess.run(
        [*SNAKEMAKE, "--directory", str(run), "--force", *command[1:]],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0 and "1 of 1 steps (100%) done" in res.stdout + res.stderr, (
        res.stderr[-3000:]
    )
    assert file_fingerprint(store)["digest"] == digest
    assert _dry(run, _tiny())[0] == {}
    cfg = _tiny()
    cfg["merge"]["alpha"] = [*cfg["merge"]["alpha"], 0.7]
    assert _dry(run, cfg)[0] == {
        "merge_ta": 1,
        "merge_ties": 1,
        "merge_tsvm": 1,
        "merge_epimer": 2,
        "evaluate_ta": 1,
        "evaluate_ties": 1,
        "evaluate_tsvm": 1,
        "evaluate_epimer": 2,
        "report": 1,
        "tables": 1,
        "plots": 1,
        "all": 1,
    }
