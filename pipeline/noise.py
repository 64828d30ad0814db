"""The fine-tuning noise study: merging success against the effective noise scale of fine-tuning.

Zhang et al. (arXiv 2510.04686) find that how well fine-tuned models merge is a non-monotonic
function of one quantity, the effective noise scale of the optimiser, which larger learning
rates, stronger weight decay, smaller batches and data augmentation all raise. The workflow's
optional study (`study: {noise: {enabled: true}}`, workflow/rules/noise.smk, docs/noise.md)
fine-tunes every task at a small grid of those settings (the *cells*), merges each cell with
Task Arithmetic and TSV-M over the config's α grid, and this module turns the evaluations into
a table and a figure of normalised accuracy (merged / fine-tuned, averaged over tasks) against
the effective noise scale, and chooses the demo's fine-tuning settings on the validation split.

The effective noise scale of AdamW fine-tuning, as this study computes it
(:func:`effective_noise_scale`)::

    S = η · exp(η λ τ) / B^κ

* η / B^κ is the noise temperature of the optimiser's SDE: κ = 1 for SGD (the linear scaling
  rule: η/B sets the gradient-noise temperature, Smith and Le, arXiv 1710.06451) and κ = 1/2 for
  Adam and AdamW (the square-root scaling rule, Malladi et al., arXiv 2205.10287).
* exp(η λ τ) is the weight-decay term. Decoupled weight decay multiplies every weight by
  (1 − η_t λ) at step t, so after the run the weights have shrunk by Π (1 − η_t λ) ≈ exp(−η λ τ),
  where τ = Σ_t s_t is the schedule-weighted number of steps (s_t the warmup-cosine multiplier,
  :func:`schedule_steps`). Layers followed by a normalisation are scale-invariant, and their
  effective step size is η / ‖w‖ under Adam: shrinking the weights raises it by exp(η λ τ).
  With λ = 0 the term is 1 and S is the SDE temperature alone.
* Data augmentation adds variance to every per-sample gradient; it has no closed-form factor,
  so S leaves it out and the table and figure show it as a setting of its own (open markers).

Run as ``python -m pipeline.noise table ...`` (the workflow's `noise_study` rule).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch loads with the augmentation: the Snakefile reads the cells without it
    import torch
    from torch import Tensor, nn

__all__ = [
    "CELL_KEYS",
    "CellResult",
    "augment_in_training",
    "cell_name",
    "choose_cell",
    "effective_noise_scale",
    "expand_cells",
    "random_shift",
    "schedule_steps",
    "study_results",
    "study_table",
    "eligible",
    "DEFAULT_MIN_FINETUNED",
]

log = logging.getLogger(__name__)

CELL_KEYS = ("lr", "batch_size", "weight_decay", "augment")
"""The fine-tuning settings a cell of the study sets; the others come from config `finetune`."""

METHODS = ("ta", "tsvm")
"""The merge methods the study runs on every cell: Task Arithmetic and TSV-M."""

ADAMW_BATCH_EXPONENT = 0.5
"""κ of AdamW: the square-root scaling rule (Malladi et al., arXiv 2205.10287)."""

SGD_BATCH_EXPONENT = 1.0
"""κ of SGD: the linear scaling rule (Smith and Le, arXiv 1710.06451)."""

MAX_SHIFT = 2
"""Augmentation: each training image is shifted by up to this many pixels each way."""

DEFAULT_MIN_FINETUNED = 0.9
"""The fine-tuned validation accuracy (task mean) a cell's models need for the cell to be
chosen (config `study.noise.min_finetuned`): merging starts from good experts."""


# --------------------------------------------------------------------------- the noise scale


def schedule_steps(
    n_train: int, batch_size: int, epochs: int, warmup_fraction: float = 0.1
) -> float:
    """τ = Σ_t s_t over the fine-tuning run: the sum of the learning-rate multipliers of the
    warmup-cosine schedule of :func:`pipeline.train.finetune` (ceil(n_train / batch_size) steps
    per epoch), so that Σ_t η_t = η τ."""
    from pipeline.train import _warmup_cosine

    if n_train < 1 or batch_size < 1 or epochs < 1:
        raise ValueError(
            "schedule_steps needs n_train, batch_size and epochs ≥ 1, "
            f"got {n_train}, {batch_size}, {epochs}"
        )
    total = epochs * math.ceil(n_train / batch_size)
    factor = _warmup_cosine(total, max(1, round(warmup_fraction * total)))
    return math.fsum(factor(step) for step in range(total))


def effective_noise_scale(
    lr: float,
    batch_size: int,
    weight_decay: float = 0.0,
    decay_steps: float = 0.0,
    *,
    batch_exponent: float = ADAMW_BATCH_EXPONENT,
) -> float:
    """S = η · exp(η λ τ) / B^κ (module docstring): the effective noise scale of fine-tuning
    with learning rate η = `lr`, batch size B, decoupled weight decay λ = `weight_decay` over
    τ = `decay_steps` schedule-weighted steps (:func:`schedule_steps`); κ = `batch_exponent`
    (1/2 for AdamW, 1 for SGD). Raises ValueError for a setting out of range."""
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(
            f"effective_noise_scale: learning rate must be a finite number > 0, got {lr}"
        )
    if batch_size < 1:
        raise ValueError(f"effective_noise_scale: batch size must be ≥ 1, got {batch_size}")
    if not (weight_decay >= 0 and decay_steps >= 0):
        raise ValueError(
            "effective_noise_scale: weight decay and decay steps must be ≥ 0, "
            f"got {weight_decay} and {decay_steps}"
        )
    if not batch_exponent > 0:
        raise ValueError(f"effective_noise_scale: batch exponent must be > 0, got {batch_exponent}")
    return lr * math.exp(lr * weight_decay * decay_steps) / batch_size**batch_exponent


# --------------------------------------------------------------------------- the grid


def _spell(value: float) -> str:
    """The workflow's one spelling of a float in artifact names (common.smk `fmt`)."""
    return str(float(value))


