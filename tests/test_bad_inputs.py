"""The catalogue of bad inputs (README, "Troubleshooting"): each one stops the stage with one
`error:` line that names the file and the tensor or field, exit status 2, and no output
(neither the artifact nor a temporary sibling). The one exception is k above a layer's rank,
which docs/algorithms.md clamps with a warning."""

from __future__ import annotations

import json
import logging
import math
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
        assert [
            p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp-")
        ] == []
    return errors[0]


def merge_args(paths: dict, method: str, out: Path, *extra: str, fisher: bool = True) -> list[str]:
    argv = [
        "merge",
        method,
        "--pretrained",
        str(paths["pretrained"]),
        "--finetuned",
        *map(str, paths["finetuned"]),
    ]
    if fisher:
        argv += ["--fisher", *map(str, paths["fisher"])]
    return [*argv, "--k", "2", "--out", str(out), "-q", *extra]


def stage_args(stage: str, paths: dict, out: Path, basis: Path | None = None) -> list[str]:
    """argv of the basis or hessian stage (or a merge) on the toy checkpoints."""
    models = [
        "--pretrained",
        str(paths["pretrained"]),
        "--finetuned",
        *map(str, paths["finetuned"]),
    ]
    if stage == "basis":
        return ["basis", *models, "--k", "2", "--out", str(out), "-q"]
    if stage == "hessian":
        return [
            "hessian",
            *models,
            "--fisher",
            *map(str, paths["fisher"]),
            "--basis",
            str(basis),
            "--out",
            str(out),
            "-q",
        ]
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
    (
        _int_fisher,
        "fisher",
        "epimer",
        [f"Fisher tensor `{LAYER}` has dtype int32, expected a floating dtype"],
    ),
    (_nan, "finetuned", "epimer", [f"tensor `{LAYER}` contains NaN or Inf"]),
    (_inf, "pretrained", "basis", [f"tensor `{LAYER}` contains NaN or Inf"]),
    (_inf, "pretrained", "ta", [f"tensor `{LAYER}` contains NaN or Inf"]),  # found through δ_t
    (_inf, "finetuned", "tsvm", [f"tensor `{LAYER}` contains NaN or Inf"]),
    (
        _nan,
        "finetuned",
        "ties",
        [f"tensor `{LAYER}` contains NaN or Inf"],
    ),  # TIES streams its inputs
    (_inf, "pretrained", "ties", [f"tensor `{LAYER}` contains NaN or Inf"]),
    (_nan, "fisher", "fisher", [f"tensor `{LAYER}` contains NaN or Inf"]),
    (_negative, "fisher", "hessian", [f"Fisher tensor `{LAYER}` has negative entries (-0.5)"]),
    (_negative, "fisher", "epimer", [f"Fisher tensor `{LAYER}` has negative entries"]),
    (_all_zero, "fisher", "fisher", [f"Fisher tensor `{LAYER}` is all zero"]),
    (_all_zero, "fisher", "hessian", [f"Fisher tensor `{LAYER}` is all zero"]),
]


