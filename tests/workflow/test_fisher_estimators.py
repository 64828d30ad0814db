"""config fisher.estimator through Snakemake dry runs: each consumer (Fisher averaging, EpiMer's
hessian and merge stages) reads the Fisher artifacts of its own estimator, one artifact per
(estimator, task, fraction), and switching one consumer's estimator re-runs only that consumer.

The "finished run" here is the tiny workflow's outputs created empty and marked up to date by
`snakemake --touch --forceall` (which records Snakemake's provenance as a real run does), so
these are dry runs only: no job of the workflow runs.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tests.data.layouts import write_task_vectors_tree
from tests.workflow.test_paper_configs import release_files
from tests.workflow.test_workflow import REPO, TINY, planned_jobs, snakemake

ESTIMATORS = ["per_sample", "batch", "first_moment", "first_moment_ema"]


def tiny(estimator) -> dict:
    cfg = yaml.safe_load(TINY.read_text())
    cfg["fisher"]["estimator"] = estimator
    return cfg


def planned(workdir: Path, config: dict) -> dict[str, list[tuple[list[str], list[str]]]]:
    """rule → [(inputs, outputs)] of every job a dry run schedules."""
    res = snakemake(workdir, "-n", "--cores", "1", config=config)
    jobs: dict[str, list[tuple[list[str], list[str]]]] = {}
    for block in re.split(r"^(?:localrule|rule) ", res.stdout, flags=re.M)[1:]:
        rule = block.split(":", 1)[0]
        fields = dict(re.findall(r"^\s+(input|output): (.*)$", block, flags=re.M))
        split = lambda s: [p.strip() for p in s.split(",") if p.strip()]  # noqa: E731
        jobs.setdefault(rule, []).append(
            (split(fields.get("input", "")), split(fields.get("output", "")))
        )
    return jobs


def fisher_artifacts(paths: list[str]) -> set[tuple[str, str, str]]:
    """(estimator, task, fraction) of every Fisher artifact among ``paths``."""
    found = set()
    for p in paths:
        m = re.search(r"/fisher/(\w+)/(\w+)/f([\d.]+)\.zarr$", p)
        if m:
            found.add(m.groups())
    return found


def finished(workdir: Path, config: dict) -> Path:
    """The workflow's outputs for ``config`` in ``workdir``, up to date as after a real run."""
    for _, outputs in (job for jobs in planned(workdir, config).values() for job in jobs):
        for out in outputs:
            path = workdir / out
            if out.endswith(".zarr"):  # directory outputs
                path.mkdir(parents=True, exist_ok=True)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()
    snakemake(workdir, "--touch", "--forceall", "--cores", "1", config=config)
    assert planned_jobs(workdir, config) == {}
    return workdir


PAPER_MAPPING = {"fisher": "first_moment", "epimer": "per_sample"}


def test_two_estimators_give_two_fisher_artifacts_per_task_and_fraction(tmp_path):
    cfg = tiny(PAPER_MAPPING)
    tasks, fractions = cfg["tasks"], [str(float(f)) for f in cfg["fisher"]["fractions"]]
    jobs = planned(tmp_path, cfg)
    made = set()
    for _, outputs in jobs["fisher"]:
        made |= fisher_artifacts(outputs)
    assert len(jobs["fisher"]) == len(made) == 2 * len(tasks) * len(fractions)
    assert made == {
        (e, t, f) for e in ("first_moment", "per_sample") for t in tasks for f in fractions
    }
    # Each consumer reads its own estimator's artifacts, every task at its own fraction.
    for rule, estimator in (
        ("merge_fisher", "first_moment"),
        ("hessian", "per_sample"),
        ("merge_epimer", "per_sample"),
    ):
        for inputs, outputs in jobs[rule]:
            fraction = re.search(r"f([\d.]+)\.zarr$", outputs[0]).group(1)
            assert fisher_artifacts(inputs) == {(estimator, t, fraction) for t in tasks}, (
                rule,
                outputs,
            )
    # The job passes its estimator to the CLI and logs apart from the other estimators.
    res = snakemake(tmp_path, "-n", "-p", "--cores", "1", config=cfg)
    assert re.search(
        r"--estimator first_moment --fraction 0\.25 .*--out results/tiny/fisher/first_moment/colour/f0\.25\.zarr",
        res.stdout,
    )
    assert "2> results/tiny/logs/fisher/per_sample/colour_f0.25.log" in res.stdout


