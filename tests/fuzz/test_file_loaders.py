"""Fuzzing the file loaders: any file either loads or fails with a ``diffcaps.errors`` exception.

Random headers (key sets, shapes, dtypes, offsets, metadata) and corruptions of real files
(byte flips, truncations, forged header lengths, edited header entries, edited configs and
indexes) are fed to ``read_header``, the folder loader and the single-file loader. The
reference ``safetensors`` library is the oracle for headers: a file diffcaps reads, it reads
too, with the same tensors.

Bounded for the suite; ``DIFFCAPS_FUZZ_EXAMPLES=2000`` (say) runs a longer search.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import pytest
import safetensors
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffcaps.errors import DiffcapsError
from diffcaps.io import CONFIG_NAME, INDEX_NAME, WEIGHTS_NAME, SafetensorsReader, read_header
from diffcaps.models.flux import FluxTransformer2DModel
from diffcaps.weights import load_single_file
from tests.flux_fixtures import save_tiny_folder
from tests.weights.fixtures import original_file, variant_model

EXAMPLES: Final = int(os.environ.get("DIFFCAPS_FUZZ_EXAMPLES", "25"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize="DIFFCAPS_FUZZ_EXAMPLES" not in os.environ,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

DTYPE_NAMES: Final = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "I64", "I32", "I16", "I8", "U8", "BOOL")
WIDTH: Final = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2,
                "I8": 1, "U8": 1, "BOOL": 1}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**65), 2**65) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
dims = st.integers(-2, 2**64) | st.sampled_from([0, 1, 2, 3]) | json_values


def _encode(header: dict[str, Any], data: bytes, *, length: int | None = None) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + data


@st.composite
def good_files(draw: st.DrawFn) -> tuple[dict[str, Any], bytes]:
    """A valid header with random keys, dtypes and shapes, and its data."""
    header: dict[str, Any] = {}
    offset = 0
    for key in draw(st.lists(st.text(min_size=0, max_size=12), max_size=6, unique=True)):
        if key == "__metadata__":
            continue
        name = draw(st.sampled_from(DTYPE_NAMES))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        size = WIDTH[name]
        for d in shape:
            size *= d
        header[key] = {"dtype": name, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=3))
    data = bytes(draw(st.integers(0, 255)) for _ in range(min(offset, 4))) + bytes(max(offset - 4, 0))
    return header, data


@st.composite
def edited(draw: st.DrawFn, header: dict[str, Any]) -> dict[str, Any]:
    """The header with one entry, field or the metadata replaced, added or removed."""
    header = json.loads(json.dumps(header))
    keys = [k for k in header if k != "__metadata__"]
    action = draw(st.sampled_from(["dtype", "shape", "offsets", "field", "drop", "add", "metadata", "entry"]))
    key = draw(st.sampled_from(keys)) if keys else "w"
    entry = header.setdefault(key, {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]})
    if action == "dtype":
        entry["dtype"] = draw(st.sampled_from(DTYPE_NAMES) | json_values)
    elif action == "shape":
        entry["shape"] = draw(st.lists(dims, max_size=4) | json_values)
    elif action == "offsets":
        entry["data_offsets"] = draw(st.lists(dims, min_size=2, max_size=2) | st.lists(dims, max_size=3) | json_values)
    elif action == "field":
        entry.pop(draw(st.sampled_from(["dtype", "shape", "data_offsets"])))
    elif action == "drop":
        header.pop(key)
    elif action == "add":
        header[draw(st.text(max_size=8))] = draw(json_values | st.fixed_dictionaries(
            {"dtype": st.sampled_from(DTYPE_NAMES), "shape": st.lists(st.integers(0, 3), max_size=2),
             "data_offsets": st.lists(st.integers(0, 64), min_size=2, max_size=2)}))
    elif action == "metadata":
        header["__metadata__"] = draw(json_values)
    else:
        header[key] = draw(json_values)
    return header


@st.composite
def corrupted(draw: st.DrawFn, original: bytes) -> bytes:
    """``original`` (a safetensors file) with its bytes flipped, cut, or its header forged."""
    length = struct.unpack("<Q", original[:8])[0]
    data = original[8 + length:]
    kind = draw(st.sampled_from(["flip", "truncate", "length", "header", "append"]))
    if kind == "flip":
        raw = bytearray(original)
        for _ in range(draw(st.integers(1, 4))):
            raw[draw(st.integers(0, min(len(raw), 8 + length + 16) - 1))] ^= draw(st.integers(1, 255))
        return bytes(raw)
    if kind == "truncate":
        return original[: draw(st.integers(0, len(original) - 1))]
    if kind == "length":
        forged = draw(st.sampled_from([0, 1, length - 1, length + 1, len(original), 2**63, 2**64 - 1])
                      | st.integers(0, 2**64 - 1))
        return struct.pack("<Q", forged) + original[8:]
    if kind == "append":
        return original + draw(st.binary(min_size=1, max_size=16))
    header = json.loads(original[8: 8 + length])
    return _encode(draw(edited(header)), data)


def _reference(path: Path) -> dict[str, torch.Tensor] | None:
    try:
        with safetensors.safe_open(str(path), "pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception:  # the reference raises several types; any refusal counts
        return None


def _check_header_file(path: Path) -> None:
    """Ours reads the file, or refuses it by name; what ours reads, the reference reads alike."""
    try:
        header = read_header(path)
        with SafetensorsReader(path) as reader:
            ours = {key: reader.get(key).clone() for key in reader.keys()}
    except DiffcapsError:
        return
    theirs = _reference(path)
    assert theirs is not None, f"diffcaps read a file the reference refuses: {path.read_bytes()[:300]!r}"
    assert ours.keys() == theirs.keys() == header.tensors.keys()
    for key, tensor in ours.items():
        assert tensor.dtype == theirs[key].dtype and tensor.shape == theirs[key].shape, key
        if tensor.dtype == torch.bool:  # a byte other than 0/1 is "true" either way
            assert torch.equal(tensor, theirs[key]), key
        else:  # bytes, so that NaNs compare too
            assert torch.equal(tensor.reshape(-1).view(torch.uint8), theirs[key].reshape(-1).view(torch.uint8)), key


@FUZZ
@given(st.data())
def test_random_headers_load_or_fail_by_name(data: st.DataObject) -> None:
    header, payload = data.draw(good_files())
    mode = data.draw(st.sampled_from(["good", "edited", "corrupted"]))
    raw = _encode(header, payload)
    if mode == "edited":
        raw = _encode(data.draw(edited(header)), payload)
    elif mode == "corrupted":
        raw = data.draw(corrupted(raw))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fuzzed.safetensors"
        path.write_bytes(raw)
        if mode == "good":
            read_header(path)  # a valid file must be accepted
        _check_header_file(path)


def _outcome(load: Callable[[], torch.nn.Module]) -> None:
    """The only allowed outcomes: a model, or a diffcaps error."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            load()
        except DiffcapsError:
            pass


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fuzz-folders")
    save_tiny_folder(root / "single")
    save_tiny_folder(root / "sharded", max_shard_size=20_000)
    return {"single": root / "single", "sharded": root / "sharded"}


