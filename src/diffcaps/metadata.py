"""``ModelMetadata``: what a model class declares, as a table, a mapping and versioned JSON."""

from __future__ import annotations

import sys
from collections.abc import ItemsView, Iterable, Iterator, KeysView, Mapping, ValuesView
from typing import Any, Final, Self

import attrs

from diffcaps.capabilities import Capabilities, capability_fields
from diffcaps.errors import DiffcapsError

__all__ = ["CapabilityRow", "ModelMetadata"]

METADATA_TYPE: Final = "diffcaps.ModelMetadata"
METADATA_VERSION: Final = 1
_RULE_WIDTH: Final = 72
_NO_ENTRIES: Final = "supported"
_LINE_WIDTH: Final = 100


def _wrap_entries(entries: Iterable[str], width: int) -> list[str]:
    """Comma-joined entries, broken between entries (never inside one) to fit ``width``."""
    lines: list[str] = []
    for entry in entries:
        if lines and len(lines[-1]) + 2 + len(entry) + 1 <= width:
            lines[-1] += f", {entry}"
        else:
            if lines:
                lines[-1] += ","
            lines.append(entry)
    return lines


def _strings(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(str(v) for v in values)


@attrs.frozen(kw_only=True)
class CapabilityRow:
    """One declared capability: its field name, what it holds, and where to read about it."""

    name: str
    entries: tuple[str, ...] = attrs.field(converter=_strings)
    description: str
    docs: str

    @property
    def value(self) -> str:
        """The entries as the table shows them."""
        return ", ".join(self.entries) if self.entries else _NO_ENTRIES


def _rows(rows: Mapping[str, CapabilityRow] | Any) -> Mapping[str, CapabilityRow]:
    return dict(rows)


@attrs.frozen(kw_only=True)
class ModelMetadata(Mapping[str, CapabilityRow]):
    """The capabilities one model class declares, keyed by capability field name.

    ``print(meta)`` shows a table; ``meta["lora"]`` gives one row (a ``KeyError`` naming the
    model for a row it does not declare); ``to_dict()``/``from_dict()`` round-trip through JSON.
    """

    model: str
    rows: Mapping[str, CapabilityRow] = attrs.field(converter=_rows)

    @classmethod
    def from_capabilities(cls, model: str, capabilities: Capabilities) -> Self:
        """Build the metadata of ``model`` from its ``capabilities`` field, and nothing else."""
        info = capability_fields()
        rows = {
            name: CapabilityRow(
                name=name,
                entries=service.entries(),
                description=info[name].description,
                docs=info[name].docs,
            )
            for name, service in capabilities.declared()
        }
        return cls(model=model, rows=rows)

    def __getitem__(self, name: str) -> CapabilityRow:
        row = self.rows.get(name)
        if row is None:
            if name in capability_fields():
                raise KeyError(f"{self.model} does not declare {name!r}")
            raise KeyError(f"{name!r} is not a capability; capabilities: {', '.join(capability_fields())}")
        return row

    def __iter__(self) -> Iterator[str]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def keys(self) -> KeysView[str]:
        """The declared capability names, in field order."""
        return self.rows.keys()

    def values(self) -> ValuesView[CapabilityRow]:
        """The rows, in field order."""
        return self.rows.values()

    def items(self) -> ItemsView[str, CapabilityRow]:
        """(name, row) pairs, in field order."""
        return self.rows.items()

    def describe(self, *, verbose: bool = False, color: bool = False) -> str:
        """The table; ``verbose`` adds each row's description and docs link."""
        bold, dim, reset = ("\033[1m", "\033[2m", "\033[0m") if color else ("", "", "")
        width = max((len(name) for name in self.rows), default=0)
        lines = [f"{bold}{self.model} capabilities{reset}", "─" * _RULE_WIDTH]
        if not self.rows:
            lines.append("  (no capabilities declared)")
        pad = " " * (width + 5)
        for name, row in self.rows.items():
            wrapped = _wrap_entries(row.entries, _LINE_WIDTH - len(pad)) or [row.value]
            lines.append(f"  {name.ljust(width)}   {wrapped[0]}")
            lines.extend(pad + more for more in wrapped[1:])
            if verbose:
                lines.append(f"{pad}{dim}{row.description}{reset}")
                lines.append(f"{pad}{dim}{row.docs}{reset}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.describe(color=sys.stdout.isatty())

    def to_dict(self) -> dict[str, Any]:
        """Versioned JSON-ready form: ``{"_type", "_version", "_data"}``."""
        data = {
            "model": self.model,
            "capabilities": {
                name: {"entries": list(row.entries), "description": row.description, "docs": row.docs}
                for name, row in self.rows.items()
            },
        }
        return {"_type": METADATA_TYPE, "_version": METADATA_VERSION, "_data": data}

    @classmethod
    def from_dict(cls, payload: Mapping[str, Any]) -> Self:
        """Read what ``to_dict`` wrote; other types, versions or unknown capabilities are refused."""
        if payload.get("_type") != METADATA_TYPE:
            raise DiffcapsError(f"not model metadata: _type is {payload.get('_type')!r}, expected {METADATA_TYPE!r}")
        if payload.get("_version") != METADATA_VERSION:
            raise DiffcapsError(
                f"model metadata version {payload.get('_version')!r} is not supported (expected {METADATA_VERSION})"
            )
        data = payload["_data"]
        known = capability_fields()
        rows: dict[str, CapabilityRow] = {}
        for name, row in data["capabilities"].items():
            if name not in known:
                raise DiffcapsError(f"unknown capability {name!r} in model metadata")
            rows[name] = CapabilityRow(
                name=name, entries=tuple(row["entries"]), description=row["description"], docs=row["docs"]
            )
        return cls(model=data["model"], rows=rows)
