"""The one safetensors header validator: every malformed header is a named ``CheckpointError``.

Each bad file is made by hand, byte by byte. The reference ``safetensors`` library is the
independent oracle: it must refuse the same file (or, for the good files, read it too).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
import safetensors
import torch

from diffcaps.errors import CheckpointError
from diffcaps.io import MappedSafetensors, SafetensorsReader, read_header


def raw_file(path: Path, header: bytes | dict[str, Any], data: bytes = b"", *, length: int | None = None) -> Path:
    """A safetensors file from a header (JSON text or an object) and data bytes."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)
    return path


def entry(dtype: object = "F32", shape: Any = (2,), offsets: Any = (0, 8)) -> dict[str, Any]:
    """One header entry."""
    return {"dtype": dtype, "shape": list(shape) if isinstance(shape, tuple) else shape,
            "data_offsets": list(offsets) if isinstance(offsets, tuple) else offsets}


def safetensors_refuses(path: Path) -> bool:
    """Whether the reference library refuses to read every tensor of the file."""
    try:
        with safetensors.safe_open(str(path), "pt") as handle:
            for key in handle.keys():
                handle.get_tensor(key)
    except Exception:  # the reference raises several types; any refusal counts
        return True
    return False


EIGHT = bytes(range(8))

# name → (header, data, the text the error must contain besides the file's name)
BAD: dict[str, tuple[bytes | dict[str, Any], bytes, str]] = {
    "zero-length span, non-empty shape": ({"w": entry(offsets=(0, 0))}, b"", "'w': data_offsets [0, 0] span 0 bytes"),
    "negative offset": ({"w": entry(offsets=(-8, 0))}, EIGHT, "'w': data_offsets [-8, 0] is not a pair"),
    "overlapping offsets": (
        {"a": entry(), "b": entry(offsets=(4, 12))}, EIGHT + EIGHT[:4], "'b': data_offsets [4, 12] overlap those of 'a'"
    ),
    "gap before the first tensor": ({"w": entry(offsets=(4, 12))}, EIGHT + EIGHT[:4], "'w': data_offsets [4, 12] leave"),
    "gap between tensors": (
        {"a": entry(shape=(1,), offsets=(0, 4)), "b": entry(shape=(1,), offsets=(8, 12))},
        EIGHT + EIGHT[:4], "'b': data_offsets [8, 12] leave bytes 4..8",
    ),
    "float offsets": ({"w": entry(offsets=[0.0, 8.0])}, EIGHT, "'w': data_offsets [0.0, 8.0] is not a pair"),
    "string offsets": ({"w": entry(offsets=["0", "8"])}, EIGHT, "'w': data_offsets ['0', '8'] is not a pair"),
    "bool offsets": ({"w": entry(shape=(1,), dtype="U8", offsets=[False, True])}, b"\0", "'w': data_offsets [False, True]"),
    "three offsets": ({"w": entry(offsets=[0, 4, 8])}, EIGHT, "'w': data_offsets [0, 4, 8] is not a pair"),
    "offsets not a list": ({"w": entry(offsets={"start": 0})}, EIGHT, "'w': data_offsets {'start': 0}"),
    "span larger than shape × dtype": ({"w": entry(shape=(1,))}, EIGHT, "'w': data_offsets [0, 8] span 8 bytes, but F32 of shape [1] takes 4"),
    "span smaller than shape × dtype": ({"w": entry(shape=(4,))}, EIGHT, "F32 of shape [4] takes 16"),
    "start after end": ({"w": entry(offsets=(8, 0))}, EIGHT, "'w': data_offsets [8, 0] start after they end"),
    "span past the end of the file": ({"w": entry(shape=(4,), offsets=(0, 16))}, EIGHT, "truncated file"),
    "bytes after the last tensor": ({"w": entry(shape=(1,), offsets=(0, 4))}, EIGHT, "4 bytes after the last tensor"),
    "metadata a list": ({"__metadata__": ["a"], "w": entry()}, EIGHT, "__metadata__ must be an object of strings"),
    "metadata a string": ({"__metadata__": "format", "w": entry()}, EIGHT, "__metadata__ must be an object"),
    "metadata value not a string": ({"__metadata__": {"alpha": 1}, "w": entry()}, EIGHT, "__metadata__ 'alpha' must be a string"),
    "shape Infinity": (b'{"w": {"dtype": "F32", "shape": [Infinity], "data_offsets": [0, 8]}}', EIGHT, "not JSON: Infinity"),
    "shape NaN": (b'{"w": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 8]}}', EIGHT, "not JSON: NaN"),
    "shape 1e400": (b'{"w": {"dtype": "F32", "shape": [1e400], "data_offsets": [0, 8]}}', EIGHT, "'w': shape [inf]"),
    "shape float": ({"w": entry(shape=[2.0])}, EIGHT, "'w': shape [2.0] is not a list of non-negative integers"),
    "shape bool": ({"w": entry(dtype="U8", shape=[True], offsets=(0, 1))}, b"\0", "'w': shape [True]"),
    "shape string": ({"w": entry(shape=["2"])}, EIGHT, "'w': shape ['2']"),
    "shape negative": ({"w": entry(shape=[-2])}, EIGHT, "'w': shape [-2]"),
    "shape not a list": ({"w": entry(shape=2)}, EIGHT, "'w': shape 2"),
    "shape too large for torch": (
        {"w": entry(shape=[0, 2**40, 2**40], offsets=(0, 0))}, b"", "'w': shape [0, 1099511627776, 1099511627776] is too large"
    ),
    "unknown dtype": ({"w": entry(dtype="F12")}, EIGHT, "'w': unknown dtype 'F12'"),
    "dtype not a string": ({"w": entry(dtype=4)}, EIGHT, "'w': unknown dtype 4"),
    "entry lacks data_offsets": ({"w": {"dtype": "F32", "shape": [2]}}, EIGHT, "'w': the header entry lacks data_offsets"),
    "entry not an object": ({"w": [0, 8]}, EIGHT, "'w': expected an object"),
    "key named twice": (
        b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},'
        b' "w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}', EIGHT, "names 'w' twice",
    ),
    "header a list": (b"[1, 2, 3]", b"", "the header is a JSON list, not an object"),
    "header not JSON": (b"{not json}", b"", "the header is not JSON"),
    "header not UTF-8": (b'{"\xff": 1}', b"", "the header is not JSON"),
    "header nested too deeply": (b"[" * 100_000 + b"]" * 100_000, b"", "not a safetensors file"),
    "integer too long": (b'{"w": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 8]}}', EIGHT,
                         "the header is not JSON"),
}

