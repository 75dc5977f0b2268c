"""The context-parallel plan: which inputs are split (the model's own, or a submodule's inputs or
outputs inside it), which outputs are gathered, which modules are attention.

A model folder declares a :class:`ContextParallelPlan` in ``Capabilities.context_parallel``; the
functions of :mod:`diffcaps.parallel` apply it to any model from this data alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, final

import attrs
from torch import Tensor

from diffcaps.services import ModuleTypes

__all__ = ["ContextParallelPlan", "GatherOutput", "SplitAt", "SplitInput", "module_paths"]


def _check_dim(instance: Any, _: attrs.Attribute[int], value: int) -> None:
    if not 0 <= value < instance.ndim:
        raise ValueError(f"{type(instance).__name__}: dim must be in [0, ndim={instance.ndim}), got {value}")


def _axis(what: str, dim: int, ndim: int, tensor: Tensor) -> int:
    if tensor.ndim < ndim:
        raise ValueError(f"{what} has {tensor.ndim} dimension(s) {tuple(tensor.shape)}; at least {ndim} expected")
    return tensor.ndim - ndim + dim


@final
@attrs.frozen(kw_only=True)
class SplitInput:
    """A forward input split across ranks along ``dim`` of its usual ``ndim`` dimensions.

    A tensor with extra leading dimensions is split at the same dimension counted from the end
    (ids given as ``[1, tokens, 3]`` instead of ``[tokens, 3]``); a list or tuple of tensors is
    split tensor by tensor; ``None`` is passed on as it is. With ``optional``, a tensor of
    fewer than ``ndim`` dimensions is passed on whole (a per-sample timestep embedding where a
    per-token one, which is split, may also come); otherwise it is an error.

    ``stream`` names the token sequence the input belongs to (default: the input's own name).
    Inputs of one stream hold the same tokens (Flux's ``img_ids`` label ``hidden_states``'
    tokens), so they must have the same length; the attention sequences inside the model are
    made of whole streams.
    """

    ndim: int = attrs.field(validator=attrs.validators.ge(1))
    dim: int = attrs.field(validator=_check_dim)
    stream: str | None = None
    optional: bool = False

    def axis(self, name: str, tensor: Tensor) -> int | None:
        """The dimension of ``tensor`` (the input called ``name``) that is split; ``None``: pass it whole."""
        if self.optional and tensor.ndim < self.ndim:
            return None
        return _axis(f"input {name!r}", self.dim, self.ndim, tensor)


@final
@attrs.frozen(kw_only=True)
class GatherOutput:
    """A submodule's output gathered from all ranks along ``dim`` of its ``ndim`` dimensions."""

    ndim: int = attrs.field(validator=attrs.validators.ge(1))
    dim: int = attrs.field(validator=_check_dim)

    def axis(self, name: str, tensor: Tensor) -> int:
        """The dimension of ``tensor`` (the output of ``name``) that is gathered."""
        return _axis(f"the output of {name!r}", self.dim, self.ndim, tensor)


def _frozen_inputs(value: Mapping[str, SplitInput]) -> Mapping[str, SplitInput]:
    return MappingProxyType(dict(value))


def _frozen_inside(value: Mapping[str, SplitAt]) -> Mapping[str, SplitAt]:
    return MappingProxyType(dict(value))


def _check_path(_: Any, attribute: attrs.Attribute[Mapping[str, Any]], value: Mapping[str, Any]) -> None:
    for path in value:
        if not path or any(not part for part in path.split(".")):
            raise ValueError(f"ContextParallelPlan.{attribute.name} keys must be dotted submodule paths, got {path!r}")


@final
@attrs.frozen(kw_only=True)
class SplitAt:
    """A split inside the model, at one submodule: its forward arguments and/or its output.

    - ``inputs``: the submodule's forward parameter name → how that argument is split, before
      the submodule runs (Wan's first block's ``hidden_states``: the tokens exist only after
      the patch embedding).
    - ``output``: how the submodule's output is split after it ran; a tuple or list output is
      split element by element (Wan's ``rope`` returns ``(cos, sin)``, one row per token).
    """

    inputs: Mapping[str, SplitInput] = attrs.field(factory=dict, converter=_frozen_inputs)
    output: SplitInput | None = None

    def __attrs_post_init__(self) -> None:
        if not self.inputs and self.output is None:
            raise ValueError("SplitAt must split at least one input or the output")
        for name in self.inputs:
            if not name:
                raise ValueError(f"SplitAt.inputs keys must be non-empty parameter names, got {name!r}")


def module_paths(pattern: str, names: list[str]) -> list[str]:
    """The names of ``names`` (dotted submodule paths) that ``pattern`` matches, in order.

    ``pattern`` is a dotted path whose components are names or ``*``, which matches any one
    component: ``blocks.*`` is every block of the list ``blocks``, ``blocks.0`` the first.
    """
    parts = pattern.split(".")
    found = []
    for name in names:
        components = name.split(".") if name else []
        if len(components) == len(parts) and all(p in ("*", c) for p, c in zip(parts, components, strict=True)):
            found.append(name)
    return found


def _frozen_outputs(value: Mapping[str, GatherOutput]) -> Mapping[str, GatherOutput]:
    return MappingProxyType(dict(value))


def _non_empty(instance: Any, attribute: attrs.Attribute[Mapping[str, Any]], value: Mapping[str, Any]) -> None:
    if not value and not (attribute.name == "inputs" and instance.inside):
        hint = " (or split inside the model)" if attribute.name == "inputs" else ""
        raise ValueError(f"ContextParallelPlan.{attribute.name} must name at least one entry{hint}")
    for name in value:
        if not name:
            raise ValueError(f"ContextParallelPlan.{attribute.name} keys must be non-empty strings, got {name!r}")


@final
@attrs.frozen(kw_only=True)
class ContextParallelPlan:
    """How a model's sequence is split across ranks and gathered back.

    - ``inputs``: the model's forward parameter name → how that input is split (every rank
      computes on its own slice of it, e.g. its own RoPE frequencies from its own position ids).
    - ``inside``: submodule path → :class:`SplitAt`, splits inside the model, at a submodule's
      inputs or output; a path component ``*`` matches any one name (``blocks.*``: every
      block). Each pattern must match at least one submodule. ``inputs`` may be empty when
      ``inside`` splits the sequence.
    - ``outputs``: dotted submodule name → how its output is gathered (all ranks get the whole).
    - ``attention``: the attention module classes. Each attends through a method named
      ``kernel`` taking ``(query, key, value)`` on [batch, seq, heads, head_dim] tensors of the
      (split) joint sequence; context parallelism replaces that method on each instance with
      the distributed algorithm, and deletes the replacement to restore the model.
    """

    inputs: Mapping[str, SplitInput] = attrs.field(factory=dict, converter=_frozen_inputs, validator=_non_empty)
    inside: Mapping[str, SplitAt] = attrs.field(factory=dict, converter=_frozen_inside, validator=_check_path)
    outputs: Mapping[str, GatherOutput] = attrs.field(converter=_frozen_outputs, validator=_non_empty)
    attention: ModuleTypes = attrs.field(validator=attrs.validators.instance_of(ModuleTypes))
    kernel: str = attrs.field(default="kernel", validator=attrs.validators.min_len(1))

    def entries(self) -> tuple[str, ...]:
        """The algorithms, ``split name@dim`` per input, ``split module:name@dim`` / ``split module output@dim``
        inside the model, ``gather module@dim`` per output, the attention classes."""
        split = tuple(f"split {name}@{s.dim}" for name, s in self.inputs.items())
        for path, at in self.inside.items():
            split += tuple(f"split {path}:{name}@{s.dim}" for name, s in at.inputs.items())
            if at.output is not None:
                split += (f"split {path} output@{at.output.dim}",)
        gathered = tuple(f"gather {name}@{g.dim}" for name, g in self.outputs.items())
        attention = tuple(f"attention {name}" for name in self.attention.entries())
        return ("ulysses", "ring", *split, *gathered, *attention)
