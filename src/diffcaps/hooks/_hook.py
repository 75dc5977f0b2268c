"""``Hook``: one named step wrapped around a module's forward."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, ClassVar, Final

from torch import nn

__all__ = ["Forward", "Hook", "SHARDING"]

Forward = Callable[..., Any]
"""A forward callable: the module's own forward, or the rest of a hook chain."""

SHARDING: Final = 100
"""The :attr:`Hook.order` of hooks that split a call's data into one rank's shard or gather it
back: they wrap every feature hook of the default order 0 on the same module."""


class Hook:
    """A step around a module's forward; subclass it and override what you need.

    - ``pre_forward(module, args, kwargs)`` rewrites the arguments before the call.
    - ``new_forward(module, forward, /, *args, **kwargs)`` replaces the call: ``forward`` is
      the rest of the chain (the next hook, or the module's original forward), and a hook
      that skips work simply does not call it.
    - ``post_forward(module, output)`` rewrites the output.
    - ``reset()`` drops whatever state the hook keeps between calls.
    - ``attach(module)`` / ``detach(module)`` run when the hook is added / removed.

    The registry builds each module's chain from the steps a hook class overrides, so a
    hook that only overrides ``new_forward`` costs one Python call per forward.

    Hooks on one module nest by ``order``: a hook of higher order wraps every hook of lower
    order, whenever either was added; among equal orders a later hook wraps the earlier ones.
    """

    order: ClassVar[int] = 0
    """Nesting rank on a module (see above). Features' hooks use 0; a hook that changes which part
    of the data the call holds (context parallelism's splits and gathers, :data:`SHARDING`) uses a
    higher one, so every other hook sees the same side of it whichever feature was enabled first."""

    def pre_forward(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The arguments the rest of the chain is called with."""
        return args, kwargs

    def new_forward(self, module: nn.Module, forward: Forward, /, *args: Any, **kwargs: Any) -> Any:
        """The output of the call; the default calls the rest of the chain."""
        return forward(*args, **kwargs)

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        """The output returned to the caller."""
        return output

    def reset(self) -> None:
        """Forget the state kept between calls (no-op for a stateless hook)."""

    def attach(self, module: nn.Module) -> None:
        """Called once when the hook is added to ``module``."""

    def detach(self, module: nn.Module) -> None:
        """Called once when the hook is removed from ``module``."""


def overrides(hook: Hook, step: str) -> bool:
    """Whether ``hook``'s class overrides the base ``Hook`` step named ``step``."""
    return getattr(type(hook), step) is not getattr(Hook, step)


def wrap(hook: Hook, module: nn.Module, inner: Forward) -> Forward:
    """``inner`` with ``hook``'s overridden steps around it (the fewest calls possible)."""
    pre, new, post = (overrides(hook, step) for step in ("pre_forward", "new_forward", "post_forward"))
    if new:
        core: Forward = _bind_new(hook, module, inner)
    else:
        core = inner
    if not pre and not post:
        return core
    if pre and post:
        def pre_and_post(*args: Any, **kwargs: Any) -> Any:
            args, kwargs = hook.pre_forward(module, args, kwargs)
            return hook.post_forward(module, core(*args, **kwargs))
        return pre_and_post
    if pre:
        def pre_only(*args: Any, **kwargs: Any) -> Any:
            args, kwargs = hook.pre_forward(module, args, kwargs)
            return core(*args, **kwargs)
        return pre_only

    def post_only(*args: Any, **kwargs: Any) -> Any:
        return hook.post_forward(module, core(*args, **kwargs))
    return post_only


def _bind_new(hook: Hook, module: nn.Module, inner: Forward) -> Forward:
    # a partial is called from C: the replace step costs one Python call, its own
    return functools.partial(hook.new_forward, module, inner)
