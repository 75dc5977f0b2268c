"""Typed access to safetensors files.

The header is parsed and validated here, once, for every reader (folders, single files,
LoRA, IP-Adapter, offload files, ``inspect``): a file can be described (keys, shapes,
dtypes) without reading a tensor, and a truncated, foreign or forged file is refused with
the file and key named before a byte of tensor data is touched. ``publish`` moves a finished temporary file onto its target
atomically, so a model memory-mapped from a file survives being saved over that same file.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, cast

import attrs
import torch

from diffcaps.errors import CheckpointError

__all__ = ["DTYPES", "DuplicateKey", "SafetensorsHeader", "TensorInfo", "publish", "read_header", "strict_json"]

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
_MAX_ELEMENTS: Final = 2**63 - 1  # torch's limit on a shape's extent (int64 sizes and strides)
_FIELDS: Final = ("dtype", "shape", "data_offsets")


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


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


class DuplicateKey(Exception):
    """A JSON object names one key twice (``json`` would silently keep the last)."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise DuplicateKey(key)
        result[key] = value
    return result


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def strict_json(text: str) -> Any:
    """``json.loads`` refusing what the JSON standard does: ``NaN``/``Infinity`` and repeated keys.

    Raises ``DuplicateKey``, ``ValueError`` (bad JSON, integers too long) or ``RecursionError``.
    """
    return json.loads(text, object_pairs_hook=_unique, parse_constant=_no_constant)


def _parse(path: Path, raw: bytes) -> dict[str, Any]:
    try:
        parsed: Any = strict_json(raw.decode("utf-8"))
    except DuplicateKey as duplicate:
        raise CheckpointError(f"the header names {duplicate.key!r} twice", path=path) from None
    except RecursionError:
        raise _not_safetensors(path, "the header nests too deeply") from None
    except ValueError as exc:  # also bad UTF-8, and integers too long to convert
        raise _not_safetensors(path, f"the header is not JSON: {str(exc)[:200]}") from None
    if not isinstance(parsed, dict):
        raise _not_safetensors(path, f"the header is a JSON {type(parsed).__name__}, not an object")
    return cast(dict[str, Any], parsed)


def _is_count(value: object) -> bool:
    return type(value) is int and 0 <= value <= _MAX_ELEMENTS


def _entry(path: Path, key: str, entry: object) -> TensorInfo:
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"tensor {key!r}: {why}", path=path)

    if not isinstance(entry, dict):
        raise bad(f"expected an object with {', '.join(_FIELDS)}, got {_short(entry)}")
    fields = cast(dict[str, object], entry)
    absent = [name for name in _FIELDS if name not in fields]
    if absent:
        raise bad(f"the header entry lacks {', '.join(absent)}")
    name, shape, offsets = (fields[field] for field in _FIELDS)
    if not isinstance(name, str) or name not in DTYPES:
        raise bad(f"unknown dtype {_short(name)}; known: {', '.join(DTYPES)}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in cast(list[object], shape)):
        raise bad(f"shape {_short(shape)} is not a list of non-negative integers")
    dims = tuple(cast(list[int], shape))
    if math.prod(max(d, 1) for d in dims) > _MAX_ELEMENTS:
        raise bad(f"shape {_short(list(dims))} is too large for a tensor")
    if not (isinstance(offsets, list) and len(cast(list[object], offsets)) == 2
            and all(_is_count(o) for o in cast(list[object], offsets))):
        raise bad(f"data_offsets {_short(offsets)} is not a pair of non-negative integers [start, end]")
    start, end = cast(list[int], offsets)
    if start > end:
        raise bad(f"data_offsets [{start}, {end}] start after they end")
    dtype = DTYPES[name]
    expected = math.prod(dims) * dtype.itemsize
    if end - start != expected:
        raise bad(
            f"data_offsets [{start}, {end}] span {end - start} bytes, but {name} of shape {list(dims)} "
            f"takes {expected}"
        )
    return TensorInfo(dtype=dtype, shape=dims, start=start, end=end)


def _metadata(path: Path, value: object) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise CheckpointError(f"__metadata__ must be an object of strings, got {_short(value)}", path=path)
    for key, text in cast(dict[str, object], value).items():
        if not isinstance(text, str):
            raise CheckpointError(f"__metadata__ {key!r} must be a string, got {_short(text)}", path=path)
    return cast(dict[str, str], value)


def _check_spans(path: Path, tensors: Mapping[str, TensorInfo], data_bytes: int) -> None:
    """Spans must tile the data section: contiguous from 0, no overlap, no bytes left over."""
    position, previous = 0, ""
    for key, info in sorted(tensors.items(), key=lambda item: (item[1].start, item[1].end)):
        if info.start < position:
            raise CheckpointError(
                f"tensor {key!r}: data_offsets [{info.start}, {info.end}] overlap those of {previous!r}", path=path
            )
        if info.start > position:
            raise CheckpointError(
                f"tensor {key!r}: data_offsets [{info.start}, {info.end}] leave bytes {position}..{info.start} "
                "to no tensor (spans must follow each other from 0)",
                path=path,
            )
        position, previous = info.end, key
    if position > data_bytes:
        raise CheckpointError(
            f"truncated file: its header describes {position} bytes of data ending with {previous!r}, "
            f"the file holds {data_bytes}",
            path=path,
        )
    if position < data_bytes:
        raise CheckpointError(
            f"{data_bytes - position} bytes after the last tensor belong to no tensor of the header", path=path
        )


def read_header(path: str | os.PathLike[str]) -> SafetensorsHeader:
    """Parse and validate a safetensors header; reads no tensor.

    As strict as the format: a bounded header that is a JSON object, known dtypes, shapes of
    non-negative integers, and ``data_offsets`` that tile the data section exactly (each
    span shape × dtype size, contiguous from 0, no overlap, none past the end or short of
    it); ``__metadata__`` maps strings to strings. Any violation is a ``CheckpointError``
    naming the file and the key.
    """
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
                + (f" (at most {_MAX_HEADER_BYTES} allowed)" if header_len > _MAX_HEADER_BYTES else "")
            )
        raw = handle.read(header_len)
    parsed = _parse(path, raw)
    metadata = _metadata(path, parsed.pop("__metadata__", None))
    tensors = {key: _entry(path, key, entry) for key, entry in parsed.items()}
    data_start = 8 + header_len
    _check_spans(path, tensors, size - data_start)
    return SafetensorsHeader(path=path, tensors=tensors, metadata=metadata, data_start=data_start)


def publish(temporary: Path, path: Path) -> None:
    """Move a finished temporary file onto ``path`` atomically, with the usual permissions.

    (Temporary files are created private; a saved model should be as readable as any file
    the user creates.)
    """
    mask = os.umask(0o022)
    os.umask(mask)
    os.chmod(temporary, 0o666 & ~mask)
    os.replace(temporary, path)
