"""``save_pretrained`` with LoRA adapters loaded: always a folder ``from_pretrained`` (and diffusers) loads.

Unfused adapters are left out, with a warning naming them: the folder computes what the model
computes after ``lora.disable``. Fused adapters are in the weights: the folder computes what
the fused model computes.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import attrs
import pytest
import torch

from diffcaps import lora
from diffcaps.io import INDEX_NAME, WEIGHTS_NAME, read_header
from diffcaps.models.flux import FluxTransformer2DModel
from tests.flux_fixtures import TINY, diffusers_flux, flux_inputs, seeded_model
from tests.lora._check import base_weight, merged_state, reference_model
from tests.lora._files import LoraFile, bfl_control_file, kohya_style


def _output(model: torch.nn.Module, in_channels: int = TINY.in_channels) -> torch.Tensor:
    config = attrs.evolve(TINY, in_channels=in_channels, out_channels=TINY.output_channels)
    with torch.no_grad():
        out: torch.Tensor = model(**flux_inputs(config, batch=2)).sample
    return out


def _kohya(model: FluxTransformer2DModel) -> LoraFile:
    return kohya_style(model, seed=7, key=lambda b: "lora_unet_" + b.replace(".", "_"))


def _saved_keys(folder: Path) -> set[str]:
    assert not (folder / INDEX_NAME).exists()
    return set(read_header(folder / WEIGHTS_NAME).tensors)


def test_unfused_adapter_is_left_out_with_a_warning_naming_it(tmp_path: Path) -> None:
    model = seeded_model(TINY, seed=1)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    lora.load_adapter(model, _kohya(model).save(tmp_path / "style.safetensors"), adapter_name="style")
    with_adapter = _output(model)

    with pytest.warns(UserWarning, match=r"save_pretrained writes the base model: the layers of LoRA adapter\(s\) 'style'"):
        model.save_pretrained(tmp_path / "saved")

    assert _saved_keys(tmp_path / "saved") == set(base)
    loaded = FluxTransformer2DModel.from_pretrained(tmp_path / "saved")
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, base[key]), key
    assert not torch.allclose(_output(loaded), with_adapter)  # the adapter really acted, and is not in the folder
    lora.disable(model)
    assert torch.equal(_output(loaded), _output(model))
    assert lora.list_adapters(model) == ("style",)  # saving changed nothing on the model
    lora.enable(model)
    assert torch.equal(_output(model), with_adapter)


def test_fused_adapter_is_saved_in_the_weights(tmp_path: Path) -> None:
    model = seeded_model(TINY, seed=2)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    file = _kohya(model)
    lora.load_adapter(model, file.save(tmp_path / "style.safetensors"), adapter_name="style")
    lora.fuse(model)
    fused_output = _output(model)

    with pytest.warns(UserWarning, match="'style'"):
        model.save_pretrained(tmp_path / "saved", max_shard_size=20_000)

    loaded = FluxTransformer2DModel.from_pretrained(tmp_path / "saved")
    assert torch.equal(_output(loaded), fused_output)
    expected = merged_state(base, file)  # the update applied by hand, in fp64
    for key, value in loaded.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=1e-6, msg=key)
    torch.testing.assert_close(_output(loaded), _output(reference_model(TINY, base, file)), rtol=0, atol=1e-5)
    theirs = diffusers_flux(TINY, loaded.state_dict())
    assert torch.equal(_output(loaded), _output(theirs))
    lora.unfuse(model)  # the model itself is unchanged by the save
    assert torch.equal(base_weight(model, "proj_out"), base["proj_out.weight"])


def test_control_lora_keeps_what_it_widened_and_replaced(tmp_path: Path) -> None:
    wide = 2 * TINY.in_channels
    model = seeded_model(TINY, seed=3)
    lora.load_adapter(model, bfl_control_file(model, seed=4, in_channels=wide).save(tmp_path / "c.safetensors"),
                      adapter_name="control")
    with pytest.warns(UserWarning, match="'control'"):
        model.save_pretrained(tmp_path / "saved")
    loaded = FluxTransformer2DModel.from_pretrained(tmp_path / "saved")
    assert loaded.config.in_channels == wide and loaded.x_embedder.weight.shape[1] == wide
    lora.disable(model)
    assert torch.equal(_output(loaded, wide), _output(model, wide))


def test_plain_save_does_not_warn(tmp_path: Path) -> None:
    model = seeded_model(TINY)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.save_pretrained(tmp_path)
    lora.load_adapter(model, _kohya(model).save(tmp_path / "a.safetensors"), adapter_name="a")
    lora.unload(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.save_pretrained(tmp_path / "after-unload")