def cell_name(settings: Mapping[str, Any]) -> str:
    """A cell's folder name, spelling every setting it varies: lr0.0005_b64_wd0.1_aug0."""
    return (
        f"lr{_spell(settings['lr'])}_b{int(settings['batch_size'])}"
        f"_wd{_spell(settings['weight_decay'])}_aug{int(bool(settings['augment']))}"
    )


def expand_cells(
    cells: Sequence[Mapping[str, Any]], finetune: Mapping[str, Any]
) -> dict[str, dict[str, Any]]:
    """Cell name → the full fine-tuning settings of that cell (config `finetune` with the cell's
    settings on top; a setting the cell leaves out is the config's, augment off by default),
    in grid order. Raises ValueError for an unknown key or two cells with the same settings."""
    out: dict[str, dict[str, Any]] = {}
    for i, cell in enumerate(cells):
        unknown = sorted(set(cell) - set(CELL_KEYS))
        if unknown:
            raise ValueError(
                f"config study.noise.cells[{i}]: unknown setting(s) {', '.join(unknown)}; "
                f"a cell sets {', '.join(CELL_KEYS)} (the other fine-tuning settings come "
                "from config `finetune`)"
            )
        settings = {**finetune, "augment": False, **cell}
        settings["lr"], settings["weight_decay"] = (
            float(settings["lr"]),
            float(settings["weight_decay"]),
        )
        settings["batch_size"], settings["augment"] = (
            int(settings["batch_size"]),
            bool(settings["augment"]),
        )
        name = cell_name(settings)
        if name in out:
            raise ValueError(
                f"config study.noise.cells[{i}] repeats the settings of an earlier cell ({name}); "
                "remove one of them"
            )
        out[name] = settings
    return out


# --------------------------------------------------------------------------- augmentation


