"""The command line on toy state dicts: round trips, outputs, and bad input rejected cleanly."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.cli import main
from pipeline.store import TensorReader, load_tensors, open_tensors, write_safetensors

METHODS = ["ta", "ties", "fisher", "tsvm", "epimer"]


def _models(paths):
    """--pretrained and --finetuned naming a toy's checkpoints."""
    return ["--pretrained", str(paths["pretrained"]), "--finetuned", *map(str, paths["finetuned"])]


def _fishers(paths):
    return ["--fisher", *map(str, paths["fisher"])]


def _args(paths, method, out, *extra, fisher=True):
    args = ["merge", method, *_models(paths)]
    if fisher and paths["fisher"]:
        args += _fishers(paths)
    return args + ["--out", str(out), "-q", *extra]


def _basis(paths, out: Path, *extra: str, k: int = 2) -> Path:
    """The basis stage at `k` on a toy's checkpoints."""
    assert main(["basis", *_models(paths), "--k", str(k), *extra, "--out", str(out), "-q"]) == 0
    return out


def _hessian(paths, basis: Path, out: Path, *extra: str) -> int:
    """The hessian stage on a toy's checkpoints and Fishers over `basis`; its exit status."""
    return main(
        ["hessian", *_models(paths), *_fishers(paths), "--basis", str(basis), *extra]
        + ["--out", str(out), "-q"]
    )


def _stored_merge(paths, method: str, basis: Path, hessian: Path, out: Path, *extra: str) -> int:
    """A k = 2 merge reading a stored basis and its Hessians; its exit status."""
    return main(
        ["merge", method, *_models(paths), *_fishers(paths), "--basis", str(basis)]
        + ["--hessian", str(hessian), "--k", "2", *extra, "--out", str(out), "-q"]
    )


@pytest.mark.parametrize("T", [2, 3])
@pytest.mark.parametrize("method", METHODS)
def test_merging_a_model_with_itself_returns_it(toy, tmp_path, method, T):
    paths = toy(T, identical=True, rank=1)  # heterogeneous Fisher, identical task vectors
    out = tmp_path / f"{method}.safetensors"
    extra = {
        "ta": ["--alpha", str(1.0 / T)],  # the arithmetic mean
        "ties": ["--alpha", "1.0", "--ties-density", "100"],  # keep everything: nothing to trim
        "fisher": [],
        "tsvm": ["--alpha", "1.0", "--k", "4"],  # k ≥ rank of every δ_t
        "epimer": ["--alpha", "1.0", "--k", "4"],
    }[method]
    assert main(_args(paths, method, out, *extra)) == 0
    merged = load_tensors(out)
    target = load_tensors(paths["finetuned"][0])
    assert merged.keys() == target.keys()
    for name, tensor in target.items():
        assert merged[name].dtype == tensor.dtype
        torch.testing.assert_close(
            merged[name], tensor, rtol=1e-5, atol=1e-5, msg=f"{method}: {name}"
        )


def test_zarr_output_and_report(toy, tmp_path):
    paths = toy(3)
    out = tmp_path / "merged.zarr"
    report = tmp_path / "report.json"
    assert (
        main(_args(paths, "epimer", out, "--k", "2", "--alpha", "0.7", "--report", str(report)))
        == 0
    )
    data = json.loads(report.read_text())
    assert data["method"] == "epimer" and data["settings"]["alpha"] == 0.7
    matrix = [
        "positional_embedding",
        "proj",
        "transformer.resblocks.0.attn.in_proj_weight",
        "transformer.resblocks.0.mlp.c_fc.weight",
        "transformer.resblocks.0.mlp.c_proj.weight",
    ]
    assert sorted(data["layers"]) == sorted(matrix)
    for layer in data["layers"].values():
        assert layer["eta"] >= 0 and layer["V_S"] >= 0 and layer["R_S"] >= 0
    assert data["totals"]["eta"] == pytest.approx(sum(l["eta"] for l in data["layers"].values()))
    assert set(data["timings_s"]) >= {"read", "basis", "hessian", "solve", "write", "total"}
    reader = open_tensors(out)
    assert sorted(reader.keys()) == sorted(load_tensors(paths["pretrained"]).keys())
    attrs = reader.attrs()
    assert attrs["artifact"] == "merged" and attrs["parameters"]["method"] == "epimer"
    assert str(paths["pretrained"]) in attrs["inputs"]
    assert sorted(reader.group("coords").keys()) == sorted(matrix)


