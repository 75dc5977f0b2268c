"""Typed config validation: every value of a config.json is checked against its field's type.

Each refused value is a ``ConfigError`` that names the file, the field, the value and what
was expected; the checks come from the ``ModelConfig`` base and the field types, so a model
written outside diffcaps gets them with no code of its own.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, ClassVar, Literal

import attrs
import pytest

from diffcaps import ModelConfig
from diffcaps.config import at_least
from diffcaps.errors import ConfigError
from diffcaps.models.flux import FluxConfig, FluxTransformer2DModel
from tests.flux_fixtures import TINY, seeded_model

SOURCE = "some/folder/config.json"
GOOD: dict[str, Any] = {k: v for k, v in TINY.to_dict().items() if not k.startswith("_")}


# (field, value, what the message must say was expected) — the cases of issue 12, item 4, first.
BAD_FLUX_VALUES = [
    ("num_layers", 1.0, "an integer >= 0, got 1.0 (float)"),
    ("out_channels", -5, "an integer >= 1, got -5"),
    ("guidance_embeds", "false", "True or False, got 'false' (str)"),
    ("num_layers", True, "an integer >= 0, got True (bool)"),
    ("axes_dims_rope", [4.9, 6, 6], "item 0 must be an integer >= 0, got 4.9 (float)"),
    ("out_channels", 0, "an integer >= 1, got 0"),
    ("guidance_embeds", 1, "True or False, got 1 (int)"),
    ("in_channels", "64", "an integer >= 1, got '64' (str)"),
    ("attention_head_dim", 0, "an integer >= 1, got 0"),
    ("num_attention_heads", -1, "an integer >= 1, got -1"),
    ("patch_size", None, "an integer >= 1, got None (NoneType)"),
    ("num_single_layers", -1, "an integer >= 0, got -1"),
    ("axes_dims_rope", "4,6,6", "must be a list, got '4,6,6' (str)"),
    ("axes_dims_rope", [4, 6, True], "item 2 must be an integer >= 0, got True (bool)"),
    ("axes_dims_rope", [-2, 10, 8], "item 0 must be an integer >= 0, got -2"),
    ("axes_dims_rope", [4, 6, 8], "= [4, 6, 8]: expected even widths summing to attention_head_dim (16)"),
    ("axes_dims_rope", [3, 7, 6], "= [3, 7, 6]: expected even widths summing to attention_head_dim (16)"),
]


@pytest.mark.parametrize(("field", "value", "expected"), BAD_FLUX_VALUES)
def test_bad_flux_values_name_file_field_value_and_expectation(field: str, value: object, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        FluxConfig.from_dict({**GOOD, field: value}, source=SOURCE)
    message = str(caught.value)
    assert message.startswith(f"{SOURCE}: field {field!r}"), message
    assert message.endswith(expected), message


def test_good_values_still_load_lists_become_tuples() -> None:
    config = FluxConfig.from_dict({**GOOD, "out_channels": None, "axes_dims_rope": [4, 6, 6]}, source=SOURCE)
    assert config == TINY and config.axes_dims_rope == (4, 6, 6)
    assert FluxConfig.from_dict({**GOOD, "out_channels": 4}).output_channels == 4
    assert FluxConfig.from_dict(json.loads(json.dumps(TINY.to_dict()))) == TINY


@pytest.mark.parametrize(("field", "value", "expected"), [
    ("out_channels", 0, "field 'out_channels' must be an integer >= 1, got 0"),
    ("num_layers", -1, "field 'num_layers' must be an integer >= 0, got -1"),
    ("axes_dims_rope", (16, 56, 58), "expected even widths summing to attention_head_dim (128)"),
])
def test_direct_construction_is_checked_too(field: str, value: Any, expected: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(expected)):
        attrs.evolve(FluxConfig(), **{field: value})


def test_from_pretrained_names_the_config_file(tmp_path: Path) -> None:
    seeded_model(TINY).save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "num_layers": 2.0}))
    with pytest.raises(ConfigError, match=re.escape(f"{path}: field 'num_layers' must be an integer >= 0, got 2.0")):
        FluxTransformer2DModel.from_pretrained(tmp_path)


# --- a config written outside diffcaps gets the same checks from its field types ------------


@attrs.frozen(kw_only=True)
class GadgetConfig(ModelConfig):
    class_name: ClassVar[str] = "Gadget"
    width: int = at_least(1, default=8)
    depth: int = 2
    scale: float = 1.0
    gated: bool = False
    label: str = "x"
    mode: Literal["a", "b"] = "a"
    kernel: tuple[int, int] = (3, 3)
    strides: tuple[int, ...] = at_least(1, default=(1, 2))
    extra: int | None = None
    anything: Any = None


@pytest.mark.parametrize(("field", "value", "expected"), [
    ("width", 0, "must be an integer >= 1, got 0"),
    ("depth", 2.5, "must be an integer, got 2.5 (float)"),
    ("depth", False, "must be an integer, got False (bool)"),
    ("scale", "1", "must be a finite number, got '1' (str)"),
    ("scale", float("nan"), "must be a finite number, got nan (float)"),
    ("scale", True, "must be a finite number, got True (bool)"),
    ("gated", "true", "must be True or False, got 'true' (str)"),
    ("label", 5, "must be a str, got 5 (int)"),
    ("mode", "c", "must be one of 'a', 'b', got 'c'"),
    ("kernel", [3], "must be a list of 2 items, got 1: [3]"),
    ("kernel", [3, 3.0], "item 1 must be an integer, got 3.0 (float)"),
    ("strides", [1, 0], "item 1 must be an integer >= 1, got 0"),
    ("strides", {"a": 1}, "must be a list, got {'a': 1} (dict)"),
    ("extra", "3", "must be an integer, got '3' (str)"),
])
def test_any_model_config_is_checked_from_its_field_types(field: str, value: object, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        GadgetConfig.from_dict({field: value}, source=SOURCE)
    assert str(caught.value) == f"{SOURCE}: field {field!r} {expected}"


def test_any_model_config_accepts_what_its_types_allow() -> None:
    config = GadgetConfig.from_dict({"width": 4, "scale": 2, "gated": True, "mode": "b", "kernel": [5, 5],
                                     "strides": [2], "extra": None, "anything": {"free": [1.5]}})
    assert config == GadgetConfig(width=4, scale=2.0, gated=True, mode="b", kernel=(5, 5), strides=(2,),
                                  anything={"free": [1.5]})
    assert type(config.scale) is float and GadgetConfig.from_dict({"extra": 7}).extra == 7