def random_shift(images: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Each image [N, C, H, W] shifted by its own random offset in [−max_shift, max_shift]
    pixels along each axis, edges replicated (the classic pad-and-crop augmentation)."""
    import torch
    import torch.nn.functional as F

    n, _, h, w = images.shape
    p = max_shift
    padded = F.pad(images, (p, p, p, p), mode="replicate")  # [N, C, H+2p, W+2p]
    dy = torch.randint(0, 2 * p + 1, (n,), generator=generator).to(images.device)
    dx = torch.randint(0, 2 * p + 1, (n,), generator=generator).to(images.device)
    rows = dy[:, None] + torch.arange(h, device=images.device)  # [N, H]
    cols = dx[:, None] + torch.arange(w, device=images.device)  # [N, W]
    batch = torch.arange(n, device=images.device)[:, None, None]
    crops = padded[batch, :, rows[:, :, None], cols[:, None, :]]  # [N, H, W, C]
    return crops.permute(0, 3, 1, 2).contiguous()


def augment_in_training(encoder: nn.Module, *, seed: int, max_shift: int = MAX_SHIFT) -> None:
    """Make `encoder` shift its input images at random (:func:`random_shift`) while in training
    mode, through a forward pre-hook: the state dict is unchanged, evaluation (eval mode) sees
    the images as they are, and a deep copy of the encoder keeps the hook and its seeded draws."""
    import torch

    generator = torch.Generator().manual_seed(seed)

    def shift(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if not module.training:
            return None
        images, *rest = args
        return (random_shift(images, max_shift, generator), *rest)

    encoder.register_forward_pre_hook(shift)


# --------------------------------------------------------------------------- results


@dataclass
class CellResult:
    """One cell's outcome: its settings and noise scale, the fine-tuned accuracy (task mean,
    per split), and per merge method the α chosen on validation with the merged accuracy and
    the normalised accuracy (merged / fine-tuned), each averaged over tasks, on each split."""

    name: str
    settings: dict[str, Any]
    noise_scale: float
    finetuned: dict[str, float]  # split → mean fine-tuned accuracy over tasks
    alpha: dict[str, str]  # method → α chosen on validation
    normalised: dict[str, dict[str, float]]  # method → split → normalised accuracy at that α
    merged: dict[str, dict[str, float]]  # method → split → merged accuracy at that α

    def score(self) -> float:
        """The choice rule's score: the mean over the study's methods of their merged models'
        validation accuracy (averaged over tasks), each at its own α chosen on validation."""
        return math.fsum(self.merged[m]["val"] for m in METHODS) / len(METHODS)


def _read_eval(path: Path) -> dict[tuple[str, str], float]:
    """(task, split) → accuracy from one evaluation CSV."""
    try:
        with open(path, newline="") as fh:
            return {(r["task"], r["split"]): float(r["accuracy"]) for r in csv.DictReader(fh)}
    except (OSError, KeyError, ValueError) as err:
        raise ValueError(f"noise study: cannot read evaluation `{path}`: {err}") from err


def _task_mean(
    merged: dict[tuple[str, str], float], tasks: Sequence[str], split: str, where: Path
) -> float:
    """Mean over tasks of the merged model's accuracy on one split."""
    missing = [t for t in tasks if (t, split) not in merged]
    if missing:
        raise ValueError(f"noise study: `{where}` has no {split} accuracy of task `{missing[0]}`")
    return math.fsum(merged[(t, split)] for t in tasks) / len(tasks)


def _normalised(
    merged: dict[tuple[str, str], float],
    finetuned: dict[tuple[str, str], float],
    tasks: Sequence[str],
    split: str,
    where: Path,
) -> float:
    """Mean over tasks of merged / fine-tuned accuracy on one split."""
    ratios = []
    for task in tasks:
        if (task, split) not in merged or (task, split) not in finetuned:
            raise ValueError(f"noise study: `{where}` has no {split} accuracy of task `{task}`")
        ft = finetuned[(task, split)]
        if ft <= 0:
            raise ValueError(
                f"noise study: the fine-tuned {split} accuracy of `{task}` is 0 ({where})"
            )
        ratios.append(merged[(task, split)] / ft)
    return math.fsum(ratios) / len(ratios)


