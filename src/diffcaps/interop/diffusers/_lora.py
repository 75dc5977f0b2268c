"""Pipeline LoRA calls on a wrapped model, served by :mod:`diffcaps.lora`.

A pipeline's LoRA methods reach its transformer in three ways, and each is met here:

- **Through the transformer's methods** (``load_lora_adapter``, ``set_adapters``,
  ``fuse_lora``, ``unload_lora``, ``delete_adapters``, ``enable_lora``/``disable_lora``,
  ``peft_config``): the view's methods call the functions below, which call
  ``diffcaps.lora`` on the model, so its adapters are diffcaps' (exact fuse/unfuse/unload,
  rollback on a failed load, every format).
- **Through the peft layers directly**: ``pipe.get_active_adapters()`` reads them (diffcaps'
  adapters are real peft layers, so it reads the truth), and ``pipe.unfuse_lora()`` calls
  each layer's ``unmerge()`` (peft's in-place subtraction, which would leave diffcaps
  believing the model fused). A fuse through the view therefore gives each adapter layer an
  ``unmerge`` that calls ``diffcaps.lora.unfuse`` on the whole model (bit-exact; later calls
  find nothing fused, and the layer keeps that ``unmerge`` until it is unloaded).
- **Through the forward's ``joint_attention_kwargs`` / ``attention_kwargs``**:
  ``{"scale": s}`` multiplies the active adapters' scales for that call (:func:`scaled`),
  as diffusers' ``apply_lora_scale`` does, and puts back the exact values afterwards.

**Loading.** ``pipe.load_lora_weights(file)`` reads and *converts* the file in the
pipeline's ``lora_state_dict`` before the transformer sees it. Where diffusers passes the
file through unconverted (diffusers/PEFT files, LoKr/LoHa, ComfyUI ``lora_A/B`` files: Flux's
loader then only moves ``.alpha`` tensors, under their own names, into ``network_alphas``),
the view gets the file's own tensors back together and ``diffcaps.lora.load_adapter`` detects
their format, so every format diffcaps reads loads exactly as ``lora.load_adapter(model,
file)`` would. Where Flux's loader converted the file (kohya, OneTrainer, ComfyUI
``lora_down/up``, XLabs, fal Kontext: it then passes ``network_alphas=None``), the converted
tensors are loaded as a diffusers/PEFT file, as diffusers' transformer loads them: the
converters fold each ``alpha / rank`` into the weights, and only the ``transformer.`` tensors
are the transformer's (kohya's top-level modules — ``img_in``, ``txt_in``, ``time_in``,
``vector_in``, ``guidance_in``, ``final_layer`` — come out without that prefix, and
diffusers' transformer drops them with a log line). Such a load gives diffusers' result and a
:class:`ConvertedLoRAWarning` naming what was dropped and :func:`~diffcaps.interop.diffusers.load_lora_weights`, which
hands the file to diffcaps before diffusers converts anything (every module, any width: the
converters hard-code FLUX.1's 3072 width and block counts). A converted file diffcaps cannot
load (a BFL control LoRA widening ``x_embedder``, whose norm scales the pipeline loads past
the transformer) is a :class:`~diffcaps.errors.LoRAError` naming :func:`~diffcaps.interop.diffusers.load_lora_weights`.
Wan's loader converts ``diffusion_model.`` and musubi files with converters that fail on any
key they leave over, so their output is loaded. Files whose tensor names lack ``lora``
(``lycoris_`` LoKr names, ``.diff`` patches) are refused by diffusers' own check before
diffcaps is reached; :func:`~diffcaps.interop.diffusers.load_lora_weights` loads them.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from collections.abc import Generator, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from diffcaps import lora
from diffcaps.errors import CapabilityError, LoRAError
from diffcaps.io import save_safetensors
from diffcaps.protocols import SupportsLoRA, supports_lora

__all__ = [
    "ConvertedLoRAWarning",
    "delete_adapters",
    "enable",
    "fuse",
    "load_from_pipeline",
    "peft_config",
    "scaled",
    "set_adapters",
    "unfuse",
    "unload",
    "with_lora",
]


class ConvertedLoRAWarning(UserWarning):
    """``pipe.load_lora_weights`` loaded a file diffusers converted first: ``load_lora_weights(pipe, file)`` reads it exactly."""


def with_lora(model: object) -> SupportsLoRA:
    """``model`` as a model that declares LoRA, or a ``CapabilityError``."""
    if supports_lora(model):
        return model
    raise CapabilityError(type(model).__name__, "lora")


def _tuner_layers(model: nn.Module) -> Iterator[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return (m for m in model.modules() if isinstance(m, BaseTunerLayer))


def load_from_pipeline(model: object, state_dict: Mapping[str, Tensor], *,
                       network_alphas: Mapping[str, Tensor] | None, metadata: Mapping[str, Any] | None,
                       adapter_name: str | None, hotswap: bool, pipeline: object) -> lora.LoadReport | None:
    """Load what a pipeline's ``load_lora_weights`` hands its transformer (see the module docstring).

    ``adapter_name=None`` names the adapter ``default_<n>`` as diffusers does, and the adapter
    loaded becomes the only active one, as in diffusers (``set_adapters`` activates several). ``None`` when a
    converted file held nothing for the transformer (with a :class:`ConvertedLoRAWarning`).
    """
    target = with_lora(model)
    name = adapter_name if adapter_name is not None else f"default_{len(lora.list_adapters(target))}"
    report = _load(target, state_dict, network_alphas=network_alphas, metadata=metadata, name=name,
                   hotswap=hotswap, pipeline=pipeline)
    if report is not None and not hotswap:
        lora.set_adapters(target, [name])  # as in diffusers (peft), the adapter just loaded is the active one
    return report


def _load(target: SupportsLoRA, state_dict: Mapping[str, Tensor], *, network_alphas: Mapping[str, Tensor] | None,
          metadata: Mapping[str, Any] | None, name: str, hotswap: bool, pipeline: object) -> lora.LoadReport | None:
    if network_alphas is None and _converts(pipeline):
        return _load_converted(target, state_dict, name=name, hotswap=hotswap, pipeline=pipeline)
    tensors = {**state_dict, **(network_alphas or {})}
    if not metadata:
        return lora.load_adapter(target, tensors, adapter_name=name, hotswap=hotswap)
    # the peft config in the file's header travels with the tensors, as in the file
    with tempfile.TemporaryDirectory(prefix="diffcaps-lora-") as folder:
        path = save_safetensors({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()},
                                Path(folder) / "adapter.safetensors",
                                metadata={"lora_adapter_metadata": json.dumps(dict(metadata))})
        return lora.load_adapter(target, path, adapter_name=name, hotswap=hotswap)


_PREFIX = "transformer."
_TEXT_ENCODERS = ("text_encoder.", "text_encoder_2.")


def _load_converted(model: SupportsLoRA, state_dict: Mapping[str, Tensor], *, name: str, hotswap: bool,
                    pipeline: object) -> lora.LoadReport | None:
    """Load the transformer's part of what diffusers' Flux converter made of a file, as diffusers' transformer does."""
    ours = {key: value for key, value in state_dict.items() if key.startswith(_PREFIX)}
    dropped = sorted({key.rsplit(".lora_", 1)[0] for key in state_dict
                      if not key.startswith((_PREFIX, *_TEXT_ENCODERS))})
    direct = f"diffcaps.interop.diffusers.load_lora_weights(pipe, file, adapter_name={name!r})"
    caller = f"{type(pipeline).__name__}.load_lora_weights"
    if not ours:
        warnings.warn(f"{caller}: the converted file has no tensors for the transformer"
                      + (f" (diffusers' converter left {', '.join(dropped)} unprefixed)" if dropped else "")
                      + f"; nothing was loaded into it. {direct} reads the file directly",
                      ConvertedLoRAWarning, stacklevel=8)
        return None
    try:
        report = lora.load_adapter(model, ours, adapter_name=name, hotswap=hotswap)
    except LoRAError as refused:
        raise LoRAError(f"{caller} converted this LoRA file to diffusers' layout (its converters assume "
                        f"FLUX.1's widths and block counts), and diffcaps cannot load the result: {refused}. "
                        f"{direct} reads the file directly") from refused
    lost = (f"; diffusers' transformer drops the modules its converter left without the 'transformer.' prefix, "
            f"and so does this load: {', '.join(dropped)}") if dropped else ""
    warnings.warn(f"{caller} converted this LoRA file with diffusers' converter before diffcaps loaded it as "
                  f"adapter {name!r}{lost}. {direct} reads the file directly and exactly (every module, any width)",
                  ConvertedLoRAWarning, stacklevel=8)
    return report


