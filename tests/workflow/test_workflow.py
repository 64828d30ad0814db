"""The Snakemake workflow, through Snakemake itself: lint, a small end-to-end run, and
incremental re-runs (dry-runs on copies of the finished run after config changes)."""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "workflow" / "tiny.yaml"
SNAKEMAKE = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile")]


def snakemake(
    workdir: Path, *args: str, config: dict | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    cfg = workdir / "run.yaml"
    cfg.write_text(
        yaml.safe_dump(config if config is not None else yaml.safe_load(TINY.read_text()))
    )
    cmd = [*SNAKEMAKE, "--directory", str(workdir), "--configfile", str(cfg), *args]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if check and res.returncode != 0:
        raise AssertionError(
            f"snakemake failed ({res.returncode}):\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
        )
    return res


def planned_jobs(workdir: Path, config: dict) -> dict[str, int]:
    """rule → number of jobs a dry-run schedules."""
    res = snakemake(workdir, "-n", "--cores", "2", config=config)
    out = res.stdout + res.stderr
    if "Nothing to be done" in out:
        return {}
    table = out.split("Job stats:")[1]
    counts = {}
    for line in table.splitlines()[3:]:
        m = re.match(r"^(\w+)\s+(\d+)$", line.strip())
        if not m:
            break
        if m.group(1) != "total":
            counts[m.group(1)] = int(m.group(2))
    return counts


def test_lint_is_clean():
    res = subprocess.run([*SNAKEMAKE, "--lint"], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Congratulations, your workflow is in a good condition" in res.stdout + res.stderr


def test_default_config_plans_the_demo_grid(tmp_path):
    counts = planned_jobs(tmp_path, {})
    # Six tasks, three k, six α, one Fisher fraction (config/config.yaml).
    assert counts["finetune"] == 6 and counts["head"] == 6 and counts["pretrain"] == 1
    assert counts["fisher"] == 6 * 1
    assert counts["basis"] == 3 and counts["hessian"] == 3 * 1
    # One merge job per α sweep (each (method, k, fraction) merges its six α in one pass), and one
    # evaluation job per sweep: three k for TSV-M and EpiMer (one fraction), one sweep otherwise.
    sweeps = {"ta": 1, "ties": 1, "fisher": 1, "tsvm": 3, "epimer": 3}
    for method, n in sweeps.items():
        assert counts[f"merge_{method}"] == n and counts[f"evaluate_{method}"] == n, method
    assert counts["evaluate_finetuned"] == 6 and counts["evaluate_zeroshot"] == 1
    # Tables, figures and the landscape add three jobs, not one per figure.
    assert counts["landscape"] == 1 and counts["tables"] == 1 and counts["plots"] == 1
    assert sum(counts.values()) == 55


def test_config_of_the_wrong_type_fails_before_any_job(tmp_path):
    res = snakemake(tmp_path, "-n", "--cores", "1", config={"merge": {"k": ["four"]}}, check=False)
    assert res.returncode != 0
    assert (
        "ValidationError" in res.stdout + res.stderr or "is not of type" in res.stdout + res.stderr
    )
    assert not (tmp_path / "results").exists()


# finished_run (the tiny workflow run to completion once per session) is in conftest.py.


def _copy(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(run, dst, symlinks=True)  # copy2 keeps modification times
    return dst


@pytest.mark.slow
def test_end_to_end_artifacts(finished_run):
    import zarr

    root = finished_run / "results" / "tiny"
    cfg = yaml.safe_load(TINY.read_text())
    tasks = cfg["tasks"]
    for t in tasks:
        assert (root / "checkpoints" / f"{t}.safetensors").is_file()
        assert (root / "heads" / f"{t}.safetensors").is_file()
        for f in ("0.25", "1.0"):
            g = zarr.open_group(str(root / "fisher" / "per_sample" / t / f"f{f}.zarr"), mode="r")
            assert g.attrs["artifact"] == "fisher" and g.attrs["parameters"]["fraction"] == float(f)
            assert "transformer.resblocks.0.attn.in_proj_weight" in g.array_keys()
    assert zarr.open_group(str(root / "basis" / "k2.zarr"), mode="r").attrs["artifact"] == "basis"
    for f in ("0.25", "1.0"):
        assert (
            zarr.open_group(str(root / "hessian" / f"k2_f{f}.zarr"), mode="r").attrs["artifact"]
            == "hessian"
        )
    merged = zarr.open_group(str(root / "merged" / "epimer" / "k2_a1.0_f1.0.zarr"), mode="r")
    assert merged.attrs["artifact"] == "merged" and merged.attrs["diagnostics"]["eta"] >= 0
    assert merged.attrs["parameters"]["method"] == "epimer"
    with open(root / "summary.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    names = {(r["method"], r["setting"]) for r in rows}
    assert ("zeroshot", "theta0") in names and ("finetuned", "own") in names
    assert (
        ("epimer", "k2_a0.5_f0.25") in names
        and ("tsvm", "k2_a1.0") in names
        and ("fisher", "f1.0") in names
    )
    assert len(rows) == 2 + 2 + 2 + 2 + 2 + 4
    for r in rows:
        values = [float(r[t]) for t in tasks]
        assert float(r["average"]) == pytest.approx(sum(values) / len(values), abs=1e-5)
        assert float(r["worst"]) == pytest.approx(min(values), abs=1e-6)
        assert (
            0 <= float(r["val_average"]) <= 1
        )  # every evaluation also ran on the validation split
    with open(root / "eval" / "ta" / "a0.5.csv", newline="") as fh:
        assert {e["split"] for e in csv.DictReader(fh)} == {"test", "val"}


@pytest.mark.slow
def test_end_to_end_tables_plots_landscape_and_report(finished_run):
    """The run's tables hold summary.csv's numbers; every figure exists in both formats; the
    landscape grid has the configured size; `snakemake --report` embeds them."""
    import zarr

    root = finished_run / "results" / "tiny"
    cfg = yaml.safe_load(TINY.read_text())
    with open(root / "summary.csv", newline="") as fh:
        summary = {(r["method"], r["setting"]): r for r in csv.DictReader(fh)}
    with open(root / "tables" / "alpha_sensitivity.csv", newline="") as fh:
        sens = list(csv.DictReader(fh))
    assert [c for c in sens[0] if c.startswith("α=")] == [f"α={a:g}" for a in cfg["merge"]["alpha"]]
    rows = {(r["Method"], r["k"], r["f"]): r for r in sens}
    for a in cfg["merge"]["alpha"]:
        assert float(rows[("TSV-M", "2", "")][f"α={a:g}"]) == float(
            summary[("tsvm", f"k2_a{a}")]["average"]
        )
        epimer_row = rows[("EpiMer", "2", "0.25")]
        expected = float(summary[("epimer", f"k2_a{a}_f0.25")]["average"])
        assert float(epimer_row[f"α={a:g}"]) == expected
    with open(root / "tables" / "main.csv", newline="") as fh:
        main = {r["Method"]: r for r in csv.DictReader(fh)}
    epimer = [r for (m, _), r in summary.items() if m == "epimer"]
    chosen = max(epimer, key=lambda r: float(r["val_average"]))
    assert main["EpiMer"]["Setting (val.)"] == chosen["setting"]
    assert float(main["EpiMer"]["Avg."]) == float(chosen["average"])
    assert float(main["EpiMer"]["Avg. (best on test)"]) == max(float(r["average"]) for r in epimer)
    # Table 2 at the paper's setting (tiny.yaml: report.paper_k 2, paper_fraction 1.0): EpiMer's
    # best α on test among k = 2, f = 1.0 only, beside the all-settings table.
    with open(root / "tables" / "table2.csv", newline="") as fh:
        table2 = {r["Method"]: r for r in csv.DictReader(fh)}
    at_paper = [
        r
        for (m, s), r in summary.items()
        if m == "epimer" and s.startswith("k2_") and s.endswith("_f1.0")
    ]
    best = max(at_paper, key=lambda r: float(r["average"]))
    assert table2["EpiMer"]["Setting"] == best["setting"] and float(
        table2["EpiMer"]["Avg."]
    ) == float(best["average"])
    assert table2["EpiMer"]["Selection"] == "k = 2, f = 1, best α on test"
    assert "θ0 + linear-probe heads" in table2  # tiny.yaml trains its heads (heads.source: train)
    for name in (
        "table2",
        "table6",
        "main",
        "per_task",
        "paired",
        "alpha_sensitivity",
        "alpha_selection",
        "data_efficiency",
        "normalised",
        "eta",
    ):
        for ext in ("md", "csv", "html"):
            assert (root / "tables" / f"{name}.{ext}").stat().st_size > 0
    figures = [
        "alpha_sweep",
        "data_efficiency",
        "per_task",
        "normalised",
        "eta_per_layer",
        "eta_vs_k",
        "landscape",
    ]
    for name in figures + [f"landscape_{t}" for t in cfg["tasks"]]:
        assert (root / "plots" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
        assert (root / "plots" / f"{name}.svg").stat().st_size > 1000
    g = zarr.open_group(str(root / "landscape" / "landscape.zarr"), mode="r")
    assert g.attrs["artifact"] == "landscape" and g["loss"].shape == (len(cfg["tasks"]), 9, 9)
    report = finished_run / "report.html"
    snakemake(finished_run, "--cores", "1", "--report", str(report))
    html = report.read_text()
    assert (
        "alpha_sweep.png" in html
        and "landscape_colour.png" in html
        and "chosen on validation" in html
    )
    # Both kinds of table are in the report, each labelled.
    assert "table2.html" in html and "Table 2 (paper setting)" in html
    assert (
        "main.html" in html and "Table 2, all settings" in html and "Table 6, all settings" in html
    )


@pytest.mark.slow
def test_nothing_changed_schedules_nothing(finished_run, tmp_path):
    run = _copy(finished_run, tmp_path)
    assert planned_jobs(run, yaml.safe_load(TINY.read_text())) == {}


@pytest.mark.slow
def test_adding_an_alpha_schedules_only_its_merges_and_evaluations(finished_run, tmp_path):
    run = _copy(finished_run, tmp_path)
    cfg = yaml.safe_load(TINY.read_text())
    cfg["merge"]["alpha"] = [*cfg["merge"]["alpha"], 0.7]
    counts = planned_jobs(run, cfg)
    assert counts == {
        "merge_ta": 1,  # each sweep that holds α = 0.7, merged again in one pass
        "merge_ties": 1,
        "merge_tsvm": 1,
        "merge_epimer": 2,  # two fractions
        "evaluate_ta": 1,
        "evaluate_ties": 1,
        "evaluate_tsvm": 1,
        "evaluate_epimer": 2,
        "report": 1,
        "tables": 1,  # the summary changed; the landscape (checkpoints only) did not
        "plots": 1,
        "all": 1,
    }


@pytest.mark.slow
def test_adding_one_alpha_to_one_method_reruns_that_methods_sweep_alone(finished_run, tmp_path):
    """merge.alpha as a mapping: an α added to Task Arithmetic's list re-runs its one sweep (merge
    and evaluation) and the summary; the other methods' sweeps, whose lists did not change, stay."""
    run = _copy(finished_run, tmp_path)
    cfg = yaml.safe_load(TINY.read_text())
    alphas = cfg["merge"]["alpha"]
    cfg["merge"]["alpha"] = {
        "ta": [*alphas, 0.25],
        "ties": alphas,
        "tsvm": alphas,
        "epimer": alphas,
    }
    assert planned_jobs(run, cfg) == {
        "merge_ta": 1,
        "evaluate_ta": 1,
        "report": 1,
        "tables": 1,
        "plots": 1,
        "all": 1,
    }


@pytest.mark.slow
@pytest.mark.parametrize("key, value", [("fisher_rank", 2), ("solver", "dense")])
def test_a_low_rank_or_formed_hessian_reruns_only_the_hessians_and_epimer(
    finished_run, tmp_path, key, value
):
    run = _copy(finished_run, tmp_path)
    cfg = yaml.safe_load(TINY.read_text())
    cfg["merge"][key] = value
    counts = planned_jobs(run, cfg)
    assert counts == {
        "hessian": 2,  # one per Fisher fraction; bases, Fisher and training untouched
        "merge_epimer": 2,  # one sweep per fraction
        "evaluate_epimer": 2,
        "report": 1,
        "tables": 1,
        "plots": 1,
        "all": 1,
    }


@pytest.mark.slow
@pytest.mark.parametrize(
    "key, value", [("ties_sign", "frequency"), ("ties_disjoint", "sum"), ("ties_density", 30)]
)
def test_a_ties_setting_reruns_only_the_ties_merges(finished_run, tmp_path, key, value):
    run = _copy(finished_run, tmp_path)
    cfg = yaml.safe_load(TINY.read_text())
    cfg["merge"][key] = value
    counts = planned_jobs(run, cfg)
    # TIES's one sweep, not Task Arithmetic's.
    assert counts == {
        "merge_ties": 1,
        "evaluate_ties": 1,
        "report": 1,
        "tables": 1,
        "plots": 1,
        "all": 1,
    }


@pytest.mark.slow
def test_adding_a_k_schedules_no_fisher_or_training(finished_run, tmp_path):
    run = _copy(finished_run, tmp_path)
    cfg = yaml.safe_load(TINY.read_text())
    cfg["merge"]["k"] = [*cfg["merge"]["k"], 3]
    counts = planned_jobs(run, cfg)
    assert counts == {
        "basis": 1,
        "hessian": 2,
        "merge_tsvm": 1,  # the new k's sweeps
        "merge_epimer": 2,
        "evaluate_tsvm": 1,
        "evaluate_epimer": 2,
        "report": 1,
        "tables": 1,  # the summary changed; the landscape (checkpoints only) did not
        "plots": 1,
        "all": 1,
    }


@pytest.mark.slow
def test_adding_a_fraction_schedules_no_training_head_or_basis(finished_run, tmp_path):
    run = _copy(finished_run, tmp_path)
    cfg = yaml.safe_load(TINY.read_text())
    cfg["fisher"]["fractions"] = [*cfg["fisher"]["fractions"], 0.5]
    counts = planned_jobs(run, cfg)
    assert counts == {
        "fisher": 3,
        "hessian": 1,
        "merge_fisher": 1,
        "merge_epimer": 1,  # the new fraction's sweep (one k)
        "evaluate_fisher": 1,
        "evaluate_epimer": 1,
        "report": 1,
        "tables": 1,  # the summary changed; the landscape (checkpoints only) did not
        "plots": 1,
        "all": 1,
    }


def test_merge_device_reaches_the_basis_hessian_and_merge_jobs(tmp_path):
    """`merge.device` is passed to every basis, hessian and merge command; the CPU default too."""
    for device in ("cpu", "cuda:1"):
        cfg = yaml.safe_load(TINY.read_text())
        cfg["merge"]["device"] = device
        res = snakemake(tmp_path, "-n", "-p", "--cores", "2", config=cfg)
        lines = (res.stdout + res.stderr).splitlines()
        commands = [
            line.split("Shell command: ", 1)[1]
            for line in lines
            if "Shell command: python -m pipeline " in line
        ]
        stages = [c.split()[3] for c in commands if c.split()[3] in ("basis", "hessian", "merge")]
        assert sorted(set(stages)) == ["basis", "hessian", "merge"]
        for c in commands:
            if c.split()[3] in ("basis", "hessian", "merge"):
                assert f"--device {device} " in c, c
    cfg["merge"]["device"] = "gpu"
    res = snakemake(tmp_path, "-n", config=cfg, check=False)
    assert res.returncode != 0 and "device" in res.stdout + res.stderr


TOY_PLUGIN = '''
"""Two toy merge methods, registered as rows of the method registry when imported."""
from pipeline.methods import METHODS, LayerResult, Method


def _mean(layer, s):
    return LayerResult(layer.deltas.mean(0), scale=s.alpha)


def _fisher_mean(layer, s):
    weights = layer.fishers + s.eps
    return LayerResult((weights * layer.deltas).sum(0) / weights.sum(0), scale=s.alpha)


METHODS["toyflat"] = Method("toyflat", "mean task vector, scaled", _mean, ("alpha",), options=("eps",))
METHODS["toyfisher"] = Method(
    "toyfisher", "Fisher-weighted mean task vector, scaled", _fisher_mean, ("alpha", "fraction"),
    needs_fisher="all",
)
'''


def test_a_method_registered_by_a_plugin_gets_merge_and_evaluate_jobs(tmp_path):
    """A plugin module (config `plugins`) adds registry rows; the workflow makes their rules from
    the rows alone: a method named by α with an option, and one named by (α, fraction) that reads
    every task's Fisher diagonals, each one merge and one evaluation job per α sweep."""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "toy_merge_plugin.py").write_text(TOY_PLUGIN)
    cfg = yaml.safe_load(TINY.read_text())
    cfg["plugins"] = ["toy_merge_plugin"]
    cfg["merge"]["methods"] = ["ta", "toyflat", "toyfisher"]
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(plugins), os.environ.get("PYTHONPATH")])),
    }
    cmd = [
        *SNAKEMAKE,
        "--directory",
        str(tmp_path),
        "--configfile",
        str(tmp_path / "run.yaml"),
        "-n",
        "-p",
        "--cores",
        "1",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    stats = out.split("Job stats:")[1]
    counts = {rule: int(n) for rule, n in re.findall(r"^(\w+)\s+(\d+)$", stats, flags=re.MULTILINE)}
    F = len(cfg["fisher"]["fractions"])
    assert counts["merge_toyflat"] == counts["evaluate_toyflat"] == 1
    assert counts["merge_toyfisher"] == counts["evaluate_toyfisher"] == F
    commands = [line for line in out.splitlines() if "python -m pipeline merge toy" in line]
    flat = [c for c in commands if " merge toyflat " in c]
    assert (
        len(flat) == 1 and "--alpha 0.5 1.0 --eps 1e-08 " in flat[0] and "--fisher" not in flat[0]
    )
    assert (
        "--out results/tiny/merged/toyflat/a0.5.zarr results/tiny/merged/toyflat/a1.0.zarr "
        in flat[0]
    )
    for fraction in ("0.25", "1.0"):
        (command,) = [c for c in commands if f"merged/toyfisher/a0.5_f{fraction}.zarr" in c]
        fishers = [f"results/tiny/fisher/per_sample/{t}/f{fraction}.zarr" for t in cfg["tasks"]]
        assert f"--fisher {' '.join(fishers)} " in command and "--basis" not in command
    assert (
        "output: results/tiny/eval/toyfisher/a0.5_f1.0.csv, results/tiny/eval/toyfisher/a1.0_f1.0.csv"
        in out
    )
    # The jobs' `python -m pipeline` reads the plugins from EPIMER_PLUGINS.
    res = subprocess.run(
        [sys.executable, "-m", "pipeline", "merge", "--help"],
        capture_output=True,
        text=True,
        env={**env, "EPIMER_PLUGINS": "toy_merge_plugin"},
        check=False,
    )
    assert res.returncode == 0 and "toyfisher" in res.stdout, res.stderr


def test_an_unknown_method_names_the_registered_ones(tmp_path):
    cfg = yaml.safe_load(TINY.read_text())
    cfg["merge"]["methods"] = ["ta", "tsvn"]
    res = snakemake(tmp_path, "-n", "--cores", "1", config=cfg, check=False)
    out = res.stdout + res.stderr
    assert res.returncode != 0
    assert "config merge.methods: 'tsvn' is not a registered merge method" in out
    assert "the registered methods are ta, ties, fisher, tsvm, epimer" in out
    assert not (tmp_path / "results").exists()


@pytest.mark.slow
def test_iso_and_gradient_matching_run_end_to_end_beside_the_others(finished_run, tmp_path):
    """Iso-C, Iso-CTS and gradient matching added to a finished run: exactly their sweeps are
    planned (one merge and one evaluation per sweep; gradient matching per Fisher fraction), the
    run completes, and the summary holds a row per setting with accuracies in [0, 1]."""
    run = _copy(finished_run, tmp_path)
    cfg = yaml.safe_load(TINY.read_text())
    cfg["merge"]["methods"] = [
        "ta",
        "ties",
        "fisher",
        "tsvm",
        "epimer",
        "isoc",
        "isocts",
        "gradmatch",
    ]
    assert planned_jobs(run, cfg) == {
        "merge_isoc": 1, "merge_isocts": 1, "merge_gradmatch": 2,
        "evaluate_isoc": 1, "evaluate_isocts": 1, "evaluate_gradmatch": 2,
        "report": 1, "tables": 1, "plots": 1, "all": 1,
    }  # fmt: skip
    snakemake(run, "--cores", "2", config=cfg)
    with open(run / "results" / "tiny" / "summary.csv", newline="") as fh:
        rows = {(r["method"], r["setting"]): r for r in csv.DictReader(fh)}
    expected = {("isoc", "a0.5"), ("isoc", "a1.0"), ("isocts", "a0.5"), ("isocts", "a1.0")}
    expected |= {("gradmatch", f"a{a}_f{f}") for a in ("0.5", "1.0") for f in ("0.25", "1.0")}
    assert expected <= set(rows)
    for key in expected:
        assert 0.0 <= float(rows[key]["average"]) <= 1.0, key
