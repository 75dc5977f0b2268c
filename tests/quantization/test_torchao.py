"""quantization.enable with torchao configs: the same layers and outputs as torchao's quantize_ by hand."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from diffcaps import attention, casting, lora, offload, quantization
from diffcaps.errors import CastingError, LoRAError, QuantizationError
from diffcaps.io import save_safetensors
from diffcaps.models.flux import FluxTransformer2DModel
from diffcaps.offload import GroupOffloadingConfig
from diffcaps.quantization.spec import packed_linears
from tests.flux_fixtures import TINY, flux_inputs, seeded_model
from tests.lora._files import diffusers_style

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


def _adapter_file(folder: Path) -> Path:
    file = diffusers_style(seeded_model(TINY), seed=3, key=lambda p: f"transformer.{p}", alpha_every=3)
    return save_safetensors(file.tensors, folder / "adapter.safetensors")


def test_enable_is_refused_while_lora_adapters_are_loaded(tmp_path: Path) -> None:
    model = seeded_model(TINY)
    lora.load_adapter(model, _adapter_file(tmp_path))
    expected = _run(model)
    with pytest.raises(QuantizationError, match=r"LoRA adapter\(s\) 'default' are loaded"):
        quantization.enable(model, Int8WeightOnlyConfig())
    assert not _quantized(model) and quantization.active(model) is None
    assert torch.equal(_run(model), expected)


def test_lora_loaded_after_torchao_equals_torchao_by_hand_plus_the_adapter(tmp_path: Path) -> None:
    path = _adapter_file(tmp_path)
    model = seeded_model(TINY)
    quantization.enable(model, Int8WeightOnlyConfig())
    lora.load_adapter(model, path)
    # By hand: the adapter on the dense model, then torchao on the base layers alone.
    expected = seeded_model(TINY)
    lora.load_adapter(expected, path)
    quantize_(expected, Int8WeightOnlyConfig(), filter_fn=lambda m, n: (
        isinstance(m, nn.Linear) and not set(KEPT) & set(n.split(".")) and not {"lora_A", "lora_B"} & set(n.split("."))))
    out = _run(model)
    assert torch.equal(out, _run(expected))
    assert not any({"lora_A", "lora_B"} & set(name.split(".")) for name in _quantized(model))
    dense_adapter = seeded_model(TINY)
    lora.load_adapter(dense_adapter, path)
    by_hand, _ = _by_hand(Int8WeightOnlyConfig())
    assert not torch.equal(out, _run(by_hand))  # the adapter acts
    assert ((out - _run(dense_adapter)).norm() / _run(dense_adapter).norm()).item() < 0.1
    with pytest.raises(LoRAError, match=r"whose weights torchao quantized .*keep the adapter unfused"):
        lora.fuse(model)
    assert torch.equal(_run(model), out)
    lora.unload(model)
    assert torch.equal(_run(model), _run(by_hand))


def test_enable_is_refused_while_qkv_projections_are_fused() -> None:
    model = seeded_model(TINY)
    attention.fuse_qkv(model)
    expected = _run(model)
    with pytest.raises(QuantizationError, match=r"QKV projections are fused; call diffcaps\.attention\.unfuse_qkv"):
        quantization.enable(model, Int8WeightOnlyConfig())
    assert not _quantized(model) and quantization.active(model) is None and attention.qkv_fused(model)
    assert torch.equal(_run(model), expected)


@pytest.mark.parametrize("kind", ["block_level", "leaf_level"])
@pytest.mark.parametrize("first", ["torchao", "offload"])
def test_group_offloading_and_torchao_work_in_either_order(kind: Any, first: str) -> None:
    expected = _run(_by_hand(Int8WeightOnlyConfig())[0])
    model = seeded_model(TINY)
    config = GroupOffloadingConfig(onload_device="cpu", offload_type=kind)
    if first == "torchao":
        quantization.enable(model, Int8WeightOnlyConfig())
        offload.enable(model, config)
    else:
        offload.enable(model, config)
        quantization.enable(model, Int8WeightOnlyConfig())
    assert torch.equal(_run(model), expected)
    offload.disable(model)
    assert isinstance(model.get_submodule("transformer_blocks.0.attn.to_q").weight, TorchAOBaseTensor)
    assert torch.equal(_run(model), expected)


def test_layerwise_casting_and_torchao_refuse_each_other() -> None:
    model = seeded_model(TINY)
    quantization.enable(model, Int8WeightOnlyConfig())
    expected = _run(model)
    with pytest.raises(CastingError, match=r"cannot cast quantized parameter transformer_blocks\.0\..*weight \(Int8Tensor\)"):
        casting.enable(model, casting.LayerwiseCastingConfig(storage_dtype=torch.float8_e4m3fn))
    assert casting.active(model) is None and torch.equal(_run(model), expected)

    model = seeded_model(TINY)
    casting.enable(model, casting.LayerwiseCastingConfig(storage_dtype=torch.float8_e4m3fn))
    cast = _run(model)
    stored = {name: (p.dtype, p.detach().clone()) for name, p in model.named_parameters()}
    with pytest.raises(QuantizationError, match=r"layerwise casting is enabled .*diffcaps\.casting\.disable"):
        quantization.enable(model, Int8WeightOnlyConfig())
    assert not _quantized(model) and quantization.active(model) is None
    assert all(p.dtype == stored[n][0] and torch.equal(p, stored[n][1]) for n, p in model.named_parameters())
    assert torch.equal(_run(model), cast)
