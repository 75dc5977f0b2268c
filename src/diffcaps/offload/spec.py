"""What a model author declares for group offloading: the block lists that move group by group."""

from diffcaps.offload._service import GroupOffloading as GroupOffloading

__all__ = ["GroupOffloading"]
