"""Wan's declared capabilities, each used on a tiny seeded model (against diffusers where it has
the feature), plus its metadata, registry entry and folder round trips."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs
import pytest
import torch

from diffcaps import ModelMetadata, checkpointing, offload
from diffcaps import compile as regional_compile
from diffcaps.capabilities import Capabilities
from diffcaps.cli import main
from diffcaps.models import model_class, model_names
from diffcaps.models.wan import WanTransformer3DModel
from diffcaps.offload import GroupOffloadingConfig
from diffcaps.protocols import require
from tests.wan_fixtures import I2V, T2V, diffusers_wan, seeded_model, wan_inputs

DECLARED = ["gradient_checkpointing", "group_offloading", "no_split_modules", "layerwise_casting",
            "keep_in_fp32", "repeated_blocks", "context_parallel", "weight_mapping", "lora", "cache",
            "attention", "quantization"]


def _out(model: torch.nn.Module, **kwargs: Any) -> torch.Tensor:
    with torch.no_grad():
        sample: torch.Tensor = model(**wan_inputs(T2V, batch=2, seed=31, **kwargs)).sample
    return sample


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    model.zero_grad()
    out: torch.Tensor = model(**wan_inputs(I2V, batch=2, seed=32)).sample
    torch.autograd.backward(out.square().mean())
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_metadata_lists_every_declared_capability() -> None:
    meta = WanTransformer3DModel.metadata()
    declared = WanTransformer3DModel.declared_capabilities()
    assert sorted(meta) == sorted(DECLARED)
    assert sorted(meta) == sorted(name for name, _ in declared.declared())
    for field in attrs.fields(Capabilities):
        value = getattr(declared, field.name)
        assert (field.name in meta) == (value is not None), field.name
        if value is not None:
            assert meta[field.name].entries == value.entries()
    assert meta["keep_in_fp32"].entries == ("rope", "time_embedder", "scale_shift_table", "norm1", "norm2", "norm3")
    assert meta["no_split_modules"].entries == ("WanTransformerBlock",)
    assert meta["layerwise_casting"].entries == ("patch_embedding", "condition_embedder", "norm")
    assert ModelMetadata.from_dict(json.loads(json.dumps(meta.to_dict()))) == meta


def test_registry_and_describe(capsys: pytest.CaptureFixture[str]) -> None:
    assert "wan" in model_names() and model_class("wan") is WanTransformer3DModel
    assert main(["describe", "wan"]) == 0
    out = capsys.readouterr().out
    assert out.strip() == WanTransformer3DModel.metadata().describe()
    assert "keep_in_fp32" in out and "WanTransformerBlock" in out
    main(["describe", "wan", "--verbose"])
    assert "README.md#keep-in-fp32" in capsys.readouterr().out


def test_declarations_match_diffusers() -> None:
    from diffusers import WanTransformer3DModel as DiffusersWan

    declared = WanTransformer3DModel.declared_capabilities()
    assert declared.no_split_modules.entries() == tuple(DiffusersWan._no_split_modules)
    assert declared.repeated_blocks.entries() == tuple(DiffusersWan._repeated_blocks)
    assert declared.layerwise_casting.skip_patterns == tuple(DiffusersWan._skip_layerwise_casting_patterns)
    assert declared.keep_in_fp32.entries() == tuple(DiffusersWan._keep_in_fp32_modules)
    assert DiffusersWan._supports_gradient_checkpointing


def test_no_split_and_repeated_blocks_find_every_block() -> None:
    model = seeded_model(T2V)
    module, service = require(model, "no_split_modules")
    found = service.find(module, "no_split_modules")
    assert [name for name, _ in found] == [f"blocks.{i}" for i in range(T2V.num_layers)]
    _, repeated = require(model, "repeated_blocks")
    assert [name for name, _ in repeated.find(model, "repeated_blocks")] == [name for name, _ in found]


def test_gradient_checkpointing_matches_plain_and_diffusers_gradients() -> None:
    model = seeded_model(I2V, seed=33).train()
    expected = _grads(model)
    oracle = diffusers_wan(I2V, model.state_dict()).train()
    oracle.enable_gradient_checkpointing()
    theirs = _grads(oracle)
    calls: list[str] = []
    model.get_submodule("blocks.0.attn1").register_forward_hook(lambda *_: calls.append("attn1"))
    checkpointing.enable(model)
    got = _grads(model)
    assert calls == ["attn1", "attn1"]  # recomputed in backward
    assert got.keys() == expected.keys() == theirs.keys() and len(got) == len(list(model.parameters()))
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6, msg=name)
        torch.testing.assert_close(got[name], theirs[name], rtol=1e-4, atol=1e-5, msg=name)
    checkpointing.disable(model)
    assert all("forward" not in m.__dict__ for m in model.modules())


@pytest.mark.parametrize(("offload_type", "per_group"), [("block_level", 1), ("block_level", 2), ("leaf_level", 1)])
@pytest.mark.parametrize("to_disk", [False, True])
def test_group_offloading_outputs_identical_and_disable_restores(
    tmp_path: Path, offload_type: Any, per_group: int, to_disk: bool
) -> None:
    model = seeded_model(T2V, seed=34)
    expected = _out(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = GroupOffloadingConfig(onload_device="cpu", offload_type=offload_type, num_blocks_per_group=per_group,
                                   offload_to_disk_path=tmp_path / "groups" if to_disk else None)
    offload.enable(model, config)
    *groups, rest = offload.groups(model)
    assert rest.name == "rest"
    if offload_type == "block_level":
        assert len(groups) == T2V.num_layers // per_group
    assert torch.equal(_out(model), expected)
    assert all(g.moves == 1 for g in groups)
    if to_disk:
        assert len(list((tmp_path / "groups").glob("*.safetensors"))) == len(groups)
    offload.disable(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_group_offloading_matches_diffusers() -> None:
    model = seeded_model(T2V, seed=35)
    oracle = diffusers_wan(T2V, model.state_dict())
    oracle.enable_group_offload(onload_device=torch.device("cpu"), offload_type="block_level", num_blocks_per_group=1)
    offload.enable(model, GroupOffloadingConfig(onload_device="cpu"))
    inputs = wan_inputs(T2V, seed=36)
    with torch.no_grad():
        assert (model(**inputs).sample - oracle(**inputs).sample).abs().max().item() <= 1e-5
    offload.disable(model)


def test_regional_compile_compiles_the_repeated_block_and_matches_eager() -> None:
    model = seeded_model(T2V, seed=37)
    expected = _out(model)
    names = regional_compile.enable(model, regional_compile.RegionalCompileConfig(backend="aot_eager"))
    assert names == [f"blocks.{i}" for i in range(T2V.num_layers)]
    torch.testing.assert_close(_out(model), expected, rtol=0, atol=1e-6)
    regional_compile.disable(model)
    assert torch.equal(_out(model), expected)


@pytest.mark.parametrize("name", ["t2v", "i2v"])
def test_folder_round_trip_both_ways(tmp_path: Path, name: str) -> None:
    from diffusers import WanTransformer3DModel as DiffusersWan

    config = T2V if name == "t2v" else I2V
    ours = seeded_model(config, seed=38)
    inputs = wan_inputs(config, seed=39)
    ours.save_pretrained(tmp_path / "ours")
    theirs = DiffusersWan.from_pretrained(tmp_path / "ours").eval()
    assert tuple(theirs.config["patch_size"]) == config.patch_size
    theirs.save_pretrained(tmp_path / "theirs")
    back = WanTransformer3DModel.from_pretrained(tmp_path / "theirs")
    assert back.config == config
    assert all(torch.equal(v, ours.state_dict()[k]) for k, v in back.state_dict().items())
    with torch.no_grad():
        expected = theirs(**inputs).sample
        assert (ours(**inputs).sample - expected).abs().max().item() <= 1e-5
        # same weights; memory-mapped tensors may round a last bit differently in matmuls
        assert (back(**inputs).sample - ours(**inputs).sample).abs().max().item() <= 1e-6


def test_older_diffusers_folders_with_the_unused_query_norm_load(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from diffcaps.errors import CheckpointError

    ours = seeded_model(I2V, seed=40)
    ours.save_pretrained(tmp_path)
    weights_file = tmp_path / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights_file))
    for index in range(I2V.num_layers):  # what diffusers' I2V models saved before dropping it
        state[f"blocks.{index}.attn2.norm_added_q.weight"] = torch.ones(I2V.inner_dim)
    save_file(state, str(weights_file))
    loaded = WanTransformer3DModel.from_pretrained(tmp_path)
    assert all(torch.equal(v, ours.state_dict()[k]) for k, v in loaded.state_dict().items())
    assert "norm_added_q" not in " ".join(loaded.state_dict())
    state["blocks.0.attn2.norm_added_v.weight"] = torch.ones(I2V.inner_dim)  # anything else is still refused
    save_file(state, str(weights_file))
    with pytest.raises(CheckpointError, match="norm_added_v"):
        WanTransformer3DModel.from_pretrained(tmp_path)
