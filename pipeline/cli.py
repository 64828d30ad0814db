"""Command line: one subcommand per stage, explicit input and output paths.

    python -m pipeline merge METHOD --pretrained P --finetuned T1 T2 ... --out M.safetensors
    python -m pipeline basis --pretrained P --finetuned ... --k K --out basis.zarr
    python -m pipeline hessian --pretrained P --finetuned ... --fisher ... --basis B --out H.zarr

The Snakemake rules call these; they work as well on any state dicts without Snakemake.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import ARTIFACT_VERSION

if TYPE_CHECKING:
    import torch

# torch is imported by the stages that compute, not at import: `show` prints a CSV without it.
log = logging.getLogger("pipeline")
# One line per stage run that its log keeps even under --quiet: wall time and what the stage
# measured (η, CG steps, accuracies).
_summary = logging.getLogger("pipeline.summary")

_DTYPES = ("float32", "float64")  # compute dtypes of the merge stages


def _dtype(name: str) -> torch.dtype:
    """The torch dtype of a --dtype choice (float32, float64, bfloat16)."""
    import torch

    return getattr(torch, name)


class _Formatter(argparse.RawDescriptionHelpFormatter):
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


class UsageError(ValueError):
    """A command line argparse refuses (unknown option, bad value); `main` prints it as one line."""


class _Parser(argparse.ArgumentParser):
    """argparse, with errors raised to `main` (one `error:` line, exit status 2) instead of
    printed with the usage text; its subcommand parsers are of this class too."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _finite_float(text: str, what: str = "the value") -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{what} must be finite, got {text}")
    return value


def _alpha(text: str) -> float:
    """--alpha: a finite number > 0."""
    value = _finite_float(text, "alpha")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"alpha must be > 0, got {value}")
    return value


def _eps(text: str) -> float:
    """--eps: a finite number >= 0."""
    value = _finite_float(text, "eps")
    if value < 0:
        raise argparse.ArgumentTypeError(f"eps must be >= 0, got {value}")
    return value


def _percentage(text: str) -> float:
    """--ties-density: a percentage in (0, 100]."""
    value = _finite_float(text, "TIES density")
    if not 0 < value <= 100:
        raise argparse.ArgumentTypeError(f"TIES density is a percentage in (0, 100], got {value}")
    return value


def _fraction(text: str) -> float:
    """--iso-common-fraction: a number in [0, 1]."""
    value = _finite_float(text, "the Iso-CTS common-space fraction")
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(
            f"the Iso-CTS common-space fraction must be in [0, 1], got {value}"
        )
    return value


def _prior(text: str) -> float:
    """--gradmatch-prior: a finite number >= 0."""
    value = _finite_float(text, "the gradient-matching prior precision")
    if value < 0:
        raise argparse.ArgumentTypeError(
            f"the gradient-matching prior precision must be >= 0, got {value}"
        )
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


class _StageListFormatter(_Formatter):
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


def _add_model_inputs(p: argparse.ArgumentParser, fisher: str) -> None:
    p.add_argument(
        "--pretrained", required=True, metavar="P", help="θ0: safetensors file or Zarr group"
    )
    p.add_argument(
        "--finetuned",
        required=True,
        nargs="+",
        metavar="T",
        help="θ_1 … θ_T: one safetensors file or Zarr group per task, same tensor names and shapes as θ0",
    )
    p.add_argument(
        "--fisher",
        nargs="+",
        metavar="F",
        default=None,
        help=f"{fisher} one empirical Fisher diagonal per task (safetensors or Zarr, θ0's tensor names), "
        "in the order of --finetuned",
    )
    p.add_argument(
        "--dtype",
        choices=_DTYPES,
        default="float32",
        help="compute dtype of large products (p×p solves are always float64)",
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="where SVDs, projected Hessians and lifts run (cpu, cuda, cuda:1, ...); inputs stream from the CPU one layer at a time",
    )


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="no progress bars: warnings, errors and the stage's one-line summary only",
    )
    # SUPPRESS: the subcommand's default must not reset a `--debug` given before the stage name.
    p.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="on an error, show the traceback after the one-line message",
    )


