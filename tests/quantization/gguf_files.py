"""GGUF files for the tests and benchmarks, written with the ``gguf`` package as community tools do.

:func:`write_gguf` writes tensors in any GGUF type: F32/F16/BF16 and the 32-value block types
through ``gguf.quants.quantize``; the K-quants (which the package can only read) as valid
random blocks whose fp16 scales are built to give values of about the tensor's size.
:func:`flux_gguf` / :func:`wan_gguf` write a seeded model in the original BFL / Wan key
layout; :func:`wide_gguf` writes a model of real width without building it (for benchmarks
and diffusers' Flux converter, which needs FLUX.1's width); :func:`dequantized` is the
reference: every tensor dequantized by the package itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
from gguf.quants import dequantize, quantize

from diffcaps.models.flux import FluxConfig, FluxTransformer2DModel
from diffcaps.models.wan import WanConfig, WanTransformer3DModel

__all__ = ["K_QUANTS", "TypeRule", "dequantized", "flux_gguf", "mixed_types", "wan_gguf", "wide_gguf", "write_gguf"]

TypeRule = Callable[[str, tuple[int, ...]], str]
"""Which GGUF type a tensor (name, torch shape) is written in."""

# K-quants: (block bytes, offsets of the fp16 scale fields, how many times the scale the largest value is)
K_QUANTS: Final[dict[str, tuple[int, tuple[int, ...], float]]] = {
    "Q2_K": (84, (80, 82), 45.0),
    "Q3_K": (110, (108,), 128.0),
    "Q4_K": (144, (0, 2), 945.0),
    "Q5_K": (176, (0, 2), 1953.0),
    "Q6_K": (210, (208,), 4064.0),
}
_BLOCK: Final = {"Q8_0": 32, "Q4_0": 32, "Q4_1": 32, "Q5_0": 32, "Q5_1": 32, **{k: 256 for k in K_QUANTS}}


def _random_k_blocks(kind: str, shape: tuple[int, ...], size: float, generator: np.random.Generator) -> np.ndarray:
    nbytes, scales, span = K_QUANTS[kind]
    outer, inner = shape[:-1], shape[-1]
    blocks = generator.integers(0, 256, size=(math.prod(outer) * (inner // 256), nbytes), dtype=np.uint8)
    for offset in scales:
        factors = np.asarray(generator.uniform(0.5, 1.0, size=blocks.shape[0]), dtype=np.float64)
        d = (size / span * factors).astype(np.float16)
        blocks[:, offset:offset + 2] = d.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(*outer, inner // 256 * nbytes)


_INTEGER: Final = {"I8": np.int8, "I16": np.int16, "I32": np.int32}


def _encode(kind: str, tensor: torch.Tensor, generator: np.random.Generator) -> np.ndarray:
    shape: tuple[int, ...] = tuple(int(d) for d in tensor.shape)
    if kind in K_QUANTS:  # a meta tensor gets blocks of the usual size for its width
        size = shape[-1] ** -0.5 if tensor.is_meta else float(tensor.detach().abs().max())
        return _random_k_blocks(kind, shape, max(size, 1e-3), generator)
    values = tensor.detach().to(torch.float32).numpy()
    if kind in _INTEGER:
        return values.astype(_INTEGER[kind])
    return quantize(values, GGMLQuantizationType[kind])


def write_gguf(path: Path, tensors: Mapping[str, torch.Tensor], types: TypeRule | Mapping[str, str], *,
               architecture: str, seed: int = 0) -> Path:
    """Write ``tensors`` as a GGUF file, each in the type ``types`` gives it.

    K-quants are written as random blocks of about the tensor's size (any tensor written in
    one may be on the meta device); I8/I16/I32 write the values cast, for unsupported-type tests.
    """
    generator = np.random.default_rng(seed)
    writer = GGUFWriter(str(path), arch=architecture)
    for name, tensor in tensors.items():
        shape = tuple(tensor.shape)
        kind = types(name, shape) if callable(types) else types[name]
        encoded = _encode(kind, tensor, generator)
        raw = None if kind in ("F32", "F16", *_INTEGER) else GGMLQuantizationType[kind]
        writer.add_tensor(name, encoded, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def mixed_types(weights: tuple[str, ...] = ("Q8_0", "Q4_K", "Q6_K", "F16", "Q5_0", "BF16")) -> TypeRule:
    """A rule as community files use: 1-D tensors F32, matrices cycling through ``weights`` by name.

    A matrix whose inner size the chosen type's blocks do not divide is written F16.
    """
    def rule(name: str, shape: tuple[int, ...]) -> str:
        if len(shape) < 2:
            return "F32"
        kind = weights[sum(map(ord, name)) % len(weights)]
        return kind if shape[-1] % _BLOCK.get(kind, 1) == 0 else "F16"

    return rule


def _state(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        values = torch.randn(tensor.shape, generator=generator)
        if name.endswith(("norm_q.weight", "norm_k.weight", "norm_added_q.weight", "norm_added_k.weight")):
            state[name] = 1.0 + 0.1 * values
        else:
            state[name] = values * (tensor.shape[-1] ** -0.5 if tensor.ndim > 1 else 0.1)
    return state


def _original(model: Any, seed: int, prefix: str) -> dict[str, torch.Tensor]:
    model.load_state_dict(_state(model, seed))
    mapper = type(model).declared_capabilities().weight_mapping
    converted: dict[str, torch.Tensor] = mapper.convert(model.state_dict(), "to_original", add=prefix)
    return converted


def flux_gguf(path: Path, config: FluxConfig, types: TypeRule | None = None, *, seed: int = 0,
              prefix: str = "") -> Path:
    """A seeded Flux model of ``config`` in BFL's original layout, as a GGUF file (``architecture: flux``)."""
    state = _original(FluxTransformer2DModel.from_config(config), seed, prefix)
    return write_gguf(path, state, types or mixed_types(), architecture="flux", seed=seed)


