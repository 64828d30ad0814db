# Per-task empirical Fisher diagonal at θ_t, one artifact per data fraction. Fractions are
# prefixes of one seeded ordering, so each is a function of (task, fraction) alone.


rule fisher:
    input:
        checkpoint=f"{RESULTS}/checkpoints/{{task}}.safetensors",
        head=f"{RESULTS}/heads/{{task}}.safetensors",
    output:
        directory(f"{RESULTS}/fisher/{{task}}/f{{fraction}}.zarr"),
    params:
        backbone=BACKBONE,
        data=DATA,
        batch_size=config["fisher"]["batch_size"],
        chunk_size=config["fisher"]["chunk_size"],
        seed=config["fisher"]["seed"],
        device=config["fisher"]["device"],
        dtype=config["fisher"]["dtype"],
        num_workers=config["fisher"]["num_workers"],
        version=ARTIFACT_VERSION,
    resources:
        **job_resources("fisher"),
    threads: 1
    conda:
        ENV
    log:
        f"{RESULTS}/logs/fisher/{{task}}_f{{fraction}}.log",
    shell:
        "python -m pipeline fisher --task {wildcards.task} --checkpoint {input.checkpoint} "
        "--head {input.head} --backbone {params.backbone} --data {params.data} "
        "--fraction {wildcards.fraction} --batch-size {params.batch_size} "
        "--chunk-size {params.chunk_size} --seed {params.seed} --device {params.device} "
        "--dtype {params.dtype} --num-workers {params.num_workers} --threads {threads} "
        "--out {output} 2> {log}"
