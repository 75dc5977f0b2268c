"""Run-time side of the feature protocols: ``require`` and the ``supports_*`` guards."""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import attrs
import pytest
import torch

from diffcaps import protocols
from diffcaps.capabilities import Capabilities
from diffcaps.errors import CapabilityError
from diffcaps.models.wan import WanConfig, WanTransformer3DModel
from tests.custom_model import TinyDiT, seeded_tiny_dit
from tests.flux_fixtures import TINY, seeded_model


def test_require_returns_the_module_and_its_declared_service() -> None:
    model = seeded_tiny_dit()
    module, service = protocols.require(model, "no_split_modules")
    assert module is model and service is model.capabilities.no_split_modules
    assert service.entries() == ("TinyBlock",)


def test_require_names_model_class_and_feature() -> None:
    with pytest.raises(CapabilityError, match="TinyDiT does not support 'lora'") as info:
        protocols.require(seeded_tiny_dit(), "lora")  # type: ignore[call-overload]
    assert info.value.model_class == "TinyDiT" and info.value.feature == "lora"


def test_require_refuses_a_plain_module_a_class_and_other_objects() -> None:
    with pytest.raises(CapabilityError, match="Linear does not support 'repeated_blocks'"):
        protocols.require(torch.nn.Linear(2, 2), "repeated_blocks")  # type: ignore[call-overload]
    with pytest.raises(CapabilityError, match="pass a model instance, not the class"):
        protocols.require(TinyDiT, "repeated_blocks")  # type: ignore[call-overload]
    with pytest.raises(CapabilityError, match="not a torch.nn.Module"):
        protocols.require("model", "repeated_blocks")  # type: ignore[call-overload]


def test_require_sees_through_a_compile_wrapper() -> None:
    model = seeded_model(TINY)
    wrapped = torch.compile(model, backend="eager")
    module, _ = protocols.require(wrapped, "repeated_blocks")  # type: ignore[call-overload]
    assert module is model


def test_guards_branch_on_the_field_value_of_instances() -> None:
    assert protocols.supports_repeated_blocks(seeded_tiny_dit())
    assert protocols.supports_no_split_modules(seeded_tiny_dit())
    assert not protocols.supports_repeated_blocks(TinyDiT)  # a class is not a model
    assert not protocols.supports_lora(seeded_tiny_dit())
    assert not protocols.supports_context_parallel(torch.nn.Linear(2, 2))
    assert protocols.supports_lora(seeded_model(TINY))


def test_every_capability_field_has_a_protocol_pair_guard_and_require_overload() -> None:
    fields = [field.name for field in attrs.fields(Capabilities)]
    for name in fields:
        assert hasattr(protocols, f"supports_{name}"), name
    assert len([n for n in protocols.__all__ if n.startswith("Supports")]) == len(fields)
    flux = seeded_model(TINY)
    wan = WanTransformer3DModel.from_config(WanConfig(num_attention_heads=2, attention_head_dim=12, num_layers=1,
                                                      text_dim=8, ffn_dim=8))
    require_by_name = cast(Callable[[object, str], tuple[torch.nn.Module, object]], protocols.require)
    for name in fields:
        # Flux declares every capability but keep_in_fp32, which Wan declares
        model = flux if name != "keep_in_fp32" else wan
        _, service = require_by_name(model, name)
        assert service is getattr(type(model).declared_capabilities(), name)
