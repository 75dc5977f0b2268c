"""``enable`` / ``disable`` / ``active``: weights live off the compute device, group by group."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final, final

import attrs
import torch
from torch import nn

from diffcaps import checks
from diffcaps.errors import OffloadError
from diffcaps.hooks import Hook, add_hook, get_hook, remove_hook
from diffcaps.offload._config import GroupOffloadingConfig
from diffcaps.offload._groups import OffloadGroup
from diffcaps.protocols import SupportsGroupOffloading, require
from diffcaps.slots import InstanceSlot

__all__ = ["active", "disable", "enable", "groups"]

HOOK_NAME: Final = "group_offloading"

Members = Callable[[], Iterator[nn.Module]]
"""The modules a group holds, looked up afresh at each move."""


@final
@attrs.define
class OffloadState:
    """What ``enable`` set up on one model instance: the config, the groups, the hooked modules."""

    config: GroupOffloadingConfig
    groups: list[OffloadGroup]
    rest: OffloadGroup
    hooked: list[nn.Module]
    disk_folder: Path | None
    stream: torch.cuda.Stream | None = None


_SLOT: Final = InstanceSlot("group_offloading", OffloadState)


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


def _onload_with_stream(group: OffloadGroup, following: OffloadGroup | None, stream: torch.cuda.Stream) -> None:
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


def _check_device(device: torch.device, what: str) -> None:
    """Refuse a device that this torch build or machine cannot allocate on (probed with an empty tensor)."""
    if device.type == "meta":
        raise OffloadError(f"{what} 'meta' holds no data: weights moved there would be lost")
    try:
        torch.empty(0, device=device)
    except Exception as exc:  # each backend fails its own way: AssertionError for CUDA on a CPU build, …
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise OffloadError(f"{what} {str(device)!r} cannot be used by this torch build or machine: {reason}") from None


def enable(model: SupportsGroupOffloading, config: GroupOffloadingConfig) -> None:
    """Keep the model's weights off the compute device and bring each group in only to run.

    What belongs to no group (embedders, output head, later additions) forms a last group
    that is onloaded for the whole forward. See :class:`GroupOffloadingConfig` for the
    settings. Enabling twice is an error: ``disable`` first.
    """
    checks.instance(config, GroupOffloadingConfig, "config", OffloadError)
    module, service = require(model, "group_offloading")
    if _SLOT.get(module) is not None:
        raise OffloadError(f"group offloading is already enabled on this {type(module).__name__}; disable it first")
    _check_device(config.onload_device, "onload_device")
    _check_device(config.offload_device, "offload_device")
    if config.use_stream and not torch.cuda.is_available():
        raise OffloadError("use_stream=True needs CUDA and a CUDA onload_device")
    disk = _check_disk_folder(config.offload_to_disk_path) if config.offload_to_disk_path is not None else None
    lists = [_module_list(module, name) for name in service.block_lists]

    def group(name: str, roots: list[nn.Module], members: Members) -> OffloadGroup:
        return OffloadGroup(name, roots, members=members, onload_device=config.onload_device,
                            offload_device=config.offload_device, non_blocking=config.non_blocking or config.use_stream,
                            pin_memory=config.use_stream)

    groups: list[OffloadGroup] = []
    per_group = config.num_blocks_per_group
    if config.offload_type == "block_level":
        for list_name, blocks in zip(service.block_lists, lists, strict=True):
            for start in range(0, len(blocks), per_group):
                roots = list(blocks[start : start + per_group])
                end = start + len(roots) - 1
                name = f"{list_name}.{start}" if start == end else f"{list_name}.{start}-{end}"
                groups.append(group(name, roots, _under(roots)))
    else:
        for name, leaf in module.named_modules():
            if leaf is not module and any(True for _ in leaf.parameters(recurse=False)):
                groups.append(group(name, [leaf], _just(leaf)))
    claimed = [root for g in groups for root in g.roots]
    rest = group("rest", [module], _rest(module, claimed, recurse_claimed=config.offload_type == "block_level"))

    qualified = {id(t): n for n, t in [*module.named_parameters(remove_duplicate=False),
                                       *module.named_buffers(remove_duplicate=False)]}
    state = OffloadState(config=config, groups=groups, rest=rest, hooked=[], disk_folder=disk,
                         stream=_side_stream() if config.use_stream else None)
    written: list[Path] = []
    rest.private_copies = disk is not None
    try:
        for g in [*groups, rest]:
            if disk is not None and g is not rest:
                g.write_to_disk(disk, qualified)
                assert g.file is not None
                written.append(g.file)
            g.adopt()
        _install_hooks(module, state)
    except BaseException:  # nothing has moved yet: undo the hooks and files, and the model is as it was
        _remove_hooks(state)
        for path in written:
            path.unlink(missing_ok=True)
        raise
    _SLOT.set(module, state)
    for g in [*groups, rest]:
        g.offload()


def _side_stream() -> torch.cuda.Stream:
    make: Callable[[], torch.cuda.Stream] = torch.cuda.Stream  # its __init__ is untyped in torch
    return make()


def _under(roots: list[nn.Module]) -> Members:
    def members() -> Iterator[nn.Module]:
        for root in roots:
            yield from root.modules()
    return members


def _just(module: nn.Module) -> Members:
    def members() -> Iterator[nn.Module]:
        yield module
    return members


def _rest(model: nn.Module, claimed: list[nn.Module], *, recurse_claimed: bool) -> Members:
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
            state.hooked.append(first)
            add_hook(last, HOOK_NAME, _GroupHook(state, onload=None, offload=g))
            state.hooked.append(last)


def _remove_hooks(state: OffloadState) -> None:
    for module in state.hooked:
        if get_hook(module, HOOK_NAME) is not None:
            remove_hook(module, HOOK_NAME)
    state.hooked.clear()


def disable(model: SupportsGroupOffloading) -> None:
    """Bring every weight back to the device it was on before offloading and remove the hooks.

    Nothing happens if offloading is off.
    """
    module, _ = require(model, "group_offloading")
    state = _SLOT.clear(module)
    if state is None:
        return
    for g in [*state.groups, state.rest]:
        g.restore()
    _remove_hooks(state)
    for g in state.groups:
        if g.file is not None:
            g.file.unlink(missing_ok=True)


def active(model: SupportsGroupOffloading) -> GroupOffloadingConfig | None:
    """The config offloading runs with, or ``None`` when it is off."""
    module, _ = require(model, "group_offloading")
    state = _SLOT.get(module)
    return None if state is None else state.config


def groups(model: SupportsGroupOffloading) -> tuple[OffloadGroup, ...]:
    """The offload groups in execution order, the rest group last (empty when offloading is off)."""
    module, _ = require(model, "group_offloading")
    state = _SLOT.get(module)
    return () if state is None else (*state.groups, state.rest)
