"""The stages that make the merge inputs and score the merges: θ0 (pretrain, theta0), heads,
fine-tuning, Fisher estimates, evaluation, and checkpoints made up (smoke) or brought in
(import, zeroshot-head)."""

from __future__ import annotations

import argparse
from typing import Any

from pipeline import ARTIFACT_VERSION
from pipeline.cli.options import UsageError
from pipeline.cli.runtime import log, summary, task_head, torch_dtype


def _write_head(out: str, weight: Any, bias: Any, meta: dict[str, str]) -> None:
    """A head file: `weight` [C, D] and `bias` [C], checked finite."""
    from pipeline.store import write_safetensors

    write_safetensors(out, {"weight": weight, "bias": bias}, meta, finite=True)


def _check_regenerated(out: str) -> None:
    """Fail unless the θ0 at `out` is the shipped one, bit for bit."""
    from pipeline.data import theta0 as shipped

    digest = shipped.file_sha256(out)
    if digest != shipped.THETA0_SHA256:
        raise ValueError(
            f"{out}: the regenerated θ0 has SHA-256 {digest}, not the shipped "
            f"{shipped.THETA0_SHA256} ({shipped.THETA0_PATH}): the recipe, the data generator "
            "or the training code changed; ship the new file and its digest, or restore them"
        )
    log.info("%s reproduces the shipped θ0 (SHA-256 %s)", out, digest)


def cmd_pretrain(args: argparse.Namespace) -> int:
    from pipeline import train
    from pipeline.data import load_split, num_classes
    from pipeline.data import theta0 as shipped
    from pipeline.data.synthetic import ATTRIBUTES_TASK, PRETRAIN_TASK, attribute_class_counts
    from pipeline.store import write_safetensors

    if args.shipped:
        write_safetensors(args.out, shipped.load_shipped_theta0(), shipped.THETA0_METADATA)
        return 0
    if args.regenerate_shipped:
        import torch

        recipe = shipped.THETA0_RECIPE
        args.backbone, args.data, args.train = recipe["backbone"], recipe["data"], recipe["train"]
        torch.set_num_threads(recipe["threads"])
    if args.data is None:
        raise UsageError(
            "pretrain needs --data (the config's data section), --shipped or --regenerate-shipped"
        )
    settings = dict(args.train)
    data = dict(args.data)
    data["train_size"] = settings.pop("train_size", data.get("train_size", 2000))
    task = settings.pop("task", PRETRAIN_TASK)  # generic, or attributes (the CLIP-like demo)
    if task == ATTRIBUTES_TASK:
        settings["attribute_classes"] = attribute_class_counts()
    images, labels = load_split(data, task, "train")
    from pipeline.models.clip import build_encoder

    encoder = build_encoder(args.backbone)
    state = train.pretrain(encoder, images, labels, num_classes(data, task), **settings)
    write_safetensors(
        args.out, state, {"stage": "pretrain", "backbone": args.backbone}, finite=True
    )
    if args.regenerate_shipped:
        _check_regenerated(args.out)
    return 0


def cmd_head(args: argparse.Namespace) -> int:
    from pipeline import train
    from pipeline.data import load_split, num_classes
    from pipeline.models.clip import load_encoder

    settings = dict(args.train)
    encoder = load_encoder(args.backbone, args.pretrained)
    if settings.pop("zeroshot", False):  # rows of θ0's pretraining prototypes (the CLIP-like demo)
        from pipeline.data.synthetic import attribute_class_counts, zeroshot_rows

        attribute, rows = zeroshot_rows(args.task)
        # θ0's own temperature unless the config sets one (steps, lr, seed: probe only)
        scale = settings.get("logit_scale", train.PRETRAIN_LOGIT_SCALE)
        weight, bias = train.zeroshot_head(
            attribute_class_counts(), attribute, rows, int(encoder.output_dim), logit_scale=scale
        )
    else:
        images, labels = load_split(args.data, args.task, "train")
        weight, bias = train.fit_head(
            encoder, images, labels, num_classes(args.data, args.task), **settings
        )
    _write_head(args.out, weight, bias, {"stage": "head", "task": args.task})
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from pipeline import train
    from pipeline.data import load_split
    from pipeline.models.clip import load_encoder
    from pipeline.store import write_safetensors

    images, labels = load_split(args.data, args.task, "train")
    encoder = load_encoder(args.backbone, args.pretrained)
    weight, bias = task_head(args.head, args.data, args.task)
    settings = dict(args.train)
    if settings.pop("augment", False):  # random shifts while training (pipeline/noise.py)
        from pipeline.noise import augment_in_training

        augment_in_training(encoder, seed=settings.get("seed", 0))
    state = train.finetune(encoder, weight, bias, images, labels, **settings)
    write_safetensors(args.out, state, {"stage": "finetune", "task": args.task}, finite=True)
    return 0


