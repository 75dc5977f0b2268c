"""Table-driven LoRA formats: a detector, the tensor suffixes, and a resolver per model.

A model folder describes a format as data — how to recognise it, which tensor suffixes it
uses, and a resolver that places each of the file's module names on the model's modules
(:class:`Placement`) — and :class:`KeyFormat` does the rest: it groups a file's tensors by
module, builds canonical weights (:mod:`._tensors`), splits fused modules (:mod:`._split`)
and says which tensors it used, skipped or could not place.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Final, TypeAlias

import attrs
import torch
from torch import Tensor

from diffcaps.errors import FormatError, ShapeError
from diffcaps.lora._service import Conversion, LoKrWeights, ParamPatch, TargetWeights
from diffcaps.lora._split import lokr_as_loha, split_rows, split_target, swap_halves, swapped
from diffcaps.lora._tensors import LORA_SUFFIXES, LYCORIS_SUFFIXES, PATCH_SUFFIXES, build_weights

__all__ = ["TEXT_ENCODER_PREFIXES", "KeyFormat", "Placement", "Resolver", "model_linears"]

TEXT_ENCODER_PREFIXES: Final = (
    "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "text_encoder.", "text_encoder_2.",
    "text_encoders.", "lora_clip", "lora_t5",
)
"""Key prefixes that trainers use for text-encoder adapters (skipped: diffcaps adapts the transformer)."""

@attrs.frozen(kw_only=True)
class Placement:
    """Where one module of a file lands on the model.

    ``targets`` are model module paths; several targets mean the file's module is their
    row-wise concatenation, ``sizes`` rows each (read from the model's modules, and checked
    against the file). ``swap_halves`` swaps the two row halves first (a module whose output
    halves come in the other order). ``params`` renames the file's parameter names to the
    model's, for tensors that replace or shift a parameter in full.
    """

    targets: tuple[str, ...]
    sizes: tuple[int, ...] | None = None
    swap_halves: bool = False
    params: Mapping[str, str] = attrs.field(factory=dict)

    def split_sizes(self, rows: int, source: str, shape: Sequence[int]) -> list[int]:
        """Rows of each target, checked against the fused row count."""
        if len(self.targets) == 1:
            return [rows]
        if self.sizes is None or sum(self.sizes) != rows:
            raise ShapeError(
                f"{source}: a fused tensor of shape {list(shape)} cannot be split over "
                f"{', '.join(self.targets)} (their rows: {list(self.sizes or ())})"
            )
        return list(self.sizes)


Resolver: TypeAlias = Callable[[str], "Placement | str | None"]
"""A file's module name → its placement, a reason to skip it (``str``), or ``None`` (no such module)."""


def _split_key(key: str, suffixes: Mapping[str, str]) -> tuple[str, str] | None:
    best = ""
    for suffix in suffixes:
        if len(suffix) > len(best) and key.endswith("." + suffix):
            best = suffix
    return (key[: -len(best) - 1], suffixes[best]) if best else None


@attrs.frozen(kw_only=True)
class KeyFormat:
    """A LoRA format given as data: a detector, the tensor suffixes it uses, and a resolver per model.

    ``resolver(model)`` builds the name table once per load (block counts come from the model)
    and returns a function placing each of the file's module names. ``raw_params`` are bare
    parameter names (``scale``, ``weight``) the format may carry as full replacements;
    ``scale`` gives the scale of a LoRA module that stores no alpha (from the header metadata).
    """

    name: str
    detector: Callable[[Collection[str]], bool]
    resolver: Callable[[torch.nn.Module], Resolver]
    suffixes: Mapping[str, str] = attrs.field(factory=lambda: {**LORA_SUFFIXES, **LYCORIS_SUFFIXES, **PATCH_SUFFIXES})
    raw_params: frozenset[str] = frozenset()
    scale: Callable[[Mapping[str, str]], Callable[[str, int], float] | None] | None = None

    def detect(self, keys: Collection[str]) -> bool:
        """Whether a file with these tensor names is in this format."""
        return self.detector(keys)

    def convert(self, tensors: Mapping[str, Tensor], *, model: torch.nn.Module,
                metadata: Mapping[str, str]) -> Conversion:
        """The file's tensors in canonical form for ``model``."""
        resolve = self.resolver(model)
        module_scale = self.scale(metadata) if self.scale is not None else None
        builder = _Builder()
        groups: dict[str, dict[str, str]] = {}
        raw: dict[str, dict[str, str]] = {}
        for key in tensors:
            if key.startswith(TEXT_ENCODER_PREFIXES):
                builder.skipped[key] = "text-encoder tensor: diffcaps adapts the transformer only"
                continue
            parsed = _split_key(key, self.suffixes)
            if parsed is not None:
                groups.setdefault(parsed[0], {})[parsed[1]] = key
                continue
            module, _, param = key.rpartition(".")
            if param in self.raw_params and module:
                raw.setdefault(module, {})[param] = key
            else:
                builder.unmatched[key] = f"not a tensor kind the {self.name} format uses"
        for module, roles in groups.items():
            placement = resolve(module)
            if not isinstance(placement, Placement):
                builder.leave(roles.values(), placement, module)
                continue
            adapter_roles = {r: k for r, k in roles.items() if r not in PATCH_SUFFIXES}
            if adapter_roles.keys() & {"dora"}:
                for key in adapter_roles.values():
                    builder.unmatched[key] = "DoRA magnitude: DoRA adapters are not supported"
                adapter_roles = {}
            if adapter_roles:
                parts = {r: tensors[k] for r, k in adapter_roles.items()}
                default = _bind(module_scale, placement.targets[0]) if module_scale is not None else None
                builder.add_adapter(module, placement, build_weights(module, parts, default_scale=default),
                                    adapter_roles.values())
            for role, key in roles.items():
                if role in PATCH_SUFFIXES:
                    param = {"diff": "weight", "diff_b": "bias", "set_weight": "weight"}[role]
                    mode = "set" if role == "set_weight" else "add"
                    builder.add_patch(module, placement, param, tensors[key], key, mode)
        for module, params in raw.items():
            placement = resolve(module)
            if not isinstance(placement, Placement):
                builder.leave(params.values(), placement, module)
                continue
            for param, key in params.items():
                builder.add_patch(module, placement, param, tensors[key], key, "set")
        return builder.result()


