"""``pipe.load_lora_weights`` of a file diffusers' Flux converter rewrites (kohya, ComfyUI, XLabs).

diffusers converts such a file before its transformer sees it, with converters that hard-code
FLUX.1's widths (3072) and drop kohya's top-level modules. The view loads what diffusers'
transformer loads, so the model computes what diffusers' does, and warns that
``interop.diffusers.load_lora_weights(pipe, file)`` reads the file exactly. The model here is
FLUX.1-wide with one double and one single block; outputs are compared on fixed inputs
(the pipeline only loads the file), against diffusers' transformer in its own pipeline.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import FluxPipeline

from diffcaps import lora
from diffcaps.interop.diffusers import ConvertedLoRAWarning, load_lora_weights, unwrap, wrap
from diffcaps.models.flux import FluxConfig, FluxTransformer2DModel
from tests.flux_fixtures import diffusers_flux, flux_inputs, seeded_model
from tests.lora._files import LoraFile, bfl_modules, kohya_style, xlabs_file

WIDE = FluxConfig(num_layers=1, num_single_layers=1, attention_head_dim=128, num_attention_heads=24,
                  joint_attention_dim=32, pooled_projection_dim=32, in_channels=16, guidance_embeds=True)
"""FLUX.1's width (24 heads of 128), one block of each kind, the tiny pipeline's text widths."""

_TOP = ("x_embedder", "context_embedder", *(f"time_text_embed.{part}_embedder.linear_{i}"
                                            for part in ("timestep", "text", "guidance") for i in (1, 2)),
        "proj_out", "norm_out.linear")
"""The modules outside the blocks (kohya's img_in, txt_in, time_in, vector_in, guidance_in, final_layer):
diffusers' converter names them without the ``transformer.`` prefix, so its transformer drops them."""


def _pipeline(transformer: Any) -> Any:
    # load_lora_weights needs only the transformer (the file has no text-encoder tensors)
    build: Any = FluxPipeline
    return build(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                 tokenizer_2=None, transformer=transformer)


def _kohya(model: FluxTransformer2DModel) -> LoraFile:
    return kohya_style(model, seed=5, key=lambda name: "lora_unet_" + name.replace(".", "_"),
                       num_double=1, num_single=1)


def _comfyui(model: FluxTransformer2DModel) -> LoraFile:
    blocks = [m for m in bfl_modules(1, 1) if m.startswith(("double", "single"))]
    return kohya_style(model, seed=9, key=lambda name: "diffusion_model." + name, num_double=1, num_single=1,
                       modules=blocks)


def _xlabs(model: FluxTransformer2DModel) -> LoraFile:
    return xlabs_file(model, seed=13, doubles=[0], singles=[0])


FILES: dict[str, tuple[Callable[[FluxTransformer2DModel], LoraFile], tuple[str, ...]]] = {
    "kohya": (_kohya, _TOP),
    "comfyui": (_comfyui, ()),
    "xlabs": (_xlabs, ()),
}
"""Each file and the modules diffusers' converter drops from it."""


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[FluxTransformer2DModel, Any]]:
    ours = seeded_model(WIDE, seed=2)
    yield ours, diffusers_flux(WIDE, ours.state_dict())


def _out(model: Any) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model(**flux_inputs(WIDE, height=4, width=4), return_dict=False)[0]
    return out


@pytest.mark.filterwarnings("ignore:.*unexpected keys:UserWarning")
@pytest.mark.parametrize("case", list(FILES))
def test_a_converted_file_loads_as_diffusers_loads_it(case: str, pair: tuple[FluxTransformer2DModel, Any],
                                                      tmp_path: Path) -> None:
    model, theirs = pair
    build, dropped = FILES[case]
    path = build(model).save(tmp_path / f"{case}.safetensors")
    ours = _pipeline(wrap(model))
    reference = _pipeline(theirs)
    base = _out(ours.transformer)
    with pytest.warns(ConvertedLoRAWarning, match=r"load_lora_weights\(pipe, file, adapter_name='x'\)") as seen:
        ours.load_lora_weights(path, adapter_name="x")
    reference.load_lora_weights(path, adapter_name="x")
    try:
        message = str(seen[0].message)
        assert seen[0].filename == __file__  # points at the caller's line
        named = message.split("so does this load: ", 1)[-1].split(". ", 1)[0] if dropped else ""
        assert sorted(named.split(", ")) == sorted(dropped) if dropped else "drops" not in message
        assert lora.list_adapters(unwrap(ours.transformer)) == ("x",)
        loaded, expected = _out(ours.transformer), _out(reference.transformer)
        assert (expected - base).abs().max() > 1e-2  # the adapter does something
        scale = expected.abs().max().item()
        assert (loaded - expected).abs().max().item() <= 1e-5 * max(1.0, scale)
    finally:
        ours.unload_lora_weights()
        reference.unload_lora_weights()
    if dropped:
        # read directly, the file's top-level modules load too: another (the file's own) result
        load_lora_weights(ours, path, adapter_name="direct")
        assert (_out(ours.transformer) - loaded).abs().max() > 1e-3
        ours.unload_lora_weights()
    assert torch.equal(_out(ours.transformer), base)
