"""Every Flux LoRA format, written as its trainer writes it, loads with the expected effect per module."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from diffcaps import lora
from diffcaps.errors import FormatError
from diffcaps.models.flux import FluxTransformer2DModel
from tests.flux_fixtures import TINY, flux_inputs, seeded_model, seeded_state
from tests.lora._check import base_weight, fingerprint, merged_state, reference_model
from tests.lora._files import (
    LoraFile,
    bfl_control_file,
    bfl_modules,
    diffusers_style,
    fal_kontext_file,
    kohya_style,
    linears,
    loha_file,
    module,
    lokr_file,
    text_encoder_keys,
    xlabs_file,
)


def _flat(prefix: str) -> Callable[[str], str]:
    return lambda name: prefix + name.replace(".", "_")


def _with_te(file: LoraFile, *prefixes: str) -> LoraFile:
    for prefix in prefixes:
        text_encoder_keys(file, prefix)
    return file


_BFL = bfl_modules(2, 2)
_LYCORIS_MODULES = {name: _BFL[name] for name in (
    "double_blocks.0.img_attn.qkv", "single_blocks.1.linear1", "final_layer.adaLN_modulation.1", "txt_in",
    "double_blocks.1.img_mlp.2",
)}
_DIFFUSERS_MODULES = {p: [p] for p in ("transformer_blocks.0.attn.to_q", "single_transformer_blocks.1.proj_mlp",
                                       "proj_out", "transformer_blocks.1.ff.net.0.proj")}

Builder = Callable[[FluxTransformer2DModel], LoraFile]

CASES: dict[str, tuple[str, Builder]] = {
    "diffusers": ("diffusers", lambda m: diffusers_style(m, seed=1, key=lambda p: f"transformer.{p}", alpha_every=3)),
    "diffusers-unprefixed": ("diffusers", lambda m: diffusers_style(m, seed=2, key=lambda p: p)),
    "diffusers-lora-down-up": ("diffusers", lambda m: diffusers_style(
        m, seed=3, key=lambda p: f"transformer.{p}", down="lora_down", up="lora_up")),
    "peft-model": ("diffusers", lambda m: diffusers_style(m, seed=4, key=lambda p: f"base_model.model.{p}")),
    "onetrainer": ("onetrainer", lambda m: _with_te(diffusers_style(
        m, seed=5, key=_flat("lora_transformer_"), down="lora_down", up="lora_up", alpha_every=1), "lora_te1_")),
    "kohya": ("kohya", lambda m: _with_te(kohya_style(m, seed=6, key=_flat("lora_unet_")), "lora_te1_", "lora_te3_")),
    "kohya-split-qkv": ("kohya", lambda m: kohya_style(m, seed=7, key=_flat("lora_unet_"), block_diagonal=True)),
    "kohya-no-alpha": ("kohya", lambda m: kohya_style(m, seed=8, key=_flat("lora_unet_"), alpha=False)),
    "comfyui": ("comfyui", lambda m: kohya_style(m, seed=9, key=lambda b: f"diffusion_model.{b}")),
    "comfyui-lora-a-b": ("comfyui", lambda m: kohya_style(
        m, seed=10, key=lambda b: f"diffusion_model.{b}", down="lora_A", up="lora_B", alpha=False)),
    "original-layout-peft": ("comfyui", lambda m: kohya_style(
        m, seed=11, key=lambda b: b, down="lora_A", up="lora_B", alpha=False)),
    "xlabs-partial-depth": ("xlabs", lambda m: xlabs_file(m, seed=12, doubles=[1], singles=[0])),
    "xlabs-prefixed": ("xlabs", lambda m: xlabs_file(m, seed=13, doubles=[0, 1], singles=[0, 1],
                                                     prefix="diffusion_model.")),
    "bfl-control": ("bfl-control", lambda m: bfl_control_file(m, seed=14, in_channels=2 * TINY.in_channels)),
    "fal-kontext": ("fal-kontext", lambda m: fal_kontext_file(m, seed=15)),
    "lokr-kohya": ("lycoris", lambda m: lokr_file(
        m, seed=16, key=_flat("lora_unet_"), modules=_LYCORIS_MODULES, decompose=True,
        w1_rows={"double_blocks.0.img_attn.qkv": 3, "single_blocks.1.linear1": 7})),
    "lokr-kohya-unaligned": ("lycoris", lambda m: lokr_file(
        m, seed=17, key=_flat("lora_unet_"), modules=_LYCORIS_MODULES, decompose=True,
        w1_rows={"final_layer.adaLN_modulation.1": 1})),
    "lokr-full-factors": ("lycoris", lambda m: lokr_file(
        m, seed=18, key=lambda b: f"diffusion_model.{b}", modules=_LYCORIS_MODULES, decompose=False,
        w1_rows={"double_blocks.0.img_attn.qkv": 3})),
    "lokr-diffusers": ("lycoris", lambda m: lokr_file(
        m, seed=19, key=lambda p: f"transformer.{p}", modules=_DIFFUSERS_MODULES, decompose=True, w1_rows={})),
    "loha-kohya": ("lycoris", lambda m: loha_file(m, seed=20, key=_flat("lora_unet_"), modules=_LYCORIS_MODULES)),
    "loha-onetrainer": ("lycoris", lambda m: loha_file(
        m, seed=21, key=_flat("lora_transformer_"), modules=_DIFFUSERS_MODULES)),
}


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return seeded_state(FluxTransformer2DModel.from_config(TINY))


@pytest.mark.parametrize("case", sorted(CASES))
def test_format_loads_with_the_expected_effect(case: str, state: dict[str, torch.Tensor], tmp_path: Path) -> None:
    expected_format, build = CASES[case]
    model = seeded_model(TINY)
    file = build(model)
    before = fingerprint(model)

    report = lora.load_adapter(model, file.save(tmp_path / f"{case}.safetensors"), adapter_name="x")

    assert report.format == expected_format
    assert set(report.skipped) == file.skipped
    assert set(report.used) == set(file.tensors) - file.skipped
    assert set(report.targets) == set(file.deltas)
    assert set(report.patched) == set(file.replaced)
    # the unfused peft layers act like a model whose weights were updated by hand
    reference = reference_model(TINY, state, file)
    inputs = flux_inputs(reference.config)
    with torch.no_grad():
        expected = reference(**inputs).sample
        torch.testing.assert_close(model(**inputs).sample, expected, atol=2e-5, rtol=0)
    # fused, every linear weight is exactly W + scale·ΔW (computed independently, in fp64)
    lora.fuse(model)
    merged = merged_state(state, file)
    for path in linears(FluxTransformer2DModel.from_config(TINY)):
        torch.testing.assert_close(base_weight(model, path), merged[f"{path}.weight"], atol=1e-6, rtol=0)
        torch.testing.assert_close(base_weight(model, path, "bias"), merged[f"{path}.bias"], atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).sample, expected, atol=2e-5, rtol=0)
    # and unload puts everything back
    lora.unload(model)
    assert fingerprint(model) == before


def test_text_encoder_only_file_is_reported_not_loaded(tmp_path: Path) -> None:
    model = seeded_model(TINY)
    file = LoraFile(tensors={})
    text_encoder_keys(file, "lora_te1_")
    with pytest.raises(FormatError, match="no tensor adapts FluxTransformer2DModel") as caught:
        lora.load_adapter(model, file.save(tmp_path / "te.safetensors"))
    # the error says why each tensor was skipped: one line per reason, a few keys each
    message = str(caught.value)
    assert "text-encoder tensor: diffcaps adapts the transformer only: lora_te1_" in message
    assert f"the {len(file.skipped)} tensor(s) were skipped" in message


def test_nothing_adapted_lists_each_reason(tmp_path: Path) -> None:
    model = seeded_model(TINY)
    file = LoraFile(tensors={})
    text_encoder_keys(file, "lora_te1_")
    file.tensors["transformer.transformer_blocks.9.attn.to_q.lora_A.weight"] = torch.zeros(2, 4)
    file.tensors["transformer.transformer_blocks.9.attn.to_q.lora_B.weight"] = torch.zeros(4, 2)
    with pytest.raises(FormatError) as caught:
        lora.load_adapter(model, file.save(tmp_path / "mixed.safetensors"), strict=False)
    message = str(caught.value)
    assert "text-encoder tensor" in message
    assert "'transformer.transformer_blocks.9.attn.to_q' names no module of the model: " \
           "transformer.transformer_blocks.9.attn.to_q.lora_A.weight" in message


def test_header_metadata_sets_alpha_per_module(tmp_path: Path) -> None:
    import json

    model = seeded_model(TINY)
    paths = ["transformer_blocks.0.attn.to_q", "proj_out", "single_transformer_blocks.0.proj_out"]
    file = diffusers_style(model, seed=30, key=lambda p: f"transformer.{p}", paths=paths, rank=4)
    config = {"transformer.r": 4, "transformer.lora_alpha": 8.0,
              "transformer.alpha_pattern": {"^proj_out": 2.0}, "transformer.target_modules": paths}
    file.metadata = {"format": "pt", "lora_adapter_metadata": json.dumps(config)}
    lora.load_adapter(model, file.save(tmp_path / "meta.safetensors"))
    lora.fuse(model)
    state = seeded_state(FluxTransformer2DModel.from_config(TINY))
    for path in paths:
        rank = file.tensors[f"transformer.{path}.lora_A.weight"].shape[0]
        alpha = 2.0 if path == "proj_out" else 8.0
        expected = state[f"{path}.weight"].double() + file.deltas[path] * (alpha / rank)
        torch.testing.assert_close(base_weight(model, path), expected.float(), atol=1e-6, rtol=0)


def test_comfyui_weight_patches(tmp_path: Path) -> None:
    """ComfyUI's ``.diff`` / ``.diff_b`` / ``.set_weight``: whole-tensor patches on original names."""
    model = seeded_model(TINY)
    state = seeded_state(FluxTransformer2DModel.from_config(TINY))
    before = fingerprint(model)
    # a LoRA already on proj_out: the patch goes to the base layer under the peft layer
    lora.load_adapter(model, diffusers_style(model, seed=39, key=lambda p: f"transformer.{p}",
                                             paths=["proj_out"]).save(tmp_path / "lora.safetensors"), adapter_name="l")
    lora.set_adapters(model, "l", 0.0)
    generator = torch.Generator().manual_seed(40)
    qkv_bias = torch.randn(96, generator=generator)
    out_diff = torch.randn(TINY.in_channels, 32, generator=generator)
    mod_weight = torch.randn(96, 32, generator=generator)
    file = LoraFile(tensors={
        "diffusion_model.double_blocks.0.img_attn.qkv.diff_b": qkv_bias,
        "diffusion_model.final_layer.linear.diff": out_diff,
        "diffusion_model.single_blocks.1.modulation.lin.set_weight": mod_weight,
    })
    report = lora.load_adapter(model, file.save(tmp_path / "patch.safetensors"))
    assert report.kind == "patch" and report.targets == ()
    lora.set_adapters(model, "l", 0.0)  # only the patches act: compare weights once fused
    assert set(report.patched) == {"transformer_blocks.0.attn.to_q.bias", "transformer_blocks.0.attn.to_k.bias",
                                   "transformer_blocks.0.attn.to_v.bias", "proj_out.weight",
                                   "single_transformer_blocks.1.norm.linear.weight"}
    for i, name in enumerate(("to_q", "to_k", "to_v")):
        torch.testing.assert_close(base_weight(model, f"transformer_blocks.0.attn.{name}", "bias"),
                                   state[f"transformer_blocks.0.attn.{name}.bias"] + qkv_bias[32 * i:32 * (i + 1)])
    torch.testing.assert_close(base_weight(model, "proj_out"), state["proj_out.weight"] + out_diff)
    assert torch.equal(base_weight(model, "single_transformer_blocks.1.norm.linear"), mod_weight)
    lora.fuse(model)  # the LoRA at weight 0 leaves the patched weight as it is
    torch.testing.assert_close(base_weight(model, "proj_out"), state["proj_out.weight"] + out_diff)
    lora.unload(model)
    assert fingerprint(model) == before


