"""Finding the modules a capability names inside one model instance."""

from __future__ import annotations

from torch import nn

from diffcaps._service import ModuleTypes
from diffcaps.errors import CapabilityError

__all__ = ["matching_modules"]


def matching_modules(model: nn.Module, types: ModuleTypes, feature: str) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) for every instance of the declared classes; an error if none exist."""
    found = [(name, module) for name, module in model.named_modules() if types.matches(module)]
    if not found:
        raise CapabilityError(
            type(model).__name__,
            f"{feature} (it declares {', '.join(types.entries())}, but this instance has none of them)",
        )
    return found