@pytest.mark.parametrize(
    "defect,target,stage,words",
    CHECKPOINT_CASES,
    ids=[f"{c[0].__name__[1:]}-{c[1]}-{c[2]}" for c in CHECKPOINT_CASES],
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
    out = (
        tmp_path
        / "out"
        / ("merged.safetensors" if stage not in ("basis", "hessian") else f"{stage}.zarr")
    )
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
    chunk = next(
        p for p in (fishers[1] / LAYER).rglob("*") if p.is_file() and p.name != "zarr.json"
    )
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
    assert (
        f"{basis}: input 4 differs" in line
        and str(paths["finetuned"][2]) in line
        and f"delete {basis}" in line
    )
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
    argv = [
        "evaluate",
        "--checkpoint",
        str(demo_theta0),
        "--tasks",
        "shapes",
        "--heads",
        str(head),
        "--data",
        json.dumps(DATA),
        "--out",
        str(out),
        "-q",
    ]
    line = run_failing(argv, capsys, out)
    assert (
        f"{head}: head tensor `weight` has {classes + 2} rows (classes) but task `shapes` has {classes} classes"
        in line
    )


def test_unknown_task(demo_theta0, tmp_path, capsys):
    out = tmp_path / "head.safetensors"
    argv = [
        "head",
        "--task",
        "nosuch",
        "--pretrained",
        str(demo_theta0),
        "--data",
        json.dumps(DATA),
        "--out",
        str(out),
        "-q",
    ]
    line = run_failing(argv, capsys, out)
    assert "nosuch" in line and "known tasks" in line


def test_unknown_backbone(demo_theta0, tmp_path, capsys):
    out = tmp_path / "fisher.zarr"
    head = _head(tmp_path / "h.safetensors", 3)
    argv = [
        "fisher",
        "--task",
        "shapes",
        "--checkpoint",
        str(demo_theta0),
        "--head",
        str(head),
        "--backbone",
        "vit-nosuch",
        "--data",
        json.dumps(DATA),
        "--fraction",
        "1.0",
        "--out",
        str(out),
        "-q",
    ]
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
    spec = {
        "source": "folder",
        "root": str(tmp_path),
        "tasks": {"resisc45": {"classes": ["forest", "river"]}},
    }
    with pytest.raises(ValueError) as err:
        ds = open_dataset(spec, "resisc45", "train")
        ds[0]  # a lazy source may only fail on first access
    message = str(err.value)
    assert len(message.splitlines()) == 1 and str(root) in message
    assert {
        "missing": "does not exist",
        "empty": "holds no images",
        "no_images": "holds no images",
    }[layout] in message


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
        line = run_failing(
            ["import", str(src), "--backbone", "demo", "--out", str(out), "-q"], capsys, out
        )
        assert str(src) in line and "system" in line
    assert not marker.exists()


# --------------------------------------------------------------------------- the workflow's config


def test_config_value_of_the_wrong_type_fails_before_any_job(tmp_path):
    cfg = yaml.safe_load((REPO / "tests" / "workflow" / "tiny.yaml").read_text())
    cfg["merge"]["k"] = ["big"]
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "snakemake",
            "--snakefile",
            str(REPO / "Snakefile"),
            "--directory",
            str(tmp_path),
            "--configfile",
            str(tmp_path / "bad.yaml"),
            "--cores",
            "1",
            "-n",
        ],
        capture_output=True,
        text=True,
    )
    out = res.stdout + res.stderr
    assert res.returncode != 0
    assert "'big' is not of type 'integer'" in out and "['merge']['k']" in out
    assert not (tmp_path / "results").exists() and not (tmp_path / "logs").exists()
    shutil.rmtree(tmp_path / ".snakemake", ignore_errors=True)


# --------------------------------------------------------------------------- issue 21: data safety
# One test (or parametrised family) per defect; the pickle resource bombs (D7) are in
# tests/test_importer_limits.py.


def raw_safetensors(path: Path, header, payload: bytes = b"") -> Path:
    """A safetensors file with exactly this header (any JSON value) and data: what a crafted
    or hand-edited file holds, which the project's own writer would never produce."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + payload)
    return path


def raw_checkpoint(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """tensors (float32) in a safetensors file, names taken as given (no name checks)."""
    header, chunks, offset = {}, [], 0
    for name, t in tensors.items():
        data = t.float().contiguous().numpy().tobytes()
        header[name] = {
            "dtype": "F32",
            "shape": list(t.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        chunks.append(data)
        offset += len(data)
    return raw_safetensors(path, header, b"".join(chunks))


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under root → its bytes (None for folders)."""
    return {
        p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
    }


def one_error(argv: list[str], capsys) -> str:
    """Run the CLI, expect exit 2 and exactly one stderr line, `error: ...`; return it."""
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# D1: an output naming an existing folder deletes nothing.


def _victim(tmp_path: Path) -> Path:
    folder = tmp_path / "victim"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work")
    return folder


