"""Group offloading: weights rest on the CPU (or on disk) and move to the compute device group by group.

``enable(model, GroupOffloadingConfig(onload_device="cuda"))`` switches it on, ``active(model)``
gives the config in force (``None`` when off), ``disable(model)`` puts every weight back where it
was. ``groups(model)`` lists the groups and how often each moved.
"""

from diffcaps.offload._config import GroupOffloadingConfig as GroupOffloadingConfig
from diffcaps.offload._functions import (
    active as active,
    disable as disable,
    enable as enable,
    groups as groups,
)
from diffcaps.offload._groups import OffloadGroup as OffloadGroup

__all__ = ["GroupOffloadingConfig", "OffloadGroup", "active", "disable", "enable", "groups"]
