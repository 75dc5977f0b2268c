"""Named state contexts: a "cond" and an "uncond" pass through the same hooks keep separate state.

Hooks that belong together share one :class:`StateContext`; each hook keeps its state in a
:class:`ContextualState`, which holds one state object per context name and hands out the
one for the context that is active. Switching context is one attribute write, whatever the
number of hooks.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from contextlib import contextmanager
from typing import Generic, TypeVar, cast, final

from diffcaps.errors import ContextError

__all__ = ["ContextualState", "StateContext"]

S = TypeVar("S", covariant=True)  # states are only handed out, never taken in


@final
class StateContext:
    """Which named context is active for the hooks that share this object.

    ``default`` is used when no context is active; with ``default=None`` a hook that asks for
    its state outside :meth:`use` gets a :class:`~diffcaps.errors.ContextError` whose message
    ends with ``hint`` (say how to open a context).
    """

    __slots__ = ("active", "default", "hint")

    def __init__(self, *, default: str | None = None, hint: str = "") -> None:
        self.active: str | None = None
        """The context opened by :meth:`use` (or :meth:`swap`), ``None`` outside one."""
        self.default = default
        self.hint = hint

    @property
    def current(self) -> str:
        """The context states are read from: the active one, else ``default``."""
        name = self.active if self.active is not None else self.default
        if name is None:
            hint = f": {self.hint}" if self.hint else ""
            raise ContextError(f"these hooks keep separate state per named context and none is active{hint}")
        return name

    def swap(self, name: str | None) -> str | None:
        """Make ``name`` the active context (``None``: none) and return the one it replaces."""
        given = cast(object, name)  # callers may ignore the annotation
        if given is not None and not (isinstance(given, str) and given):
            raise ContextError(f"a context name must be a non-empty string, got {given!r} ({type(given).__name__})")
        outer, self.active = self.active, name
        return outer

    @contextmanager
    def use(self, name: str) -> Generator[None]:
        """Make ``name`` the active context inside the ``with`` block (nesting restores the outer one)."""
        outer = self.swap(name)
        try:
            yield
        finally:
            self.active = outer


@final
class ContextualState(Generic[S]):
    """One state object per context name, made by ``factory`` on first use in that context."""

    __slots__ = ("_context", "_factory", "_states")

    def __init__(self, factory: Callable[[], S], context: StateContext) -> None:
        self._factory = factory
        self._context = context
        self._states: dict[str, S] = {}

    @property
    def context(self) -> StateContext:
        """The shared context this state follows."""
        return self._context

    def get(self) -> S:
        """The state of the current context (made now if this context has none yet)."""
        name = self._context.active  # read directly: this runs on every hooked call
        if name is None:
            name = self._context.current
        state = self._states.get(name)
        if state is None:
            state = self._states[name] = self._factory()
        return state

    def items(self) -> tuple[tuple[str, S], ...]:
        """(context name, state) for every context that has state, in order of first use."""
        return tuple(self._states.items())

    def names(self) -> tuple[str, ...]:
        """The contexts that have state, in order of first use."""
        return tuple(self._states)

    def reset(self) -> None:
        """Drop the state of every context."""
        self._states.clear()
