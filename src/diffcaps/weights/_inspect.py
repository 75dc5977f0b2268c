"""What a safetensors or GGUF file is, from its header alone: ``python -m diffcaps inspect FILE``.

A file is summarised (dtypes, tensor count, size) and handed to a list of *recognisers*,
each of which says whether the file is its kind of thing — a model checkpoint of some
variant, or (where a LoRA recogniser is added) an adapter in some format — and describes
it in rows of (label, value). No tensor is read. A GGUF file's tensor table is shown to the
recognisers as a header (logical shapes; uint8 where block-quantized), and the report adds
its GGUF types per tensor class and the memory it takes loaded packed and dense; a ComfyUI
scaled-fp8 file is recognised without its marker and scales, and the report adds its fp8
weights per tensor class and the memory it takes loaded with them kept fp8 and dense.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, final

import attrs

from diffcaps.errors import CapabilityError, CheckpointError, DiffcapsError
from diffcaps.io import SafetensorsHeader, TensorInfo, expected_tensors, read_header
from diffcaps.weights._gguf_file import is_gguf, read_gguf
from diffcaps.weights._scaled_fp8 import scaled_fp8_keys
from diffcaps.weights._service import Identification, WeightMapper
from diffcaps.weights._single_file import build_on_meta, check_identified, class_mapper, header_specs
from diffcaps.weights._variants import TensorSpec

if TYPE_CHECKING:
    from diffcaps.model import Model

__all__ = ["FileReport", "Recogniser", "Recognition", "checkpoint_recogniser", "inspect_file"]

Row = tuple[str, str]


@final
@attrs.frozen(kw_only=True)
class Recognition:
    """One recogniser's verdict: ``matched``, and rows describing the file (or why not).

    ``tensor_classes`` is the recognised model's grouping of its tensor names (its weight
    mapping's), used to report a quantized file class by class.
    """

    kind: str
    matched: bool
    rows: tuple[Row, ...] = ()
    tensor_classes: tuple[tuple[str, tuple[str, ...]], ...] = ()


Recogniser = Callable[[SafetensorsHeader], Recognition]
"""Looks at a header and says whether the file is its kind of thing."""


def _dtype_name(dtype: object) -> str:
    return str(dtype).removeprefix("torch.")


def human_bytes(count: int) -> str:
    """``23.8 GB``, ``512.0 KB``: decimal units, as file managers show."""
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} B"


def _strings(value: Mapping[str, str]) -> dict[str, str]:
    return dict(value)


@final
@attrs.frozen(kw_only=True)
class FileReport:
    """A safetensors file described from its header."""

    path: Path
    file_bytes: int
    tensors: int
    parameters: int
    dtypes: tuple[tuple[str, int], ...]
    metadata: Mapping[str, str] = attrs.field(converter=_strings)
    recognitions: tuple[Recognition, ...] = ()
    quantization: tuple[Row, ...] = ()
    """For a quantized file: its types per tensor class, and the memory it takes loaded."""

    @property
    def kind(self) -> str:
        """The first recognised kind, or ``unknown``."""
        return next((r.kind for r in self.recognitions if r.matched), "unknown")

    def describe(self) -> str:
        """The report as aligned ``label  value`` lines."""
        matched = [r for r in self.recognitions if r.matched]
        rows: list[Row] = [("kind", self.kind)]
        if matched:
            rows.extend(matched[0].rows)
        else:
            rows.extend(row for r in self.recognitions for row in r.rows)
        dtypes = ", ".join(f"{name} ({count})" if len(self.dtypes) > 1 else name for name, count in self.dtypes)
        rows += [
            ("dtype", dtypes or "none"),
            *self.quantization,
            ("tensors", str(self.tensors)),
            ("size", f"{human_bytes(self.file_bytes)} ({_parameters(self.parameters)} parameters)"),
        ]
        if self.metadata:
            rows.append(("metadata", ", ".join(f"{k}={_short(v)}" for k, v in sorted(self.metadata.items()))))
        width = max(len(label) for label, _ in rows)
        return "\n".join([str(self.path), *(f"  {label.ljust(width)}   {value}" for label, value in rows)])


def _parameters(count: int) -> str:
    if count >= 10**9:
        return f"{count / 10**9:.2f} B"
    if count >= 10**6:
        return f"{count / 10**6:.2f} M"
    return str(count)


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def inspect_file(path: str | os.PathLike[str], recognisers: Sequence[Recogniser]) -> FileReport:
    """Describe a safetensors file without reading a tensor; ``CheckpointError`` if it is not one.

    Recognisers are tried in order until one matches; those that did not match before it
    keep their reasons, shown when nothing matches.
    """
    if is_gguf(path):
        return _inspect_gguf(path, recognisers)
    header = read_header(path)
    counts = Counter(_dtype_name(info.dtype) for info in header.tensors.values())
    weights, scaled = _scaled_fp8(header)
    recognitions = tuple(_recognise(weights, recognisers))
    quantization = scaled(_classes(recognitions)) if scaled is not None else ()
    return FileReport(
        path=Path(path),
        file_bytes=header.path.stat().st_size,
        tensors=len(header.tensors),
        parameters=sum(math.prod(info.shape) for info in header.tensors.values()),
        dtypes=tuple(sorted(counts.items(), key=lambda item: (-item[1], item[0]))),
        metadata=header.metadata,
        recognitions=recognitions,
        quantization=quantization,
    )


_Classes = tuple[tuple[str, tuple[str, ...]], ...]
_ScaledRows = Callable[[_Classes], tuple[Row, ...]]


def _classes(recognitions: Sequence[Recognition]) -> _Classes:
    """The tensor classes of the model the file was recognised as (none when nothing matched)."""
    return next((found.tensor_classes for found in recognitions if found.matched), ())


def _scaled_fp8(header: SafetensorsHeader) -> tuple[SafetensorsHeader, _ScaledRows | None]:
    """(the header the recognisers see, what makes the quantization rows) of a safetensors file.

    A ComfyUI scaled-fp8 file is shown to the recognisers without its marker and scales (as
    ``load_single_file`` maps it) and reported with its fp8 weights per tensor class (the
    recognised model's) and the memory it takes loaded with the fp8 weights kept; any other
    file is passed on as it is.
    """
    try:
        keys = scaled_fp8_keys(header)
    except CheckpointError as exc:  # the marker is there, the structure is not: say why, load will refuse it
        broken: tuple[Row, ...] = (("quantized", f"scaled fp8, but {str(exc).removeprefix(f'{header.path}: ')}"),)
        return header, lambda _: broken
    if keys is None:
        return header, None
    found = keys
    tensors = {name: info for name, info in header.tensors.items() if name not in keys.extra}

    def rows(known: _Classes) -> tuple[Row, ...]:
        classes: dict[str, Counter[str]] = {}
        for name, info in tensors.items():
            classes.setdefault(_tensor_class(name, len(info.shape), known), Counter())[_dtype_name(info.dtype)] += 1
        fp8 = sum(math.prod(tensors[name].shape) for name in found.scales)
        values = sum(math.prod(info.shape) for info in tensors.values())
        return (
            ("quantized", f"scaled fp8 ({_dtype_name(header.tensors[found.marker].dtype)}): {len(found.scales)} "
                          f"fp8 weight(s) with a scale_weight ({len(found.inputs)} with a scale_input); "
                          "dtypes by tensor class:"),
            *_class_rows(classes),
            ("memory", f"about {human_bytes(fp8 + 2 * (values - fp8))} loaded with the fp8 weights kept (the "
                       f"rest in bfloat16); {human_bytes(2 * values)} dense in bfloat16"),
        )

    return attrs.evolve(header, tensors=tensors), rows


def _class_rows(classes: Mapping[str, Counter[str]]) -> list[Row]:
    return [(f"  {label}", ", ".join(f"{kind} ×{count}" for kind, count in counts.most_common()))
            for label, counts in sorted(classes.items())]


def _recognise(header: SafetensorsHeader, recognisers: Sequence[Recogniser]) -> list[Recognition]:
    recognitions: list[Recognition] = []
    for recognise in recognisers:
        recognitions.append(recognise(header))
        if recognitions[-1].matched:
            break
    return recognitions


def _tensor_class(name: str, ndim: int, classes: _Classes) -> str:
    """The class of tensor ``name`` among the model's ``classes``; a bias outside norms and modulation is a bias."""
    found = next((label for label, words in classes if any(w in name for w in words)), "other")
    return "biases" if ndim == 1 and name.endswith(".bias") and found not in ("norms", "modulation") else found


def _inspect_gguf(path: str | os.PathLike[str], recognisers: Sequence[Recogniser]) -> FileReport:
    """A GGUF file described from its header: recognised as a checkpoint would be, with its types per class."""
    file = read_gguf(path)
    specs = file.specs()
    # the recognisers see the tensor table as a header: logical shapes, uint8 where packed
    header = SafetensorsHeader(
        path=Path(path),
        tensors={name: TensorInfo(dtype=specs[name].dtype, shape=info.shape, start=info.offset,
                                  end=info.offset + info.nbytes) for name, info in file.tensors.items()},
        metadata={"general.architecture": file.architecture} if file.architecture else {},
        data_start=0,
    )
    kinds = Counter(info.kind for info in file.tensors.values())
    recognitions = tuple(_recognise(header, recognisers))
    known = _classes(recognitions)
    classes: dict[str, Counter[str]] = {}
    for name, info in file.tensors.items():
        classes.setdefault(_tensor_class(name, len(info.shape), known), Counter())[info.kind] += 1
    values = sum(info.numel for info in file.tensors.values())
    packed = sum(info.nbytes for info in file.tensors.values() if info.packed and len(info.shape) >= 2)
    unpacked = sum(info.numel for info in file.tensors.values() if not (info.packed and len(info.shape) >= 2))
    rows = _class_rows(classes)
    rows.append(("memory", f"about {human_bytes(packed + 2 * unpacked)} loaded packed (quantized matrices as "
                           f"stored, the rest in bfloat16); {human_bytes(2 * values)} dense in bfloat16"))
    return FileReport(
        path=Path(path),
        file_bytes=file.size,
        tensors=len(file.tensors),
        parameters=values,
        dtypes=tuple(sorted(kinds.items(), key=lambda item: (-item[1], item[0]))),
        metadata=dict(header.metadata),
        recognitions=recognitions,
        quantization=(("quantized", f"GGUF, {len(kinds)} type(s) by tensor class:"), *rows),
    )


def _count(value: object, label: str) -> str:
    return f"{value} {label.removesuffix('s') if value == 1 else label}"


def _config_row(config: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={list(v) if isinstance(v, tuple) else v}" for k, v in config.items())


def _mapped(model_classes: Iterable[type[Any]]) -> list[tuple[type[Model[Any]], WeightMapper]]:
    found: list[tuple[type[Model[Any]], WeightMapper]] = []
    for cls in model_classes:
        try:
            found.append(class_mapper(cls))
        except CapabilityError:
            continue
    return found


def checkpoint_recogniser(model_classes: Iterable[type[Any]]) -> Recogniser:
    """A recogniser for model checkpoints of any of these classes that declare weight mapping."""
    candidates = _mapped(model_classes)

    def recognise(header: SafetensorsHeader) -> Recognition:
        specs = header_specs(header)
        reasons: list[Row] = []
        for cls, mapper in candidates:
            try:
                found = mapper.identify(specs)
            except CheckpointError as exc:
                reasons.append((cls.__name__, str(exc).splitlines()[0].removeprefix(f"{header.path}: ")))
                continue
            variant = found.variant
            layers = ", ".join(_count(found.config.get(key), label) for label, key in mapper.layer_counts.items())
            layout = found.layout + (f" (prefix {found.prefix!r})" if found.prefix else "")
            rows: list[Row] = [
                ("model", f"{cls.__name__} ({mapper.family})"),
                ("variant", f"{variant.name}" + (f" — {variant.description}" if variant.description else "")),
                ("layout", layout),
            ]
            if layers:
                rows.append(("layers", layers))
            rows += [("config", _config_row(found.config)), ("fit", _fit(cls, found, mapper, specs, header))]
            return Recognition(kind="checkpoint", matched=True, rows=tuple(rows), tensor_classes=mapper.tensor_classes)
        return Recognition(kind="checkpoint", matched=False, rows=tuple(reasons))

    return recognise


def _fit(cls: type[Model[Any]], found: Identification, mapper: WeightMapper, specs: Mapping[str, TensorSpec],
         header: SafetensorsHeader) -> str:
    try:
        model = build_on_meta(cls, found.config, source=str(header.path),
                              tensors=found.plan.target_specs(specs, path=str(header.path)))
        check_identified(mapper, found, specs, expected_tensors(model), path=str(header.path), strict=True)
    except DiffcapsError as exc:  # a config the model refuses, keys or shapes that do not fit
        return f"does not load as is: {str(exc).removeprefix(str(header.path) + ': ')}"
    return f"every tensor has its place in {cls.__name__}"
