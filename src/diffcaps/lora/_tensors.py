"""A file's tensors for one module, by role, turned into canonical weights with the scale its trainer means."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from typing import Any, Final

import attrs
from torch import Tensor

from diffcaps.errors import FormatError, ShapeError
from diffcaps.lora._service import LoHaWeights, LoKrWeights, LoRAWeights, TargetWeights

__all__ = [
    "ADAPTER_METADATA_KEY",
    "LORA_SUFFIXES",
    "LYCORIS_SUFFIXES",
    "PATCH_SUFFIXES",
    "build_weights",
    "metadata_scale",
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

_LORA_ROLES: Final = frozenset({"down", "up", "bias"})
_LOKR_ROLES: Final = frozenset(r for r in LYCORIS_SUFFIXES if r.startswith("lokr_"))
_LOHA_ROLES: Final = frozenset(r for r in LYCORIS_SUFFIXES if r.startswith("hada_"))

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
    return re.match(rf"(.*\.)?({pattern})$", module) is not None


