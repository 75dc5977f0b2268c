"""Flux pipelines generate the same latents and images with a wrapped diffcaps model as with diffusers'."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import PIL.Image
import pytest
import torch
from diffusers import (
    FluxControlPipeline,
    FluxFillPipeline,
    FluxImg2ImgPipeline,
    FluxKontextPipeline,
    FluxPipeline,
)

from diffcaps.interop.diffusers import wrap
from diffcaps.interop.diffusers._tiny import TINY_FLUX_CONFIG
from diffcaps.models.flux import FluxConfig, FluxTransformer2DModel
from tests.flux_fixtures import seeded_model
from tests.interop.pipelines import FLUX_CALL, assert_same, diffusers_twin, generate


@pytest.fixture(scope="module")
def base(flux_folder: Path) -> Any:
    """The tiny FluxPipeline with diffusers' transformer: the text encoders and VAE every test shares."""
    return FluxPipeline.from_pretrained(flux_folder)


@pytest.fixture(scope="module")
def ours(flux_folder: Path) -> Any:
    """The same folder, its transformer loaded by diffcaps and handed over wrapped."""
    model = FluxTransformer2DModel.from_pretrained(flux_folder / "transformer")
    return FluxPipeline.from_pretrained(flux_folder, transformer=wrap(model))


def _image(seed: int, size: int = 32) -> PIL.Image.Image:
    pixels = torch.randint(0, 256, (size, size, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    return PIL.Image.fromarray(pixels.numpy())


@pytest.mark.parametrize("options", [
    pytest.param({"prompt": "a photo of a cat", "guidance_scale": 3.5}, id="guidance"),
    pytest.param({"prompt": ["a red house", "a small dog in the sea"], "num_images_per_prompt": 2,
                  "guidance_scale": 2.0}, id="two-prompts-two-images"),
    pytest.param({"prompt": "a photo of a cat", "negative_prompt": "a blue sky", "true_cfg_scale": 2.5},
                 id="true-cfg"),
])
def test_flux_pipeline(base: Any, ours: Any, options: dict[str, Any]) -> None:
    assert_same(generate(ours, **options, **FLUX_CALL), generate(base, **options, **FLUX_CALL))


def test_flux_pipeline_in_bfloat16_is_equal(flux_folder: Path) -> None:
    theirs = FluxPipeline.from_pretrained(flux_folder, torch_dtype=torch.bfloat16)
    model = FluxTransformer2DModel.from_pretrained(flux_folder / "transformer", torch_dtype=torch.bfloat16)
    # from_pipe casts every component to its torch_dtype, float32 unless told
    mine = FluxPipeline.from_pipe(theirs, transformer=wrap(model), torch_dtype=torch.bfloat16)
    assert model.x_embedder.weight.dtype == torch.bfloat16
    options = {"prompt": "a photo of a cat", "negative_prompt": "a dog", "true_cfg_scale": 2.0, **FLUX_CALL}
    assert_same(generate(mine, **options), generate(theirs, **options), tolerance=0.0)


def test_flux_pipeline_to_bfloat16_casts_like_diffusers(flux_folder: Path) -> None:
    theirs = FluxPipeline.from_pretrained(flux_folder).to(torch.bfloat16)
    model = FluxTransformer2DModel.from_pretrained(flux_folder / "transformer")
    mine = FluxPipeline.from_pretrained(flux_folder, transformer=wrap(model)).to(torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    options = {"prompt": "a photo of a cat", "guidance_scale": 3.5, **FLUX_CALL}
    assert_same(generate(mine, **options), generate(theirs, **options), tolerance=0.0)


def _widened(in_channels: int) -> FluxConfig:
    # Fill and Control take more channels in than they predict; the VAE's packed latents stay 16
    return attrs.evolve(TINY_FLUX_CONFIG, in_channels=in_channels, out_channels=TINY_FLUX_CONFIG.in_channels)


@pytest.mark.parametrize(("pipeline_class", "config", "options"), [
    pytest.param(FluxImg2ImgPipeline, TINY_FLUX_CONFIG, {"image": _image(1), "strength": 0.7}, id="img2img"),
    # latents 16 + masked image latents 16 + the mask, 2×2 pixels per latent packed 2×2: 16
    pytest.param(FluxFillPipeline, _widened(48), {"image": _image(2), "mask_image": _image(3).convert("L"),
                                                  "guidance_scale": 30.0}, id="fill"),
    pytest.param(FluxKontextPipeline, TINY_FLUX_CONFIG, {"image": _image(4), "_auto_resize": False, "max_area": 32 * 32,
                                                         "guidance_scale": 2.5}, id="kontext"),
    # latents 16 + control image latents 16
    pytest.param(FluxControlPipeline, _widened(32), {"control_image": _image(5), "guidance_scale": 10.0},
                 id="control"),
])
def test_flux_image_pipelines(base: Any, tmp_path: Path, pipeline_class: Any, config: FluxConfig,
                              options: dict[str, Any]) -> None:
    model = seeded_model(config)
    theirs = pipeline_class.from_pipe(base, transformer=diffusers_twin(model, tmp_path / "transformer"))
    mine = pipeline_class.from_pipe(base, transformer=wrap(model))
    call = {"prompt": "a painting of a tree", **options, **FLUX_CALL}
    assert_same(generate(mine, **call), generate(theirs, **call))


def test_flux_control_pipeline_with_a_128_channel_model(tmp_path: Path) -> None:
    """FLUX.1 Control's shape: 16 latent channels packed 2×2 (64) plus the control image's 64."""
    from diffcaps.interop.diffusers import tiny_flux_pipeline_folder

    config = attrs.evolve(TINY_FLUX_CONFIG, in_channels=128, out_channels=64)
    folder = tiny_flux_pipeline_folder(tmp_path / "control", config=config)
    theirs = FluxControlPipeline.from_pretrained(folder)
    assert theirs.transformer.config.in_channels == 128 and theirs.vae.config.latent_channels == 16
    model = FluxTransformer2DModel.from_pretrained(folder / "transformer")
    mine = FluxControlPipeline.from_pretrained(folder, transformer=wrap(model))
    call = {"prompt": "a painting of a tree", "control_image": _image(5), "guidance_scale": 10.0, **FLUX_CALL}
    assert_same(generate(mine, **call), generate(theirs, **call))
