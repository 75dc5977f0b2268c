"""``eager``: keep a hook's host-side bookkeeping out of ``torch.compile`` graphs, for free outside them."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import torch

__all__ = ["eager"]

P = ParamSpec("P")
R = TypeVar("R")


def eager(function: Callable[P, R]) -> Callable[P, R]:
    """``function``, run by the interpreter even when a compiled model calls it.

    Under ``torch.compile`` the call goes through ``torch.compiler.disable`` (a graph break
    there, so counters and data-dependent decisions are not traced or guarded on); outside
    compilation it is a plain call, without the cost of the disable wrapper.
    """
    disabled: list[Callable[P, R]] = []  # made on first use: torch.compiler.disable imports dynamo (~1.5 s)

    @functools.wraps(function)
    def call(*args: P.args, **kwargs: P.kwargs) -> R:
        if torch.compiler.is_dynamo_compiling():
            if not disabled:
                disabled.append(torch.compiler.disable(function))  # type: ignore[no-untyped-call]  # untyped in torch
            return disabled[0](*args, **kwargs)
        return function(*args, **kwargs)
    return call
