"""``Model``: the one base class, holding what every model is and nothing it can do."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, ClassVar, Generic, Self, cast, get_args, get_origin

import attrs
import torch
from typing_extensions import TypeVar

from diffcaps.capabilities import Capabilities
from diffcaps.config import ModelConfig
from diffcaps import checks
from diffcaps.errors import CheckpointError, ConfigError, InputError
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
from diffcaps.services import ModuleNames
from diffcaps.quantization.spec import packed_linears
from diffcaps.slots import holding

__all__ = ["CapabilitiesT", "ConfigT", "DEFAULT_MAX_SHARD_SIZE", "Model"]

ConfigT = TypeVar("ConfigT", bound=ModelConfig, default=ModelConfig)
"""A model's config class: the first type argument of ``Model``."""

CapabilitiesT = TypeVar("CapabilitiesT", bound=Capabilities, default=Capabilities, covariant=True)
"""A model's capabilities class: the second type argument of ``Model``."""

DEFAULT_MAX_SHARD_SIZE = "10GB"

_WRAPPED = ".base_layer."
"""An adapter layer keeps the module it wraps here; its parameters are the model's own."""


def _adapters_left_out(model: torch.nn.Module, keys: list[str]) -> str:
    """The warning for a save that leaves adapter tensors out, naming the adapters when LoRA holds them."""
    what = f"{len(keys)} adapter tensor(s) ({', '.join(keys[:3])}{', …' if len(keys) > 3 else ''})"
    adapters = holding(model, "lora")
    if adapters:
        what = f"the layers of {adapters}"
    return (f"save_pretrained writes the base model: {what} are not saved (adapters fused with lora.fuse "
            "are in the base weights; lora.save_adapter writes an adapter to its own file)")


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

    unused_tensors: ClassVar[ModuleNames | None] = None
    """Tensors that diffusers' folders of this model may hold and the model has no use for
    (diffusers' ``_keys_to_ignore_on_load_unexpected``): ``from_pretrained`` skips them; any
    other tensor the model has no place for is still an error."""

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
        return model.to_dtype(torch_dtype) if torch_dtype is not None else model

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
        the safetensors files, cast to ``torch_dtype`` as it lands (the modules declared in
        ``keep_in_fp32`` land in float32). Names and shapes are checked against the files'
        headers before any tensor is read.
        """
        folder = resolve_model_folder(path)
        config = cls.config_class.from_dict(read_config(folder), source=str(folder / CONFIG_NAME))
        source = find_weights(folder, allow_pickle=allow_pickle)
        unused = cls.unused_tensors
        if unused is not None:
            source = attrs.evolve(source, entries={k: v for k, v in source.entries.items() if not unused.matches(k)})
        with on_meta_device(max_tensors=len(source.entries), max_elements=source.elements, where=str(folder)):
            model = cls(cast(ConfigT, config))
        load_weights(model, source, torch_dtype=torch_dtype, device=device, keep_fp32=model.kept_in_fp32())
        return model.eval()

    def kept_in_fp32(self) -> frozenset[str]:
        """Names of the parameters and buffers that the capability ``keep_in_fp32`` keeps in float32."""
        keep = self.capabilities.keep_in_fp32
        return keep.tensor_names(self) if keep is not None else frozenset()

    def to_dtype(self, dtype: torch.dtype) -> Self:
        """Cast floating parameters and buffers to ``dtype``, keeping ``keep_in_fp32`` modules in float32.

        ``model.to(dtype)`` casts every tensor, as torch does; use this to cast a model that
        declares modules kept in float32 (Wan's norms, timestep embedder and modulation
        tables) the way ``from_pretrained(torch_dtype=...)`` loads it. Returns the model.
        """
        given = checks.instance(dtype, torch.dtype, "to_dtype's dtype", InputError)
        if not given.is_floating_point:
            raise InputError(f"to_dtype takes a floating-point dtype, got {dtype}")
        kept = self.kept_in_fp32()
        if not kept:
            return self.to(dtype=dtype)
        for owner_name, owner in self.named_modules():
            prefix = f"{owner_name}." if owner_name else ""
            tensors = [*owner.named_parameters(recurse=False), *owner.named_buffers(recurse=False)]
            for name, tensor in tensors:
                if tensor.is_floating_point():
                    target = torch.float32 if prefix + name in kept else dtype
                    if isinstance(tensor, torch.nn.Parameter):
                        tensor.data = tensor.data.to(target)
                    else:
                        setattr(owner, name, tensor.to(target))
        return self

    def save_pretrained(
        self,
        path: str | os.PathLike[str],
        *,
        max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    ) -> Path:
        """Write ``config.json`` and the weights (sharded above ``max_shard_size``) as a diffusers folder.

        The folder is built beside ``path`` and swapped in whole when complete: a failed or
        killed save leaves the old folder as it was, and of concurrent saves one wins whole.
        What a save replaces is ``config.json`` and the diffusers weight files
        (``diffusion_pytorch_model.safetensors``, its shards and index); other files and
        subfolders in ``path`` are kept.

        With LoRA adapters loaded, the folder holds the base model under diffusers names, which
        ``from_pretrained`` loads: adapter layers are left out (a warning names the adapters;
        ``lora.save_adapter`` writes them), and adapters fused with ``lora.fuse`` are in the
        base weights, since that is what the model computes. Parameters an adapter replaced
        or widened in full (control LoRAs) are written as the model holds them, with the
        config that matches them. So the folder computes what this model computes after
        ``lora.disable`` (or, when fused, what it computes now). Quantized weights kept packed
        (a GGUF file's) are written decoded, in each layer's compute dtype: a dense folder.
        """
        folder = Path(path)
        state = self._state_to_save(folder)
        write_weights(state, folder, config=self.config.to_dict(), max_shard_size=max_shard_size)
        return folder

    def _state_to_save(self, folder: Path) -> dict[str, torch.Tensor]:
        """The parameters a model of this config has, under its own names: adapter wrappers seen through."""
        state = self.state_dict()
        for name, layer in packed_linears(self):  # quantized weights kept packed are written decoded
            state[f"{name}.weight"] = layer.dense_weight()
        if not any(_WRAPPED in key for key in state):
            return state
        with on_meta_device():
            expected = type(self)(self.config).state_dict()
        own = {key.replace(_WRAPPED, "."): key for key in state}
        missing = [key for key in expected if key not in own]
        wrong = [key for key in expected if key in own and state[own[key]].shape != expected[key].shape]
        if missing or wrong:
            raise CheckpointError(
                f"cannot be saved in diffusers layout: {len(missing)} parameter(s) missing "
                f"({', '.join(missing[:5])}), {len(wrong)} of another shape ({', '.join(wrong[:5])})",
                path=folder,
            )
        left_out = sorted(set(state) - {own[key] for key in expected})
        if left_out:
            warnings.warn(_adapters_left_out(self, left_out), UserWarning, stacklevel=3)
        return {key: state[own[key]] for key in expected}

    def extra_repr(self) -> str:
        fields: dict[str, Any] = self.config.to_dict()
        return ", ".join(f"{k}={v}" for k, v in fields.items() if not k.startswith("_"))
