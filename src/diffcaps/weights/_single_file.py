"""``load_single_file`` and ``save_single_file``: a model from one checkpoint file, and back.

Loading reads only the header until every check has passed: the variant and config come
from key names and shapes, the model is built on the meta device, and the file's tensors
are matched against it name by name and shape by shape. Then each tensor is viewed in the
memory-mapped file and transformed; where it must change dtype or device it is copied and
cast as it lands in the model and its pages are released, otherwise the model keeps the
view — so the peak is about one copy of the weights. On any error no model is returned.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast

import attrs
import torch
from torch import Tensor

from diffcaps.errors import CapabilityError, CheckpointError, ShapeError
from diffcaps.io import (
    MappedSafetensors,
    SafetensorsHeader,
    TensorSlot,
    assign_tensor,
    expected_tensors,
    landing_dtype,
    on_meta_device,
    read_header,
    stream_safetensors,
)
from diffcaps.protocols import SupportsWeightMapping, require
from diffcaps.quantization.spec import PackedLinear, ScaledFP8, packed_linears
from diffcaps.weights._gguf_file import is_gguf, read_gguf
from diffcaps.weights._gguf_load import check_gguf_types, fill_from_gguf
from diffcaps.weights._scaled_fp8 import ScaledFP8Keys, fill_scaled_fp8, scaled_fp8_export, scaled_fp8_keys
from diffcaps.weights._service import Identification, MappingPlan, Step, WeightMapper
from diffcaps.weights._variants import TensorSpec

if TYPE_CHECKING:
    from diffcaps.model import Model

__all__ = [
    "UnexpectedTensorsWarning",
    "aligned",
    "build_on_meta",
    "check_against_model",
    "check_identified",
    "class_mapper",
    "fill_from_file",
    "header_specs",
    "load_single_file",
    "output_plan",
    "planned_slots",
    "produce",
    "save_single_file",
]


M = TypeVar("M", bound=SupportsWeightMapping)


class UnexpectedTensorsWarning(UserWarning):
    """A checkpoint held tensors the model has no place for (loaded with ``strict=False``)."""

    def __init__(self, path: str, keys: list[str]) -> None:
        self.path = path
        self.keys = tuple(keys)
        shown = ", ".join(keys[:12]) + (f", … and {len(keys) - 12} more" if len(keys) > 12 else "")
        super().__init__(f"{path}: {len(keys)} tensor(s) not loaded (no place in the model): {shown}")


def header_specs(header: SafetensorsHeader) -> dict[str, TensorSpec]:
    """Shape and dtype of every tensor in a parsed header."""
    return {key: TensorSpec(shape=info.shape, dtype=info.dtype) for key, info in header.tensors.items()}


def class_mapper(cls: object) -> tuple[type[Model[Any]], WeightMapper]:
    """A model class and the weight mapping it declares (``CapabilityError`` when it is no such class).

    A model class is told by what it has (a module class with ``declared_capabilities``), not by
    ``issubclass(cls, Model)``: ``Model`` imports this package's spec through its capabilities.
    """
    declared = getattr(cls, "declared_capabilities", None)
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module) and callable(declared)):
        raise CapabilityError(getattr(cls, "__name__", type(cls).__name__),
                              "weight_mapping (pass a diffcaps model class)")
    model_class = cast("type[Model[Any]]", cls)
    mapper = model_class.declared_capabilities().weight_mapping
    if mapper is None:
        raise CapabilityError(cls.__name__, "weight_mapping")
    return model_class, mapper


def build_on_meta(cls: type[Model[Any]], config: Mapping[str, Any], *, source: str,
                  tensors: Mapping[str, TensorSpec] | None = None) -> Model[Any]:
    """The model a config describes, built on the meta device (no memory for weights).

    ``tensors`` are those a file can fill the model with: a build that outgrows them (a
    forged block index or size) stops at once with a ``CheckpointError`` naming ``source``.
    """
    built = cls.config_class.from_dict(config, source=source)
    if tensors is None:
        with on_meta_device():
            return cls(built)
    elements = sum(math.prod(spec.shape) for spec in tensors.values())
    with on_meta_device(max_tensors=len(tensors), max_elements=elements, where=source):
        return cls(built)


def check_against_model(
    mapper: WeightMapper,
    plan: MappingPlan,
    specs: Mapping[str, TensorSpec],
    expected: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
    *,
    layout: Literal["original", "diffusers"],
    prefix: str,
    label: str,
    path: str,
    strict: bool,
) -> list[str]:
    """Check names and shapes of a file against a model; return the file keys it does not use.

    ``plan`` maps the file's keys to the model's. Missing tensors and shape mismatches are
    always errors, named as the file names them; tensors the model has no place for are an
    error when ``strict``, else they are returned (and the caller warns).
    """
    targets = plan.target_specs(specs, path=path)
    produced = plan.producer()
    missing = [key for key in expected if key not in targets]
    unexpected = list(plan.unused) + [
        source for step in plan.steps if not any(t in expected for t in step.targets) for source in step.sources
    ]
    if missing or plan.missing:
        names = (
            mapper.original_names(missing, prefix=prefix) if layout == "original"
            else [prefix + key for key in missing]
        )
        raise CheckpointError.key_mismatch(
            path, missing=[*names, *plan.missing], unexpected=unexpected if strict else ()
        )
    if unexpected and strict:
        error = CheckpointError.key_mismatch(path, unexpected=unexpected)
        error.args = (f"{error.args[0]} (pass strict=False to load without them)",)
        raise error
    for key, (shape, _) in expected.items():
        if targets[key].shape != shape:
            sources = ", ".join(f"{s} {list(specs[s].shape)}" for s in produced[key].sources)
            raise ShapeError(
                f"{sources} gives {key} of shape {list(targets[key].shape)}; the model built from "
                f"the {label} config expects {list(shape)}",
                path=path,
            )
    return unexpected


def check_identified(
    mapper: WeightMapper,
    found: Identification,
    specs: Mapping[str, TensorSpec],
    expected: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
    *,
    path: str,
    strict: bool,
) -> list[str]:
    """:func:`check_against_model` for an identified checkpoint."""
    return check_against_model(
        mapper, found.plan, specs, expected, layout=found.layout, prefix=found.prefix,
        label=f"file's {found.variant.name}", path=path, strict=strict,
    )


def _by_offset(plan: MappingPlan, header: SafetensorsHeader) -> list[Step]:
    return sorted(plan.steps, key=lambda step: min(header.tensors[s].start for s in step.sources))


def fill_from_file(
    model: torch.nn.Module,
    plan: MappingPlan,
    header: SafetensorsHeader,
    *,
    torch_dtype: torch.dtype | None,
    device: str | torch.device,
    keep_fp32: Collection[str] = frozenset(),
) -> None:
    """Read every planned tensor the model expects, in file order, into the model.

    The tensors named in ``keep_fp32`` land in float32 whatever ``torch_dtype`` says.

    A tensor that needs no cast and stays on the CPU is kept as a view of the mapped file
    (split parts included): no copy is made, and its pages are read when first used. Any
    other is copied and cast as it lands, and its pages are released.
    """
    expected = expected_tensors(model)
    on_cpu = torch.device(device).type == "cpu"
    with MappedSafetensors(header.path, header=header) as reader:
        for step in _by_offset(plan, header):
            if not any(t in expected for t in step.targets):
                continue
            views = [reader.view(key) for key in step.sources]
            mapped = False
            for name, tensor in zip(step.targets, step.run(views), strict=True):
                if name not in expected:
                    continue
                dtype = landing_dtype(tensor.dtype, expected[name][1], torch_dtype, keep_fp32=name in keep_fp32)
                if on_cpu and tensor.dtype == dtype and tensor.is_contiguous():
                    if reader.backs(tensor):
                        mapped, tensor = True, reader.standalone(tensor)
                    assign_tensor(model, name, tensor)
                else:
                    assign_tensor(model, name, tensor.to(device=device, dtype=dtype, copy=True))
            del views
            if not mapped:
                for key in step.sources:
                    reader.release(key)


def load_single_file(
    cls: type[M],
    path: str | os.PathLike[str],
    *,
    variant: str | None = None,
    torch_dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    strict: bool = True,
) -> M:
    """Load a model from one checkpoint file in its original layout (or in diffusers layout).

    The variant (``flux-dev``, …), the prefix and the config are read from the file's key
    names and shapes; pass ``variant`` to insist on one. Tensors are cast to ``torch_dtype``
    as they land (``None``: the model's default, float32), on ``device``; the modules the
    model declares in ``keep_in_fp32`` land in float32. Tensors the model
    has no place for are an error unless ``strict=False``, which loads without them and
    warns with an :class:`UnexpectedTensorsWarning`. A ComfyUI scaled-fp8 file keeps its fp8
    linear weights fp8 in memory, computing in ``torch_dtype`` (see :mod:`diffcaps.quantization`).
    """
    if is_gguf(path):
        return _load_gguf(cls, path, variant=variant, torch_dtype=torch_dtype, device=device, strict=strict)
    model_class, mapper = class_mapper(cls)
    where = str(path)
    header = read_header(path)
    scaled = scaled_fp8_keys(header)
    specs = {k: v for k, v in header_specs(header).items() if scaled is None or k not in scaled.extra}
    found = mapper.identify(specs, variant=variant, path=where)
    model = build_on_meta(model_class, found.config, source=f"{where} ({found.variant.name})",
                          tensors=found.plan.target_specs(specs, path=where))
    unexpected = check_identified(mapper, found, specs, expected_tensors(model), path=where, strict=strict)
    if scaled is None:
        fill_from_file(model, found.plan, header, torch_dtype=torch_dtype, device=device,
                       keep_fp32=model.kept_in_fp32())
    else:
        _fill_scaled_fp8(model, found.plan, header, scaled, torch_dtype=torch_dtype, device=device)
    if unexpected:
        warnings.warn(UnexpectedTensorsWarning(where, unexpected), stacklevel=2)
    return cast(M, model.eval())  # model_class is cls, narrowed at run time


def _fill_scaled_fp8(model: Model[Any], plan: MappingPlan, header: SafetensorsHeader, keys: ScaledFP8Keys, *,
                     torch_dtype: torch.dtype | None, device: str | torch.device) -> None:
    """:func:`fill_from_file` for a ComfyUI scaled-fp8 file: the steps that read fp8 weights go
    through :func:`~diffcaps.weights._scaled_fp8.fill_scaled_fp8` (kept fp8 where the layer allows)."""
    fp8 = tuple(step for step in plan.steps if any(source in keys.scales for source in step.sources))
    rest = attrs.evolve(plan, steps=tuple(step for step in plan.steps if step not in fp8))
    fill_from_file(model, rest, header, torch_dtype=torch_dtype, device=device, keep_fp32=model.kept_in_fp32())
    fill_scaled_fp8(model, fp8, header, keys, model.declared_capabilities().quantization,
                    torch_dtype=torch_dtype, device=device, keep_fp32=model.kept_in_fp32())


def _load_gguf(
    cls: type[M],
    path: str | os.PathLike[str],
    *,
    variant: str | None,
    torch_dtype: torch.dtype | None,
    device: str | torch.device,
    strict: bool,
) -> M:
    """:func:`load_single_file` for a GGUF file: identified and checked the same way, but its
    block-quantized linear weights stay packed (see :mod:`diffcaps.quantization`)."""
    model_class, mapper = class_mapper(cls)
    where = str(path)
    file = read_gguf(path)
    specs = file.specs()
    found = mapper.identify(specs, variant=variant, path=where)
    model = build_on_meta(model_class, found.config, source=f"{where} ({found.variant.name})",
                          tensors=found.plan.target_specs(specs, path=where))
    expected = expected_tensors(model)
    unexpected = check_identified(mapper, found, specs, expected, path=where, strict=strict)
    used = [step for step in found.plan.steps if any(t in expected for t in step.targets)]
    check_gguf_types(file, [source for step in used for source in step.sources])
    decoded = fill_from_gguf(model, used, file, model_class.declared_capabilities().quantization,
                             torch_dtype=torch_dtype, device=device, keep_fp32=model.kept_in_fp32())
    if decoded:
        warnings.warn(f"{where}: {len(decoded)} quantized weight(s) decoded on load, their mapping cannot run "
                      f"on packed rows: {', '.join(decoded[:12])}", stacklevel=3)
    if unexpected:
        warnings.warn(UnexpectedTensorsWarning(where, unexpected), stacklevel=3)
    return cast(M, model.eval())  # model_class is cls, narrowed at run time


def output_plan(
    mapper: WeightMapper,
    keys: list[str],
    layout: Literal["original", "diffusers"],
    *,
    prefix: str,
    where: str,
) -> MappingPlan:
    """How model keys become the keys of a file in ``layout`` (every key must have a place)."""
    if layout == "diffusers":
        return MappingPlan(steps=tuple(Step((k,), (prefix + k,)) for k in keys))
    if layout != "original":
        raise ValueError(f"layout must be 'original' or 'diffusers', got {layout!r}")
    plan = mapper.plan(keys, "to_original", add=prefix)
    if plan.unused or plan.missing:
        raise CheckpointError(
            f"cannot write the original {mapper.family} layout: "
            + "; ".join(
                part for part in (
                    f"no original name for {', '.join(plan.unused)}" if plan.unused else "",
                    f"fused tensors lack {', '.join(plan.missing)}" if plan.missing else "",
                ) if part
            ),
            path=where,
        )
    return plan


def planned_slots(
    plan: MappingPlan, specs: Mapping[str, TensorSpec], torch_dtype: torch.dtype | None, *, where: str
) -> list[TensorSlot]:
    """The output file's tensors, in the order the plan makes them."""
    targets = plan.target_specs(specs, path=where)
    return [
        TensorSlot(key, _out_dtype(targets[key].dtype, torch_dtype), targets[key].shape)
        for step in plan.steps
        for key in step.targets
    ]


def aligned(plan: MappingPlan, slots: list[TensorSlot]) -> tuple[MappingPlan, list[TensorSlot]]:
    """Put wider dtypes first, so that every tensor in the file starts aligned to its width."""
    width = {slot.key: slot.dtype.itemsize for slot in slots}
    steps = sorted(plan.steps, key=lambda step: -max(width[t] for t in step.targets))
    order = {key: i for i, key in enumerate(t for step in steps for t in step.targets)}
    return attrs.evolve(plan, steps=tuple(steps)), sorted(slots, key=lambda slot: order[slot.key])


def _out_dtype(stored: torch.dtype, requested: torch.dtype | None) -> torch.dtype:
    return requested if requested is not None and stored.is_floating_point else stored


def produce(
    plan: MappingPlan,
    fetch: Callable[[str], Tensor],
    torch_dtype: torch.dtype | None,
    done: Callable[[str], None] | None = None,
) -> Iterator[tuple[str, Tensor]]:
    """Run the plan step by step, yielding each target tensor (cast to ``torch_dtype``)."""
    for step in plan.steps:
        outputs = step.run([fetch(key) for key in step.sources])
        for key, tensor in zip(step.targets, outputs, strict=True):
            yield key, tensor.to(_out_dtype(tensor.dtype, torch_dtype))
        del outputs
        if done is not None:
            for key in step.sources:
                done(key)


def save_single_file(
    model: SupportsWeightMapping,
    path: str | os.PathLike[str],
    layout: Literal["original", "diffusers"] = "original",
    *,
    prefix: str = "",
    torch_dtype: torch.dtype | None = None,
) -> Path:
    """Write a model as one safetensors file, in its original layout (default) or diffusers'.

    ``prefix`` is put before every key (``"model.diffusion_model."`` as some tools expect);
    ``torch_dtype`` casts floating tensors as they are written (``torch.float8_e4m3fn`` for
    an fp8 file). A model loaded from a ComfyUI scaled-fp8 file is written back in that format
    (marker, fp8 weights, their scales); other packed weights (a GGUF file's) are written
    decoded in their compute dtype. Tensors are converted and written one at a time; the file
    appears under its name only once complete.
    """
    module, mapper = require(model, "weight_mapping")
    state: dict[str, Tensor] = module.state_dict()
    where = str(path)
    plan = output_plan(mapper, list(state), layout, prefix=prefix, where=where)
    specs = {key: TensorSpec(shape=tuple(t.shape), dtype=t.dtype) for key, t in state.items()}
    decoded = _decoded_weights(module)
    specs.update((key, TensorSpec(shape=tuple(layer.weight_shape), dtype=layer.compute_dtype))
                 for key, layer in decoded.items())

    def tensor(key: str) -> Tensor:
        return decoded[key].dense_weight() if key in decoded else state[key]

    plan, slots = aligned(plan, planned_slots(plan, specs, torch_dtype, where=where))
    # scaled-fp8 layers are written back in their format (fp8 weights, scales, marker)
    slots, tensors = scaled_fp8_export(module, plan.steps, slots, produce(plan, tensor, torch_dtype),
                                       prefix=prefix, where=where)
    return stream_safetensors(path, slots, tensors)


def _decoded_weights(module: torch.nn.Module) -> dict[str, PackedLinear]:
    """Weight key → layer, for the packed layers written decoded (all but scaled fp8, written as it is)."""
    return {f"{name}.weight": layer for name, layer in packed_linears(module) if not isinstance(layer.codec, ScaledFP8)}
