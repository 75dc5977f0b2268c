"""GGUF tensor types: their block layouts, and pure-torch decoders that run at every forward.

A GGUF tensor is stored row by row; each row of ``in`` values (the innermost dimension) is
``in / block_size`` blocks of ``type_size`` bytes. Every :class:`GGUFType` decodes a whole
tensor's bytes at once, in vectorised torch on whatever device the bytes are on: the block
fields are read as views of the uint8 bytes, the values are computed in float32 in the same
order as ``gguf.quants.dequantize`` (so the results are bit-identical to it), and cast once
into the asked dtype. Float types (F32, F16, BF16) are reinterpreted and cast, never widened.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Final, final

import attrs
import torch
from torch import Tensor

from diffcaps.errors import QuantizationError

__all__ = ["GGUF_TYPES", "GGUFType", "gguf_codec"]

_QK_K: Final = 256  # values in one K-quant super-block

BlockDecoder = Callable[[Tensor], Tensor]
"""``[n_blocks, type_size]`` uint8 bytes → ``[n_blocks, block_size]`` values (float32, or the
stored dtype for float types)."""


@final
@attrs.frozen
class GGUFType:
    """One GGUF tensor type (``Q4_K``, …): its block layout and its decoder.

    It is the :class:`~diffcaps.quantization.spec.WeightCodec` a packed layer holding this
    type's bytes uses.
    """

    name: str
    block_size: int
    type_size: int
    _blocks: BlockDecoder = attrs.field(alias="blocks", repr=False)

    def row_bytes(self, in_features: int) -> int:
        """The bytes one row of ``in_features`` values takes; raises if it is not whole blocks."""
        if in_features < 0 or in_features % self.block_size:
            raise QuantizationError(
                f"GGUF {self.name} packs rows in blocks of {self.block_size} values; "
                f"a row of {in_features} values is not a whole number of blocks")
        return in_features // self.block_size * self.type_size

    def packed_shape(self, shape: Sequence[int]) -> torch.Size:
        """The uint8 shape of a tensor of logical ``shape``: its rows, each ``row_bytes`` long."""
        dims = tuple(int(size) for size in shape) or (1,)
        return torch.Size((*dims[:-1], self.row_bytes(dims[-1])))

    def decode(self, packed: Tensor, shape: torch.Size, dtype: torch.dtype) -> Tensor:
        """The tensor of ``shape`` in ``dtype`` decoded from this type's bytes ``packed`` (uint8, any shape).

        A float type asked for in its own dtype comes back as a view of ``packed``, not a copy.
        """
        expected = self.packed_shape(shape).numel()
        if packed.dtype != torch.uint8 or packed.numel() != expected:
            raise QuantizationError(
                f"GGUF {self.name} tensor of shape {tuple(shape)} takes {expected} bytes (uint8), "
                f"got {packed.numel()} {str(packed.dtype).removeprefix('torch.')} elements")
        if not dtype.is_floating_point:
            raise QuantizationError(f"GGUF {self.name} decodes into a floating dtype, not {dtype}")
        values = self._blocks(_aligned(packed).reshape(-1, self.type_size))
        return values.reshape(shape).to(dtype)


def _aligned(packed: Tensor) -> Tensor:
    """``packed`` itself, or a copy where its fields cannot be viewed as 2- and 4-byte numbers."""
    if packed.is_contiguous() and packed.storage_offset() % 4 == 0 and packed.data_ptr() % 4 == 0:
        return packed
    return packed.clone(memory_format=torch.contiguous_format)


def _half(blocks: Tensor, start: int) -> Tensor:
    """The float16 field at byte ``start`` of every block, as ``[n_blocks, 1]`` float32."""
    return blocks[:, start:start + 2].view(torch.float16).float()


def _shifts(blocks: Tensor, step: int, *view: int) -> Tensor:
    """Bit shifts ``0, step, 2·step, … < 8`` as uint8 on ``blocks``' device, shaped ``view``."""
    return torch.arange(0, 8, step, dtype=torch.uint8, device=blocks.device).reshape(view)


