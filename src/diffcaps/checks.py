"""Argument checks that configs and feature functions share; each failure raises the caller's error.

A config of one feature raises that feature's error (``CacheError``, ``OffloadError``, …), so
every check takes the error class to raise and the name of what is checked. Values come in
as ``object``: these run exactly where a caller may have ignored the annotations.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import TypeVar

__all__ = ["choices", "flag", "instance", "integer", "name", "number", "patterns"]

_T = TypeVar("_T")

ErrorType = Callable[[str], Exception]
"""An exception class that takes the message (every ``diffcaps.errors`` class but ``CapabilityError``)."""


def _shown(value: object) -> str:
    return f"{value!r} ({type(value).__name__})"


def instance(value: object, kind: type[_T], what: str, error: ErrorType) -> _T:
    """``value`` if it is a ``kind``, else ``error`` naming what was expected."""
    if not isinstance(value, kind):
        raise error(f"{what} must be a {kind.__name__}, got {_shown(value)}")
    return value


def flag(value: object, what: str, error: ErrorType) -> bool:
    """``value`` if it is ``True`` or ``False`` (not 0, 1 or a string)."""
    if not isinstance(value, bool):
        raise error(f"{what} must be True or False, got {_shown(value)}")
    return value


def name(value: object, what: str, error: ErrorType, *, forbidden: str = "") -> str:
    """``value`` if it is a non-empty string holding none of the characters in ``forbidden``."""
    if not isinstance(value, str) or not value:
        raise error(f"{what} must be a non-empty string, got {_shown(value)}")
    bad = sorted({c for c in value if c in forbidden})
    if bad:
        raise error(f"{what} must not contain {' or '.join(map(repr, bad))}, got {value!r}")
    return value


def integer(value: object, what: str, error: ErrorType, *, minimum: int | None = None) -> int:
    """``value`` if it is an int (not a bool, not a float) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        bound = "" if minimum is None else f" >= {minimum}"
        raise error(f"{what} must be an integer{bound}, got {_shown(value)}")
    if minimum is not None and value < minimum:
        raise error(f"{what} must be an integer >= {minimum}, got {value}")
    return value


def number(value: object, what: str, error: ErrorType, *, minimum: float | None = None) -> float:
    """``value`` as a float if it is a finite int or float (not a bool) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise error(f"{what} must be a finite number, got {_shown(value)}")
    if minimum is not None and value < minimum:
        raise error(f"{what} must be a finite number >= {minimum}, got {value}")
    return float(value)


def patterns(value: object, what: str, error: ErrorType, *, single: bool = False) -> tuple[str, ...]:
    """A sequence of regular expressions as a tuple, each compiled once to check it.

    With ``single``, one string stands for a sequence of one; otherwise a bare string is refused
    (it would be read character by character).
    """
    if isinstance(value, str):
        if not single:
            raise error(f"{what} must be a list of regular expressions, got the string {value!r}")
        items: tuple[object, ...] = (value,)
    elif isinstance(value, Sequence):
        items = tuple(value)  # checked item by item below
    else:
        raise error(f"{what} must be a list of regular expressions, got {_shown(value)}")
    checked: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise error(f"{what} entry {item!r} is not a string (a regular expression)")
        try:
            re.compile(item)
        except re.error as exc:
            raise error(f"{what} entry {item!r} is not a regular expression ({exc})") from None
        checked.append(item)
    return tuple(checked)


def choices(value: object, allowed: tuple[_T, ...], what: str, error: ErrorType) -> tuple[_T, ...]:
    """A non-empty list or tuple of names from ``allowed``, as a tuple in ``allowed``'s order."""
    items = tuple(value) if isinstance(value, tuple | list) else ()
    if not items:
        raise error(f"{what} must be a non-empty tuple of names, got {_shown(value)}")
    unknown = [item for item in items if item not in allowed]
    if unknown:
        raise error(f"unknown {what} {unknown!r}; there are {', '.join(map(str, allowed))}")
    return tuple(item for item in allowed if item in items)
