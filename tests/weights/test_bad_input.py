"""Bad checkpoints get a CheckpointError that names the file, the keys and what was expected."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from diffcaps.errors import CapabilityError, CheckpointError, ShapeError
from diffcaps.io import MappedSafetensors
from diffcaps.models.flux import FluxTransformer2DModel
from diffcaps.weights import UnexpectedTensorsWarning, load_single_file, save_single_file
from tests.custom_model import TinyDiT, seeded_tiny_dit
from tests.weights.fixtures import original_file, variant_model


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with MappedSafetensors(path) as file:
        return {key: file.view(key).clone() for key in file}


@pytest.fixture
def dev_file(tmp_path: Path) -> Path:
    return original_file(tmp_path / "flux1-dev.safetensors", variant_model("flux-dev", "small"),
                         prefix="model.diffusion_model.")


def test_unrecognised_file_names_the_variant_rules_and_their_keys(tmp_path: Path) -> None:
    path = tmp_path / "other.safetensors"
    save_file({"encoder.layer.0.weight": torch.zeros(2, 2), "encoder.layer.0.bias": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError) as info:
        load_single_file(FluxTransformer2DModel, path)
    message = str(info.value)
    assert str(path) in message
    assert "not a recognised Flux checkpoint" in message
    assert "none of its 2 tensors" in message
    for variant in ("flux-dev", "flux-schnell", "flux-fill", "flux-depth"):
        assert f"{variant}: looked for" in message
    for key in ("double_blocks.0.img_attn.norm.key_norm.scale", "guidance_in.in_layer.weight", "img_in.weight"):
        assert key in message
    assert "encoder.layer.0.bias" in message  # what the file holds instead


def test_a_lora_is_not_taken_for_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "lora.safetensors"
    save_file({
        "double_blocks.0.img_attn.qkv.lora_A.weight": torch.zeros(4, 32),
        "double_blocks.0.img_attn.qkv.lora_B.weight": torch.zeros(96, 4),
        "double_blocks.0.img_attn.norm.key_norm.scale": torch.ones(16),
    }, str(path))
    with pytest.raises(CheckpointError, match="not a recognised Flux checkpoint") as info:
        load_single_file(FluxTransformer2DModel, path)
    assert "no img_in.weight" in str(info.value)


def test_missing_tensors_are_listed_by_their_names_in_the_file(tmp_path: Path, dev_file: Path) -> None:
    tensors = _tensors(dev_file)
    del tensors["model.diffusion_model.single_blocks.1.linear1.weight"]
    del tensors["model.diffusion_model.double_blocks.0.txt_attn.norm.key_norm.scale"]
    path = tmp_path / "missing.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError) as info:
        load_single_file(FluxTransformer2DModel, path, strict=False)
    assert set(info.value.missing) == {
        "model.diffusion_model.single_blocks.1.linear1.weight",
        "model.diffusion_model.double_blocks.0.txt_attn.norm.key_norm.scale",
    }
    assert "2 missing key(s)" in str(info.value)


def test_a_gap_in_the_block_numbering_is_reported_as_missing_tensors(tmp_path: Path) -> None:
    tensors = _tensors(original_file(tmp_path / "a.safetensors", variant_model("flux-dev", "medium")))
    gap = {k: v for k, v in tensors.items() if not k.startswith("double_blocks.1.")}
    path = tmp_path / "gap.safetensors"
    save_file(gap, str(path))
    with pytest.raises(CheckpointError) as info:
        load_single_file(FluxTransformer2DModel, path)
    assert sorted(info.value.missing) == sorted(k for k in tensors if k.startswith("double_blocks.1."))


def test_extra_tensors_are_an_error_unless_not_strict(tmp_path: Path, dev_file: Path) -> None:
    tensors = _tensors(dev_file)
    extra = {"model.diffusion_model.double_blocks.0.img_attn.lora.weight": torch.zeros(2),
             "model.diffusion_model.img_in.scale": torch.zeros(3),  # matches a rule, has no place
             "first_stage_model.decoder.conv_in.weight": torch.zeros(1)}  # outside the prefix
    path = tmp_path / "extra.safetensors"
    save_file({**tensors, **extra}, str(path))
    with pytest.raises(CheckpointError) as info:
        load_single_file(FluxTransformer2DModel, path)
    assert set(info.value.unexpected) == set(extra)
    assert "strict=False" in str(info.value)

    with pytest.warns(UnexpectedTensorsWarning) as record:
        loaded = load_single_file(FluxTransformer2DModel, path, strict=False)
    warning = record[0].message
    assert isinstance(warning, UnexpectedTensorsWarning)
    assert set(warning.keys) == set(extra)
    assert "first_stage_model.decoder.conv_in.weight" in str(warning)
    reference = load_single_file(FluxTransformer2DModel, dev_file)
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_truncated_and_foreign_files_are_named_as_such(tmp_path: Path, dev_file: Path) -> None:
    data = dev_file.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=re.escape(f"{truncated}: truncated file")):
        load_single_file(FluxTransformer2DModel, truncated)

    text = tmp_path / "notes.safetensors"
    text.write_text("these are not weights, just a text file with some words in it\n")
    with pytest.raises(CheckpointError, match=re.escape(f"{text}: not a safetensors file")):
        load_single_file(FluxTransformer2DModel, text)

    pickle = tmp_path / "model.ckpt"
    torch.save({"img_in.weight": torch.zeros(2)}, pickle)
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_single_file(FluxTransformer2DModel, pickle)

    with pytest.raises(CheckpointError, match="no such file"):
        load_single_file(FluxTransformer2DModel, tmp_path / "absent.safetensors")


def test_asking_for_fill_on_a_dev_checkpoint_explains_the_shape_conflict(dev_file: Path) -> None:
    with pytest.raises(CheckpointError) as info:
        load_single_file(FluxTransformer2DModel, dev_file, variant="flux-fill")
    message = str(info.value)
    assert "asked for Flux variant 'flux-fill'" in message
    assert "img_in.weight dim 1 = 384 input channels" in message  # what fill needs
    assert "img_in.weight has shape [32, 64]: 64 along dim 1 (input channels), expected 384" in message
    assert "the file looks like flux-dev" in message


def test_asking_for_schnell_on_a_dev_checkpoint_names_the_guidance_embedder(dev_file: Path) -> None:
    with pytest.raises(CheckpointError, match="but has guidance_in.in_layer.weight; the file looks like flux-dev"):
        load_single_file(FluxTransformer2DModel, dev_file, variant="flux-schnell")


def test_unknown_variant_lists_the_known_ones(dev_file: Path) -> None:
    with pytest.raises(CheckpointError, match="known variants: flux-depth, flux-dev, flux-fill, flux-schnell"):
        load_single_file(FluxTransformer2DModel, dev_file, variant="flux-pro")


def test_inconsistent_shapes_fail_before_any_tensor_is_read(
    tmp_path: Path, dev_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tensors = _tensors(dev_file)
    key = "model.diffusion_model.double_blocks.0.img_mlp.2.weight"
    tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 1)
    path = tmp_path / "bad-shape.safetensors"
    save_file(tensors, str(path))

    def no_reading(self: MappedSafetensors, key: str) -> torch.Tensor:
        raise AssertionError(f"read {key} before the checks passed")

    monkeypatch.setattr(MappedSafetensors, "view", no_reading)
    with pytest.raises(ShapeError) as info:
        load_single_file(FluxTransformer2DModel, path)
    assert key in str(info.value) and "[32, 129]" in str(info.value) and "[32, 128]" in str(info.value)


def test_a_fused_tensor_that_does_not_split_is_a_shape_error(tmp_path: Path, dev_file: Path) -> None:
    tensors = _tensors(dev_file)
    key = "model.diffusion_model.single_blocks.0.linear1.bias"
    tensors[key] = torch.zeros(tensors[key].shape[0] + 1)
    path = tmp_path / "bad-split.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(ShapeError, match=re.escape(f"{key} [225]: cannot split 1:1:1:4 on dim 0")):
        load_single_file(FluxTransformer2DModel, path)


def test_a_failure_while_reading_returns_no_model(dev_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    view = MappedSafetensors.view
    calls = [0]

    def failing(self: MappedSafetensors, key: str) -> torch.Tensor:
        calls[0] += 1
        if calls[0] == 5:
            raise OSError("disk went away")
        return view(self, key)

    monkeypatch.setattr(MappedSafetensors, "view", failing)
    result: list[FluxTransformer2DModel] = []
    with pytest.raises(OSError, match="disk went away"):
        result.append(load_single_file(FluxTransformer2DModel, dev_file))
    assert result == []


def test_models_without_weight_mapping_are_refused_at_run_time(tmp_path: Path, dev_file: Path) -> None:
    with pytest.raises(CapabilityError, match="TinyDiT does not support 'weight_mapping'"):
        load_single_file(TinyDiT, dev_file)  # type: ignore[type-var]
    with pytest.raises(CapabilityError, match="weight_mapping"):
        save_single_file(seeded_tiny_dit(), tmp_path / "tiny.safetensors")  # type: ignore[arg-type]
    with pytest.raises(CapabilityError, match="pass a model instance, not the class"):
        save_single_file(FluxTransformer2DModel, tmp_path / "class.safetensors")  # type: ignore[arg-type]
    with pytest.raises(CapabilityError, match="pass a diffcaps model class"):
        load_single_file(variant_model("flux-dev", "small"), dev_file)  # type: ignore[arg-type]


def test_saving_writes_nothing_on_error(tmp_path: Path) -> None:
    model = variant_model("flux-dev", "small")
    with pytest.raises(ValueError, match="layout"):
        save_single_file(model, tmp_path / "x.safetensors", layout="bfl")  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []
