"""The LoRA service type: which adapter file formats a model reads."""

from __future__ import annotations

from collections.abc import Collection
from typing import Protocol, final

import attrs

__all__ = ["LoRAFormat", "LoRAService"]


class LoRAFormat(Protocol):
    """One LoRA file layout: its name and how to recognise it from the tensor names."""

    @property
    def name(self) -> str:
        """The format's name (``kohya``, ``xlabs``, …)."""
        ...

    def detect(self, keys: Collection[str]) -> bool:
        """Whether a file with these tensor names is in this format."""
        ...


@final
@attrs.frozen(kw_only=True)
class LoRAService:
    """Declares the LoRA formats a model loads."""

    formats: tuple[LoRAFormat, ...]

    def entries(self) -> tuple[str, ...]:
        """The format names, sorted."""
        return tuple(sorted(f.name for f in self.formats))