def test_tsvm_reports_diagnostics_when_fisher_is_given(toy, tmp_path):
    paths = toy(2)
    report = tmp_path / "r.json"
    assert (
        main(_args(paths, "tsvm", tmp_path / "m.safetensors", "--k", "2", "--report", str(report)))
        == 0
    )
    assert json.loads(report.read_text())["totals"]["eta"] >= 0
    report2 = tmp_path / "r2.json"
    assert (
        main(
            _args(
                paths, "tsvm", tmp_path / "m2.safetensors", "--report", str(report2), fisher=False
            )
        )
        == 0
    )
    assert json.loads(report2.read_text())["totals"] == {}


def test_methods_differ_on_heterogeneous_tasks(toy, tmp_path):
    paths = toy(3, rank=2)
    merged = {}
    for method in METHODS:
        out = tmp_path / f"{method}.safetensors"
        assert main(_args(paths, method, out, "--k", "2")) == 0
        merged[method] = load_tensors(out)["transformer.resblocks.0.mlp.c_fc.weight"]
    for a in METHODS:
        for b in METHODS:
            if a < b:
                assert not torch.allclose(merged[a], merged[b]), (a, b)


# --------------------------------------------------------------------------- bad input


def _corrupt(paths, tmp_path, kind):
    """Rewrite the second fine-tuned checkpoint (or Fisher file) with one defect."""
    target = paths["fisher" if kind == "negative_fisher" else "finetuned"][1]
    tensors = load_tensors(target)
    name = "transformer.resblocks.0.mlp.c_fc.weight"
    if kind == "missing":
        del tensors[name]
    elif kind == "extra":
        tensors["text_projection"] = torch.zeros(3, 3)
    elif kind == "shape":
        tensors[name] = torch.zeros(31, 8)
    elif kind == "nan":
        tensors[name][3, 2] = float("nan")
    elif kind == "inf":
        tensors[name][0, 0] = float("inf")
    elif kind == "negative_fisher":
        tensors[name][1, 1] = -0.5
    write_safetensors(target, tensors)
    return target, name


