"""``GroupOffloadingConfig``: where weights rest, where they run, and how they are grouped."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, cast, final

import attrs
import torch

from diffcaps import checks
from diffcaps.errors import OffloadError

__all__ = ["GroupOffloadingConfig", "OffloadType"]

OffloadType = Literal["block_level", "leaf_level"]
"""``block_level``: runs of declared blocks move together; ``leaf_level``: every module with weights alone."""


def _device(value: str | torch.device) -> torch.device:
    given = cast(object, value)
    if isinstance(given, torch.device):
        return given
    if not isinstance(given, str):
        raise OffloadError(f"a device must be a torch.device or a device string, got {given!r}")
    try:
        return torch.device(given)
    except RuntimeError:
        raise OffloadError(f"{value!r} is not a device") from None


def _folder(value: str | os.PathLike[str] | None) -> Path | None:
    given = cast(object, value)
    if given is None:
        return None
    if not isinstance(given, str | os.PathLike):
        raise OffloadError(f"offload_to_disk_path must be a path or None, got {given!r}")
    return Path(given)


@final
@attrs.frozen(kw_only=True)
class GroupOffloadingConfig:
    """Weights rest on ``offload_device`` (or on disk) and move to ``onload_device`` group by group.

    ``block_level`` cuts the declared block lists into groups of ``num_blocks_per_group``
    consecutive blocks; ``leaf_level`` makes every module that owns parameters its own group.
    With ``offload_to_disk_path`` each group's tensors are written to
    ``<path>/<group>.safetensors`` and are not resident between uses. ``use_stream`` (CUDA
    only) copies the next block group on a side stream while the current one computes;
    ``non_blocking`` makes the copies asynchronous without a side stream.
    """

    onload_device: torch.device = attrs.field(converter=_device)
    offload_device: torch.device = attrs.field(default=torch.device("cpu"), converter=_device)
    offload_type: OffloadType = "block_level"
    num_blocks_per_group: int = 1
    offload_to_disk_path: Path | None = attrs.field(default=None, converter=_folder)
    use_stream: bool = False
    non_blocking: bool = False

    def __attrs_post_init__(self) -> None:
        kind = cast(object, self.offload_type)
        if kind not in ("block_level", "leaf_level"):
            raise OffloadError(f"offload_type must be 'block_level' or 'leaf_level', got {kind!r}")
        checks.integer(self.num_blocks_per_group, "num_blocks_per_group", OffloadError, minimum=1)
        checks.flag(self.use_stream, "use_stream", OffloadError)
        checks.flag(self.non_blocking, "non_blocking", OffloadError)
        if self.use_stream and self.onload_device.type != "cuda":
            raise OffloadError("use_stream=True needs CUDA and a CUDA onload_device")
