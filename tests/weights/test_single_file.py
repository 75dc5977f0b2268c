"""load_single_file / save_single_file on original-layout files of every variant, size, prefix and dtype."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffcaps.io import MappedSafetensors, read_header
from diffcaps.models.flux import FluxTransformer2DModel
from diffcaps.weights import load_single_file, save_single_file
from tests.flux_fixtures import flux_inputs
from tests.weights.fixtures import (
    FILE_DTYPES,
    PREFIXES,
    SIZES,
    VARIANTS,
    as_stored,
    original_file,
    variant_config,
    variant_model,
)


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def assert_same_file_tensors(first: Path, second: Path) -> None:
    """Key for key, dtype for dtype, bit for bit."""
    with MappedSafetensors(first) as a, MappedSafetensors(second) as b:
        assert sorted(a) == sorted(b)
        for key in a:
            assert a.info(key).dtype == b.info(key).dtype, key
            assert a.info(key).shape == b.info(key).shape, key
            assert torch.equal(_bits(a.view(key)), _bits(b.view(key))), key


@pytest.mark.parametrize("dtype", FILE_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("prefix", PREFIXES, ids=lambda p: p or "no-prefix")
@pytest.mark.parametrize("size", sorted(SIZES))
@pytest.mark.parametrize("variant", VARIANTS)
def test_original_file_loads_and_round_trips_bit_exact(
    tmp_path: Path, variant: str, size: str, prefix: str, dtype: torch.dtype
) -> None:
    source = variant_model(variant, size, seed=VARIANTS.index(variant))
    path = original_file(tmp_path / "original.safetensors", source, prefix=prefix, dtype=dtype)

    loaded = load_single_file(FluxTransformer2DModel, path)

    assert loaded.config == variant_config(variant, size)  # depth, width, variant: all read from the file
    expected = as_stored(source, dtype)
    state = loaded.state_dict()
    assert state.keys() == expected.keys()
    for key, tensor in state.items():
        assert tensor.dtype == torch.float32, key
        assert torch.equal(tensor, expected[key]), key
    assert not loaded.training

    again = save_single_file(loaded, tmp_path / "again.safetensors", prefix=prefix, torch_dtype=dtype)
    assert_same_file_tensors(path, again)


def test_file_uses_bfl_names_and_fused_tensors(tmp_path: Path) -> None:
    """Spot checks of the original layout against the published key table, independent of the mapper."""
    model = variant_model("flux-dev", "medium")
    state = model.state_dict()
    path = original_file(tmp_path / "dev.safetensors", model)
    with MappedSafetensors(path) as file:
        qkv = file.view("double_blocks.2.img_attn.qkv.weight")
        expected = torch.cat([state[f"transformer_blocks.2.attn.to_{x}.weight"] for x in "qkv"])
        assert torch.equal(qkv, expected)
        txt = file.view("double_blocks.0.txt_attn.qkv.bias")
        expected = torch.cat([state[f"transformer_blocks.0.attn.add_{x}_proj.bias"] for x in "qkv"])
        assert torch.equal(txt, expected)
        linear1 = file.view("single_blocks.1.linear1.weight")
        parts = [f"attn.to_{x}" for x in "qkv"] + ["proj_mlp"]
        expected = torch.cat([state[f"single_transformer_blocks.1.{p}.weight"] for p in parts])
        assert torch.equal(linear1, expected)
        assert linear1.shape == (7 * 96, 96)
        shift_scale = file.view("final_layer.adaLN_modulation.1.weight")
        scale, shift = state["norm_out.linear.weight"].chunk(2)
        assert torch.equal(shift_scale, torch.cat([shift, scale]))
        assert torch.equal(file.view("double_blocks.1.img_attn.norm.key_norm.scale"),
                           state["transformer_blocks.1.attn.norm_k.weight"])
        assert torch.equal(file.view("guidance_in.out_layer.bias"),
                           state["time_text_embed.guidance_embedder.linear_2.bias"])
        # per double block two q/k/v triples (weight, bias) become pairs; per single block q, k, v, mlp do
        assert len(list(file)) == len(state) - 3 * 2 * 4 - 2 * 6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn], ids=["bf16", "fp8"])
def test_low_precision_files_load_into_the_requested_dtype(tmp_path: Path, dtype: torch.dtype) -> None:
    source = variant_model("flux-schnell", "small")
    path = original_file(tmp_path / "low.safetensors", source, dtype=dtype)
    loaded = load_single_file(FluxTransformer2DModel, path, torch_dtype=torch.bfloat16, device=torch.device("cpu"))
    for key, tensor in loaded.state_dict().items():
        assert tensor.dtype == torch.bfloat16
        assert tensor.device.type == "cpu"
        assert torch.equal(tensor, source.state_dict()[key].to(dtype).to(torch.bfloat16)), key
    inputs = flux_inputs(loaded.config, dtype=torch.bfloat16)
    with torch.no_grad():
        out = loaded(**inputs).sample
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_fp8_file_keeps_its_bits_through_a_bf16_model(tmp_path: Path) -> None:
    path = original_file(tmp_path / "fp8.safetensors", variant_model("flux-fill", "small"), dtype=torch.float8_e4m3fn)
    loaded = load_single_file(FluxTransformer2DModel, path, torch_dtype=torch.bfloat16)
    again = save_single_file(loaded, tmp_path / "again.safetensors", torch_dtype=torch.float8_e4m3fn)
    assert_same_file_tensors(path, again)


def test_loaded_model_computes_what_the_source_computes(tmp_path: Path) -> None:
    source = variant_model("flux-depth", "medium", seed=4)
    path = original_file(tmp_path / "depth.safetensors", source, prefix="model.diffusion_model.")
    loaded = load_single_file(FluxTransformer2DModel, path)
    inputs = flux_inputs(source.config, batch=2)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).sample, source(**inputs).sample)


@pytest.mark.parametrize("prefix", ["", "diffusion_model."], ids=["no-prefix", "prefixed"])
def test_diffusers_layout_single_file_is_recognised(tmp_path: Path, prefix: str) -> None:
    source = variant_model("flux-fill", "small", seed=2)
    path = save_single_file(source, tmp_path / "diffusers.safetensors", layout="diffusers", prefix=prefix)
    assert all(k.startswith(prefix) for k in read_header(path).tensors)
    assert f"{prefix}transformer_blocks.0.attn.to_q.weight" in read_header(path).tensors
    loaded = load_single_file(FluxTransformer2DModel, path, variant="flux-fill")
    assert loaded.config == source.config
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_reading_is_per_tensor_in_file_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = original_file(tmp_path / "dev.safetensors", variant_model("flux-dev", "small"), dtype=torch.bfloat16)
    header = read_header(path)
    viewed: list[str] = []
    released: list[str] = []
    view, release = MappedSafetensors.view, MappedSafetensors.release

    def spy_view(self: MappedSafetensors, key: str) -> torch.Tensor:
        viewed.append(key)
        return view(self, key)

    def spy_release(self: MappedSafetensors, key: str) -> None:
        released.append(key)
        release(self, key)

    monkeypatch.setattr(MappedSafetensors, "view", spy_view)
    monkeypatch.setattr(MappedSafetensors, "release", spy_release)
    load_single_file(FluxTransformer2DModel, path, torch_dtype=torch.float32)
    assert sorted(viewed) == sorted(header.tensors)  # each tensor read exactly once
    assert viewed == sorted(viewed, key=lambda k: header.tensors[k].start)
    assert released == viewed  # cast on landing, so its pages are dropped right after


def _mapped_ranges(path: Path) -> list[tuple[int, int]]:
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(str(path)):
            low, high = line.split()[0].split("-")
            ranges.append((int(low, 16), int(high, 16)))
    return ranges


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc")
def test_weights_that_need_no_cast_stay_in_the_file_mapping(tmp_path: Path) -> None:
    source = variant_model("flux-dev", "small", seed=6)
    path = original_file(tmp_path / "dev.safetensors", source)
    model = load_single_file(FluxTransformer2DModel, path)  # float32 file into a float32 model
    ranges = _mapped_ranges(path)
    assert ranges
    state = model.state_dict()
    in_file = {k for k, t in state.items() if any(lo <= t.data_ptr() < hi for lo, hi in ranges)}
    assert in_file == set(state) - {"norm_out.linear.weight", "norm_out.linear.bias"}  # halves swapped: copies
    storages = [t.untyped_storage().data_ptr() for t in state.values()]
    assert len(set(storages)) == len(storages)  # parts of a fused tensor do not share a storage

    folder = model.save_pretrained(tmp_path / "folder")  # safetensors accepts them as separate tensors
    assert all(torch.equal(v, source.state_dict()[k])
               for k, v in FluxTransformer2DModel.from_pretrained(folder).state_dict().items())
    model.get_parameter("transformer_blocks.0.attn.to_q.weight").data.add_(1.0)  # copy-on-write: file untouched
    reread = load_single_file(FluxTransformer2DModel, path)
    assert torch.equal(reread.state_dict()["transformer_blocks.0.attn.to_q.weight"],
                       source.state_dict()["transformer_blocks.0.attn.to_q.weight"])
    save_single_file(reread, path)  # replacing the file leaves models mapped from the old one intact
    assert torch.equal(model.state_dict()["transformer_blocks.0.attn.to_k.weight"],
                       source.state_dict()["transformer_blocks.0.attn.to_k.weight"])
