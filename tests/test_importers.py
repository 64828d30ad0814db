"""Checkpoint importers on small files written in the real formats: round trips, refused
globals, corrupt files and the `import` subcommand."""

from __future__ import annotations

import json
import os
import pickle
import sys
import types
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline.cli import main
from pipeline.models.importers import (
    detect_format,
    expected_shapes,
    hf_to_open_clip,
    import_encoder,
    import_head,
    validate_visual,
)
from pipeline.store import ArtifactError, load_tensors, write_safetensors

open_clip = pytest.importorskip("open_clip")

TINY = "epimer-test-tiny-vit"  # registered with open_clip below, so names work as backbones too
TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 8, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1},
}
TEXT_KEYS = (
    "token_embedding.weight",
    "ln_final.weight",
    "text_projection",
    "logit_scale",
    "positional_embedding",
)


@pytest.fixture(scope="module")
def tiny_name(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("open_clip_cfg")
    (folder / f"{TINY}.json").write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(folder)
    return TINY


def make_clip(tiny_name: str, seed: int = 0) -> nn.Module:
    """A tiny open_clip CLIP (text tower included) with random, seeded weights."""
    torch.manual_seed(seed)
    model = open_clip.create_model(tiny_name, pretrained=None)
    with torch.no_grad():  # LayerNorms start at 1/0: make every tensor distinctive
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model


def visual_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in model.visual.state_dict().items()}


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for name, tensor in want.items():
        assert got[name].dtype == torch.float32, name
        assert torch.equal(got[name], tensor), name


# --------------------------------------------------------------------------- task-vectors pickles


