"""A model defined outside diffcaps composes the same services, saves, loads and describes itself."""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest
import torch

from diffcaps import Capabilities, Model, ModelConfig
from diffcaps.errors import ConfigError
from diffcaps.models.flux import FluxConfig
from tests.custom_model import TinyDiT, TinyDiTCapabilities, TinyDiTConfig, seeded_tiny_dit


def test_metadata_lists_exactly_what_it_declares() -> None:
    meta = TinyDiT.metadata()
    assert list(meta) == ["no_split_modules", "layerwise_casting", "repeated_blocks"]
    assert meta["layerwise_casting"].entries == ("norm",)
    text = str(meta)
    assert text.splitlines()[0] == "TinyDiT capabilities"
    assert "TinyBlock" in text and "lora" not in text


def test_instance_and_class_see_the_same_capabilities() -> None:
    model = seeded_tiny_dit()
    assert model.capabilities is TinyDiT.declared_capabilities()
    assert isinstance(model.capabilities, TinyDiTCapabilities)
    assert model.capabilities.lora is None
    assert TinyDiT.config_class is TinyDiTConfig


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    model = seeded_tiny_dit()
    model.save_pretrained(tmp_path)
    loaded = TinyDiT.from_pretrained(tmp_path)
    x = torch.randn(3, 32)
    assert loaded.config == TinyDiTConfig()
    assert torch.equal(loaded(x), model(x))


def test_narrowed_field_refuses_none_through_evolve() -> None:
    seen_as_base: Capabilities = TinyDiT.declared_capabilities()
    with pytest.raises(TypeError, match="no_split_modules"):
        attrs.evolve(seen_as_base, no_split_modules=None)


def test_constructor_checks_config_class() -> None:
    with pytest.raises(ConfigError, match="TinyDiT takes a TinyDiTConfig, got FluxConfig"):
        TinyDiT(FluxConfig())  # type: ignore[arg-type]


def test_capabilities_are_frozen() -> None:
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        TinyDiT.declared_capabilities().repeated_blocks = None  # type: ignore[misc, assignment]
    with pytest.raises(AttributeError):
        seeded_tiny_dit().capabilities = TinyDiTCapabilities()  # type: ignore[misc]


def test_a_bare_model_subclass_takes_a_model_config_and_declares_nothing() -> None:
    class Bare(Model):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    bare = Bare(ModelConfig())
    assert bare.capabilities == Capabilities() and Bare.config_class is ModelConfig
    assert list(Bare.metadata()) == []


def test_type_arguments_are_checked_when_the_class_is_made() -> None:
    with pytest.raises(TypeError, match="first type argument of Model must be a ModelConfig"):
        class _WrongConfig(Model[int, Capabilities]):  # type: ignore[type-var]
            pass
    with pytest.raises(TypeError, match="second type argument of Model must be a Capabilities"):
        class _WrongCapabilities(Model[ModelConfig, int]):  # type: ignore[type-var]
            pass


def test_from_config_checks_the_config_class_at_run_time() -> None:
    with pytest.raises(ConfigError, match="TinyDiT takes a TinyDiTConfig, got FluxConfig"):
        TinyDiT.from_config(FluxConfig())  # type: ignore[arg-type]