@pytest.mark.parametrize(
    "kind,method,expected",
    [
        ("missing", "ta", "is missing"),
        ("extra", "ties", "unexpected tensor `text_projection`"),
        ("shape", "tsvm", "has shape [31, 8]"),
        ("nan", "epimer", "contains NaN or Inf"),
        ("inf", "ta", "contains NaN or Inf"),
        ("negative_fisher", "fisher", "negative entries"),
        ("negative_fisher", "epimer", "negative entries"),
    ],
)
def test_bad_input_is_rejected_with_one_line_naming_file_and_tensor(
    toy, tmp_path, capsys, kind, method, expected
):
    paths = toy(3)
    target, name = _corrupt(paths, tmp_path, kind)
    out = tmp_path / "out" / "merged.safetensors"
    assert main(_args(paths, method, out, "--k", "2")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    error_lines = [line for line in err if line.startswith("error:")]
    assert len(error_lines) == 1, err
    assert expected in error_lines[0]
    assert str(target) in error_lines[0]
    if kind != "extra":
        assert name in error_lines[0]
    # Nothing that looks like an output: neither the file nor a temporary sibling.
    assert not out.exists()
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


@pytest.mark.parametrize(
    "argv_extra,method,expected",
    [
        ([], "slerp", "unknown merge method `slerp`"),
        ([], "fisher", "needs one Fisher file"),
        ([], "epimer", "needs one Fisher file"),
        (["--alpha", "0"], "tsvm", "alpha must be > 0"),
        (["--alpha", "-1"], "ta", "alpha must be > 0"),
        (["--alpha", "0.5"], "fisher", "takes no --alpha"),
    ],
)
def test_bad_arguments(toy, tmp_path, capsys, argv_extra, method, expected):
    paths = toy(2)
    out = tmp_path / "m.safetensors"
    assert main(_args(paths, method, out, *argv_extra, fisher=False)) == 2
    assert expected in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    "method,suffix",
    [("ta", "safetensors"), ("ties", "safetensors"), ("tsvm", "zarr"), ("epimer", "zarr")],
)
def test_an_alpha_sweep_in_one_pass_equals_single_merges_bit_for_bit(toy, tmp_path, method, suffix):
    paths = toy(3, rank=2)
    extra = ["--k", "2"] if method in ("tsvm", "epimer") else []
    template = tmp_path / f"sweep_a{{alpha}}.{suffix}"
    assert (
        main(
            _args(
                paths,
                method,
                template,
                "--alpha",
                "0.3",
                "1.0",
                *extra,
                "--report",
                str(tmp_path / "r_a{alpha}.json"),
            )
        )
        == 0
    )
    for alpha in ("0.3", "1.0"):
        single = tmp_path / f"single_a{alpha}.{suffix}"
        assert (
            main(
                _args(
                    paths,
                    method,
                    single,
                    "--alpha",
                    alpha,
                    *extra,
                    "--report",
                    str(tmp_path / f"s_a{alpha}.json"),
                )
            )
            == 0
        )
        swept = tmp_path / f"sweep_a{alpha}.{suffix}"
        a, b = load_tensors(swept), load_tensors(single)
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a), alpha
        ra, rb = (json.loads((tmp_path / f"{p}_a{alpha}.json").read_text()) for p in ("r", "s"))
        assert (
            ra["settings"] == rb["settings"]
            and ra["layers"] == rb["layers"]
            and ra["totals"] == rb["totals"]
        )
        if suffix == "zarr":
            za, zb = open_tensors(swept), open_tensors(single)
            assert za.attrs()["parameters"] == zb.attrs()["parameters"]
            assert za.attrs()["report"] == zb.attrs()["report"]
            ca, cb = za.group("coords"), zb.group("coords")
            assert all(torch.equal(ca.get(n), cb.get(n)) for n in ca.keys())


@pytest.mark.parametrize(
    "argv_extra,expected",
    [
        (["--alpha", "0.5", "1.0"], "needs an {alpha} placeholder"),
        (["--alpha", "0.5", "0.5"], "lists a value twice"),
    ],
)
def test_an_alpha_sweep_needs_distinct_values_and_a_placeholder(
    toy, tmp_path, capsys, argv_extra, expected
):
    paths = toy(2)
    out = tmp_path / "m.safetensors"
    assert main(_args(paths, "ta", out, *argv_extra)) == 2
    assert expected in capsys.readouterr().err
    assert not out.exists()


def test_fisher_rank_must_be_positive(toy, tmp_path, capsys):
    paths = toy(2)
    out = tmp_path / "m.safetensors"
    assert main(_args(paths, "epimer", out, "--fisher-rank", "0")) == 2
    assert "fisher_rank must be a positive integer" in capsys.readouterr().err
    assert not out.exists()


def _rank_one_fishers(paths, root: Path) -> list[Path]:
    """One Fisher per task, all equal to the same positive rank-1 matrix per tensor (F̄ has rank 1)."""
    g = torch.Generator().manual_seed(4)
    theta0 = load_tensors(paths["pretrained"])
    fis = {}
    for name, v in theta0.items():
        if v.ndim == 2:
            fis[name] = (torch.rand(v.shape[0], 1, generator=g) + 0.5) @ (
                torch.rand(1, v.shape[1], generator=g) + 0.5
            )
        elif v.is_floating_point():
            fis[name] = torch.rand(v.shape, generator=g) + 0.5
    out = []
    for t in range(len(paths["finetuned"])):
        out.append(root / f"rank1_fisher{t}.safetensors")
        write_safetensors(out[-1], fis)
    return out


