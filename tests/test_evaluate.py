"""Tests for pipeline/evaluate.py (top-1 accuracy per task) and the `evaluate` / `fisher` CLI
stages' device, dtype and data-loading options."""

from __future__ import annotations

import csv

import pytest
import torch
import torch.nn.functional as F

from pipeline.cli import main
from pipeline.data import load_split, num_classes
from pipeline.evaluate import evaluate_tasks, pack_correct, top1_accuracy, unpack_correct
from pipeline.fisher import empirical_fisher
from pipeline.models.backbone import ImageClassifier
from pipeline.models.clip import build_encoder
from pipeline.store import load_tensors, write_safetensors


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_task(n: int = 37, n_classes: int = 5, seed: int = 0):
    """A demo encoder, a random head and images whose labels are half the head's own
    predictions (so the accuracy is neither 0 nor 1)."""
    encoder = build_encoder("demo").eval()
    g = torch.Generator().manual_seed(seed)
    weight, bias = 10 * torch.randn(n_classes, 64, generator=g), torch.randn(n_classes, generator=g)
    images = torch.randn(n, 3, 32, 32, generator=g)
    with torch.no_grad():
        predicted = ImageClassifier(encoder, weight, bias)(images).argmax(-1)
    labels = torch.where(torch.arange(n) % 2 == 0, predicted, (predicted + 1) % n_classes)
    return encoder, (weight, bias), images, labels


def reference_accuracy(encoder, head, images, labels) -> float:
    """One forward pass over the whole set, the head applied by hand."""
    weight, bias = head
    with torch.no_grad():
        logits = F.normalize(encoder.eval()(images), dim=-1) @ weight.T + bias
    return (logits.argmax(-1) == labels).double().mean().item()


class ItemDataset(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])


def test_accuracy_matches_a_whole_set_reference() -> None:
    encoder, head, x, y = tiny_task()
    model = ImageClassifier(encoder, *head)
    acc, n = top1_accuracy(model, (x, y), batch_size=8)
    assert n == 37
    assert acc == pytest.approx(reference_accuracy(encoder, head, x, y), abs=1e-12)
    assert 0.3 < acc < 0.7  # the labels are right for the even samples only


@pytest.mark.parametrize("num_workers", [0, 1])
def test_dataset_equals_tensor_path(num_workers: int) -> None:
    encoder, head, x, y = tiny_task()
    tensors = evaluate_tasks(encoder, {"a": head}, {"a": (x, y)}, batch_size=10)
    streamed = evaluate_tasks(
        encoder, {"a": head}, {"a": ItemDataset(x, y)}, batch_size=10, num_workers=num_workers
    )

    def plain(rows):
        return [{k: v for k, v in r.items() if k != "correct"} for r in rows]

    assert plain(streamed) == plain(tensors)
    assert torch.equal(streamed[0]["correct"], tensors[0]["correct"])
    assert tensors[0]["n"] == 37 and tensors[0]["correct"].shape == (37,)
    assert tensors[0]["accuracy"] == int(tensors[0]["correct"].sum()) / 37


def test_several_tasks_in_order_with_their_own_heads() -> None:
    encoder, head_a, x, y = tiny_task(seed=0)
    _, head_b, _, _ = tiny_task(seed=1)
    rows = evaluate_tasks(encoder, {"b": head_b, "a": head_a}, {"a": (x, y), "b": (x, y)})
    assert [r["task"] for r in rows] == ["a", "b"]
    assert rows[0]["accuracy"] == pytest.approx(reference_accuracy(encoder, head_a, x, y))
    assert rows[1]["accuracy"] == pytest.approx(reference_accuracy(encoder, head_b, x, y))
    assert rows[0]["accuracy"] != rows[1]["accuracy"]


def test_bfloat16_autocast_is_close() -> None:
    encoder, head, x, y = tiny_task(n=64)
    single = evaluate_tasks(encoder, {"a": head}, {"a": (x, y)})[0]["accuracy"]
    half = evaluate_tasks(encoder, {"a": head}, {"a": (x, y)}, dtype=torch.bfloat16)[0]["accuracy"]
    assert abs(half - single) <= 0.1