@pytest.mark.parametrize("suffix", ["", ".zarr"])
@pytest.mark.parametrize("stage", ["ta", "epimer", "basis", "hessian", "report"])
def test_an_output_naming_an_existing_folder_is_refused_and_kept(
    toy, tmp_path, capsys, stage, suffix
):
    paths = toy(2)
    victim = _victim(tmp_path)
    if suffix:
        victim = victim.rename(tmp_path / "victim.zarr")
    before = tree(victim)
    basis = tmp_path / "basis.zarr"
    if stage == "hessian":
        assert main(stage_args("basis", paths, basis)) == 0
    if stage == "report":
        argv = merge_args(
            paths, "ta", tmp_path / "m.safetensors", "--report", str(victim), fisher=False
        )
    else:
        argv = stage_args(stage, paths, victim, basis)
    line = one_error(argv, capsys)
    assert str(victim) in line and "refusing to replace" in line
    assert tree(victim) == before
    assert not (tmp_path / "m.safetensors").exists()


def test_an_output_folder_holding_the_inputs_is_refused(toy, tmp_path, capsys):
    paths = toy(2)
    folder = Path(paths["pretrained"]).parent
    before = tree(folder)
    for out in (folder, folder.with_suffix(".zarr")):
        moved = paths
        if out.suffix:  # the folder itself, named as a Zarr output
            folder.rename(out)
            moved = {
                k: [out / Path(p).name for p in v] if isinstance(v, list) else out / Path(v).name
                for k, v in paths.items()
            }
        line = one_error(merge_args(moved, "ta", out, fisher=False), capsys)
        assert str(out) in line and ("holding the input" in line or "refusing to replace" in line)
        assert tree(out) == before
        if out.suffix:
            out.rename(folder)


def test_a_store_of_another_kind_or_a_file_is_not_replaced_by_a_zarr_output(toy, tmp_path, capsys):
    paths = toy(2)
    basis = tmp_path / "basis.zarr"
    assert main(stage_args("basis", paths, basis)) == 0
    before = tree(basis)
    line = one_error(merge_args(paths, "tsvm", basis, fisher=False), capsys)
    assert "holds a `basis` artifact" in line and "`merged`" in line
    assert tree(basis) == before
    # The same kind is replaced (a re-run), an empty folder is filled.
    assert main(stage_args("basis", paths, basis)) == 0
    empty = tmp_path / "empty.zarr"
    empty.mkdir()
    assert (
        main(merge_args(paths, "tsvm", empty, fisher=False)) == 0
        and open_tensors(empty).attrs()["artifact"] == "merged"
    )


# D2: tensor names never become paths outside the output.

BAD_NAMES = [
    "../../escaped",
    "a/../../../escaped",
    "ABS/escaped",
    "a\\..\\b",
    "bad\x00name",
    "",
    "a//b",
    "./a",
    "zarr.json",
]


@pytest.mark.parametrize(
    "bad",
    BAD_NAMES,
    ids=[
        "dotdot",
        "inner-dotdot",
        "absolute",
        "backslash",
        "nul",
        "empty",
        "empty-segment",
        "dot",
        "metadata",
    ],
)
@pytest.mark.parametrize("method", ["ta", "tsvm", "epimer"])
def test_traversal_tensor_names_are_refused_before_anything_is_written(
    toy, tmp_path, capsys, bad, method
):
    paths = toy(2)
    work = tmp_path / "work"
    work.mkdir()
    bad = bad.replace("ABS", str(tmp_path))  # an absolute name pointing next to the output
    for p in [paths["pretrained"], *paths["finetuned"], *paths["fisher"]]:
        tensors = load_tensors(p)
        tensors[bad] = torch.ones(3)
        raw_checkpoint(Path(p), tensors)
    before = tree(tmp_path)
    out = work / "deep" / "X.zarr"
    line = one_error(merge_args(paths, method, out), capsys)
    assert str(paths["pretrained"]) in line and repr(bad) in line and "tensor name" in line
    assert "\x00" not in line
    assert tree(tmp_path) == before  # nothing created anywhere: no escaped folder, no `deep/`


def test_the_zarr_writer_keeps_every_path_inside_its_store(tmp_path):
    from pipeline.store import ArtifactError

    out = tmp_path / "X.zarr"
    for name, group in [("../../escaped", None), ("W", "../outside"), (f"{tmp_path}/abs", None)]:
        with pytest.raises(ArtifactError, match="tensor name"):
            with ZarrWriter(out, {"artifact": "merged"}) as writer:
                writer.write(name, torch.ones(2), group=group)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# D3: an output equal to an input.


