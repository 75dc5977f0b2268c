"""Model folders, one per model family, and the one registry of model classes.

Every place that finds a model class by name — ``AutoModel``, the CLI's ``describe``,
``inspect``, ``convert`` and ``demo`` — asks this registry. It holds the built-in models
(imported on first use), the classes users register with :func:`register_model`, and the
classes installed packages name in the ``diffcaps.models`` entry-point group (loaded on the
first lookup). A class is found by its short name (``flux``) or by its config's
``class_name`` (``FluxTransformer2DModel``, the ``_class_name`` of its ``config.json``).
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any, Final, TypeVar, cast

from diffcaps.errors import ModelRegistrationError, UnknownModelError
from diffcaps.model import Model

__all__ = ["ENTRY_POINT_GROUP", "model_class", "model_classes", "model_for_class_name", "model_names", "register_model"]

ENTRY_POINT_GROUP: Final = "diffcaps.models"
"""The entry-point group whose entries (``name = "package.module:Class"``) are registered on first lookup."""

_BUILT_IN: Final = {
    "flux": ("FluxTransformer2DModel", "diffcaps.models.flux:FluxTransformer2DModel"),
    "wan": ("WanTransformer3DModel", "diffcaps.models.wan:WanTransformer3DModel"),
}

_registered: dict[str, type[Model[Any]]] = {}
"""Short name → class, for the classes registered by users and entry points."""

_entry_points_loaded = False

_M = TypeVar("_M", bound=type[Model[Any]])


def _class_name(cls: type[Model[Any]]) -> str:
    return cls.config_class.class_name or cls.__name__


def _owner(name: str) -> str | None:
    """The short name already holding ``name`` as its short name or its class name, if any."""
    for short, (class_name, _) in _BUILT_IN.items():
        if name in (short, class_name):
            return short
    for short, cls in _registered.items():
        if name in (short, _class_name(cls)):
            return short
    return None


def register_model(cls: _M, *, name: str | None = None) -> _M:
    """Register a user's ``Model`` subclass under a short name and its config's ``class_name``.

    ``name`` defaults to the class name in lower case. Registering the same class again under
    the same name does nothing; a name (short or class name) that another class holds raises
    :class:`~diffcaps.errors.ModelRegistrationError`, as does anything that is not a ``Model``
    subclass. Returns the class, so it can be used as a decorator.
    """
    candidate = cast(object, cls)  # callers without a type checker pass anything
    if not (isinstance(candidate, type) and issubclass(candidate, Model)):
        raise ModelRegistrationError(f"register_model takes a diffcaps Model subclass, got {cls!r}")
    short = name if name is not None else cls.__name__.lower()
    if not short or ":" in short:
        raise ModelRegistrationError(f"{cls.__name__}: {short!r} is not a usable model name (empty or contains ':')")
    if _registered.get(short) is cls:
        return cls
    for taken in (short, _class_name(cls)):
        owner = _owner(taken)
        if owner is not None:
            raise ModelRegistrationError(
                f"cannot register {cls.__module__}.{cls.__qualname__} as {short!r}: the name {taken!r} "
                f"is taken by the model {owner!r}"
            )
    _registered[short] = cls
    return cls


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        try:
            found: object = entry.load()
        except Exception as exc:  # ImportError, or whatever the package's own code raised
            raise ModelRegistrationError(
                f"entry point {entry.name!r} = {entry.value!r} in group {ENTRY_POINT_GROUP!r} does not load: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        if not (isinstance(found, type) and issubclass(found, Model)):
            raise ModelRegistrationError(
                f"entry point {entry.name!r} = {entry.value!r} in group {ENTRY_POINT_GROUP!r} is not a "
                f"diffcaps Model subclass (got {found!r})"
            )
        register_model(found, name=entry.name)


def model_names() -> list[str]:
    """Short names of every known model: built-in, registered and from entry points."""
    _load_entry_points()
    return sorted([*_BUILT_IN, *_registered])


def _known() -> str:
    return ", ".join(f"{short} ({class_name})" for short, class_name in _listing())


def _listing() -> list[tuple[str, str]]:
    return sorted([*((s, c) for s, (c, _) in _BUILT_IN.items()), *((s, _class_name(c)) for s, c in _registered.items())])


def model_class(name: str) -> type[Model[Any]]:
    """The model class called ``name``: a short name (``flux``), a class name
    (``FluxTransformer2DModel``) or a ``module:Class`` reference.

    Raises :class:`~diffcaps.errors.UnknownModelError`, listing the known models, for an
    unknown name; and for a reference that does not import or names no ``Model`` subclass.
    """
    _load_entry_points()
    owner = _owner(name)
    if owner in _registered:
        return _registered[owner]
    reference = _BUILT_IN[owner][1] if owner is not None else name
    module_name, colon, class_name = reference.partition(":")
    if not colon:
        raise UnknownModelError(f"unknown model {name!r}; known models: {_known()} (or give module:Class)")
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


def model_for_class_name(class_name: str, *, source: str = "config") -> type[Model[Any]]:
    """The registered class whose config's ``class_name`` is ``class_name`` (a ``_class_name``).

    Raises :class:`~diffcaps.errors.UnknownModelError`, naming ``source`` and listing the
    known models, when none is.
    """
    _load_entry_points()
    for short, known in _listing():
        if known == class_name:
            return model_class(short)
    raise UnknownModelError(f"{source}: _class_name {class_name!r} is no known model's; known models: {_known()} "
                            "(register yours with diffcaps.register_model)")


def model_classes() -> list[type[Model[Any]]]:
    """Every known model class, in short-name order (the built-in ones are imported)."""
    return [model_class(name) for name in model_names()]
