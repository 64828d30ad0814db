"""The options of the report stages (tables, plots, landscape), as tables."""

from __future__ import annotations

from typing import Any

from pipeline.cli import reporting
from pipeline.cli.options import finite_float
from pipeline.cli.parser import Entry, add_plain_stage, add_stage, option
from pipeline.cli.training_stages import AUTO_DEVICE_HELP, BACKBONE, DATA, HEADS, PRETRAINED

#: The settings of the paper's Table 2, Table 6 and Figure 3 (the config's `report` block).
PAPER_OPTIONS: list[Entry] = [
    option(
        "--paper-k",
        type=int,
        default=None,
        help="k of TSV-M and EpiMer in Tables 2 and 6 and Figure 3 (the paper: 32; default: the run's largest)",
    ),
    option(
        "--paper-fraction",
        type=float,
        default=None,
        help="Fisher fraction of Fisher averaging and EpiMer in Tables 2 and 6 (the paper: 1.0; default: the run's largest)",
    ),
    option(
        "--paper-alpha",
        type=float,
        default=1.0,
        help="EpiMer's fixed α in Figure 3 (the paper: 1.0)",
    ),
    option(
        "--paper-flat-alpha",
        type=float,
        default=0.125,
        help="α of Task Arithmetic and TIES in Tables 2 and 6 (the paper's λ_t = 0.125)",
    ),
    option(
        "--heads-source",
        choices=("train", "zeroshot", "import", "smoke"),
        default=None,
        help="the config's heads.source, named in the θ0 row",
    ),
]

SUMMARY = option("--summary", required=True, help="summary.csv of the run")

TABLES_OPTIONS: list[Entry] = [
    SUMMARY,
    option("--out-dir", required=True, help="folder for {table}.md/.csv/.html and tables.md"),
    *PAPER_OPTIONS,
]

PLOTS_OPTIONS: list[Entry] = [
    SUMMARY,
    option(
        "--merged",
        nargs="*",
        default=[],
        help="merged/{method}/{setting}.zarr artifacts: EpiMer ones give η per layer; each method's setting "
        "chosen on validation is marked on the landscape",
    ),
    option(
        "--landscape",
        default=None,
        help="landscape Zarr artifact: also draw landscape_{task} and landscape",
    ),
    option("--out-dir", required=True, help="folder for the figures"),
    option(
        "--formats",
        nargs="+",
        choices=("png", "svg", "pdf"),
        default=["png", "svg"],
        help="figure file formats",
    ),
    option("--dpi", type=int, default=120, help="resolution of PNG figures"),
    *PAPER_OPTIONS,
]

LANDSCAPE_OPTIONS: list[Entry] = [
    PRETRAINED,
    option(
        "--finetuned",
        nargs="+",
        required=True,
        help="θ_1 … θ_T, one per task, in the order of --tasks",
    ),
    option(
        "--tasks",
        nargs="+",
        required=True,
        help="the tasks, in the order of --finetuned and --heads",
    ),
    HEADS,
    BACKBONE,
    DATA,
    option(
        "--split",
        choices=("val", "test", "train"),
        default="val",
        help="images the loss is measured on",
    ),
    option("--max-images", type=int, default=256, help="first N images of the split per task"),
    option(
        "--grid",
        type=int,
        default=9,
        help="grid points per axis (grid × grid evaluations per task)",
    ),
    option(
        "--margin",
        type=finite_float,
        default=0.3,
        help="padding around θ0 and the θ_t, as a fraction of their larger spread",
    ),
    option("--batch-size", type=int, default=256, help="images per forward pass"),
    option("--device", default="auto", help=AUTO_DEVICE_HELP),
    option("--out", required=True, help="output Zarr group, e.g. landscape/landscape.zarr"),
]


def add_report_stages(sub: Any) -> None:
    """tables and plots (from summary.csv), and the landscape they draw."""
    add_plain_stage(
        sub,
        "tables",
        "paper-style tables from summary.csv (Markdown, CSV, HTML)",
        reporting.cmd_tables,
        TABLES_OPTIONS,
    )
    add_plain_stage(
        sub,
        "plots",
        "figures from summary.csv, the merge reports and the landscape (PNG, SVG)",
        reporting.cmd_plots,
        PLOTS_OPTIONS,
    )
    add_stage(
        sub,
        "landscape",
        "cached stage: per-task loss on the PCA plane of the fine-tuned models (Zarr)",
        reporting.cmd_landscape,
        LANDSCAPE_OPTIONS,
    )
