"""``AttentionConfig``: which attention backend a model's attention modules run."""

from __future__ import annotations

from typing import final

import attrs

from diffcaps import checks
from diffcaps.attention._backends import BACKENDS, BackendName
from diffcaps.errors import AttentionError

__all__ = ["AttentionConfig"]


def _known(_: object, __: object, value: object) -> None:
    name = checks.name(value, "AttentionConfig.backend", AttentionError)
    if name not in BACKENDS:
        raise AttentionError(f"unknown attention backend {name!r}; there are {', '.join(BACKENDS)}")


@final
@attrs.frozen(kw_only=True)
class AttentionConfig:
    """The backend every declared attention module runs (``sdpa``: PyTorch's dispatcher)."""

    backend: BackendName = attrs.field(default="sdpa", validator=_known)
