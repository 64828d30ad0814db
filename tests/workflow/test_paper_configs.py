"""The paper configs plan the paper's whole grid; the smoke config plans every stage.

Dry-runs only: the fine-tuned checkpoints are placeholder files where the config's path
pattern points, and the data root is a folder of tiny generated task folders (dry-runs read
neither; they prove the patterns resolve and the grid is complete).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.data.classnames import (
    BENCHMARK_14,
    BENCHMARK_20,
    BENCHMARK_DATASETS,
    TASK_VECTORS_DATASETS,
)
from tests.data.layouts import write_task_vectors_tree
from tests.data.layouts_benchmark import write_benchmark_tree
from tests.workflow.test_workflow import REPO, planned_jobs

TASK_DIRS = ["Cars", "DTD", "EuroSAT", "GTSRB", "MNIST", "RESISC45", "SUN397", "SVHN"]


def release_files(root: Path, backbone: str, heads: bool = True, finetuned: bool = True) -> None:
    """Placeholders where the paper configs' patterns point: {Dataset}/finetuned.pt, head_{Dataset}.pt."""
    for d in TASK_DIRS:
        folder = root / "checkpoints" / backbone / d
        folder.mkdir(parents=True, exist_ok=True)
        if finetuned:
            (folder / "finetuned.pt").write_bytes(b"placeholder")
        if heads:
            (root / "checkpoints" / backbone / f"head_{d}.pt").write_bytes(b"placeholder")


@pytest.mark.parametrize(
    "name,backbone", [("vit-b-32", "ViT-B-32"), ("vit-b-16", "ViT-B-16"), ("vit-l-14", "ViT-L-14")]
)
def test_paper_config_plans_the_full_grid(tmp_path, name, backbone):
    config = yaml.safe_load((REPO / "config" / f"{name}.yaml").read_text())
    assert config["backbone"] == backbone
    release_files(tmp_path, backbone)
    data = tmp_path / "data"
    write_task_vectors_tree(data)
    assert config["data"]["layout"] == "task_vectors"
    config["data"]["root"] = str(data)

    counts = planned_jobs(tmp_path, config)
    T, F, K = 8, 7, 3  # tasks, Fisher fractions, k values (paper grid)
    assert counts["import_pretrained"] == 1 and counts["import_finetuned"] == T
    assert counts["import_head"] == T
    assert counts["fisher"] == 2 * T * F  # first_moment for Fisher averaging, per_sample for EpiMer
    assert counts["basis"] == K and counts["hessian"] == K * F
    # One merge and one evaluation job per α sweep: TA and TIES over their α lists in one each.
    for method, sweeps in {"ta": 1, "ties": 1, "fisher": F, "tsvm": K, "epimer": K * F}.items():
        assert counts[f"merge_{method}"] == counts[f"evaluate_{method}"] == sweeps, method
    assert counts["evaluate_finetuned"] == T and counts["evaluate_zeroshot"] == 1
    assert not any(k in counts for k in ("pretrain", "finetune", "head"))


@pytest.fixture(scope="module")
def benchmark_data(tmp_path_factory) -> Path:
    """One data location holding all twenty tasks in their readers' layouts."""
    root = tmp_path_factory.mktemp("data20")
    write_task_vectors_tree(root)
    write_benchmark_tree(root)
    return root


def tall_masks_files(root: Path, backbone: str, tasks: list[str]) -> None:
    """Placeholders in the tall-masks release's layout: <model>/<Dataset>Val/nonlinear_finetuned.pt
    and <model>/head_<Dataset>Val.pt."""
    dataset = {**TASK_VECTORS_DATASETS, **BENCHMARK_DATASETS}
    for task in tasks:
        folder = root / "checkpoints" / backbone / f"{dataset[task]}Val"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "nonlinear_finetuned.pt").write_bytes(b"placeholder")
        head = root / "checkpoints" / backbone / f"head_{dataset[task]}Val.pt"
        head.write_bytes(b"placeholder")


