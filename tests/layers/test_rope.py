"""N-D RoPE against explicit complex multiplication, and its frequencies against their formula."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.embeddings import get_1d_rotary_pos_embed
from torch import Tensor

from diffcaps.layers import RotaryEmbedding, apply_rope, grid_position_ids, rope_frequencies


def _complex_rotation(x: Tensor, ids: Tensor, axes_dim: tuple[int, ...], theta: float) -> Tensor:
    """Rotate each channel pair (x[2j], x[2j+1]) as the complex number x[2j] + i·x[2j+1]."""
    angles: list[Tensor] = []
    for axis, dim in enumerate(axes_dim):
        inv_freq = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        angles.append(ids[:, axis].double()[:, None] * inv_freq[None, :])
    angle = torch.cat(angles, dim=-1)  # [seq, head_dim / 2]
    pairs = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2).contiguous())
    rotated = pairs * torch.polar(torch.ones_like(angle), angle)[None, :, None, :]
    return torch.view_as_real(rotated).flatten(-2)


@pytest.mark.parametrize(("axes_dim", "sizes"), [((4, 6, 6), (1, 3, 4)), ((2, 4, 4), (3, 2, 2)), ((8,), (6,))])
def test_rotation_matches_complex_multiplication(axes_dim: tuple[int, ...], sizes: tuple[int, ...]) -> None:
    ids = grid_position_ids(*sizes)
    seq = ids.shape[0]
    x = torch.randn(2, seq, 3, sum(axes_dim), generator=torch.Generator().manual_seed(0))
    got = apply_rope(x, rope_frequencies(ids, axes_dim, theta=10000.0))
    torch.testing.assert_close(got.double(), _complex_rotation(x, ids, axes_dim, 10000.0), rtol=1e-6, atol=1e-6)
    # a rotation keeps each pair's norm
    torch.testing.assert_close(got.reshape(2, seq, 3, -1, 2).norm(dim=-1), x.reshape(2, seq, 3, -1, 2).norm(dim=-1))


def test_frequencies_match_diffusers_per_axis() -> None:
    axes_dim = (4, 6, 6)
    ids = grid_position_ids(2, 3, 5)
    cos, sin = rope_frequencies(ids, axes_dim, theta=256.0)
    assert cos.shape == sin.shape == (30, 16) and cos.dtype == torch.float32
    start = 0
    for axis, dim in enumerate(axes_dim):
        expected_cos, expected_sin = get_1d_rotary_pos_embed(
            dim, ids[:, axis].float().numpy(), theta=256.0, use_real=True, repeat_interleave_real=True,
            freqs_dtype=torch.float64,
        )
        assert torch.equal(cos[:, start:start + dim], expected_cos)
        assert torch.equal(sin[:, start:start + dim], expected_sin)
        start += dim


def test_module_matches_function_and_has_no_weights() -> None:
    rope = RotaryEmbedding((2, 4, 4), theta=500.0)
    ids = grid_position_ids(2, 2, 3)
    assert not list(rope.parameters()) and not rope.state_dict()
    got_cos, got_sin = rope(ids)
    cos, sin = rope_frequencies(ids, (2, 4, 4), theta=500.0)
    assert torch.equal(got_cos, cos) and torch.equal(got_sin, sin)


def test_position_zero_is_the_identity() -> None:
    x = torch.randn(1, 4, 2, 8, generator=torch.Generator().manual_seed(1))
    ids = torch.zeros(4, 2, dtype=torch.long)
    assert torch.equal(apply_rope(x, rope_frequencies(ids, (4, 4))), x)


def test_grid_position_ids_are_row_major() -> None:
    ids = grid_position_ids(2, 2, 3)
    assert ids.shape == (12, 3)
    assert ids[:4].tolist() == [[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 1, 0]]
    assert ids[-1].tolist() == [1, 1, 2]


def test_bad_ids_and_odd_axes_are_refused() -> None:
    with pytest.raises(ValueError, match=r"position ids must be \[seq, 3\]"):
        rope_frequencies(torch.zeros(4, 2), (4, 4, 4))
    with pytest.raises(ValueError, match="even channel count"):
        rope_frequencies(torch.zeros(4, 2), (4, 3))


def test_low_precision_input_keeps_its_dtype() -> None:
    x = torch.randn(1, 6, 2, 8, generator=torch.Generator().manual_seed(2))
    freqs = rope_frequencies(grid_position_ids(2, 3), (4, 4))
    got = apply_rope(x.to(torch.bfloat16), freqs)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), apply_rope(x, freqs), rtol=2e-2, atol=2e-2)
