"""GGUF tensor types: every decoder against the ``gguf`` package's own dequantisation.

Packed bytes are random blocks (every bit pattern the block fields can hold, with finite
float16 scale fields) and, for the types ``gguf`` can quantize, blocks quantized from random
values. Decoding must equal ``gguf.quants.dequantize`` bit for bit in float32.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from numpy.typing import NDArray

from diffcaps.errors import QuantizationError
from diffcaps.quantization.spec import GGUF_TYPES, GGUFType, gguf_codec
from diffcaps.quantization.spec import PackedLinear

TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
QUANTIZABLE = ("BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")  # gguf.quants.quantize supports these
# byte offsets of the float16 fields (scales, mins) inside one block, from ggml-common.h
HALF_FIELDS: dict[str, tuple[int, ...]] = {
    "Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2),
    "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
}
SHAPES = ((1, 256), (3, 512), (5, 768), (2, 3, 256))


def _random_packed(name: str, shape: tuple[int, ...], seed: int) -> NDArray[np.uint8]:
    """Valid random bytes of a ``name`` tensor of ``shape``, laid out row by row."""
    rng = np.random.default_rng(seed)
    kind = GGUF_TYPES[name]
    rows = int(np.prod(shape[:-1]))
    if kind.block_size == 1:
        values = rng.standard_normal(shape).astype(np.float32) * 3
        native = {"F32": np.float32, "F16": np.float16}.get(name)
        stored = values.astype(native) if native else gguf.quants.quantize(values, gguf.GGMLQuantizationType.BF16)
        return np.ascontiguousarray(stored).view(np.uint8).reshape(*shape[:-1], -1)
    blocks = rows * shape[-1] // kind.block_size
    packed = rng.integers(0, 256, (blocks, kind.type_size), dtype=np.uint8)
    for offset in HALF_FIELDS[name]:
        halves = (rng.standard_normal(blocks) * 0.1).astype(np.float16)
        packed[:, offset:offset + 2] = halves.view(np.uint8).reshape(blocks, 2)
    return packed.reshape(*shape[:-1], kind.row_bytes(shape[-1]))


def _reference(name: str, packed: NDArray[np.uint8]) -> torch.Tensor:
    values: NDArray[np.float32] = gguf.quants.dequantize(packed, gguf.GGMLQuantizationType[name]).astype(np.float32)
    return torch.from_numpy(values)


def test_every_listed_type_is_there_with_ggml_block_sizes() -> None:
    assert tuple(GGUF_TYPES) == TYPES
    for name, kind in GGUF_TYPES.items():
        assert kind.name == name
        assert (kind.block_size, kind.type_size) == gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]]
        assert gguf_codec(name) is kind


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", TYPES)
def test_random_blocks_decode_bit_for_bit_as_gguf(name: str, shape: tuple[int, ...]) -> None:
    packed = _random_packed(name, shape, seed=len(shape) * 1000 + shape[-1])
    expected = _reference(name, packed)
    assert tuple(expected.shape) == shape
    decoded = gguf_codec(name).decode(torch.from_numpy(packed), torch.Size(shape), torch.float32)
    assert decoded.dtype == torch.float32 and decoded.shape == expected.shape
    assert torch.equal(decoded, expected)


@pytest.mark.parametrize("name", QUANTIZABLE)
def test_values_quantized_by_gguf_decode_close_to_the_originals(name: str) -> None:
    values = np.random.default_rng(7).standard_normal((6, 512)).astype(np.float32)
    packed: NDArray[np.uint8] = gguf.quants.quantize(values, gguf.GGMLQuantizationType[name])
    assert packed.shape == tuple(GGUF_TYPES[name].packed_shape(values.shape))
    decoded = gguf_codec(name).decode(torch.from_numpy(packed), torch.Size(values.shape), torch.float32)
    assert torch.equal(decoded, _reference(name, packed))
    # independent of gguf's decoder: the values come back within the type's rounding step
    step = {"BF16": 0.02, "Q8_0": 0.03, "Q4_0": 0.6, "Q4_1": 0.5, "Q5_0": 0.3, "Q5_1": 0.25}[name]
    assert (decoded - torch.from_numpy(values)).abs().max().item() < step


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("name", TYPES)
def test_half_outputs_are_the_float32_result_cast_once(name: str, dtype: torch.dtype) -> None:
    shape = (4, 512)
    packed = torch.from_numpy(_random_packed(name, shape, seed=3))
    codec = gguf_codec(name)
    decoded = codec.decode(packed, torch.Size(shape), dtype)
    assert decoded.dtype == dtype
    assert torch.equal(decoded, codec.decode(packed, torch.Size(shape), torch.float32).to(dtype))


@pytest.mark.parametrize("name", TYPES)
def test_flat_and_misaligned_bytes_decode_the_same_and_stay_unchanged(name: str) -> None:
    shape = (3, 256)
    packed = torch.from_numpy(_random_packed(name, shape, seed=11))
    kind = gguf_codec(name)
    expected = kind.decode(packed, torch.Size(shape), torch.float32)
    flat = packed.flatten()
    shifted = torch.cat((torch.zeros(1, dtype=torch.uint8), flat))[1:]  # storage offset 1
    assert shifted.storage_offset() == 1
    before = shifted.clone()
    assert torch.equal(kind.decode(flat, torch.Size(shape), torch.float32), expected)
    assert torch.equal(kind.decode(shifted, torch.Size(shape), torch.float32), expected)
    assert torch.equal(shifted, before)


def test_row_bytes_and_packed_shape_follow_gguf() -> None:
    for name, kind in GGUF_TYPES.items():
        qtype = gguf.GGMLQuantizationType[name]
        for shape in ((3072, 3072), (64, 256), (512,)):
            assert tuple(kind.packed_shape(shape)) == gguf.quants.quant_shape_to_byte_shape(shape, qtype)
        assert kind.row_bytes(3072) == 3072 // kind.block_size * kind.type_size


def test_packed_linear_with_a_gguf_codec_runs_the_gguf_weight() -> None:
    shape = (8, 256)
    packed = _random_packed("Q4_K", shape, seed=5)
    weight = _reference("Q4_K", packed)
    bias = torch.randn(8)
    layer = PackedLinear(torch.from_numpy(packed).flatten(), torch.Size(shape), gguf_codec("Q4_K"), bias=bias,
                         compute_dtype=torch.float32)
    x = torch.randn(2, 256)
    assert torch.equal(layer(x), torch.nn.functional.linear(x, weight, bias))
    assert "packed=Q4_K" in repr(layer)


def test_unsupported_types_are_named_with_the_supported_ones() -> None:
    for name in ("Q8_K", "IQ4_NL", "q4_k", ""):
        with pytest.raises(QuantizationError, match=rf"'{name}' is not supported; supported types: F32, F16, .*Q6_K"):
            gguf_codec(name)


@pytest.mark.parametrize("name", ("Q8_0", "Q4_K", "F16"))
def test_wrong_bytes_and_shapes_get_named_errors(name: str) -> None:
    kind = gguf_codec(name)
    shape = torch.Size((2, 256))
    packed = torch.from_numpy(_random_packed(name, tuple(shape), seed=1)).flatten()
    with pytest.raises(QuantizationError, match=rf"GGUF {name} tensor of shape \(2, 256\) takes {packed.numel()} bytes"):
        kind.decode(packed[:-1], shape, torch.float32)
    with pytest.raises(QuantizationError, match=r"got \d+ float32 elements"):
        kind.decode(packed.float(), shape, torch.float32)
    with pytest.raises(QuantizationError, match="floating dtype"):
        kind.decode(packed, shape, torch.int32)
    if kind.block_size > 1:
        with pytest.raises(QuantizationError, match=rf"blocks of {kind.block_size} values; a row of 100 values"):
            kind.decode(packed, torch.Size((2, 100)), torch.float32)
        with pytest.raises(QuantizationError, match="a row of 7 values"):
            kind.row_bytes(7)


def _decoded_on(kind: GGUFType, packed: torch.Tensor, device: str) -> torch.Tensor:
    return kind.decode(packed.to(device), torch.Size((3, 512)), torch.bfloat16).cpu()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", TYPES)
def test_cuda_decodes_as_the_cpu(name: str) -> None:
    packed = torch.from_numpy(_random_packed(name, (3, 512), seed=9))
    kind = gguf_codec(name)
    assert torch.equal(_decoded_on(kind, packed, "cuda"), _decoded_on(kind, packed, "cpu"))
