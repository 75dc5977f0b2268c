"""The attention service: which modules attend and which backends they may run."""

from __future__ import annotations

from typing import final

import attrs

from diffcaps.attention._backends import BACKENDS, BackendName
from diffcaps.services import ModuleTypes

__all__ = ["AttentionSupport"]


def _backends(value: object) -> tuple[BackendName, ...]:
    items = tuple(value) if isinstance(value, tuple | list) else ()
    if not items:
        raise ValueError(f"AttentionSupport needs a non-empty tuple of backend names, got {value!r}")
    unknown = [item for item in items if item not in BACKENDS]
    if unknown:
        raise ValueError(f"unknown attention backends {unknown!r}; there are {', '.join(BACKENDS)}")
    if "sdpa" not in items:
        raise ValueError("AttentionSupport must list 'sdpa', the default every model runs")
    return tuple(item for item in BACKENDS if item in items)


@final
@attrs.frozen(kw_only=True)
class AttentionSupport:
    """Declares a model's attention modules and the backends they may run (``sdpa`` among them).

    The modules' kernels must call :func:`diffcaps.layers.module_attention`: that is where the
    backend set on a module is read.
    """

    modules: ModuleTypes
    backends: tuple[BackendName, ...] = attrs.field(default=BACKENDS, converter=_backends)

    def entries(self) -> tuple[str, ...]:
        """The attention module classes, then the backends."""
        return (*self.modules.entries(), *self.backends)
