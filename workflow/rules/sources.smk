# Where θ0, the fine-tuned θ_t and the heads come from, for the real backbones:
#   checkpoints.source: import  θ0 from open_clip (tag or file) or any importer format, θ_t imported
#                       smoke   θ0 a seeded random init, θ_t = θ0 + synthetic task vectors
#   heads.source:       zeroshot (CLIP text tower over the release's prompts) | import (head files,
#                       the release's head_<Dataset>.pt; the paper configs' default) | smoke (random)
# (`train`, the demo's own training, lives in train.smk.) Every source writes the same
# artifacts: checkpoints/{pretrained,<task>}.safetensors and heads/<task>.safetensors.

CHECKPOINTS = config["checkpoints"]
HEADS = config["heads"]


if CHECKPOINTS["source"] == "import":
    THETA0 = CHECKPOINTS["pretrained"]
    THETA0_IS_FILE = (
        os.path.isfile(THETA0)
        or os.sep in THETA0
        or THETA0.endswith((".pt", ".bin", ".safetensors"))
    )

    rule import_pretrained:
        input:
            [THETA0] if THETA0_IS_FILE else [],
        output:
            f"{RESULTS}/checkpoints/pretrained.safetensors",
        log:
            f"{RESULTS}/logs/import/pretrained.log",
        conda:
            ENV
        threads: 1
        resources:
            **job_resources("import"),
        params:
            backbone=BACKBONE,
            source=THETA0,
            format=CHECKPOINTS["format"],
            version=ARTIFACT_VERSION,
        shell:
            (
                "python -m pipeline import --kind encoder --backbone {params.backbone} "
                "--format {params.format} --out {output} {params.source} 2> {log}"
            )
            if THETA0_IS_FILE
            else "python -m pipeline theta0 --backbone {params.backbone} --pretrained {params.source} --out {output} 2> {log}"

    rule import_finetuned:
        input:
            source=lambda w: source_path(CHECKPOINTS["finetuned"], w.task),
            pretrained=f"{RESULTS}/checkpoints/pretrained.safetensors",
        output:
            f"{RESULTS}/checkpoints/{{task}}.safetensors",
        log:
            f"{RESULTS}/logs/import/{{task}}.log",
        conda:
            ENV
        threads: 1
        resources:
            **job_resources("import"),
        params:
            backbone=BACKBONE,
            format=CHECKPOINTS["format"],
            version=ARTIFACT_VERSION,
        shell:
            "python -m pipeline import --kind encoder --backbone {params.backbone} --format {params.format} "
            "--pretrained {input.pretrained} --out {output} {input.source} 2> {log}"


if CHECKPOINTS["source"] == "smoke":
    SMOKE = CHECKPOINTS["smoke"]

    rule smoke_pretrained:
        output:
            f"{RESULTS}/checkpoints/pretrained.safetensors",
        log:
            f"{RESULTS}/logs/smoke/pretrained.log",
        conda:
            ENV
        threads: 1
        resources:
            **job_resources("import"),
        params:
            backbone=BACKBONE,
            seed=SMOKE["seed"],
            version=ARTIFACT_VERSION,
        shell:
            "python -m pipeline theta0 --backbone {params.backbone} --pretrained random "
            "--seed {params.seed} --out {output} 2> {log}"

    rule smoke_finetuned:
        input:
            pretrained=f"{RESULTS}/checkpoints/pretrained.safetensors",
        output:
            f"{RESULTS}/checkpoints/{{task}}.safetensors",
        log:
            f"{RESULTS}/logs/smoke/{{task}}.log",
        conda:
            ENV
        threads: 1
        resources:
            **job_resources("import"),
        params:
            rank=SMOKE["rank"],
            scale=SMOKE["scale"],
            noise=SMOKE["noise"],
            seed=SMOKE["seed"],
            version=ARTIFACT_VERSION,
        shell:
            "python -m pipeline smoke --kind finetuned --task {wildcards.task} --pretrained {input.pretrained} "
            "--rank {params.rank} --scale {params.scale} --noise {params.noise} --seed {params.seed} "
            "--out {output} 2> {log}"


if HEADS["source"] == "zeroshot":

    rule zeroshot_head:
        output:
            f"{RESULTS}/heads/{{task}}.safetensors",
        log:
            f"{RESULTS}/logs/heads/{{task}}.log",
        conda:
            ENV
        threads: 1
        resources:
            **job_resources("zeroshot_head"),
            **knobs("data"),
        params:
            backbone=BACKBONE,
            pretrained=HEADS["pretrained"] or CHECKPOINTS["pretrained"],
            data=DATA,
            version=ARTIFACT_VERSION,
        shell:
            "python -m pipeline zeroshot-head --backbone {params.backbone} --pretrained {params.pretrained} "
            "--task {wildcards.task} --data {resources.data} --out {output} 2> {log}"


if HEADS["source"] == "import":
    # The release's heads (head_<Dataset>.pt) are the ones its θ_t were fine-tuned against.
    # Name every missing file at once, with both ways out, rather than one rule's missing input.
    _missing_heads = [
        source_path(HEADS["path"], task)
        for task in TASKS
        if not os.path.isfile(source_path(HEADS["path"], task))
    ]
    if _missing_heads:
        from snakemake.exceptions import WorkflowError

        raise WorkflowError(
            f"heads.source is `import` but {len(_missing_heads)} head file(s) of heads.path "
            f"`{HEADS['path']}` are missing: {', '.join(_missing_heads)}. Put the release's head "
            "files there (the task-vectors release's head_<Dataset>.pt, the tall-masks release's "
            "head_<Dataset>Val.pt), or point heads.path at them, or set heads.source: zeroshot "
            "to build the heads from the release's class names and prompts."
        )

    rule import_head:
        input:
            lambda w: source_path(HEADS["path"], w.task),
        output:
            f"{RESULTS}/heads/{{task}}.safetensors",
        log:
            f"{RESULTS}/logs/heads/{{task}}.log",
        conda:
            ENV
        threads: 1
        resources:
            **job_resources("import"),
        params:
            backbone=BACKBONE,
            version=ARTIFACT_VERSION,
        shell:
            "python -m pipeline import --kind head --backbone {params.backbone} --out {output} {input} 2> {log}"


if HEADS["source"] == "smoke":

    rule smoke_head:
        output:
            f"{RESULTS}/heads/{{task}}.safetensors",
        log:
            f"{RESULTS}/logs/smoke/head_{{task}}.log",
        conda:
            ENV
        threads: 1
        resources:
            **job_resources("import"),
            **knobs("data"),
        params:
            backbone=BACKBONE,
            data=DATA,
            seed=CHECKPOINTS["smoke"]["seed"],
            version=ARTIFACT_VERSION,
        shell:
            "python -m pipeline smoke --kind head --task {wildcards.task} --backbone {params.backbone} "
            "--data {resources.data} --seed {params.seed} --out {output} 2> {log}"
