"""LoRA adapters in every format a model declares, as real peft layers, with an exact lifecycle.

>>> from diffcaps import lora
>>> report = lora.load_adapter(model, "style.safetensors", adapter_name="style")  # format detected
>>> lora.set_adapters(model, ["style"], weights=[0.8])
>>> lora.fuse(model); lora.unfuse(model)      # unfuse restores the weights bit for bit
>>> lora.unload(model)                         # and unload restores the whole model
"""

from diffcaps.lora._convert import (
    TEXT_ENCODER_PREFIXES as TEXT_ENCODER_PREFIXES,
    KeyFormat as KeyFormat,
    Placement as Placement,
    Resolver as Resolver,
    model_linears as model_linears,
)
from diffcaps.lora._hotswap import enable_hotswap as enable_hotswap
from diffcaps.lora._inspect import lora_recogniser as lora_recogniser
from diffcaps.lora._layouts import PeftLayout as PeftLayout, save_adapter as save_adapter
from diffcaps.lora._lifecycle import (
    AdapterWeight as AdapterWeight,
    active_adapters as active_adapters,
    delete_adapters as delete_adapters,
    disable as disable,
    enable as enable,
    fuse as fuse,
    list_adapters as list_adapters,
    set_adapters as set_adapters,
    unfuse as unfuse,
    unload as unload,
)
from diffcaps.lora._load import Source as Source, load_adapter as load_adapter
from diffcaps.lora._report import LoadReport as LoadReport
from diffcaps.lora._split import join_lora as join_lora, split_target as split_target, swap_halves as swap_halves
from diffcaps.lora._tensors import (
    ADAPTER_METADATA_KEY as ADAPTER_METADATA_KEY,
    LORA_SUFFIXES as LORA_SUFFIXES,
    LYCORIS_SUFFIXES as LYCORIS_SUFFIXES,
    build_weights as build_weights,
    metadata_scale as metadata_scale,
)
from diffcaps.lora._service import (
    Conversion as Conversion,
    InputWidening as InputWidening,
    LoHaWeights as LoHaWeights,
    LoKrWeights as LoKrWeights,
    LoRAFormat as LoRAFormat,
    LoRALayout as LoRALayout,
    LoRAService as LoRAService,
    LoRAWeights as LoRAWeights,
    ParamPatch as ParamPatch,
    TargetWeights as TargetWeights,
)

__all__ = [
    "ADAPTER_METADATA_KEY",
    "LORA_SUFFIXES",
    "LYCORIS_SUFFIXES",
    "TEXT_ENCODER_PREFIXES",
    "AdapterWeight",
    "Conversion",
    "InputWidening",
    "KeyFormat",
    "LoHaWeights",
    "LoKrWeights",
    "LoRAFormat",
    "LoRALayout",
    "LoRAService",
    "LoRAWeights",
    "LoadReport",
    "ParamPatch",
    "PeftLayout",
    "Placement",
    "Resolver",
    "Source",
    "TargetWeights",
    "active_adapters",
    "build_weights",
    "delete_adapters",
    "detect_format",
    "disable",
    "enable",
    "enable_hotswap",
    "fuse",
    "join_lora",
    "list_adapters",
    "load_adapter",
    "lora_recogniser",
    "metadata_scale",
    "model_linears",
    "save_adapter",
    "set_adapters",
    "split_target",
    "swap_halves",
    "unfuse",
    "unload",
]


def detect_format(keys: "list[str] | tuple[str, ...] | set[str]", model: str = "flux") -> str | None:
    """The name of the LoRA format of a file with these tensor names, for a built-in model, or ``None``."""
    from diffcaps.models import model_class

    service = getattr(model_class(model).capabilities, "lora", None)
    if not isinstance(service, LoRAService):
        return None
    found = service.detect(keys)
    return found.name if found is not None else None
