"""``Capabilities``: the one place a model declares what it can do.

Each field holds the service for one feature, or ``None`` where the model lacks it. A model
folder subclasses ``Capabilities``, narrows each field it supports with :func:`capability`
(one line a field: ``lora: LoRAService = capability(MY_LORA)``) and marks the subclass
``@final``. Field metadata carries the row description and docs link that
``Model.metadata()`` shows.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Final, TypeVar

import attrs

from diffcaps.services import ModuleNames, ModuleTypes, Service
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

__all__ = [
    "Capabilities",
    "DOCS_BASE",
    "FieldInfo",
    "capability",
    "capability_fields",
]

_S = TypeVar("_S")

DOCS_BASE: Final = "README.md"
"""Where the capability docs links point: sections of the project README."""


@attrs.frozen
class FieldInfo:
    """The description and docs link of one capability field."""

    description: str
    docs: str


def _about(description: str, anchor: str) -> dict[str, FieldInfo]:
    return {"diffcaps": FieldInfo(description, f"{DOCS_BASE}#{anchor}")}


@attrs.frozen(kw_only=True)
class Capabilities:
    """Every feature a model may declare; ``None`` means the model lacks it."""

    gradient_checkpointing: GradientCheckpointing | None = attrs.field(
        default=None,
        metadata=_about("Blocks recomputed in backward instead of storing activations", "gradient-checkpointing"),
    )
    group_offloading: GroupOffloading | None = attrs.field(
        default=None,
        metadata=_about("Block lists whose weights move to the compute device group by group", "group-offloading"),
    )
    no_split_modules: ModuleTypes | None = attrs.field(
        default=None,
        metadata=_about("Module classes kept whole on one device when a model is split", "no-split-modules"),
    )
    layerwise_casting: LayerwiseCasting | None = attrs.field(
        default=None,
        metadata=_about("Module patterns kept in full precision when weights are stored low", "layerwise-casting"),
    )
    keep_in_fp32: ModuleNames | None = attrs.field(
        default=None,
        metadata=_about("Modules kept in float32 when the model is loaded or cast to a lower dtype", "keep-in-fp32"),
    )
    repeated_blocks: ModuleTypes | None = attrs.field(
        default=None,
        metadata=_about("Repeated block classes, compiled once each by regional compile", "regional-compile"),
    )
    context_parallel: ContextParallelPlan | None = attrs.field(
        default=None,
        metadata=_about("How the sequence is split across ranks and gathered back", "context-parallelism"),
    )
    weight_mapping: WeightMapper | None = attrs.field(
        default=None,
        metadata=_about("Original single-file checkpoint variants read and written", "single-file-checkpoints"),
    )
    lora: LoRAService | None = attrs.field(
        default=None,
        metadata=_about("LoRA file formats loaded as peft adapters", "lora"),
    )
    cache: CacheSupport | None = attrs.field(
        default=None,
        metadata=_about("Inference caches that skip work between denoising steps", "inference-caches"),
    )
    ip_adapter: IPAdapterSupport | None = attrs.field(
        default=None,
        metadata=_about("IP-Adapter image conditioning, held by the model", "ip-adapter"),
    )
    attention: AttentionSupport | None = attrs.field(
        default=None,
        metadata=_about("Attention module classes and the attention backends they can run", "attention-backends"),
    )
    quantization: QuantizationSupport | None = attrs.field(
        default=None,
        metadata=_about("Quantization schemes accepted (GGUF, scaled fp8, torchao) and modules kept unquantized",
                        "quantized-checkpoints"),
    )

    def declared(self) -> Iterator[tuple[str, Service]]:
        """(field name, service) for every feature this model declares, in the base's field order.

        (A subclass that narrows a field moves it to the end of its own attrs field list;
        the order shown stays the same for every model.)
        """
        for field in attrs.fields(Capabilities):
            value: Any = getattr(self, field.name)
            if value is not None:
                yield field.name, value


def capability_fields() -> dict[str, FieldInfo]:
    """Field name → description and docs link, for every capability there is."""
    return {field.name: field.metadata["diffcaps"] for field in attrs.fields(Capabilities)}


def capability(default: _S) -> _S:
    """A narrowed capability field: ``default`` is the service, and only its type may replace it.

    ``lora: LoRAService = capability(MY_LORA)`` in a ``Capabilities`` subclass declares the
    feature; the ``instance_of`` validator keeps ``attrs.evolve`` from putting ``None`` back.
    """
    field: _S = attrs.field(default=default, validator=attrs.validators.instance_of(type(default)))
    return field
