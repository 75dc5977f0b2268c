"""The Wan 2.1 / 2.2 video transformer and its capabilities."""

from diffcaps.models.wan._config import WanConfig as WanConfig
from diffcaps.models.wan.model import (
    WanCapabilities as WanCapabilities,
    WanOutput as WanOutput,
    WanTransformer3DModel as WanTransformer3DModel,
)

__all__ = ["WanCapabilities", "WanConfig", "WanOutput", "WanTransformer3DModel"]
