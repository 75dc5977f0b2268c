"""Reading and writing weights: safetensors files, diffusers folders, meta-device loading.

What other packages build on: ``read_header`` (the one safetensors header validator: every
reader goes through it, so a malformed file is a ``CheckpointError`` naming file and key)
and the memory-mapped readers built on it,
``find_weights``/``load_weights`` for diffusers folders, and the one safetensors writer
(``save_safetensors`` for a dict, ``stream_safetensors``/``stream_shards`` for tensors
produced one at a time, ``write_weights`` for a model folder).
"""

from diffcaps.io._folder import (
    CONFIG_NAME as CONFIG_NAME,
    INDEX_NAME as INDEX_NAME,
    WEIGHTS_NAME as WEIGHTS_NAME,
    WeightSource as WeightSource,
    find_weights as find_weights,
    read_config as read_config,
    resolve_model_folder as resolve_model_folder,
)
from diffcaps.io._loading import (
    assign_tensor as assign_tensor,
    expected_tensors as expected_tensors,
    landing_dtype as landing_dtype,
    load_weights as load_weights,
    on_meta_device as on_meta_device,
)
from diffcaps.io._mapped import MappedSafetensors as MappedSafetensors, SafetensorsReader as SafetensorsReader
from diffcaps.io._safetensors import (
    SafetensorsHeader as SafetensorsHeader,
    TensorInfo as TensorInfo,
    read_header as read_header,
)
from diffcaps.io._streaming import (
    Progress as Progress,
    TensorSlot as TensorSlot,
    save_safetensors as save_safetensors,
    stream_safetensors as stream_safetensors,
    stream_shards as stream_shards,
    write_weights as write_weights,
)

__all__ = [
    "CONFIG_NAME",
    "INDEX_NAME",
    "MappedSafetensors",
    "Progress",
    "SafetensorsHeader",
    "SafetensorsReader",
    "TensorInfo",
    "TensorSlot",
    "WEIGHTS_NAME",
    "WeightSource",
    "assign_tensor",
    "expected_tensors",
    "find_weights",
    "landing_dtype",
    "load_weights",
    "on_meta_device",
    "read_config",
    "read_header",
    "resolve_model_folder",
    "save_safetensors",
    "stream_safetensors",
    "stream_shards",
    "write_weights",
]
