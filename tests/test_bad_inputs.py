"""The catalogue of bad inputs (README, "Troubleshooting"): each one stops the stage with one
`error:` line that names the file and the tensor or field, exit status 2, and no output
(neither the artifact nor a temporary sibling). The one exception is k above a layer's rank,
which docs/algorithms.md clamps with a warning."""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.cli import main
from pipeline.store import ZarrWriter, load_tensors, open_tensors, write_safetensors, write_zarr

LAYER = "transformer.resblocks.0.mlp.c_fc.weight"
REPO = Path(__file__).resolve().parents[1]
DATA = {"source": "synthetic", "train_size": 16, "test_size": 16, "image_size": 16}


def run_failing(argv: list[str], capsys, out: Path) -> str:
    """Run the CLI, expect exit 2 with exactly one `error:` line, no output; return that line."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error:")]
    assert len(errors) == 1, err
    assert not out.exists(), f"{out} was written"
    if out.parent.exists():
        assert [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp-")] == []
    return errors[0]


def merge_args(paths: dict, method: str, out: Path, *extra: str, fisher: bool = True) -> list[str]:
    argv = ["merge", method, "--pretrained", str(paths["pretrained"]), "--finetuned", *map(str, paths["finetuned"])]
    if fisher:
        argv += ["--fisher", *map(str, paths["fisher"])]
    return [*argv, "--k", "2", "--out", str(out), "-q", *extra]


def stage_args(stage: str, paths: dict, out: Path, basis: Path | None = None) -> list[str]:
    """argv of the basis or hessian stage (or a merge) on the toy checkpoints."""
    models = ["--pretrained", str(paths["pretrained"]), "--finetuned", *map(str, paths["finetuned"])]
    if stage == "basis":
        return ["basis", *models, "--k", "2", "--out", str(out), "-q"]
    if stage == "hessian":
        return ["hessian", *models, "--fisher", *map(str, paths["fisher"]), "--basis", str(basis), "--out", str(out), "-q"]
    return merge_args(paths, stage, out)


def rewrite(path: Path, edit) -> None:
    tensors = load_tensors(path)
    edit(tensors)
    write_safetensors(path, tensors)


# --------------------------------------------------------------------------- checkpoints and Fisher files


def _missing(t):
    del t[LAYER]


def _extra(t):
    t["text_projection"] = torch.zeros(3, 3)


def _shape(t):
    t[LAYER] = torch.zeros(31, 8)


def _dtype(t):
    t[LAYER] = t[LAYER].half()


def _nan(t):
    t[LAYER][3, 2] = float("nan")


def _inf(t):
    t[LAYER][0, 0] = float("-inf")


def _negative(t):
    t[LAYER][1, 1] = -0.5


def _all_zero(t):
    t[LAYER] = torch.zeros_like(t[LAYER])


def _int_fisher(t):
    t[LAYER] = torch.ones_like(t[LAYER], dtype=torch.int32)


CHECKPOINT_CASES = [
    # (defect, which file, stage, words that must appear in the error line)
    (_missing, "finetuned", "ta", [f"tensor `{LAYER}` is missing"]),
    (_missing, "fisher", "epimer", [f"Fisher tensor `{LAYER}` is missing"]),
    (_extra, "finetuned", "ties", ["unexpected tensor `text_projection`"]),
    (_extra, "fisher", "fisher", ["unexpected tensor `text_projection`"]),
    (_shape, "finetuned", "basis", [f"tensor `{LAYER}` has shape [31, 8], expected [32, 8]"]),
    (_shape, "fisher", "hessian", [f"Fisher tensor `{LAYER}` has shape [31, 8], expected [32, 8]"]),
    (_dtype, "finetuned", "tsvm", [f"tensor `{LAYER}` has dtype float16, expected float32"]),
    (_int_fisher, "fisher", "epimer", [f"Fisher tensor `{LAYER}` has dtype int32, expected a floating dtype"]),
    (_nan, "finetuned", "epimer", [f"tensor `{LAYER}` contains NaN or Inf"]),
    (_inf, "pretrained", "basis", [f"tensor `{LAYER}` contains NaN or Inf"]),
    (_inf, "pretrained", "ta", [f"tensor `{LAYER}` contains NaN or Inf"]),  # found through δ_t
    (_inf, "finetuned", "tsvm", [f"tensor `{LAYER}` contains NaN or Inf"]),
    (_nan, "finetuned", "ties", [f"tensor `{LAYER}` contains NaN or Inf"]),  # TIES streams its inputs
    (_inf, "pretrained", "ties", [f"tensor `{LAYER}` contains NaN or Inf"]),
    (_nan, "fisher", "fisher", [f"tensor `{LAYER}` contains NaN or Inf"]),
    (_negative, "fisher", "hessian", [f"Fisher tensor `{LAYER}` has negative entries (-0.5)"]),
    (_negative, "fisher", "epimer", [f"Fisher tensor `{LAYER}` has negative entries"]),
    (_all_zero, "fisher", "fisher", [f"Fisher tensor `{LAYER}` is all zero"]),
    (_all_zero, "fisher", "hessian", [f"Fisher tensor `{LAYER}` is all zero"]),
]


@pytest.mark.parametrize(
    "defect,target,stage,words", CHECKPOINT_CASES, ids=[f"{c[0].__name__[1:]}-{c[1]}-{c[2]}" for c in CHECKPOINT_CASES]
)
def test_bad_checkpoint_or_fisher(toy, tmp_path, capsys, defect, target, stage, words):
    paths = toy(3)
    basis = None
    if stage == "hessian":  # a good basis first: the defect is in what the hessian stage adds
        basis = tmp_path / "basis.zarr"
        if target != "pretrained":
            assert main(stage_args("basis", paths, basis)) == 0
    bad = paths[target] if target == "pretrained" else paths[target][1]
    rewrite(Path(bad), defect)
    out = tmp_path / "out" / ("merged.safetensors" if stage not in ("basis", "hessian") else f"{stage}.zarr")
    line = run_failing(stage_args(stage, paths, out, basis), capsys, out)
    assert str(bad) in line
    for w in words:
        assert w in line


@pytest.mark.parametrize("method", ["ta", "tsvm", "ties"])
def test_task_vector_overflow_is_named(toy, tmp_path, capsys, method):
    """Finite checkpoints whose difference is not finite in float32."""
    paths = toy(3)
    rewrite(Path(paths["pretrained"]), lambda t: t[LAYER].__setitem__((0, 0), -3e38))
    rewrite(Path(paths["finetuned"][1]), lambda t: t[LAYER].__setitem__((0, 0), 3e38))
    out = tmp_path / "merged.safetensors"
    line = run_failing(merge_args(paths, method, out, fisher=False), capsys, out)
    assert "overflow" in line and "float32" in line and "--dtype float64" in line
    if method != "ties":  # TIES sums all tasks in one pass, so it cannot tell which
        assert str(paths["finetuned"][1]) in line and f"`{LAYER}`" in line
    assert main(merge_args(paths, method, out, "--dtype", "float64", fisher=False)) == 0


def test_k_above_a_layers_rank_is_clamped_with_a_warning(toy, tmp_path, caplog):
    paths = toy(3)  # proj is [8, 6]: ⌊6 / 3⌋ = 2 atoms per task at most
    out = tmp_path / "m.safetensors"
    report = tmp_path / "r.json"
    with caplog.at_level(logging.WARNING):
        assert main(merge_args(paths, "epimer", out, "--k", "5", "--report", str(report))) == 0
    assert "proj: k=5 clamped to k_l=2" in caplog.text
    layers = json.loads(report.read_text())["layers"]
    assert layers["proj"]["k"] == 2 and layers["transformer.resblocks.0.mlp.c_fc.weight"]["k"] == 2
    assert torch.isfinite(load_tensors(out)["proj"]).all()


@pytest.mark.parametrize("alpha", ["0", "-0.5"])
def test_alpha_not_positive(toy, tmp_path, capsys, alpha):
    out = tmp_path / "m.safetensors"
    line = run_failing(merge_args(toy(2), "tsvm", out, "--alpha", alpha), capsys, out)
    assert f"alpha must be > 0, got {float(alpha)}" in line


def test_unknown_method(toy, tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    line = run_failing(merge_args(toy(2), "slerp", out), capsys, out)
    assert "unknown merge method `slerp`" in line


def test_corrupt_safetensors_checkpoint(toy, tmp_path, capsys):
    paths = toy(2)
    bad = Path(paths["finetuned"][0])
    bad.write_bytes(bad.read_bytes()[:-100])  # truncated download
    out = tmp_path / "basis.zarr"
    line = run_failing(stage_args("basis", paths, out), capsys, out)
    assert str(bad) in line and "truncated or corrupt" in line


def test_corrupt_zarr_fisher_is_named_with_the_file_to_delete(toy, tmp_path, capsys):
    paths = toy(2)
    fishers = []
    for i, f in enumerate(paths["fisher"]):
        z = tmp_path / f"fisher{i}.zarr"
        write_zarr(z, load_tensors(f), {"artifact": "fisher"})
        fishers.append(z)
    chunk = next(p for p in (fishers[1] / LAYER).rglob("*") if p.is_file() and p.name != "zarr.json")
    data = bytearray(chunk.read_bytes())
    data[0] ^= 0x55
    chunk.write_bytes(bytes(data))
    paths["fisher"] = fishers
    out = tmp_path / "m.safetensors"
    line = run_failing(merge_args(paths, "fisher", out), capsys, out)
    assert f"{fishers[1]}: array `{LAYER}` does not match its recorded checksum" in line
    assert f"delete {fishers[1]}" in line


def test_cached_basis_of_other_checkpoints_is_refused(toy, tmp_path, capsys):
    paths = toy(3)
    basis = tmp_path / "basis.zarr"
    assert main(stage_args("basis", paths, basis)) == 0
    rewrite(Path(paths["finetuned"][2]), lambda t: t[LAYER].mul_(2))  # θ_3 re-trained since
    out = tmp_path / "m.safetensors"
    argv = merge_args(paths, "tsvm", out, fisher=False) + ["--basis", str(basis)]
    line = run_failing(argv, capsys, out)
    assert f"{basis}: input 4 differs" in line and str(paths["finetuned"][2]) in line and f"delete {basis}" in line
    out2 = tmp_path / "h.zarr"
    line = run_failing(stage_args("hessian", paths, out2, basis), capsys, out2)
    assert f"{basis}: input 4 differs" in line


# --------------------------------------------------------------------------- tasks, heads, backbones, data


@pytest.fixture(scope="module")
def demo_theta0(tmp_path_factory) -> Path:
    from pipeline.models.backbone import build_visual

    path = tmp_path_factory.mktemp("demo") / "theta0.safetensors"
    write_safetensors(path, {n: t.detach().clone() for n, t in build_visual().state_dict().items()})
    return path


def _head(path: Path, classes: int, dim: int = 0) -> Path:
    from pipeline.models.backbone import build_visual

    dim = dim or int(build_visual().output_dim)
    write_safetensors(path, {"weight": torch.randn(classes, dim), "bias": torch.zeros(classes)})
    return path


def test_head_with_the_wrong_class_count(demo_theta0, tmp_path, capsys):
    from pipeline.data import num_classes

    classes = num_classes(DATA, "shapes")
    head = _head(tmp_path / "shapes.safetensors", classes + 2)
    out = tmp_path / "eval.csv"
    argv = ["evaluate", "--checkpoint", str(demo_theta0), "--tasks", "shapes", "--heads", str(head),
            "--data", json.dumps(DATA), "--out", str(out), "-q"]
    line = run_failing(argv, capsys, out)
    assert f"{head}: head tensor `weight` has {classes + 2} rows (classes) but task `shapes` has {classes} classes" in line


def test_unknown_task(demo_theta0, tmp_path, capsys):
    out = tmp_path / "head.safetensors"
    argv = ["head", "--task", "nosuch", "--pretrained", str(demo_theta0), "--data", json.dumps(DATA), "--out", str(out), "-q"]
    line = run_failing(argv, capsys, out)
    assert "nosuch" in line and "known tasks" in line


def test_unknown_backbone(demo_theta0, tmp_path, capsys):
    out = tmp_path / "fisher.zarr"
    head = _head(tmp_path / "h.safetensors", 3)
    argv = ["fisher", "--task", "shapes", "--checkpoint", str(demo_theta0), "--head", str(head), "--backbone", "vit-nosuch",
            "--data", json.dumps(DATA), "--fraction", "1.0", "--out", str(out), "-q"]
    line = run_failing(argv, capsys, out)
    assert "backbone" in line and "vit-nosuch" in line


@pytest.mark.parametrize("layout", ["missing", "empty", "no_images"])
def test_missing_or_empty_dataset_folder(tmp_path, layout):
    from pipeline.data import open_dataset

    root = tmp_path / "resisc45"
    if layout != "missing":
        (root / "train").mkdir(parents=True)
        (root / "test").mkdir()
    if layout == "no_images":
        (root / "train" / "forest").mkdir()
        (root / "train" / "river").mkdir()
    spec = {"source": "folder", "root": str(tmp_path), "tasks": {"resisc45": {"classes": ["forest", "river"]}}}
    with pytest.raises(ValueError) as err:
        ds = open_dataset(spec, "resisc45", "train")
        ds[0]  # a lazy source may only fail on first access
    message = str(err.value)
    assert len(message.splitlines()) == 1 and str(root) in message
    assert {"missing": "does not exist", "empty": "holds no images", "no_images": "holds no images"}[layout] in message


# --------------------------------------------------------------------------- foreign pickles


class _Shell:
    """Unpickling this would run a shell command (what a malicious checkpoint does)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_with_foreign_globals_is_refused_before_running(tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "finetuned.pt"
    with open(evil, "wb") as fh:
        pickle.dump({"state_dict": {}, "hook": _Shell(marker)}, fh)
    torch.save({"model": _Shell(marker)}, tmp_path / "zipped.pt")
    for src in (evil, tmp_path / "zipped.pt"):
        out = tmp_path / "imported.safetensors"
        line = run_failing(["import", str(src), "--backbone", "demo", "--out", str(out), "-q"], capsys, out)
        assert str(src) in line and "system" in line
    assert not marker.exists()


# --------------------------------------------------------------------------- the workflow's config


def test_config_value_of_the_wrong_type_fails_before_any_job(tmp_path):
    cfg = yaml.safe_load((REPO / "tests" / "workflow" / "tiny.yaml").read_text())
    cfg["merge"]["alpha"] = ["big"]
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    res = subprocess.run(
        [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp_path),
         "--configfile", str(tmp_path / "bad.yaml"), "--cores", "1", "-n"],
        capture_output=True, text=True,
    )
    out = res.stdout + res.stderr
    assert res.returncode != 0
    assert "'big' is not of type 'number'" in out and "alpha" in out
    assert not (tmp_path / "results").exists() and not (tmp_path / "logs").exists()
    shutil.rmtree(tmp_path / ".snakemake", ignore_errors=True)
