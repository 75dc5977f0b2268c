"""What a model author declares for single-file checkpoints: the mapper and its table's pieces."""

from diffcaps.weights._service import WeightMapper as WeightMapper

__all__ = ["WeightMapper"]
