"""The hooks on one module, and the functions that add, find, reset and remove them.

A module with hooks gets an instance attribute ``forward`` that runs the chain; the class's
``forward`` is never touched. When the last hook is removed the instance attribute is
deleted again (or the one that was there before is put back), so the module is exactly as
it was.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any, Final, TypeVar, cast, final, overload

from torch import nn

from diffcaps.errors import HookError
from diffcaps.hooks._hook import Forward, Hook, wrap
from diffcaps.slots import InstanceSlot

__all__ = ["add_hook", "get_hook", "hook_names", "hooked_modules", "remove_hook", "reset_hooks"]

_MISSING: Final = object()

H = TypeVar("H", bound=Hook)


@final
class HookRegistry:
    """The named hooks on one module, innermost first; it owns the module's ``forward`` attribute."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.hooks: dict[str, Hook] = {}
        self._saved: object = module.__dict__.get("forward", _MISSING)
        self._installed: Forward | None = None

    def add(self, name: str, hook: Hook) -> None:
        if name in self.hooks:
            raise HookError(f"{type(self.module).__name__} already has a hook named {name!r}; remove it first")
        self._check_untouched()
        hook.attach(self.module)
        self.hooks[name] = hook
        # innermost first: by order, then by when added (sorted is stable)
        self.hooks = dict(sorted(self.hooks.items(), key=lambda item: item[1].order))
        self._rebuild()

    def remove(self, name: str) -> Hook:
        hook = self.hooks.get(name)
        if hook is None:
            raise HookError(
                f"{type(self.module).__name__} has no hook named {name!r} (hooks: {', '.join(self.hooks) or 'none'})"
            )
        self._check_untouched()
        del self.hooks[name]
        self._rebuild()
        hook.detach(self.module)
        return hook

    def _check_untouched(self) -> None:
        current = self.module.__dict__.get("forward", _MISSING)
        expected = self._installed if self._installed is not None else self._saved
        if current is not expected:
            raise HookError(
                f"{type(self.module).__name__}.forward was replaced by something else after hooks were added; "
                "remove that wrapper first so the original forward can be restored"
            )

    def _original(self) -> Forward:
        saved = self._saved
        if saved is not _MISSING and callable(saved):
            return cast(Forward, saved)
        bound: Forward = type(self.module).forward.__get__(self.module)
        return bound

    def _rebuild(self) -> None:
        if not self.hooks:
            if self._saved is _MISSING:
                del self.module.__dict__["forward"]
            else:
                self.module.__dict__["forward"] = self._saved
            _SLOT.clear(self.module)
            self._installed = None
            return
        original = self._original()
        chain = original
        for hook in self.hooks.values():
            chain = wrap(hook, self.module, chain)
        if chain is original:  # no hook overrides a step
            chain = _forwarding(chain)
        # ``chain`` is a closure made just now: it takes the original's name and signature.
        installed = functools.update_wrapper(chain, original)
        self.module.__dict__["forward"] = installed
        self._installed = installed


def _forwarding(chain: Forward) -> Forward:
    def forward(*args: Any, **kwargs: Any) -> Any:
        return chain(*args, **kwargs)
    return forward


_SLOT: Final = InstanceSlot("hooks", HookRegistry)


def _registry(module: nn.Module) -> HookRegistry | None:
    return _SLOT.get(module)


def add_hook(module: nn.Module, name: str, hook: Hook) -> None:
    """Wrap ``module.forward`` with ``hook`` under ``name``.

    A hook of higher :attr:`Hook.order` runs outside one of lower order; among equal orders,
    later hooks run outside earlier ones.
    """
    registry = _registry(module)
    if registry is None:
        registry = HookRegistry(module)
        _SLOT.set(module, registry)
    try:
        registry.add(name, hook)
    except BaseException:
        if not registry.hooks:
            _SLOT.clear(module)
        raise


def remove_hook(module: nn.Module, name: str) -> Hook:
    """Remove the hook named ``name`` from ``module`` and return it; the last removal restores ``forward``."""
    registry = _registry(module)
    if registry is None:
        raise HookError(f"{type(module).__name__} has no hooks (looked for {name!r})")
    return registry.remove(name)


@overload
def get_hook(module: nn.Module, name: str) -> Hook | None: ...
@overload
def get_hook(module: nn.Module, name: str, kind: type[H]) -> H | None: ...
def get_hook(module: nn.Module, name: str, kind: type[Hook] = Hook) -> Hook | None:
    """The hook named ``name`` on ``module`` (``None`` if absent); ``kind`` checks its class."""
    registry = _registry(module)
    hook = None if registry is None else registry.hooks.get(name)
    if hook is not None and not isinstance(hook, kind):
        raise HookError(f"hook {name!r} on {type(module).__name__} is a {type(hook).__name__}, not a {kind.__name__}")
    return hook


def hook_names(module: nn.Module) -> tuple[str, ...]:
    """The names of ``module``'s hooks, innermost first (the nesting order, see :func:`add_hook`)."""
    registry = _registry(module)
    return () if registry is None else tuple(registry.hooks)


def hooked_modules(root: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(qualified name, module) for every module under ``root`` (``root`` itself is ``""``) with hooks."""
    for name, module in root.named_modules(remove_duplicate=True):
        if _registry(module) is not None:
            yield name, module


def reset_hooks(root: nn.Module) -> None:
    """Call ``reset()`` on every hook on ``root`` and the modules under it."""
    for _, module in hooked_modules(root):
        registry = _registry(module)
        assert registry is not None
        for hook in registry.hooks.values():
            hook.reset()
