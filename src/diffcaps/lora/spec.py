"""What a model author declares for LoRA: the service, its formats, and their building blocks.

A model declares LoRA with one field of its capabilities class::

    lora: LoRAService = capability(LoRAService(formats=(DIFFUSERS_PEFT,)))

:data:`DIFFUSERS_PEFT` reads diffusers/PEFT files (``transformer.`` / ``base_model.model.`` /
no prefix, ``lora_A``/``lora_B``, ``.alpha``, the ``lora_adapter_metadata`` header) on any
model, from its own module names; :class:`DiffusersLayout` writes them. A model whose
trainers use other names adds :class:`KeyFormat` s (tried in order, most specific first).

**The format contract.** ``load_adapter`` reads the file's header once, asks the service
which format recognises the tensor names (:meth:`LoRAService.detect`), and calls that
format's ``convert(tensors, model=..., metadata=...)``, which returns a
:class:`ConvertedAdapter`: canonical weights (:class:`LoRAWeights`, :class:`LoKrWeights`,
:class:`LoHaWeights`) keyed by the model's module paths, :class:`ParamPatch` es keyed by
parameter paths, and every file key in exactly one of ``used``, ``skipped`` (left out on
purpose, with the reason) or ``unmatched`` (fits no module, with the reason: an error
unless the caller loads with ``strict=False``). Shapes are checked, and the model changed,
only after that.

**The resolver contract** (for a :class:`KeyFormat`). A key format groups the file's
tensors by module name: the key minus the longest suffix in its ``suffixes`` table (which
maps each suffix to a role: ``down``, ``up``, ``alpha``, ``lokr_w1``, …). Keys with a
text-encoder prefix (:data:`TEXT_ENCODER_PREFIXES`) are skipped before that; keys with no
known suffix are unmatched. ``resolver(model)`` is called once per load with the model
module (build name tables there: block counts come from the model in hand) and returns a
:data:`Resolver`, called once per file module name. It returns

- a :class:`ModulePlacement` — the model module path(s) the file's module lands on (several
  paths: a fused module, cut by rows in ``sizes``; ``swap_halves`` for an output whose halves
  come in the other order; ``params`` for whole-parameter tensors) — and the tensors are used;
- a ``str`` — the reason the tensors are skipped on purpose (reported, never an error);
- ``None`` — the name fits no module of the model (reported as unmatched).

A load that adapts nothing is an error that lists why each tensor was skipped.
"""

from diffcaps.lora._adapters import (
    ADAPTER_METADATA_KEY as ADAPTER_METADATA_KEY,
    LORA_SUFFIXES as LORA_SUFFIXES,
    LYCORIS_SUFFIXES as LYCORIS_SUFFIXES,
    LoHaWeights as LoHaWeights,
    LoKrWeights as LoKrWeights,
    LoRAWeights as LoRAWeights,
    ParamPatch as ParamPatch,
    TargetWeights as TargetWeights,
    build_weights as build_weights,
    join_lora as join_lora,
    metadata_scale as metadata_scale,
    split_target as split_target,
    swap_halves as swap_halves,
)
from diffcaps.lora._formats import (
    DIFFUSERS_PEFT as DIFFUSERS_PEFT,
    TEXT_ENCODER_PREFIXES as TEXT_ENCODER_PREFIXES,
    ConvertedAdapter as ConvertedAdapter,
    DiffusersLayout as DiffusersLayout,
    InputWidening as InputWidening,
    KeyFormat as KeyFormat,
    LoRAFormat as LoRAFormat,
    LoRALayout as LoRALayout,
    LoRAService as LoRAService,
    ModulePlacement as ModulePlacement,
    Resolver as Resolver,
    diffusers_peft as diffusers_peft,
    model_linears as model_linears,
    module_table as module_table,
    table_resolver as table_resolver,
)

__all__ = [
    "ADAPTER_METADATA_KEY",
    "ConvertedAdapter",
    "DIFFUSERS_PEFT",
    "DiffusersLayout",
    "InputWidening",
    "KeyFormat",
    "LORA_SUFFIXES",
    "LYCORIS_SUFFIXES",
    "LoHaWeights",
    "LoKrWeights",
    "LoRAFormat",
    "LoRALayout",
    "LoRAService",
    "LoRAWeights",
    "ModulePlacement",
    "ParamPatch",
    "Resolver",
    "TEXT_ENCODER_PREFIXES",
    "TargetWeights",
    "build_weights",
    "diffusers_peft",
    "join_lora",
    "metadata_scale",
    "model_linears",
    "module_table",
    "split_target",
    "swap_halves",
    "table_resolver",
]