def _assert_same_updates(pretrained: Path, got: Path, expected: Path, rtol: float) -> None:
    """Every floating tensor's update θ − θ0 of `got` within rtol (in norm) of `expected`'s."""
    a, b = load_tensors(expected), load_tensors(got)
    theta0 = load_tensors(pretrained)
    for name in a:
        if a[name].is_floating_point():
            d_expected, d_got = a[name] - theta0[name], b[name] - theta0[name]
            assert (
                torch.linalg.norm(d_got - d_expected) <= rtol * torch.linalg.norm(d_expected) + 1e-7
            ), name


def test_fisher_rank_merge_equals_the_exact_one_when_the_fisher_has_that_rank(toy, tmp_path):
    paths = toy(3, rank=2)
    paths["fisher"] = _rank_one_fishers(paths, tmp_path)
    exact, approx = tmp_path / "exact.safetensors", tmp_path / "rank1.safetensors"
    assert main(_args(paths, "epimer", exact, "--k", "2")) == 0
    assert (
        main(
            _args(
                paths,
                "epimer",
                approx,
                "--k",
                "2",
                "--fisher-rank",
                "1",
                "--report",
                str(tmp_path / "r.json"),
            )
        )
        == 0
    )
    report = json.loads((tmp_path / "r.json").read_text())
    errors = [layer["fisher_rank_error"] for layer in report["layers"].values()]
    assert errors and max(errors) < 1e-5 and report["totals"]["fisher_rank_error"] == max(errors)
    assert report["settings"]["fisher_rank"] == 1
    _assert_same_updates(paths["pretrained"], approx, exact, rtol=1e-4)


def test_hessian_stage_stores_the_low_rank_error_and_the_merge_reports_it(toy, tmp_path):
    paths = toy(3, rank=2)  # random Fisher: a rank-2 F̂ is approximate
    basis, hessian = _basis(paths, tmp_path / "basis.zarr"), tmp_path / "hessian.zarr"
    assert _hessian(paths, basis, hessian, "--fisher-rank", "2") == 0
    out, report = tmp_path / "m.zarr", tmp_path / "r.json"
    assert _stored_merge(paths, "epimer", basis, hessian, out, "--report", str(report)) == 0
    layers = json.loads(report.read_text())["layers"]
    errors = {name: layer["fisher_rank_error"] for name, layer in layers.items()}
    assert set(errors) == set(open_tensors(basis).group_keys())
    assert all(0 < e < 1 for e in errors.values())
    stored = open_tensors(hessian)
    assert all(stored.group(n).attrs()["fisher_rank"] == 2 for n in errors)
    # The merge records the rank its stored Hessians were formed with, and refuses another.
    assert json.loads(report.read_text())["settings"]["fisher_rank"] == 2
    assert open_tensors(out).attrs()["parameters"]["fisher_rank"] == 2
    other = tmp_path / "other.zarr"
    assert _stored_merge(paths, "epimer", basis, hessian, other, "--fisher-rank", "1") == 2
    assert not other.exists()


def test_an_exact_merge_records_fisher_rank_none(toy, tmp_path):
    paths = toy(2)
    out, report = tmp_path / "m.zarr", tmp_path / "m.json"
    assert main(_args(paths, "epimer", out, "--k", "2", "--report", str(report))) == 0
    parameters = open_tensors(out).attrs()["parameters"]
    assert parameters["fisher_rank"] is None and parameters["solver"] == "auto"
    # one serialiser: the output's provenance records what the report records
    assert parameters.pop("method") == "epimer"
    assert parameters == json.loads(report.read_text())["settings"]


def test_fisher_count_must_match(toy, tmp_path, capsys):
    paths = toy(3)
    args = _args(paths, "epimer", tmp_path / "m.safetensors", fisher=False) + [
        "--fisher",
        str(paths["fisher"][0]),
    ]
    assert main(args) == 2
    assert "got 1 Fisher files for 3" in capsys.readouterr().err


