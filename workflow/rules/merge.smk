# One merged encoder per (method, setting); a setting names only the parameters the method
# uses, so changing the α list re-runs merges and evaluations only. Each rule's params carry
# only its own method's settings: changing merge.ties_sign re-runs TIES merges, not TA's.

# Methods whose setting is α alone and that read nothing but the checkpoints (ta, ties).
FLAT_METHODS = [name for name, m in REGISTRY.items() if m.uses == ("alpha",) and m.needs_fisher == "none" and not m.subspace]


rule merge_flat:
    input:
        pretrained=PRETRAINED,
        finetuned=finetuned,
    output:
        directory(f"{RESULTS}/merged/{{method}}/a{{alpha}}.zarr"),
    wildcard_constraints:
        method="|".join(map(re.escape, FLAT_METHODS)),
    params:
        method=lambda w: w.method,
        options=lambda w: merge_options(w.method),
        dtype=MERGE["dtype"],
        version=ARTIFACT_VERSION,
    resources:
        **job_resources("merge"),
        **knobs("merge"),
    threads: 1
    conda:
        ENV
    log:
        f"{RESULTS}/logs/merge/{{method}}_a{{alpha}}.log",
    shell:
        "python -m pipeline merge {params.method} --pretrained {input.pretrained} "
        "--finetuned {input.finetuned} --alpha {wildcards.alpha} {params.options} "
        "--dtype {params.dtype} --device {resources.device} --quiet --out {output} 2> {log}"


rule merge_fisher:
    input:
        pretrained=PRETRAINED,
        finetuned=finetuned,
        fisher=lambda w: fishers(w.fraction, "fisher"),
    output:
        directory(f"{RESULTS}/merged/fisher/f{{fraction}}.zarr"),
    params:
        eps=MERGE["eps"],
        dtype=MERGE["dtype"],
        version=ARTIFACT_VERSION,
    resources:
        **job_resources("merge"),
        **knobs("merge"),
    threads: 1
    conda:
        ENV
    log:
        f"{RESULTS}/logs/merge/fisher_f{{fraction}}.log",
    shell:
        "python -m pipeline merge fisher --pretrained {input.pretrained} "
        "--finetuned {input.finetuned} --fisher {input.fisher} --eps {params.eps} "
        "--dtype {params.dtype} --device {resources.device} --quiet --out {output} 2> {log}"


rule merge_tsvm:
    input:
        pretrained=PRETRAINED,
        finetuned=finetuned,
        basis=f"{RESULTS}/basis/k{{k}}.zarr",
    output:
        directory(f"{RESULTS}/merged/tsvm/k{{k}}_a{{alpha}}.zarr"),
    params:
        dtype=MERGE["dtype"],
        version=ARTIFACT_VERSION,
    resources:
        **job_resources("merge"),
        **knobs("merge"),
    threads: 1
    conda:
        ENV
    log:
        f"{RESULTS}/logs/merge/tsvm_k{{k}}_a{{alpha}}.log",
    shell:
        "python -m pipeline merge tsvm --pretrained {input.pretrained} "
        "--finetuned {input.finetuned} --basis {input.basis} --k {wildcards.k} "
        "--alpha {wildcards.alpha} --dtype {params.dtype} --device {resources.device} --quiet --out {output} 2> {log}"


rule merge_epimer:
    input:
        pretrained=PRETRAINED,
        finetuned=finetuned,
        basis=f"{RESULTS}/basis/k{{k}}.zarr",
        hessian=f"{RESULTS}/hessian/k{{k}}_f{{fraction}}.zarr",
        fisher=lambda w: fishers(w.fraction, "epimer"),
    output:
        directory(f"{RESULTS}/merged/epimer/k{{k}}_a{{alpha}}_f{{fraction}}.zarr"),
    params:
        aggregator=MERGE["aggregator"],
        coords=MERGE["coords"],
        eps=MERGE["eps"],
        dtype=MERGE["dtype"],
        version=ARTIFACT_VERSION,
    resources:
        **job_resources("merge"),
        **knobs("merge"),
    threads: 1
    conda:
        ENV
    log:
        f"{RESULTS}/logs/merge/epimer_k{{k}}_a{{alpha}}_f{{fraction}}.log",
    shell:
        "python -m pipeline merge epimer --pretrained {input.pretrained} "
        "--finetuned {input.finetuned} --fisher {input.fisher} --basis {input.basis} "
        "--hessian {input.hessian} --k {wildcards.k} --alpha {wildcards.alpha} "
        "--aggregator {params.aggregator} --coords {params.coords} --eps {params.eps} "
        "--dtype {params.dtype} --device {resources.device} --quiet --out {output} 2> {log}"
