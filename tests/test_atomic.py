"""Atomic artifacts: every stage, killed with SIGKILL part-way through writing its output (the
store's PIPELINE_FAULT_AFTER test hook), leaves nothing at the output path (or the previous
artifact, untouched); re-running it gives exactly the bytes of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.cli import main
from pipeline.store import FAULT_AFTER_ENV, FAULT_PATH_ENV, write_safetensors

REPO = Path(__file__).resolve().parents[1]
DATA = json.dumps({"source": "synthetic", "train_size": 48, "test_size": 16})
FINETUNE = json.dumps({"epochs": 1, "batch_size": 16, "lr": 0.0003, "weight_decay": 0.1, "seed": 0})


def run_killed(
    argv: list[str], after: int = 1, pattern: str | None = None
) -> subprocess.CompletedProcess:
    """Run `python -m pipeline argv` with the fault hook armed; it must die of SIGKILL."""
    env = {**os.environ, FAULT_AFTER_ENV: str(after)}
    env.pop(FAULT_PATH_ENV, None)
    if pattern:
        env[FAULT_PATH_ENV] = pattern
    res = subprocess.run(
        [sys.executable, "-m", "pipeline", *argv], capture_output=True, text=True, env=env, cwd=REPO
    )
    assert res.returncode == -signal.SIGKILL, (res.returncode, res.stderr[-2000:])
    return res


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file of an artifact (a file, or a Zarr directory without hidden files) → its bytes."""
    if path.is_file():
        return {"": path.read_bytes()}
    return {
        f.relative_to(path).as_posix(): f.read_bytes()
        for f in sorted(path.rglob("*"))
        if f.is_file() and not any(part.startswith(".") for part in f.relative_to(path).parts)
    }


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


def check_stage(argv_for, tmp_path: Path, name: str, after: int = 1) -> None:
    """Uninterrupted run → A; killed run → nothing at B; re-run → B equals A byte for byte."""
    a, b = tmp_path / "a" / name, tmp_path / "b" / name
    a.parent.mkdir()
    b.parent.mkdir()
    assert main(argv_for(a)) == 0
    run_killed(argv_for(b), after)
    assert not b.exists(), f"a killed job left {b}"
    assert len(leftovers(b.parent)) == 1  # its temporary, which nothing takes for an artifact
    assert main(argv_for(b)) == 0
    assert leftovers(b.parent) == []  # the re-run removed the dead job's temporary
    assert snapshot(b) == snapshot(a)


# --------------------------------------------------------------------------- merge stages (toy checkpoints)


def _models(paths) -> list[str]:
    return ["--pretrained", str(paths["pretrained"]), "--finetuned", *map(str, paths["finetuned"])]


def _fisher(paths) -> list[str]:
    return ["--fisher", *map(str, paths["fisher"])]


def test_basis_stage(toy, tmp_path):
    paths = toy(3)
    check_stage(
        lambda out: ["basis", *_models(paths), "--k", "2", "--out", str(out), "-q"],
        tmp_path,
        "k2.zarr",
        after=3,
    )


def test_hessian_stage(toy, tmp_path):
    paths = toy(3)
    basis = tmp_path / "k2.zarr"
    assert main(["basis", *_models(paths), "--k", "2", "--out", str(basis), "-q"]) == 0
    argv = lambda out: [
        "hessian",
        *_models(paths),
        *_fisher(paths),
        "--basis",
        str(basis),
        "--out",
        str(out),
        "-q",
    ]  # noqa: E731
    check_stage(argv, tmp_path, "h.zarr", after=2)


@pytest.mark.parametrize("suffix", [".zarr", ".safetensors"])
def test_merge_stage(toy, tmp_path, suffix):
    paths = toy(3)
    argv = lambda out: [
        "merge",
        "epimer",
        *_models(paths),
        *_fisher(paths),
        "--k",
        "2",
        "--out",
        str(out),
        "-q",
    ]  # noqa: E731
    check_stage(argv, tmp_path, f"merged{suffix}", after=4)


