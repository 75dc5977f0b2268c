"""Building blocks for LoRA formats: tensor roles, scales, splitting fused modules, table-driven formats.

A model folder describes a format as data — how to recognise it, which tensor suffixes it
uses, and a resolver that places each of the file's module names on the model's modules
(:class:`Placement`) — and :class:`KeyFormat` does the rest. Fused modules (one file module
for several model modules, such as a fused qkv projection) are split by rows here, the
same way for LoRA, LoKr and LoHa.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, Final, TypeAlias

import attrs
import torch
from torch import Tensor

from diffcaps.errors import FormatError, ShapeError
from diffcaps.lora._service import (
    Conversion,
    LoHaWeights,
    LoKrWeights,
    LoRAWeights,
    ParamPatch,
    TargetWeights,
)

__all__ = [
    "ADAPTER_METADATA_KEY",
    "LORA_SUFFIXES",
    "LYCORIS_SUFFIXES",
    "TEXT_ENCODER_PREFIXES",
    "KeyFormat",
    "Placement",
    "Resolver",
    "join_lora",
    "model_linears",
    "build_weights",
    "metadata_scale",
    "split_rows",
    "split_target",
    "swap_halves",
]

ADAPTER_METADATA_KEY: Final = "lora_adapter_metadata"
"""The safetensors header entry where diffusers keeps an adapter's peft config (JSON)."""

