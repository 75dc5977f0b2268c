"""Write safetensors files one tensor at a time, so that a save never holds all the weights twice.

The header is computed up front from each tensor's name, dtype and shape (a ``TensorSlot``);
tensors are then produced in that order and written as they come. A single file is written
to a temporary name beside the target and renamed when complete; a diffusers folder (weights,
index and ``config.json``) is built as a whole beside the target folder and swapped in when
complete (see ``_staging``). A failure, or a killed process, leaves the old file or folder
as it was. This is the only safetensors writer in diffcaps: ``save_safetensors`` (a dict at
once) and ``write_weights`` (a diffusers folder) use it too.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any, BinaryIO, Final

import attrs
import torch

from diffcaps.io._folder import CONFIG_NAME, INDEX_NAME, WEIGHTS_NAME, parse_size
from diffcaps.io._safetensors import DTYPES
from diffcaps.io._staging import staged_file, staged_folder

__all__ = [
    "Progress",
    "TensorSlot",
    "save_safetensors",
    "stream_safetensors",
    "stream_shards",
    "write_weights",
]

_DTYPE_NAMES: Final[Mapping[torch.dtype, str]] = {dtype: name for name, dtype in DTYPES.items()}
_ALIGN: Final = 8

Progress = Callable[[int, int], None]
"""Called with (bytes written so far, bytes to write in all)."""


@attrs.frozen
class TensorSlot:
    """One tensor of a file still to be written: its name, dtype and shape."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data."""
        count = 1
        for size in self.shape:
            count *= size
        return count * self.dtype.itemsize


def _header_bytes(slots: Sequence[TensorSlot], metadata: Mapping[str, str] | None) -> bytes:
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for slot in slots:
        if slot.dtype not in _DTYPE_NAMES:
            raise ValueError(f"safetensors cannot store {slot.dtype} (tensor {slot.key!r})")
        header[slot.key] = {
            "dtype": _DTYPE_NAMES[slot.dtype],
            "shape": list(slot.shape),
            "data_offsets": [offset, offset + slot.nbytes],
        }
        offset += slot.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-(len(raw) + 8) % _ALIGN)
    return len(raw).to_bytes(8, "little") + raw


def _write_tensor(handle: BinaryIO, slot: TensorSlot, tensor: torch.Tensor) -> None:
    if tensor.dtype != slot.dtype or tuple(tensor.shape) != slot.shape:
        raise ValueError(
            f"tensor {slot.key!r} arrived as {tensor.dtype} {list(tensor.shape)}, "
            f"the header says {slot.dtype} {list(slot.shape)}"
        )
    if slot.nbytes:
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        handle.write(data.numpy().data)


def _write_files(
    files: Sequence[tuple[Path, Sequence[TensorSlot]]],
    tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    metadata: Mapping[str, str] | None,
    progress: Progress | None,
) -> list[Path]:
    """Write one stream of tensors across several files, each holding its slots in order.

    Every file is written beside its target and renamed onto it only once the whole stream
    has been written.
    """
    stream: Iterator[tuple[str, torch.Tensor]] = iter(tensors)
    total = sum(slot.nbytes for _, slots in files for slot in slots)
    done = 0
    with ExitStack() as stack:
        temporaries = [stack.enter_context(staged_file(path)) for path, _ in files]
        for (_, slots), temporary in zip(files, temporaries, strict=True):
            with temporary.open("wb") as handle:
                handle.write(_header_bytes(slots, metadata))
                for slot in slots:
                    key, tensor = next(stream, (None, None))
                    if key is None or tensor is None:
                        raise ValueError(f"the tensor stream ended before {slot.key!r}")
                    if key != slot.key:
                        raise ValueError(f"expected tensor {slot.key!r} next, got {key!r}")
                    _write_tensor(handle, slot, tensor)
                    del tensor
                    done += slot.nbytes
                    if progress is not None:
                        progress(done, total)
        leftover = next(stream, None)
        if leftover is not None:
            raise ValueError(f"tensor {leftover[0]!r} has no slot in the files being written")
    return [path for path, _ in files]


def stream_safetensors(
    path: str | os.PathLike[str],
    slots: Sequence[TensorSlot],
    tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    metadata: Mapping[str, str] | None = None,
    progress: Progress | None = None,
) -> Path:
    """Write ``tensors`` (in ``slots`` order, names and shapes checked) as one safetensors file."""
    return _write_files([(Path(path), slots)], tensors, metadata=metadata, progress=progress)[0]


