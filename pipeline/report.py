"""summary.csv: one row per method/setting with every task's accuracy, the average, its
standard error, the worst task and the diagnostics, plus the zero-shot θ0 and fine-tuned
references; beside it paired.csv, each merge method's chosen setting against TSV-M's on the
same test images.

Standard errors (`average_se`): a task's accuracy p on n images has the binomial variance
p(1 − p)/n; the average over T tasks has SE = sqrt(Σ_t p_t(1 − p_t)/n_t) / T.

Paired differences (`paired_difference`): where the evaluation CSVs carry `correct` (per-image
correctness of a task's split in data order: base64 of numpy.packbits(bool array,
bitorder="big"), `n` bits long), two models evaluated on the same images differ per image by
d_i = c_A,i − c_B,i ∈ {−1, 0, 1}. Per task the mean difference d̄_t has the variance
var(d)/n_t (population variance, the analogue of p(1 − p)/n); the difference of the task
averages is mean_t d̄_t with SE = sqrt(Σ_t var(d)_t/n_t) / T. Images both models get right or
both get wrong add nothing, so this SE is much smaller than the unpaired one.

This module does not import torch (the merge diagnostics are read through `pipeline.store`,
imported where used), so `show` prints a summary quickly.
"""

from __future__ import annotations

import base64
import binascii
import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# η (Theorem 3); V_S, Theorem 2's irreducible conflict at the Fréchet-mean minimiser, and
# V_S_merged, the same objective at the merged coordinates; R_S; the smallest and largest
# task amplification (see pipeline.merge.MergeReport).
DIAGNOSTICS = ("eta", "V_S", "V_S_merged", "R_S", "amplification_min", "amplification_max")
# Average and worst-task accuracy on the validation split.
VALIDATION = ("val_average", "val_worst")


def parse_setting(setting: str) -> dict[str, Any]:
    """`k4_a1.0_f0.05` → {k: 4, alpha: 1.0, fraction: 0.05}; unused parameters are absent."""
    out: dict[str, Any] = {}
    for part in setting.split("_"):
        key, value = part[:1], part[1:]
        if key == "k":
            out["k"] = int(value)
        elif key == "a":
            out["alpha"] = float(value)
        elif key == "f":
            out["fraction"] = float(value)
    return out


def _artifact_error(message: str) -> Exception:
    from pipeline.store import ArtifactError

    return ArtifactError(message)


def read_eval_rows(path: Path, split: str = "test") -> dict[str, dict[str, str]]:
    """task → its row (task, split, accuracy, n and, where written, correct) on `split` of an
    evaluation CSV (a CSV without a `split` column holds test accuracies)."""
    if not path.is_file():
        raise _artifact_error(f"{path}: evaluation CSV not found")
    with open(path, newline="") as fh:
        return {row["task"]: row for row in csv.DictReader(fh) if row.get("split", "test") == split}


def read_eval(path: Path, split: str = "test") -> dict[str, float]:
    """task → accuracy on `split` from an evaluation CSV (columns task, split, accuracy, n; a CSV
    without a `split` column holds test accuracies)."""
    return {task: float(row["accuracy"]) for task, row in read_eval_rows(path, split).items()}


def average_se(accuracies: Sequence[float], counts: Sequence[int]) -> float:
    """Standard error of the mean of T task accuracies p_t, each on n_t images:
    sqrt(Σ_t p_t(1 − p_t)/n_t) / T."""
    if len(accuracies) != len(counts) or not accuracies:
        raise ValueError(f"got {len(accuracies)} accuracies for {len(counts)} image counts")
    if any(n < 1 for n in counts):
        raise ValueError(f"every task needs at least one image, got counts {list(counts)}")
    total = sum(p * (1.0 - p) / n for p, n in zip(accuracies, counts))
    return math.sqrt(total) / len(accuracies)


