"""``FeedForward`` and ``GELU`` against their formula and diffusers' layers of the same names."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention import FeedForward as DiffusersFeedForward

from diffcaps.layers import GELU, FeedForward


def test_gelu_projection_is_linear_then_tanh_gelu() -> None:
    layer = GELU(6, 9)
    x = torch.randn(2, 3, 6, generator=torch.Generator().manual_seed(0))
    expected = F.gelu(x @ layer.proj.weight.T + layer.proj.bias, approximate="tanh")
    torch.testing.assert_close(layer(x), expected)
    exact = GELU(6, 9, approximate="none", bias=False)
    assert exact.proj.bias is None
    torch.testing.assert_close(exact(x), F.gelu(x @ exact.proj.weight.T))


def test_feed_forward_matches_diffusers_with_any_inner_width() -> None:
    cases = [
        (FeedForward(8), DiffusersFeedForward(8, activation_fn="gelu-approximate")),
        (FeedForward(8, inner_dim=10), DiffusersFeedForward(8, activation_fn="gelu-approximate", inner_dim=10)),
        (FeedForward(8, 5, mult=3), DiffusersFeedForward(8, 5, mult=3, activation_fn="gelu-approximate")),
    ]
    x = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(1))
    for ours, theirs in cases:
        assert sorted(ours.state_dict()) == ["net.0.proj.bias", "net.0.proj.weight", "net.2.bias", "net.2.weight"]
        theirs.load_state_dict(ours.state_dict())  # same names and shapes
        with torch.no_grad():
            assert torch.equal(ours(x), theirs(x))


def test_inner_width() -> None:
    assert FeedForward(8).net[2].in_features == 32
    assert FeedForward(8, inner_dim=13).net[2].in_features == 13
    assert FeedForward(8, mult=1.5, dim_out=3).net[2].out_features == 3
