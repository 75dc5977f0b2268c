"""Run-time side of the feature protocols: ``require`` and the ``supports_*`` guards."""

from __future__ import annotations

import pytest
import torch

from diffcaps import ModuleTypes, protocols
from diffcaps.errors import CapabilityError
from diffcaps.lora._service import LoRAService
from diffcaps.models.flux import FluxTransformer2DModel
from tests.custom_model import TinyDiT, seeded_tiny_dit


def test_require_returns_the_declared_service() -> None:
    service = protocols.require(FluxTransformer2DModel, "repeated_blocks", ModuleTypes)
    assert service is FluxTransformer2DModel.capabilities.repeated_blocks
    assert protocols.require(seeded_tiny_dit(), "no_split_modules", ModuleTypes).entries() == ("TinyBlock",)


def test_require_names_model_class_and_feature() -> None:
    with pytest.raises(CapabilityError, match="TinyDiT does not support 'lora'") as info:
        protocols.require(seeded_tiny_dit(), "lora", LoRAService)
    assert info.value.model_class == "TinyDiT" and info.value.feature == "lora"


def test_require_on_a_plain_module() -> None:
    with pytest.raises(CapabilityError, match="Linear does not support 'repeated_blocks'"):
        protocols.require(torch.nn.Linear(2, 2), "repeated_blocks", ModuleTypes)


def test_guards_branch_on_the_field_value() -> None:
    assert protocols.supports_repeated_blocks(TinyDiT)
    assert protocols.supports_no_split_modules(seeded_tiny_dit())
    assert not protocols.supports_lora(seeded_tiny_dit())
    assert not protocols.supports_context_parallel(torch.nn.Linear(2, 2))


def test_every_capability_field_has_a_protocol_pair_and_guard() -> None:
    import attrs

    from diffcaps.capabilities import Capabilities

    for field in attrs.fields(Capabilities):
        assert hasattr(protocols, f"supports_{field.name}"), field.name
    assert len([n for n in protocols.__all__ if n.startswith("Supports")]) == len(attrs.fields(Capabilities))
