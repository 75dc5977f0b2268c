"""``LoadReport``: what ``load_adapter`` did with every tensor of a file."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

import attrs

__all__ = ["LoadReport"]


def _frozen_mapping(value: Mapping[str, str]) -> Mapping[str, str]:
    return MappingProxyType(dict(value))


@attrs.frozen(kw_only=True)
class LoadReport:
    """The outcome of one ``load_adapter`` call.

    ``targets`` are the model modules that received an adapter layer; ``patched`` the
    parameters replaced or shifted in full (control-LoRA norms, ``.diff`` patches);
    ``widened`` the modules whose input grew; ``used`` the file's tensors that went into
    the model and ``skipped`` the ones that did not, each with the reason.
    """

    adapter_name: str
    source: str
    format: str
    kind: str
    targets: tuple[str, ...]
    used: tuple[str, ...]
    skipped: Mapping[str, str] = attrs.field(converter=_frozen_mapping, factory=dict)
    patched: tuple[str, ...] = ()
    widened: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    hotswapped: bool = False

    def __str__(self) -> str:
        lines = [
            f"{self.source}: {self.format} ({self.kind}) as adapter {self.adapter_name!r}"
            + (" (hotswapped)" if self.hotswapped else ""),
            f"  {len(self.targets)} module(s) adapted, {len(self.used)} tensor(s) used, "
            f"{len(self.skipped)} skipped",
        ]
        lines += [f"  patched {name}" for name in self.patched]
        lines += [f"  widened {what}" for what in self.widened]
        lines += [f"  skipped {key}: {why}" for key, why in sorted(self.skipped.items())]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)
