# summary.csv: one row per method/setting with every task's accuracy, the average, the
# worst task and the diagnostics (η, V_S, R_S), plus the θ0 and fine-tuned references.


rule report:
    input:
        evals=[csv for run in RUNS for csv in run_csv(run)],
        merged=[f"{RESULTS}/merged/{run}.zarr" for run in RUNS if run.split("/")[0] in METHODS],
    output:
        f"{RESULTS}/summary.csv",
    params:
        root=lambda w, output: os.path.dirname(output[0]),
        tasks=" ".join(TASKS),
        runs=" ".join(RUNS),
        version=ARTIFACT_VERSION,
    resources:
        **job_resources("report"),
    conda:
        ENV
    log:
        f"{RESULTS}/logs/report.log",
    shell:
        "python -m pipeline report --root {params.root} --tasks {params.tasks} "
        "--runs {params.runs} --out {output} 2> {log}"
