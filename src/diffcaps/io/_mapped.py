"""Zero-copy, memory-mapped access to the tensors of a safetensors file.

``MappedSafetensors.view(key)`` returns a tensor that points straight into the mapped file:
nothing is read until its bytes are touched. A caller may keep such a view as it is (the
mapping is private, copy-on-write: writing to it never touches the file, and the mapping
lives as long as any view does), or copy and cast what it keeps and then ``release(key)``,
which drops that tensor's pages from this process's resident set — so reading a whole file
one tensor at a time holds about one tensor's pages beyond what the caller keeps. The page
cache still holds them for the next reader.
"""

from __future__ import annotations

import mmap
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Self

import torch

from diffcaps.errors import CheckpointError
from diffcaps.io._safetensors import SafetensorsHeader, TensorInfo, read_header

__all__ = ["MappedSafetensors", "SafetensorsReader"]

_PAGE = mmap.PAGESIZE
_CAN_ADVISE = hasattr(mmap.mmap, "madvise") and hasattr(mmap, "MADV_DONTNEED") and hasattr(mmap, "MADV_WILLNEED")


class MappedSafetensors:
    """A safetensors file mapped read-only (copy-on-write, never written back)."""

    def __init__(self, path: str | os.PathLike[str], *, header: SafetensorsHeader | None = None) -> None:
        self.header = header if header is not None else read_header(path)
        self.path = Path(path)
        if sys.byteorder != "little":
            raise CheckpointError("safetensors data is little-endian; this machine is not", path=self.path)
        self._file = self.path.open("rb")
        size = os.fstat(self._file.fileno()).st_size
        self._map: mmap.mmap | None = (
            mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_COPY) if size else None
        )
        self._span = (0, 0)
        if self._map is not None:
            whole = torch.frombuffer(self._map, dtype=torch.uint8)
            self._span = (whole.data_ptr(), whole.data_ptr() + size)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Let go of the file. Views still alive (a model's weights) keep the mapping until freed."""
        # Never mmap.close(): views hold a reference to the map, not a buffer export, so
        # closing would unmap memory they still use. The map is unmapped when the last goes.
        self._map = None
        self._file.close()

    def __iter__(self) -> Iterator[str]:
        return iter(self.header.tensors)

    def __contains__(self, key: object) -> bool:
        return key in self.header.tensors

    def info(self, key: str) -> TensorInfo:
        """Dtype, shape and byte range of one tensor, from the header."""
        return self.header.tensors[key]

    def view(self, key: str, *, prefetch: bool = True) -> torch.Tensor:
        """The tensor ``key`` as a view into the mapped file: no bytes are read yet.

        ``prefetch`` asks the kernel to start reading its pages now (for a view about to be
        copied); leave it off for a view that is kept, so pages are read on first use.

        Copy what you keep (``.to(..., copy=True)``): the view is only valid while the file
        is open, and its memory belongs to the mapping.
        """
        info = self.header.tensors[key]
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        if self._map is None:
            raise CheckpointError("the file was closed before reading", path=self.path)
        start = self.header.data_start + info.start
        if prefetch and _CAN_ADVISE:
            self._map.madvise(mmap.MADV_WILLNEED, *_pages(start, info.nbytes))
        raw = torch.frombuffer(self._map, dtype=torch.uint8, count=info.nbytes, offset=start)
        if start % info.dtype.itemsize:  # a writer that did not align: copy once to realign
            raw = raw.clone()
        return raw.view(info.dtype).reshape(info.shape)

    def backs(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor``'s memory is this file's mapping (a view, not a copy)."""
        pointer = tensor.untyped_storage().data_ptr()
        return tensor.device.type == "cpu" and self._span[0] <= pointer < self._span[1]

    def standalone(self, tensor: torch.Tensor) -> torch.Tensor:
        """The same bytes of the mapping as ``tensor``, with a storage of its own.

        Parts cut from one fused tensor would otherwise share its storage, which writers
        (safetensors among them) refuse to save as separate tensors.
        """
        if self._map is None or not self.backs(tensor) or not tensor.is_contiguous():
            raise ValueError("standalone() takes a contiguous view of this open file")
        offset = tensor.data_ptr() - self._span[0]
        raw = torch.frombuffer(self._map, dtype=torch.uint8, count=tensor.nbytes, offset=offset)
        return raw.view(tensor.dtype).reshape(tensor.shape)

    def release(self, key: str) -> None:
        """Drop the pages of ``key`` from this process's memory (they stay in the page cache)."""
        info = self.header.tensors[key]
        if self._map is None or info.nbytes == 0 or not _CAN_ADVISE:
            return
        self._map.madvise(mmap.MADV_DONTNEED, *_pages(self.header.data_start + info.start, info.nbytes))


def _pages(start: int, length: int) -> tuple[int, int]:
    first = start - start % _PAGE
    return first, start + length - first


class SafetensorsReader(MappedSafetensors):
    """A mapped safetensors file whose tensors are handed out ready to keep.

    ``get(key)`` returns the zero-copy view (copy-on-write: writing to it never reaches the
    file) when no cast or device move is needed; otherwise a cast copy, after which the
    tensor's pages are released, so reading a file one tensor at a time and casting holds
    about one tensor of the file beyond what the caller keeps.
    """

    def __init__(self, path: str | os.PathLike[str], *, device: str | torch.device = "cpu",
                 header: SafetensorsHeader | None = None) -> None:
        super().__init__(path, header=header)
        self.device = torch.device(device)

    def keys(self) -> list[str]:
        """Tensor names in the file, in header order."""
        return list(self.header.tensors)

    def get(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor on ``device``, cast to ``dtype`` when given."""
        stored = self.header.tensors[key].dtype
        keep_view = (dtype is None or dtype == stored) and self.device.type == "cpu"
        view = self.view(key, prefetch=not keep_view)
        if keep_view:
            return view
        kept = view.to(device=self.device, dtype=dtype or view.dtype, copy=True)
        del view
        self.release(key)
        return kept
