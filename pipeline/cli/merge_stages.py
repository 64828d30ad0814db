"""The options of the merge stages (merge, basis, hessian), as tables. Their choices come
from the method registry (pipeline.methods), imported when the parser is built."""

from __future__ import annotations

from typing import Any

from pipeline.cli import merging
from pipeline.cli.options import DTYPES, alpha, eps, fraction, percentage, positive_int, prior
from pipeline.cli.parser import Entry, add_plain_stage, option

SOLVER_CHOICES = ["auto", "dense", "cg"]


def model_inputs(fisher: str) -> list[Entry]:
    """θ0, the θ_t and their Fishers, and where the merge stages compute; `fisher`: what the
    stage does with the Fishers."""
    return [
        option(
            "--pretrained", required=True, metavar="P", help="θ0: safetensors file or Zarr group"
        ),
        option(
            "--finetuned",
            required=True,
            nargs="+",
            metavar="T",
            help="θ_1 … θ_T: one safetensors file or Zarr group per task, same tensor names and shapes as θ0",
        ),
        option(
            "--fisher",
            nargs="+",
            metavar="F",
            default=None,
            help=f"{fisher} one empirical Fisher diagonal per task (safetensors or Zarr, θ0's tensor names), "
            "in the order of --finetuned",
        ),
        option(
            "--dtype",
            choices=DTYPES,
            default="float32",
            help="compute dtype of large products (p×p solves are always float64)",
        ),
        option(
            "--device",
            default="cpu",
            help="where SVDs, projected Hessians and lifts run (cpu, cuda, cuda:1, ...); inputs stream from the CPU one layer at a time",
        ),
    ]


def merge_method_options() -> list[Entry]:
    """The options of `merge` that set a method's parameters."""
    from pipeline.methods import COORDINATES, METHODS
    from pipeline.methods import ties as ties_method
    from pipeline.methods.epimer import AGGREGATORS

    return [
        option("method", metavar="METHOD", help=f"one of: {', '.join(METHODS)}"),
        *model_inputs("required for fisher and epimer (optional for tsvm, for diagnostics):"),
        option(
            "--k",
            type=positive_int,
            default=32,
            help="tsvm/epimer: per-task rank, clamped per layer to ⌊min(d_out, d_in)/T⌋",
        ),
        option(
            "--alpha",
            type=alpha,
            nargs="+",
            default=None,
            help="global scale α > 0 (default: 1/T for ta, 1.0 for ties, tsvm and epimer; not used by fisher). Several values merge once per α in one pass over the inputs (bases, Hessians and reads shared); --out and --report then need an {alpha} placeholder",
        ),
        option(
            "--aggregator",
            choices=AGGREGATORS,
            default="frechet_sum",
            help="epimer: α T H̄⁻¹ b (frechet_sum) or α H̄⁻¹ b (frechet_mean)",
        ),
        option(
            "--coords",
            choices=COORDINATES,
            default="tagged",
            help="epimer: task coordinates in the subspace",
        ),
        option(
            "--eps",
            type=eps,
            default=1e-8,
            help="epimer: jitter ε I added to every projected Hessian; fisher: floor added to every F_t",
        ),
        option(
            "--ties-density",
            type=percentage,
            default=20.0,
            help="ties: percentage of each task vector kept (top K %% by magnitude)",
        ),
        option(
            "--ties-sign",
            choices=ties_method.SIGN_RULES,
            default="mass",
            help="ties: elect each coordinate's sign by the sum of the kept values (`mass`, the TIES paper's rule) or by the number of kept values of each sign (`frequency`, + on a tie)",
        ),
        option(
            "--ties-disjoint",
            choices=ties_method.DISJOINT_MODES,
            default="mean",
            help="ties: disjoint mean, or sum without division",
        ),
        option(
            "--iso-common-fraction",
            type=fraction,
            default=0.8,
            help="isocts: share of each layer's rank kept as the common subspace, in [0, 1]",
        ),
        option(
            "--gradmatch-prior",
            type=prior,
            default=0.0,
            help="gradmatch: prior precision h >= 0 (H_0 = h I, in the Fisher's units)",
        ),
        option(
            "--fisher-normalise",
            action="store_true",
            help="fisher: divide each F_t by its global norm first",
        ),
    ]


