"""GGUF files read through the ``gguf`` package's ``GGUFReader``, memory-mapped.

:func:`read_gguf` parses the header (metadata and tensor table) and checks every read stays
inside the file, so a truncated or forged file is a :class:`~diffcaps.errors.CheckpointError`
naming it, never a numpy error or a loop over a forged count. :meth:`GGUFFile.raw` hands out a
tensor's bytes as a view of the mapped file (copy-on-write: nothing is read until used):
packed rows (uint8, ``[*outer, row_bytes]``) for block types, the typed tensor for F32/F16/BF16.
Shapes are given in torch order (GGUF stores them innermost first).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, Literal, final

import attrs
import numpy as np
import torch
from torch import Tensor

from diffcaps.errors import CheckpointError
from diffcaps.quantization.spec import gguf_codec
from diffcaps.weights._variants import TensorSpec

__all__ = ["GGUF_MAGIC", "PLAIN_TYPES", "GGUFFile", "GGUFTensorInfo", "is_gguf", "read_gguf"]

GGUF_MAGIC: Final = b"GGUF"
PLAIN_TYPES: Final[Mapping[str, torch.dtype]] = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
"""The GGUF types stored as plain floats: they load as tensors, never packed."""

INSTALL: Final = 'reading GGUF files needs the gguf package: pip install "diffcaps[gguf]"'


def is_gguf(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names a GGUF file: a ``.gguf`` name, or the GGUF magic in its first bytes."""
    if str(path).lower().endswith(".gguf"):
        return True
    try:
        with open(path, "rb") as handle:
            return handle.read(4) == GGUF_MAGIC
    except OSError:
        return False


@final
@attrs.frozen
class GGUFTensorInfo:
    """One tensor of a GGUF file: its GGUF type, its shape (torch order) and where its bytes are."""

    name: str
    kind: str
    """The GGUF type name (``Q4_K``, ``F16``, …)."""
    shape: tuple[int, ...]
    offset: int
    """Where its bytes start in the file."""
    nbytes: int

    @property
    def packed(self) -> bool:
        """Whether the tensor is stored in blocks (every type but F32/F16/BF16)."""
        return self.kind not in PLAIN_TYPES

    @property
    def numel(self) -> int:
        """How many values it holds."""
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


def _reader_class() -> type[Any]:
    try:
        from gguf import GGUFReader
    except ImportError:
        raise CheckpointError(INSTALL) from None

    class BoundedReader(GGUFReader):
        """GGUFReader refusing any read past the end of the file (its own reads return short arrays)."""

        def _get(self, offset: int, dtype: Any, count: int = 1,
                 override_order: Literal["I", "S", "<"] | None = None) -> Any:
            count = int(count)
            end = int(offset) + np.dtype(dtype).itemsize * count
            if offset < 0 or count < 0 or end > len(self.data):
                raise EOFError(f"a read of {count} item(s) at byte {offset} ends past the end of the file")
            return super()._get(offset, dtype, count, override_order)

    return BoundedReader


@final
class GGUFFile:
    """A GGUF file's metadata and tensor table, its bytes mapped copy-on-write."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        where = str(path)
        try:
            with open(path, "rb") as handle:
                magic = handle.read(4)
        except OSError as exc:
            raise CheckpointError(f"cannot read the file: {exc.strerror or exc}", path=where) from None
        if magic != GGUF_MAGIC:
            raise CheckpointError(f"not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r})", path=where)
        reader_class = _reader_class()
        try:
            reader = reader_class(where, mode="c")
            tensors = {t.name: _info(t) for t in reader.tensors}
            architecture = _string_field(reader, "general.architecture")
        except (ValueError, KeyError, IndexError, OverflowError, TypeError, EOFError, MemoryError) as exc:
            raise CheckpointError(f"not a readable GGUF file: {exc}", path=where) from None
        self._bytes: np.ndarray[Any, np.dtype[np.uint8]] = reader.data
        self.architecture: str | None = architecture
        self.tensors: Mapping[str, GGUFTensorInfo] = tensors
        self.size = int(len(reader.data))

    def specs(self) -> dict[str, TensorSpec]:
        """Shape of every tensor, for key mapping and variant detection (dtype: uint8 when packed)."""
        return {
            name: TensorSpec(shape=info.shape, dtype=PLAIN_TYPES.get(info.kind, torch.uint8))
            for name, info in self.tensors.items()
        }

    def raw(self, name: str) -> Tensor:
        """The tensor's bytes as stored, a view of the mapped file: packed rows, or the typed tensor."""
        info = self.tensors[name]
        data = torch.from_numpy(self._bytes[info.offset:info.offset + info.nbytes])
        if not info.packed:
            dtype = PLAIN_TYPES[info.kind]
            if info.offset % dtype.itemsize:  # a writer that did not align: copy once to realign
                data = data.clone()
            return data.view(dtype).reshape(info.shape)
        rows = info.shape[:-1] if len(info.shape) > 1 else (1,)
        row_bytes = info.nbytes // int(np.prod(rows, dtype=np.int64))
        return data.reshape(*rows, row_bytes) if len(info.shape) > 1 else data.reshape(row_bytes)


    def dense(self, name: str) -> Tensor:
        """The tensor as stored (F32/F16/BF16, a view of the file), or decoded into float32."""
        info = self.tensors[name]
        raw = self.raw(name)
        return gguf_codec(info.kind).decode(raw, torch.Size(info.shape), torch.float32) if info.packed else raw


def _info(tensor: Any) -> GGUFTensorInfo:
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    if any(d <= 0 for d in shape):
        raise ValueError(f"tensor {tensor.name} has an empty dimension in shape {list(shape)}")
    return GGUFTensorInfo(name=str(tensor.name), kind=str(tensor.tensor_type.name), shape=shape,
                          offset=int(tensor.data_offset), nbytes=int(tensor.n_bytes))


def _string_field(reader: Any, key: str) -> str | None:
    field = reader.get_field(key)
    if field is None:
        return None
    value = field.contents()
    return value if isinstance(value, str) else None


def read_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Parse a GGUF file's header (``CheckpointError`` naming the file when it is not one or is cut short)."""
    return GGUFFile(path)