def build_parser(light: bool = False) -> argparse.ArgumentParser:
    """The command line of every stage; `light`: of `show` alone (no torch import)."""
    parser = _Parser(
        prog="python -m pipeline",
        description="EpiMer and baseline merges of fine-tuned CLIP-ViT encoders; one subcommand per stage.",
        epilog="`python -m pipeline STAGE --help` documents a stage's options.",
        formatter_class=_StageListFormatter,
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help="on an error, show the traceback after the one-line message",
    )
    sub = parser.add_subparsers(dest="command", metavar="STAGE", required=True)
    if light:
        _add_show(sub)
        return parser

    from pipeline.methods import COORDINATES, METHODS
    from pipeline.methods import ties as ties_method
    from pipeline.methods.epimer import AGGREGATORS

    methods = "\n".join(f"  {name:<8} {m.summary}" for name, m in METHODS.items())
    p = sub.add_parser(
        "merge",
        help="merge fine-tuned checkpoints with one method (no Snakemake needed)",
        description="Merge fine-tuned checkpoints, streaming tensor by tensor.\n\nmethods:\n"
        + methods
        + "\n\nMatrix layers (2-D floating tensors) get the subspace treatment in tsvm/epimer; every other"
        " floating tensor is merged as a vector tensor; integer tensors are copied from θ0.",
        formatter_class=_Formatter,
    )
    p.add_argument("method", metavar="METHOD", help=f"one of: {', '.join(METHODS)}")
    _add_model_inputs(p, "required for fisher and epimer (optional for tsvm, for diagnostics):")
    p.add_argument(
        "--k",
        type=_positive_int,
        default=32,
        help="tsvm/epimer: per-task rank, clamped per layer to ⌊min(d_out, d_in)/T⌋",
    )
    p.add_argument(
        "--alpha",
        type=_alpha,
        nargs="+",
        default=None,
        help="global scale α > 0 (default: 1/T for ta, 1.0 for ties, tsvm and epimer; not used by fisher). Several values merge once per α in one pass over the inputs (bases, Hessians and reads shared); --out and --report then need an {alpha} placeholder",
    )
    p.add_argument(
        "--aggregator",
        choices=AGGREGATORS,
        default="frechet_sum",
        help="epimer: α T H̄⁻¹ b (frechet_sum) or α H̄⁻¹ b (frechet_mean)",
    )
    p.add_argument(
        "--coords",
        choices=COORDINATES,
        default="tagged",
        help="epimer: task coordinates in the subspace",
    )
    p.add_argument(
        "--eps",
        type=_eps,
        default=1e-8,
        help="epimer: jitter ε I added to every projected Hessian; fisher: floor added to every F_t",
    )
    p.add_argument(
        "--ties-density",
        type=_percentage,
        default=20.0,
        help="ties: percentage of each task vector kept (top K %% by magnitude)",
    )
    p.add_argument(
        "--ties-sign",
        choices=ties_method.SIGN_RULES,
        default="mass",
        help="ties: elect each coordinate's sign by the sum of the kept values (`mass`, the TIES paper's rule) or by the number of kept values of each sign (`frequency`, + on a tie)",
    )
    p.add_argument(
        "--ties-disjoint",
        choices=ties_method.DISJOINT_MODES,
        default="mean",
        help="ties: disjoint mean, or sum without division",
    )
    p.add_argument(
        "--iso-common-fraction",
        type=_fraction,
        default=0.8,
        help="isocts: share of each layer's rank kept as the common subspace, in [0, 1]",
    )
    p.add_argument(
        "--gradmatch-prior",
        type=_prior,
        default=0.0,
        help="gradmatch: prior precision h >= 0 (H_0 = h I, in the Fisher's units)",
    )
    p.add_argument(
        "--fisher-normalise",
        action="store_true",
        help="fisher: divide each F_t by its global norm first",
    )
    p.add_argument(
        "--fisher-rank",
        type=int,
        default=None,
        metavar="R",
        help="epimer: form H̄ from a non-negative rank-R factorisation of F̄ (far cheaper, approximate; the relative error is reported per layer). Default: exact",
    )
    p.add_argument(
        "--solver",
        choices=["auto", "dense", "cg"],
        default="auto",
        help="epimer without --hessian: `dense` forms H̄ (d_out·d_in·p²/2 per layer) and solves by Cholesky; `cg` never forms it: conjugate gradients preconditioned by diag(H̄), to ‖b − H̄x‖ ≤ 1e-6‖b‖, up to 1e-5 accepted (the float32 floor of ill-conditioned layers); steps and residuals reported; H̄ is formed where CG stays above that after p steps; `auto` runs CG where its first steps predict convergence within p/8 steps (half the cost of forming H̄) and forms H̄ elsewhere, and for --dtype float64, --eps 0 or --fisher-rank. Default: auto",
    )
    p.add_argument(
        "--basis",
        default=None,
        help="tsvm/epimer: read tagged bases from this basis/k{k}.zarr artifact instead of computing them",
    )
    p.add_argument(
        "--hessian",
        default=None,
        help="epimer: read projected Hessians from this hessian/k{k}_f{f}.zarr artifact (needs --basis)",
    )
    p.add_argument(
        "--out",
        nargs="+",
        required=True,
        metavar="MERGED",
        help="output: .safetensors file or .zarr group; with several --alpha values, one path with an {alpha} "
        "placeholder or one path per α, in the order of --alpha",
    )
    p.add_argument(
        "--report",
        metavar="REPORT.json",
        default=None,
        help="write diagnostics (η per layer and total, V_S, R_S) and timings as JSON",
    )
    _add_common(p)
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser(
        "basis",
        help="cached stage: per-layer tagged bases for one k (Zarr)",
        formatter_class=_Formatter,
    )
    _add_model_inputs(p, "not used;")
    p.add_argument(
        "--k", type=_positive_int, required=True, help="per-task rank before the per-layer clamp"
    )
    p.add_argument("--out", required=True, help="output Zarr group, e.g. basis/k32.zarr")
    _add_common(p)
    p.set_defaults(func=cmd_basis)

    p = sub.add_parser(
        "hessian",
        help="cached stage: per-layer projected Hessians for one (k, fraction) (Zarr)",
        formatter_class=_Formatter,
    )
    _add_model_inputs(p, "required:")
    p.add_argument("--basis", required=True, help="the basis/k{k}.zarr artifact")
    p.add_argument(
        "--eps", type=_eps, default=1e-8, help="jitter ε I added to every projected Hessian"
    )
    p.add_argument(
        "--coords",
        nargs="+",
        choices=COORDINATES,
        default=list(COORDINATES),
        help="coordinate modes to store terms for (merges with other --coords then fail); tagged alone skips T matrix-vector products per layer",
    )
    p.add_argument(
        "--fisher-rank",
        type=int,
        default=None,
        metavar="R",
        help="form H̄ from a non-negative rank-R factorisation of F̄ (far cheaper, approximate; the relative error is stored per layer). Default: exact",
    )
    p.add_argument(
        "--solver",
        choices=["auto", "dense", "cg"],
        default="auto",
        help="as merge --solver: `dense` stores H̄ per layer; where `cg` or `auto` solve a layer by conjugate gradients, it stores H̄⁻¹b and the products H̄δ̄, H̄·H̄⁻¹b per coordinate mode instead (all an EpiMer merge and its diagnostics need, at any α and aggregator). Default: auto",
    )
    p.add_argument("--out", required=True, help="output Zarr group, e.g. hessian/k32_f0.05.zarr")
    _add_common(p)
    p.set_defaults(func=cmd_hessian)

    _add_training_stages(sub)
    _add_report_stages(sub)
    return parser


# --------------------------------------------------------------------------- commands


def _open_inputs(args: argparse.Namespace):
    from pipeline.merge import MergeInputs
    from pipeline.store import open_tensors

    return MergeInputs(
        pretrained=open_tensors(args.pretrained),
        finetuned=[open_tensors(p) for p in args.finetuned],
        fishers=[open_tensors(p) for p in args.fisher] if args.fisher else None,
    )


def _input_paths(args: argparse.Namespace) -> list[str]:
    return [args.pretrained, *args.finetuned, *(args.fisher or [])]


