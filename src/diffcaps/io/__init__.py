"""Reading and writing weights: safetensors files, diffusers folders, meta-device loading."""

from diffcaps.io._folder import (
    CONFIG_NAME as CONFIG_NAME,
    INDEX_NAME as INDEX_NAME,
    WEIGHTS_NAME as WEIGHTS_NAME,
    WeightSource as WeightSource,
    find_weights as find_weights,
    parse_size as parse_size,
    read_config as read_config,
    resolve_model_folder as resolve_model_folder,
)
from diffcaps.io._loading import (
    assign_tensor as assign_tensor,
    expected_tensors as expected_tensors,
    load_weights as load_weights,
    on_meta_device as on_meta_device,
)
from diffcaps.io._mapped import MappedSafetensors as MappedSafetensors, SafetensorsReader as SafetensorsReader
from diffcaps.io._safetensors import (
    SafetensorsHeader as SafetensorsHeader,
    TensorInfo as TensorInfo,
    read_header as read_header,
    save_safetensors as save_safetensors,
)
from diffcaps.io._streaming import write_weights as write_weights

__all__ = [
    "CONFIG_NAME",
    "INDEX_NAME",
    "WEIGHTS_NAME",
    "MappedSafetensors",
    "SafetensorsHeader",
    "SafetensorsReader",
    "TensorInfo",
    "WeightSource",
    "assign_tensor",
    "expected_tensors",
    "find_weights",
    "load_weights",
    "on_meta_device",
    "parse_size",
    "read_config",
    "read_header",
    "resolve_model_folder",
    "save_safetensors",
    "write_weights",
]