def test_corrupt_safetensors_file_is_named(toy, tmp_path, capsys):
    paths = toy(2)
    Path(paths["finetuned"][0]).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    assert main(_args(paths, "ta", tmp_path / "m.safetensors")) == 2
    err = capsys.readouterr().err
    assert str(paths["finetuned"][0]) in err and "not a readable safetensors file" in err


def test_module_entry_point_and_help():
    res = subprocess.run(
        [sys.executable, "-m", "pipeline", "merge", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    for option in [
        "--pretrained",
        "--finetuned",
        "--fisher",
        "--k",
        "--alpha",
        "--aggregator",
        "--eps",
        "--out",
        "--report",
    ]:
        assert option in res.stdout
    for method in METHODS:
        assert method in res.stdout


class _InMemory(TensorReader):
    """A state dict seen through the reader interface: real-size inputs without writing files."""

    def __init__(self, tensors: dict[str, torch.Tensor], name: str):
        self.tensors, self.path = tensors, Path(name)

    def keys(self):
        return list(self.tensors)

    def shape(self, name):
        return tuple(self.tensors[name].shape)

    def dtype(self, name):
        return self.tensors[name].dtype

    def _load(self, name):
        return self.tensors[name].clone()


@pytest.mark.slow
def test_elementwise_methods_at_vit_b32_size():
    """TA, TIES and Fisher averaging over random ViT-B-32 visual towers (T = 2), in memory.

    The subspace methods run at this size through the whole workflow (tests/workflow/test_smoke.py);
    this covers the element-wise ones (TIES's global magnitude threshold over 88M entries) without
    putting another 2 GB of checkpoints on disk.
    """
    import open_clip

    from pipeline.merge import MergeInputs, merge
    from pipeline.methods import MergeSettings

    visual = open_clip.create_model("ViT-B-32", pretrained=None).visual
    base = {k: v.detach().clone() for k, v in visual.state_dict().items()}
    del visual
    g = torch.Generator().manual_seed(0)
    finetuned, fishers = [], []
    for t in range(2):
        finetuned.append(
            _InMemory(
                {n: v + 1e-3 * torch.randn(v.shape, generator=g) for n, v in base.items()}, f"t{t}"
            )
        )
        fishers.append(
            _InMemory({n: torch.rand(v.shape, generator=g) ** 2 for n, v in base.items()}, f"f{t}")
        )
    inputs = MergeInputs(pretrained=_InMemory(base, "p"), finetuned=finetuned, fishers=fishers)
    for method, alpha in [("ta", 0.5), ("ties", 1.0), ("fisher", 1.0)]:
        seen: dict[str, tuple[tuple[int, ...], bool]] = {}

        def write(name, tensor):
            seen[name] = (tuple(tensor.shape), bool(torch.isfinite(tensor).all()))

        merge(method, inputs, MergeSettings(alpha=alpha), write, progress=False)
        assert seen.keys() == base.keys(), method
        assert all(
            shape == tuple(base[n].shape) and finite for n, (shape, finite) in seen.items()
        ), method
        assert seen["transformer.resblocks.11.mlp.c_fc.weight"][0] == (3072, 768)


def test_every_stage_runs_with_deterministic_kernels_without_importing_inductor():
    """Same inputs, same bits: a stage process has torch's deterministic algorithms on (warn-only
    where torch has none) and cuDNN autotuning off, without paying for torch._inductor."""
    code = (
        "import sys, torch\n"
        "from pipeline.cli import deterministic_torch\n"
        "deterministic_torch()\n"
        "print(torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),"
        " torch.backends.cudnn.benchmark, 'torch._inductor' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["True", "True", "False", "False"]


def test_solver_cg_and_auto_merges_equal_the_dense_one_and_report_their_steps(toy, tmp_path):
    paths = toy(3, rank=2)
    runs = {
        "dense": ["--solver", "dense"],
        "cg": ["--solver", "cg"],
        "auto": [],
    }  # auto: the default
    for name, extra in runs.items():
        assert (
            main(
                _args(
                    paths,
                    "epimer",
                    tmp_path / f"{name}.safetensors",
                    "--k",
                    "2",
                    *extra,
                    "--report",
                    str(tmp_path / f"{name}.json"),
                )
            )
            == 0
        )
    rd, rc, ra = (json.loads((tmp_path / f"{name}.json").read_text()) for name in runs)
    assert rd["settings"]["solver"] == "dense"
    assert rc["settings"]["solver"] == "cg" and ra["settings"]["solver"] == "auto"
    assert "cg_residual" not in rd["totals"]
    assert (
        0 <= rc["totals"]["cg_residual"] <= 1e-6
        and rc["totals"]["cg_iterations"] >= 1
        and rc["totals"]["cg_fallbacks"] == 0
    )
    # auto either converged or formed H̄: both leave a residual at float32 round-off
    assert 0 <= ra["totals"]["cg_residual"] <= 1e-5 and ra["totals"]["cg_iterations"] >= 1
    for report in (rc, ra):
        for key in ("eta", "V_S", "R_S"):
            assert report["totals"][key] == pytest.approx(rd["totals"][key], rel=1e-5, abs=1e-9), (
                key
            )
    for name in ("cg", "auto"):
        _assert_same_updates(
            paths["pretrained"],
            tmp_path / f"{name}.safetensors",
            tmp_path / "dense.safetensors",
            rtol=1e-5,
        )


def test_hessian_stage_stores_cg_solutions_that_merge_like_the_formed_hessian(
    toy, tmp_path, capsys
):
    """The hessian stage's default (auto) keeps H̄⁻¹b and two products where CG solves a layer;
    merges from it equal merges from the stored H̄ (dense) at every α and aggregator."""
    paths = toy(3, rank=2)
    basis = _basis(paths, tmp_path / "basis.zarr")
    stored = {}
    for solver in ("auto", "dense"):
        stored[solver] = tmp_path / f"hessian_{solver}.zarr"
        extra = [] if solver == "auto" else ["--solver", solver]
        assert _hessian(paths, basis, stored[solver], *extra) == 0
    with open_tensors(stored["auto"]) as h, open_tensors(stored["dense"]) as d:
        assert (
            h.attrs()["parameters"]["solver"] == "auto"
            and d.attrs()["parameters"]["solver"] == "dense"
        )
        layers = h.group_keys()
        solved = [n for n in layers if "H" not in h.group(n)]
        assert solved and all("H" in d.group(n) for n in layers)
        for n in solved:
            g = h.group(n)
            assert {"solution_tagged", "H_delta_bar_projection", "H_solution_tagged"} <= set(
                g.keys()
            )
            assert 1 <= g.attrs()["cg_iterations"] and g.attrs()["cg_residual"] <= 1e-5
    for aggregator, alpha in (("frechet_sum", "0.5"), ("frechet_mean", "1.0")):
        reports = {}
        for solver in ("auto", "dense"):
            out, report = (
                tmp_path / f"{solver}_{aggregator}.safetensors",
                tmp_path / f"{solver}_{aggregator}.json",
            )
            extra = ["--alpha", alpha, "--aggregator", aggregator, "--coords", "projection"]
            assert (
                _stored_merge(
                    paths, "epimer", basis, stored[solver], out, *extra, "--report", str(report)
                )
                == 0
            )
            reports[solver] = json.loads(report.read_text())
        assert (
            reports["auto"]["settings"]["solver"] == "auto"
            and reports["dense"]["settings"]["solver"] == "dense"
        )
        assert (
            reports["auto"]["totals"]["cg_iterations"] >= 1
            and "cg_residual" not in reports["dense"]["totals"]
        )
        for key in ("eta", "V_S", "R_S"):
            assert reports["auto"]["totals"][key] == pytest.approx(
                reports["dense"]["totals"][key], rel=1e-5, abs=1e-9
            ), key
        _assert_same_updates(
            paths["pretrained"],
            tmp_path / f"auto_{aggregator}.safetensors",
            tmp_path / f"dense_{aggregator}.safetensors",
            rtol=1e-5,
        )
    # TSV-M's merge (tagged) with projection coordinates: V_S_merged would need H̄ itself; it is left out,
    # the rest (V_S at the minimiser H̄⁻¹b included) stays
    report = tmp_path / "tsvm.json"
    extra = ["--coords", "projection", "--report", str(report)]
    assert (
        _stored_merge(paths, "tsvm", basis, stored["auto"], tmp_path / "t.safetensors", *extra) == 0
    )
    layers = json.loads(report.read_text())["layers"]
    assert all(
        "eta" in layers[n]
        and "R_S" in layers[n]
        and "V_S" in layers[n]
        and "V_S_merged" not in layers[n]
        for n in solved
    )
    # a merge asking for another solver than the stored Hessians were made with is refused
    x = tmp_path / "x.safetensors"
    assert _stored_merge(paths, "epimer", basis, stored["dense"], x, "--solver", "cg") == 2
    assert "made with solver dense" in capsys.readouterr().err


def test_solver_auto_with_fisher_rank_forms_the_low_rank_hessian(toy, tmp_path):
    paths = toy(2, rank=2)
    report = tmp_path / "low.json"
    assert (
        main(
            _args(
                paths,
                "epimer",
                tmp_path / "l.safetensors",
                "--k",
                "2",
                "--fisher-rank",
                "1",
                "--report",
                str(report),
            )
        )
        == 0
    )
    low = json.loads(report.read_text())
    assert (
        low["settings"]["solver"] == "dense"  # auto forms the low-rank H̄
        and low["settings"]["fisher_rank"] == 1
        and "cg_residual" not in low["totals"]
        and low["totals"]["fisher_rank_error"] >= 0
    )


def test_solver_cg_refuses_fisher_rank(toy, tmp_path, capsys):
    paths = toy(2, rank=2)
    out = tmp_path / "m.safetensors"
    assert (
        main(_args(paths, "epimer", out, "--k", "2", "--solver", "cg", "--fisher-rank", "1")) == 2
    )
    assert "two alternatives to forming H̄" in capsys.readouterr().err
    assert not out.exists()
    basis = _basis(paths, tmp_path / "basis.zarr")
    assert _hessian(paths, basis, tmp_path / "h.zarr", "--solver", "cg", "--fisher-rank", "1") == 2
    assert "two alternatives to forming H̄" in capsys.readouterr().err


def test_an_alpha_sweep_takes_one_out_path_per_alpha(toy, tmp_path, capsys):
    """--out A B with --alpha a b: the same artifacts as a placeholder gives; a count that is
    neither one nor the α count is refused."""
    paths = toy(2)
    outs = [tmp_path / "x.safetensors", tmp_path / "y.safetensors"]
    args = ["merge", "ta", *_models(paths), "--alpha", "0.3", "1.0", "-q"]
    assert main([*args, "--out", *map(str, outs)]) == 0
    assert main([*args, "--out", str(tmp_path / "p_a{alpha}.safetensors")]) == 0
    for out, alpha in zip(outs, ("0.3", "1.0")):
        a, b = load_tensors(out), load_tensors(tmp_path / f"p_a{alpha}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert main([*args[:-4], "--alpha", "0.3", "0.5", "1.0", "-q", "--out", *map(str, outs)]) == 2
    assert "got 2 paths for 3 --alpha values" in capsys.readouterr().err


def test_every_merge_logs_one_summary_line_under_quiet(toy, tmp_path):
    """--quiet keeps one line per merged artifact in the log (stderr): its α, the wall time, η and
    the CG steps; a Fisher merge's line too."""
    paths = toy(3)

    def run(argv):
        return subprocess.run(
            [sys.executable, "-m", "pipeline", *argv], capture_output=True, text=True, check=False
        )

    res = run(
        _args(
            paths,
            "epimer",
            tmp_path / "e_a{alpha}.zarr",
            "--k",
            "2",
            "--alpha",
            "0.5",
            "1.0",
            "--solver",
            "cg",
        )
    )
    assert res.returncode == 0, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 2, lines
    assert all(
        line.startswith("INFO pipeline.summary: merged 3 checkpoints with epimer at α=")
        for line in lines
    )
    assert all(re.search(r"in \d+\.\d\d s \(one pass for 2 α\)", line) for line in lines)
    assert all("eta=" in line and "cg_iterations=" in line for line in lines)
    fisher = tmp_path / "f.safetensors"
    res = run(_args(paths, "fisher", fisher))
    assert res.returncode == 0, res.stderr
    (line,) = res.stderr.splitlines()
    assert "merged 3 checkpoints with fisher in " in line and str(fisher) in line


def _all_actions(parser):
    """(stage, action) for every option of every stage parser."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for stage, sub in action.choices.items():
                yield from ((stage, a) for a in sub._actions)


def test_every_option_is_documented_and_help_has_no_default_none():
    import argparse

    from pipeline.cli import build_parser

    parser = build_parser()
    undocumented = [
        (stage, a.option_strings or a.dest)
        for stage, a in _all_actions(parser)
        if not isinstance(a, argparse._HelpAction) and not (a.help or "").strip()
    ]
    assert undocumented == []
    for stage, sub in next(
        a for a in parser._actions if isinstance(a, argparse._SubParsersAction)
    ).choices.items():
        text = sub.format_help()
        assert "(default: None)" not in text and "default: False" not in text, stage
    evaluate = {a.dest: a.help for stage, a in _all_actions(parser) if stage == "evaluate"}
    fisher = {a.dest: a.help for stage, a in _all_actions(parser) if stage == "fisher"}
    assert evaluate["dtype"] != fisher["dtype"] and "backward" not in evaluate["dtype"]


SUMMARY = (
    "method,setting,k,alpha,fraction,shapes,colour,average,worst,worst_task,eta,V_S,V_S_merged,R_S,"
    "amplification_min,amplification_max,val_average,val_worst\n"
    "zeroshot,theta0,,,,0.5,0.25,0.375,0.25,colour,,,,,,,0.4,0.3\n"
    "ta,a0.5,,0.5,,0.75,0.5,0.625,0.5,colour,,,,,,,0.7,0.6\n"
    "ta,a1.0,,1.0,,0.875,0.5,0.6875,0.5,colour,,,,,,,0.6,0.5\n"
    "epimer,k2_a1.0_f0.25,2,1.0,0.25,0.9,0.6,0.75,0.6,colour,0.0123,1,1,1,1,1,0.8,0.7\n"
)


def test_show_prints_fractions_and_the_alpha_chosen_on_validation(tmp_path):
    path = tmp_path / "summary.csv"
    path.write_text(SUMMARY)
    res = subprocess.run(
        [sys.executable, "-m", "pipeline", "show", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    rows = {
        line.split()[0] + " " + line.split()[1]: line.split()
        for line in res.stdout.splitlines()[2:6]
    }
    assert rows["ta a1.0"][2:6] == [
        "0.875",
        "0.500",
        "0.688",
        "0.500",
    ]  # shapes, colour, avg, worst
    assert rows["epimer k2_a1.0_f0.25"][-1] == "0.0123"  # η
    assert "ta                       α=0.5 (0.625)" in res.stdout  # chosen on validation
    assert "best on test: α=1.0 (0.688)" in res.stdout
    assert "%" not in res.stdout


def test_show_imports_no_torch_and_refuses_other_csvs_in_one_line(tmp_path):
    path = tmp_path / "summary.csv"
    path.write_text(SUMMARY)
    code = (
        "import sys; from pipeline.cli import main; rc = main(['show', sys.argv[1]]); "
        "assert 'torch' not in sys.modules, 'show imported torch'; sys.exit(rc)"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=False
    )
    assert res.returncode == 0, res.stderr
    other = tmp_path / "eval.csv"
    other.write_text("task,split,accuracy,n\nshapes,test,0.5,10\n")
    res = subprocess.run(
        [sys.executable, "-m", "pipeline", "show", str(other)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 2 and res.stdout == ""
    (line,) = res.stderr.splitlines()
    assert line.startswith(f"error: {other}: not a summary.csv (no column `method`")
