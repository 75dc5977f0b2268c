"""Group offloading: weights rest on the CPU (or on disk) and move to the compute device group by group."""

from diffcaps.offload._functions import (
    OffloadState as OffloadState,
    disable_group_offloading as disable_group_offloading,
    enable_group_offloading as enable_group_offloading,
    offload_state as offload_state,
)
from diffcaps.offload._groups import OffloadGroup as OffloadGroup
from diffcaps.offload._service import GroupOffloading as GroupOffloading

__all__ = [
    "GroupOffloading",
    "OffloadGroup",
    "OffloadState",
    "disable_group_offloading",
    "enable_group_offloading",
    "offload_state",
]
