"""LoRA adapters in every format a model declares, as real peft layers, with an exact lifecycle.

>>> from diffcaps import lora
>>> report = lora.load_adapter(model, "style.safetensors", adapter_name="style")  # format detected
>>> lora.set_adapters(model, ["style"], weights=[0.8])
>>> lora.fuse(model); lora.unfuse(model)      # unfuse restores the weights bit for bit
>>> lora.unload(model)                         # and unload restores the whole model

What a model author declares (the service, its formats, key tables and resolvers) is in
:mod:`diffcaps.lora.spec`.
"""

from diffcaps.lora._hotswap import enable_hotswap as enable_hotswap
from diffcaps.lora._inspect import lora_recogniser as lora_recogniser
from diffcaps.lora._lifecycle import (
    AdapterWeight as AdapterWeight,
    SaveLayout as SaveLayout,
    active_adapters as active_adapters,
    delete_adapters as delete_adapters,
    disable as disable,
    enable as enable,
    fuse as fuse,
    list_adapters as list_adapters,
    save_adapter as save_adapter,
    set_adapters as set_adapters,
    unfuse as unfuse,
    unload as unload,
)
from diffcaps.lora._load import Source as Source, load_adapter as load_adapter
from diffcaps.lora._state import LoadReport as LoadReport

__all__ = [
    "AdapterWeight",
    "LoadReport",
    "SaveLayout",
    "Source",
    "active_adapters",
    "delete_adapters",
    "disable",
    "enable",
    "enable_hotswap",
    "fuse",
    "list_adapters",
    "load_adapter",
    "lora_recogniser",
    "save_adapter",
    "set_adapters",
    "unfuse",
    "unload",
]
