"""Which ranks work together: a (ring × ulysses) grid of process groups over torch.distributed.

Rank positions run ring-major: the rank at ring index ``r`` and Ulysses index ``u`` holds shard
``r * ulysses + u`` of every split input. Everything here is checked before any communication.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Final, final

import attrs
import torch.distributed as dist

from diffcaps.errors import ParallelError

__all__ = ["Axis", "Topology", "make_topology"]

RING: Final = "ring"
ULYSSES: Final = "ulysses"


@final
@attrs.frozen(kw_only=True)
class Axis:
    """One mesh dimension as this rank sees it: its group (``None`` when alone), size, own index, members."""

    name: str
    group: Any
    size: int
    index: int
    ranks: tuple[int, ...]
    """Global ranks of the group's members, in group order."""


@final
@attrs.frozen(kw_only=True)
class Topology:
    """This rank's place in the context-parallel grid."""

    ring: Axis
    ulysses: Axis
    rank: int
    members: tuple[int, ...]
    """Global ranks of every rank in the grid."""
    owned_groups: tuple[Any, ...] = ()
    """Groups made by ``make_topology`` (destroyed on disable); a caller's mesh's groups are not ours."""

    @property
    def world(self) -> int:
        """Number of ranks sharing one sequence."""
        return self.ring.size * self.ulysses.size

    @property
    def position(self) -> int:
        """Which shard of each split input this rank holds."""
        return self.ring.index * self.ulysses.size + self.ulysses.index


def _degree(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ParallelError(f"{name} must be a positive int, got {value!r}")
    return value


def check_degrees(ulysses_degree: object, ring_degree: object) -> tuple[int, int]:
    """Both degrees, validated (positive ints)."""
    return _degree("ulysses_degree", ulysses_degree), _degree("ring_degree", ring_degree)


def require_process_group() -> None:
    """Raise ``ParallelError`` unless torch.distributed has an initialised default process group."""
    if not dist.is_available():
        raise ParallelError("context parallelism needs torch.distributed, which this torch build lacks")
    if not dist.is_initialized():
        raise ParallelError(
            "context parallelism needs an initialised process group: call "
            "torch.distributed.init_process_group('nccl' or 'gloo', ...) on every rank first (torchrun sets "
            "up the environment for it)"
        )


def make_topology(ulysses: int, ring: int, mesh: object | None, timeout: timedelta) -> Topology:
    """The grid for ``ring × ulysses`` ranks: from ``mesh`` if given, else new groups over the whole world."""
    require_process_group()
    if mesh is not None:
        return _from_mesh(mesh, ulysses, ring)
    world, rank = dist.get_world_size(), dist.get_rank()
    if ulysses * ring != world:
        raise ParallelError(
            f"ulysses_degree × ring_degree = {ulysses} × {ring} = {ulysses * ring}, but the process group has "
            f"{world} ranks; the product must equal the world size (or pass a mesh of that many ranks)"
        )
    ring_index, ulysses_index = divmod(rank, ulysses)
    owned: list[Any] = []

    def axis(name: str, size: int, index: int, members: list[list[int]], mine: int) -> Axis:
        group = None
        if size > 1:  # every rank creates every group, in the same order, as new_group requires
            for ranks in members:
                made = dist.new_group(ranks, timeout=timeout)
                owned.append(made)
                if ranks == members[mine]:
                    group = made
        return Axis(name=name, group=group, size=size, index=index, ranks=tuple(members[mine]))

    ulysses_axis = axis(ULYSSES, ulysses, ulysses_index,
                        [[r * ulysses + u for u in range(ulysses)] for r in range(ring)], ring_index)
    ring_axis = axis(RING, ring, ring_index, [[r * ulysses + u for r in range(ring)] for u in range(ulysses)],
                     ulysses_index)
    return Topology(ring=ring_axis, ulysses=ulysses_axis, rank=rank, members=tuple(range(world)),
                    owned_groups=tuple(owned))


def _from_mesh(mesh: object, ulysses: int, ring: int) -> Topology:
    from torch.distributed.device_mesh import DeviceMesh

    if not isinstance(mesh, DeviceMesh):
        raise ParallelError(f"mesh must be a torch.distributed.device_mesh.DeviceMesh, got {type(mesh).__name__}")
    names = mesh.mesh_dim_names
    shape = tuple(mesh.shape)
    if mesh.ndim == 2:
        order = (RING, ULYSSES) if names is None else tuple(names)
        if set(order) != {RING, ULYSSES}:
            raise ParallelError(f"a 2-D mesh's dimensions must be named ('ring', 'ulysses'), got {names}")
        sizes = dict(zip(order, shape, strict=True))
        dims = {name: order.index(name) for name in order}
    elif mesh.ndim == 1 and (ulysses == 1 or ring == 1):
        name = ULYSSES if ring == 1 else RING
        sizes = {name: shape[0], (RING if name == ULYSSES else ULYSSES): 1}
        dims = {name: 0}
    else:
        raise ParallelError(f"mesh must be 1-D (one degree of 1) or 2-D ('ring', 'ulysses'); got shape {shape}")
    if (sizes[RING], sizes[ULYSSES]) != (ring, ulysses):
        raise ParallelError(
            f"mesh has ring × ulysses = {sizes[RING]} × {sizes[ULYSSES]} ranks, but ring_degree={ring} and "
            f"ulysses_degree={ulysses} were asked for"
        )
    if mesh.get_coordinate() is None:
        raise ParallelError(f"rank {dist.get_rank()} is not in the mesh it was given")

    def axis(name: str) -> Axis:
        if name not in dims or sizes[name] == 1:
            return Axis(name=name, group=None, size=1, index=0, ranks=(dist.get_rank(),))
        group = mesh.get_group(dims[name])
        ranks = tuple(dist.get_process_group_ranks(group))
        return Axis(name=name, group=group, size=sizes[name], index=mesh.get_local_rank(dims[name]), ranks=ranks)

    members = tuple(int(r) for r in mesh.mesh.flatten().tolist())
    return Topology(ring=axis(RING), ulysses=axis(ULYSSES), rank=dist.get_rank(), members=members)
