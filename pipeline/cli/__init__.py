"""Command line: one subcommand per stage, explicit input and output paths.

    python -m pipeline merge METHOD --pretrained P --finetuned T1 T2 ... --out M.safetensors
    python -m pipeline basis --pretrained P --finetuned ... --k K --out basis.zarr
    python -m pipeline hessian --pretrained P --finetuned ... --fisher ... --basis B --out H.zarr

The Snakemake rules call these; they work as well on any state dicts without Snakemake.

The package by concern: `options` (argument types and help formatters), `parser` (the
subcommands) with `merge_stages`, `training_stages` and `report_stages` (their option tables), `merging`, `training`, `reporting` and
`show` (the commands), `runtime` (logs, devices, torch's deterministic mode) and `safety`
(outputs checked against inputs, one-line errors). torch is imported by the stages that
compute, not at import: `show` prints a CSV without it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from pipeline.cli.merging import cmd_basis, cmd_hessian, cmd_merge
from pipeline.cli.options import UsageError
from pipeline.cli.parser import build_parser
from pipeline.cli.reporting import cmd_landscape, cmd_plots, cmd_report, cmd_tables
from pipeline.cli.runtime import deterministic_torch, summary
from pipeline.cli.safety import check_outputs, error_line
from pipeline.cli.show import cmd_show, format_summary_text
from pipeline.cli.training import (
    cmd_evaluate,
    cmd_finetune,
    cmd_fisher,
    cmd_head,
    cmd_import,
    cmd_pretrain,
    cmd_smoke,
    cmd_theta0,
    cmd_zeroshot_head,
)

__all__ = [
    "UsageError",
    "build_parser",
    "check_outputs",
    "cmd_basis",
    "cmd_evaluate",
    "cmd_finetune",
    "cmd_fisher",
    "cmd_head",
    "cmd_hessian",
    "cmd_import",
    "cmd_landscape",
    "cmd_merge",
    "cmd_plots",
    "cmd_pretrain",
    "cmd_report",
    "cmd_show",
    "cmd_smoke",
    "cmd_tables",
    "cmd_theta0",
    "cmd_zeroshot_head",
    "deterministic_torch",
    "error_line",
    "format_summary_text",
    "main",
]

_REEXPORTED = ("BACKBONES", "build_encoder", "load_encoder", "load_head")


def __getattr__(name: str) -> Any:
    """pipeline.models.clip's loaders, re-exported without importing torch with the CLI."""
    if name in _REEXPORTED:
        from pipeline.models import clip

        return getattr(clip, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _stage_of(argv: Sequence[str]) -> str | None:
    """The stage an argument list names: its first word that is not an option."""
    return next((a for a in argv if not a.startswith("-")), None)


def _parse(argv: list[str], light: bool) -> argparse.Namespace:
    """The parsed command line; every stage but `show` first loads the plugins."""
    if not light:
        from pipeline import load_plugins

        load_plugins(os.environ.get("EPIMER_PLUGINS"))
    return build_parser(light=light).parse_args(argv)


def _run(args: argparse.Namespace, light: bool) -> int:
    """Run the stage: outputs checked against inputs and torch made deterministic first
    (`show`, `light`, runs as it is)."""
    func: Callable[[argparse.Namespace], int] = args.func
    if light:
        return func(args)
    check_outputs(args)
    deterministic_torch()
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    return func(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one stage; every failure ends in one `error:` line on stderr and exit status 2.

    `--debug` (or PIPELINE_DEBUG=1) prints the traceback after that line. `show` runs without
    torch (it prints a CSV); every other stage first imports the plugins EPIMER_PLUGINS names."""
    argv = list(sys.argv[1:] if argv is None else argv)
    light = _stage_of(argv) == "show"
    try:
        args = _parse(argv, light)
    except (UsageError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    debug = getattr(args, "debug", False) or os.environ.get("PIPELINE_DEBUG", "") not in ("", "0")
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    summary.setLevel(logging.INFO)  # its lines pass --quiet
    try:
        return _run(args, light)
    except Exception as err:  # ArtifactError is a ValueError
        # One line naming the file and tensor; the output was never renamed into place.
        print(f"error: {error_line(err)}", file=sys.stderr)
        if debug:
            import traceback

            traceback.print_exc()
        return 2