def wan_gguf(path: Path, config: WanConfig, types: TypeRule | None = None, *, seed: int = 0,
             prefix: str = "") -> Path:
    """A seeded Wan model of ``config`` in Wan's original layout, as a GGUF file (``architecture: wan``)."""
    state = _original(WanTransformer3DModel.from_config(config), seed, prefix)
    return write_gguf(path, state, types or mixed_types(), architecture="wan", seed=seed)


def wide_gguf(path: Path, cls: type[FluxTransformer2DModel] | type[WanTransformer3DModel], config: Any,
              types: TypeRule, *, architecture: str, seed: int = 0) -> Path:
    """A model of any width as a GGUF file in its original layout, fast: no dense model is built.

    The layout comes from the model built on the meta device; K-quant tensors are random blocks,
    the others random values of the usual size (norm scales near 1).
    """
    with torch.device("meta"):
        model = cls(config)
    mapper = cls.declared_capabilities().weight_mapping
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, meta in mapper.convert(model.state_dict(), "to_original").items():
        if types(name, tuple(meta.shape)) in K_QUANTS:
            tensors[name] = meta
            continue
        values = torch.randn(meta.shape, generator=generator)
        scale = meta.shape[-1] ** -0.5 if meta.ndim > 1 else 0.1
        tensors[name] = 1.0 + 0.1 * values if name.endswith(".scale") else values * scale
    return write_gguf(path, tensors, types, architecture=architecture, seed=seed)


def dequantized(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a GGUF file dequantized by the ``gguf`` package (float32, torch shapes)."""
    reader = GGUFReader(str(path))
    out: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        values = dequantize(np.asarray(tensor.data), tensor.tensor_type).astype(np.float32)
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        out[tensor.name] = torch.from_numpy(values.reshape(shape).copy())
    return out
