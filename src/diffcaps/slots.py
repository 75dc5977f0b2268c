"""``InstanceSlot``: the one typed place where a feature keeps its runtime state on a module.

Every feature that changes a model instance (adapters loaded, hooks installed, groups
offloaded, a cache or context-parallel session) records what it did in one slot, named after
the feature, in the module's ``__dict__``. The slot is not a parameter, buffer or submodule,
so it never reaches a state dict, and ``del`` of the entry leaves the module as it was.

A feature that must refuse while another one holds the module asks :func:`holding` by the
other feature's name instead of importing it: two features that refuse each other would
otherwise import each other.
"""

from __future__ import annotations

from typing import Generic, TypeVar, final

from torch import nn

from diffcaps.protocols import unwrap_compiled

__all__ = ["InstanceSlot", "holding"]

_T = TypeVar("_T")


def _attribute(feature: str) -> str:
    return f"_diffcaps_{feature}"


def holding(model: object, feature: str) -> object | None:
    """What ``feature`` keeps on ``model`` (its slot's value), or ``None`` when it keeps nothing there.

    ``model`` is the model a feature was enabled on (a ``torch.compile`` wrapper stands for the
    module inside it); ``feature`` is the name the owner's slot was made with (``"lora"``,
    ``"qkv_fusion"``, ``"group_offloading"``, …; ``tests/test_slots.py`` checks every name asked
    in diffcaps). The value's ``str`` says what is held, in the owner's words, and it is falsy
    when the owner keeps a record but holds nothing yet (LoRA after ``enable_hotswap``).
    """
    module = unwrap_compiled(model)
    return module.__dict__.get(_attribute(feature)) if isinstance(module, nn.Module) else None


@final
class InstanceSlot(Generic[_T]):
    """Per-instance state of one feature, of type ``T``, stored under ``_diffcaps_<feature>``."""

    __slots__ = ("attribute", "feature", "kind")

    def __init__(self, feature: str, kind: type[_T]) -> None:
        self.feature = feature
        self.kind = kind
        self.attribute = _attribute(feature)

    def get(self, module: nn.Module) -> _T | None:
        """The state held by ``module``, or ``None`` when the feature has none there."""
        value = module.__dict__.get(self.attribute)
        return value if isinstance(value, self.kind) else None

    def set(self, module: nn.Module, value: _T) -> None:
        """Hold ``value`` as ``module``'s state for this feature (replacing any earlier one)."""
        module.__dict__[self.attribute] = value

    def clear(self, module: nn.Module) -> _T | None:
        """Remove and return ``module``'s state for this feature (``None`` if it had none)."""
        value = module.__dict__.pop(self.attribute, None)
        return value if isinstance(value, self.kind) else None

    def __repr__(self) -> str:
        return f"InstanceSlot({self.feature!r}, {self.kind.__name__})"
