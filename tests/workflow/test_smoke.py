"""The real-scale smoke path: every stage at CLIP ViT-B/32 size through Snakemake, no download.

Two tasks instead of the config's four, and the two subspace methods only, keep it to a few
minutes on two cores and about 2.4 GB of disk (every ViT-B/32-sized artifact is 340 MB; the
element-wise methods run at this size in memory in tests/test_cli.py). The merged EpiMer
checkpoint must load into open_clip's own ViT-B-32 visual tower and classify.
"""

from __future__ import annotations

import csv

import pytest
import torch
import yaml

from tests.workflow.test_workflow import REPO, snakemake

pytestmark = pytest.mark.slow


def test_smoke_vit_b_32_end_to_end(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    config = yaml.safe_load((REPO / "config" / "smoke-vit-b-32.yaml").read_text())
    config["tasks"] = config["tasks"][:2]
    config["data"].update(train_size=12, test_size=8)
    config["merge"]["methods"] = ["tsvm", "epimer"]
    snakemake(tmp_path, "--cores", "2", config=config)

    run = tmp_path / "results" / config["name"]
    with open(run / "summary.csv") as fh:
        rows = {(r["method"], r["setting"]) for r in csv.DictReader(fh)}
    assert {m for m, _ in rows} == {"zeroshot", "finetuned", "tsvm", "epimer"}

    from pipeline.data import load_split
    from pipeline.models.backbone import ImageClassifier
    from pipeline.models.clip import load_head
    from pipeline.store import load_tensors, open_tensors

    for method, setting in [("tsvm", "k4_a0.5"), ("epimer", "k4_a0.5_f1.0")]:
        with open_tensors(run / "merged" / method / f"{setting}.zarr") as reader:
            layers = reader.attrs()["report"]["layers"]
            assert reader.shape("transformer.resblocks.11.mlp.c_fc.weight") == (3072, 768)
        assert len(layers) == 12 * 4 + 2  # four matrices per block, positional_embedding, proj
        assert all(layer["k"] == 4 for layer in layers.values())
        if method == "epimer":
            assert all(layer["eta"] >= 0 for layer in layers.values())

    merged = load_tensors(run / "merged" / "epimer" / "k4_a0.5_f1.0.zarr")
    clip = open_clip.create_model("ViT-B-32", pretrained=None, force_quick_gelu=True)
    visual = clip.visual
    visual.load_state_dict(merged, strict=True)  # open_clip's own module, every tensor
    theta0 = load_tensors(run / "checkpoints" / "pretrained.safetensors")
    assert set(merged) == set(theta0)
    assert any(not torch.equal(merged[n], theta0[n]) for n in merged)  # the merge moved θ0

    task = config["tasks"][0]
    images, labels = load_split(config["data"], task, "test")
    weight, bias = load_head(run / "heads" / f"{task}.safetensors")
    with torch.no_grad():
        logits = ImageClassifier(visual.eval(), weight, bias)(images[:4])
    assert logits.shape == (4, weight.shape[0]) and torch.isfinite(logits).all()
