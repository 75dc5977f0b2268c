"""ComfyUI scaled-fp8 single files: loaded kept fp8 with the scale at compute, written back bit-exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from diffcaps import quantization, weights
from diffcaps.cli import main
from diffcaps.errors import CheckpointError
from diffcaps.models.flux import FluxConfig, FluxTransformer2DModel
from diffcaps.quantization.spec import PackedLinear, packed_linears
from diffcaps.quantization.spec import ScaledFP8
from tests.flux_fixtures import flux_inputs, seeded_model

CONFIG = FluxConfig(num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                    joint_attention_dim=24, pooled_projection_dim=20, in_channels=64,  # 64: recognised as flux-dev
                    guidance_embeds=True, axes_dims_rope=(4, 6, 6))

FP8 = torch.float8_e4m3fn
# BFL names of the modules Flux keeps unquantized (x_embedder, context_embedder, time_text_embed, norm_out)
KEPT = ("img_in.", "txt_in.", "time_in.", "vector_in.", "guidance_in.", "final_layer.adaLN_modulation.")


def _original(tmp_path: Path) -> dict[str, Tensor]:
    path = weights.save_single_file(seeded_model(CONFIG), tmp_path / "bf16.safetensors", torch_dtype=torch.bfloat16)
    return load_file(path)


def scaled_fp8_state(tmp_path: Path, *, kept_too: bool = False) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(scaled-fp8 file state, the same weights dequantized in float32): every 2-D linear weight
    outside the kept modules (and inside them with ``kept_too``) stored as fp8 · scale."""
    state, dense = _original(tmp_path), {}
    scaled: dict[str, Tensor] = {"scaled_fp8": torch.empty(0, dtype=FP8)}
    for number, (key, tensor) in enumerate(sorted(state.items())):
        kept = key.startswith(KEPT)
        if tensor.ndim != 2 or not key.endswith(".weight") or (kept and not kept_too):
            scaled[key], dense[key] = tensor, tensor
            continue
        scale = (tensor.float().abs().max() / 448.0).reshape(())
        fp8 = (tensor.float() / scale).to(FP8)
        base = key.removesuffix("weight")
        scaled[key], scaled[base + "scale_weight"] = fp8, scale
        if number % 3 == 0:
            scaled[base + "scale_input"] = torch.tensor([0.5 + number / 100])
        dense[key] = fp8.float() * scale
    return scaled, dense


def _run(model: FluxTransformer2DModel, dtype: torch.dtype = torch.float32) -> Tensor:
    with torch.no_grad():
        out: Tensor = model(**flux_inputs(CONFIG, dtype=dtype), return_dict=False)[0]
    return out


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["float32", "bfloat16"])
def test_loads_kept_fp8_and_equals_dequantize_then_run(tmp_path: Path, dtype: torch.dtype | None) -> None:
    scaled, dense = scaled_fp8_state(tmp_path)
    save_file(scaled, tmp_path / "x_fp8_scaled.safetensors")
    save_file(dense, tmp_path / "dequantized.safetensors")
    model = weights.load_single_file(FluxTransformer2DModel, tmp_path / "x_fp8_scaled.safetensors", torch_dtype=dtype)
    reference = weights.load_single_file(FluxTransformer2DModel, tmp_path / "dequantized.safetensors",
                                         torch_dtype=dtype)
    for parameter in reference.parameters():  # fresh, aligned copies of the file views: the same float32
        parameter.data = parameter.data.clone()  # matmul kernels as the decoded weights (bits agree then)
    layers = dict(packed_linears(model))
    fp8_keys = [k for k, t in scaled.items() if t.dtype == FP8 and k != "scaled_fp8"]
    # each qkv / linear1 splits into 3 / 4 layers, every other fp8 weight is one layer
    splits = sum(3 if ".qkv." in k else 4 if ".linear1." in k else 1 for k in fp8_keys)
    support = FluxTransformer2DModel.declared_capabilities().quantization
    outside = {name for name, m in model.named_modules() if isinstance(m, nn.Linear) and not support.keep.matches(name)}
    assert set(layers) == outside and len(layers) == splits
    assert all(layer.weight.dtype == torch.uint8 and layer.weight.shape == (layer.out_features, layer.in_features)
               for layer in layers.values())
    assert isinstance(layers["transformer_blocks.0.attn.to_k"].codec, ScaledFP8)
    report = quantization.active(model)
    assert report is not None and report.packed == {"scaled_fp8": len(layers)}
    compute = dtype or torch.float32
    assert torch.equal(_run(model, compute), _run(reference, compute))


