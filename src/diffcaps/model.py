"""``Model``: the one base class, holding what every model is and nothing it can do."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar, Generic, Self, TypeVar

import torch

from diffcaps.capabilities import Capabilities
from diffcaps.config import ModelConfig
from diffcaps.errors import ConfigError
from diffcaps.io import (
    CONFIG_NAME,
    find_weights,
    load_weights,
    on_meta_device,
    read_config,
    resolve_model_folder,
    write_weights,
)
from diffcaps.metadata import ModelMetadata

__all__ = ["Model", "declared_capabilities"]

_NOTHING_DECLARED = Capabilities()


def declared_capabilities(cls: type[torch.nn.Module]) -> Capabilities:
    """The ``capabilities`` a model class declares (an empty ``Capabilities`` if none)."""
    value: object = getattr(cls, "capabilities", None)
    if isinstance(value, Capabilities):
        return value
    if value is None or isinstance(value, property):
        return _NOTHING_DECLARED
    raise TypeError(f"{cls.__name__}.capabilities must be a Capabilities instance, got {type(value).__name__}")

ConfigT = TypeVar("ConfigT", bound=ModelConfig)

DEFAULT_MAX_SHARD_SIZE = "10GB"


class Model(torch.nn.Module, Generic[ConfigT]):
    """Base class of every diffcaps model.

    A subclass sets ``config_class`` and ``capabilities`` and takes its config as the only
    constructor argument. Loading and saving use the diffusers folder layout, so folders
    move freely between diffcaps and diffusers.
    """

    config_class: ClassVar[type[ModelConfig]]

    @property
    def capabilities(self) -> Capabilities:
        """What this model declares it can do.

        A model class overrides this with ``capabilities: ClassVar[TheirCapabilities] = ...``;
        a class that does not declares nothing.
        """
        return declared_capabilities(type(self))

    def __init__(self, config: ConfigT) -> None:
        super().__init__()
        if not isinstance(config, self.config_class):
            raise ConfigError(
                f"{type(self).__name__} takes a {self.config_class.__name__}, got {type(config).__name__}"
            )
        self.config: ConfigT = config

    @classmethod
    def metadata(cls) -> ModelMetadata:
        """What this model class declares it can do, from its ``capabilities`` field alone."""
        return ModelMetadata.from_capabilities(cls.__name__, declared_capabilities(cls))

    @classmethod
    def from_config(cls, config: ModelConfig, *, device: str | torch.device = "cpu",
                    torch_dtype: torch.dtype | None = None) -> Self:
        """Build a model with freshly initialised weights from a config."""
        with torch.device(device):
            model = cls(config)  # type: ignore[arg-type]  # checked at run time in __init__
        return model.to(dtype=torch_dtype) if torch_dtype is not None else model

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str],
        *,
        torch_dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
        allow_pickle: bool = False,
    ) -> Self:
        """Load a diffusers model folder (or a pipeline folder's ``transformer/``).

        The module is built on the meta device and each parameter is filled straight from
        the safetensors files, cast to ``torch_dtype`` as it lands. Names and shapes are
        checked against the files' headers before any tensor is read.
        """
        folder = resolve_model_folder(path)
        config = cls.config_class.from_dict(read_config(folder), source=str(folder / CONFIG_NAME))
        source = find_weights(folder, allow_pickle=allow_pickle)
        with on_meta_device():
            model = cls(config)  # type: ignore[arg-type]  # config_class is this class's config
        load_weights(model, source, torch_dtype=torch_dtype, device=device)
        return model.eval()

    def save_pretrained(
        self,
        path: str | os.PathLike[str],
        *,
        max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    ) -> Path:
        """Write ``config.json`` and the weights (sharded above ``max_shard_size``) to a folder."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        state = self.state_dict()
        write_weights(state, folder, max_shard_size=max_shard_size)
        config = self.config.to_dict()
        (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=False) + "\n", encoding="utf-8")
        return folder

    def extra_repr(self) -> str:
        fields: dict[str, Any] = self.config.to_dict()
        return ", ".join(f"{k}={v}" for k, v in fields.items() if not k.startswith("_"))
