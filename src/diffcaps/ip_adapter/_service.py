"""The IP-Adapter protocol: shared by all models, implemented in each model's folder.

IP-Adapter varies too much between architectures for one shared implementation (which
blocks take the image prompt, how the image query is formed, how files name things), so a
model folder provides an object with these members and the functions of
:mod:`diffcaps.ip_adapter` drive it. The modules an implementation builds live on the model
instance; the implementation object itself is plain data.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Protocol, runtime_checkable

from torch import Tensor, nn

__all__ = ["IPAdapterSupport"]


@runtime_checkable
class IPAdapterSupport(Protocol):
    """A model's IP-Adapter implementation, as its capabilities declare it."""

    def entries(self) -> tuple[str, ...]:
        """The IP-Adapter file layouts this model reads."""
        ...

    def adapter_names(self, model: nn.Module) -> tuple[str, ...]:
        """The adapters loaded in ``model``, in load order (the order of the image embeddings)."""
        ...

    def block_count(self, model: nn.Module) -> int:
        """How many blocks take the image prompt: the length of a per-block scale list."""
        ...

    def scales(self, model: nn.Module) -> dict[str, tuple[float, ...]]:
        """Adapter name → its scale in each image-prompt block."""
        ...

    def load(self, model: nn.Module, tensors: Mapping[str, Tensor], *, adapter_name: str, source: str) -> None:
        """Check ``tensors`` (named ``source`` in errors) against ``model``, then add them as ``adapter_name``.

        Nothing on the model changes unless every check passes.
        """
        ...

    def set_scales(self, model: nn.Module, scales: Mapping[str, Sequence[float]]) -> None:
        """Set each named adapter's per-block scales (one value per image-prompt block)."""
        ...

    def unload(self, model: nn.Module, adapter_names: Collection[str]) -> None:
        """Remove the named adapters; with none left, the model is exactly as before the first load."""
        ...
