"""Model folders, one per model family, and the registry the CLI uses to find them by name."""

from __future__ import annotations

import importlib
from typing import Any, Final

from diffcaps.errors import UnknownModelError
from diffcaps.model import Model

__all__ = ["model_class", "model_names"]

_REGISTRY: Final = {
    "flux": "diffcaps.models.flux:FluxTransformer2DModel",
    "wan": "diffcaps.models.wan:WanTransformer3DModel",
}


def model_names() -> list[str]:
    """Short names of the built-in models."""
    return sorted(_REGISTRY)


def model_class(name: str) -> type[Model[Any]]:
    """The model class called ``name``: a built-in short name (``flux``) or ``module:Class``.

    The module is imported on first use. Raises :class:`~diffcaps.errors.UnknownModelError`
    for an unknown name, a reference that does not import, or a class that is not a ``Model``.
    """
    reference = _REGISTRY.get(name, name)
    module_name, colon, class_name = reference.partition(":")
    if not colon:
        raise UnknownModelError(
            f"unknown model {name!r}; built-in models: {', '.join(model_names())} (or give module:Class)"
        )
    if not module_name or not class_name:
        raise UnknownModelError(f"{name!r} is not a module:Class reference")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or whatever the module's own code raised
        raise UnknownModelError(f"cannot import {module_name!r} for {name!r}: {type(exc).__name__}: {exc}") from exc
    found: object = getattr(module, class_name, None)
    if found is None:
        raise UnknownModelError(f"module {module_name!r} has no {class_name!r}")
    if not (isinstance(found, type) and issubclass(found, Model)):
        raise UnknownModelError(f"{name!r} is not a diffcaps Model subclass (got {found!r})")
    return found
