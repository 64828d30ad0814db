"""The shipped θ0 of the demo (pipeline/data/theta0.py): its digest is checked when read, it is
a demo-96 encoder, and its recipe reproduces it (the first steps here; `make theta0`: all)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.cli import main
from pipeline.data import theta0 as shipped
from pipeline.models.clip import build_encoder
from pipeline.store import load_tensors
from pipeline.train import state_digest


def test_shipped_theta0_has_its_digest_and_the_demo_96_names_and_shapes() -> None:
    assert shipped.file_sha256(shipped.THETA0_PATH) == shipped.THETA0_SHA256
    state = shipped.load_shipped_theta0()
    reference = build_encoder(shipped.THETA0_RECIPE["backbone"]).state_dict()
    assert sorted(state) == sorted(reference)
    for name, tensor in state.items():
        assert tensor.shape == reference[name].shape and tensor.dtype == torch.float32, name
        assert torch.isfinite(tensor).all(), name
    # Trained, not the initialisation: every matrix moved away from it.
    matrices = [name for name in state if state[name].ndim == 2]
    moved = [name for name in matrices if not torch.equal(state[name], reference[name])]
    assert len(moved) == sum(t.ndim == 2 for t in reference.values())


def test_a_changed_or_missing_shipped_theta0_is_refused(tmp_path: Path) -> None:
    copy = tmp_path / "theta0.safetensors"
    shutil.copyfile(shipped.THETA0_PATH, copy)
    raw = bytearray(copy.read_bytes())
    raw[-1] ^= 1  # one bit of the last parameter
    copy.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="is not the shipped θ0's"):
        shipped.load_shipped_theta0(copy)
    with pytest.raises(FileNotFoundError, match="make theta0"):
        shipped.verify_shipped_theta0(tmp_path / "absent.safetensors")


def test_pretrain_shipped_writes_the_shipped_file_bit_for_bit(tmp_path: Path) -> None:
    out = tmp_path / "pretrained.safetensors"
    assert main(["pretrain", "--shipped", "--out", str(out), "--quiet"]) == 0
    assert shipped.file_sha256(out) == shipped.THETA0_SHA256


def test_pretrain_without_data_or_shipped_fails_with_one_line(tmp_path: Path, capsys) -> None:
    assert main(["pretrain", "--out", str(tmp_path / "t.safetensors")]) == 2
    assert "--shipped" in capsys.readouterr().err


@pytest.mark.slow
def test_the_recipe_reproduces_the_first_steps_of_the_shipped_theta0(tmp_path: Path) -> None:
    """The full recipe's data, initialisation, schedule and threads, stopped after a few steps:
    the parameters have the recorded digest (the whole run is `make theta0`)."""
    recipe = shipped.THETA0_RECIPE
    train = {**recipe["train"], "max_steps": shipped.THETA0_CHECK_STEPS}
    out = tmp_path / "first-steps.safetensors"
    threads = torch.get_num_threads()
    try:
        code = main(
            [
                "pretrain",
                "--backbone",
                recipe["backbone"],
                "--data",
                json.dumps(recipe["data"]),
                "--train",
                json.dumps(train),
                "--threads",
                str(recipe["threads"]),
                "--out",
                str(out),
                "--quiet",
            ]
        )
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    assert state_digest(load_tensors(out)) == shipped.THETA0_CHECK_DIGEST