def study_results(
    root: str | Path,
    cells: Mapping[str, Mapping[str, Any]],
    tasks: Sequence[str],
    alphas: Mapping[str, Sequence[str]],
    k: int,
    train_sizes: Mapping[str, int],
) -> list[CellResult]:
    """Every cell's :class:`CellResult`, read from the study's evaluations under `root`
    ({cell}/eval/finetuned/{task}.csv, {cell}/eval/ta/a{α}.csv, {cell}/eval/tsvm/k{k}_a{α}.csv),
    sorted by noise scale. `train_sizes` (task → training images) gives τ per task; the cell's
    noise scale is the mean of its tasks'. α is chosen per method by the merged model's
    validation accuracy (task mean); ties go to the smaller α."""
    root = Path(root)
    results = []
    for name, s in cells.items():
        finetuned: dict[tuple[str, str], float] = {}
        for task in tasks:
            rows = _read_eval(root / name / "eval" / "finetuned" / f"{task}.csv")
            finetuned.update({key: v for key, v in rows.items() if key[0] == task})
        mean_ft = {
            split: math.fsum(finetuned[(t, split)] for t in tasks) / len(tasks)
            for split in ("test", "val")
        }
        chosen_alpha, norm, accuracy = {}, {}, {}
        for method in METHODS:
            best = None
            for alpha in sorted(alphas[method], key=float):
                setting = f"a{alpha}" if method == "ta" else f"k{k}_a{alpha}"
                path = root / name / "eval" / method / f"{setting}.csv"
                merged = _read_eval(path)
                mean = {sp: _task_mean(merged, tasks, sp, path) for sp in ("test", "val")}
                if best is None or mean["val"] > best[2]["val"]:
                    per_split = {
                        sp: _normalised(merged, finetuned, tasks, sp, path)
                        for sp in ("test", "val")
                    }
                    best = (alpha, per_split, mean)
            chosen_alpha[method], norm[method], accuracy[method] = best
        scales = [
            effective_noise_scale(
                s["lr"],
                s["batch_size"],
                s["weight_decay"],
                schedule_steps(train_sizes[t], s["batch_size"], s["epochs"]),
            )
            for t in tasks
        ]
        results.append(
            CellResult(
                name,
                dict(s),
                math.fsum(scales) / len(scales),
                mean_ft,
                chosen_alpha,
                norm,
                accuracy,
            )
        )
    return sorted(results, key=lambda r: (r.noise_scale, r.name))


def eligible(results: Sequence[CellResult], min_finetuned: float) -> list[CellResult]:
    """The cells whose fine-tuned models reach `min_finetuned` validation accuracy (task
    mean); every cell when none does."""
    return [r for r in results if r.finetuned["val"] >= min_finetuned] or list(results)


def choose_cell(
    results: Sequence[CellResult], min_finetuned: float = DEFAULT_MIN_FINETUNED
) -> CellResult:
    """The cell whose fine-tuning settings the demo uses: among the cells whose fine-tuned
    models reach `min_finetuned` validation accuracy (:func:`eligible`), the highest
    :meth:`CellResult.score` (the validation accuracy of TA's and TSV-M's merges, each at its
    validation α, averaged), ties to the lower noise scale. Only validation accuracies enter;
    no test number does.

    Merging starts from fine-tuned experts: a fine-tuning that leaves its models weak is no
    candidate however well they merge (an under-trained cell's task vectors are small, and
    its merges lose little because there is little to lose). The score is the merged models'
    accuracy, not the normalised one, for the same reason: dividing by each cell's fine-tuned
    accuracy would reward fine-tuning little."""
    if not results:
        raise ValueError("noise study: no cells to choose from")
    return max(eligible(results, min_finetuned), key=lambda r: (r.score(), -r.noise_scale))