def cmd_merge(args: argparse.Namespace) -> int:
    from contextlib import ExitStack
    from dataclasses import replace
    from functools import partial

    from pipeline.curvature import effective_solver
    from pipeline.merge import MergeTarget, StoredSubspace, merge_sweep
    from pipeline.methods import MergeSettings, get_method
    from pipeline.store import SafetensorsWriter, WriteBehind, ZarrWriter, provenance

    method = get_method(args.method)
    T = len(args.finetuned)
    if "alpha" not in method.uses and args.alpha is not None:
        raise ValueError(
            f"{method.name} takes no --alpha (its artifacts are named by {', '.join(method.uses)})"
        )
    default = 1.0  # recorded, unused, for a method without α
    if "alpha" in method.uses:
        default = (
            method.default_alpha if method.default_alpha is not None else 1.0 / T
        )  # None: the mean, 1/T
    alphas = args.alpha if args.alpha is not None else [default]
    if len(alphas) != len(set(alphas)):
        raise ValueError(f"--alpha lists a value twice: {' '.join(map(str, alphas))}")
    sweep = len(alphas) > 1
    if len(args.out) not in (1, len(alphas)):
        raise ValueError(
            f"--out: got {len(args.out)} paths for {len(alphas)} --alpha values; give one per α, or one with an {{alpha}} placeholder"
        )
    for option, value in (
        ("--out", args.out[0] if len(args.out) == 1 else "{alpha}"),
        ("--report", args.report),
    ):
        if sweep and value is not None and "{alpha}" not in value:
            raise ValueError(
                f"{option} {value}: with several --alpha values it needs an {{alpha}} placeholder, e.g. merged_a{{alpha}}.zarr"
            )
    settings = MergeSettings(
        alpha=alphas[0],
        k=args.k,
        aggregator=args.aggregator,
        coords=args.coords,
        eps=args.eps,
        ties_density=args.ties_density,
        ties_sign=args.ties_sign,
        ties_disjoint=args.ties_disjoint,
        fisher_normalise=args.fisher_normalise,
        fisher_rank=args.fisher_rank,
        solver=args.solver,
        iso_common_fraction=args.iso_common_fraction,
        gradmatch_prior=args.gradmatch_prior,
        dtype=_dtype(args.dtype),
        device=_device(args.device),
    )
    inputs = _open_inputs(args)
    subspace = None
    if args.hessian and not args.basis:
        raise ValueError("--hessian needs the --basis it was computed from")
    if args.basis:
        _check_stored_subspace(args)
        subspace = StoredSubspace(args.basis, args.hessian, settings.dtype)
    if args.hessian:
        # The stored Hessians decide whether H̄ is exact or low-rank: record what was used.
        stored = subspace.hessian_store.attrs().get("parameters", {})
        stored_rank, stored_solver = stored.get("fisher_rank"), stored.get("solver", "dense")
        if args.fisher_rank is not None and args.fisher_rank != stored_rank:
            raise ValueError(
                f"--fisher-rank {args.fisher_rank}: the Hessians in {args.hessian} were formed "
                f"{'exactly' if stored_rank is None else f'with fisher_rank {stored_rank}'}; "
                "--fisher-rank with --hessian must match them (or leave it out)"
            )
        if args.solver != "auto" and args.solver != stored_solver:
            raise ValueError(
                f"--solver {args.solver}: the Hessians in {args.hessian} were made with solver {stored_solver}; "
                "--solver with --hessian must match it (or leave it out)"
            )
        settings = replace(settings, fisher_rank=stored_rank, solver=stored_solver)
    elif settings.solver == "auto":  # recorded as what it means here
        settings = replace(
            settings,
            solver=effective_solver("auto", settings.fisher_rank) if method.curvature else "dense",
        )
    if len(args.out) == len(alphas):
        outs = [Path(out) for out in args.out]
    else:
        outs = [Path(args.out[0].replace("{alpha}", str(a))) for a in alphas]
    specs = {
        n: (inputs.pretrained.shape(n), inputs.pretrained.dtype(n))
        for n in inputs.pretrained.keys()
    }
    start = time.perf_counter()
    with ExitStack() as stack:
        targets, zarr_writers = (
            [],
            [],
        )  # zarr_writers: the Zarr writer of each target (None: safetensors)
        for a, out in zip(alphas, outs):
            params = {**vars_settings(settings), "alpha": a}
            if out.suffix == ".zarr":
                attrs = provenance(
                    "merged",
                    {"method": method.name, **params},
                    _input_paths(args),
                    ARTIFACT_VERSION,
                )
                writer = stack.enter_context(ZarrWriter(out, attrs, finite=True))
                write = stack.enter_context(WriteBehind(writer.write))
                targets.append(MergeTarget(a, write, partial(write, group="coords")))
                zarr_writers.append(writer)
            else:
                meta = {"method": method.name, "settings": json.dumps(params)}
                writer = stack.enter_context(SafetensorsWriter(out, specs, meta, finite=True))
                targets.append(MergeTarget(a, stack.enter_context(WriteBehind(writer.write))))
                zarr_writers.append(None)
        reports = merge_sweep(
            method.name, inputs, settings, targets, subspace=subspace, progress=not args.quiet
        )
        for target, writer, report in zip(targets, zarr_writers, reports):
            target.write.flush()
            if writer is not None:
                # Timings stay out of the artifact (they are in --report), so it is reproducible bit for bit.
                stored = {k: v for k, v in report.as_dict().items() if k != "timings_s"}
                writer.set_attrs({"diagnostics": report.totals(), "report": stored})
    reports[0].timings["total"] = time.perf_counter() - start
    for a, out, report in zip(alphas, outs, reports):
        totals = report.totals()
        _summary.info(
            "merged %d checkpoints with %s%s in %.2f s%s -> %s%s",
            T,
            method.name,
            f" at α={a}" if "alpha" in method.uses else "",
            report.timings["total"],
            f" (one pass for {len(alphas)} α)" if sweep else "",
            out,
            "".join(f", {k}={v:.4g}" for k, v in totals.items()),
        )
        if args.report:
            _write_json(args.report.replace("{alpha}", str(a)), report.as_dict())
    return 0


def _check_stored_subspace(args: argparse.Namespace) -> None:
    """Refuse cached basis/hessian artifacts made from other checkpoints, k, Fisher or ε."""
    from pipeline.store import check_provenance

    models = [args.pretrained, *args.finetuned]
    check_provenance(
        args.basis,
        models,
        artifact="basis",
        parameters={"k": args.k},
        artifact_version=ARTIFACT_VERSION,
    )
    if args.hessian:
        check_provenance(
            args.hessian,
            [*models, *(args.fisher or []), args.basis],
            artifact="hessian",
            parameters={"eps": args.eps},
            artifact_version=ARTIFACT_VERSION,
        )


def vars_settings(settings: Any) -> dict[str, Any]:
    import torch

    out = {
        k: (str(v).replace("torch.", "") if isinstance(v, torch.dtype) else v)
        for k, v in vars(settings).items()
    }
    if out.get("fisher_rank", 0) is None:
        del out["fisher_rank"]  # exact H̄: recorded as before the option existed
    if out.get("solver") == "dense":
        del out["solver"]  # the default: recorded as before the option existed
    return out


def _device(name: str) -> str:
    """A torch device string, checked: `cuda` without a usable GPU is an error, not a silent CPU run."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"unknown --device `{name}` ({err})") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(
            f"--device {name}: merges run on cpu, cuda or cuda:N, not on `{device.type}`"
        )
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"--device {name}: CUDA is not available on this machine (use --device cpu)"
        )
    return str(device)


def cmd_basis(args: argparse.Namespace) -> int:
    from pipeline.merge import build_basis
    from pipeline.store import ZarrWriter, provenance

    start = time.perf_counter()
    inputs = _open_inputs(args)
    attrs = provenance(
        "basis",
        {"k": args.k, "dtype": args.dtype},
        [args.pretrained, *args.finetuned],
        ARTIFACT_VERSION,
    )
    with ZarrWriter(args.out, attrs, finite=True) as writer:
        ranks = build_basis(
            inputs,
            args.k,
            writer,
            _dtype(args.dtype),
            progress=not args.quiet,
            device=_device(args.device),
        )
        writer.set_attrs({"k": args.k, "num_tasks": inputs.num_tasks, "effective_k": ranks})
    _summary.info(
        "tagged bases of %d layers at k=%d in %.2f s -> %s",
        len(ranks),
        args.k,
        time.perf_counter() - start,
        args.out,
    )
    return 0


def cmd_hessian(args: argparse.Namespace) -> int:
    from pipeline.curvature import check_solver, effective_solver
    from pipeline.merge import build_hessian
    from pipeline.store import ZarrWriter, check_provenance, provenance

    if not args.fisher:
        raise ValueError(
            "the hessian stage needs --fisher (one Fisher diagonal per fine-tuned checkpoint)"
        )
    check_provenance(
        args.basis,
        [args.pretrained, *args.finetuned],
        artifact="basis",
        artifact_version=ARTIFACT_VERSION,
    )
    inputs = _open_inputs(args)
    if args.fisher_rank is not None and args.fisher_rank < 1:
        raise ValueError(f"--fisher-rank must be a positive integer, got {args.fisher_rank}")
    check_solver(args.solver, args.fisher_rank)
    solver = effective_solver(args.solver, args.fisher_rank)
    parameters = {"eps": args.eps, "dtype": args.dtype, "coords": args.coords}
    if args.fisher_rank is not None:
        parameters["fisher_rank"] = args.fisher_rank
    if solver != "dense":
        parameters["solver"] = solver  # H̄ formed: recorded as before the option existed
    attrs = provenance("hessian", parameters, [*_input_paths(args), args.basis], ARTIFACT_VERSION)
    start = time.perf_counter()
    with ZarrWriter(args.out, attrs, finite=True) as writer:
        counts = build_hessian(
            inputs,
            args.basis,
            args.eps,
            writer,
            _dtype(args.dtype),
            progress=not args.quiet,
            device=_device(args.device),
            coords=args.coords,
            fisher_rank=args.fisher_rank,
            solver=solver,
        )
        writer.set_attrs({"num_tasks": inputs.num_tasks, "eps": args.eps})
    _summary.info(
        "projected Hessians of %d layers (solver %s: %d formed, %d by CG, at most %d CG steps) in %.2f s -> %s",
        counts["layers"],
        solver,
        counts["dense_layers"],
        counts["cg_layers"],
        counts["cg_iterations"],
        time.perf_counter() - start,
        args.out,
    )
    return 0


def _write_json(path: str | Path, data: dict[str, Any]) -> None:
    from pipeline.store import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str))


# --------------------------------------------------------------------------- training, Fisher, evaluation


def _json(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"not valid JSON: {text!r} ({err})") from err
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object, got {text!r}")
    return value


_REEXPORTED = ("BACKBONES", "build_encoder", "load_encoder", "load_head")


def __getattr__(name: str) -> Any:
    """pipeline.models.clip's loaders, re-exported without importing torch with the CLI."""
    if name in _REEXPORTED:
        from pipeline.models import clip

        return getattr(clip, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _add_stage(
    sub: Any, name: str, help: str, func: Callable[[argparse.Namespace], int]
) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=help, formatter_class=_Formatter)
    p.set_defaults(func=func)
    _add_common(p)
    p.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice)"
    )
    return p


