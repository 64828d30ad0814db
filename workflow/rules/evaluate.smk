# Top-1 accuracy of every merged encoder on every task's test split, with each task's own
# head; θ0 (zero-shot: θ0 with the heads) and each fine-tuned encoder as references. The same
# job also evaluates the validation split (10 % of train, seed 0), rows `split = val` of the
# same CSV, so that α can be chosen without test labels.

EVAL = (
    "python -m pipeline evaluate --checkpoint {input.checkpoint} --backbone {params.backbone} "
    "--tasks {params.tasks} --heads {input.heads} --data {resources.data} "
    "--batch-size {resources.batch_size} --splits {params.splits} --device {resources.device} "
    "--dtype {params.dtype} --num-workers {resources.num_workers} --threads {threads} --out {output} 2> {log}"
)


EVAL_PARAMS = dict(
    backbone=BACKBONE,
    tasks=" ".join(TASKS),
    data=DATA,
    splits="test val",
    dtype=config["evaluate"]["dtype"],
    version=ARTIFACT_VERSION,
)


# One evaluation job per merge sweep (rule merge_{method}): one process reads the test data
# once and evaluates every α of the sweep, writing one CSV per merged artifact.
for _name in METHODS:

    rule:
        name:
            f"evaluate_{_name}"
        input:
            checkpoint=[f"{RESULTS}/merged/{_name}/{s}.zarr" for s in sweep_settings(_name)],
            heads=heads,
        output:
            [f"{RESULTS}/eval/{_name}/{s}.csv" for s in sweep_settings(_name)],
        log:
            f"{RESULTS}/logs/evaluate/{'_'.join(filter(None, [_name, sweep_label(_name)]))}.log",
        conda:
            ENV
        threads: 1
        resources:
            **job_resources("evaluate"),
            **knobs("evaluate"),
        params:
            **EVAL_PARAMS,
        shell:
            EVAL


rule evaluate_zeroshot:
    input:
        checkpoint=PRETRAINED,
        heads=heads,
    output:
        f"{RESULTS}/eval/zeroshot/theta0.csv",
    log:
        f"{RESULTS}/logs/evaluate/zeroshot.log",
    conda:
        ENV
    threads: 1
    resources:
        **job_resources("evaluate"),
        **knobs("evaluate"),
    params:
        **EVAL_PARAMS,
    shell:
        EVAL


# Each fine-tuned encoder on its own task only: the upper reference of every table (the
# summary and the normalised accuracy read no other task's row).
rule evaluate_finetuned:
    input:
        checkpoint=f"{RESULTS}/checkpoints/{{task}}.safetensors",
        heads=f"{RESULTS}/heads/{{task}}.safetensors",
    output:
        f"{RESULTS}/eval/finetuned/{{task}}.csv",
    log:
        f"{RESULTS}/logs/evaluate/finetuned_{{task}}.log",
    conda:
        ENV
    threads: 1
    resources:
        **job_resources("evaluate"),
        **knobs("evaluate"),
    params:
        **{**EVAL_PARAMS, "tasks": lambda w: w.task},
    shell:
        EVAL