@pytest.mark.parametrize("estimator", [*ESTIMATORS, {"fisher": "batch", "epimer": "batch"}])
def test_one_estimator_for_both_consumers_is_one_artifact_per_task_and_fraction(
    tmp_path, estimator
):
    cfg = tiny(estimator)
    name = estimator if isinstance(estimator, str) else "batch"
    jobs = planned(tmp_path, cfg)
    made = set().union(*(fisher_artifacts(o) for _, o in jobs["fisher"]))
    assert len(jobs["fisher"]) == len(made) == len(cfg["tasks"]) * len(cfg["fisher"]["fractions"])
    assert {e for e, _, _ in made} == {name}


def test_default_and_a_partial_mapping_read_per_sample(tmp_path):
    cfg = yaml.safe_load(TINY.read_text())
    jobs = planned(tmp_path, cfg)
    assert {e for _, o in jobs["fisher"] for e, _, _ in fisher_artifacts(o)} == {"per_sample"}
    jobs = planned(tmp_path, tiny({"fisher": "first_moment_ema"}))
    assert {e for i, _ in jobs["hessian"] for e, _, _ in fisher_artifacts(i)} == {"per_sample"}
    assert {e for i, _ in jobs["merge_fisher"] for e, _, _ in fisher_artifacts(i)} == {
        "first_moment_ema"
    }


def test_switching_fisher_averagings_estimator_reruns_only_fisher_averaging(tmp_path):
    run = finished(tmp_path, tiny(PAPER_MAPPING))
    cfg = tiny({"fisher": "batch", "epimer": "per_sample"})
    T, F = len(cfg["tasks"]), len(cfg["fisher"]["fractions"])
    assert planned_jobs(run, cfg) == {
        "fisher": T * F,  # the batch estimator's artifacts; per_sample's stay
        "merge_fisher": F,
        "evaluate_fisher": F,
        "report": 1, "tables": 1, "plots": 1, "all": 1,  # the summary changed
    }  # fmt: skip


def test_switching_epimers_estimator_reruns_only_the_hessians_and_epimer(tmp_path):
    run = finished(tmp_path, tiny(PAPER_MAPPING))
    cfg = tiny({"fisher": "first_moment", "epimer": "first_moment_ema"})
    T, F = len(cfg["tasks"]), len(cfg["fisher"]["fractions"])
    K = len(cfg["merge"]["k"])
    assert planned_jobs(run, cfg) == {
        "fisher": T * F,
        "hessian": K * F,  # bases, Fisher averaging, TA, TIES and TSV-M untouched
        "merge_epimer": K * F,  # one α sweep per (k, fraction)
        "evaluate_epimer": K * F,
        "report": 1, "tables": 1, "plots": 1, "all": 1,
    }  # fmt: skip
    # Going back to the estimator the run was made with schedules nothing.
    assert planned_jobs(run, tiny(PAPER_MAPPING)) == {}


def test_a_single_name_equal_to_a_mapping_changes_nothing(tmp_path):
    run = finished(tmp_path, tiny({"fisher": "batch", "epimer": "batch"}))
    assert planned_jobs(run, tiny("batch")) == {}


@pytest.mark.parametrize(
    "estimator",
    ["adam", {"fisher": "adam"}, {"tsvm": "per_sample"}, {}, ["per_sample"]],
)
def test_bad_estimator_fails_validation_before_any_job(tmp_path, estimator):
    res = snakemake(tmp_path, "-n", "--cores", "1", config=tiny(estimator), check=False)
    assert res.returncode != 0
    assert "ValidationError" in res.stdout + res.stderr
    assert "estimator" in res.stdout + res.stderr
    assert not (tmp_path / "results").exists()


