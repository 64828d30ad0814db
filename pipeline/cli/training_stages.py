"""The options of the stages that make, score and collect the merge inputs, as tables."""

from __future__ import annotations

from typing import Any

from pipeline.cli import reporting, training
from pipeline.cli.options import COMPUTE_DTYPES, finite_float, json_object
from pipeline.cli.parser import Entry, Exclusive, Option, add_stage, option

DATA_HELP = (
    'the config\'s `data` section as JSON, e.g. \'{"source": "synthetic", "train_size": 2000}\''
)
BACKBONE_HELP = "the encoder architecture (demo, demo-96, ViT-B-32, ViT-B-16, ViT-L-14; pipeline/models/clip.py)"
TASK_HELP = "the task (a name the data settings know, e.g. shapes, or mnist for real data)"
HEAD_OUT_HELP = "output head (.safetensors with `weight` [C, D] and `bias` [C])"
HEADS_HELP = "one head per task, in the order of --tasks"
AUTO_DEVICE_HELP = "cuda, cpu, or auto (cuda when available)"

TASK = option("--task", required=True, help=TASK_HELP)
BACKBONE = option("--backbone", default="demo", help=BACKBONE_HELP)
DATA = option("--data", type=json_object, required=True, help=DATA_HELP)
PRETRAINED = option("--pretrained", required=True, help="θ0 checkpoint")
HEAD = option("--head", required=True, help="the task's head")
HEADS = option("--heads", nargs="+", required=True, help=HEADS_HELP)


def train_settings(help: str) -> Option:
    """--train: a stage's settings as a JSON object."""
    return option("--train", type=json_object, default={}, help=help)


def output(help: str) -> Option:
    """--out: the one path a stage writes."""
    return option("--out", required=True, help=help)


def compute_options(dtype_help: str) -> list[Entry]:
    """--device, --dtype, --num-workers of the stages that run the encoder on data."""
    return [
        option(
            "--device",
            default="auto",
            help="cpu, cuda, cuda:N, or auto (cuda when available, else cpu)",
        ),
        option("--dtype", choices=COMPUTE_DTYPES, default="float32", help=dtype_help),
        option(
            "--num-workers",
            type=int,
            default=0,
            help="DataLoader worker processes reading and transforming images (0: in the main process)",
        ),
    ]


PRETRAIN_OPTIONS: list[Entry] = [
    BACKBONE,
    option("--data", type=json_object, default=None, help=DATA_HELP + " (required to train)"),
    Exclusive(
        (
            option(
                "--shipped",
                action="store_true",
                help="write the shipped θ0 of the demo (its SHA-256 checked) instead of training",
            ),
            option(
                "--regenerate-shipped",
                action="store_true",
                help="train with the shipped θ0's recorded recipe (backbone, data, train, threads) and "
                "fail unless the result is the shipped file, bit for bit",
            ),
        )
    ),
    train_settings("training settings as JSON (epochs, lr, batch_size, seed, train_size)"),
    output("output checkpoint (.safetensors)"),
]

HEAD_OPTIONS: list[Entry] = [
    TASK,
    PRETRAINED,
    BACKBONE,
    DATA,
    train_settings("head settings as JSON (epochs, lr, seed)"),
    output(HEAD_OUT_HELP),
]

FINETUNE_OPTIONS: list[Entry] = [
    TASK,
    PRETRAINED,
    HEAD,
    BACKBONE,
    DATA,
    train_settings("fine-tuning settings as JSON (epochs, lr, batch_size, weight_decay, seed)"),
    output("output checkpoint θ_t (.safetensors)"),
]

