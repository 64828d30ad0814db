"""`show`: a run's summary.csv as a fixed-width table. Reads the CSV alone (no torch)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

_SHOW_COLUMNS = ("method", "setting", "k", "alpha", "fraction", "average", "worst")

_Number = Callable[..., str]  # number(row, key, spec=".3f"): a cell, or "" where it is empty


def cmd_show(args: argparse.Namespace) -> int:
    print(format_summary_text(Path(args.summary)))
    return 0


def _read_summary(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """The columns and rows of a summary.csv; ValueError naming the file if it is none."""
    import csv

    if not path.exists():
        raise ValueError(f"{path}: summary CSV not found")
    with open(path, newline="") as fh:  # a folder: IsADirectoryError, one line from `main`
        reader = csv.DictReader(fh)
        fields = list(reader.fieldnames or [])
        rows = list(reader)
    missing = [c for c in _SHOW_COLUMNS if c not in fields]
    if missing:
        raise ValueError(
            f"{path}: not a summary.csv (no column {', '.join(f'`{c}`' for c in missing)}); "
            "show prints the summary.csv of a run, e.g. results/demo/summary.csv"
        )
    return fields, rows


def _sweep_lines(rows: list[dict[str, str]], number: _Number) -> list[str]:
    """Per α sweep (the runs of one method, k and fraction that differ in α alone): the α
    chosen on validation beside the best α on test."""
    sweeps: dict[tuple[str, str, str], list[dict[str, str]]] = {}
    for row in rows:
        if row["alpha"]:
            sweeps.setdefault((row["method"], row["k"], row["fraction"]), []).append(row)
    lines = ["", "α chosen on validation (its test avg.) vs. best α on test:"] if sweeps else []
    for (method, k, fraction), group in sweeps.items():
        name = " ".join(
            [method, *([f"k={k}"] if k else []), *([f"f={fraction}"] if fraction else [])]
        )
        with_val = [r for r in group if r.get("val_average")]
        val = max(with_val, key=lambda r: float(r["val_average"])) if with_val else None
        best = max(group, key=lambda r: float(r["average"]))
        chosen = (
            f"α={val['alpha']} ({number(val, 'average')})" if val else "no validation accuracies"
        )
        lines.append(
            f"  {name:<24} {chosen:<22} best on test: α={best['alpha']} ({number(best, 'average')})"
        )
    return lines


def format_summary_text(path: Path) -> str:
    """summary.csv as fixed-width text: test accuracy per task, average, worst task, validation
    average (fractions in [0, 1] with 3 decimals, as in the tables) and η; then, per α sweep,
    the α chosen on validation beside the best α on test. Reads the CSV alone (no torch).
    Raises ValueError naming the file when it is not a summary.csv."""
    fields, rows = _read_summary(path)
    tasks = fields[fields.index("fraction") + 1 : fields.index("average")]

    def number(row: dict[str, str], key: str, spec: str = ".3f") -> str:
        value = row.get(key) or ""
        try:
            return format(float(value), spec) if value else ""
        except ValueError:
            raise ValueError(
                f"{path}: run {row['method']}/{row['setting']}: `{key}` is {value!r}, not a number"
            ) from None

    head = ["method", "setting", *tasks, "avg", "worst", "val avg", "eta"]
    widths = [9, 16, *[max(5, len(t)) for t in tasks], 5, 5, 7, 9]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        )

    lines = [line(head)]
    lines.append("-" * len(lines[0]))
    for row in rows:
        cells = [row["method"], row["setting"] or "-", *(number(row, t) for t in tasks)]
        cells += [
            number(row, "average"),
            number(row, "worst"),
            number(row, "val_average"),
            number(row, "eta", ".3g"),
        ]
        lines.append(line(cells))
    return "\n".join(lines + _sweep_lines(rows, number))