# --------------------------------------------------------------------------- table and figure


def study_table(results: Sequence[CellResult], min_finetuned: float = DEFAULT_MIN_FINETUNED) -> Any:
    """The study as a :class:`pipeline.tables.Table`, one row per cell by noise scale, the
    chosen cell marked."""
    from pipeline.tables import Cell, Table

    chosen = choose_cell(results, min_finetuned).name
    bar = f"{min_finetuned:g}"
    table = Table(
        "noise_study",
        "Fine-tuning noise study: normalised accuracy against the effective noise scale",
        [
            "cell",
            "lr",
            "batch",
            "weight decay",
            "augment",
            "noise scale S",
            "fine-tuned val",
            "fine-tuned test",
            "TA α",
            "TA val",
            "TA test",
            "TSV-M α",
            "TSV-M val",
            "TSV-M test",
            "merged val (score)",
            "chosen",
        ],
        note=(
            "S = η·exp(ηλτ)/√B (docs/noise.md; arXiv 2510.04686 for the noise scale's role). "
            "TA/TSV-M val and test: merged / fine-tuned accuracy averaged over tasks, at the α "
            "chosen on validation. Score: the mean of TA's and TSV-M's merged validation "
            "accuracy (task mean) at those α; the chosen cell (✓) has the highest score among "
            f"the cells whose fine-tuned validation accuracy (task mean) is at least {bar} "
            "(all cells when none is)."
        ),
    )
    for r in results:
        s = r.settings
        table.add(
            r.name,
            Cell(float(s["lr"]), digits=None),
            str(s["batch_size"]),
            Cell(float(s["weight_decay"]), digits=None),
            "on" if s["augment"] else "off",
            Cell(r.noise_scale, digits=None),
            Cell(r.finetuned["val"]),
            Cell(r.finetuned["test"]),
            r.alpha["ta"],
            Cell(r.normalised["ta"]["val"]),
            Cell(r.normalised["ta"]["test"]),
            r.alpha["tsvm"],
            Cell(r.normalised["tsvm"]["val"]),
            Cell(r.normalised["tsvm"]["test"]),
            Cell(r.score()),
            "✓" if r.name == chosen else "",
        )
    table.bold_best(["merged val (score)"])
    return table


def _short(settings: Mapping[str, Any]) -> str:
    """A point's label in the figure: η, B, λ and augmentation in a few characters."""
    aug = ", aug" if settings["augment"] else ""
    return f"η={settings['lr']:g}, B={settings['batch_size']}, λ={settings['weight_decay']:g}{aug}"


def study_figure(
    results: Sequence[CellResult], min_finetuned: float = DEFAULT_MIN_FINETUNED
) -> Any:
    """Normalised test accuracy (at the α chosen on validation) against the effective noise
    scale, one line per merge method, each point labelled with its cell's settings; augmented
    cells have open markers, the chosen cell a grey band."""
    from pipeline.methods import get_method
    from pipeline.plots import _new_figure

    fig, axes = _new_figure(width=7.5, height=4.5)
    ax = axes[0][0]
    xs = [r.noise_scale for r in results]
    for method in METHODS:
        m = get_method(method)
        ys = [r.normalised[method]["test"] for r in results]
        # The line joins the cells without augmentation; augmented ones stand alone.
        plain = [
            (x, y) for x, y, r in zip(xs, ys, results, strict=True) if not r.settings["augment"]
        ]
        px, py = [p[0] for p in plain], [p[1] for p in plain]
        ax.plot(px, py, "-", color=m.colour, label=m.label, zorder=2)
        for x, y, r in zip(xs, ys, results, strict=True):
            ax.plot(
                [x],
                [y],
                "o",
                color=m.colour,
                markerfacecolor="white" if r.settings["augment"] else m.colour,
                zorder=3,
            )
    top = [max(r.normalised[m]["test"] for m in METHODS) for r in results]
    for x, y, r in zip(xs, top, results, strict=True):
        # Augmented cells share S with their plain twin: their label goes below the points.
        below = r.settings["augment"]
        ax.annotate(
            _short(r.settings),
            (x, y),
            textcoords="offset points",
            xytext=(0, -16 if below else 8),
            ha="center",
            fontsize=7,
            rotation=20,
        )
    chosen = choose_cell(results, min_finetuned)
    ax.axvline(
        chosen.noise_scale, color="0.6", lw=6, alpha=0.35, zorder=1, label="chosen (validation)"
    )
    if len(set(xs)) > 1:
        ax.set_xscale("log")
    ax.set_xlabel("effective noise scale S = η·exp(ηλτ)/√B")
    ax.set_ylabel("normalised accuracy (merged / fine-tuned)")
    ax.set_title("Merging against fine-tuning noise (open markers: augmented)")
    ax.margins(x=0.15, y=0.2)
    ax.legend(loc="best", fontsize=8)
    return fig


