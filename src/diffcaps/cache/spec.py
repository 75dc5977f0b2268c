"""What a model author declares for the inference caches: where blocks, attention and output are.

A model's capabilities hold one :class:`CacheSupport`. Block caches (First Block Cache,
MagCache) need ``blocks``: one :class:`BlockList` per ``nn.ModuleList`` of transformer blocks,
in the order the forward runs them, saying which forward parameters carry the hidden states
and what each block returns. Attention caches (Pyramid Attention Broadcast, FasterCache,
TaylorSeer) need ``attention``: the attention module classes. The model's forward must
return an object with the prediction in the attribute ``sample_field`` (``.sample`` by
default), laid out as ``sample_format``::

    cache: CacheSupport = capability(CacheSupport(
        blocks=(BlockList(path="blocks"),),
        attention=ModuleTypes((MyAttention,)),
    ))
"""

from diffcaps.cache._service import (
    SAMPLE_FORMATS as SAMPLE_FORMATS,
    BlockList as BlockList,
    CacheSupport as CacheSupport,
)

__all__ = ["BlockList", "CacheSupport", "SAMPLE_FORMATS"]
