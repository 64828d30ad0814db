"""The fine-tuning noise study (pipeline/noise.py, workflow/rules/noise.smk, docs/noise.md): the
effective noise scale against its sources, the grid, the augmentation, the choice rule on
hand-made evaluations, and the study on the tiny test config through Snakemake."""

from __future__ import annotations

import copy
import csv
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from pipeline import noise
from pipeline.train import _warmup_cosine
from tests.workflow.test_workflow import TINY, planned_jobs, snakemake

# --------------------------------------------------------------------------- the noise scale


def test_without_weight_decay_the_scale_is_the_sde_temperature():
    # AdamW: η/√B (square-root rule); SGD: η/B (linear rule).
    assert noise.effective_noise_scale(1e-3, 64) == pytest.approx(1e-3 / 8, rel=1e-15)
    assert noise.effective_noise_scale(1e-3, 64, batch_exponent=1.0) == pytest.approx(
        1e-3 / 64, rel=1e-15
    )
    assert noise.effective_noise_scale(1e-3, 64, 0.0, 500.0) == noise.effective_noise_scale(
        1e-3, 64
    )
    assert noise.effective_noise_scale(1e-3, 64, 0.1, 0.0) == noise.effective_noise_scale(1e-3, 64)


@pytest.mark.parametrize("k", [2, 4, 16])
def test_the_scaling_rules_keep_the_scale(k):
    # The SDE scaling rules: B → kB with η → kη (SGD) or η → √k η (Adam) is the same dynamics.
    sgd = noise.effective_noise_scale(1e-3, 32, batch_exponent=noise.SGD_BATCH_EXPONENT)
    assert noise.effective_noise_scale(k * 1e-3, 32 * k, batch_exponent=1.0) == pytest.approx(
        sgd, rel=1e-12
    )
    adam = noise.effective_noise_scale(1e-3, 32)
    assert noise.effective_noise_scale(math.sqrt(k) * 1e-3, 32 * k) == pytest.approx(
        adam, rel=1e-12
    )


def test_the_scale_moves_as_the_paper_finds_noise_does():
    # arXiv 2510.04686: larger learning rates, stronger weight decay, smaller batches raise it.
    base = noise.effective_noise_scale(5e-4, 64, 0.1, 200.0)
    assert noise.effective_noise_scale(1e-3, 64, 0.1, 200.0) > base
    assert noise.effective_noise_scale(5e-4, 64, 1.0, 200.0) > base
    assert noise.effective_noise_scale(5e-4, 32, 0.1, 200.0) > base


def test_the_weight_decay_term_is_the_inverse_shrinkage_of_decoupled_decay():
    # AdamW multiplies every weight by (1 − η s_t λ) per step; float64 product over the schedule.
    lr, wd, n, batch, epochs = 2e-3, 0.5, 1000, 32, 3
    tau = noise.schedule_steps(n, batch, epochs)
    total = epochs * math.ceil(n / batch)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    lam = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _warmup_cosine(total, max(1, round(0.1 * total)))
    )
    log_shrink, second_order = 0.0, 0.0
    for _ in range(total):
        x = lr * lam.get_last_lr()[0] * wd  # η s_t λ, the decay of this step
        log_shrink += math.log1p(-x)
        second_order += x * x
        optimizer.step()
        lam.step()
    # exp(η λ τ) = 1 / Π (1 − η s_t λ) up to |log(1 − x) + x| ≤ x² per step.
    got = math.log(noise.effective_noise_scale(lr, batch, wd, tau) * math.sqrt(batch) / lr)
    assert abs(got + log_shrink) <= second_order
    assert abs(got + log_shrink) > 0  # the bound is not vacuous: the terms differ


def test_schedule_steps_is_the_sum_of_the_finetuning_schedule():
    # 10 steps, 1 of warmup: multipliers 1, then cosine from 1 down over the other 9.
    expected = 1.0 + sum(0.5 * (1 + math.cos(math.pi * i / 9)) for i in range(9))
    assert noise.schedule_steps(100, 10, 1) == pytest.approx(expected, rel=1e-12)
    assert noise.schedule_steps(101, 10, 1) > noise.schedule_steps(100, 10, 1)  # 11 steps


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((0.0, 64), "learning rate"),
        ((float("nan"), 64), "learning rate"),
        ((1e-3, 0), "batch size"),
        ((1e-3, 64, -0.1, 10.0), "weight decay"),
    ],
)
def test_bad_settings_are_rejected(args, message):
    with pytest.raises(ValueError, match=message):
        noise.effective_noise_scale(*args)


