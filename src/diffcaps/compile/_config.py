"""``RegionalCompileConfig``: the ``torch.compile`` settings each repeated block is compiled with."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast, final

import attrs

from diffcaps.errors import CompileError

__all__ = ["RegionalCompileConfig"]


def _options(value: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    return None if value is None else dict(value)


@final
@attrs.frozen(kw_only=True)
class RegionalCompileConfig:
    """Arguments of ``torch.compile`` for every instance of the model's repeated blocks."""

    backend: str = "inductor"
    mode: str | None = None
    fullgraph: bool = False
    dynamic: bool | None = None
    options: Mapping[str, Any] | None = attrs.field(default=None, converter=_options)

    def __attrs_post_init__(self) -> None:
        backend = cast(object, self.backend)
        if not isinstance(backend, str) or not backend:
            raise CompileError(f"RegionalCompileConfig.backend must be a backend name, got {self.backend!r}")
