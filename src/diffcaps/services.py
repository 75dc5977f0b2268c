"""What every service has in common, and ``ModuleTypes``, the service that names module classes."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol, final

import attrs
import torch

from diffcaps.errors import CapabilityError

__all__ = ["ModuleTypes", "Service"]


class Service(Protocol):
    """A capability's service: plain data plus behaviour, listed in ``metadata()``."""

    def entries(self) -> tuple[str, ...]:
        """The short names shown in this capability's metadata row."""
        ...


def _module_classes(types: Iterable[Any]) -> tuple[type[torch.nn.Module], ...]:
    classes = tuple(types)
    if not classes:
        raise ValueError("ModuleTypes needs at least one module class")
    for item in classes:
        if not (isinstance(item, type) and issubclass(item, torch.nn.Module)):
            raise TypeError(f"{item!r} is not a torch.nn.Module subclass")
    return classes


@final
@attrs.frozen
class ModuleTypes:
    """A set of module classes a feature acts on (blocks to keep whole, blocks to compile, …)."""

    types: tuple[type[torch.nn.Module], ...] = attrs.field(converter=_module_classes)

    def entries(self) -> tuple[str, ...]:
        """The class names."""
        return tuple(t.__name__ for t in self.types)

    def matches(self, module: torch.nn.Module) -> bool:
        """Whether ``module`` is an instance of one of these classes."""
        return isinstance(module, self.types)

    def find(self, model: torch.nn.Module, feature: str) -> list[tuple[str, torch.nn.Module]]:
        """(qualified name, module) for every instance in ``model``; a ``CapabilityError`` if none exist."""
        found = [(name, module) for name, module in model.named_modules() if self.matches(module)]
        if not found:
            raise CapabilityError(
                type(model).__name__,
                f"{feature} (it declares {', '.join(self.entries())}, but this instance has none of them)",
            )
        return found
