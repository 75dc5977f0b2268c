"""Gradient checkpointing: the model's declared blocks recompute activations in backward."""

from diffcaps.checkpointing._functions import disable as disable, enable as enable, is_enabled as is_enabled
from diffcaps.checkpointing._service import GradientCheckpointing as GradientCheckpointing

__all__ = ["GradientCheckpointing", "disable", "enable", "is_enabled"]
