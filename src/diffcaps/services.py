"""What every service has in common, and the services that name modules: ``ModuleTypes`` by
class, ``ModuleNames`` by name."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol, final

import attrs
import torch

from diffcaps.errors import CapabilityError

__all__ = ["ModuleNames", "ModuleTypes", "Service"]


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


def _names(value: Iterable[object]) -> tuple[str, ...]:
    names: list[str] = []
    for name in value:
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"ModuleNames takes single name components (no dots), got {name!r}")
        names.append(name)
    if not names:
        raise ValueError("ModuleNames needs at least one name")
    return tuple(names)


@final
@attrs.frozen
class ModuleNames:
    """Modules (and parameters) named by one component of their dotted path.

    ``norm1`` matches ``blocks.0.norm1`` and everything under it, and a parameter registered
    as ``scale_shift_table`` matches wherever it sits; ``norm10`` and ``my_norm1`` do not
    match. (diffusers matches its ``_keep_in_fp32_modules`` the same way.)
    """

    names: tuple[str, ...] = attrs.field(converter=_names)

    def entries(self) -> tuple[str, ...]:
        """The names."""
        return self.names

    def matches(self, path: str) -> bool:
        """Whether the dotted ``path`` (a module, parameter or buffer name) has a matching component."""
        return not set(self.names).isdisjoint(path.split("."))

    def tensor_names(self, model: torch.nn.Module) -> frozenset[str]:
        """Names of the matching parameters and buffers of ``model`` (non-persistent buffers included)."""
        tensors = [*model.named_parameters(), *model.named_buffers()]
        return frozenset(name for name, _ in tensors if self.matches(name))