@pytest.mark.parametrize(
    "which", ["out-finetuned", "report-pretrained", "out-fisher-zarr", "hardlink", "out-report"]
)
def test_an_output_equal_to_an_input_is_refused_and_the_input_kept(toy, tmp_path, capsys, which):
    paths = toy(2)
    target = Path(paths["finetuned"][0])
    argv_out, extra = tmp_path / "m.safetensors", []
    if which == "out-finetuned":
        argv_out = target
    elif which == "report-pretrained":
        target = Path(paths["pretrained"])
        extra = ["--report", str(target)]
    elif which == "out-fisher-zarr":
        fishers = []
        for i, f in enumerate(paths["fisher"]):
            fishers.append(tmp_path / f"fisher{i}.zarr")
            write_zarr(fishers[-1], load_tensors(f), {"artifact": "fisher"})
        paths["fisher"] = fishers
        target = argv_out = fishers[1]
    elif which == "hardlink":
        argv_out = tmp_path / "link.safetensors"
        os.link(target, argv_out)
    else:
        extra = ["--report", str(argv_out)]
        target = argv_out
    before = tree(target) if target.is_dir() else target.read_bytes() if target.exists() else None
    line = one_error(
        merge_args(
            paths,
            "fisher" if which == "out-fisher-zarr" else "ta",
            argv_out,
            *extra,
            fisher=which == "out-fisher-zarr",
        ),
        capsys,
    )
    assert str(argv_out if which != "report-pretrained" else target) in line
    assert "input" in line or "both" in line
    after = tree(target) if target.is_dir() else target.read_bytes() if target.exists() else None
    assert after == before


def test_import_onto_its_own_source_is_refused(tmp_path, capsys):
    src = tmp_path / "model.safetensors"
    write_safetensors(src, {"w": torch.ones(2)})
    before = src.read_bytes()
    line = one_error(["import", str(src), "--kind", "head", "--out", str(src), "-q"], capsys)
    assert "also an input" in line and src.read_bytes() == before


# D4: non-finite merged, cached or imported tensors are never written; numeric options checked.


@pytest.mark.parametrize(
    "method,extra,words",
    [
        ("ta", ["--alpha", "inf"], "must be finite"),
        ("ta", ["--alpha", "nan"], "must be finite"),
        ("tsvm", ["--alpha=-inf"], "alpha must be finite"),
        ("fisher", ["--eps", "nan"], "must be finite"),
        ("fisher", ["--eps", "inf"], "must be finite"),
        ("epimer", ["--eps", "inf"], "must be finite"),
        ("epimer", ["--eps", "nan"], "must be finite"),
        ("epimer", ["--eps", "-1"], "eps must be >= 0"),
        ("ta", ["--alpha", "1e39"], "beyond the range of float32"),
        ("ties", ["--ties-density", "nan"], "must be finite"),
        ("tsvm", ["--k", "0"], "must be a positive integer"),
    ],
)
def test_numeric_options_are_checked_at_the_parser(toy, tmp_path, capsys, method, extra, words):
    out = tmp_path / "m.safetensors"
    line = run_failing(merge_args(toy(2), method, out, *extra), capsys, out)
    assert words in line


@pytest.mark.parametrize("eps", ["nan", "inf", "-1"])
def test_hessian_eps_must_be_finite_and_not_negative(toy, tmp_path, capsys, eps):
    paths = toy(2)
    basis, out = tmp_path / "basis.zarr", tmp_path / "hessian.zarr"
    assert main(stage_args("basis", paths, basis)) == 0
    line = run_failing([*stage_args("hessian", paths, out, basis), "--eps", eps], capsys, out)
    assert "eps must be" in line


