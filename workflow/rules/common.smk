import json
import os
import re
import shlex
import sys

from pipeline import ARTIFACT_VERSION
from pipeline.methods import METHODS as REGISTRY, get_method, setting_names

# Everything that shapes an artifact reaches its job through the params (Snakemake compares
# params, not the config, when deciding what to re-run), and nothing else does: performance
# knobs and side-effect flags reach the commands as resources (`knobs`, below). ARTIFACT_VERSION
# (pipeline/__init__.py) is bumped when the package changes what an artifact contains.
# Jobs run `python -m pipeline ...`: put the interpreter running Snakemake (the one with the
# package installed) first on PATH, so that `python` means it in every job's shell. Under
# --use-conda, the job's environment is activated after this and comes first instead.
_search_path = [os.path.dirname(sys.executable), *os.get_exec_path()]
os.environ.update(PATH=os.pathsep.join(_search_path))
ENV = "../../environment.yml"
RESULTS = f"{config['results']}/{config['name']}"

# Re-runs by content (pipeline/stamps.py, docs/workflow.md): before Snakemake compares
# timestamps, artifacts whose content is the recorded one get their recorded times back, so a
# touch, a copy or a restore re-runs nothing. Only the process that plans the run does this,
# not the processes a cluster starts per job.
from pipeline import stamps

if workflow.is_main_process:
    _restored = stamps.restore(RESULTS)
    if _restored:
        print(
            f"content stamps: {len(_restored)} artifact(s) under {RESULTS} had a new modification time "
            "but their recorded content; their recorded times are back (first: "
            f"{_restored[0]})",
            file=sys.stderr,
        )
    # A recorded artifact that is gone is not re-created while its dependents exist (Snakemake
    # builds what the targets need): name the command that re-creates it alone. Re-created with
    # the recorded content, it keeps its recorded time, and its dependents stay up to date.
    _gone = stamps.missing(RESULTS)
    if _gone:
        _configfiles = "".join(
            f" --configfile {shlex.quote(str(f))}" for f in workflow.overwrite_configfiles
        )
        print(
            f"content stamps: {len(_gone)} recorded artifact(s) under {RESULTS} are missing; re-create them "
            f"(only them) with:\n  snakemake {' '.join(map(shlex.quote, _gone))} --cores 1{_configfiles}",
            file=sys.stderr,
        )
TASKS = list(config["tasks"])
MERGE = config["merge"]

# Plugins (config `plugins`: module names on PYTHONPATH) register their methods as rows of the
# registry when imported (docs/adding-a-method.md). The job processes import them too: every
# `python -m pipeline` reads EPIMER_PLUGINS, which this sets for the jobs it starts.
from pipeline import load_plugins

PLUGINS = list(config.get("plugins", []))
load_plugins(PLUGINS)
if PLUGINS:
    os.environ.update(EPIMER_PLUGINS=",".join(PLUGINS))


def check_methods(methods):
    """Raise a ValueError naming the registered methods for any name of `methods` the registry
    (pipeline/methods/__init__.py, plus the plugins' rows) does not hold."""
    unknown = [m for m in methods if m not in REGISTRY]
    if unknown:
        raise ValueError(
            f"config merge.methods: {', '.join(map(repr, unknown))} is not a registered merge method; "
            f"the registered methods are {', '.join(REGISTRY)}. Correct the name, or register the method "
            "with a plugin (config `plugins`, docs/adding-a-method.md)."
        )


METHODS = list(MERGE["methods"])
check_methods(METHODS)


def fmt(x):
    """The one spelling of a float in artifact names: 0.3, 1.0, 0.05."""
    return str(float(x))


# The merge methods and what their setting names hold come from the registry
# (pipeline/methods/__init__.py), the one list the package and the workflow share.
ALPHA_METHODS = [name for name, m in REGISTRY.items() if "alpha" in m.uses]


