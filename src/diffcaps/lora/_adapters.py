"""Canonical adapter weights: one update per model module, built from a file's tensors, split and joined by rows.

:class:`LoRAWeights`, :class:`LoKrWeights` and :class:`LoHaWeights` are what every format
converts to (:data:`TargetWeights`); :func:`build_weights` makes one from a module's tensors
by role (the suffix tables say which suffix is which role) with the scale its trainer means;
:func:`split_target` and :func:`join_lora` cut an update of a fused module into its parts
and back. LoRA, LoKr and LoHa updates split exactly, each in its own way; a LoRA whose up
matrix is block-diagonal (kohya's ``split_qkv``) splits in the rank too.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import ClassVar, Final, Literal, TypeAlias, cast

import attrs
import torch
from torch import Tensor

from diffcaps import checks
from diffcaps.errors import FormatError, ShapeError
from diffcaps.weights.spec import SWAP_HALVES

__all__ = [
    "ADAPTER_METADATA_KEY",
    "LORA_SUFFIXES",
    "LYCORIS_SUFFIXES",
    "PATCH_SUFFIXES",
    "LoHaWeights",
    "LoKrWeights",
    "LoRAWeights",
    "ParamPatch",
    "TargetWeights",
    "build_weights",
    "join_lora",
    "lokr_as_loha",
    "metadata_scale",
    "split_rows",
    "split_target",
    "swap_halves",
    "swapped_rows",
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

_LORA_ROLES: Final = frozenset({"down", "up", "bias"})
_LOKR_ROLES: Final = frozenset(r for r in LYCORIS_SUFFIXES if r.startswith("lokr_"))
_LOHA_ROLES: Final = frozenset(r for r in LYCORIS_SUFFIXES if r.startswith("hada_"))


def _alpha(module: str, alpha: Tensor) -> float:
    if alpha.numel() != 1:
        raise ShapeError(f"{module}.alpha has shape {_shape(alpha)}: an alpha is one number")
    if alpha.dtype == torch.bool or alpha.is_complex():
        raise FormatError(f"{module}.alpha holds {alpha.dtype}: an alpha is a real number")
    value = float(alpha.item())
    if not math.isfinite(value):
        raise FormatError(f"{module}.alpha is {value}: an alpha is a finite number")
    return value


def _matrices(module: str, **tensors: Tensor) -> None:
    for role, t in tensors.items():
        if t.ndim != 2:
            raise ShapeError(f"{module}: {role} has shape {_shape(t)}, expected a matrix")
        if not t.is_floating_point():
            raise FormatError(f"{module}: {role} holds {t.dtype}, expected floating-point weights")


def _rank(module: str, rank: int, what: str) -> int:
    if rank < 1:
        raise ShapeError(f"{module}: {what} has rank {rank}; an adapter's rank is at least 1")
    return rank


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
    _matrices(module, down=down, up=up)
    bias = parts.get("bias")
    if bias is not None and tuple(bias.shape) != (up.shape[0],):
        raise ShapeError(f"{module}: bias {_shape(bias)} does not match up {_shape(up)}")
    if bias is not None and not bias.is_floating_point():
        raise FormatError(f"{module}: bias holds {bias.dtype}, expected floating-point weights")
    rank = _rank(module, down.shape[0], f"down {_shape(down)}")
    if alpha is not None:
        scale = _alpha(module, alpha) / rank
    else:
        scale = default_scale(rank) if default_scale is not None else 1.0
    return LoRAWeights(down=down, up=up, scale=scale, bias=bias)


def _factor(module: str, parts: Mapping[str, Tensor], name: str) -> Tensor | tuple[Tensor, Tensor]:
    if name in parts:
        _matrices(module, **{name: parts[name]})
        return parts[name]
    a, b = _need(module, parts, f"{name}_a", f"{name}_b")
    _matrices(module, **{f"{name}_a": a, f"{name}_b": b})
    if a.shape[1] != b.shape[0]:
        raise ShapeError(f"{module}: {name}_a {_shape(a)} and {name}_b {_shape(b)} do not multiply")
    _rank(module, a.shape[1], f"{name}_a {_shape(a)}")
    return a, b


def _lokr(module: str, parts: Mapping[str, Tensor], alpha: Tensor | None) -> LoKrWeights:
    if "lokr_t2" in parts:
        raise FormatError(f"{module}: lokr_t2 (a Tucker core for convolutions) has no meaning on a linear module")
    w1, w2 = _factor(module, parts, "lokr_w1"), _factor(module, parts, "lokr_w2")
    decomposed = isinstance(w1, tuple) or isinstance(w2, tuple)
    weights = LoKrWeights(w1=w1, w2=w2, scale=1.0)
    if alpha is not None:
        value = _alpha(module, alpha)
        if decomposed:
            weights = attrs.evolve(weights, scale=value / weights.rank)
    return weights


def _loha(module: str, parts: Mapping[str, Tensor], alpha: Tensor | None) -> LoHaWeights:
    if "hada_t1" in parts or "hada_t2" in parts:
        raise FormatError(f"{module}: hada_t1/hada_t2 (Tucker cores for convolutions) have no meaning on a linear module")
    w1_a, w1_b, w2_a, w2_b = _need(module, parts, "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    _matrices(module, hada_w1_a=w1_a, hada_w1_b=w1_b, hada_w2_a=w2_a, hada_w2_b=w2_b)
    if w1_a.shape[1] != w1_b.shape[0] or w2_a.shape[1] != w2_b.shape[0] or \
            (w1_a.shape[0], w1_b.shape[1]) != (w2_a.shape[0], w2_b.shape[1]):
        raise ShapeError(f"{module}: LoHa factors {_shape(w1_a)}, {_shape(w1_b)}, {_shape(w2_a)}, "
                         f"{_shape(w2_b)} do not form two products of one shape")
    rank = _rank(module, w1_b.shape[0], f"hada_w1_b {_shape(w1_b)}")
    _rank(module, w2_b.shape[0], f"hada_w2_b {_shape(w2_b)}")
    scale = _alpha(module, alpha) / rank if alpha is not None else 1.0
    return LoHaWeights(w1_a=w1_a, w1_b=w1_b, w2_a=w2_a, w2_b=w2_b, scale=scale)


def metadata_scale(metadata: Mapping[str, str], component: str) -> Callable[[str, int], float] | None:
    """Per-module scale from a diffusers ``lora_adapter_metadata`` header entry (a peft LoraConfig).

    Returns ``(module path, rank) → alpha / rank`` (``alpha / sqrt(rank)`` with ``use_rslora``),
    where alpha follows the config's ``alpha_pattern`` as peft matches it, else ``lora_alpha``;
    ``None`` if the header has no such entry. ``component`` is the prefix diffusers gives the
    config keys (``"transformer"``). The fields read are checked here, before any module is
    scaled: a JSON object, finite numbers, regular expressions, a boolean; a violation is a
    :class:`~diffcaps.errors.FormatError` naming the field.
    """
    raw = metadata.get(ADAPTER_METADATA_KEY)
    if raw is None:
        return None
    entry = f"the {ADAPTER_METADATA_KEY!r} header entry"
    try:
        parsed: object = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise FormatError(f"{entry} is not JSON: {exc}") from None
    except RecursionError:
        raise FormatError(f"{entry} nests too deeply to be a peft config") from None
    if not isinstance(parsed, dict):
        raise FormatError(f"{entry} must be a JSON object (a peft config), got {type(parsed).__name__}")
    prefix = f"{component}."
    fields: dict[str, object] = {str(k): v for k, v in cast(dict[object, object], parsed).items()}
    config = {k.removeprefix(prefix): v for k, v in fields.items() if k.startswith(prefix) or "." not in k}

    def field(name: str) -> str:
        return f"{entry}: field {prefix}{name}"

    raw_alpha = config.get("lora_alpha")
    default_alpha = None if raw_alpha is None else checks.number(raw_alpha, field("lora_alpha"), FormatError)
    raw_patterns = config.get("alpha_pattern") or {}
    if not isinstance(raw_patterns, dict):
        raise FormatError(f"{field('alpha_pattern')} must map module patterns to numbers, "
                          f"got {type(raw_patterns).__name__}")
    items = list(cast(dict[str, object], raw_patterns).items())
    checks.patterns([key for key, _ in items], field("alpha_pattern"), FormatError)
    patterns = [(_peft_pattern(key, field("alpha_pattern")),
                 checks.number(value, f"{field('alpha_pattern')}[{key!r}]", FormatError)) for key, value in items]
    rslora = checks.flag(config.get("use_rslora", False), field("use_rslora"), FormatError)

    def scale(module: str, rank: int) -> float:
        alpha = next((v for pattern, v in patterns if pattern.match(module)), None)
        if alpha is None:
            alpha = default_alpha if default_alpha is not None else float(rank)
        return alpha / (rank ** 0.5 if rslora else rank)

    return scale


def _peft_pattern(pattern: str, what: str) -> re.Pattern[str]:
    # peft matches an alpha_pattern key against the end of a module path, at a dot
    try:
        return re.compile(rf"(.*\.)?({pattern})$")
    except re.error as exc:
        raise FormatError(f"{what} entry {pattern!r} is not a regular expression peft can use ({exc})") from None


def split_rows(t: Tensor, sizes: Sequence[int]) -> list[Tensor]:
    """``t`` cut into consecutive row blocks of these sizes."""
    return list(torch.split(t, list(sizes), dim=0))


def swapped_rows(t: Tensor) -> Tensor:
    """``t`` with its two row halves swapped (the weights package's ``SWAP_HALVES``)."""
    return SWAP_HALVES.forward((t,))[0]


def _pair(factor: Tensor | tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    # a factor as a product u @ v (a full matrix is itself times the identity)
    if isinstance(factor, tuple):
        return factor
    return factor, torch.eye(factor.shape[1], dtype=factor.dtype)


def _padded(t: Tensor, rank: int, dim: int) -> Tensor:
    if t.shape[dim] == rank:
        return t
    shape = list(t.shape)
    shape[dim] = rank - t.shape[dim]
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def lokr_as_loha(w: LoKrWeights) -> LoHaWeights:
    """The same update as a LoHa: ``kron(w1, w2) = kron(w1, 1) ⊙ kron(1, w2)``, both low rank.

    With ``w1 = u1 @ v1`` ([a, p] @ [p, b]) and ``w2 = u2 @ v2`` ([c, q] @ [q, d]):
    ``kron(w1, 1_{c×d}) = kron(u1, 1_c) @ kron(v1, 1_d^T)`` and
    ``kron(1_{a×b}, w2) = kron(1_a, u2) @ kron(1_b^T, v2)``; the smaller rank is zero-padded.
    Unlike a Kronecker product, this splits on any row boundary, so a LoKr on a fused module
    whose parts cut through rows of ``w1`` stays exact and small.
    """
    (u1, v1), (u2, v2) = _pair(w.w1), _pair(w.w2)
    a, b, c, d = u1.shape[0], v1.shape[1], u2.shape[0], v2.shape[1]
    rank = max(u1.shape[1], u2.shape[1])
    ones = u1.new_ones
    w1_a = torch.kron(u1, ones(c, 1))
    w1_b = torch.kron(v1, ones(1, d))
    w2_a = torch.kron(ones(a, 1), u2)
    w2_b = torch.kron(ones(1, b), v2)
    return LoHaWeights(w1_a=_padded(w1_a, rank, 1), w1_b=_padded(w1_b, rank, 0),
                       w2_a=_padded(w2_a, rank, 1), w2_b=_padded(w2_b, rank, 0), scale=w.scale)


def _rows_of(factor: Tensor | tuple[Tensor, Tensor], rows: slice) -> Tensor | tuple[Tensor, Tensor]:
    if isinstance(factor, tuple):
        return factor[0][rows], factor[1]
    return factor[rows]


def _factor_rows(factor: Tensor | tuple[Tensor, Tensor]) -> int:
    return factor[0].shape[0] if isinstance(factor, tuple) else factor.shape[0]


def swap_halves(w: TargetWeights) -> TargetWeights:
    """The same update with the two halves of its output rows swapped."""
    if isinstance(w, LoRAWeights):
        bias = swapped_rows(w.bias) if w.bias is not None else None
        return attrs.evolve(w, up=swapped_rows(w.up), bias=bias)
    if isinstance(w, LoHaWeights):
        return attrs.evolve(w, w1_a=swapped_rows(w.w1_a), w2_a=swapped_rows(w.w2_a))
    if _factor_rows(w.w1) % 2 == 0:
        half = _factor_rows(w.w1) // 2
        order = torch.cat([torch.arange(half, 2 * half), torch.arange(half)])
        w1 = (w.w1[0][order], w.w1[1]) if isinstance(w.w1, tuple) else w.w1[order]
        return attrs.evolve(w, w1=w1)
    return swap_halves(lokr_as_loha(w))


def split_target(w: TargetWeights, sizes: Sequence[int]) -> list[TargetWeights]:
    """Split an update of a fused module into consecutive row blocks, one per target.

    A LoRA whose up matrix is block-diagonal (each part uses only its own share of the rank,
    as kohya's ``split_qkv`` writes it) is split in the rank too; otherwise every part keeps
    the whole down matrix. LoHa splits its two left factors; LoKr splits its left factor when
    the blocks fall on its rows, and otherwise becomes the equivalent LoHa (:func:`lokr_as_loha`).
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
    return split_target(lokr_as_loha(w), sizes)


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
        if bool(up[:, : i * share].any()) or bool(up[:, (i + 1) * share:].any()):
            return False
    return True


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
