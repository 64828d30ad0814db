"""The report stages: summary.csv from the evaluations, the paper-style tables, the figures,
and the loss landscape they draw."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline import ARTIFACT_VERSION
from pipeline.cli.runtime import log, task_head


def cmd_report(args: argparse.Namespace) -> int:
    from pipeline.report import write_summary

    write_summary(Path(args.root), args.tasks, args.runs, Path(args.out))
    return 0


def _paper_settings(args: argparse.Namespace) -> Any:
    from pipeline.tables import PaperSettings

    if args.paper_k is not None and args.paper_k < 1:
        raise ValueError(f"--paper-k must be a positive integer, got {args.paper_k}")
    if args.paper_fraction is not None and not 0 < args.paper_fraction <= 1:
        raise ValueError(f"--paper-fraction must lie in (0, 1], got {args.paper_fraction}")
    return PaperSettings(
        k=args.paper_k,
        fraction=args.paper_fraction,
        alpha=args.paper_alpha,
        flat_alpha=args.paper_flat_alpha,
        heads=args.heads_source,
    )


def cmd_tables(args: argparse.Namespace) -> int:
    from pipeline.tables import write_tables

    for path in write_tables(args.summary, args.out_dir, _paper_settings(args)):
        log.info("wrote %s", path)
    return 0


def cmd_plots(args: argparse.Namespace) -> int:
    from pipeline.plots import layer_eta_from_reports, write_plots
    from pipeline.tables import read_summary

    tasks, runs = read_summary(args.summary)
    paths = write_plots(
        tasks,
        runs,
        layer_eta_from_reports(args.merged),
        args.out_dir,
        args.formats,
        args.dpi,
        paper=_paper_settings(args),
    )
    if args.landscape:
        paths += _plot_landscape(
            args.landscape, runs, args.merged, args.out_dir, args.formats, args.dpi
        )
    log.info("wrote %d figures to %s", len(paths), args.out_dir)
    return 0


def _landscape_images(args: argparse.Namespace) -> dict[str, tuple[Any, Any]]:
    """Per task, the first --max-images images of the split and their labels: a fixed
    subset, the same for every grid point."""
    import torch

    from pipeline.data import open_dataset
    from pipeline.models.clip import eval_transform

    datasets = {}
    for task in args.tasks:
        dataset = open_dataset(args.data, task, args.split, transform=eval_transform(args.backbone))
        items = [dataset[i] for i in range(min(len(dataset), args.max_images))]
        datasets[task] = (
            torch.stack([x for x, _ in items]),
            torch.tensor([int(y) for _, y in items]),
        )
    return datasets


def cmd_landscape(args: argparse.Namespace) -> int:
    from pipeline.devices import resolve_device
    from pipeline.evaluate import check_sequence
    from pipeline.landscape import compute_landscape, write_landscape
    from pipeline.models.clip import load_encoder
    from pipeline.store import ZarrWriter, open_tensors, provenance

    check_sequence("heads", args.heads, len(args.tasks))
    check_sequence("fine-tuned checkpoints", args.finetuned, len(args.tasks))
    if args.max_images < 1:
        raise ValueError(f"--max-images must be at least 1, got {args.max_images}")
    heads = {task: task_head(path, args.data, task) for task, path in zip(args.tasks, args.heads)}
    datasets = _landscape_images(args)
    encoder = load_encoder(args.backbone, args.pretrained)
    pretrained, finetuned = open_tensors(args.pretrained), [open_tensors(p) for p in args.finetuned]
    result, plane = compute_landscape(
        pretrained,
        finetuned,
        args.tasks,
        encoder,
        heads,
        datasets,
        grid=args.grid,
        margin=args.margin,
        split=args.split,
        batch_size=args.batch_size,
        progress=not args.quiet,
        device=resolve_device(args.device),
    )
    params = {
        "grid": args.grid,
        "margin": args.margin,
        "split": args.split,
        "max_images": args.max_images,
        "data": args.data,
    }
    inputs = [args.pretrained, *args.finetuned, *args.heads]
    with ZarrWriter(args.out, provenance("landscape", params, inputs, ARTIFACT_VERSION)) as writer:
        attrs = write_landscape(
            result, plane, lambda name, t, group: writer.write(name, t, group=group)
        )
        writer.set_attrs(attrs)
    return 0


def _plot_landscape(
    landscape: str, runs: Any, merged: Sequence[str], out_dir: str, formats: Sequence[str], dpi: int
) -> list[Path]:
    """landscape_{task} and landscape figures, each method's chosen merge marked."""
    from pipeline.landscape import merged_markers, read_landscape
    from pipeline.plots import write_landscape_plots
    from pipeline.store import open_tensors
    from pipeline.tables import LABELS, chosen_settings

    chosen = {
        method: (
            run.setting,
            f"{LABELS.get(method, method)} {run.setting}"
            + ("" if how == "validation" else " (best on test)"),
        )
        for method, (run, how) in chosen_settings(runs).items()
    }
    with open_tensors(landscape) as reader:
        result = read_landscape(reader)
        markers = merged_markers(reader, chosen, merged)
    return write_landscape_plots(result, markers, out_dir, formats, dpi)
