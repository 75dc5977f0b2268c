"""Fuzzing the GGUF loader: any file either loads or fails with a ``diffcaps.errors`` exception.

Corruptions of a real GGUF Flux file (byte edits weighted towards the header — counts,
string lengths, value types, array lengths, dims, tensor types and offsets — truncations and
insertions) and random bytes behind a GGUF magic and version are fed to the single-file
loader. A file that loads must give a model that runs.

Bounded for the suite; ``DIFFCAPS_FUZZ_EXAMPLES=2000`` (say) runs a longer search.
"""

from __future__ import annotations

import os
import struct
import tempfile
import warnings
from pathlib import Path
from typing import Final

import attrs
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffcaps.errors import DiffcapsError
from diffcaps.models.flux import FluxTransformer2DModel
from diffcaps.weights._gguf_file import read_gguf
from diffcaps.weights import load_single_file
from tests.flux_fixtures import TINY, flux_inputs
from tests.quantization.gguf_files import flux_gguf, mixed_types

DEV: Final = attrs.evolve(TINY, in_channels=64)  # a FLUX.1 [dev] file's input width, any other size small
EXAMPLES: Final = int(os.environ.get("DIFFCAPS_FUZZ_EXAMPLES", "25"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize="DIFFCAPS_FUZZ_EXAMPLES" not in os.environ,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, int]:
    """A small GGUF Flux file (Q8_0, Q4_0, Q5_1, F16, BF16 and F32 tensors) and where its data starts."""
    path = flux_gguf(tmp_path_factory.mktemp("fuzz") / "tiny.gguf", DEV, mixed_types(("Q8_0", "Q4_0", "Q5_1", "BF16")))
    data_start = min(info.offset for info in read_gguf(path).tensors.values())
    load_single_file(FluxTransformer2DModel, path)  # the unedited file loads
    return path.read_bytes(), data_start


def _load_or_fail(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fuzzed.gguf"
        path.write_bytes(data)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = load_single_file(FluxTransformer2DModel, path, strict=False)
        except DiffcapsError:
            return
        with torch.no_grad():
            model(**flux_inputs(model.config))


edits = st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), min_size=1, max_size=6)


@FUZZ
@given(edits=edits, in_header=st.booleans())
def test_byte_edits(original: tuple[bytes, int], edits: list[tuple[float, int]], in_header: bool) -> None:
    data, data_start = original
    fuzzed = bytearray(data)
    span = data_start if in_header else len(data)
    for where, value in edits:
        fuzzed[min(int(where * span), len(data) - 1)] = value
    _load_or_fail(bytes(fuzzed))


@FUZZ
@given(where=st.floats(0, 1), insert=st.binary(max_size=16), in_header=st.booleans())
def test_truncations_and_insertions(original: tuple[bytes, int], where: float, insert: bytes, in_header: bool) -> None:
    data, data_start = original
    cut = int(where * (data_start if in_header else len(data)))
    _load_or_fail(data[:cut] + insert + (data[cut:] if insert else b""))


@FUZZ
@given(version=st.sampled_from([1, 2, 3, 4]), tensors=st.integers(0, 2**64 - 1), fields=st.integers(0, 2**64 - 1),
       rest=st.binary(max_size=256))
def test_random_headers(version: int, tensors: int, fields: int, rest: bytes) -> None:
    _load_or_fail(b"GGUF" + struct.pack("<IQQ", version, tensors, fields) + rest)
