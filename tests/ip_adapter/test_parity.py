"""Parity with diffusers' model-level Flux IP-Adapter on the same weights, files and image embeddings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from diffcaps import ip_adapter
from diffcaps.models.flux import FluxTransformer2DModel
from diffcaps.models.flux._ip_adapter import ImageProjection as ImagePromptProjectionLayer
from tests.flux_fixtures import TINY, diffusers_flux, flux_inputs, seeded_model, seeded_state
from tests.ip_adapter.xlabs import (
    DiffusersIPAdapter,
    assert_same_snapshot,
    image_embeds,
    model_snapshot,
    run,
    with_embeds,
    write_xlabs,
)

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("ip")
    return {
        "a": write_xlabs(folder / "a.safetensors", TINY, seed=11),
        # a second adapter with another embedding size and the ``image_proj.`` spelling
        "b": write_xlabs(folder / "b.safetensors", TINY, seed=12, embed_dim=10, prefix="image_proj."),
    }


def _pair(*files: Path) -> tuple[FluxTransformer2DModel, DiffusersIPAdapter]:
    ours = seeded_model(TINY)
    oracle = DiffusersIPAdapter(diffusers_flux(TINY, seeded_state(ours)))
    oracle.load(*files)
    for index, path in enumerate(files):
        ip_adapter.load(ours, path, adapter_name=f"adapter{index}")
    return ours, oracle


def _compare(ours: FluxTransformer2DModel, oracle: DiffusersIPAdapter, inputs: dict[str, Any],
             embeds: list[torch.Tensor]) -> torch.Tensor:
    expected = run(oracle.transformer, with_embeds(inputs, embeds))
    got = run(ours, with_embeds(inputs, embeds))
    assert (got - expected).abs().max().item() <= TOLERANCE
    return got


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_one_adapter_matches_diffusers(files: dict[str, Path], scale: float) -> None:
    ours, oracle = _pair(files["a"])
    ip_adapter.set_scale(ours, scale)
    oracle.set_scale(scale)
    inputs = flux_inputs(TINY, batch=2)
    plain = run(seeded_model(TINY), inputs)
    got = _compare(ours, oracle, inputs, [image_embeds(2)])
    assert (got - plain).abs().max().item() > 1e-3  # the image prompt really acts


@pytest.mark.parametrize("scale", [1.0, 0.5, [0.5, [0.25, 1.5]]], ids=["1.0", "0.5", "per-adapter-per-block"])
def test_two_adapters_match_diffusers(files: dict[str, Path], scale: Any) -> None:
    ours, oracle = _pair(files["a"], files["b"])
    ip_adapter.set_scale(ours, scale)
    oracle.set_scale(scale)
    inputs = flux_inputs(TINY, batch=2)
    _compare(ours, oracle, inputs, [image_embeds(2, seed=3), image_embeds(2, 10, seed=4)])


def test_per_block_scales_and_several_images_match_diffusers(files: dict[str, Path]) -> None:
    ours, oracle = _pair(files["a"])
    ip_adapter.set_scale(ours, [0.0, 0.8])
    oracle.set_scale([0.0, 0.8])
    inputs = flux_inputs(TINY, batch=2)
    _compare(ours, oracle, inputs, [image_embeds(2, images=3)])


def test_state_dict_with_adapters_has_diffusers_keys_and_values(files: dict[str, Path]) -> None:
    ours, oracle = _pair(files["a"], files["b"])
    expected = oracle.transformer.state_dict()
    got = ours.state_dict()
    assert got.keys() == expected.keys()
    assert "encoder_hid_proj.image_projection_layers.1.image_embeds.weight" in got
    assert "transformer_blocks.1.attn.processor.to_v_ip.0.bias" in got
    assert all(torch.equal(got[key], expected[key]) for key in got)


def test_sixteen_token_adapter_matches_diffusers_modules(tmp_path: Path) -> None:
    """Tokens come from the file's shapes (diffusers guesses 4, or 16 only for 65536 rows).

    The oracle is diffusers with the same K/V and its own 16-token ``ImageProjection``
    holding the same projection weights.
    """
    from diffusers.models.embeddings import ImageProjection

    path = write_xlabs(tmp_path / "t16.safetensors", TINY, seed=21, tokens=16)
    ours = seeded_model(TINY)
    oracle = DiffusersIPAdapter(diffusers_flux(TINY, seeded_state(ours)))
    oracle.load(write_xlabs(tmp_path / "t4.safetensors", TINY, seed=22))  # its weights are replaced below
    ip_adapter.load(ours, path)
    state = ours.state_dict()
    sixteen = ImageProjection(image_embed_dim=12, cross_attention_dim=TINY.joint_attention_dim, num_image_text_embeds=16)
    prefix = "encoder_hid_proj.image_projection_layers.0."
    sixteen.load_state_dict({k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)})
    oracle.transformer.encoder_hid_proj.image_projection_layers[0] = sixteen
    oracle.transformer.load_state_dict(state)
    projection = ours.get_submodule("encoder_hid_proj.image_projection_layers.0")
    assert isinstance(projection, ImagePromptProjectionLayer) and projection.tokens == 16
    _compare(ours, oracle, flux_inputs(TINY), [image_embeds(1)])


def test_unload_restores_the_model_exactly(files: dict[str, Path]) -> None:
    model = seeded_model(TINY)
    inputs = flux_inputs(TINY)
    before, snapshot = run(model, inputs), model_snapshot(model)
    ip_adapter.load(model, files["a"], adapter_name="a")
    ip_adapter.load(model, files["b"], adapter_name="b")
    ip_adapter.set_scale(model, [0.3, 0.6])
    assert not torch.equal(run(model, with_embeds(inputs, [image_embeds(1), image_embeds(1, 10)])), before)
    ip_adapter.unload(model)
    assert ip_adapter.adapter_names(model) == ()
    assert_same_snapshot(snapshot, model_snapshot(model))
    assert torch.equal(run(model, inputs), before)
    oracle = DiffusersIPAdapter(diffusers_flux(TINY, seeded_state(model)))
    assert (run(model, inputs) - run(oracle.transformer, inputs)).abs().max().item() <= TOLERANCE


def test_unloading_one_of_two_leaves_the_other_as_if_loaded_alone(files: dict[str, Path]) -> None:
    ours, _ = _pair(files["a"], files["b"])
    ip_adapter.set_scale(ours, [0.4, 0.7])
    ip_adapter.unload(ours, "adapter0")
    assert ip_adapter.adapter_names(ours) == ("adapter1",)
    assert ip_adapter.get_scales(ours) == {"adapter1": (0.7, 0.7)}
    alone, oracle = _pair(files["b"])
    oracle.set_scale(0.7)
    ip_adapter.set_scale(alone, 0.7)
    inputs = flux_inputs(TINY)
    embeds = [image_embeds(1, 10)]
    assert torch.equal(run(ours, with_embeds(inputs, embeds)), run(alone, with_embeds(inputs, embeds)))
    assert ours.state_dict().keys() == alone.state_dict().keys()
    _compare(ours, oracle, inputs, embeds)
