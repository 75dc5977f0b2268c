"""``LayerwiseCastingConfig``: the dtype weights are stored in, the one they compute in, what is skipped."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast, final

import attrs
import torch

from diffcaps import checks
from diffcaps.errors import CastingError

__all__ = ["LayerwiseCastingConfig"]


def _dtype(value: torch.dtype | None, role: str) -> None:
    given = cast(object, value)
    if given is None:
        return
    if not isinstance(given, torch.dtype) or not given.is_floating_point:
        raise CastingError(f"{role} must be a floating-point torch.dtype, got {given!r}")


def _patterns(value: Sequence[str] | None) -> tuple[str, ...] | None:
    return None if value is None else checks.patterns(value, "skip_patterns", CastingError)


@final
@attrs.frozen(kw_only=True)
class LayerwiseCastingConfig:
    """Weights of Linear/Conv/Embedding layers stored in ``storage_dtype``, upcast for their own forward.

    ``compute_dtype`` defaults to the model's parameter dtype. ``skip_patterns`` (regular
    expressions searched in module names; a match skips the whole subtree) default to the
    model's declared patterns plus the input and output projections.
    """

    storage_dtype: torch.dtype = torch.float8_e4m3fn
    compute_dtype: torch.dtype | None = None
    skip_patterns: tuple[str, ...] | None = attrs.field(default=None, converter=_patterns)

    def __attrs_post_init__(self) -> None:
        _dtype(self.storage_dtype, "storage_dtype")
        _dtype(self.compute_dtype, "compute_dtype")
        if self.storage_dtype == self.compute_dtype:
            raise CastingError(f"storage_dtype and compute_dtype are both {self.storage_dtype}: nothing would be saved")
