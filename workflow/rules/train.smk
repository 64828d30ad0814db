# The demo benchmark's checkpoints: θ0 pretrained on a generic task, one frozen linear head
# per task on θ0 features, then each task fine-tuned with its head frozen (task-vectors recipe).


rule pretrain:
    output:
        f"{RESULTS}/checkpoints/pretrained.safetensors",
    params:
        backbone=BACKBONE,
        data=DATA,
        train=as_json(config["pretrain"]),
        version=ARTIFACT_VERSION,
    threads: workflow.cores
    conda:
        ENV
    log:
        f"{RESULTS}/logs/pretrain.log",
    shell:
        "python -m pipeline pretrain --backbone {params.backbone} --data {params.data} "
        "--train {params.train} --threads {threads} --out {output} 2> {log}"


rule head:
    input:
        pretrained=rules.pretrain.output[0],
    output:
        f"{RESULTS}/heads/{{task}}.safetensors",
    params:
        backbone=BACKBONE,
        data=DATA,
        train=as_json(config["head"]),
        version=ARTIFACT_VERSION,
    threads: 1
    conda:
        ENV
    log:
        f"{RESULTS}/logs/head/{{task}}.log",
    shell:
        "python -m pipeline head --task {wildcards.task} --pretrained {input.pretrained} "
        "--backbone {params.backbone} --data {params.data} --train {params.train} "
        "--threads {threads} --out {output} 2> {log}"


rule finetune:
    input:
        pretrained=rules.pretrain.output[0],
        head=rules.head.output[0],
    output:
        f"{RESULTS}/checkpoints/{{task}}.safetensors",
    params:
        backbone=BACKBONE,
        data=DATA,
        train=as_json(config["finetune"]),
        version=ARTIFACT_VERSION,
    threads: 1
    conda:
        ENV
    log:
        f"{RESULTS}/logs/finetune/{{task}}.log",
    shell:
        "python -m pipeline finetune --task {wildcards.task} --pretrained {input.pretrained} "
        "--head {input.head} --backbone {params.backbone} --data {params.data} "
        "--train {params.train} --threads {threads} --out {output} 2> {log}"
