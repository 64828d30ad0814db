import torch

from pipeline.methods import ta


def test_hand_computed_example():
    deltas = torch.tensor([[1.0, -2.0, 0.5], [3.0, 2.0, -0.5]])
    torch.testing.assert_close(ta.merge_layer(deltas, alpha=0.5), torch.tensor([2.0, 0.0, 0.0]))
    # α = 1/T is the arithmetic mean.
    torch.testing.assert_close(ta.merge_layer(deltas, alpha=0.5), deltas.mean(0))
