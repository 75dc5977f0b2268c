"""The context-parallel plan: which forward inputs are split and which output is gathered."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import final

import attrs

__all__ = ["ContextParallelPlan", "GatherOutput", "SplitInput"]


@final
@attrs.frozen(kw_only=True)
class SplitInput:
    """A forward input split across ranks along ``dim`` (a tensor of ``ndim`` dimensions)."""

    dim: int
    ndim: int


@final
@attrs.frozen(kw_only=True)
class GatherOutput:
    """A submodule's output gathered from all ranks along ``dim``."""

    dim: int
    ndim: int


def _frozen_mapping(value: Mapping[str, SplitInput]) -> Mapping[str, SplitInput]:
    return MappingProxyType(dict(value))


@final
@attrs.frozen(kw_only=True)
class ContextParallelPlan:
    """Declares how a model's sequence is split across ranks and gathered back."""

    inputs: Mapping[str, SplitInput] = attrs.field(converter=_frozen_mapping)
    gather: Mapping[str, GatherOutput]

    def entries(self) -> tuple[str, ...]:
        """``split name@dim`` for each input, ``gather module@dim`` for each output."""
        split = tuple(f"split {name}@{s.dim}" for name, s in self.inputs.items())
        gathered = tuple(f"gather {name}@{g.dim}" for name, g in self.gather.items())
        return split + gathered
