"""summary.csv: one row per method/setting with every task's accuracy, the average, the worst
task and the diagnostics, plus the zero-shot θ0 and fine-tuned references."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.store import ArtifactError, ZarrReader, atomic_path

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


def read_eval(path: Path, split: str = "test") -> dict[str, float]:
    """task → accuracy on `split` from an evaluation CSV (columns task, split, accuracy, n; a CSV
    without a `split` column holds test accuracies)."""
    if not path.is_file():
        raise ArtifactError(f"{path}: evaluation CSV not found")
    with open(path, newline="") as fh:
        return {
            row["task"]: float(row["accuracy"])
            for row in csv.DictReader(fh)
            if row.get("split", "test") == split
        }


def summary_rows(root: Path, tasks: Sequence[str], runs: Sequence[str]) -> list[dict[str, Any]]:
    """One row per run (`method/setting`) from the evaluation CSVs under `root/eval` and the
    diagnostics of `root/merged/{run}.zarr`: test accuracy per task, average, worst task,
    the diagnostics of DIAGNOSTICS and, where the run was evaluated on it, the validation average and worst."""
    rows = []
    for run in runs:
        method, _, setting = run.partition("/")
        if method == "finetuned":
            # The upper reference: each task's accuracy under its own fine-tuned encoder.
            acc, val = {}, {}
            for t in tasks:
                path = root / "eval" / "finetuned" / f"{t}.csv"
                for split, into in (("test", acc), ("val", val)):
                    if t in (found := read_eval(path, split)):
                        into[t] = found[t]
        else:
            path = root / "eval" / method / f"{setting}.csv"
            acc, val = read_eval(path), read_eval(path, "val")
        missing = [t for t in tasks if t not in acc]
        if missing:
            raise ArtifactError(f"{root / 'eval' / run}.csv: no accuracy for task(s) {', '.join(missing)}")
        row: dict[str, Any] = {"method": method, "setting": setting, "k": "", "alpha": "", "fraction": ""}
        row.update(parse_setting(setting) if method not in ("zeroshot", "finetuned") else {})
        for t in tasks:
            row[t] = acc[t]
        values = [acc[t] for t in tasks]
        row["average"] = sum(values) / len(values)
        row["worst"] = min(values)
        row["worst_task"] = tasks[values.index(min(values))]
        merged = root / "merged" / method / f"{setting}.zarr"
        diagnostics = ZarrReader(merged).attrs().get("diagnostics", {}) if merged.is_dir() else {}
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


def write_summary(root: Path, tasks: Sequence[str], runs: Sequence[str], out: Path) -> None:
    rows = summary_rows(root, tasks, runs)
    fields = [
        "method", "setting", "k", "alpha", "fraction", *tasks, "average", "worst", "worst_task", *DIAGNOSTICS,
        *VALIDATION,
    ]
    with atomic_path(out) as tmp:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields, lineterminator="\n")
            writer.writeheader()
            for row in rows:
                writer.writerow({k: _cell(k, v) for k, v in row.items()})


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
    lines = ["  ".join(h.ljust(w) if i < 2 else h.rjust(w) for i, (h, w) in enumerate(zip(head, widths)))]
    lines.append("-" * len(lines[0]))
    for row in rows:
        cells = [row["method"], row["setting"] or "-"]
        cells += [f"{100 * float(row[t]):.1f}" for t in tasks]
        cells += [f"{100 * float(row['average']):.1f}", f"{100 * float(row['worst']):.1f}"]
        cells.append(f"{100 * float(row['val_average']):.1f}" if row.get("val_average") else "")
        cells.append(f"{float(row['eta']):.3g}" if row.get("eta") else "")
        lines.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))))
    return "\n".join(lines) + "\n\n" + format_alpha_selection(path)


def format_alpha_selection(path: Path) -> str:
    """Per (method, k, f): the α chosen on validation and its test average beside the best α on
    test (accuracies in %), as fixed-width text."""
    from pipeline.tables import LABELS, alpha_groups, best_on_test, choose_on_validation, read_summary

    _, runs = read_summary(path)
    lines = ["α chosen on validation (its test avg.) vs. best α on test (the paper's protocol):"]
    for (method, k, fraction), group in alpha_groups(runs).items():
        name = " ".join([LABELS.get(method, method), *([f"k={k}"] if k is not None else []),
                         *([f"f={fraction:g}"] if fraction is not None else [])])
        val, best = choose_on_validation(group), best_on_test(group)
        chosen = f"α={val.alpha:g} ({100 * val.average:.1f})" if val else "no validation accuracies"
        lines.append(f"  {name:<24} {chosen:<26} best on test: α={best.alpha:g} ({100 * best.average:.1f})")  # type: ignore[union-attr]
    return "\n".join(lines)
