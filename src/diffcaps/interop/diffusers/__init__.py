"""Run diffcaps models in diffusers pipelines (``pip install "diffcaps[diffusers]"``).

``wrap(model)`` is what a pipeline takes as its transformer —
``FluxPipeline.from_pretrained(folder, transformer=wrap(model))`` — a view sharing the
model's parameters; ``unwrap(pipe.transformer)`` gives the diffcaps model back, for
diffcaps' feature functions. The pipeline's cache contexts reach :mod:`diffcaps.cache`
(``pipe.transformer.enable_cache`` takes diffusers' cache configs: :func:`cache_config`), and
``pipe.save_pretrained`` writes a folder that diffusers alone reloads.

Importing this module imports diffusers; ``import diffcaps`` does not.
"""

import importlib

for _package in ("diffusers", "transformers"):  # transformers: the pipelines' text encoders and tokenizers
    try:
        importlib.import_module(_package)
    except ImportError as missing:
        from diffcaps.errors import MissingDependencyError

        raise MissingDependencyError(
            f"diffcaps.interop.diffusers needs diffusers and transformers ({_package} is missing): "
            'pip install "diffcaps[diffusers]"'
        ) from missing

from diffcaps.interop.diffusers._cache import cache_config as cache_config
from diffcaps.interop.diffusers._lora import ConvertedLoRAWarning as ConvertedLoRAWarning
from diffcaps.interop.diffusers._tiny import (
    tiny_flux_pipeline_folder as tiny_flux_pipeline_folder,
    tiny_wan_pipeline_folder as tiny_wan_pipeline_folder,
)
from diffcaps.interop.diffusers._view import (
    DiffusersView as DiffusersView,
    load_lora_weights as load_lora_weights,
    unwrap as unwrap,
    wrap as wrap,
)

__all__ = [
    "ConvertedLoRAWarning",
    "DiffusersView",
    "cache_config",
    "load_lora_weights",
    "tiny_flux_pipeline_folder",
    "tiny_wan_pipeline_folder",
    "unwrap",
    "wrap",
]
