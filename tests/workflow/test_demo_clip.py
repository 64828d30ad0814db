"""The default demo (config/config.yaml), in a CLIP-like regime: its plan, and the stages it
adds to the demo recipe (the shipped θ0, zero-shot heads as rows of θ0's prototypes)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.cli import main
from pipeline.data.synthetic import CLIP_TASKS, attribute_class_counts, zeroshot_rows
from pipeline.models.clip import build_encoder
from pipeline.store import load_tensors, write_safetensors
from pipeline.train import zeroshot_head

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "config" / "config.yaml"


def _dry_run(workdir: Path, *extra: str) -> subprocess.CompletedProcess:
    """`snakemake -n` of the repository's Snakefile in `workdir`, with `extra` options."""
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile")]
    cmd += ["--directory", str(workdir), *extra, "-n"]
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


def test_demo_config_plans_six_tasks_on_the_shipped_theta0_with_zero_shot_heads(
    tmp_path: Path,
) -> None:
    res = _dry_run(tmp_path, "--cores", "2", "-p")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout + res.stderr
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", out.split("Job stats:")[1], flags=re.M))
    assert counts["pretrain"] == "1" and counts["head"] == "6" and counts["finetune"] == "6"
    # Three k and six α: TSV-M and EpiMer sweep 18 settings each (one fraction), one job per k.
    assert counts["merge_tsvm"] == "3" and counts["merge_epimer"] == "3"
    assert "pipeline pretrain --shipped --out" in out  # no pretraining at demo time
    assert "--backbone demo-96" in out and '"zeroshot": true' in out
    assert '"max_grad_norm": 1.0' in out  # fine-tuning clips its gradients
    assert "--heads-source zeroshot" in out  # the tables name θ0's heads as zero-shot heads
    config = yaml.safe_load(CONFIG.read_text())
    assert tuple(config["tasks"]) == CLIP_TASKS
    assert 0.125 in config["merge"]["alpha"] and config["data"]["test_size"] >= 2000


def test_shipped_theta0_needs_its_backbone(tmp_path: Path) -> None:
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({"backbone": "demo"}))
    res = _dry_run(tmp_path, "--configfile", str(tmp_path / "run.yaml"), "--cores", "1")
    assert res.returncode != 0
    assert "set `backbone: demo-96` or `pretrain: {source: train}`" in res.stdout + res.stderr


def test_head_stage_writes_the_rows_of_the_pretraining_prototypes(tmp_path: Path) -> None:
    theta0 = tmp_path / "theta0.safetensors"
    write_safetensors(theta0, build_encoder("demo-96").state_dict(), {"stage": "test"})
    data = json.dumps({"source": "synthetic", "train_size": 16, "test_size": 16})
    for task in ("digits", "hue_pastel"):
        out = tmp_path / f"{task}.safetensors"
        code = main(
            [
                "head",
                "--task",
                task,
                "--pretrained",
                str(theta0),
                "--backbone",
                "demo-96",
                "--data",
                data,
                "--train",
                json.dumps({"zeroshot": True, "steps": 300, "lr": 0.05, "seed": 0}),
                "--out",
                str(out),
                "--quiet",
            ]
        )
        assert code == 0
        head = load_tensors(out)
        attribute, rows = zeroshot_rows(task)
        weight, bias = zeroshot_head(attribute_class_counts(), attribute, rows, 96)
        assert torch.equal(head["weight"], weight) and torch.equal(head["bias"], bias)
    # digits and glyphs_cluttered share θ0's digit rows: the same zero-shot head.
    assert zeroshot_rows("digits") == zeroshot_rows("glyphs_cluttered")


def test_zeroshot_head_for_a_task_without_rows_fails_with_one_line(tmp_path: Path, capsys) -> None:
    theta0 = tmp_path / "theta0.safetensors"
    write_safetensors(theta0, build_encoder("demo-96").state_dict(), {"stage": "test"})
    code = main(
        [
            "head",
            "--task",
            "shapes",
            "--pretrained",
            str(theta0),
            "--backbone",
            "demo-96",
            "--data",
            json.dumps({"source": "synthetic"}),
            "--train",
            json.dumps({"zeroshot": True}),
            "--out",
            str(tmp_path / "h.safetensors"),
        ]
    )
    assert code == 2
    assert "shapes_textured" in capsys.readouterr().err


@pytest.mark.slow
def test_pretrain_stage_trains_on_every_attribute(tmp_path: Path) -> None:
    out = tmp_path / "theta0.safetensors"
    data = json.dumps({"source": "synthetic"})
    settings = {"task": "attributes", "train_size": 256, "epochs": 1, "lr": 0.002}
    settings |= {"batch_size": 128, "seed": 0, "max_grad_norm": 1.0}
    argv = ["pretrain", "--backbone", "demo-96", "--data", data, "--train", json.dumps(settings)]
    assert main([*argv, "--out", str(out), "--quiet"]) == 0
    state = load_tensors(out)
    initial = build_encoder("demo-96").state_dict()
    assert state.keys() == initial.keys()
    assert not torch.equal(state["proj"], initial["proj"])
