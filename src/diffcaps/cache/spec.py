"""What a model author declares for the inference caches: where blocks, attention and output are."""

from diffcaps.cache._service import BlockList as BlockList, CacheSupport as CacheSupport

__all__ = ["BlockList", "CacheSupport"]
