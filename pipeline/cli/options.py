"""Argument types, validators and help formatters of the command line (no torch import)."""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

DTYPES = ("float32", "float64")  # compute dtypes of the merge stages
COMPUTE_DTYPES = ("bfloat16", "float32")  # of the stages that run the encoder on data


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Help with each option's default, where it has one worth stating: not for required
    options, flags, options without a default, or a help text that already names it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            action.required
            or "default" in text
            or default in (None, False, argparse.SUPPRESS)
            or not action.option_strings
            or isinstance(action, argparse._StoreTrueAction)
        ):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        shown = str(shown).replace("%", "%%")  # argparse %-formats help texts
        return f"{text} (default: {shown})" if text else f"default: {shown}"


class StageListFormatter(Formatter):
    """Top-level help: one line per stage. argparse measures stage names one indent level
    shallower than it prints them, which wraps the longest; count that level, and use a
    width that fits the descriptions."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=30, width=140)

    def add_argument(self, action: argparse.Action) -> None:
        super().add_argument(action)
        if getattr(action, "_choices_actions", None):
            longest = max(len(a.metavar or a.dest) for a in action._choices_actions)  # type: ignore[attr-defined]
            self._action_max_length = max(
                self._action_max_length, longest + self._current_indent + 2 * self._indent_increment
            )


class UsageError(ValueError):
    """A command line argparse refuses (unknown option, bad value); `main` prints it as one line."""


class Parser(argparse.ArgumentParser):
    """argparse, with errors raised to `main` (one `error:` line, exit status 2) instead of
    printed with the usage text; its subcommand parsers are of this class too."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def finite_float(text: str, what: str = "the value") -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{what} must be finite, got {text}")
    return value


def alpha(text: str) -> float:
    """--alpha: a finite number > 0."""
    value = finite_float(text, "alpha")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"alpha must be > 0, got {value}")
    return value


def eps(text: str) -> float:
    """--eps: a finite number >= 0."""
    value = finite_float(text, "eps")
    if value < 0:
        raise argparse.ArgumentTypeError(f"eps must be >= 0, got {value}")
    return value


def percentage(text: str) -> float:
    """--ties-density: a percentage in (0, 100]."""
    value = finite_float(text, "TIES density")
    if not 0 < value <= 100:
        raise argparse.ArgumentTypeError(f"TIES density is a percentage in (0, 100], got {value}")
    return value


def fraction(text: str) -> float:
    """--iso-common-fraction: a number in [0, 1]."""
    value = finite_float(text, "the Iso-CTS common-space fraction")
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(
            f"the Iso-CTS common-space fraction must be in [0, 1], got {value}"
        )
    return value


def prior(text: str) -> float:
    """--gradmatch-prior: a finite number >= 0."""
    value = finite_float(text, "the gradient-matching prior precision")
    if value < 0:
        raise argparse.ArgumentTypeError(
            f"the gradient-matching prior precision must be >= 0, got {value}"
        )
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def json_object(text: str) -> dict[str, Any]:
    """--data, --train: a JSON object."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON: {text!r} ({err})") from err
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value
