"""``Model``: the one base class, holding what every model is and nothing it can do."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar, Generic, Self, cast, get_args, get_origin

import torch
from typing_extensions import TypeVar

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

__all__ = ["CapabilitiesT", "ConfigT", "DEFAULT_MAX_SHARD_SIZE", "Model"]

ConfigT = TypeVar("ConfigT", bound=ModelConfig, default=ModelConfig)
"""A model's config class: the first type argument of ``Model``."""

CapabilitiesT = TypeVar("CapabilitiesT", bound=Capabilities, default=Capabilities, covariant=True)
"""A model's capabilities class: the second type argument of ``Model``."""

DEFAULT_MAX_SHARD_SIZE = "10GB"


def _type_arguments(cls: type[Any]) -> tuple[Any, ...]:
    for base in cls.__dict__.get("__orig_bases__", ()):
        if get_origin(base) is Model:
            return get_args(base)
    return ()


class Model(torch.nn.Module, Generic[ConfigT, CapabilitiesT]):
    """Base class of every diffcaps model.

    A subclass names its config and capabilities classes as type arguments,
    ``class MyModel(Model[MyConfig, MyCapabilities])``, and takes its config as the only
    constructor argument; both arguments are optional (a bare ``Model`` subclass takes a
    ``ModelConfig`` and declares nothing). The capabilities class is instantiated once, with
    its defaults, when the model class is created: that instance is ``model.capabilities``.
    Loading and saving use the diffusers folder layout, so folders move freely between
    diffcaps and diffusers.
    """

    config_class: ClassVar[type[ModelConfig]] = ModelConfig
    """The config class this model takes (its first type argument)."""

    __capabilities: ClassVar[Capabilities] = Capabilities()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        arguments = _type_arguments(cls)
        if not arguments:
            return
        config_class, capabilities_class = (tuple(arguments) + (None, None))[:2]
        if isinstance(config_class, type):
            if not issubclass(config_class, ModelConfig):
                raise TypeError(f"{cls.__name__}: the first type argument of Model must be a ModelConfig "
                                f"subclass, got {config_class.__name__}")
            cls.config_class = config_class
        if isinstance(capabilities_class, type):
            if not issubclass(capabilities_class, Capabilities):
                raise TypeError(f"{cls.__name__}: the second type argument of Model must be a Capabilities "
                                f"subclass, got {capabilities_class.__name__}")
            try:
                cls.__capabilities = capabilities_class()
            except (TypeError, ValueError) as exc:
                raise TypeError(f"{cls.__name__}: {capabilities_class.__name__}() cannot be built from its "
                                f"defaults ({exc}); give every narrowed field a default") from exc

    @property
    def capabilities(self) -> CapabilitiesT:
        """What this model declares it can do (its capabilities class, built with its defaults)."""
        return cast(CapabilitiesT, type(self).__capabilities)

    @classmethod
    def declared_capabilities(cls) -> CapabilitiesT:
        """The same declaration as ``capabilities``, read from the class without an instance."""
        return cast(CapabilitiesT, cls.__capabilities)

    def __init__(self, config: ConfigT) -> None:
        super().__init__()
        if not isinstance(config, self.config_class):
            raise ConfigError(
                f"{type(self).__name__} takes a {self.config_class.__name__}, got {type(config).__name__}"
            )
        self.config: ConfigT = config

    @classmethod
    def metadata(cls) -> ModelMetadata:
        """What this model class declares it can do, from its capabilities alone."""
        return ModelMetadata.from_capabilities(cls.__name__, cls.__capabilities)

    @classmethod
    def from_config(cls, config: ConfigT, *, device: str | torch.device = "cpu",
                    torch_dtype: torch.dtype | None = None) -> Self:
        """Build a model with freshly initialised weights from a config."""
        with torch.device(device):
            model = cls(config)
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
            model = cls(cast(ConfigT, config))
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