_COMPUTE_DTYPES = ("bfloat16", "float32")  # of the stages that run the encoder on data


def _compute_dtype(name: str) -> torch.dtype:
    return _dtype(name)


def _add_compute_options(p: argparse.ArgumentParser, dtype_help: str) -> None:
    """--device, --dtype, --num-workers of the stages that run the encoder on data."""
    p.add_argument(
        "--device",
        default="auto",
        help="cpu, cuda, cuda:N, or auto (cuda when available, else cpu)",
    )
    p.add_argument("--dtype", choices=_COMPUTE_DTYPES, default="float32", help=dtype_help)
    p.add_argument(
        "--num-workers",
        type=int,
        default=0,
        help="DataLoader worker processes reading and transforming images (0: in the main process)",
    )


def _add_training_stages(sub: Any) -> None:
    data_help = (
        'the config\'s `data` section as JSON, e.g. \'{"source": "synthetic", "train_size": 2000}\''
    )
    backbone_help = "the encoder architecture (demo, demo-96, ViT-B-32, ViT-B-16, ViT-L-14; pipeline/models/clip.py)"
    task_help = "the task (a name the data settings know, e.g. shapes, or mnist for real data)"
    p = _add_stage(
        sub,
        "pretrain",
        "demo: pretrain θ0 (generic or attributes task), or write the shipped θ0",
        cmd_pretrain,
    )
    p.add_argument("--backbone", default="demo", help=backbone_help)
    p.add_argument("--data", type=_json, default=None, help=data_help + " (required to train)")
    shipped = p.add_mutually_exclusive_group()
    shipped.add_argument(
        "--shipped",
        action="store_true",
        help="write the shipped θ0 of the demo (its SHA-256 checked) instead of training",
    )
    shipped.add_argument(
        "--regenerate-shipped",
        action="store_true",
        help="train with the shipped θ0's recorded recipe (backbone, data, train, threads) and "
        "fail unless the result is the shipped file, bit for bit",
    )
    p.add_argument(
        "--train",
        type=_json,
        default={},
        help="training settings as JSON (epochs, lr, batch_size, seed, train_size)",
    )
    p.add_argument("--out", required=True, help="output checkpoint (.safetensors)")

    p = _add_stage(sub, "head", "fit a task's frozen linear head on θ0 features", cmd_head)
    p.add_argument("--task", required=True, help=task_help)
    p.add_argument("--pretrained", required=True, help="θ0 checkpoint")
    p.add_argument("--backbone", default="demo", help=backbone_help)
    p.add_argument("--data", type=_json, required=True, help=data_help)
    p.add_argument(
        "--train", type=_json, default={}, help="head settings as JSON (epochs, lr, seed)"
    )
    p.add_argument(
        "--out",
        required=True,
        help="output head (.safetensors with `weight` [C, D] and `bias` [C])",
    )

    p = _add_stage(
        sub, "finetune", "fine-tune the encoder on one task with its frozen head", cmd_finetune
    )
    p.add_argument("--task", required=True, help=task_help)
    p.add_argument("--pretrained", required=True, help="θ0 checkpoint")
    p.add_argument("--head", required=True, help="the task's head")
    p.add_argument("--backbone", default="demo", help=backbone_help)
    p.add_argument("--data", type=_json, required=True, help=data_help)
    p.add_argument(
        "--train",
        type=_json,
        default={},
        help="fine-tuning settings as JSON (epochs, lr, batch_size, weight_decay, seed)",
    )
    p.add_argument("--out", required=True, help="output checkpoint θ_t (.safetensors)")

    p = _add_stage(
        sub, "fisher", "diagonal Fisher estimate of a fine-tuned encoder (Zarr)", cmd_fisher
    )
    p.add_argument("--task", required=True, help=task_help)
    p.add_argument("--checkpoint", required=True, help="θ_t")
    p.add_argument("--head", required=True, help="the task's head")
    p.add_argument("--backbone", default="demo", help=backbone_help)
    p.add_argument("--data", type=_json, required=True, help=data_help)
    p.add_argument(
        "--fraction",
        type=float,
        required=True,
        help="data fraction f in (0, 1]: the first max(1, ⌊f·N/B⌋) batches of one seeded ordering",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=64,
        help="samples per mini-batch of the seeded ordering (a fraction keeps whole batches)",
    )
    p.add_argument(
        "--chunk-size",
        type=int,
        default=8,
        help="samples per vectorised per-sample-gradient chunk (per_sample), or per forward and backward pass within a mini-batch (the other estimators)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the sample ordering shared by all fractions"
    )
    p.add_argument(
        "--estimator",
        choices=["per_sample", "batch", "first_moment", "first_moment_ema"],
        default="per_sample",
        help="per_sample: mean of per-sample squared gradients (paper eq. 27; default); batch: FusionBench's squared "
        "mini-batch gradients over the sample count; first_moment: u² with u the mean mini-batch gradient (appendix C.3); "
        "first_moment_ema: u² with u Adam's bias-corrected running average (β₁ = 0.9) of the mini-batch gradients",
    )
    _add_compute_options(
        p,
        dtype_help="float32, or bfloat16 autocast for the forward and backward passes (Fisher squares and sums stay float32)",
    )
    p.add_argument(
        "--out", required=True, help="output Zarr group, e.g. fisher/per_sample/{task}/f0.05.zarr"
    )

    p = _add_stage(
        sub,
        "evaluate",
        "top-1 accuracy of checkpoints on every task's test (and val) split (one CSV each)",
        cmd_evaluate,
    )
    p.add_argument(
        "--checkpoint",
        nargs="+",
        required=True,
        metavar="CKPT",
        help="encoder state dicts (.safetensors or merged .zarr); several are evaluated in one process on data read once",
    )
    p.add_argument("--backbone", default="demo", help=backbone_help)
    p.add_argument(
        "--tasks",
        nargs="+",
        required=True,
        help="the tasks to evaluate on (names of the data's tasks)",
    )
    p.add_argument(
        "--heads", nargs="+", required=True, help="one head per task, in the order of --tasks"
    )
    p.add_argument("--data", type=_json, required=True, help=data_help)
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    p.add_argument(
        "--splits",
        nargs="+",
        choices=("test", "val"),
        default=["test"],
        help="splits to evaluate, rows for each in one CSV (val: 10%% of train, seed 0, for choosing α without test labels)",
    )
    _add_compute_options(p, dtype_help="float32, or bfloat16 autocast for the forward passes")
    p.add_argument(
        "--out",
        nargs="+",
        required=True,
        metavar="CSV",
        help="one output CSV per --checkpoint, in its order: task, split, accuracy, n, correct (the per-image "
        "correctness in the data's order: base64 of numpy.packbits of the bool vector)",
    )

    p = _add_stage(
        sub, "report", "collect evaluations and diagnostics into summary.csv", cmd_report
    )
    p.add_argument("--root", required=True, help="the run's results folder")
    p.add_argument("--tasks", nargs="+", required=True, help="the run's tasks, in column order")
    p.add_argument(
        "--runs", nargs="+", required=True, help="method/setting names, e.g. epimer/k4_a1.0_f0.05"
    )
    p.add_argument("--out", required=True, help="output summary.csv")

    p = _add_stage(
        sub,
        "theta0",
        "θ0 of a real backbone: open_clip weights (tag or file) or a seeded random init, as a visual checkpoint",
        cmd_theta0,
    )
    p.add_argument("--backbone", required=True, help="backbone name (see pipeline/models/clip.py)")
    p.add_argument(
        "--pretrained",
        required=True,
        help="open_clip pretrained tag (e.g. openai), a local open_clip checkpoint file, or `random`",
    )
    p.add_argument("--seed", type=int, default=0, help="random: initialisation seed")
    p.add_argument(
        "--out", required=True, help="output checkpoint (.safetensors, open_clip visual naming)"
    )

    p = _add_stage(
        sub,
        "smoke",
        "smoke path: a synthetic fine-tuned checkpoint θ0 + low-rank + dense delta, or a random head",
        cmd_smoke,
    )
    p.add_argument(
        "--kind",
        choices=("finetuned", "head"),
        default="finetuned",
        help="write a synthetic fine-tuned checkpoint or a random head",
    )
    p.add_argument("--task", required=True, help=task_help)
    p.add_argument("--pretrained", help="finetuned: θ0 checkpoint")
    p.add_argument(
        "--backbone", default="demo", help="head: backbone whose embedding size the head takes"
    )
    p.add_argument(
        "--data",
        type=_json,
        default={},
        help="head: the data section (gives the task's class count)",
    )
    p.add_argument(
        "--rank",
        type=int,
        default=8,
        help="finetuned: rank of each matrix layer's strong directions",
    )
    p.add_argument(
        "--scale", type=_finite_float, default=0.05, help="finetuned: ‖low-rank part‖_F / ‖W0‖_F"
    )
    p.add_argument(
        "--noise",
        type=_finite_float,
        default=0.005,
        help="finetuned: ‖dense part‖_F / ‖W0‖_F (about)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic delta or head")
    p.add_argument("--out", required=True, help="output .safetensors (checkpoint or head)")

    p = _add_stage(
        sub,
        "zeroshot-head",
        "zero-shot head of a task from CLIP's text tower (class names × prompt templates)",
        cmd_zeroshot_head,
    )
    p.add_argument("--backbone", required=True, help="CLIP backbone (ViT-B-32, ViT-B-16, ViT-L-14)")
    p.add_argument(
        "--pretrained",
        required=True,
        help="open_clip pretrained tag (e.g. openai) or a local open_clip checkpoint file",
    )
    p.add_argument("--task", required=True, help=task_help)
    p.add_argument(
        "--data", type=_json, default={}, help=data_help + "; gives the class names and templates"
    )
    p.add_argument("--device", default="auto", help="cuda, cpu, or auto (cuda when available)")
    p.add_argument(
        "--batch-size", type=int, default=256, help="prompts per text-tower forward pass"
    )
    p.add_argument(
        "--out",
        required=True,
        help="output head (.safetensors with `weight` [C, D] and `bias` [C])",
    )

    p = _add_stage(
        sub,
        "import",
        "import a fine-tuned encoder or a head from a foreign checkpoint format (safetensors out)",
        cmd_import,
    )
    p.add_argument(
        "src",
        metavar="SRC",
        help="checkpoint: task-vectors finetuned.pt/head_<Dataset>.pt, plain state dict .pt, HF model.safetensors, open_clip safetensors",
    )
    p.add_argument(
        "--format",
        choices=("auto", "taskvectors", "state_dict", "hf", "open_clip"),
        default="auto",
        help="source format (auto: detected from the content)",
    )
    p.add_argument(
        "--kind",
        choices=("encoder", "head"),
        default="encoder",
        help="an image encoder (open_clip visual state dict) or a classification head ({weight [C, D], bias [C]})",
    )
    p.add_argument(
        "--backbone",
        default="ViT-B-32",
        help="encoder: backbone to validate names and shapes against (demo, ViT-B-32, ... or any open_clip model name)",
    )
    p.add_argument(
        "--pretrained",
        default=None,
        help="encoder, hf: θ0 checkpoint to take `proj` from when SRC is a CLIPVisionModel without projection",
    )
    p.add_argument(
        "--keep-dtype",
        action="store_true",
        help="keep the source dtype (default: convert to float32)",
    )
    p.add_argument(
        "--out",
        required=True,
        help="output .safetensors, e.g. checkpoints/{task}.safetensors or heads/{task}.safetensors",
    )

    _add_show(sub)