def test_workflow_schema_and_library_name_the_same_estimators():
    from pipeline.fisher import ESTIMATORS as LIBRARY

    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    choices = schema["properties"]["fisher"]["properties"]["estimator"]["oneOf"]
    assert choices[0]["enum"] == list(LIBRARY) == ESTIMATORS
    assert (
        choices[1]["properties"]["fisher"]["enum"]
        == choices[1]["properties"]["epimer"]["enum"]
        == ESTIMATORS
    )
    common = (REPO / "workflow" / "rules" / "common.smk").read_text()
    assert re.search(r"FISHER_ESTIMATORS = \(([^)]*)\)", common).group(1) == ", ".join(
        f'"{e}"' for e in ESTIMATORS
    )


@pytest.mark.parametrize(
    "name,backbone", [("vit-b-32", "ViT-B-32"), ("vit-b-16", "ViT-B-16"), ("vit-l-14", "ViT-L-14")]
)
def test_paper_configs_run_fisher_averaging_on_first_moment_and_epimer_on_per_sample(
    tmp_path, name, backbone
):
    config = yaml.safe_load((REPO / "config" / f"{name}.yaml").read_text())
    assert config["fisher"]["estimator"] == PAPER_MAPPING
    release_files(tmp_path, backbone)
    data = tmp_path / "data"
    write_task_vectors_tree(data)
    config["data"]["root"] = str(data)
    jobs = planned(tmp_path, config)
    T, F = len(config["tasks"]), len(config["fisher"]["fractions"])
    assert len(jobs["fisher"]) == 2 * T * F
    assert {e for i, _ in jobs["merge_fisher"] for e, _, _ in fisher_artifacts(i)} == {
        "first_moment"
    }
    assert {e for i, _ in jobs["hessian"] for e, _, _ in fisher_artifacts(i)} == {"per_sample"}
    assert {e for i, _ in jobs["merge_epimer"] for e, _, _ in fisher_artifacts(i)} == {"per_sample"}


def test_a_fisher_job_runs_with_its_estimator(tmp_path):
    """One real job through Snakemake: the artifact of the switched-to estimator, with that
    estimator in its provenance (θ_t and the head are demo files; nothing upstream re-runs)."""
    import torch
    import zarr

    from pipeline.data import num_classes
    from pipeline.models.clip import build_encoder
    from pipeline.store import write_safetensors

    run = finished(tmp_path, tiny(PAPER_MAPPING))
    root = run / "results" / "tiny"
    g = torch.Generator().manual_seed(0)
    C = num_classes({"source": "synthetic"}, "shapes")
    # The head first: it is an input of fine-tuning, whose output must stay the newer file.
    write_safetensors(
        root / "heads" / "shapes.safetensors",
        {"weight": 10 * torch.randn(C, 64, generator=g), "bias": torch.zeros(C)},
    )
    write_safetensors(
        root / "checkpoints" / "shapes.safetensors", build_encoder("demo").state_dict()
    )
    cfg = tiny({"fisher": "batch", "epimer": "per_sample"})
    target = "results/tiny/fisher/batch/shapes/f0.25.zarr"
    plan = snakemake(run, "-n", "--cores", "1", target, config=cfg)
    assert re.findall(r"^rule (\w+):", plan.stdout, flags=re.M) == ["fisher"]
    snakemake(run, "--cores", "1", target, config=cfg)
    group = zarr.open_group(str(run / target), mode="r")
    assert group.attrs["artifact"] == "fisher"
    assert (
        group.attrs["parameters"]["estimator"] == "batch"
        and group.attrs["parameters"]["fraction"] == 0.25
    )
    assert sorted(group.array_keys()) == sorted(build_encoder("demo").state_dict())
    assert all((group[k][...] >= 0).all() for k in group.array_keys())
