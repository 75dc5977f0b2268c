"""Model configurations: frozen attrs classes that read and write diffusers' ``config.json``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Self

import attrs

from diffcaps.errors import ConfigError

__all__ = ["DIFFUSERS_COMPAT_VERSION", "ModelConfig"]

DIFFUSERS_COMPAT_VERSION = "0.42.1"
"""The diffusers version whose ``config.json`` keys diffcaps reads and writes."""


@attrs.frozen(kw_only=True)
class ModelConfig:
    """Base of every model's configuration.

    Fields are the model's hyper-parameters under diffusers' names. Keys that start with
    ``_`` (``_class_name``, ``_diffusers_version``, ``_name_or_path``) are bookkeeping and
    are not fields; any other key that is not a field is an error.
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
        """Build a config from ``config.json`` contents, checking the class name and every key."""
        found = data.get("_class_name")
        if found is not None and found != cls.class_name:
            raise ConfigError(
                f"{source}: this config is for {found!r}, expected {cls.class_name!r}"
            )
        names = {field.name for field in attrs.fields(cls)}
        unknown = sorted(k for k in data if not k.startswith("_") and k not in names)
        if unknown:
            raise ConfigError(
                f"{source}: unknown key(s) {', '.join(map(repr, unknown))} for {cls.class_name}; "
                f"known keys: {', '.join(sorted(names))}"
            )
        values = {k: v for k, v in data.items() if k in names}
        try:
            return cls(**values)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{source}: invalid value for {cls.class_name}: {exc}") from None
