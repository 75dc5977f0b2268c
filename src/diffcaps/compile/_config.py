"""``RegionalCompileConfig``: the ``torch.compile`` settings each repeated block is compiled with."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, final

import attrs

from diffcaps import checks
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
        if not checks.instance(self.backend, str, "RegionalCompileConfig.backend", CompileError):
            raise CompileError("RegionalCompileConfig.backend must name a backend, got ''")
        checks.flag(self.fullgraph, "RegionalCompileConfig.fullgraph", CompileError)
        if self.dynamic is not None:
            checks.flag(self.dynamic, "RegionalCompileConfig.dynamic", CompileError)
