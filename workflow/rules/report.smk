# summary.csv: one row per method/setting with every task's accuracy, the average, the
# worst task and the diagnostics (η, V_S, V_S_merged, R_S, amplification), plus the θ0 and
# fine-tuned references; then the paper's tables (Table 2 and Table 6 at the settings of the
# config's `report` block, beside their all-settings versions; Tables 7–9; Figure 3) and the
# figures. Outputs flagged with report() make up the HTML report (`snakemake --report
# report.html`), each with its caption from workflow/report/.


# The tables/plots options of the paper's settings (the config's `report` block) and the θ0 heads:
# the demo's heads are trained on θ0 (`heads.source: train`) as linear probes, or are the rows of
# its pretraining prototypes (`head.zeroshot: true`), which the tables call zero-shot heads.
HEADS_SOURCE = (
    "zeroshot"
    if config["heads"]["source"] == "train" and config["head"].get("zeroshot")
    else config["heads"]["source"]
)
PAPER_OPTIONS = " ".join(
    [
        f"--paper-alpha {config['report']['paper_alpha']}",
        f"--paper-flat-alpha {config['report']['paper_flat_alpha']}",
    ]
    + [
        f"--paper-{key} {config['report'][f'paper_{key}']}"
        for key in ("k", "fraction")
        if config["report"].get(f"paper_{key}") is not None
    ]
    + [f"--heads-source {HEADS_SOURCE}"]
)


# The report's sidebar in reading order: Snakemake sorts categories and the results inside a
# category by name, so both carry numbers. name → (category, position and label).
CAT_MAIN, CAT_PER_TASK, CAT_ALPHA, CAT_DATA, CAT_CURVATURE, CAT_LANDSCAPE, CAT_SUMMARY = (
    "1. Main results",
    "2. Per task",
    "3. α sensitivity",
    "4. Fisher data efficiency",
    "5. Curvature η",
    "6. Loss landscape",
    "7. Summary data",
)
TABLES = {
    "table2": (CAT_MAIN, "1. Table 2 (paper setting)"),
    "main": (CAT_MAIN, "2. Table 2, all settings"),
    "paired": (CAT_MAIN, "3. Paired differences vs. TSV-M"),
    "normalised": (CAT_MAIN, "4. Normalised accuracy (table)"),
    "table6": (CAT_PER_TASK, "1. Table 6 (paper setting)"),
    "per_task": (CAT_PER_TASK, "2. Table 6, all settings"),
    "alpha_sensitivity": (CAT_ALPHA, "1. Tables 7–9 (α sensitivity)"),
    "alpha_selection": (CAT_ALPHA, "3. α chosen on validation vs. best on test"),
    "data_efficiency": (CAT_DATA, "2. Figure 3 as a table"),
    "eta": (CAT_CURVATURE, "1. η, V_S and EpiMer's margin (table)"),
}
PLOTS = {
    "normalised": (CAT_MAIN, "5. Normalised accuracy (figure)"),
    "per_task": (CAT_PER_TASK, "3. Per-task accuracy (figure)"),
    "alpha_sweep": (CAT_ALPHA, "2. Tables 7–9 as curves"),
    "data_efficiency": (CAT_DATA, "1. Figure 3 (Fisher data efficiency)"),
    "eta_vs_k": (CAT_CURVATURE, "2. η vs k (figure)"),
    "eta_per_layer": (CAT_CURVATURE, "3. η per layer (figure)"),
}


rule report:
    input:
        evals=[csv for run in RUNS for csv in run_csv(run)],
        merged=[f"{RESULTS}/merged/{run}.zarr" for run in RUNS if run.split("/")[0] in METHODS],
    output:
        summary=report(
            f"{RESULTS}/summary.csv",
            caption="../report/summary.rst",
            category=CAT_SUMMARY,
            labels={"result": "2. summary.csv (download)"},
        ),
        # Beside summary.csv: each merge method's chosen setting vs. TSV-M's, image by image.
        paired=f"{RESULTS}/paired.csv",
    log:
        f"{RESULTS}/logs/report.log",
    conda:
        ENV
    resources:
        **job_resources("report"),
    params:
        root=lambda w, output: os.path.dirname(output[0]),
        tasks=" ".join(TASKS),
        runs=" ".join(RUNS),
        version=ARTIFACT_VERSION,
    shell:
        "python -m pipeline report --root {params.root} --tasks {params.tasks} "
        "--runs {params.runs} --out {output.summary} 2> {log}"


# One HTML rendition of each table for the report (it shows HTML inline), beside the
# Markdown and CSV ones; tables.md holds every table, summary.html the summary as a page.
rule tables:
    input:
        summary=rules.report.output.summary,
        paired=rules.report.output.paired,
    output:
        **{
            f"{name}_html": report(
                f"{RESULTS}/tables/{name}.html",
                caption=f"../report/table_{name}.rst",
                category=category,
                labels={"result": label},
            )
            for name, (category, label) in TABLES.items()
        },
        **{
            f"{name}_{ext}": f"{RESULTS}/tables/{name}.{ext}"
            for name in TABLES
            for ext in ("md", "csv")
        },
        index=f"{RESULTS}/tables/tables.md",
        summary_html=report(
            f"{RESULTS}/tables/summary.html",
            caption="../report/summary.rst",
            category=CAT_SUMMARY,
            labels={"result": "1. summary.csv (table view)"},
        ),
    log:
        f"{RESULTS}/logs/tables.log",
    conda:
        ENV
    resources:
        **job_resources("report"),
    params:
        out_dir=lambda w, output: os.path.dirname(output.index),
        paper=PAPER_OPTIONS,
        version=ARTIFACT_VERSION,
    shell:
        "python -m pipeline tables --summary {input.summary} --out-dir {params.out_dir} {params.paper} 2> {log}"


# name → (report category, caption, label): PNG and SVG of each; the PNG goes in the report.
FIGURES = {
    name: (category, f"../report/plot_{name}.rst", label)
    for name, (category, label) in PLOTS.items()
}
if LANDSCAPE["enabled"]:
    FIGURES["landscape"] = (CAT_LANDSCAPE, "../report/landscape.rst", "0. all tasks")
    FIGURES.update(
        {f"landscape_{t}": (CAT_LANDSCAPE, "../report/landscape_task.rst", t) for t in TASKS}
    )


rule plots:
    input:
        summary=rules.report.output.summary,
        merged=[f"{RESULTS}/merged/{run}.zarr" for run in RUNS if run.split("/")[0] in METHODS],
        landscape=[rules.landscape.output[0]] if LANDSCAPE["enabled"] else [],
    output:
        **{
            f"{name}_png": report(
                f"{RESULTS}/plots/{name}.png",
                caption=caption,
                category=category,
                labels={"result": label},
            )
            for name, (category, caption, label) in FIGURES.items()
        },
        **{f"{name}_svg": f"{RESULTS}/plots/{name}.svg" for name in FIGURES},
    log:
        f"{RESULTS}/logs/plots.log",
    conda:
        ENV
    resources:
        **job_resources("report"),
    params:
        out_dir=lambda w, output: os.path.dirname(output[0]),
        landscape=lambda w, input: f"--landscape {input.landscape}" if input.landscape else "",
        dpi=config["report"]["dpi"],
        paper=PAPER_OPTIONS,
        version=ARTIFACT_VERSION,
    shell:
        "python -m pipeline plots --summary {input.summary} --merged {input.merged} {params.landscape} "
        "--dpi {params.dpi} --out-dir {params.out_dir} {params.paper} 2> {log}"
