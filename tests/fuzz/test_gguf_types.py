"""Fuzzing the GGUF decoders: any bytes of the right length decode as ``gguf`` decodes them.

Arbitrary block bytes, NaN and infinite float16 fields included, for every type and a few
shapes: the decoded float32 tensor equals ``gguf.quants.dequantize`` bit for bit (NaN where it
has NaN). Any other byte count or row length fails with ``QuantizationError``.

Bounded for the suite; ``DIFFCAPS_FUZZ_EXAMPLES=2000`` (say) runs a longer search.
"""

from __future__ import annotations

import os
from typing import Final

import gguf
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffcaps.errors import QuantizationError
from diffcaps.quantization.spec import GGUF_TYPES, gguf_codec

EXAMPLES: Final = int(os.environ.get("DIFFCAPS_FUZZ_EXAMPLES", "25"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize="DIFFCAPS_FUZZ_EXAMPLES" not in os.environ,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def tensors(draw: st.DrawFn) -> tuple[str, tuple[int, int], bytes]:
    """A type name, a shape of whole blocks, and arbitrary bytes of exactly that tensor's length."""
    name = draw(st.sampled_from(tuple(GGUF_TYPES)))
    kind = GGUF_TYPES[name]
    shape = (draw(st.integers(1, 3)), kind.block_size * draw(st.integers(1, 3)))
    return name, shape, draw(st.binary(min_size=kind.packed_shape(shape).numel(),
                                       max_size=kind.packed_shape(shape).numel()))


@FUZZ
@given(tensors())
def test_any_bytes_decode_as_gguf_decodes_them(tensor: tuple[str, tuple[int, int], bytes]) -> None:
    name, shape, data = tensor
    kind = gguf_codec(name)
    packed = np.frombuffer(data, dtype=np.uint8).reshape(kind.packed_shape(shape))
    with np.errstate(all="ignore"):
        expected = torch.from_numpy(gguf.quants.dequantize(packed, gguf.GGMLQuantizationType[name]).astype(np.float32))
    decoded = kind.decode(torch.frombuffer(bytearray(data), dtype=torch.uint8), torch.Size(shape), torch.float32)
    torch.testing.assert_close(decoded, expected, rtol=0, atol=0, equal_nan=True)


@FUZZ
@given(st.sampled_from(tuple(GGUF_TYPES)), st.integers(1, 3), st.integers(0, 600), st.integers(0, 2000))
def test_any_other_length_is_a_quantization_error(name: str, rows: int, width: int, length: int) -> None:
    kind = gguf_codec(name)
    whole = width % kind.block_size == 0
    if whole and length == rows * kind.row_bytes(width):
        length += 1
    with pytest.raises(QuantizationError, match=f"GGUF {name}"):
        kind.decode(torch.zeros(length, dtype=torch.uint8), torch.Size((rows, width)), torch.float32)