def _add_show(sub: Any) -> None:
    p = sub.add_parser(
        "show",
        help="print a summary.csv as a table (accuracies as fractions, as in the tables)",
        formatter_class=_Formatter,
    )
    p.add_argument("summary", help="path of summary.csv")
    _add_common(p)
    p.set_defaults(func=cmd_show)


def cmd_pretrain(args: argparse.Namespace) -> int:
    from pipeline import train
    from pipeline.data import load_split, num_classes
    from pipeline.data import theta0 as shipped
    from pipeline.data.synthetic import ATTRIBUTES_TASK, PRETRAIN_TASK, attribute_class_counts
    from pipeline.store import write_safetensors

    if args.shipped:
        write_safetensors(args.out, shipped.load_shipped_theta0(), shipped.THETA0_METADATA)
        return 0
    if args.regenerate_shipped:
        recipe = shipped.THETA0_RECIPE
        args.backbone, args.data, args.train = recipe["backbone"], recipe["data"], recipe["train"]
        torch.set_num_threads(recipe["threads"])
    if args.data is None:
        raise UsageError(
            "pretrain needs --data (the config's data section), --shipped or --regenerate-shipped"
        )
    settings = dict(args.train)
    data = dict(args.data)
    data["train_size"] = settings.pop("train_size", data.get("train_size", 2000))
    task = settings.pop("task", PRETRAIN_TASK)  # generic, or attributes (the CLIP-like demo)
    if task == ATTRIBUTES_TASK:
        settings["attribute_classes"] = attribute_class_counts()
    images, labels = load_split(data, task, "train")
    from pipeline.models.clip import build_encoder

    encoder = build_encoder(args.backbone)
    state = train.pretrain(encoder, images, labels, num_classes(data, task), **settings)
    write_safetensors(
        args.out, state, {"stage": "pretrain", "backbone": args.backbone}, finite=True
    )
    if args.regenerate_shipped:
        digest = shipped.file_sha256(args.out)
        if digest != shipped.THETA0_SHA256:
            raise ValueError(
                f"{args.out}: the regenerated θ0 has SHA-256 {digest}, not the shipped "
                f"{shipped.THETA0_SHA256} ({shipped.THETA0_PATH}): the recipe, the data generator "
                "or the training code changed; ship the new file and its digest, or restore them"
            )
        log = logging.getLogger(__name__)
        log.info("%s reproduces the shipped θ0 (SHA-256 %s)", args.out, digest)
    return 0


