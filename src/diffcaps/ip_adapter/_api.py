"""The IP-Adapter functions: load, scale and unload image-prompt adapters on a model instance."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import cast

from torch import Tensor, nn

from diffcaps import checks
from diffcaps.errors import CheckpointError, FormatError, IPAdapterError
from diffcaps.io import SafetensorsReader
from diffcaps.ip_adapter._scale import Scale, per_block_scales
from diffcaps.ip_adapter._service import IPAdapterSupport
from diffcaps.protocols import SupportsIPAdapter, require

__all__ = ["adapter_names", "get_scales", "load", "set_scale", "unload"]

Source = str | os.PathLike[str] | Mapping[str, Tensor]
"""A safetensors file, or its tensors already in memory."""


def _service(model: SupportsIPAdapter) -> tuple[IPAdapterSupport, nn.Module]:
    module, service = require(model, "ip_adapter")
    return service, module


def _read(source: Source) -> tuple[dict[str, Tensor], str]:
    if isinstance(source, Mapping):
        tensors: dict[str, Tensor] = {}
        entries = cast(Iterable[tuple[object, object]], source.items())
        for key, value in entries:
            if not isinstance(key, str) or not isinstance(value, Tensor):
                raise FormatError(f"an IP-Adapter state dict maps names to tensors, got {key!r}: {type(value).__name__}")
            tensors[key] = value
        return tensors, "<state dict>"
    path = Path(source)
    if path.is_dir():
        raise CheckpointError("is a folder: pass the IP-Adapter's .safetensors file", path=path)
    with SafetensorsReader(path) as reader:
        return {key: reader.get(key) for key in reader.keys()}, str(path)


def load(model: SupportsIPAdapter, source: Source, *, adapter_name: str = "default") -> None:
    """Load an IP-Adapter file (or its state dict) into ``model`` as ``adapter_name``, at scale 1.0.

    Adapters stack in load order: the forward then takes
    ``joint_attention_kwargs={"ip_adapter_image_embeds": [embeds_1, ...]}``, one image
    embedding tensor per adapter in that order. A file that does not fit leaves the model as it was.
    """
    service, module = _service(model)
    checks.name(adapter_name, "adapter_name", IPAdapterError, forbidden=".")
    loaded = service.adapter_names(module)
    if adapter_name in loaded:
        raise IPAdapterError(f"an IP-Adapter named {adapter_name!r} is already loaded "
                             f"(loaded: {', '.join(map(repr, loaded))}); unload it or pick another name")
    tensors, where = _read(source)
    service.load(module, tensors, adapter_name=adapter_name, source=where)


def set_scale(model: SupportsIPAdapter, scale: Scale) -> None:
    """Set how strongly the image prompts act: a number, a per-block list, one of those per adapter
    (a list in load order), or a mapping by adapter name (only the named adapters change).
    """
    service, module = _service(model)
    names = service.adapter_names(module)
    service.set_scales(module, per_block_scales(scale, names, service.block_count(module)))


def unload(model: SupportsIPAdapter, adapter_names: str | Sequence[str] | None = None) -> None:
    """Remove the named IP-Adapters (all of them by default).

    With none left, the model's modules, state dict and outputs are exactly as before the first load.
    """
    service, module = _service(model)
    loaded = service.adapter_names(module)
    if adapter_names is None:
        names: tuple[str, ...] = loaded
    else:
        given = cast(object, adapter_names)
        if isinstance(given, str):
            names = (given,)
        elif isinstance(given, Sequence):
            names = tuple(checks.instance(name, str, "an adapter name", IPAdapterError)
                          for name in cast(Sequence[object], given))
        else:
            raise IPAdapterError(f"adapter names must be a name or a list of names, got {given!r}")
        unknown = [name for name in names if name not in loaded]
        if unknown:
            raise IPAdapterError(f"no IP-Adapter named {', '.join(map(repr, unknown))} is loaded "
                                 f"(loaded: {', '.join(map(repr, loaded)) or 'none'})")
    if names:
        service.unload(module, names)


def adapter_names(model: SupportsIPAdapter) -> tuple[str, ...]:
    """The loaded IP-Adapters, in load order: the order ``ip_adapter_image_embeds`` follows."""
    service, module = _service(model)
    return service.adapter_names(module)


def get_scales(model: SupportsIPAdapter) -> dict[str, tuple[float, ...]]:
    """Each loaded IP-Adapter's scale in every image-prompt block."""
    service, module = _service(model)
    return service.scales(module)
