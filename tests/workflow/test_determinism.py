"""Determinism and recovery through Snakemake itself, on a small config.

Run A goes through uninterrupted. Run B starts from scratch with the store's fault hook armed
for every stage (PIPELINE_FAULT_AFTER / PIPELINE_FAULT_PATH: a job SIGKILLs itself after its
first tensor, or just before renaming a CSV) once per artifact (PIPELINE_FAULT_ONCE), and
Snakemake retries each killed job in the same run: every stage's first attempt dies part-way
through its write and the retry must start over from what the kill left. Every file of B's
results (checkpoints, heads, Fisher, bases, Hessians, merged encoders, CSVs) must equal A's
byte for byte, and no temporaries may remain: retries cleaned up after the killed attempts,
and two runs from scratch on one machine give the same bits. (That a killed write leaves
nothing at its output path, without Snakemake's own clean-up of failed jobs, is checked
stage by stage in tests/test_atomic.py.)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.store import FAULT_AFTER_ENV, FAULT_ONCE_ENV, FAULT_PATH_ENV

REPO = Path(__file__).resolve().parents[2]
NAME = "det"
CONFIG = {
    "name": NAME,
    "backbone": "demo",
    "tasks": ["shapes", "colour"],
    "data": {"train_size": 128, "test_size": 64},
    "pretrain": {
        "source": "train",
        "task": "generic",
        "train_size": 256,
        "epochs": 1,
        "batch_size": 64,
    },
    "head": {"zeroshot": False, "steps": 20},
    "finetune": {"epochs": 1, "batch_size": 64},
    "fisher": {"fractions": [0.5]},
    "merge": {"k": [2], "alpha": [1.0]},
}
# One job of every stage (the others run through undisturbed): each is killed once, on its
# first attempt.
STAGES = [
    "*/checkpoints/pretrained.safetensors",
    "*/heads/shapes.*",
    "*/checkpoints/shapes.*",
    "*/fisher/per_sample/shapes/*",
    "*/basis/*",
    "*/hessian/*",
    "*/merged/epimer/*",
    "*/eval/epimer/*",
    "*/summary.csv",
]


def snakemake(
    workdir: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    (workdir / "run.yaml").write_text(yaml.safe_dump(CONFIG))
    # The target is summary.csv: every stage of the issue, not the optional figures and tables.
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "--snakefile",
        str(REPO / "Snakefile"),
        "--directory",
        str(workdir),
        "--configfile",
        str(workdir / "run.yaml"),
        "--cores",
        "2",
        *args,
        f"results/{NAME}/summary.csv",
    ]
    clean = {
        k: v
        for k, v in os.environ.items()
        if k not in (FAULT_AFTER_ENV, FAULT_PATH_ENV, FAULT_ONCE_ENV)
    }
    return subprocess.run(cmd, capture_output=True, text=True, env={**clean, **(env or {})})


def artifacts(workdir: Path) -> dict[str, Path]:
    """Every result file except logs and hidden files (temporaries, Snakemake's markers)."""
    root = workdir / "results" / NAME
    if not root.exists():
        return {}
    return {
        f.relative_to(root).as_posix(): f
        for f in sorted(root.rglob("*"))
        if f.is_file()
        and f.relative_to(root).parts[0] != "logs"
        and not any(part.startswith(".") for part in f.relative_to(root).parts)
    }


def _finished(res: subprocess.CompletedProcess) -> None:
    assert res.returncode == 0, f"snakemake failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from concurrent.futures import ThreadPoolExecutor

    a = tmp_path_factory.mktemp("uninterrupted")
    b = tmp_path_factory.mktemp("killed")
    markers = tmp_path_factory.mktemp("kills")
    # A job writes at most a few artifacts, each killed once: three retries see every job through.
    fault = {
        FAULT_AFTER_ENV: "1",
        FAULT_PATH_ENV: os.pathsep.join(STAGES),
        FAULT_ONCE_ENV: str(markers),
    }
    # The two runs side by side: each is mostly a chain of single jobs, so together they keep
    # the cores busier (every job's arithmetic is the same whatever else runs).
    with ThreadPoolExecutor(2) as pool:
        uninterrupted = pool.submit(snakemake, a)
        res = pool.submit(snakemake, b, "--retries", "3", env=fault).result()
        _finished(uninterrupted.result())
    killed = sorted(m.read_text() for m in markers.iterdir())
    yield a, b, res, killed
    for run in (a, b, markers):
        shutil.rmtree(run, ignore_errors=True)


@pytest.mark.slow
def test_every_stage_killed_once_and_its_retry_recovers(runs):
    import fnmatch

    _, b, res, killed = runs
    _finished(res)
    for pattern in STAGES:
        assert any(fnmatch.fnmatch(p, pattern) for p in killed), f"no job was killed at {pattern}"
    assert [p for p in (b / "results").rglob("*") if ".tmp-" in p.name] == []  # retries cleaned up


@pytest.mark.slow
def test_resumed_run_equals_an_uninterrupted_run_bit_for_bit(runs):
    a, b, _, _ = runs
    files_a, files_b = artifacts(a), artifacts(b)
    assert sorted(files_a) == sorted(files_b)
    assert any(p.endswith(".zarr/zarr.json") and p.startswith("merged/epimer/") for p in files_a)
    assert "summary.csv" in files_a
    different = [p for p in files_a if files_a[p].read_bytes() != files_b[p].read_bytes()]
    assert different == []


@pytest.mark.slow
def test_nothing_left_to_do_after_recovery(runs):
    _, b, _, _ = runs
    res = snakemake(b, "-n")
    assert res.returncode == 0 and "Nothing to be done" in res.stdout + res.stderr
