"""Forged sizes in a single file: a block index far beyond the file's tensors fails at once, by name."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from diffcaps.errors import CheckpointError
from diffcaps.io import MappedSafetensors, save_safetensors
from diffcaps.models.flux import FluxTransformer2DModel
from diffcaps.weights import checkpoint_recogniser, inspect_file, load_single_file
from tests.weights.fixtures import original_file, variant_model

BOUND_S = 5.0  # a hang guard, not a benchmark: the unbounded build took minutes and gigabytes


def _forged(tmp_path: Path, index: int) -> Path:
    source = original_file(tmp_path / "dev.safetensors", variant_model("flux-dev", "small"))
    with MappedSafetensors(source) as file:
        tensors = {key: file.view(key).clone() for key in file}
    tensors[f"double_blocks.{index}.img_mod.lin.weight"] = torch.zeros(2, 2)
    return save_safetensors(tensors, tmp_path / "forged.safetensors")


@pytest.mark.parametrize("index", [999_999, 10**9])
def test_a_forged_block_index_fails_at_once_with_the_file_named(tmp_path: Path, index: int) -> None:
    path = _forged(tmp_path, index)
    started = time.monotonic()
    with pytest.raises(CheckpointError, match="outgrows the weights") as info:
        load_single_file(FluxTransformer2DModel, path)
    assert time.monotonic() - started < BOUND_S
    assert str(info.value).startswith(f"{path} (flux-dev): ")


def test_inspect_reports_a_forged_block_index_at_once(tmp_path: Path) -> None:
    path = _forged(tmp_path, 999_999)
    started = time.monotonic()
    report = inspect_file(path, [checkpoint_recogniser([FluxTransformer2DModel])])
    assert time.monotonic() - started < BOUND_S
    assert report.kind == "checkpoint"
    fit = dict(report.recognitions[0].rows)["fit"]
    assert fit.startswith("does not load as is: the model this config describes outgrows the weights")


def test_a_gap_of_one_block_still_lists_the_missing_tensors(tmp_path: Path) -> None:
    """The bound leaves room: a small gap still gets the precise missing-key message."""
    path = _forged(tmp_path, 2)
    with pytest.raises(CheckpointError, match=r"missing key\(s\): double_blocks\.1\.img_attn") as info:
        load_single_file(FluxTransformer2DModel, path)
    assert "outgrows" not in str(info.value)
