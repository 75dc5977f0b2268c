"""LoRA over a GGUF model: adapters in the compute dtype over the decoded base; fuse refused on packed weights.

The reference is independent of diffcaps' LoRA code: the dense model built from the gguf
package's dequantisation with each adapter's update merged by hand (``tests.lora._check``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from diffcaps import lora
from diffcaps.errors import LoRAError
from diffcaps.io import save_safetensors
from diffcaps.models.flux import FluxTransformer2DModel
from diffcaps.quantization.spec import PackedLinear, packed_linears
from diffcaps.weights import load_single_file
from tests.flux_fixtures import flux_inputs
from tests.lora._check import fingerprint, reference_model
from tests.lora._files import LoraFile, bfl_control_file, diffusers_style
from tests.quantization.gguf_files import dequantized, flux_gguf, mixed_types
from tests.quantization.test_gguf_load import FLUX, FLUX_TYPES


@pytest.fixture(scope="module")
def flux_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return flux_gguf(tmp_path_factory.mktemp("gguf") / "flux.gguf", FLUX, mixed_types(FLUX_TYPES), seed=4)


@pytest.fixture(scope="module")
def dense_state(flux_file: Path) -> dict[str, Tensor]:
    mapper = FluxTransformer2DModel.declared_capabilities().weight_mapping
    return mapper.convert(dequantized(flux_file), "to_model")


def _dense(state: dict[str, Tensor]) -> FluxTransformer2DModel:
    model = FluxTransformer2DModel.from_config(FLUX)
    model.load_state_dict(state)
    return model.eval()


def _adapter(state: dict[str, Tensor], path: Path, seed: int) -> tuple[LoraFile, Path]:
    file = diffusers_style(_dense(state), seed=seed, key=lambda p: f"transformer.{p}", alpha_every=3)
    return file, save_safetensors(file.tensors, path)


def _sample(model: nn.Module, inputs: dict[str, Any]) -> Tensor:
    with torch.no_grad():
        out: Tensor = model(**inputs).sample
    return out


def test_load_weigh_and_unload_adapters_on_packed_layers(flux_file: Path, dense_state: dict[str, Tensor],
                                                         tmp_path: Path) -> None:
    model = load_single_file(FluxTransformer2DModel, flux_file)
    packed = dict(packed_linears(model))
    inputs = flux_inputs(FLUX)
    before = _sample(model, inputs)
    style, style_path = _adapter(dense_state, tmp_path / "style.safetensors", seed=11)
    detail, detail_path = _adapter(dense_state, tmp_path / "detail.safetensors", seed=12)
    lora.load_adapter(model, style_path, adapter_name="style")
    lora.load_adapter(model, detail_path, adapter_name="detail")
    # peft wraps the packed layers themselves; the base weights stay packed
    wrapped = model.get_submodule("single_transformer_blocks.0.attn.to_q")
    assert isinstance(getattr(wrapped, "base_layer", None), PackedLinear)
    assert set(dict(packed_linears(model)).values()) == set(packed.values())
    lora.set_adapters(model, ["style"], [0.7])
    expected = _sample(reference_model(FLUX, dense_state, style, 0.7), inputs)
    assert (_sample(model, inputs) - expected).abs().max().item() <= 1e-4 * expected.abs().max().item()
    lora.set_adapters(model, ["style", "detail"], [1.0, 0.5])
    both = reference_model(FLUX, {k: v for k, v in reference_model(FLUX, dense_state, style).state_dict().items()},
                           detail, 0.5)
    expected = _sample(both, inputs)
    assert (_sample(model, inputs) - expected).abs().max().item() <= 1e-4 * expected.abs().max().item()
    lora.unload(model)
    assert dict(packed_linears(model)) == packed
    assert torch.equal(_sample(model, inputs), before)


def test_adapters_run_in_the_compute_dtype(flux_file: Path, dense_state: dict[str, Tensor], tmp_path: Path) -> None:
    model = load_single_file(FluxTransformer2DModel, flux_file, torch_dtype=torch.bfloat16)
    _, path = _adapter(dense_state, tmp_path / "a.safetensors", seed=5)
    lora.load_adapter(model, path)
    wrapped = model.get_submodule("single_transformer_blocks.0.attn.to_q")
    adapter_weights = [p for n, p in wrapped.named_parameters() if "lora_" in n]
    assert adapter_weights and {p.dtype for p in adapter_weights} == {torch.bfloat16}
    dense = _dense(dense_state).to(torch.bfloat16)
    lora.load_adapter(dense, path)
    inputs = flux_inputs(FLUX, dtype=torch.bfloat16)
    assert torch.equal(_sample(model, inputs), _sample(dense, inputs))


def test_fuse_on_packed_weights_is_refused_and_changes_nothing(flux_file: Path, dense_state: dict[str, Tensor],
                                                               tmp_path: Path) -> None:
    model = load_single_file(FluxTransformer2DModel, flux_file)
    _, path = _adapter(dense_state, tmp_path / "a.safetensors", seed=6)
    lora.load_adapter(model, path)
    mark = fingerprint(model)
    with pytest.raises(LoRAError, match="cannot fuse into .* quantized layer.*keep the adapter unfused.*dense model"):
        lora.fuse(model)
    assert fingerprint(model) == mark


def test_save_pretrained_with_an_adapter_writes_the_decoded_base(flux_file: Path, dense_state: dict[str, Tensor],
                                                                 tmp_path: Path) -> None:
    model = load_single_file(FluxTransformer2DModel, flux_file)
    _, path = _adapter(dense_state, tmp_path / "a.safetensors", seed=7)
    lora.load_adapter(model, path)
    with pytest.warns(UserWarning, match="adapter"):
        folder = model.save_pretrained(tmp_path / "folder")
    saved = FluxTransformer2DModel.from_pretrained(folder)
    inputs = flux_inputs(FLUX)
    assert torch.equal(_sample(saved, inputs), _sample(_dense(dense_state), inputs))


def test_a_file_that_widens_a_packed_layer_is_refused_before_any_change(tmp_path: Path) -> None:
    base = mixed_types(FLUX_TYPES)

    def img_in_packed(name: str, shape: tuple[int, ...]) -> str:
        return "Q8_0" if name == "img_in.weight" else base(name, shape)

    path = flux_gguf(tmp_path / "flux.gguf", FLUX, img_in_packed, seed=4)
    model = load_single_file(FluxTransformer2DModel, path)
    assert isinstance(model.get_submodule("x_embedder"), PackedLinear)
    control = bfl_control_file(model, seed=1, in_channels=2 * FLUX.in_channels, num_double=FLUX.num_layers,
                               num_single=FLUX.num_single_layers)
    file = save_safetensors(control.tensors, tmp_path / "control.safetensors")
    before = fingerprint(model)
    with pytest.raises(LoRAError, match=r"widens x_embedder, whose weight stays packed \(Q8_0"):
        lora.load_adapter(model, file)
    assert fingerprint(model) == before and model.config.in_channels == FLUX.in_channels
    assert lora.list_adapters(model) == ()
