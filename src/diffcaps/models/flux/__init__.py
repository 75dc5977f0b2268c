"""The Flux transformer and its capabilities."""

from diffcaps.models.flux._config import FluxConfig as FluxConfig
from diffcaps.models.flux.model import (
    FluxCapabilities as FluxCapabilities,
    FluxOutput as FluxOutput,
    FluxTransformer2DModel as FluxTransformer2DModel,
)

__all__ = ["FluxCapabilities", "FluxConfig", "FluxOutput", "FluxTransformer2DModel"]
