"""One protocol per feature, so that mypy rejects a feature call on a model that lacks it.

``SupportsLoRA`` is satisfied by any model class whose ``capabilities`` has a ``lora``
property of type ``LoRAService`` (not ``LoRAService | None``): a model folder narrows the
field to declare the feature. At run time the same misuse is caught by :func:`require`,
which raises :class:`~diffcaps.errors.CapabilityError` naming the model class and feature.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, TypeGuard, TypeVar

from diffcaps.errors import CapabilityError

if TYPE_CHECKING:  # only annotations use them: feature packages import this module
    from diffcaps._service import ModuleTypes
    from diffcaps.cache._service import CacheSupport
    from diffcaps.casting._service import LayerwiseCasting
    from diffcaps.checkpointing._service import GradientCheckpointing
    from diffcaps.ip_adapter._service import IPAdapterSupport
    from diffcaps.lora._service import LoRAService
    from diffcaps.offload._service import GroupOffloading
    from diffcaps.parallel._service import ContextParallelPlan
    from diffcaps.weights._service import WeightMapper

__all__ = [
    "HasCache",
    "HasContextParallel",
    "HasGradientCheckpointing",
    "HasGroupOffloading",
    "HasIPAdapter",
    "HasLayerwiseCasting",
    "HasLoRA",
    "HasNoSplitModules",
    "HasRepeatedBlocks",
    "HasWeightMapping",
    "SupportsCache",
    "SupportsContextParallel",
    "SupportsGradientCheckpointing",
    "SupportsGroupOffloading",
    "SupportsIPAdapter",
    "SupportsLayerwiseCasting",
    "SupportsLoRA",
    "SupportsNoSplitModules",
    "SupportsRepeatedBlocks",
    "SupportsWeightMapping",
    "require",
    "supports_cache",
    "supports_context_parallel",
    "supports_gradient_checkpointing",
    "supports_group_offloading",
    "supports_ip_adapter",
    "supports_layerwise_casting",
    "supports_lora",
    "supports_no_split_modules",
    "supports_repeated_blocks",
    "supports_weight_mapping",
]

_S = TypeVar("_S")


def require(model: object, feature: str, service_type: type[_S]) -> _S:
    """Return ``model``'s service for ``feature``, or raise ``CapabilityError`` if it lacks one."""
    capabilities: Any = getattr(model, "capabilities", None)
    service = getattr(capabilities, feature, None)
    model_class = model.__name__ if isinstance(model, type) else type(model).__name__
    if service is None:
        raise CapabilityError(model_class, feature)
    if not isinstance(service, service_type):
        raise CapabilityError(model_class, f"{feature} (declared as {type(service).__name__}, "
                              f"expected {service_type.__name__})")
    return service


def _declares(model: object, feature: str) -> bool:
    return getattr(getattr(model, "capabilities", None), feature, None) is not None


class HasGradientCheckpointing(Protocol):
    """Capabilities that declare gradient checkpointing."""

    @property
    def gradient_checkpointing(self) -> GradientCheckpointing: ...


class SupportsGradientCheckpointing(Protocol):
    """A model (instance or class) whose capabilities declare gradient checkpointing."""

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
    """A model (instance or class) whose capabilities declare group offloading."""

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
    """A model (instance or class) whose capabilities declare no split modules."""

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
    """A model (instance or class) whose capabilities declare layerwise casting."""

    @property
    def capabilities(self) -> HasLayerwiseCasting: ...


def supports_layerwise_casting(model: object) -> TypeGuard[SupportsLayerwiseCasting]:
    """Whether ``model`` declares layerwise casting (narrows its type when true)."""
    return _declares(model, "layerwise_casting")


class HasRepeatedBlocks(Protocol):
    """Capabilities that declare repeated blocks."""

    @property
    def repeated_blocks(self) -> ModuleTypes: ...


class SupportsRepeatedBlocks(Protocol):
    """A model (instance or class) whose capabilities declare repeated blocks."""

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
    """A model (instance or class) whose capabilities declare context parallel."""

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
    """A model (instance or class) whose capabilities declare weight mapping."""

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
    """A model (instance or class) whose capabilities declare lora."""

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
    """A model (instance or class) whose capabilities declare cache."""

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
    """A model (instance or class) whose capabilities declare ip adapter."""

    @property
    def capabilities(self) -> HasIPAdapter: ...


def supports_ip_adapter(model: object) -> TypeGuard[SupportsIPAdapter]:
    """Whether ``model`` declares ip adapter (narrows its type when true)."""
    return _declares(model, "ip_adapter")
