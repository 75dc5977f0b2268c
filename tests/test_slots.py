"""The per-instance slot, and ``slots.holding``: how one feature sees what another holds without importing it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

import diffcaps
from diffcaps import attention, lora, offload, quantization
from diffcaps.errors import AttentionError, LoRAError, QuantizationError
from diffcaps.slots import InstanceSlot, holding
from tests.flux_fixtures import TINY, seeded_model
from tests.lora._files import diffusers_style


class _Record:
    def __str__(self) -> str:
        return "a record"


def test_a_slot_holds_one_typed_value_and_leaves_no_trace_when_cleared() -> None:
    module = nn.Linear(2, 2)
    before = dict(module.__dict__)
    slot = InstanceSlot("example", _Record)
    assert slot.get(module) is None and holding(module, "example") is None
    record = _Record()
    slot.set(module, record)
    assert slot.get(module) is record and holding(module, "example") is record
    assert str(holding(module, "example")) == "a record"
    assert "_diffcaps_example" not in module.state_dict()
    assert slot.clear(module) is record
    assert module.__dict__ == before and holding(module, "example") is None


def test_a_value_of_another_type_is_not_the_slots() -> None:
    module = nn.Linear(2, 2)
    module.__dict__["_diffcaps_example"] = "not a record"
    assert InstanceSlot("example", _Record).get(module) is None


def test_features_refuse_each_other_through_what_the_other_holds(tmp_path: Path) -> None:
    model = seeded_model(TINY)
    path = diffusers_style(model, seed=1, key=lambda p: f"transformer.{p}").save(tmp_path / "a.safetensors")
    lora.load_adapter(model, path, adapter_name="style")
    assert str(holding(model, "lora")) == "LoRA adapter(s) 'style'"
    with pytest.raises(AttentionError, match=r"LoRA adapter\(s\) 'style' are loaded"):
        attention.fuse_qkv(model)
    with pytest.raises(QuantizationError, match=r"LoRA adapter\(s\) 'style' are loaded"):
        quantization.disable(model)
    lora.unload(model)
    assert holding(model, "lora") is None
    attention.fuse_qkv(model)
    assert holding(model, "qkv_fusion") is not None
    with pytest.raises(LoRAError, match="QKV projections are fused"):
        lora.load_adapter(model, path)
    attention.unfuse_qkv(model)
    offload.enable(model, offload.GroupOffloadingConfig(onload_device="cpu"))
    with pytest.raises(AttentionError, match="group offloading is enabled"):
        attention.fuse_qkv(model)
    offload.disable(model)


def test_a_lora_record_without_adapters_holds_nothing() -> None:
    model = seeded_model(TINY)
    lora.enable_hotswap(model, max_rank=8)
    assert holding(model, "lora") is not None and not holding(model, "lora")
    attention.fuse_qkv(model)  # no adapter is loaded: nothing to refuse
    attention.unfuse_qkv(model)
    with torch.no_grad():
        quantization.disable(model)  # nothing packed, nothing held: a no-op


def _string_arguments(function: str) -> set[str]:
    names: set[str] = set()
    for path in Path(diffcaps.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == function:
                for argument in node.args:
                    if isinstance(argument, ast.Constant) and isinstance(argument.value, str):
                        names.add(argument.value)
    return names


def test_every_feature_name_asked_is_a_slot_some_feature_keeps() -> None:
    asked = _string_arguments("holding")
    assert asked >= {"lora", "qkv_fusion", "group_offloading", "layerwise_casting"}
    assert asked <= _string_arguments("InstanceSlot")  # a misspelt name would hold nothing, silently


def test_a_compiled_wrapper_stands_for_its_model(tmp_path: Path) -> None:
    model = seeded_model(TINY)
    path = diffusers_style(model, seed=1, key=lambda p: f"transformer.{p}").save(tmp_path / "a.safetensors")
    lora.load_adapter(model, path, adapter_name="style")
    compiled = torch.compile(model)
    assert holding(compiled, "lora") is holding(model, "lora") is not None
    assert holding("not a module", "lora") is None