@FUZZ
@given(st.data())
def test_fuzzed_folders_load_or_fail_by_name(folders: dict[str, Path], data: st.DataObject) -> None:
    layout = data.draw(st.sampled_from(["single", "sharded"]))
    source = folders[layout]
    files = sorted(p.name for p in source.iterdir())
    target = data.draw(st.sampled_from(files))
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "model"
        shutil.copytree(source, folder)
        path = folder / target
        if target.endswith(".safetensors"):
            path.write_bytes(data.draw(corrupted(path.read_bytes())))
        else:  # config.json or the index: edit one value, or corrupt the text
            document = json.loads(path.read_text())
            if target == INDEX_NAME:
                document = document["weight_map"]
            keys = sorted(document)
            if data.draw(st.booleans()):
                document[data.draw(st.sampled_from(keys))] = data.draw(
                    json_values | st.sampled_from(files) | st.integers(0, 10**7))
            else:
                document.pop(data.draw(st.sampled_from(keys)))
            if target == INDEX_NAME:
                document = {"metadata": {}, "weight_map": document}
            text = json.dumps(document)
            if data.draw(st.booleans()):
                position = data.draw(st.integers(0, len(text)))
                text = text[:position] + data.draw(st.text(max_size=3)) + text[position + 1:]
            path.write_text(text)
        assert {CONFIG_NAME, WEIGHTS_NAME} & set(files)
        _outcome(lambda: FluxTransformer2DModel.from_pretrained(folder))


@pytest.fixture(scope="module")
def single_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return original_file(tmp_path_factory.mktemp("fuzz-single") / "dev.safetensors",
                         variant_model("flux-dev", "small"), prefix="model.diffusion_model.")


@FUZZ
@given(st.data())
def test_fuzzed_single_files_load_or_fail_by_name(single_file: Path, data: st.DataObject) -> None:
    original = single_file.read_bytes()
    length = struct.unpack("<Q", original[:8])[0]
    header: dict[str, Any] = json.loads(original[8: 8 + length])
    payload = original[8 + length:]
    mode = data.draw(st.sampled_from(["corrupted", "keys", "shapes"]))
    if mode == "corrupted":
        raw = data.draw(corrupted(original))
    elif mode == "keys":  # rename a key: another block index, another name, another prefix
        key = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
        parts = key.split(".")
        position = data.draw(st.integers(0, len(parts) - 1))
        parts[position] = data.draw(st.sampled_from(["0", "1", "7", "999999", "x", ""]) | st.text(max_size=4))
        header[".".join(parts)] = header.pop(key)
        raw = _encode(header, payload)
    else:  # reshape one tensor within its bytes, as a forger keeping the file valid would
        key = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
        entry = header[key]
        count = (entry["data_offsets"][1] - entry["data_offsets"][0]) // WIDTH[entry["dtype"]]
        factors = [d for d in range(1, min(count, 64) + 1) if count % d == 0]
        first = data.draw(st.sampled_from(factors))
        entry["shape"] = data.draw(st.sampled_from([[count], [first, count // first], [count // first, first, 1]]))
        raw = _encode(header, payload)
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "fuzzed.safetensors"
        path.write_bytes(raw)
        _outcome(lambda: load_single_file(FluxTransformer2DModel, path, strict=data.draw(st.booleans())))
