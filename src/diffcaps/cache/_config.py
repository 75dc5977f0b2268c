"""The five cache configs: frozen, checked when built, with diffusers' field names and defaults.

A config that diffusers accepts can be moved over by changing the import (lists become
tuples, a ``mag_ratios`` tensor becomes a tuple of floats). Values that cannot work raise
:class:`~diffcaps.errors.CacheError` when the config is built, before any model is touched;
what depends on the model (identifiers that match nothing, too few blocks) is checked by
``enable``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import ClassVar, Final, TypeAlias, cast

import attrs
import torch
from torch import nn

from diffcaps import checks
from diffcaps.errors import CacheError

__all__ = [
    "CacheConfig",
    "FasterCacheConfig",
    "FirstBlockCacheConfig",
    "MagCacheConfig",
    "PyramidAttentionBroadcastConfig",
    "TaylorSeerCacheConfig",
    "interpolate_mag_ratios",
]

TimestepCallback: TypeAlias = Callable[[], float]
ModuleWeightCallback: TypeAlias = Callable[[nn.Module], float]

PAB_SPATIAL_IDENTIFIERS: Final = ("blocks", "transformer_blocks", "single_transformer_blocks", "layers",
                                  "visual_transformer_blocks")
PAB_TEMPORAL_IDENTIFIERS: Final = ("temporal_transformer_blocks",)
PAB_CROSS_IDENTIFIERS: Final = ("blocks", "transformer_blocks", "layers")
FASTER_SPATIAL_IDENTIFIERS: Final = ("^blocks.*attn", "^transformer_blocks.*attn", "^single_transformer_blocks.*attn")
FASTER_TEMPORAL_IDENTIFIERS: Final = ("^temporal_transformer_blocks.*attn",)
FASTER_TENSOR_FORMATS: Final = ("BCFHW", "BFCHW", "BCHW")
FASTER_UNCOND_COND_KWARGS: Final = ("hidden_states", "encoder_hidden_states", "timestep", "attention_mask",
                                    "encoder_attention_mask")


def _require(condition: bool, config: str, message: str) -> None:
    if not condition:
        raise CacheError(f"{config}: {message}")


def _error(config: str) -> checks.ErrorType:
    return lambda message: CacheError(f"{config}: {message}")


def _strings(value: Sequence[str] | str) -> tuple[str, ...]:
    # one pattern may stand for a list of one, as in diffusers; the items are checked after
    given = cast(object, value)
    return cast(tuple[str, ...], (given,) if not isinstance(given, Sequence) or isinstance(given, str)
                else tuple(cast(Sequence[object], given)))


def _check_patterns(config: object, *fields: str) -> None:
    for field in fields:
        value = getattr(config, field)
        if value is not None:
            checks.patterns(value, field, _error(type(config).__name__))


def _optional_strings(value: Sequence[str] | str | None) -> tuple[str, ...] | None:
    return None if value is None else _strings(value)


def _pair(value: Sequence[float]) -> tuple[float, float]:
    given = cast(object, value)
    items: tuple[object, ...] = tuple(cast(Sequence[object], given)) if isinstance(given, Sequence) else ()
    if len(items) != 2 or not all(isinstance(i, int | float) and not isinstance(i, bool) for i in items):
        raise CacheError(f"a timestep range is (low, high), two numbers, got {value!r}")
    return (float(cast(float, items[0])), float(cast(float, items[1])))


def _check_range(config: str, field: str, value: tuple[float, float]) -> None:
    _require(value[0] <= value[1], config, f"{field} must be (low, high) with low <= high, got {value!r}")


def _check_skip(config: str, field: str, value: int | None) -> None:
    if value is not None:
        checks.integer(value, field, _error(config), minimum=1)


@attrs.frozen(kw_only=True)
class FirstBlockCacheConfig:
    """First Block Cache: run the first block, and skip the rest while its residual barely changes.

    The rest is skipped when ``mean|r - r_prev| / mean|r_prev| <= threshold``, ``r`` being the
    first block's hidden-states residual and ``r_prev`` the one of the last computed step;
    the skipped blocks' residual from that step is added instead.
    """

    kind: ClassVar[str] = "first_block_cache"

    threshold: float = 0.05

    def __attrs_post_init__(self) -> None:
        checks.number(self.threshold, "threshold", _error(type(self).__name__), minimum=0)


@attrs.frozen(kw_only=True)
class PyramidAttentionBroadcastConfig:
    """Pyramid Attention Broadcast: reuse an attention output for ``N - 1`` calls out of ``N``.

    Attention modules whose name matches one of ``*_block_identifiers`` (``re.search``) get the
    matching ``*_block_skip_range``; reuse happens only while ``low < timestep < high`` of the
    ``*_timestep_skip_range``. The timestep comes from ``current_timestep_callback`` or from
    ``diffcaps.cache.context(model, name, timestep=...)``. With no skip range set at all,
    spatial attention uses 2 (and a warning says so), as in diffusers.
    """

    kind: ClassVar[str] = "pyramid_attention_broadcast"

    spatial_attention_block_skip_range: int | None = None
    temporal_attention_block_skip_range: int | None = None
    cross_attention_block_skip_range: int | None = None
    spatial_attention_timestep_skip_range: tuple[float, float] = attrs.field(default=(100, 800), converter=_pair)
    temporal_attention_timestep_skip_range: tuple[float, float] = attrs.field(default=(100, 800), converter=_pair)
    cross_attention_timestep_skip_range: tuple[float, float] = attrs.field(default=(100, 800), converter=_pair)
    spatial_attention_block_identifiers: tuple[str, ...] = attrs.field(default=PAB_SPATIAL_IDENTIFIERS,
                                                                       converter=_strings)
    temporal_attention_block_identifiers: tuple[str, ...] = attrs.field(default=PAB_TEMPORAL_IDENTIFIERS,
                                                                        converter=_strings)
    cross_attention_block_identifiers: tuple[str, ...] = attrs.field(default=PAB_CROSS_IDENTIFIERS,
                                                                     converter=_strings)
    current_timestep_callback: TimestepCallback | None = None

    def __attrs_post_init__(self) -> None:
        name = type(self).__name__
        for kind in ("spatial", "temporal", "cross"):
            _check_skip(name, f"{kind}_attention_block_skip_range", getattr(self, f"{kind}_attention_block_skip_range"))
            _check_range(name, f"{kind}_attention_timestep_skip_range",
                         getattr(self, f"{kind}_attention_timestep_skip_range"))
        _check_patterns(self, "spatial_attention_block_identifiers", "temporal_attention_block_identifiers",
                        "cross_attention_block_identifiers")


@attrs.frozen(kw_only=True)
class FasterCacheConfig:
    """FasterCache: extrapolate attention outputs from the last two computed ones, and (for
    models run with classifier-free guidance in one batch) approximate the unconditional
    branch from the conditional one in frequency space.

    Attention whose name matches ``spatial_attention_block_identifiers`` (``re.search``) is
    computed every ``spatial_attention_block_skip_range`` calls while
    ``low < timestep < high``; in between it returns ``t + (t - t_prev) * w`` with ``w`` from
    ``attention_weight_callback`` (0.5 if unset). Set ``is_guidance_distilled=True`` for
    guidance-distilled models (Flux dev/schnell): then only the attention part applies.
    """

    kind: ClassVar[str] = "faster_cache"

    spatial_attention_block_skip_range: int = 2
    temporal_attention_block_skip_range: int | None = None
    spatial_attention_timestep_skip_range: tuple[float, float] = attrs.field(default=(-1, 681), converter=_pair)
    temporal_attention_timestep_skip_range: tuple[float, float] = attrs.field(default=(-1, 681), converter=_pair)
    low_frequency_weight_update_timestep_range: tuple[float, float] = attrs.field(default=(99, 901), converter=_pair)
    high_frequency_weight_update_timestep_range: tuple[float, float] = attrs.field(default=(-1, 301), converter=_pair)
    alpha_low_frequency: float = 1.1
    alpha_high_frequency: float = 1.1
    unconditional_batch_skip_range: int = 5
    unconditional_batch_timestep_skip_range: tuple[float, float] = attrs.field(default=(-1, 641), converter=_pair)
    spatial_attention_block_identifiers: tuple[str, ...] = attrs.field(default=FASTER_SPATIAL_IDENTIFIERS,
                                                                       converter=_strings)
    temporal_attention_block_identifiers: tuple[str, ...] = attrs.field(default=FASTER_TEMPORAL_IDENTIFIERS,
                                                                        converter=_strings)
    attention_weight_callback: ModuleWeightCallback | None = None
    low_frequency_weight_callback: ModuleWeightCallback | None = None
    high_frequency_weight_callback: ModuleWeightCallback | None = None
    tensor_format: str = "BCFHW"
    is_guidance_distilled: bool = False
    current_timestep_callback: TimestepCallback | None = None
    unconditional_conditional_input_kwargs_identifiers: tuple[str, ...] = attrs.field(
        default=FASTER_UNCOND_COND_KWARGS, converter=_strings,
        alias="_unconditional_conditional_input_kwargs_identifiers",
    )

    def __attrs_post_init__(self) -> None:
        name = type(self).__name__
        _check_skip(name, "spatial_attention_block_skip_range", self.spatial_attention_block_skip_range)
        _check_skip(name, "temporal_attention_block_skip_range", self.temporal_attention_block_skip_range)
        _check_skip(name, "unconditional_batch_skip_range", self.unconditional_batch_skip_range)
        checks.flag(self.is_guidance_distilled, "is_guidance_distilled", _error(name))
        for field in ("spatial_attention_timestep_skip_range", "temporal_attention_timestep_skip_range",
                      "low_frequency_weight_update_timestep_range", "high_frequency_weight_update_timestep_range",
                      "unconditional_batch_timestep_skip_range"):
            _check_range(name, field, getattr(self, field))
        _require(self.tensor_format in FASTER_TENSOR_FORMATS, name,
                 f"tensor_format must be one of {FASTER_TENSOR_FORMATS}, got {self.tensor_format!r}")
        for field in ("alpha_low_frequency", "alpha_high_frequency"):
            checks.number(getattr(self, field), field, _error(name))
        _check_patterns(self, "spatial_attention_block_identifiers", "temporal_attention_block_identifiers",
                        "unconditional_conditional_input_kwargs_identifiers")


@attrs.frozen(kw_only=True)
class TaylorSeerCacheConfig:
    """TaylorSeer: predict module outputs between full steps with a Taylor expansion.

    Each hooked module counts its calls (per context). Calls before
    ``disable_cache_before_step``, calls from ``disable_cache_after_step`` on, and every
    ``cache_interval``-th call after the warm-up are computed (updating the finite-difference
    factors up to ``max_order``); the others are predicted. Modules matching
    ``skip_predict_identifiers`` (``re.fullmatch``) return zeros instead; without identifiers
    every attention module is predicted. ``use_lite_mode`` skips the transformer blocks and
    predicts only the output projection.
    """

    kind: ClassVar[str] = "taylorseer_cache"

    cache_interval: int = 5
    disable_cache_before_step: int = 3
    disable_cache_after_step: int | None = None
    max_order: int = 1
    taylor_factors_dtype: torch.dtype | None = torch.bfloat16
    skip_predict_identifiers: tuple[str, ...] | None = attrs.field(default=None, converter=_optional_strings)
    cache_identifiers: tuple[str, ...] | None = attrs.field(default=None, converter=_optional_strings)
    use_lite_mode: bool = False

    def __attrs_post_init__(self) -> None:
        name = type(self).__name__
        error = _error(name)
        checks.integer(self.cache_interval, "cache_interval", error, minimum=1)
        checks.integer(self.disable_cache_before_step, "disable_cache_before_step", error, minimum=0)
        checks.integer(self.max_order, "max_order", error, minimum=0)
        if self.disable_cache_after_step is not None:
            checks.integer(self.disable_cache_after_step, "disable_cache_after_step", error, minimum=0)
        checks.flag(self.use_lite_mode, "use_lite_mode", error)
        _check_patterns(self, "skip_predict_identifiers", "cache_identifiers")
        dtype = cast(object, self.taylor_factors_dtype)
        _require(dtype is None or (isinstance(dtype, torch.dtype) and dtype.is_floating_point), name,
                 f"taylor_factors_dtype must be a floating dtype (or None), got {self.taylor_factors_dtype!r}")


def _ratios(value: Sequence[float] | torch.Tensor | None) -> tuple[float, ...] | None:
    given = cast(object, value)
    if given is None:
        return None
    if isinstance(given, torch.Tensor):
        return tuple(float(v) for v in given.detach().flatten().double().unbind())
    if isinstance(given, Mapping):
        raise CacheError("mag_ratios takes one ratio per step, not a mapping by context: pass "
                         "calibrated_mag_ratios(model, context=...) for the pass you calibrated")
    items: tuple[object, ...] = tuple(cast(Sequence[object], given)) if isinstance(given, Sequence) else (given,)
    bad = [item for item in items if isinstance(item, bool) or not isinstance(item, int | float)]
    if bad or isinstance(given, str):
        raise CacheError(f"mag_ratios must be a sequence of numbers (or a tensor), got {bad[0] if bad else given!r}")
    return tuple(float(cast(float, item)) for item in items)


@attrs.frozen(kw_only=True)
class MagCacheConfig:
    """MagCache: skip all blocks while the accumulated drift of the residual magnitude is small.

    From step ``int(retention_ratio * num_inference_steps + 0.5)`` on, each step multiplies a
    running ratio by ``mag_ratios[step]`` and adds ``|1 - ratio|`` to an error; while that
    error stays ``<= threshold`` for at most ``max_skip_steps`` steps, the blocks are skipped
    and the last residual is added instead. ``mag_ratios`` must have one entry per step (use
    :func:`interpolate_mag_ratios` to resample a table). With ``calibrate=True`` nothing is
    skipped and the ratios of the run are recorded (``diffcaps.cache.calibrated_mag_ratios``).
    """

    kind: ClassVar[str] = "mag_cache"

    threshold: float = 0.06
    max_skip_steps: int = 3
    retention_ratio: float = 0.2
    num_inference_steps: int = 28
    mag_ratios: tuple[float, ...] | None = attrs.field(default=None, converter=_ratios)
    calibrate: bool = False

    def __attrs_post_init__(self) -> None:
        name = type(self).__name__
        error = _error(name)
        checks.number(self.threshold, "threshold", error, minimum=0)
        checks.integer(self.max_skip_steps, "max_skip_steps", error, minimum=0)
        checks.integer(self.num_inference_steps, "num_inference_steps", error, minimum=1)
        checks.flag(self.calibrate, "calibrate", error)
        _require(checks.number(self.retention_ratio, "retention_ratio", error) <= 1 and self.retention_ratio >= 0,
                 name, f"retention_ratio must be in [0, 1], got {self.retention_ratio!r}")
        if self.calibrate:
            return
        _require(self.mag_ratios is not None, name,
                 "mag_ratios is required (they depend on the model): run once with calibrate=True and pass "
                 "diffcaps.cache.calibrated_mag_ratios(model)")
        assert self.mag_ratios is not None
        _require(len(self.mag_ratios) == self.num_inference_steps, name,
                 f"mag_ratios has {len(self.mag_ratios)} entries but num_inference_steps is "
                 f"{self.num_inference_steps}: pass one ratio per step (interpolate_mag_ratios(ratios, "
                 f"{self.num_inference_steps}) resamples a table)")
        bad = [r for r in self.mag_ratios if not (math.isfinite(r) and r > 0)]
        _require(not bad, name, f"mag_ratios must be finite and > 0, got {bad[:3]!r}")


CacheConfig: TypeAlias = (
    FirstBlockCacheConfig | FasterCacheConfig | PyramidAttentionBroadcastConfig | TaylorSeerCacheConfig
    | MagCacheConfig
)
"""Any one of the cache configs ``diffcaps.cache.enable`` takes."""


def interpolate_mag_ratios(ratios: Sequence[float] | torch.Tensor, num_inference_steps: int) -> tuple[float, ...]:
    """Resample a MagCache ratio table to ``num_inference_steps`` entries (nearest neighbour).

    Entry ``i`` is ``ratios[round(i * (len - 1) / (steps - 1))]`` (halves round to even), the
    resampling diffusers applies silently when the lengths differ.
    """
    table = _ratios(ratios) or ()
    if not table:
        raise CacheError("interpolate_mag_ratios: the ratio table is empty")
    if num_inference_steps < 1:
        raise CacheError(f"interpolate_mag_ratios: num_inference_steps must be >= 1, got {num_inference_steps}")
    if num_inference_steps == 1:
        return table[-1:]
    scale = (len(table) - 1) / (num_inference_steps - 1)
    positions = torch.round(torch.arange(num_inference_steps, dtype=torch.float32) * scale).long().tolist()
    return tuple(table[i] for i in positions)
