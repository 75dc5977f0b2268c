"""The generic hook mechanism: named pre/post/replace steps, exact removal, per-context state."""

from __future__ import annotations

import inspect
import re
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import diffcaps.hooks
from diffcaps.errors import ContextError, HookError
from diffcaps.hooks import (
    ContextualState,
    Forward,
    Hook,
    StateContext,
    add_hook,
    eager,
    get_hook,
    hook_names,
    hooked_modules,
    remove_hook,
    reset_hooks,
)


class Scale(nn.Module):
    def forward(self, x: Tensor, *, factor: float = 2.0) -> Tensor:
        return x * factor


class AddBefore(Hook):
    def __init__(self, value: float) -> None:
        self.value = value

    def pre_forward(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (args[0] + self.value,), kwargs


class AddAfter(Hook):
    def __init__(self, value: float) -> None:
        self.value = value

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        return output + self.value


class Memo(Hook):
    """Replaces the call: computes once per context, then returns the remembered output."""

    def __init__(self, context: StateContext) -> None:
        self.state: ContextualState[list[Tensor]] = ContextualState(list, context)
        self.attached: list[nn.Module] = []
        self.detached: list[nn.Module] = []

    def new_forward(self, module: nn.Module, forward: Forward, /, *args: Any, **kwargs: Any) -> Any:
        remembered = self.state.get()
        if not remembered:
            remembered.append(forward(*args, **kwargs))
        return remembered[0]

    def reset(self) -> None:
        self.state.reset()

    def attach(self, module: nn.Module) -> None:
        self.attached.append(module)

    def detach(self, module: nn.Module) -> None:
        self.detached.append(module)


def _is_pristine(module: nn.Module) -> bool:
    return "forward" not in module.__dict__ and "_diffcaps_hooks" not in module.__dict__ \
        and module.forward.__func__ is type(module).forward  # type: ignore[attr-defined]


def test_steps_compose_later_hooks_outside() -> None:
    module = Scale()
    x = torch.ones(2)
    add_hook(module, "before", AddBefore(1.0))  # (x + 1) * 2
    add_hook(module, "after", AddAfter(10.0))  # ... + 10
    assert torch.equal(module(x), (x + 1) * 2 + 10)
    assert torch.equal(module(x, factor=3.0), (x + 1) * 3 + 10)
    assert hook_names(module) == ("before", "after")


def test_removing_every_hook_restores_the_forward_exactly() -> None:
    module = Scale()
    signature = inspect.signature(module.forward)
    add_hook(module, "a", AddBefore(1.0))
    add_hook(module, "b", AddAfter(1.0))
    assert not _is_pristine(module)
    assert inspect.signature(module.forward) == signature  # tools that inspect forward still see its parameters
    remove_hook(module, "a")
    assert torch.equal(module(torch.ones(1)), torch.full((1,), 3.0))  # "b" still runs, alone
    remove_hook(module, "b")
    assert _is_pristine(module)
    assert list(hooked_modules(module)) == []


def test_an_instance_forward_that_was_there_before_is_put_back() -> None:
    module = Scale()

    def custom(x: Tensor) -> Tensor:
        return x - 1

    setattr(module, "forward", custom)  # an instance-level forward, as some libraries install
    add_hook(module, "after", AddAfter(5.0))
    assert torch.equal(module(torch.zeros(1)), torch.full((1,), 4.0))
    remove_hook(module, "after")
    assert module.__dict__["forward"] is custom


def test_a_forward_replaced_behind_the_registry_is_reported() -> None:
    module = Scale()
    add_hook(module, "a", AddAfter(1.0))
    setattr(module, "forward", lambda x: x)
    with pytest.raises(HookError, match="replaced by something else"):
        remove_hook(module, "a")


def test_names_are_unique_and_must_exist() -> None:
    module = Scale()
    with pytest.raises(HookError, match="has no hooks"):
        remove_hook(module, "missing")
    add_hook(module, "a", AddAfter(1.0))
    with pytest.raises(HookError, match="already has a hook named 'a'"):
        add_hook(module, "a", AddAfter(2.0))
    with pytest.raises(HookError, match=r"no hook named 'b' \(hooks: a\)"):
        remove_hook(module, "b")


def test_get_hook_checks_the_class() -> None:
    module = Scale()
    hook = AddAfter(1.0)
    add_hook(module, "a", hook)
    assert get_hook(module, "a") is hook
    assert get_hook(module, "a", AddAfter) is hook
    assert get_hook(module, "b") is None
    with pytest.raises(HookError, match="not a AddBefore"):
        get_hook(module, "a", AddBefore)


def test_replace_step_state_contexts_and_reset() -> None:
    model = nn.Sequential(Scale(), Scale())
    context = StateContext(hint="open one with context.use(name)")
    memo = Memo(context)
    add_hook(model[1], "memo", memo)
    assert memo.attached == [model[1]]

    with pytest.raises(ContextError, match="open one with context.use"):
        model(torch.ones(1))
    with context.use("cond"):
        assert torch.equal(model(torch.ones(1)), torch.full((1,), 4.0))
        assert torch.equal(model(torch.full((1,), 5.0)), torch.full((1,), 4.0))  # remembered, inner not called
        with context.use("uncond"):
            assert torch.equal(model(torch.full((1,), 5.0)), torch.full((1,), 20.0))  # its own state
        assert context.active == "cond"  # nesting restores the outer context
    assert context.active is None
    assert memo.state.names() == ("cond", "uncond")

    reset_hooks(model)
    assert memo.state.names() == ()
    with context.use("cond"):
        assert torch.equal(model(torch.full((1,), 5.0)), torch.full((1,), 20.0))
    assert [name for name, _ in hooked_modules(model)] == ["1"]
    remove_hook(model[1], "memo")
    assert memo.detached == [model[1]]
    assert _is_pristine(model[1])


def test_a_default_context_makes_contexts_optional() -> None:
    context = StateContext(default="default")
    state: ContextualState[dict[str, int]] = ContextualState(dict, context)
    state.get()["n"] = 1
    with context.use("other"):
        assert state.get() == {}
    assert state.get() == {"n": 1}
    assert state.context is context
    for bad in ("", ["cond"], 0):
        with pytest.raises(ContextError, match=f"non-empty string, got {re.escape(repr(bad))}"):
            with context.use(bad):  # type: ignore[arg-type]
                pass
    assert context.active is None and state.get() == {"n": 1}


def test_a_hook_that_overrides_nothing_is_transparent() -> None:
    module = Scale()
    add_hook(module, "noop", Hook())
    assert torch.equal(module(torch.ones(1)), torch.full((1,), 2.0))
    remove_hook(module, "noop")
    assert _is_pristine(module)


def test_hooks_do_not_touch_parameters_or_state_dict() -> None:
    linear = nn.Linear(3, 3)
    before = {k: v.clone() for k, v in linear.state_dict().items()}
    add_hook(linear, "after", AddAfter(1.0))
    assert linear.state_dict().keys() == before.keys()
    assert all(torch.equal(linear.state_dict()[k], v) for k, v in before.items())
    assert torch.equal(linear(torch.zeros(3)), linear.bias.detach() + 1)


def test_eager_runs_plainly_and_breaks_the_graph_under_compile() -> None:
    calls: list[int] = []

    @eager
    def count(x: Tensor) -> Tensor:
        calls.append(int(x.sum().item()))  # host-side work a graph could not hold
        return x + len(calls)

    assert torch.equal(count(torch.ones(1)), torch.full((1,), 2.0))
    compiled = torch.compile(lambda x: count(x * 2) * 3, backend="eager")
    assert torch.equal(compiled(torch.ones(1)), torch.full((1,), 12.0))  # (2 + 2) * 3
    assert torch.equal(compiled(torch.ones(1)), torch.full((1,), 15.0))  # the counter ran again, not traced
    assert calls == [1, 2, 2]


def test_public_names() -> None:
    assert set(diffcaps.hooks.__all__) <= set(vars(diffcaps.hooks))
