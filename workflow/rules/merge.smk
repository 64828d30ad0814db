# One merge rule per registered method (pipeline/methods/__init__.py), generated from its row:
# its inputs from what the row needs (Fisher diagonals, the tagged basis, projected Hessians),
# its wildcards from the settings that name its artifacts (`uses`). One job merges a whole α
# sweep (every α of one (k, fraction)) in one pass over the inputs; its outputs are the per-α
# artifacts merged/{method}/{setting}.zarr. Adding an α re-runs the sweeps that hold it and
# nothing else. Each rule's params carry only its own method's settings: changing
# merge.ties_sign re-runs the TIES merges, not Task Arithmetic's.


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
        setting_names(name, alphas=[a], ks=["{k}"], fractions=["{fraction}"])[0]
        for a in alphas
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
        inputs["fisher"] = lambda w, consumer=fisher_consumer(name): fishers(
            w.fraction, consumer
        )
    if m.subspace and "k" in m.uses:
        inputs["basis"] = f"{RESULTS}/basis/k{{k}}.zarr"
    if m.curvature:
        inputs["hessian"] = f"{RESULTS}/hessian/k{{k}}_f{{fraction}}.zarr"
    return inputs


def merge_arguments(name):
    """A function of a job's wildcards and inputs: the `pipeline merge` options of a method's
    sweep after --pretrained and --finetuned, from its registry row: the Fisher diagonals, basis
    and Hessians it reads, k, the α grid, the general settings it reads (the aggregator and
    coordinates where it solves with Hessians, ε where it reads Fisher diagonals or Hessians),
    then its own options (registry `options`)."""
    m = REGISTRY[name]
    keys = [
        key for key in ("fisher", "basis", "hessian") if key in merge_rule_inputs(name)
    ]
    settings = []
    if "alpha" in m.uses:
        settings.append("--alpha " + " ".join(ALPHAS_OF[name]))
    if m.curvature:
        settings += [
            f"--aggregator {MERGE['aggregator']}",
            f"--coords {MERGE['coords']}",
        ]
    if m.needs_fisher != "none" or m.curvature:
        settings.append(f"--eps {MERGE['eps']}")
    settings.append(merge_options(name))

    def arguments(wildcards, input):
        paths = [(key, getattr(input, key)) for key in keys]
        parts = [
            f"--{key} {value if isinstance(value, str) else ' '.join(value)}"
            for key, value in paths
        ]
        parts += [f"--k {wildcards.k}"] if "k" in m.uses else []
        return " ".join(filter(None, parts + settings))

    return arguments


# One shell command for every method: what differs comes from the row, through params.
MERGE_SHELL = (
    "python -m pipeline merge {params.method} --pretrained {input.pretrained} --finetuned {input.finetuned} "
    "{params.arguments} --dtype {params.dtype} --device {resources.device} --quiet --out {output} 2> {log}"
)


for _name in METHODS:
    check_row(_name)

    rule:
        name:
            f"merge_{_name}"
        input:
            **merge_rule_inputs(_name),
        output:
            [
                directory(f"{RESULTS}/merged/{_name}/{s}.zarr")
                for s in sweep_settings(_name)
            ],
        log:
            f"{RESULTS}/logs/merge/{'_'.join(filter(None, [_name, sweep_label(_name)]))}.log",
        conda:
            ENV
        threads: 1
        resources:
            **job_resources("merge"),
            **knobs("merge"),
        params:
            method=_name,
            arguments=merge_arguments(_name),
            dtype=MERGE["dtype"],
            version=ARTIFACT_VERSION,
        shell:
            MERGE_SHELL
