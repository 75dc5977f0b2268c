"""``DiffusersView``: a diffcaps model as the transformer a diffusers pipeline expects.

A pipeline reads more from its transformer than ``forward``: ``device`` and ``dtype``, the
config by attribute (``transformer.config.in_channels``), ``cache_context(name)`` around each
denoising pass, ``_reset_stateful_cache()`` after a call, a ``save_pretrained`` that its own
``save_pretrained`` finds through diffusers' ``ModelMixin``. The view is that surface and
nothing else: it holds the model as its only child module (so it shares the model's
parameters and moves and casts with it) and forwards every call to diffcaps' functions.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Generator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, FrozenDict
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin

from diffcaps import cache, casting, checks, lora
from diffcaps.errors import CapabilityError, InteropError
from diffcaps.interop.diffusers import _lora
from diffcaps.interop.diffusers._cache import cache_config
from diffcaps.model import DEFAULT_MAX_SHARD_SIZE, Model
from diffcaps.protocols import supports_cache, supports_layerwise_casting

__all__ = ["DiffusersView", "load_lora_weights", "unwrap", "wrap"]

AnyModel = Model[Any, Any]
"""Any diffcaps model, whatever its config and capabilities classes."""

_ATTENTION_KWARGS = ("joint_attention_kwargs", "attention_kwargs")
"""The forward arguments in which diffusers' pipelines pass per-call attention options
(Flux's name, then Wan's)."""


def _lora_scale(model: AnyModel, scale: float) -> AbstractContextManager[None]:
    """The context in which ``model`` runs its LoRA layers at ``scale`` (``{"scale": s}`` of a pipeline).

    A scale of 1.0 changes nothing. Any other multiplies the active adapters' scales for the call.
    """
    if scale == 1.0:
        return nullcontext()
    return _lora.scaled(model, scale)


class DiffusersView(ModelMixin, ConfigMixin):
    """The object a diffusers pipeline takes as its transformer, over a diffcaps ``model``.

    Build it with :func:`wrap`; :func:`unwrap` gives the model back. Its parameters are the
    model's own (no copy). ``config`` is the model's config as diffusers' ``FrozenDict``,
    read afresh each time, so a feature that changes the config (a control LoRA widening
    ``in_channels``) is seen by the pipeline.
    """

    config_name = "config.json"

    def __init__(self, model: AnyModel) -> None:
        super().__init__()
        self.model = model
        # diffusers' pipelines name a component's library by ``component.__module__`` when they
        # write model_index.json. Where diffusers has a class of the model's name, this names
        # diffusers, whose class loads the folder ``save_pretrained`` writes: the saved pipeline
        # reloads with a plain diffusers install. (Set on the instance: the class stays diffcaps'.)
        object.__setattr__(self, "__module__", _library_of(type(model)))

    @property
    def config(self) -> FrozenDict:
        """The model's config, as diffusers' attribute-readable ``FrozenDict``."""
        return FrozenDict(self.model.config.to_dict())

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the model computes in, which pipelines cast their latents to.

        Layerwise casting's ``compute_dtype`` when one is set, else the dtype of the first
        floating parameter outside the modules kept in float32 (as diffusers' ``ModelMixin.dtype``).
        """
        model: object = self.model
        if supports_layerwise_casting(model):
            config = casting.active(model)
            if config is not None and config.compute_dtype is not None:
                return config.compute_dtype
        kept = self.model.kept_in_fp32()
        floating = [(name, p.dtype) for name, p in self.model.named_parameters() if p.is_floating_point()]
        for name, dtype in floating:
            if name not in kept:
                return dtype
        return floating[0][1] if floating else torch.float32

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the model as diffusers' transformer would: same arguments, ``Transformer2DModelOutput`` or a tuple."""
        return_dict = kwargs.pop("return_dict", True)
        scale = 1.0
        for name in _ATTENTION_KWARGS:
            options: dict[str, Any] | None = kwargs.get(name)
            if options and "scale" in options:
                options = dict(options)
                scale = float(options.pop("scale"))
                kwargs[name] = options
        with _lora_scale(self.model, scale):
            output: tuple[torch.Tensor, ...] = self.model(*args, return_dict=False, **kwargs)
        return Transformer2DModelOutput(sample=output[0]) if return_dict else output

    @contextmanager
    def cache_context(self, name: str, **where: Any) -> Generator[None]:
        """Run inside denoising pass ``name``: diffcaps' ``cache.context`` (the step's ``timestep`` if given)."""
        if not supports_cache(self.model):
            yield
            return
        timestep: float | torch.Tensor | None = where.get("timestep")
        with cache.context(self.model, name, timestep=timestep):
            yield

    def enable_cache(self, config: object) -> None:
        """``diffcaps.cache.enable`` with ``config``, diffusers' cache config or diffcaps' (as diffusers' ``CacheMixin``).

        A diffusers config is read by :func:`~diffcaps.interop.diffusers.cache_config`; a cache
        already on is a :class:`~diffcaps.errors.CacheError` (diffusers: ``ValueError``).
        """
        ours = cache_config(config)
        if not supports_cache(self.model):
            raise CapabilityError(type(self.model).__name__, "cache")
        cache.enable(self.model, ours)

    def disable_cache(self) -> None:
        """``diffcaps.cache.disable``: every forward the model's own again (nothing happens with no cache on)."""
        if supports_cache(self.model):
            cache.disable(self.model)

    @property
    def is_cache_enabled(self) -> bool:
        """Whether a cache is on (``diffcaps.cache.active(model) is not None``)."""
        return supports_cache(self.model) and cache.active(self.model) is not None

    def _reset_stateful_cache(self, recurse: bool = True) -> None:
        """Forget the cache's state (diffusers calls this after every pipeline call)."""
        if supports_cache(self.model):
            cache.reset(self.model)

    def save_pretrained(self, save_directory: str | os.PathLike[str], is_main_process: bool = True,
                        save_function: Callable[..., object] | None = None, safe_serialization: bool = True,
                        variant: str | None = None, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                        push_to_hub: bool = False, use_flashpack: bool = False, **kwargs: Any) -> None:
        """Write the model's diffusers folder (``Model.save_pretrained``): what a pipeline's save calls.

        Options diffcaps does not write (pickle, variants, a custom save function, pushing to
        the hub) are an :class:`~diffcaps.errors.InteropError`, before anything is written.
        """
        refused = {"safe_serialization=False": not safe_serialization, f"variant={variant!r}": variant is not None,
                   "save_function": save_function is not None, "push_to_hub=True": push_to_hub,
                   "use_flashpack=True": use_flashpack,
                   **{f"{key}=": True for key in kwargs}}
        named = [option for option, given in refused.items() if given]
        if named:
            raise InteropError(f"save_pretrained({os.fspath(save_directory)!r}): diffcaps writes safetensors "
                               f"only, without {', '.join(named)}")
        if is_main_process:
            self.model.save_pretrained(save_directory, max_shard_size=max_shard_size)

    # The LoRA calls a pipeline makes on its transformer, served by diffcaps.lora (see _lora.py).
    def load_lora_adapter(self, state_dict: dict[str, torch.Tensor], network_alphas: dict[str, torch.Tensor] | None = None,
                          adapter_name: str | None = None, metadata: dict[str, Any] | None = None,
                          _pipeline: object = None, hotswap: bool = False, **_: Any) -> None:
        """What ``pipe.load_lora_weights`` calls: the adapter is loaded into the diffcaps model."""
        _lora.load_from_pipeline(self.model, state_dict, network_alphas=network_alphas, metadata=metadata,
                                 adapter_name=adapter_name, hotswap=hotswap, pipeline=_pipeline)

    def enable_lora_hotswap(self, target_rank: int = 128, check_compiled: str = "error") -> None:
        """``diffcaps.lora.enable_hotswap(model, max_rank=target_rank)`` (what ``pipe.enable_lora_hotswap`` calls).

        As in diffusers, ``check_compiled`` says what a call after the first adapter does:
        ``"error"`` raises (a ``LoRAError``), ``"warn"`` warns, ``"ignore"`` does nothing; the
        adapters already loaded keep their ranks either way.
        """
        if check_compiled not in ("error", "warn", "ignore"):
            raise InteropError(f"check_compiled must be 'error', 'warn' or 'ignore', got {check_compiled!r}")
        if check_compiled != "error" and lora.list_adapters(self.model):
            if check_compiled == "warn":
                warnings.warn("enable_lora_hotswap after the first adapter changes nothing: call it before "
                              "loading the first adapter", UserWarning, stacklevel=3)
            return
        lora.enable_hotswap(_lora.with_lora(self.model), max_rank=target_rank)

    def set_adapters(self, adapter_names: str | list[str], weights: Any = None) -> None:
        """``diffcaps.lora.set_adapters`` (what ``pipe.set_adapters`` calls)."""
        _lora.set_adapters(self.model, adapter_names, weights)

    def fuse_lora(self, lora_scale: float = 1.0, safe_fusing: bool = False,
                  adapter_names: list[str] | None = None) -> None:
        """``diffcaps.lora.fuse`` (what ``pipe.fuse_lora`` calls)."""
        _lora.fuse(self.model, lora_scale, safe_fusing, adapter_names)

    def unfuse_lora(self) -> None:
        """``diffcaps.lora.unfuse``."""
        _lora.unfuse(self.model)

    def unload_lora(self) -> None:
        """``diffcaps.lora.unload`` (what ``pipe.unload_lora_weights`` calls)."""
        _lora.unload(self.model)

    def delete_adapters(self, adapter_names: str | list[str]) -> None:
        """``diffcaps.lora.delete_adapters`` (what ``pipe.delete_adapters`` calls)."""
        _lora.delete_adapters(self.model, adapter_names)

    def enable_lora(self) -> None:
        """``diffcaps.lora.enable`` (what ``pipe.enable_lora`` calls)."""
        _lora.enable(self.model, True)

    def disable_lora(self) -> None:
        """``diffcaps.lora.disable`` (what ``pipe.disable_lora`` calls)."""
        _lora.enable(self.model, False)

    @property
    def peft_config(self) -> dict[str, Any]:
        """The loaded adapters' peft configs (what ``pipe.get_list_adapters`` reads); absent with none loaded."""
        return _lora.peft_config(self.model)

    def extra_repr(self) -> str:
        return f"a diffusers view of {type(self.model).__name__}"


