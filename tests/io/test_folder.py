"""Folder loading and saving: diffusers layout both ways, single and sharded, and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from diffcaps.errors import CheckpointError, ConfigError, DiffcapsError, ShapeError
from diffcaps.io import INDEX_NAME, WEIGHTS_NAME, save_safetensors
from diffcaps.models.flux import FluxConfig, FluxTransformer2DModel
from tests.flux_fixtures import TINY, diffusers_flux, flux_inputs, save_tiny_folder, seeded_model, seeded_state


def _output(model: torch.nn.Module, config: FluxConfig = TINY) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model(**flux_inputs(config, batch=2)).sample
    return out


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


def test_diffusers_folder_loads_here(tmp_path: Path) -> None:
    state = seeded_state(FluxTransformer2DModel.from_config(TINY), seed=4)
    oracle = diffusers_flux(TINY, state)
    oracle.save_pretrained(tmp_path / "from-diffusers")
    ours = FluxTransformer2DModel.from_pretrained(tmp_path / "from-diffusers")
    assert ours.config == TINY
    assert torch.equal(_output(ours), _output(oracle))
    assert all(p.device.type == "cpu" for p in ours.parameters())


@pytest.mark.parametrize("max_shard_size", ["10GB", 20_000])
def test_round_trip_through_diffusers(tmp_path: Path, max_shard_size: int | str) -> None:
    from diffusers.models.transformers.transformer_flux import FluxTransformer2DModel as DiffusersFlux

    model = save_tiny_folder(tmp_path / "ours", max_shard_size=max_shard_size)
    sharded = (tmp_path / "ours" / INDEX_NAME).is_file()
    assert sharded == (max_shard_size == 20_000)
    if sharded:
        assert len(list((tmp_path / "ours").glob("diffusion_pytorch_model-*-of-*.safetensors"))) > 1
    theirs = DiffusersFlux.from_pretrained(tmp_path / "ours")
    assert torch.equal(_output(theirs), _output(model))
    theirs.save_pretrained(tmp_path / "back")
    again = FluxTransformer2DModel.from_pretrained(tmp_path / "back")
    _assert_same_state(again, model)
    assert torch.equal(_output(again), _output(model))


def test_pipeline_folder_uses_transformer_subfolder(tmp_path: Path) -> None:
    model = save_tiny_folder(tmp_path / "pipe" / "transformer")
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    loaded = FluxTransformer2DModel.from_pretrained(tmp_path / "pipe")
    _assert_same_state(loaded, model)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_torch_dtype_casts_as_weights_land(tmp_path: Path, dtype: torch.dtype) -> None:
    model = save_tiny_folder(tmp_path)
    loaded = FluxTransformer2DModel.from_pretrained(tmp_path, torch_dtype=dtype)
    for (name, ours), reference in zip(loaded.state_dict().items(), model.state_dict().values(), strict=True):
        assert ours.dtype == dtype, name
        assert torch.equal(ours, reference.to(dtype)), name


def test_bf16_file_keeps_model_dtype_by_default(tmp_path: Path) -> None:
    model = seeded_model(TINY).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    loaded = FluxTransformer2DModel.from_pretrained(tmp_path)
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    assert torch.equal(loaded.proj_out.weight, model.proj_out.weight.float())


def test_loading_builds_on_meta_without_random_init(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_tiny_folder(tmp_path)
    calls: list[str] = []
    original = torch.nn.Linear.reset_parameters

    def spy(self: torch.nn.Linear) -> None:
        calls.append(str(self.weight.device))
        original(self)

    monkeypatch.setattr(torch.nn.Linear, "reset_parameters", spy)
    FluxTransformer2DModel.from_pretrained(tmp_path)
    assert calls == []  # no initialiser ran: every value comes from the file
    torch.nn.Linear(2, 2)
    assert calls == ["cpu"]  # and the layers initialise as usual afterwards


def test_saved_config_keeps_diffusers_keys(tmp_path: Path) -> None:
    save_tiny_folder(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["_class_name"] == "FluxTransformer2DModel"
    assert "_diffusers_version" in config
    assert config["axes_dims_rope"] == [4, 6, 6]
    assert FluxConfig.from_dict(config) == TINY


# --- bad input -------------------------------------------------------------------------


def test_missing_folder_and_missing_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such folder"):
        FluxTransformer2DModel.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        FluxTransformer2DModel.from_pretrained(tmp_path / "empty")


def test_config_for_another_class(tmp_path: Path) -> None:
    save_tiny_folder(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["_class_name"] = "SD3Transformer2DModel"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="SD3Transformer2DModel.*expected 'FluxTransformer2DModel'"):
        FluxTransformer2DModel.from_pretrained(tmp_path)


def test_config_with_unknown_key(tmp_path: Path) -> None:
    save_tiny_folder(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_layerz"] = 3
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="num_layerz"):
        FluxTransformer2DModel.from_pretrained(tmp_path)


def _rewrite_weights(folder: Path, edit: dict[str, torch.Tensor | None]) -> None:
    from safetensors.torch import load_file

    state = load_file(folder / WEIGHTS_NAME)
    for key, value in edit.items():
        if value is None:
            del state[key]
        else:
            state[key] = value
    save_safetensors(state, folder / WEIGHTS_NAME)


def test_missing_key_is_named(tmp_path: Path) -> None:
    save_tiny_folder(tmp_path)
    _rewrite_weights(tmp_path, {"transformer_blocks.1.attn.to_k.bias": None})
    with pytest.raises(CheckpointError, match=r"missing key\(s\): transformer_blocks\.1\.attn\.to_k\.bias") as info:
        FluxTransformer2DModel.from_pretrained(tmp_path)
    assert str(tmp_path / WEIGHTS_NAME) in str(info.value)
    assert info.value.missing == ("transformer_blocks.1.attn.to_k.bias",)


def test_extra_key_is_named(tmp_path: Path) -> None:
    save_tiny_folder(tmp_path)
    _rewrite_weights(tmp_path, {"transformer_blocks.9.attn.to_k.bias": torch.zeros(4)})
    with pytest.raises(CheckpointError, match=r"unexpected key\(s\): transformer_blocks\.9\.attn\.to_k\.bias"):
        FluxTransformer2DModel.from_pretrained(tmp_path)


def test_wrong_shape_names_file_key_and_both_shapes(tmp_path: Path) -> None:
    save_tiny_folder(tmp_path)
    _rewrite_weights(tmp_path, {"x_embedder.weight": torch.zeros(32, 9)})
    with pytest.raises(ShapeError, match=r"'x_embedder\.weight' has shape \[32, 9\], the model expects \[32, 8\]") as info:
        FluxTransformer2DModel.from_pretrained(tmp_path)
    assert info.value.path == str(tmp_path / WEIGHTS_NAME)


def test_truncated_file(tmp_path: Path) -> None:
    save_tiny_folder(tmp_path)
    weights = tmp_path / WEIGHTS_NAME
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated file") as info:
        FluxTransformer2DModel.from_pretrained(tmp_path)
    assert str(weights) in str(info.value)


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 this is a zip", b"\x10\x00\x00\x00\x00\x00\x00\x00not json here...."])
def test_non_safetensors_file(tmp_path: Path, content: bytes) -> None:
    save_tiny_folder(tmp_path)
    (tmp_path / WEIGHTS_NAME).write_bytes(content)
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        FluxTransformer2DModel.from_pretrained(tmp_path)


def test_missing_shard_is_named(tmp_path: Path) -> None:
    save_tiny_folder(tmp_path, max_shard_size=20_000)
    shard = sorted(tmp_path.glob("diffusion_pytorch_model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"shard '{shard.name}', which is missing"):
        FluxTransformer2DModel.from_pretrained(tmp_path)


def test_pickle_refused_unless_allowed(tmp_path: Path) -> None:
    model = save_tiny_folder(tmp_path)
    (tmp_path / WEIGHTS_NAME).unlink()
    torch.save(model.state_dict(), tmp_path / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match="allow_pickle=True"):
        FluxTransformer2DModel.from_pretrained(tmp_path)
    loaded = FluxTransformer2DModel.from_pretrained(tmp_path, allow_pickle=True)
    _assert_same_state(loaded, model)


def test_pickle_with_code_is_refused_even_when_allowed(tmp_path: Path) -> None:
    save_tiny_folder(tmp_path)
    (tmp_path / WEIGHTS_NAME).unlink()
    torch.save({"x": shutil.rmtree}, tmp_path / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        FluxTransformer2DModel.from_pretrained(tmp_path, allow_pickle=True)


def test_errors_share_one_base() -> None:
    assert issubclass(CheckpointError, DiffcapsError) and issubclass(ConfigError, DiffcapsError)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_saving_over_the_loaded_folder_leaves_the_loaded_model_intact(tmp_path: Path, dtype: torch.dtype | None) -> None:
    save_tiny_folder(tmp_path, seed=1)
    loaded = FluxTransformer2DModel.from_pretrained(tmp_path, torch_dtype=dtype)
    before = {k: v.clone() for k, v in loaded.state_dict().items()}
    seeded_model(TINY, seed=2).save_pretrained(tmp_path)  # same file names, other weights
    seeded_model(TINY, seed=3).save_pretrained(tmp_path, max_shard_size=20_000)  # now sharded
    assert not (tmp_path / WEIGHTS_NAME).exists()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, before[key]), key
    again = FluxTransformer2DModel.from_pretrained(tmp_path)
    assert torch.equal(again.proj_out.weight, seeded_model(TINY, seed=3).proj_out.weight)


def test_in_place_updates_never_reach_the_file(tmp_path: Path) -> None:
    model = save_tiny_folder(tmp_path)
    loaded = FluxTransformer2DModel.from_pretrained(tmp_path)
    with torch.no_grad():
        for p in loaded.parameters():
            p.add_(1.0)
    fresh = FluxTransformer2DModel.from_pretrained(tmp_path)
    _assert_same_state(fresh, model)


def test_saved_files_get_the_usual_permissions(tmp_path: Path) -> None:
    import os
    import stat

    mask = os.umask(0o022)
    os.umask(mask)
    save_tiny_folder(tmp_path)
    mode = stat.S_IMODE((tmp_path / WEIGHTS_NAME).stat().st_mode)
    assert mode == 0o666 & ~mask
    assert not list(tmp_path.glob(".*partial"))
