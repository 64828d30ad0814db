"""Cluster submission: what each job asks Slurm for (dry-runs, no Slurm needed), and the tiny
workflow submitted through a real single-node Slurm (see conftest.py) with the artifacts
compared, byte for byte, against a local run of the same targets."""

from __future__ import annotations

import importlib.util
import re
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from pipeline.methods.registry import METHODS

REPO = Path(__file__).resolve().parents[2]
SLURM_PROFILE = REPO / "workflow" / "profiles" / "slurm"
LOCAL_PROFILE = REPO / "workflow" / "profiles" / "default"


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# The workflow tests' helpers: run Snakemake on the tiny config in a folder of its own.
workflow_tests = _load(REPO / "tests" / "workflow" / "test_workflow.py", "epimer_workflow_tests")
snakemake = workflow_tests.snakemake

GPU_KINDS = {"pretrain", "head", "finetune", "fisher", "evaluate"}
KIND_OF_RULE = {
    "pretrain": "pretrain",
    "head": "head",
    "finetune": "finetune",
    "fisher": "fisher",
    "evaluate_zeroshot": "evaluate",
    "evaluate_finetuned": "evaluate",
    **{f"evaluate_{m}": "evaluate" for m in METHODS},
    "basis": "basis",
    "hessian": "hessian",
    **{f"merge_{m}": "merge" for m in METHODS},
    "report": "report",
}


def tiny_config(**resources) -> dict:
    cfg = yaml.safe_load(workflow_tests.TINY.read_text())
    if resources:
        cfg["resources"] = resources
    return cfg


def distinct_resources() -> dict:
    """A resources section whose every value is distinct, so a job's numbers show which entry
    they came from; small enough for the test cluster's node."""
    kinds = [
        "pretrain",
        "head",
        "finetune",
        "fisher",
        "evaluate",
        "basis",
        "hessian",
        "merge",
        "report",
    ]
    return {
        kind: {
            "mem_mb": 1000 + 10 * i,
            "runtime": 20 + i,
            "cpus_per_task": 1,
            "gpu": int(kind in GPU_KINDS),
        }
        for i, kind in enumerate(kinds)
    }


def planned_resources(out: str) -> list[tuple[str, dict[str, str]]]:
    """(rule, {resource: value}) of every job a dry-run prints."""
    jobs = []
    for m in re.finditer(r"^rule (\w+):\n((?:    .*\n)+)", out, flags=re.M):
        line = re.search(r"^    resources: (.*)$", m.group(2), flags=re.M)
        # name=value pairs; a value may hold ", " itself (the JSON data settings of a knob).
        res = dict(re.findall(r"(\w+)=(.*?)(?=, \w+=|$)", line.group(1))) if line else {}
        jobs.append((m.group(1), res))
    return jobs


def test_each_job_asks_for_its_kinds_resources_and_only_gpu_steps_for_a_gpu(tmp_path):
    resources = distinct_resources()
    config = tiny_config(**resources)
    config["merge"]["methods"] = list(METHODS)  # every registered method's rules
    res = snakemake(tmp_path, "-n", "--workflow-profile", str(SLURM_PROFILE), config=config)
    jobs = planned_resources(res.stdout + res.stderr)
    seen = {rule for rule, _ in jobs}
    assert seen >= set(KIND_OF_RULE), f"rules not planned: {set(KIND_OF_RULE) - seen}"
    for rule, res in jobs:
        if (
            rule not in KIND_OF_RULE
        ):  # `all`, and steps added since (which should have resources too)
            continue
        spec = resources[KIND_OF_RULE[rule]]
        assert res["mem_mb"] == str(spec["mem_mb"]), (rule, res)
        assert res["runtime"] == str(spec["runtime"]), (rule, res)
        assert res["cpus_per_task"] == str(spec["cpus_per_task"]), (rule, res)
        if KIND_OF_RULE[rule] in GPU_KINDS:
            assert res.get("gpu") == "1", (rule, res)
        else:
            assert "gpu" not in res, (rule, res)  # a CPU job asks for no GPU at all


def test_a_retry_asks_for_more_memory_and_gpu_zero_makes_a_cpu_job(tmp_path):
    profile = yaml.safe_load((SLURM_PROFILE / "config.yaml").read_text())
    assert profile["executor"] == "slurm" and profile["retries"] >= 1
    resources = distinct_resources()
    resources["evaluate"]["gpu"] = 0  # evaluation on CPU nodes
    res = snakemake(
        tmp_path,
        "-n",
        "--workflow-profile",
        str(SLURM_PROFILE),
        "--attempt",
        "2",
        config=tiny_config(**resources),
    )
    jobs = [
        (rule, r) for rule, r in planned_resources(res.stdout + res.stderr) if rule in KIND_OF_RULE
    ]
    assert {rule for rule, _ in jobs} >= {"fisher", "evaluate_epimer", "merge_epimer"}
    for rule, r in jobs:
        spec = resources[KIND_OF_RULE[rule]]
        assert r["mem_mb"] == str(2 * spec["mem_mb"]), (rule, r)
        assert r["runtime"] == str(spec["runtime"]), (rule, r)
        if rule.startswith("evaluate"):
            assert "gpu" not in r, (rule, r)
        if rule == "fisher":
            assert r.get("gpu") == "1", (rule, r)


