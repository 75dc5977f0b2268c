"""quantization.enable with torchao configs: the same layers and outputs as torchao's quantize_ by hand."""

from __future__ import annotations

import sys
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from diffcaps import quantization
from diffcaps.errors import QuantizationError
from diffcaps.models.flux import FluxTransformer2DModel
from diffcaps.quantization.spec import packed_linears
from tests.flux_fixtures import TINY, flux_inputs, seeded_model

torchao_quantization = pytest.importorskip("torchao.quantization")
from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_  # noqa: E402
from torchao.utils import TorchAOBaseTensor  # noqa: E402

KEPT = ("x_embedder", "context_embedder", "time_text_embed", "norm_out")


def _run(model: FluxTransformer2DModel) -> Tensor:
    with torch.no_grad():
        out: Tensor = model(**flux_inputs(TINY), return_dict=False)[0]
    return out


def _by_hand(config: Any) -> tuple[FluxTransformer2DModel, set[str]]:
    """torchao's quantize_ applied directly, with the filter the Flux row implies."""
    model = seeded_model(TINY)

    def keep(module: nn.Module, name: str) -> bool:
        return isinstance(module, nn.Linear) and not set(KEPT) & set(name.split("."))

    quantize_(model, config, filter_fn=keep)
    return model, _quantized(model)


def _quantized(model: nn.Module) -> set[str]:
    return {name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and isinstance(m.weight, TorchAOBaseTensor)}


@pytest.mark.parametrize("config", [Int8WeightOnlyConfig(), Float8WeightOnlyConfig()], ids=["int8", "float8"])
def test_enable_equals_torchao_by_hand_and_skips_kept_modules(config: Any) -> None:
    model = seeded_model(TINY)
    dense = _run(model)
    assert quantization.active(model) is None
    quantization.enable(model, config)
    expected, expected_layers = _by_hand(config)
    assert _quantized(model) == expected_layers and len(expected_layers) > 10
    assert not any(set(KEPT) & set(name.split(".")) for name in expected_layers)
    assert isinstance(model.get_submodule("norm_out.linear").weight, nn.Parameter)
    assert not isinstance(model.get_submodule("norm_out.linear").weight, TorchAOBaseTensor)
    assert isinstance(model.get_submodule("single_transformer_blocks.0.proj_out").weight, TorchAOBaseTensor)
    out = _run(model)
    assert torch.equal(out, _run(expected))
    assert not torch.equal(out, dense) and ((out - dense).norm() / dense.norm()).item() < 0.1
    report = quantization.active(model)
    assert report is not None and report.torchao is config and report.packed == {}
    assert set(report.torchao_layers) == expected_layers


def test_enable_in_bfloat16_matches_by_hand() -> None:
    model = seeded_model(TINY).to(torch.bfloat16)
    quantization.enable(model, Int8WeightOnlyConfig())
    expected = seeded_model(TINY).to(torch.bfloat16)
    quantize_(expected, Int8WeightOnlyConfig(),
              filter_fn=lambda m, n: isinstance(m, nn.Linear) and not set(KEPT) & set(n.split(".")))
    inputs = flux_inputs(TINY, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(model(**inputs, return_dict=False)[0], expected(**inputs, return_dict=False)[0])


def test_torchao_is_one_way_and_not_applied_twice() -> None:
    model = seeded_model(TINY)
    quantization.enable(model, Int8WeightOnlyConfig())
    with pytest.raises(QuantizationError, match="one-way"):
        quantization.disable(model)
    with pytest.raises(QuantizationError, match="already quantized"):
        quantization.enable(model, Int8WeightOnlyConfig())


def test_a_config_that_is_not_torchao_is_refused() -> None:
    model = seeded_model(TINY)
    with pytest.raises(QuantizationError, match="AOBaseConfig"):
        quantization.enable(model, "int8")  # type: ignore[arg-type]
    assert quantization.active(model) is None


def test_a_failing_torchao_run_leaves_the_model_as_it_was(monkeypatch: pytest.MonkeyPatch) -> None:
    model = seeded_model(TINY)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def fails_half_way(module: nn.Module, config: Any, filter_fn: Any = None, device: Any = None) -> None:
        quantize_(module.get_submodule("transformer_blocks.0"), config)
        raise RuntimeError("no kernel for this device")

    monkeypatch.setattr(torchao_quantization, "quantize_", fails_half_way)
    with pytest.raises(QuantizationError, match="no kernel for this device"):
        quantization.enable(model, Int8WeightOnlyConfig())
    assert not _quantized(model) and quantization.active(model) is None
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_without_torchao_a_named_error_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    model = seeded_model(TINY)
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    with pytest.raises(QuantizationError, match=r'pip install "diffcaps\[torchao\]"'):
        quantization.enable(model, Int8WeightOnlyConfig())
    assert not list(packed_linears(model)) and quantization.active(model) is None
