"""Bad IP-Adapter files and calls: a clear diffcaps error naming what was expected, and the model untouched."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import torch
from torch import Tensor

from diffcaps import ip_adapter
from diffcaps.errors import CapabilityError, CheckpointError, FormatError, IPAdapterError, ShapeError
from diffcaps.io import save_safetensors
from tests.custom_model import TinyDiT, TinyDiTConfig
from tests.flux_fixtures import TINY, seeded_model
from tests.ip_adapter.xlabs import state_hash, xlabs_tensors

K0 = "double_blocks.0.processor.ip_adapter_double_stream_k_proj"


def _lora_file() -> dict[str, Tensor]:
    return {"double_blocks.0.processor.qkv_lora1.down.weight": torch.zeros(4, 32),
            "double_blocks.0.processor.qkv_lora1.up.weight": torch.zeros(96, 4)}


def _beyond_depth() -> dict[str, Tensor]:
    deeper = attrs.evolve(TINY, num_layers=4)
    return xlabs_tensors(deeper, seed=1)


def _missing_block() -> dict[str, Tensor]:
    return xlabs_tensors(TINY, seed=1, blocks=1)


def _wrong_inner() -> dict[str, Tensor]:
    wider = attrs.evolve(TINY, num_attention_heads=3)
    return xlabs_tensors(wider, seed=1)


def _proj_width_mismatch() -> dict[str, Tensor]:
    other = attrs.evolve(TINY, joint_attention_dim=16)
    tensors = xlabs_tensors(TINY, seed=1)
    tensors.update({k: v for k, v in xlabs_tensors(other, seed=1).items() if k.startswith("ip_adapter_proj_model.")})
    return tensors


def _extra_key() -> dict[str, Tensor]:
    return {**xlabs_tensors(TINY, seed=1), "double_blocks.0.processor.qkv_lora1.down.weight": torch.zeros(4, 32)}


def _two_projections() -> dict[str, Tensor]:
    tensors = xlabs_tensors(TINY, seed=1)
    return {**tensors, "image_proj.proj.weight": tensors["ip_adapter_proj_model.proj.weight"].clone()}


def _bad_bias() -> dict[str, Tensor]:
    tensors = xlabs_tensors(TINY, seed=1)
    tensors[f"{K0}.bias"] = tensors[f"{K0}.bias"][:-1]
    return tensors


def _integer_weights() -> dict[str, Tensor]:
    tensors = xlabs_tensors(TINY, seed=1)
    tensors[f"{K0}.weight"] = tensors[f"{K0}.weight"].to(torch.int32)
    return tensors


CASES: dict[str, tuple[Callable[[], dict[str, Tensor]], type[Exception], str]] = {
    "lora-file": (_lora_file, FormatError,
                  r"not an XLabs Flux IP-Adapter: expected ip_adapter_proj_model.proj.weight .*found double_blocks.0"),
    "block-beyond-depth": (_beyond_depth, CheckpointError,
                           r"double block\(s\) 2, 3; the model has 2 double blocks \(0–1\)"),
    "missing-block": (_missing_block, CheckpointError,
                      r"4 missing key\(s\): double_blocks.1.processor.ip_adapter_double_stream_k_proj.bias"),
    "hidden-size": (_wrong_inner, ShapeError,
                    rf"{K0}.weight has shape \(48, 24\), expected \(32, 24\) \(the model's attention width 32"),
    "projection-width": (_proj_width_mismatch, ShapeError,
                         rf"{K0}.weight has shape \(32, 24\), expected \(32, 16\) .*image token width 16"),
    "extra-key": (_extra_key, CheckpointError, r"1 unexpected key\(s\): double_blocks.0.processor.qkv_lora1"),
    "two-projections": (_two_projections, CheckpointError, r"two image projections"),
    "bad-bias": (_bad_bias, ShapeError, rf"{K0}.bias has shape \(31,\), expected \(32,\)"),
    "integer-weights": (_integer_weights, CheckpointError, r"torch.int32, expected floating-point"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_file_is_rejected_and_the_model_is_untouched(case: str, tmp_path: Path) -> None:
    make, error, message = CASES[case]
    path = tmp_path / f"{case}.safetensors"
    save_safetensors(make(), path)
    model = seeded_model(TINY)
    ip_adapter.load(model, xlabs_tensors(TINY, seed=2), adapter_name="good")  # a loaded adapter stays as it was
    before = state_hash(model)
    with pytest.raises(error, match=message) as info:
        ip_adapter.load(model, path, adapter_name="bad")
    assert str(path) in str(info.value)
    assert state_hash(model) == before
    assert ip_adapter.adapter_names(model) == ("good",)


def test_not_a_safetensors_file_or_a_folder(tmp_path: Path) -> None:
    model = seeded_model(TINY)
    before = state_hash(model)
    junk = tmp_path / "ip_adapter.bin"
    junk.write_bytes(b"\x80\x02not safetensors at all")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        ip_adapter.load(model, junk)
    with pytest.raises(CheckpointError, match="is a folder"):
        ip_adapter.load(model, tmp_path)
    with pytest.raises(FormatError, match="maps names to tensors"):
        ip_adapter.load(model, {"ip_adapter_proj_model.proj.weight": [1.0]})  # type: ignore[dict-item]
    assert state_hash(model) == before and ip_adapter.adapter_names(model) == ()


def test_a_model_without_ip_adapter_gets_a_capability_error() -> None:
    model = TinyDiT(TinyDiTConfig())
    with pytest.raises(CapabilityError, match="TinyDiT does not support 'ip_adapter'"):
        ip_adapter.load(model, {}, adapter_name="x")  # type: ignore[arg-type]


def test_the_model_class_is_not_a_model_instance() -> None:
    from diffcaps.models.flux import FluxTransformer2DModel

    with pytest.raises(CapabilityError, match="pass a model instance, not the class"):
        ip_adapter.load(FluxTransformer2DModel, xlabs_tensors(TINY, seed=1))  # type: ignore[arg-type]


def _with(key: str, value: Tensor) -> Callable[[], dict[str, Tensor]]:
    def make() -> dict[str, Tensor]:
        tensors = xlabs_tensors(TINY, seed=1)
        tensors[key] = value
        return tensors

    return make


P = "ip_adapter_proj_model"
# issue 12: non-finite, boolean, 0-dimensional and empty tensors
VALUES: dict[str, tuple[Callable[[], dict[str, Tensor]], type[Exception], str]] = {
    "nan-weights": (_with(f"{K0}.weight", torch.full((32, 24), math.nan)), CheckpointError,
                    rf"{K0}.weight holds NaN values"),
    "fp8-nan-weights": (_with(f"{K0}.weight", torch.full((32, 24), math.nan).to(torch.float8_e4m3fn)),
                        CheckpointError, rf"{K0}.weight holds NaN values"),
    "inf-bias": (_with(f"{P}.proj.bias", torch.full((96,), math.inf)), CheckpointError,
                 rf"{P}.proj.bias holds infinite values"),
    "bool-norm": (_with(f"{P}.norm.weight", torch.ones(24, dtype=torch.bool)), CheckpointError,
                  rf"{P}.norm.weight holds torch.bool, expected floating-point"),
    "0d-norm": (_with(f"{P}.norm.weight", torch.tensor(1.0)), ShapeError, rf"{P}.norm.weight"),
    "3d-projection": (_with(f"{P}.proj.weight", torch.zeros(96, 12, 1)), ShapeError, rf"{P}.proj.weight"),
    "no-tokens": (_with(f"{P}.proj.weight", torch.zeros(0, 12)), ShapeError, rf"{P}.proj.weight"),
    "empty-embedding": (_with(f"{P}.proj.weight", torch.zeros(96, 0)), ShapeError, rf"{P}.proj.weight"),
}


@pytest.mark.parametrize("case", VALUES)
def test_bad_tensor_values_are_rejected_and_the_model_is_untouched(case: str, tmp_path: Path) -> None:
    make, error, message = VALUES[case]
    path = tmp_path / f"{case}.safetensors"
    save_safetensors(make(), path)
    model = seeded_model(TINY)
    ip_adapter.load(model, xlabs_tensors(TINY, seed=2), adapter_name="good")
    before = state_hash(model)
    with pytest.raises(error, match=message) as info:
        ip_adapter.load(model, path, adapter_name="bad")
    assert str(path) in str(info.value)
    assert state_hash(model) == before
    assert ip_adapter.adapter_names(model) == ("good",)


@pytest.mark.parametrize("name", ["a.b", "", 5, None, ["a"]], ids=repr)
def test_adapter_name_is_a_plain_non_empty_string(name: object) -> None:
    model = seeded_model(TINY)
    before = state_hash(model)
    with pytest.raises(IPAdapterError, match=r"adapter_name must (be a non-empty string|not contain '\.')"):
        ip_adapter.load(model, xlabs_tensors(TINY, seed=1), adapter_name=name)  # type: ignore[arg-type]
    assert state_hash(model) == before and ip_adapter.adapter_names(model) == ()


def test_unload_names_are_strings() -> None:
    model = seeded_model(TINY)
    ip_adapter.load(model, xlabs_tensors(TINY, seed=1), adapter_name="good")
    before = state_hash(model)
    unload: Any = ip_adapter.unload  # the checkers refuse these calls; this checks the run-time refusal
    for names in (5, [5], [None]):
        with pytest.raises(IPAdapterError, match="adapter name"):
            unload(model, names)
    assert state_hash(model) == before and ip_adapter.adapter_names(model) == ("good",)
