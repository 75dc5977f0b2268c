"""Typed access to safetensors files.

The header is parsed here, so that a file can be described (keys, shapes, dtypes) without
reading a tensor, and so that a truncated or foreign file is named as such before
``safetensors`` sees it. ``publish`` moves a finished temporary file onto its target
atomically, so a model memory-mapped from a file survives being saved over that same file.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import attrs
import torch

from diffcaps.errors import CheckpointError

__all__ = ["DTYPES", "SafetensorsHeader", "TensorInfo", "publish", "read_header"]

DTYPES: Final[Mapping[str, torch.dtype]] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}

_MAX_HEADER_BYTES: Final = 100 * 1024 * 1024


@attrs.frozen
class TensorInfo:
    """What the header says about one tensor: its dtype, shape and byte range."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in the file."""
        return self.end - self.start


@attrs.frozen
class SafetensorsHeader:
    """The parsed header of a safetensors file."""

    path: Path
    tensors: Mapping[str, TensorInfo]
    metadata: Mapping[str, str]
    data_start: int

    @property
    def total_bytes(self) -> int:
        """Bytes of tensor data in the file."""
        return sum(info.nbytes for info in self.tensors.values())


def _not_safetensors(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"not a safetensors file ({why})", path=path)


def read_header(path: str | os.PathLike[str]) -> SafetensorsHeader:
    """Parse a safetensors header, checking that the file is complete; reads no tensor."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError("no such file", path=path)
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise _not_safetensors(path, f"{size} bytes, shorter than the 8-byte header length")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(_MAX_HEADER_BYTES, size - 8):
            raise _not_safetensors(
                path, f"the header length field says {header_len} bytes, the file has {size}"
            )
        raw = handle.read(header_len)
    try:
        parsed: Any = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _not_safetensors(path, f"the header is not JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise _not_safetensors(path, "the header is not a JSON object")
    metadata = parsed.pop("__metadata__", None) or {}
    tensors: dict[str, TensorInfo] = {}
    data_end = 0
    for key, entry in parsed.items():
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            start, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise _not_safetensors(path, f"malformed header entry for key {key!r}") from None
        tensors[key] = TensorInfo(dtype=dtype, shape=shape, start=start, end=end)
        data_end = max(data_end, end)
    data_start = 8 + header_len
    if data_start + data_end > size:
        raise CheckpointError(
            f"truncated file: its header describes {data_start + data_end} bytes, "
            f"the file has {size}",
            path=path,
        )
    return SafetensorsHeader(
        path=path,
        tensors=tensors,
        metadata={str(k): str(v) for k, v in metadata.items()},
        data_start=data_start,
    )


def publish(temporary: Path, path: Path) -> None:
    """Move a finished temporary file onto ``path`` atomically, with the usual permissions.

    (Temporary files are created private; a saved model should be as readable as any file
    the user creates.)
    """
    mask = os.umask(0o022)
    os.umask(mask)
    os.chmod(temporary, 0o666 & ~mask)
    os.replace(temporary, path)
