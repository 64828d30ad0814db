# Per-task diagonal Fisher estimate at θ_t, one artifact per (estimator, task, data fraction).
# Fractions are prefixes of one seeded ordering, so each artifact is a function of (estimator,
# task, fraction) alone; which estimator a consumer reads is config fisher.estimator
# (FISHER_ESTIMATOR in common.smk).


rule fisher:
    input:
        checkpoint=f"{RESULTS}/checkpoints/{{task}}.safetensors",
        head=f"{RESULTS}/heads/{{task}}.safetensors",
    output:
        directory(f"{RESULTS}/fisher/{{estimator}}/{{task}}/f{{fraction}}.zarr"),
    log:
        f"{RESULTS}/logs/fisher/{{estimator}}/{{task}}_f{{fraction}}.log",
    wildcard_constraints:
        estimator="|".join(FISHER_ESTIMATORS),
    conda:
        ENV
    threads: 1
    resources:
        **job_resources("fisher"),
        **knobs("fisher"),
    params:
        backbone=BACKBONE,
        data=DATA,
        batch_size=config["fisher"]["batch_size"],
        seed=config["fisher"]["seed"],
        dtype=config["fisher"]["dtype"],
        version=ARTIFACT_VERSION,
    shell:
        "python -m pipeline fisher --task {wildcards.task} --checkpoint {input.checkpoint} "
        "--head {input.head} --backbone {params.backbone} --data {resources.data} "
        "--estimator {wildcards.estimator} --fraction {wildcards.fraction} "
        "--batch-size {params.batch_size} --chunk-size {resources.chunk_size} --seed {params.seed} "
        "--device {resources.device} --dtype {params.dtype} --num-workers {resources.num_workers} "
        "--threads {threads} --out {output} 2> {log}"
