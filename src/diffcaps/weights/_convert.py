"""``convert``: a single-file checkpoint to a diffusers folder and back, without a model.

Only tensors move: each is viewed in the memory-mapped source, transformed, and written
to the output as soon as it is ready, so a conversion holds about one fused tensor at a
time. The model class is built on the meta device only to check names and shapes first.
Dtypes are kept unless ``torch_dtype`` is given.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Literal, final

import attrs
import torch
from torch import Tensor

from diffcaps.errors import CheckpointError
from diffcaps.io import (
    CONFIG_NAME,
    INDEX_NAME,
    WEIGHTS_NAME,
    MappedSafetensors,
    Progress,
    SafetensorsHeader,
    expected_tensors,
    find_weights,
    read_config,
    read_header,
    resolve_model_folder,
    stream_safetensors,
    stream_shards,
)
from diffcaps.protocols import SupportsWeightMapping
from diffcaps.weights._gguf_file import GGUFFile, is_gguf, read_gguf
from diffcaps.weights._gguf_load import check_gguf_types
from diffcaps.weights._service import MappingPlan, Step, WeightMapper
from diffcaps.weights._single_file import (
    UnexpectedTensorsWarning,
    aligned,
    build_on_meta,
    check_against_model,
    class_mapper,
    header_specs,
    output_plan,
    planned_slots,
)
from diffcaps.weights._variants import TensorSpec


__all__ = ["ConversionReport", "convert"]


@final
@attrs.frozen(kw_only=True)
class ConversionReport:
    """What ``convert`` wrote: the layout and variant, the files, how many tensors and bytes."""

    source: Path
    target: Path
    layout: Literal["original", "diffusers"]
    variant: str | None
    files: tuple[Path, ...]
    tensors: int
    nbytes: int
    skipped: tuple[str, ...] = ()


class _Tensors:
    """The tensors of one file or of a folder's shards, viewed through memory maps."""

    def __init__(self, headers: Mapping[str, SafetensorsHeader]) -> None:
        self._where = headers
        self._stack = ExitStack()
        self._open: dict[Path, MappedSafetensors] = {}

    def _file(self, key: str) -> MappedSafetensors:
        header = self._where[key]
        if header.path not in self._open:
            self._open[header.path] = self._stack.enter_context(MappedSafetensors(header.path, header=header))
        return self._open[header.path]

    def view(self, key: str) -> Tensor:
        return self._file(key).view(key)

    def release(self, key: str) -> None:
        self._file(key).release(key)

    def offset(self, key: str) -> tuple[str, int]:
        header = self._where[key]
        return str(header.path), header.tensors[key].start

    def close(self) -> None:
        self._stack.close()


class _GGUFTensors:
    """The tensors of a GGUF file, each decoded (float32 where it is block-quantized) as it is asked for."""

    def __init__(self, file: GGUFFile) -> None:
        self._file = file

    def view(self, key: str) -> Tensor:
        return self._file.dense(key)

    def release(self, key: str) -> None:
        del key  # a decoded tensor is dropped once written; the mapped bytes stay in the page cache

    def offset(self, key: str) -> tuple[str, int]:
        return str(self._file.path), self._file.tensors[key].offset

    def close(self) -> None:
        """Nothing to close: the mapping goes with the last view."""


def _folder_headers(folder: Path) -> dict[str, SafetensorsHeader]:
    source = find_weights(folder)
    return {key: source.headers[path] for key, (path, _) in source.entries.items()}


def _check_target(target: Path, layout: str, overwrite: bool) -> None:
    """Refuse a target of the wrong kind, or one holding a model, unless ``overwrite``; change nothing."""
    if layout == "original":
        if target.is_dir():
            raise CheckpointError("is a folder; the original layout is one .safetensors file", path=target)
        if target.exists() and not overwrite:
            raise CheckpointError("already exists (pass overwrite=True / --force to replace it)", path=target)
        return
    if target.exists() and not target.is_dir():
        raise CheckpointError("is a file; the diffusers layout is a folder", path=target)
    model_files = (CONFIG_NAME, WEIGHTS_NAME, INDEX_NAME)
    ours = sorted(p.name for p in target.glob("*") if p.name in model_files or p.name.startswith("diffusion_pytorch_model-"))
    if ours and not overwrite:
        raise CheckpointError(f"already holds {', '.join(ours)} (pass overwrite=True / --force)", path=target)


def _stream(
    first: MappingPlan,
    second: MappingPlan,
    tensors: _Tensors | _GGUFTensors,
    torch_dtype: torch.dtype | None,
) -> Iterator[tuple[str, Tensor]]:
    """Run ``first`` (file → model keys) lazily as ``second`` (model → output keys) asks."""
    maker = first.producer()
    ready: dict[str, Tensor] = {}
    waiting: dict[Step, int] = {}

    def fetch(key: str) -> Tensor:
        if key not in ready:
            step = maker[key]
            outputs = step.run([tensors.view(k) for k in step.sources])
            ready.update(zip(step.targets, outputs, strict=True))
            waiting[step] = len(step.targets)
        tensor = ready.pop(key)
        step = maker[key]
        waiting[step] -= 1
        if not waiting[step]:
            del waiting[step]
            for source in step.sources:
                tensors.release(source)
        return tensor

    for step in second.steps:
        outputs = step.run([fetch(key) for key in step.sources])
        for key, tensor in zip(step.targets, outputs, strict=True):
            stored = tensor.dtype
            cast = torch_dtype if torch_dtype is not None and stored.is_floating_point else stored
            yield key, tensor.to(cast, copy=True)
        del outputs


