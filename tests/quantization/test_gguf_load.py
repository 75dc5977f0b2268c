"""GGUF single files into Flux and Wan: packed where quantized, equal to the gguf package's own dequantisation.

The reference for every output is the same model built dense from ``gguf.quants.dequantize``
of every tensor in the file (``tests.quantization.gguf_files.dequantized``).
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import torch
from torch import Tensor, nn

from diffcaps.errors import CheckpointError, ShapeError
from diffcaps.io import read_header
from diffcaps.models.flux import FluxConfig, FluxTransformer2DModel
from diffcaps.models.flux._weight_mapping import rope_axes
from diffcaps.models.wan import WanConfig, WanTransformer3DModel
from diffcaps.quantization.spec import PackedLinear, QuantizationSupport, packed_linears
from diffcaps.weights._gguf_file import read_gguf
from diffcaps.weights._gguf_load import fill_from_gguf, row_wise
from diffcaps.services import ModuleNames
from diffcaps.weights import UnexpectedTensorsWarning, load_single_file, save_single_file
from diffcaps.weights.spec import SWAP_HALVES, Inverted, Split, Transform
from tests.flux_fixtures import flux_inputs
from tests.quantization.gguf_files import dequantized, flux_gguf, mixed_types, wan_gguf, write_gguf
from tests.wan_fixtures import wan_inputs

# Widths of 256 so that the K-quants' 256-value blocks fit every matrix.
FLUX = FluxConfig(num_layers=2, num_single_layers=1, attention_head_dim=128, num_attention_heads=2,
                  joint_attention_dim=256, pooled_projection_dim=256, in_channels=64, guidance_embeds=True,
                  axes_dims_rope=rope_axes(128))
WAN = WanConfig(num_attention_heads=2, attention_head_dim=128, in_channels=16, out_channels=16, text_dim=256,
                freq_dim=256, ffn_dim=512, num_layers=2, rope_max_seq_len=32)
FLUX_TYPES = ("Q8_0", "Q4_K", "Q6_K", "F16", "Q5_0", "BF16")
WAN_TYPES = ("Q4_0", "Q4_1", "Q5_1", "Q2_K", "Q3_K", "Q5_K")


@pytest.fixture(scope="module")
def flux_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return flux_gguf(tmp_path_factory.mktemp("gguf") / "flux.gguf", FLUX, mixed_types(FLUX_TYPES))


@pytest.fixture(scope="module")
def wan_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return wan_gguf(tmp_path_factory.mktemp("gguf") / "wan.gguf", WAN, mixed_types(WAN_TYPES),
                    prefix="model.diffusion_model.")


def _reference(cls: type[FluxTransformer2DModel] | type[WanTransformer3DModel], config: Any, path: Path,
               prefix: str = "") -> nn.Module:
    """The model built dense from the gguf package's dequantisation of every tensor."""
    mapper = cls.declared_capabilities().weight_mapping
    model: nn.Module = cls.from_config(config)
    model.load_state_dict(mapper.convert(dequantized(path), "to_model", strip=prefix))
    return model.eval()


def _packed_types(model: nn.Module) -> set[str]:
    return {layer.codec.name for _, layer in packed_linears(model)}


def _sample(model: nn.Module, inputs: dict[str, Any]) -> Tensor:
    with torch.no_grad():
        out: Tensor = model(**inputs).sample
    return out