# --------------------------------------------------------------------------- the grid


FINETUNE = {"epochs": 2, "lr": 3e-4, "batch_size": 64, "weight_decay": 0.1, "seed": 0}


def test_cells_inherit_the_finetune_settings_and_spell_their_own():
    cells = noise.expand_cells([{"lr": 1e-3}, {"batch_size": 32, "augment": True}], FINETUNE)
    assert list(cells) == ["lr0.001_b64_wd0.1_aug0", "lr0.0003_b32_wd0.1_aug1"]
    assert cells["lr0.001_b64_wd0.1_aug0"] == {**FINETUNE, "lr": 1e-3, "augment": False}
    assert cells["lr0.0003_b32_wd0.1_aug1"]["epochs"] == 2


def test_repeated_or_unknown_cells_are_rejected():
    with pytest.raises(ValueError, match=r"cells\[1\] repeats"):
        noise.expand_cells([{"lr": 3e-4}, {}], FINETUNE)  # the second is the config's settings
    with pytest.raises(ValueError, match=r"cells\[0\]: unknown setting\(s\) epochs"):
        noise.expand_cells([{"epochs": 3}], FINETUNE)


# --------------------------------------------------------------------------- augmentation


def test_random_shift_moves_each_image_by_one_offset_within_range():
    images = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    out = noise.random_shift(images, 2, torch.Generator().manual_seed(0))
    assert out.shape == images.shape
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2), mode="replicate")
    for i in range(5):
        crops = [padded[i, :, dy : dy + 8, dx : dx + 8] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(out[i], c) for c in crops)
    assert torch.equal(noise.random_shift(images, 0, torch.Generator()), images)
    again = noise.random_shift(images, 2, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_augmentation_acts_in_training_only_and_leaves_the_state_dict():
    seen = []
    encoder = torch.nn.Flatten()
    encoder.register_forward_hook(lambda m, args, out: seen.append(args[0].clone()))
    keys = list(encoder.state_dict())
    noise.augment_in_training(encoder, seed=0)
    images = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).reshape(2, 3, 6, 6)
    encoder.eval()
    encoder(images)
    assert torch.equal(seen[-1], images)
    trained = copy.deepcopy(encoder)  # pipeline.train.finetune trains a copy
    trained.train()
    trained(images)
    assert not torch.equal(seen[-1], images) and seen[-1].shape == images.shape
    assert list(trained.state_dict()) == keys


# --------------------------------------------------------------------------- the choice


def _write_eval(path: Path, rows: dict[tuple[str, str], float]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["task", "split", "accuracy", "n"])
        for (task, split), acc in rows.items():
            writer.writerow([task, split, acc, 100])


def _study(root: Path, accuracies: dict[str, dict[str, dict[str, float]]]) -> dict[str, dict]:
    """Hand-made evaluations: cell → run (finetuned, ta/a0.5, ...) → split → accuracy, the
    same for both tasks."""
    cells = {}
    for i, (name, runs) in enumerate(accuracies.items()):
        cells[name] = {**FINETUNE, "lr": 1e-4 * (i + 1), "augment": False}
        for task in ("a", "b"):
            _write_eval(
                root / name / "eval" / "finetuned" / f"{task}.csv",
                {(task, sp): runs["finetuned"][sp] for sp in ("test", "val")},
            )
        for run, acc in runs.items():
            if run != "finetuned":
                _write_eval(
                    root / name / "eval" / f"{run}.csv",
                    {(t, sp): acc[sp] for t in ("a", "b") for sp in ("test", "val")},
                )
    return cells


def _one_alpha_study(root: Path, cells: dict[str, tuple[float, float, float]]) -> list:
    """cell → (fine-tuned, TA, TSV-M) accuracy, the same on both splits, one α each: the
    study's results."""
    same = lambda acc: {"test": acc, "val": acc}  # noqa: E731
    spec = {
        name: {"finetuned": same(ft), "ta/a0.5": same(ta), "tsvm/k2_a0.5": same(tsvm)}
        for name, (ft, ta, tsvm) in cells.items()
    }
    return noise.study_results(
        root,
        _study(root, spec),
        ["a", "b"],
        {"ta": ["0.5"], "tsvm": ["0.5"]},
        2,
        {"a": 100, "b": 300},
    )


