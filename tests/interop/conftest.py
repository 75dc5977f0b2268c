"""Tiny seeded pipeline folders, built once per test session (no hub, no network)."""

from __future__ import annotations

from pathlib import Path

import pytest

from diffcaps.interop.diffusers._tiny import tiny_flux_pipeline_folder, tiny_wan_pipeline_folder


@pytest.fixture(scope="session")
def flux_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A FluxPipeline folder: tiny CLIP/T5/VAE and a diffcaps Flux saved in diffusers' layout."""
    return tiny_flux_pipeline_folder(tmp_path_factory.mktemp("flux") / "pipeline")


@pytest.fixture(scope="session")
def wan_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A WanPipeline folder: tiny UMT5 and Wan VAE, a diffcaps Wan saved in diffusers' layout."""
    return tiny_wan_pipeline_folder(tmp_path_factory.mktemp("wan") / "pipeline")


@pytest.fixture(scope="session")
def wan_i2v_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A WanImageToVideoPipeline folder: the same with a CLIP vision encoder and an I2V transformer."""
    return tiny_wan_pipeline_folder(tmp_path_factory.mktemp("wan-i2v") / "pipeline", image_to_video=True)
