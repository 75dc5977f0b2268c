"""The LoRA service: the file formats a model reads and writes, and the canonical adapter form.

A format turns a file's tensors into a :class:`Conversion` — for every model module it
adapts, a :class:`LoRAWeights`, :class:`LoKrWeights` or :class:`LoHaWeights` in the model's
own module names, already split where the file fuses several modules into one — and says
which tensors it used, skipped (and why) or could not place. Everything after that
(checking shapes, injecting peft layers, the adapter lifecycle) is the same for every format
and every model, and lives in the functions of :mod:`diffcaps.lora`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any, ClassVar, Literal, Protocol, TypeAlias, final

import attrs
import torch
from torch import Tensor

__all__ = [
    "Conversion",
    "InputWidening",
    "LoHaWeights",
    "LoKrWeights",
    "LoRAFormat",
    "LoRALayout",
    "LoRAService",
    "LoRAWeights",
    "ParamPatch",
    "TargetWeights",
]


def _dims(t: Tensor | tuple[Tensor, Tensor]) -> tuple[int, int]:
    if isinstance(t, tuple):
        return t[0].shape[0], t[1].shape[1]
    return t.shape[0], t.shape[1]


@attrs.frozen(kw_only=True)
class LoRAWeights:
    """A low-rank update of one linear module: ``W + scale · up @ down`` (and ``b + scale · bias``)."""

    kind: ClassVar[str] = "lora"
    down: Tensor
    up: Tensor
    scale: float
    bias: Tensor | None = None

    @property
    def rank(self) -> int:
        """Inner dimension of the product."""
        return self.down.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in) of the update."""
        return self.up.shape[0], self.down.shape[1]


@attrs.frozen(kw_only=True)
class LoKrWeights:
    """A Kronecker update ``W + scale · kron(w1, w2)``; a factor is a matrix or a pair whose product it is."""

    kind: ClassVar[str] = "lokr"
    w1: Tensor | tuple[Tensor, Tensor]
    w2: Tensor | tuple[Tensor, Tensor]
    scale: float

    @property
    def rank(self) -> int:
        """The rank of the decomposed factor (``w2`` first), or 1 when both factors are full."""
        for factor in (self.w2, self.w1):
            if isinstance(factor, tuple):
                return factor[0].shape[1]
        return 1

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in) of the update."""
        (a, b), (c, d) = _dims(self.w1), _dims(self.w2)
        return a * c, b * d


@attrs.frozen(kw_only=True)
class LoHaWeights:
    """A Hadamard update ``W + scale · (w1_a @ w1_b) ⊙ (w2_a @ w2_b)``."""

    kind: ClassVar[str] = "loha"
    w1_a: Tensor
    w1_b: Tensor
    w2_a: Tensor
    w2_b: Tensor
    scale: float

    @property
    def rank(self) -> int:
        """Inner dimension of the two products."""
        return self.w1_b.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in) of the update."""
        return self.w1_a.shape[0], self.w1_b.shape[1]


TargetWeights: TypeAlias = LoRAWeights | LoKrWeights | LoHaWeights
"""What one adapted module receives."""


@attrs.frozen(kw_only=True)
class ParamPatch:
    """A model parameter set to ``value`` (``mode="set"``) or shifted by it (``"add"``) while loaded."""

    value: Tensor
    mode: Literal["set", "add"] = "set"
    source: str = ""


@attrs.frozen(kw_only=True)
class Conversion:
    """A LoRA file in canonical form, keyed by the model's own module and parameter names."""

    targets: Mapping[str, TargetWeights]
    patches: Mapping[str, ParamPatch] = attrs.field(factory=dict)
    used: tuple[str, ...] = ()
    skipped: Mapping[str, str] = attrs.field(factory=dict)
    """File key → why it was left out on purpose (text-encoder tensors, …)."""
    unmatched: Mapping[str, str] = attrs.field(factory=dict)
    """File key → why it fits no module (an error unless loading with ``strict=False``)."""
    notes: tuple[str, ...] = ()
    sources: Mapping[str, str] = attrs.field(factory=dict)
    """Target module → the file's name for the module it came from (for error messages)."""


class LoRAFormat(Protocol):
    """One LoRA file layout: its name, how to recognise it, and how to read it."""

    @property
    def name(self) -> str:
        """The format's name (``kohya``, ``xlabs``, …)."""
        ...

    def detect(self, keys: Collection[str]) -> bool:
        """Whether a file with these tensor names is in this format."""
        ...

    def convert(self, tensors: Mapping[str, Tensor], *, model: torch.nn.Module,
                metadata: Mapping[str, str]) -> Conversion:
        """The file's tensors in canonical form for ``model``."""
        ...


class LoRALayout(Protocol):
    """A layout adapters can be written in (``save_adapter(..., layout=name)``)."""

    @property
    def name(self) -> str:
        """The layout's name."""
        ...

    def export(self, targets: Mapping[str, TargetWeights], patches: Mapping[str, Tensor], *,
               model: torch.nn.Module) -> tuple[dict[str, Tensor], dict[str, str]]:
        """Tensors and header metadata of a file holding this adapter."""
        ...


@attrs.frozen(kw_only=True)
class InputWidening:
    """A module whose input an adapter may widen (zero columns), and the config change that goes with it."""

    module: str
    update_config: Callable[[Any, int], Any]
    """(old config, new input width) → the config to hold while the adapter is loaded."""


def _tuple(values: Collection[Any]) -> tuple[Any, ...]:
    return tuple(values)


@final
@attrs.frozen(kw_only=True)
class LoRAService:
    """The LoRA formats a model reads (tried in order), the layouts it writes, and the inputs it may widen."""

    formats: tuple[LoRAFormat, ...] = attrs.field(converter=_tuple)
    layouts: tuple[LoRALayout, ...] = attrs.field(default=(), converter=_tuple)
    widenable: tuple[InputWidening, ...] = attrs.field(default=(), converter=_tuple)

    @formats.validator
    def _check(self, _: attrs.Attribute[tuple[LoRAFormat, ...]], value: tuple[LoRAFormat, ...]) -> None:
        names = [f.name for f in value]
        if len(set(names)) != len(names):
            raise ValueError(f"LoRA format names must be unique, got {names}")

    def entries(self) -> tuple[str, ...]:
        """The format names, in the order they are tried."""
        return tuple(f.name for f in self.formats)

    def detect(self, keys: Collection[str]) -> LoRAFormat | None:
        """The first format that recognises these tensor names, or ``None``."""
        for fmt in self.formats:
            if fmt.detect(keys):
                return fmt
        return None

    def layout(self, name: str) -> LoRALayout | None:
        """The writable layout called ``name``, or ``None``."""
        return next((layout for layout in self.layouts if layout.name == name), None)

    def widening(self, module: str) -> InputWidening | None:
        """How ``module``'s input may be widened, or ``None`` if it may not."""
        return next((w for w in self.widenable if w.module == module), None)
