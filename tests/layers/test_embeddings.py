"""Timestep embeddings against diffusers' ``get_timestep_embedding``; the projection MLPs against theirs."""

from __future__ import annotations

from typing import Literal

import pytest
import torch
from diffusers.models.embeddings import PixArtAlphaTextProjection
from diffusers.models.embeddings import TimestepEmbedding as DiffusersTimestepEmbedding
from diffusers.models.embeddings import get_timestep_embedding

from diffcaps.layers import TextProjection, TimestepEmbedding, timestep_embedding


@pytest.mark.parametrize("dim", [256, 33])
@pytest.mark.parametrize("flip_sin_to_cos", [True, False])
@pytest.mark.parametrize("downscale_freq_shift", [0.0, 1.0])
@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_matches_diffusers(dim: int, flip_sin_to_cos: bool, downscale_freq_shift: float, scale: float) -> None:
    steps = torch.tensor([0.0, 1.5, 250.0, 999.0])
    got = timestep_embedding(steps, dim, flip_sin_to_cos=flip_sin_to_cos,
                             downscale_freq_shift=downscale_freq_shift, scale=scale)
    expected = get_timestep_embedding(steps, dim, flip_sin_to_cos=flip_sin_to_cos,
                                      downscale_freq_shift=downscale_freq_shift, scale=scale)
    assert got.shape == (4, dim)
    assert torch.equal(got, expected)


def test_defaults_are_diffusers_defaults_and_cos_comes_first_when_flipped() -> None:
    steps = torch.tensor([3.0, 7.0])
    assert torch.equal(timestep_embedding(steps, 16), get_timestep_embedding(steps, 16))
    flipped = timestep_embedding(steps, 16, flip_sin_to_cos=True, downscale_freq_shift=0)
    assert torch.equal(flipped[:, 0], torch.cos(steps))  # frequency 1 at index 0
    assert torch.equal(flipped[:, 8], torch.sin(steps))


def test_two_dimensional_steps_are_refused() -> None:
    with pytest.raises(ValueError, match="1-D"):
        timestep_embedding(torch.zeros(2, 1), 8)


def test_timestep_embedding_mlp_matches_diffusers() -> None:
    ours = TimestepEmbedding(16, 12, out_dim=10)
    theirs = DiffusersTimestepEmbedding(16, 12, out_dim=10)
    theirs.load_state_dict(ours.state_dict())  # same parameter names and shapes
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))
    assert ours(x).shape == (3, 10)


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_text_projection_matches_diffusers(activation: Literal["silu", "gelu_tanh"]) -> None:
    ours = TextProjection(10, 14, activation=activation)
    theirs = PixArtAlphaTextProjection(10, 14, act_fn=activation)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 10, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))