@pytest.mark.parametrize(
    ("datasets", "kwargs", "message"),
    [
        (
            {"a": (torch.zeros(4, 3, 32, 32), torch.full((4,), 5))},
            {},
            "task `a`: label 5 is outside its head's 5",
        ),
        ({"a": ItemDataset(torch.zeros(4, 3, 32, 32), torch.full((4,), -1))}, {}, "label -1"),
        (
            {"b": (torch.zeros(4, 3, 32, 32), torch.zeros(4, dtype=torch.int64))},
            {},
            "task `b` has test data but no head",
        ),
        ({"a": (torch.zeros(0, 3, 32, 32), torch.zeros(0, dtype=torch.int64))}, {}, "no samples"),
        (
            {"a": (torch.zeros(4, 3, 32, 32), torch.zeros(3, dtype=torch.int64))},
            {},
            "must be \\[N\\]",
        ),
        ({"a": [1, 2]}, {}, "expected \\(images, labels\\) tensors or a Dataset"),
        (
            {"a": (torch.zeros(4, 3, 32, 32), torch.zeros(4, dtype=torch.int64))},
            {"batch_size": 0},
            "batch_size",
        ),
        (
            {"a": (torch.zeros(4, 3, 32, 32), torch.zeros(4, dtype=torch.int64))},
            {"dtype": torch.int8},
            "dtype",
        ),
    ],
)
def test_bad_input(datasets, kwargs, message) -> None:
    encoder, head, _, _ = tiny_task()
    with pytest.raises(ValueError, match=message):
        evaluate_tasks(encoder, {"a": head}, datasets, **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_requested_without_cuda() -> None:
    encoder, head, x, y = tiny_task()
    with pytest.raises(ValueError, match="CUDA is not available"):
        evaluate_tasks(encoder, {"a": head}, {"a": (x, y)}, device="cuda")


# --------------------------------------------------------------------------------------------
# CLI: `evaluate` and `fisher` with --device / --dtype / --num-workers
# --------------------------------------------------------------------------------------------

DATA = '{"source": "synthetic", "train_size": 40, "test_size": 24}'
TASK = "shapes"


@pytest.fixture
def demo_files(tmp_path):
    """A demo θ_t checkpoint and a head for TASK, written in the real formats."""
    encoder = build_encoder("demo")
    checkpoint = tmp_path / "theta.safetensors"
    write_safetensors(checkpoint, encoder.state_dict())
    g = torch.Generator().manual_seed(0)
    C = num_classes({"source": "synthetic"}, TASK)
    head = tmp_path / "head.safetensors"
    write_safetensors(
        head, {"weight": 10 * torch.randn(C, 64, generator=g), "bias": torch.zeros(C)}
    )
    return encoder, checkpoint, head


def test_cli_evaluate_on_cpu_matches_the_library(demo_files, tmp_path) -> None:
    encoder, checkpoint, head = demo_files
    out = tmp_path / "eval.csv"
    argv = ["evaluate", "--checkpoint", str(checkpoint), "--tasks", TASK, "--heads", str(head),
            "--data", DATA, "--batch-size", "7", "--device", "cpu", "--num-workers", "0",
            "--out", str(out), "-q"]  # fmt: skip
    assert main(argv) == 0
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["task"], r["split"], r["n"]) for r in rows] == [(TASK, "test", "24")]
    assert b"\r" not in out.read_bytes()  # LF line endings
    weight = load_tensors(head)
    x, y = load_split({"source": "synthetic", "train_size": 40, "test_size": 24}, TASK, "test")
    expected, _ = top1_accuracy(ImageClassifier(encoder, weight["weight"], weight["bias"]), (x, y))
    assert float(rows[0]["accuracy"]) == pytest.approx(expected, abs=1e-6)
    # bfloat16 runs too.
    assert main([*argv[:-3], "--dtype", "bfloat16", "--out", str(tmp_path / "bf16.csv"), "-q"]) == 0


