"""Variant rules: how to recognise a checkpoint variant from its keys and shapes, and its config.

A :class:`WeightVariant` holds conditions (``Has``, ``Lacks``, ``DimIs``) that must all hold
for a file to be that variant, and config readers (``Dim``, ``BlockCount``, ``Present``,
``Const``, ``Derived``) that compute each config value from the file. Both look only at key
names and shapes in the original layout, so a file is identified and configured from its
header without reading a tensor, at any width or depth.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol, final

import attrs
import torch

from diffcaps.weights._patterns import KeyPattern
from diffcaps.weights._transforms import Shape

__all__ = [
    "BlockCount",
    "Condition",
    "ConfigReader",
    "Const",
    "Derived",
    "Dim",
    "DimIs",
    "Has",
    "Lacks",
    "Present",
    "TensorSpec",
    "WeightVariant",
]


@final
@attrs.frozen
class TensorSpec:
    """What a header says about a tensor: its shape and dtype."""

    shape: Shape
    dtype: torch.dtype


Tensors = Mapping[str, TensorSpec]


class Condition(Protocol):
    """Something a file must satisfy to be a given variant."""

    def failure(self, tensors: Tensors) -> str | None:
        """``None`` if the condition holds, else why not (naming the key and what was found)."""
        ...

    def keys(self) -> tuple[str, ...]:
        """The keys it looks at."""
        ...

    def describe(self) -> str:
        """The condition in a few words."""
        ...


@final
@attrs.frozen
class Has:
    """The file holds ``key``."""

    key: str

    def failure(self, tensors: Tensors) -> str | None:
        """Why the key is not there, if it is not."""
        return None if self.key in tensors else f"no {self.key}"

    def keys(self) -> tuple[str, ...]:
        """The key."""
        return (self.key,)

    def describe(self) -> str:
        """``has KEY``."""
        return f"has {self.key}"


@final
@attrs.frozen
class Lacks:
    """The file does not hold ``key``."""

    key: str

    def failure(self, tensors: Tensors) -> str | None:
        """Why the key should not be there, if it is."""
        return f"has {self.key}" if self.key in tensors else None

    def keys(self) -> tuple[str, ...]:
        """The key."""
        return (self.key,)

    def describe(self) -> str:
        """``no KEY``."""
        return f"no {self.key}"


@final
@attrs.frozen
class DimIs:
    """``key`` has ``size`` entries along ``dim`` (``what`` names that size in messages)."""

    key: str
    dim: int
    size: int
    what: str = ""

    def failure(self, tensors: Tensors) -> str | None:
        """Why the shape does not fit, if it does not."""
        spec = tensors.get(self.key)
        if spec is None:
            return f"no {self.key}"
        if len(spec.shape) <= self.dim or spec.shape[self.dim] != self.size:
            found = spec.shape[self.dim] if len(spec.shape) > self.dim else "none"
            label = f" ({self.what})" if self.what else ""
            return (
                f"{self.key} has shape {list(spec.shape)}: {found} along dim {self.dim}{label}, "
                f"expected {self.size}"
            )
        return None

    def keys(self) -> tuple[str, ...]:
        """The key."""
        return (self.key,)

    def describe(self) -> str:
        """``KEY dim D = N``."""
        label = f" {self.what}" if self.what else ""
        return f"{self.key} dim {self.dim} = {self.size}{label}"


class ConfigReader(Protocol):
    """Computes one config value from a file's keys and shapes."""

    def read(self, tensors: Tensors) -> Any:
        """The value (``LookupError`` if a key it needs is absent, ``ValueError`` if it does not fit)."""
        ...

    def keys(self) -> tuple[str, ...]:
        """The keys it looks at."""
        ...


@final
@attrs.frozen
class Const:
    """A fixed value."""

    value: Any

    def read(self, tensors: Tensors) -> Any:
        """The value."""
        return self.value

    def keys(self) -> tuple[str, ...]:
        """None."""
        return ()