def test_report_reads_well(tmp_path: Path) -> None:
    model = seeded_model(TINY)
    file = _with_te(kohya_style(model, seed=41, key=_flat("lora_unet_")), "lora_te1_")
    report = lora.load_adapter(model, file.save(tmp_path / "k.safetensors"), adapter_name="k")
    text = str(report)
    assert "kohya (lora) as adapter 'k'" in text
    assert f"{len(file.deltas)} module(s) adapted" in text
    assert "skipped lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha: text-encoder tensor" in text


def test_lokr_cut_through_its_factor_becomes_an_equivalent_loha(tmp_path: Path) -> None:
    model = seeded_model(TINY)
    _, aligned = CASES["lokr-kohya"]
    report = lora.load_adapter(model, aligned(model).save(tmp_path / "a.safetensors"), adapter_name="a")
    assert report.kind == "lokr" and not report.notes
    assert type(model.get_submodule("transformer_blocks.0.attn.to_q")).__module__.startswith("peft.tuners.lokr")
    _, unaligned = CASES["lokr-kohya-unaligned"]
    lora.unload(model)
    report = lora.load_adapter(model, unaligned(model).save(tmp_path / "u.safetensors"), adapter_name="u")
    assert report.kind == "loha" and "equivalent LoHa" in report.notes[0]
    layer = module(model, "single_transformer_blocks.1.proj_mlp")
    assert type(layer).__module__.startswith("peft.tuners.loha")
    # rank max(columns of the full w1 = 2, LoKr rank 2): small factors, no dense delta
    assert layer.hada_w1_a["u"].shape == (4 * TINY.inner_dim, 2)