def alpha_grid(spec, methods):
    """method → its α values (spelled by `fmt`) for every method of `methods` that takes α.

    spec is config merge.alpha: a list (every such method sweeps it) or a mapping from method to
    its own list. Raises ValueError for a mapping key that is not a method taking α, or a method
    of `methods` taking α that the mapping leaves out."""
    if not isinstance(spec, dict):
        return {m: [fmt(a) for a in spec] for m in methods if m in ALPHA_METHODS}
    unknown = [m for m in spec if m not in ALPHA_METHODS]
    if unknown:
        raise ValueError(
            f"config merge.alpha: {', '.join(map(repr, unknown))} is not a merge method that takes α; "
            f"the mapping's keys are among {', '.join(ALPHA_METHODS)}"
            f" ({', '.join(m for m in REGISTRY if m not in ALPHA_METHODS)} take no α). "
            "Correct the key, or give merge.alpha as one list for every method."
        )
    missing = [m for m in methods if m in ALPHA_METHODS and m not in spec]
    if missing:
        raise ValueError(
            f"config merge.alpha gives no α list for {', '.join(missing)} (in merge.methods): "
            f"add `{missing[0]}: [...]` to merge.alpha, or remove it from merge.methods."
        )
    return {m: [fmt(a) for a in spec[m]] for m in methods if m in ALPHA_METHODS}


ALPHAS_OF = alpha_grid(MERGE["alpha"], METHODS)
KS = [int(k) for k in MERGE["k"]]
FRACTIONS = [fmt(f) for f in config["fisher"]["fractions"]]


def as_json(value):
    """A config section as one shell-quoted JSON word (stable key order)."""
    return shlex.quote(json.dumps(value, sort_keys=True))


def settle_stamps():
    """Record the artifacts as this run left them (pipeline/stamps.py): those its jobs
    re-created with their recorded content keep their recorded times. For onsuccess/onerror."""
    dag = workflow.dag
    if dag is not None:
        stamps.settle(RESULTS, [(list(job.input), list(job.output)) for job in dag.jobs])


def without_download(data):
    """config `data` without its `download` flags (top level and per task): whether a job may
    fetch a missing dataset changes no image it reads."""
    data = {key: value for key, value in data.items() if key != "download"}
    if "tasks" in data:
        # A task whose only override was `download` has none left: the same as no entry.
        specs = {
            task: {key: value for key, value in spec.items() if key != "download"}
            for task, spec in data["tasks"].items()
        }
        data["tasks"] = {task: spec for task, spec in specs.items() if spec}
    return data


# Generated (synthetic) val/test splits are made once and read back by every evaluation.
_data = {**config["data"], "cache_dir": f"{RESULTS}/.cache/data"}
# What a job's params compare: the data settings that decide which images it sees.
DATA = as_json(without_download(_data))

# How jobs run, not what they make: the commands read these as {resources.<name>} (rule
# `resources:` entries, from `knobs`), which Snakemake does not compare when deciding re-runs,
# so changing one re-runs nothing (docs/workflow.md, "Performance knobs"). Each changes results
# by float round-off at most: summation order (chunk and batch sizes), kernels (device). dtype
# is not among them: bfloat16 and float64 change results beyond round-off, and stay in params.
# Local runs schedule by threads only, so these limit nothing; cluster executors read only the
# resources they know (job_resources below).
_RUN_DATA = as_json(_data)  # the data settings with the download flags


def knobs(stage):
    """The performance knobs and side-effect flags of one kind of job, as `resources:` entries:
    data (the data settings with their download flags), chunk_size, batch_size, num_workers,
    device. Usage, in a rule: `resources: **job_resources("fisher"), **knobs("fisher")`."""
    evaluate = config["evaluate"]
    return {
        "fisher": dict(
            data=_RUN_DATA,
            chunk_size=config["fisher"]["chunk_size"],
            device=config["fisher"]["device"],
            num_workers=config["fisher"]["num_workers"],
        ),
        "evaluate": dict(
            data=_RUN_DATA,
            batch_size=evaluate["batch_size"],
            device=evaluate["device"],
            num_workers=evaluate["num_workers"],
        ),
        "landscape": dict(data=_RUN_DATA, batch_size=evaluate["batch_size"]),
        "merge": dict(device=MERGE["device"]),
        "data": dict(data=_RUN_DATA),
    }[stage]


BACKBONE = config["backbone"]
PRETRAINED = f"{RESULTS}/checkpoints/pretrained.safetensors"
# Folder names of the eight tasks in the task-vectors release (`{Dataset}` in path patterns).
DATASET_DIRS = {
    "cars": "Cars",
    "dtd": "DTD",
    "eurosat": "EuroSAT",
    "gtsrb": "GTSRB",
    "mnist": "MNIST",
    "resisc45": "RESISC45",
    "sun397": "SUN397",
    "svhn": "SVHN",
}
# The twelve tasks the 14- and 20-task benchmarks add: their dataset names in the tall-masks
# release (`{Dataset}Val/nonlinear_finetuned.pt`, `head_{Dataset}Val.pt`).
DATASET_DIRS.update(
    {
        "cifar100": "CIFAR100",
        "stl10": "STL10",
        "flowers102": "Flowers102",
        "oxford_pets": "OxfordIIITPet",
        "pcam": "PCAM",
        "fer2013": "FER2013",
        "emnist": "EMNIST",
        "cifar10": "CIFAR10",
        "food101": "Food101",
        "fashion_mnist": "FashionMNIST",
        "rendered_sst2": "RenderedSST2",
        "kmnist": "KMNIST",
    }
)