def decode_correct(text: str, n: int, where: str = "evaluation CSV") -> np.ndarray:
    """The per-image correctness [n] (bool) of an evaluation row's `correct` field: base64
    (standard alphabet) of numpy.packbits(bits, bitorder="big")."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise _artifact_error(f"{where}: field `correct` is not base64 ({text[:20]!r}…)") from None
    if len(raw) != (n + 7) // 8:
        raise _artifact_error(
            f"{where}: field `correct` holds {len(raw)} bytes, expected {(n + 7) // 8} for n = {n} "
            "images (numpy.packbits of one bit per image)"
        )
    return np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="big")[:n].astype(bool)


def paired_difference(
    a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]
) -> tuple[float, float]:
    """(mean_t d̄_t, its SE) of the per-image differences d = a[t] − b[t] ([n_t] bool each, the
    same images in the same order): SE = sqrt(Σ_t var(d_t)/n_t) / T, var with ddof 0."""
    if set(a) != set(b) or not a:
        raise ValueError(f"paired tasks differ: {sorted(a)} vs {sorted(b)}")
    means, variances = [], []
    for task in a:
        if a[task].shape != b[task].shape:
            raise ValueError(
                f"task `{task}`: {a[task].shape[0]} vs {b[task].shape[0]} images; "
                "not the same test set"
            )
        d = a[task].astype(np.float64) - b[task].astype(np.float64)
        means.append(d.mean())
        variances.append(d.var() / d.size)
    return float(np.mean(means)), float(math.sqrt(sum(variances)) / len(means))


def summary_rows(root: Path, tasks: Sequence[str], runs: Sequence[str]) -> list[dict[str, Any]]:
    """One row per run (`method/setting`) from the evaluation CSVs under `root/eval` and the
    diagnostics of `root/merged/{run}.zarr`: test accuracy per task, average, worst task,
    the diagnostics of DIAGNOSTICS and, where the run was evaluated on it, the validation average and worst."""
    rows = []
    for run in runs:
        method, _, setting = run.partition("/")
        if method == "finetuned":
            # The upper reference: each task's accuracy under its own fine-tuned encoder.
            acc, val, counts = {}, {}, {}
            for t in tasks:
                path = root / "eval" / "finetuned" / f"{t}.csv"
                for split, into in (("test", acc), ("val", val)):
                    if t in (found := read_eval_rows(path, split)):
                        into[t] = float(found[t]["accuracy"])
                        if split == "test":
                            counts[t] = found[t].get("n")
        else:
            path = root / "eval" / method / f"{setting}.csv"
            test_rows = read_eval_rows(path)
            acc = {t: float(r["accuracy"]) for t, r in test_rows.items()}
            counts = {t: r.get("n") for t, r in test_rows.items()}
            val = read_eval(path, "val")
        missing = [t for t in tasks if t not in acc]
        if missing:
            raise _artifact_error(
                f"{root / 'eval' / run}.csv: no accuracy for task(s) {', '.join(missing)}"
            )
        row: dict[str, Any] = {
            "method": method,
            "setting": setting,
            "k": "",
            "alpha": "",
            "fraction": "",
        }
        row.update(parse_setting(setting) if method not in ("zeroshot", "finetuned") else {})
        for t in tasks:
            row[t] = acc[t]
        values = [acc[t] for t in tasks]
        row["average"] = sum(values) / len(values)
        row["worst"] = min(values)
        row["worst_task"] = tasks[values.index(min(values))]
        # Empty where an evaluation CSV (an imported one, say) does not give its image count.
        known = all(str(counts.get(t) or "").isdigit() and int(counts[t]) > 0 for t in tasks)
        sizes = [int(counts[t]) for t in tasks] if known else []  # type: ignore[arg-type]
        row["se"] = average_se(values, sizes) if known else ""
        merged = root / "merged" / method / f"{setting}.zarr"
        diagnostics = _diagnostics(merged) if merged.is_dir() else {}
        for key in DIAGNOSTICS:
            row[key] = diagnostics.get(key, "")
        # Validation accuracies (for choosing α without test labels); empty when the run was
        # evaluated on test only or misses a task.
        val_values = [val[t] for t in tasks if t in val]
        complete = len(val_values) == len(tasks)
        row["val_average"] = sum(val_values) / len(val_values) if complete else ""
        row["val_worst"] = min(val_values) if complete else ""
        rows.append(row)
    return rows


def _diagnostics(merged: Path) -> dict[str, Any]:
    from pipeline.store import ZarrReader

    return ZarrReader(merged).attrs().get("diagnostics", {})


def write_summary(root: Path, tasks: Sequence[str], runs: Sequence[str], out: Path) -> None:
    """Write summary.csv to `out` and paired.csv beside it (see `paired_rows`)."""
    from pipeline.store import atomic_path

    rows = summary_rows(root, tasks, runs)
    fields = [
        "method",
        "setting",
        "k",
        "alpha",
        "fraction",
        *tasks,
        "average",
        "worst",
        "worst_task",
        *DIAGNOSTICS,
        *VALIDATION,
        "se",
    ]
    with atomic_path(out) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(k, v) for k, v in row.items()})
    paired = paired_rows(root, tasks, out)
    with atomic_path(Path(out).with_name(PAIRED)) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=PAIRED_FIELDS, lineterminator="\n")
        writer.writeheader()
        for row in paired:
            writer.writerow({k: _cell(k, v) for k, v in row.items()})


#: The paired comparisons' file, beside summary.csv, and the method every other is compared to.
PAIRED = "paired.csv"
PAIRED_VERSUS = "tsvm"
PAIRED_FIELDS = (
    "method",
    "setting",
    "versus",
    "versus_setting",
    "difference",
    "se",
    "images",
    "note",
)


def _correct(
    root: Path, method: str, setting: str, tasks: Sequence[str]
) -> dict[str, np.ndarray] | str:
    """task → per-image test correctness of a run, or a sentence saying why it is not available."""
    path = root / "eval" / method / f"{setting}.csv"
    rows = read_eval_rows(path)
    out = {}
    for t in tasks:
        row = rows.get(t, {})
        if not row.get("correct") or not str(row.get("n") or "").isdigit():
            return f"{method}/{setting}: no per-image correctness in its evaluation CSV"
        out[t] = decode_correct(row["correct"], int(row["n"]), f"{path} (task {t})")
    return out


def paired_rows(root: Path, tasks: Sequence[str], summary: Path) -> list[dict[str, Any]]:
    """Each merge method's setting chosen on validation (best on test without validation) vs.
    TSV-M's, on the same test images: the difference of their task averages and its paired SE
    (`paired_difference`). A row's note says why a comparison is not available (no TSV-M run,
    evaluation CSVs without `correct`, different test sets); it never fails on a missing column."""
    from pipeline.tables import chosen_settings, read_summary

    _, runs = read_summary(summary)
    chosen = chosen_settings(runs)
    rows: list[dict[str, Any]] = []
    if PAIRED_VERSUS not in chosen:
        return rows
    versus = chosen[PAIRED_VERSUS][0]
    reference = _correct(root, PAIRED_VERSUS, versus.setting, tasks)
    for method, (run, _) in chosen.items():
        if method == PAIRED_VERSUS:
            continue
        row: dict[str, Any] = {
            "method": method,
            "setting": run.setting,
            "versus": PAIRED_VERSUS,
            "versus_setting": versus.setting,
            "difference": "",
            "se": "",
            "images": "",
            "note": "",
        }
        mine = _correct(root, method, run.setting, tasks)
        if isinstance(reference, str) or isinstance(mine, str):
            row["note"] = reference if isinstance(reference, str) else mine
        else:
            try:
                row["difference"], row["se"] = paired_difference(mine, reference)
                row["images"] = sum(len(v) for v in mine.values())
            except ValueError as err:
                row["note"] = str(err)
        rows.append(row)
    return rows


def _cell(key: str, value: Any) -> Any:
    if key in ("alpha", "fraction"):
        return value  # keep the spelling of the artifact names (1.0, not 1)
    return f"{value:.6g}" if isinstance(value, float) else value


def format_summary(path: Path, best_only: bool = False) -> str:
    """A fixed-width text table of summary.csv (accuracies in %)."""
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
        fields = reader.fieldnames or []
    tasks = fields[fields.index("fraction") + 1 : fields.index("average")]
    head = ["method", "setting", *tasks, "avg", "worst", "val avg", "eta"]
    widths = [9, 16, *[max(6, len(t)) for t in tasks], 6, 6, 7, 9]
    lines = [
        "  ".join(h.ljust(w) if i < 2 else h.rjust(w) for i, (h, w) in enumerate(zip(head, widths)))
    ]
    lines.append("-" * len(lines[0]))
    for row in rows:
        cells = [row["method"], row["setting"] or "-"]
        cells += [f"{100 * float(row[t]):.1f}" for t in tasks]
        cells += [f"{100 * float(row['average']):.1f}", f"{100 * float(row['worst']):.1f}"]
        cells.append(f"{100 * float(row['val_average']):.1f}" if row.get("val_average") else "")
        cells.append(f"{float(row['eta']):.3g}" if row.get("eta") else "")
        lines.append(
            "  ".join(
                c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
            )
        )
    return "\n".join(lines) + "\n\n" + format_alpha_selection(path)


def format_alpha_selection(path: Path) -> str:
    """Per (method, k, f): the α chosen on validation and its test average beside the best α on
    test (accuracies in %), as fixed-width text."""
    from pipeline.tables import (
        LABELS,
        alpha_groups,
        best_on_test,
        choose_on_validation,
        read_summary,
    )

    _, runs = read_summary(path)
    lines = ["α chosen on validation (its test avg.) vs. best α on test (the paper's protocol):"]
    for (method, k, fraction), group in alpha_groups(runs).items():
        name = " ".join(
            [
                LABELS.get(method, method),
                *([f"k={k}"] if k is not None else []),
                *([f"f={fraction:g}"] if fraction is not None else []),
            ]
        )
        val, best = choose_on_validation(group), best_on_test(group)
        chosen = f"α={val.alpha:g} ({100 * val.average:.1f})" if val else "no validation accuracies"
        lines.append(
            f"  {name:<24} {chosen:<26} best on test: α={best.alpha:g} ({100 * best.average:.1f})"
        )  # type: ignore[union-attr]
    return "\n".join(lines)
