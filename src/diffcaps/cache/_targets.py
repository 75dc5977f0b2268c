"""What the caches see of a model: its block lists, how blocks are called, its attention modules."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Final, TypeAlias, final

import attrs
import torch
from torch import Tensor, nn

from diffcaps.cache._service import ENCODER_HIDDEN_STATES, HIDDEN_STATES, BlockList, CacheSupport
from diffcaps.cache._stats import MODEL_GROUP
from diffcaps.errors import CacheError
from diffcaps.hooks import Hook

__all__ = ["BlockIO", "HookPlacement", "ResolvedList", "attention_modules", "batch_size", "block_lists", "group_of", "submodule"]

HookPlacement: TypeAlias = tuple[nn.Module, str, Hook]
"""A hook to add: the module, the hook name, the hook."""

_POSITIONAL: Final = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def submodule(model: nn.Module, path: str, *, what: str) -> nn.Module:
    """``model``'s submodule at dotted ``path``, or a ``CacheError`` naming ``what`` declared it."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise CacheError(f"{type(model).__name__} has no submodule {path!r} ({what})") from None


def _parameter_position(block: nn.Module, name: str, path: str) -> int | None:
    forward: Callable[..., Any] = type(block).forward
    parameters = list(inspect.signature(forward).parameters.values())[1:]  # drop ``self``
    for position, parameter in enumerate(parameters):
        if parameter.name == name:
            return position if parameter.kind in _POSITIONAL else None
    names = ", ".join(p.name for p in parameters)
    raise CacheError(f"CacheSupport declares that {path} blocks take {name!r}, but "
                     f"{type(block).__name__}.forward takes ({names})")


@final
class BlockIO:
    """Reads a block's hidden-state arguments and splits/builds its output, as its ``BlockList`` says."""

    __slots__ = ("_enc_name", "_enc_position", "_hs_name", "_hs_position", "_size", "enc_out", "hs_out")

    def __init__(self, declared: BlockList, block: nn.Module) -> None:
        self._hs_name = declared.hidden_states
        self._hs_position = _parameter_position(block, declared.hidden_states, declared.path)
        self._enc_name = declared.encoder_hidden_states
        self._enc_position = (None if declared.encoder_hidden_states is None
                              else _parameter_position(block, declared.encoder_hidden_states, declared.path))
        self._size = len(declared.outputs) if declared.returns_tuple else 0
        self.hs_out = declared.index(HIDDEN_STATES)
        self.enc_out = declared.index(ENCODER_HIDDEN_STATES)
        if self.enc_out is not None and self._enc_name is None:
            raise CacheError(f"CacheSupport: {declared.path} blocks return encoder_hidden_states but no "
                             "encoder_hidden_states argument is declared")

    @staticmethod
    def _argument(args: tuple[Any, ...], kwargs: dict[str, Any], name: str, position: int | None) -> Tensor:
        if name in kwargs:
            value: Tensor = kwargs[name]
            return value
        if position is not None and position < len(args):
            positional: Tensor = args[position]
            return positional
        raise CacheError(f"a cached block was called without its {name!r} argument")

    def hidden(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
        """The hidden-states argument of a call."""
        return self._argument(args, kwargs, self._hs_name, self._hs_position)

    def encoder(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor | None:
        """The encoder-hidden-states argument of a call (``None`` if the block takes none)."""
        if self._enc_name is None:
            return None
        return self._argument(args, kwargs, self._enc_name, self._enc_position)

    def split(self, output: Any) -> tuple[Tensor, Tensor | None]:
        """(hidden_states, encoder_hidden_states or None) from a block's output."""
        if not self._size:
            hidden: Tensor = output
            return hidden, None
        assert self.hs_out is not None
        encoder = None if self.enc_out is None else output[self.enc_out]
        return output[self.hs_out], encoder

    def join(self, hidden: Tensor, encoder: Tensor | None) -> Any:
        """A block output holding ``hidden`` (and ``encoder`` where the block returns it)."""
        if not self._size:
            return hidden
        items: list[Tensor | None] = [None] * self._size
        assert self.hs_out is not None
        items[self.hs_out] = hidden
        if self.enc_out is not None:
            items[self.enc_out] = encoder
        return tuple(items)


@attrs.frozen
class ResolvedList:
    """A declared block list found on the model: its path and blocks."""

    declared: BlockList
    blocks: tuple[nn.Module, ...]

    @property
    def path(self) -> str:
        """The list's dotted path (its stats group)."""
        return self.declared.path


def block_lists(model: nn.Module, support: CacheSupport) -> tuple[ResolvedList, ...]:
    """The model's declared block lists, each checked to be an ``nn.ModuleList``."""
    found = []
    for declared in support.blocks:
        module = submodule(model, declared.path, what="declared as a block list in its CacheSupport")
        if not isinstance(module, nn.ModuleList):
            raise CacheError(f"{type(model).__name__}.{declared.path} is a {type(module).__name__}, "
                             "but its CacheSupport declares it as a block list (an nn.ModuleList)")
        found.append(ResolvedList(declared, tuple(module)))
    return tuple(found)


def attention_modules(model: nn.Module, support: CacheSupport) -> list[tuple[str, nn.Module, bool]]:
    """(name, module, is_cross_attention) for every declared attention module, in model order."""
    if support.attention is None:
        return []
    found = []
    for name, module in model.named_modules():
        if support.attention.matches(module):
            cross = support.cross_attention is not None and support.cross_attention.matches(module)
            found.append((name, module, cross))
    return found


def group_of(support: CacheSupport, name: str) -> str:
    """The stats group of the module called ``name``: its block list's path, or ``"model"``."""
    for declared in support.blocks:
        if name == declared.path or name.startswith(declared.path + "."):
            return declared.path
    return MODEL_GROUP


def batch_size(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    """The batch size of a call: the leading size of its first tensor argument."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return int(value.size(0))
    raise CacheError("a cached module was called without a tensor argument")