def _nibbles(packed: Tensor) -> Tensor:
    """``[..., k]`` bytes → ``[..., 2, k]``: the low nibbles, then the high nibbles."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-2)


def _low_bits(packed: Tensor) -> Tensor:
    """``[n, 4]`` bytes (a little-endian uint32) → ``[n, 32]`` bits, bit ``i`` at column ``i``."""
    return ((packed.unsqueeze(-1) >> _shifts(packed, 1, 1, 1, 8)) & 1).reshape(-1, 32)


def _f32(blocks: Tensor) -> Tensor:
    return blocks.view(torch.float32)


def _f16(blocks: Tensor) -> Tensor:
    return blocks.view(torch.float16)


def _bf16(blocks: Tensor) -> Tensor:
    return blocks.view(torch.bfloat16)


def _q8_0(blocks: Tensor) -> Tensor:
    return blocks[:, 2:].view(torch.int8).float().mul_(_half(blocks, 0))


def _q4_0(blocks: Tensor) -> Tensor:
    q = _nibbles(blocks[:, 2:]).reshape(-1, 32)
    return q.float().sub_(8.0).mul_(_half(blocks, 0))


def _q4_1(blocks: Tensor) -> Tensor:
    q = _nibbles(blocks[:, 4:]).reshape(-1, 32)
    return q.float().mul_(_half(blocks, 0)).add_(_half(blocks, 2))


def _five_bits(low: Tensor, high: Tensor) -> Tensor:
    return _nibbles(low).reshape(-1, 32) | (_low_bits(high) << 4)


def _q5_0(blocks: Tensor) -> Tensor:
    q = _five_bits(blocks[:, 6:], blocks[:, 2:6])
    return q.float().sub_(16.0).mul_(_half(blocks, 0))


def _q5_1(blocks: Tensor) -> Tensor:
    q = _five_bits(blocks[:, 8:], blocks[:, 4:8])
    return q.float().mul_(_half(blocks, 0)).add_(_half(blocks, 2))


def _q2_k(blocks: Tensor) -> Tensor:
    scales, qs = blocks[:, :16], blocks[:, 16:80]
    scale = (_half(blocks, 80) * (scales & 0x0F).float()).unsqueeze(-1)
    offset = (_half(blocks, 82) * (scales >> 4).float()).unsqueeze(-1)
    q = ((qs.reshape(-1, 2, 1, 32) >> _shifts(blocks, 2, 1, 1, 4, 1)) & 3).reshape(-1, 16, 16)
    return q.float().mul_(scale).sub_(offset).reshape(-1, _QK_K)


def _q3_k(blocks: Tensor) -> Tensor:
    hmask, qs, packed_scales = blocks[:, :32], blocks[:, 32:96], blocks[:, 96:108]
    low = (packed_scales[:, :8].reshape(-1, 1, 8) >> _shifts(blocks, 4, 1, 2, 1)).reshape(-1, 16)
    high = (packed_scales[:, 8:].reshape(-1, 1, 4) >> _shifts(blocks, 2, 1, 4, 1)).reshape(-1, 16)
    scales = ((low & 0x0F) | ((high & 3) << 4)).float() - 32.0
    scale = (_half(blocks, 108) * scales).unsqueeze(-1)
    q = ((qs.reshape(-1, 2, 1, 32) >> _shifts(blocks, 2, 1, 1, 4, 1)) & 3).reshape(-1, 16, 16)
    # a clear mask bit subtracts 4, a set one nothing
    h = ((hmask.reshape(-1, 1, 1, 32) >> _shifts(blocks, 1, 1, 1, 8, 1)) & 1).reshape(-1, 16, 16)
    return (q.to(torch.int8) - ((h ^ 1) << 2).to(torch.int8)).float().mul_(scale).reshape(-1, _QK_K)


def _k_scales(blocks: Tensor) -> tuple[Tensor, Tensor]:
    """Q4_K/Q5_K: the 8 sub-block scales and mins (6 bits each) as ``[n, 8, 1]`` float32."""
    packed = blocks[:, 4:16].reshape(-1, 3, 4)
    d, m, md = packed[:, 0], packed[:, 1], packed[:, 2]
    sc = torch.cat((d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)), dim=-1)
    mins = torch.cat((m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)), dim=-1)
    scale = (_half(blocks, 0) * sc.float()).unsqueeze(-1)
    offset = (_half(blocks, 2) * mins.float()).unsqueeze(-1)
    return scale, offset


def _q4_k(blocks: Tensor) -> Tensor:
    scale, offset = _k_scales(blocks)
    q = _nibbles(blocks[:, 16:].reshape(-1, 4, 32)).reshape(-1, 8, 32)
    return q.float().mul_(scale).sub_(offset).reshape(-1, _QK_K)


def _q5_k(blocks: Tensor) -> Tensor:
    scale, offset = _k_scales(blocks)
    low = _nibbles(blocks[:, 48:].reshape(-1, 4, 32)).reshape(-1, 8, 32)
    high = ((blocks[:, 16:48].reshape(-1, 1, 32) >> _shifts(blocks, 1, 1, 8, 1)) & 1)
    return (low | (high << 4)).float().mul_(scale).sub_(offset).reshape(-1, _QK_K)


def _q6_k(blocks: Tensor) -> Tensor:
    low = _nibbles(blocks[:, :128].reshape(-1, 2, 64)).reshape(-1, 8, 32)
    high = ((blocks[:, 128:192].reshape(-1, 2, 1, 32) >> _shifts(blocks, 2, 1, 1, 4, 1)) & 3).reshape(-1, 8, 32)
    scale = (_half(blocks, 208) * blocks[:, 192:208].view(torch.int8).float()).unsqueeze(-1)
    return (low | (high << 4)).float().sub_(32.0).reshape(-1, 16, 16).mul_(scale).reshape(-1, _QK_K)


GGUF_TYPES: Final[Mapping[str, GGUFType]] = MappingProxyType({
    kind.name: kind for kind in (
        GGUFType("F32", 1, 4, blocks=_f32),
        GGUFType("F16", 1, 2, blocks=_f16),
        GGUFType("BF16", 1, 2, blocks=_bf16),
        GGUFType("Q8_0", 32, 34, blocks=_q8_0),
        GGUFType("Q4_0", 32, 18, blocks=_q4_0),
        GGUFType("Q4_1", 32, 20, blocks=_q4_1),
        GGUFType("Q5_0", 32, 22, blocks=_q5_0),
        GGUFType("Q5_1", 32, 24, blocks=_q5_1),
        GGUFType("Q2_K", _QK_K, 84, blocks=_q2_k),
        GGUFType("Q3_K", _QK_K, 110, blocks=_q3_k),
        GGUFType("Q4_K", _QK_K, 144, blocks=_q4_k),
        GGUFType("Q5_K", _QK_K, 176, blocks=_q5_k),
        GGUFType("Q6_K", _QK_K, 210, blocks=_q6_k),
    )
})
"""Every GGUF tensor type diffcaps decodes, by its gguf name."""


def gguf_codec(type_name: str) -> GGUFType:
    """The decoder of the GGUF tensor type ``type_name`` (``"Q4_K"``); raises for a type diffcaps cannot decode."""
    kind = GGUF_TYPES.get(type_name)
    if kind is None:
        raise QuantizationError(
            f"GGUF tensor type {type_name!r} is not supported; supported types: {', '.join(GGUF_TYPES)}")
    return kind