def convert(
    cls: type[SupportsWeightMapping],
    source: str | os.PathLike[str],
    target: str | os.PathLike[str],
    *,
    to: Literal["original", "diffusers"] | None = None,
    variant: str | None = None,
    prefix: str = "",
    torch_dtype: torch.dtype | None = None,
    strict: bool = True,
    max_shard_size: int | str = "10GB",
    overwrite: bool = False,
    progress: Progress | None = None,
) -> ConversionReport:
    """Convert a checkpoint between the original single-file layout and a diffusers folder.

    ``source`` is a single file (original layout, with or without a prefix, or diffusers
    layout; safetensors, or GGUF — dequantized, into float32 unless ``torch_dtype`` says
    otherwise) or a diffusers model folder. ``to`` defaults to the other layout: a file in the
    original layout becomes a diffusers folder (``config.json`` + weights, sharded above
    ``max_shard_size``), a diffusers folder or file becomes one original-layout file, with
    ``prefix`` before every key. Names and shapes are checked against ``cls`` first.

    The output is written beside ``target`` and swapped in only when complete (a folder as a
    whole: weights, index and ``config.json`` together), so with ``overwrite`` the old output
    survives any failure part-way. Files in a target folder that are not a diffusers model's
    (``config.json``, ``diffusion_pytorch_model*.safetensors`` and index) are kept.
    """
    model_class, mapper = class_mapper(cls)
    source, target = Path(source), Path(target)
    gguf: GGUFFile | None = None
    if source.is_dir():
        folder = resolve_model_folder(source)
        config: Mapping[str, Any] = read_config(folder)
        where = _folder_headers(folder)
        specs = {key: TensorSpec(shape=h.tensors[key].shape, dtype=h.tensors[key].dtype) for key, h in where.items()}
        first = MappingPlan(steps=tuple(Step((k,), (k,)) for k in specs))
        layout_in: Literal["original", "diffusers"] = "diffusers"
        found_prefix, label, variant_name = "", "folder's", _variant_of(mapper, specs)
        source_label = str(folder / CONFIG_NAME)
    else:
        gguf = _gguf(source)
        if gguf is None:
            header = read_header(source)
            specs = header_specs(header)
            where = {key: header for key in specs}
        else:
            specs, where = _gguf_specs(gguf), {}
        found = mapper.identify(specs, variant=variant, path=str(source))
        config, first = found.config, found.plan
        layout_in, found_prefix, variant_name = found.layout, found.prefix, found.variant.name
        label = f"file's {variant_name}"
        source_label = f"{source} ({variant_name})"
    layout_out = to or ("diffusers" if layout_in == "original" else "original")
    model = build_on_meta(model_class, config, source=source_label)
    expected = expected_tensors(model)
    skipped = check_against_model(
        mapper, first, specs, expected, layout=layout_in, prefix=found_prefix, label=label,
        path=str(source), strict=strict,
    )
    if gguf is not None:
        check_gguf_types(gguf, [source for step in first.steps for source in step.sources])
    tensors = _Tensors(where) if gguf is None else _GGUFTensors(gguf)
    ordered = sorted(first.steps, key=lambda step: min(tensors.offset(s) for s in step.sources))
    first = attrs.evolve(first, steps=tuple(s for s in ordered if any(t in expected for t in s.targets)))
    model_specs = {k: v for k, v in first.target_specs(specs, path=str(source)).items() if k in expected}
    keys = [t for step in first.steps for t in step.targets if t in expected]
    second = output_plan(mapper, keys, layout_out, prefix=prefix if layout_out == "original" else "",
                         where=str(target))
    second, slots = aligned(second, planned_slots(second, model_specs, torch_dtype, where=str(target)))
    _check_target(target, layout_out, overwrite)
    try:
        stream = _stream(first, second, tensors, torch_dtype)
        if layout_out == "original":
            target.parent.mkdir(parents=True, exist_ok=True)
            files = [stream_safetensors(target, slots, stream, progress=progress)]
        else:
            built = model_class.config_class.from_dict(config, source=source_label).to_dict()
            files = stream_shards(target, slots, stream, config=built, max_shard_size=max_shard_size,
                                  progress=progress)
    finally:
        tensors.close()
    if skipped:
        warnings.warn(UnexpectedTensorsWarning(str(source), skipped), stacklevel=2)
    return ConversionReport(source=source, target=target, layout=layout_out, variant=variant_name, files=tuple(files),
                            tensors=len(slots), nbytes=sum(slot.nbytes for slot in slots), skipped=tuple(skipped))


def _gguf(source: Path) -> GGUFFile | None:
    """The GGUF file ``source`` is, or ``None`` when it is not one."""
    return read_gguf(source) if is_gguf(source) else None


def _gguf_specs(file: GGUFFile) -> dict[str, TensorSpec]:
    """A GGUF file's tensors as they convert: block-quantized ones decode into float32."""
    return {name: TensorSpec(shape=info.shape, dtype=torch.float32 if info.packed else spec.dtype)
            for (name, info), spec in zip(file.tensors.items(), file.specs().values(), strict=True)}


def _variant_of(mapper: WeightMapper, specs: Mapping[str, TensorSpec]) -> str | None:
    try:
        name: str = mapper.identify(specs).variant.name
    except CheckpointError:
        return None
    return name
