"""WanConfig: diffusers' keys and defaults, checked values, and the released model shapes."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch

from diffcaps.errors import ConfigError
from diffcaps.models.wan import WanConfig, WanTransformer3DModel

RELEASED: dict[str, dict[str, Any]] = {
    "wan2.1-t2v-1.3b": {"num_attention_heads": 12, "ffn_dim": 8960, "num_layers": 30},
    "wan2.1-i2v-14b": {"in_channels": 36, "image_dim": 1280, "added_kv_proj_dim": 5120},
    "wan2.1-flf2v-14b": {"in_channels": 36, "image_dim": 1280, "added_kv_proj_dim": 5120, "pos_embed_seq_len": 514},
    "wan2.2-ti2v-5b": {"num_attention_heads": 24, "in_channels": 48, "out_channels": 48, "ffn_dim": 14336,
                       "num_layers": 30},
    "wan2.2-i2v-a14b-expert": {"in_channels": 36},
}


def test_keys_and_defaults_are_diffusers() -> None:
    from diffusers import WanTransformer3DModel as DiffusersWan

    parameters = inspect.signature(DiffusersWan.__init__).parameters
    expected = {name: p.default for name, p in parameters.items() if name != "self"}
    ours = {k: v for k, v in WanConfig().to_dict().items() if not k.startswith("_")}
    assert ours.keys() == expected.keys()
    assert ours == {k: list(v) if isinstance(v, tuple) else v for k, v in expected.items()}
    assert WanConfig().to_dict()["_class_name"] == "WanTransformer3DModel"


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_shapes_match_diffusers(name: str) -> None:
    from diffusers import WanTransformer3DModel as DiffusersWan

    config = WanConfig(**RELEASED[name])
    with torch.device("meta"):
        ours = WanTransformer3DModel(config)
        theirs = DiffusersWan(**{k: v for k, v in config.to_dict().items() if not k.startswith("_")})
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == {
        k: tuple(v.shape) for k, v in theirs.state_dict().items()
    }


def test_from_dict_round_trip_and_bad_values() -> None:
    config = WanConfig(**RELEASED["wan2.2-ti2v-5b"])
    assert WanConfig.from_dict(config.to_dict()) == config
    assert config.rope_axes == (44, 42, 42) and sum(config.rope_axes) == config.attention_head_dim
    with pytest.raises(ConfigError, match="attention_head_dim.*even"):
        WanConfig.from_dict({"attention_head_dim": 13}, source="wan/config.json")
    with pytest.raises(ConfigError, match="patch_size.*3 items"):
        WanConfig.from_dict({"patch_size": [2, 2]}, source="wan/config.json")
    with pytest.raises(ConfigError, match="wan/config.json.*qk_norm"):
        WanConfig.from_dict({"qk_norm": "layer_norm"}, source="wan/config.json")
    with pytest.raises(ConfigError, match="num_layers"):
        WanConfig.from_dict({"num_layers": -1})
    with pytest.raises(ConfigError, match="image_dim"):
        WanConfig.from_dict({"image_dim": 0})
    with pytest.raises(ConfigError, match="unknown key.*window_size"):
        WanConfig.from_dict({"window_size": [-1, -1]})
    assert WanConfig.from_dict({"qk_norm": None, "out_channels": None}).output_channels == 16
