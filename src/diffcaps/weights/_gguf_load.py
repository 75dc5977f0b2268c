"""Fill a model built on the meta device from a GGUF file, keeping quantized linear weights packed.

The caller (``weights.load_single_file``) has identified the file, built the model on meta
and checked names and shapes; :func:`fill_from_gguf` then runs the mapping plan step by step:

- a block-quantized weight of an ``nn.Linear`` stays packed (in a model that accepts the
  ``gguf`` scheme; the modules it declares in ``quantization.keep`` too — ``keep`` is what
  diffcaps never quantizes itself, and decoding a weight the file already quantized would
  change none of its values, only its size): its rows (uint8, ``[out, row_bytes]``) are views of the mapped file, and the
  layer becomes a :class:`PackedLinear` decoding them into ``compute_dtype`` at each call.
  Transforms that only cut, join or reorder rows (``Split``/``Reorder`` along dim 0, and
  renames) run on the packed rows without decoding;
- every other tensor (F32/F16/BF16, 1-D, non-linear weights, and a packed
  weight whose transform works inside rows) is decoded into its landing dtype on load.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Final, Protocol

import torch
from torch import nn

from diffcaps.errors import CheckpointError
from diffcaps.io import assign_tensor, expected_tensors, landing_dtype
from diffcaps.quantization.spec import GGUF_TYPES, PackedLinear, QuantizationSupport, gguf_codec
from diffcaps.weights._gguf_file import GGUFFile
from diffcaps.weights._transforms import Identity, Inverted, Reorder, Split, Transform

__all__ = ["SUPPORTED_TYPES", "PlanStep", "check_gguf_types", "fill_from_gguf", "row_wise"]

SUPPORTED_TYPES: Final = tuple(GGUF_TYPES)


class PlanStep(Protocol):
    """One step of a mapping plan: read ``sources``, transform, get ``targets``."""

    @property
    def sources(self) -> tuple[str, ...]: ...

    @property
    def targets(self) -> tuple[str, ...]: ...

    @property
    def transform(self) -> Transform: ...


def row_wise(transform: Transform) -> bool:
    """Whether ``transform`` only renames, cuts, joins or reorders whole rows (so it runs on packed rows)."""
    if isinstance(transform, Inverted):
        return row_wise(transform.inner)
    if isinstance(transform, Identity):
        return True
    return isinstance(transform, Split | Reorder) and transform.dim == 0


def check_gguf_types(file: GGUFFile, names: Iterable[str]) -> None:
    """Refuse (``CheckpointError`` naming file and tensor) a tensor of a type diffcaps cannot decode."""
    bad = [(name, file.tensors[name].kind) for name in names if file.tensors[name].kind not in GGUF_TYPES]
    if bad:
        listed = ", ".join(f"{name} ({kind})" for name, kind in bad[:12])
        raise CheckpointError(
            f"{len(bad)} tensor(s) of an unsupported GGUF type: {listed}; supported types: "
            f"{', '.join(SUPPORTED_TYPES)}", path=file.path)


def fill_from_gguf(
    model: nn.Module,
    steps: Iterable[PlanStep],
    file: GGUFFile,
    support: QuantizationSupport | None,
    *,
    torch_dtype: torch.dtype | None,
    device: str | torch.device,
    keep_fp32: Collection[str] = frozenset(),
) -> list[str]:
    """Load every planned tensor the model expects; return the packed weights decoded on load.

    Nothing is kept packed in a model that declares no ``quantization`` support (``support=None``).

    A packed linear weight computes in ``torch_dtype`` (float32 when ``None``; float32 in a
    module the model keeps in float32). A decoded-on-load weight is one whose transform
    cannot run on packed rows.
    """
    expected = expected_tensors(model)
    target = torch.device(device)
    decoded: list[str] = []
    ordered = sorted(steps, key=lambda step: min(file.tensors[s].offset for s in step.sources))
    for step in ordered:
        wanted = [name for name in step.targets if name in expected]
        if not wanted:
            continue
        infos = [file.tensors[s] for s in step.sources]
        owners = {name: None if support is None else support.packable(model, name, "gguf") for name in wanted}
        packable = all(info.packed and len(info.shape) == 2 for info in infos) and all(owners.values())
        if packable and row_wise(step.transform):
            _place_packed(model, step, file, owners, torch_dtype=torch_dtype, device=target, keep_fp32=keep_fp32)
            continue
        if packable:
            decoded.extend(name for name in wanted if owners[name])
        dense = [file.dense(s) for s in step.sources]
        for name, tensor in zip(step.targets, step.transform.forward(dense), strict=True):
            if name not in expected:
                continue
            dtype = landing_dtype(tensor.dtype, expected[name][1], torch_dtype, keep_fp32=name in keep_fp32)
            keep_view = target.type == "cpu" and tensor.dtype == dtype and tensor.is_contiguous()
            assign_tensor(model, name, tensor if keep_view else tensor.to(device=target, dtype=dtype, copy=True))
    return decoded


def _place_packed(model: nn.Module, step: PlanStep, file: GGUFFile, owners: dict[str, str | None], *,
                  torch_dtype: torch.dtype | None, device: torch.device, keep_fp32: Collection[str]) -> None:
    infos = [file.tensors[s] for s in step.sources]
    kinds = {info.kind for info in infos}
    if len(kinds) != 1:
        raise CheckpointError(f"{', '.join(step.sources)} are packed in different GGUF types ({', '.join(sorted(kinds))}) "
                              f"and cannot be {step.transform.describe()} without decoding", path=file.path)
    codec = gguf_codec(kinds.pop())
    rows = step.transform.forward([file.raw(s) for s in step.sources])
    logical = step.transform.forward_shapes([info.shape for info in infos])
    for name, packed, shape in zip(step.targets, rows, logical, strict=True):
        owner = owners.get(name)
        if owner is None:  # a part the model has no place for (strict=False)
            continue
        layer = model.get_submodule(owner)
        bias = dict(layer.named_parameters(recurse=False)).get("bias")
        compute = landing_dtype(torch.float32, torch.float32, torch_dtype, keep_fp32=name in keep_fp32)
        stored = packed if device.type == "cpu" and packed.is_contiguous() else packed.to(device=device, copy=True)
        model.set_submodule(owner, PackedLinear(stored, torch.Size(shape), codec, bias=bias, compute_dtype=compute))

