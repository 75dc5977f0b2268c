"""The adapter state a model carries while LoRA adapters are loaded, and whole-model rollback.

The state lives on the model instance under :data:`STATE_ATTR`. It exists from the first
``load_adapter`` until ``unload`` (or until the last adapter is deleted), and records
everything needed to put the model back exactly: the parameter objects an adapter replaced
(control-LoRA norms, widened inputs), the config it changed, the weights a fuse replaced,
and the ``requires_grad`` flags peft turned off.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any, Final

import attrs
import torch

from diffcaps.lora._report import LoadReport

__all__ = ["STATE_ATTR", "AdapterRecord", "LoRAState", "Patch", "Widening", "get_state", "snapshot"]

STATE_ATTR: Final = "_diffcaps_lora"

Weight = float | dict[str, float]
"""An adapter's weight: one number, or numbers by exact module-path prefix."""


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

    def layers(self) -> Iterator[str]:
        """Every module path that carries a peft layer, each once."""
        seen: set[str] = set()
        for record in self.adapters.values():
            for path in record.targets:
                if path not in seen:
                    seen.add(path)
                    yield path


def get_state(model: torch.nn.Module) -> LoRAState | None:
    """The model's adapter state, or ``None`` when no adapter is loaded."""
    state = model.__dict__.get(STATE_ATTR)
    return state if isinstance(state, LoRAState) else None


def _shallow(value: Any) -> Any:
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
