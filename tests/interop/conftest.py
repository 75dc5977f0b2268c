"""Tiny seeded pipeline folders, built once per test session (no hub, no network)."""

from __future__ import annotations

from pathlib import Path

import pytest

from diffcaps.interop.diffusers._tiny import tiny_flux_pipeline_folder


@pytest.fixture(scope="session")
def flux_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A FluxPipeline folder: tiny CLIP/T5/VAE and a diffcaps Flux saved in diffusers' layout."""
    return tiny_flux_pipeline_folder(tmp_path_factory.mktemp("flux") / "pipeline")