def _converts(pipeline: object) -> bool:
    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin

    return isinstance(pipeline, FluxLoraLoaderMixin)


def set_adapters(model: object, names: str | Sequence[str],
                 weights: float | Mapping[str, float] | Sequence[float | Mapping[str, float] | None] | None) -> None:
    """``transformer.set_adapters(names, weights)``: :func:`diffcaps.lora.set_adapters` (``None`` weighs 1)."""
    lora.set_adapters(with_lora(model), names, weights)


def fuse(model: object, lora_scale: float = 1.0, safe_fusing: bool = False,
         adapter_names: Sequence[str] | None = None) -> None:
    """``transformer.fuse_lora(...)``: :func:`diffcaps.lora.fuse` at ``lora_scale``; the pipeline's unfuse undoes it.

    With ``safe_fusing`` a fused weight that is not finite undoes the fuse and is a
    :class:`~diffcaps.errors.LoRAError`. Unlike diffusers, the adapter scales are not left
    multiplied by ``lora_scale`` after an unfuse.
    """
    target = with_lora(model)
    lora.fuse(target, adapter_names=adapter_names, scale=lora_scale)
    module = _module(target)
    if safe_fusing:
        bad = [name for name, layer in module.named_modules() if _merged(layer) and not _finite(layer)]
        if bad:
            lora.unfuse(target)
            raise LoRAError(f"fusing gives non-finite weights in {', '.join(bad[:8])}; the fuse was undone")
    for layer in _tuner_layers(module):
        if _merged(layer):
            layer.__dict__["unmerge"] = _Unfuse(target)


