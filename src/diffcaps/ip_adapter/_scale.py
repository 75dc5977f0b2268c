"""IP-Adapter scales as users write them, turned into one value per adapter per block.

The accepted forms are diffusers' (``set_ip_adapter_scale``), plus a mapping by name:

- a number: every block of every adapter;
- a list of numbers: with one adapter loaded, one per block; with several, one per adapter;
- a list with one entry per adapter, each a number or a per-block list;
- a mapping ``{adapter_name: number or per-block list}``: only the named adapters change.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TypeAlias

from diffcaps.errors import IPAdapterError

__all__ = ["AdapterScale", "Scale", "per_block_scales"]

AdapterScale: TypeAlias = float | Sequence[float]
"""One adapter's scale: the same in every block, or one value per block."""

Scale: TypeAlias = float | Sequence[float | Sequence[float]] | Mapping[str, AdapterScale]
"""What ``set_scale`` takes (see the module docstring)."""


def _number(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise IPAdapterError(f"{where}: expected a number, got {type(value).__name__} {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise IPAdapterError(f"{where}: expected a finite number, got {number}")
    return number


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _blocks(value: object, name: str, blocks: int) -> tuple[float, ...]:
    where = f"scale of IP-Adapter {name!r}"
    if _is_number(value):
        return (_number(value, where),) * blocks
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise IPAdapterError(f"{where}: expected a number or a list of {blocks} per-block numbers, "
                             f"got {type(value).__name__}")
    if len(value) != blocks:
        raise IPAdapterError(f"{where}: expected a number or a list of {blocks} per-block numbers "
                             f"(one per image-prompt block), got a list of {len(value)}")
    return tuple(_number(item, f"{where}, block {index}") for index, item in enumerate(value))


def per_block_scales(scale: object, names: Sequence[str], blocks: int) -> dict[str, tuple[float, ...]]:
    """``scale`` in any accepted form → {adapter name: one value per block} for the adapters it sets."""
    if not names:
        raise IPAdapterError("no IP-Adapter is loaded: load one before setting its scale")
    if _is_number(scale):
        value = _number(scale, "IP-Adapter scale")
        return {name: (value,) * blocks for name in names}
    if isinstance(scale, Mapping):
        unknown = [str(key) for key in scale if key not in names]
        if unknown:
            raise IPAdapterError(f"no IP-Adapter named {', '.join(map(repr, unknown))} is loaded "
                                 f"(loaded: {', '.join(map(repr, names))})")
        return {name: _blocks(value, name, blocks) for name, value in scale.items()}
    if isinstance(scale, str | bytes) or not isinstance(scale, Sequence):
        raise IPAdapterError(f"IP-Adapter scale: expected a number, a list or a mapping by adapter name, "
                             f"got {type(scale).__name__}")
    if len(names) == 1 and all(_is_number(item) for item in scale):
        return {names[0]: _blocks(scale, names[0], blocks)}
    if len(scale) != len(names):
        raise IPAdapterError(
            f"{len(names)} IP-Adapters are loaded ({', '.join(map(repr, names))}): expected one scale per "
            f"adapter ({len(names)} entries, each a number or a list of {blocks} per-block numbers), "
            f"got {len(scale)} entries"
        )
    return {name: _blocks(value, name, blocks) for name, value in zip(names, scale, strict=True)}
