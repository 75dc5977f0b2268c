"""Wan's original single-file layout: every variant, prefix and storage dtype, both ways, against diffusers.

The file's names are checked independently of diffcaps' table: diffusers' own converter
(``convert_wan_transformer_to_diffusers``) must turn the file back into the model's state,
and diffusers' ``from_single_file`` must load the same file to the same weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from diffcaps.cli import main
from diffcaps.errors import CheckpointError
from diffcaps.io import MappedSafetensors, save_safetensors
from diffcaps.models.wan import WanConfig, WanTransformer3DModel
from diffcaps.weights import convert, load_single_file, save_single_file
from tests.models.wan._files import VARIANTS, inputs, run, seeded_model

PREFIXES = ("", "model.diffusion_model.", "diffusion_model.")
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn)


def _file_state(path: Path) -> dict[str, Tensor]:
    with MappedSafetensors(path) as file:
        return {key: file.view(key).clone() for key in file}


def _bits(tensor: Tensor) -> Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def _as_stored(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, Tensor]:
    state: dict[str, Tensor] = model.state_dict()
    return {k: v.to(dtype).to(torch.float32) for k, v in state.items()}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("prefix", PREFIXES, ids=lambda p: p or "no-prefix")
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_original_file_loads_and_round_trips_bit_exact(tmp_path: Path, variant: str, prefix: str,
                                                       dtype: torch.dtype) -> None:
    config = VARIANTS[variant]
    source = seeded_model(config)
    path = save_single_file(source, tmp_path / "wan.safetensors", prefix=prefix, torch_dtype=dtype)

    loaded = load_single_file(WanTransformer3DModel, path)

    assert loaded.config == config  # depth, widths, heads, patch and variant all read from the file
    expected = _as_stored(source, dtype)
    state = loaded.state_dict()
    assert state.keys() == expected.keys()
    for key, tensor in state.items():
        assert tensor.dtype == torch.float32, key
        assert torch.equal(tensor, expected[key]), key

    again = save_single_file(loaded, tmp_path / "again.safetensors", prefix=prefix, torch_dtype=dtype)
    first, second = _file_state(path), _file_state(again)
    assert first.keys() == second.keys()
    for key, tensor in first.items():
        assert tensor.dtype == second[key].dtype == dtype, key
        assert torch.equal(_bits(tensor), _bits(second[key])), key


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_file_names_are_wans_as_diffusers_reads_them(tmp_path: Path, variant: str) -> None:
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    model = seeded_model(VARIANTS[variant])
    file = _file_state(save_single_file(model, tmp_path / "wan.safetensors"))
    assert "head.modulation" in file and "blocks.0.self_attn.q.weight" in file
    assert ("blocks.0.cross_attn.k_img.weight" in file) == (variant in ("wan-i2v", "wan-flf2v"))

    theirs = convert_wan_transformer_to_diffusers(dict(file))
    state = dict(model.state_dict())
    if variant == "wan-flf2v":  # diffusers 0.42.1 has no name for FLF2V's image-token positions
        assert torch.equal(theirs.pop("img_emb.emb_pos"), state.pop("condition_embedder.image_embedder.pos_embed"))
    assert theirs.keys() == state.keys()
    for key, tensor in theirs.items():
        assert torch.equal(tensor, state[key]), key


def _diffusers_single_file(path: Path, config: WanConfig, folder: Path, dtype: torch.dtype) -> Any:
    from diffusers import WanTransformer3DModel as DiffusersWan

    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config.to_dict()))
    return DiffusersWan.from_single_file(str(path), config=str(folder), local_files_only=True, torch_dtype=dtype)


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."], ids=lambda p: p or "no-prefix")
@pytest.mark.parametrize("variant", ["wan-t2v", "wan-i2v", "wan-ti2v"])
def test_same_weights_and_output_as_diffusers_from_single_file(tmp_path: Path, variant: str, prefix: str) -> None:
    config = VARIANTS[variant]
    path = save_single_file(seeded_model(config), tmp_path / "wan.safetensors", prefix=prefix,
                            torch_dtype=torch.bfloat16)

    ours = load_single_file(WanTransformer3DModel, path, torch_dtype=torch.float32)
    theirs = _diffusers_single_file(path, config, tmp_path / "config", torch.float32)

    expected = theirs.state_dict()
    state = ours.state_dict()
    assert state.keys() == expected.keys()
    for key, tensor in state.items():
        assert tensor.dtype == expected[key].dtype, key
        assert torch.equal(tensor, expected[key]), key
    text = 512 if config.image_dim is not None else 5  # diffusers' Wan I2V attention expects 512 text tokens
    torch.testing.assert_close(run(ours, config, text=text), run(theirs.eval(), config, text=text), rtol=0, atol=1e-5)


def test_variant_rules_and_head_width(tmp_path: Path) -> None:
    model = seeded_model(VARIANTS["wan-t2v"])
    path = save_single_file(model, tmp_path / "wan.safetensors", prefix="diffusion_model.")
    with pytest.raises(CheckpointError, match="wan-i2v.*img_emb"):
        load_single_file(WanTransformer3DModel, path, variant="wan-i2v")

    # a width that is not a whole number of Wan's 128-wide heads cannot be read
    narrow = {**_file_state(path)}
    narrow["diffusion_model.patch_embedding.weight"] = torch.zeros(96, 16, 1, 2, 2)
    bad = save_safetensors(narrow, tmp_path / "narrow.safetensors")
    with pytest.raises(CheckpointError, match="head width 128"):
        load_single_file(WanTransformer3DModel, bad)


def test_cli_inspect_and_convert_pick_wan_from_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = VARIANTS["wan-i2v"]
    model = seeded_model(config)
    path = save_single_file(model, tmp_path / "wan2.1_i2v.safetensors", prefix="model.diffusion_model.",
                            torch_dtype=torch.float8_e4m3fn)

    assert main(["inspect", str(path)]) == 0
    lines = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines()[1:])
    assert lines["model"] == "WanTransformer3DModel (Wan)"
    assert lines["variant"].startswith("wan-i2v — Wan 2.1 I2V")
    assert lines["layout"] == "original (prefix 'model.diffusion_model.')"
    assert lines["layers"] == "3 blocks"
    assert "num_attention_heads=2" in lines["config"] and "image_dim=20" in lines["config"]
    assert lines["fit"] == "every tensor has its place in WanTransformer3DModel"

    folder = tmp_path / "folder"
    assert main(["convert", str(path), str(folder), "--model", "wan"]) == 0
    capsys.readouterr()
    loaded = WanTransformer3DModel.from_pretrained(folder)
    assert loaded.config == config
    expected = _as_stored(model, torch.float8_e4m3fn)
    for key, tensor in loaded.state_dict().items():
        assert torch.equal(tensor.float(), expected[key]), key

    back = convert(WanTransformer3DModel, folder, tmp_path / "back.safetensors", prefix="model.diffusion_model.")
    assert back.target == tmp_path / "back.safetensors"
    first, second = _file_state(path), _file_state(tmp_path / "back.safetensors")
    assert first.keys() == second.keys()
    for key, tensor in first.items():
        assert torch.equal(tensor.float(), second[key].float()), key


def test_outputs_survive_the_round_trip(tmp_path: Path) -> None:
    config = VARIANTS["wan-ti2v"]
    model = seeded_model(config)
    loaded = load_single_file(WanTransformer3DModel, save_single_file(model, tmp_path / "wan.safetensors"))
    # equal weights; the loaded ones sit in other memory, which can move a reduction by an ulp
    torch.testing.assert_close(run(loaded, config), run(model, config), rtol=0, atol=1e-5)
    assert inputs(config)["hidden_states"].shape[1] == 48
