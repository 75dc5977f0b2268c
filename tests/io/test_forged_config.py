"""Forged sizes in a folder's config: a layer count far beyond the weights fails at once, by name."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from diffcaps.errors import CheckpointError
from diffcaps.io import CONFIG_NAME
from diffcaps.models.flux import FluxTransformer2DModel
from tests.flux_fixtures import save_tiny_folder

BOUND_S = 5.0  # a hang guard, not a benchmark: 10**4 layers took 33 s and 1.5 GB before


def _forge(folder: Path, **values: int) -> None:
    config = json.loads((folder / CONFIG_NAME).read_text())
    (folder / CONFIG_NAME).write_text(json.dumps(config | values))


@pytest.mark.parametrize("field", ["num_layers", "num_single_layers"])
@pytest.mark.parametrize("count", [10**4, 10**5, 10**7])
@pytest.mark.parametrize("sharded", [False, True])
def test_a_forged_layer_count_fails_at_once_naming_the_folder(
    tmp_path: Path, field: str, count: int, sharded: bool
) -> None:
    save_tiny_folder(tmp_path, max_shard_size=20_000 if sharded else "10GB")
    _forge(tmp_path, **{field: count})
    started = time.monotonic()
    with pytest.raises(CheckpointError, match="outgrows the weights, which hold") as info:
        FluxTransformer2DModel.from_pretrained(tmp_path)
    assert time.monotonic() - started < BOUND_S
    assert info.value.path == str(tmp_path)


def test_a_forged_width_fails_before_building_the_model(tmp_path: Path) -> None:
    save_tiny_folder(tmp_path)
    _forge(tmp_path, num_attention_heads=2**20)
    started = time.monotonic()
    with pytest.raises(CheckpointError, match="outgrows the weights"):
        FluxTransformer2DModel.from_pretrained(tmp_path)
    assert time.monotonic() - started < BOUND_S


def test_one_layer_too_many_still_names_the_missing_keys(tmp_path: Path) -> None:
    save_tiny_folder(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    _forge(tmp_path, num_layers=config["num_layers"] + 1)
    with pytest.raises(CheckpointError, match=r"missing key\(s\)") as info:
        FluxTransformer2DModel.from_pretrained(tmp_path)
    assert "outgrows" not in str(info.value)
