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
    return [setting_names(name, alphas=[a], ks=["{k}"], fractions=["{fraction}"])[0] for a in alphas]


def check_row(name):
    """A ValueError for a registry row the rules cannot serve (what it needs without the
    setting that names that artifact)."""
    m = REGISTRY[name]
    uses = set(m.uses)
    problems = []
    if m.needs_fisher != "none" and "fraction" not in uses:
        problems.append("it needs Fisher diagonals but `fraction` is not in its `uses`")
    if m.curvature and not {"k", "fraction"} <= uses:
        problems.append("it needs projected Hessians but `k` and `fraction` are not both in its `uses`")
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


def merge_rule_params(name):
    """What shapes a method's merged artifacts, beyond its inputs and outputs: the general
    settings it reads (ε where it reads Fisher diagonals or Hessians, the aggregator and
    coordinates where it solves with Hessians), its own options, its α grid, the dtype."""
    m = REGISTRY[name]
    params = {}
    if m.needs_fisher != "none" or m.curvature:
        params["eps"] = MERGE["eps"]
    if m.curvature:
        params.update(aggregator=MERGE["aggregator"], coords=MERGE["coords"])
    params["options"] = merge_options(name)
    if "alpha" in m.uses:
        params["alphas"] = " ".join(ALPHAS_OF[name])
    params["dtype"] = MERGE["dtype"]
    params["version"] = ARTIFACT_VERSION
    return params


def merge_command(name):
    """The `pipeline merge` command of a method's sweep job; --out is the artifact path with an
    {alpha} placeholder, which `pipeline merge` fills once per α."""
    m, inputs, params = REGISTRY[name], merge_rule_inputs(name), merge_rule_params(name)
    parts = [f"python -m pipeline merge {name} --pretrained {{input.pretrained}} --finetuned {{input.finetuned}}"]
    parts += [f"--{key} {{input.{key}}}" for key in ("fisher", "basis", "hessian") if key in inputs]
    if "k" in m.uses:
        parts.append("--k {wildcards.k}")
    if "alpha" in m.uses:
        parts.append("--alpha {params.alphas}")
    parts += [f"--{key} {{params.{key}}}" for key in ("aggregator", "coords", "eps") if key in params]
    if params["options"]:
        parts.append("{params.options}")
    parts.append("--dtype {params.dtype} --device {resources.device} --quiet")
    parts.append("--out {params.out} 2> {log}")
    return " ".join(parts)


def out_pattern(name):
    """A function of the wildcards: the sweep's --out, with {alpha} where the α goes."""
    setting = setting_names(name, alphas=["{alpha}"], ks=["{k}"], fractions=["{fraction}"])[0]
    pattern = f"{RESULTS}/merged/{name}/{setting}.zarr"
    return lambda w: pattern.replace("{k}", str(w.get("k", ""))).replace("{fraction}", str(w.get("fraction", "")))


for _name in METHODS:
    check_row(_name)

    rule:
        name:
            f"merge_{_name}"
        input:
            **merge_rule_inputs(_name),
        output:
            [directory(f"{RESULTS}/merged/{_name}/{s}.zarr") for s in sweep_settings(_name)],
        params:
            **merge_rule_params(_name),
            out=out_pattern(_name),
        resources:
            **job_resources("merge"),
            **knobs("merge"),
        threads: 1
        conda:
            ENV
        log:
            f"{RESULTS}/logs/merge/{'_'.join(filter(None, [_name, sweep_label(_name)]))}.log",
        shell:
            merge_command(_name)
