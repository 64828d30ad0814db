"""Our light VisionTransformer is open_clip's: same names, same init for a seed, same outputs."""

import pytest
import torch

from pipeline.models.vit import VisionTransformer

CFG = dict(image_size=32, patch_size=8, width=64, layers=2, heads=4, mlp_ratio=4.0, output_dim=32)


def test_matches_open_clip_bitwise():
    from open_clip.transformer import VisionTransformer as OpenClipViT

    torch.manual_seed(0)
    ours = VisionTransformer(**CFG)
    torch.manual_seed(0)
    theirs = OpenClipViT(**CFG)
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    x = torch.randn(5, 3, 32, 32)
    for mode in ("train", "eval"):
        getattr(ours, mode)()
        getattr(theirs, mode)()
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_vit_b32_names_and_shapes():
    import open_clip

    ref = open_clip.create_model("ViT-B-32", pretrained=None).visual.state_dict()
    ours = VisionTransformer(
        image_size=224, patch_size=32, width=768, layers=12, heads=12, output_dim=512
    ).state_dict()
    assert {n: tuple(t.shape) for n, t in ours.items()} == {
        n: tuple(t.shape) for n, t in ref.items()
    }