LORA_SUFFIXES: Final[Mapping[str, str]] = {
    "lora_down.weight": "down",
    "lora_A.weight": "down",
    "lora_up.weight": "up",
    "lora_B.weight": "up",
    "lora_B.bias": "bias",
    "lora_up.bias": "bias",
    "alpha": "alpha",
    "dora_scale": "dora",
    "lora_magnitude_vector": "dora",
    "lora_magnitude_vector.weight": "dora",
}
LYCORIS_SUFFIXES: Final[Mapping[str, str]] = {
    **{name: name for name in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")},
    **{name: name for name in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")},
    "alpha": "alpha",
}
PATCH_SUFFIXES: Final[Mapping[str, str]] = {"diff": "diff", "diff_b": "diff_b", "set_weight": "set_weight"}

TEXT_ENCODER_PREFIXES: Final = (
    "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "text_encoder.", "text_encoder_2.",
    "text_encoders.", "lora_clip", "lora_t5",
)
"""Key prefixes that trainers use for text-encoder adapters (skipped: diffcaps adapts the transformer)."""

_LORA_ROLES: Final = frozenset({"down", "up", "bias"})
_LOKR_ROLES: Final = frozenset(r for r in LYCORIS_SUFFIXES if r.startswith("lokr_"))
_LOHA_ROLES: Final = frozenset(r for r in LYCORIS_SUFFIXES if r.startswith("hada_"))

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


def _as_float(value: Tensor | float) -> float:
    return float(value.item() if isinstance(value, Tensor) else value)


def _shape(t: Tensor) -> list[int]:
    return list(t.shape)


def build_weights(module: str, parts: Mapping[str, Tensor], *, default_scale: Callable[[int], float] | None = None
                  ) -> TargetWeights:
    """Turn one module's tensors (by role) into canonical weights, with the scale its trainer means.

    LoRA: ``alpha / rank`` when an alpha is stored, else ``default_scale(rank)`` (1 if not given).
    LoKr (LyCORIS): ``alpha / rank`` when a factor is decomposed (rank from ``w2_b``, else ``w1_b``),
    1 when both factors are full. LoHa: ``alpha / rank`` (rank from ``w1_b``), else 1.
    """
    roles = set(parts) - {"alpha"}
    alpha = parts.get("alpha")
    if roles <= _LORA_ROLES:
        return _lora(module, parts, alpha, default_scale)
    if roles <= _LOKR_ROLES:
        return _lokr(module, parts, alpha)
    if roles <= _LOHA_ROLES:
        return _loha(module, parts, alpha)
    raise FormatError(f"{module}: tensors {sorted(roles)} mix adapter kinds or are incomplete")


def _need(module: str, parts: Mapping[str, Tensor], *roles: str) -> list[Tensor]:
    missing = [r for r in roles if r not in parts]
    if missing:
        raise FormatError(f"{module}: has {sorted(parts)} but lacks {missing}")
    return [parts[r] for r in roles]


def _lora(module: str, parts: Mapping[str, Tensor], alpha: Tensor | None,
          default_scale: Callable[[int], float] | None) -> LoRAWeights:
    down, up = _need(module, parts, "down", "up")
    if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
        raise ShapeError(f"{module}: down {_shape(down)} and up {_shape(up)} are not a [rank, in] / [out, rank] pair")
    bias = parts.get("bias")
    if bias is not None and tuple(bias.shape) != (up.shape[0],):
        raise ShapeError(f"{module}: bias {_shape(bias)} does not match up {_shape(up)}")
    rank = down.shape[0]
    if alpha is not None:
        scale = _as_float(alpha) / rank
    else:
        scale = default_scale(rank) if default_scale is not None else 1.0
    return LoRAWeights(down=down, up=up, scale=scale, bias=bias)


def _factor(module: str, parts: Mapping[str, Tensor], name: str) -> Tensor | tuple[Tensor, Tensor]:
    if name in parts:
        return parts[name]
    a, b = _need(module, parts, f"{name}_a", f"{name}_b")
    if a.shape[1] != b.shape[0]:
        raise ShapeError(f"{module}: {name}_a {_shape(a)} and {name}_b {_shape(b)} do not multiply")
    return a, b


def _lokr(module: str, parts: Mapping[str, Tensor], alpha: Tensor | None) -> LoKrWeights:
    if "lokr_t2" in parts:
        raise FormatError(f"{module}: lokr_t2 (a Tucker core for convolutions) has no meaning on a linear module")
    w1, w2 = _factor(module, parts, "lokr_w1"), _factor(module, parts, "lokr_w2")
    decomposed = isinstance(w1, tuple) or isinstance(w2, tuple)
    weights = LoKrWeights(w1=w1, w2=w2, scale=1.0)
    if alpha is not None and decomposed:
        weights = attrs.evolve(weights, scale=_as_float(alpha) / weights.rank)
    return weights


def _loha(module: str, parts: Mapping[str, Tensor], alpha: Tensor | None) -> LoHaWeights:
    if "hada_t1" in parts or "hada_t2" in parts:
        raise FormatError(f"{module}: hada_t1/hada_t2 (Tucker cores for convolutions) have no meaning on a linear module")
    w1_a, w1_b, w2_a, w2_b = _need(module, parts, "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    if w1_a.shape[1] != w1_b.shape[0] or w2_a.shape[1] != w2_b.shape[0] or \
            (w1_a.shape[0], w1_b.shape[1]) != (w2_a.shape[0], w2_b.shape[1]):
        raise ShapeError(f"{module}: LoHa factors {_shape(w1_a)}, {_shape(w1_b)}, {_shape(w2_a)}, "
                         f"{_shape(w2_b)} do not form two products of one shape")
    scale = _as_float(alpha) / w1_b.shape[0] if alpha is not None else 1.0
    return LoHaWeights(w1_a=w1_a, w1_b=w1_b, w2_a=w2_a, w2_b=w2_b, scale=scale)


def split_rows(t: Tensor, sizes: Sequence[int]) -> list[Tensor]:
    """``t`` cut into consecutive row blocks of these sizes."""
    return list(torch.split(t, list(sizes), dim=0))


def _swapped(t: Tensor) -> Tensor:
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _product(factor: Tensor | tuple[Tensor, Tensor]) -> Tensor:
    if isinstance(factor, tuple):
        return factor[0].float() @ factor[1].float()
    return factor.float()


def _dense_lokr(w: LoKrWeights, rows: slice) -> LoKrWeights:
    # A row block of kron(w1, w2) that does not fall on whole rows of w1 is no Kronecker product;
    # it is kept exactly as a full delta: kron([[1]], delta).
    delta = (w.scale * torch.kron(_product(w.w1), _product(w.w2)))[rows]
    return LoKrWeights(w1=torch.ones(1, 1), w2=delta, scale=1.0)


def _rows_of(factor: Tensor | tuple[Tensor, Tensor], rows: slice) -> Tensor | tuple[Tensor, Tensor]:
    if isinstance(factor, tuple):
        return factor[0][rows], factor[1]
    return factor[rows]


def _factor_rows(factor: Tensor | tuple[Tensor, Tensor]) -> int:
    return factor[0].shape[0] if isinstance(factor, tuple) else factor.shape[0]


def swap_halves(w: TargetWeights) -> TargetWeights:
    """The same update with the two halves of its output rows swapped."""
    if isinstance(w, LoRAWeights):
        bias = _swapped(w.bias) if w.bias is not None else None
        return attrs.evolve(w, up=_swapped(w.up), bias=bias)
    if isinstance(w, LoHaWeights):
        return attrs.evolve(w, w1_a=_swapped(w.w1_a), w2_a=_swapped(w.w2_a))
    if _factor_rows(w.w1) % 2 == 0:
        half = _factor_rows(w.w1) // 2
        order = torch.cat([torch.arange(half, 2 * half), torch.arange(half)])
        w1 = (w.w1[0][order], w.w1[1]) if isinstance(w.w1, tuple) else w.w1[order]
        return attrs.evolve(w, w1=w1)
    dense = _dense_lokr(w, slice(None))
    return attrs.evolve(dense, w2=_swapped(_product(dense.w2)))


def split_target(w: TargetWeights, sizes: Sequence[int]) -> list[TargetWeights]:
    """Split an update of a fused module into consecutive row blocks, one per target.

    A LoRA whose up matrix is block-diagonal (each part uses only its own share of the rank,
    as kohya's ``split_qkv`` writes it) is split in the rank too; otherwise every part keeps
    the whole down matrix. LoHa splits its two left factors; LoKr splits its left factor when
    the blocks fall on its rows and otherwise keeps each block as an exact dense delta.
    """
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    if isinstance(w, LoRAWeights):
        return list(_split_lora(w, sizes, offsets))
    if isinstance(w, LoHaWeights):
        return [attrs.evolve(w, w1_a=w.w1_a[o:o + n], w2_a=w.w2_a[o:o + n]) for o, n in zip(offsets, sizes)]
    block = w.shape[0] // _factor_rows(w.w1)
    if all(o % block == 0 and n % block == 0 for o, n in zip(offsets, sizes)):
        return [attrs.evolve(w, w1=_rows_of(w.w1, slice(o // block, (o + n) // block)))
                for o, n in zip(offsets, sizes)]
    return [_dense_lokr(w, slice(o, o + n)) for o, n in zip(offsets, sizes)]


def _split_lora(w: LoRAWeights, sizes: Sequence[int], offsets: Sequence[int]) -> list[LoRAWeights]:
    ups = split_rows(w.up, sizes)
    biases = split_rows(w.bias, sizes) if w.bias is not None else [None] * len(sizes)
    parts, share = len(sizes), w.rank // len(sizes)
    if w.rank % parts == 0 and _block_diagonal(ups, share):
        downs = split_rows(w.down, [share] * parts)
        return [LoRAWeights(down=d, up=u[:, i * share:(i + 1) * share], scale=w.scale, bias=b)
                for i, (d, u, b) in enumerate(zip(downs, ups, biases))]
    return [LoRAWeights(down=w.down, up=u, scale=w.scale, bias=b) for u, b in zip(ups, biases)]


def _block_diagonal(ups: Sequence[Tensor], share: int) -> bool:
    for i, up in enumerate(ups):
        outside = torch.cat([up[:, : i * share], up[:, (i + 1) * share:]], dim=1)
        if outside.numel() and bool(outside.any()):
            return False
    return True


def metadata_scale(metadata: Mapping[str, str], component: str) -> Callable[[str, int], float] | None:
    """Per-module scale from a diffusers ``lora_adapter_metadata`` header entry (a peft LoraConfig).

    Returns ``(module path, rank) → alpha / rank`` (``alpha / sqrt(rank)`` with ``use_rslora``),
    where alpha follows the config's ``alpha_pattern`` as peft matches it, else ``lora_alpha``;
    ``None`` if the header has no such entry. ``component`` is the prefix diffusers gives the
    config keys (``"transformer"``).
    """
    raw = metadata.get(ADAPTER_METADATA_KEY)
    if raw is None:
        return None
    try:
        parsed: Any = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise FormatError(f"the {ADAPTER_METADATA_KEY!r} header entry is not JSON: {exc}") from None
    prefix = f"{component}."
    config = {k.removeprefix(prefix): v for k, v in dict(parsed).items() if k.startswith(prefix) or "." not in k}
    default_alpha = config.get("lora_alpha")
    patterns: Mapping[str, float] = config.get("alpha_pattern") or {}
    rslora = bool(config.get("use_rslora", False))

    def scale(module: str, rank: int) -> float:
        alpha = next((float(v) for key, v in patterns.items() if _peft_pattern_matches(key, module)), None)
        if alpha is None:
            alpha = float(default_alpha) if default_alpha is not None else float(rank)
        return alpha / (rank ** 0.5 if rslora else rank)

    return scale


def _peft_pattern_matches(pattern: str, module: str) -> bool:
    import re

    return re.match(rf"(.*\.)?({pattern})$", module) is not None


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
        if not _is_dense(weights) and any(_is_dense(p) for p in parts):
            self.notes.append(f"{module}: LoKr blocks do not fall on the Kronecker factor's rows; "
                              "its parts are kept as exact dense deltas")
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
            value = _swapped(value)
        sizes = placement.split_sizes(value.shape[0], key, value.shape)
        for target, part in zip(placement.targets, split_rows(value, sizes)):
            name = f"{target}.{model_param}"
            if name in self.patches:
                raise FormatError(f"both {self.patches[name].source!r} and {key!r} patch {name!r}")
            self.patches[name] = ParamPatch(value=part, mode="set" if mode == "set" else "add", source=key)
        self.used.append(key)

    def result(self) -> Conversion:
        return Conversion(targets=self.targets, patches=self.patches, used=tuple(self.used),
                          skipped=self.skipped, unmatched=self.unmatched, notes=tuple(self.notes),
                          sources=self.sources)


def _bind(scale: Callable[[str, int], float], module: str) -> Callable[[int], float]:
    def for_rank(rank: int) -> float:
        return scale(module, rank)

    return for_rank


def _is_dense(w: TargetWeights) -> bool:
    return isinstance(w, LoKrWeights) and isinstance(w.w1, Tensor) and tuple(w.w1.shape) == (1, 1)


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


def join_lora(parts: Sequence[LoRAWeights | None], sizes: Sequence[int]) -> LoRAWeights:
    """One LoRA for a fused module from the LoRAs of its row blocks (``None``: no update there).

    Parts that share one down matrix and one scale are joined by stacking their up matrices;
    otherwise the down matrices are stacked and the up matrix is block-diagonal, each part's
    scale folded into its block when the scales differ.
    """
    present = [(i, p) for i, p in enumerate(parts) if p is not None]
    if not present:
        raise ValueError("join_lora needs at least one part")
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    scales = {p.scale for _, p in present}
    scale = scales.pop() if len(scales) == 1 else 1.0
    first = present[0][1]
    dtype = first.up.dtype
    any_bias = any(p.bias is not None for _, p in present)
    bias = torch.zeros(sum(sizes), dtype=dtype) if any_bias else None
    shared = len(present) == len(parts) and all(p.down is first.down or torch.equal(p.down, first.down)
                                                 for _, p in present)
    rank = first.rank if shared else sum(p.rank for _, p in present)
    up = torch.zeros(sum(sizes), rank, dtype=dtype)
    column = 0
    downs = []
    for i, p in present:
        factor = p.scale / scale
        rows = slice(offsets[i], offsets[i] + sizes[i])
        width = first.rank if shared else p.rank
        up[rows, column:column + width] = p.up * factor if factor != 1.0 else p.up
        if bias is not None and p.bias is not None:
            bias[rows] = p.bias * factor if factor != 1.0 else p.bias
        if not shared:
            downs.append(p.down)
            column += p.rank
    down = first.down if shared else torch.cat(downs, dim=0)
    return LoRAWeights(down=down, up=up, scale=scale, bias=bias)
