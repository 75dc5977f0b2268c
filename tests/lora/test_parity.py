"""Parity with diffusers: the same file, loaded into diffcaps and into diffusers' Flux, gives the same output.

Only files diffusers loads correctly are compared (see ``CASES``): its Flux converters
hard-code FLUX.1's 3072 width and 19/38 blocks for kohya ``linear1``, BFL control and fal
Kontext files, drop kohya's non-block modules (``img_in``, ``time_in``, ``final_layer``, …),
map only OneTrainer's attention sub-modules, and apply a diffusers-format file's alphas by
suffix (``proj_out``'s alpha also lands on every single block's ``proj_out``; modules without
an alpha get the most common one). Those are covered against independent
expectations in ``test_formats.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from diffcaps import lora
from diffcaps.models.flux import FluxTransformer2DModel
from tests.flux_fixtures import TINY, diffusers_flux, flux_inputs, seeded_model, seeded_state
from tests.lora._files import LoraFile, bfl_modules, diffusers_style, kohya_style, linears, xlabs_file

_BLOCK_MODULES = [name for name in bfl_modules(2, 2)
                  if name.startswith(("double_blocks", "single_blocks")) and not name.endswith("linear1")]
_ONETRAINER_PATHS = [
    "transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.1.attn.to_v",
    "transformer_blocks.0.attn.add_q_proj", "transformer_blocks.1.attn.to_out.0", "transformer_blocks.0.attn.to_add_out",
    "single_transformer_blocks.0.attn.to_q", "single_transformer_blocks.1.attn.to_v", "proj_out", "x_embedder",
    "context_embedder", "norm_out.linear",
]


def _flat(prefix: str) -> Callable[[str], str]:
    return lambda name: prefix + name.replace(".", "_")


def _all_but_top_proj_out(model: FluxTransformer2DModel) -> list[str]:
    # diffusers turns an ``.alpha`` on top-level ``proj_out`` into a peft pattern that also
    # matches every ``single_transformer_blocks.N.proj_out`` (suffix matching), so that one
    # module is left out of the comparison (test_formats checks it).
    return [p for p in linears(model) if p != "proj_out"]


CASES: dict[str, Callable[[FluxTransformer2DModel], LoraFile]] = {
    "diffusers": lambda m: diffusers_style(m, seed=41, key=lambda p: f"transformer.{p}", alpha_every=1,
                                           paths=_all_but_top_proj_out(m)),
    "diffusers-no-alpha": lambda m: diffusers_style(m, seed=48, key=lambda p: f"transformer.{p}"),
    "kohya": lambda m: kohya_style(m, seed=42, key=_flat("lora_unet_"), modules=_BLOCK_MODULES),
    "kohya-split-qkv": lambda m: kohya_style(m, seed=43, key=_flat("lora_unet_"), modules=_BLOCK_MODULES,
                                             block_diagonal=True),
    "comfyui": lambda m: kohya_style(m, seed=44, key=lambda b: f"diffusion_model.{b}", modules=_BLOCK_MODULES),
    "onetrainer": lambda m: diffusers_style(m, seed=45, key=_flat("lora_transformer_"), down="lora_down",
                                            up="lora_up", alpha_every=1, paths=_ONETRAINER_PATHS),
    "xlabs-partial-depth": lambda m: xlabs_file(m, seed=46, doubles=[1], singles=[0, 1]),
}


def _diffusers_loaded(path: Path, state: dict[str, torch.Tensor]) -> Any:
    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin

    model = diffusers_flux(TINY, state)
    converted, alphas, metadata = FluxLoraLoaderMixin.lora_state_dict(
        str(path.parent), weight_name=path.name, return_alphas=True, return_lora_metadata=True)
    transformer = {k: v for k, v in converted.items() if k.startswith("transformer.")}
    alphas = {k: v for k, v in (alphas or {}).items() if k.startswith("transformer.")} or None
    model.load_lora_adapter(transformer, prefix="transformer", network_alphas=alphas, metadata=metadata,
                            adapter_name="x")
    return model


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return seeded_state(FluxTransformer2DModel.from_config(TINY))


@pytest.mark.parametrize("case", sorted(CASES))
def test_output_matches_diffusers(case: str, state: dict[str, torch.Tensor], tmp_path: Path) -> None:
    model = seeded_model(TINY)
    path = CASES[case](model).save(tmp_path / f"{case}.safetensors")
    lora.load_adapter(model, path, adapter_name="x")
    oracle = _diffusers_loaded(path, state)
    inputs = flux_inputs(TINY)
    with torch.no_grad():
        base = seeded_model(TINY)(**inputs).sample
        ours = model(**inputs).sample
        assert (ours - base).abs().max() > 1e-3  # the adapter does something
        torch.testing.assert_close(ours, oracle(**inputs).sample, atol=1e-5, rtol=0, msg="weight 1.0")

        lora.set_adapters(model, "x", 0.5)
        oracle.set_adapters(["x"], weights=[0.5])
        torch.testing.assert_close(model(**inputs).sample, oracle(**inputs).sample, atol=1e-5, rtol=0,
                                   msg="weight 0.5")

        lora.set_adapters(model, "x", 1.0)
        oracle.set_adapters(["x"], weights=[1.0])
        lora.fuse(model)
        oracle.fuse_lora(lora_scale=1.0, adapter_names=["x"])
        torch.testing.assert_close(model(**inputs).sample, oracle(**inputs).sample, atol=1e-5, rtol=0,
                                   msg="fused")


def test_saved_diffusers_layout_loads_in_diffusers(state: dict[str, torch.Tensor], tmp_path: Path) -> None:
    model = seeded_model(TINY)
    source = kohya_style(model, seed=47, key=_flat("lora_unet_"), block_diagonal=True)
    lora.load_adapter(model, source.save(tmp_path / "in.safetensors"), adapter_name="x")
    saved = lora.save_adapter(model, tmp_path / "out.safetensors", "x", layout="diffusers")
    oracle = _diffusers_loaded(saved, state)
    inputs = flux_inputs(TINY)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).sample, oracle(**inputs).sample, atol=1e-5, rtol=0)
