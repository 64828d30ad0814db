# The loss landscape of the paper's Appendix D.3: PCA of the fine-tuned models, each task's
# loss on a grid over the top two directions around their mean. One cached job; it depends
# on the checkpoints and heads only, so new merges or α values never re-run it. The merged
# models are placed on the plane when the figures are drawn (rule plots).

LANDSCAPE = config["landscape"]
# Two principal directions need at least three fine-tuned models: with fewer tasks the
# landscape (job and figures) is left out rather than failing the run.
if LANDSCAPE["enabled"] and len(TASKS) < 3:
    print(
        f"landscape: left out, it needs at least 3 tasks (this run has {len(TASKS)})",
        file=sys.stderr,
    )
    LANDSCAPE = {**LANDSCAPE, "enabled": False}


rule landscape:
    input:
        pretrained=PRETRAINED,
        finetuned=finetuned,
        heads=heads,
    output:
        directory(f"{RESULTS}/landscape/landscape.zarr"),
    log:
        f"{RESULTS}/logs/landscape.log",
    conda:
        ENV
    threads: 1
    # Forward passes like an evaluation (on a GPU when the cluster gives one).
    resources:
        **job_resources("evaluate"),
        **knobs("landscape"),
    params:
        backbone=BACKBONE,
        tasks=" ".join(TASKS),
        data=DATA,
        split=LANDSCAPE["split"],
        max_images=LANDSCAPE["max_images"],
        grid=LANDSCAPE["grid"],
        margin=LANDSCAPE["margin"],
        version=ARTIFACT_VERSION,
    shell:
        "python -m pipeline landscape --pretrained {input.pretrained} --finetuned {input.finetuned} "
        "--tasks {params.tasks} --heads {input.heads} --backbone {params.backbone} --data {resources.data} "
        "--split {params.split} --max-images {params.max_images} --grid {params.grid} "
        "--margin {params.margin} --batch-size {resources.batch_size} --threads {threads} "
        "--out {output} 2> {log}"
