"""ComfyUI's scaled-fp8 single files: read, filled into a model (fp8 kept where it can be), written back.

A file is scaled fp8 when it holds a ``scaled_fp8`` marker tensor (whose dtype names the fp8
format). Its fp8 weights each come with a float32 scalar ``<layer>.scale_weight`` (the weight
is ``fp8 · scale``) and optionally ``<layer>.scale_input``, the input scale an fp8 matmul uses
on GPU; diffcaps reads and keeps it (so a saved file has it back) but computes in the compute
dtype, where it plays no part.

:func:`scaled_fp8_keys` reads and checks this structure from the header alone;
:func:`fill_scaled_fp8` fills the fp8 steps of a mapping plan — a weight of a plain
``nn.Linear`` stays fp8 (in the modules the model declares in ``quantization.keep`` too: they
are what diffcaps never quantizes itself, and the file's values are fp8 either way) (its bytes in a
:class:`PackedLinear` whose :class:`ScaledFP8` codec carries the scale), every other one is
dequantized on load; :func:`scaled_fp8_export` writes marker, fp8 weights and scales back.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from typing import Final, final

import attrs
import torch
from torch import Tensor, nn

from diffcaps.errors import CheckpointError
from diffcaps.io import MappedSafetensors, SafetensorsHeader, TensorSlot, assign_tensor, expected_tensors, landing_dtype
from diffcaps.quantization.spec import SCALED_FP8, PackedLinear, QuantizationSupport, ScaledFP8, packed_linears
from diffcaps.slots import InstanceSlot
from diffcaps.weights._gguf_load import PlanStep, row_wise

__all__ = ["ScaledFP8Keys", "fill_scaled_fp8", "scaled_fp8_export", "scaled_fp8_keys"]

FP8: Final = (torch.float8_e4m3fn, torch.float8_e5m2)


@final
@attrs.frozen(kw_only=True)
class ScaledFP8Keys:
    """Where a scaled-fp8 file keeps its marker and scales, by fp8 weight key."""

    marker: str
    scales: Mapping[str, str]
    """fp8 weight key → its ``scale_weight`` key."""
    inputs: Mapping[str, str]
    """fp8 weight key → its ``scale_input`` key (for the layers that have one)."""

    @property
    def extra(self) -> frozenset[str]:
        """The keys that are not weights: the marker and every scale."""
        return frozenset((self.marker, *self.scales.values(), *self.inputs.values()))


@final
@attrs.frozen
class _Marker:
    tensor: Tensor


MARKER_SLOT: Final[InstanceSlot[_Marker]] = InstanceSlot("scaled_fp8", _Marker)


def _scale_keys(header: SafetensorsHeader, suffix: str, fp8: Collection[str]) -> dict[str, str]:
    found: dict[str, str] = {}
    for key, info in header.tensors.items():
        if not key.endswith("." + suffix):
            continue
        weight = key.removesuffix(suffix) + "weight"
        if weight not in fp8:
            raise CheckpointError(f"{key} scales {weight}, which is not an fp8 tensor in this file", path=header.path)
        if info.shape not in ((), (1,)) or not info.dtype.is_floating_point:
            raise CheckpointError(f"{key} must be a floating scalar (shape [] or [1]), got {info.dtype} "
                                  f"of shape {list(info.shape)}", path=header.path)
        found[weight] = key
    return found


def scaled_fp8_keys(header: SafetensorsHeader) -> ScaledFP8Keys | None:
    """The marker and scale keys of a scaled-fp8 file (``None`` for a file without the marker).

    Raises ``CheckpointError`` naming file and key for a marker without fp8 weights, an fp8
    weight without its ``scale_weight``, or a scale that is not a scalar of an fp8 weight.
    """
    markers = [key for key in header.tensors if key.rsplit(".", 1)[-1] == SCALED_FP8]
    if not markers:
        return None
    if len(markers) > 1:
        raise CheckpointError(f"more than one {SCALED_FP8} marker: {', '.join(markers)}", path=header.path)
    fp8 = {key for key, info in header.tensors.items() if info.dtype in FP8 and key != markers[0]}
    if not fp8:
        raise CheckpointError(f"{markers[0]} marks a scaled-fp8 file, but no tensor is stored in fp8",
                              path=header.path)
    scales = _scale_keys(header, "scale_weight", fp8)
    unscaled = sorted(fp8 - scales.keys())
    if unscaled:
        shown = ", ".join(unscaled[:12]) + (f", … and {len(unscaled) - 12} more" if len(unscaled) > 12 else "")
        raise CheckpointError(f"{len(unscaled)} fp8 tensor(s) without their scale_weight: {shown}", path=header.path)
    return ScaledFP8Keys(marker=markers[0], scales=scales, inputs=_scale_keys(header, "scale_input", fp8))


def fill_scaled_fp8(
    model: nn.Module,
    steps: Iterable[PlanStep],
    header: SafetensorsHeader,
    keys: ScaledFP8Keys,
    support: QuantizationSupport | None,
    *,
    torch_dtype: torch.dtype | None,
    device: str | torch.device,
    keep_fp32: Collection[str] = frozenset(),
) -> None:
    """Load the plan steps whose sources are fp8 weights; the rest of the plan is the caller's.

    A step stays fp8 when every target is the weight of a plain ``nn.Linear``, its sources
    share one scale, and its transform only moves rows; it then computes in ``torch_dtype``
    (float32 when ``None``). Any other is dequantized (``fp8 · scale`` in float32) and lands
    as an unquantized tensor would.
    """
    expected = expected_tensors(model)
    target = torch.device(device)
    with MappedSafetensors(header.path, header=header) as reader:
        scale = {key: reader.view(name).clone() for key, name in keys.scales.items()}
        given = {key: reader.view(name).clone() for key, name in keys.inputs.items()}
        MARKER_SLOT.set(model, _Marker(reader.view(keys.marker).clone()))
        for step in steps:
            wanted = [name for name in step.targets if name in expected]
            if not wanted:
                continue
            owners = {name: None if support is None else support.packable(model, name, "scaled_fp8") for name in wanted}
            factors = {(float(scale[s]), float(given[s]) if s in given else None) if s in scale else None
                       for s in step.sources}
            sources = [reader.view(s) for s in step.sources]
            if all(owners.values()) and len(factors) == 1 and None not in factors and row_wise(step.transform):
                first = step.sources[0]
                codec = ScaledFP8(scale_weight=scale[first], scale_input=given.get(first), fp8=sources[0].dtype)
                rows = step.transform.forward([s.view(torch.uint8) for s in sources])
                shapes = step.transform.forward_shapes([tuple(s.shape) for s in sources])
                for name, packed, shape in zip(step.targets, rows, shapes, strict=True):
                    owner = owners.get(name)
                    if owner is not None:
                        _place(model, owner, packed.to(target, copy=True), torch.Size(shape), codec,
                               landing_dtype(torch.float32, torch.float32, torch_dtype, keep_fp32=name in keep_fp32))
                continue
            dense = [s.to(torch.float32) * scale[k].to(torch.float32) if k in scale else s.to(torch.float32)
                     for s, k in zip(sources, step.sources, strict=True)]
            for name, tensor in zip(step.targets, step.transform.forward(dense), strict=True):
                if name in expected:
                    dtype = landing_dtype(tensor.dtype, expected[name][1], torch_dtype, keep_fp32=name in keep_fp32)
                    assign_tensor(model, name, tensor.to(device=target, dtype=dtype, copy=True))


def _place(model: nn.Module, owner: str, packed: Tensor, shape: torch.Size, codec: ScaledFP8,
           compute: torch.dtype) -> None:
    layer = model.get_submodule(owner)
    bias = dict(layer.named_parameters(recurse=False)).get("bias")
    model.set_submodule(owner, PackedLinear(packed, shape, codec, bias=bias, compute_dtype=compute))


def scaled_fp8_export(
    module: nn.Module,
    steps: Sequence[PlanStep],
    slots: Sequence[TensorSlot],
    tensors: Iterable[tuple[str, Tensor]],
    *,
    prefix: str,
    where: str,
) -> tuple[list[TensorSlot], Iterator[tuple[str, Tensor]]]:
    """The file's slots and tensors with scaled-fp8 layers written back as a scaled-fp8 file.

    ``steps`` map model keys to file keys. Each fp8 layer's weight is written in its fp8 dtype
    beside its ``scale_weight`` (and ``scale_input``), and the marker is added; a model without
    scaled-fp8 layers gets ``slots`` and ``tensors`` unchanged.
    """
    codecs = {f"{name}.weight": layer.codec for name, layer in packed_linears(module)
              if isinstance(layer.codec, ScaledFP8)}
    if not codecs:
        return list(slots), iter(tensors)
    written: dict[str, ScaledFP8] = {}
    for step in steps:
        used = [codecs.get(source) for source in step.sources]
        found = [codec for codec in used if codec is not None]
        if not found:
            continue
        if len(found) != len(used) or len({(c.fp8, float(c.scale_weight)) for c in found}) != 1:
            raise CheckpointError(f"cannot write {', '.join(step.targets)} as scaled fp8: "
                                  f"{', '.join(step.sources)} do not share one fp8 scale", path=where)
        written.update(dict.fromkeys(step.targets, found[0]))
    scales: list[tuple[str, Tensor]] = []
    for key, codec in written.items():
        base = key.removesuffix("weight")
        scales.append((base + "scale_weight", codec.scale_weight))
        if codec.scale_input is not None:
            scales.append((base + "scale_input", codec.scale_input))
    held = MARKER_SLOT.get(module)
    marker = (prefix + SCALED_FP8, torch.empty(0, dtype=next(iter(written.values())).fp8) if held is None else held.tensor)
    out = [TensorSlot(key, t.dtype, tuple(t.shape)) for key, t in scales]
    out += [TensorSlot(s.key, written[s.key].fp8, s.shape) if s.key in written else s for s in slots]
    out.append(TensorSlot(marker[0], marker[1].dtype, tuple(marker[1].shape)))

    def produce() -> Iterator[tuple[str, Tensor]]:
        yield from scales
        for key, tensor in tensors:
            yield key, tensor.view(written[key].fp8) if key in written else tensor
        yield marker

    return out, produce()