def test_disable_gives_dense_layers_with_the_same_output(tmp_path: Path) -> None:
    scaled, _ = scaled_fp8_state(tmp_path)
    save_file(scaled, tmp_path / "x.safetensors")
    model = weights.load_single_file(FluxTransformer2DModel, tmp_path / "x.safetensors")
    before = _run(model)
    quantization.disable(model)
    assert not list(packed_linears(model)) and quantization.active(model) is None
    assert model.get_submodule("transformer_blocks.0.attn.to_q").weight.dtype == torch.float32
    assert torch.equal(_run(model), before)


def test_scale_input_is_kept_and_a_kept_modules_fp8_weight_stays_fp8(tmp_path: Path) -> None:
    scaled, dense = scaled_fp8_state(tmp_path, kept_too=True)
    scaled["scaled_fp8"] = torch.zeros(2, dtype=FP8)
    save_file(scaled, tmp_path / "x.safetensors")
    model = weights.load_single_file(FluxTransformer2DModel, tmp_path / "x.safetensors")
    # Flux keeps x_embedder unquantized: diffcaps never quantizes it, but the file's fp8 weight is
    # held as it is (decoding it on load would change no value) and written back byte for byte
    x_embedder = model.get_submodule("x_embedder")
    assert isinstance(x_embedder, PackedLinear)
    assert torch.equal(x_embedder.dense_weight(), dense["img_in.weight"])
    assert isinstance(model.get_submodule("single_transformer_blocks.0.proj_out"), PackedLinear)
    written = load_file(weights.save_single_file(model, tmp_path / "out.safetensors"))
    assert torch.equal(written["img_in.weight"].view(torch.uint8), scaled["img_in.weight"].view(torch.uint8))
    with_input = [k.removesuffix(".scale_input") for k in scaled if k.endswith(".scale_input")]
    codecs = [layer.codec for _, layer in packed_linears(model)]
    held = [c for c in codecs if isinstance(c, ScaledFP8) and c.scale_input is not None]
    assert with_input and held  # scale_input read and held (it plays no part in a CPU forward)


def test_round_trip_writes_marker_fp8_weights_and_scales_bit_exactly(tmp_path: Path) -> None:
    scaled, _ = scaled_fp8_state(tmp_path)
    scaled["scaled_fp8"] = torch.zeros(2, dtype=FP8)  # the marker comes back as it was
    save_file(scaled, tmp_path / "in.safetensors")
    model = weights.load_single_file(FluxTransformer2DModel, tmp_path / "in.safetensors", torch_dtype=torch.bfloat16)
    out = weights.save_single_file(model, tmp_path / "out.safetensors", torch_dtype=torch.bfloat16)
    written = load_file(out)
    assert written.keys() == scaled.keys()
    for key, tensor in scaled.items():
        assert written[key].dtype == tensor.dtype and written[key].shape == tensor.shape, key
        assert torch.equal(written[key].flatten().view(torch.uint8), tensor.flatten().view(torch.uint8)), key
    again = weights.load_single_file(FluxTransformer2DModel, out, torch_dtype=torch.bfloat16)
    assert torch.equal(_run(again, torch.bfloat16), _run(model, torch.bfloat16))


def test_a_prefixed_file_keeps_its_prefix_on_the_marker(tmp_path: Path) -> None:
    scaled, _ = scaled_fp8_state(tmp_path)
    prefix = "model.diffusion_model."
    save_file({prefix + k: v for k, v in scaled.items()}, tmp_path / "in.safetensors")
    model = weights.load_single_file(FluxTransformer2DModel, tmp_path / "in.safetensors")
    out = weights.save_single_file(model, tmp_path / "out.safetensors", prefix=prefix)
    with safe_open(out, "pt") as handle:
        keys = set(handle.keys())
    assert prefix + "scaled_fp8" in keys and prefix + "double_blocks.0.img_attn.qkv.scale_weight" in keys


def test_a_plain_fp8_file_loads_as_weights_cast(tmp_path: Path) -> None:
    state = _original(tmp_path)
    plain = {k: v.to(FP8) if v.ndim == 2 else v for k, v in state.items()}
    save_file(plain, tmp_path / "plain_fp8.safetensors")
    model = weights.load_single_file(FluxTransformer2DModel, tmp_path / "plain_fp8.safetensors")
    assert not list(packed_linears(model)) and quantization.active(model) is None
    to_out = model.get_submodule("transformer_blocks.0.attn.to_out.0")
    assert isinstance(to_out, nn.Linear)
    assert torch.equal(to_out.weight, plain["double_blocks.0.img_attn.proj.weight"].float())


