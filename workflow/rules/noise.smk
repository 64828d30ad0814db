# The fine-tuning noise study (docs/noise.md), included only with `study: {noise: {enabled:
# true}}`: every task fine-tuned at each cell of a small grid of learning rate, batch size,
# weight decay and augmentation; each cell merged with Task Arithmetic and TSV-M over the
# config's α grid and evaluated (test and val); one table and one figure of normalised accuracy
# against the effective noise scale, with the cell chosen on validation marked.
# Every artifact of a cell lives under noise/{cell}/, and {cell} spells the cell's settings
# (lr0.0005_b64_wd0.1_aug0): a new or changed cell runs alone, the others stay cached.
from pipeline import noise as noise_study

if config["checkpoints"]["source"] != "train":
    raise ValueError(
        "config study.noise fine-tunes the checkpoints itself: it needs checkpoints.source: train "
        f"(the built-in benchmark), not `{config['checkpoints']['source']}`"
    )

NOISE = config["study"]["noise"]
NOISE_ROOT = f"{RESULTS}/noise"
NOISE_CELLS = noise_study.expand_cells(NOISE["cells"], config["finetune"])
NOISE_ALPHAS = alpha_grid(MERGE["alpha"], list(noise_study.METHODS))
NOISE_K = int(NOISE["k"]) if NOISE["k"] is not None else max(KS)


# One cell's fine-tuned checkpoints, in task order ({cell} left a wildcard).
NOISE_CELL_CHECKPOINTS = [f"{NOISE_ROOT}/{{cell}}/checkpoints/{t}.safetensors" for t in TASKS]
# Every evaluation the study's table reads.
NOISE_EVALS = [
    f"{NOISE_ROOT}/{cell}/eval/{run}.csv"
    for cell in NOISE_CELLS
    for run in [f"ta/a{a}" for a in NOISE_ALPHAS["ta"]]
    + [f"tsvm/k{NOISE_K}_a{a}" for a in NOISE_ALPHAS["tsvm"]]
    + [f"finetuned/{t}" for t in TASKS]
]


wildcard_constraints:
    cell="|".join(map(re.escape, NOISE_CELLS)),


rule noise_finetune:
    input:
        pretrained=PRETRAINED,
        head=f"{RESULTS}/heads/{{task}}.safetensors",
    output:
        f"{NOISE_ROOT}/{{cell}}/checkpoints/{{task}}.safetensors",
    log:
        f"{NOISE_ROOT}/{{cell}}/logs/finetune/{{task}}.log",
    conda:
        ENV
    threads: 1
    resources:
        **job_resources("finetune"),
    params:
        backbone=BACKBONE,
        data=DATA,
        train=lambda w: as_json(NOISE_CELLS[w.cell]),
        version=ARTIFACT_VERSION,
    shell:
        "python -m pipeline finetune --task {wildcards.task} --pretrained {input.pretrained} "
        "--head {input.head} --backbone {params.backbone} --data {params.data} "
        "--train {params.train} --threads {threads} --out {output} 2> {log}"


# One merge process per (cell, method) sweeps the whole α list (the CLI merges several α in one
# pass); TSV-M computes its tagged basis itself.
rule noise_merge_ta:
    input:
        pretrained=PRETRAINED,
        finetuned=NOISE_CELL_CHECKPOINTS,
    output:
        [directory(f"{NOISE_ROOT}/{{cell}}/merged/ta/a{a}.zarr") for a in NOISE_ALPHAS["ta"]],
    log:
        f"{NOISE_ROOT}/{{cell}}/logs/merge/ta.log",
    conda:
        ENV
    threads: 1
    resources:
        **job_resources("merge"),
        **knobs("merge"),
    params:
        alphas=" ".join(NOISE_ALPHAS["ta"]),
        options=merge_options("ta"),
        out=lambda w: f"{NOISE_ROOT}/{w.cell}/merged/ta/a{{alpha}}.zarr",
        dtype=MERGE["dtype"],
        version=ARTIFACT_VERSION,
    shell:
        "python -m pipeline merge ta --pretrained {input.pretrained} "
        "--finetuned {input.finetuned} --alpha {params.alphas} {params.options} "
        "--dtype {params.dtype} --device {resources.device} --quiet --out '{params.out}' 2> {log}"


