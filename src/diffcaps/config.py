"""Model configurations: frozen attrs classes that read and write diffusers' ``config.json``.

Every value read by :meth:`ModelConfig.from_dict` is checked against its field's type: an
``int`` field takes an integer (not a bool, not ``1.0``), a ``bool`` field ``true``/``false``
(not ``"false"``, not ``1``), a ``float`` field a finite number, a ``tuple[int, ...]`` field a
list of integers (``4.9`` is refused, never truncated), ``X | None`` also ``null``. Fields
made with :func:`at_least` must also hold an integer (or integers) no smaller than the bound.
Each failure is a :class:`~diffcaps.errors.ConfigError` naming the file, the field, the value
and what was expected. Types other than these (``Any``, mappings, classes) are not checked.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Literal, Self, TypeVar

import attrs

from diffcaps import checks
from diffcaps.errors import ConfigError

__all__ = ["DIFFUSERS_COMPAT_VERSION", "ModelConfig", "at_least"]

DIFFUSERS_COMPAT_VERSION = "0.42.1"
"""The diffusers version whose ``config.json`` keys diffcaps reads and writes."""

_V = TypeVar("_V")
_MINIMUM = "diffcaps.minimum"


def at_least(minimum: int, *, default: _V) -> _V:
    """A config field whose integer (or each integer of its tuple) must be ``>= minimum``.

    ``None`` passes where the field's type allows it. The bound is checked when the config is
    built directly and by :meth:`ModelConfig.from_dict`, which also names the file.
    """
    return attrs.field(default=default, validator=_at_least(minimum), metadata={_MINIMUM: minimum})


def _at_least(minimum: int) -> Callable[[object, attrs.Attribute[Any], object], None]:
    def validate(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
        what = f"field {attribute.name!r}"
        if isinstance(value, tuple):
            for index, item in enumerate(typing.cast(tuple[object, ...], value)):
                checks.integer(item, f"{what} item {index}", ConfigError, minimum=minimum)
        elif value is not None:
            checks.integer(value, what, ConfigError, minimum=minimum)
    return validate


_FIELD_TYPES: dict[type[object], dict[str, object]] = {}


def _field_types(cls: type[ModelConfig]) -> dict[str, object]:
    """Each field's resolved annotation (a field whose annotation cannot be resolved is left out)."""
    known = _FIELD_TYPES.get(cls)
    if known is not None:
        return known
    fields = attrs.fields(cls)
    try:
        hints = typing.get_type_hints(cls)
        found = {f.name: hints[f.name] for f in fields if f.name in hints}
    except (NameError, TypeError):  # a name only the defining function could see
        found = {f.name: f.type for f in fields if f.type is not None and not isinstance(f.type, str)}
    _FIELD_TYPES[cls] = found
    return found


def _checked(value: object, kind: object, what: str, minimum: int | None) -> object:
    """``value`` if it fits the annotation ``kind`` (lists become tuples); else a ConfigError."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is bool:
        return checks.flag(value, what, ConfigError)
    if kind is int:
        return checks.integer(value, what, ConfigError, minimum=minimum)
    if kind is float:
        return checks.number(value, what, ConfigError)
    if kind is str:
        return checks.instance(value, str, what, ConfigError)
    if origin is types.UnionType or origin is typing.Union:
        if value is None and type(None) in args:
            return None
        others = [a for a in args if a is not type(None)]
        return _checked(value, others[0], what, minimum) if len(others) == 1 else value
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{what} must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{what} must be a list, got {value!r} ({type(value).__name__})")
        items = tuple(typing.cast(list[object] | tuple[object, ...], value))
        if len(args) == 2 and args[1] is Ellipsis:
            kinds = [args[0]] * len(items)
        elif len(items) != len(args):
            raise ConfigError(f"{what} must be a list of {len(args)} items, got {len(items)}: {value!r}")
        else:
            kinds = list(args)
        return tuple(_checked(item, k, f"{what} item {i}", minimum) for i, (item, k) in enumerate(zip(items, kinds)))
    return value


@attrs.frozen(kw_only=True)
class ModelConfig:
    """Base of every model's configuration.

    Fields are the model's hyper-parameters under diffusers' names. Keys that start with
    ``_`` (``_class_name``, ``_diffusers_version``, ``_name_or_path``) are bookkeeping and
    are not fields; any other key that is not a field is an error. Values are checked against
    the field types (see the module docstring); checks between fields belong in the model's
    ``__attrs_post_init__``, raising ``ConfigError``.
    """

    class_name: ClassVar[str] = ""
    """The ``_class_name`` this config is for (the diffusers class name)."""

    def to_dict(self) -> dict[str, Any]:
        """The config as ``config.json`` holds it, bookkeeping keys first."""
        data: dict[str, Any] = {
            "_class_name": self.class_name,
            "_diffusers_version": DIFFUSERS_COMPAT_VERSION,
        }
        for field in attrs.fields(type(self)):
            value = getattr(self, field.name)
            data[field.name] = list(value) if isinstance(value, tuple) else value
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "config") -> Self:
        """Build a config from ``config.json`` contents, checking the class name, every key and every value."""
        found = data.get("_class_name")
        if found is not None and found != cls.class_name:
            raise ConfigError(
                f"{source}: this config is for {found!r}, expected {cls.class_name!r}"
            )
        fields = {field.name: field for field in attrs.fields(cls)}
        unknown = sorted(k for k in data if not k.startswith("_") and k not in fields)
        if unknown:
            raise ConfigError(
                f"{source}: unknown key(s) {', '.join(map(repr, unknown))} for {cls.class_name}; "
                f"known keys: {', '.join(sorted(fields))}"
            )
        kinds = _field_types(cls)
        values: dict[str, object] = {}
        for name, value in data.items():
            if name in fields:
                minimum = fields[name].metadata.get(_MINIMUM)
                what = f"{source}: field {name!r}"
                values[name] = _checked(value, kinds[name], what, minimum) if name in kinds else value
        try:
            return cls(**values)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{source}: invalid value for {cls.class_name}: {exc}") from None
