# summary.csv: one row per method/setting with every task's accuracy, the average, the
# worst task and the diagnostics (η, V_S, V_S_merged, R_S, amplification), plus the θ0 and
# fine-tuned references; then the paper's tables (Table 2 and Table 6 at the settings of the
# config's `report` block, beside their all-settings versions; Tables 7–9; Figure 3) and the
# figures. Outputs flagged with report() make up the HTML report (`snakemake --report
# report.html`), each with its caption from workflow/report/.


# The tables/plots options of the paper's settings (the config's `report` block) and the θ0 heads.
PAPER_OPTIONS = " ".join(
    [f"--paper-alpha {config['report']['paper_alpha']}", f"--paper-flat-alpha {config['report']['paper_flat_alpha']}"]
    + [f"--paper-{key} {config['report'][f'paper_{key}']}" for key in ("k", "fraction")
       if config["report"].get(f"paper_{key}") is not None]
    + [f"--heads-source {config['heads']['source']}"]
)


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
# The paper's tables first (at the paper's settings), then the all-settings versions of
# Table 2 and Table 6, then the project's own tables.
TABLES = {
    "table2": "Table 2 (paper setting)",
    "table6": "Table 6 (paper setting)",
    "main": "Table 2, all settings",
    "per_task": "Table 6, all settings",
    "alpha_sensitivity": "Tables 7–9 (α sensitivity)",
    "data_efficiency": "Figure 3 (Fisher data efficiency), as a table",
    "alpha_selection": "α selection (validation vs test)",
    "normalised": "Normalised accuracy",
    "eta": "η, V_S and EpiMer's margin",
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
        paper=PAPER_OPTIONS,
        version=ARTIFACT_VERSION,
    resources:
        **job_resources("report"),
    conda:
        ENV
    log:
        f"{RESULTS}/logs/tables.log",
    shell:
        "python -m pipeline tables --summary {input.summary} --out-dir {params.out_dir} {params.paper} 2> {log}"


PLOTS = {
    "alpha_sweep": "Tables 7–9 (α sweep)",
    "data_efficiency": "Figure 3 (Fisher data efficiency)",
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
        paper=PAPER_OPTIONS,
        version=ARTIFACT_VERSION,
    resources:
        **job_resources("report"),
    conda:
        ENV
    log:
        f"{RESULTS}/logs/plots.log",
    shell:
        "python -m pipeline plots --summary {input.summary} --merged {input.merged} {params.landscape} "
        "--dpi {params.dpi} --out-dir {params.out_dir} {params.paper} 2> {log}"