def test_cli_fisher_on_cpu_matches_the_library(demo_files, tmp_path) -> None:
    encoder, checkpoint, head = demo_files
    out = tmp_path / "f.zarr"
    argv = ["fisher", "--task", TASK, "--checkpoint", str(checkpoint), "--head", str(head),
            "--data", DATA, "--fraction", "0.5", "--batch-size", "8", "--chunk-size", "4",
            "--device", "cpu", "--dtype", "float32", "--out", str(out), "-q"]  # fmt: skip
    assert main(argv) == 0
    got = load_tensors(out)
    weight = load_tensors(head)
    model = ImageClassifier(encoder, weight["weight"], weight["bias"])
    x, y = load_split({"source": "synthetic", "train_size": 40, "test_size": 24}, TASK, "train")
    names = [f"encoder.{n}" for n, _ in encoder.named_parameters()]
    expected = empirical_fisher(
        model, x, y, (0.5,), param_names=names, batch_size=8, chunk_size=4, progress=False
    )[0.5]
    assert sorted(got) == sorted(n.removeprefix("encoder.") for n in names)
    for name, value in expected.items():
        torch.testing.assert_close(got[name.removeprefix("encoder.")], value, rtol=1e-5, atol=1e-12)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cli_cuda_without_cuda_is_a_one_line_error(demo_files, tmp_path, capsys) -> None:
    _, checkpoint, head = demo_files
    argv = ["fisher", "--task", TASK, "--checkpoint", str(checkpoint), "--head", str(head),
            "--data", DATA, "--fraction", "1.0", "--device", "cuda", "--out",
            str(tmp_path / "f.zarr"), "-q"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "CUDA is not available" in err[0]


def test_cli_evaluates_several_checkpoints_in_one_process(demo_files, tmp_path) -> None:
    """--checkpoint A B --out a.csv b.csv: one CSV per checkpoint, each the CSV a run on that
    checkpoint alone writes; the `correct` column packs the per-image correctness in the data's
    order (base64 of numpy.packbits, bit order big) and agrees with `accuracy` and `n`."""
    import base64

    import numpy as np

    encoder, checkpoint, head = demo_files
    other = tmp_path / "other.safetensors"
    g = torch.Generator().manual_seed(1)
    write_safetensors(
        other,
        {
            n: t + 0.05 * torch.randn(t.shape, generator=g) if t.is_floating_point() else t
            for n, t in encoder.state_dict().items()
        },
    )
    base = ["evaluate", "--tasks", TASK, "--heads", str(head), "--data", DATA, "--batch-size", "5",
            "--splits", "test", "val", "-q"]  # fmt: skip
    outs = [tmp_path / "a.csv", tmp_path / "b.csv"]
    assert main([*base, "--checkpoint", str(checkpoint), str(other), "--out", *map(str, outs)]) == 0
    for path, ckpt in zip(outs, (checkpoint, other)):
        alone = tmp_path / f"alone_{path.name}"
        assert main([*base, "--checkpoint", str(ckpt), "--out", str(alone)]) == 0
        assert path.read_bytes() == alone.read_bytes()
    with open(outs[1], newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["split"] for r in rows] == ["test", "val"]
    assert list(rows[0]) == ["task", "split", "accuracy", "n", "correct"]
    weight = load_tensors(head)
    model = ImageClassifier(build_encoder("demo"), weight["weight"], weight["bias"])
    model.encoder.load_state_dict(load_tensors(other))
    x, y = load_split({"source": "synthetic", "train_size": 40, "test_size": 24}, TASK, "test")
    with torch.no_grad():
        expected = (model(x).argmax(-1) == y).numpy()
    bits = np.unpackbits(np.frombuffer(base64.b64decode(rows[0]["correct"]), dtype=np.uint8))
    assert len(bits) == 24 and (bits.astype(bool) == expected).all()
    assert float(rows[0]["accuracy"]) == pytest.approx(expected.mean(), abs=1e-6)
    assert unpack_correct(rows[0]["correct"], 24).tolist() == expected.tolist()
    # One --out per --checkpoint.
    assert main([*base, "--checkpoint", str(checkpoint), str(other), "--out", str(outs[0])]) == 2


def test_pack_correct_is_packbits_in_base64() -> None:
    bits = [True, False, True, True, False, False, False, False, True]
    assert pack_correct(torch.tensor(bits)) == "sIA="  # 0b10110000, 0b10000000
    assert unpack_correct("sIA=", 9).tolist() == bits
    with pytest.raises(ValueError, match="does not hold 20 images"):
        unpack_correct("sIA=", 20)


def test_evaluation_log_names_the_split(caplog) -> None:
    encoder = build_encoder("demo")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 3, 32, 32, generator=g), torch.tensor([0, 1, 0, 1, 0, 1])
    head = (torch.randn(2, 64, generator=g), torch.zeros(2))
    with caplog.at_level("INFO", logger="pipeline.evaluate"):
        rows = evaluate_tasks(encoder, {"a": head}, {"a": (x, y)}, split="val")
    assert rows[0]["split"] == "val" and rows[0]["correct"].dtype == torch.bool
    assert "a (val): top-1" in caplog.text
