"""The command line's parser: the top level, and one subcommand parser per stage built from
a table of its options (merge_stages, training_stages, report_stages)."""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline.cli.options import Formatter, Parser, StageListFormatter

DEBUG_HELP = "on an error, show the traceback after the one-line message"


@dataclass(frozen=True)
class Option:
    """One `add_argument` call: its names (or positional) and keywords."""

    flags: tuple[str, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)


def option(*flags: str, **kwargs: Any) -> Option:
    return Option(flags, kwargs)


@dataclass(frozen=True)
class Exclusive:
    """Options of which a command line may give one at the most."""

    options: tuple[Option, ...]


Entry = Option | Exclusive


def add_options(p: Any, entries: Sequence[Entry]) -> None:
    """Add the options of a table to a parser (or group), in order. A list or dict default is
    copied, so that no two parsers share one."""
    for entry in entries:
        if isinstance(entry, Exclusive):
            add_options(p.add_mutually_exclusive_group(), entry.options)
            continue
        kwargs = dict(entry.kwargs)
        if isinstance(kwargs.get("default"), (list, dict)):
            kwargs["default"] = copy.copy(kwargs["default"])
        p.add_argument(*entry.flags, **kwargs)


def add_common(p: argparse.ArgumentParser) -> None:
    """-q and --debug, which every stage takes."""
    p.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="no progress bars: warnings, errors and the stage's one-line summary only",
    )
    # SUPPRESS: the subcommand's default must not reset a `--debug` given before the stage name.
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)


Command = Callable[[argparse.Namespace], int]


def add_stage(
    sub: Any, name: str, help: str, func: Command, entries: Sequence[Entry]
) -> argparse.ArgumentParser:
    """A stage that runs torch: its help as description, the common options and --threads
    first, then its own."""
    p = sub.add_parser(name, help=help, description=help, formatter_class=Formatter)
    p.set_defaults(func=func)
    add_common(p)
    p.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice)"
    )
    add_options(p, entries)
    return p


def add_plain_stage(
    sub: Any,
    name: str,
    help: str,
    func: Command,
    entries: Sequence[Entry],
    description: str | None = None,
) -> argparse.ArgumentParser:
    """A stage with its own options first and the common ones last."""
    p = sub.add_parser(name, help=help, description=description, formatter_class=Formatter)
    add_options(p, entries)
    add_common(p)
    p.set_defaults(func=func)
    return p


def add_show(sub: Any) -> None:
    from pipeline.cli.show import cmd_show

    add_plain_stage(
        sub,
        "show",
        "print a summary.csv as a table (accuracies as fractions, as in the tables)",
        cmd_show,
        [option("summary", help="path of summary.csv")],
    )


def build_parser(light: bool = False) -> argparse.ArgumentParser:
    """The command line of every stage; `light`: of `show` alone (no torch import)."""
    parser = Parser(
        prog="python -m pipeline",
        description="EpiMer and baseline merges of fine-tuned CLIP-ViT encoders; one subcommand per stage.",
        epilog="`python -m pipeline STAGE --help` documents a stage's options.",
        formatter_class=StageListFormatter,
    )
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", metavar="STAGE", required=True)
    if light:
        add_show(sub)
        return parser
    from pipeline.cli.merge_stages import add_merge_stages
    from pipeline.cli.report_stages import add_report_stages
    from pipeline.cli.training_stages import add_training_stages

    add_merge_stages(sub)
    add_training_stages(sub)
    add_show(sub)
    add_report_stages(sub)
    return parser