@attrs.define
class _Builder:
    targets: dict[str, TargetWeights] = attrs.field(factory=dict)
    patches: dict[str, ParamPatch] = attrs.field(factory=dict)
    used: list[str] = attrs.field(factory=list)
    skipped: dict[str, str] = attrs.field(factory=dict)
    unmatched: dict[str, str] = attrs.field(factory=dict)
    notes: list[str] = attrs.field(factory=list)
    sources: dict[str, str] = attrs.field(factory=dict)

    def leave(self, keys: Collection[str], why: str | None, module: str) -> None:
        for key in keys:
            if why is None:
                self.unmatched[key] = f"{module!r} names no module of the model"
            else:
                self.skipped[key] = why

    def add_adapter(self, module: str, placement: Placement, weights: TargetWeights, keys: Collection[str]) -> None:
        if placement.swap_halves:
            weights = swap_halves(weights)
        rows, cols = weights.shape
        sizes = placement.split_sizes(rows, module, (rows, cols))
        parts = split_target(weights, sizes) if len(sizes) > 1 else [weights]
        for target, part in zip(placement.targets, parts):
            if target in self.targets:
                raise FormatError(f"both {self.sources[target]!r} and {module!r} adapt {target!r}")
            self.targets[target] = part
            self.sources[target] = module
        self.used.extend(keys)

    def add_patch(self, module: str, placement: Placement, param: str, value: Tensor, key: str, mode: str) -> None:
        model_param = placement.params.get(param)
        if model_param is None:
            self.unmatched[key] = f"{module!r} has no parameter {param!r} to patch"
            return
        if placement.swap_halves:
            value = swapped(value)
        sizes = placement.split_sizes(value.shape[0], key, value.shape)
        for target, part in zip(placement.targets, split_rows(value, sizes)):
            name = f"{target}.{model_param}"
            if name in self.patches:
                raise FormatError(f"both {self.patches[name].source!r} and {key!r} patch {name!r}")
            self.patches[name] = ParamPatch(value=part, mode="set" if mode == "set" else "add", source=key)
        self.used.append(key)

    def result(self) -> Conversion:
        kinds = {w.kind for w in self.targets.values()}
        if kinds == {"lokr", "loha"}:
            # a LoKr cut through its factor's rows became a LoHa; peft holds one kind per adapter
            self.targets = {t: lokr_as_loha(w) if isinstance(w, LoKrWeights) else w for t, w in self.targets.items()}
            self.notes.append("LoKr updates are held as the equivalent LoHa (kron(w1, w2) = kron(w1, 1) ⊙ "
                              "kron(1, w2)): a fused module's parts cut through the Kronecker factor's rows")
        return Conversion(targets=self.targets, patches=self.patches, used=tuple(self.used),
                          skipped=self.skipped, unmatched=self.unmatched, notes=tuple(self.notes),
                          sources=self.sources)


def _bind(scale: Callable[[str, int], float], module: str) -> Callable[[int], float]:
    def for_rank(rank: int) -> float:
        return scale(module, rank)

    return for_rank


def model_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """Every linear module of the model by path, looking through peft layers to the base layer."""
    from diffcaps.lora._peft import base_linear, is_peft_layer

    found: dict[str, torch.nn.Linear] = {}

    def walk(module: torch.nn.Module, path: str) -> None:
        base = base_linear(module) if is_peft_layer(module) else module
        if isinstance(base, torch.nn.Linear):
            found[path] = base
            return
        for name, child in module.named_children():
            walk(child, f"{path}.{name}" if path else name)

    walk(model, "")
    return found