def write_study(
    results: Sequence[CellResult],
    out_dir: str | Path,
    min_finetuned: float = DEFAULT_MIN_FINETUNED,
) -> list[Path]:
    """noise_study.{csv,md,html} and noise_study.{png,svg} under `out_dir`; returns the paths."""
    from pipeline.plots import save_figure
    from pipeline.store import atomic_path
    from pipeline.tables import to_csv, to_html, to_markdown

    out_dir = Path(out_dir)
    table = study_table(results, min_finetuned)
    paths = []
    for ext, render in (("csv", to_csv), ("md", to_markdown), ("html", to_html)):
        path = out_dir / f"noise_study.{ext}"
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            Path(tmp).write_text(render(table), encoding="utf-8", newline="\n")
        paths.append(path)
    return paths + save_figure(study_figure(results, min_finetuned), out_dir, "noise_study")


# --------------------------------------------------------------------------- command line


def train_size(data: Mapping[str, Any], task: str) -> int:
    """How many training images fine-tuning sees for `task` under the config's data settings
    (the train split after the validation carve-out)."""
    from pipeline.data import load_split

    images, _ = load_split(dict(data), task, "train")
    return int(images.shape[0])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.noise", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "table", help="the study's table (CSV, Markdown, HTML) and figure (PNG, SVG)"
    )
    p.add_argument("--root", required=True, help="the study's folder: {root}/{cell}/eval/...")
    p.add_argument(
        "--cells", type=json.loads, required=True, help="cell name → fine-tuning settings (JSON)"
    )
    p.add_argument("--tasks", nargs="+", required=True)
    p.add_argument(
        "--alphas",
        type=json.loads,
        required=True,
        help="method → α list as spelled in paths (JSON)",
    )
    p.add_argument("--k", type=int, required=True, help="TSV-M's per-task rank")
    p.add_argument(
        "--min-finetuned",
        type=float,
        default=DEFAULT_MIN_FINETUNED,
        help="fine-tuned validation accuracy (task mean) a cell needs to be chosen "
        "(default %(default)s)",
    )
    p.add_argument("--data", type=json.loads, required=True, help="the data settings (JSON)")
    p.add_argument("--out-dir", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sizes = {task: train_size(args.data, task) for task in args.tasks}
    results = study_results(args.root, args.cells, args.tasks, args.alphas, args.k, sizes)
    if not 0.0 <= args.min_finetuned <= 1.0:
        parser.error(f"--min-finetuned {args.min_finetuned} must lie in [0, 1]")
    paths = write_study(results, args.out_dir, args.min_finetuned)
    chosen = choose_cell(results, args.min_finetuned)
    log.info(
        "chosen cell %s (score %.4f); wrote %s",
        chosen.name,
        chosen.score(),
        ", ".join(map(str, paths)),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
