"""The merge stages: `merge` (any method, one pass for several α) and the cached `basis` and
`hessian` artifacts it can read."""

from __future__ import annotations

import argparse
import json
import time
from contextlib import ExitStack
from dataclasses import fields
from pathlib import Path
from typing import Any

from pipeline import ARTIFACT_VERSION
from pipeline.cli.runtime import checked_device, summary, torch_dtype, write_json


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


def _alphas(args: argparse.Namespace, method: Any) -> list[float]:
    """The α values to merge at, checked against the method and the --out/--report paths."""
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
    return alphas


def _merge_settings(args: argparse.Namespace, alpha: float) -> Any:
    """The merge settings at `alpha`: each other field of MergeSettings from the option of its
    name, dtype and device converted."""
    from pipeline.methods import MergeSettings

    converted = {
        "alpha": alpha,
        "dtype": torch_dtype(args.dtype),
        "device": checked_device(args.device),
    }
    options = {f.name: getattr(args, f.name) for f in fields(MergeSettings)}
    return MergeSettings(**(options | converted))


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


def _stored_hessian_settings(args: argparse.Namespace, subspace: Any, settings: Any) -> Any:
    """The settings with the Fisher rank and solver the stored Hessians were made with: they
    decide whether H̄ is exact or low-rank, so a merge records what was used."""
    from dataclasses import replace

    stored = subspace.hessian_store.attrs().get("parameters", {})
    if not {"fisher_rank", "solver"} <= set(stored):
        raise ValueError(
            f"{args.hessian}: records no Fisher rank and solver; re-create it with "
            "`python -m pipeline hessian`"
        )
    stored_rank, stored_solver = stored["fisher_rank"], stored["solver"]
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
    return replace(settings, fisher_rank=stored_rank, solver=stored_solver)


def _subspace(args: argparse.Namespace, method: Any, settings: Any) -> tuple[Any, Any]:
    """The stored subspace a merge reads (None: computed), and the settings it merges with."""
    from dataclasses import replace

    from pipeline.curvature import effective_solver
    from pipeline.merge import StoredSubspace

    subspace = None
    if args.hessian and not args.basis:
        raise ValueError("--hessian needs the --basis it was computed from")
    if args.basis:
        _check_stored_subspace(args)
        subspace = StoredSubspace(args.basis, args.hessian, settings.dtype)
    if args.hessian:
        settings = _stored_hessian_settings(args, subspace, settings)
    elif settings.solver == "auto":  # recorded as what it means here
        settings = replace(
            settings,
            solver=effective_solver("auto", settings.fisher_rank) if method.curvature else "dense",
        )
    return subspace, settings


def _out_paths(args: argparse.Namespace, alphas: list[float]) -> list[Path]:
    """One output per α: the paths given, or the one template with {alpha} filled in."""
    if len(args.out) == len(alphas):
        return [Path(out) for out in args.out]
    return [Path(args.out[0].replace("{alpha}", str(a))) for a in alphas]


def _open_targets(
    stack: ExitStack,
    args: argparse.Namespace,
    method: Any,
    settings: Any,
    inputs: Any,
    alphas_outs: list[tuple[float, Path]],
) -> tuple[list[Any], list[Any]]:
    """The merge target of each (α, output), and its Zarr writer (None: safetensors)."""
    from dataclasses import replace
    from functools import partial

    from pipeline.merge import MergeTarget, settings_dict
    from pipeline.store import SafetensorsWriter, WriteBehind, ZarrWriter, provenance

    specs = {
        n: (inputs.pretrained.shape(n), inputs.pretrained.dtype(n))
        for n in inputs.pretrained.keys()
    }
    targets, zarr_writers = [], []
    for a, out in alphas_outs:
        params = settings_dict(method.name, replace(settings, alpha=a))
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
    return targets, zarr_writers


def _log_merges(
    args: argparse.Namespace, method: Any, alphas_outs: list[tuple[float, Path]], reports: list
) -> None:
    """One summary line per merged artifact, and its --report JSON."""
    for (a, out), report in zip(alphas_outs, reports):
        totals = report.totals()
        summary.info(
            "merged %d checkpoints with %s%s in %.2f s%s -> %s%s",
            len(args.finetuned),
            method.name,
            f" at α={a}" if "alpha" in method.uses else "",
            report.timings["total"],
            f" (one pass for {len(alphas_outs)} α)" if len(alphas_outs) > 1 else "",
            out,
            "".join(f", {k}={v:.4g}" for k, v in totals.items()),
        )
        if args.report:
            write_json(args.report.replace("{alpha}", str(a)), report.as_dict())


def cmd_merge(args: argparse.Namespace) -> int:
    from pipeline.merge import merge_sweep
    from pipeline.methods import get_method

    method = get_method(args.method)
    alphas = _alphas(args, method)
    settings = _merge_settings(args, alphas[0])
    inputs = _open_inputs(args)
    subspace, settings = _subspace(args, method, settings)
    alphas_outs = list(zip(alphas, _out_paths(args, alphas)))
    start = time.perf_counter()
    with ExitStack() as stack:
        targets, zarr_writers = _open_targets(stack, args, method, settings, inputs, alphas_outs)
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
    _log_merges(args, method, alphas_outs, reports)
    return 0


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
            torch_dtype(args.dtype),
            progress=not args.quiet,
            device=checked_device(args.device),
        )
        writer.set_attrs({"k": args.k, "num_tasks": inputs.num_tasks, "effective_k": ranks})
    summary.info(
        "tagged bases of %d layers at k=%d in %.2f s -> %s",
        len(ranks),
        args.k,
        time.perf_counter() - start,
        args.out,
    )
    return 0


def _hessian_parameters(args: argparse.Namespace, solver: str) -> dict[str, Any]:
    """The parameters a hessian artifact records."""
    return {
        "eps": args.eps,
        "dtype": args.dtype,
        "coords": args.coords,
        "fisher_rank": args.fisher_rank,  # None: the exact H̄
        "solver": solver,
    }


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
    parameters = _hessian_parameters(args, solver)
    attrs = provenance("hessian", parameters, [*_input_paths(args), args.basis], ARTIFACT_VERSION)
    start = time.perf_counter()
    with ZarrWriter(args.out, attrs, finite=True) as writer:
        counts = build_hessian(
            inputs,
            args.basis,
            args.eps,
            writer,
            torch_dtype(args.dtype),
            progress=not args.quiet,
            device=checked_device(args.device),
            coords=args.coords,
            fisher_rank=args.fisher_rank,
            solver=solver,
        )
        writer.set_attrs({"num_tasks": inputs.num_tasks, "eps": args.eps})
    summary.info(
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