def cmd_head(args: argparse.Namespace) -> int:
    from pipeline import train
    from pipeline.data import load_split, num_classes
    from pipeline.models.clip import load_encoder
    from pipeline.store import write_safetensors

    settings = dict(args.train)
    encoder = load_encoder(args.backbone, args.pretrained)
    if settings.pop("zeroshot", False):  # rows of θ0's pretraining prototypes (the CLIP-like demo)
        from pipeline.data.synthetic import attribute_class_counts, zeroshot_rows

        attribute, rows = zeroshot_rows(args.task)
        scale = settings.get(
            "logit_scale", train.DEFAULT_LOGIT_SCALE
        )  # steps, lr, seed: probe only
        weight, bias = train.zeroshot_head(
            attribute_class_counts(), attribute, rows, int(encoder.output_dim), logit_scale=scale
        )
    else:
        images, labels = load_split(args.data, args.task, "train")
        weight, bias = train.fit_head(
            encoder, images, labels, num_classes(args.data, args.task), **settings
        )
    write_safetensors(
        args.out,
        {"weight": weight, "bias": bias},
        {"stage": "head", "task": args.task},
        finite=True,
    )
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from pipeline import train
    from pipeline.data import load_split
    from pipeline.models.clip import load_encoder
    from pipeline.store import write_safetensors

    images, labels = load_split(args.data, args.task, "train")
    encoder = load_encoder(args.backbone, args.pretrained)
    weight, bias = _task_head(args.head, args.data, args.task)
    settings = dict(args.train)
    if settings.pop("augment", False):  # random shifts while training (pipeline/noise.py)
        from pipeline.noise import augment_in_training

        augment_in_training(encoder, seed=settings.get("seed", 0))
    state = train.finetune(encoder, weight, bias, images, labels, **settings)
    write_safetensors(args.out, state, {"stage": "finetune", "task": args.task}, finite=True)
    return 0


def cmd_fisher(args: argparse.Namespace) -> int:
    from pipeline.data import open_dataset
    from pipeline.fisher import ADAM_BETA1, estimate_fisher_dataset
    from pipeline.models.backbone import ImageClassifier
    from pipeline.models.clip import eval_transform, load_encoder
    from pipeline.store import ZarrWriter, provenance

    dataset = open_dataset(args.data, args.task, "train", transform=eval_transform(args.backbone))
    encoder = load_encoder(args.backbone, args.checkpoint)
    weight, bias = _task_head(args.head, args.data, args.task)
    model = ImageClassifier(encoder, weight, bias)
    names = [f"encoder.{n}" for n, _ in encoder.named_parameters()]
    result = estimate_fisher_dataset(
        model,
        dataset,
        [args.fraction],
        estimator=args.estimator,
        param_names=names,
        batch_size=args.batch_size,
        chunk_size=args.chunk_size,
        seed=args.seed,
        device=args.device,
        dtype=_compute_dtype(args.dtype),
        num_workers=args.num_workers,
        progress=not args.quiet,
    )[args.fraction]
    params = {
        "task": args.task,
        "estimator": args.estimator,
        "fraction": args.fraction,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "dtype": args.dtype,
        "data": args.data,
    }
    if args.estimator == "first_moment_ema":
        params["beta1"] = ADAM_BETA1
    with ZarrWriter(
        args.out,
        provenance("fisher", params, [args.checkpoint, args.head], ARTIFACT_VERSION),
        finite=True,
    ) as writer:
        for name, value in result.items():
            writer.write(name.removeprefix("encoder."), value)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    import csv

    from pipeline.data import open_dataset
    from pipeline.evaluate import check_sequence, evaluate_tasks, pack_correct
    from pipeline.models.clip import eval_transform, load_encoder
    from pipeline.store import atomic_path

    check_sequence("heads", args.heads, len(args.tasks))
    if len(args.out) != len(args.checkpoint):
        raise ValueError(
            f"got {len(args.checkpoint)} --checkpoint and {len(args.out)} --out paths; give one output CSV per "
            "checkpoint, in the same order"
        )
    heads = {task: _task_head(path, args.data, task) for task, path in zip(args.tasks, args.heads)}
    # The data of every split, opened once for all the checkpoints.
    transform = eval_transform(args.backbone)
    data = {
        split: {
            task: open_dataset(args.data, task, split, transform=transform) for task in args.tasks
        }
        for split in dict.fromkeys(args.splits)
    }
    for checkpoint, out in zip(args.checkpoint, args.out):
        log.info("evaluating %s", checkpoint)
        encoder = load_encoder(args.backbone, checkpoint)
        rows = []
        for split, datasets in data.items():
            rows += evaluate_tasks(
                encoder,
                heads,
                datasets,
                args.batch_size,
                device=args.device,
                dtype=_compute_dtype(args.dtype),
                num_workers=args.num_workers,
                progress=not args.quiet,
                split=split,
            )
        with atomic_path(out) as tmp:
            with open(tmp, "w", newline="") as fh:
                fields = ["task", "split", "accuracy", "n", "correct"]
                writer = csv.DictWriter(fh, fieldnames=fields, lineterminator="\n")
                writer.writeheader()
                for row in rows:
                    writer.writerow(
                        {
                            **row,
                            "accuracy": f"{row['accuracy']:.6f}",
                            "correct": pack_correct(row["correct"]),
                        }
                    )
        _summary.info(
            "%s: average top-1 %s -> %s",
            checkpoint,
            ", ".join(
                f"{split} {sum(r['accuracy'] for r in rows if r['split'] == split) / len(args.tasks):.4f}"
                for split in data
            ),
            out,
        )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pipeline.report import write_summary

    write_summary(Path(args.root), args.tasks, args.runs, Path(args.out))
    return 0


def cmd_theta0(args: argparse.Namespace) -> int:
    from pipeline.models.clip import build_clip, get_backbone
    from pipeline.models.smoke import pretrained_state
    from pipeline.store import write_safetensors

    if args.pretrained == "random":
        state = pretrained_state(args.backbone, args.seed)
    else:
        get_backbone(args.backbone)
        visual = build_clip(args.backbone, args.pretrained).visual
        state = {n: t.detach().float().contiguous() for n, t in visual.state_dict().items()}
    write_safetensors(
        args.out,
        state,
        {"stage": "theta0", "backbone": args.backbone, "pretrained": args.pretrained},
        finite=True,
    )
    return 0


def cmd_smoke(args: argparse.Namespace) -> int:
    from pipeline.models import smoke
    from pipeline.models.clip import build_encoder
    from pipeline.store import load_tensors, write_safetensors

    if args.kind == "head":
        import torch

        from pipeline.data import num_classes

        with torch.no_grad():
            dim = int(build_encoder(args.backbone).output_dim)
        weight, bias = smoke.random_head(
            args.task, num_classes(args.data, args.task), dim, seed=args.seed
        )
        write_safetensors(
            args.out,
            {"weight": weight, "bias": bias},
            {"stage": "smoke-head", "task": args.task},
            finite=True,
        )
        return 0
    if not args.pretrained:
        raise ValueError("smoke --kind finetuned needs --pretrained (θ0)")
    theta0 = load_tensors(args.pretrained)
    state = smoke.finetuned_state(theta0, args.task, args.rank, args.scale, args.noise, args.seed)
    write_safetensors(args.out, state, {"stage": "smoke", "task": args.task}, finite=True)
    return 0


