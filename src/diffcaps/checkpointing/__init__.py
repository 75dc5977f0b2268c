"""Gradient checkpointing: ``enable(model, CheckpointingConfig())``, ``disable(model)``, ``active(model)``."""

from diffcaps.checkpointing._config import CheckpointingConfig as CheckpointingConfig
from diffcaps.checkpointing._functions import active as active, disable as disable, enable as enable

__all__ = ["CheckpointingConfig", "active", "disable", "enable"]
