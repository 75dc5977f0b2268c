"""Model folders, one per model family, and the registry the CLI uses to find them by name."""

from __future__ import annotations

from typing import Any

from diffcaps.model import Model

__all__ = ["model_class", "model_names"]

_REGISTRY = {"flux": ("diffcaps.models.flux", "FluxTransformer2DModel")}


def model_names() -> list[str]:
    """Short names of the built-in models."""
    return sorted(_REGISTRY)


def model_class(name: str) -> type[Model[Any]]:
    """The model class registered under ``name`` (its folder is imported on first use)."""
    import importlib

    try:
        module_name, class_name = _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; built-in models: {', '.join(model_names())}") from None
    cls: type[Model[Any]] = getattr(importlib.import_module(module_name), class_name)
    return cls