class ImageEncoder(nn.Module):
    """The task-vectors wrapper, as pickled in `finetuned.pt` (`src.modeling.ImageEncoder`)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.train_preprocess = open_clip.image_transform(32, is_train=False)
        self.val_preprocess = open_clip.image_transform(32, is_train=False)
        self.cache_dir = None
        del self.model.transformer  # as the release does: the text transformer is deleted


class ClassificationHead(nn.Linear):
    """The task-vectors head (`src.modeling.ClassificationHead`)."""

    def __init__(self, normalize: bool, weights: torch.Tensor, biases: torch.Tensor) -> None:
        out_features, in_features = weights.shape
        super().__init__(in_features, out_features)
        self.normalize = normalize
        self.weight = nn.Parameter(weights.clone())
        self.bias = nn.Parameter(biases.clone())


def save_as_src_modeling(obj: object, path: Path, legacy: bool = False) -> None:
    """torch.save `obj` with its classes recorded as `src.modeling.*`, then forget that module,
    so loading it can only work without importing the original code."""
    module = types.ModuleType("src.modeling")
    package = types.ModuleType("src")
    package.modeling = module
    saved = {name: sys.modules.get(name) for name in ("src", "src.modeling")}
    originals = {}
    for cls in (ImageEncoder, ClassificationHead):
        originals[cls] = (cls.__module__, cls.__qualname__)
        cls.__module__, cls.__qualname__ = "src.modeling", cls.__name__
        setattr(module, cls.__name__, cls)
    sys.modules.update({"src": package, "src.modeling": module})
    try:
        torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    finally:
        for cls, (mod, qual) in originals.items():
            cls.__module__, cls.__qualname__ = mod, qual
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old


@pytest.mark.filterwarnings("ignore:Couldn't retrieve source code")
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_taskvectors_encoder_round_trip(tiny_name, tmp_path, legacy):
    model = make_clip(tiny_name)
    want = visual_state(model)
    path = tmp_path / "finetuned.pt"
    save_as_src_modeling(ImageEncoder(model), path, legacy=legacy)
    assert "src.modeling" not in sys.modules
    assert detect_format(path) == "taskvectors"
    got = import_encoder(path, model)  # a module as backbone
    assert_same(got, want)
    assert not any(k.startswith(TEXT_KEYS) for k in got if k != "positional_embedding")
    assert (
        got["positional_embedding"].shape == model.visual.positional_embedding.shape
    )  # the visual one
    assert_same(import_encoder(path, tiny_name, format="taskvectors"), want)  # a name as backbone
    assert "src.modeling" not in sys.modules  # importing never imported the original code


@pytest.mark.filterwarnings("ignore:Couldn't retrieve source code")
def test_taskvectors_keep_dtype(tiny_name, tmp_path):
    model = make_clip(tiny_name).half()
    path = tmp_path / "finetuned.pt"
    save_as_src_modeling(ImageEncoder(model), path)
    kept = import_encoder(path, tiny_name, keep_dtype=True)
    assert all(t.dtype == torch.float16 for t in kept.values())
    converted = import_encoder(path, tiny_name)
    for name, tensor in model.visual.state_dict().items():
        assert torch.equal(converted[name], tensor.float()), name


@pytest.mark.filterwarnings("ignore:Couldn't retrieve source code")
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_taskvectors_head_round_trip(tmp_path, legacy):
    g = torch.Generator().manual_seed(1)
    weight, bias = torch.randn(5, 32, generator=g), torch.randn(5, generator=g)
    path = tmp_path / "head_Cars.pt"
    save_as_src_modeling(ClassificationHead(True, weight, bias), path, legacy=legacy)
    got_w, got_b = import_head(path)
    assert torch.equal(got_w, weight) and torch.equal(got_b, bias)


@pytest.mark.filterwarnings("ignore:Couldn't retrieve source code")
def test_unnormalised_head_is_refused(tmp_path):
    path = tmp_path / "head_DTD.pt"
    save_as_src_modeling(ClassificationHead(False, torch.randn(3, 8), torch.randn(3)), path)
    with pytest.raises(ArtifactError, match=r"head_DTD\.pt.*normalize=False"):
        import_head(path)


def test_plain_head_state_dict(tmp_path):
    weight, bias = torch.randn(4, 16), torch.randn(4)
    path = tmp_path / "head.pt"
    torch.save({"weight": weight, "bias": bias}, path)
    got_w, got_b = import_head(path)
    assert torch.equal(got_w, weight) and torch.equal(got_b, bias)
    torch.save({"weight": weight, "bias": torch.randn(3)}, path)
    with pytest.raises(ArtifactError, match=r"head\.pt.*expected \[C, D\] and \[C\]"):
        import_head(path)


# --------------------------------------------------------------------------- plain state dicts


@pytest.mark.parametrize("prefix", ["", "visual.", "model.visual.", "module.", "module.visual."])
def test_state_dict_with_prefixes(tiny_name, tmp_path, prefix):
    model = make_clip(tiny_name, seed=2)
    want = visual_state(model)
    if prefix.endswith("visual."):  # the whole CLIP: text tower included, to be dropped
        outer = prefix[: -len("visual.")]
        state = {outer + n: t for n, t in model.state_dict().items()}
    else:
        state = {prefix + n: t for n, t in want.items()}
    path = tmp_path / "nonlinear_finetuned.pt"
    torch.save(state, path)
    assert detect_format(path) == "state_dict"
    assert_same(import_encoder(path, tiny_name), want)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("source", ["state_dict", "parameters", "wrapped", "half"])
def test_torch_saved_state_dicts(tiny_name, tmp_path, legacy, source):
    """What torch.save writes for real: model.state_dict() (an OrderedDict carrying `_metadata`),
    a dict of Parameters, a training checkpoint wrapping the state dict, float16 weights."""
    model = make_clip(tiny_name, seed=8)
    want = visual_state(model)
    if source == "state_dict":
        obj = model.state_dict()
        assert hasattr(obj, "_metadata")
    elif source == "parameters":
        obj = dict(model.named_parameters())
    elif source == "wrapped":
        obj = {
            "state_dict": model.state_dict(),
            "epoch": 3,
            "optimizer": {"lr": 1e-5, "betas": (0.9, 0.999)},
        }
    else:
        obj = model.half().state_dict()
        want = {n: t.half().float() for n, t in want.items()}
    path = tmp_path / "model.pt"
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    assert detect_format(path) == "state_dict"
    assert_same(import_encoder(path, tiny_name), want)
    loaded = torch.load(path, weights_only=True)  # the same tensors torch itself reads
    loaded = loaded.get("state_dict", loaded)
    assert all(torch.equal(loaded[f"visual.{n}"].float(), t) for n, t in want.items())


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_hf_pytorch_model_bin(tiny_name, tmp_path, legacy):
    """A Hugging Face `pytorch_model.bin` reads like its safetensors twin."""
    want = visual_state(make_clip(tiny_name, seed=9))
    hf = to_hf(want, with_projection=True)
    path = tmp_path / "pytorch_model.bin"
    torch.save(OrderedDict(hf), path, _use_new_zipfile_serialization=not legacy)
    twin = tmp_path / "model.safetensors"
    write_safetensors(twin, hf)
    assert detect_format(path) == "state_dict"
    assert_same(import_encoder(path, tiny_name), want)
    assert_same(import_encoder(path, tiny_name, format="hf"), import_encoder(twin, tiny_name))


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_plain_head_saved_from_a_linear_layer(tmp_path, legacy):
    layer = nn.Linear(16, 4)
    path = tmp_path / "head.pt"
    torch.save(layer.state_dict(), path, _use_new_zipfile_serialization=not legacy)
    got_w, got_b = import_head(path)
    assert torch.equal(got_w, layer.weight.detach()) and torch.equal(got_b, layer.bias.detach())


def test_state_dict_shape_mismatch_names_the_tensor(tiny_name, tmp_path):
    state = visual_state(make_clip(tiny_name))
    state["transformer.resblocks.1.mlp.c_fc.weight"] = torch.zeros(7, 64)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(
        ArtifactError,
        match=r"bad\.pt: tensor `transformer\.resblocks\.1\.mlp\.c_fc\.weight` has shape \[7, 64\]",
    ):
        import_encoder(path, tiny_name)


def test_wrong_backbone_is_refused(tiny_name, tmp_path):
    path = tmp_path / "finetuned.pt"
    torch.save(visual_state(make_clip(tiny_name)), path)
    with pytest.raises(ArtifactError, match=r"finetuned\.pt: .*for backbone `demo`"):
        import_encoder(path, "demo")  # 4 layers, 17 tokens: not this checkpoint


# --------------------------------------------------------------------------- Hugging Face


def to_hf(visual: dict[str, torch.Tensor], with_projection: bool) -> dict[str, torch.Tensor]:
    """open_clip visual names → HF CLIPModel names, written independently of the importer."""
    hf = {
        "vision_model.embeddings.class_embedding": visual["class_embedding"],
        "vision_model.embeddings.patch_embedding.weight": visual["conv1.weight"],
        "vision_model.embeddings.position_embedding.weight": visual["positional_embedding"],
        "vision_model.embeddings.position_ids": torch.arange(
            visual["positional_embedding"].shape[0]
        )[None],
        "vision_model.pre_layrnorm.weight": visual["ln_pre.weight"],
        "vision_model.pre_layrnorm.bias": visual["ln_pre.bias"],
        "vision_model.post_layernorm.weight": visual["ln_post.weight"],
        "vision_model.post_layernorm.bias": visual["ln_post.bias"],
        "text_model.embeddings.token_embedding.weight": torch.randn(100, 32),
        "logit_scale": torch.tensor(4.6),
    }
    layers = 1 + max(int(n.split(".")[2]) for n in visual if n.startswith("transformer.resblocks."))
    for i in range(layers):
        ours, theirs = f"transformer.resblocks.{i}.", f"vision_model.encoder.layers.{i}."
        width = visual[ours + "attn.in_proj_weight"].shape[1]
        for kind in ("weight", "bias"):
            q, k, v = (
                visual[f"{ours}attn.in_proj_{kind}"][j * width : (j + 1) * width] for j in range(3)
            )
            hf[f"{theirs}self_attn.q_proj.{kind}"] = q.clone()
            hf[f"{theirs}self_attn.k_proj.{kind}"] = k.clone()
            hf[f"{theirs}self_attn.v_proj.{kind}"] = v.clone()
            hf[f"{theirs}self_attn.out_proj.{kind}"] = visual[f"{ours}attn.out_proj.{kind}"]
            hf[f"{theirs}layer_norm1.{kind}"] = visual[f"{ours}ln_1.{kind}"]
            hf[f"{theirs}layer_norm2.{kind}"] = visual[f"{ours}ln_2.{kind}"]
            hf[f"{theirs}mlp.fc1.{kind}"] = visual[f"{ours}mlp.c_fc.{kind}"]
            hf[f"{theirs}mlp.fc2.{kind}"] = visual[f"{ours}mlp.c_proj.{kind}"]
    if with_projection:
        hf["visual_projection.weight"] = visual["proj"].T.clone()  # [D_out, width]
    return {n: t.contiguous() for n, t in hf.items()}


def test_hf_with_projection_round_trip(tiny_name, tmp_path):
    want = visual_state(make_clip(tiny_name, seed=3))
    path = tmp_path / "model.safetensors"
    write_safetensors(path, to_hf(want, with_projection=True))
    assert detect_format(path) == "hf"
    assert_same(import_encoder(path, tiny_name), want)


def test_hf_vision_model_takes_proj_from_theta0(tiny_name, tmp_path, caplog):
    want = visual_state(make_clip(tiny_name, seed=4))
    theta0 = visual_state(make_clip(tiny_name, seed=5))
    path, pre = tmp_path / "model.safetensors", tmp_path / "zeroshot.safetensors"
    write_safetensors(path, to_hf(want, with_projection=False))
    write_safetensors(pre, theta0)
    with pytest.raises(
        ArtifactError, match=r"model\.safetensors: no `visual_projection\.weight`.*--pretrained"
    ):
        import_encoder(path, tiny_name)
    with caplog.at_level("INFO", logger="pipeline.models.importers"):
        got = import_encoder(path, tiny_name, pretrained=pre)
    assert "taking `proj` from θ0" in caplog.text
    assert_same(got, {**want, "proj": theta0["proj"]})


def test_hf_missing_and_unknown_tensors(tiny_name):
    hf = to_hf(visual_state(make_clip(tiny_name)), with_projection=True)
    broken = {
        k: v for k, v in hf.items() if k != "vision_model.encoder.layers.1.self_attn.v_proj.bias"
    }
    with pytest.raises(
        ArtifactError,
        match=r"src: tensor `vision_model\.encoder\.layers\.1\.self_attn\.v_proj\.bias` is missing",
    ):
        hf_to_open_clip(broken, "src")
    extra = {**hf, "vision_model.encoder.layers.0.adapter.weight": torch.zeros(2)}
    with pytest.raises(
        ArtifactError,
        match=r"src: tensor `vision_model\.encoder\.layers\.0\.adapter\.weight` has no open_clip counterpart",
    ):
        hf_to_open_clip(extra, "src")


# --------------------------------------------------------------------------- open_clip safetensors


def test_open_clip_safetensors_validated(tiny_name, tmp_path):
    want = visual_state(make_clip(tiny_name, seed=6))
    path = tmp_path / "cars.safetensors"
    write_safetensors(path, want)
    assert detect_format(path) == "open_clip"
    assert_same(import_encoder(path, tiny_name), want)
    missing = {k: v for k, v in want.items() if k != "ln_post.bias"}
    with pytest.raises(ArtifactError, match=r"x: tensor `ln_post\.bias` is missing for backbone"):
        validate_visual(missing, tiny_name, "x")
    with pytest.raises(ArtifactError, match=r"x: unexpected tensor `extra` for backbone"):
        validate_visual({**want, "extra": torch.zeros(1)}, tiny_name, "x")
    with pytest.raises(ArtifactError, match=r"x: tensor `proj` has shape \[64, 3\]"):
        validate_visual({**want, "proj": torch.zeros(64, 3)}, tiny_name, "x")
    assert list(expected_shapes(tiny_name)) == list(want)


def test_non_finite_tensor_is_reported(tiny_name, tmp_path):
    state = visual_state(make_clip(tiny_name))
    state["transformer.resblocks.0.attn.out_proj.weight"][3, 5] = float("nan")
    path = tmp_path / "nan.safetensors"
    write_safetensors(path, state)
    with pytest.raises(
        ArtifactError,
        match=r"nan\.safetensors: tensor `transformer\.resblocks\.0\.attn\.out_proj\.weight` has 1 non-finite",
    ):
        import_encoder(path, tiny_name)


# --------------------------------------------------------------------------- malicious and corrupt files


class _Shell:
    """Unpickling this runs `touch <marker>` (what a malicious checkpoint would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Eval:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.filterwarnings(
    "ignore:Couldn't retrieve source code", "ignore:Detected pickle protocol"
)
@pytest.mark.parametrize("container", ["torch-zip", "torch-legacy", "pickle", "inside-module"])
@pytest.mark.parametrize("payload", [_Shell, _Eval])
def test_malicious_pickles_are_refused_before_running(tiny_name, tmp_path, container, payload):
    marker = tmp_path / "pwned"
    evil = payload(marker)
    path = tmp_path / "finetuned.pt"
    if container == "torch-zip":
        torch.save({"conv1.weight": torch.zeros(2), "x": evil}, path)
    elif container == "torch-legacy":
        torch.save({"x": evil}, path, _use_new_zipfile_serialization=False)
    elif container == "pickle":
        path.write_bytes(pickle.dumps(evil, protocol=4))
    else:  # a genuine-looking encoder with the payload in an attribute, after the tensors
        encoder = ImageEncoder(make_clip(tiny_name))
        encoder.cache_dir = evil
        save_as_src_modeling(encoder, path)
    name = os.system.__module__ + ".system" if payload is _Shell else "builtins.eval"
    for run in (
        lambda: import_encoder(path, tiny_name),
        lambda: import_encoder(path, tiny_name, format="taskvectors"),
        lambda: import_head(path),
    ):
        with pytest.raises(ArtifactError, match=rf"finetuned\.pt.*`{name}`"):
            run()
    with pytest.raises(ArtifactError, match=r"finetuned\.pt"):  # torch's own weights-only refusal
        import_encoder(path, tiny_name, format="state_dict")
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:Couldn't retrieve source code")
def test_truncated_and_damaged_archives(tiny_name, tmp_path):
    model = make_clip(tiny_name)
    path = tmp_path / "finetuned.pt"
    save_as_src_modeling(ImageEncoder(model), path)
    data = path.read_bytes()

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match=r"truncated\.pt: not a complete zip archive.*Cars"):
        import_encoder(truncated, tiny_name)

    # The record of a visual tensor (found by its bytes), left out of an otherwise valid archive.
    payload = model.visual.class_embedding.detach().numpy().tobytes()
    with zipfile.ZipFile(path) as src:
        names = src.namelist()
        record = next(n for n in names if "/data/" in n and src.read(n) == payload)
        missing = tmp_path / "missing.pt"
        with zipfile.ZipFile(missing, "w", zipfile.ZIP_STORED) as dst:
            for n in names:
                if n != record:
                    dst.writestr(n, src.read(n))
    with pytest.raises(ArtifactError, match=rf"missing\.pt: storage record `{record}` is missing"):
        import_encoder(missing, tiny_name, format="taskvectors")

    # One flipped byte inside that tensor's record: caught by the record's CRC-32.
    assert data.count(payload) == 1
    flipped = bytearray(data)
    flipped[data.index(payload) + 5] ^= 0xFF
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(bytes(flipped))
    with pytest.raises(
        ArtifactError, match=rf"damaged\.pt: storage record `{record}` cannot be read.*CRC"
    ):
        import_encoder(damaged, tiny_name, format="taskvectors")