def test_resources_of_the_wrong_kind_fail_validation():
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    schema = str(REPO / "workflow" / "schemas" / "config.schema.yaml")
    cfg = tiny_config(fisher={"mem_mb": 2000})
    validate(cfg, schema, set_default=True)
    assert cfg["resources"]["fisher"] == {
        "mem_mb": 2000,
        "runtime": 240,
        "cpus_per_task": 8,
        "gpu": 1,
    }
    assert cfg["resources"]["merge"]["gpu"] == 0  # defaults filled in per kind
    for bad in (
        {"fisher": {"mem_mb": "lots"}},
        {"fisher": {"gpus": 1}},
        {"training": {}},
        {"merge": {"gpu": -1}},
    ):
        with pytest.raises(WorkflowError):
            validate(tiny_config(**bad), schema, set_default=True)


# --- the tiny workflow through a real Slurm ----------------------------------------------

# Two tasks of the tiny config keep the job count down; upstream (θ0, heads, fine-tuning) is
# trained once, locally, and copied: the Slurm run then submits GPU steps (fisher, evaluate)
# and CPU steps (basis, hessian, merge), which the local run of the same targets also makes.
TASKS = ["shapes", "colour"]
TARGETS = ["results/tiny/eval/epimer/k2_a1.0_f0.25.csv"]
SUBMITTED = {"fisher": 2, "basis": 1, "hessian": 1, "merge_epimer": 1, "evaluate_epimer": 1}


def artifact_files(root: Path) -> dict[str, bytes]:
    """relative path -> bytes of every artifact file under results/ (logs and hidden files aside)."""
    base = root / "results"
    files = {}
    for f in sorted(base.rglob("*")):
        rel = f.relative_to(base)
        if (
            f.is_file()
            and "logs" not in rel.parts
            and not any(p.startswith(".") for p in rel.parts)
        ):
            files[rel.as_posix()] = f.read_bytes()
    return files


def sacct_jobs(cluster, since: str) -> list[dict[str, str]]:
    fields = ["JobID", "Comment", "State", "ReqTRES", "AllocTRES", "Timelimit"]
    out = cluster.run(
        "sacct",
        "-X",
        "--parsable2",
        "--noheader",
        "--starttime",
        since,
        f"--format={','.join(fields)}",
    ).stdout
    return [dict(zip(fields, line.split("|"))) for line in out.splitlines() if line.strip()]


@pytest.mark.slow
def test_tiny_workflow_through_slurm_equals_a_local_run(slurm_cluster, tmp_path):
    resources = distinct_resources()
    cfg = tiny_config(**resources)
    cfg["tasks"] = TASKS
    local, remote = tmp_path / "local", tmp_path / "slurm"
    local.mkdir()
    upstream = [
        f"results/tiny/{d}/{t}.safetensors" for d in ("checkpoints", "heads") for t in TASKS
    ]
    snakemake(local, "--cores", "2", *upstream, config=cfg)
    shutil.copytree(local, remote, symlinks=True)  # copy2 keeps modification times

    since = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() - 60))
    slurm_args = [
        "--workflow-profile",
        str(SLURM_PROFILE),
        "--executor",
        "slurm",
        # test overrides: the test cluster's partition, quick status checks
        "--default-resources",
        f"slurm_partition={slurm_cluster.partition}",
        "--slurm-init-seconds-before-status-checks",
        "1",
        "--slurm-keep-successful-logs",
    ]
    # The Slurm run waits on the scheduler most of the time: run the local one meanwhile.
    with ThreadPoolExecutor(2) as pool:
        via_slurm = pool.submit(snakemake, remote, *slurm_args, *TARGETS, config=cfg)
        pool.submit(snakemake, local, "--cores", "2", *TARGETS, config=cfg).result()
        via_slurm.result()

    expected, got = artifact_files(local), artifact_files(remote)
    assert sorted(got) == sorted(expected)
    assert "tiny/eval/epimer/k2_a1.0_f0.25.csv" in got and any(
        p.startswith("tiny/merged/epimer/") for p in got
    )
    different = [p for p in expected if got[p] != expected[p]]
    assert not different, f"artifacts differ between the Slurm and the local run: {different}"

    jobs = sacct_jobs(slurm_cluster, since)
    counts: dict[str, int] = {}
    for job in jobs:
        rule = re.match(r"rule_(\w+?)(?:_wildcards_|$)", job["Comment"]).group(1)
        counts[rule] = counts.get(rule, 0) + 1
        spec = resources[KIND_OF_RULE[rule]]
        assert job["State"] == "COMPLETED", job
        tres = dict(item.split("=", 1) for item in job["ReqTRES"].split(","))
        assert tres["mem"] == f"{spec['mem_mb']}M" and tres["cpu"] == str(spec["cpus_per_task"]), (
            job
        )
        assert job["Timelimit"] == f"00:{spec['runtime']:02d}:00", job
        if spec["gpu"]:
            assert tres.get("gres/gpu") == "1" and "gres/gpu=1" in job["AllocTRES"], job
        else:
            assert "gres/gpu" not in tres, job
    assert counts == SUBMITTED