def test_a_killed_rewrite_leaves_the_previous_artifact_intact(toy, tmp_path):
    paths = toy(2)
    out = tmp_path / "merged.zarr"
    assert main(["merge", "ta", *_models(paths), "--alpha", "0.5", "--out", str(out), "-q"]) == 0
    before = snapshot(out)
    for after in (0, 3, 1000):  # before the first tensor, part-way, just before the rename
        run_killed(
            ["merge", "ta", *_models(paths), "--alpha", "0.9", "--out", str(out), "-q"], after
        )
        assert snapshot(out) == before


def test_the_hook_only_fires_for_matching_paths(toy, tmp_path):
    paths = toy(2)
    out = tmp_path / "merged.safetensors"
    env = {**os.environ, FAULT_AFTER_ENV: "0", FAULT_PATH_ENV: "*/basis/*"}
    res = subprocess.run(
        [sys.executable, "-m", "pipeline", "merge", "ta", *_models(paths), "--out", str(out), "-q"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )
    assert res.returncode == 0, res.stderr
    assert out.is_file()


# --------------------------------------------------------------------------- training, Fisher and evaluation stages


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """θ0 of the demo backbone, a head and a fine-tuned checkpoint of one task (tiny data)."""
    from pipeline.models.backbone import build_visual

    root = tmp_path_factory.mktemp("demo")
    theta0 = root / "theta0.safetensors"
    torch.manual_seed(0)
    write_safetensors(
        theta0, {n: t.detach().clone() for n, t in build_visual().state_dict().items()}
    )
    head = root / "head.safetensors"
    assert (
        main(
            [
                "head",
                "--task",
                "shapes",
                "--pretrained",
                str(theta0),
                "--data",
                DATA,
                "--train",
                '{"steps": 5}',
                "--out",
                str(head),
                "-q",
            ]
        )
        == 0
    )
    return {"theta0": theta0, "head": head}


@pytest.mark.slow
def test_pretrain_stage(tmp_path):
    train = json.dumps({"train_size": 32, "epochs": 1, "batch_size": 16, "lr": 0.002, "seed": 0})
    check_stage(
        lambda out: ["pretrain", "--data", DATA, "--train", train, "--out", str(out), "-q"],
        tmp_path,
        "theta0.safetensors",
        after=5,
    )


@pytest.mark.slow
def test_head_stage(demo, tmp_path):
    argv = lambda out: [
        "head",
        "--task",
        "shapes",
        "--pretrained",
        str(demo["theta0"]),
        "--data",
        DATA,  # noqa: E731
        "--train",
        '{"steps": 5}',
        "--out",
        str(out),
        "-q",
    ]
    check_stage(argv, tmp_path, "shapes.safetensors", after=1)


@pytest.mark.slow
def test_finetune_stage(demo, tmp_path):
    argv = lambda out: [
        "finetune",
        "--task",
        "shapes",
        "--pretrained",
        str(demo["theta0"]),
        "--head",
        str(demo["head"]),  # noqa: E731
        "--data",
        DATA,
        "--train",
        FINETUNE,
        "--out",
        str(out),
        "-q",
    ]
    check_stage(argv, tmp_path, "shapes.safetensors", after=7)


@pytest.mark.slow
def test_fisher_stage(demo, tmp_path):
    argv = lambda out: [
        "fisher",
        "--task",
        "shapes",
        "--checkpoint",
        str(demo["theta0"]),
        "--head",
        str(demo["head"]),  # noqa: E731
        "--data",
        DATA,
        "--fraction",
        "1.0",
        "--batch-size",
        "16",
        "--out",
        str(out),
        "-q",
    ]
    check_stage(argv, tmp_path, "f1.0.zarr", after=10)


@pytest.mark.slow
def test_evaluate_stage(demo, tmp_path):
    argv = lambda out: [
        "evaluate",
        "--checkpoint",
        str(demo["theta0"]),
        "--tasks",
        "shapes",
        "--heads",
        str(demo["head"]),  # noqa: E731
        "--data",
        DATA,
        "--out",
        str(out),
        "-q",
    ]
    check_stage(argv, tmp_path, "theta0.csv", after=0)


# --------------------------------------------------------------------------- concurrent writers, failures


def _store(path: Path, value: float) -> None:
    from pipeline.store import write_zarr

    write_zarr(
        path, {"w": torch.full((4, 3), value), "b": torch.full((3,), value)}, {"artifact": "merged"}
    )


def _race(monkeypatch, out: Path, times: int) -> list[int]:
    """Arm os.replace so that, `times` times, a rival writer's complete store lands at `out`
    just before this writer renames its temporary there (the window of a real race)."""
    import shutil

    from pipeline.store import atomic

    rival = out.with_name("rival.zarr")
    _store(rival, 7.0)
    real, landed = os.replace, []

    def replace(src, dst, *args, **kwargs):
        if (
            Path(dst) == out
            and ".tmp-" in Path(src).name
            and not Path(src).name.endswith("-old")
            and len(landed) < times
        ):
            shutil.copytree(rival, out)  # the rival's rename, between our move-aside and ours
            landed.append(1)
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(atomic.os, "replace", replace)
    return landed


def test_losing_the_rename_race_retries_and_leaves_no_temporary(tmp_path, monkeypatch):
    from pipeline.store import open_tensors

    out = tmp_path / "merged.zarr"
    _store(out, 1.0)
    landed = _race(monkeypatch, out, times=2)
    _store(out, 2.0)
    assert len(landed) == 2  # the race happened, twice
    got = open_tensors(out)
    assert torch.equal(got.get("w"), torch.full((4, 3), 2.0)) and torch.equal(
        got.get("b"), torch.full((3,), 2.0)
    )
    assert leftovers(tmp_path) == []


def test_a_rename_race_that_never_ends_fails_cleanly(tmp_path, monkeypatch):
    from pipeline.store import ArtifactError, open_tensors

    out = tmp_path / "merged.zarr"
    _race(monkeypatch, out, times=10**6)
    with pytest.raises(ArtifactError, match="other processes kept replacing it"):
        _store(out, 2.0)
    assert leftovers(tmp_path) == []
    assert torch.equal(
        open_tensors(out).get("w"), torch.full((4, 3), 7.0)
    )  # the rival's complete store


def test_concurrent_writers_of_one_store_end_with_one_complete_output(toy, tmp_path):
    """Real processes: several merges to one --out at once; all succeed, one's output stays."""
    paths = toy(2)
    out = tmp_path / "m.zarr"
    argv = [
        sys.executable,
        "-m",
        "pipeline",
        "merge",
        "ta",
        *_models(paths),
        "--out",
        str(out),
        "-q",
    ]
    procs = [subprocess.Popen(argv, cwd=REPO, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    for proc in procs:
        _, err = proc.communicate()
        assert proc.returncode == 0, err
    reference = tmp_path / "ref.zarr"
    assert main(["merge", "ta", *_models(paths), "--out", str(reference), "-q"]) == 0
    assert snapshot(out) == snapshot(reference) and leftovers(tmp_path) == []


def test_a_failed_write_removes_its_temporary_and_the_folders_it_created(tmp_path):
    from pipeline.store import ArtifactError, atomic_path, write_safetensors

    out = tmp_path / "a" / "b" / "x.json"
    with pytest.raises(RuntimeError):
        with atomic_path(out) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ArtifactError, match="holds NaN or Inf"):
        write_safetensors(
            tmp_path / "c" / "x.safetensors", {"w": torch.tensor([float("nan")])}, finite=True
        )
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "keep").mkdir()  # a folder that existed before stays
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "keep" / "x.json"):
            raise RuntimeError("interrupted")
    assert [p.name for p in tmp_path.iterdir()] == ["keep"]