@pytest.mark.filterwarnings("ignore:Couldn't retrieve source code")
def test_truncated_legacy_stream(tiny_name, tmp_path):
    path = tmp_path / "zeroshot.pt"
    save_as_src_modeling(ImageEncoder(make_clip(tiny_name)), path, legacy=True)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ArtifactError, match=r"cut\.pt: legacy storage `\d+` is truncated"):
        import_encoder(cut, tiny_name, format="taskvectors")


def test_unrecognised_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(ArtifactError, match=r"notes\.txt: unrecognised file"):
        detect_format(path)
    with pytest.raises(ArtifactError, match=r"nowhere\.pt: file not found"):
        detect_format(tmp_path / "nowhere.pt")


# --------------------------------------------------------------------------- command line


@pytest.mark.filterwarnings("ignore:Couldn't retrieve source code")
def test_cli_import(tiny_name, tmp_path, capsys):
    model = make_clip(tiny_name, seed=7)
    src, head = tmp_path / "finetuned.pt", tmp_path / "head_Cars.pt"
    save_as_src_modeling(ImageEncoder(model), src)
    weight, bias = torch.randn(6, 32), torch.randn(6)
    save_as_src_modeling(ClassificationHead(True, weight, bias), head)

    out = tmp_path / "checkpoints" / "cars.safetensors"
    assert main(["import", "--backbone", tiny_name, "--out", str(out), "-q", str(src)]) == 0
    assert_same(load_tensors(out), visual_state(model))

    head_out = tmp_path / "heads" / "cars.safetensors"
    assert main(["import", "--kind", "head", "--out", str(head_out), "-q", str(head)]) == 0
    stored = load_tensors(head_out)
    assert torch.equal(stored["weight"], weight) and torch.equal(stored["bias"], bias)

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps(_Shell(tmp_path / "pwned"), protocol=2))
    bad_out = tmp_path / "bad.safetensors"
    assert main(["import", "--backbone", tiny_name, "--out", str(bad_out), "-q", str(evil)]) == 2
    assert (
        "error: " in capsys.readouterr().err
        and not bad_out.exists()
        and not (tmp_path / "pwned").exists()
    )
    assert main(["import", "--backbone", "demo", "--out", str(bad_out), "-q", str(src)]) == 2
    assert not bad_out.exists()
