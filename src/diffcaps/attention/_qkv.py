"""What a model declares for QKV fusion (``QKVGroup``, ``QKVFusion``) and the one call its
attention modules make to project (``project_qkv``), fused or not.

A fused attention module holds, for each fused group, one ``nn.Linear`` under the group's
``fused`` name in place of its three projections, and a :class:`FusedGroups` in its
``InstanceSlot`` that says which groups are fused and how the fused output splits.
"""

from __future__ import annotations

from typing import Final, cast, final

import attrs
from torch import Tensor, nn

from diffcaps.services import ModuleTypes
from diffcaps.slots import InstanceSlot

__all__ = ["FUSED", "FusedGroups", "QKVFusion", "QKVGroup", "project_qkv"]


def _names(value: tuple[str, str, str]) -> tuple[str, str, str]:
    raw = cast(object, value)  # typed as the triple mypy checks; anything may arrive at run time
    items = tuple(cast(tuple[object, ...], raw)) if isinstance(raw, tuple | list) else ()
    if len(items) != 3 or not all(isinstance(item, str) and item and "." not in item for item in items):
        raise ValueError(f"QKVGroup.projections takes three attribute names (query, key, value), got {value!r}")
    if len(set(items)) != 3:
        raise ValueError(f"QKVGroup.projections names one attribute twice: {value!r}")
    q, k, v = (str(item) for item in items)
    return q, k, v


def _fused_name(_: object, __: attrs.Attribute[str], value: str) -> None:
    if not value or "." in value:
        raise ValueError(f"QKVGroup.fused takes one attribute name, got {value!r}")


@final
@attrs.frozen
class QKVGroup:
    """Three ``nn.Linear`` projections of one input (query, key, value, in that order) that run
    as one matmul when fused, and the attribute name the fused ``nn.Linear`` takes meanwhile."""

    projections: tuple[str, str, str] = attrs.field(converter=_names)
    fused: str = attrs.field(validator=_fused_name)

    def entry(self) -> str:
        """``to_q+to_k+to_v>to_qkv``."""
        return f"{'+'.join(self.projections)}>{self.fused}"


def _groups(value: object) -> tuple[QKVGroup, ...]:
    items = tuple(value) if isinstance(value, tuple | list) else ()
    if not items or not all(isinstance(item, QKVGroup) for item in items):
        raise ValueError(f"QKVFusion.groups takes a non-empty tuple of QKVGroup, got {value!r}")
    groups = tuple(item for item in items if isinstance(item, QKVGroup))
    names = [name for group in groups for name in (*group.projections, group.fused)]
    if len(set(names)) != len(names):
        raise ValueError(f"QKVFusion.groups use an attribute name twice: {', '.join(names)}")
    return groups


@final
@attrs.frozen(kw_only=True)
class QKVFusion:
    """The attention module classes whose projections fuse, and the groups that fuse in each.

    A group whose three projections an instance lacks altogether is skipped there (Flux's
    single blocks have no text stream); one with only some of them is refused.
    """

    modules: ModuleTypes
    groups: tuple[QKVGroup, ...] = attrs.field(converter=_groups)

    def entries(self) -> tuple[str, ...]:
        """``fuse_qkv:<Class>:<group>`` for each module class and group."""
        return tuple(f"fuse_qkv:{name}:{group.entry()}" for name in self.modules.entries() for group in self.groups)


@final
@attrs.frozen
class FusedGroups:
    """A fused attention module's state: the fused groups and each one's output sizes."""

    groups: tuple[QKVGroup, ...]
    sizes: tuple[tuple[int, int, int], ...]
    order: tuple[str, ...]
    """The module's state-dict keys before fusing, in order (its state dict keeps them)."""
    children: tuple[str, ...]
    """The module's children before fusing, in order (unfusing restores it)."""

    def split(self, fused: str) -> tuple[int, int, int] | None:
        """The output sizes of the fused group named ``fused``, or ``None`` if it is not fused."""
        for group, sizes in zip(self.groups, self.sizes):
            if group.fused == fused:
                return sizes
        return None


FUSED: Final = InstanceSlot("qkv_fused", FusedGroups)
"""Where a fused attention module holds its :class:`FusedGroups`."""


def project_qkv(module: nn.Module, x: Tensor, group: QKVGroup) -> tuple[Tensor, Tensor, Tensor]:
    """Query, key and value of ``x`` through ``module``'s projections in ``group``: one matmul
    through the fused ``nn.Linear`` when the group is fused, three otherwise."""
    state = FUSED.get(module)
    sizes = None if state is None else state.split(group.fused)
    if sizes is not None:
        out: Tensor = getattr(module, group.fused)(x)
        q, k, v = out.split_with_sizes(list(sizes), dim=-1)
        return q, k, v
    q_name, k_name, v_name = group.projections
    query: Tensor = getattr(module, q_name)(x)
    key: Tensor = getattr(module, k_name)(x)
    value: Tensor = getattr(module, v_name)(x)
    return query, key, value
