# summary.csv: one row per method/setting with every task's accuracy, the average, the
# worst task and the diagnostics (η, V_S, R_S), plus the θ0 and fine-tuned references; then
# the paper-style tables and the figures. Outputs flagged with report() make up the HTML
# report (`snakemake --report report.html`), each with its caption from workflow/report/.


rule report:
    input:
        evals=[csv for run in RUNS for csv in run_csv(run)],
        merged=[f"{RESULTS}/merged/{run}.zarr" for run in RUNS if run.split("/")[0] in METHODS],
    output:
        report(f"{RESULTS}/summary.csv", caption="../report/summary.rst", category="Tables", labels={"table": "summary.csv"}),
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


# One HTML rendition of each table for the report (it shows HTML inline), beside the
# Markdown and CSV ones; tables.md holds every table.
TABLES = {
    "main": "Main results",
    "per_task": "Per-task accuracy",
    "alpha_sensitivity": "α sensitivity",
    "alpha_selection": "α selection (validation vs test)",
    "data_efficiency": "Fisher data efficiency",
    "normalised": "Normalised accuracy",
    "eta": "η and EpiMer's margin",
}


rule tables:
    input:
        summary=rules.report.output[0],
    output:
        **{
            f"{name}_html": report(
                f"{RESULTS}/tables/{name}.html",
                caption=f"../report/table_{name}.rst",
                category="Tables",
                labels={"table": label},
            )
            for name, label in TABLES.items()
        },
        **{f"{name}_{ext}": f"{RESULTS}/tables/{name}.{ext}" for name in TABLES for ext in ("md", "csv")},
        index=f"{RESULTS}/tables/tables.md",
    params:
        out_dir=lambda w, output: os.path.dirname(output.index),
        version=ARTIFACT_VERSION,
    resources:
        **job_resources("report"),
    conda:
        ENV
    log:
        f"{RESULTS}/logs/tables.log",
    shell:
        "python -m pipeline tables --summary {input.summary} --out-dir {params.out_dir} 2> {log}"


PLOTS = {
    "alpha_sweep": "α sweep",
    "data_efficiency": "Fisher data efficiency",
    "per_task": "Per-task accuracy",
    "normalised": "Normalised accuracy",
    "eta_per_layer": "η per layer",
    "eta_vs_k": "η vs k",
}

# name → (report category, caption, label): PNG and SVG of each; the PNG goes in the report.
FIGURES = {name: ("Figures", f"../report/plot_{name}.rst", label) for name, label in PLOTS.items()}
if LANDSCAPE["enabled"]:
    FIGURES["landscape"] = ("Loss landscape", "../report/landscape.rst", "all tasks")
    FIGURES.update({f"landscape_{t}": ("Loss landscape", "../report/landscape_task.rst", t) for t in TASKS})


rule plots:
    input:
        summary=rules.report.output[0],
        merged=[f"{RESULTS}/merged/{run}.zarr" for run in RUNS if run.split("/")[0] in METHODS],
        landscape=[rules.landscape.output[0]] if LANDSCAPE["enabled"] else [],
    output:
        **{
            f"{name}_png": report(
                f"{RESULTS}/plots/{name}.png", caption=caption, category=category, labels={"figure": label}
            )
            for name, (category, caption, label) in FIGURES.items()
        },
        **{f"{name}_svg": f"{RESULTS}/plots/{name}.svg" for name in FIGURES},
    params:
        out_dir=lambda w, output: os.path.dirname(output[0]),
        landscape=lambda w, input: f"--landscape {input.landscape}" if input.landscape else "",
        dpi=config["report"]["dpi"],
        version=ARTIFACT_VERSION,
    resources:
        **job_resources("report"),
    conda:
        ENV
    log:
        f"{RESULTS}/logs/plots.log",
    shell:
        "python -m pipeline plots --summary {input.summary} --merged {input.merged} {params.landscape} "
        "--dpi {params.dpi} --out-dir {params.out_dir} 2> {log}"