FISHER_OPTIONS: list[Entry] = [
    TASK,
    option("--checkpoint", required=True, help="θ_t"),
    HEAD,
    BACKBONE,
    DATA,
    option(
        "--fraction",
        type=float,
        required=True,
        help="data fraction f in (0, 1]: the first max(1, ⌊f·N/B⌋) batches of one seeded ordering",
    ),
    option(
        "--batch-size",
        type=int,
        default=64,
        help="samples per mini-batch of the seeded ordering (a fraction keeps whole batches)",
    ),
    option(
        "--chunk-size",
        type=int,
        default=8,
        help="samples per vectorised per-sample-gradient chunk (per_sample), or per forward and backward pass within a mini-batch (the other estimators)",
    ),
    option(
        "--seed", type=int, default=0, help="seed of the sample ordering shared by all fractions"
    ),
    option(
        "--estimator",
        choices=["per_sample", "batch", "first_moment", "first_moment_ema"],
        default="per_sample",
        help="per_sample: mean of per-sample squared gradients (paper eq. 27; default); batch: FusionBench's squared "
        "mini-batch gradients over the sample count; first_moment: u² with u the mean mini-batch gradient (appendix C.3); "
        "first_moment_ema: u² with u Adam's bias-corrected running average (β₁ = 0.9) of the mini-batch gradients",
    ),
    *compute_options(
        "float32, or bfloat16 autocast for the forward and backward passes (Fisher squares and sums stay float32)"
    ),
    output("output Zarr group, e.g. fisher/per_sample/{task}/f0.05.zarr"),
]

EVALUATE_OPTIONS: list[Entry] = [
    option(
        "--checkpoint",
        nargs="+",
        required=True,
        metavar="CKPT",
        help="encoder state dicts (.safetensors or merged .zarr); several are evaluated in one process on data read once",
    ),
    BACKBONE,
    option(
        "--tasks",
        nargs="+",
        required=True,
        help="the tasks to evaluate on (names of the data's tasks)",
    ),
    HEADS,
    DATA,
    option("--batch-size", type=int, default=256, help="images per forward pass"),
    option(
        "--splits",
        nargs="+",
        choices=("test", "val"),
        default=["test"],
        help="splits to evaluate, rows for each in one CSV (val: 10%% of train, seed 0, for choosing α without test labels)",
    ),
    *compute_options("float32, or bfloat16 autocast for the forward passes"),
    option(
        "--out",
        nargs="+",
        required=True,
        metavar="CSV",
        help="one output CSV per --checkpoint, in its order: task, split, accuracy, n, correct (the per-image "
        "correctness in the data's order: base64 of numpy.packbits of the bool vector)",
    ),
]

REPORT_OPTIONS: list[Entry] = [
    option("--root", required=True, help="the run's results folder"),
    option("--tasks", nargs="+", required=True, help="the run's tasks, in column order"),
    option(
        "--runs", nargs="+", required=True, help="method/setting names, e.g. epimer/k4_a1.0_f0.05"
    ),
    output("output summary.csv"),
]

THETA0_OPTIONS: list[Entry] = [
    option("--backbone", required=True, help="backbone name (see pipeline/models/clip.py)"),
    option(
        "--pretrained",
        required=True,
        help="open_clip pretrained tag (e.g. openai), a local open_clip checkpoint file, or `random`",
    ),
    option("--seed", type=int, default=0, help="random: initialisation seed"),
    output("output checkpoint (.safetensors, open_clip visual naming)"),
]

SMOKE_OPTIONS: list[Entry] = [
    option(
        "--kind",
        choices=("finetuned", "head"),
        default="finetuned",
        help="write a synthetic fine-tuned checkpoint or a random head",
    ),
    TASK,
    option("--pretrained", help="finetuned: θ0 checkpoint"),
    option("--backbone", default="demo", help="head: backbone whose embedding size the head takes"),
    option(
        "--data",
        type=json_object,
        default={},
        help="head: the data section (gives the task's class count)",
    ),
    option(
        "--rank",
        type=int,
        default=8,
        help="finetuned: rank of each matrix layer's strong directions",
    ),
    option(
        "--scale", type=finite_float, default=0.05, help="finetuned: ‖low-rank part‖_F / ‖W0‖_F"
    ),
    option(
        "--noise",
        type=finite_float,
        default=0.005,
        help="finetuned: ‖dense part‖_F / ‖W0‖_F (about)",
    ),
    option("--seed", type=int, default=0, help="seed of the synthetic delta or head"),
    output("output .safetensors (checkpoint or head)"),
]