def cmd_zeroshot_head(args: argparse.Namespace) -> int:
    from pipeline.models.zeroshot import build_zeroshot_head
    from pipeline.store import write_safetensors

    weight, bias = build_zeroshot_head(
        args.backbone, args.pretrained, args.task, args.data, args.device, args.batch_size
    )
    meta = {
        "stage": "zeroshot-head",
        "task": args.task,
        "backbone": args.backbone,
        "pretrained": args.pretrained,
    }
    write_safetensors(args.out, {"weight": weight, "bias": bias}, meta, finite=True)
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from pipeline.models.importers import import_encoder, import_head
    from pipeline.store import write_safetensors

    meta = {"stage": "import", "kind": args.kind, "source": str(args.src)}
    if args.kind == "head":
        weight, bias = import_head(args.src)
        write_safetensors(args.out, {"weight": weight, "bias": bias}, meta, finite=True)
    else:
        state = import_encoder(
            args.src,
            args.backbone,
            format=args.format,
            pretrained=args.pretrained,
            keep_dtype=args.keep_dtype,
        )
        write_safetensors(
            args.out, state, {**meta, "format": args.format, "backbone": args.backbone}, finite=True
        )
    return 0


_SHOW_COLUMNS = ("method", "setting", "k", "alpha", "fraction", "average", "worst")


def cmd_show(args: argparse.Namespace) -> int:
    print(format_summary_text(Path(args.summary)))
    return 0


def format_summary_text(path: Path) -> str:
    """summary.csv as fixed-width text: test accuracy per task, average, worst task, validation
    average (fractions in [0, 1] with 3 decimals, as in the tables) and η; then, per α sweep,
    the α chosen on validation beside the best α on test. Reads the CSV alone (no torch).
    Raises ValueError naming the file when it is not a summary.csv."""
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
    # α sweeps: the runs of one (method, k, fraction) that differ in α alone.
    sweeps: dict[tuple[str, str, str], list[dict[str, str]]] = {}
    for row in rows:
        if row["alpha"]:
            sweeps.setdefault((row["method"], row["k"], row["fraction"]), []).append(row)
    if sweeps:
        lines += ["", "α chosen on validation (its test avg.) vs. best α on test:"]
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
    return "\n".join(lines)


def _add_report_stages(sub: Any) -> None:
    formats = dict(
        nargs="+", choices=("png", "svg", "pdf"), default=["png", "svg"], help="figure file formats"
    )

    p = sub.add_parser(
        "tables",
        help="paper-style tables from summary.csv (Markdown, CSV, HTML)",
        formatter_class=_Formatter,
    )
    p.add_argument("--summary", required=True, help="summary.csv of the run")
    p.add_argument(
        "--out-dir", required=True, help="folder for {table}.md/.csv/.html and tables.md"
    )
    _add_paper_settings(p)
    _add_common(p)
    p.set_defaults(func=cmd_tables)

    p = sub.add_parser(
        "plots",
        help="figures from summary.csv, the merge reports and the landscape (PNG, SVG)",
        formatter_class=_Formatter,
    )
    p.add_argument("--summary", required=True, help="summary.csv of the run")
    p.add_argument(
        "--merged",
        nargs="*",
        default=[],
        help="merged/{method}/{setting}.zarr artifacts: EpiMer ones give η per layer; each method's setting "
        "chosen on validation is marked on the landscape",
    )
    p.add_argument(
        "--landscape",
        default=None,
        help="landscape Zarr artifact: also draw landscape_{task} and landscape",
    )
    p.add_argument("--out-dir", required=True, help="folder for the figures")
    p.add_argument("--formats", **formats)
    p.add_argument("--dpi", type=int, default=120, help="resolution of PNG figures")
    _add_paper_settings(p)
    _add_common(p)
    p.set_defaults(func=cmd_plots)

    p = _add_stage(
        sub,
        "landscape",
        "cached stage: per-task loss on the PCA plane of the fine-tuned models (Zarr)",
        cmd_landscape,
    )
    p.add_argument("--pretrained", required=True, help="θ0 checkpoint")
    p.add_argument(
        "--finetuned",
        nargs="+",
        required=True,
        help="θ_1 … θ_T, one per task, in the order of --tasks",
    )
    p.add_argument(
        "--tasks",
        nargs="+",
        required=True,
        help="the tasks, in the order of --finetuned and --heads",
    )
    p.add_argument(
        "--heads", nargs="+", required=True, help="one head per task, in the order of --tasks"
    )
    p.add_argument(
        "--backbone",
        default="demo",
        help="the encoder architecture (demo, demo-96, ViT-B-32, ViT-B-16, ViT-L-14)",
    )
    p.add_argument("--data", type=_json, required=True, help="the config's `data` section as JSON")
    p.add_argument(
        "--split",
        choices=("val", "test", "train"),
        default="val",
        help="images the loss is measured on",
    )
    p.add_argument(
        "--max-images", type=int, default=256, help="first N images of the split per task"
    )
    p.add_argument(
        "--grid",
        type=int,
        default=9,
        help="grid points per axis (grid × grid evaluations per task)",
    )
    p.add_argument(
        "--margin",
        type=_finite_float,
        default=0.3,
        help="padding around θ0 and the θ_t, as a fraction of their larger spread",
    )
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    p.add_argument("--device", default="auto", help="cuda, cpu, or auto (cuda when available)")
    p.add_argument("--out", required=True, help="output Zarr group, e.g. landscape/landscape.zarr")


def _add_paper_settings(p: argparse.ArgumentParser) -> None:
    """The settings of the paper's Table 2, Table 6 and Figure 3 (the config's `report` block)."""
    p.add_argument(
        "--paper-k",
        type=int,
        default=None,
        help="k of TSV-M and EpiMer in Tables 2 and 6 and Figure 3 (the paper: 32; default: the run's largest)",
    )
    p.add_argument(
        "--paper-fraction",
        type=float,
        default=None,
        help="Fisher fraction of Fisher averaging and EpiMer in Tables 2 and 6 (the paper: 1.0; default: the run's largest)",
    )
    p.add_argument(
        "--paper-alpha",
        type=float,
        default=1.0,
        help="EpiMer's fixed α in Figure 3 (the paper: 1.0)",
    )
    p.add_argument(
        "--paper-flat-alpha",
        type=float,
        default=0.125,
        help="α of Task Arithmetic and TIES in Tables 2 and 6 (the paper's λ_t = 0.125)",
    )
    p.add_argument(
        "--heads-source",
        choices=("train", "zeroshot", "import", "smoke"),
        default=None,
        help="the config's heads.source, named in the θ0 row",
    )


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


def cmd_landscape(args: argparse.Namespace) -> int:
    import torch

    from pipeline.data import open_dataset
    from pipeline.evaluate import check_sequence
    from pipeline.landscape import compute_landscape, write_landscape
    from pipeline.models.clip import eval_transform, load_encoder, resolve_device
    from pipeline.store import ZarrWriter, open_tensors, provenance

    check_sequence("heads", args.heads, len(args.tasks))
    check_sequence("fine-tuned checkpoints", args.finetuned, len(args.tasks))
    if args.max_images < 1:
        raise ValueError(f"--max-images must be at least 1, got {args.max_images}")
    heads = {task: _task_head(path, args.data, task) for task, path in zip(args.tasks, args.heads)}
    datasets = {}
    for task in args.tasks:
        # The first N images of the split: a fixed subset, the same for every grid point.
        dataset = open_dataset(args.data, task, args.split, transform=eval_transform(args.backbone))
        items = [dataset[i] for i in range(min(len(dataset), args.max_images))]
        datasets[task] = (
            torch.stack([x for x, _ in items]),
            torch.tensor([int(y) for _, y in items]),
        )
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


# --------------------------------------------------------------------------- entry point