_VIEW_CLASSES: dict[type[AnyModel], type[DiffusersView]] = {}


def _view_class(model_class: type[AnyModel]) -> type[DiffusersView]:
    """The view class for ``model_class``, named like it: pipelines write that name to model_index.json."""
    known = _VIEW_CLASSES.get(model_class)
    if known is None:

        class View(DiffusersView):
            pass

        View.__name__ = View.__qualname__ = model_class.__name__
        known = _VIEW_CLASSES[model_class] = View
    return known


def _library_of(model_class: type[AnyModel]) -> str:
    import diffusers

    name = model_class.__name__
    counterpart = getattr(diffusers, name, None)
    if isinstance(counterpart, type) and issubclass(counterpart, ModelMixin):
        return "diffusers"
    return DiffusersView.__module__


def wrap(model: Model[Any, Any] | DiffusersView) -> DiffusersView:
    """The object to hand a diffusers pipeline as its transformer: a view sharing ``model``'s parameters.

    ``FluxPipeline.from_pretrained(folder, transformer=wrap(model))`` or
    ``pipe.transformer = wrap(model)``. A view is returned as it is.
    """
    if isinstance(model, DiffusersView):
        return model
    given = checks.instance(model, Model, "wrap's model", InteropError)
    return _view_class(type(given))(given)


def unwrap(view: object) -> AnyModel:
    """The diffcaps model inside a view made by :func:`wrap` (e.g. ``unwrap(pipe.transformer)``)."""
    if not isinstance(view, DiffusersView):
        raise InteropError(f"unwrap takes a view made by diffcaps.interop.diffusers.wrap, got "
                           f"{type(view).__module__}.{type(view).__qualname__}")
    return view.model


def load_lora_weights(pipe: object, source: lora.Source, *, adapter_name: str = "default",
                      strict: bool = True, hotswap: bool = False) -> lora.LoadReport:
    """Load a LoRA file of any format diffcaps reads into the diffcaps model of ``pipe.transformer``.

    The file goes straight to :func:`diffcaps.lora.load_adapter` (diffusers converts nothing),
    so this loads the formats ``pipe.load_lora_weights`` refuses or cannot read. The adapter is
    then seen by the pipeline's ``set_adapters``, ``fuse_lora``, … like any other.
    """
    model = _lora.with_lora(unwrap(getattr(pipe, "transformer", None)))
    return lora.load_adapter(model, source, adapter_name=adapter_name, strict=strict, hotswap=hotswap)