def _fisher_parameters(args: argparse.Namespace) -> dict[str, Any]:
    """The parameters a fisher artifact records."""
    from pipeline.fisher import ADAM_BETA1

    params = {
        "task": args.task,
        "estimator": args.estimator,
        "fraction": args.fraction,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "dtype": args.dtype,
        "data": args.data,
    }
    if args.estimator == "first_moment_ema":
        params["beta1"] = ADAM_BETA1
    return params


def cmd_fisher(args: argparse.Namespace) -> int:
    from pipeline.data import open_dataset
    from pipeline.fisher import estimate_fisher_dataset
    from pipeline.models.backbone import ImageClassifier
    from pipeline.models.clip import eval_transform, load_encoder
    from pipeline.store import ZarrWriter, provenance

    dataset = open_dataset(args.data, args.task, "train", transform=eval_transform(args.backbone))
    encoder = load_encoder(args.backbone, args.checkpoint)
    weight, bias = task_head(args.head, args.data, args.task)
    model = ImageClassifier(encoder, weight, bias)
    names = [f"encoder.{n}" for n, _ in encoder.named_parameters()]
    result = estimate_fisher_dataset(
        model,
        dataset,
        [args.fraction],
        estimator=args.estimator,
        param_names=names,
        batch_size=args.batch_size,
        chunk_size=args.chunk_size,
        seed=args.seed,
        device=args.device,
        dtype=torch_dtype(args.dtype),
        num_workers=args.num_workers,
        progress=not args.quiet,
    )[args.fraction]
    with ZarrWriter(
        args.out,
        provenance(
            "fisher", _fisher_parameters(args), [args.checkpoint, args.head], ARTIFACT_VERSION
        ),
        finite=True,
    ) as writer:
        for name, value in result.items():
            writer.write(name.removeprefix("encoder."), value)
    return 0


def _write_evaluation(out: str, rows: list[dict[str, Any]]) -> None:
    """One evaluation CSV: task, split, accuracy, n, and the packed per-image correctness."""
    import csv

    from pipeline.evaluate import pack_correct
    from pipeline.store import atomic_path

    with atomic_path(out) as tmp:
        with open(tmp, "w", newline="") as fh:
            fields = ["task", "split", "accuracy", "n", "correct"]
            writer = csv.DictWriter(fh, fieldnames=fields, lineterminator="\n")
            writer.writeheader()
            for row in rows:
                writer.writerow(
                    {
                        **row,
                        "accuracy": f"{row['accuracy']:.6f}",
                        "correct": pack_correct(row["correct"]),
                    }
                )


