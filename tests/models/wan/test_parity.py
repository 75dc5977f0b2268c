"""Wan forward parity with diffusers on the same seeded weights and inputs (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch

from diffcaps.errors import InputError
from diffcaps.models.wan import WanOutput, WanTransformer3DModel
from tests.wan_fixtures import CONFIGS, T2V, TI2V, diffusers_wan, seeded_model, wan_inputs


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("name", ["t2v", "i2v", "ti2v"])
def test_forward_matches_diffusers(name: str, batch: int) -> None:
    config = CONFIGS[name]
    ours = seeded_model(config, seed=3)
    oracle = diffusers_wan(config, ours.state_dict())
    inputs = wan_inputs(config, batch=batch, seed=batch)
    with torch.no_grad():
        expected = oracle(**inputs).sample
        got = ours(**inputs).sample
    assert got.shape == expected.shape == (batch, config.output_channels, 3, 4, 6)
    assert (got - expected).abs().max().item() <= 1e-5
    assert got.abs().mean().item() > 1e-2  # a real signal, not a degenerate zero output


@pytest.mark.parametrize("name", ["t2v", "ti2v"])
def test_per_token_timesteps_match_diffusers(name: str) -> None:
    config = CONFIGS[name]
    ours = seeded_model(config, seed=4)
    oracle = diffusers_wan(config, ours.state_dict())
    inputs = wan_inputs(config, batch=2, per_token=True, seed=5)
    assert inputs["timestep"].shape == (2, 18)
    with torch.no_grad():
        expected = oracle(**inputs).sample
        got = ours(**inputs).sample
    assert (got - expected).abs().max().item() <= 1e-5
    # per-token timesteps really act per token: a different value for one token changes the output
    changed = dict(inputs, timestep=inputs["timestep"].clone())
    changed["timestep"][0, 0] = 3.0
    with torch.no_grad():
        assert not torch.equal(ours(**changed).sample, got)


def test_first_last_frame_image_embedding_matches_diffusers() -> None:
    config = CONFIGS["flf2v"]
    ours = seeded_model(config, seed=6)
    oracle = diffusers_wan(config, ours.state_dict())
    inputs = wan_inputs(config, batch=2, seed=7)
    assert inputs["encoder_hidden_states_image"].shape == (4, 5, 20)
    with torch.no_grad():
        expected = oracle(**inputs).sample
        got = ours(**inputs).sample
    assert (got - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_state_dict_names_and_shapes_match_diffusers(name: str) -> None:
    config = CONFIGS[name]
    ours = seeded_model(config)
    oracle = diffusers_wan(config, ours.state_dict())
    expected = {k: tuple(v.shape) for k, v in oracle.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == expected


def test_return_tuple_and_patch_sizes() -> None:
    config = TI2V
    model = seeded_model(config)
    oracle = diffusers_wan(config, model.state_dict())
    inputs = wan_inputs(config, frames=2, height=6, width=4)
    with torch.no_grad():
        (got,) = model(**inputs, return_dict=False)
        (expected,) = oracle(**inputs, return_dict=False)
    assert got.shape == (1, 8, 2, 6, 4)
    assert (got - expected).abs().max().item() <= 1e-5
    assert isinstance(model(**inputs), WanOutput)


def test_bad_inputs_are_refused() -> None:
    model = seeded_model(T2V)
    inputs = wan_inputs(T2V)
    with pytest.raises(InputError, match=r"\['scale'\].*set_adapters"):
        model(**inputs, attention_kwargs={"scale": 0.5})
    with pytest.raises(InputError, match="no image embedder"):
        model(**inputs, encoder_hidden_states_image=torch.zeros(1, 3, 8))
    with pytest.raises(InputError, match="per-token timestep has 5 entries"):
        model(**dict(inputs, timestep=torch.zeros(1, 5)))
    with pytest.raises(InputError, match="exceeds rope_max_seq_len 32"):
        model(**dict(inputs, hidden_states=torch.zeros(1, 4, 33, 2, 2)))
    i2v = seeded_model(CONFIGS["i2v"])
    without_image = {k: v for k, v in wan_inputs(CONFIGS["i2v"]).items() if k != "encoder_hidden_states_image"}
    with pytest.raises(InputError, match="pass encoder_hidden_states_image"):
        i2v(**without_image)


def test_text_length_is_free_for_image_to_video() -> None:
    # diffusers assumes 512 text tokens to split image tokens off; diffcaps keeps them apart.
    config = CONFIGS["i2v"]
    model = seeded_model(config, seed=8)
    inputs = wan_inputs(config, seed=9)
    short = dict(inputs, encoder_hidden_states=inputs["encoder_hidden_states"][:, :20])
    with torch.no_grad():
        assert model(**short).sample.shape == (1, 4, 3, 4, 6)
    assert isinstance(model, WanTransformer3DModel)