def save_safetensors(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    *,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write a dict of tensors as one safetensors file, atomically (widest dtypes first, aligned)."""
    slots = sorted((TensorSlot(key, t.dtype, tuple(t.shape)) for key, t in tensors.items()),
                   key=lambda slot: -slot.dtype.itemsize)
    return stream_safetensors(path, slots, ((slot.key, tensors[slot.key]) for slot in slots), metadata=metadata)


def _plan_shards(folder: Path, slots: Sequence[TensorSlot], limit: int) -> list[tuple[Path, list[TensorSlot]]]:
    groups: list[list[TensorSlot]] = [[]]
    used = 0
    for slot in slots:
        if groups[-1] and used + slot.nbytes > limit:
            groups.append([])
            used = 0
        groups[-1].append(slot)
        used += slot.nbytes
    if len(groups) == 1:
        return [(folder / WEIGHTS_NAME, groups[0])]
    stem = WEIGHTS_NAME.removesuffix(".safetensors")
    return [
        (folder / f"{stem}-{number:05d}-of-{len(groups):05d}.safetensors", group)
        for number, group in enumerate(groups, start=1)
    ]


def _write_index(index: Path, files: Sequence[tuple[Path, Sequence[TensorSlot]]]) -> None:
    weight_map = {slot.key: path.name for path, slots in files for slot in slots}
    total = sum(slot.nbytes for _, slots in files for slot in slots)
    payload = {"metadata": {"total_size": total}, "weight_map": weight_map}
    index.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")


_SHARD: Final = re.compile(re.escape(WEIGHTS_NAME.removesuffix(".safetensors")) + r"-\d+-of-\d+\.safetensors")


def replaced_by_save(name: str) -> bool:
    """Whether a folder save replaces this entry: ``config.json`` and the diffusers safetensors weights.

    That is ``diffusion_pytorch_model.safetensors``, its shards
    (``diffusion_pytorch_model-00001-of-00002.safetensors``, ...) and their index. Anything
    else in the folder (a README, other files, subfolders) is kept by a save.
    """
    return name in (CONFIG_NAME, WEIGHTS_NAME, INDEX_NAME) or _SHARD.fullmatch(name) is not None


def stream_shards(
    folder: Path,
    slots: Sequence[TensorSlot],
    tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    config: Mapping[str, Any],
    max_shard_size: int | str,
    progress: Progress | None = None,
) -> list[Path]:
    """Write a diffusers model folder: ``config``, and one weight file or shards of at most ``max_shard_size`` plus an index.

    The new folder is built beside ``folder`` and swapped in whole once complete, so the
    folder always holds one save's weights, index and config together: a failed or killed
    write leaves the old folder as it was, and of concurrent writes one wins whole. What is
    replaced is ``config.json`` and the weight files (see :func:`replaced_by_save`); every other
    file or subfolder in ``folder`` is carried into the new folder. Leftovers of a killed
    write are removed by the next one. Returns the files written (their final paths),
    weights first, then the index when there is one, then ``config.json``.
    """
    planned = _plan_shards(folder, slots, parse_size(max_shard_size))
    with staged_folder(folder, replaced_by_save) as stage:
        files = [(stage / path.name, group) for path, group in planned]
        names = [path.name for path in _write_files(files, tensors, metadata=None, progress=progress)]
        if len(files) > 1:
            _write_index(stage / INDEX_NAME, files)
            names.append(INDEX_NAME)
        (stage / CONFIG_NAME).write_text(json.dumps(dict(config), indent=2) + "\n", encoding="utf-8")
        names.append(CONFIG_NAME)
    return [folder / name for name in names]


def write_weights(
    state: Mapping[str, torch.Tensor],
    folder: Path,
    *,
    config: Mapping[str, Any],
    max_shard_size: int | str,
) -> list[Path]:
    """Write a state dict and its config as a diffusers model folder, swapped in whole (see :func:`stream_shards`).

    Tensors are written one at a time: one safetensors file, or shards plus an index when
    the weights are larger than ``max_shard_size``.
    """
    slots = [TensorSlot(key, tensor.dtype, tuple(tensor.shape)) for key, tensor in state.items()]
    return stream_shards(folder, slots, state.items(), config=config, max_shard_size=max_shard_size)