def _bad(tmp_path: Path, edit: str) -> tuple[Path, str]:
    scaled, _ = scaled_fp8_state(tmp_path)
    key = "double_blocks.0.img_attn.proj.scale_weight"
    if edit == "missing":
        del scaled[key]
        named = "double_blocks.0.img_attn.proj.weight"
    elif edit == "non-scalar":
        scaled[key] = torch.ones(3)
        named = key
    elif edit == "stray scale":
        scaled["single_blocks.0.norm.key_norm.scale_weight"] = torch.tensor(1.0)
        named = "single_blocks.0.norm.key_norm.scale_weight"
    else:
        scaled = {k: v.float() if v.dtype == FP8 and k != "scaled_fp8" else v for k, v in scaled.items()
                  if not k.endswith(("scale_weight", "scale_input"))}
        named = "scaled_fp8"
    path = tmp_path / f"{edit.replace(' ', '_')}.safetensors"
    save_file(scaled, path)
    return path, named


@pytest.mark.parametrize("edit", ["missing", "non-scalar", "stray scale", "marker without fp8"])
def test_bad_scaled_files_get_a_named_error(tmp_path: Path, edit: str) -> None:
    path, named = _bad(tmp_path, edit)
    with pytest.raises(CheckpointError) as caught:
        weights.load_single_file(FluxTransformer2DModel, path)
    assert str(path) in str(caught.value) and named in str(caught.value)


def _inspect_rows(path: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, str]:
    assert main(["inspect", str(path)]) == 0
    return dict(line.strip().split(None, 1) for line in capsys.readouterr().out.splitlines()[1:])


def test_inspect_says_scaled_fp8_counts_fp8_weights_per_class_and_the_memory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scaled, _ = scaled_fp8_state(tmp_path)
    path = tmp_path / "x_fp8_scaled.safetensors"
    save_file(scaled, path)
    rows = _inspect_rows(path, capsys)
    # recognised as a checkpoint, marker and scales set aside as loading does
    assert rows["kind"] == "checkpoint" and rows["variant"].startswith("flux-dev")
    assert rows["fit"] == "every tensor has its place in FluxTransformer2DModel"
    fp8 = {k: t for k, t in scaled.items() if t.dtype == FP8 and k != "scaled_fp8"}
    inputs = sum(1 for k in scaled if k.endswith(".scale_input"))
    assert rows["quantized"] == (f"scaled fp8 (float8_e4m3fn): {len(fp8)} fp8 weight(s) with a scale_weight "
                                 f"({inputs} with a scale_input); dtypes by tensor class:")
    assert 0 < inputs < len(fp8)
    # every weight counted once in its class; the fp8 ones in attention, MLP and modulation
    weights_only = {k: t for k, t in scaled.items() if k != "scaled_fp8" and not k.endswith(("scale_weight",
                                                                                              "scale_input"))}
    classes = ("MLP", "attention", "biases", "embeddings", "modulation", "norms", "output")
    listed = [part.rsplit(" ×", 1) for label in classes if label in rows for part in rows[label].split(", ")]
    assert sum(int(count) for _, count in listed) == len(weights_only)
    assert sum(int(count) for kind, count in listed if kind == "float8_e4m3fn") == len(fp8)
    for label in ("attention", "MLP", "modulation"):
        assert "float8_e4m3fn ×" in rows[label], label
    assert "float8" not in rows["embeddings"] and "float8" not in rows["norms"]  # kept / 1-D: not fp8
    packed = sum(t.numel() for t in fp8.values())
    values = sum(t.numel() for t in weights_only.values())
    assert 2 * values < 10**6  # the report's unit is KB for a file this small
    assert rows["memory"] == (f"about {(packed + 2 * (values - packed)) / 1e3:.1f} KB loaded with the fp8 weights "
                              f"kept (the rest in bfloat16); {2 * values / 1e3:.1f} KB dense in bfloat16")
    assert rows["tensors"] == str(len(scaled))


def test_inspect_names_a_broken_scaled_fp8_file_and_a_plain_file_has_no_quantization_row(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, named = _bad(tmp_path, "missing")
    rows = _inspect_rows(path, capsys)
    assert rows["quantized"].startswith("scaled fp8, but 1 fp8 tensor(s) without their scale_weight: ")
    assert named in rows["quantized"]
    plain = weights.save_single_file(seeded_model(CONFIG), tmp_path / "plain.safetensors")
    assert "quantized" not in _inspect_rows(plain, capsys)
