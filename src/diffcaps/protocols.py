"""One protocol per feature, so that mypy and pyright reject a feature call on a model that lacks it.

``SupportsLoRA`` is satisfied by a model *instance* whose ``capabilities`` property has a
``lora`` member of type ``LoRAService`` (not ``LoRAService | None``): a model declares the
feature by narrowing that field in its capabilities class, which it names as the second type
argument of ``Model[Config, Capabilities]``. A model class is not accepted where an instance
is expected (on the class, ``capabilities`` is a property object). At run time the same
misuses are caught by :func:`require`, which raises :class:`~diffcaps.errors.CapabilityError`
naming the model class and the feature.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeGuard, overload

from torch import nn

from diffcaps.errors import CapabilityError

if TYPE_CHECKING:  # annotations only: the feature packages import this module
    from diffcaps.attention.spec import AttentionSupport
    from diffcaps.cache.spec import CacheSupport
    from diffcaps.casting.spec import LayerwiseCasting
    from diffcaps.checkpointing.spec import GradientCheckpointing
    from diffcaps.ip_adapter.spec import IPAdapterSupport
    from diffcaps.lora.spec import LoRAService
    from diffcaps.offload.spec import GroupOffloading
    from diffcaps.parallel.spec import ContextParallelPlan
    from diffcaps.quantization.spec import QuantizationSupport
    from diffcaps.weights.spec import WeightMapper
    from diffcaps.services import ModuleNames, ModuleTypes

__all__ = [
    "HasAttention",
    "HasCache",
    "HasContextParallel",
    "HasGradientCheckpointing",
    "HasGroupOffloading",
    "HasIPAdapter",
    "HasKeepInFP32",
    "HasLayerwiseCasting",
    "HasLoRA",
    "HasNoSplitModules",
    "HasQuantization",
    "HasRepeatedBlocks",
    "HasWeightMapping",
    "SupportsAttention",
    "SupportsCache",
    "SupportsContextParallel",
    "SupportsGradientCheckpointing",
    "SupportsGroupOffloading",
    "SupportsIPAdapter",
    "SupportsKeepInFP32",
    "SupportsLayerwiseCasting",
    "SupportsLoRA",
    "SupportsNoSplitModules",
    "SupportsQuantization",
    "SupportsRepeatedBlocks",
    "SupportsWeightMapping",
    "require",
    "supports_attention",
    "supports_cache",
    "supports_context_parallel",
    "supports_gradient_checkpointing",
    "supports_group_offloading",
    "supports_ip_adapter",
    "supports_keep_in_fp32",
    "supports_layerwise_casting",
    "supports_lora",
    "supports_no_split_modules",
    "supports_quantization",
    "supports_repeated_blocks",
    "supports_weight_mapping",
    "unwrap_compiled",
]


@overload
def require(model: SupportsGradientCheckpointing, feature: Literal["gradient_checkpointing"]) -> tuple[nn.Module, GradientCheckpointing]: ...


@overload
def require(model: SupportsGroupOffloading, feature: Literal["group_offloading"]) -> tuple[nn.Module, GroupOffloading]: ...


@overload
def require(model: SupportsNoSplitModules, feature: Literal["no_split_modules"]) -> tuple[nn.Module, ModuleTypes]: ...


@overload
def require(model: SupportsLayerwiseCasting, feature: Literal["layerwise_casting"]) -> tuple[nn.Module, LayerwiseCasting]: ...


@overload
def require(model: SupportsKeepInFP32, feature: Literal["keep_in_fp32"]) -> tuple[nn.Module, ModuleNames]: ...


@overload
def require(model: SupportsRepeatedBlocks, feature: Literal["repeated_blocks"]) -> tuple[nn.Module, ModuleTypes]: ...


@overload
def require(model: SupportsContextParallel, feature: Literal["context_parallel"]) -> tuple[nn.Module, ContextParallelPlan]: ...


@overload
def require(model: SupportsWeightMapping, feature: Literal["weight_mapping"]) -> tuple[nn.Module, WeightMapper]: ...


@overload
def require(model: SupportsLoRA, feature: Literal["lora"]) -> tuple[nn.Module, LoRAService]: ...


@overload
def require(model: SupportsCache, feature: Literal["cache"]) -> tuple[nn.Module, CacheSupport]: ...


@overload
def require(model: SupportsIPAdapter, feature: Literal["ip_adapter"]) -> tuple[nn.Module, IPAdapterSupport]: ...


@overload
def require(model: SupportsAttention, feature: Literal["attention"]) -> tuple[nn.Module, AttentionSupport]: ...


@overload
def require(model: SupportsQuantization, feature: Literal["quantization"]) -> tuple[nn.Module, QuantizationSupport]: ...


def require(model: object, feature: str) -> tuple[nn.Module, Any]:
    """The model as a module and its service for ``feature``; a ``CapabilityError`` if it has none.

    Every feature function starts here. A ``torch.compile`` wrapper stands for the model inside
    it. A model *class*, or anything that is not a module, is refused with the same error.
    """
    module = unwrap_compiled(model)
    if isinstance(model, type):
        raise CapabilityError(model.__name__, f"{feature} (pass a model instance, not the class)")
    if not isinstance(module, nn.Module):
        raise CapabilityError(type(model).__name__, f"{feature} (not a torch.nn.Module)")
    service: object = getattr(getattr(module, "capabilities", None), feature, None)
    if service is None:
        raise CapabilityError(type(module).__name__, feature)
    return module, service


def unwrap_compiled(model: object) -> object:
    """The module inside a ``torch.compile`` wrapper, or ``model`` itself."""
    if isinstance(model, nn.Module) and type(model).__name__ == "OptimizedModule":
        inner: object = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            return inner
    return model


def _declares(model: object, feature: str) -> bool:
    if isinstance(model, type):
        return False
    return getattr(getattr(unwrap_compiled(model), "capabilities", None), feature, None) is not None


class HasGradientCheckpointing(Protocol):
    """Capabilities that declare gradient checkpointing."""

    @property
    def gradient_checkpointing(self) -> GradientCheckpointing: ...


class SupportsGradientCheckpointing(Protocol):
    """A model instance whose capabilities declare gradient checkpointing."""

    @property
    def capabilities(self) -> HasGradientCheckpointing: ...


def supports_gradient_checkpointing(model: object) -> TypeGuard[SupportsGradientCheckpointing]:
    """Whether ``model`` declares gradient checkpointing (narrows its type when true)."""
    return _declares(model, "gradient_checkpointing")


class HasGroupOffloading(Protocol):
    """Capabilities that declare group offloading."""

    @property
    def group_offloading(self) -> GroupOffloading: ...


class SupportsGroupOffloading(Protocol):
    """A model instance whose capabilities declare group offloading."""

    @property
    def capabilities(self) -> HasGroupOffloading: ...


def supports_group_offloading(model: object) -> TypeGuard[SupportsGroupOffloading]:
    """Whether ``model`` declares group offloading (narrows its type when true)."""
    return _declares(model, "group_offloading")


class HasNoSplitModules(Protocol):
    """Capabilities that declare no split modules."""

    @property
    def no_split_modules(self) -> ModuleTypes: ...


class SupportsNoSplitModules(Protocol):
    """A model instance whose capabilities declare no split modules."""

    @property
    def capabilities(self) -> HasNoSplitModules: ...


def supports_no_split_modules(model: object) -> TypeGuard[SupportsNoSplitModules]:
    """Whether ``model`` declares no split modules (narrows its type when true)."""
    return _declares(model, "no_split_modules")


class HasLayerwiseCasting(Protocol):
    """Capabilities that declare layerwise casting."""

    @property
    def layerwise_casting(self) -> LayerwiseCasting: ...


class SupportsLayerwiseCasting(Protocol):
    """A model instance whose capabilities declare layerwise casting."""

    @property
    def capabilities(self) -> HasLayerwiseCasting: ...


def supports_layerwise_casting(model: object) -> TypeGuard[SupportsLayerwiseCasting]:
    """Whether ``model`` declares layerwise casting (narrows its type when true)."""
    return _declares(model, "layerwise_casting")


class HasKeepInFP32(Protocol):
    """Capabilities that declare modules kept in float32."""

    @property
    def keep_in_fp32(self) -> ModuleNames: ...


class SupportsKeepInFP32(Protocol):
    """A model instance whose capabilities declare modules kept in float32."""

    @property
    def capabilities(self) -> HasKeepInFP32: ...


def supports_keep_in_fp32(model: object) -> TypeGuard[SupportsKeepInFP32]:
    """Whether ``model`` declares modules kept in float32 (narrows its type when true)."""
    return _declares(model, "keep_in_fp32")


class HasRepeatedBlocks(Protocol):
    """Capabilities that declare repeated blocks."""

    @property
    def repeated_blocks(self) -> ModuleTypes: ...


class SupportsRepeatedBlocks(Protocol):
    """A model instance whose capabilities declare repeated blocks."""

    @property
    def capabilities(self) -> HasRepeatedBlocks: ...


def supports_repeated_blocks(model: object) -> TypeGuard[SupportsRepeatedBlocks]:
    """Whether ``model`` declares repeated blocks (narrows its type when true)."""
    return _declares(model, "repeated_blocks")


class HasContextParallel(Protocol):
    """Capabilities that declare context parallel."""

    @property
    def context_parallel(self) -> ContextParallelPlan: ...


class SupportsContextParallel(Protocol):
    """A model instance whose capabilities declare context parallel."""

    @property
    def capabilities(self) -> HasContextParallel: ...


def supports_context_parallel(model: object) -> TypeGuard[SupportsContextParallel]:
    """Whether ``model`` declares context parallel (narrows its type when true)."""
    return _declares(model, "context_parallel")


class HasWeightMapping(Protocol):
    """Capabilities that declare weight mapping."""

    @property
    def weight_mapping(self) -> WeightMapper: ...


class SupportsWeightMapping(Protocol):
    """A model instance whose capabilities declare weight mapping."""

    @property
    def capabilities(self) -> HasWeightMapping: ...


def supports_weight_mapping(model: object) -> TypeGuard[SupportsWeightMapping]:
    """Whether ``model`` declares weight mapping (narrows its type when true)."""
    return _declares(model, "weight_mapping")


class HasLoRA(Protocol):
    """Capabilities that declare lora."""

    @property
    def lora(self) -> LoRAService: ...


class SupportsLoRA(Protocol):
    """A model instance whose capabilities declare lora."""

    @property
    def capabilities(self) -> HasLoRA: ...


def supports_lora(model: object) -> TypeGuard[SupportsLoRA]:
    """Whether ``model`` declares lora (narrows its type when true)."""
    return _declares(model, "lora")


class HasCache(Protocol):
    """Capabilities that declare cache."""

    @property
    def cache(self) -> CacheSupport: ...


class SupportsCache(Protocol):
    """A model instance whose capabilities declare cache."""

    @property
    def capabilities(self) -> HasCache: ...


def supports_cache(model: object) -> TypeGuard[SupportsCache]:
    """Whether ``model`` declares cache (narrows its type when true)."""
    return _declares(model, "cache")


class HasIPAdapter(Protocol):
    """Capabilities that declare ip adapter."""

    @property
    def ip_adapter(self) -> IPAdapterSupport: ...


class SupportsIPAdapter(Protocol):
    """A model instance whose capabilities declare ip adapter."""

    @property
    def capabilities(self) -> HasIPAdapter: ...


def supports_ip_adapter(model: object) -> TypeGuard[SupportsIPAdapter]:
    """Whether ``model`` declares ip adapter (narrows its type when true)."""
    return _declares(model, "ip_adapter")


class HasAttention(Protocol):
    """Capabilities that declare attention backends."""

    @property
    def attention(self) -> AttentionSupport: ...


class SupportsAttention(Protocol):
    """A model instance whose capabilities declare attention backends."""

    @property
    def capabilities(self) -> HasAttention: ...


def supports_attention(model: object) -> TypeGuard[SupportsAttention]:
    """Whether ``model`` declares attention backends (narrows its type when true)."""
    return _declares(model, "attention")


class HasQuantization(Protocol):
    """Capabilities that declare quantization schemes."""

    @property
    def quantization(self) -> QuantizationSupport: ...


class SupportsQuantization(Protocol):
    """A model instance whose capabilities declare quantization schemes."""

    @property
    def capabilities(self) -> HasQuantization: ...


def supports_quantization(model: object) -> TypeGuard[SupportsQuantization]:
    """Whether ``model`` declares quantization schemes (narrows its type when true)."""
    return _declares(model, "quantization")
