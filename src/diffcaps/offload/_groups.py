"""Offload groups: sets of modules whose parameters move to the compute device together.

A group is defined by its root modules; its tensors are the direct parameters and buffers
of every module under those roots that no other group claims, looked up afresh each time
the group moves. Modules added later (peft adapter layers inside a block) therefore move
with the block they sit in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from diffcaps.io import SafetensorsReader, save_safetensors

__all__ = ["OffloadGroup", "Slot"]

Slot = tuple[nn.Module, str, bool]
"""(owning module, tensor name, is a buffer)."""


def _tensor(slot: Slot) -> torch.Tensor:
    module, name, is_buffer = slot
    return module.get_buffer(name) if is_buffer else module.get_parameter(name)


class OffloadGroup:
    """One group's tensors, where they rest while offloaded, and the moves between devices."""

    def __init__(
        self,
        name: str,
        roots: list[nn.Module],
        *,
        members: Callable[[], Iterator[nn.Module]],
        onload_device: torch.device,
        offload_device: torch.device,
        non_blocking: bool = False,
        pin_memory: bool = False,
    ) -> None:
        self.name = name
        self.roots = roots
        self._members = members
        self.onload_device = onload_device
        self.offload_device = offload_device
        self.non_blocking = non_blocking
        self.pin_memory = pin_memory
        self.file: Path | None = None
        self.disk_keys: dict[int, str] = {}
        self.resting: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.home: dict[int, torch.device] = {}
        self.onloaded = False
        self.moves = 0
        self.private_copies = False

    def slots(self) -> Iterator[tuple[str, Slot]]:
        """(qualified name under the group's modules, slot) for every tensor the group holds now."""
        for module in self._members():
            for name, _ in module.named_parameters(recurse=False, remove_duplicate=False):
                yield name, (module, name, False)
            for name, _ in module.named_buffers(recurse=False, remove_duplicate=False):
                yield name, (module, name, True)

    def tensors(self) -> Iterator[torch.Tensor]:
        """The group's parameters and buffers as they are now."""
        for _, slot in self.slots():
            yield _tensor(slot)

    def _rest_copy(self, tensor: torch.Tensor) -> torch.Tensor:
        # A private copy when other groups live on disk: a tensor loaded from a file may be a
        # view of that file's mapping, which would keep every page read so far resident.
        copy = tensor.detach().to(self.offload_device, copy=self.private_copies)
        if self.pin_memory and copy.device.type == "cpu" and not copy.is_pinned():
            copy = copy.pin_memory()
        return copy

    def adopt(self) -> None:
        """Take the group's current tensors as the ones to keep while offloaded (at enable)."""
        for _, slot in self.slots():
            tensor = _tensor(slot)
            self.home[id(tensor)] = tensor.device
            if id(tensor) not in self.disk_keys:
                self.resting[id(tensor)] = (tensor, self._rest_copy(tensor))

    def write_to_disk(self, folder: Path, qualified: dict[int, str]) -> None:
        """Keep this group's tensors in ``folder/<group>.safetensors`` instead of memory."""
        path = folder / f"{self.name}.safetensors"
        state: dict[str, torch.Tensor] = {}
        for _, slot in self.slots():
            tensor = _tensor(slot)
            key = qualified[id(tensor)]
            state[key] = tensor.detach().cpu()
            self.disk_keys[id(tensor)] = key
        save_safetensors(state, path)
        self.file = path

    def onload(self) -> None:
        """Bring every tensor of the group to the onload device."""
        reader = SafetensorsReader(self.file) if self.file is not None and self.disk_keys else None
        try:
            resting: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
            for _, slot in self.slots():
                tensor = _tensor(slot)
                key = self.disk_keys.get(id(tensor))
                if key is not None and reader is not None:
                    tensor.data = reader.get(key).to(self.onload_device, non_blocking=self.non_blocking)
                    continue
                known = self.resting.get(id(tensor))
                if known is None or known[0] is not tensor:  # a tensor added since the group was made
                    self.home.setdefault(id(tensor), tensor.device)
                    known = (tensor, self._rest_copy(tensor))
                resting[id(tensor)] = known
                tensor.data = known[1].to(self.onload_device, non_blocking=self.non_blocking)
            self.resting = resting
        finally:
            if reader is not None:
                reader.close()
        self.onloaded = True
        self.moves += 1

    def offload(self) -> None:
        """Send the group's tensors back to where they rest: the offload device, or the disk."""
        for _, slot in self.slots():
            tensor = _tensor(slot)
            if id(tensor) in self.disk_keys:
                # One shared zero with the right shape: shape queries work, nothing is resident.
                tensor.data = torch.zeros((), dtype=tensor.dtype, device=self.offload_device).expand(tensor.shape)
            elif id(tensor) in self.resting:
                tensor.data = self.resting[id(tensor)][1]
        self.onloaded = False

    def restore(self) -> None:
        """Put every tensor back on the device it was on before offloading (at disable)."""
        self.onload()
        for _, slot in self.slots():
            tensor = _tensor(slot)
            home = self.home.get(id(tensor), self.onload_device)
            if tensor.device != home:
                tensor.data = tensor.data.to(home)
        self.onloaded = False