def test_the_choice_does_not_reward_weak_finetuning(tmp_path):
    # weak: fine-tunes to 0.5 and its merges keep 90 % of that (0.45); strong: fine-tunes to 0.9
    # and its merges keep 70 % (0.63). Normalised accuracy prefers `weak`, the rule `strong`.
    results = _one_alpha_study(tmp_path, {"weak": (0.5, 0.45, 0.45), "strong": (0.9, 0.63, 0.63)})
    by = {r.name: r for r in results}
    assert by["weak"].normalised["ta"]["val"] > by["strong"].normalised["ta"]["val"]
    assert by["strong"].score() == pytest.approx(0.63)
    assert noise.choose_cell(results).name == "strong"
    assert noise.choose_cell(results, min_finetuned=0.0).name == "strong"  # the score alone


def test_the_choice_needs_good_experts(tmp_path):
    # under: its merges are the most accurate, but its fine-tuned models reach only 0.85 on
    # validation; trained: fine-tuned to 0.93, merges a little less accurate.
    results = _one_alpha_study(
        tmp_path, {"under": (0.85, 0.74, 0.76), "trained": (0.93, 0.71, 0.73)}
    )
    assert noise.DEFAULT_MIN_FINETUNED == 0.9
    assert [r.name for r in noise.eligible(results, 0.9)] == ["trained"]
    assert noise.choose_cell(results).name == "trained"
    assert noise.choose_cell(results, min_finetuned=0.8).name == "under"
    # No cell reaches the bar: every cell is a candidate again.
    assert noise.choose_cell(results, min_finetuned=0.95).name == "under"
    table = noise.study_table(results)
    columns = list(table.columns)
    chosen = [row for row in table.rows if row[-1].value == "✓"]
    assert [row[0].value for row in chosen] == ["trained"]
    assert chosen[0][columns.index("fine-tuned val")].value == pytest.approx(0.93)
    assert "at least 0.9 " in table.note


def test_the_choice_reads_validation_only(tmp_path):
    ft = {"test": 0.8, "val": 0.8}
    cells = _study(
        tmp_path,
        {
            # x: best on test, worse on validation; y: better on validation.
            "x": {
                "finetuned": ft,
                "ta/a0.5": {"test": 0.76, "val": 0.50},
                "ta/a1.0": {"test": 0.70, "val": 0.40},
                "tsvm/k2_a0.5": {"test": 0.78, "val": 0.50},
                "tsvm/k2_a1.0": {"test": 0.40, "val": 0.40},
            },
            "y": {
                "finetuned": ft,
                "ta/a0.5": {"test": 0.40, "val": 0.60},
                "ta/a1.0": {"test": 0.50, "val": 0.64},
                "tsvm/k2_a0.5": {"test": 0.50, "val": 0.72},
                "tsvm/k2_a1.0": {"test": 0.60, "val": 0.56},
            },
        },
    )
    results = noise.study_results(
        tmp_path,
        cells,
        ["a", "b"],
        {"ta": ["0.5", "1.0"], "tsvm": ["0.5", "1.0"]},
        2,
        {"a": 100, "b": 300},
    )
    by = {r.name: r for r in results}
    assert by["y"].alpha == {"ta": "1.0", "tsvm": "0.5"}  # α by validation
    assert by["y"].normalised["ta"] == {
        "test": pytest.approx(0.5 / 0.8),
        "val": pytest.approx(0.64 / 0.8),
    }
    assert by["y"].merged["tsvm"] == {"test": pytest.approx(0.5), "val": pytest.approx(0.72)}
    assert by["y"].score() == pytest.approx((0.64 + 0.72) / 2)
    assert noise.choose_cell(results).name == "y"
    # The cell's scale is the mean of its tasks' (τ from each task's training set size).
    s = cells["x"]
    expected = [
        noise.effective_noise_scale(s["lr"], 64, 0.1, noise.schedule_steps(n, 64, 2))
        for n in (100, 300)
    ]
    assert by["x"].noise_scale == pytest.approx(sum(expected) / 2, rel=1e-12)
    table = noise.study_table(results)
    assert [row[0].value for row in table.rows if row[-1].value == "✓"] == ["y"]


def test_a_missing_evaluation_names_the_file(tmp_path):
    cells = _study(
        tmp_path,
        {"x": {"finetuned": {"test": 0.8, "val": 0.8}, "ta/a0.5": {"test": 0.5, "val": 0.5}}},
    )
    with pytest.raises(ValueError, match=r"tsvm/k2_a0.5.csv"):
        noise.study_results(
            tmp_path, cells, ["a", "b"], {"ta": ["0.5"], "tsvm": ["0.5"]}, 2, {"a": 10, "b": 10}
        )


# --------------------------------------------------------------------------- the workflow