# Refused here, read by the reference: torch cannot allocate such a shape (strides overflow).
STRICTER = {"shape too large for torch"}


@pytest.mark.parametrize("case", list(BAD))
def test_every_malformed_header_is_a_named_checkpoint_error(tmp_path: Path, case: str) -> None:
    header, data, expected = BAD[case]
    path = raw_file(tmp_path / "bad.safetensors", header, data)
    if case not in STRICTER:
        assert safetensors_refuses(path), "the reference library reads this file: the case is not malformed"
    with pytest.raises(CheckpointError) as info:
        read_header(path)
    assert str(info.value).startswith(f"{path}: ")
    assert expected in str(info.value)
    for reader in (MappedSafetensors, SafetensorsReader):
        with pytest.raises(CheckpointError, match="bad.safetensors"):
            reader(path)


@pytest.mark.parametrize(
    ("length", "size", "expected"),
    [(2**63, 100, "says 9223372036854775808 bytes"), (200 * 1024 * 1024, 100, "at most 104857600 allowed"),
     (90, 50, "says 90 bytes, the file has 58")],
)
def test_header_length_is_bounded_by_the_file_and_a_limit(tmp_path: Path, length: int, size: int, expected: str) -> None:
    path = raw_file(tmp_path / "long.safetensors", b"{" + b" " * (size - 2) + b"}", length=length)
    assert safetensors_refuses(path)
    with pytest.raises(CheckpointError, match="not a safetensors file") as info:
        read_header(path)
    assert expected in str(info.value)


def test_good_edge_cases_read_as_the_reference_reads_them(tmp_path: Path) -> None:
    header = {
        "__metadata__": {"format": "pt", "note": ""},
        "empty": entry(shape=(0, 3), offsets=(0, 0)),
        "scalar": entry(shape=(), offsets=(0, 4)),
        "byte": entry(dtype="U8", shape=(1,), offsets=(4, 5)),
        "unaligned": {**entry(shape=(2,), offsets=(5, 13)), "extra": "ignored, as safetensors does"},
        "zero at the end": entry(dtype="BF16", shape=(4, 0), offsets=(13, 13)),
    }
    data = struct.pack("<f", 1.5) + b"\x07" + struct.pack("<2f", 2.0, -3.0)
    path = raw_file(tmp_path / "good.safetensors", json.dumps(header).encode() + b"   ", data)
    assert not safetensors_refuses(path)
    parsed = read_header(path)
    assert parsed.metadata == {"format": "pt", "note": ""}
    assert list(parsed.tensors) == ["empty", "scalar", "byte", "unaligned", "zero at the end"]
    with SafetensorsReader(path) as reader, safetensors.safe_open(str(path), "pt") as oracle:
        for key in reader.keys():
            ours, theirs = reader.get(key), oracle.get_tensor(key)
            assert ours.dtype == theirs.dtype and ours.shape == theirs.shape and torch.equal(ours, theirs), key


def test_null_metadata_and_an_empty_header_are_accepted(tmp_path: Path) -> None:
    null = raw_file(tmp_path / "null.safetensors", {"__metadata__": None, "w": entry()}, EIGHT)
    empty = raw_file(tmp_path / "empty.safetensors", {})
    assert not safetensors_refuses(null) and not safetensors_refuses(empty)
    assert read_header(null).metadata == {} and list(read_header(null).tensors) == ["w"]
    assert read_header(empty).tensors == {}


def test_files_written_by_the_reference_library_read_back(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {"a": torch.arange(3, dtype=torch.uint8), "b": torch.randn(2, 3), "c": torch.zeros(0, 5),
               "d": torch.ones(4, dtype=torch.bfloat16), "e": torch.tensor(True)}
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata={"k": "v"})
    parsed = read_header(tmp_path / "ref.safetensors")
    assert parsed.metadata == {"k": "v"}
    with SafetensorsReader(tmp_path / "ref.safetensors") as reader:
        for key, tensor in tensors.items():
            assert torch.equal(reader.get(key), tensor), key
