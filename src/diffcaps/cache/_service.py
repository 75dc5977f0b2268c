"""``CacheSupport``: what a model tells the inference caches about itself.

A model declares where its transformer blocks are and how they are called, which modules
are attention, and where its output prediction sits. The caches work from this data alone
and never name a model class.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final, final

import attrs

from diffcaps.services import ModuleTypes
from diffcaps.errors import CacheError

__all__ = [
    "ATTENTION_CACHES",
    "BLOCK_CACHES",
    "BlockList",
    "CacheSupport",
    "ENCODER_HIDDEN_STATES",
    "HIDDEN_STATES",
    "SAMPLE_FORMATS",
]

HIDDEN_STATES: Final = "hidden_states"
ENCODER_HIDDEN_STATES: Final = "encoder_hidden_states"
_ROLES: Final = (HIDDEN_STATES, ENCODER_HIDDEN_STATES)

BLOCK_CACHES: Final = ("first_block_cache", "mag_cache")
"""Caches that skip whole runs of transformer blocks: they need ``blocks``."""
ATTENTION_CACHES: Final = ("faster_cache", "pyramid_attention_broadcast", "taylorseer_cache")
"""Caches that reuse or predict attention outputs: they need ``attention``."""

SAMPLE_FORMATS: Final = ("BSC", "BCHW", "BFCHW", "BCFHW")
"""Layouts of a model's output: a token sequence, an image, or a video (frames, channels)."""


def _names(value: Iterable[str]) -> tuple[str, ...]:
    return tuple(value)


def _block_lists(value: Iterable[BlockList]) -> tuple[BlockList, ...]:
    return tuple(value)


def _check_outputs(_: object, attribute: attrs.Attribute[tuple[str, ...]], value: tuple[str, ...]) -> None:
    if HIDDEN_STATES not in value:
        raise CacheError(f"BlockList.outputs must name {HIDDEN_STATES!r} among the block's outputs, got {value!r}")
    unknown = [name for name in value if name not in _ROLES]
    if unknown or len(set(value)) != len(value):
        raise CacheError(f"BlockList.outputs takes each of {_ROLES} at most once, got {value!r}")


@final
@attrs.frozen(kw_only=True)
class BlockList:
    """One ``nn.ModuleList`` of transformer blocks and how each block is called.

    ``path`` is the list's dotted attribute path on the model. ``hidden_states`` and
    ``encoder_hidden_states`` name the block's forward parameters that carry the two streams
    (looked up in the signature, so blocks may be called positionally or by keyword).
    ``outputs`` names what the block returns, in order: one name means it returns a tensor,
    two mean a tuple (Flux returns ``("encoder_hidden_states", "hidden_states")``).
    """

    path: str = attrs.field(validator=attrs.validators.min_len(1))
    hidden_states: str = HIDDEN_STATES
    encoder_hidden_states: str | None = None
    outputs: tuple[str, ...] = attrs.field(default=(HIDDEN_STATES,), converter=_names, validator=_check_outputs)

    @property
    def returns_tuple(self) -> bool:
        """Whether a block returns a tuple (else a bare tensor)."""
        return len(self.outputs) > 1

    def index(self, role: str) -> int | None:
        """The position of ``role`` in a block's output tuple (``None`` if not returned)."""
        return self.outputs.index(role) if role in self.outputs else None


@final
@attrs.frozen(kw_only=True)
class CacheSupport:
    """What inference caches need to know about a model.

    - ``blocks``: the transformer block lists, in the order the forward runs them.
    - ``attention``: the attention module classes (Pyramid Attention Broadcast, FasterCache and
      TaylorSeer act on them); ``cross_attention``: those among them that attend to another
      sequence (PAB's ``cross_*`` settings).
    - ``output_projection``: the dotted name of the final projection (TaylorSeer's lite mode
      predicts it).
    - ``sample_field``: the attribute of the model's output object holding the prediction, and
      ``sample_format`` its layout (one of ``SAMPLE_FORMATS``).
    """

    blocks: tuple[BlockList, ...] = attrs.field(default=(), converter=_block_lists)
    attention: ModuleTypes | None = None
    cross_attention: ModuleTypes | None = None
    output_projection: str | None = None
    sample_field: str = "sample"
    sample_format: str = attrs.field(default="BSC", validator=attrs.validators.in_(SAMPLE_FORMATS))

    def __attrs_post_init__(self) -> None:
        if not self.blocks and self.attention is None:
            raise CacheError("CacheSupport needs block lists, attention classes, or both")
        paths = [block.path for block in self.blocks]
        if len(set(paths)) != len(paths):
            raise CacheError(f"CacheSupport block list paths repeat: {paths}")

    def kinds(self) -> tuple[str, ...]:
        """The cache kinds this declaration is enough for."""
        kinds: list[str] = []
        if self.blocks:
            kinds += BLOCK_CACHES
        if self.attention is not None:
            kinds += ATTENTION_CACHES
        return tuple(sorted(kinds))

    def entries(self) -> tuple[str, ...]:
        """The supported cache kinds (the metadata row)."""
        return self.kinds()