rule noise_merge_tsvm:
    input:
        pretrained=PRETRAINED,
        finetuned=NOISE_CELL_CHECKPOINTS,
    output:
        [
            directory(f"{NOISE_ROOT}/{{cell}}/merged/tsvm/k{NOISE_K}_a{a}.zarr")
            for a in NOISE_ALPHAS["tsvm"]
        ],
    log:
        f"{NOISE_ROOT}/{{cell}}/logs/merge/tsvm.log",
    conda:
        ENV
    threads: 1
    resources:
        **job_resources("merge"),
        **knobs("merge"),
    params:
        alphas=" ".join(NOISE_ALPHAS["tsvm"]),
        k=NOISE_K,
        out=lambda w: f"{NOISE_ROOT}/{w.cell}/merged/tsvm/k{NOISE_K}_a{{alpha}}.zarr",
        dtype=MERGE["dtype"],
        version=ARTIFACT_VERSION,
    shell:
        "python -m pipeline merge tsvm --pretrained {input.pretrained} "
        "--finetuned {input.finetuned} --k {params.k} --alpha {params.alphas} "
        "--dtype {params.dtype} --device {resources.device} --quiet --out '{params.out}' 2> {log}"


rule noise_evaluate:
    input:
        checkpoint=f"{NOISE_ROOT}/{{cell}}/merged/{{method}}/{{setting}}.zarr",
        heads=heads,
    output:
        f"{NOISE_ROOT}/{{cell}}/eval/{{method}}/{{setting}}.csv",
    log:
        f"{NOISE_ROOT}/{{cell}}/logs/evaluate/{{method}}_{{setting}}.log",
    wildcard_constraints:
        method="|".join(noise_study.METHODS),
        setting=r"[^/]+",
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


# Each fine-tuned encoder on its own task only: the reference of the normalised accuracy.
rule noise_evaluate_finetuned:
    input:
        checkpoint=f"{NOISE_ROOT}/{{cell}}/checkpoints/{{task}}.safetensors",
        heads=f"{RESULTS}/heads/{{task}}.safetensors",
    output:
        f"{NOISE_ROOT}/{{cell}}/eval/finetuned/{{task}}.csv",
    log:
        f"{NOISE_ROOT}/{{cell}}/logs/evaluate/finetuned_{{task}}.log",
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


# The table and the figure in the HTML report, in a category of their own.
NOISE_TABLE = dict(caption="../report/noise_table.rst", category="8. Fine-tuning noise")
NOISE_PLOT = dict(caption="../report/noise_plot.rst", category="8. Fine-tuning noise")


rule noise_study:
    input:
        NOISE_EVALS,
    output:
        csv=report(
            f"{NOISE_ROOT}/noise_study.csv", **NOISE_TABLE, labels={"table": "noise_study.csv"}
        ),
        md=f"{NOISE_ROOT}/noise_study.md",
        html=report(
            f"{NOISE_ROOT}/noise_study.html", **NOISE_TABLE, labels={"table": "noise study"}
        ),
        png=report(f"{NOISE_ROOT}/noise_study.png", **NOISE_PLOT, labels={"figure": "noise study"}),
        svg=f"{NOISE_ROOT}/noise_study.svg",
    log:
        f"{NOISE_ROOT}/logs/noise_study.log",
    conda:
        ENV
    resources:
        **job_resources("report"),
    params:
        root=lambda w, output: os.path.dirname(output.csv),
        cells=as_json(NOISE_CELLS),
        tasks=" ".join(TASKS),
        alphas=as_json(NOISE_ALPHAS),
        k=NOISE_K,
        min_finetuned=NOISE["min_finetuned"],
        data=DATA,
        version=ARTIFACT_VERSION,
    shell:
        "python -m pipeline.noise table --root {params.root} --cells {params.cells} "
        "--tasks {params.tasks} --alphas {params.alphas} --k {params.k} --data {params.data} "
        "--min-finetuned {params.min_finetuned} --out-dir {params.root} 2> {log}"
