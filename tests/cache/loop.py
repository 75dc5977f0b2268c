"""A deterministic 20-step Euler denoising loop, with a log of which modules ran at each step."""

from __future__ import annotations

from collections.abc import Callable, Generator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch
from torch import Tensor, nn

STEPS = 20


def timesteps(steps: int = STEPS) -> Tensor:
    """Fixed timesteps from 1 to 0 (the model scales them by 1000)."""
    return torch.linspace(1.0, 0.0, steps + 1)


@contextmanager
def call_log(model: nn.Module, suffixes: tuple[str, ...]) -> Generator[list[str]]:
    """Log the names of the modules ending in ``suffixes`` as they run (standard torch hooks)."""
    log: list[str] = []
    handles = []
    for name, module in model.named_modules():
        if name.endswith(suffixes):
            def record(_: nn.Module, __: Any, ___: Any, name: str = name) -> None:
                log.append(name)
            handles.append(module.register_forward_hook(record))
    try:
        yield log
    finally:
        for handle in handles:
            handle.remove()


# what shows that a block or an attention module ran: its first sub-layer (same names in both libraries)
RAN_SUFFIXES = ("attn.to_q", ".norm", ".norm1")

Enter = Callable[[int, float], AbstractContextManager[Any]]


def denoise(model: nn.Module, inputs: dict[str, Any], enter: Enter,
            steps: int = STEPS) -> tuple[Tensor, list[tuple[str, ...]]]:
    """Run the Euler loop ``x += (t_next - t) * v``; returns the final latents and, per step, what ran.

    ``enter(step, timestep_on_the_0_1000_scale)`` gives the context each call runs in.
    """
    ts = timesteps(steps)
    x: Tensor = inputs["hidden_states"].clone()
    ran: list[tuple[str, ...]] = []
    with call_log(model, RAN_SUFFIXES) as log, torch.no_grad():
        for i in range(steps):
            t = ts[i]
            log.clear()
            with enter(i, float(t) * 1000):
                out: Tensor = model(**dict(inputs, hidden_states=x, timestep=t.expand(x.shape[0])),
                                    return_dict=False)[0]
            ran.append(tuple(log))
            x = x + (ts[i + 1] - t) * out
    return x, ran
