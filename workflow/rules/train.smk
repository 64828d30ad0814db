# The demo benchmark's checkpoints: θ0 pretrained on a generic task, one frozen linear head
# per task on θ0 features, then each task fine-tuned with its head frozen (task-vectors recipe).


if config["checkpoints"]["source"] == "train":

    rule pretrain:
        output:
            f"{RESULTS}/checkpoints/pretrained.safetensors",
        params:
            backbone=BACKBONE,
            data=DATA,
            train=as_json(config["pretrain"]),
            version=ARTIFACT_VERSION,
        resources:
            **job_resources("pretrain"),
        threads: workflow.cores
        conda:
            ENV
        log:
            f"{RESULTS}/logs/pretrain.log",
        shell:
            "python -m pipeline pretrain --backbone {params.backbone} --data {params.data} "
            "--train {params.train} --threads {threads} --out {output} 2> {log}"

    rule finetune:
        input:
            pretrained=PRETRAINED,
            head=f"{RESULTS}/heads/{{task}}.safetensors",
        output:
            f"{RESULTS}/checkpoints/{{task}}.safetensors",
        params:
            backbone=BACKBONE,
            data=DATA,
            train=as_json(config["finetune"]),
            version=ARTIFACT_VERSION,
        resources:
            **job_resources("finetune"),
        threads: 1
        conda:
            ENV
        log:
            f"{RESULTS}/logs/finetune/{{task}}.log",
        shell:
            "python -m pipeline finetune --task {wildcards.task} --pretrained {input.pretrained} "
            "--head {input.head} --backbone {params.backbone} --data {params.data} "
            "--train {params.train} --threads {threads} --out {output} 2> {log}"


if config["heads"]["source"] == "train":

    rule head:
        input:
            pretrained=PRETRAINED,
        output:
            f"{RESULTS}/heads/{{task}}.safetensors",
        params:
            backbone=BACKBONE,
            data=DATA,
            train=as_json(config["head"]),
            version=ARTIFACT_VERSION,
        resources:
            **job_resources("head"),
        threads: 1
        conda:
            ENV
        log:
            f"{RESULTS}/logs/head/{{task}}.log",
        shell:
            "python -m pipeline head --task {wildcards.task} --pretrained {input.pretrained} "
            "--backbone {params.backbone} --data {params.data} --train {params.train} "
            "--threads {threads} --out {output} 2> {log}"