def _task_head(
    path: str | Path, data: dict[str, Any], task: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """A head (weight [C, D], bias [C]) checked against the task's class count."""
    from pipeline.data import num_classes
    from pipeline.models.clip import load_head
    from pipeline.store import ArtifactError

    weight, bias = load_head(path)
    expected = num_classes(data, task)
    if weight.shape[0] != expected:
        raise ArtifactError(
            f"{path}: head tensor `weight` has {weight.shape[0]} rows (classes) but task `{task}` has {expected} classes"
        )
    return weight, bias


def deterministic_torch() -> None:
    """Same inputs, same machine ⇒ same bits: torch's deterministic algorithms where it has
    them (warnings, not errors, where it has none), no cuDNN autotuning, and the cuBLAS
    workspace setting CUDA needs for reproducible GEMMs. Uninitialised memory is not filled
    (our code never reads it, and filling costs a pass over every buffer)."""
    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # torch.use_deterministic_algorithms also sets torch._inductor's flag, and importing
    # inductor costs about a second per process (a demo run starts ~180). Nothing here goes
    # through torch.compile, so set the eager-mode switch alone where torch exposes it.
    set_eager = getattr(torch._C, "_set_deterministic_algorithms", None)
    if set_eager is not None:
        set_eager(True, warn_only=True)
    else:
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False
    torch.backends.cudnn.benchmark = False


#: Options that name files or folders a command reads (checked against its outputs).
_INPUT_OPTIONS = (
    "pretrained",
    "finetuned",
    "fisher",
    "basis",
    "hessian",
    "checkpoint",
    "head",
    "heads",
    "src",
    "summary",
    "landscape",
    "merged",
    "root",
)
#: Options that name files or Zarr stores a command writes (`{alpha}` expanded per α).
_OUTPUT_OPTIONS = ("out", "report")
#: The artifact kind of each stage whose --out is a Zarr store (merge: when it ends in .zarr).
_STORE_ARTIFACTS = {
    "merge": "merged",
    "basis": "basis",
    "hessian": "hessian",
    "fisher": "fisher",
    "landscape": "landscape",
}


def _paths_of(args: argparse.Namespace, options: Sequence[str]) -> list[tuple[str, str]]:
    """(option, path) for every path the given options of `args` hold."""
    found = []
    for option in options:
        value = getattr(args, option, None)
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, (str, Path)) and str(item):
                found.append((option, str(item)))
    return found


def _output_paths(args: argparse.Namespace) -> list[tuple[str, str]]:
    alphas = getattr(args, "alpha", None) or []
    out = []
    for option, path in _paths_of(args, _OUTPUT_OPTIONS):
        if "{alpha}" in path and alphas:
            out += [(option, path.replace("{alpha}", str(a))) for a in alphas]
        else:
            out.append((option, path))
    return out


def _same_path(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)  # inode identity: hard links and symlinks included
    except OSError:
        pass
    return a.resolve() == b.resolve()


def _within(inner: Path, outer: Path) -> bool:
    return outer.resolve() in inner.resolve().parents


def check_outputs(args: argparse.Namespace) -> None:
    """Refuse outputs that would overwrite this command's own inputs, before anything runs.

    An output may not be an input (same resolved path or same inode), contain an input (a
    folder output over the inputs), lie inside an input store, or be another output of the
    same command. Raises ArtifactError naming both paths.
    """
    from pipeline.store import ArtifactError, check_output_path

    outputs = _output_paths(args)
    inputs = _paths_of(args, _INPUT_OPTIONS)
    for i, (option, out) in enumerate(outputs):
        o = Path(out)
        for in_option, inp in inputs:
            p = Path(inp)
            if _same_path(o, p):
                raise ArtifactError(
                    f"{o}: --{option} is also an input of this command (--{in_option.replace('_', '-')} {inp}); "
                    "refusing to overwrite an input: choose another output path"
                )
            if p.exists() and o.is_dir() and _within(p, o):
                raise ArtifactError(
                    f"{o}: --{option} is a folder holding the input {inp}; refusing to replace it: choose another output path"
                )
            if p.is_dir() and (p / "zarr.json").is_file() and _within(o, p):
                raise ArtifactError(
                    f"{o}: --{option} lies inside the input store {inp}; choose an output path outside it"
                )
        for other_option, other in outputs[:i]:
            if _same_path(o, Path(other)):
                raise ArtifactError(
                    f"{o}: given as both --{other_option} and --{option}; give each output its own path"
                )
        # Up front, so a bad --report is refused before the merge, not after it.
        kind = _STORE_ARTIFACTS.get(getattr(args, "command", None))
        store = (
            option == "out"
            and kind is not None
            and (args.command != "merge" or o.suffix == ".zarr")
        )
        check_output_path(o, store=store, artifact=kind if store else None)


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def error_line(err: BaseException) -> str:
    """The one-line message `main` prints for an exception: the file and what is wrong.

    Terminal colour codes and torch's advice to load with `weights_only=False` (running the
    file's code) are dropped; OS errors name the file and the operation."""
    if isinstance(err, OSError) and err.strerror is not None:
        what = err.strerror
        if err.filename is not None and err.filename2 is not None:
            return f"cannot move or link {err.filename} to {err.filename2}: {what}"
        if err.filename is not None:
            kind = {
                IsADirectoryError: "it is a folder, a file was expected",
                NotADirectoryError: "a part of the path is not a folder",
            }
            return f"{err.filename}: cannot open or create it: {kind.get(type(err), what)}"
        return f"{what} (an operating-system error without a file name; --debug shows where)"
    text = _ANSI.sub("", str(err))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    refused = "Weights only load failed" in text or any(
        line.startswith("WeightsUnpickler error:") for line in lines
    )
    # torch's advice: re-run with weights_only=False (running the file's code), and a link.
    lines = [
        line.removeprefix("WeightsUnpickler error:").strip()
        for line in lines
        if "weights_only" not in line
        and not line.startswith("Check the documentation of torch.load")
    ]
    first = lines[0] if lines else ""
    if refused:  # torch's safe loader refused the pickle: say so, and what it found
        return f"refused to unpickle a checkpoint: {first or 'it needs code that a safe load does not run'}"
    if isinstance(err, (ValueError, FileNotFoundError)):
        return first or type(err).__name__
    if isinstance(err, RecursionError):
        return "an input nests too deeply to be read (corrupt or crafted file); --debug shows where"
    if isinstance(err, MemoryError):
        return "out of memory (an input declares more data than this machine holds); --debug shows where"
    return f"{type(err).__name__}: {first or 'no message'} (--debug shows the traceback)"


def _stage_of(argv: Sequence[str]) -> str | None:
    """The stage an argument list names: its first word that is not an option."""
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one stage; every failure ends in one `error:` line on stderr and exit status 2.

    `--debug` (or PIPELINE_DEBUG=1) prints the traceback after that line. `show` runs without
    torch (it prints a CSV); every other stage first imports the plugins EPIMER_PLUGINS names."""
    argv = list(sys.argv[1:] if argv is None else argv)
    light = _stage_of(argv) == "show"
    try:
        if not light:
            from pipeline import load_plugins

            load_plugins(os.environ.get("EPIMER_PLUGINS"))
        parser = build_parser(light=light)
        args = parser.parse_args(argv)
    except (UsageError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    debug = getattr(args, "debug", False) or os.environ.get("PIPELINE_DEBUG", "") not in ("", "0")
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    _summary.setLevel(logging.INFO)  # its lines pass --quiet
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        if light:
            return func(args)
        check_outputs(args)
        deterministic_torch()
        if getattr(args, "threads", None):
            import torch

            torch.set_num_threads(args.threads)
        return func(args)
    except Exception as err:  # ArtifactError is a ValueError
        # One line naming the file and tensor; the output was never renamed into place.
        print(f"error: {error_line(err)}", file=sys.stderr)
        if debug:
            import traceback

            traceback.print_exc()
        return 2
