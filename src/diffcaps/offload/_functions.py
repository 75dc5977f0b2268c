"""``enable_group_offloading`` / ``disable_group_offloading``: weights live off the compute device."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final, Literal

import attrs
import torch
from torch import nn

from diffcaps.errors import OffloadError
from diffcaps.hooks import Hook, add_hook, get_hook, remove_hook
from diffcaps.offload._groups import OffloadGroup
from diffcaps.offload._service import GroupOffloading
from diffcaps.protocols import SupportsGroupOffloading, require

__all__ = ["OffloadState", "disable_group_offloading", "enable_group_offloading", "offload_state"]

HOOK_NAME: Final = "group_offloading"
_STATE: Final = "_diffcaps_group_offloading"

OffloadType = Literal["block_level", "leaf_level"]


@attrs.define
class OffloadState:
    """What ``enable_group_offloading`` set up on one model instance (read it, don't change it)."""

    groups: list[OffloadGroup]
    rest: OffloadGroup
    hooked: list[nn.Module]
    offload_type: OffloadType
    disk_folder: Path | None
    stream: Any = None

    def group_names(self) -> list[str]:
        """Names of the groups, in execution order, the rest group last."""
        return [g.name for g in self.groups] + [self.rest.name]


class _GroupHook(Hook):
    """Onloads a group before its first module runs and offloads it after its last one."""

    def __init__(self, state: OffloadState, *, onload: OffloadGroup | None, offload: OffloadGroup | None,
                 prefetch: OffloadGroup | None = None) -> None:
        self.state, self.onload_group, self.offload_group, self.prefetch = state, onload, offload, prefetch

    def pre_forward(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        group = self.onload_group
        if group is not None:
            stream = self.state.stream
            if stream is None:
                if not group.onloaded:
                    group.onload()
            else:
                _onload_with_stream(group, self.prefetch, stream)
        return args, kwargs

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        if self.offload_group is not None:
            self.offload_group.offload()
        return output


def _onload_with_stream(group: OffloadGroup, following: OffloadGroup | None, stream: Any) -> None:
    current = torch.cuda.current_stream()
    if not group.onloaded:
        with torch.cuda.stream(stream):
            group.onload()
    current.wait_stream(stream)  # the prefetched copy of this group is complete before it is used
    for tensor in group.tensors():
        tensor.record_stream(current)
    if following is not None and not following.onloaded:
        with torch.cuda.stream(stream):  # copy the next group while this one computes
            following.onload()


def offload_state(model: nn.Module) -> OffloadState | None:
    """The offloading set up on ``model``, or ``None``."""
    found: OffloadState | None = model.__dict__.get(_STATE)
    return found


def _module_list(model: nn.Module, name: str) -> nn.ModuleList:
    found = getattr(model, name, None)
    if not isinstance(found, nn.ModuleList):
        raise OffloadError(f"{type(model).__name__} declares block list {name!r}, but has no nn.ModuleList by that name")
    return found


def _check_disk_folder(path: str | os.PathLike[str]) -> Path:
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise OffloadError(f"offload_to_disk_path {str(folder)!r} is not a writable folder: {exc.strerror or exc}") from None
    return folder


def enable_group_offloading(
    model: SupportsGroupOffloading,
    *,
    onload_device: str | torch.device,
    offload_device: str | torch.device = "cpu",
    offload_type: OffloadType = "block_level",
    num_blocks_per_group: int = 1,
    non_blocking: bool = False,
    use_stream: bool = False,
    offload_to_disk_path: str | os.PathLike[str] | None = None,
) -> OffloadState:
    """Keep the model's weights on ``offload_device`` (or on disk) and bring each group in only to run.

    ``block_level``: the declared block lists are cut into groups of ``num_blocks_per_group``
    consecutive blocks; ``leaf_level``: every module that owns parameters is its own group.
    What belongs to no group (embedders, output head, later additions) forms a last group
    that is onloaded for the whole forward. With ``offload_to_disk_path``, each group's
    tensors are written to ``<path>/<group>.safetensors`` and are not resident between uses.
    ``use_stream`` (CUDA only) copies the next block group on a side stream while the
    current one computes.
    """
    model, service = require(model, "group_offloading")
    if offload_state(model) is not None:
        raise OffloadError(f"group offloading is already enabled on this {type(model).__name__}; disable it first")
    if offload_type not in ("block_level", "leaf_level"):
        raise OffloadError(f"offload_type must be 'block_level' or 'leaf_level', got {offload_type!r}")
    if isinstance(num_blocks_per_group, bool) or num_blocks_per_group < 1:
        raise OffloadError(f"num_blocks_per_group must be an integer >= 1, got {num_blocks_per_group!r}")
    onload, offload = torch.device(onload_device), torch.device(offload_device)
    if use_stream and (onload.type != "cuda" or not torch.cuda.is_available()):
        raise OffloadError("use_stream=True needs CUDA and a CUDA onload_device")
    disk = _check_disk_folder(offload_to_disk_path) if offload_to_disk_path is not None else None
    lists = [_module_list(model, name) for name in service.block_lists]

    def group(name: str, roots: list[nn.Module], members: Any) -> OffloadGroup:
        return OffloadGroup(name, roots, members=members, onload_device=onload, offload_device=offload,
                            non_blocking=non_blocking or use_stream, pin_memory=use_stream)

    groups: list[OffloadGroup] = []
    if offload_type == "block_level":
        for list_name, blocks in zip(service.block_lists, lists, strict=True):
            for start in range(0, len(blocks), num_blocks_per_group):
                roots = list(blocks[start : start + num_blocks_per_group])
                end = start + len(roots) - 1
                name = f"{list_name}.{start}" if start == end else f"{list_name}.{start}-{end}"
                groups.append(group(name, roots, _under(roots)))
    else:
        for name, module in model.named_modules():
            if module is not model and any(True for _ in module.parameters(recurse=False)):
                groups.append(group(name, [module], _just(module)))
    claimed = [root for g in groups for root in g.roots]
    rest = group("rest", [model], _rest(model, claimed, recurse_claimed=offload_type == "block_level"))

    qualified = {id(t): n for n, t in [*model.named_parameters(remove_duplicate=False),
                                       *model.named_buffers(remove_duplicate=False)]}
    state = OffloadState(groups=groups, rest=rest, hooked=[], offload_type=offload_type, disk_folder=disk,
                         stream=_side_stream() if use_stream else None)
    written: list[Path] = []
    rest.private_copies = disk is not None
    try:
        for g in [*groups, rest]:
            if disk is not None and g is not rest:
                g.write_to_disk(disk, qualified)
                assert g.file is not None
                written.append(g.file)
            g.adopt()
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    _install_hooks(model, state)
    model.__dict__[_STATE] = state
    for g in [*groups, rest]:
        g.offload()
    return state


def _side_stream() -> Any:
    return torch.cuda.Stream()  # type: ignore[no-untyped-call]


def _under(roots: list[nn.Module]) -> Any:
    def members() -> Iterator[nn.Module]:
        for root in roots:
            yield from root.modules()
    return members


def _just(module: nn.Module) -> Any:
    def members() -> Iterator[nn.Module]:
        yield module
    return members


def _rest(model: nn.Module, claimed: list[nn.Module], *, recurse_claimed: bool) -> Any:
    def members() -> Iterator[nn.Module]:
        taken = {id(m) for root in claimed for m in (root.modules() if recurse_claimed else (root,))}
        for module in model.modules():
            if id(module) not in taken:
                yield module
    return members


def _install_hooks(model: nn.Module, state: OffloadState) -> None:
    add_hook(model, HOOK_NAME, _GroupHook(state, onload=state.rest, offload=state.rest))
    state.hooked.append(model)
    for index, g in enumerate(state.groups):
        following = state.groups[index + 1] if index + 1 < len(state.groups) else None
        first, last = g.roots[0], g.roots[-1]
        if first is last:
            add_hook(first, HOOK_NAME, _GroupHook(state, onload=g, offload=g, prefetch=following))
            state.hooked.append(first)
        else:
            add_hook(first, HOOK_NAME, _GroupHook(state, onload=g, offload=None, prefetch=following))
            add_hook(last, HOOK_NAME, _GroupHook(state, onload=None, offload=g))
            state.hooked += [first, last]


def disable_group_offloading(model: SupportsGroupOffloading) -> None:
    """Bring every weight back to the device it was on before offloading and remove the hooks."""
    model, _ = require(model, "group_offloading")
    state = offload_state(model)
    if state is None:
        raise OffloadError(f"group offloading is not enabled on this {type(model).__name__}")
    for g in [*state.groups, state.rest]:
        g.restore()
    for module in state.hooked:
        if get_hook(module, HOOK_NAME) is not None:
            remove_hook(module, HOOK_NAME)
    for g in state.groups:
        if g.file is not None:
            g.file.unlink(missing_ok=True)
    del model.__dict__[_STATE]
