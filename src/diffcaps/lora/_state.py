"""The adapter state a model carries while LoRA adapters are loaded, and whole-model rollback.

The state lives in the model's LoRA slot (:data:`SLOT`). It exists from the first
``load_adapter`` until ``unload`` (or until the last adapter is deleted), and records
everything needed to put the model back exactly: the parameter objects an adapter replaced
(control-LoRA norms, widened inputs), the config it changed, the weights a fuse replaced,
and the ``requires_grad`` flags peft turned off.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from types import MappingProxyType
from typing import Any, Final

import attrs
import torch

from diffcaps.errors import LoRAError
from diffcaps.slots import InstanceSlot

__all__ = [
    "SLOT",
    "AdapterRecord",
    "LoRAState",
    "LoadReport",
    "Patch",
    "Widening",
    "check_prefixes",
    "snapshot",
    "weight_for",
]

Weight = float | dict[str, float]
"""An adapter's weight: one number, or numbers by exact module-path prefix."""


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


@attrs.define(kw_only=True)
class Patch:
    """A parameter an adapter replaced: its owner module, name, and the object that was there."""

    owner: torch.nn.Module
    name: str
    path: str
    original: torch.nn.Parameter
    installed: torch.nn.Parameter


@attrs.define(kw_only=True)
class Widening:
    """A linear module whose input an adapter widened, with what it held before."""

    module: torch.nn.Linear
    path: str
    original_weight: torch.nn.Parameter
    original_in_features: int
    original_config: Any


@attrs.define(kw_only=True)
class AdapterRecord:
    """One loaded adapter: where it lives and what it changed besides its peft layers."""

    name: str
    format: str
    kind: str
    targets: tuple[str, ...]
    ranks: dict[str, int]
    patches: list[Patch] = attrs.field(factory=list)
    widenings: list[Widening] = attrs.field(factory=list)
    report: LoadReport


@attrs.define(kw_only=True)
class LoRAState:
    """Every adapter on a model, which are active and with what weight, and what a fuse replaced."""

    adapters: dict[str, AdapterRecord] = attrs.field(factory=dict)
    active: list[str] = attrs.field(factory=list)
    weights: dict[str, Weight] = attrs.field(factory=dict)
    enabled: bool = True
    fused: dict[str, tuple[torch.nn.Parameter, torch.nn.Parameter | None]] = attrs.field(factory=dict)
    """Module path → the (weight, bias) parameters it held before the fuse."""
    fused_adapters: list[str] = attrs.field(factory=list)
    hotswap_rank: int | None = None
    requires_grad: list[tuple[torch.nn.Parameter, bool]] = attrs.field(factory=list)
    """Every base parameter's ``requires_grad`` before the first adapter was injected."""

    def __str__(self) -> str:
        return f"LoRA adapter(s) {', '.join(map(repr, self.adapters))}"

    def __len__(self) -> int:
        # a state made by enable_hotswap before any load holds no adapter: it is falsy for slots.holding's callers
        return len(self.adapters)

    def layers(self) -> Iterator[str]:
        """Every module path that carries a peft layer, each once."""
        seen: set[str] = set()
        for record in self.adapters.values():
            for path in record.targets:
                if path not in seen:
                    seen.add(path)
                    yield path


SLOT: Final = InstanceSlot("lora", LoRAState)
"""Where a model instance keeps its :class:`LoRAState` while adapters are loaded."""


_FAST_COPY: Final = (dict, list, set, OrderedDict)


def _shallow(value: Any) -> Any:
    # every module holds several OrderedDicts (its hooks): their own ``copy`` is exact and much
    # faster than copy.copy's pickling protocol, which dominated the cost of a load
    if type(value) in _FAST_COPY:
        return value.copy()
    return copy.copy(value) if isinstance(value, (dict, list, set)) else value


def snapshot(model: torch.nn.Module) -> Callable[[], None]:
    """Record the module tree, every module attribute and ``requires_grad`` flag; return the undo.

    peft changes a model by editing module attributes (the ``_modules`` and ``_parameters``
    dicts, its per-adapter dicts, ``peft_config``) and ``requires_grad`` flags; restoring
    shallow copies of every module's attributes undoes any prefix of such edits. Tensor
    values are never edited in place by a load, so they need no copy.
    """
    saved = [(module, {key: _shallow(value) for key, value in module.__dict__.items()})
             for module in model.modules()]
    flags = [(param, param.requires_grad) for param in model.parameters()]

    def restore() -> None:
        for module, attributes in saved:
            module.__dict__.clear()
            module.__dict__.update(attributes)
        for param, flag in flags:
            param.requires_grad_(flag)

    return restore


def prefix_matches(prefix: str, path: str) -> bool:
    """Whether ``prefix`` names ``path`` or a module containing it (``""`` names every module).

    Matching is on whole path components: ``transformer_blocks.1`` matches
    ``transformer_blocks.1.attn.to_q`` but not ``transformer_blocks.10`` nor
    ``single_transformer_blocks.1``.
    """
    return prefix == "" or path == prefix or path.startswith(prefix + ".")


def weight_for(weight: float | Mapping[str, float], path: str) -> float:
    """The weight of the module at ``path``: the value of the longest matching prefix, else 1."""
    if not isinstance(weight, Mapping):
        return float(weight)
    best: str | None = None
    for prefix in weight:
        if prefix_matches(prefix, path) and (best is None or len(prefix) > len(best)):
            best = prefix
    return float(weight[best]) if best is not None else 1.0


def check_prefixes(weight: float | Mapping[str, float], paths: Iterable[str], adapter: str) -> None:
    """Raise ``LoRAError`` for a prefix that names none of the model's modules."""
    if not isinstance(weight, Mapping):
        return
    known = list(paths)
    for prefix in weight:
        if not any(prefix_matches(prefix, path) for path in known):
            raise LoRAError(f"weight for adapter {adapter!r}: {prefix!r} is the path of no module of the model "
                            "(prefixes match whole dotted components)")
