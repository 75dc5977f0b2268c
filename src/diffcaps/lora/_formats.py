"""LoRA formats as data: the service a model declares, key formats, resolvers and the generic diffusers/PEFT format.

A format turns a file's tensors into a :class:`ConvertedAdapter` — for every model module it
adapts, canonical weights in the model's own module names, already split where the file
fuses several modules into one — and says which tensors it used, skipped (and why) or could
not place. :class:`KeyFormat` is a format given as data (a detector, tensor suffixes and a
resolver); :func:`diffusers_peft` builds the diffusers/PEFT format for any model from its
module names.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, Final, Protocol, TypeAlias, final

import attrs
import torch
from torch import Tensor, nn

from diffcaps.errors import FormatError, LoRAError, ShapeError
from diffcaps.lora._adapters import (
    ADAPTER_METADATA_KEY,
    LORA_SUFFIXES,
    LYCORIS_SUFFIXES,
    PATCH_SUFFIXES,
    LoKrWeights,
    LoRAWeights,
    ParamPatch,
    TargetWeights,
    build_weights,
    lokr_as_loha,
    metadata_scale,
    split_rows,
    split_target,
    swap_halves,
    swapped_rows,
)
from diffcaps.lora._peft import adapter_config, base_linear, is_peft_layer

__all__ = [
    "DIFFUSERS_PEFT",
    "TEXT_ENCODER_PREFIXES",
    "ConvertedAdapter",
    "DiffusersLayout",
    "InputWidening",
    "KeyFormat",
    "LoRAFormat",
    "LoRALayout",
    "LoRAService",
    "ModulePlacement",
    "Resolver",
    "diffusers_peft",
    "model_linears",
    "module_table",
    "table_resolver",
]


@attrs.frozen(kw_only=True)
class ConvertedAdapter:
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
                metadata: Mapping[str, str]) -> ConvertedAdapter:
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


def _unique_names(_: object, __: attrs.Attribute[tuple[LoRAFormat, ...]], value: tuple[LoRAFormat, ...]) -> None:
    names = [f.name for f in value]
    if len(set(names)) != len(names):
        raise LoRAError(f"LoRA format names must be unique, got {names}")


@final
@attrs.frozen(kw_only=True)
class LoRAService:
    """The LoRA formats a model reads (tried in order), the layouts it writes, and the inputs it may widen."""

    formats: tuple[LoRAFormat, ...] = attrs.field(converter=_tuple, validator=_unique_names)
    layouts: tuple[LoRALayout, ...] = attrs.field(default=(), converter=_tuple)
    widenable: tuple[InputWidening, ...] = attrs.field(default=(), converter=_tuple)

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


TEXT_ENCODER_PREFIXES: Final = (
    "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "text_encoder.", "text_encoder_2.",
    "text_encoders.", "lora_clip", "lora_t5",
)
"""Key prefixes that trainers use for text-encoder adapters (skipped: diffcaps adapts the transformer)."""

@attrs.frozen(kw_only=True)
class ModulePlacement:
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


Resolver: TypeAlias = Callable[[str], ModulePlacement | str | None]
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
                metadata: Mapping[str, str]) -> ConvertedAdapter:
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
            if not isinstance(placement, ModulePlacement):
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
            if not isinstance(placement, ModulePlacement):
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

    def add_adapter(self, module: str, placement: ModulePlacement, weights: TargetWeights, keys: Collection[str]) -> None:
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

    def add_patch(self, module: str, placement: ModulePlacement, param: str, value: Tensor, key: str, mode: str) -> None:
        model_param = placement.params.get(param)
        if model_param is None:
            self.unmatched[key] = f"{module!r} has no parameter {param!r} to patch"
            return
        if value.ndim == 0:
            raise ShapeError(f"{key}: a 0-dimensional tensor cannot replace or shift {module!r}'s {param!r}")
        if not value.is_floating_point():
            raise FormatError(f"{key} holds {value.dtype}, expected floating-point weights")
        if placement.swap_halves:
            value = swapped_rows(value)
        sizes = placement.split_sizes(value.shape[0], key, value.shape)
        for target, part in zip(placement.targets, split_rows(value, sizes)):
            name = f"{target}.{model_param}"
            if name in self.patches:
                raise FormatError(f"both {self.patches[name].source!r} and {key!r} patch {name!r}")
            self.patches[name] = ParamPatch(value=part, mode="set" if mode == "set" else "add", source=key)
        self.used.append(key)

    def result(self) -> ConvertedAdapter:
        kinds = {w.kind for w in self.targets.values()}
        if kinds == {"lokr", "loha"}:
            # a LoKr cut through its factor's rows became a LoHa; peft holds one kind per adapter
            self.targets = {t: lokr_as_loha(w) if isinstance(w, LoKrWeights) else w for t, w in self.targets.items()}
            self.notes.append("LoKr updates are held as the equivalent LoHa (kron(w1, w2) = kron(w1, 1) ⊙ "
                              "kron(1, w2)): a fused module's parts cut through the Kronecker factor's rows")
        return ConvertedAdapter(targets=self.targets, patches=self.patches, used=tuple(self.used),
                          skipped=self.skipped, unmatched=self.unmatched, notes=tuple(self.notes),
                          sources=self.sources)


def _bind(scale: Callable[[str, int], float], module: str) -> Callable[[int], float]:
    def for_rank(rank: int) -> float:
        return scale(module, rank)

    return for_rank


def model_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """Every linear module of the model by path, looking through peft layers to the base layer."""
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


# --- the diffusers/PEFT format, for any model --------------------------------------------

_PEFT_PREFIXES: Final = ("transformer.", "base_model.model.", "")
_PEFT_ENDINGS: Final = (".lora_A.weight", ".lora_B.weight")


def module_table(model: nn.Module) -> dict[str, ModulePlacement]:
    """Every module a diffusers/PEFT file can name, by its own path: linears, and RMS norms (whole weights)."""
    table = {path: ModulePlacement(targets=(path,)) for path in model_linears(model)}
    for path, module in model.named_modules():
        if isinstance(module, nn.RMSNorm) and ".base_layer" not in path:
            table[path] = ModulePlacement(targets=(path,), params={"weight": "weight"})
    return table


def table_resolver(table: Callable[[nn.Module], Mapping[str, ModulePlacement]], prefixes: Sequence[str], *,
                   flatten: bool = False) -> Callable[[nn.Module], Resolver]:
    """A resolver that looks a file's module name up in ``table(model)`` once one of ``prefixes`` is cut off.

    ``flatten`` matches names whose dots the trainer wrote as underscores (kohya's
    ``lora_unet_double_blocks_0_img_attn_qkv``). Names it does not find resolve to ``None``.
    """
    def build(model: nn.Module) -> Resolver:
        built = table(model)
        names = {name.replace(".", "_"): p for name, p in built.items()} if flatten else built

        def resolve(name: str) -> ModulePlacement | None:
            for prefix in prefixes:
                if name.startswith(prefix) and name[len(prefix):] in names:
                    return names[name[len(prefix):]]
            return None

        return resolve

    return build


def _peft_detector(prefixes: tuple[str, ...], roots: tuple[str, ...] | None) -> Callable[[Collection[str]], bool]:
    def detect(keys: Collection[str]) -> bool:
        if roots is None:
            return any(key.endswith(_PEFT_ENDINGS) for key in keys)
        return any(key.startswith(prefix) and key[len(prefix):].startswith(roots)
                   for key in keys for prefix in prefixes)

    return detect


def diffusers_peft(*, name: str = "diffusers", prefixes: Sequence[str] = _PEFT_PREFIXES,
                   roots: Sequence[str] | None = None, component: str = "transformer") -> KeyFormat:
    """The diffusers/PEFT LoRA format over any model's own module paths.

    Keys are ``{prefix}{module path}.lora_A.weight`` / ``.lora_B.weight`` (also ``lora_down``/
    ``lora_up``, ``lora_B.bias`` and ``.alpha``), with one of ``prefixes`` (diffusers'
    ``transformer.``, peft's ``base_model.model.``, or none); RMS norm weights may be replaced
    whole (``{module}.weight``). Without an ``.alpha`` the scale comes from the peft config in the
    ``lora_adapter_metadata`` header entry (its keys prefixed ``{component}.``), else 1.
    A file is recognised by a ``lora_A``/``lora_B`` key, or, when ``roots`` are given, by a key
    whose path after the prefix starts with one of them (a model with several formats narrows
    it so).
    """
    prefix_tuple = tuple(prefixes)
    root_tuple = tuple(roots) if roots is not None else None
    return KeyFormat(
        name=name,
        detector=_peft_detector(prefix_tuple, root_tuple),
        resolver=table_resolver(module_table, prefix_tuple),
        suffixes=dict(LORA_SUFFIXES),
        raw_params=frozenset({"weight"}),
        scale=lambda metadata: metadata_scale(metadata, component),
    )


DIFFUSERS_PEFT: Final = diffusers_peft()
"""The diffusers/PEFT format for any model: ``capability(LoRAService(formats=(DIFFUSERS_PEFT,)))``."""


@final
@attrs.frozen(kw_only=True)
class DiffusersLayout:
    """diffusers' layout: ``{prefix}.{module}.lora_A.weight`` / ``lora_B.weight`` (/ ``lora_B.bias``).

    The peft config (rank and alpha per module, ``lora_bias``) goes into the header entry
    ``lora_adapter_metadata``, which diffusers reads back; replaced parameters are written
    under their own names.
    """

    name: str = "diffusers"
    prefix: str = "transformer"

    def export(self, targets: Mapping[str, TargetWeights], patches: Mapping[str, Tensor], *,
               model: nn.Module) -> tuple[dict[str, Tensor], dict[str, str]]:
        """Tensors and header metadata of a file holding this adapter."""
        tensors: dict[str, Tensor] = {}
        for path, w in targets.items():
            if not isinstance(w, LoRAWeights):
                raise LoRAError(f"the {self.name} layout holds LoRA adapters; {path} is {w.kind}")
            key = f"{self.prefix}.{path}"
            tensors[f"{key}.lora_A.weight"] = w.down
            tensors[f"{key}.lora_B.weight"] = w.up
            if w.bias is not None:
                tensors[f"{key}.lora_B.bias"] = w.bias
        for name, value in patches.items():
            tensors[f"{self.prefix}.{name}"] = value
        metadata = {"format": "pt"}
        if targets:
            config = {**adapter_config("lora", targets), "use_dora": False}
            packed = {f"{self.prefix}.{k}": v for k, v in config.items()}
            metadata[ADAPTER_METADATA_KEY] = json.dumps(packed, indent=2, sort_keys=True)
        return tensors, metadata
