"""Group offloading on CPU: block and leaf level, in memory and on disk; outputs identical."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from diffcaps.errors import CapabilityError, HookError, OffloadError
from diffcaps.models.flux import FluxTransformer2DModel
from diffcaps import offload
from diffcaps.offload import GroupOffloadingConfig
from tests.flux_fixtures import TINY, flux_inputs, seeded_model


def _out(model: torch.nn.Module, **extra: Any) -> torch.Tensor:
    with torch.no_grad():
        result: torch.Tensor = model(**flux_inputs(TINY, batch=2), **extra).sample
    return result


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _resident(module: torch.nn.Module) -> bool:
    return all(p.untyped_storage().nbytes() == p.numel() * p.element_size() for p in module.parameters())


@pytest.mark.parametrize(("offload_type", "per_group"), [("block_level", 1), ("block_level", 2), ("leaf_level", 1)])
@pytest.mark.parametrize("to_disk", [False, True])
def test_outputs_identical_and_disable_restores(tmp_path: Path, offload_type: Any, per_group: int, to_disk: bool) -> None:
    model = seeded_model(TINY)
    expected, before = _out(model), _state(model)
    config = GroupOffloadingConfig(onload_device="cpu", offload_type=offload_type, num_blocks_per_group=per_group,
                                   offload_to_disk_path=tmp_path / "groups" if to_disk else None)
    offload.enable(model, config)
    assert offload.active(model) is config
    *groups, rest = offload.groups(model)
    assert rest.name == "rest"
    if offload_type == "block_level":
        assert len(groups) == 2 * (2 // per_group)
    else:
        assert len(groups) == len([m for m in model.modules() if list(m.parameters(recurse=False))])
    assert torch.equal(_out(model), expected)
    assert torch.equal(_out(model), expected)  # a second pass after every group went back
    assert all(g.moves == 2 for g in groups) and not any(g.onloaded for g in groups)
    if to_disk:
        assert len(list((tmp_path / "groups").glob("*.safetensors"))) == len(groups)
        assert not _resident(model.transformer_blocks[0])  # weights live in the files between uses
    offload.disable(model)
    assert offload.active(model) is None and offload.groups(model) == ()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert not list((tmp_path / "groups").glob("*.safetensors")) if to_disk else True


def test_only_the_running_group_is_onloaded(tmp_path: Path) -> None:
    model = seeded_model(TINY)
    offload.enable(model, GroupOffloadingConfig(onload_device="cpu", offload_to_disk_path=tmp_path))
    seen: list[tuple[bool, ...]] = []
    blocks = [*model.transformer_blocks, *model.single_transformer_blocks]

    def probe(module: torch.nn.Module, args: Any, output: Any) -> None:
        seen.append(tuple(_resident(b) for b in blocks))

    for block in blocks:
        block.get_submodule("attn").register_forward_hook(probe)
    _out(model)
    assert seen == [tuple(i == j for j in range(4)) for i in range(4)]


def test_lora_before_and_after_offloading(tmp_path: Path) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    def with_lora(model: torch.nn.Module) -> torch.nn.Module:
        inject_adapter_in_model(LoraConfig(r=2, target_modules=["to_q", "proj_out"], init_lora_weights=False), model)
        return model

    reference = seeded_model(TINY)
    torch.manual_seed(0)
    with_lora(reference)
    expected = _out(reference)
    for when in ("before", "after"):
        model = seeded_model(TINY)
        if when == "before":
            torch.manual_seed(0)
            with_lora(model)
        offload.enable(model, GroupOffloadingConfig(onload_device="cpu", offload_to_disk_path=tmp_path / when))
        if when == "after":
            torch.manual_seed(0)
            with_lora(model)
        assert torch.equal(_out(model), expected), when
        offload.disable(model)
        assert torch.equal(_out(model), expected), when


def test_bad_input_leaves_model_untouched(tmp_path: Path) -> None:
    model = seeded_model(TINY)
    before = _state(model)
    with pytest.raises(OffloadError, match="num_blocks_per_group must be an integer >= 1, got 0"):
        GroupOffloadingConfig(onload_device="cpu", num_blocks_per_group=0)
    with pytest.raises(OffloadError, match="num_blocks_per_group must be an integer >= 1, got 1.5"):
        GroupOffloadingConfig(onload_device="cpu", num_blocks_per_group=1.5)  # type: ignore[arg-type]
    with pytest.raises(OffloadError, match="offload_type"):
        GroupOffloadingConfig(onload_device="cpu", offload_type="block")  # type: ignore[arg-type]
    with pytest.raises(OffloadError, match="'nowhere' is not a device"):
        GroupOffloadingConfig(onload_device="nowhere")
    with pytest.raises(OffloadError, match="config must be a GroupOffloadingConfig"):
        offload.enable(model, {"onload_device": "cpu"})  # type: ignore[arg-type]
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(OffloadError, match="not a writable folder"):
        offload.enable(model, GroupOffloadingConfig(onload_device="cpu", offload_to_disk_path=blocker / "sub"))
    if os.geteuid() != 0:  # root can write anywhere
        read_only = tmp_path / "ro"
        read_only.mkdir(mode=0o500)
        with pytest.raises(OffloadError, match="not a writable folder"):
            offload.enable(model, GroupOffloadingConfig(onload_device="cpu", offload_to_disk_path=read_only))
    with pytest.raises(OffloadError, match="use_stream=True needs CUDA"):
        GroupOffloadingConfig(onload_device="cpu", use_stream=True)
    assert offload.active(model) is None and all("forward" not in m.__dict__ for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    offload.enable(model, GroupOffloadingConfig(onload_device="cpu"))
    with pytest.raises(OffloadError, match="already enabled"):
        offload.enable(model, GroupOffloadingConfig(onload_device="cpu"))
    offload.disable(model)
    offload.disable(model)  # nothing on: a no-op
    assert offload.active(model) is None and all("forward" not in m.__dict__ for m in model.modules())


def _unusable_devices() -> list[str]:
    devices = ["cuda:99"]  # no machine has a hundredth GPU; a CPU build has none at all
    if not torch.cuda.is_available():
        devices.append("cuda")
    if not torch.backends.mps.is_available():
        devices.append("mps")
    return devices


@pytest.mark.parametrize("device", _unusable_devices())
@pytest.mark.parametrize("role", ["onload_device", "offload_device"])
def test_a_device_torch_cannot_use_is_refused_up_front(tmp_path: Path, device: str, role: str) -> None:
    model = seeded_model(TINY)
    expected, before = _out(model), _state(model)
    onload, offload_to = (device, "cpu") if role == "onload_device" else ("cpu", device)
    bad = GroupOffloadingConfig(onload_device=onload, offload_device=offload_to, offload_to_disk_path=tmp_path / "groups")
    with pytest.raises(OffloadError, match=rf"{role} '{device}' cannot be used by this torch build or machine: \S"):
        offload.enable(model, bad)
    assert offload.active(model) is None and offload.groups(model) == ()
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert not list((tmp_path / "groups").glob("*.safetensors"))
    assert torch.equal(_out(model), expected)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    config = GroupOffloadingConfig(onload_device="cpu")
    offload.enable(model, config)  # not stuck: a good config still works
    assert offload.active(model) is config and torch.equal(_out(model), expected)
    offload.disable(model)


def test_meta_device_is_refused() -> None:
    model = seeded_model(TINY)
    for onload, offload_to in (("meta", "cpu"), ("cpu", "meta")):
        with pytest.raises(OffloadError, match="'meta' holds no data"):
            offload.enable(model, GroupOffloadingConfig(onload_device=onload, offload_device=offload_to))
    assert offload.active(model) is None


def test_a_failure_while_hooking_undoes_every_hook_and_file(tmp_path: Path) -> None:
    from diffcaps.hooks import Hook, add_hook, get_hook, hooked_modules

    model = seeded_model(TINY)
    expected = _out(model)
    squatter = Hook()
    add_hook(model.single_transformer_blocks[1], "group_offloading", squatter)  # the name offloading uses
    with pytest.raises(HookError, match="group_offloading"):
        offload.enable(model, GroupOffloadingConfig(onload_device="cpu", offload_to_disk_path=tmp_path))
    assert offload.active(model) is None
    assert [name for name, _ in hooked_modules(model)] == ["single_transformer_blocks.1"]
    assert get_hook(model.single_transformer_blocks[1], "group_offloading") is squatter
    assert not list(tmp_path.glob("*.safetensors"))
    assert torch.equal(_out(model), expected)


def test_model_without_the_capability() -> None:
    with pytest.raises(CapabilityError, match="group_offloading"):
        offload.enable(torch.nn.Linear(2, 2), GroupOffloadingConfig(onload_device="cpu"))  # type: ignore[arg-type]
    with pytest.raises(CapabilityError, match="not the class"):
        offload.enable(FluxTransformer2DModel, GroupOffloadingConfig(onload_device="cpu"))  # type: ignore[arg-type]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA streams need a GPU")
@pytest.mark.parametrize("use_stream", [False, True])
def test_cuda_onload_with_and_without_streams(use_stream: bool) -> None:
    model = seeded_model(TINY)
    inputs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in flux_inputs(TINY, batch=2).items()}
    with torch.no_grad():
        expected = model.cuda()(**inputs).sample
    model.cpu()
    offload.enable(model, GroupOffloadingConfig(onload_device="cuda", use_stream=use_stream))
    assert all(p.device.type == "cpu" for p in model.parameters())
    with torch.no_grad():
        got = model(**inputs).sample
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    offload.disable(model)
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_disk_offloading_keeps_no_view_of_the_loaded_file(tmp_path: Path) -> None:
    seeded_model(TINY).save_pretrained(tmp_path / "model")
    model = FluxTransformer2DModel.from_pretrained(tmp_path / "model")  # weights map the file
    mapped = {p.untyped_storage().data_ptr() for p in model.parameters()}
    expected = _out(model)
    offload.enable(model, GroupOffloadingConfig(onload_device="cpu", offload_to_disk_path=tmp_path / "groups"))
    # Any parameter still viewing the loaded file's mapping would keep its pages resident.
    assert not mapped & {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert torch.equal(_out(model), expected)