MERGE_SOLVER_OPTIONS: list[Entry] = [
    option(
        "--fisher-rank",
        type=int,
        default=None,
        metavar="R",
        help="epimer: form H̄ from a non-negative rank-R factorisation of F̄ (far cheaper, approximate; the relative error is reported per layer). Default: exact",
    ),
    option(
        "--solver",
        choices=SOLVER_CHOICES,
        default="auto",
        help="epimer without --hessian: `dense` forms H̄ (d_out·d_in·p²/2 per layer) and solves by Cholesky; `cg` never forms it: conjugate gradients preconditioned by diag(H̄), to ‖b − H̄x‖ ≤ 1e-6‖b‖, up to 1e-5 accepted (the float32 floor of ill-conditioned layers); steps and residuals reported; H̄ is formed where CG stays above that after p steps; `auto` runs CG where its first steps predict convergence within p/8 steps (half the cost of forming H̄) and forms H̄ elsewhere, and for --dtype float64, --eps 0 or --fisher-rank. Default: auto",
    ),
    option(
        "--basis",
        default=None,
        help="tsvm/epimer: read tagged bases from this basis/k{k}.zarr artifact instead of computing them",
    ),
    option(
        "--hessian",
        default=None,
        help="epimer: read projected Hessians from this hessian/k{k}_f{f}.zarr artifact (needs --basis)",
    ),
    option(
        "--out",
        nargs="+",
        required=True,
        metavar="MERGED",
        help="output: .safetensors file or .zarr group; with several --alpha values, one path with an {alpha} "
        "placeholder or one path per α, in the order of --alpha",
    ),
    option(
        "--report",
        metavar="REPORT.json",
        default=None,
        help="write diagnostics (η per layer and total, V_S, R_S) and timings as JSON",
    ),
]

BASIS_OPTIONS: list[Entry] = [
    *model_inputs("not used;"),
    option(
        "--k", type=positive_int, required=True, help="per-task rank before the per-layer clamp"
    ),
    option("--out", required=True, help="output Zarr group, e.g. basis/k32.zarr"),
]


def hessian_options() -> list[Entry]:
    from pipeline.methods import COORDINATES

    return [
        *model_inputs("required:"),
        option("--basis", required=True, help="the basis/k{k}.zarr artifact"),
        option("--eps", type=eps, default=1e-8, help="jitter ε I added to every projected Hessian"),
        option(
            "--coords",
            nargs="+",
            choices=COORDINATES,
            default=list(COORDINATES),
            help="coordinate modes to store terms for (merges with other --coords then fail); tagged alone skips T matrix-vector products per layer",
        ),
        option(
            "--fisher-rank",
            type=int,
            default=None,
            metavar="R",
            help="form H̄ from a non-negative rank-R factorisation of F̄ (far cheaper, approximate; the relative error is stored per layer). Default: exact",
        ),
        option(
            "--solver",
            choices=SOLVER_CHOICES,
            default="auto",
            help="as merge --solver: `dense` stores H̄ per layer; where `cg` or `auto` solve a layer by conjugate gradients, it stores H̄⁻¹b and the products H̄δ̄, H̄·H̄⁻¹b per coordinate mode instead (all an EpiMer merge and its diagnostics need, at any α and aggregator). Default: auto",
        ),
        option("--out", required=True, help="output Zarr group, e.g. hessian/k32_f0.05.zarr"),
    ]


def merge_description() -> str:
    from pipeline.methods import METHODS

    methods = "\n".join(f"  {name:<8} {m.summary}" for name, m in METHODS.items())
    return (
        "Merge fine-tuned checkpoints, streaming tensor by tensor.\n\nmethods:\n"
        + methods
        + "\n\nMatrix layers (2-D floating tensors) get the subspace treatment in tsvm/epimer; every other"
        " floating tensor is merged as a vector tensor; integer tensors are copied from θ0."
    )


def add_merge_stages(sub: Any) -> None:
    """merge, and the cached stages basis and hessian."""
    add_plain_stage(
        sub,
        "merge",
        "merge fine-tuned checkpoints with one method (no Snakemake needed)",
        merging.cmd_merge,
        [*merge_method_options(), *MERGE_SOLVER_OPTIONS],
        description=merge_description(),
    )
    add_plain_stage(
        sub,
        "basis",
        "cached stage: per-layer tagged bases for one k (Zarr)",
        merging.cmd_basis,
        BASIS_OPTIONS,
    )
    add_plain_stage(
        sub,
        "hessian",
        "cached stage: per-layer projected Hessians for one (k, fraction) (Zarr)",
        merging.cmd_hessian,
        hessian_options(),
    )