def _evaluation_data(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The data of every split and task, opened once for all the checkpoints."""
    from pipeline.data import open_dataset
    from pipeline.models.clip import eval_transform

    transform = eval_transform(args.backbone)
    return {
        split: {
            task: open_dataset(args.data, task, split, transform=transform) for task in args.tasks
        }
        for split in dict.fromkeys(args.splits)
    }


def cmd_evaluate(args: argparse.Namespace) -> int:
    from pipeline.evaluate import check_sequence, evaluate_tasks
    from pipeline.models.clip import load_encoder

    check_sequence("heads", args.heads, len(args.tasks))
    if len(args.out) != len(args.checkpoint):
        raise ValueError(
            f"got {len(args.checkpoint)} --checkpoint and {len(args.out)} --out paths; give one output CSV per "
            "checkpoint, in the same order"
        )
    heads = {task: task_head(path, args.data, task) for task, path in zip(args.tasks, args.heads)}
    data = _evaluation_data(args)
    for checkpoint, out in zip(args.checkpoint, args.out):
        log.info("evaluating %s", checkpoint)
        encoder = load_encoder(args.backbone, checkpoint)
        rows = []
        for split, datasets in data.items():
            rows += evaluate_tasks(
                encoder,
                heads,
                datasets,
                args.batch_size,
                device=args.device,
                dtype=torch_dtype(args.dtype),
                num_workers=args.num_workers,
                progress=not args.quiet,
                split=split,
            )
        _write_evaluation(out, rows)
        summary.info(
            "%s: average top-1 %s -> %s",
            checkpoint,
            ", ".join(
                f"{split} {sum(r['accuracy'] for r in rows if r['split'] == split) / len(args.tasks):.4f}"
                for split in data
            ),
            out,
        )
    return 0


def cmd_theta0(args: argparse.Namespace) -> int:
    from pipeline.models.clip import build_clip, get_backbone
    from pipeline.models.smoke import pretrained_state
    from pipeline.store import write_safetensors

    if args.pretrained == "random":
        state = pretrained_state(args.backbone, args.seed)
    else:
        get_backbone(args.backbone)
        visual = build_clip(args.backbone, args.pretrained).visual
        state = {n: t.detach().float().contiguous() for n, t in visual.state_dict().items()}
    write_safetensors(
        args.out,
        state,
        {"stage": "theta0", "backbone": args.backbone, "pretrained": args.pretrained},
        finite=True,
    )
    return 0


def cmd_smoke(args: argparse.Namespace) -> int:
    from pipeline.models import smoke
    from pipeline.models.clip import build_encoder
    from pipeline.store import load_tensors, write_safetensors

    if args.kind == "head":
        import torch

        from pipeline.data import num_classes

        with torch.no_grad():
            dim = int(build_encoder(args.backbone).output_dim)
        weight, bias = smoke.random_head(
            args.task, num_classes(args.data, args.task), dim, seed=args.seed
        )
        _write_head(args.out, weight, bias, {"stage": "smoke-head", "task": args.task})
        return 0
    if not args.pretrained:
        raise ValueError("smoke --kind finetuned needs --pretrained (θ0)")
    theta0 = load_tensors(args.pretrained)
    state = smoke.finetuned_state(theta0, args.task, args.rank, args.scale, args.noise, args.seed)
    write_safetensors(args.out, state, {"stage": "smoke", "task": args.task}, finite=True)
    return 0


def cmd_zeroshot_head(args: argparse.Namespace) -> int:
    from pipeline.models.zeroshot import build_zeroshot_head

    weight, bias = build_zeroshot_head(
        args.backbone, args.pretrained, args.task, args.data, args.device, args.batch_size
    )
    meta = {
        "stage": "zeroshot-head",
        "task": args.task,
        "backbone": args.backbone,
        "pretrained": args.pretrained,
    }
    _write_head(args.out, weight, bias, meta)
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from pipeline.models.importers import import_encoder, import_head
    from pipeline.store import write_safetensors

    meta = {"stage": "import", "kind": args.kind, "source": str(args.src)}
    if args.kind == "head":
        weight, bias = import_head(args.src)
        _write_head(args.out, weight, bias, meta)
    else:
        state = import_encoder(
            args.src,
            args.backbone,
            format=args.format,
            pretrained=args.pretrained,
            keep_dtype=args.keep_dtype,
        )
        write_safetensors(
            args.out, state, {**meta, "format": args.format, "backbone": args.backbone}, finite=True
        )
    return 0