CELLS = [
    {"lr": 0.0003, "batch_size": 64, "weight_decay": 0.1, "augment": False},
    {"lr": 0.001, "batch_size": 32, "weight_decay": 0.1, "augment": True},
]
NAMES = ["lr0.0003_b64_wd0.1_aug0", "lr0.001_b32_wd0.1_aug1"]
NOISE_RULES = {
    "noise_finetune",
    "noise_merge_ta",
    "noise_merge_tsvm",
    "noise_evaluate",
    "noise_evaluate_finetuned",
    "noise_study",
}
TARGET = "results/tiny/noise/noise_study.csv"


def _config(cells=CELLS) -> dict:
    cfg = yaml.safe_load(TINY.read_text())
    cfg["study"] = {"noise": {"enabled": True, "cells": cells}}
    return cfg


def _cell_jobs(cfg: dict, cells: int) -> dict[str, int]:
    """The jobs of `cells` cells of the study under the config: per cell, one fine-tuning and one
    fine-tuned evaluation per task, one merge per method, one evaluation per merged α."""
    tasks, alphas = len(cfg["tasks"]), len(cfg["merge"]["alpha"])
    return {
        "noise_finetune": cells * tasks,
        "noise_evaluate_finetuned": cells * tasks,
        "noise_merge_ta": cells,
        "noise_merge_tsvm": cells,
        "noise_evaluate": cells * 2 * alphas,
        "noise_study": 1,
    }


def test_the_study_schedules_nothing_when_off(tmp_path):
    off = planned_jobs(tmp_path, yaml.safe_load(TINY.read_text()))
    assert off and not NOISE_RULES & set(off)


@pytest.mark.slow
def test_the_study_adds_only_its_jobs_when_on(tmp_path):
    off = planned_jobs(tmp_path, yaml.safe_load(TINY.read_text()))
    on = planned_jobs(tmp_path, _config())
    # Beside everything the benchmark runs, and nothing else.
    assert {r: on[r] for r in NOISE_RULES} == _cell_jobs(_config(), 2)
    assert {r: n for r, n in on.items() if r not in NOISE_RULES} == off
    lint = snakemake(tmp_path, "--lint", config=_config(), check=False)
    assert "Congratulations, your workflow is in a good condition" in lint.stdout + lint.stderr


@pytest.fixture(scope="module")
def study_run(tmp_path_factory):
    """The study on the tiny config with a 2-cell grid, run to its table (not the benchmark)."""
    workdir = tmp_path_factory.mktemp("noise")
    snakemake(workdir, "--cores", "2", TARGET, config=_config())
    yield workdir
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.slow
def test_the_study_writes_its_table_and_figure_into_the_report(study_run):
    root = study_run / "results" / "tiny" / "noise"
    with open(root / "noise_study.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["cell"] for r in rows] == [
        "lr0.0003_b64_wd0.1_aug0",
        "lr0.001_b32_wd0.1_aug1",
    ]  # by S
    assert [r["chosen"] for r in rows].count("✓") == 1
    for r in rows:
        assert (
            float(r["noise scale S"]) > 0 and 0 < float(r["TA test"]) and 0 < float(r["TSV-M val"])
        )
        assert r["TA α"] in ("0.5", "1.0") and r["TSV-M α"] in ("0.5", "1.0")
    for ext in ("md", "html", "png", "svg"):
        assert (root / f"noise_study.{ext}").stat().st_size > 0
    report = study_run / "report.html"
    snakemake(study_run, "--cores", "1", "--report", str(report), TARGET, config=_config())
    text = report.read_text(encoding="utf-8")
    assert "8. Fine-tuning noise" in text
    assert "noise_study.png" in text and "noise_study.html" in text


@pytest.mark.slow
def test_changing_one_cell_reruns_only_that_cell(study_run):
    same = snakemake(study_run, "-n", "--cores", "2", TARGET, config=_config())
    assert "Nothing to be done" in same.stdout + same.stderr
    changed = [CELLS[0], {**CELLS[1], "lr": 0.002}]
    cfg = _config(changed)
    res = snakemake(study_run, "-n", "--cores", "2", TARGET, config=cfg)
    out = res.stdout + res.stderr
    counts = {}
    for line in out.split("Job stats:")[1].splitlines()[3:]:
        parts = line.split()
        if len(parts) != 2 or parts[0] == "total":
            break
        counts[parts[0]] = int(parts[1])
    assert counts == _cell_jobs(cfg, 1)
    assert "lr0.002_b32_wd0.1_aug1" in out and f"{NAMES[0]}/checkpoints" not in out