def settings_of(method):
    """Every setting name of a method under the configured grid (only the parameters it uses,
    its own α list), e.g. ta/a0.125, tsvm/k32_a1.0, epimer/k32_a1.0_f0.05."""
    get_method(method)  # a ValueError naming the known methods
    return setting_names(method, alphas=ALPHAS_OF.get(method, []), ks=KS, fractions=FRACTIONS)


def merge_options(method):
    """The `pipeline merge` options of the method-specific merge settings (registry
    `Method.options`, e.g. ties: --ties-density 20.0 --ties-sign mass --ties-disjoint mean), empty
    for a method without any: a merge rule's params carry only its own method's settings. Numbers
    are spelled by `fmt`, so 20 and 20.0 in the config are the same params."""
    spell = lambda v: (
        fmt(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)
    )  # noqa: E731
    return " ".join(
        f"--{key.replace('_', '-')} {spell(MERGE[key])}" for key in get_method(method).options
    )


RUNS = ["zeroshot/theta0", "finetuned/own"] + [f"{m}/{s}" for m in METHODS for s in settings_of(m)]


def finetuned(wildcards=None):
    return [f"{RESULTS}/checkpoints/{t}.safetensors" for t in TASKS]


# The Fisher estimator each consumer reads (config fisher.estimator: one name for both, or a
# mapping). The estimator is part of the artifact's path, so each estimator's diagonals are
# artifacts of their own and switching one consumer's estimator re-runs only that consumer.
FISHER_ESTIMATORS = ("per_sample", "batch", "first_moment", "first_moment_ema")
_fisher_estimator = config["fisher"]["estimator"]
FISHER_ESTIMATOR = {
    consumer: (
        _fisher_estimator
        if isinstance(_fisher_estimator, str)
        else _fisher_estimator.get(consumer, "per_sample")
    )
    for consumer in ("fisher", "epimer")
}


def fishers(fraction, consumer):
    """Every task's Fisher diagonal at one data fraction, by the estimator that `consumer` reads:
    "fisher" (Fisher averaging) or "epimer" (the hessian stage and EpiMer's merges)."""
    estimator = FISHER_ESTIMATOR[consumer]
    return [f"{RESULTS}/fisher/{estimator}/{t}/f{fraction}.zarr" for t in TASKS]


def heads(wildcards=None):
    return [f"{RESULTS}/heads/{t}.safetensors" for t in TASKS]


def run_csv(run):
    """The evaluation CSVs behind one row of summary.csv."""
    method, setting = run.split("/")
    if method == "finetuned":
        return [f"{RESULTS}/eval/finetuned/{t}.csv" for t in TASKS]
    return [f"{RESULTS}/eval/{method}/{setting}.csv"]


def source_path(pattern, task):
    """A configured per-task path pattern (checkpoints.finetuned, heads.path) for one task, with
    {task}, {Dataset} (the task-vectors release's folder name) and {backbone} filled in."""
    return pattern.format(task=task, Dataset=DATASET_DIRS.get(task, task), backbone=BACKBONE)


def job_resources(kind):
    """What one kind of job asks a cluster scheduler for, from config `resources.<kind>`:
    mem_mb (MB, times the attempt number: a retry after running out of memory gets more),
    runtime (minutes), cpus_per_task, and gpu only when it is above 0, so that a CPU job asks
    for no GPU at all. Usage, in the definition of a step: `resources: **job_resources("fisher")`.
    Local runs schedule by threads only: these limit nothing unless given with `--resources`."""
    spec = config["resources"][kind]
    mem_mb = spec["mem_mb"]
    res = dict(
        mem_mb=lambda wildcards, attempt: mem_mb * attempt,
        runtime=spec["runtime"],
        cpus_per_task=spec["cpus_per_task"],
    )
    if spec["gpu"] > 0:
        res["gpu"] = spec["gpu"]
    return res


# The merge sweeps (workflow/rules/merge.smk, evaluate.smk): one merge rule and one evaluate rule
# per registered method, made from its registry row by these.


