# The tagged basis per k (shared by TSV-M and EpiMer) and the projected Hessians per (k, fraction).


rule basis:
    input:
        pretrained=PRETRAINED,
        finetuned=finetuned,
    output:
        directory(f"{RESULTS}/basis/k{{k}}.zarr"),
    log:
        f"{RESULTS}/logs/basis/k{{k}}.log",
    conda:
        ENV
    threads: 1
    resources:
        **job_resources("basis"),
        **knobs("merge"),
    params:
        dtype=MERGE["dtype"],
        version=ARTIFACT_VERSION,
    shell:
        "python -m pipeline basis --pretrained {input.pretrained} --finetuned {input.finetuned} "
        "--k {wildcards.k} --dtype {params.dtype} --device {resources.device} --quiet --out {output} 2> {log}"


rule hessian:
    input:
        pretrained=PRETRAINED,
        finetuned=finetuned,
        basis=f"{RESULTS}/basis/k{{k}}.zarr",
        fisher=lambda w: fishers(w.fraction, "epimer"),
    output:
        directory(f"{RESULTS}/hessian/k{{k}}_f{{fraction}}.zarr"),
    log:
        f"{RESULTS}/logs/hessian/k{{k}}_f{{fraction}}.log",
    conda:
        ENV
    threads: 1
    resources:
        **job_resources("hessian"),
        **knobs("merge"),
    params:
        eps=MERGE["eps"],
        dtype=MERGE["dtype"],
        rank=f"--fisher-rank {MERGE['fisher_rank']}" if MERGE["fisher_rank"] else "",
        solver=MERGE["solver"],
        version=ARTIFACT_VERSION,
    shell:
        "python -m pipeline hessian --pretrained {input.pretrained} --finetuned {input.finetuned} "
        "--fisher {input.fisher} --basis {input.basis} --eps {params.eps} --dtype {params.dtype} --device {resources.device} "
        "{params.rank} --solver {params.solver} --quiet --out {output} 2> {log}"
