"""What a model author declares for gradient checkpointing: the blocks recomputed in backward."""

from diffcaps.checkpointing._service import GradientCheckpointing as GradientCheckpointing

__all__ = ["GradientCheckpointing"]