def fisher_consumer(name):
    """Which entry of config fisher.estimator a method's Fisher diagonals follow: its own name
    when the mapping names it, else `epimer` for methods with projected Hessians and `fisher` for
    the others."""
    if name in FISHER_ESTIMATOR:
        return name
    return "epimer" if REGISTRY[name].curvature else "fisher"


def sweep_wildcards(name):
    """The settings of a method's names other than α, in name order: its sweep's wildcards."""
    return [key for key in ("k", "fraction") if key in REGISTRY[name].uses]


def sweep_label(name):
    """The part of the log name that tells one sweep of a method from another: k{k}_f{fraction},
    k{k}, f{fraction}, or "" for a method named by α alone."""
    return "_".join(f"{key[0]}{{{key}}}" for key in sweep_wildcards(name))


def sweep_settings(name):
    """The setting names of one sweep, as patterns with {k} and {fraction} wildcards: one per α
    of the method's grid (one, for a method without α)."""
    alphas = ALPHAS_OF.get(name, []) if "alpha" in REGISTRY[name].uses else [None]
    return [
        setting_names(name, alphas=[a], ks=["{k}"], fractions=["{fraction}"])[0] for a in alphas
    ]


def check_row(name):
    """A ValueError for a registry row the rules cannot serve (what it needs without the
    setting that names that artifact)."""
    m = REGISTRY[name]
    uses = set(m.uses)
    problems = []
    if m.needs_fisher != "none" and "fraction" not in uses:
        problems.append("it needs Fisher diagonals but `fraction` is not in its `uses`")
    if m.curvature and not {"k", "fraction"} <= uses:
        problems.append(
            "it needs projected Hessians but `k` and `fraction` are not both in its `uses`"
        )
    if "alpha" in uses and not ALPHAS_OF.get(name):
        problems.append("it takes α but config merge.alpha gives it no values")
    if problems:
        raise ValueError(f"merge method `{name}` (registry row): {'; '.join(problems)}")


def merge_rule_inputs(name):
    """The named inputs of a method's merge job, from its registry row."""
    m = REGISTRY[name]
    inputs = dict(pretrained=PRETRAINED, finetuned=finetuned)
    if m.needs_fisher != "none":
        inputs["fisher"] = lambda w, consumer=fisher_consumer(name): fishers(w.fraction, consumer)
    if m.subspace and "k" in m.uses:
        inputs["basis"] = f"{RESULTS}/basis/k{{k}}.zarr"
    if m.curvature:
        inputs["hessian"] = f"{RESULTS}/hessian/k{{k}}_f{{fraction}}.zarr"
    return inputs


def merge_inputs_option(name):
    """A function of a job's inputs: the `pipeline merge` options naming the Fisher diagonals,
    basis and Hessians a method reads (from its registry row), each followed by a space; empty
    for a method that reads the checkpoints alone. A param derived from the inputs: Snakemake
    compares the inputs themselves when deciding re-runs."""
    keys = [key for key in ("fisher", "basis", "hessian") if key in merge_rule_inputs(name)]

    def option(wildcards, input):
        values = [(key, getattr(input, key)) for key in keys]
        return "".join(
            f"--{key} {value if isinstance(value, str) else ' '.join(value)} "
            for key, value in values
        )

    return option


def merge_settings(name):
    """A function of a job's wildcards: the `pipeline merge` settings of a method's sweep, from
    its registry row: k, the α grid, the general settings it reads (the aggregator and
    coordinates where it solves with Hessians, ε where it reads Fisher diagonals or Hessians),
    then its own options (registry `options`). A param Snakemake compares: changing one re-runs
    this method's sweeps."""
    m = REGISTRY[name]
    settings = []
    if "alpha" in m.uses:
        settings.append("--alpha " + " ".join(ALPHAS_OF[name]))
    if m.curvature:
        settings += [f"--aggregator {MERGE['aggregator']}", f"--coords {MERGE['coords']}"]
    if m.needs_fisher != "none" or m.curvature:
        settings.append(f"--eps {MERGE['eps']}")
    settings.append(merge_options(name))

    def spelled(wildcards):
        return " ".join(filter(None, [f"--k {wildcards.k}" if "k" in m.uses else "", *settings]))

    return spelled


# One shell command for every method: what differs comes from the row, through params.
MERGE_SHELL = (
    "python -m pipeline merge {params.method} --pretrained {input.pretrained} --finetuned {input.finetuned} "
    "{params.inputs}{params.settings} --dtype {params.dtype} --device {resources.device} --quiet "
    "--out {output} 2> {log}"
)