def _module(model: SupportsLoRA) -> nn.Module:
    assert isinstance(model, nn.Module)
    return model


def _merged(layer: nn.Module) -> bool:
    merged: object = getattr(layer, "merged_adapters", None)
    return isinstance(merged, list) and bool(merged)


def _finite(layer: nn.Module) -> bool:
    weight: object = getattr(getattr(layer, "base_layer", None), "weight", None)
    return not isinstance(weight, Tensor) or bool(torch.isfinite(weight).all())


class _Unfuse:
    """A fused adapter layer's ``unmerge``: diffcaps' exact unfuse of the whole model."""

    def __init__(self, model: SupportsLoRA) -> None:
        self._model = model

    def __call__(self, *args: object, **kwargs: object) -> None:
        unfuse(self._model)


def unfuse(model: object) -> None:
    """``transformer.unfuse_lora()`` (and each fused layer's ``unmerge``): :func:`diffcaps.lora.unfuse`."""
    lora.unfuse(with_lora(model))


def unload(model: object) -> None:
    """``transformer.unload_lora()``: :func:`diffcaps.lora.unload` (the model exactly as before any adapter)."""
    lora.unload(with_lora(model))


def delete_adapters(model: object, names: str | Sequence[str]) -> None:
    """``transformer.delete_adapters(names)``: :func:`diffcaps.lora.delete_adapters`."""
    lora.delete_adapters(with_lora(model), names)


def enable(model: object, enabled: bool) -> None:
    """``transformer.enable_lora()`` / ``disable_lora()``: :func:`diffcaps.lora.enable` / ``disable``."""
    target = with_lora(model)
    if enabled:
        lora.enable(target)
    else:
        lora.disable(target)


def peft_config(model: object) -> dict[str, Any]:
    """The loaded adapters' peft configs by name, as ``transformer.peft_config`` (an ``AttributeError`` if none)."""
    target = with_lora(model)
    configs: object = getattr(target, "peft_config", None)
    if not lora.list_adapters(target) or not isinstance(configs, dict):
        raise AttributeError("peft_config")
    return {name: configs[name] for name in lora.list_adapters(target) if name in configs}


@contextmanager
def scaled(model: object, scale: float) -> Generator[None]:
    """Run the active adapters at ``scale`` × their weights (a pipeline's ``{"scale": s}``), then restore them.

    Each peft layer's ``scale_layer`` does the multiplying, as in diffusers' ``apply_lora_scale``;
    the scales are put back exactly afterwards (diffusers divides again, and resets to
    ``alpha / r`` after a scale of 0, forgetting ``set_adapters`` weights).
    """
    layers = list(_tuner_layers(model)) if isinstance(model, nn.Module) and scale != 1.0 else []
    saved = [(layer, _scalings(layer)) for layer in layers]
    try:
        for layer in layers:
            scale_layer: Any = getattr(layer, "scale_layer")
            scale_layer(scale)
        yield
    finally:
        for layer, values in saved:
            _restore(layer, values)


def _scalings(layer: nn.Module) -> dict[str, object]:
    table: dict[str, object] = getattr(layer, "scaling")
    return {k: v.clone() if isinstance(v, Tensor) else v for k, v in table.items()}


def _restore(layer: nn.Module, values: dict[str, object]) -> None:
    table: dict[str, object] = getattr(layer, "scaling")
    for name, value in values.items():
        current = table.get(name)
        if isinstance(current, Tensor) and isinstance(value, Tensor):
            current.copy_(value)
        else:
            table[name] = value