ZEROSHOT_HEAD_OPTIONS: list[Entry] = [
    option("--backbone", required=True, help="CLIP backbone (ViT-B-32, ViT-B-16, ViT-L-14)"),
    option(
        "--pretrained",
        required=True,
        help="open_clip pretrained tag (e.g. openai) or a local open_clip checkpoint file",
    ),
    TASK,
    option(
        "--data",
        type=json_object,
        default={},
        help=DATA_HELP + "; gives the class names and templates",
    ),
    option("--device", default="auto", help=AUTO_DEVICE_HELP),
    option("--batch-size", type=int, default=256, help="prompts per text-tower forward pass"),
    output(HEAD_OUT_HELP),
]

IMPORT_OPTIONS: list[Entry] = [
    option(
        "src",
        metavar="SRC",
        help="checkpoint: task-vectors finetuned.pt/head_<Dataset>.pt, plain state dict .pt, HF model.safetensors, open_clip safetensors",
    ),
    option(
        "--format",
        choices=("auto", "taskvectors", "state_dict", "hf", "open_clip"),
        default="auto",
        help="source format (auto: detected from the content)",
    ),
    option(
        "--kind",
        choices=("encoder", "head"),
        default="encoder",
        help="an image encoder (open_clip visual state dict) or a classification head ({weight [C, D], bias [C]})",
    ),
    option(
        "--backbone",
        default="ViT-B-32",
        help="encoder: backbone to validate names and shapes against (demo, ViT-B-32, ... or any open_clip model name)",
    ),
    option(
        "--pretrained",
        default=None,
        help="encoder, hf: θ0 checkpoint to take `proj` from when SRC is a CLIPVisionModel without projection",
    ),
    option(
        "--keep-dtype",
        action="store_true",
        help="keep the source dtype (default: convert to float32)",
    ),
    output("output .safetensors, e.g. checkpoints/{task}.safetensors or heads/{task}.safetensors"),
]

#: (name, help, command, options) of the stages that make, score and collect the merge inputs.
TRAINING_STAGES = (
    (
        "pretrain",
        "demo: pretrain θ0 (generic or attributes task), or write the shipped θ0",
        training.cmd_pretrain,
        PRETRAIN_OPTIONS,
    ),
    (
        "head",
        "fit a task's frozen linear head on θ0 features",
        training.cmd_head,
        HEAD_OPTIONS,
    ),
    (
        "finetune",
        "fine-tune the encoder on one task with its frozen head",
        training.cmd_finetune,
        FINETUNE_OPTIONS,
    ),
    (
        "fisher",
        "diagonal Fisher estimate of a fine-tuned encoder (Zarr)",
        training.cmd_fisher,
        FISHER_OPTIONS,
    ),
    (
        "evaluate",
        "top-1 accuracy of checkpoints on every task's test (and val) split (one CSV each)",
        training.cmd_evaluate,
        EVALUATE_OPTIONS,
    ),
    (
        "report",
        "collect evaluations and diagnostics into summary.csv",
        reporting.cmd_report,
        REPORT_OPTIONS,
    ),
    (
        "theta0",
        "θ0 of a real backbone: open_clip weights (tag or file) or a seeded random init, as a visual checkpoint",
        training.cmd_theta0,
        THETA0_OPTIONS,
    ),
    (
        "smoke",
        "smoke path: a synthetic fine-tuned checkpoint θ0 + low-rank + dense delta, or a random head",
        training.cmd_smoke,
        SMOKE_OPTIONS,
    ),
    (
        "zeroshot-head",
        "zero-shot head of a task from CLIP's text tower (class names × prompt templates)",
        training.cmd_zeroshot_head,
        ZEROSHOT_HEAD_OPTIONS,
    ),
    (
        "import",
        "import a fine-tuned encoder or a head from a foreign checkpoint format (safetensors out)",
        training.cmd_import,
        IMPORT_OPTIONS,
    ),
)


def add_training_stages(sub: Any) -> None:
    for name, help, func, entries in TRAINING_STAGES:
        add_stage(sub, name, help, func, entries)