def test_flux_gguf_stays_packed_and_equals_the_gguf_dequantisation(flux_file: Path) -> None:
    model = load_single_file(FluxTransformer2DModel, flux_file, torch_dtype=torch.float32)
    assert model.config.num_layers == 2 and model.config.num_single_layers == 1
    packed = dict(packed_linears(model))
    assert {"Q8_0", "Q4_K", "Q6_K", "Q5_0"} <= _packed_types(model) and len(packed) > 10
    for name, layer in packed.items():
        assert layer.weight.dtype == torch.uint8 and layer.weight.ndim == 2
        assert layer.weight.shape[0] == layer.out_features and layer.compute_dtype == torch.float32
    # the modules Flux keeps unquantized are never quantized by diffcaps, but a file that ships
    # them quantized is held as it is: decoding them on load would change no value
    assert isinstance(model.get_submodule("time_text_embed.timestep_embedder.linear_1"), PackedLinear)
    # the single block's fused linear1 (Q4_K) split into q, k, v, mlp on its packed rows, no copy:
    # each part starts where the one before ends
    parts = [packed[f"single_transformer_blocks.0.{p}"] for p in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")]
    assert {part.codec.name for part in parts} == {"Q4_K"}
    for before, after in zip(parts, parts[1:], strict=False):
        assert after.weight.data_ptr() == before.weight.data_ptr() + before.weight.numel()
    assert [part.out_features for part in parts] == [256, 256, 256, 1024]
    # BF16 q/k/v of the first double block load as plain tensors; Q8_0 ones of the second stay packed
    assert not isinstance(model.get_submodule("transformer_blocks.0.attn.to_q"), PackedLinear)
    assert packed["transformer_blocks.1.attn.to_v"].codec.name == "Q8_0"
    for name, tensor in model.state_dict().items():
        if tensor.dtype != torch.uint8:
            assert tensor.dtype == torch.float32, name
    inputs = flux_inputs(FLUX)
    expected = _sample(_reference(FluxTransformer2DModel, FLUX, flux_file), inputs)
    assert (_sample(model, inputs) - expected).abs().max().item() <= 1e-5


def test_wan_gguf_with_every_other_type_equals_the_gguf_dequantisation(wan_file: Path) -> None:
    model = load_single_file(WanTransformer3DModel, wan_file, torch_dtype=torch.float32)
    assert _packed_types(model) == set(WAN_TYPES)
    inputs = wan_inputs(WAN)
    expected = _sample(_reference(WanTransformer3DModel, WAN, wan_file, "model.diffusion_model."), inputs)
    assert (_sample(model, inputs) - expected).abs().max().item() <= 1e-5


def test_bf16_compute_decodes_into_bf16_and_lands_the_rest_in_bf16(flux_file: Path, wan_file: Path) -> None:
    model = load_single_file(FluxTransformer2DModel, flux_file, torch_dtype=torch.bfloat16)
    assert {layer.compute_dtype for _, layer in packed_linears(model)} == {torch.bfloat16}
    assert {t.dtype for t in model.state_dict().values()} == {torch.uint8, torch.bfloat16}
    reference = _reference(FluxTransformer2DModel, FLUX, flux_file).to(torch.bfloat16)
    inputs = flux_inputs(FLUX, dtype=torch.bfloat16)
    assert torch.equal(_sample(model, inputs), _sample(reference, inputs))
    wan = load_single_file(WanTransformer3DModel, wan_file, torch_dtype=torch.bfloat16)
    # Wan's declared float32 modules keep float32 (its time embedder is one): dense tensors land
    # in float32 and packed layers there compute in float32
    kept = wan.kept_in_fp32()
    packed = dict(packed_linears(wan))
    dense = [name for name in kept if name.rpartition(".")[0] not in packed]
    assert dense and all(wan.state_dict()[name].dtype == torch.float32 for name in dense)
    inside = [layer for owner, layer in packed.items() if f"{owner}.weight" in kept]
    assert inside and all(layer.compute_dtype == torch.float32 for layer in inside)


def _mappings(path: Path) -> list[tuple[int, int]]:
    spans = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(str(path.resolve())):
            start, end = line.split()[0].split("-")
            spans.append((int(start, 16), int(end, 16)))
    return spans


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_packed_weights_are_views_of_the_mapped_file(flux_file: Path) -> None:
    model = load_single_file(FluxTransformer2DModel, flux_file)
    spans = _mappings(flux_file)
    assert spans
    reordered = {"norm_out.linear"}  # its halves swap places: the packed rows are copied once, in the new order
    for name, layer in packed_linears(model):
        pointer = layer.weight.data_ptr()
        inside = any(start <= pointer < end for start, end in spans)
        assert inside != (name in reordered), f"{name} was {'copied out of' if not inside else 'left in'} the file"


def test_save_pretrained_of_a_packed_model_writes_a_dense_folder(flux_file: Path, tmp_path: Path) -> None:
    model = load_single_file(FluxTransformer2DModel, flux_file, torch_dtype=torch.bfloat16)
    folder = model.save_pretrained(tmp_path / "dense")
    header = read_header(folder / "diffusion_pytorch_model.safetensors")
    assert {info.dtype for info in header.tensors.values()} == {torch.bfloat16}
    assert {key: info.shape for key, info in header.tensors.items()} == {
        key: tuple(t.shape) for key, t in FluxTransformer2DModel.from_config(FLUX).state_dict().items()}
    dense = FluxTransformer2DModel.from_pretrained(folder, torch_dtype=torch.bfloat16)
    assert not list(packed_linears(dense))
    inputs = flux_inputs(FLUX, dtype=torch.bfloat16)
    assert torch.equal(_sample(dense, inputs), _sample(model, inputs))


def test_save_single_file_of_a_packed_model_writes_its_weights_decoded(flux_file: Path, tmp_path: Path) -> None:
    model = load_single_file(FluxTransformer2DModel, flux_file, torch_dtype=torch.bfloat16)
    out = save_single_file(model, tmp_path / "dense.safetensors")
    header = read_header(out)
    assert torch.uint8 not in {info.dtype for info in header.tensors.values()}
    assert header.tensors["single_blocks.0.linear1.weight"].dtype == torch.bfloat16
    again = load_single_file(FluxTransformer2DModel, out, torch_dtype=torch.bfloat16)
    assert not list(packed_linears(again))
    inputs = flux_inputs(FLUX, dtype=torch.bfloat16)
    assert torch.equal(_sample(again, inputs), _sample(model, inputs))


# --- bad input ----------------------------------------------------------------------------


def _flux_tensors() -> dict[str, Tensor]:
    model = FluxTransformer2DModel.from_config(FLUX)
    mapper = FluxTransformer2DModel.declared_capabilities().weight_mapping
    return dict(mapper.convert(model.state_dict(), "to_original"))


def _write(path: Path, tensors: dict[str, Tensor], **override: str) -> Path:
    rule = mixed_types(("Q8_0",))
    return write_gguf(path, tensors, lambda name, shape: override.get(name) or rule(name, shape),
                      architecture="flux")


def _fails(path: Path, pattern: str, error: type[Exception] = CheckpointError, **kwargs: Any) -> str:
    with pytest.raises(error, match=pattern) as info:
        load_single_file(FluxTransformer2DModel, path, **kwargs)
    assert str(path) in str(info.value)
    return str(info.value)


def test_not_a_gguf_file(tmp_path: Path) -> None:
    path = tmp_path / "x.gguf"
    path.write_bytes(b"not gguf at all, just text")
    _fails(path, "not a GGUF file")


def test_truncated_files_name_the_file(tmp_path: Path, flux_file: Path) -> None:
    data = flux_file.read_bytes()
    for cut in (6, 40, 300, len(data) // 2, len(data) - 1):
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(data[:cut])
        _fails(path, "not a readable GGUF file")


def test_an_unsupported_tensor_type_names_the_tensor(tmp_path: Path) -> None:
    path = _write(tmp_path / "i8.gguf", _flux_tensors(), **{"double_blocks.0.img_attn.proj.weight": "I8"})
    message = _fails(path, "unsupported GGUF type")
    assert "double_blocks.0.img_attn.proj.weight (I8)" in message and "Q4_K" in message


def test_a_wrong_shape_names_the_tensor(tmp_path: Path) -> None:
    tensors = _flux_tensors()
    tensors["double_blocks.1.img_attn.proj.weight"] = torch.zeros(256, 512)
    _fails(_write(tmp_path / "shape.gguf", tensors), "double_blocks.1.img_attn.proj.weight", ShapeError)


def test_missing_and_extra_tensors(tmp_path: Path) -> None:
    tensors = _flux_tensors()
    del tensors["double_blocks.1.txt_mlp.2.weight"]
    _fails(_write(tmp_path / "missing.gguf", tensors), "missing key.*double_blocks.1.txt_mlp.2.weight")
    tensors = {**_flux_tensors(), "something.else.weight": torch.zeros(4, 32)}
    path = _write(tmp_path / "extra.gguf", tensors)
    _fails(path, "unexpected key.*something.else.weight")
    with pytest.warns(UnexpectedTensorsWarning, match="something.else.weight"):
        model = load_single_file(FluxTransformer2DModel, path, strict=False)
    assert list(packed_linears(model))


def test_a_forged_block_index_fails_at_once(tmp_path: Path) -> None:
    tensors = {**_flux_tensors(), "double_blocks.999999.img_mod.lin.weight": torch.zeros(4, 32)}
    path = _write(tmp_path / "forged.gguf", tensors)
    started = time.monotonic()
    _fails(path, "outgrows the weights")
    assert time.monotonic() - started < 5.0


def _forge(path: Path, edit: Callable[[Any], None]) -> Path:
    from gguf import GGUFReader

    reader = GGUFReader(str(path), "r+")  # edits the header in place, through the mapping
    edit(reader)
    del reader
    return path


def test_forged_tensor_sizes_and_offsets_are_refused(tmp_path: Path, flux_file: Path) -> None:
    def huge_dim(reader: Any) -> None:
        reader.tensors[3].field.parts[3][0] = 2**40

    def far_offset(reader: Any) -> None:
        reader.tensors[5].field.parts[5][0] = 2**50

    def many_tensors(reader: Any) -> None:
        reader.fields["GGUF.tensor_count"].parts[0][0] = 2**62

    for number, edit in enumerate((huge_dim, far_offset, many_tensors)):
        path = tmp_path / f"forged{number}.gguf"
        path.write_bytes(flux_file.read_bytes())
        started = time.monotonic()
        _fails(_forge(path, edit), "not a readable GGUF file")
        assert time.monotonic() - started < 5.0


def test_without_the_gguf_package_a_named_error_says_what_to_install(flux_file: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(CheckpointError, match=r'pip install "diffcaps\[gguf\]"'):
        load_single_file(FluxTransformer2DModel, flux_file)


def test_a_plain_safetensors_load_is_unchanged_by_the_gguf_hook(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        path = tmp_path / "no.safetensors"
        path.write_bytes(b"GGUX" + b"\0" * 60)
        with pytest.raises(CheckpointError) as info:
            load_single_file(FluxTransformer2DModel, path)
    assert "GGUF" not in str(info.value)


# --- transforms on packed rows ------------------------------------------------------------


@attrs.frozen
class _Step:
    sources: tuple[str, ...]
    targets: tuple[str, ...]
    transform: Transform


class _Pair(nn.Module):
    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.a = nn.Linear(in_features, 64, bias=False)
        self.b = nn.Linear(in_features, 64, bias=False)


def _fill(tmp_path: Path, transform: Transform, targets: tuple[str, ...], in_features: int,
          fused: torch.Size) -> tuple[_Pair, list[str], dict[str, Tensor]]:
    path = write_gguf(tmp_path / "fused.gguf", {"fused": torch.randn(fused)}, {"fused": "Q8_0"}, architecture="test")
    with torch.device("meta"):
        model = _Pair(in_features)
    decoded = fill_from_gguf(model, [_Step(("fused",), targets, transform)], read_gguf(path),
                             QuantizationSupport(keep=ModuleNames(("nothing",))), torch_dtype=None, device="cpu")
    parts = transform.forward([dequantized(path)["fused"]])
    return model, decoded, dict(zip(targets, parts, strict=True))


def test_row_transforms_run_on_packed_rows_and_others_decode_on_load(tmp_path: Path) -> None:
    model, decoded, expected = _fill(tmp_path, Split(ratios=(1, 1)), ("a.weight", "b.weight"), 64,
                                     torch.Size((128, 64)))
    assert decoded == [] and isinstance(model.a, PackedLinear) and isinstance(model.b, PackedLinear)
    assert torch.equal(model.a.dense_weight(), expected["a.weight"])
    assert torch.equal(model.b.dense_weight(), expected["b.weight"])
    model, decoded, expected = _fill(tmp_path, SWAP_HALVES, ("a.weight",), 64, torch.Size((64, 64)))
    assert decoded == [] and isinstance(model.a, PackedLinear)
    assert torch.equal(model.a.dense_weight(), expected["a.weight"])
    # cutting inside rows cannot run on packed bytes: decoded on load, and said so
    model, decoded, expected = _fill(tmp_path, Split(ratios=(1, 1), dim=1), ("a.weight", "b.weight"), 32,
                                     torch.Size((64, 64)))
    assert decoded == ["a.weight", "b.weight"] and not list(packed_linears(model))
    assert torch.equal(model.a.weight, expected["a.weight"]) and torch.equal(model.b.weight, expected["b.weight"])
    assert not row_wise(Inverted(Split(ratios=(1, 1), dim=1))) and row_wise(Inverted(SWAP_HALVES))