@pytest.mark.parametrize("backbone", ["ViT-B-32", "ViT-B-16", "ViT-L-14"])
@pytest.mark.parametrize("T,tasks", [(14, BENCHMARK_14), (20, BENCHMARK_20)])
def test_benchmark_configs_plan_the_full_grid(tmp_path, benchmark_data, backbone, T, tasks):
    name = f"{backbone.lower()}-{T}"
    config = yaml.safe_load((REPO / "config" / f"{name}.yaml").read_text())
    assert config["backbone"] == backbone and config["name"] == name
    assert config["tasks"] == list(tasks)  # the tall-masks code's ALL_DATASETS[:T], in order
    tall_masks_files(tmp_path, backbone, config["tasks"])
    assert config["data"]["layout"] == "task_vectors"
    config["data"]["root"] = str(benchmark_data)

    counts = planned_jobs(tmp_path, config)
    F, K = 7, 3  # Fisher fractions and k values (the eight-task configs' grid)
    assert counts["import_pretrained"] == 1 and counts["import_finetuned"] == T
    assert counts["import_head"] == T
    assert counts["fisher"] == 2 * T * F  # first_moment for Fisher averaging, per_sample for EpiMer
    assert counts["basis"] == K and counts["hessian"] == K * F
    # One merge job and one evaluation job per α sweep: per k for TSV-M, per (k, f) for EpiMer.
    sweeps = {"ta": 1, "ties": 1, "fisher": F, "tsvm": K, "epimer": K * F}
    for method, n in sweeps.items():
        assert counts[f"merge_{method}"] == n and counts[f"evaluate_{method}"] == n, method
    assert counts["evaluate_finetuned"] == T and counts["evaluate_zeroshot"] == 1


def test_benchmark_config_names_a_missing_checkpoint(tmp_path, benchmark_data):
    config = yaml.safe_load((REPO / "config" / "vit-b-32-20.yaml").read_text())
    from tests.workflow.test_workflow import snakemake

    tall_masks_files(tmp_path, "ViT-B-32", config["tasks"])
    (tmp_path / "checkpoints/ViT-B-32/KMNISTVal/nonlinear_finetuned.pt").unlink()
    config["data"]["root"] = str(benchmark_data)
    res = snakemake(tmp_path, "-n", "--cores", "1", config=config, check=False)
    assert res.returncode != 0
    assert "checkpoints/ViT-B-32/KMNISTVal/nonlinear_finetuned.pt" in res.stdout + res.stderr


def test_benchmark_config_names_missing_heads(tmp_path, benchmark_data):
    config = yaml.safe_load((REPO / "config" / "vit-b-16-14.yaml").read_text())
    from tests.workflow.test_workflow import snakemake

    tall_masks_files(tmp_path, "ViT-B-16", config["tasks"])
    (tmp_path / "checkpoints/ViT-B-16/head_FER2013Val.pt").unlink()
    config["data"]["root"] = str(benchmark_data)
    res = snakemake(tmp_path, "-n", "--cores", "1", config=config, check=False)
    out = res.stdout + res.stderr
    assert res.returncode != 0
    assert (
        out.split("are missing: ")[1].split(". Put")[0] == "checkpoints/ViT-B-16/head_FER2013Val.pt"
    )
    assert "head_<Dataset>Val.pt" in out


def test_missing_imported_checkpoint_is_named(tmp_path):
    config = yaml.safe_load((REPO / "config" / "vit-b-32.yaml").read_text())
    from tests.workflow.test_workflow import snakemake

    release_files(tmp_path, "ViT-B-32", finetuned=False)
    res = snakemake(tmp_path, "-n", "--cores", "1", config=config, check=False)
    assert res.returncode != 0
    assert "checkpoints/ViT-B-32/Cars/finetuned.pt" in res.stdout + res.stderr


def test_missing_imported_heads_are_named(tmp_path):
    """heads.source import: every missing head_<Dataset>.pt is named, with both ways out."""
    config = yaml.safe_load((REPO / "config" / "vit-b-32.yaml").read_text())
    from tests.workflow.test_workflow import snakemake

    release_files(tmp_path, "ViT-B-32", heads=False)
    (tmp_path / "checkpoints/ViT-B-32/head_DTD.pt").write_bytes(b"placeholder")
    res = snakemake(tmp_path, "-n", "--cores", "1", config=config, check=False)
    out = res.stdout + res.stderr
    assert res.returncode != 0
    missing = out.split("are missing: ")[1].split(". Put")[0].split(", ")
    assert len(missing) == 7 and "checkpoints/ViT-B-32/head_SVHN.pt" in missing
    assert "checkpoints/ViT-B-32/head_DTD.pt" not in missing
    assert "heads.source: zeroshot" in out


def test_smoke_config_plans_every_stage(tmp_path):
    config = yaml.safe_load((REPO / "config" / "smoke-vit-b-32.yaml").read_text())
    counts = planned_jobs(tmp_path, config)
    T = len(config["tasks"])
    assert (
        counts["smoke_pretrained"] == 1
        and counts["smoke_finetuned"] == T
        and counts["smoke_head"] == T
    )
    assert counts["fisher"] == T and counts["basis"] == 1 and counts["hessian"] == 1
    assert counts["merge_ta"] == counts["merge_ties"] == 1 and counts["merge_fisher"] == 1
    assert counts["merge_tsvm"] == 1 and counts["merge_epimer"] == 1
