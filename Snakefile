# EpiMer pipeline: every expensive stage is a cached artifact (see README, "Results layout").
#   snakemake --cores 2                                  # the built-in demo benchmark
#   snakemake --cores 2 --configfile config/my-run.yaml  # your own settings
import os

from snakemake.utils import min_version, validate

min_version("9.0")


# The default config sits next to this file, so `--directory` runs elsewhere still find it;
# `--configfile` layers a user's settings on top of it.
configfile: os.path.join(workflow.basedir, "config/config.yaml")


validate(config, "workflow/schemas/config.schema.yaml", set_default=True)


# The front page of the HTML report (`snakemake --report report.html`).
report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"


wildcard_constraints:
    task="|".join(re.escape(t) for t in TASKS),
    k=r"\d+",
    alpha=r"[0-9.]+",
    fraction=r"[0-9.]+",


include: "workflow/rules/train.smk"
include: "workflow/rules/sources.smk"
include: "workflow/rules/fisher.smk"
include: "workflow/rules/subspace.smk"
include: "workflow/rules/merge.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/landscape.smk"
include: "workflow/rules/report.smk"


if config["study"]["noise"]["enabled"]:

    include: "workflow/rules/noise.smk"


rule all:
    default_target: True
    input:
        f"{RESULTS}/summary.csv",
        rules.tables.output,
        rules.plots.output,
        rules.noise_study.output if config["study"]["noise"]["enabled"] else [],


# After a run, successful or not, the content stamps record the artifacts as it left them
# (docs/workflow.md, "Re-runs by content").
onerror:
    settle_stamps()


onsuccess:
    settle_stamps()
    print(
        f"\nResults are in {RESULTS}/: summary.csv, tables/tables.md (every table; also CSV and HTML),"
        f" plots/ (PNG and SVG).\nThe HTML report with every table and figure:"
        f" snakemake --cores 1 --report {RESULTS}/report.html (add the same --configfile), then open it in a browser."
    )