@final
@attrs.frozen
class Dim:
    """The size of ``key`` along ``dim``."""

    key: str
    dim: int

    def read(self, tensors: Tensors) -> int:
        """The size."""
        spec = tensors.get(self.key)
        if spec is None:
            raise LookupError(f"no {self.key}")
        if len(spec.shape) <= self.dim:
            raise ValueError(f"{self.key} has shape {list(spec.shape)}, no dim {self.dim}")
        return spec.shape[self.dim]

    def keys(self) -> tuple[str, ...]:
        """The key."""
        return (self.key,)


@final
@attrs.frozen
class Present:
    """Whether the file holds ``key``."""

    key: str

    def read(self, tensors: Tensors) -> bool:
        """Whether it does."""
        return self.key in tensors

    def keys(self) -> tuple[str, ...]:
        """The key."""
        return (self.key,)


def _block_pattern(pattern: str) -> KeyPattern:
    compiled = KeyPattern(pattern)
    if len(compiled.names) != 1:
        raise ValueError(f"a block pattern needs exactly one placeholder such as {{n}}, got {pattern!r}")
    return compiled


@final
@attrs.frozen
class BlockCount:
    """How many blocks ``pattern`` (with one ``{n}``) numbers: the highest index found, plus one.

    A gap in the numbering therefore shows up as that block's tensors being missing.
    """

    pattern: str
    _compiled: KeyPattern = attrs.field(
        init=False, repr=False, eq=False, default=attrs.Factory(lambda b: _block_pattern(b.pattern), takes_self=True)
    )

    def read(self, tensors: Tensors) -> int:
        """The count (0 when there are none)."""
        indices = [
            int(values[0][1]) for key in tensors
            if (values := self._compiled.match_start(key)) is not None and values[0][1].isdigit()
        ]
        return max(indices) + 1 if indices else 0

    def keys(self) -> tuple[str, ...]:
        """The pattern."""
        return (self.pattern + ".*",)


@final
@attrs.frozen
class Derived:
    """A value computed from other readers' values by ``function`` (a model folder's own rule)."""

    function: Callable[..., Any]
    inputs: tuple[ConfigReader, ...]

    def read(self, tensors: Tensors) -> Any:
        """``function`` applied to the inputs' values."""
        return self.function(*(reader.read(tensors) for reader in self.inputs))

    def keys(self) -> tuple[str, ...]:
        """The inputs' keys."""
        return tuple(dict.fromkeys(key for reader in self.inputs for key in reader.keys()))


def _freeze_config(value: Mapping[str, ConfigReader]) -> Mapping[str, ConfigReader]:
    return dict(value)


@final
@attrs.frozen(kw_only=True)
class WeightVariant:
    """One checkpoint variant: its name, how to recognise it, and the config it implies."""

    name: str
    description: str = ""
    conditions: tuple[Condition, ...]
    config: Mapping[str, ConfigReader] = attrs.field(converter=_freeze_config, eq=False, hash=False)

    def failures(self, tensors: Tensors) -> list[str]:
        """Why a file with these tensors is not this variant (empty when it is)."""
        return [why for condition in self.conditions if (why := condition.failure(tensors)) is not None]

    def keys(self) -> tuple[str, ...]:
        """Every key the conditions look for."""
        return tuple(dict.fromkeys(key for condition in self.conditions for key in condition.keys()))

    def describe(self) -> str:
        """The conditions, joined."""
        return "; ".join(condition.describe() for condition in self.conditions)

    def read_config(self, tensors: Tensors) -> dict[str, Any]:
        """Every config value (``LookupError``/``ValueError`` from the reader that failed)."""
        values: dict[str, Any] = {}
        for name, reader in self.config.items():
            try:
                values[name] = reader.read(tensors)
            except (LookupError, ValueError, ZeroDivisionError) as exc:
                raise ValueError(f"cannot read {name} ({exc})") from None
        return values