def test_layer_curvature_refuses_a_non_finite_eps():
    from pipeline.curvature import layer_curvature

    for eps in (math.nan, math.inf, -1.0):
        with pytest.raises(ValueError, match="eps must be finite and >= 0"):
            layer_curvature(None, {}, torch.ones(2, 3, 3), torch.ones(2, 3, 3), eps)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(
    "method,suffix",
    [("ta", ".safetensors"), ("ta", ".zarr"), ("epimer", ".zarr"), ("tsvm", ".safetensors")],
)
def test_finite_inputs_whose_merge_overflows_are_not_written(
    toy, tmp_path, capsys, method, suffix, dtype
):
    """Values near the float32 limit in θ0 and θ_t: each task vector is finite, their merge is not."""
    paths = toy(3)
    rewrite(Path(paths["pretrained"]), lambda t: t[LAYER].fill_(3.0e38))
    for f in paths["finetuned"]:
        rewrite(Path(f), lambda t: t[LAYER].fill_(3.3e38))
    out = tmp_path / f"merged{suffix}"
    line = run_failing(
        merge_args(paths, method, out, "--alpha", "3", "--dtype", dtype), capsys, out
    )
    assert str(out) in line and f"`{LAYER}`" in line and "NaN or Inf" in line


def test_a_huge_fisher_floor_gives_no_nan_output(toy, tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    # Finite at the parser; in float32 the floor is inf and the weights inf / inf.
    line = run_failing(merge_args(toy(2), "fisher", out, "--eps", "1e300"), capsys, out)
    assert str(out) in line and "NaN or Inf" in line


def test_the_writers_refuse_non_finite_tensors_only_when_asked(tmp_path):
    from pipeline.store import ArtifactError

    bad = {
        "w": torch.tensor([1.0, float("nan")]),
        "b": torch.tensor([float("inf")], dtype=torch.bfloat16),
    }
    for name in bad:
        with pytest.raises(ArtifactError, match=f"`{name}` holds NaN or Inf"):
            write_safetensors(tmp_path / "x.safetensors", {name: bad[name]}, finite=True)
        with pytest.raises(ArtifactError, match=f"`{name}` holds NaN or Inf"):
            write_zarr(tmp_path / "x.zarr", {name: bad[name]}, finite=True)
    assert list(tmp_path.iterdir()) == []
    big = torch.full((4,), 3e38)  # finite, though its sum overflows: accepted
    write_safetensors(
        tmp_path / "ok.safetensors", {"w": big, "i": torch.tensor([1, 2])}, finite=True
    )
    write_safetensors(tmp_path / "fixture.safetensors", bad)  # test fixtures may hold NaN
    assert torch.equal(load_tensors(tmp_path / "ok.safetensors")["w"], big)


# D5: a cached basis made from a checkpoint that changed in one layer is refused.


def test_a_one_layer_edit_of_a_large_checkpoint_is_caught_against_a_cached_basis(
    toy, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("PIPELINE_DIGEST_CACHE", str(tmp_path / "digests.json"))
    big = "transformer.resblocks.1.mlp.c_fc.weight"
    paths = toy(
        2, shapes={LAYER: (32, 8), "proj": (8, 6), big: (1280, 1024)}
    )  # 5 MiB: above the old sampling limit
    edited = Path(paths["finetuned"][1])
    assert edited.stat().st_size > 4 << 20
    basis = tmp_path / "basis.zarr"
    assert main(stage_args("basis", paths, basis)) == 0
    # One value of one matrix layer, changed in place (same size, same inode), at a byte that
    # 64 evenly spaced 64 KiB samples of the file do not read.
    reader = open_tensors(edited)
    _, _, begin, end = reader._entries[big]
    start, size = reader._data_start, edited.stat().st_size
    reader.close()
    sampled = [(size - (64 << 10)) * i // 63 for i in range(64)]
    offset = next(
        o
        for o in range(start + begin, start + end, 4)
        if all(not s <= o < s + (64 << 10) for s in sampled)
    )
    with open(edited, "r+b") as fh:
        fh.seek(offset)
        value = torch.frombuffer(bytearray(fh.read(4)), dtype=torch.float32)
        fh.seek(offset)
        fh.write((value * 1.2).numpy().tobytes())
    out = tmp_path / "m.safetensors"
    line = run_failing(
        [*merge_args(paths, "tsvm", out, fisher=False), "--basis", str(basis)], capsys, out
    )
    assert str(basis) in line and "input 3 differs" in line and str(edited) in line


# D6: safetensors headers the safetensors library refuses.


def _two_tensors(path: Path, offsets_b: list[int], size: int = 32) -> Path:
    header = {
        "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "b": {"dtype": "F32", "shape": [4], "data_offsets": offsets_b},
    }
    return raw_safetensors(path, header, bytes(size))


@pytest.mark.parametrize(
    "make,words",
    [
        (lambda p: _two_tensors(p, [0, 16], 16), "overlaps the tensor before it"),
        (lambda p: _two_tensors(p, [8, 24], 24), "overlaps the tensor before it"),
        (lambda p: _two_tensors(p, [20, 36], 36), "leaves a gap before it"),
        (lambda p: _two_tensors(p, [16, 32], 40), "trailing data"),
        (lambda p: raw_safetensors(p, [1, 2, 3]), "header is a JSON list"),
        (lambda p: raw_safetensors(p, b"[" * 200_000 + b"]" * 200_000), "nests too deeply"),
        (lambda p: raw_safetensors(p, {"a": [1, 2]}), "malformed header entry"),
        (
            lambda p: raw_safetensors(
                p, {"a": {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]}}, bytes(4)
            ),
            "malformed header entry",
        ),
        (
            lambda p: raw_safetensors(p, {"__metadata__": {"k": [1]}}),
            "`__metadata__` is not a mapping",
        ),
    ],
    ids=[
        "aliased",
        "overlapping",
        "gap",
        "trailing",
        "list",
        "deep",
        "entry-list",
        "float-shape",
        "metadata",
    ],
)
def test_malformed_safetensors_headers_are_refused(toy, tmp_path, capsys, make, words):
    bad = make(tmp_path / "bad.safetensors")
    from pipeline.store import ArtifactError, SafetensorsReader

    with pytest.raises(ArtifactError, match=words):
        SafetensorsReader(bad)
    paths = toy(2)
    paths["finetuned"][1] = bad
    out = tmp_path / "m.safetensors"
    line = run_failing(merge_args(paths, "ta", out, fisher=False), capsys, out)
    assert str(bad) in line and words.split()[0] in line


# D8: paths that ended in a traceback.


def test_out_zarr_that_is_a_file_or_under_a_file_is_refused(toy, tmp_path, capsys):
    paths = toy(2)
    blocker = tmp_path / "X.zarr"
    blocker.write_text("not a store")
    line = one_error(merge_args(paths, "ta", blocker, fisher=False), capsys)
    assert (
        str(blocker) in line
        and "is a file, not a Zarr store" in line
        and blocker.read_text() == "not a store"
    )
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []
    under = blocker / "sub" / "m.safetensors"
    line = one_error(merge_args(paths, "ta", under, fisher=False), capsys)
    assert str(blocker) in line and "is a file, not a folder" in line


def test_meta_device_and_show_of_a_folder_end_in_one_line(toy, tmp_path, capsys):
    out = tmp_path / "m.zarr"
    line = run_failing(
        merge_args(toy(2), "tsvm", out, "--device", "meta", fisher=False), capsys, out
    )
    assert "--device meta" in line
    line = one_error(["show", str(tmp_path)], capsys)
    assert str(tmp_path) in line and "folder" in line


def test_a_full_disk_ends_in_one_line_naming_the_output_and_leaves_nothing(toy, tmp_path):
    """A file-size limit (RLIMIT_FSIZE) makes writes fail as a full disk does."""
    paths = toy(2)
    out = tmp_path / "out" / "m.zarr"
    code = (
        "import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (600, 600)); "
        "from pipeline.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, *merge_args(paths, "ta", out, fisher=False)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), res.stderr[
        -2000:
    ]
    assert str(out) in lines[0] and "cannot write" in lines[0] and "File too large" in lines[0]
    assert (
        not out.parent.exists()
    )  # neither the output, its temporary nor the folder created for it


def test_debug_shows_the_traceback(toy, tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    argv = merge_args(toy(2), "tsvm", out, "--device", "meta", fisher=False)
    assert main(["--debug", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback (most recent call last)" in err
    assert main([*argv, "--debug"]) == 2 and "Traceback" in capsys.readouterr().err


def test_an_unexpected_exception_still_ends_in_one_line(toy, tmp_path, capsys, monkeypatch):
    from pipeline import merge as merge_module

    def boom(*args, **kwargs):
        raise RuntimeError("\x1b[31mlinalg failed\x1b[0m\nsecond line")

    monkeypatch.setattr(merge_module, "merge_sweep", boom)
    out = tmp_path / "m.safetensors"
    line = run_failing(merge_args(toy(2), "ta", out, fisher=False), capsys, out)
    assert line == "error: RuntimeError: linalg failed (--debug shows the traceback)"


# D9: a Zarr input without (valid) checksums is refused, not read unverified.


@pytest.mark.parametrize("damage", ["missing", "not-a-mapping", "entry-missing", "not-crc"])
def test_zarr_checksums_missing_or_malformed_are_an_error(toy, tmp_path, capsys, damage):
    paths = toy(2)
    fishers = []
    for i, f in enumerate(paths["fisher"]):
        fishers.append(tmp_path / f"fisher{i}.zarr")
        write_zarr(fishers[-1], load_tensors(f), {"artifact": "fisher"})
    bad = fishers[1]
    meta = json.loads((bad / "zarr.json").read_text())
    checksums = meta["attributes"]["checksums"]
    if damage == "missing":
        del meta["attributes"]["checksums"]
    elif damage == "not-a-mapping":
        meta["attributes"]["checksums"] = list(checksums.values())
    elif damage == "entry-missing":
        del checksums[LAYER]
    else:
        checksums[LAYER] = 12345
    (bad / "zarr.json").write_text(json.dumps(meta))
    # and the array the checksum no longer guards is corrupt
    chunk = next(p for p in (bad / LAYER).rglob("*") if p.is_file() and p.name != "zarr.json")
    chunk.write_bytes(bytes(chunk.stat().st_size))
    paths["fisher"] = fishers
    out = tmp_path / "m.safetensors"
    line = run_failing(merge_args(paths, "fisher", out), capsys, out)
    assert str(bad) in line and f"delete {bad} and re-run" in line
    assert (
        ("no recorded checksum" in line and LAYER in line)
        if damage == "entry-missing"
        else "artifact has no checksums" in line
    )


# D11: cosmetic, but every message names what to act on.


def test_a_failed_merge_removes_the_folders_it_created(toy, tmp_path, capsys):
    paths = toy(2)
    rewrite(Path(paths["finetuned"][1]), _nan)
    for out in (tmp_path / "a" / "b" / "m.zarr", tmp_path / "c" / "d" / "m.safetensors"):
        run_failing(
            merge_args(paths, "ta", out, "--report", str(out.parent / "r.json"), fisher=False),
            capsys,
            out,
        )
        assert not (tmp_path / out.relative_to(tmp_path).parts[0]).exists()


def test_a_corrupt_basis_is_named_by_its_store(toy, tmp_path, capsys):
    paths = toy(2)
    basis = tmp_path / "basis.zarr"
    assert main(stage_args("basis", paths, basis)) == 0
    chunk = next(
        p for p in (basis / LAYER / "U").rglob("*") if p.is_file() and p.name != "zarr.json"
    )
    data = bytearray(chunk.read_bytes())
    data[0] ^= 0xFF
    chunk.write_bytes(bytes(data))
    out = tmp_path / "m.safetensors"
    line = run_failing(
        [*merge_args(paths, "tsvm", out, fisher=False), "--basis", str(basis)], capsys, out
    )
    assert line.startswith(f"error: {basis}: array `{LAYER}/U`") and line.endswith(
        f"delete {basis} and re-run"
    )


def test_torch_messages_lose_colour_codes_and_unsafe_advice(tmp_path):
    from pipeline.cli import error_line

    evil = tmp_path / "evil.pt"
    torch.save({"model": _Shell(tmp_path / "pwned")}, evil)
    with pytest.raises(Exception) as info:
        torch.load(evil, weights_only=True)
    line = error_line(info.value)
    assert "\x1b" not in line and "weights_only" not in line and "\n" not in line
    assert line.startswith("refused to unpickle a checkpoint:") and "system" in line
    assert not (tmp_path / "pwned").exists()
